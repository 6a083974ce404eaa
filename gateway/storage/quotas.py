"""The store's side of calendar request quotas (see :mod:`gateway.caps`).

When no Redis limiter is configured, quotas are counted in the database so
that every replica sees one count: ``quota_counts`` holds a row per subject
(``k:<key id>``, ``t:<team id>``) and period. A request takes one from every
quota it is under, all or nothing, in one transaction that locks the rows in
key order (PostgreSQL: ``gateway_take_quota``; SQLite: one ``BEGIN
IMMEDIATE`` transaction). Rows of periods that have ended are pruned by the
retention job; so are capped keys' spends (``key_spend``) once the
reservations they count have been rolled up.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from gateway.storage.types import CapPeriods

__all__ = ["QuotaCount", "QuotaStore", "QuotaTake"]


@dataclass(frozen=True, slots=True)
class QuotaCount:
    """One quota a request counts against."""

    subject: str  # "k:<key id>" or "t:<team id>"
    period: str  # "day:2026-12-05", "month:2026-12-01"
    limit: int
    ends_at: float  # when the period ends (epoch seconds): its count may go after that


@dataclass(frozen=True, slots=True)
class QuotaTake:
    """The outcome: taken (every count raised by one) or not (none raised).

    ``used`` is each count's use, in the order asked: after this request when
    taken, as found when not (then the full ones have ``used >= limit``).
    """

    taken: bool
    used: tuple[int, ...]


class QuotaStore(Protocol):
    async def take_quota(self, counts: Sequence[QuotaCount]) -> QuotaTake:
        """Count one request against every quota in ``counts``, unless one is full."""
        ...

    async def take_quotas(self, takes: Sequence[Sequence[QuotaCount]]) -> list[QuotaTake]:
        """:meth:`take_quota` for several requests, in order, each seeing those before it."""
        ...

    async def prune_quotas(self, now: float) -> int:
        """Drop the counts of periods that ended before ``now``; returns how many."""
        ...

    async def key_spending(
        self, key_ids: Sequence[str], periods: Sequence[str]
    ) -> dict[tuple[str, str], int]:
        """What capped keys have spent in the given periods (absent: nothing yet)."""
        ...

    async def prune_key_spend(self, kept: CapPeriods) -> int:
        """Drop capped keys' spend in the days before ``kept.day`` and the months before
        ``kept.month``; returns how many rows went."""
        ...
