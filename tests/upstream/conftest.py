from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from gateway.config import UpstreamSettings
from gateway.upstream import UpstreamClient, open_client

from .raw import RawServer


@pytest.fixture
async def raw() -> AsyncIterator[RawServer]:
    server = RawServer()
    await server.start()
    yield server
    await server.close()


@pytest.fixture
async def client_for() -> AsyncIterator[Callable[..., UpstreamClient]]:
    clients: list[UpstreamClient] = []

    def make(url: str, **settings: Any) -> UpstreamClient:
        client = open_client(UpstreamSettings(url=url, **settings))
        clients.append(client)
        return client

    yield make
    for client in clients:
        await client.close()
