"""Calendar request quotas counted by the store, on both backends: all or nothing,
exact under concurrent takers on two replicas, pruned once their period has ended."""

from __future__ import annotations

import asyncio
import time

from gateway.storage import Backend, QuotaCount
from tests.storage.conftest import Backends

ENDS = time.time() + 3600


def count(subject: str, limit: int, period: str = "day:2026-12-05") -> QuotaCount:
    return QuotaCount(subject, period, limit, ENDS)


async def test_a_quota_takes_until_full_then_refuses(db: Backend) -> None:
    taken = [await db.take_quota([count("k:key_1", 2)]) for _ in range(3)]
    assert [(t.taken, t.used) for t in taken] == [(True, (1,)), (True, (2,)), (False, (2,))]


async def test_one_full_quota_stops_the_others_counting(db: Backend) -> None:
    key, team = count("k:key_1", 5), count("t:team_1", 1)
    first = await db.take_quota([key, team])
    assert (first.taken, first.used) == (True, (1, 1))
    refused = await db.take_quota([key, team])
    assert (refused.taken, refused.used) == (False, (1, 1))
    # The key's own count was not raised by the refused request.
    other_key = await db.take_quota([key])
    assert (other_key.taken, other_key.used) == (True, (2,))


async def test_each_period_counts_afresh(db: Backend) -> None:
    assert (await db.take_quota([count("k:key_1", 1)])).taken
    assert not (await db.take_quota([count("k:key_1", 1)])).taken
    tomorrow = await db.take_quota([count("k:key_1", 1, "day:2026-12-06")])
    assert (tomorrow.taken, tomorrow.used) == (True, (1,))


async def test_quotas_are_exact_under_concurrent_takers_on_two_replicas(
    backends: Backends,
) -> None:
    one, two = await backends.open(), await backends.open()
    n = 15
    quotas = [count("k:key_1", n), count("t:team_1", 10 * n)]
    taken = await asyncio.gather(
        *((one if i % 2 else two).take_quota(quotas) for i in range(3 * n))
    )
    assert sum(t.taken for t in taken) == n
    final = await one.take_quota([count("t:team_1", 10 * n)])
    assert final.used == (n + 1,)


async def test_ended_periods_are_pruned(db: Backend) -> None:
    now = time.time()
    await db.take_quota([QuotaCount("k:key_1", "day:old", 5, now - 10)])
    await db.take_quota([QuotaCount("k:key_1", "day:new", 5, now + 10)])
    assert await db.prune_quotas(now) == 1
    again = await db.take_quota([QuotaCount("k:key_1", "day:new", 5, now + 10)])
    assert again.used == (2,)
