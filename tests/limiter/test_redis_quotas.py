"""Calendar quotas counted by Redis: all or nothing in one script call, with an expiry
after the period's end, and counted by the store while Redis cannot be reached."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path

import redis.asyncio

from gateway.config import LimiterSettings
from gateway.limiter.quotas import RedisQuotaCounter
from gateway.limiter.redis import RedisLimiter, bucket_key
from gateway.storage import QuotaCount
from gateway.storage.sqlite import SqliteBackend
from tests.limiter.conftest import NewGroup


def count(subject: str, limit: int) -> Callable[[float], QuotaCount]:
    """The count of ``subject`` today, for a period ending at the time given."""
    return lambda ends: QuotaCount(subject, "day:2026-12-05", limit, ends)


async def test_redis_counts_all_or_nothing_and_expires_after_the_period(
    redis_url: str, redis_client: redis.asyncio.Redis, new_group: NewGroup
) -> None:
    limiter = RedisLimiter(LimiterSettings(url=redis_url))
    group = new_group()
    ends = time.time() + 3600
    key, team = count("k:key_1", 2), count("t:team_1", 3)
    try:
        results = [await limiter.take_quota([key(ends), team(ends)], group) for _ in range(3)]
        assert [(r.taken, r.used) for r in results] == [
            (True, (1, 1)),
            (True, (2, 2)),
            (False, (2, 2)),
        ]
        # The team's count was not raised by the refused request: one more fits.
        alone = await limiter.take_quota([team(ends)], group)
        assert (alone.taken, alone.used) == (True, (3,))
        stored = bucket_key(group, "q:k:key_1:day:2026-12-05")
        expires = await redis_client.expiretime(stored)
        assert int(ends) + 86_400 - 2 <= expires <= int(ends) + 86_400
        concurrent = await asyncio.gather(
            *(limiter.take_quota([count("k:key_2", 10)(ends)], group) for _ in range(30))
        )
        assert sum(r.taken for r in concurrent) == 10
    finally:
        await limiter.close()


async def test_the_store_counts_while_redis_is_unreachable(tmp_path: Path) -> None:
    # Nothing listens on port 1 of loopback: every call fails at once.
    limiter = RedisLimiter(LimiterSettings(url="redis://127.0.0.1:1/0", timeout_seconds=0.2))
    store = SqliteBackend(str(tmp_path / "q.db"), lease_seconds=60)
    await store.open()
    await store.migrate()
    counter = RedisQuotaCounter(limiter, store)
    ends = time.time() + 60
    try:
        taken = [await counter.take([count("k:key_1", 2)(ends)], "g") for _ in range(3)]
        assert [t.taken for t in taken] == [True, True, False]
    finally:
        await limiter.close()
        await store.close()
