"""schemathesis against the live admin API: no server error, no response that breaks the schema.

The admin API runs in a real gateway process, on SQLite and on PostgreSQL;
schemathesis' own command line runs every check on at least 100 generated
examples per operation (valid and invalid), once with the admin token and once
with a team-scoped token, with a fixed seed so a failure can be replayed.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from ..conftest import ADMIN_TOKEN
from ..services import free_port
from ..storage.conftest import create_database, drop_database, unique_name

pytestmark = pytest.mark.timeout(900)


def _admin(url: str, method: str, path: str, body: object) -> dict[str, object]:
    request = urllib.request.Request(
        url + path,
        method=method,
        data=json.dumps(body).encode(),
        headers={"Authorization": f"Bearer {ADMIN_TOKEN}", "Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=10) as resp:
        return dict(json.loads(resp.read()))


@pytest.fixture(scope="module", params=["sqlite", "postgres"])
def admin_server(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[str, str]]:
    work: Path = tmp_path_factory.mktemp("schemathesis")
    storage = f"sqlite:///{work / 'gw.db'}"
    admin_dsn = os.environ.get("GATEWAY_TEST_POSTGRES_DSN", "")
    db_name = unique_name("schemathesis")
    if request.param == "postgres":
        if not admin_dsn:
            pytest.fail("GATEWAY_TEST_POSTGRES_DSN is not set: run the tests through scripts/test")
        storage = asyncio.run(create_database(admin_dsn, db_name))
    ports = [free_port() for _ in range(3)]
    config = work / "gw.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "listen": f"127.0.0.1:{ports[0]}",
                "status": {"listen": f"127.0.0.1:{ports[1]}"},
                "admin": {"listen": f"127.0.0.1:{ports[2]}", "token": ADMIN_TOKEN},
                "storage": storage,
                "logging": {"access_log": False, "level": "WARNING"},
                "shutdown": {"readiness_delay_seconds": 0},
                "upstreams": {"a": {"url": "http://127.0.0.1:9"}},
                "routes": [{"path": "/api/v1/assess", "upstream": "a"}],
                # Whether a receiver's name resolves to a public address is no
                # schema's to say ("http://0" is a valid URL); the address guard
                # has tests of its own (tests/admin/test_webhooks.py). No worker:
                # nothing is sent to what the fuzzer makes up, no name is looked up.
                "webhooks": {"allow_private_addresses": True, "enabled": False},
            }
        )
    )
    if request.param == "postgres":
        subprocess.run(
            [sys.executable, "-m", "gateway.cli", "migrate", "--config", str(config)], check=True
        )
    log = (work / "gw.log").open("wb")
    process = subprocess.Popen(
        [sys.executable, "-m", "gateway.cli", "run", "--config", str(config)],
        stdout=log,
        stderr=log,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    url = f"http://127.0.0.1:{ports[2]}"
    deadline = time.monotonic() + 20
    while True:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{ports[1]}/readyz", timeout=1)
            break
        except OSError:
            if time.monotonic() > deadline or process.poll() is not None:
                raise RuntimeError((work / "gw.log").read_text()) from None
            time.sleep(0.1)
    # Something real to find: a team, a key, a token.
    _admin(url, "POST", "/admin/v1/teams", {"name": "acme"})
    _admin(url, "POST", "/admin/v1/teams/acme/keys", {"name": "k"})
    token = str(_admin(url, "POST", "/admin/v1/teams/acme/tokens", {"name": "ci"})["token"])
    try:
        yield url, token
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(20)
        log.close()
        if request.param == "postgres":
            asyncio.run(drop_database(admin_dsn, db_name))
        errors = [
            line for line in (work / "gw.log").read_text().splitlines() if "Traceback" in line
        ]
        assert not errors, "the gateway logged a traceback"


def _schemathesis(url: str, token: str, tmp_path: Path) -> None:
    result = subprocess.run(
        [
            str(Path(sys.executable).parent / "schemathesis"),
            "--config-file",
            str(Path(__file__).with_name("schemathesis.toml")),
            "run",
            url + "/admin/v1/openapi.json",
            "--url",
            url,
            "--checks",
            "all",
            "--max-examples",
            "100",
            "--header",
            f"Authorization: Bearer {token}",
            "--seed",
            "20261127",
            "--generation-database",
            "none",
            "--no-color",
            "--report-dir",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        check=False,
        timeout=800,
    )
    output = result.stdout
    failures = output[output.find("FAILURES") :] if "FAILURES" in output else output[-3000:]
    print(output[-1500:])
    assert result.returncode == 0, failures[:12000] + result.stderr[-2000:]


def test_admin_api_with_the_admin_token(admin_server: tuple[str, str], tmp_path: Path) -> None:
    url, _ = admin_server
    _schemathesis(url, ADMIN_TOKEN, tmp_path)


def test_admin_api_with_a_team_token(admin_server: tuple[str, str], tmp_path: Path) -> None:
    url, token = admin_server
    _schemathesis(url, token, tmp_path)
