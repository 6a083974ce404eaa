"""``gateway demo``: the gateway on embedded defaults, a demo upstream, a team and a key.

The key's limit (10 a minute) and the team's balance (5 credits) are small on
purpose, so a person sees 200, then 402, then 429 within a few requests.
"""

from __future__ import annotations

import argparse
import asyncio
import secrets
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from gateway.app import Gateway
from gateway.config import settings_from_mapping
from gateway.logs import configure_logging
from gateway.server import serve

__all__ = ["run_demo"]

DEMO_RATE_LIMIT = 10
DEMO_CREDITS = 5


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


def run_demo(args: argparse.Namespace) -> None:
    workdir = Path(tempfile.mkdtemp(prefix="gateway-demo-"))
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
            {"path": "/api/v1/assess", "methods": ["POST"], "upstream": "assess", "cost": 1}
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
            base = f"http://127.0.0.1:{args.port}"
            print(
                f"""
Gateway demo is running (data in {workdir}).

  public   {base}
  status   http://127.0.0.1:{args.status_port}/readyz   /metrics
  admin    http://127.0.0.1:{args.admin_port}/admin/v1/teams
  admin token: {admin_token}
  demo key:    {created.secret}   (team "demo", {DEMO_CREDITS} credits, {DEMO_RATE_LIMIT}/min)

Try it (run it a few times: 200 x{DEMO_CREDITS}, then 402, then 429):

  curl -i -X POST {base}/api/v1/assess -H "Authorization: Bearer {created.secret}" \\
       -H "Content-Type: application/json" -d '{{"essay": "hello"}}'

  curl -s {base}/api/v1/credits -H "Authorization: Bearer {created.secret}"

Stop the demo upstream (kill {upstream.pid}) to see 502 and the balance unchanged.
Manage it from another shell, e.g.:
  gateway credits balance --team demo --config {config_path}
  gateway credits grant --team demo --amount 10 --reason "more demo" --config {config_path}
  gateway credits reconcile --config {config_path}
Ctrl-C stops everything.
""",
                flush=True,
            )

        asyncio.run(serve(settings, on_ready=on_ready))
    finally:
        upstream.terminate()
        try:
            upstream.wait(5)
        except subprocess.TimeoutExpired:
            upstream.kill()
