import asyncio
import copy
import subprocess
import sys
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Union, get_args, get_origin

import pytest
from pydantic import BaseModel

from gateway.config import (
    MAX_BURST,
    MAX_COST,
    MAX_DURATION_SECONDS,
    MAX_INTERVAL_SECONDS,
    MAX_LEASE_SECONDS,
    MAX_RATE_PER_MINUTE,
    MAX_RETENTION_DAYS,
    ConfigError,
    RouteSettings,
    Settings,
    UpstreamSettings,
    load_settings,
    settings_from_mapping,
)
from gateway.deadlines import MAX_RESOLUTION
from tests.storage.conftest import databases, postgres_admin_dsn, postgres_dsn, postgres_template

from .conftest import MakeGateway, bearer

__all__ = ["databases", "postgres_admin_dsn", "postgres_dsn", "postgres_template"]

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
        ("tracing: {endpoint: 'grpc://127.0.0.1:4317'}\n", "tracing.endpoint", "http://"),
        ("tracing: {sample_ratio: 1.5}\n", "tracing.sample_ratio", "less than or equal to 1"),
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


# Bounds: every value the config accepts must fit the storage backends (a cost
# over a PostgreSQL integer failed every reservation of its batch; a lease out of
# interval range failed every charged request) and be finite.

RAW: dict[str, Any] = {
    "admin": {"token": "a-long-enough-admin-token"},
    "upstreams": {"assess": {"url": "http://127.0.0.1:8000"}},
    "routes": [{"path": "/api/v1/assess", "upstream": "assess"}],
}


def _with(path: tuple[str | int, ...], value: object) -> dict[str, Any]:
    raw = copy.deepcopy(RAW)
    node: Any = raw
    for part in path[:-1]:
        node = node.setdefault(part, {}) if isinstance(node, dict) else node[part]
    node[path[-1]] = value
    return raw


def _dotted(path: tuple[str | int, ...]) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else part)
    return out


def _is_float(annotation: Any) -> bool:
    if annotation is float:
        return True
    if get_origin(annotation) in (Union, types.UnionType):
        return float in get_args(annotation)
    return False


def _float_fields(
    model: type[BaseModel], prefix: tuple[str | int, ...] = ()
) -> Iterator[tuple[str | int, ...]]:
    """Every float the config reads, found from the models (so a new one is covered too)."""
    for name, info in model.model_fields.items():
        annotation = info.annotation
        if _is_float(annotation):
            yield (*prefix, name)
        elif isinstance(annotation, type) and issubclass(annotation, BaseModel):
            yield from _float_fields(annotation, (*prefix, name))
    if model is Settings:
        yield from _float_fields(UpstreamSettings, ("upstreams", "assess"))
        yield from _float_fields(RouteSettings, ("routes", 0))


FLOAT_FIELDS = list(_float_fields(Settings))


def test_float_fields_are_found() -> None:
    found = {_dotted(p) for p in FLOAT_FIELDS}
    assert {
        "routes[0].max_duration_seconds",
        "upstreams.assess.timeout_seconds",
        "credits.reservation_lease_seconds",
        "limiter.timeout_seconds",
    } <= found


@pytest.mark.parametrize("value", [float("inf"), float("-inf"), float("nan")], ids=repr)
@pytest.mark.parametrize("path", FLOAT_FIELDS, ids=_dotted)
def test_every_float_refuses_inf_and_nan(path: tuple[str | int, ...], value: float) -> None:
    with pytest.raises(ConfigError) as err:
        settings_from_mapping(_with(path, value), "gw.yaml")
    assert f"gw.yaml: {_dotted(path)}: " in str(err.value)
    assert "finite number" in str(err.value)


@pytest.mark.parametrize(
    ("path", "largest"),
    [
        (("routes", 0, "cost"), MAX_COST),
        (("rate_limit", "per_minute"), MAX_RATE_PER_MINUTE),
        (("rate_limit", "burst"), MAX_BURST),
        (("security", "unknown_keys_per_minute_per_ip"), MAX_RATE_PER_MINUTE),
        (("routes", 0, "max_duration_seconds"), MAX_DURATION_SECONDS),
        (("upstreams", "assess", "timeout_seconds"), MAX_DURATION_SECONDS),
        (("upstreams", "assess", "read_timeout_seconds"), MAX_DURATION_SECONDS),
        (("upstreams", "assess", "connect_timeout_seconds"), MAX_DURATION_SECONDS),
        (("upstreams", "assess", "keepalive_seconds"), MAX_INTERVAL_SECONDS),
        (("credits", "reservation_lease_seconds"), MAX_LEASE_SECONDS),
        (("credits", "retention_interval_seconds"), MAX_INTERVAL_SECONDS),
        (("credits", "retention_days"), MAX_RETENTION_DAYS),
        (("anomalies", "new_ip_memory_seconds"), MAX_RETENTION_DAYS * 86_400),
    ],
    ids=lambda v: _dotted(v) if isinstance(v, tuple) else str(v),
)
def test_bounds_accept_the_maximum_and_refuse_beyond(
    path: tuple[str | int, ...], largest: float
) -> None:
    settings = settings_from_mapping(_with(path, largest), "gw.yaml")
    assert settings.model_dump(mode="python") is not None
    over = largest + 1
    with pytest.raises(ConfigError) as err:
        settings_from_mapping(_with(path, over), "gw.yaml")
    assert str(err.value).startswith(f"gw.yaml: {_dotted(path)}: ")
    assert f"less than or equal to {largest}" in str(err.value)


