"""Per-key spend caps on both backends: read from the key and checked and counted in the
reserve step itself, given back by every resolution, exact under concurrency across
replicas, reconciled."""

from __future__ import annotations

import asyncio

from gateway.storage import Backend, CapPeriods, IdempotencyClaim, ReserveRequest
from tests.storage.conftest import Backends

DAY, MONTH = "day:2026-12-05", "month:2026-12-01"


async def capped_key(
    db: Backend,
    balance: int = 100,
    name: str = "t",
    per_day: int | None = 10,
    per_month: int | None = None,
) -> tuple[str, str]:
    team = (await db.create_team(name)).id
    key = await db.create_key(team, "k", "live", "hash-" + team, "ckiq_live_abcd", None, None)
    await db.update_key(key.id, {"credit_cap_per_day": per_day, "credit_cap_per_month": per_month})
    await db.grant(team, "live", balance, "top-up", "test")
    return team, key.id


def reserve(
    team: str,
    key: str,
    rid: str,
    amount: int,
    day: str = DAY,
    claim: IdempotencyClaim | None = None,
) -> ReserveRequest:
    return ReserveRequest(rid, team, "live", key, amount, claim, CapPeriods(day, MONTH))


async def test_a_cap_refuses_what_would_pass_it_and_says_what_is_left(db: Backend) -> None:
    team, key = await capped_key(db)
    first = await db.reserve_batch([reserve(team, key, "r1", 4), reserve(team, key, "r2", 4)])
    assert [(r.granted, r.available) for r in first] == [(True, 6), (True, 2)]
    [refused] = await db.reserve_batch([reserve(team, key, "r3", 4)])
    # The balance is 92; the key may spend 2 more today.
    assert (refused.granted, refused.available) == (False, 2)
    assert await db.balance(team, "live") == 92
    [fits] = await db.reserve_batch([reserve(team, key, "r4", 2)])
    assert (fits.granted, fits.available) == (True, 0)
    assert await db.reconcile() == []


async def test_every_resolution_gives_the_unspent_part_back_to_the_cap(db: Backend) -> None:
    team, key = await capped_key(db)
    await db.reserve_batch([reserve(team, key, "r1", 5), reserve(team, key, "r2", 5)])
    assert await db.post_batch([("r1", 2)]) == 1  # 3 back
    assert await db.void_batch(["r2"]) == 1  # 5 back
    [r] = await db.reserve_batch([reserve(team, key, "r3", 8)])
    assert (r.granted, r.available) == (True, 0)
    # A post after the void changes nothing (resolved once), so nothing comes back twice.
    assert await db.post_batch([("r2", 5)]) == 0
    [refused] = await db.reserve_batch([reserve(team, key, "r4", 1)])
    assert (refused.granted, refused.available) == (False, 0)
    assert await db.reconcile() == []


async def test_a_lease_that_runs_out_gives_the_cap_back(backends: Backends) -> None:
    db = await backends.open(lease_seconds=0.05)
    team, key = await capped_key(db)
    [r] = await db.reserve_batch([reserve(team, key, "r1", 10)])
    assert r.granted
    await asyncio.sleep(0.2)
    assert await db.expire_reservations("void") == 1
    [again] = await db.reserve_batch([reserve(team, key, "r2", 10)])
    assert (again.granted, again.available) == (True, 0)
    assert await db.reconcile() == []


async def test_day_and_month_caps_both_hold_and_a_new_day_starts_afresh(db: Backend) -> None:
    team, key = await capped_key(db, balance=1000, per_day=10, per_month=15)
    [a] = await db.reserve_batch([reserve(team, key, "a", 8)])
    assert (a.granted, a.available) == (True, 2)
    [b] = await db.reserve_batch([reserve(team, key, "b", 3)])
    assert (b.granted, b.available) == (False, 2)  # the day's cap
    tomorrow = "day:2026-12-06"
    [c] = await db.reserve_batch([reserve(team, key, "c", 6, day=tomorrow)])
    assert (c.granted, c.available) == (True, 1)  # the month's cap: 15 - 14
    [d] = await db.reserve_batch([reserve(team, key, "d", 2, day=tomorrow)])
    assert (d.granted, d.available) == (False, 1)
    assert await db.reconcile() == []


