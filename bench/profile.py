"""Profile the gateway's hot path under wrk load with py-spy; print where the time goes.

    python bench/profile.py [plain|embedded|redis_pg] [--client lean|aiohttp] [--no-access-log]
                            [--seconds 10] [--out FILE]

Starts the nginx upstream and one gateway process like bench/run.py, drives it
with wrk, samples it with py-spy (pip install py-spy; needs ptrace, fine as
root) and prints the functions with the most samples, by own time and by
inclusive time. The collapsed stacks are written next to the summary.
"""

from __future__ import annotations

import argparse
import collections
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from run import (  # noqa: E402
    ROOT,
    GatewayRun,
    drop_database,
    make_keys,
    redis_url,
    scratch_database,
    start_upstream,
    wait_port,
    wrk,
)


def summarize(collapsed: Path, top: int = 30) -> str:
    own: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    total = 0
    for line in collapsed.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        n = int(count)
        total += n
        frames = stack.split(";")
        own[frames[-1]] += n
        for frame in set(frames):
            inclusive[frame] += n
    packages: collections.Counter[str] = collections.Counter()
    for name, n in own.items():
        where = name.rpartition("(")[2]
        packages[where.split("/")[0] if "/" in where else where.split(":")[0]] += n
    out = [f"{total} samples", "", "by package (own time):"]
    out += [f"  {n / total:6.1%}  {name}" for name, n in packages.most_common(12)]
    out += ["", "by own time:"]
    out += [f"  {n / total:6.1%}  {name}" for name, n in own.most_common(top)]
    out += ["", "inclusive:"]
    out += [f"  {n / total:6.1%}  {name}" for name, n in inclusive.most_common(top)]
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("target", choices=("plain", "embedded", "redis_pg"), nargs="?", default="embedded")
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--out")
    parser.add_argument("--client", choices=("lean", "aiohttp"), default="lean",
                        help="the gateway's upstream client (upstreams.<name>.client)")
    parser.add_argument("--no-access-log", action="store_true",
                        help="run with the access log off (logging.access_log: false), still at INFO")
    parser.add_argument("--summarize", metavar="STACKS", help="only summarize a saved .stacks file")
    args = parser.parse_args()
    if args.summarize:
        print(summarize(Path(args.summarize)))
        return
    workdir = Path(tempfile.mkdtemp(prefix="gateway-profile-"))
    nginx, upstream_port = start_upstream(workdir)
    gateway = None
    db_name = None
    try:
        wait_port(upstream_port)
        route = {"path": "/api/v1/assess", "methods": ["POST"], "upstream": "assess", "cost": 1}
        if args.target == "plain":
            route = {**route, "auth": False}
        storage: dict[str, str] = {"storage": f"sqlite:///{workdir}/gw.db"}
        if args.target == "redis_pg":
            import redis

            redis.Redis.from_url(redis_url()).flushdb()
            db_name, dsn = scratch_database()
            storage = {"storage": dsn, "limiter": redis_url()}
        gateway = GatewayRun(workdir, args.target, {
            **storage,
            "upstreams": {"assess": {"url": f"http://127.0.0.1:{upstream_port}", "max_connections": 128,
                                     "client": args.client}},
            "routes": [route],
            **({"logging": {"access_log": False}} if args.no_access_log else {}),
        })
        keys = make_keys(gateway, 1) if args.target != "plain" else []
        gateway.start()
        assert gateway.process is not None
        url = f"http://127.0.0.1:{gateway.port}/api/v1/assess"
        wrk(url, keys, 2, args.connections, workdir)
        collapsed = workdir / "stacks.txt"
        spy = subprocess.Popen(  # noqa: S603
            [shutil.which("py-spy") or "py-spy", "record", "--pid", str(gateway.process.pid), "--format", "raw",
             "--rate", "250", "--duration", str(int(args.seconds)), "--nonblocking", "-o", str(collapsed)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        result: dict[str, float] = {}
        thread = threading.Thread(target=lambda: result.update(rps=wrk(url, keys, args.seconds, args.connections, workdir)[0]))
        thread.start()
        thread.join()
        spy.wait(30)
        report = f"{args.target} ({args.client} client): {result.get('rps', 0):.0f} req/s under profiling\n\n" + summarize(collapsed)
        print(report)
        if args.out:
            Path(args.out).write_text(report + "\n")
            shutil.copy(collapsed, Path(args.out).with_suffix(".stacks"))
    finally:
        if gateway is not None:
            gateway.stop()
        nginx.send_signal(signal.SIGQUIT)
        nginx.wait(5)
        if db_name:
            drop_database(db_name)
        shutil.rmtree(workdir, ignore_errors=True)
        _ = ROOT


if __name__ == "__main__":
    main()
