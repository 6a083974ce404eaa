"""The store's side of team plans (see :mod:`gateway.plans`): its Protocol and its rule.

Both backends do a refill the same way, in one transaction: lock the account's
balance row, insert the period's ``refill`` row ``ON CONFLICT DO NOTHING``
(nothing inserted: another process refilled this period, change nothing),
write the ``expire`` row when the plan takes back the unspent allowance, move
the balance and its allowance part, mark the plan's ``current_period``, and
write the audit entry.
"""

from __future__ import annotations

from typing import Protocol

from gateway.models import Environment
from gateway.plans import Period, Plan, Refill, Rollover
from gateway.storage.types import MAX_BALANCE, Audit

__all__ = ["PlanStore", "refill_amounts"]


class PlanStore(Protocol):
    """Plans and their refills; every write is idempotent by period key."""

    async def set_plan(
        self,
        team_id: str,
        environment: Environment,
        allowance: int,
        period: Period,
        anchor_day: int,
        rollover: Rollover,
        max_balance: int | None,
        period_key: str,
        *,
        audit: Audit[tuple[Plan, Refill | None]] | None = None,
    ) -> tuple[Plan, Refill | None]:
        """Create or replace the plan, and refill ``period_key`` now unless it was already
        (the audit entry is said of both: the plan, and the refill if one was made).

        NotFound when the team does not exist.
        """
        ...

    async def plans(self, team_id: str | None = None) -> list[Plan]:
        """The team's plans (both environments), or every team's."""
        ...

    async def clear_plan(
        self, team_id: str, environment: Environment, *, audit: Audit[Plan] | None = None
    ) -> Plan:
        """Remove the plan (NotFound when there is none); the balance stays as it is."""
        ...

    async def refill(
        self,
        team_id: str,
        environment: Environment,
        period_key: str,
        *,
        audit: Audit[Refill] | None = None,
    ) -> Refill | None:
        """Refill the plan for ``period_key``; None when there is no plan or it was done."""
        ...


def refill_amounts(plan: Plan, available: int, allowance_left: int) -> tuple[int, int]:
    """(expired, refilled) for a refill of ``plan`` on a balance as it stands.

    ``expire`` takes back the allowance part (never more than the balance);
    ``carry`` keeps it. Either way a refill lifts the balance only up to
    ``max_balance`` (if set), and never past :data:`MAX_BALANCE`.
    """
    expired = min(allowance_left, available) if plan.rollover == "expire" else 0
    after_expiry = available - expired
    ceiling = MAX_BALANCE if plan.max_balance is None else min(MAX_BALANCE, plan.max_balance)
    refilled = max(0, min(plan.allowance, ceiling - after_expiry))
    return expired, refilled
