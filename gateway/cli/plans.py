"""``gateway plans set|show|clear``: a team's plans, through the management service."""

from __future__ import annotations

import argparse
from typing import Any

from gateway.cli._common import emit, table, with_management
from gateway.manage import Management, operator

__all__ = ["plans_clear", "plans_set", "plans_show"]

_COLUMNS = ["environment", "allowance", "period", "anchor_day", "rollover", "max_balance",
            "current_period", "next_refill_at"]  # fmt: skip


def plans_set(args: argparse.Namespace) -> None:
    async def work(m: Management) -> dict[str, Any]:
        view = await m.set_plan(
            args.team, args.allowance, args.period,
            environment=args.env, anchor_day=args.anchor_day, rollover=args.rollover,
            max_balance=args.max_balance, actor=operator(),
        )  # fmt: skip
        return view.as_dict()

    shown = with_management(args, work)
    next_refill = shown["next_refill_at"]
    emit(args, shown, f"{args.env} plan of {args.team} set; next refill at {next_refill}")


def plans_show(args: argparse.Namespace) -> None:
    async def work(m: Management) -> list[dict[str, Any]]:
        return [view.as_dict() for view in await m.plans(args.team)]

    shown = with_management(args, work)
    emit(args, shown, table(shown, _COLUMNS) if shown else f"{args.team} has no plan")


def plans_clear(args: argparse.Namespace) -> None:
    async def work(m: Management) -> dict[str, Any]:
        return (await m.clear_plan(args.team, args.env, actor=operator())).as_dict()

    shown = with_management(args, work)
    emit(args, shown, f"{args.env} plan of {args.team} cleared; the balance stays")
