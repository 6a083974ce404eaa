"""A gateway with its admin listener (API and console) served in process, and browser-less
console clients that sign in the way a browser does: form, cookie, CSRF token."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import pytest
from aiohttp import ClientResponse, web
from aiohttp.test_utils import TestClient, TestServer

from gateway.console import SESSIONS, SessionStore
from gateway.listeners import create_admin_app

from ..conftest import ADMIN_TOKEN, Harness, MakeGateway

ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


def hidden(html: str, name: str) -> str:
    """The value of the first hidden input called ``name``."""
    found = re.search(rf'name="{name}" value="([^"]*)"', html)
    assert found is not None, f"no {name} field in:\n{html[:2000]}"
    return found.group(1)


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class ConsoleClient:
    """One browser: its own cookie jar, signed in (or not) with one token."""

    def __init__(self, client: TestClient[web.Request, web.Application]) -> None:
        self.client = client

    async def sign_in(self, token: str) -> ClientResponse:
        form = await self.client.get("/console/sign-in")
        nonce = hidden(await form.text(), "nonce")
        return await self.client.post(
            "/console/sign-in", data={"nonce": nonce, "token": token}, allow_redirects=False
        )

    async def page(self, path: str, expect: int = 200) -> str:
        resp = await self.client.get(path, allow_redirects=False)
        text = await resp.text()
        assert resp.status == expect, (resp.status, text[:2000])
        return text

    async def post(
        self, path: str, data: dict[str, str], *, form_page: str | None = None, **kwargs: Any
    ) -> ClientResponse:
        """POST a form with the CSRF token (and nonce) read from ``form_page``."""
        html = await self.page(form_page or path)
        fields = {"csrf": hidden(html, "csrf")}
        if 'name="nonce"' in html:
            fields["nonce"] = hidden(html, "nonce")
        return await self.client.post(
            path, data={**fields, **data}, allow_redirects=False, **kwargs
        )


class Console:
    """The admin listener of a gateway; ``browser()`` opens another cookie jar on it."""

    def __init__(
        self,
        harness: Harness,
        server: TestServer,
        make_client: Callable[[TestServer], Any],
        clock: FakeClock,
    ) -> None:
        self.harness = harness
        self.server = server
        self._make_client = make_client
        self.clock = clock

    async def browser(self) -> ConsoleClient:
        return ConsoleClient(await self._make_client(self.server))

    async def api(self, method: str, path: str, body: Any = None, token: str = ADMIN_TOKEN) -> Any:
        client = await self._make_client(self.server)
        resp = await client.request(
            method, path, json=body, headers={"Authorization": f"Bearer {token}"}
        )
        assert resp.status < 300, (resp.status, await resp.text())
        return await resp.json()

    async def team(self, name: str) -> str:
        return str((await self.api("POST", "/admin/v1/teams", {"name": name}))["id"])


@pytest.fixture
async def console(make_gateway: MakeGateway, aiohttp_client: Any, aiohttp_server: Any) -> Console:
    harness = await make_gateway(usage={"flush_interval_seconds": 0.1})
    app = create_admin_app(harness.gateway)
    clock = FakeClock()
    app[SESSIONS] = SessionStore(clock=clock)
    server = await aiohttp_server(app)
    return Console(harness, server, aiohttp_client, clock)
