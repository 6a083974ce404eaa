"""Where the plain route's extra CPU goes: Python calls per request against the minimal proxy.

    python bench/callcount.py [--pair minimal:plain | plain:redis_pg] [--rate 500] [--seconds 4] [--out FILE]

Runs bench/minimal_proxy.py and the gateway's public route (plain) one after
the other under cProfile, each behind the same nginx upstream and the same
open-loop load, and prints the Python-level calls per request of each, by
package, and the functions whose calls per request differ most. cProfile slows
everything down, so its times are not the real ones; call counts are exact and
repeatable, which is why they are compared here (the noisy wall-clock figures
are bench/run.py's job). Requests are counted by aiohttp's
``update_auto_headers``, called once per upstream request in both. Each server
runs twice, for S and for 2S seconds of load, and only the difference between
the two runs is reported, so start-up and shutdown (imports, configuration)
drop out: what is left is exactly what the extra requests cost.

``--pair plain:redis_pg`` compares the plain route with full enforcement on
Redis + PostgreSQL instead; that pair runs under wrk (64 connections, closed
loop) rather than at a fixed rate, so that the batchers see the concurrency of
the throughput figures (a lone request would go out in a batch of one).
"""

from __future__ import annotations

import argparse
import collections
import pstats
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from run import (  # noqa: E402
    BODY,
    ROOT,
    GatewayRun,
    drop_database,
    free_port,
    make_keys,
    redis_url,
    scratch_database,
    start_upstream,
    wait_port,
    wrk,
)

Counts = dict[tuple[str, str], int]


def _load(url: str, rate: float, seconds: float) -> None:
    subprocess.run(  # noqa: S603
        [sys.executable, str(ROOT / "bench" / "openloop.py"), url, "--rate", str(rate),
         "--seconds", str(seconds), "--body", BODY, "--header", "Content-Type: application/json"],
        capture_output=True, check=True,
    )


def _calls(profile: Path) -> tuple[int, Counts]:
    stats = pstats.Stats(str(profile))
    requests = 0
    counts: Counts = {}
    for (file, _, function), (_, calls, *_rest) in stats.stats.items():  # type: ignore[attr-defined]
        if function == "update_auto_headers":
            requests += calls
        where = file.split("site-packages/")[-1].split(str(ROOT) + "/")[-1]
        counts[(where, function)] = counts.get((where, function), 0) + calls
    return requests, counts


def _package(where: str) -> str:
    if where == "~":
        return "builtins"
    return where.split("/")[0] if "/" in where else where


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rate", type=float, default=500)
    parser.add_argument("--seconds", type=float, default=4)
    parser.add_argument("--pair", default="minimal:plain",
                        choices=("minimal:plain", "plain:redis_pg"))
    parser.add_argument("--out")
    args = parser.parse_args()
    closed_loop = args.pair == "plain:redis_pg"
    workdir = Path(tempfile.mkdtemp(prefix="gateway-calls-"))
    nginx, upstream_port = start_upstream(workdir)
    upstream = f"http://127.0.0.1:{upstream_port}"

    def minimal_run(seconds: float, profile: Path) -> None:
        port = free_port()
        minimal = subprocess.Popen(  # noqa: S603
            [sys.executable, "-m", "cProfile", "-o", str(profile),
             str(ROOT / "bench" / "minimal_proxy.py"), "--listen", f"127.0.0.1:{port}",
             "--upstream", upstream],
        )
        wait_port(port)
        _load(f"http://127.0.0.1:{port}/api/v1/assess", args.rate, seconds)
        minimal.send_signal(signal.SIGINT)
        minimal.wait(30)

    def gateway_run(seconds: float, profile: Path, enforced: bool) -> None:
        route: dict[str, object] = {"path": "/api/v1/assess", "methods": ["POST"],
                                    "upstream": "assess"}
        backends: dict[str, str] = {"storage": f"sqlite:///{profile.with_suffix('.db')}"}
        db_name = None
        if enforced:
            import redis

            redis.Redis.from_url(redis_url()).flushdb()
            db_name, dsn = scratch_database()
            backends = {"storage": dsn, "limiter": redis_url()}
            route["cost"] = 1
        else:
            route["auth"] = False
        gateway = GatewayRun(workdir, profile.stem, {
            **backends,
            "upstreams": {"assess": {"url": upstream, "max_connections": 128}},
            "routes": [route],
        })
        try:
            keys = make_keys(gateway, 1) if enforced else []
            process = subprocess.Popen(  # noqa: S603
                [sys.executable, "-m", "cProfile", "-o", str(profile),
                 "-m", "gateway.cli", "run", "--config", str(gateway.config_path)],
                cwd=ROOT,
            )
            wait_port(gateway.port)
            time.sleep(0.3)
            url = f"http://127.0.0.1:{gateway.port}/api/v1/assess"
            if closed_loop:
                wrk(url, keys, seconds, 64, workdir)
            else:
                _load(url, args.rate, seconds)
            process.send_signal(signal.SIGTERM)
            process.wait(30)
        finally:
            if db_name:
                drop_database(db_name)

    def plain_run(seconds: float, profile: Path) -> None:
        gateway_run(seconds, profile, enforced=False)

    def redis_pg_run(seconds: float, profile: Path) -> None:
        gateway_run(seconds, profile, enforced=True)

    try:
        wait_port(upstream_port)
        runners = {"minimal": minimal_run, "plain": plain_run, "redis_pg": redis_pg_run}
        names = args.pair.split(":")
        for name in names:
            run_one = runners[name]
            run_one(args.seconds, workdir / f"{name}-1.prof")
            run_one(2 * args.seconds, workdir / f"{name}-2.prof")
    finally:
        nginx.send_signal(signal.SIGQUIT)
        nginx.wait(5)

    def extra(name: str) -> tuple[int, Counts]:
        r1, c1 = _calls(workdir / f"{name}-1.prof")
        r2, c2 = _calls(workdir / f"{name}-2.prof")
        return r2 - r1, {k: c2.get(k, 0) - c1.get(k, 0) for k in set(c1) | set(c2)}

    first, second = names
    m_requests, m_calls = extra(first)
    p_requests, p_calls = extra(second)
    lines = [f"extra requests of the longer runs: {first} {m_requests}, {second} {p_requests}",
             f"Python calls per request: {first} {sum(m_calls.values()) / m_requests:.0f}, "
             f"{second} {sum(p_calls.values()) / p_requests:.0f}", "", "by package:"]
    m_pkg: collections.Counter[str] = collections.Counter()
    p_pkg: collections.Counter[str] = collections.Counter()
    for (where, _), n in m_calls.items():
        m_pkg[_package(where)] += n
    for (where, _), n in p_calls.items():
        p_pkg[_package(where)] += n
    for name in sorted(set(m_pkg) | set(p_pkg), key=lambda k: -p_pkg[k] / p_requests)[:12]:
        lines.append(f"  {m_pkg[name] / m_requests:7.1f} {p_pkg[name] / p_requests:7.1f}  {name}")
    lines += ["", f"largest differences (calls per request: {first}, {second}):"]
    keys = set(m_calls) | set(p_calls)
    for key in sorted(keys, key=lambda k: -(p_calls.get(k, 0) / p_requests
                                            - m_calls.get(k, 0) / m_requests))[:30]:
        lines.append(f"  {m_calls.get(key, 0) / m_requests:6.2f} {p_calls.get(key, 0) / p_requests:6.2f}"
                     f"  {key[1]} ({key[0]})")
    report = "\n".join(lines)
    print(report)
    if args.out:
        Path(args.out).write_text(report + "\n")


if __name__ == "__main__":
    main()
