"""``gateway demo``: the gateway on embedded defaults, a demo upstream, a team and a key.

The key's limit (10 a minute) and the team's balance (5 credits) are small on
purpose, so a person sees 200, then 402, then 429 within a few requests; then
grants more credits and stops the upstream to see a 502 that costs nothing.
The README's quick start walks through exactly what is printed here
(tests/test_quickstart.py runs it as written).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import FrameType

import yaml

from gateway.app import Gateway
from gateway.config import settings_from_mapping
from gateway.logs import configure_logging
from gateway.server import serve

__all__ = ["DEMO_CREDITS", "DEMO_GRANT", "DEMO_RATE_LIMIT", "gateway_command", "run_demo"]

DEMO_RATE_LIMIT = 10
DEMO_CREDITS = 5
DEMO_GRANT = 10


def gateway_command() -> str:
    """This installation's ``gateway``, as a shell word that works without activating a venv.

    The console script installed beside the running interpreter (``.venv/bin/gateway``
    for ``./scripts/demo``), by its full path; else the interpreter running the CLI module.
    """
    script = Path(sys.executable).parent / "gateway"
    if script.is_file() and os.access(script, os.X_OK):
        return shlex.quote(str(script))
    return f"{shlex.quote(sys.executable)} -m gateway.cli"


def _wait_for_port(port: int, process: subprocess.Popen[bytes], timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"gateway: the demo upstream exited (code {process.returncode})")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.1)
    raise SystemExit(f"gateway: the demo upstream did not start on port {port}")


def _exit_on_sigterm(signum: int, frame: FrameType | None) -> None:
    # Outside serve() (which handles SIGTERM itself): unwind, so the data folder is removed.
    raise SystemExit(128 + signum)


def _banner(
    args: argparse.Namespace, workdir: Path, config_path: Path, admin_token: str, key: str, pid: int
) -> str:
    base = f"http://127.0.0.1:{args.port}"
    admin = f"http://127.0.0.1:{args.admin_port}"
    gateway = gateway_command()
    config = shlex.quote(str(config_path))
    requests = DEMO_RATE_LIMIT + 1
    activate = (
        ""
        if sys.prefix == sys.base_prefix
        else f"\n(Or `. {shlex.quote(sys.prefix)}/bin/activate`: then plain `gateway` works too.)"
    )
    return f"""
Gateway demo is running.

  public   {base}
  status   http://127.0.0.1:{args.status_port}/readyz   /metrics
  admin    {admin}/admin/v1/teams   console: {admin}/console
  data     {workdir}   (removed when the demo stops)
  admin token: {admin_token}
  demo key:    {key}   (team "demo", {DEMO_CREDITS} credits, {DEMO_RATE_LIMIT}/min)

1. Send this {requests} times: 200 x{DEMO_CREDITS}, then 402 x{DEMO_RATE_LIMIT - DEMO_CREDITS} \
(out of credits), then 429 ({DEMO_RATE_LIMIT}/min used up):

  curl -i -X POST {base}/api/v1/assess -H "Authorization: Bearer {key}" \\
       -H "Content-Type: application/json" -d '{{"essay": "hello"}}'

   The balance:        curl -s {base}/api/v1/credits -H "Authorization: Bearer {key}"
   A public route:     curl -s {base}/api/v1/health

2. Grant {DEMO_GRANT} credits, stop the demo upstream, wait out the 429's Retry-After and send
   the curl line again: 502, and the balance stays {DEMO_GRANT}:

  {gateway} credits grant --team demo --amount {DEMO_GRANT} --reason "more demo" --config {config}
  kill {pid}
  {gateway} credits balance --team demo --config {config}

3. Every balance equals the sum of its ledger:

  {gateway} credits reconcile --config {config}

The commands above work as printed, from any shell.{activate}
Ctrl-C stops everything and removes the data folder.
"""


def run_demo(args: argparse.Namespace) -> None:
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    workdir = Path(tempfile.mkdtemp(prefix="gateway-demo-"))
    try:
        _run(args, workdir)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def _run(args: argparse.Namespace, workdir: Path) -> None:
    admin_token = secrets.token_urlsafe(24)
    raw = {
        "listen": f"127.0.0.1:{args.port}",
        "status": {"listen": f"127.0.0.1:{args.status_port}"},
        "admin": {"listen": f"127.0.0.1:{args.admin_port}", "token": admin_token},
        "storage": f"sqlite:///{workdir / 'demo.db'}",
        "limiter": "memory",
        "logging": {"format": "logfmt", "level": "INFO"},
        "shutdown": {"readiness_delay_seconds": 0, "drain_seconds": 5},
        "upstreams": {"assess": {"url": f"http://127.0.0.1:{args.upstream_port}"}},
        "routes": [
            {"path": "/api/v1/assess", "methods": ["POST"], "upstream": "assess", "cost": 1},
            {"path": "/api/v1/health", "methods": ["GET"], "upstream": "assess", "auth": False},
        ],
    }
    config_path = workdir / "demo.yaml"
    config_path.write_text(yaml.safe_dump(raw, sort_keys=False), encoding="utf-8")
    config_path.chmod(0o600)  # it holds the demo's admin token
    settings = settings_from_mapping(raw, str(config_path))
    configure_logging(settings.logging)
    upstream = subprocess.Popen(  # noqa: S603 - our own module, fixed arguments
        [sys.executable, "-m", "gateway.demo_upstream", "--port", str(args.upstream_port)]
    )
    try:
        _wait_for_port(args.upstream_port, upstream)

        async def on_ready(gateway: Gateway) -> None:
            team = await gateway.management.create_team("demo")
            created = await gateway.management.create_key(
                team.id, "demo key", "live", rate_limit_per_minute=DEMO_RATE_LIMIT
            )
            await gateway.management.grant(team.id, DEMO_CREDITS, "demo credits")
            banner = _banner(args, workdir, config_path, admin_token, created.secret, upstream.pid)
            print(banner, flush=True)

        asyncio.run(serve(settings, on_ready=on_ready))
    finally:
        upstream.terminate()
        try:
            upstream.wait(5)
        except subprocess.TimeoutExpired:
            upstream.kill()
            upstream.wait()
