"""A key change made through this process's admin API or console holds on its very next request.

The change feed is kept from helping: on SQLite it is polled every 30 s (past
the config's bound of 1 s, set here on purpose), on PostgreSQL the gateway
LISTENs on another database, where this one's notifications never arrive (a
connected listener, so cached keys are trusted for the full TTL). Whatever
refuses the next request can only be the change's own process acting at once.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from gateway.app import Gateway
from gateway.config import Settings, settings_from_mapping
from gateway.listeners import create_admin_app
from tests.storage.conftest import Databases, postgres_admin_dsn, postgres_template

from ..conftest import ADMIN_TOKEN, PublicTestServer, Upstream, base_config, bearer
from ..console.conftest import ConsoleClient

__all__ = ["postgres_admin_dsn", "postgres_template"]

ASSESS = "/api/v1/assess"
ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
INVALID = {"error": "Invalid API key"}


@dataclass
class Served:
    gateway: Gateway
    public: TestClient[Any, Any]
    admin: TestClient[Any, Any]

    async def call(self, method: str, path: str, body: Any = None, expect: int = 200) -> Any:
        resp = await self.admin.request(method, path, json=body, headers=ADMIN)
        payload = await resp.json()
        assert resp.status == expect, (resp.status, payload)
        return payload

    async def key(self, team_limit: int | None = None, key_limit: int | None = None) -> Any:
        """A fresh team with credits and one live key: the created key's JSON (with ``key``)."""
        team = await self.call(
            "POST", "/admin/v1/teams", {"name": "acme", "rate_limit_per_minute": team_limit}, 201
        )
        await self.call(
            "POST", f"/admin/v1/teams/{team['id']}/credits", {"amount": 100, "reason": "t"}
        )
        body = {"name": "k", "rate_limit_per_minute": key_limit}
        return await self.call("POST", f"/admin/v1/teams/{team['id']}/keys", body, 201)

    async def send(self, secret: str) -> tuple[int, Any, str | None]:
        resp = await self.public.post(ASSESS, headers=bearer(secret))
        return resp.status, await resp.json(), resp.headers.get("X-RateLimit-Limit")

    async def cached(self, secret: str) -> None:
        """One request that passes, so the key sits in this process's cache."""
        status, body, _ = await self.send(secret)
        assert status == 200, body
        assert len(self.gateway.keys) == 1


def _feed_kept_away(settings: Settings) -> Settings:
    # model_copy does not validate: 30 s is past the bound a deployment may set.
    keys = settings.keys.model_copy(update={"invalidation_poll_seconds": 30.0})
    return settings.model_copy(update={"keys": keys})


@pytest.fixture(params=["sqlite", "postgres"])
async def served(
    request: pytest.FixtureRequest, tmp_path: Path, upstream: Upstream, aiohttp_client: Any
) -> AsyncIterator[Served]:
    dbs: Databases | None = None
    overrides: dict[str, Any] = {}
    if request.param == "postgres":
        dbs = Databases(
            request.getfixturevalue("postgres_admin_dsn"),
            request.getfixturevalue("postgres_template"),
        )
        overrides["storage"] = await dbs.migrated()
        overrides["postgres"] = {"pool_min_size": 1, "listen_dsn": await dbs.blank()}
    try:
        settings = settings_from_mapping(base_config(tmp_path, upstream.url, **overrides))
        gateway = Gateway(_feed_kept_away(settings))
        public = await aiohttp_client(PublicTestServer(gateway))
        admin = await aiohttp_client(create_admin_app(gateway))
        # On connecting, the listener forgets the whole cache: let that happen before
        # anything is cached, or it would look like an invalidation.
        for _ in range(1000):
            if gateway.keys.following:
                break
            await asyncio.sleep(0.01)
        assert gateway.keys.following
        yield Served(gateway, public, admin)
        await public.close()  # the gateway stops before its database goes
    finally:
        if dbs is not None:
            await dbs.drop_all()


