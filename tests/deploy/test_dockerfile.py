"""The Dockerfile, read the way BuildKit reads it (no container engine runs here)."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import dockerfile
import pytest

from gateway.config import parse_listen

from ._support import CONFIG_DIR, KUSTOMIZATIONS, REPO, load_yaml, render

DOCKERFILE = REPO / "Dockerfile"
DOCKERIGNORE = REPO / ".dockerignore"


@pytest.fixture(scope="module")
def commands() -> tuple[dockerfile.Command, ...]:
    # The parser BuildKit itself uses, compiled in: a syntax error raises here.
    parsed: tuple[dockerfile.Command, ...] = dockerfile.parse_file(str(DOCKERFILE))
    return parsed


def stages(commands: tuple[dockerfile.Command, ...]) -> list[list[dockerfile.Command]]:
    out: list[list[dockerfile.Command]] = []
    for command in commands:
        if command.cmd == "FROM":
            out.append([])
        if out:
            out[-1].append(command)
    return out


def global_args(commands: tuple[dockerfile.Command, ...]) -> dict[str, str]:
    args: dict[str, str] = {}
    for command in commands:
        if command.cmd == "FROM":
            break
        if command.cmd == "ARG":
            name, _, default = command.value[0].partition("=")
            args[name] = default
    return args


def only(stage: list[dockerfile.Command], cmd: str) -> dockerfile.Command:
    found = [c for c in stage if c.cmd == cmd]
    assert found, f"no {cmd} in the final stage"
    # Docker keeps the last one; more than one would be a confusing leftover.
    assert len(found) == 1, f"{cmd} appears {len(found)} times"
    return found[0]


def test_multi_stage_build_from_a_slim_official_python(
    commands: tuple[dockerfile.Command, ...],
) -> None:
    builds = stages(commands)
    assert len(builds) >= 2
    args = global_args(commands)
    bases = [re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], s[0].value[0]) for s in builds]
    assert re.fullmatch(r"python:3\.(1[1-9])-slim(-\w+)?", bases[-1]), bases[-1]
    builder = builds[0][0].value[2]
    assert builds[0][0].value[1].upper() == "AS"
    # The builder makes the wheels; the runtime takes them, not the source tree.
    assert any(c.cmd == "RUN" and "pip wheel" in c.value[0] for c in builds[0])
    runtime = builds[-1]
    takes = [
        c
        for c in runtime
        if (c.cmd == "RUN" and any(f"from={builder}" in f for f in c.flags))
        or (c.cmd == "COPY" and f"--from={builder}" in c.flags)
    ]
    assert takes, "the runtime stage must take its files from the builder"
    copied = [c.value[0] for c in runtime if c.cmd == "COPY" and not c.flags]
    assert copied == ["deploy/config/edge.yaml"], "only runtime files in the final image"


def test_runs_as_a_non_root_numeric_user_matching_the_manifests(
    commands: tuple[dockerfile.Command, ...],
) -> None:
    user = only(stages(commands)[-1], "USER").value[0]
    uid, _, gid = user.partition(":")
    # Numeric, so Kubernetes' runAsNonRoot can verify it without reading /etc/passwd.
    assert uid.isdigit() and int(uid) != 0
    assert not gid or (gid.isdigit() and int(gid) != 0)
    for shape, directory in KUSTOMIZATIONS.items():
        for doc in render(directory):
            if doc["kind"] in ("Deployment", "Job"):
                context = doc["spec"]["template"]["spec"]["securityContext"]
                assert context["runAsUser"] == int(uid), shape
                if gid:
                    assert context["runAsGroup"] == int(gid), shape


def test_entrypoint_command_ports_and_stop_signal(commands: tuple[dockerfile.Command, ...]) -> None:
    from gateway.cli import _parser

    final = stages(commands)[-1]
    entrypoint = only(final, "ENTRYPOINT")
    cmd = only(final, "CMD")
    assert entrypoint.json and entrypoint.value == ("gateway",)
    assert cmd.json and cmd.value == ("run", "--config", "/etc/gateway/gateway.yaml")
    parsed = _parser().parse_args(list(cmd.value))
    assert parsed.command == "run" and parsed.config == "/etc/gateway/gateway.yaml"
    assert only(final, "STOPSIGNAL").value == ("SIGTERM",)

    # The baked config is the edge config, where CMD and GATEWAY_CONFIG look for it.
    copy = next(c for c in final if c.cmd == "COPY" and not c.flags)
    assert copy.value == ("deploy/config/edge.yaml", "/etc/gateway/gateway.yaml")
    env = [c.value for c in final if c.cmd == "ENV"]
    assert any(v[i : i + 2] == ("GATEWAY_CONFIG", cmd.value[2]) for v in env for i in range(len(v)))

    raw = load_yaml(CONFIG_DIR / "edge.yaml")
    ports = {
        parse_listen(raw["listen"])[1],
        parse_listen(raw["status"]["listen"])[1],
        parse_listen(raw["admin"]["listen"])[1],
    }
    assert {int(p) for p in only(final, "EXPOSE").value} == ports


def test_no_curl_or_wget_anywhere(commands: tuple[dockerfile.Command, ...]) -> None:
    for command in commands:
        assert not re.search(r"\b(curl|wget)\b", " ".join(command.value)), command.original


def test_healthcheck_hits_status_healthz_with_python(
    commands: tuple[dockerfile.Command, ...],
) -> None:
    check = only(stages(commands)[-1], "HEALTHCHECK")
    assert check.json, "exec form: no shell needed, signals go straight to python"
    assert check.value[:2] == ("CMD", "python")
    assert "http://127.0.0.1:9091/healthz" in check.value[-1]
    flags = dict(f.removeprefix("--").split("=", 1) for f in check.flags)
    assert {"interval", "timeout", "start-period", "retries"} <= set(flags)


class _Status(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        code = 200 if self.path == "/healthz" else 503
        self.send_response(code)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def status_server() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Status)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def test_healthcheck_command_exit_code_follows_the_answer(
    commands: tuple[dockerfile.Command, ...], status_server: str
) -> None:
    # Run the very command Docker would run, with a local stand-in for /healthz.
    argv = list(only(stages(commands)[-1], "HEALTHCHECK").value[1:])
    argv[0] = sys.executable

    def exit_code(url: str) -> int:
        env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
        env["GATEWAY_HEALTHCHECK_URL"] = url
        return subprocess.run(
            argv, capture_output=True, timeout=10, env=env, check=False
        ).returncode

    assert exit_code(f"{status_server}/healthz") == 0
    assert exit_code(f"{status_server}/failing") != 0
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed = probe.getsockname()[1]
    assert exit_code(f"http://127.0.0.1:{closed}/healthz") != 0


# -- .dockerignore --------------------------------------------------------------------


def _pattern_regex(pattern: str) -> re.Pattern[str]:
    # Docker's rules (moby/patternmatcher): filepath.Match plus "**" for any
    # number of directories.
    out = ""
    i = 0
    while i < len(pattern):
        c = pattern[i]
        if pattern.startswith("**/", i):
            out += "(?:.*/)?"
            i += 3
            continue
        if pattern.startswith("**", i):
            out += ".*"
            i += 2
            continue
        if c == "*":
            out += "[^/]*"
        elif c == "?":
            out += "[^/]"
        elif c == "[":
            end = pattern.index("]", i)
            out += pattern[i : end + 1]
            i = end
        else:
            out += re.escape(c)
        i += 1
    return re.compile(out)


def ignored(path: str, patterns: list[str]) -> bool:
    """Whether the build context leaves ``path`` out (the last matching pattern wins)."""
    parts = path.split("/")
    result = False
    for raw in patterns:
        negate = raw.startswith("!")
        pattern = os.path.normpath(raw.removeprefix("!")).lstrip("/")
        regex = _pattern_regex(pattern)
        depth = pattern.count("/") + 1
        # A pattern also matches everything below a directory it matches.
        matched = bool(regex.fullmatch(path)) or (
            depth < len(parts) and bool(regex.fullmatch("/".join(parts[:depth])))
        )
        if matched:
            result = not negate
    return result


def dockerignore_patterns() -> list[str]:
    lines = DOCKERIGNORE.read_text(encoding="utf-8").splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


def test_dockerignore_lets_in_exactly_what_the_dockerfile_copies(
    commands: tuple[dockerfile.Command, ...],
) -> None:
    patterns = dockerignore_patterns()
    sources: list[Path] = []
    for command in commands:
        if command.cmd == "COPY" and not any(f.startswith("--from") for f in command.flags):
            sources += [REPO / s for s in command.value[:-1]]
    files = []
    for source in sources:
        if source.is_dir():
            files += [
                p
                for p in source.rglob("*")
                if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyc"
            ]
        else:
            files.append(source)
    assert any(f.suffix == ".py" for f in files)
    for file in files:
        relative = file.relative_to(REPO).as_posix()
        assert not ignored(relative, patterns), f"{relative} is copied but left out of the context"

    for kept_out in (
        ".git/HEAD",
        ".venv/bin/python",
        ".env",
        "tests/conftest.py",
        "gateway.db",
        "gateway/__pycache__/app.cpython-311.pyc",
        "deploy/config/sidecar.yaml",
        "deploy/kubernetes/base/deployment.yaml",
    ):
        assert ignored(kept_out, patterns), f"{kept_out} would be sent to the builder"
