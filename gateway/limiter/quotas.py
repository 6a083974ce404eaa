"""Who counts calendar request quotas (see gateway/caps.py): Redis, or the store.

With the Redis limiter, quotas are counted in Redis next to the rate-limit
buckets (one script call, all or nothing). While Redis cannot be reached the
store counts instead, so a quota still holds across replicas; what was counted
in one place is not seen by the other, so across a Redis outage a period may
admit up to its quota more (stated in the README). Without Redis the store
counts.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Protocol

from gateway.batching import Grouper
from gateway.limiter import LimiterUnavailable
from gateway.storage.quotas import QuotaCount, QuotaStore, QuotaTake

__all__ = ["QuotaCounter", "RedisQuotaCounter", "StoreQuotaCounter"]

log = logging.getLogger("gateway.limiter")


class QuotaCounter(Protocol):
    async def take(self, counts: Sequence[QuotaCount], group: str) -> QuotaTake: ...


class _RedisQuotas(Protocol):
    async def take_quota(self, counts: Sequence[QuotaCount], group: str) -> QuotaTake: ...


class StoreQuotaCounter:
    """Quotas counted by the store (SQLite or PostgreSQL), concurrent takes batched."""

    def __init__(self, store: QuotaStore) -> None:
        self._store = store
        self._takes: Grouper[Sequence[QuotaCount], QuotaTake] = Grouper(store.take_quotas)

    async def take(self, counts: Sequence[QuotaCount], group: str) -> QuotaTake:
        return await self._takes.submit(counts)


class RedisQuotaCounter:
    """Quotas counted by Redis; by the store while Redis fails."""

    def __init__(self, redis: _RedisQuotas, store: QuotaStore) -> None:
        self._redis = redis
        self._store = store

    async def take(self, counts: Sequence[QuotaCount], group: str) -> QuotaTake:
        try:
            return await self._redis.take_quota(counts, group)
        except LimiterUnavailable as exc:
            log.warning("quota counted by the store: Redis failed: %s", exc)
            return await self._store.take_quota(counts)
