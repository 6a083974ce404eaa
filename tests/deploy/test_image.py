"""The image itself: built from the real Dockerfile and run against real services.

``scripts/image`` builds it with Debian's podman on a stand-in for the
python:3.11-slim-bookworm base (made once with debootstrap, then cached). The
container runs with host networking and a read-only root file system, against a
fresh PostgreSQL database, a Redis database of its own and an upstream this
module starts on loopback. Skipped, with the reason, where podman cannot run
containers (not root, podman missing and not installable, no runtime).
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest
import yaml

from tests.services import free_port, postgres_dsn, redis_url

from ._support import CONFIG_DIR, REPO

pytestmark = [
    pytest.mark.container,
    # The first run makes the base with debootstrap (a few minutes); every wait
    # below has a bound of its own.
    pytest.mark.timeout(1500),
]

SCRIPT = REPO / "scripts" / "image"
TAG = "localhost/gateway:test"
ADMIN_TOKEN = "image-test-admin-token-0123456789"
# A Redis database of its own: the gateway's rate-limit keys stay out of the
# database the rest of the suite shares.
REDIS_DB = 13
UID = 10001


def _tail(text: str, lines: int = 25) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


def _script(*args: str, timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", str(SCRIPT), *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        env={**os.environ, "GATEWAY_IMAGE_TAG": TAG},
    )


@dataclass
class Podman:
    """podman as scripts/image configures it (its own containers.conf)."""

    env: dict[str, str]

    def run(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["podman", *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            env=self.env,
        )

    def ok(self, *args: str, timeout: float = 60) -> str:
        done = self.run(*args, timeout=timeout)
        assert done.returncode == 0, f"podman {' '.join(args)}: {done.stderr or done.stdout}"
        return done.stdout.strip()


@pytest.fixture(scope="module")
def podman() -> Podman:
    if os.geteuid() != 0:
        pytest.skip("the image test runs podman as root (runc, cgroupfs); run the tests as root")
    # Installs podman, runc and debootstrap when missing, then runs a container
    # from a three-file root file system. A machine that cannot (no podman and no
    # way to install it, a sandbox that denies namespaces) is a reason to skip,
    # not a failure of the image.
    probe = _script("--probe", timeout=600)
    if probe.returncode != 0:
        pytest.skip(_tail(probe.stderr, 5) or "scripts/image --probe failed")
    conf = _script("--print-env", timeout=60).stdout.strip()
    name, _, value = conf.partition("=")
    assert name == "CONTAINERS_CONF" and Path(value).is_file(), conf
    # The stand-in base: made once (debootstrap, about a minute), then cached.
    started = time.monotonic()
    base = _script("--base-only", timeout=1200)
    assert base.returncode == 0, f"scripts/image --base-only failed:\n{_tail(base.stderr)}"
    print(f"\nbase {base.stdout.strip()} ready in {time.monotonic() - started:.0f} s")
    return Podman({**os.environ, name: value})


@pytest.fixture(scope="module")
def image(podman: Podman) -> Iterator[str]:
    before = set(podman.ok("images", "--quiet", "--no-trunc", "--filter", "dangling=true").split())
    try:
        started = time.monotonic()
        built = _script(timeout=900)
        assert built.returncode == 0, (
            f"scripts/image failed:\n{_tail(built.stdout, 40)}\n{_tail(built.stderr)}"
        )
        size = int(podman.ok("image", "inspect", "--format", "{{.Size}}", TAG))
        print(f"\nimage {TAG} built in {time.monotonic() - started:.0f} s, {size / 1e6:.0f} MB")
        yield TAG
    finally:
        podman.run("rmi", "--force", TAG)
        # Whatever this module's build left without a name (scripts/image builds
        # without a layer cache, so normally nothing); older images stay.
        after = set(
            podman.ok("images", "--quiet", "--no-trunc", "--filter", "dangling=true").split()
        )
        for leftover in after - before:
            podman.run("rmi", leftover)


@pytest.fixture(scope="module")
def database() -> Iterator[str]:
    """A fresh PostgreSQL database; its DSN as the container sees it."""
    admin = postgres_dsn()
    name = f"gateway_image_{secrets.token_hex(4)}"

    async def execute(sql: str) -> None:
        conn = await asyncpg.connect(admin, timeout=10)
        try:
            await conn.execute(sql)
        finally:
            await conn.close()

    asyncio.run(execute(f'CREATE DATABASE "{name}"'))
    try:
        parts = urlsplit(admin)
        yield urlunsplit(parts._replace(path=f"/{name}"))
    finally:
        asyncio.run(execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


@dataclass
class Upstream:
    """A real backend on loopback that records what reaches it."""

    port: int
    seen: list[dict[str, Any]] = field(default_factory=list)
    delay: float = 0.0
    arrived: threading.Event = field(default_factory=threading.Event)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


@pytest.fixture(scope="module")
def upstream() -> Iterator[Upstream]:
    state = Upstream(port=free_port())

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
            state.seen.append({"path": self.path, "body": body, "headers": dict(self.headers)})
            state.arrived.set()
            if state.delay:
                time.sleep(state.delay)
            reply = json.dumps({"score": 42}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(reply)))
            self.end_headers()
            self.wfile.write(reply)

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", state.port), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield state
    finally:
        server.shutdown()
        server.server_close()


@dataclass
class Running:
    name: str
    podman: Podman
    public: int
    status: int

    def exec(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return self.podman.run("exec", self.name, *args, timeout=timeout)

    def gateway(self, *args: str) -> Any:
        done = self.exec("gateway", *args, "--json")
        assert done.returncode == 0, f"gateway {' '.join(args)}: {done.stderr}"
        return json.loads(done.stdout)

    def state(self, template: str) -> str:
        return self.podman.ok("inspect", "--format", template, self.name)


def _http(
    url: str, data: bytes | None = None, headers: dict[str, str] | None = None, timeout: float = 10
) -> tuple[int, bytes]:
    request = urllib.request.Request(url, data=data, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


@pytest.fixture(scope="module")
def container(
    podman: Podman, image: str, database: str, upstream: Upstream, tmp_path_factory: Any
) -> Iterator[Running]:
    public, status, admin = free_port(), free_port(), free_port()
    # The image's own config (edge.yaml), on ports free on this host: with host
    # networking the defaults (8080, 9091, 9090) may be taken. A short readiness
    # delay keeps the stop test quick; mounting a file there is what the image
    # documents for replacing its config.
    config = yaml.safe_load((CONFIG_DIR / "edge.yaml").read_text())
    config["listen"] = f"127.0.0.1:{public}"
    config["status"]["listen"] = f"127.0.0.1:{status}"
    config["admin"]["listen"] = f"127.0.0.1:{admin}"
    config["shutdown"] = {"readiness_delay_seconds": 1, "drain_seconds": 20}
    config_file = tmp_path_factory.mktemp("image") / "gateway.yaml"
    config_file.write_text(yaml.safe_dump(config, sort_keys=False))
    config_file.chmod(0o644)
    config_file.parent.chmod(0o755)

    redis = urlsplit(redis_url())._replace(path=f"/{REDIS_DB}")
    env = {
        "GATEWAY_ADMIN_TOKEN": ADMIN_TOKEN,
        "GATEWAY_STORAGE": database,
        "GATEWAY_POSTGRES_LISTEN_DSN": database,
        "GATEWAY_LIMITER": urlunsplit(redis),
        "ASSESS_UPSTREAM_URL": upstream.url,
        "GATEWAY_HEALTHCHECK_URL": f"http://127.0.0.1:{status}/healthz",
    }
    options = [
        "--network", "host",
        "--read-only",
        "--volume", f"{config_file}:/etc/gateway/gateway.yaml:ro",
    ]  # fmt: skip
    for key, value in env.items():
        options += ["--env", f"{key}={value}"]

    name = f"gateway-test-{secrets.token_hex(4)}"
    try:
        # The schema first, as the migration Job does: a one-shot of the same image.
        migrated = podman.run(
            "run", "--rm", "--name", f"{name}-migrate", *options, image, "migrate", "--json",
            timeout=120,
        )  # fmt: skip
        assert migrated.returncode == 0, migrated.stderr
        assert json.loads(migrated.stdout)["applied"], migrated.stdout

        podman.ok("run", "--detach", "--name", name, *options, image, timeout=120)
        yield Running(name, podman, public, status)
    finally:
        logs = podman.run("logs", "--tail", "30", name)
        for container_name in (name, f"{name}-migrate"):
            podman.run("rm", "--force", "--ignore", "--time", "5", container_name, timeout=60)
        print(f"\nlast lines of the container's log:\n{_tail(logs.stdout + logs.stderr, 30)}")


def test_reaches_healthy_by_its_own_healthcheck(container: Running) -> None:
    # Podman runs the HEALTHCHECK from a systemd timer where it has one; here,
    # without systemd, it is run on demand: the same command from the image.
    assert container.state("{{.Config.Healthcheck.Test}}").count("urlopen") == 1
    deadline = time.monotonic() + 60
    health = ""
    while time.monotonic() < deadline:
        assert container.state("{{.State.Status}}") == "running", container.podman.run(
            "logs", container.name
        ).stderr
        container.podman.run("healthcheck", "run", container.name, timeout=30)
        health = container.state("{{.State.Health.Status}}")
        if health == "healthy":
            break
        time.sleep(1)
    assert health == "healthy"
    status, body = _http(f"http://127.0.0.1:{container.status}/readyz")
    assert status == 200, body


def test_runs_as_the_unprivileged_user(container: Running) -> None:
    assert container.state("{{.Config.User}}") == f"{UID}:{UID}"
    assert container.exec("id", "-u").stdout.strip() == str(UID)
    assert container.exec("id", "-g").stdout.strip() == str(UID)
    # PID 1 is the gateway itself, not a shell that would swallow SIGTERM.
    command = container.exec("cat", "/proc/1/cmdline").stdout.split("\0")
    assert Path(command[1]).name == "gateway" and command[2] == "run", command


def test_root_file_system_is_read_only(container: Running) -> None:
    assert container.state("{{.HostConfig.ReadonlyRootfs}}") == "true"
    for path in ("/probe", "/var/lib/gateway/probe", "/etc/gateway/probe"):
        done = container.exec("python", "-c", f"open({path!r}, 'w')")
        assert done.returncode != 0, path
        assert "Read-only file system" in done.stderr or "Permission denied" in done.stderr
    done = container.exec("python", "-c", "open('/probe', 'w')")
    assert "Read-only file system" in done.stderr, done.stderr
    # /tmp is the one writable place the image documents.
    assert container.exec("python", "-c", "open('/tmp/probe', 'w')").returncode == 0


def test_proxies_a_request_with_a_key_made_in_the_container(
    container: Running, upstream: Upstream
) -> None:
    team = container.gateway("teams", "create", "image-test")
    key = container.gateway("keys", "create", "--team", team["id"], "--name", "ci")
    container.gateway("credits", "grant", "--team", team["id"], "--amount", "5", "--reason", "ci")

    url = f"http://127.0.0.1:{container.public}/api/v1/assess"
    headers = {"Authorization": f"Bearer {key['key']}", "Content-Type": "application/json"}
    status, body = _http(url, b'{"text": "hello"}', headers)
    assert status == 200, body
    assert json.loads(body) == {"score": 42}
    assert upstream.seen[-1]["path"] == "/api/v1/assess"
    assert upstream.seen[-1]["body"] == b'{"text": "hello"}'
    # The key must not travel on to the backend.
    assert key["key"] not in json.dumps(upstream.seen[-1]["headers"])

    status, body = _http(url, b"{}", {"Authorization": "Bearer not-a-key"})
    assert status == 401, body


def test_metrics_on_the_status_listener(container: Running) -> None:
    status, body = _http(f"http://127.0.0.1:{container.status}/metrics")
    assert status == 200
    text = body.decode()
    assert "gateway_requests_total" in text
    assert "gateway_upstream_duration_seconds" in text
    # Not on the public listener.
    status, _ = _http(f"http://127.0.0.1:{container.public}/metrics")
    assert status == 404


def test_stop_drains_in_flight_requests_and_exits_zero(
    container: Running, upstream: Upstream, image: str
) -> None:
    team = container.gateway("teams", "create", "image-drain")
    key = container.gateway("keys", "create", "--team", team["id"], "--name", "drain")
    container.gateway("credits", "grant", "--team", team["id"], "--amount", "5", "--reason", "ci")

    upstream.delay = 3.0
    upstream.arrived.clear()
    result: dict[str, Any] = {}

    def send() -> None:
        result["reply"] = _http(
            f"http://127.0.0.1:{container.public}/api/v1/assess",
            b"{}",
            {"Authorization": f"Bearer {key['key']}"},
            timeout=30,
        )

    sender = threading.Thread(target=send)
    sender.start()
    try:
        assert upstream.arrived.wait(15), "the request never reached the upstream"
        started = time.monotonic()
        container.podman.ok("stop", "--time", "40", container.name, timeout=60)
        stopped_in = time.monotonic() - started
    finally:
        sender.join(35)
        upstream.delay = 0.0
    assert result.get("reply", (None,))[0] == 200, result
    assert container.state("{{.State.Status}}") == "exited"
    assert container.state("{{.State.ExitCode}}") == "0"
    # Drained, not killed when --time ran out.
    assert stopped_in < 35
    logs = container.podman.run("logs", container.name).stderr
    print(f"\nstopped in {stopped_in:.1f} s; image {image}")
    assert "Traceback" not in logs
