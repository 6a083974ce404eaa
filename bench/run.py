"""The benchmark: the gateway against nginx and against itself, in one run, on one machine.

    python bench/run.py [--repeat 3] [--seconds 10] [--rate 500] [--connections 64] [--only NAME ...]

Starts nginx serving a small static JSON answer (the upstream, fast enough not
to be the bottleneck) and measures, one after another under the same load:

  direct        wrk straight to the upstream
  nginx         nginx proxy_pass to it (the reference proxy), one worker
  aiohttp_min   the simplest aiohttp pass-through (bench/minimal_proxy.py), uvloop
  plain         the gateway, one worker, on a public ``auth: false`` route
  (every gateway row runs the shipped logging: access log on, INFO, to a file;
   plain_quiet and redis_pg_quiet are the same with the access log off at WARNING;
   redis_pg_noaccess only the access log off, still at INFO)
  embedded      the gateway, one worker, full enforcement on SQLite + in-process limiter
  redis_pg      the gateway, one worker, full enforcement on Redis + PostgreSQL
  redis_pg_w2   the same with ``--workers 2``
  redis_pg_cap  redis_pg with day and month spend caps on the key (never reached): what a
                capped key's reserve costs
  redis_pg_quota  redis_pg with a daily request quota on the team (never reached)
  embedded_cap / embedded_quota   the same two on the embedded defaults (SQLite, in process)
  redis_pg_logfast  redis_pg with the usage and request-log flush every 0.25 s instead of 2 s
                (smaller COPY batches: does the tail follow the size of the log's writes?)
  embedded_nolog / redis_pg_nolog   embedded / redis_pg with the request log off (it is on by
                default): the log's cost, measured in the same rounds
  embedded_nohooks / redis_pg_nohooks   the same with the webhook delivery worker off (on by
                default; no endpoint exists in the benchmark): the cost of its polling
  redis_pg_trace1 / redis_pg_trace100   redis_pg with OpenTelemetry tracing on, 1% / 100% of
                requests sampled, spans sent to a sink on loopback (bench/otlp_sink.py)
  teams100      redis_pg with the load spread over 100 teams instead of one
  keys100k      RSS of one gateway process with 100,000 keys cached (bench/key_memory.py)

Full enforcement = key auth, rate limit, one credit reserved and posted per
request, usage counting. For each: requests/s (wrk, closed loop), latency
p50/p99/p99.9 at a fixed arrival rate measured from the intended send time
(bench/openloop.py), the gateway's CPU time per 1,000 requests, its peak RSS,
errors, and, on Redis + PostgreSQL, the remote calls per request read from the
servers themselves (Redis INFO commandstats, round trips only; PostgreSQL
committed transactions, each reserve or flush being one statement in one
transaction). The targets run in interleaved rounds; each figure is the median
of its rounds, so that a slow spell of the machine does not land on one target.

Prints one table with ratios to the plain-proxy floor and to nginx, and writes
it as JSON under bench/results/. Traffic stays on loopback; every run is bounded.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
ADMIN_TOKEN = "bench-admin-token-0123456789"
BODY = '{"essay": "benchmark"}'
CLK_TCK = os.sysconf("SC_CLK_TCK")


@dataclass
class Result:
    name: str
    rps: float = 0.0
    wrk_errors: int = 0
    p50_ms: float = float("nan")
    p99_ms: float = float("nan")
    p999_ms: float = float("nan")
    open_loop_errors: int = 0
    cpu_ms_per_1k: float | None = None
    peak_rss_mb: float | None = None
    redis_calls_per_request: float | None = None
    pg_transactions_per_request: float | None = None
    notes: list[str] = field(default_factory=list)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listening on {port}")


# -- processes ------------------------------------------------------------------------------


def start_nginx(workdir: Path, name: str, server_block: str) -> subprocess.Popen[bytes]:
    conf = workdir / f"{name}.conf"
    conf.write_text(
        f"""
