"""The README's quick start, run as a newcomer would: the demo, the commands it prints.

The statuses are read from the README's walk-through table, so the README and the
demo cannot disagree silently; the printed commands are run through a shell exactly
as printed, without the virtualenv on PATH.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from aiohttp.test_utils import TestClient, TestServer

from gateway.config import load_settings
from gateway.demo_upstream import create_demo_upstream

from .services import free_port

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
BANNER_END = "Ctrl-C stops everything"


def readme_section(title: str) -> str:
    text = README.read_text(encoding="utf-8")
    start = text.index(f"\n## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start : end if end != -1 else len(text)]


def promised_statuses() -> list[int]:
    """The answers the quick start promises, request by request, from its table.

    Rows read ``| 1-5 | `200` ...`` (request numbers, one or a range with a hyphen or an
    en dash, then the status).
    """
    row = r"^\| (\d+)(?:[-\u2013](\d+))? \| `(\d{3})\b"
    rows = re.findall(row, readme_section("Quick start"), re.M)
    statuses: list[int] = []
    for first, last, status in rows:
        assert int(first) == len(statuses) + 1, f"the README's table skips request {first}"
        statuses += [int(status)] * (int(last or first) - int(first) + 1)
    assert statuses, "the README's quick start has no table of answers"
    return statuses


@dataclass
class Demo:
    process: asyncio.subprocess.Process
    banner: str
    env: dict[str, str]
    log: Path

    def line(self, pattern: str) -> str:
        found = re.search(pattern, self.banner, re.M)
        assert found, f"the demo printed no line matching {pattern!r}:\n{self.banner}"
        return found.group(0).strip()

    @property
    def curl(self) -> str:
        """The charged request, as printed: a curl line continued on the next one."""
        found = re.search(r"^ *curl -i -X POST .*\\\n.*$", self.banner, re.M)
        assert found, self.banner
        return found.group(0).strip()

    async def sh(self, command: str, timeout: float = 30.0) -> str:
        proc = await asyncio.create_subprocess_exec(
            "bash",
            "-c",
            command,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=self.env,
        )
        out, err = await asyncio.wait_for(proc.communicate(), timeout)
        assert proc.returncode == 0, f"{command}\nexit {proc.returncode}: {err.decode()}"
        return out.decode()

    async def request(self) -> tuple[int, dict[str, str], str]:
        """The printed curl line: status, headers, body."""
        out = await self.sh(self.curl)
        head, _, body = out.replace("\r\n", "\n").partition("\n\n")
        status_line, *header_lines = head.split("\n")
        headers = {k.lower(): v.strip() for k, _, v in (h.partition(":") for h in header_lines)}
        return int(status_line.split()[1]), headers, body


def shell_env(tmp_path: Path) -> dict[str, str]:
    """The environment of a fresh shell: no virtualenv on PATH, no proxies, data in tmp_path."""
    venv_bin = str(Path(sys.executable).parent)
    env = {
        k: v
        for k, v in os.environ.items()
        if k.lower() not in ("http_proxy", "https_proxy", "all_proxy", "virtual_env")
    }
    env["PATH"] = os.pathsep.join(
        p for p in env.get("PATH", "/usr/bin:/bin").split(os.pathsep) if p != venv_bin
    )
    env["TMPDIR"] = str(tmp_path)
    env["PYTHONUNBUFFERED"] = "1"
    return env


@contextlib.asynccontextmanager
async def running_demo(tmp_path: Path) -> AsyncIterator[Demo]:
    env = shell_env(tmp_path)
    ports = [free_port() for _ in range(4)]
    log = tmp_path / "demo.log"
    with log.open("wb") as stderr:
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "gateway.cli",
            "demo",
            "--port",
            str(ports[0]),
            "--upstream-port",
            str(ports[1]),
            "--status-port",
            str(ports[2]),
            "--admin-port",
            str(ports[3]),
            stdout=asyncio.subprocess.PIPE,
            stderr=stderr,
            env=env,
            start_new_session=True,  # its own process group, upstream included, as in a terminal
        )
    try:
        assert process.stdout is not None
        banner = ""
        while BANNER_END not in banner:
            line = await asyncio.wait_for(process.stdout.readline(), 30)
            assert line, f"the demo exited before its banner:\n{banner}\n{log.read_text()}"
            banner += line.decode()
        yield Demo(process, banner, env, log)
    finally:
        # The whole group: a demo killed outright leaves its upstream holding the pipe.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        await asyncio.wait_for(process.wait(), 30)


async def stop(demo: Demo, signum: int) -> None:
    demo.process.send_signal(signum)
    code = await asyncio.wait_for(demo.process.wait(), 30)
    assert code == 0, f"the demo exited {code}:\n{demo.log.read_text()}"


def data_folder(demo: Demo, tmp_path: Path) -> Path:
    folder = Path(demo.line(r"^ *data +\S+").split()[1])
    assert folder.is_dir() and folder.parent == tmp_path
    return folder


async def test_the_readme_quick_start_as_written(tmp_path: Path) -> None:
    expected = promised_statuses()
    async with running_demo(tmp_path) as demo:
        folder = data_folder(demo, tmp_path)
        gateway = str(Path(sys.executable).parent / "gateway")
        grant = demo.line(r"^ *\S+ credits grant .*$")
        balance = demo.line(r"^ *\S+ credits balance .*$")
        reconcile = demo.line(r"^ *\S+ credits reconcile .*$")
        kill = demo.line(r"^ *kill \d+$")
        # Printed with the installation's own gateway, so they work unactivated.
        for command in (grant, balance, reconcile):
            assert command.startswith(gateway + " "), command

        # 1. The curl line, sent as many times as the README's table says.
        seen = []
        retry_after = 0
        for _ in expected:
            status, headers, body = await demo.request()
            seen.append(status)
            if status == 200:
                assert int(headers["x-credits-remaining"]) >= 0
                assert "assessment_id" in json.loads(body)
            elif status == 402:
                assert json.loads(body)["error"] == "Insufficient credits"
            elif status == 429:
                assert json.loads(body)["error"] == "Rate limit exceeded"
                retry_after = int(headers["retry-after"])
        assert seen == expected
        assert seen[-1] == 429, "the walk-through ends step 1 on a 429"

        public = await demo.sh(demo.line(r"curl -s \S+/api/v1/health$"))
        assert json.loads(public) == {"status": "ok"}

        # 2. Grant, stop the upstream, wait out the Retry-After: 502, balance unchanged.
        granted = await demo.sh(grant)
        amount_given = re.search(r"--amount (\d+)", grant)
        assert amount_given, grant
        amount = int(amount_given.group(1))
        assert granted.strip().endswith(f"is now {amount}")
        before = await demo.sh(balance)
        assert re.search(rf"^live +{amount}$", before, re.M), before
        await demo.sh(kill)
        status = 429
        for _ in range(3):  # a Retry-After is at most the key's 6 s; honoured as told
            await asyncio.sleep(retry_after)
            status, headers, body = await demo.request()
            if status != 429:
                break
            retry_after = int(headers["retry-after"])
        assert status == 502, body
        assert json.loads(body) == {"error": "Upstream unavailable"}
        after = await demo.sh(balance)
        assert re.search(rf"^live +{amount}$", after, re.M), after
        # The balance line is free but rate-limited like any request: its 429 says how long.
        credits = demo.line(r"curl -s \S+/api/v1/credits .*$")
        for _ in range(3):
            answer = json.loads(await demo.sh(credits))
            if "retry_after" not in answer:
                break
            await asyncio.sleep(answer["retry_after"])
        assert answer == {"credits_available": amount, "environment": "live"}

        # 3. Reconcile, then Ctrl-C: everything stops and the data folder is gone.
        assert (await demo.sh(reconcile)).startswith("OK")
        await stop(demo, signal.SIGINT)
        assert not folder.exists()


async def test_sigterm_stops_the_demo_and_removes_its_data(tmp_path: Path) -> None:
    async with running_demo(tmp_path) as demo:
        folder = data_folder(demo, tmp_path)
        upstream_pid = int(demo.line(r"^ *kill \d+$").split()[1])
        await stop(demo, signal.SIGTERM)
    assert not folder.exists()
    with pytest.raises(ProcessLookupError):
        os.kill(upstream_pid, 0)  # stopped and reaped by the demo


async def test_the_example_configs_routes_exist_on_the_demo_upstream(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("GATEWAY_ADMIN_TOKEN", "a-long-enough-admin-token")
    settings = load_settings(str(ROOT / "config" / "gateway.yaml"))
    async with TestClient(TestServer(create_demo_upstream())) as client:
        for route in settings.routes:
            for method in route.methods:
                resp = await client.request(method, route.path, json={"essay": "hello"})
                assert resp.status == 200, f"{method} {route.path}: {resp.status}"


@pytest.mark.parametrize(
    ("routes", "upstreams", "says"),
    [(1, 1, "1 route, 1 upstream,"), (2, 2, "2 routes, 2 upstreams,")],
)
def test_check_config_counts_in_english(
    tmp_path: Path, routes: int, upstreams: int, says: str
) -> None:
    config = tmp_path / "gateway.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "admin": {"token": "a-long-enough-admin-token"},
                "upstreams": {
                    f"u{i}": {"url": f"http://127.0.0.1:{8000 + i}"} for i in range(upstreams)
                },
                "routes": [
                    {"path": f"/r{i}", "upstream": f"u{i % upstreams}"} for i in range(routes)
                ],
            }
        )
    )
    done = subprocess.run(
        [sys.executable, "-m", "gateway.cli", "check-config", str(config)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert says in done.stdout, done.stdout
