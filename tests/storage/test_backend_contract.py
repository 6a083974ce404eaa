"""What every backend promises, run against SQLite and PostgreSQL alike.

The two-phase ledger (never below zero, exactly once, reconcilable, retention
that keeps it so), teams and keys, and the key change feed.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time

import asyncpg
import pytest

from gateway.storage import (
    MAX_BALANCE,
    Backend,
    Conflict,
    GrantResult,
    KeyReused,
    NotFound,
    ReserveRequest,
    ReserveResult,
)
from tests.storage.conftest import Backends


async def team_with(db: Backend, credits: int, name: str = "t") -> str:
    team = await db.create_team(name)
    if credits:
        await db.grant(team.id, "live", credits, "seed", "test")
    return team.id


def req(rid: str, team: str, amount: int = 1, environment: str = "live") -> ReserveRequest:
    assert environment in ("live", "test")
    return ReserveRequest(rid, team, "live" if environment == "live" else "test", "key_1", amount)


# -- the ledger -------------------------------------------------------------------


async def test_reserve_never_goes_below_zero(db: Backend) -> None:
    team = await team_with(db, 3)
    results = await db.reserve_batch([req(f"r{i}", team, 2) for i in range(3)])
    assert [r.granted for r in results] == [True, False, False]
    assert [r.available for r in results] == [1, 1, 1]
    assert await db.balance(team, "live") == 1


async def test_reserve_is_greedy_in_request_order_per_account(db: Backend) -> None:
    a = await team_with(db, 5, "a")
    b = await team_with(db, 2, "b")
    await db.grant(a, "test", 1, "seed", "test")
    empty = await team_with(db, 0, "empty")
    results = await db.reserve_batch(
        [
            req("1", b, 1),
            req("2", a, 3),
            req("3", empty, 1),
            req("4", a, 3),  # refused: 2 left
            req("5", a, 1, "test"),
            req("6", b, 2),  # refused: 1 left
            req("7", a, 2),  # a smaller one after a refusal still fits
            req("8", b, 1),
            req("9", a, 1, "test"),
        ]
    )
    assert results == [
        ReserveResult(True, 1),
        ReserveResult(True, 2),
        ReserveResult(False, 0),
        ReserveResult(False, 2),
        ReserveResult(True, 0),
        ReserveResult(False, 1),
        ReserveResult(True, 0),
        ReserveResult(True, 0),
        ReserveResult(False, 0),
    ]
    assert await db.balances(a) == {"live": 0, "test": 0}
    assert await db.balances(b) == {"live": 0, "test": 0}
    assert await db.balances(empty) == {"live": 0, "test": 0}
    assert await db.pending_count() == 5
    assert await db.reconcile() == []


async def test_an_empty_batch_is_nothing(db: Backend) -> None:
    assert await db.reserve_batch([]) == []
    assert await db.post_batch([]) == 0
    assert await db.void_batch([]) == 0


async def test_a_retried_reservation_id_reserves_once(db: Backend) -> None:
    team = await team_with(db, 5)
    await db.reserve_batch([req("same", team)])
    await db.reserve_batch([req("same", team)])
    assert await db.balance(team, "live") == 4
    assert await db.reconcile() == []


async def test_an_id_twice_in_one_batch_reserves_once(db: Backend) -> None:
    team = await team_with(db, 5)
    results = await db.reserve_batch([req("same", team, 2), req("same", team, 2)])
    assert results == [ReserveResult(True, 3), ReserveResult(True, 3)]
    assert await db.balance(team, "live") == 3
    assert await db.pending_count() == 1
    assert await db.reconcile() == []


async def test_an_id_reused_for_another_account_counts_where_it_was_first_reserved(
    db: Backend,
) -> None:
    a = await team_with(db, 5, "a")
    b = await team_with(db, 5, "b")
    results = await db.reserve_batch([req("x", b, 2), req("x", a, 3)])
    assert results == [ReserveResult(True, 3), ReserveResult(True, 5)]
    assert (await db.balance(a, "live"), await db.balance(b, "live")) == (5, 3)
    assert await db.reconcile() == []


async def test_post_and_void_resolve_exactly_once(db: Backend) -> None:
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


async def test_unknown_ids_change_nothing(db: Backend) -> None:
    team = await team_with(db, 5)
    assert await db.post_batch([("nope", 1)]) == 0
    assert await db.void_batch(["nope"]) == 0
    assert await db.balance(team, "live") == 5
    assert await db.reconcile() == []


async def test_an_id_twice_in_one_post_batch_applies_the_first(db: Backend) -> None:
    team = await team_with(db, 5)
    await db.reserve_batch([req("a", team, 3)])
    assert await db.post_batch([("a", 1), ("a", 3)]) == 1
    assert await db.balance(team, "live") == 4
    assert await db.reconcile() == []


async def test_post_cannot_charge_more_than_reserved(db: Backend) -> None:
    team = await team_with(db, 5)
    await db.reserve_batch([req("a", team, 1)])
    await db.post_batch([("a", 99)])
    assert await db.balance(team, "live") == 4
    assert await db.reconcile() == []


async def test_a_negative_charge_posts_nothing(db: Backend) -> None:
    team = await team_with(db, 5)
    await db.reserve_batch([req("a", team, 2)])
    assert await db.post_batch([("a", -4)]) == 1
    assert await db.balance(team, "live") == 5
    assert await db.reconcile() == []


async def test_sweeper_voids_expired_reservations(backends: Backends) -> None:
    db = await backends.open(lease_seconds=0.05)
    team = await team_with(db, 2)
    await db.reserve_batch([req("lost", team), req("kept", team)])
    await db.post_batch([("kept", 1)])
    await asyncio.sleep(0.1)
    assert await db.expire_reservations("void") == 1
    assert await db.expire_reservations("void") == 0
    assert await db.balance(team, "live") == 1
    assert await db.pending_count() == 0
    assert await db.reconcile() == []


async def test_sweeper_posts_expired_reservations_in_full(backends: Backends) -> None:
    db = await backends.open(lease_seconds=0.05)
    team = await team_with(db, 5)
    await db.reserve_batch([req("lost", team, 3)])
    await asyncio.sleep(0.1)
    assert await db.expire_reservations("post") == 1
    assert await db.post_batch([("lost", 1)]) == 0  # the late post is not applied
    assert await db.balance(team, "live") == 2
    assert await db.pending_count() == 0
    assert await db.reconcile() == []


async def test_sweeper_takes_at_most_its_limit(backends: Backends) -> None:
    db = await backends.open(lease_seconds=0.05)
    team = await team_with(db, 5)
    await db.reserve_batch([req(f"r{i}", team) for i in range(5)])
    await asyncio.sleep(0.1)
    assert [await db.expire_reservations("void", limit=2) for _ in range(4)] == [2, 2, 1, 0]
    assert await db.balance(team, "live") == 5


async def test_a_live_lease_is_not_swept(db: Backend) -> None:
    team = await team_with(db, 5)
    await db.reserve_batch([req("a", team)])
    assert await db.expire_reservations("void") == 0
    assert await db.pending_count() == 1


async def test_adjustment_below_zero_is_a_conflict(db: Backend) -> None:
    team = await team_with(db, 2)
    with pytest.raises(Conflict):
        await db.grant(team, "live", -3, "too much", "test")
    assert await db.grant(team, "live", -2, "correction", "test") == 0


async def test_grant_idempotency_key_applies_once(db: Backend) -> None:
    team = await team_with(db, 0)
    assert await db.grant(team, "live", 10, "purchase", "admin", "order-1") == 10
    assert await db.grant(team, "live", 10, "purchase", "admin", "order-1") == 10
    with pytest.raises(Conflict):
        await db.grant(team, "live", 11, "purchase", "admin", "order-1")
    assert await db.balance(team, "live") == 10


async def test_grant_idempotency_key_is_per_team_not_per_environment(db: Backend) -> None:
    team = await team_with(db, 0)
    other = await team_with(db, 0, "other")
    assert await db.grant(team, "live", 10, "purchase", "admin", "order-1") == 10
    with pytest.raises(Conflict):
        await db.grant(team, "test", 10, "purchase", "admin", "order-1")
    assert await db.grant(other, "live", 10, "purchase", "admin", "order-1") == 10
    assert await db.balances(team) == {"live": 10, "test": 0}


async def test_a_replayed_grant_answers_the_first_answer(db: Backend) -> None:
    team = await team_with(db, 0)
    first = await db.apply_grant(team, "live", 10, "purchase", "admin", "order-1", "h1")
    assert first == GrantResult(10, replayed=False)
    await db.reserve_batch([req("a", team, 4)])
    again = await db.apply_grant(team, "live", 10, "purchase", "admin", "order-1", "h1")
    assert again == GrantResult(10, replayed=True)
    assert await db.balance(team, "live") == 6


async def test_a_grant_key_reused_for_another_request_is_told_apart(db: Backend) -> None:
    team = await team_with(db, 0)
    await db.apply_grant(team, "live", 10, "purchase", "admin", "order-1", "h1")
    # Same amount and environment, another reason: a different request.
    with pytest.raises(KeyReused):
        await db.apply_grant(team, "live", 10, "other", "admin", "order-1", "h2")
    with pytest.raises(KeyReused):
        await db.apply_grant(team, "test", 10, "purchase", "admin", "order-1", "h3")
    assert len(await db.ledger_entries(team, 10, None)) == 1


async def test_a_balance_cannot_grow_past_the_bound(db: Backend) -> None:
    team = await team_with(db, 0)
    await db.grant(team, "live", MAX_BALANCE, "all of it", "admin")
    with pytest.raises(Conflict):
        await db.grant(team, "live", 1, "one more", "admin")
    # Not wedged: an adjustment still works.
    assert await db.grant(team, "live", -1, "correction", "admin") == MAX_BALANCE - 1


async def test_granting_to_an_unknown_team_is_not_found(db: Backend) -> None:
    with pytest.raises(NotFound):
        await db.grant("team_nope", "live", 10, "purchase", "admin")


async def test_balances_and_ledger_entries(db: Backend) -> None:
    team = await team_with(db, 0)
    assert await db.balances(team) == {"live": 0, "test": 0}
    assert await db.balance(team, "test") == 0
    await db.grant(team, "live", 10, "first", "admin")
    await db.grant(team, "test", 7, "second", "admin")
    await db.grant(team, "live", -3, "third", "admin")
    assert await db.balances(team) == {"live": 7, "test": 7}
    entries = await db.ledger_entries(team, 10, None)
    assert [(e.kind, e.environment, e.amount, e.reason) for e in entries] == [
        ("adjust", "live", -3, "third"),
        ("grant", "test", 7, "second"),
        ("grant", "live", 10, "first"),
    ]
    assert all(e.team_id == team and abs(e.created_at - time.time()) < 60 for e in entries)
    assert all(e.id.startswith("c") and e.reservation_id is None for e in entries)
    older = await db.ledger_entries(team, 1, entries[0].cursor)
    assert [e.reason for e in older] == ["second"]
    assert await db.ledger_entries(team, 10, entries[-1].cursor) == []


async def test_balance_cannot_be_negative_even_by_hand(db: Backend, backends: Backends) -> None:
    team = await team_with(db, 1)
    if backends.kind == "sqlite":
        raw = sqlite3.connect(backends.location)
        with pytest.raises(sqlite3.IntegrityError):
            raw.execute("UPDATE balances SET available = -1 WHERE team_id = ?", (team,))
        raw.close()
    else:
        conn = await asyncpg.connect(backends.location)
        try:
            with pytest.raises(asyncpg.CheckViolationError):
                await conn.execute("UPDATE balances SET available = -1 WHERE team_id = $1", team)
        finally:
            await conn.close()


async def test_migrations_are_idempotent(db: Backend) -> None:
    assert await db.migrate() == []


async def test_ping(db: Backend) -> None:
    await db.ping()


# -- retention ----------------------------------------------------------------------


async def test_roll_up_keeps_the_ledger_reconcilable(db: Backend) -> None:
    team = await team_with(db, 20)
    other = await team_with(db, 5, "other")
    await db.reserve_batch(
        [
            req("a", team, 3),
            req("b", team, 2),
            req("c", team, 1),
            req("d", other, 4),
            req("pending", team, 5),
        ]
    )
    await db.post_batch([("a", 3), ("b", 1), ("d", 4)])
    await db.void_batch(["c"])
    balances = (await db.balances(team), await db.balances(other))

    assert await db.roll_up(30) == 0  # nothing that old
    assert await db.roll_up(0) == 4
    assert await db.pending_count() == 1
    assert await db.reconcile() == []
    assert (await db.balances(team), await db.balances(other)) == balances

    # More of the same day: added to the same summary rows.
    await db.post_batch([("pending", 2)])
    assert await db.roll_up(0) == 1
    assert await db.roll_up(0) == 0
    assert await db.reconcile() == []
    assert await db.balance(team, "live") == 20 - 3 - 1 - 2
    assert await db.pending_count() == 0


async def test_a_rolled_up_id_is_no_longer_resolvable(db: Backend) -> None:
    team = await team_with(db, 5)
    await db.reserve_batch([req("a", team, 2)])
    await db.post_batch([("a", 2)])
    await db.roll_up(0)
    assert await db.void_batch(["a"]) == 0
    assert await db.balance(team, "live") == 3
    assert await db.reconcile() == []


# -- teams and keys -----------------------------------------------------------------


async def test_teams(db: Backend) -> None:
    acme = await db.create_team("acme", 120)
    assert acme.name == "acme" and acme.rate_limit_per_minute == 120
    assert abs(acme.created_at - time.time()) < 60
    with pytest.raises(Conflict):
        await db.create_team("acme")
    assert await db.get_team(acme.id) == acme
    assert await db.get_team("acme") == acme
    with pytest.raises(NotFound):
        await db.get_team("nobody")
    others = [await db.create_team(f"team {i}") for i in range(4)]
    everyone = sorted([acme, *others], key=lambda t: t.id)
    first = await db.list_teams(3, None)
    rest = await db.list_teams(3, first[-1].id)
    assert first + rest == everyone
    assert len(first) == 3


async def test_a_team_named_like_another_teams_id_is_found_by_id_first(db: Backend) -> None:
    first = await db.create_team("first")
    impostor = await db.create_team(first.id)
    assert await db.get_team(first.id) == first
    assert await db.get_team(impostor.name) == first


async def test_keys(db: Backend) -> None:
    team = await db.create_team("acme", 30)
    expires = time.time() + 3600.123456
    key = await db.create_key(team.id, "ci", "test", "hash-1", "ckiq_test_abcd", 10, expires)
    assert (key.team_id, key.name, key.environment, key.prefix) == (
        team.id,
        "ci",
        "test",
        "ckiq_test_abcd",
    )
    assert key.rate_limit_per_minute == 10 and not key.disabled
    assert key.expires_at == pytest.approx(expires, abs=1e-5)
    assert key.last_used_at is None and key.revoked_at is None
    assert await db.get_key(key.id) == key

    record = await db.find_key("hash-1")
    assert record is not None
    assert (record.id, record.team_id, record.environment) == (key.id, team.id, "test")
    assert (record.rate_limit_per_minute, record.team_rate_limit_per_minute) == (10, 30)
    assert record.usable_at(time.time())
    assert await db.find_key("hash-unknown") is None
    assert await db.find_key_id_by_hash("hash-1") == key.id
    assert await db.find_key_id_by_hash("hash-unknown") is None
    assert await db.find_key_hash_by_id(key.id) == "hash-1"
    assert await db.find_key_hash_by_id("key_nope") is None

    with pytest.raises(NotFound):
        await db.create_key("team_nope", "x", "live", "hash-2", "ckiq_live_abcd", None, None)
    with pytest.raises(NotFound):
        await db.get_key("key_nope")

    more = [
        await db.create_key(team.id, f"k{i}", "live", f"hash-k{i}", "ckiq_live_abcd", None, None)
        for i in range(3)
    ]
    everything = sorted([key, *more], key=lambda k: k.id)
    first = await db.list_keys(team.id, 2, None)
    assert first + await db.list_keys(team.id, 10, first[-1].id) == everything


async def test_revoking_a_key(db: Backend) -> None:
    team = await db.create_team("acme")
    key = await db.create_key(team.id, "ci", "live", "hash-1", "ckiq_live_abcd", None, None)
    revoked = await db.revoke_key(key.id)
    assert revoked.revoked_at is not None and abs(revoked.revoked_at - time.time()) < 60
    record = await db.find_key("hash-1")
    assert record is not None and not record.usable_at(time.time())
    with pytest.raises(Conflict):
        await db.revoke_key(key.id)
    with pytest.raises(NotFound):
        await db.revoke_key("key_nope")
    # A revoked key keeps its hash (a change by id is still announced to the own cache).
    assert await db.find_key_hash_by_id(key.id) == "hash-1"


async def test_every_key_write_is_in_the_change_feed(db: Backend) -> None:
    team = await db.create_team("acme")
    start = await db.latest_key_change()
    assert await db.key_changes_since(start) == (start, [], False)

    key = await db.create_key(team.id, "ci", "live", "hash-1", "ckiq_live_abcd", None, None)
    after_create = await db.latest_key_change()
    assert after_create > start
    await db.revoke_key(key.id)
    latest = await db.latest_key_change()
    assert latest > after_create

    seq, changes, gap = await db.key_changes_since(start)
    assert (seq, gap) == (latest, False)
    assert [(c.key_hash, c.team_id) for c in changes] == [("hash-1", None), ("hash-1", None)]
    assert [c.seq for c in changes] == sorted(c.seq for c in changes)
    assert await db.key_changes_since(latest) == (latest, [], False)
    # A failed write logs nothing.
    with pytest.raises(Conflict):
        await db.revoke_key(key.id)
    assert await db.latest_key_change() == latest
