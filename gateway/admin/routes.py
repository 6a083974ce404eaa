"""Admin API routes (contract §2): teams, keys and credits."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from gateway.admin._input import Fields, InputError, query_int, read_json
from gateway.app import GATEWAY
from gateway.errors import json_response
from gateway.management import iso
from gateway.models import ApiKey, Team

__all__ = ["add_routes"]


def team_json(team: Team) -> dict[str, Any]:
    return {
        "id": team.id,
        "name": team.name,
        "created_at": iso(team.created_at),
        "rate_limit_per_minute": team.rate_limit_per_minute,
    }


def key_json(key: ApiKey) -> dict[str, Any]:
    return {
        "id": key.id,
        "team": key.team_id,
        "name": key.name,
        "prefix": key.prefix,
        "environment": key.environment,
        "rate_limit_per_minute": key.rate_limit_per_minute,
        "disabled": key.disabled,
        "created_at": iso(key.created_at),
        "last_used_at": iso(key.last_used_at),
        "expires_at": iso(key.expires_at),
        "revoked_at": iso(key.revoked_at),
    }


def _page(items: list[dict[str, Any]], limit: int) -> web.Response:
    next_cursor = items[-1]["id"] if len(items) == limit else None
    return json_response(200, {"items": items, "next_cursor": next_cursor})


async def create_team(request: web.Request) -> web.Response:
    fields = Fields(await read_json(request), {"name", "rate_limit_per_minute"})
    name = fields.string("name", required=True)
    limit = fields.integer("rate_limit_per_minute", minimum=1, maximum=1_000_000)
    fields.check()
    assert name is not None
    team = await request.app[GATEWAY].management.create_team(name, limit)
    return json_response(201, team_json(team))


async def list_teams(request: web.Request) -> web.Response:
    limit = query_int(request, "limit", 100, 1, 1000)
    teams = await request.app[GATEWAY].management.teams(limit, request.query.get("cursor"))
    return _page([team_json(t) for t in teams], limit)


async def create_key(request: web.Request) -> web.Response:
    fields = Fields(
        await read_json(request), {"name", "environment", "rate_limit_per_minute", "expires_at"}
    )
    name = fields.string("name", required=True)
    environment = fields.choice("environment", ("live", "test"), "live")
    limit = fields.integer("rate_limit_per_minute", minimum=1, maximum=1_000_000)
    fields.check()
    assert name is not None
    created = await request.app[GATEWAY].management.create_key(
        request.match_info["team"], name, "live" if environment == "live" else "test", limit
    )
    body = key_json(created.key)
    body["key"] = created.secret
    return json_response(201, body)


async def list_keys(request: web.Request) -> web.Response:
    limit = query_int(request, "limit", 100, 1, 1000)
    keys = await request.app[GATEWAY].management.keys(
        request.match_info["team"], limit, request.query.get("cursor")
    )
    return _page([key_json(k) for k in keys], limit)


async def revoke_key(request: web.Request) -> web.Response:
    key = await request.app[GATEWAY].management.revoke_key(request.match_info["key_id"])
    return json_response(200, key_json(key))


async def revoke_by_secret(request: web.Request) -> web.Response:
    fields = Fields(await read_json(request), {"key"})
    secret = fields.string("key", required=True, max_len=200)
    fields.check()
    assert secret is not None
    key = await request.app[GATEWAY].management.revoke_leaked(secret)
    return json_response(200, key_json(key))


async def grant_credits(request: web.Request) -> web.Response:
    fields = Fields(await read_json(request), {"amount", "environment", "reason"})
    amount = fields.integer("amount", required=True, minimum=-(10**12), maximum=10**12)
    environment = fields.choice("environment", ("live", "test"), "live")
    reason = fields.string("reason", required=True, max_len=500)
    fields.check()
    assert amount is not None and reason is not None
    if amount == 0:
        raise InputError(422, "Invalid input", [{"field": "amount", "problem": "must not be 0"}])
    idempotency_key = request.headers.get("Idempotency-Key")
    team, balance = await request.app[GATEWAY].management.grant(
        request.match_info["team"],
        amount,
        reason,
        environment="live" if environment == "live" else "test",
        actor="admin",
        idempotency_key=idempotency_key,
    )
    return json_response(
        200, {"team": team.id, "environment": environment, "credits_available": balance}
    )


async def get_credits(request: web.Request) -> web.Response:
    management = request.app[GATEWAY].management
    team, balances = await management.balances(request.match_info["team"])
    entries = await management.ledger(team.id, 50)
    return json_response(
        200,
        {
            "team": team.id,
            "balances": balances,
            "ledger": [
                {
                    "id": e.id,
                    "environment": e.environment,
                    "kind": e.kind,
                    "amount": e.amount,
                    "reason": e.reason,
                    "created_at": iso(e.created_at),
                }
                for e in entries
            ],
        },
    )


def add_routes(app: web.Application) -> None:
    r = app.router
    r.add_post("/admin/v1/teams", create_team)
    r.add_get("/admin/v1/teams", list_teams)
    r.add_post("/admin/v1/teams/{team}/keys", create_key)
    r.add_get("/admin/v1/teams/{team}/keys", list_keys)
    r.add_post("/admin/v1/keys/revoke-by-secret", revoke_by_secret)
    r.add_post("/admin/v1/keys/{key_id}/revoke", revoke_key)
    r.add_post("/admin/v1/teams/{team}/credits", grant_credits)
    r.add_get("/admin/v1/teams/{team}/credits", get_credits)
