"""The laptop stack: deploy/compose/compose.yaml against the Compose Specification.

The schema is the one check-jsonschema ships (its vendored copy of the
compose-spec project's compose-spec.json), used through its command line, so
nothing is vendored here and nothing is fetched at test time.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Any

import pytest

from gateway.cli import main
from gateway.config import load_settings, parse_listen

from ._support import COMPOSE_FILE, PROMETHEUS_DIR, REPO, load_yaml, run, use_only

_INTERPOLATION = re.compile(r"\$\{(\w+)(?:(:?[-?])([^}]*))?\}")


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data: dict[str, Any] = load_yaml(COMPOSE_FILE)
    return data


def interpolate(value: str) -> str:
    """Compose's own ${VAR:-default}, as on a laptop where none of them is set."""

    def substitute(match: re.Match[str]) -> str:
        name, op, word = match.groups()
        if op in (":-", "-"):
            return word
        raise AssertionError(f"{name} has no default: `docker compose up` would need it set")

    return _INTERPOLATION.sub(substitute, value)


def environment(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment", {})
    assert isinstance(env, dict), "environment as a mapping, so it reads like the docs"
    return {k: interpolate(str(v)) for k, v in env.items()}


def mounted(service: dict[str, Any], target: str) -> Path:
    for volume in service.get("volumes", []):
        source, destination = volume.split(":")[:2]
        if destination == target:
            return (COMPOSE_FILE.parent / source).resolve()
    raise AssertionError(f"nothing mounted at {target}")


def test_validates_against_the_compose_specification() -> None:
    result = run(
        [sys.executable, "-m", "check_jsonschema", "--builtin-schema", "vendor.compose-spec",
         str(COMPOSE_FILE)]
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_services_a_laptop_needs(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert {"gateway", "postgres", "redis", "upstream", "migrate", "prometheus"} <= set(services)
    # One image, built from the repository's Dockerfile, for everything of ours.
    ours = [s for s in services.values() if "build" in s]
    assert {s["image"] for s in ours} == {services["gateway"]["image"]}
    for service in ours:
        context = (COMPOSE_FILE.parent / service["build"]["context"]).resolve()
        assert context == REPO
        assert (context / service["build"]["dockerfile"]).is_file()


def test_gateway_waits_for_the_one_shot_migration(compose: dict[str, Any]) -> None:
    services = compose["services"]
    gateway, migrate = services["gateway"], services["migrate"]
    assert gateway["depends_on"]["migrate"] == {"condition": "service_completed_successfully"}
    assert migrate["command"][0] == "migrate"
    assert migrate["restart"] == "no"
    assert migrate["depends_on"]["postgres"]["condition"] == "service_healthy"
    # The same database and config as the gateway it prepares.
    assert environment(migrate)["GATEWAY_STORAGE"] == environment(gateway)["GATEWAY_STORAGE"]
    assert mounted(migrate, "/etc/gateway/gateway.yaml") == mounted(
        gateway, "/etc/gateway/gateway.yaml"
    )


def test_demo_upstream_is_what_the_gateway_forwards_to(
    compose: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    services = compose["services"]
    upstream = services["upstream"]
    assert upstream["entrypoint"] == ["python", "-m", "gateway.demo_upstream"]
    assert upstream["command"] == ["--host", "0.0.0.0", "--port", "8000"]
    assert "ports" not in upstream, "only the gateway may reach it"
    gateway = services["gateway"]
    use_only(monkeypatch, environment(gateway))
    settings = load_settings(mounted(gateway, "/etc/gateway/gateway.yaml"))
    assert settings.upstreams["assess"].url == "http://upstream:8000"


def test_gateway_config_passes_check_config_with_the_compose_environment(
    compose: dict[str, Any], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    for name in ("gateway", "migrate"):
        service = compose["services"][name]
        config = mounted(service, "/etc/gateway/gateway.yaml")
        with monkeypatch.context() as mp:
            use_only(mp, environment(service))
            main(["check-config", str(config)])
        assert "OK" in capsys.readouterr().out


def test_ports_published_on_loopback_and_shutdown_has_time(
    compose: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    gateway = compose["services"]["gateway"]
    use_only(monkeypatch, environment(gateway))
    settings = load_settings(mounted(gateway, "/etc/gateway/gateway.yaml"))
    published = {}
    for service in compose["services"].values():
        for port in service.get("ports", []):
            host, host_port, container_port = port.split(":")
            assert host == "127.0.0.1", f"{port}: a laptop stack listens on loopback only"
            published[int(host_port)] = int(container_port)
    assert published[8080] == parse_listen(settings.listen)[1]
    assert published[9091] == parse_listen(settings.status.listen)[1]
    grace = int(gateway["stop_grace_period"].removesuffix("s"))
    shutdown = settings.shutdown
    assert grace > shutdown.readiness_delay_seconds + shutdown.drain_seconds


def test_prometheus_scrapes_the_gateway_service(compose: dict[str, Any]) -> None:
    prometheus = compose["services"]["prometheus"]
    assert mounted(prometheus, "/etc/prometheus") == PROMETHEUS_DIR
    config = load_yaml(PROMETHEUS_DIR / "prometheus.yml")
    (job,) = [j for j in config["scrape_configs"] if j["job_name"] == "gateway"]
    (target,) = job["static_configs"][0]["targets"]
    raw = load_yaml(mounted(compose["services"]["gateway"], "/etc/gateway/gateway.yaml"))
    assert target == f"gateway:{parse_listen(raw['status']['listen'])[1]}"


def test_every_bind_mount_exists(compose: dict[str, Any]) -> None:
    for name, service in compose["services"].items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (COMPOSE_FILE.parent / source).exists(), f"{name}: {source}"
