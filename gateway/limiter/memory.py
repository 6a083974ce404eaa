"""The in-process GCRA limiter: the embedded default, and the fallback when Redis is down."""

from __future__ import annotations

import time
from collections.abc import Sequence

from gateway.limiter import Decision, Limit, decide
from gateway.storage.quotas import QuotaCount

__all__ = ["MemoryLimiter"]

_PRUNE_EVERY = 4096


class MemoryLimiter:
    """Buckets in a dict of theoretical arrival times; full buckets are dropped."""

    def __init__(self) -> None:
        self._tats: dict[str, float] = {}
        self._calls = 0

    async def check(
        self, limits: Sequence[Limit], group: str = "", quotas: Sequence[QuotaCount] = ()
    ) -> Decision:
        # Calendar quotas are not counted here: in one process the store counts them.
        return self.check_now(limits, time.monotonic())

    def check_now(self, limits: Sequence[Limit], now: float) -> Decision:
        """The synchronous decision; no await between reading and writing state."""
        tats = self._tats
        decision, new = decide(limits, [tats.get(limit.bucket) for limit in limits], now)
        if decision.allowed:
            for limit, tat in zip(limits, new, strict=True):
                tats[limit.bucket] = tat
        self._calls += 1
        if self._calls % _PRUNE_EVERY == 0:
            self._prune(now)
        return decision

    def peek_now(self, limits: Sequence[Limit], now: float) -> Decision:
        """The decision ``check_now`` would make, without charging anything."""
        return decide(limits, [self._tats.get(limit.bucket) for limit in limits], now)[0]

    def _prune(self, now: float) -> None:
        # A bucket whose TAT has passed is full again: forgetting it changes nothing.
        stale = [bucket for bucket, tat in self._tats.items() if tat <= now]
        for bucket in stale:
            del self._tats[bucket]

    def __len__(self) -> int:
        return len(self._tats)

    async def close(self) -> None:
        self._tats.clear()