worker_processes 1;
daemon off;
pid {workdir}/{name}.pid;
error_log {workdir}/{name}.error.log warn;
events {{ worker_connections 8192; }}
http {{
    access_log off;
    client_body_temp_path {workdir}/{name}-body;
    proxy_temp_path {workdir}/{name}-proxy;
    {server_block}
}}
"""
    )
    return subprocess.Popen(["nginx", "-c", str(conf), "-p", str(workdir)])  # noqa: S603,S607


def start_upstream(workdir: Path) -> tuple[subprocess.Popen[bytes], int]:
    """The fast upstream every benchmark uses: nginx answering a small static JSON."""
    port = free_port()
    process = start_nginx(workdir, "upstream", f"""
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        keepalive_requests 1000000;
        location / {{ default_type application/json; return 200 '{{"score": 42}}'; }}
    }}""")
    return process, port


def cpu_seconds(pids: list[int]) -> float:
    total = 0.0
    for pid in pids:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        total += (int(fields[11]) + int(fields[12])) / CLK_TCK
    return total


def peak_rss_mb(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                total += int(line.split()[1])
    return total / 1024


def children_of(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True, check=False)  # noqa: S603,S607
    return [int(p) for p in out.stdout.split()]


class GatewayRun:
    def __init__(self, workdir: Path, name: str, config: dict[str, Any], workers: int = 1) -> None:
        self.port = free_port()
        self.status_port = free_port()
        self.config_path = workdir / f"{name}.yaml"
        # Logging as shipped (access log on, INFO) unless the target says otherwise;
        # the lines go to a file, as they would to a collector, not to this terminal.
        self.log_path = workdir / f"{name}.log"
        full = {
            "listen": f"127.0.0.1:{self.port}",
            "status": {"listen": f"127.0.0.1:{self.status_port}"},
            "admin": {"enabled": False},
            "shutdown": {"readiness_delay_seconds": 0, "drain_seconds": 5},
            "security": {"unknown_keys_per_minute_per_ip": 0},
            **config,
        }
        self.config_path.write_text(yaml.safe_dump(full))
        self.workers = workers
        self.process: subprocess.Popen[bytes] | None = None

    def cli(self, *args: str) -> str:
        out = subprocess.run(  # noqa: S603
            [sys.executable, "-m", "gateway.cli", *args, "--config", str(self.config_path)],
            capture_output=True, text=True, check=True, cwd=ROOT,
        )
        return out.stdout

    def start(self) -> None:
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(  # noqa: S603
                [sys.executable, "-m", "gateway.cli", "run", "--config", str(self.config_path),
                 "--workers", str(self.workers)],
                cwd=ROOT, stdout=log, stderr=log,
            )
        wait_port(self.port)
        time.sleep(1.0 if self.workers > 1 else 0.3)

    @property
    def pids(self) -> list[int]:
        assert self.process is not None
        return children_of(self.process.pid) if self.workers > 1 else [self.process.pid]

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.process.kill()


def make_keys(gateway: GatewayRun, teams: int, capped: bool = False) -> list[str]:
    """One key per team with credits to spare; ``capped``: with day and month spend caps and a
    daily quota set, never reached (what the caps and quotas cost, not what they refuse)."""
    keys = []
    for i in range(teams):
        team = f"bench-{i}"
        gateway.cli("teams", "create", team)
        created = json.loads(
            gateway.cli("keys", "create", "--team", team, "--name", "bench", "--rate-limit", "1000000", "--json")
        )
        gateway.cli("credits", "grant", "--team", team, "--amount", "1000000000", "--reason", "bench")
        if capped:
            gateway.cli("keys", "update", created["id"], "--credit-cap-per-day", "900000000",
                        "--credit-cap-per-month", "900000000")
        keys.append(created["key"])
    return keys


# -- load ---------------------------------------------------------------------------------


def wrk(url: str, keys: list[str], seconds: float, connections: int, workdir: Path) -> tuple[float, int, int]:
    """Closed-loop requests/s; returns (rps, requests, errors)."""
    script = workdir / "wrk.lua"
    key_list = ", ".join(f'"{k}"' for k in keys)
    script.write_text(
        f"""
local keys = {{{key_list}}}
local body = '{BODY}'
local counter = 0
request = function()
  counter = counter + 1
  local headers = {{["Content-Type"] = "application/json"}}
  if #keys > 0 then headers["Authorization"] = "Bearer " .. keys[(counter % #keys) + 1] end
  return wrk.format("POST", nil, headers, body)
