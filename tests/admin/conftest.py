from __future__ import annotations

import io
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from gateway.listeners import create_admin_app

from ..conftest import ADMIN_TOKEN, Harness, MakeGateway

ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


class Admin:
    """The admin API of a running gateway, and its public listener."""

    def __init__(self, client: TestClient, harness: Harness) -> None:
        self.client = client
        self.harness = harness

    async def call(
        self,
        method: str,
        path: str,
        body: Any = None,
        token: str | None = ADMIN_TOKEN,
        headers: dict[str, str] | None = None,
        expect: int | None = None,
    ) -> Any:
        all_headers = dict(headers or {})
        if token is not None:
            all_headers["Authorization"] = f"Bearer {token}"
        resp = await self.client.request(
            method, path, json=body if body is not None else None, headers=all_headers
        )
        payload = await resp.json()
        if expect is not None:
            assert resp.status == expect, (resp.status, payload)
        return payload if expect is not None else (resp.status, payload)

    async def raw(self, method: str, path: str, data: bytes) -> tuple[int, Any]:
        """Send bytes as they are (bodies that are not JSON)."""
        resp = await self.client.request(method, path, data=io.BytesIO(data), headers=ADMIN)
        return resp.status, await resp.json()


@pytest.fixture
async def admin(make_gateway: MakeGateway, aiohttp_client: Any) -> Admin:
    harness = await make_gateway(usage={"flush_interval_seconds": 0.1})
    client = await aiohttp_client(create_admin_app(harness.gateway))
    return Admin(client, harness)
