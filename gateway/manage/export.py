"""Usage export: a team's usage out of the gateway, page by page, in constant memory.

``per="request"`` reads the request log oldest first (one row per request);
``per="hour"`` / ``"day"`` reads the usage counters (one row per period and
outcome). Each page is formatted as it is read, as CSV or as CloudEvents 1.0
JSON lines in the shape OpenMeter ingests (``subject`` the team, ``data`` the
figures), so an export of any size holds one page at a time.
"""

from __future__ import annotations

import csv
import io
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

import orjson

from gateway.manage._core import Core
from gateway.manage.actors import SYSTEM, Actor
from gateway.manage.inputs import Check
from gateway.manage.reads import usage_range
from gateway.storage import LoggedRequest, RequestQuery, UsageBucket

__all__ = ["FORMATS", "PERIODS", "ExportActions", "ExportFormat"]

FORMATS = ("csv", "cloudevents")
PERIODS = ("request", "hour", "day")
PAGE_ROWS = 1000
_REQUEST_COLUMNS = ["time", "request_id", "key_id", "environment", "method", "route", "status",
                    "outcome", "credits", "client_ip", "duration_ms"]  # fmt: skip
_PERIOD_COLUMNS = ["period_start", "period", "outcome", "requests", "credits"]
SOURCE = "gateway"


@dataclass(frozen=True, slots=True)
class ExportFormat:
    content_type: str
    filename_suffix: str


CONTENT = {
    "csv": ExportFormat("text/csv; charset=utf-8", "csv"),
    "cloudevents": ExportFormat("application/cloudevents-batch+jsonl; charset=utf-8", "jsonl"),
}


def _time(at: float) -> str:
    return datetime.fromtimestamp(at, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _csv(rows: Sequence[Sequence[object]]) -> bytes:
    out = io.StringIO()
    csv.writer(out, lineterminator="\r\n").writerows(rows)
    return out.getvalue().encode()


def _request_lines(team_id: str, rows: list[LoggedRequest], fmt: str) -> bytes:
    if fmt == "csv":
        return _csv([[_time(r.entry.at), r.entry.request_id, r.entry.key_id, r.entry.environment,
                      r.entry.method, r.entry.route, r.entry.status, r.entry.outcome,
                      r.entry.credits, r.entry.client_ip, r.entry.duration_ms]
                     for r in rows])  # fmt: skip
    return b"".join(
        orjson.dumps({
            "specversion": "1.0", "type": "gateway.request", "source": SOURCE,
            "id": f"{team_id}/request/{r.id}", "time": _time(r.entry.at), "subject": team_id,
            "datacontenttype": "application/json",
            "data": {"key_id": r.entry.key_id, "environment": r.entry.environment,
                     "route": r.entry.route, "method": r.entry.method, "status": r.entry.status,
                     "outcome": r.entry.outcome, "credits": r.entry.credits,
                     "request_id": r.entry.request_id},
        }) + b"\n"
        for r in rows
    )  # fmt: skip


def _period_lines(team_id: str, per: str, rows: list[UsageBucket], fmt: str) -> bytes:
    if fmt == "csv":
        return _csv([[_time(b.start), per, b.outcome, b.requests, b.credits] for b in rows])
    return b"".join(
        orjson.dumps({
            "specversion": "1.0", "type": "gateway.usage", "source": SOURCE,
            "id": f"{team_id}/{per}/{b.start}/{b.outcome}", "time": _time(b.start),
            "subject": team_id, "datacontenttype": "application/json",
            "data": {"period": per, "outcome": b.outcome, "requests": b.requests,
                     "credits": b.credits},
        }) + b"\n"
        for b in rows
    )  # fmt: skip


class ExportActions(Core):
    async def export(
        self,
        team: str,
        since: float,
        until: float,
        fmt: str = "csv",
        per: str = "request",
        *,
        actor: Actor = SYSTEM,
    ) -> AsyncIterator[bytes]:
        """The export's bytes, a page at a time (checked and authorised before the first)."""
        check = Check()
        check.choice("format", fmt, FORMATS)
        check.choice("per", per, PERIODS)
        check.done()
        if per != "request":
            usage_range(per, since, until, until, None)  # from before to, within the stored years
        elif since >= until:
            check.fail("from", "must be before 'to'")
            check.done()
        owner = await self.team(team, actor=actor)
        return self._pages(owner.id, since, until, fmt, per)

    async def _pages(
        self, team_id: str, since: float, until: float, fmt: str, per: str
    ) -> AsyncIterator[bytes]:
        if fmt == "csv":
            yield _csv([_REQUEST_COLUMNS if per == "request" else _PERIOD_COLUMNS])
        if per != "request":
            step = 3600 if per == "hour" else 86_400
            first = int(since // step * step)
            buckets = await self._backend.usage_buckets(team_id, first, until, step, None)
            for start in range(0, len(buckets), PAGE_ROWS):
                yield _period_lines(team_id, per, buckets[start : start + PAGE_ROWS], fmt)
            return
        after: tuple[float, int] | None = None
        while True:
            query = RequestQuery(team_id, PAGE_ROWS, since=since, until=until, before=after,
                                 oldest_first=True)  # fmt: skip
            rows = await self._backend.find_requests(query)
            if rows:
                yield _request_lines(team_id, rows, fmt)
            if len(rows) < PAGE_ROWS:
                return
            after = (rows[-1].entry.at, rows[-1].id)
