import subprocess
import sys
from pathlib import Path

import pytest

from gateway.config import ConfigError, load_settings, settings_from_mapping
from gateway.deadlines import MAX_RESOLUTION

ROOT = Path(__file__).resolve().parents[1]


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "gw.yaml"
    path.write_text(text)
    return path


BASE = """
admin: {token: "a-long-enough-admin-token"}
upstreams:
  assess: {url: "http://127.0.0.1:8000"}
routes:
  - {path: /api/v1/assess, upstream: assess}
"""


def test_example_config_is_valid(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GATEWAY_ADMIN_TOKEN", "x" * 32)
    settings = load_settings(ROOT / "config" / "gateway.yaml")
    route = settings.routes[0]
    assert (route.path, route.methods, route.cost) == ("/api/v1/assess", ("POST",), 1)
    assert settings.storage_kind == "sqlite" and settings.limiter.kind == "memory"


def test_interpolation_with_defaults(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GW_PORT", "9999")
    monkeypatch.delenv("GW_UNSET", raising=False)
    path = write(
        tmp_path, BASE + 'listen: "127.0.0.1:${GW_PORT}"\nlimiter: "${GW_UNSET:-memory}"\n'
    )
    settings = load_settings(path)
    assert settings.listen == "127.0.0.1:9999"
    assert settings.limiter.url == "memory"


def test_unset_variable_is_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("GW_MISSING", raising=False)
    path = write(tmp_path, BASE + 'storage: "${GW_MISSING}"\n')
    with pytest.raises(ConfigError) as err:
        load_settings(path)
    assert str(path) in str(err.value)
    assert "storage" in str(err.value) and "GW_MISSING" in str(err.value)


@pytest.mark.parametrize(
    ("extra", "field", "problem"),
    [
        ("rate_limit: {per_minute: 0}\n", "rate_limit.per_minute", "greater than or equal to 1"),
        ("storage: mysql://x\n", "storage", "expected sqlite"),
        ("limiter: memcached\n", "limiter.url", "expected 'memory'"),
        ("listen: nowhere\n", "listen", "HOST:PORT"),
        ("colour: blue\n", "colour", "unknown field"),
        ("trusted_proxies: [not-an-ip]\n", "trusted_proxies", "not an IP"),
    ],
)
def test_errors_name_file_field_and_problem(
    tmp_path: Path, extra: str, field: str, problem: str
) -> None:
    path = write(tmp_path, BASE + extra)
    with pytest.raises(ConfigError) as err:
        load_settings(path)
    message = str(err.value)
    assert message.startswith(f"{path}: {field}")
    assert problem in message


def test_route_errors() -> None:
    raw = {
        "admin": {"token": "a-long-enough-admin-token"},
        "upstreams": {"a": {"url": "http://127.0.0.1:1"}},
        "routes": [{"path": "/x", "upstream": "missing"}],
    }
    with pytest.raises(ConfigError, match="names upstream 'missing'"):
        settings_from_mapping(raw)
    raw["routes"] = [{"path": "/x/../y", "upstream": "a"}]
    with pytest.raises(ConfigError, match=r"routes\[0\]\.path"):
        settings_from_mapping(raw)
    raw["routes"] = [{"path": "/x", "upstream": "a", "refund_on": ["2xx"]}]
    with pytest.raises(ConfigError, match="refund_on"):
        settings_from_mapping(raw)


def test_lease_must_outlast_the_longest_route() -> None:
    raw = {
        "admin": {"token": "a-long-enough-admin-token"},
        "credits": {"reservation_lease_seconds": 30},
        "upstreams": {"a": {"url": "http://127.0.0.1:1"}},
        "routes": [{"path": "/x", "upstream": "a", "max_duration_seconds": 60}],
    }
    with pytest.raises(ConfigError, match="reservation_lease_seconds"):
        settings_from_mapping(raw)
    # A reservation may go out while the Redis decision is under way (up to its
    # budget), and the exchange be cut up to MAX_RESOLUTION late: the lease allows
    # for both, and for each sweep being late.
    flush = 1.0
    budget = 0.5
    raw["limiter"] = {"url": "redis://127.0.0.1:6379", "timeout_seconds": budget}
    raw["credits"] = {
        "reservation_lease_seconds": 60 + flush + 0.01,
        "post_flush_interval_seconds": flush,
    }
    with pytest.raises(ConfigError, match=r"limiter\.timeout_seconds.*0\.1 s"):
        settings_from_mapping(raw)
    raw["credits"]["reservation_lease_seconds"] = 60 + flush + budget + 2 * MAX_RESOLUTION
    with pytest.raises(ConfigError, match="reservation_lease_seconds"):
        settings_from_mapping(raw)  # equal to the floor is not longer than it
    raw["credits"]["reservation_lease_seconds"] = 60 + flush + budget + 2 * MAX_RESOLUTION + 0.01
    assert settings_from_mapping(raw).lease_seconds == pytest.approx(61.61)


def test_admin_token_required_and_masked() -> None:
    with pytest.raises(ConfigError, match=r"admin\.token is required"):
        settings_from_mapping({})
    settings = settings_from_mapping({"admin": {"token": "a-long-enough-admin-token"}})
    assert "a-long-enough" not in repr(settings)
    # Management commands never open the admin listener: no token needed there.
    assert settings_from_mapping({}, serving=False).admin.token is None


def test_bad_yaml_names_line(tmp_path: Path) -> None:
    path = write(tmp_path, "listen: [unclosed\n")
    with pytest.raises(ConfigError, match=r"line \d+"):
        load_settings(path)


def test_check_config_command(tmp_path: Path) -> None:
    good = write(tmp_path, BASE)
    ok = subprocess.run(
        [sys.executable, "-m", "gateway.cli", "check-config", str(good)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert ok.returncode == 0, ok.stderr
    assert "OK" in ok.stdout
    bad = tmp_path / "bad.yaml"
    bad.write_text(BASE + "rate_limit: {per_minute: -5}\n")
    result = subprocess.run(
        [sys.executable, "-m", "gateway.cli", "check-config", str(bad)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 2
    assert f"{bad}: rate_limit.per_minute" in result.stderr
    assert "Traceback" not in result.stderr
