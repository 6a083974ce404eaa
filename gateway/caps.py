"""Per-key spend caps and calendar request quotas: the periods they count in.

Design (issue 19, parts 3 and 4):

- A spend cap is at most C credits per UTC day and/or calendar month for one
  key. It is enforced by the ledger in the same atomic step as the balance
  (``gateway_reserve_capped`` on PostgreSQL, the reserve transaction on
  SQLite), which reads the key's caps as they stand then and counts each
  reservation in ``key_spend`` under the period's key; whatever a
  reservation does not charge (void, partial post, lease expiry) goes back
  to the key's spend in the transaction that resolves it.
  A refused request is told what its key may still spend: the smaller of the
  team's balance and what the caps have left.
- A quota is at most Q requests admitted per day and/or month, per key and
  per team, counted beside the per-minute rate limit (Redis when the limiter
  is Redis, the store otherwise: exact across replicas either way).
- Both count in periods of the calendar this module keeps: UTC days and
  months starting on the 1st, named like plan periods (``day:2026-12-05``,
  ``month:2026-12-01``), on the plans' clock (``plans.clock_offset_seconds``
  shifts it, so tests cross a boundary without waiting a day).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from gateway.models import KeyLimits
from gateway.plans import next_start, period_key, period_start
from gateway.storage import CapPeriods, QuotaCount

__all__ = ["Calendar", "Periods", "Quota", "cap_periods", "cap_periods_at", "quotas"]


@dataclass(frozen=True, slots=True)
class Periods:
    """The day and the month containing a moment: their keys and when they end."""

    day: str
    day_ends: float
    month: str
    month_ends: float
    month_seconds: int  # the whole month's length (28 to 31 days)
    caps: CapPeriods  # the two keys again, as a capped reservation carries them


class Calendar:
    """Now, and the day and month it falls in; worked out once per day."""

    def __init__(self, offset_seconds: float = 0.0) -> None:
        self._offset = offset_seconds
        self._periods: Periods | None = None

    def now(self) -> float:
        return time.time() + self._offset

    def periods(self, at: float | None = None) -> Periods:
        at = self.now() if at is None else at
        cached = self._periods
        if cached is not None and at < cached.day_ends and at >= cached.day_ends - 86_400:
            return cached
        caps = cap_periods_at(at)
        found = Periods(
            day=caps.day,
            day_ends=next_start("day", 1, at).timestamp(),
            month=caps.month,
            month_ends=next_start("month", 1, at).timestamp(),
            month_seconds=round(
                next_start("month", 1, at).timestamp() - period_start("month", 1, at).timestamp()
            ),
            caps=caps,
        )
        self._periods = found
        return found


def cap_periods(limits: KeyLimits | None, calendar: Calendar) -> CapPeriods | None:
    """The periods a reservation of this key counts in, or None for a key without caps.

    The ledger reads the caps from the key itself, so a cap set or changed a
    moment ago holds even before this gateway's key cache hears of it; what
    the cache decides is only whether a reservation goes the capped way.
    """
    if limits is None or not limits.capped:
        return None
    return calendar.periods().caps


def cap_periods_at(at: float) -> CapPeriods:
    """The day and month containing the moment ``at`` (epoch seconds, the plans' clock)."""
    return CapPeriods(period_key("day", 1, at), period_key("month", 1, at))


# Each quota's policy name in RateLimit-Policy, beside the per-minute "default".
_QUOTA_POLICIES = (
    ("daily", "quota_per_day", "k:", "day"),
    ("monthly", "quota_per_month", "k:", "month"),
    ("team-daily", "team_quota_per_day", "t:", "day"),
    ("team-monthly", "team_quota_per_month", "t:", "month"),
)


@dataclass(frozen=True, slots=True)
class Quota:
    """One quota a request is under: its policy name, window and count."""

    policy: str
    window: int  # seconds in the whole period (for RateLimit-Policy's w)
    count: QuotaCount


def quotas(key_id: str, team_id: str, limits: KeyLimits | None, calendar: Calendar) -> list[Quota]:
    """The quotas a request of this key counts against (none for most keys)."""
    if limits is None or not limits.has_quota:
        return []
    now = calendar.periods()
    found = []
    for policy, field, prefix, period in _QUOTA_POLICIES:
        limit = getattr(limits, field)
        if limit is None:
            continue
        subject = prefix + (key_id if prefix == "k:" else team_id)
        if period == "day":
            key, ends, window = now.day, now.day_ends, 86_400
        else:
            key, ends, window = now.month, now.month_ends, now.month_seconds
        found.append(Quota(policy, window, QuotaCount(subject, key, limit, ends)))
    return found
