"""``gateway webhooks ...``: endpoints, deliveries, test events and balance alerts,
through the management service (the same checks and audit as the admin API)."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

from gateway.cli._common import emit, table, with_management
from gateway.manage import Management, operator
from gateway.manage.webhooks import attempt_view, endpoint_view

__all__ = ["register"]

_ENDPOINT_COLUMNS = ["id", "url", "events", "enabled", "failing_since", "description"]
_ATTEMPT_COLUMNS = ["at", "event_type", "state", "response_status", "latency_ms", "error",
                    "next_attempt_at", "delivery_id"]  # fmt: skip


def _events(text: str) -> list[str]:
    return [name.strip() for name in text.split(",") if name.strip()]


def create(args: argparse.Namespace) -> None:
    async def work(m: Management) -> dict[str, Any]:
        made = await m.create_webhook(args.team, args.url, _events(args.events),
                                      args.description or "", actor=operator())  # fmt: skip
        return {**endpoint_view(made.endpoint), "secret": made.secret}

    shown = with_management(args, work)
    emit(args, shown, f"webhook {shown['id']} created for {args.team}\n"
                      f"signing secret (shown once): {shown['secret']}")  # fmt: skip


def list_(args: argparse.Namespace) -> None:
    async def work(m: Management) -> list[dict[str, Any]]:
        return [endpoint_view(e) for e in await m.webhooks(args.team, actor=operator())]

    shown = with_management(args, work)
    rows = [{**row, "events": ",".join(row["events"])} for row in shown]
    emit(args, shown, table(rows, _ENDPOINT_COLUMNS) if shown else f"{args.team} has no webhooks")


def update(args: argparse.Namespace) -> None:
    changes: dict[str, object] = {}
    if args.url is not None:
        changes["url"] = args.url
    if args.events is not None:
        changes["events"] = _events(args.events)
    if args.description is not None:
        changes["description"] = args.description
    if args.enable or args.disable:
        changes["enabled"] = bool(args.enable)

    async def work(m: Management) -> dict[str, Any]:
        return endpoint_view(await m.update_webhook(args.webhook_id, changes, actor=operator()))

    shown = with_management(args, work)
    emit(args, shown, f"webhook {shown['id']} updated (enabled: {shown['enabled']})")


def delete(args: argparse.Namespace) -> None:
    async def work(m: Management) -> dict[str, Any]:
        return endpoint_view(await m.delete_webhook(args.webhook_id, actor=operator()))

    shown = with_management(args, work)
    emit(args, shown, f"webhook {shown['id']} deleted")


def rotate_secret(args: argparse.Namespace) -> None:
    async def work(m: Management) -> dict[str, Any]:
        made = await m.rotate_webhook_secret(args.webhook_id, args.grace, actor=operator())
        return {**endpoint_view(made.endpoint), "secret": made.secret}

    shown = with_management(args, work)
    emit(args, shown, f"new signing secret (shown once): {shown['secret']}; the old one "
                      f"signs beside it for {args.grace} s")  # fmt: skip


def deliveries(args: argparse.Namespace) -> None:
    async def work(m: Management) -> list[dict[str, Any]]:
        found = await m.webhook_attempts(args.webhook_id, args.limit, actor=operator())
        return [attempt_view(a) for a in found]

    shown = with_management(args, work)
    emit(args, shown, table(shown, _ATTEMPT_COLUMNS) if shown else "no delivery attempts yet")


def retry(args: argparse.Namespace) -> None:
    async def work(m: Management) -> str:
        return await m.retry_delivery(args.webhook_id, args.delivery_id, actor=operator())

    delivery = with_management(args, work)
    emit(args, {"delivery_id": delivery, "state": "pending"}, f"{delivery} will be sent again")


def test(args: argparse.Namespace) -> None:
    async def work(m: Management) -> str:
        return await m.test_webhook(args.webhook_id, actor=operator())

    event = with_management(args, work)
    emit(args, {"event_id": event, "type": "webhook.test"}, f"webhook.test event {event} queued")


def alert(args: argparse.Namespace) -> None:
    async def work(m: Management) -> dict[str, object]:
        return await m.set_alert(args.team, args.low_balance, environment=args.env,
                                 actor=operator())  # fmt: skip

    shown = with_management(args, work)
    line = (f"credits.low for {args.team} ({args.env}) fires below {args.low_balance}"
            if args.low_balance is not None else f"credits.low for {args.team} is off")  # fmt: skip
    emit(args, shown, line)


def register(
    group: Callable[[str, str], Any],
    command: Callable[[Any, str, Callable[[argparse.Namespace], None], str],
                      argparse.ArgumentParser],
    integer: Callable[[str], int],
) -> None:  # fmt: skip
    """Add ``gateway webhooks ...`` to the parser."""
    hooks = group("webhooks", "manage webhook endpoints and their deliveries")
    p = command(hooks, "create", create, "add an endpoint (its signing secret is shown once)")
    p.add_argument("--team", required=True)
    p.add_argument("--url", required=True)
    p.add_argument("--events", required=True, help="comma-separated event types, or '*'")
    p.add_argument("--description")
    p = command(hooks, "list", list_, "a team's endpoints")
    p.add_argument("--team", required=True)
    p = command(hooks, "update", update, "change an endpoint")
    p.add_argument("webhook_id")
    p.add_argument("--url")
    p.add_argument("--events", help="comma-separated event types, or '*'")
    p.add_argument("--description")
    toggle = p.add_mutually_exclusive_group()
    toggle.add_argument("--enable", action="store_true", help="enable (forgets failures)")
    toggle.add_argument("--disable", action="store_true")
    p = command(hooks, "delete", delete, "remove an endpoint and its deliveries")
    p.add_argument("webhook_id")
    p = command(hooks, "rotate-secret", rotate_secret, "a new signing secret (shown once)")
    p.add_argument("webhook_id")
    p.add_argument("--grace", type=integer, default=86400, help="seconds the old one still signs")
    p = command(hooks, "deliveries", deliveries, "an endpoint's delivery attempts, newest first")
    p.add_argument("webhook_id")
    p.add_argument("--limit", type=integer, default=50)
    p = command(hooks, "retry", retry, "send a delivery again now")
    p.add_argument("webhook_id")
    p.add_argument("delivery_id")
    p = command(hooks, "test", test, "send a webhook.test event to one endpoint")
    p.add_argument("webhook_id")
    p = command(hooks, "alert", alert, "where credits.low fires for a team")
    p.add_argument("--team", required=True)
    p.add_argument("--low-balance", type=integer, help="threshold (omit to turn it off)")
    p.add_argument("--env", choices=("live", "test"), default="live")
