"""Admin API routes (contract §2), declared once in ``OPERATIONS``.

The route table drives both the aiohttp router and the OpenAPI document, so
the two cannot drift; a test also compares the document with the live router.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from aiohttp import web

from gateway.admin.auth import ACTOR, Actor
from gateway.admin.schemas import (
    ANOMALY_PAGE,
    AUDIT_PAGE,
    AUTH_FAILURE_PAGE,
    BALANCES,
    CREATED_KEY,
    CREATED_TOKEN,
    GRANT_RESULT,
    KEY,
    KEY_PAGE,
    NAME,
    RATE_LIMIT,
    TEAM,
    TEAM_PAGE,
    TIMESTAMP_OR_NULL,
    TOKEN,
    TOKEN_PAGE,
    USAGE,
    obj,
)
from gateway.app import GATEWAY
from gateway.errors import json_response
from gateway.inputs import Fields, InputError, query_int, read_json
from gateway.management import Management, iso
from gateway.models import ApiKey, Team
from gateway.serialize import audit_json, key_json, ledger_json, team_json, token_json
from gateway.storage import NotFound, decode_ledger_cursor

__all__ = ["OPERATIONS", "Operation", "add_routes"]

Handler = Callable[[web.Request], Awaitable[web.Response]]
MAX_LIST = 1000
GRANULARITY = {"minute": 60, "hour": 3600, "day": 86400}
MAX_BUCKETS = 5000


@dataclass(frozen=True)
class Operation:
    """One admin operation: its route, handler and what the OpenAPI document says."""

    method: str
    path: str
    handler: Handler
    operation_id: str
    summary: str
    success: int
    response: dict[str, Any]
    body: dict[str, Any] | None = None
    query: dict[str, dict[str, Any]] = field(default_factory=dict)
    errors: tuple[int, ...] = ()
    headers: dict[str, dict[str, Any]] = field(default_factory=dict)


# -- helpers ------------------------------------------------------------------------------


def _m(request: web.Request) -> Management:
    return request.app[GATEWAY].management


def _actor(request: web.Request) -> Actor:
    return request[ACTOR]


async def _team(request: web.Request) -> Team:
    """The ``{team}`` of the path, as the caller may see it (404 outside a token's team)."""
    team = await _m(request).team(request.match_info["team"])
    _actor(request).check_team(team.id)
    return team


async def _key(request: web.Request) -> ApiKey:
    key = await _m(request).key(request.match_info["key_id"])
    _actor(request).check_team(key.team_id)
    return key


def _admin_only(request: web.Request, what: str) -> None:
    if not _actor(request).is_admin:
        raise InputError(403, f"A team token may not {what}")


async def _audit(
    request: web.Request,
    action: str,
    target: str | None,
    team_id: str | None,
    details: dict[str, object] | None = None,
) -> None:
    await _m(request).record_audit(
        actor=_actor(request).label,
        action=action,
        target=target,
        team_id=team_id,
        client_ip=request.remote,
        details=details or {},
    )


def _page(items: list[dict[str, Any]], limit: int, cursor_field: str = "id") -> web.Response:
    next_cursor = str(items[-1][cursor_field]) if len(items) == limit else None
    return json_response(200, {"items": items, "next_cursor": next_cursor})


def _limit(request: web.Request) -> int:
    return query_int(request, "limit", 100, 1, MAX_LIST)


def _timestamp(fields: Fields, name: str) -> float | None:
    raw = fields.raw(name)
    if raw is None:
        return None
    if not isinstance(raw, str):
        fields.problem(name, "must be an RFC 3339 timestamp or null")
        return None
    parsed = _parse_time(raw)
    if parsed is None:
        fields.problem(name, "must be an RFC 3339 timestamp with a time zone")
    return parsed


def _parse_time(raw: str) -> float | None:
    try:
        moment = datetime.fromisoformat(raw.replace("Z", "+00:00").replace("z", "+00:00"))
    except ValueError:
        return None
    if moment.tzinfo is None:
        return None
    return moment.timestamp()


def _query_time(request: web.Request, name: str, default: float) -> float:
    raw = request.query.get(name)
    if raw is None:
        return default
    parsed = _parse_time(raw)
    if parsed is None:
        raise InputError(
            422,
            "Invalid query parameter",
            [{"field": name, "problem": "must be an RFC 3339 timestamp with a time zone"}],
        )
    return parsed


# -- teams --------------------------------------------------------------------------------


async def create_team(request: web.Request) -> web.Response:
    _admin_only(request, "create teams")
    fields = Fields(await read_json(request), {"name", "rate_limit_per_minute"})
    name = fields.string("name", required=True)
    limit = fields.integer("rate_limit_per_minute", minimum=1, maximum=1_000_000)
    fields.check()
    assert name is not None
    team = await _m(request).create_team(name, limit)
    await _audit(request, "team.create", team.id, team.id, {"name": name})
    return json_response(201, team_json(team))


async def list_teams(request: web.Request) -> web.Response:
    limit = _limit(request)
    actor = _actor(request)
    if not actor.is_admin:
        assert actor.team_id is not None
        own = await _m(request).team(actor.team_id)
        after = request.query.get("cursor")
        teams = [own] if after is None or after < own.id else []
        return json_response(200, {"items": [team_json(t) for t in teams], "next_cursor": None})
    teams = await _m(request).teams(limit, request.query.get("cursor"))
    return _page([team_json(t) for t in teams], limit)


async def update_team(request: web.Request) -> web.Response:
    team = await _team(request)
    fields = Fields(await read_json(request), {"rate_limit_per_minute"})
    limit = fields.integer("rate_limit_per_minute", minimum=1, maximum=1_000_000)
    fields.check()
    updated = await _m(request).update_team(team.id, limit)
    await _audit(request, "team.update", team.id, team.id, {"rate_limit_per_minute": limit})
    return json_response(200, team_json(updated))


# -- keys ---------------------------------------------------------------------------------


async def create_key(request: web.Request) -> web.Response:
    team = await _team(request)
    fields = Fields(
        await read_json(request), {"name", "environment", "rate_limit_per_minute", "expires_at"}
    )
    name = fields.string("name", required=True)
    environment = fields.choice("environment", ("live", "test"), "live")
    limit = fields.integer("rate_limit_per_minute", minimum=1, maximum=1_000_000)
    expires_at = _timestamp(fields, "expires_at")
    fields.check()
    assert name is not None
    created = await _m(request).create_key(
        team.id, name, "live" if environment == "live" else "test", limit, expires_at
    )
    await _audit(
        request, "key.create", created.key.id, team.id, {"name": name, "environment": environment}
    )
    body = key_json(created.key)
    body["key"] = created.secret
    return json_response(201, body)


async def list_keys(request: web.Request) -> web.Response:
    team = await _team(request)
    limit = _limit(request)
    keys = await _m(request).keys(team.id, limit, request.query.get("cursor"))
    return _page([key_json(k) for k in keys], limit)


async def update_key(request: web.Request) -> web.Response:
    key = await _key(request)
    data = await read_json(request)
    fields = Fields(data, {"name", "rate_limit_per_minute", "expires_at", "disabled"})
    changes: dict[str, Any] = {}
    if fields.present("name"):
        changes["name"] = fields.string("name", required=True)
    if fields.present("rate_limit_per_minute"):  # null clears the override
        changes["rate_limit_per_minute"] = fields.integer(
            "rate_limit_per_minute", minimum=1, maximum=1_000_000
        )
    if fields.present("expires_at"):
        changes["expires_at"] = _timestamp(fields, "expires_at")
    if fields.present("disabled"):
        changes["disabled"] = fields.boolean("disabled", required=True)
    fields.check()
    updated = await _m(request).update_key(key.id, changes)
    audited = {
        k: (v if k != "expires_at" else key_json(updated)["expires_at"]) for k, v in changes.items()
    }
    await _audit(request, "key.update", key.id, key.team_id, audited)
    return json_response(200, key_json(updated))


async def revoke_key(request: web.Request) -> web.Response:
    key = await _key(request)
    revoked = await _m(request).revoke_key(key.id)
    await _audit(request, "key.revoke", key.id, key.team_id)
    return json_response(200, key_json(revoked))


async def revoke_by_secret(request: web.Request) -> web.Response:
    fields = Fields(await read_json(request), {"key"})
    secret = fields.string("key", required=True, max_len=200)
    fields.check()
    assert secret is not None
    management = _m(request)
    key = await management.key_by_secret(secret)
    _actor(request).check_team(key.team_id)
    revoked = await management.revoke_key(key.id)
    await _audit(request, "key.revoke_leaked", key.id, key.team_id, {"prefix": key.prefix})
    return json_response(200, key_json(revoked))


async def rotate_key(request: web.Request) -> web.Response:
    key = await _key(request)
    fields = Fields(await read_json(request), {"grace_seconds"})
    grace = fields.integer("grace_seconds", minimum=0, maximum=90 * 86400) or 0
    fields.check()
    created = await _m(request).rotate_key(key.id, grace)
    await _audit(
        request,
        "key.rotate",
        key.id,
        key.team_id,
        {"new_key": created.key.id, "grace_seconds": grace},
    )
    body = key_json(created.key)
    body["key"] = created.secret
    body["rotated_from"] = key.id
    return json_response(201, body)


# -- credits ------------------------------------------------------------------------------


async def grant_credits(request: web.Request) -> web.Response:
    team = await _team(request)
    _admin_only(request, "grant credits")
    fields = Fields(await read_json(request), {"amount", "environment", "reason"})
    amount = fields.integer("amount", required=True, minimum=-(10**12), maximum=10**12)
    environment = fields.choice("environment", ("live", "test"), "live")
    reason = fields.string("reason", required=True, max_len=500)
    if amount == 0:
        fields.problem("amount", "must not be 0")
    fields.check()
    assert amount is not None and reason is not None
    idempotency_key = request.headers.get("Idempotency-Key")
    if idempotency_key is not None and not (
        1 <= len(idempotency_key) <= 255
        and idempotency_key.isascii()
        and idempotency_key.isprintable()
    ):
        raise InputError(
            422,
            "Invalid header",
            [{"field": "Idempotency-Key", "problem": "must be 1-255 visible ASCII characters"}],
        )
    _, balance = await _m(request).grant(
        team.id,
        amount,
        reason,
        environment="live" if environment == "live" else "test",
        actor=_actor(request).label,
        idempotency_key=idempotency_key,
    )
    await _audit(
        request,
        "credits.grant" if amount > 0 else "credits.adjust",
        team.id,
        team.id,
        {"amount": amount, "environment": environment, "reason": reason},
    )
    return json_response(
        200, {"team": team.id, "environment": environment, "credits_available": balance}
    )


async def get_credits(request: web.Request) -> web.Response:
    team = await _team(request)
    limit = query_int(request, "limit", 50, 1, MAX_LIST)
    cursor = request.query.get("cursor") or None
    if cursor is not None:
        try:
            decode_ledger_cursor(cursor)
        except ValueError:
            raise InputError(
                422,
                "Invalid query parameter",
                [{"field": "cursor", "problem": "must be a next_cursor this API returned"}],
            ) from None
    management = _m(request)
    _, balances = await management.balances(team.id)
    entries = await management.ledger(team.id, limit, cursor)
    return json_response(
        200,
        {
            "team": team.id,
            "balances": balances,
            "ledger": [ledger_json(e) for e in entries],
            "next_cursor": entries[-1].cursor if len(entries) == limit else None,
        },
    )


# -- usage --------------------------------------------------------------------------------


async def get_usage(request: web.Request) -> web.Response:
    team = await _team(request)
    granularity = request.query.get("granularity", "hour")
    if granularity not in GRANULARITY:
        raise InputError(
            422,
            "Invalid query parameter",
            [{"field": "granularity", "problem": "must be minute, hour or day"}],
        )
    step = GRANULARITY[granularity]
    now = time.time()
    end = _query_time(request, "to", now)
    start = _query_time(request, "from", end - step * 24)
    if start >= end:
        raise InputError(
            422, "Invalid query parameter", [{"field": "from", "problem": "must be before 'to'"}]
        )
    # At most MAX_BUCKETS buckets: a longer range starts later (the answer's "from" says where).
    start = max(start, end - MAX_BUCKETS * step)
    key_id = request.query.get("key_id")
    if key_id is not None:
        key = await _m(request).key(key_id)
        if key.team_id != team.id:
            raise NotFound(f"no key {key_id!r} in this team")
    report = await _m(request).usage(team.id, start, end, step, key_id)
    return json_response(200, {"team": team.id, "granularity": granularity, **report})


# -- team tokens --------------------------------------------------------------------------


async def create_token(request: web.Request) -> web.Response:
    team = await _team(request)
    _admin_only(request, "create management tokens")
    fields = Fields(await read_json(request), {"name"})
    name = fields.string("name", required=True)
    fields.check()
    assert name is not None
    created = await _m(request).create_token(team.id, name)
    await _audit(request, "token.create", created.token.id, team.id, {"name": name})
    body = token_json(created.token)
    body["token"] = created.secret
    return json_response(201, body)


async def list_tokens(request: web.Request) -> web.Response:
    team = await _team(request)
    limit = _limit(request)
    tokens = await _m(request).tokens(team.id, limit, request.query.get("cursor"))
    return _page([token_json(t) for t in tokens], limit)


async def revoke_token(request: web.Request) -> web.Response:
    management = _m(request)
    token = await management.token(request.match_info["token_id"])
    _actor(request).check_team(token.team_id)
    revoked = await management.revoke_token(token.id)
    await _audit(request, "token.revoke", token.id, token.team_id)
    return json_response(200, token_json(revoked))


# -- audit --------------------------------------------------------------------------------


async def list_audit(request: web.Request) -> web.Response:
    limit = _limit(request)
    cursor = request.query.get("cursor")
    if cursor is not None and not (cursor.isdigit() and len(cursor) <= 18):
        raise InputError(
            422, "Invalid query parameter", [{"field": "cursor", "problem": "must be an audit id"}]
        )
    actor = _actor(request)
    team_id: str | None = actor.team_id
    if actor.is_admin and request.query.get("team"):
        team_id = (await _m(request).team(request.query["team"])).id
    entries = await _m(request).audit(team_id, limit, int(cursor) if cursor else None)
    return _page([audit_json(e) for e in entries], limit)


# -- anomalies and auth failures ------------------------------------------------------------------


async def list_anomalies(request: web.Request) -> web.Response:
    """The signals this replica raised recently, newest first (a team token sees its team's)."""
    actor = _actor(request)
    detector = request.app[GATEWAY].anomalies
    team_filter = request.query.get("team")
    team_id = actor.team_id
    if actor.is_admin and team_filter:
        team_id = (await _m(request).team(team_filter)).id
    items = []
    for anomaly in reversed(detector.recent if detector is not None else ()):
        if team_id is not None and anomaly.team_id != team_id:
            continue
        items.append(
            {
                "kind": anomaly.kind,
                "at": iso(anomaly.at),
                "subject": anomaly.subject,
                "team": anomaly.team_id,
                "observed": anomaly.observed,
                "threshold": anomaly.threshold,
                "detail": anomaly.detail,
            }
        )
    return json_response(200, {"items": items[: _limit(request)], "next_cursor": None})


async def list_auth_failures(request: web.Request) -> web.Response:
    """Refused credentials by key prefix and client address (operators only)."""
    _admin_only(request, "read other teams' authentication failures")
    now = time.time()
    end = _query_time(request, "to", now)
    start = _query_time(request, "from", end - 86400)
    rows = await _m(request).auth_failures(int(start), end, _limit(request))
    items = [
        {"key_prefix": p or None, "client_ip": ip, "reason": r, "count": n} for p, ip, r, n in rows
    ]
    return json_response(200, {"items": items, "next_cursor": None})


# -- the table ------------------------------------------------------------------------------

_PAGING: dict[str, dict[str, Any]] = {
    "limit": {"type": "integer", "minimum": 1, "maximum": MAX_LIST},
    "cursor": {"type": "string"},
}
_OPTIONAL_LIMIT: dict[str, Any] = {**RATE_LIMIT, "type": ["integer", "null"]}
_NUMERIC_CURSOR: dict[str, Any] = {"type": "string", "pattern": "^[0-9]{1,18}$"}
_GRACE: dict[str, Any] = {"type": ["integer", "null"], "minimum": 0, "maximum": 90 * 86400}
# null in a create body means "the default", as if the field were absent.
_OPTIONAL_ENVIRONMENT: dict[str, Any] = {"enum": ["live", "test", None]}

OPERATIONS: tuple[Operation, ...] = (
    Operation("POST", "/admin/v1/teams", create_team, "createTeam", "Create a team", 201, TEAM,
              body=obj({"name": NAME, "rate_limit_per_minute": _OPTIONAL_LIMIT}, required=["name"]),
              errors=(403, 409)),
    Operation("GET", "/admin/v1/teams", list_teams, "listTeams", "List teams", 200, TEAM_PAGE,
              query=_PAGING),
    Operation("PATCH", "/admin/v1/teams/{team}", update_team, "updateTeam",
              "Change a team's settings", 200, TEAM,
              body=obj({"rate_limit_per_minute": _OPTIONAL_LIMIT})),
    Operation("POST", "/admin/v1/teams/{team}/keys", create_key, "createKey",
              "Create an API key (the full key is returned this once)", 201, CREATED_KEY,
              body=obj({"name": NAME, "environment": _OPTIONAL_ENVIRONMENT,
                        "rate_limit_per_minute": _OPTIONAL_LIMIT, "expires_at": TIMESTAMP_OR_NULL},
                       required=["name"])),
    Operation("GET", "/admin/v1/teams/{team}/keys", list_keys, "listKeys",
              "List a team's keys (never the secret)", 200, KEY_PAGE, query=_PAGING),
    Operation("PATCH", "/admin/v1/keys/{key_id}", update_key, "updateKey", "Change a key", 200,
              KEY, errors=(409,),
              body=obj({"name": NAME, "rate_limit_per_minute": _OPTIONAL_LIMIT,
                        "expires_at": TIMESTAMP_OR_NULL, "disabled": {"type": "boolean"}})),
    Operation("POST", "/admin/v1/keys/revoke-by-secret", revoke_by_secret, "revokeKeyBySecret",
              "Revoke a leaked key given its full text", 200, KEY,
              body=obj({"key": {"type": "string", "minLength": 1, "maxLength": 200,
                                "pattern": "^[\\x21-\\x7e]+$"}},
                       required=["key"]), errors=(409,)),
    Operation("POST", "/admin/v1/keys/{key_id}/revoke", revoke_key, "revokeKey",
              "Revoke a key now", 200, KEY, errors=(409,)),
    Operation("POST", "/admin/v1/keys/{key_id}/rotate", rotate_key, "rotateKey",
              "Replace a key; the old one expires after the grace period", 201, CREATED_KEY,
              body=obj({"grace_seconds": _GRACE}),
              errors=(409,)),
    Operation("POST", "/admin/v1/teams/{team}/credits", grant_credits, "grantCredits",
              "Grant (or, negative, adjust) credits", 200, GRANT_RESULT,
              body=obj({"amount": {"type": "integer", "minimum": -(10**12), "maximum": 10**12,
                                   "not": {"const": 0}},
                        "environment": _OPTIONAL_ENVIRONMENT,
                        "reason": {**NAME, "maxLength": 500}}, required=["amount", "reason"]),
              errors=(403, 409),
              headers={"Idempotency-Key": {"type": "string", "minLength": 1, "maxLength": 255,
                                           "pattern": "^[\\x21-\\x7e]+$"}}),
    Operation("GET", "/admin/v1/teams/{team}/credits", get_credits, "getCredits",
              "Balances per environment and the latest ledger entries", 200, BALANCES,
              query=_PAGING),
    Operation("GET", "/admin/v1/teams/{team}/usage", get_usage, "getUsage",
              "Request counts per bucket by outcome, and credits charged", 200, USAGE,
              query={"from": {"type": "string", "format": "date-time"},
                     "to": {"type": "string", "format": "date-time"},
                     "granularity": {"enum": ["minute", "hour", "day"]},
                     "key_id": {"type": "string"}}),
    Operation("POST", "/admin/v1/teams/{team}/tokens", create_token, "createToken",
              "Create a team-scoped management token (shown this once)", 201, CREATED_TOKEN,
              body=obj({"name": NAME}, required=["name"]), errors=(403,)),
    Operation("GET", "/admin/v1/teams/{team}/tokens", list_tokens, "listTokens",
              "List a team's management tokens (never the secret)", 200, TOKEN_PAGE,
              query=_PAGING),
    Operation("POST", "/admin/v1/tokens/{token_id}/revoke", revoke_token, "revokeToken",
              "Revoke a team-scoped management token", 200, TOKEN, errors=(409,)),
    Operation("GET", "/admin/v1/audit", list_audit, "listAudit",
              "Who changed what in the admin API, when, from where", 200, AUDIT_PAGE,
              query={**_PAGING, "cursor": _NUMERIC_CURSOR, "team": {"type": "string"}}),
    Operation("GET", "/admin/v1/anomalies", list_anomalies, "listAnomalies",
              "Anomaly signals this replica raised recently", 200, ANOMALY_PAGE,
              query={"limit": _PAGING["limit"], "team": {"type": "string"}}),
    Operation("GET", "/admin/v1/auth-failures", list_auth_failures, "listAuthFailures",
              "Refused credentials by key prefix and client address", 200, AUTH_FAILURE_PAGE,
              query={"limit": _PAGING["limit"], "from": {"type": "string", "format": "date-time"},
                     "to": {"type": "string", "format": "date-time"}}, errors=(403,)),
)  # fmt: skip


# Ids have a shape, so "/keys/revoke-by-secret" can never be taken for a key id.
ID_PATTERNS = {"key_id": "key_[0-9a-f]+", "token_id": "tok_[0-9a-f]+", "team": "[^/]+"}


def route_path(path: str) -> str:
    for name, pattern in ID_PATTERNS.items():
        path = path.replace("{" + name + "}", "{" + name + ":" + pattern + "}")
    return path


def add_routes(app: web.Application) -> None:
    for op in OPERATIONS:
        app.router.add_route(op.method, route_path(op.path), op.handler)