end
"""
    )
    out = subprocess.run(  # noqa: S603
        ["wrk", "-t2", f"-c{connections}", f"-d{seconds:g}s", "-s", str(script), url],  # noqa: S607
        capture_output=True, text=True, check=True,
    ).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    requests = int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]
    errors = 0
    for pattern in (r"Non-2xx or 3xx responses: (\d+)", r"connect (\d+), read (\d+), write (\d+), timeout (\d+)"):
        match = re.search(pattern, out)
        if match:
            errors += sum(int(g) for g in match.groups())
    return rps, requests, errors


def open_loop(url: str, key: str | None, rate: float, seconds: float) -> dict[str, float]:
    command = [sys.executable, str(ROOT / "bench" / "openloop.py"), url, "--rate", str(rate),
               "--seconds", str(seconds), "--body", BODY, "--header", "Content-Type: application/json"]
    if key:
        command += ["--header", f"Authorization: Bearer {key}"]
    out = subprocess.run(command, capture_output=True, text=True, check=True).stdout  # noqa: S603
    return dict(json.loads(out))


def measure(name: str, url: str, keys: list[str], args: argparse.Namespace, workdir: Path,
            pids: list[int] | None = None, counters: Any = None) -> Result:
    result = Result(name)
    # Warm up caches and connection pools; not measured.
    wrk(url, keys, 2, args.connections, workdir)
    before_cpu = cpu_seconds(pids) if pids else 0.0
    before_counts = counters() if counters else None
    result.rps, requests, result.wrk_errors = wrk(url, keys, args.seconds, args.connections, workdir)
    if pids:
        result.cpu_ms_per_1k = (cpu_seconds(pids) - before_cpu) / requests * 1_000_000
    if counters:
        after = counters()
        redis_calls = after[0] - before_counts[0]
        pg_tx = after[1] - before_counts[1]
        result.redis_calls_per_request = redis_calls / requests
        result.pg_transactions_per_request = pg_tx / requests
    latency = open_loop(url, keys[0] if keys else None, args.rate, args.open_seconds)
    result.p50_ms, result.p99_ms, result.p999_ms = latency["p50_ms"], latency["p99_ms"], latency["p999_ms"]
    result.open_loop_errors = int(latency["errors"])
    if pids:
        result.peak_rss_mb = peak_rss_mb(pids)
    return result


# -- backends -----------------------------------------------------------------------------


def redis_url() -> str:
    return os.environ.get("GATEWAY_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")


def postgres_dsn() -> str:
    return os.environ.get("GATEWAY_TEST_POSTGRES_DSN", "postgresql://postgres@127.0.0.1:5432/postgres")


async def _pg(dsn: str, sql: str) -> Any:
    import asyncpg

    conn = await asyncpg.connect(dsn)
    try:
        return await conn.fetchval(sql)
    finally:
        await conn.close()


def scratch_database() -> tuple[str, str]:
    name = "gateway_bench_" + uuid.uuid4().hex[:8]
    admin = postgres_dsn()
    asyncio.run(_pg(admin, f'CREATE DATABASE "{name}"'))
    base, _, _ = admin.rpartition("/")
    return name, f"{base}/{name}"


def drop_database(name: str) -> None:
    asyncio.run(_pg(postgres_dsn(), f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


def backend_counters(dsn: str, db_name: str) -> Any:
    import redis

    client = redis.Redis.from_url(redis_url())

    def read() -> tuple[int, int]:
        # Redis counts the commands a script runs as calls of their own; TIME, GET
        # and SET only ever run inside the limiter's script (the gateway never
        # sends them), so the round trips are every other command but INFO (ours).
        stats = client.info("commandstats")
        inside_script = {"cmdstat_time", "cmdstat_get", "cmdstat_set", "cmdstat_info",
                         "cmdstat_incr", "cmdstat_expireat"}
        calls = sum(int(v["calls"]) for k, v in stats.items()
                    if k.startswith("cmdstat_") and k not in inside_script)
        tx = asyncio.run(_pg(dsn, f"SELECT xact_commit + xact_rollback FROM pg_stat_database WHERE datname = '{db_name}'"))
        return calls, int(tx)

    return read


# -- the run --------------------------------------------------------------------------------


def combine(results: list[Result]) -> list[Result]:
    """One result per target: the median of each figure over the rounds, errors summed."""
    import statistics

    by_name: dict[str, list[Result]] = {}
    for r in results:
        by_name.setdefault(r.name, []).append(r)
    combined = []
    for name, rounds in by_name.items():
        merged = Result(name)
        for f in ("rps", "p50_ms", "p99_ms", "p999_ms", "cpu_ms_per_1k", "peak_rss_mb",
                  "redis_calls_per_request", "pg_transactions_per_request"):
            values = [getattr(r, f) for r in rounds if getattr(r, f) is not None]
            setattr(merged, f, statistics.median(values) if values else None)
        merged.wrk_errors = sum(r.wrk_errors for r in rounds)
        merged.open_loop_errors = sum(r.open_loop_errors for r in rounds)
        merged.notes = [f"rounds: {len(rounds)}; req/s " + ", ".join(f"{r.rps:.0f}" for r in rounds)
                        + "; CPU ms/1k " + ", ".join(f"{r.cpu_ms_per_1k:.0f}" for r in rounds
                                                     if r.cpu_ms_per_1k is not None)]
        combined.append(merged)
    return combined


def render(results: list[Result]) -> str:
    by_name = {r.name: r for r in results}
    floor = by_name.get("plain") or by_name.get("plain[lean]")
    nginx = by_name.get("nginx")
    header = (f"{'target':<18} {'req/s':>8} {'×plain':>7} {'×nginx':>7} {'p50 ms':>7} {'p99 ms':>7} "
              f"{'p99.9 ms':>8} {'CPU ms/1k':>9} {'RSS MB':>7} {'errors':>6} {'redis/req':>9} {'pg tx/req':>9}")
    lines = [header, "-" * len(header)]
    for r in results:
        def ratio(base: Result | None) -> str:
            return f"{r.rps / base.rps:.3f}" if base and base.rps else "-"

        def opt(value: float | None, fmt: str) -> str:
            return format(value, fmt) if value is not None else "-"

        lines.append(
            f"{r.name:<18} {r.rps:>8.0f} {ratio(floor):>7} {ratio(nginx):>7} {r.p50_ms:>7.2f} "
            f"{r.p99_ms:>7.2f} {r.p999_ms:>8.2f} {opt(r.cpu_ms_per_1k, '.0f'):>9} "
            f"{opt(r.peak_rss_mb, '.0f'):>7} {r.wrk_errors + r.open_loop_errors:>6} "
            f"{opt(r.redis_calls_per_request, '.2f'):>9} {opt(r.pg_transactions_per_request, '.3f'):>9}"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=8, help="wrk duration per target")
    parser.add_argument("--open-seconds", type=float, default=6, help="open-loop duration per target")
    parser.add_argument("--rate", type=float, default=500, help="open-loop arrival rate (req/s)")
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--repeat", type=int, default=3,
                        help="rounds over all targets; each figure is the median of its rounds")
    parser.add_argument("--only", nargs="*", help="run only these targets")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results"))
    parser.add_argument("--clients", nargs="+", choices=("lean", "aiohttp"), default=["lean"],
                        help="the gateway's upstream client (upstreams.<name>.client); with two, "
                             "every gateway target runs once with each, named target[client]")
    args = parser.parse_args()
    for tool in ("nginx", "wrk"):
        if shutil.which(tool) is None:
            sys.exit(f"bench: {tool} is missing (Debian: apt-get install nginx wrk)")

    wanted = set(args.only or ["direct", "nginx", "aiohttp_min", "plain", "plain_quiet", "embedded",
                               "redis_pg", "redis_pg_quiet", "redis_pg_w2", "teams100",
                               "redis_pg_trace1", "redis_pg_trace100", "keys100k"])
    key_memory: dict[str, Any] | None = None
    workdir = Path(tempfile.mkdtemp(prefix="gateway-bench-"))
    proxy_port = free_port()
    processes: list[subprocess.Popen[bytes]] = []
    results: list[Result] = []
    db_name = None
    try:
        upstream_process, upstream_port = start_upstream(workdir)
        processes.append(upstream_process)
        processes.append(start_nginx(workdir, "proxy", f"""
    upstream assess {{ server 127.0.0.1:{upstream_port}; keepalive 128; }}
    server {{
        listen 127.0.0.1:{proxy_port} backlog=4096;
        keepalive_requests 1000000;
        location / {{ proxy_pass http://assess; proxy_http_version 1.1; proxy_set_header Connection ""; }}
    }}"""))
        sink_port = free_port()
        processes.append(subprocess.Popen(  # noqa: S603
            [sys.executable, str(ROOT / "bench" / "otlp_sink.py"), str(sink_port)]))
        wait_port(upstream_port)
        wait_port(proxy_port)
        wait_port(sink_port)
        nginx_pids = [processes[1].pid, *children_of(processes[1].pid)]
        upstream_url = f"http://127.0.0.1:{upstream_port}"
        route = {"path": "/api/v1/assess", "methods": ["POST"], "upstream": "assess", "cost": 1}
        public = {"path": "/api/v1/assess", "methods": ["POST"], "upstream": "assess", "auth": False}
        upstreams = {"assess": {"url": upstream_url, "max_connections": 128}}

        # Rounds interleave the targets, so that the machine's slow and fast
        # spells fall on all of them alike; each figure is the median of its rounds.
        for round_no in range(args.repeat):
            if "direct" in wanted:
                results.append(measure("direct", upstream_url + "/api/v1/assess", [], args, workdir))
            if "nginx" in wanted:
                results.append(measure("nginx", f"http://127.0.0.1:{proxy_port}/api/v1/assess", [], args, workdir,
                                       pids=children_of(processes[1].pid) or nginx_pids))

            if "aiohttp_min" in wanted:
                port = free_port()
                minimal = subprocess.Popen(  # noqa: S603
                    [sys.executable, str(ROOT / "bench" / "minimal_proxy.py"),
                     "--listen", f"127.0.0.1:{port}", "--upstream", upstream_url],
                )
                try:
                    wait_port(port)
                    results.append(measure("aiohttp_min", f"http://127.0.0.1:{port}/api/v1/assess", [],
                                           args, workdir, pids=[minimal.pid]))
                finally:
                    minimal.terminate()
                    minimal.wait(10)

            def run_gateway(name: str, config: dict[str, Any], teams: int, workers: int = 1,
                            counters: Any = None, client: str = "lean") -> None:
                capped = name.endswith("_cap")
                quota = name.endswith("_quota")
                if len(args.clients) > 1:
                    name = f"{name}[{client}]"
                chosen = {k: {**v, "client": client} for k, v in upstreams.items()}
                gateway = GatewayRun(workdir, name, {"upstreams": chosen, **config}, workers)
                try:
                    keys = make_keys(gateway, teams, capped) if teams else []
                    if quota:
                        gateway.cli("teams", "update", "bench-0", "--rate-limit", "1000000",
                                    "--quota-per-day", "900000000")
                    gateway.start()
                    results.append(measure(name, f"http://127.0.0.1:{gateway.port}/api/v1/assess", keys, args,
                                           workdir, pids=gateway.pids, counters=counters))
                finally:
                    gateway.stop()

            quiet = {"logging": {"access_log": False, "level": "WARNING"}}
            no_request_log = {"request_log": {"enabled": False}}
            no_webhooks = {"webhooks": {"enabled": False}}
            for client in args.clients:
                tag = f"{client}-{round_no}"
                if "plain" in wanted:
                    run_gateway("plain", {"storage": f"sqlite:///{workdir}/plain-{tag}.db", "routes": [public]},
                                0, client=client)
                if "plain_quiet" in wanted:
                    run_gateway("plain_quiet", {"storage": f"sqlite:///{workdir}/plainq-{tag}.db",
                                                "routes": [public], **quiet}, 0, client=client)
                if "embedded" in wanted:
                    run_gateway("embedded", {"storage": f"sqlite:///{workdir}/embedded-{tag}.db",
                                             "routes": [route]}, 1, client=client)
                if "embedded_nolog" in wanted:
                    run_gateway("embedded_nolog", {"storage": f"sqlite:///{workdir}/embnolog-{tag}.db",
                                                   "routes": [route], **no_request_log}, 1, client=client)
                for variant in ("embedded_cap", "embedded_quota"):
                    if variant in wanted:
                        run_gateway(variant, {"storage": f"sqlite:///{workdir}/{variant}-{tag}.db",
                                              "routes": [route]}, 1, client=client)
                if "embedded_nohooks" in wanted:
                    run_gateway("embedded_nohooks", {"storage": f"sqlite:///{workdir}/embnohooks-{tag}.db",
                                                     "routes": [route], **no_webhooks}, 1, client=client)
            tracing = {"enabled": True, "endpoint": f"http://127.0.0.1:{sink_port}/v1/traces"}
            enforced: tuple[tuple[str, int, int, dict[str, Any]], ...] = (
                ("redis_pg", 1, 1, {}),
                ("redis_pg_quiet", 1, 1, quiet),
                ("redis_pg_noaccess", 1, 1, {"logging": {"access_log": False}}),
                ("redis_pg_again", 1, 1, {}),
                ("redis_pg_nolog", 1, 1, no_request_log),
                ("redis_pg_nohooks", 1, 1, no_webhooks),
                ("redis_pg_logfast", 1, 1, {"usage": {"flush_interval_seconds": 0.25}}),
                ("redis_pg_w2", 1, 2, {}),
                ("redis_pg_cap", 1, 1, {}),
                ("redis_pg_quota", 1, 1, {}),
                ("teams100", 100, 1, {}),
                ("redis_pg_trace1", 1, 1, {"tracing": {**tracing, "sample_ratio": 0.01}}),
                ("redis_pg_trace100", 1, 1, {"tracing": {**tracing, "sample_ratio": 1.0}}),
            )
            if wanted & {name for name, *_ in enforced}:
                for (name, teams, workers, extra), client in (
                        (row, client) for row in enforced for client in args.clients):
                    if name not in wanted:
                        continue
                    db_name, dsn = scratch_database()
                    try:
                        import redis

                        redis.Redis.from_url(redis_url()).flushdb()
                        config = {"storage": dsn, "limiter": redis_url(), "routes": [route], **extra}
                        run_gateway(name, config, teams, workers, counters=backend_counters(dsn, db_name),
                                    client=client)
                    finally:
                        drop_database(db_name)
                        db_name = None
        if "keys100k" in wanted:
            from key_memory import measure as measure_key_memory

            key_memory = measure_key_memory(workdir, upstream_url, 100_000)
    finally:
        for process in processes:
            process.send_signal(signal.SIGQUIT)
            try:
                process.wait(5)
            except subprocess.TimeoutExpired:
                process.kill()
        if db_name:
            drop_database(db_name)
        shutil.rmtree(workdir, ignore_errors=True)

    results = combine(results)
    table = render(results)
    if key_memory is not None:
        table += (f"\n\n100,000 keys cached: RSS {key_memory['rss_baseline_mb']} -> "
                  f"{key_memory['rss_with_keys_mb']} MB (+{key_memory['added_mb']} MB, "
                  f"{key_memory['bytes_per_key']} bytes a key; {key_memory['keys_loaded']} loaded)")
    print(table)
    stamp = time.strftime("%Y-%m-%d")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report = {
        "date": stamp,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "method": {"wrk": f"-t2 -c{args.connections} -d{args.seconds:g}s after a 2 s warm-up",
                   "rounds": f"{args.repeat} interleaved rounds, median of each figure",
                   "open_loop": f"{args.rate:g} req/s for {args.open_seconds:g} s, from the intended send time"},
        "results": [asdict(r) for r in results],
        "key_memory": key_memory,
        "table": table,
    }
    path = out / f"bench-{stamp}.json"
    path.write_text(json.dumps(report, indent=2))
    print(f"\nwritten to {path}")


if __name__ == "__main__":
    main()
