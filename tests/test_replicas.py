"""Several gateway processes sharing one Redis and one PostgreSQL: exact limits, balances, revocation."""

from __future__ import annotations

import asyncio
import statistics
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from tests.services import redis_url
from tests.storage.conftest import databases, postgres_admin_dsn, postgres_dsn, postgres_template

from .conftest import ADMIN_TOKEN
from .procs import GatewayProcess

__all__ = ["databases", "postgres_admin_dsn", "postgres_dsn", "postgres_template"]

ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


class Counting:
    def __init__(self) -> None:
        self.served = 0
        self.server: TestServer | None = None

    async def handle(self, request: web.Request) -> web.Response:
        await request.read()
        self.served += 1
        return web.json_response({"score": 7})

    @property
    def url(self) -> str:
        assert self.server is not None
        return str(self.server.make_url("")).rstrip("/")


@pytest.fixture
async def upstream() -> AsyncIterator[Counting]:
    state = Counting()
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", state.handle)
    state.server = TestServer(app, host="127.0.0.1")
    await state.server.start_server()
    yield state
    await state.server.close()


class Replicas:
    def __init__(
        self, tmp_path: Path, dsn: str, upstream: Counting, count: int, **extra: Any
    ) -> None:
        config = {
            "storage": dsn,
            # A generous budget per Redis call: these tests are about exactness across
            # replicas, not about the fallback a slow Redis (or a busy machine) triggers.
            "limiter": {"url": redis_url(), "timeout_seconds": 2},
            "logging": {"access_log": False},
            "keys": {"cache_ttl_seconds": 60},
            "upstreams": {"assess": {"url": upstream.url}},
            "routes": [{"path": "/api/v1/assess", "upstream": "assess", "cost": 1}],
            **extra,
        }
        self.nodes = [GatewayProcess(tmp_path, config, name=f"replica{i}") for i in range(count)]
        self.dsn = dsn
        self.config_path = self.nodes[0].config_path

    async def __aenter__(self) -> Replicas:
        await asyncio.gather(*(node.start() for node in self.nodes))
        self.session = aiohttp.ClientSession()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.session.close()
        codes = await asyncio.gather(*(node.stop() for node in self.nodes))
        assert all(code == 0 for code in codes), [node.log()[-2000:] for node in self.nodes]

    async def admin(self, method: str, path: str, body: Any = None, node: int = 0) -> Any:
        url = self.nodes[node].admin_url + path
        async with self.session.request(method, url, json=body, headers=ADMIN) as resp:
            payload = await resp.json()
            assert resp.status < 300, payload
            return payload

    async def call(self, node: int, key: str, path: str = "/api/v1/assess") -> int:
        headers = {"Authorization": f"Bearer {key}"}
        async with self.session.post(
            self.nodes[node].url + path, headers=headers, data=b"{}"
        ) as resp:
            await resp.read()
            return resp.status

    async def key(self, team: str, credits: int, rate_limit: int | None = None) -> dict[str, Any]:
        await self.admin("POST", "/admin/v1/teams", {"name": team})
        body: dict[str, Any] = {"name": "k"}
        if rate_limit is not None:
            body["rate_limit_per_minute"] = rate_limit
        created = await self.admin("POST", f"/admin/v1/teams/{team}/keys", body)
        if credits:
            await self.admin(
                "POST", f"/admin/v1/teams/{team}/credits", {"amount": credits, "reason": "test"}
            )
        return dict(created)

    def reconcile(self) -> None:
        result = subprocess.run(
            [
                sys.executable,
                "-m",
                "gateway.cli",
                "credits",
                "reconcile",
                "--config",
                str(self.config_path),
            ],
            capture_output=True,
            text=True,
            check=False,
        )
        assert result.returncode == 0, result.stdout + result.stderr
        assert result.stdout.startswith("OK")


async def test_rate_limit_is_exact_across_replicas(
    tmp_path: Path, postgres_dsn: str, upstream: Counting
) -> None:
    async with Replicas(tmp_path, postgres_dsn, upstream, 2) as replicas:
        key = (await replicas.key("limits", credits=1000, rate_limit=60))["key"]
        started = time.monotonic()
        statuses = await asyncio.gather(*(replicas.call(i % 2, key) for i in range(200)))
        elapsed = time.monotonic() - started
        print(
            f"200 requests across 2 replicas in {elapsed * 1000:.0f} ms: {statuses.count(200)} admitted"
        )
        # One request a second refills: exactly 60 when the burst takes under a second.
        admitted = statuses.count(200)
        assert 60 <= admitted <= 60 + int(elapsed)
        assert statuses.count(429) == 200 - admitted
        await asyncio.sleep(1.05)
        later = await asyncio.gather(*(replicas.call(i % 2, key) for i in range(10)))
        assert later.count(200) == 1


