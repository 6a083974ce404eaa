"""The two-phase ledger on SQLite: never below zero, exactly once, reconcilable."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from gateway.storage import Conflict, ReserveRequest
from gateway.storage.sqlite import SqliteBackend


@pytest.fixture
async def db(tmp_path: Path) -> AsyncIterator[SqliteBackend]:
    backend = SqliteBackend(str(tmp_path / "ledger.db"), lease_seconds=60)
    await backend.open()
    await backend.migrate()
    yield backend
    await backend.close()


async def team_with(db: SqliteBackend, credits: int) -> str:
    team = await db.create_team("t")
    if credits:
        await db.grant(team.id, "live", credits, "seed", "test")
    return team.id


def req(rid: str, team: str, amount: int = 1) -> ReserveRequest:
    return ReserveRequest(rid, team, "live", "key_1", amount)


async def test_reserve_never_goes_below_zero(db: SqliteBackend) -> None:
    team = await team_with(db, 3)
    results = await db.reserve_batch([req(f"r{i}", team, 2) for i in range(3)])
    assert [r.granted for r in results] == [True, False, False]
    assert [r.available for r in results] == [1, 1, 1]
    assert await db.balance(team, "live") == 1


async def test_a_retried_reservation_id_reserves_once(db: SqliteBackend) -> None:
    team = await team_with(db, 5)
    await db.reserve_batch([req("same", team)])
    await db.reserve_batch([req("same", team)])
    assert await db.balance(team, "live") == 4
    assert await db.reconcile() == []


async def test_post_and_void_resolve_exactly_once(db: SqliteBackend) -> None:
    team = await team_with(db, 5)
    await db.reserve_batch([req("a", team, 3), req("b", team, 1)])
    assert await db.post_batch([("a", 2)]) == 1
    assert await db.post_batch([("a", 2)]) == 0  # late duplicate: not applied
    assert await db.void_batch(["a"]) == 0
    assert await db.void_batch(["b"]) == 1
    assert await db.void_batch(["b"]) == 0
    # 5, minus 3 and 1 reserved, plus 1 returned by the partial post, plus 1 voided.
    assert await db.balance(team, "live") == 3
    assert await db.reconcile() == []
    assert await db.pending_count() == 0


async def test_post_cannot_charge_more_than_reserved(db: SqliteBackend) -> None:
    team = await team_with(db, 5)
    await db.reserve_batch([req("a", team, 1)])
    await db.post_batch([("a", 99)])
    assert await db.balance(team, "live") == 4
    assert await db.reconcile() == []


async def test_sweeper_voids_expired_reservations(tmp_path: Path) -> None:
    db = SqliteBackend(str(tmp_path / "l.db"), lease_seconds=0.05)
    await db.open()
    await db.migrate()
    try:
        team = await team_with(db, 2)
        await db.reserve_batch([req("lost", team), req("kept", team)])
        await db.post_batch([("kept", 1)])
        await asyncio.sleep(0.1)
        assert await db.expire_reservations("void") == 1
        assert await db.expire_reservations("void") == 0
        assert await db.balance(team, "live") == 1
        assert await db.pending_count() == 0
        assert await db.reconcile() == []
    finally:
        await db.close()


async def test_adjustment_below_zero_is_a_conflict(db: SqliteBackend) -> None:
    team = await team_with(db, 2)
    with pytest.raises(Conflict):
        await db.grant(team, "live", -3, "too much", "test")
    assert await db.grant(team, "live", -2, "correction", "test") == 0


async def test_grant_idempotency_key_applies_once(db: SqliteBackend) -> None:
    team = await team_with(db, 0)
    assert await db.grant(team, "live", 10, "purchase", "admin", "order-1") == 10
    assert await db.grant(team, "live", 10, "purchase", "admin", "order-1") == 10
    with pytest.raises(Conflict):
        await db.grant(team, "live", 11, "purchase", "admin", "order-1")
    assert await db.balance(team, "live") == 10


async def test_balance_cannot_be_negative_even_by_hand(db: SqliteBackend, tmp_path: Path) -> None:
    team = await team_with(db, 1)
    raw = sqlite3.connect(tmp_path / "ledger.db")
    with pytest.raises(sqlite3.IntegrityError):
        raw.execute("UPDATE balances SET available = -1 WHERE team_id = ?", (team,))
    raw.close()


async def test_migrations_are_idempotent(db: SqliteBackend) -> None:
    assert await db.migrate() == []
