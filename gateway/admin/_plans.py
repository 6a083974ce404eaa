"""The admin API's plan handlers (contract §5): set, read and remove a team's plan."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from gateway.admin._handlers import _actor, _body, _m, _path, _query
from gateway.errors import json_response
from gateway.manage.bounds import AMOUNT_MAX, BALANCE_MAX
from gateway.manage.plans import PlanView
from gateway.plans import PERIODS, ROLLOVERS

__all__ = ["PLAN", "PLAN_BODY", "clear_plan", "get_plan", "set_plan"]

_PLAN_FIELDS = {"environment", "allowance", "period", "anchor_day", "rollover", "max_balance"}


def _shown(view: PlanView) -> web.Response:
    return json_response(200, view.as_dict())


async def set_plan(request: web.Request) -> web.Response:
    fields = await _body(request, _PLAN_FIELDS)
    allowance = fields.integer("allowance", required=True, minimum=1, maximum=AMOUNT_MAX)
    period = fields.string("period", required=True, max_len=10)
    # The service checks the anchor against the period, and the choices.
    anchor_day = fields.integer("anchor_day", minimum=1, maximum=28)
    max_balance = fields.integer("max_balance", minimum=1, maximum=BALANCE_MAX)
    rollover = fields.choice("rollover", ROLLOVERS, "expire")
    environment = fields.choice("environment", ("live", "test"), "live")
    fields.check()
    assert allowance is not None and period is not None
    view = await _m(request).set_plan(
        _path(request, "team"), allowance, period,
        environment=environment, anchor_day=anchor_day, rollover=rollover,
        max_balance=max_balance, actor=_actor(request),
    )  # fmt: skip
    return _shown(view)


def _environment_query(request: web.Request) -> str:
    # Absent means live; anything given (an empty value too) is checked by the service.
    given = _query(request, "environment")
    return "live" if given is None else given


async def get_plan(request: web.Request) -> web.Response:
    environment = _environment_query(request)
    team = _path(request, "team")
    return _shown(await _m(request).plan(team, environment, actor=_actor(request)))


async def clear_plan(request: web.Request) -> web.Response:
    environment = _environment_query(request)
    team = _path(request, "team")
    return _shown(await _m(request).clear_plan(team, environment, actor=_actor(request)))


_NULLABLE_INT: dict[str, Any] = {"type": ["integer", "null"]}
PLAN: dict[str, Any] = {
    "type": "object",
    "properties": {
        "team_id": {"type": "string"},
        "environment": {"enum": ["live", "test"]},
        "allowance": {"type": "integer", "minimum": 1},
        "period": {"enum": list(PERIODS)},
        "anchor_day": {"type": "integer", "minimum": 1, "maximum": 28},
        "rollover": {"enum": list(ROLLOVERS)},
        "max_balance": _NULLABLE_INT,
        "current_period": {"type": ["string", "null"]},
        "next_refill_at": {"type": "string", "format": "date-time"},
    },
    "additionalProperties": False,
}
PLAN["required"] = list(PLAN["properties"])
PLAN_BODY: dict[str, Any] = {
    "type": "object",
    "properties": {
        "environment": {"enum": ["live", "test", None]},
        "allowance": {"type": "integer", "minimum": 1, "maximum": AMOUNT_MAX},
        "period": {"enum": list(PERIODS)},
        "anchor_day": {**_NULLABLE_INT, "minimum": 1, "maximum": 28},
        "rollover": {"enum": [*ROLLOVERS, None]},
        "max_balance": {**_NULLABLE_INT, "minimum": 1, "maximum": BALANCE_MAX},
    },
    "required": ["allowance", "period"],
    "additionalProperties": False,
    # The anchor a period may start on (the service says the same in words).
    "anyOf": [
        {"properties": {"period": {"const": "day"}, "anchor_day": {"enum": [1, None]}}},
        {"properties": {"period": {"const": "week"}, "anchor_day": {"maximum": 7}}},
        {"properties": {"period": {"const": "month"}}},
    ],
}