async def test_credits_are_exact_across_replicas(
    tmp_path: Path, postgres_dsn: str, upstream: Counting
) -> None:
    n = 40
    async with Replicas(tmp_path, postgres_dsn, upstream, 2) as replicas:
        key = (await replicas.key("money", credits=n, rate_limit=100_000))["key"]
        statuses = await asyncio.gather(*(replicas.call(i % 2, key) for i in range(3 * n)))
        assert statuses.count(200) == n
        assert statuses.count(402) == 2 * n
        assert upstream.served == n
        await asyncio.sleep(0.6)  # posts are flushed within the interval
        credits = await replicas.admin("GET", "/admin/v1/teams/money/credits", node=1)
        assert credits["balances"]["live"] == 0
    replicas.reconcile()


async def test_a_key_spend_cap_is_exact_across_replicas(
    tmp_path: Path, postgres_dsn: str, upstream: Counting
) -> None:
    n = 20
    async with Replicas(tmp_path, postgres_dsn, upstream, 2) as replicas:
        made = await replicas.key("capped", credits=10 * n, rate_limit=100_000)
        await replicas.admin("PATCH", f"/admin/v1/keys/{made['id']}", {"credit_cap_per_day": n})
        # Both replicas hear of the change through the key-change feed before the burst.
        await asyncio.sleep(0.5)
        key = made["key"]
        statuses = await asyncio.gather(*(replicas.call(i % 2, key) for i in range(3 * n)))
        assert statuses.count(200) == n
        assert statuses.count(402) == 2 * n
        assert upstream.served == n
        await asyncio.sleep(0.6)  # posts are flushed within the interval
        credits = await replicas.admin("GET", "/admin/v1/teams/capped/credits", node=1)
        assert credits["balances"]["live"] == 9 * n  # the team still has the rest
    replicas.reconcile()


async def test_a_daily_quota_is_exact_across_replicas(
    tmp_path: Path, postgres_dsn: str, upstream: Counting
) -> None:
    n = 20
    async with Replicas(tmp_path, postgres_dsn, upstream, 2) as replicas:
        made = await replicas.key("quota", credits=10 * n, rate_limit=100_000)
        await replicas.admin("PATCH", f"/admin/v1/keys/{made['id']}", {"quota_per_day": n})
        await asyncio.sleep(0.5)
        key = made["key"]
        statuses = await asyncio.gather(*(replicas.call(i % 2, key) for i in range(3 * n)))
        assert statuses.count(200) == n
        assert statuses.count(429) == 2 * n
        assert upstream.served == n
    replicas.reconcile()


async def _kill_listeners(dsn: str) -> int:
    conn = await asyncpg.connect(dsn)
    try:
        return int(
            await conn.fetchval(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                "WHERE application_name = 'gateway-listen' AND datname = current_database()"
            )
        )
    finally:
        await conn.close()


async def _revocation_seconds(replicas: Replicas, team: str, watcher: int) -> float:
    created = await replicas.admin("POST", f"/admin/v1/teams/{team}/keys", {"name": "r"})
    key = created["key"]
    for node in range(len(replicas.nodes)):  # every replica has the key cached
        assert await replicas.call(node, key) == 200
    await replicas.admin("POST", f"/admin/v1/keys/{created['id']}/revoke")
    answered = time.monotonic()
    while await replicas.call(watcher, key) != 401:
        assert time.monotonic() - answered < 2.0, "a revoked key still worked after 2 s"
        await asyncio.sleep(0.005)
    return time.monotonic() - answered