async def test_revoke(served: Served) -> None:
    key = await served.key()
    await served.cached(key["key"])
    await served.call("POST", f"/admin/v1/keys/{key['id']}/revoke")
    assert (await served.send(key["key"]))[:2] == (401, INVALID)


async def test_revoke_by_secret(served: Served) -> None:
    key = await served.key()
    await served.cached(key["key"])
    await served.call("POST", "/admin/v1/keys/revoke-by-secret", {"key": key["key"]})
    assert (await served.send(key["key"]))[:2] == (401, INVALID)


async def test_disable_and_enable(served: Served) -> None:
    key = await served.key()
    await served.cached(key["key"])
    await served.call("PATCH", f"/admin/v1/keys/{key['id']}", {"disabled": True})
    assert (await served.send(key["key"]))[:2] == (401, INVALID)
    await served.call("PATCH", f"/admin/v1/keys/{key['id']}", {"disabled": False})
    assert (await served.send(key["key"]))[0] == 200


async def test_expiry_set_in_the_past(served: Served) -> None:
    key = await served.key()
    await served.cached(key["key"])
    past = {"expires_at": "2020-01-01T00:00:00Z"}
    await served.call("PATCH", f"/admin/v1/keys/{key['id']}", past)
    assert (await served.send(key["key"]))[:2] == (401, INVALID)


async def test_rotate_without_grace(served: Served) -> None:
    key = await served.key()
    await served.cached(key["key"])
    new = await served.call("POST", f"/admin/v1/keys/{key['id']}/rotate", {"grace_seconds": 0}, 201)
    assert (await served.send(key["key"]))[:2] == (401, INVALID)
    assert (await served.send(new["key"]))[0] == 200


async def test_key_rate_limit_change(served: Served) -> None:
    key = await served.key(key_limit=100)
    await served.cached(key["key"])
    await served.call("PATCH", f"/admin/v1/keys/{key['id']}", {"rate_limit_per_minute": 7})
    status, _, limit = await served.send(key["key"])
    assert (status, limit) == (200, "7")


async def test_team_rate_limit_change(served: Served) -> None:
    # X-RateLimit-Limit shows the key's own limit; a team's shows in what it lets through.
    # At 2/min the first request leaves the team's bucket 30 s behind: the cached
    # limit would let the next one through, 1/min refuses it.
    key = await served.key(team_limit=2)
    await served.cached(key["key"])
    await served.call("PATCH", f"/admin/v1/teams/{key['team']}", {"rate_limit_per_minute": 1})
    status, body, _ = await served.send(key["key"])
    assert status == 429 and body["limit"] == 1
    await served.call("PATCH", f"/admin/v1/teams/{key['team']}", {"rate_limit_per_minute": None})
    assert (await served.send(key["key"]))[0] == 200


async def _console(served: Served, aiohttp_client: Any) -> ConsoleClient:
    browser = ConsoleClient(await aiohttp_client(served.admin.server))
    assert (await browser.sign_in(ADMIN_TOKEN)).status == 303
    return browser


async def test_revoke_in_the_console(served: Served, aiohttp_client: Any) -> None:
    key = await served.key()
    await served.cached(key["key"])
    browser = await _console(served, aiohttp_client)
    path = f"/console/teams/{key['team']}/keys/{key['id']}/revoke"
    assert (await browser.post(path, {})).status == 303
    assert (await served.send(key["key"]))[:2] == (401, INVALID)


async def test_rotate_without_grace_in_the_console(served: Served, aiohttp_client: Any) -> None:
    key = await served.key()
    await served.cached(key["key"])
    browser = await _console(served, aiohttp_client)
    path = f"/console/teams/{key['team']}/keys/{key['id']}/rotate"
    resp = await browser.post(path, {"grace_seconds": "0"})
    assert resp.status == 200 and "Your rotated API key" in await resp.text()
    assert (await served.send(key["key"]))[:2] == (401, INVALID)
