"""Limiter fixtures: the shared Redis with a keyspace of its own per test, and throwaway servers.

Tests on the shared Redis never flush it (other suites and other DB indexes may
be using it at the same time): each test draws unique groups, and every key
under them is deleted afterwards. Throwaway servers and clusters are stopped
however the test ends.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import redis.asyncio

from gateway.config import LimiterSettings
from gateway.limiter.redis import RedisLimiter, bucket_key
from tests import services

NewGroup = Callable[[], str]


@pytest.fixture(scope="session")
def redis_url() -> str:
    url = services.redis_url()
    parts = urlsplit(url)
    if parts.scheme == "redis" and not services.redis_ping(
        parts.port or 6379, parts.hostname or "127.0.0.1"
    ):
        pytest.fail(
            f"no Redis answers at {url} ({services.REDIS_URL_ENV}): "
            "run the tests through scripts/test, which starts one"
        )
    return url


@pytest.fixture
async def redis_client(redis_url: str) -> AsyncIterator[redis.asyncio.Redis]:
    """A plain client on the shared Redis, to look at what the limiter stored."""
    client = redis.asyncio.from_url(redis_url)
    try:
        yield client
    finally:
        await client.aclose()


@pytest.fixture
async def new_group(redis_client: redis.asyncio.Redis) -> AsyncIterator[NewGroup]:
    """Hands out groups no other test uses; deletes their keys afterwards."""
    made: list[str] = []

    def make() -> str:
        made.append(f"test-{uuid.uuid4().hex}")
        return made[-1]

    yield make
    for group in made:
        pattern = bucket_key(group, "*")
        keys = [key async for key in redis_client.scan_iter(match=pattern, count=1000)]
        if keys:
            await redis_client.delete(*keys)


@pytest.fixture
def group(new_group: NewGroup) -> str:
    return new_group()


@pytest.fixture
async def redis_limiter(redis_url: str) -> AsyncIterator[RedisLimiter]:
    # A generous timeout: these tests are about semantics, not about a slow Redis.
    limiter = RedisLimiter(LimiterSettings(url=redis_url, timeout_seconds=2.0))
    try:
        yield limiter
    finally:
        await limiter.close()


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[services.RedisServer]:
    """A throwaway Redis of this test's own, free to stop and start again (same port)."""
    server = services.RedisServer(tmp_path / "redis")
    try:
        server.start()
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[services.RedisCluster]:
    """A real three-node Redis Cluster on loopback, shared by the session's cluster tests."""
    cluster = services.start_redis_cluster(tmp_path_factory.mktemp("redis-cluster"))
    try:
        yield cluster
    finally:
        cluster.stop()