@pytest.mark.timeout(300)
@pytest.mark.parametrize("count", [2, 4])
async def test_revocation_reaches_every_replica_within_a_second(
    tmp_path: Path, postgres_dsn: str, upstream: Counting, count: int
) -> None:
    async with Replicas(tmp_path, postgres_dsn, upstream, count) as replicas:
        await replicas.key("revoke", credits=100_000, rate_limit=100_000)
        rounds = 100 if count == 2 else 30
        times = [
            await _revocation_seconds(replicas, "revoke", watcher=1 + i % (count - 1))
            for i in range(rounds)
        ]
        times.sort()
        p99 = times[int(0.99 * (len(times) - 1))]
        print(
            f"{count} replicas, {rounds} revocations: median {statistics.median(times) * 1000:.1f} ms, "
            f"p99 {p99 * 1000:.1f} ms, max {times[-1] * 1000:.1f} ms"
        )
        assert p99 < 1.0

        # Now with the LISTEN connections cut just before each revocation.
        cut: list[float] = []
        for _ in range(5):
            assert await _kill_listeners(postgres_dsn) >= 1
            cut.append(await _revocation_seconds(replicas, "revoke", watcher=1))
            await asyncio.sleep(0.3)
        print(f"with LISTEN killed first: {[round(t * 1000) for t in cut]} ms")
        assert max(cut) < 1.0


async def test_workers_share_limits_and_metrics(
    tmp_path: Path, postgres_dsn: str, upstream: Counting
) -> None:
    node = GatewayProcess(
        tmp_path,
        {
            "storage": postgres_dsn,
            "limiter": {"url": redis_url(), "timeout_seconds": 2},
            "logging": {"access_log": False},
            "upstreams": {"assess": {"url": upstream.url}},
            "routes": [{"path": "/api/v1/assess", "upstream": "assess", "cost": 1}],
        },
        name="workers",
    )
    await node.start("--workers", "2")
    try:
        # /readyz may come from either worker; the admin listener is worker 0's.
        for _ in range(100):
            try:
                _reader, writer = await asyncio.open_connection("127.0.0.1", node.admin_port)
                writer.close()
                break
            except OSError:
                await asyncio.sleep(0.1)
        async with aiohttp.ClientSession() as session:

            async def admin(path: str, body: Any) -> Any:
                async with session.post(node.admin_url + path, json=body, headers=ADMIN) as resp:
                    return await resp.json()

            await admin("/admin/v1/teams", {"name": "w"})
            key = (
                await admin("/admin/v1/teams/w/keys", {"name": "k", "rate_limit_per_minute": 30})
            )["key"]
            await admin("/admin/v1/teams/w/credits", {"amount": 100, "reason": "t"})

            async def call() -> int:
                headers = {"Authorization": f"Bearer {key}"}
                # A fresh connection each time, so SO_REUSEPORT spreads them over both workers.
                async with (
                    aiohttp.ClientSession() as one,
                    one.post(node.url + "/api/v1/assess", headers=headers) as resp,
                ):
                    return resp.status

            statuses = await asyncio.gather(*(call() for _ in range(80)))
            assert statuses.count(200) == 30
            # Any worker's /metrics aggregates every worker (Prometheus multiprocess mode).
            async with session.get(node.status_url + "/metrics") as resp:
                text = await resp.text()
            ok = sum(
                float(line.rsplit(" ", 1)[1])
                for line in text.splitlines()
                if line.startswith("gateway_requests_total{") and 'outcome="ok"' in line
            )
            assert ok == 30
    finally:
        assert await node.stop() == 0, node.log()[-3000:]


async def test_idempotent_retries_across_replicas_are_charged_once(
    tmp_path: Path, postgres_dsn: str, upstream: Counting
) -> None:
    async with Replicas(tmp_path, postgres_dsn, upstream, 2) as replicas:
        key = (await replicas.key("idem", credits=10, rate_limit=1000))["key"]

        async def send(node: int) -> tuple[int, str | None]:
            headers = {"Authorization": f"Bearer {key}", "Idempotency-Key": "order-77"}
            url = replicas.nodes[node].url + "/api/v1/assess"
            async with replicas.session.post(url, headers=headers, data=b"{}") as resp:
                await resp.read()
                return resp.status, resp.headers.get("Idempotent-Replayed")

        # Racing the first attempt from both replicas: one is served, the other
        # is told the first is in flight (or, if it lost the race late, replayed).
        first = await asyncio.gather(send(0), send(1))
        statuses = sorted(status for status, _ in first)
        assert statuses in ([200, 409], [200, 200])
        await asyncio.sleep(0.3)  # the first attempt's record is written in the background
        for node in (0, 1, 0, 1):
            status, replayed = await send(node)
            assert (status, replayed) == (200, "true")
        assert upstream.served == 1
        await asyncio.sleep(0.6)
        credits = await replicas.admin("GET", "/admin/v1/teams/idem/credits", node=1)
        assert credits["balances"]["live"] == 9
    replicas.reconcile()
