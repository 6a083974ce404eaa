"""The admin API's handlers: each reads its transport (path, query, JSON body, headers)
and calls the management service, which checks bounds and permissions and audits."""

from __future__ import annotations

import time
from typing import Any

from aiohttp import web

from gateway.admin.auth import ACTOR
from gateway.app import GATEWAY
from gateway.errors import json_response
from gateway.manage import Actor, Management
from gateway.manage.bounds import (
    AMOUNT_MAX,
    GRACE_MAX_SECONDS,
    KEY_SECRET_MAX,
    LIST_DEFAULT,
    LIST_MAX,
    NAME_MAX,
    QUOTA_MAX,
    RATE_LIMIT_MAX,
    REASON_MAX,
)
from gateway.manage.inputs import (
    Fields,
    parse_int,
    parse_json_object,
    parse_time,
)
from gateway.manage.keys import LIMIT_BOUNDS
from gateway.manage.reads import usage_range
from gateway.manage.teams import TEAM_QUOTA_FIELDS
from gateway.models import Environment
from gateway.serialize import (
    key_json,
    ledger_json,
    team_json,
    token_json,
)

__all__ = [
    "create_key",
    "create_team",
    "create_token",
    "get_credits",
    "get_usage",
    "grant_credits",
    "list_keys",
    "list_teams",
    "list_tokens",
    "revoke_by_secret",
    "revoke_key",
    "revoke_token",
    "rotate_key",
    "update_key",
    "update_team",
]


# -- reading the transport ----------------------------------------------------------------


def _m(request: web.Request) -> Management:
    return request.app[GATEWAY].management


def _actor(request: web.Request) -> Actor:
    return request[ACTOR].at(request.remote)


def _path(request: web.Request, name: str) -> str:
    # Checked by the service: a name no team can have is "no such team" (404).
    return request.match_info[name]


def _query(request: web.Request, name: str) -> str | None:
    # Each value is checked where it is parsed (limit, cursor, times) or looked up.
    return request.query.get(name)


def _limit(request: web.Request, default: int = LIST_DEFAULT) -> int:
    raw = _query(request, "limit")
    return default if raw is None else parse_int(raw, "limit", 1, LIST_MAX)


def _time(request: web.Request, name: str) -> float | None:
    raw = _query(request, name)
    return None if raw is None else parse_time(raw, name)


async def _body(request: web.Request, allowed: set[str]) -> Fields:
    return Fields(parse_json_object(await request.read()), allowed)


def _environment(fields: Fields) -> Environment:
    return "test" if fields.choice("environment", ("live", "test"), "live") == "test" else "live"


def _page(items: list[dict[str, Any]], limit: int, cursor_field: str = "id") -> web.Response:
    next_cursor = str(items[-1][cursor_field]) if len(items) == limit else None
    return json_response(200, {"items": items, "next_cursor": next_cursor})


def _with_secret(body: dict[str, Any], name: str, secret: str) -> web.Response:
    body[name] = secret
    return json_response(201, body)


# -- teams --------------------------------------------------------------------------------


async def create_team(request: web.Request) -> web.Response:
    _actor(request).require_admin("create teams")
    fields = await _body(request, {"name", "rate_limit_per_minute"})
    name = fields.string("name", required=True, max_len=NAME_MAX)
    limit = fields.integer("rate_limit_per_minute", minimum=1, maximum=RATE_LIMIT_MAX)
    fields.check()
    assert name is not None
    team = await _m(request).create_team(name, limit, actor=_actor(request))
    return json_response(201, team_json(team))


async def list_teams(request: web.Request) -> web.Response:
    limit = _limit(request)
    teams = await _m(request).teams(limit, _query(request, "cursor"), actor=_actor(request))
    return _page([team_json(t) for t in teams], limit)


async def update_team(request: web.Request) -> web.Response:
    team = _path(request, "team")
    fields = await _body(request, {"rate_limit_per_minute", *TEAM_QUOTA_FIELDS})
    limit = fields.integer("rate_limit_per_minute", minimum=1, maximum=RATE_LIMIT_MAX)
    quotas = {
        name: fields.integer(name, minimum=1, maximum=QUOTA_MAX)
        for name in TEAM_QUOTA_FIELDS
        if fields.present(name)
    }
    fields.check()
    m, actor = _m(request), _actor(request)
    # Quotas first: only the admin may set them, refused before anything changed.
    if quotas:
        await m.set_team_quotas(team, quotas, actor=actor)
    # The rate limit keeps its PATCH meaning (absent clears it) unless only quotas are sent.
    if fields.present("rate_limit_per_minute") or not quotas:
        await m.update_team(team, limit, actor=actor)
    return json_response(200, team_json(await m.team(team, actor=actor)))


# -- keys ---------------------------------------------------------------------------------


async def create_key(request: web.Request) -> web.Response:
    team = _path(request, "team")
    fields = await _body(
        request, {"name", "environment", "rate_limit_per_minute", "expires_at", *LIMIT_BOUNDS}
    )
    name = fields.string("name", required=True, max_len=NAME_MAX)
    environment = _environment(fields)
    limit = fields.integer("rate_limit_per_minute", minimum=1, maximum=RATE_LIMIT_MAX)
    expires_at = fields.time("expires_at")
    limits = {
        field: fields.integer(field, minimum=1, maximum=most)
        for field, most in LIMIT_BOUNDS.items()
    }
    fields.check()
    assert name is not None
    created = await _m(request).create_key(
        team, name, environment, limit, expires_at, limits=limits, actor=_actor(request)
    )
    return _with_secret(key_json(created.key), "key", created.secret)


