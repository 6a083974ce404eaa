"""The admin API's read-only views of what happened: the audit log, the request log, the
usage export, anomalies and authentication failures (contract §5)."""

from __future__ import annotations

import time

from aiohttp import web

from gateway.admin._handlers import _actor, _limit, _m, _page, _path, _query, _time
from gateway.app import GATEWAY
from gateway.errors import json_response
from gateway.manage import iso
from gateway.manage.export import CONTENT
from gateway.manage.inputs import parse_int
from gateway.manage.requests import RequestFilters
from gateway.serialize import audit_json, request_json

__all__ = [
    "export_usage",
    "list_anomalies",
    "list_audit",
    "list_auth_failures",
    "list_requests",
]


async def list_audit(request: web.Request) -> web.Response:
    limit = _limit(request)
    cursor = _query(request, "cursor")
    before = parse_int(cursor, "cursor", 0, 10**18 - 1) if cursor is not None else None
    entries = await _m(request).audit(_query(request, "team"), limit, before, actor=_actor(request))
    return _page([audit_json(e) for e in entries], limit)


async def list_requests(request: web.Request) -> web.Response:
    """One team's request log, newest first, by filters."""
    filters = RequestFilters(
        key_id=_query(request, "key_id"),
        status=_query(request, "status"),
        outcome=_query(request, "outcome"),
        client_ip=_query(request, "client_ip"),
        path_prefix=_query(request, "path_prefix"),
        since=_time(request, "from"),
        until=_time(request, "to"),
    )
    found = await _m(request).requests(
        _path(request, "team"), filters, _limit(request), _query(request, "cursor"),
        actor=_actor(request),
    )  # fmt: skip
    items = [request_json(row) for row in found.rows]
    return json_response(200, {"items": items, "next_cursor": found.next_cursor})


async def export_usage(request: web.Request) -> web.StreamResponse:
    """Streamed as it is read: one page in memory, whatever the range."""
    fmt = _query(request, "format") or "csv"
    per = _query(request, "per") or "request"
    until = _time(request, "to") or time.time()
    since = _time(request, "from")
    pages = await _m(request).export(
        _path(request, "team"), until - 86_400 if since is None else since, until, fmt, per,
        actor=_actor(request),
    )  # fmt: skip
    kind = CONTENT[fmt]
    response = web.StreamResponse(
        headers={
            "Content-Type": kind.content_type,
            "Content-Disposition": f'attachment; filename="usage.{kind.filename_suffix}"',
        }
    )
    await response.prepare(request)
    async for chunk in pages:
        await response.write(chunk)
    await response.write_eof()
    return response


async def list_anomalies(request: web.Request) -> web.Response:
    """The signals this replica raised recently, newest first (a team token sees its team's)."""
    actor, limit = _actor(request), _limit(request)
    detector = request.app[GATEWAY].anomalies
    team_filter = _query(request, "team")
    team_id = actor.team_id
    if actor.is_admin and team_filter:
        team_id = (await _m(request).team(team_filter, actor=actor)).id
    items = [
        {
            "kind": anomaly.kind,
            "at": iso(anomaly.at),
            "subject": anomaly.subject,
            "team": anomaly.team_id,
            "observed": anomaly.observed,
            "threshold": anomaly.threshold,
            "detail": anomaly.detail,
        }
        for anomaly in reversed(detector.recent if detector is not None else ())
        if team_id is None or anomaly.team_id == team_id
    ]
    return json_response(200, {"items": items[:limit], "next_cursor": None})


async def list_auth_failures(request: web.Request) -> web.Response:
    """Refused credentials by key prefix and client address (operators only)."""
    actor = _actor(request)
    actor.require_admin("read other teams' authentication failures")
    end = _time(request, "to") or time.time()
    start = _time(request, "from")
    rows = await _m(request).auth_failures(
        end - 86400 if start is None else start, end, _limit(request), actor=actor
    )
    items = [
        {"key_prefix": f.key_prefix or None, "client_ip": f.client_ip, "reason": f.reason,
         "count": f.failures}
        for f in rows
    ]  # fmt: skip
    return json_response(200, {"items": items, "next_cursor": None})
