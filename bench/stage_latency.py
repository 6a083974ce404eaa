"""Where an enforced request's latency goes, at a fixed arrival rate.

    python bench/stage_latency.py [--rate 500] [--seconds 6]

Runs the gateway in this process on Redis + PostgreSQL (a scratch database,
dropped at the end; the Redis database is flushed) behind an nginx upstream,
and drives it with bench/openloop.py from another process: the upstream
directly, the public route (plain) and an enforced route, one after the
other. Besides each target's latency from the intended send time, it prints
the wall time of the enforced request's stages, timed by wrapping the
gateway's own methods: the rate-limit decision (one Redis call), the wait for
the credit reservation after that decision (the two are sent together), and
the reservation's database call. The wrappers cost a little on their own, so
the end-to-end figures of bench/run.py are the ones to quote; these say which
stage to work on.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import functools
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import redis
import uvloop
from aiohttp import web

sys.path.insert(0, str(Path(__file__).resolve().parent))

from run import free_port, start_upstream, wait_port  # noqa: E402

from gateway.app import Gateway, PublicRunner  # noqa: E402
from gateway.config import settings_from_mapping  # noqa: E402

DEFAULT_DSN = "postgresql://postgres@127.0.0.1:5432/postgres"
STAGES: dict[str, list[float]] = collections.defaultdict(list)


def time_calls(owner: Any, method: str, stage: str) -> None:
    """Wrap ``owner.method`` (a coroutine method) to record each call's wall time."""
    original: Callable[..., Awaitable[Any]] = getattr(owner, method)

    @functools.wraps(original)
    async def wrapper(*args: Any, **kwargs: Any) -> Any:
        started = time.perf_counter()
        try:
            return await original(*args, **kwargs)
        finally:
            STAGES[stage].append(time.perf_counter() - started)

    setattr(owner, method, wrapper)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * q))]


async def open_loop(url: str, headers: list[str], rate: float, seconds: float) -> dict[str, Any]:
    command = [sys.executable, str(Path(__file__).parent / "openloop.py"), url,
               "--rate", str(rate), "--seconds", str(seconds)]
    for header in headers:
        command += ["--header", header]
    process = await asyncio.create_subprocess_exec(*command, stdout=subprocess.PIPE)
    out, _ = await process.communicate()
    return dict(json.loads(out))


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rate", type=float, default=500)
    parser.add_argument("--seconds", type=float, default=6)
    parser.add_argument("--dsn", default=os.environ.get("GATEWAY_TEST_POSTGRES_DSN", DEFAULT_DSN))
    parser.add_argument("--redis", default=os.environ.get("GATEWAY_TEST_REDIS_URL", "redis://127.0.0.1:6379/0"))
    args = parser.parse_args()

    workdir = Path(tempfile.mkdtemp(prefix="gateway-stages-"))
    nginx, upstream_port = start_upstream(workdir)
    name = f"gateway_stages_{uuid.uuid4().hex[:8]}"
    server = await asyncpg.connect(args.dsn)
    await server.execute(f'CREATE DATABASE "{name}"')
    redis.Redis.from_url(args.redis).flushdb()
    runner: PublicRunner | None = None
    try:
        wait_port(upstream_port)
        upstream = f"http://127.0.0.1:{upstream_port}"
        settings = settings_from_mapping({
            "listen": "127.0.0.1:0",
            "admin": {"token": uuid.uuid4().hex * 2},
            "storage": urlunsplit(urlsplit(args.dsn)._replace(path=f"/{name}")),
            "limiter": args.redis,
            "upstreams": {"assess": {"url": upstream, "max_connections": 128}},
            "routes": [
                {"path": "/api/v1/assess", "methods": ["POST"], "upstream": "assess", "cost": 1},
                {"path": "/public", "methods": ["POST"], "upstream": "assess", "auth": False},
            ],
            "logging": {"access_log": False, "level": "WARNING"},
        })
        gateway = Gateway(settings)
        runner = PublicRunner(gateway)
        await runner.setup()
        port = free_port()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        team = await gateway.management.create_team("bench")
        key = await gateway.management.create_key(team.id, "bench", "live", 1_000_000)
        await gateway.management.grant(team.id, 10**9, "bench", environment="live")

        time_calls(gateway.pipeline._limits, "check", "rate-limit decision")
        time_calls(gateway.credits, "finish_reserve", "reserve, after the decision")
        time_calls(gateway.backend, "reserve_batch", "reserve database call")

        gateway_url = f"http://127.0.0.1:{port}"
        targets = [
            ("direct", f"{upstream}/api/v1/assess", []),
            ("plain", f"{gateway_url}/public", []),
            ("enforced", f"{gateway_url}/api/v1/assess", [f"Authorization: Bearer {key.secret}"]),
        ]
        print(f"open loop at {args.rate:g} req/s for {args.seconds:g} s each; milliseconds\n")
        for label, url, headers in targets:
            STAGES.clear()
            result = await open_loop(url, headers, args.rate, args.seconds)
            print(f"{label:10s} p50 {result['p50_ms']:6.3f}   p99 {result['p99_ms']:6.3f}"
                  f"   ({result['ok']} ok, {result['errors']} errors)")
            for stage, took in STAGES.items():
                print(f"    {stage:30s} p50 {percentile(took, 0.5) * 1000:6.3f}"
                      f"   p99 {percentile(took, 0.99) * 1000:6.3f}   ({len(took)} calls)")
    finally:
        if runner is not None:
            await runner.cleanup()
        nginx.send_signal(signal.SIGQUIT)
        await server.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await server.close()


if __name__ == "__main__":
    uvloop.run(main())
