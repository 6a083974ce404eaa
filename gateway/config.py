"""Configuration: YAML with ``${VAR}`` interpolation, validated into frozen settings.

Every error names the file, the field and what was wrong, so that
``gateway check-config`` can be run in a deploy pipeline before anything ships.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    Field,
    SecretStr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from gateway.config_sections import (
    MAX_BURST,
    MAX_COST,
    MAX_DURATION_SECONDS,
    MAX_INTERVAL_SECONDS,
    MAX_LEASE_SECONDS,
    MAX_RATE_PER_MINUTE,
    MAX_RETENTION_DAYS,
    AdminSettings,
    AnomalySettings,
    CreditSettings,
    Frozen,
    IdempotencySettings,
    IdentityHeaderSettings,
    KeySettings,
    LimiterSettings,
    ListenAddress,
    LoggingSettings,
    MetricsSettings,
    PlanSettings,
    PostgresSettings,
    RateLimitSettings,
    RequestLogSettings,
    SecuritySettings,
    ShutdownSettings,
    StatusSettings,
    TracingSettings,
    UsageSettings,
    WebhookSettings,
    check_listen,
    parse_listen,
)

__all__ = [
    "MAX_BURST",
    "MAX_COST",
    "MAX_DURATION_SECONDS",
    "MAX_INTERVAL_SECONDS",
    "MAX_LEASE_SECONDS",
    "MAX_RATE_PER_MINUTE",
    "MAX_RESOLUTION",
    "MAX_RETENTION_DAYS",
    "AdminSettings",
    "AnomalySettings",
    "ConfigError",
    "CreditSettings",
    "IdempotencySettings",
    "IdentityHeaderSettings",
    "KeySettings",
    "LimiterSettings",
    "ListenAddress",
    "LoggingSettings",
    "MetricsSettings",
    "PlanSettings",
    "PostgresSettings",
    "RateLimitSettings",
    "RequestLogSettings",
    "RouteSettings",
    "SecuritySettings",
    "Settings",
    "ShutdownSettings",
    "StatusSettings",
    "TracingSettings",
    "UpstreamSettings",
    "UsageSettings",
    "WebhookSettings",
    "load_settings",
    "parse_listen",
    "settings_from_mapping",
]

DEFAULT_CONFIG_PATH = "config/gateway.yaml"
# The most an exchange deadline fires late: the coarsest sweep gateway.deadlines
# gives any limit. Defined here because validation bounds the lease with it and
# config imports nothing else of the gateway.
MAX_RESOLUTION = 0.05
_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-(.*?))?\}")
_PLAIN_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")
_STATUS_CLASS = re.compile(r"^[345]xx$|^[345]\d\d$")


class ConfigError(Exception):
    """A configuration problem, worded for the person who wrote the file."""


_Frozen = Frozen


class UpstreamSettings(_Frozen):
    url: str
    timeout_seconds: float = Field(default=30.0, gt=0, le=MAX_DURATION_SECONDS)
    read_timeout_seconds: float = Field(default=30.0, gt=0, le=MAX_DURATION_SECONDS)
    connect_timeout_seconds: float = Field(default=5.0, gt=0, le=MAX_DURATION_SECONDS)
    max_connections: int = Field(default=256, ge=1)
    keepalive_seconds: float = Field(default=15.0, gt=0, le=MAX_INTERVAL_SECONDS)
    headers: dict[str, SecretStr] = Field(default_factory=dict)
    # The connection layer: "lean" (gateway/upstream/, asyncio protocols and llhttp)
    # or "aiohttp" (its ClientSession, the fallback).
    client: Literal["lean", "aiohttp"] = "lean"
    # For https:// upstreams: a PEM file of the CAs to trust instead of the system's.
    ca_file: str | None = None

    @field_validator("url")
    @classmethod
    def _url(cls, value: str) -> str:
        if not re.match(r"^https?://[^/?#]+(/[^?#]*)?$", value):
            raise ValueError(f"expected an http:// or https:// URL without query, got {value!r}")
        return value.rstrip("/")


Method = Literal["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]


class RouteSettings(_Frozen):
    path: str
    methods: tuple[Method, ...] = ("POST",)
    upstream: str
    test_upstream: str | None = None
    cost: int = Field(default=1, ge=0, le=MAX_COST)
    auth: bool = True
    max_body_bytes: int = Field(default=10 * 1024 * 1024, ge=0)
    max_duration_seconds: float = Field(default=600.0, gt=0, le=MAX_DURATION_SECONDS)
    # Upstream answers that give the credit back; gateway 502/504 always do.
    refund_on: tuple[str, ...] = ("3xx", "4xx", "5xx")

    @field_validator("path")
    @classmethod
    def _path(cls, value: str) -> str:
        if not value.startswith("/"):
            raise ValueError("must start with '/'")
        trimmed = value.rstrip("/") or "/"
        segments = trimmed.split("/")[1:]
        if trimmed != "/" and any(s in ("", ".", "..") for s in segments):
            raise ValueError("must not contain empty, '.' or '..' segments")
        if "%" in value or "\\" in value or "?" in value or "#" in value:
            raise ValueError("must be a plain path without '%', '\\\\', '?' or '#'")
        return trimmed

    @field_validator("methods")
    @classmethod
    def _methods(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if not value:
            raise ValueError("must list at least one method")
        return tuple(dict.fromkeys(value))

    @field_validator("refund_on")
    @classmethod
    def _refund(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for item in value:
            if not _STATUS_CLASS.match(item):
                raise ValueError(
                    f"{item!r} is not a status class (3xx, 4xx, 5xx) or a 3xx-5xx status code"
                )
        return value


class Settings(_Frozen):
    listen: str = "0.0.0.0:8080"
    status: StatusSettings = StatusSettings()
    admin: AdminSettings = AdminSettings()
    storage: str = "sqlite:///gateway.db"
    limiter: LimiterSettings = LimiterSettings()
    postgres: PostgresSettings = PostgresSettings()
    rate_limit: RateLimitSettings = RateLimitSettings()
    credits: CreditSettings = CreditSettings()
    keys: KeySettings = KeySettings()
    trusted_proxies: tuple[str, ...] = ()
    identity_headers: IdentityHeaderSettings = IdentityHeaderSettings()
    logging: LoggingSettings = LoggingSettings()
    metrics: MetricsSettings = MetricsSettings()
    tracing: TracingSettings = TracingSettings()
    security: SecuritySettings = SecuritySettings()
    usage: UsageSettings = UsageSettings()
    request_log: RequestLogSettings = RequestLogSettings()
    idempotency: IdempotencySettings = IdempotencySettings()
    anomalies: AnomalySettings = AnomalySettings()
    upstreams: dict[str, UpstreamSettings] = Field(default_factory=dict)
    routes: tuple[RouteSettings, ...] = ()
    shutdown: ShutdownSettings = ShutdownSettings()
    plans: PlanSettings = PlanSettings()
    webhooks: WebhookSettings = WebhookSettings()

    _v = field_validator("listen")(check_listen)

    @field_validator("storage")
    @classmethod
    def _storage(cls, value: str) -> str:
        if value.startswith("sqlite:///") and len(value) > len("sqlite:///"):
            return value
        if value.startswith(("postgresql://", "postgres://")):
            return value
        raise ValueError(
            "expected sqlite:///relative.db, sqlite:////absolute.db or postgresql://..."
        )

    @field_validator("limiter", mode="before")
    @classmethod
    def _limiter(cls, value: Any) -> Any:
        return {"url": value} if isinstance(value, str) else value

    @field_validator("trusted_proxies")
    @classmethod
    def _proxies(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        import ipaddress

        for item in value:
            try:
                ipaddress.ip_network(item, strict=False)
            except ValueError as exc:
                raise ValueError(f"{item!r} is not an IP address or network") from exc
        return value

    @model_validator(mode="after")
    def _cross_checks(self, info: ValidationInfo) -> Settings:
        seen: set[tuple[str, str]] = set()
        for index, route in enumerate(self.routes):
            for name in (route.upstream, route.test_upstream):
                if name is not None and name not in self.upstreams:
                    raise ValueError(
                        f"routes[{index}] names upstream {name!r}, which is not under 'upstreams'"
                    )
            for method in route.methods:
                if (route.path, method) in seen:
                    raise ValueError(f"routes[{index}]: {method} {route.path} is declared twice")
                seen.add((route.path, method))
        lease = self.credits.reservation_lease_seconds
        if lease is not None:
            # A reservation may be sent while the Redis decision is out (up to its
            # budget, kept by a sweep up to MAX_RESOLUTION late) before the exchange
            # starts; an exchange is cut up to MAX_RESOLUTION after its
            # max_duration_seconds; its post then waits for the next flush.
            floor = (
                self.limiter.timeout_seconds
                + self.longest_route_seconds
                + 2 * MAX_RESOLUTION
                + self.credits.post_flush_interval_seconds
            )
            if lease <= floor:
                raise ValueError(
                    f"credits.reservation_lease_seconds ({lease:g}) must be longer than the "
                    f"longest route max_duration_seconds plus limiter.timeout_seconds, the "
                    f"post flush interval and {2 * MAX_RESOLUTION:g} s ({floor:g})"
                )
        serving = info.context is None or info.context.get("serving", True)
        if serving and self.admin.enabled and self.admin.token is None:
            raise ValueError(
                "admin.token is required while the admin listener is enabled "
                "(set GATEWAY_ADMIN_TOKEN, or admin.enabled: false)"
            )
        return self

    @property
    def storage_kind(self) -> Literal["sqlite", "postgresql"]:
        return "sqlite" if self.storage.startswith("sqlite:") else "postgresql"

    @property
    def longest_route_seconds(self) -> float:
        return max((r.max_duration_seconds for r in self.routes), default=600.0)

    @property
    def lease_seconds(self) -> float:
        """The reservation lease: configured, or the longest route plus a minute."""
        lease = self.credits.reservation_lease_seconds
        return lease if lease is not None else self.longest_route_seconds + 60.0


def _interpolate(node: Any, path: str, problems: list[str]) -> Any:
    if isinstance(node, str):

        def substitute(match: re.Match[str]) -> str:
            name, default = match.group(1), match.group(2)
            value = os.environ.get(name)
            if value is None or (value == "" and default is not None):
                if default is None:
                    problems.append(f"{path or '<root>'}: environment variable {name} is not set")
                    return ""
                return default
            return value

        return _VAR.sub(substitute, node)
    if isinstance(node, list):
        return [_interpolate(v, f"{path}[{i}]", problems) for i, v in enumerate(node)]
    if isinstance(node, dict):
        return {
            k: _interpolate(v, f"{path}.{k}" if path else str(k), problems) for k, v in node.items()
        }
    return node


def _field_path(location: tuple[int | str, ...]) -> str:
    out = ""
    for part in location:
        if isinstance(part, int):
            out += f"[{part}]"
        elif _PLAIN_NAME.match(part):
            out += f".{part}" if out else part
        else:  # a name no config has: shown quoted, so the message stays one line
            out += f"[{part!r}]"
    return out or "<root>"


def settings_from_mapping(
    raw: Mapping[str, Any], source: str = "<config>", *, serving: bool = True
) -> Settings:
    """Interpolate and validate an already-parsed mapping.

    ``serving=False`` is for management commands that never open the admin
    listener: they need no admin token, so an unset token variable is no error.
    """
    problems: list[str] = []
    data = _interpolate(dict(raw), "", problems)
    if not serving:
        problems = [p for p in problems if not p.startswith("admin.token:")]
    if problems:
        raise ConfigError("\n".join(f"{source}: {p}" for p in problems))
    try:
        return Settings.model_validate(data, context={"serving": serving})
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            where = _field_path(tuple(err["loc"]))
            message = err["msg"].removeprefix("Value error, ")
            if err["type"] == "extra_forbidden":
                message = "unknown field"
            lines.append(f"{source}: {where}: {message}")
        raise ConfigError("\n".join(lines)) from None


def load_settings(path: str | os.PathLike[str], *, serving: bool = True) -> Settings:
    """Read, interpolate and validate a YAML config file."""
    source = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{source}: file not found") from None
    except OSError as exc:
        raise ConfigError(f"{source}: cannot be read ({exc.strerror})") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        problem = getattr(exc, "problem", None) or "not valid YAML"
        raise ConfigError(f"{source}: {where}{problem}") from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: the top level must be a mapping of settings")
    return settings_from_mapping(raw, source, serving=serving)