async def test_the_balance_still_decides_when_it_is_the_smaller(db: Backend) -> None:
    team, key = await capped_key(db, balance=3)
    [r] = await db.reserve_batch([reserve(team, key, "r1", 5)])
    assert (r.granted, r.available) == (False, 3)
    assert await db.reconcile() == []


async def test_a_retried_id_is_counted_once(db: Backend) -> None:
    team, key = await capped_key(db)
    [a] = await db.reserve_batch([reserve(team, key, "same", 6)])
    [b] = await db.reserve_batch([reserve(team, key, "same", 6)])
    assert a.granted and b.granted
    assert await db.balance(team, "live") == 94
    [c] = await db.reserve_batch([reserve(team, key, "other", 4)])
    assert (c.granted, c.available) == (True, 0)
    assert await db.reconcile() == []


async def test_a_mixed_batch_answers_each_request_in_its_place(db: Backend) -> None:
    team, key = await capped_key(db)
    other_team, other_key = await capped_key(db, balance=7, name="other")
    batch = [
        ReserveRequest("u1", other_team, "live", other_key, 5),
        reserve(team, key, "c1", 6),
        ReserveRequest("u2", other_team, "live", other_key, 5),
        reserve(team, key, "c2", 6),
    ]
    results = await db.reserve_batch(batch)
    assert [(r.granted, r.available) for r in results] == [
        (True, 2),
        (True, 4),
        (False, 2),
        (False, 4),
    ]
    assert await db.reconcile() == []


async def test_an_idempotency_key_on_a_capped_key_replays_without_counting(db: Backend) -> None:
    team, key = await capped_key(db)
    claim = IdempotencyClaim("idem-1", "POST", "/v1/assess")
    [first] = await db.reserve_batch([reserve(team, key, "r1", 4, claim=claim)])
    assert first.granted and first.replay is None
    [second] = await db.reserve_batch([reserve(team, key, "r2", 4, claim=claim)])
    assert not second.granted and second.replay is not None
    assert second.replay.state == "in_flight"
    [rest] = await db.reserve_batch([reserve(team, key, "r3", 6)])
    assert (rest.granted, rest.available) == (True, 0)
    assert await db.reconcile() == []


async def test_caps_hold_under_concurrent_reserves_from_two_replicas(backends: Backends) -> None:
    one, two = await backends.open(), await backends.open()
    n, amount = 20, 3
    cap = n * amount
    team, key = await capped_key(one, balance=10_000, per_day=cap)
    # 3N requests at once, half through each replica, in batches of a few.
    requests = [reserve(team, key, f"r{i}", amount) for i in range(3 * n)]
    batches = [requests[i : i + 3] for i in range(0, len(requests), 3)]
    answers = await asyncio.gather(
        *((one if i % 2 else two).reserve_batch(b) for i, b in enumerate(batches))
    )
    granted = [r for batch in answers for r in batch if r.granted]
    assert len(granted) == n
    assert await one.balance(team, "live") == 10_000 - cap
    [after] = await two.reserve_batch([reserve(team, key, "last", 1)])
    assert (after.granted, after.available) == (False, 0)
    assert await one.reconcile() == []


async def test_reconcile_names_a_key_spend_that_differs(backends: Backends) -> None:
    db = await backends.open()
    team, key = await capped_key(db)
    await db.reserve_batch([reserve(team, key, "r1", 4)])
    assert await db.reconcile() == []
    # Tamper with the counter behind the store's back, as a bad migration would.
    if backends.kind == "sqlite":
        import sqlite3

        with sqlite3.connect(backends.location) as raw:
            raw.execute("UPDATE key_spend SET spent = 9")
    else:
        import asyncpg

        conn = await asyncpg.connect(backends.location)
        try:
            await conn.execute("UPDATE key_spend SET spent = 9")
        finally:
            await conn.close()
    [mismatch] = await db.reconcile()
    assert (mismatch.key_id, mismatch.period, mismatch.stored, mismatch.derived) == (
        key,
        DAY,
        9,
        4,
    )


async def test_a_retry_is_granted_even_when_its_first_attempt_used_up_the_cap(
    db: Backend,
) -> None:
    team, key = await capped_key(db)
    [first] = await db.reserve_batch([reserve(team, key, "whole", 10)])
    [retry] = await db.reserve_batch([reserve(team, key, "whole", 10)])
    assert (first.granted, first.available) == (True, 0)
    assert (retry.granted, retry.available) == (True, 0)
    [batch_a, batch_b] = await db.reserve_batch(
        [reserve(team, key, "whole", 10), reserve(team, key, "new", 1)]
    )
    assert batch_a.granted and not batch_b.granted
    assert await db.balance(team, "live") == 90
    assert await db.reconcile() == []


