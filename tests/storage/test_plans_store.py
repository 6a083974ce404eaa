"""Plans on both backends: a refill happens once per period, ``expire`` takes back only
the allowance part (never a top-up), spending takes the allowance first, and the
ledger reconciles after every step."""

from __future__ import annotations

import asyncio

import pytest

from gateway.plans import Period, Rollover
from gateway.storage import Backend, NotFound, ReserveRequest
from tests.storage.conftest import Backends


async def spend(db: Backend, team: str, rid: str, amount: int) -> None:
    [result] = await db.reserve_batch([ReserveRequest(rid, team, "live", "key_1", amount)])
    assert result.granted
    assert await db.post_batch([(rid, amount)]) == 1


async def plan(
    db: Backend,
    team: str,
    key: str,
    allowance: int = 50,
    rollover: Rollover = "expire",
    max_balance: int | None = None,
    period: Period = "day",
) -> int | None:
    _, refill = await db.set_plan(team, "live", allowance, period, 1, rollover, max_balance, key)
    return None if refill is None else refill.refilled


async def test_setting_a_plan_refills_its_period_once(db: Backend) -> None:
    team = (await db.create_team("t")).id
    assert await plan(db, team, "day:2026-01-01") == 50
    # Changing the plan in the same period refills nothing more.
    assert await plan(db, team, "day:2026-01-01", allowance=80) is None
    assert await db.refill(team, "live", "day:2026-01-01") is None
    assert await db.balance(team, "live") == 50
    [stored] = await db.plans(team)
    assert (stored.allowance, stored.current_period) == (80, "day:2026-01-01")
    refill = await db.refill(team, "live", "day:2026-01-02")
    assert refill is not None and (refill.refilled, refill.expired) == (80, 50)
    assert await db.balance(team, "live") == 80
    assert await db.reconcile() == []


async def test_expire_takes_back_the_unspent_allowance_never_a_top_up(db: Backend) -> None:
    team = (await db.create_team("t")).id
    await db.grant(team, "live", 100, "top-up", "test")
    await plan(db, team, "day:1")
    await spend(db, team, "r1", 30)  # from the allowance: 20 of it left
    refill = await db.refill(team, "live", "day:2")
    assert refill is not None and (refill.expired, refill.refilled) == (20, 50)
    assert await db.balance(team, "live") == 150
    await spend(db, team, "r2", 70)  # the whole allowance, then 20 of the top-up
    refill = await db.refill(team, "live", "day:3")
    assert refill is not None and (refill.expired, refill.refilled) == (0, 50)
    assert await db.balance(team, "live") == 130  # the 80 left of the top-up, kept
    assert await db.reconcile() == []


async def test_a_void_returns_credits_as_top_up(db: Backend) -> None:
    team = (await db.create_team("t")).id
    await plan(db, team, "day:1")
    [held] = await db.reserve_batch([ReserveRequest("r1", team, "live", "key_1", 10)])
    assert held.granted
    assert await db.void_batch(["r1"]) == 1
    refill = await db.refill(team, "live", "day:2")
    # 40 of the allowance was left; the 10 that came back is the team's to keep.
    assert refill is not None and refill.expired == 40
    assert await db.balance(team, "live") == 60
    assert await db.reconcile() == []


async def test_carry_keeps_the_rest_up_to_the_maximum(db: Backend) -> None:
    team = (await db.create_team("t")).id
    assert await plan(db, team, "week:1", rollover="carry", max_balance=120, period="week") == 50
    refill = await db.refill(team, "live", "week:2")
    assert refill is not None and (refill.expired, refill.refilled, refill.balance) == (0, 50, 100)
    refill = await db.refill(team, "live", "week:3")
    assert refill is not None and (refill.refilled, refill.balance) == (20, 120)
    refill = await db.refill(team, "live", "week:4")
    assert refill is not None and (refill.refilled, refill.balance) == (0, 120)
    assert await db.reconcile() == []


async def test_clearing_a_plan_stops_refills_and_keeps_the_balance(db: Backend) -> None:
    team = (await db.create_team("t")).id
    await plan(db, team, "day:1")
    cleared = await db.clear_plan(team, "live")
    assert cleared.allowance == 50
    assert await db.refill(team, "live", "day:2") is None
    assert await db.balance(team, "live") == 50
    with pytest.raises(NotFound):
        await db.clear_plan(team, "live")
    with pytest.raises(NotFound):
        await db.set_plan("team_missing", "live", 5, "day", 1, "expire", None, "day:1")
    assert await db.reconcile() == []


async def test_replicas_racing_over_one_period_refill_it_once(backends: Backends) -> None:
    replicas = [await backends.open() for _ in range(2)]
    team = (await replicas[0].create_team("t")).id
    await plan(replicas[0], team, "day:1")
    await spend(replicas[0], team, "r1", 5)
    done = await asyncio.gather(
        *(replicas[i % 2].refill(team, "live", "day:2") for i in range(10)),
        *(spend(replicas[i % 2], team, f"s{i}", 1) for i in range(10)),
    )
    refills = [r for r in done[:10] if r is not None]
    assert len(refills) == 1
    assert await replicas[1].balance(team, "live") == 50 - 5 - refills[0].expired + 50 - 10
    assert await replicas[1].reconcile() == []


async def test_max_balance_bounds_an_expiring_refill_too(db: Backend) -> None:
    team = (await db.create_team("t")).id
    await db.grant(team, "live", 100, "top-up", "test")
    assert await plan(db, team, "day:1", max_balance=120) == 20
    refill = await db.refill(team, "live", "day:2")
    # The 20 of allowance expire, then the balance is lifted back to the maximum.
    assert refill is not None and (refill.expired, refill.refilled, refill.balance) == (20, 20, 120)
    assert await db.reconcile() == []


async def test_the_ledger_lists_refills_and_expiries_and_pages_through_them(db: Backend) -> None:
    team = (await db.create_team("t")).id
    await plan(db, team, "day:1")
    await db.grant(team, "live", 7, "top-up", "test")
    await db.refill(team, "live", "day:2")
    entries = await db.ledger_entries(team, 10, None)
    assert sorted((e.kind, e.amount, e.reason) for e in entries) == [
        ("expire", -50, "day:2"),
        ("grant", 7, "top-up"),
        ("refill", 50, "day:1"),
        ("refill", 50, "day:2"),
    ]
    paged, before = [], None
    while True:
        page = await db.ledger_entries(team, 1, before)
        if not page:
            break
        paged += page
        before = page[-1].cursor
    assert [e.id for e in paged] == [e.id for e in entries]


async def test_a_plan_set_back_to_a_refilled_period_is_marked_not_refilled(db: Backend) -> None:
    team = (await db.create_team("t")).id
    await plan(db, team, "month:2026-12-01", period="month")
    await plan(db, team, "day:2026-12-05")  # a new kind of period: its own refill
    assert await plan(db, team, "month:2026-12-01", period="month") is None
    [stored] = await db.plans(team)
    # Remembered, so the refill loop does not ask again every few seconds.
    assert stored.current_period == "month:2026-12-01"
    assert await db.balance(team, "live") == 50
    assert await db.reconcile() == []