@pytest.mark.parametrize(
    ("extra", "field", "problem"),
    [
        # The values of issue 15, as an operator would write them.
        (
            "  - {path: /big, upstream: assess, cost: 2147483648}\n",
            "routes[1].cost",
            "less than or equal to 2147483647",
        ),
        (
            "  - {path: /long, upstream: assess, max_duration_seconds: 1e15}\n",
            "routes[1].max_duration_seconds",
            "less than or equal to",
        ),
        (
            "  - {path: /inf, upstream: assess, max_duration_seconds: .inf}\n",
            "routes[1].max_duration_seconds",
            "finite number",
        ),
        (
            "credits: {reservation_lease_seconds: .nan}\n",
            "credits.reservation_lease_seconds",
            "finite number",
        ),
        (
            "credits: {reservation_lease_seconds: .inf}\n",
            "credits.reservation_lease_seconds",
            "finite number",
        ),
        (
            "limiter: {url: 'redis://127.0.0.1:6379', timeout_seconds: .nan}\n",
            "limiter.timeout_seconds",
            "finite number",
        ),
    ],
    ids=["cost", "duration", "duration-inf", "lease-nan", "lease-inf", "limiter-nan"],
)
def test_yaml_values_beyond_the_backends_are_refused(
    tmp_path: Path, extra: str, field: str, problem: str
) -> None:
    # Routes last in BASE: a route line appended here is the second route.
    text = BASE + extra if extra.startswith("  -") else extra + BASE
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as err:
        load_settings(path)
    message = str(err.value)
    assert message.startswith(f"{path}: {field}: "), message
    assert problem in message
    assert "\n" not in message


def test_the_longest_route_still_gets_a_default_lease() -> None:
    raw = _with(("routes", 0, "max_duration_seconds"), MAX_DURATION_SECONDS)
    assert settings_from_mapping(raw).lease_seconds <= MAX_LEASE_SECONDS
    # And an explicit lease can still outlast the longest route allowed.
    raw["credits"] = {"reservation_lease_seconds": MAX_LEASE_SECONDS}
    assert settings_from_mapping(raw).lease_seconds == MAX_LEASE_SECONDS


async def test_the_largest_cost_reserves_and_posts_on_postgresql(
    make_gateway: MakeGateway, postgres_dsn: str
) -> None:
    route = {
        "path": "/api/v1/assess",
        "methods": ["POST"],
        "upstream": "assess",
        "cost": MAX_COST,
        "max_duration_seconds": MAX_DURATION_SECONDS,
    }
    gw = await make_gateway(
        storage=postgres_dsn,
        routes=[route],
        credits={
            "post_flush_interval_seconds": 0.05,
            "reservation_lease_seconds": MAX_LEASE_SECONDS,
        },
    )
    # Two of the largest reservations at once (one batch, when they meet), posted
    # together: more than a PostgreSQL integer in sum, each exactly one.
    key = await gw.key(credits=2 * MAX_COST + 1)
    answers = await asyncio.gather(
        *(gw.client.post("/api/v1/assess", headers=bearer(key), data=b"{}") for _ in range(2))
    )
    assert [resp.status for resp in answers] == [200, 200]
    remaining = sorted(int(resp.headers["X-Credits-Remaining"]) for resp in answers)
    assert remaining == [1, MAX_COST + 1]
    await gw.assert_reconciled()
    assert await gw.balance() == 1
    # One more cannot be paid for: refused with the exact figures, nothing else.
    resp = await gw.client.post("/api/v1/assess", headers=bearer(key), data=b"{}")
    assert resp.status == 402
    assert await resp.json() == {
        "error": "Insufficient credits",
        "credits_required": MAX_COST,
        "credits_available": 1,
    }
