"""Plan actions: set, show and clear a team's plan, and the refills of every process.

The periods and the refill rules are in :mod:`gateway.plans` and
:mod:`gateway.storage.plans`; this module checks input and permission, says
the audit entries, and reads the plans' clock (``plans.clock_offset_seconds``).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import cast

from gateway.manage._core import Core, iso
from gateway.manage.actors import SYSTEM, Actor
from gateway.manage.audit import audit
from gateway.manage.bounds import AMOUNT_MAX, BALANCE_MAX
from gateway.manage.events import credits_refilled
from gateway.manage.inputs import Check, Unknown
from gateway.models import Environment
from gateway.plans import PERIODS, ROLLOVERS, Period, Plan, Refill, Rollover, next_start
from gateway.plans import period_key as key_of
from gateway.storage import NotFound

__all__ = ["PlanActions", "PlanView"]

# The anchor a period may start on: an ISO weekday for a week, a day every month has.
_ANCHORS: dict[str, tuple[int, int]] = {"day": (1, 1), "week": (1, 7), "month": (1, 28)}


@dataclass(frozen=True, slots=True)
class PlanView:
    plan: Plan
    next_refill_at: float

    def as_dict(self) -> dict[str, object]:
        shown = asdict(self.plan)
        shown["next_refill_at"] = iso(self.next_refill_at)
        return shown


class PlanActions(Core):
    def plan_clock(self) -> float:
        """Now, as plans see it (shifted by ``plans.clock_offset_seconds``)."""
        return time.time() + self._plan_clock_offset

    def _view(self, plan: Plan) -> PlanView:
        at = self.plan_clock()
        return PlanView(plan, next_start(plan.period, plan.anchor_day, at).timestamp())

    async def set_plan(
        self,
        team: str,
        allowance: int,
        period: str,
        *,
        environment: str = "live",
        anchor_day: int | None = None,
        rollover: str = "expire",
        max_balance: int | None = None,
        actor: Actor = SYSTEM,
    ) -> PlanView:
        """Create or replace the plan; the current period is refilled now, once."""
        check = Check()
        check.integer("allowance", allowance, 1, AMOUNT_MAX)
        check.choice("period", period, PERIODS)
        check.choice("rollover", rollover, ROLLOVERS)
        check.choice("environment", environment, ("live", "test"))
        low, high = _ANCHORS.get(period, (1, 28))
        check.integer("anchor_day", anchor_day, low, high)
        check.integer("max_balance", max_balance, 1, BALANCE_MAX)
        check.done()
        owner = await self.team(team, actor=actor)
        actor.require_admin("set plans")
        env = cast(Environment, environment)
        anchor = low if anchor_day is None else anchor_day
        key = key_of(cast(Period, period), anchor, self.plan_clock())
        plan, _ = await self._backend.set_plan(
            owner.id, env, allowance, cast(Period, period), anchor,
            cast(Rollover, rollover), max_balance, key,
            audit=audit(actor, "plan.set", lambda made: (owner.id, owner.id, asdict(made[0])),
                        tells=lambda made: None if made[1] is None else credits_refilled(made[1])),
        )  # fmt: skip
        return self._view(plan)

    async def plans(self, team: str, *, actor: Actor = SYSTEM) -> list[PlanView]:
        owner = await self.team(team, actor=actor)
        return [self._view(p) for p in await self._backend.plans(owner.id)]

    async def plan(
        self, team: str, environment: str = "live", *, actor: Actor = SYSTEM
    ) -> PlanView:
        """The team's plan for one environment (404 when it has none)."""
        check = Check()
        check.choice("environment", environment, ("live", "test"))
        check.done()
        for view in await self.plans(team, actor=actor):
            if view.plan.environment == environment:
                return view
        raise Unknown("plan", "environment")

    async def clear_plan(
        self, team: str, environment: str = "live", *, actor: Actor = SYSTEM
    ) -> PlanView:
        check = Check()
        check.choice("environment", environment, ("live", "test"))
        check.done()
        owner = await self.team(team, actor=actor)
        actor.require_admin("clear plans")
        said = (owner.id, owner.id, {"environment": environment})
        try:
            plan = await self._backend.clear_plan(
                owner.id, cast(Environment, environment),
                audit=audit(actor, "plan.clear", lambda _: said),
            )  # fmt: skip
        except NotFound:
            raise Unknown("plan", "environment") from None
        return self._view(plan)

    async def refill_due(self) -> list[Refill]:
        """Refill every plan whose current period is not refilled yet (any process may call).

        Only the period the clock is in: a gateway that was down over several
        boundaries refills once, for now.
        """
        at = self.plan_clock()
        made: list[Refill] = []
        for plan in await self._backend.plans():
            key = key_of(plan.period, plan.anchor_day, at)
            if plan.current_period == key:
                continue
            refill = await self._backend.refill(
                plan.team_id, plan.environment, key,
                audit=audit(SYSTEM, "credits.refill", _said_of_refill, tells=credits_refilled),
            )  # fmt: skip
            if refill is not None:
                made.append(refill)
        return made


def _said_of_refill(refill: Refill) -> tuple[str, str, dict[str, object]]:
    details: dict[str, object] = {
        "environment": refill.environment,
        "period": refill.period_key,
        "refilled": refill.refilled,
        "expired": refill.expired,
    }
    return refill.team_id, refill.team_id, details
