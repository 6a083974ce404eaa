"""The store as the counter of calendar request quotas (see gateway/caps.py).

With the Redis limiter, quotas are counted in Redis by the rate-limit decision
itself (gateway/limiter/redis.py: the same script call, all or nothing). The
store counts them when there is no Redis, and while Redis cannot be reached,
so a quota still holds across replicas; what was counted in one place is not
seen by the other, so across a Redis outage a period may admit up to its
quota more (stated in the README).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from gateway.batching import Grouper
from gateway.storage.quotas import QuotaCount, QuotaStore, QuotaTake

__all__ = ["QuotaCounter", "StoreQuotaCounter"]


class QuotaCounter(Protocol):
    async def take(self, counts: Sequence[QuotaCount], group: str) -> QuotaTake: ...


class StoreQuotaCounter:
    """Quotas counted by the store (SQLite or PostgreSQL), concurrent takes batched."""

    def __init__(self, store: QuotaStore) -> None:
        self._store = store
        self._takes: Grouper[Sequence[QuotaCount], QuotaTake] = Grouper(store.take_quotas)

    async def take(self, counts: Sequence[QuotaCount], group: str) -> QuotaTake:
        return await self._takes.submit(counts)
