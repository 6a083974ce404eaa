"""``gateway requests``: a team's request log, newest first, by the admin API's filters."""

from __future__ import annotations

import argparse
import re
import time
from typing import Any

from gateway.cli._common import emit, table, with_management
from gateway.manage import Management, operator
from gateway.manage.inputs import InputError
from gateway.manage.requests import RequestFilters
from gateway.serialize import request_json

__all__ = ["requests", "since"]

_DURATION = re.compile(r"([0-9]{1,9})([smhd])\Z", re.ASCII)
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_COLUMNS = ["time", "status", "outcome", "credits", "method", "path", "key_prefix", "client_ip"]


def since(text: str | None, now: float) -> float | None:
    """The start of ``--since 90m`` (seconds, minutes, hours or days back from now)."""
    if text is None:
        return None
    match = _DURATION.match(text)
    if match is None:
        raise InputError.field("since", "must be a duration such as 30s, 15m, 1h or 7d")
    return now - int(match[1]) * _UNIT_SECONDS[match[2]]


def requests(args: argparse.Namespace) -> None:
    filters = RequestFilters(
        key_id=args.key,
        status=args.status,
        outcome=args.outcome,
        client_ip=args.client_ip,
        path_prefix=args.path_prefix,
        since=since(args.since, time.time()),
    )

    async def work(m: Management) -> list[dict[str, Any]]:
        page = await m.requests(args.team, filters, args.limit, actor=operator())
        return [request_json(row) for row in page.rows]

    rows = with_management(args, work)
    emit(args, rows, table(rows, _COLUMNS) if rows else "no requests match")