async def list_keys(request: web.Request) -> web.Response:
    team, limit = _path(request, "team"), _limit(request)
    keys = await _m(request).keys(team, limit, _query(request, "cursor"), actor=_actor(request))
    return _page([key_json(k) for k in keys], limit)


async def update_key(request: web.Request) -> web.Response:
    key_id = _path(request, "key_id")
    fields = await _body(
        request, {"name", "rate_limit_per_minute", "expires_at", "disabled", *LIMIT_BOUNDS}
    )
    changes: dict[str, Any] = {}
    if fields.present("name"):
        changes["name"] = fields.string("name", required=True, max_len=NAME_MAX)
    if fields.present("rate_limit_per_minute"):  # null clears the override
        changes["rate_limit_per_minute"] = fields.integer(
            "rate_limit_per_minute", minimum=1, maximum=RATE_LIMIT_MAX
        )
    if fields.present("expires_at"):
        changes["expires_at"] = fields.time("expires_at")
    if fields.present("disabled"):
        changes["disabled"] = fields.boolean("disabled", required=True)
    for field, most in LIMIT_BOUNDS.items():  # null clears a cap or a quota
        if fields.present(field):
            changes[field] = fields.integer(field, minimum=1, maximum=most)
    fields.check()
    updated = await _m(request).update_key(key_id, changes, actor=_actor(request))
    return json_response(200, key_json(updated))


async def revoke_key(request: web.Request) -> web.Response:
    revoked = await _m(request).revoke_key(_path(request, "key_id"), actor=_actor(request))
    return json_response(200, key_json(revoked))


async def revoke_by_secret(request: web.Request) -> web.Response:
    fields = await _body(request, {"key"})
    secret = fields.string("key", required=True, max_len=KEY_SECRET_MAX)
    fields.check()
    assert secret is not None
    revoked = await _m(request).revoke_leaked(secret, actor=_actor(request))
    return json_response(200, key_json(revoked))


async def rotate_key(request: web.Request) -> web.Response:
    key_id = _path(request, "key_id")
    fields = await _body(request, {"grace_seconds"})
    grace = fields.integer("grace_seconds", minimum=0, maximum=GRACE_MAX_SECONDS) or 0
    fields.check()
    created = await _m(request).rotate_key(key_id, grace, actor=_actor(request))
    body = key_json(created.key)
    body["rotated_from"] = key_id
    return _with_secret(body, "key", created.secret)


# -- credits ------------------------------------------------------------------------------


async def grant_credits(request: web.Request) -> web.Response:
    team = _path(request, "team")
    fields = await _body(request, {"amount", "environment", "reason"})
    amount = fields.integer("amount", required=True, minimum=-AMOUNT_MAX, maximum=AMOUNT_MAX)
    environment = _environment(fields)
    reason = fields.string("reason", required=True, max_len=REASON_MAX)
    if amount == 0:
        fields.problem("amount", "must not be 0")
    fields.check()
    assert amount is not None and reason is not None
    granted = await _m(request).grant(
        team,
        amount,
        reason,
        environment=environment,
        actor=_actor(request),
        idempotency_key=request.headers.get("Idempotency-Key"),
    )
    body = {
        "team": granted.team.id,
        "environment": environment,
        "credits_available": granted.balance,
    }
    return json_response(200, body)


async def get_credits(request: web.Request) -> web.Response:
    team, limit, actor = _path(request, "team"), _limit(request, 50), _actor(request)
    owner, balances = await _m(request).balances(team, actor=actor)
    entries = await _m(request).ledger(owner.id, limit, _query(request, "cursor"), actor=actor)
    return json_response(
        200,
        {
            "team": owner.id,
            "balances": balances,
            "ledger": [ledger_json(e) for e in entries],
            "next_cursor": entries[-1].cursor if len(entries) == limit else None,
        },
    )


# -- usage --------------------------------------------------------------------------------


async def get_usage(request: web.Request) -> web.Response:
    team, actor = _path(request, "team"), _actor(request)
    granularity = _query(request, "granularity") or "hour"
    start, end, step = usage_range(granularity, _time(request, "from"), _time(request, "to"),
                                   time.time())  # fmt: skip
    owner = await _m(request).team(team, actor=actor)
    report = await _m(request).usage(
        owner.id, start, end, step, _query(request, "key_id"), actor=actor
    )
    return json_response(200, {"team": owner.id, "granularity": granularity, **report})


# -- team tokens --------------------------------------------------------------------------


async def create_token(request: web.Request) -> web.Response:
    team = _path(request, "team")
    fields = await _body(request, {"name"})
    name = fields.string("name", required=True, max_len=NAME_MAX)
    fields.check()
    assert name is not None
    created = await _m(request).create_token(team, name, actor=_actor(request))
    return _with_secret(token_json(created.token), "token", created.secret)


async def list_tokens(request: web.Request) -> web.Response:
    team, limit = _path(request, "team"), _limit(request)
    tokens = await _m(request).tokens(team, limit, _query(request, "cursor"), actor=_actor(request))
    return _page([token_json(t) for t in tokens], limit)


async def revoke_token(request: web.Request) -> web.Response:
    revoked = await _m(request).revoke_token(_path(request, "token_id"), actor=_actor(request))
    return json_response(200, token_json(revoked))
