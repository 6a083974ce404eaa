"""Team plans: an allowance of credits per calendar period, refilled through the ledger.

Design (issue 19, part 1):

- A plan belongs to a team and one environment: ``allowance`` credits per
  ``period`` (``day``, ``week`` or ``month``, in UTC), starting on
  ``anchor_day`` (ISO weekday 1-7 for a week, day 1-28 of the month for a
  month; a day starts at midnight), and a ``rollover``: ``expire`` takes back
  what is left of the allowance when the next period starts, ``carry`` keeps
  it. With ``max_balance`` a refill lifts the balance only up to that.
- The balance row keeps its allowance part (``balances.allowance``) beside
  the total. Spending takes from the allowance first: a database trigger on
  the balance row lowers the allowance part with every decrease of the total
  (it fires only while the part is above zero, so a team without a plan pays
  nothing). Whatever comes back (a void, a grant) is top-up. ``expire`` takes
  back only the allowance part, so a paid top-up is never taken back.
- A refill is a ledger row of kind ``refill`` in ``plan_entries``, unique per
  (team, environment, period key, kind); the expiry of the previous
  allowance is a row of kind ``expire`` under the same period key. Both rows,
  the balance change and the plan's ``current_period`` are one transaction
  whose first statement is the ``refill`` insert ``ON CONFLICT DO NOTHING``:
  a second replica or worker (or a retry) inserts nothing and changes nothing.
  Reconcile sums ``plan_entries`` with the other ledger rows.
- Every gateway process runs a refill loop (:class:`gateway.manage.plans`
  over the store): at start-up and then every ``plans.refill_check_seconds``
  it refills each plan whose current period key is not the one it refilled
  last. A gateway that was stopped over one or more boundaries therefore
  refills once, for the period it wakes up in.
- ``plans.clock_offset_seconds`` shifts the clock the plans read, so tests
  (and rehearsals) can cross a period boundary without waiting a day.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Literal

from gateway.models import Environment

__all__ = [
    "PERIODS",
    "ROLLOVERS",
    "Period",
    "Plan",
    "Refill",
    "Rollover",
    "next_start",
    "period_key",
    "period_start",
]

Period = Literal["day", "week", "month"]
Rollover = Literal["expire", "carry"]
PERIODS: tuple[Period, ...] = ("day", "week", "month")
ROLLOVERS: tuple[Rollover, ...] = ("expire", "carry")


@dataclass(frozen=True, slots=True)
class Plan:
    team_id: str
    environment: Environment
    allowance: int
    period: Period
    anchor_day: int
    rollover: Rollover
    max_balance: int | None
    current_period: str | None  # the period key last refilled


@dataclass(frozen=True, slots=True)
class Refill:
    """What one refill did: credits added, allowance taken back, the balance after."""

    team_id: str
    environment: Environment
    period_key: str
    refilled: int
    expired: int
    balance: int


def _midnight(moment: datetime) -> datetime:
    return moment.replace(hour=0, minute=0, second=0, microsecond=0)


def _add_months(moment: datetime, months: int) -> datetime:
    month0 = moment.month - 1 + months
    # Anchors are at most 28, so every month has the day.
    return moment.replace(year=moment.year + month0 // 12, month=month0 % 12 + 1)


def period_start(period: Period, anchor_day: int, at: float) -> datetime:
    """The start (UTC) of the period of this kind that contains ``at`` (epoch seconds)."""
    day = _midnight(datetime.fromtimestamp(at, UTC))
    if period == "day":
        return day
    if period == "week":
        return day - timedelta(days=(day.isoweekday() - anchor_day) % 7)
    start = day.replace(day=anchor_day)
    return start if start <= day else _add_months(start, -1)


def next_start(period: Period, anchor_day: int, at: float) -> datetime:
    """The start of the period after the one containing ``at``: the next refill."""
    start = period_start(period, anchor_day, at)
    if period == "day":
        return start + timedelta(days=1)
    if period == "week":
        return start + timedelta(days=7)
    return _add_months(start, 1)


def period_key(period: Period, anchor_day: int, at: float) -> str:
    """The name of the period containing ``at``: what makes a refill happen once."""
    return f"{period}:{period_start(period, anchor_day, at).date().isoformat()}"
