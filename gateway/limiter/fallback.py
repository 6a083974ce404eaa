"""The failure policy around a remote limiter: what to decide while Redis is unreachable.

Every call to the primary is bounded by ``timeout_seconds`` (kept by
gateway.deadlines' sweep, within a tenth of it, rather than a timer per call),
so a slow Redis costs a request at most that. On a failure the limiter turns *degraded* and
applies ``on_unavailable``: decide in process (``fallback``), refuse
(``fail_closed``, raising :class:`LimiterUnavailable`) or admit (``fail_open``).
While degraded one request at most every ``retry_interval_seconds`` tries the
primary again; the first that succeeds ends the degraded state.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence

from gateway.config import LimiterSettings
from gateway.deadlines import Deadlines, resolution_for
from gateway.limiter import Decision, Limit, Limiter, LimiterUnavailable
from gateway.limiter.memory import MemoryLimiter
from gateway.storage.quotas import QuotaCount

__all__ = ["FallbackLimiter"]

log = logging.getLogger("gateway.limiter")


class FallbackLimiter:
    """Wraps ``primary`` with a timeout and the ``on_unavailable`` policy.

    ``degraded`` is true while the primary is considered down, and
    ``last_error`` then names what its last failure was (an exception class);
    ``fallback_decisions`` counts decisions made without it and ``failures``
    counts calls to it that failed or timed out.
    """

    def __init__(
        self,
        primary: Limiter,
        settings: LimiterSettings,
        fallback: MemoryLimiter | None = None,
    ) -> None:
        self._primary = primary
        self._fallback = fallback if fallback is not None else MemoryLimiter()
        self._timeout = settings.timeout_seconds
        self._deadlines = Deadlines(resolution=resolution_for(self._timeout))
        self._policy = settings.on_unavailable
        self._retry_interval = settings.retry_interval_seconds
        self._retry_at = 0.0
        self.degraded = False
        self.last_error: str | None = None
        self.fallback_decisions = 0
        self.failures = 0

    async def check(
        self, limits: Sequence[Limit], group: str, quotas: Sequence[QuotaCount] = ()
    ) -> Decision:
        """The primary's decision (with its quota count); without it, one with no quota
        counted (the caller has the store count them)."""
        probe = self.degraded
        if probe:
            now = time.monotonic()
            if now < self._retry_at:
                return self._without_primary(limits)
            # Set before the await: concurrent requests keep to the fallback meanwhile.
            self._retry_at = now + self._retry_interval
        try:
            async with self._deadlines.until(time.monotonic() + self._timeout):
                decision = await self._primary.check(limits, group, quotas)
        except (LimiterUnavailable, TimeoutError) as exc:
            self._failed(exc)
            return self._without_primary(limits)
        # Only a call started while degraded proves recovery: one that was already
        # under way when the primary failed says nothing about it now.
        if probe and self.degraded:
            self.degraded = False
            self.last_error = None
            log.info("rate limiter backend answers again; leaving %s mode", self._policy)
        return decision

    def _failed(self, exc: BaseException) -> None:
        self.failures += 1
        self._retry_at = time.monotonic() + self._retry_interval
        # What the primary's client raised, not our wrapper of it.
        self.last_error = type(exc.__cause__ or exc).__name__
        if not self.degraded:
            self.degraded = True
            reason = str(exc) or f"no answer within {self._timeout} s"
            log.warning(
                "rate limiter backend unavailable (%s); %s until it answers again",
                reason,
                self._policy,
            )

    def _without_primary(self, limits: Sequence[Limit]) -> Decision:
        if self._policy == "fail_closed":
            raise LimiterUnavailable("rate limiter backend unavailable")
        self.fallback_decisions += 1
        if self._policy == "fallback":
            return self._fallback.check_now(limits, time.monotonic())
        own = limits[0]
        return Decision(True, own.per_minute, own.burst, 0.0, 0.0, room=own.burst)

    async def close(self) -> None:
        await self._deadlines.close()
        try:
            await self._primary.close()
        finally:
            await self._fallback.close()
