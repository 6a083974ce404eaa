"""Fixtures of the fault and soak suites; every process they start is stopped however a test ends.

Imported by ``tests/faults/conftest.py`` and ``tests/soak/conftest.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.procs import GatewayProcess
from tests.services import RedisServer

from .harness import FaultyUpstream, PostgresCluster

__all__ = ["Spawner", "fault_upstream", "pg_cluster", "session", "spawn", "throwaway_redis"]


@pytest.fixture
async def fault_upstream() -> AsyncIterator[FaultyUpstream]:
    upstream = FaultyUpstream()
    await upstream.start()
    try:
        yield upstream
    finally:
        await upstream.close()


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=20)) as client:
        yield client


class Spawner:
    """Makes ``gateway run`` processes and stops every one of them at the end."""

    def __init__(self, tmp_path: Path) -> None:
        self._tmp_path = tmp_path
        self.made: list[GatewayProcess] = []

    def __call__(self, config: dict[str, Any], name: str = "gw") -> GatewayProcess:
        gateway = GatewayProcess(self._tmp_path, config, name=name)
        self.made.append(gateway)
        return gateway

    async def stop_all(self) -> None:
        for gateway in self.made:
            # SIGTERM first (a clean drain), SIGKILL if it does not exit in time.
            with contextlib.suppress(ProcessLookupError):
                await gateway.stop(signal.SIGTERM, timeout=15)


@pytest.fixture
async def spawn(tmp_path: Path) -> AsyncIterator[Spawner]:
    spawner = Spawner(tmp_path)
    try:
        yield spawner
    finally:
        await spawner.stop_all()


@pytest.fixture
async def pg_cluster() -> AsyncIterator[PostgresCluster]:
    """A throwaway PostgreSQL server of this test's own (never the shared one)."""
    cluster = PostgresCluster()
    try:
        await cluster.init()
        await cluster.start()
        yield cluster
    finally:
        await cluster.destroy()


@pytest.fixture
async def throwaway_redis(tmp_path: Path) -> AsyncIterator[RedisServer]:
    """A redis-server of this test's own on a free port (stop and start keep the port)."""
    server = RedisServer(tmp_path / "redis")
    try:
        await asyncio.to_thread(server.start)
        yield server
    finally:
        await asyncio.to_thread(server.stop)
