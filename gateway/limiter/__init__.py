"""Rate limiting: the ``Limiter`` protocol and the GCRA arithmetic every backend shares."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from gateway.storage.quotas import QuotaCount, QuotaTake

__all__ = [
    "Decision",
    "Degradable",
    "Limit",
    "Limiter",
    "LimiterUnavailable",
    "LocalLimiter",
    "gcra_step",
]

_EPS = 1e-9


@dataclass(frozen=True, slots=True)
class Limit:
    """One bucket: ``burst`` requests at once, refilled at ``per_minute``."""

    bucket: str
    per_minute: int
    burst: int

    @property
    def interval(self) -> float:
        return 60.0 / self.per_minute

    @property
    def capacity(self) -> float:
        return self.burst * self.interval


@dataclass(frozen=True, slots=True)
class Decision:
    """The outcome of one all-or-nothing decision across a request's limits.

    ``limit``, ``remaining``, ``reset_after`` and ``next_after`` describe the
    first limit (the key's own), which is what the response headers show.
    On rejection ``retry_after`` is the longest wait among the rejecting
    limits and ``rejected_limit`` is that limit's per-minute figure.
    ``room`` is, when admitted, how many more requests every limit would still
    admit right now: the fewest left in any bucket (the team's may have fewer
    than the key's).

    ``quota`` is what became of the request's calendar quotas when the limiter
    counted them in the same step (Redis): None when there were none, when
    the request was refused, or when this limiter does not count quotas (the
    caller then asks the store).
    """

    allowed: bool
    limit: int
    remaining: int
    reset_after: float
    next_after: float
    retry_after: float = 0.0
    rejected_limit: int = 0
    room: int = 0
    quota: QuotaTake | None = None


@dataclass(frozen=True, slots=True)
class _Step:
    allowed: bool
    new_tat: float
    remaining: int
    reset_after: float
    wait: float
    # The bucket as it stands without this request (what a refusal reports).
    remaining_before: int
    reset_before: float


def gcra_step(limit: Limit, tat: float | None, now: float) -> _Step:
    """One GCRA decision for one bucket, given its theoretical arrival time."""
    interval = limit.interval
    base = now if tat is None or tat < now else tat
    new_tat = base + interval
    ahead = new_tat - now
    remaining_before = max(0, int((limit.capacity - (base - now)) / interval + _EPS))
    if ahead <= limit.capacity + _EPS:
        remaining = int((limit.capacity - ahead) / interval + _EPS)
        wait = max(0.0, new_tat + interval - limit.capacity - now)
        return _Step(True, new_tat, remaining, ahead, wait, remaining_before, base - now)
    return _Step(False, base, 0, base - now, ahead - limit.capacity, 0, base - now)


def decide(
    limits: Sequence[Limit], tats: Sequence[float | None], now: float
) -> tuple[Decision, list[float]]:
    """All-or-nothing across ``limits``; returns the decision and the new TATs.

    When rejected the returned TATs are the old ones (nothing is charged).
    """
    steps = [gcra_step(limit, tat, now) for limit, tat in zip(limits, tats, strict=True)]
    own = steps[0]
    if all(s.allowed for s in steps):
        next_after = max(s.wait for s in steps)
        room = min(s.remaining for s in steps)
        return (
            Decision(
                True, limits[0].per_minute, own.remaining, own.reset_after, next_after, room=room
            ),
            [s.new_tat for s in steps],
        )
    worst_index = max(
        (i for i, s in enumerate(steps) if not s.allowed), key=lambda i: steps[i].wait
    )
    worst = steps[worst_index]
    unchanged = [now if t is None else t for t in tats]
    return (
        Decision(
            False,
            limits[0].per_minute,
            own.remaining_before,
            own.reset_before,
            worst.wait,
            retry_after=worst.wait,
            rejected_limit=limits[worst_index].per_minute,
        ),
        unchanged,
    )


class LimiterUnavailable(Exception):
    """The limiter cannot decide: its backend is unreachable (the pipeline answers 503)."""


class Limiter(Protocol):
    """One atomic decision per request across all of its limits.

    ``group`` names what the limits have in common (the team): a distributed
    backend keeps all of one decision's buckets together under it, so that the
    decision stays one atomic step (one Redis Cluster slot).
    """

    async def check(
        self, limits: Sequence[Limit], group: str, quotas: Sequence[QuotaCount] = ()
    ) -> Decision:
        """Decide; a limiter that counts calendar quotas also takes ``quotas`` if admitted."""
        ...

    async def close(self) -> None: ...


class LocalLimiter(Protocol):
    """An in-process limiter decided synchronously (no await between read and write)."""

    def check_now(self, limits: Sequence[Limit], now: float) -> Decision: ...

    def peek_now(self, limits: Sequence[Limit], now: float) -> Decision: ...


@runtime_checkable
class Degradable(Protocol):
    """A limiter that can be running on its fallback (``degraded``) while its backend is down.

    ``last_error`` then names the backend's last failure (an exception class).
    """

    degraded: bool
    last_error: str | None
