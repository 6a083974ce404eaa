"""Profile the gateway's hot path under wrk load with py-spy; print where the time goes.

    python bench/profile.py [plain|embedded] [--seconds 10] [--out bench/results/profile-NAME.txt]

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

from run import ROOT, GatewayRun, free_port, make_keys, start_nginx, wait_port, wrk  # noqa: E402


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
    out = [f"{total} samples", "", "by own time:"]
    out += [f"  {n / total:6.1%}  {name}" for name, n in own.most_common(top)]
    out += ["", "inclusive:"]
    out += [f"  {n / total:6.1%}  {name}" for name, n in inclusive.most_common(top)]
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("target", choices=("plain", "embedded"), nargs="?", default="embedded")
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--out")
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="gateway-profile-"))
    upstream_port = free_port()
    nginx = start_nginx(workdir, "upstream", f"""
    server {{
        listen 127.0.0.1:{upstream_port} backlog=4096;
        keepalive_requests 1000000;
        location / {{ default_type application/json; return 200 '{{"score": 42}}'; }}
    }}""")
    gateway = None
    try:
        wait_port(upstream_port)
        route = {"path": "/api/v1/assess", "methods": ["POST"], "upstream": "assess", "cost": 1}
        if args.target == "plain":
            route = {**route, "auth": False}
        gateway = GatewayRun(workdir, args.target, {
            "storage": f"sqlite:///{workdir}/gw.db",
            "upstreams": {"assess": {"url": f"http://127.0.0.1:{upstream_port}", "max_connections": 128}},
            "routes": [route],
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
        report = f"{args.target}: {result.get('rps', 0):.0f} req/s under profiling\n\n" + summarize(collapsed)
        print(report)
        if args.out:
            Path(args.out).write_text(report + "\n")
            shutil.copy(collapsed, Path(args.out).with_suffix(".stacks"))
    finally:
        if gateway is not None:
            gateway.stop()
        nginx.send_signal(signal.SIGQUIT)
        nginx.wait(5)
        shutil.rmtree(workdir, ignore_errors=True)
        _ = ROOT


if __name__ == "__main__":
    main()
