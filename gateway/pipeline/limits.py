"""Rate limits: a key's policies, the one limiter call, and the rate headers it yields."""

from __future__ import annotations

import math

from gateway import errors
from gateway.caps import Calendar, Quota, quotas
from gateway.config import Settings
from gateway.limiter import Decision, Degradable, Limit, Limiter, LimiterUnavailable
from gateway.limiter.quotas import QuotaCounter
from gateway.limiter.watch import ReserveAhead
from gateway.metrics import Metrics
from gateway.models import KeyRecord
from gateway.pipeline.exchange import Exchange
from gateway.storage import StorageError
from gateway.storage.quotas import QuotaCount, QuotaTake

__all__ = ["RateLimits", "rate_headers"]


def rate_headers(decision: Decision) -> dict[str, str]:
    """The IETF (q/r/t) and legacy X-RateLimit headers of a decision (contract §1)."""
    wait = decision.next_after if decision.allowed else decision.retry_after
    t = max(0, math.ceil(wait - 1e-9))
    if not decision.allowed:
        t = max(1, t)
    return {
        "RateLimit-Policy": f'"default";q={decision.limit};w=60',
        "RateLimit": f'"default";r={decision.remaining};t={t}',
        "X-RateLimit-Limit": str(decision.limit),
        "X-RateLimit-Remaining": str(decision.remaining),
        "X-RateLimit-Reset": str(max(0, math.ceil(decision.reset_after - 1e-9))),
    }


def with_quotas(
    headers: dict[str, str], under: list[Quota], used: tuple[int, ...], now: float
) -> None:
    """Add each calendar quota to the IETF headers: its policy, and what is left of it."""
    policies = [headers["RateLimit-Policy"]]
    left = [headers["RateLimit"]]
    for quota, count in zip(under, used, strict=True):
        q = quota.count
        policies.append(f'"{quota.policy}";q={q.limit};w={quota.window}')
        left.append(f'"{quota.policy}";r={max(0, q.limit - count)};t={_until(q.ends_at, now)}')
    headers["RateLimit-Policy"] = ", ".join(policies)
    headers["RateLimit"] = ", ".join(left)


def _until(moment: float, now: float) -> int:
    return max(1, math.ceil(moment - now - 1e-9))


class RateLimits:
    def __init__(
        self,
        settings: Settings,
        limiter: Limiter,
        metrics: Metrics,
        quotas: QuotaCounter | None = None,
    ) -> None:
        limits = settings.rate_limit
        self._quotas = quotas
        self._calendar = Calendar(settings.plans.clock_offset_seconds)
        self._default_limit = limits.per_minute
        self._default_burst = limits.burst or limits.per_minute
        self._limiter = limiter
        self._degradable = limiter if isinstance(limiter, Degradable) else None
        self._kind = settings.limiter.kind
        self._metrics = metrics
        # Overlapping the reserve with the limit decision only pays when the
        # decision is a round trip of its own (Redis).
        self.ahead = ReserveAhead() if settings.limiter.kind == "redis" else None

    def limits(self, key: KeyRecord) -> list[Limit]:
        if key.rate_limit_per_minute is not None:
            own = Limit("k:" + key.id, key.rate_limit_per_minute, key.rate_limit_per_minute)
        else:
            own = Limit("k:" + key.id, self._default_limit, self._default_burst)
        if key.team_rate_limit_per_minute is None:
            return [own]
        team = key.team_rate_limit_per_minute
        return [own, Limit("t:" + key.team_id, team, team)]

    def may_reserve_ahead(self, key: KeyRecord) -> bool:
        """Whether this request may send its reservation before the decision is back."""
        return self.ahead is not None and self.ahead.take(key.id)

    async def check(self, ex: Exchange, key: KeyRecord) -> None:
        """Admit the request or raise a :class:`Refusal` (429, or 503 when failing closed)."""
        under = (
            quotas(key.id, key.team_id, key.limits, self._calendar)
            if key.limits is not None and key.limits.has_quota
            else []
        )
        counts = [q.count for q in under]
        try:
            decision = await self._limiter.check(self.limits(key), key.team_id, counts)
        except LimiterUnavailable:
            raise errors.refuse_unavailable() from None
        ex.rate_headers = rate_headers(decision)
        if self.ahead is not None:
            self.ahead.saw(key.id, decision)
        degraded = self._degradable is not None and self._degradable.degraded
        decided_by = "fallback" if degraded else self._kind
        if decision.allowed and under:
            await self._quotas_taken(ex, key, under, counts, decision.quota, decided_by)
        if decision.allowed:
            self._metrics.count_decision("allowed", decided_by)
            return
        self._metrics.count_decision("rejected", decided_by)
        raise errors.refuse_rate_limited(decision.retry_after, decision.rejected_limit)

    async def _quotas_taken(
        self,
        ex: Exchange,
        key: KeyRecord,
        under: list[Quota],
        counts: list[QuotaCount],
        taken: QuotaTake | None,
        decided_by: str,
    ) -> None:
        """Count the request against its calendar quotas, or refuse it (429 until the reset).

        ``taken`` is the limiter's count when it made one in its decision (Redis);
        otherwise the store counts now (no Redis, or Redis down).
        """
        if taken is None:
            if self._quotas is None:
                return
            try:
                taken = await self._quotas.take(counts, key.team_id)
            except StorageError:
                raise errors.refuse_unavailable() from None
        now = self._calendar.now()
        with_quotas(ex.rate_headers, under, taken.used, now)
        if taken.taken:
            return
        # The full quota that resets last decides how long to wait.
        full = [q.count for q, used in zip(under, taken.used, strict=True) if used >= q.count.limit]
        last = max(full, key=lambda c: c.ends_at)
        self._metrics.count_decision("rejected", decided_by)
        raise errors.refuse_rate_limited(last.ends_at - now, last.limit)
