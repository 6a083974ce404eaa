"""Shared fixtures: a real upstream on loopback and a real gateway in front of it."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import BaseTestServer, TestClient, TestServer
from multidict import CIMultiDict

from gateway.app import Gateway, PublicRunner
from gateway.config import Settings, settings_from_mapping

ADMIN_TOKEN = "test-admin-token-0123456789"


@dataclass
class Seen:
    method: str
    path_qs: str
    headers: CIMultiDict[str]
    body: bytes


@dataclass
class Upstream:
    """A real HTTP server whose behaviour a test sets before sending."""

    server: TestServer | None = None
    requests: list[Seen] = field(default_factory=list)
    status: int = 200
    delay: float = 0.0
    reset: bool = False
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b'{"score": 42}'

    @property
    def url(self) -> str:
        assert self.server is not None
        return str(self.server.make_url("")).rstrip("/")

    async def handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        self.requests.append(
            Seen(request.method, request.path_qs, CIMultiDict(request.headers), body)
        )
        if self.delay:
            await asyncio.sleep(self.delay)
        if self.reset:
            assert request.transport is not None
            request.transport.abort()
            return web.Response()
        return web.Response(
            status=self.status,
            body=self.body,
            headers=self.headers,
            content_type="application/json",
        )


@pytest.fixture
async def upstream() -> AsyncIterator[Upstream]:
    state = Upstream()
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", state.handle)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    state.server = server
    yield state
    await server.close()


def base_config(tmp_path: Path, upstream_url: str, **overrides: Any) -> dict[str, Any]:
    config: dict[str, Any] = {
        "listen": "127.0.0.1:0",
        "admin": {"token": ADMIN_TOKEN},
        "storage": f"sqlite:///{tmp_path / 'gateway.db'}",
        "upstreams": {"assess": {"url": upstream_url, "timeout_seconds": 2}},
        "routes": [
            {"path": "/api/v1/assess", "methods": ["POST", "GET"], "upstream": "assess", "cost": 1},
            {"path": "/public", "methods": ["GET", "POST"], "upstream": "assess", "auth": False},
        ],
        "credits": {"post_flush_interval_seconds": 0.05},
        "keys": {"invalidation_poll_seconds": 0.1},
    }
    config.update(overrides)
    return config


@dataclass
class Harness:
    client: TestClient
    gateway: Gateway
    upstream: Upstream

    async def key(
        self,
        team: str = "acme",
        credits: int = 10,
        environment: str = "live",
        rate_limit: int | None = None,
    ) -> str:
        m = self.gateway.management
        try:
            owner = await m.team(team)
        except Exception:
            owner = await m.create_team(team)
        created = await m.create_key(
            owner.id, "test key", "live" if environment == "live" else "test", rate_limit
        )
        if credits:
            await m.grant(owner.id, credits, "test credits", environment=created.key.environment)
        return created.secret

    async def balance(self, team: str = "acme", environment: str = "live") -> int:
        owner = await self.gateway.management.team(team)
        return await self.gateway.backend.balance(
            owner.id, "live" if environment == "live" else "test"
        )

    async def settle(self) -> None:
        """Wait for background writes (voids, idempotency records) and write buffered posts."""
        await self.gateway.pipeline.close()
        await self.gateway.credits.close()

    async def assert_reconciled(self) -> None:
        await self.settle()
        mismatches, _pending = await self.gateway.management.reconcile()
        assert mismatches == []


MakeGateway = Callable[..., Awaitable[Harness]]


class PublicTestServer(BaseTestServer):
    """The public listener as gateway.server runs it (its runner starts and stops the gateway)."""

    def __init__(self, gateway: Gateway) -> None:
        super().__init__()
        self.gateway = gateway

    async def _make_runner(self, **kwargs: Any) -> PublicRunner:
        return PublicRunner(self.gateway, **kwargs)


@pytest.fixture
def settings_for(tmp_path: Path, upstream: Upstream) -> Callable[..., Settings]:
    def make(**overrides: Any) -> Settings:
        return settings_from_mapping(base_config(tmp_path, upstream.url, **overrides))

    return make


@pytest.fixture
async def make_gateway(
    aiohttp_client: Any, settings_for: Callable[..., Settings], upstream: Upstream
) -> MakeGateway:
    async def make(**overrides: Any) -> Harness:
        gateway = Gateway(settings_for(**overrides))
        client = await aiohttp_client(PublicTestServer(gateway))
        return Harness(client, gateway, upstream)

    return make


@pytest.fixture
async def gw(make_gateway: MakeGateway) -> Harness:
    return await make_gateway()


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


async def raw_http(client: TestClient, request: bytes, timeout: float = 5.0) -> tuple[int, bytes]:
    """Send bytes exactly as given (no client-side URL normalisation); return status and body."""
    assert client.server.port is not None
    reader, writer = await asyncio.open_connection("127.0.0.1", client.server.port)
    try:
        writer.write(request)
        await writer.drain()
        data = await asyncio.wait_for(reader.read(), timeout)
    finally:
        writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1]) if head else 0
    return status, body
