"""What 100,000 cached keys cost a gateway process in resident memory.

    python bench/key_memory.py [--keys 100000]

Creates the keys in an embedded (SQLite) store, starts one gateway process
(in-process limiter, so every key also gets its rate-limit bucket in memory),
and sends every key through it once (16 keep-alive connections), so that each is looked up,
cached and rate-limited. The process's RSS is read after a warm-up with one
key (same number of requests) and again after all the keys; the difference is
what the keys cost. The key cache's own miss counter, read from /metrics,
confirms each key was loaded. Also run by bench/run.py as ``keys100k``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from run import GatewayRun  # noqa: E402

ROUTE = {"path": "/api/v1/assess", "methods": ["POST"], "upstream": "assess", "cost": 1}


async def _create_keys(db_path: Path, count: int) -> list[str]:
    import sqlite3

    from gateway.keys import display_prefix, generate_key, hash_secret
    from gateway.storage.rules import new_id
    from gateway.storage.sqlite import SqliteBackend

    backend = SqliteBackend(str(db_path), lease_seconds=60)
    await backend.open()
    try:
        await backend.migrate()
        team = await backend.create_team("memory")
    finally:
        await backend.close()
    # Written in one transaction, not through the store's one-key-per-commit
    # create_key (7 minutes for 100,000 here): only the cache is measured.
    keys = [generate_key("test") for _ in range(count)]
    now = time.time()
    with sqlite3.connect(db_path) as db:
        db.executemany(
            "INSERT INTO api_keys (id, team_id, name, prefix, key_hash, environment, "
            "rate_limit_per_minute, disabled, created_at, expires_at) "
            "VALUES (?, ?, 'k', ?, ?, 'test', 1000000, 0, ?, NULL)",
            ((new_id("key"), team.id, display_prefix(k), hash_secret(k, None), now) for k in keys),
        )
    return keys


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def _misses(status_port: int) -> int:
    with urllib.request.urlopen(f"http://127.0.0.1:{status_port}/metrics", timeout=5) as answer:  # noqa: S310
        text = answer.read().decode()
    match = re.search(r'^gateway_key_cache_lookups_total\{result="miss"\} ([0-9.e+]+)$', text, re.M)
    return int(float(match.group(1))) if match else 0


async def send_each(url: str, keys: list[str], connections: int = 16) -> int:
    """Every key once, over ``connections`` keep-alive connections; returns how many got a 2xx."""
    from openloop import _read_response, _request_bytes

    ok = 0

    async def connection(mine: list[str]) -> None:
        nonlocal ok
        host, port, _ = _request_bytes(url, "POST", [], b"")
        reader, writer = await asyncio.open_connection(host, port)
        try:
            for key in mine:
                _, _, request = _request_bytes(
                    url, "POST", [f"Authorization: Bearer {key}"], b'{"essay": "memory"}'
                )
                writer.write(request)
                status = await _read_response(reader)
                ok += 200 <= status < 300
        finally:
            writer.close()

    await asyncio.gather(*(connection(keys[i::connections]) for i in range(connections)))
    return ok


def _send_each(url: str, keys: list[str]) -> int:
    return asyncio.run(send_each(url, keys))


def measure(workdir: Path, upstream_url: str, count: int, anomalies: bool = True) -> dict[str, Any]:
    db_path = workdir / "memory.db"
    started = time.monotonic()
    keys = asyncio.run(_create_keys(db_path, count))
    gateway = GatewayRun(workdir, "memory", {
        "storage": f"sqlite:///{db_path}",
        "upstreams": {"assess": {"url": upstream_url, "max_connections": 128}},
        "routes": [ROUTE],
        # Anomaly signals keep a little state for every key used in the last day.
        "anomalies": {"enabled": anomalies},
    })
    try:
        gateway.start()
        url = f"http://127.0.0.1:{gateway.port}/api/v1/assess"
        pid = gateway.pids[0]
        # Warm-up: the same number of requests with one key, so allocator and
        # connection state are already grown when the baseline is read.
        warm = _send_each(url, [keys[0]] * count)
        # Usage counters wait in memory until their next flush (every 2 s by
        # default): read both figures after one, so only what stays is measured.
        time.sleep(3)
        baseline = _rss_mb(pid)
        misses_before = _misses(gateway.status_port)
        answered = _send_each(url, keys)
        loaded = _misses(gateway.status_port) - misses_before
        time.sleep(3)
        after = _rss_mb(pid)
    finally:
        gateway.stop()
    return {
        "keys": count,
        "anomaly_signals": anomalies,
        "keys_loaded": loaded,
        "answered_2xx": {"warm_up": warm, "keys": answered},
        "rss_baseline_mb": round(baseline, 1),
        "rss_with_keys_mb": round(after, 1),
        "added_mb": round(after - baseline, 1),
        "bytes_per_key": round((after - baseline) * 1024 * 1024 / count),
        "seconds": round(time.monotonic() - started, 1),
    }


def main() -> None:
    import shutil
    import signal
    import tempfile

    from run import start_upstream, wait_port

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--keys", type=int, default=100_000)
    parser.add_argument("--no-anomalies", action="store_true",
                        help="switch anomaly signals off (their per-key state is then not counted)")
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="gateway-keymem-"))
    nginx, port = start_upstream(workdir)
    try:
        wait_port(port)
        print(json.dumps(measure(workdir, f"http://127.0.0.1:{port}", args.keys,
                                 anomalies=not args.no_anomalies), indent=2))
    finally:
        nginx.send_signal(signal.SIGQUIT)
        nginx.wait(5)
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