async def test_the_ledger_reads_the_caps_as_they_stand_not_as_the_caller_knew_them(
    db: Backend,
) -> None:
    team, key = await capped_key(db)
    [a] = await db.reserve_batch([reserve(team, key, "a", 4)])
    assert (a.granted, a.available) == (True, 6)
    # Lowered: the next reserve is judged by the new cap at once.
    await db.update_key(key, {"credit_cap_per_day": 5})
    [b] = await db.reserve_batch([reserve(team, key, "b", 2)])
    assert (b.granted, b.available) == (False, 1)
    # Cleared while a caller still thinks the key capped: nothing to count, granted.
    await db.update_key(key, {"credit_cap_per_day": None})
    [c] = await db.reserve_batch([reserve(team, key, "c", 50)])
    assert (c.granted, c.available) == (True, 46)
    # Set again: only what is reserved from now on counts (c was not counted).
    await db.update_key(key, {"credit_cap_per_day": 6})
    [d] = await db.reserve_batch([reserve(team, key, "d", 3)])
    assert (d.granted, d.available) == (False, 2)
    assert await db.reconcile() == []
    # Voiding the uncounted reservation gives back nothing to the cap, and breaks nothing.
    assert await db.void_batch(["c"]) == 1
    [e] = await db.reserve_batch([reserve(team, key, "e", 2)])
    assert (e.granted, e.available) == (True, 0)
    assert await db.reconcile() == []


async def test_a_batch_across_midnight_counts_each_request_in_its_own_day(db: Backend) -> None:
    team, key = await capped_key(db, per_day=5)
    tomorrow = "day:2026-12-06"
    results = await db.reserve_batch(
        [
            reserve(team, key, "late", 4),
            reserve(team, key, "early", 4, day=tomorrow),
            reserve(team, key, "later", 2),
            reserve(team, key, "earlier", 1, day=tomorrow),
        ]
    )
    assert [(r.granted, r.available) for r in results] == [
        (True, 1),
        (True, 1),
        (False, 1),
        (True, 0),
    ]
    assert await db.reconcile() == []


async def test_an_id_twice_in_one_batch_is_reserved_and_counted_once(db: Backend) -> None:
    team, key = await capped_key(db)
    results = await db.reserve_batch(
        [reserve(team, key, "twice", 6), reserve(team, key, "twice", 6), reserve(team, key, "x", 4)]
    )
    assert [(r.granted, r.available) for r in results] == [(True, 4), (True, 4), (True, 0)]
    assert await db.balance(team, "live") == 90
    assert await db.reconcile() == []


async def test_spend_of_earlier_periods_is_pruned_and_what_resolves_later_still_does(
    db: Backend,
) -> None:
    team, key = await capped_key(db, balance=1000, per_day=50, per_month=500)
    periods = [
        ("old-month", CapPeriods("day:2026-11-30", "month:2026-11-01"), 7),
        ("yesterday", CapPeriods("day:2026-12-04", MONTH), 5),
        ("today", CapPeriods(DAY, MONTH), 3),
    ]
    for rid, caps, amount in periods:
        [r] = await db.reserve_batch([ReserveRequest(rid, team, "live", key, amount, None, caps)])
        assert r.granted
    assert await db.post_batch([("old-month", 7)]) == 1
    # Three rows go: the two earlier days and the earlier month.
    assert await db.prune_key_spend(CapPeriods(DAY, MONTH)) == 3
    spent = await db.key_spending(
        [key], ["day:2026-11-30", "day:2026-12-04", DAY, "month:2026-11-01", MONTH]
    )
    assert spent == {(key, DAY): 3, (key, MONTH): 8}
    # A reservation of a pruned day resolves as usual; the kept month gets its part back.
    assert await db.void_batch(["yesterday"]) == 1
    assert await db.key_spending([key], [MONTH]) == {(key, MONTH): 3}
    assert await db.balance(team, "live") == 1000 - 7 - 3
    assert await db.reconcile() == []
    assert await db.prune_key_spend(CapPeriods(DAY, MONTH)) == 0
