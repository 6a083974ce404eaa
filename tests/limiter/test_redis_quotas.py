"""Calendar quotas counted by Redis inside the rate-limit decision: all or nothing in the
same script call, only once the rate limits admit the request, with an expiry after the
period's end; without Redis the decision carries no count, so the store counts."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import redis.asyncio

from gateway.config import LimiterSettings
from gateway.limiter import Limit
from gateway.limiter.fallback import FallbackLimiter
from gateway.limiter.redis import RedisLimiter, bucket_key
from gateway.storage import QuotaCount
from tests.limiter.conftest import NewGroup

ROOMY = [Limit("k:key_1", 6000, 6000)]


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
        decisions = [await limiter.check(ROOMY, group, [key(ends), team(ends)]) for _ in range(3)]
        assert all(d.allowed for d in decisions)
        assert [(d.quota.taken, d.quota.used) for d in decisions if d.quota] == [
            (True, (1, 1)),
            (True, (2, 2)),
            (False, (2, 2)),
        ]
        # The team's count was not raised by the refused request: one more fits.
        alone = await limiter.check(ROOMY, group, [team(ends)])
        assert alone.quota is not None and (alone.quota.taken, alone.quota.used) == (True, (3,))
        stored = bucket_key(group, "q:k:key_1:day:2026-12-05")
        expires = await redis_client.expiretime(stored)
        assert int(ends) + 86_400 - 2 <= expires <= int(ends) + 86_400
        # Concurrent decisions, batched into shared script calls: exactly the quota taken.
        concurrent = await asyncio.gather(
            *(limiter.check(ROOMY, group, [count("k:key_2", 10)(ends)]) for _ in range(30))
        )
        assert sum(1 for d in concurrent if d.quota and d.quota.taken) == 10
        # A decision without quotas in the same batch as ones with them keeps its place.
        mixed = await asyncio.gather(
            limiter.check(ROOMY, group),
            limiter.check(ROOMY, group, [count("k:key_3", 1)(ends)]),
            limiter.check(ROOMY, group),
        )
        assert [d.quota is not None and d.quota.taken for d in mixed] == [False, True, False]
        assert mixed[0].quota is None and mixed[2].quota is None
    finally:
        await limiter.close()


async def test_a_request_the_rate_limit_refuses_does_not_count_against_its_quota(
    redis_url: str, redis_client: redis.asyncio.Redis, new_group: NewGroup
) -> None:
    limiter = RedisLimiter(LimiterSettings(url=redis_url))
    group = new_group()
    ends = time.time() + 3600
    tight = [Limit("k:key_1", 1, 1)]
    try:
        first = await limiter.check(tight, group, [count("k:key_1", 5)(ends)])
        second = await limiter.check(tight, group, [count("k:key_1", 5)(ends)])
        assert first.allowed and first.quota is not None and first.quota.used == (1,)
        assert not second.allowed and second.quota is None
        stored = bucket_key(group, "q:k:key_1:day:2026-12-05")
        assert await redis_client.get(stored) == b"1"
    finally:
        await limiter.close()


async def test_without_redis_the_decision_counts_no_quota_so_the_store_does() -> None:
    # Nothing listens on port 1 of loopback: every call fails at once.
    settings = LimiterSettings(url="redis://127.0.0.1:1/0", timeout_seconds=0.2)
    limiter = FallbackLimiter(RedisLimiter(settings), settings)
    try:
        decision = await limiter.check(ROOMY, "g", [count("k:key_1", 2)(time.time() + 60)])
        assert decision.allowed and decision.quota is None
        assert limiter.degraded
    finally:
        await limiter.close()
