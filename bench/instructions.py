"""Instructions per request: the gateway under callgrind, a fixed number of requests, two configs.

    python bench/instructions.py [--target redis_pg|embedded|plain] [--requests 3000]
                                 [--variant NAME=YAML ...] [--out FILE]

On this machine wall-clock figures move by ±15 % from one minute to the next
(other tenants), so a cost of a few per cent cannot be seen in req/s, even over
ten rounds. Instruction counts can: callgrind counts the instructions the
gateway's process executes, the same for the same work whatever else the
machine does. Each variant is one gateway process under
``valgrind --tool=callgrind`` with counting off while it starts and warms up;
then counting is switched on, exactly ``--requests`` requests are sent
(64 connections, an aiohttp client in this process), counting is switched off and the
total is read. The figure is instructions per request, everything the process
did in that window included (background flushes, timers). Under valgrind the
gateway runs some 30-50 times slower, so batches are smaller than at full
speed: compare variants with each other, in one run, not with bench/run.py.

Variants are the target's config with a YAML mapping merged on top, e.g.
``--variant noaccess='{logging: {access_log: false}}'``; ``default`` (nothing
merged) always runs first.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))

from run import (  # noqa: E402
    BODY,
    ROOT,
    GatewayRun,
    drop_database,
    make_keys,
    redis_url,
    scratch_database,
    start_upstream,
    wait_port,
)


def send(url: str, keys: list[str], requests: int, connections: int = 64) -> int:
    """Exactly ``requests`` requests over ``connections`` connections; returns how many got a 200.
    (wrk stops by time only: its per-thread stop leaves the process running to the end.)"""

    async def run() -> int:
        ok = 0
        left = requests
        connector = aiohttp.TCPConnector(limit=connections)
        async with aiohttp.ClientSession(connector=connector) as session:

            async def worker(n: int) -> None:
                nonlocal ok, left
                headers = {"Content-Type": "application/json"}
                if keys:
                    headers["Authorization"] = f"Bearer {keys[n % len(keys)]}"
                while left > 0:
                    left -= 1
                    async with session.post(url, data=BODY, headers=headers) as response:
                        await response.read()
                        ok += response.status == 200

            await asyncio.gather(*(worker(n) for n in range(connections)))
        return ok

    return asyncio.run(run())


def callgrind(pid: int, *args: str) -> None:
    subprocess.run(["callgrind_control", *args, str(pid)], capture_output=True, check=True)  # noqa: S603,S607


def measure(workdir: Path, name: str, config: dict[str, Any], target: str, requests: int) -> float:
    gateway = GatewayRun(workdir, name, config)
    keys = make_keys(gateway, 1) if target != "plain" else []
    out = workdir / f"{name}.callgrind"
    command = [
        "valgrind",
        "--tool=callgrind",
        "--instr-atstart=no",
        f"--callgrind-out-file={out}",
        sys.executable,
        "-m",
        "gateway.cli",
        "run",
        "--config",
        str(gateway.config_path),
    ]
    with gateway.log_path.open("ab") as log:
        process = subprocess.Popen(command, cwd=ROOT, stdout=log, stderr=log)  # noqa: S603
    try:
        wait_port(gateway.port, timeout=180)
        url = f"http://127.0.0.1:{gateway.port}/api/v1/assess"
        send(url, keys, min(1000, requests))  # warm: caches, pools, lazily built paths
        time.sleep(3)  # the warm-up's batches written
        callgrind(process.pid, "-i", "on")
        answered = send(url, keys, requests)
        time.sleep(2.5)  # this window's batches (usage, request log: 2 s) written, and counted
        callgrind(process.pid, "-i", "off")
        callgrind(process.pid, "-d")
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(120)
        except subprocess.TimeoutExpired:
            process.kill()
    # Counts in a dump are those since the previous one, and counting was on
    # only in the window: the dumps' summaries add up to the window's total.
    totals = 0
    for dump in workdir.glob(f"{name}.callgrind*"):
        match = re.search(r"^totals: (\d+)", dump.read_text(errors="replace"), re.M)
        totals += int(match.group(1)) if match else 0
    if answered != requests:
        raise RuntimeError(
            f"{name}: {requests - answered} of {requests} requests failed (see {gateway.log_path})"
        )
    return totals / requests


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", choices=("plain", "embedded", "redis_pg"), default="redis_pg")
    parser.add_argument("--requests", type=int, default=3000)
    parser.add_argument("--variant", action="append", default=[], metavar="NAME=YAML")
    parser.add_argument("--out")
    parser.add_argument("--keep", action="store_true", help="keep the work directory (dumps, logs)")
    args = parser.parse_args()
    for tool in ("valgrind", "callgrind_control", "nginx", "wrk"):
        if shutil.which(tool) is None:
            sys.exit(f"bench: {tool} is missing (Debian: apt-get install valgrind nginx wrk)")
    variants: list[tuple[str, dict[str, Any]]] = [("default", {})]
    for spec in args.variant:
        name, _, text = spec.partition("=")
        variants.append((name, yaml.safe_load(text) or {}))
    workdir = Path(tempfile.mkdtemp(prefix="gateway-instructions-"))
    nginx, upstream_port = start_upstream(workdir)
    lines = [
        f"{args.target}: instructions per request under callgrind, {args.requests} requests, 64 connections"
    ]
    try:
        wait_port(upstream_port)
        route: dict[str, Any] = {
            "path": "/api/v1/assess",
            "methods": ["POST"],
            "upstream": "assess",
            "cost": 1,
        }
        if args.target == "plain":
            route = {**route, "auth": False}
        base: dict[str, Any] = {
            "upstreams": {
                "assess": {"url": f"http://127.0.0.1:{upstream_port}", "max_connections": 128}
            },
            "routes": [route],
        }
        first = None
        for name, extra in variants:
            db_name = None
            try:
                storage: dict[str, str] = {"storage": f"sqlite:///{workdir}/{name}.db"}
                if args.target == "redis_pg":
                    import redis

                    redis.Redis.from_url(redis_url()).flushdb()
                    db_name, dsn = scratch_database()
                    # Under valgrind a Redis call takes far longer than the 0.25 s default
                    # budget, and the limiter would fall back to deciding in process.
                    storage = {
                        "storage": dsn,
                        "limiter": {"url": redis_url(), "timeout_seconds": 5},
                    }
                per_request = measure(
                    workdir, name, merge({**base, **storage}, extra), args.target, args.requests
                )
            finally:
                if db_name:
                    drop_database(db_name)
            first = first or per_request
            line = f"  {name:<16} {per_request:12,.0f}   {per_request / first:6.3f}x default"
            print(line, flush=True)
            lines.append(line)
    finally:
        nginx.send_signal(signal.SIGQUIT)
        nginx.wait(5)
        if args.keep:
            print(f"kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    if args.out:
        Path(args.out).write_text("\n".join(lines) + "\n")


def merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        out[key] = (
            merge(out[key], value)
            if isinstance(value, dict) and isinstance(out.get(key), dict)
            else value
        )
    return out


if __name__ == "__main__":
    main()
