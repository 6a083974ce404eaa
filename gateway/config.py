"""Configuration: YAML with ``${VAR}`` interpolation, validated into frozen settings.

Every error names the file, the field and what was wrong, so that
``gateway check-config`` can be run in a deploy pipeline before anything ships.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
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
    "KeySettings",
    "LimiterSettings",
    "ListenAddress",
    "LoggingSettings",
    "MetricsSettings",
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

# Bounds of what the config (and the admin API, which imports them) accepts:
# what the storage backends can hold, and what makes sense to run. Every float
# read must also be finite (``allow_inf_nan=False`` below).
#
# A route's cost is reserved into PostgreSQL ``integer`` columns
# (reservations.amount and .charged, gateway_reserve's amounts); one over it
# fails the whole reservation batch it shares with other routes' requests.
MAX_COST = 2**31 - 1
# Per-key and per-team limits are PostgreSQL ``integer`` columns too, but the
# tighter bound is the Redis limiter's: it counts in whole microseconds, and
# at this rate requests are 60 us apart, so rounding stays under 2 %.
MAX_RATE_PER_MINUTE = 1_000_000
MAX_BURST = 1_000_000
# The longest an exchange may last, and any of its timeouts. A reservation
# holds a team's credits for as long (plus a margin), also when a gateway dies
# mid-request, so this is kept to a few days: anything longer is a job to
# poll, not a request to hold open. PostgreSQL itself would take far more
# (an interval holds about 2.9e5 years).
MAX_DURATION_SECONDS = 3 * 86_400
# Room above the longest exchange for the lease's required margin (seconds)
# and the default lease (the longest route plus a minute).
MAX_LEASE_SECONDS = MAX_DURATION_SECONDS + 3_600
# Background work (sweeps, roll-ups, idle connections): at least once a day.
MAX_INTERVAL_SECONDS = 86_400
# Ten years of history is what any retention setting may keep.
MAX_RETENTION_DAYS = 3_650

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


class _Frozen(BaseModel):
    # No inf or nan anywhere: either one slips past gt/le checks or turns into
    # a timer, a lease or a deadline that no backend can hold.
    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)


ListenAddress = tuple[str, int]


def parse_listen(value: str) -> ListenAddress:
    """Split ``host:port`` (``[v6]:port`` for IPv6) into its parts."""
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ValueError(f"expected HOST:PORT, got {value!r}")
    number = int(port)
    if not 0 <= number <= 65535:
        raise ValueError(f"port {number} is out of range 0-65535")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host, number


def _check_listen(value: str) -> str:
    parse_listen(value)
    return value


class StatusSettings(_Frozen):
    listen: str = "0.0.0.0:9091"
    _v = field_validator("listen")(_check_listen)


class AdminSettings(_Frozen):
    enabled: bool = True
    listen: str = "127.0.0.1:9090"
    token: SecretStr | None = None
    _v = field_validator("listen")(_check_listen)

    @field_validator("token")
    @classmethod
    def _token_strength(cls, value: SecretStr | None) -> SecretStr | None:
        if value is None or value.get_secret_value().strip() == "":
            return None
        if len(value.get_secret_value()) < 16:
            raise ValueError("the admin token must be at least 16 characters long")
        return value


class LimiterSettings(_Frozen):
    """Where rate-limit state lives; ``limiter: "redis://..."`` is short for ``{url: ...}``."""

    url: str = "memory"
    cluster: bool = False
    # Per-call budget for Redis: a slow Redis must not stall requests beyond it.
    # It is wall-clock time in the event loop, so it also covers the wait for a
    # turn on a busy process: too tight, and load alone looks like an outage.
    timeout_seconds: float = Field(default=0.25, gt=0, le=5)
    # When Redis is unreachable: decide in process (and report degraded), refuse
    # with 503, or let requests through unlimited.
    on_unavailable: Literal["fallback", "fail_closed", "fail_open"] = "fallback"
    # How often to try Redis again while falling back.
    retry_interval_seconds: float = Field(default=0.5, gt=0, le=60)

    @field_validator("url")
    @classmethod
    def _url(cls, value: str) -> str:
        if value == "memory" or value.startswith(("redis://", "rediss://")):
            return value
        raise ValueError("expected 'memory', redis://... or rediss://...")

    @property
    def kind(self) -> Literal["memory", "redis"]:
        return "memory" if self.url == "memory" else "redis"


class PostgresSettings(_Frozen):
    """Options for ``storage: postgresql://...``."""

    pool_min_size: int = Field(default=2, ge=1, le=1000)
    pool_max_size: int = Field(default=10, ge=1, le=1000)
    # 0 turns asyncpg's prepared-statement cache off (PgBouncer in transaction mode).
    statement_cache_size: int = Field(default=100, ge=0, le=100_000)
    # LISTEN needs a session of its own: a direct DSN when the pool goes through PgBouncer.
    listen_dsn: SecretStr | None = None
    command_timeout_seconds: float = Field(default=5.0, gt=0, le=600)
    # Run `gateway migrate` at start (else only check the schema is current).
    migrate_on_start: bool = True

    @field_validator("listen_dsn")
    @classmethod
    def _blank_is_unset(cls, value: SecretStr | None) -> SecretStr | None:
        # "${GATEWAY_POSTGRES_LISTEN_DSN:-}" in a manifest means "the pool's DSN".
        if value is None or value.get_secret_value().strip() == "":
            return None
        return value


class RateLimitSettings(_Frozen):
    per_minute: int = Field(default=60, ge=1, le=MAX_RATE_PER_MINUTE)
    burst: int | None = Field(default=None, ge=1, le=MAX_BURST)


class CreditSettings(_Frozen):
    test_environment: Literal["unlimited", "metered"] = "unlimited"
    reservation_lease_seconds: float | None = Field(default=None, gt=0, le=MAX_LEASE_SECONDS)
    on_lease_expiry: Literal["void", "post"] = "void"
    post_flush_interval_seconds: float = Field(default=0.25, gt=0, le=1.0)
    sweep_interval_seconds: float = Field(default=5.0, gt=0, le=3600)
    void_retry_seconds: float = Field(default=1.0, gt=0, le=60)
    # Resolved reservations older than this are rolled up into per-day rows, so
    # the ledger does not grow by a row per request forever (balances stay derivable).
    retention_days: int = Field(default=30, ge=1, le=MAX_RETENTION_DAYS)
    retention_interval_seconds: float = Field(default=3600.0, gt=0, le=MAX_INTERVAL_SECONDS)


class KeySettings(_Frozen):
    pepper: SecretStr | None = None
    cache_ttl_seconds: float = Field(default=60.0, gt=0, le=3600)
    cache_size: int = Field(default=200_000, ge=1)
    negative_cache_ttl_seconds: float = Field(default=5.0, gt=0, le=3600)
    negative_cache_size: int = Field(default=10_000, ge=1)
    invalidation_poll_seconds: float = Field(default=0.25, gt=0, le=1.0)


class IdentityHeaderSettings(_Frozen):
    prefix: str = "X-Gateway-"
    team: str = "X-Gateway-Team-Id"
    key: str = "X-Gateway-Key-Id"
    environment: str = "X-Gateway-Environment"


class UsageSettings(_Frozen):
    # Usage counters and last_used_at are written this often, in batches.
    flush_interval_seconds: float = Field(default=2.0, gt=0, le=60)
    # Client addresses seen per key and day (personal data: switchable, kept
    # for ip_retention_days), and refused credentials per prefix and address.
    client_ips: bool = True
    ip_retention_days: int = Field(default=30, ge=1, le=MAX_RETENTION_DAYS)
    auth_failure_retention_days: int = Field(default=30, ge=1, le=MAX_RETENTION_DAYS)


class RequestLogSettings(_Frozen):
    """The searchable request log (one row per request with a known key)."""

    enabled: bool = True
    retention_days: int = Field(default=30, ge=1, le=MAX_RETENTION_DAYS)
    # The oldest rows of a team beyond this are deleted first.
    max_rows_per_team: int = Field(default=1_000_000, ge=1, le=10**10)


class AnomalySettings(_Frozen):
    """Thresholds of the anomaly signals (see gateway/anomaly.py and the README)."""

    enabled: bool = True
    window_seconds: float = Field(default=60.0, gt=0, le=3600)
    baseline_windows: int = Field(default=30, ge=1, le=10_000)
    rate_spike_factor: float = Field(default=5.0, gt=1)
    rate_spike_min_requests: int = Field(default=60, ge=1)
    new_ips_threshold: int = Field(default=20, ge=1)
    # Client addresses are personal data: remembered no longer than any retention.
    new_ip_memory_seconds: float = Field(default=86400.0, gt=0, le=MAX_RETENTION_DAYS * 86_400)
    auth_failure_threshold: int = Field(default=20, ge=1)


class IdempotencySettings(_Frozen):
    # Answers larger than this are not kept; a replay of them answers 409.
    replay_cap_bytes: int = Field(default=1024 * 1024, ge=0, le=64 * 1024 * 1024)


class SecuritySettings(_Frozen):
    # Unknown keys (valid checksum, no such key) a client address may present per
    # minute before keys the cache does not know are refused from it (429) until
    # the budget refills; 0 = no limit. Valid keys never spend it.
    unknown_keys_per_minute_per_ip: int = Field(default=60, ge=0, le=MAX_RATE_PER_MINUTE)


class MetricsSettings(_Frozen):
    # Per-team series can take a Prometheus down (Kong's lesson): off unless asked,
    # and capped; teams past the cap are counted as "other".
    team_labels: bool = False
    team_label_limit: int = Field(default=100, ge=1, le=10_000)


class LoggingSettings(_Frozen):
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    format: Literal["json", "logfmt"] = "json"
    access_log: bool = True


class TracingSettings(_Frozen):
    """OpenTelemetry traces over OTLP/HTTP (protobuf); off unless switched on."""

    enabled: bool = False
    endpoint: str = "http://127.0.0.1:4318/v1/traces"
    # Share of requests traced when the client sent no sampled traceparent
    # (a client's sampling decision is followed either way).
    sample_ratio: float = Field(default=0.01, ge=0.0, le=1.0)
    service_name: str = Field(default="gateway", min_length=1, max_length=100)
    headers: dict[str, SecretStr] = {}
    # How long spans wait to be sent together; the export runs in its own thread.
    batch_delay_seconds: float = Field(default=1.0, gt=0.0, le=60.0)
    timeout_seconds: float = Field(default=5.0, gt=0.0, le=60.0)

    @field_validator("endpoint")
    @classmethod
    def _http_endpoint(cls, value: str) -> str:
        if not value.startswith(("http://", "https://")):
            raise ValueError("must be an http:// or https:// URL (OTLP over HTTP)")
        return value


class ShutdownSettings(_Frozen):
    # Fail /readyz, then wait this long so load balancers stop sending traffic.
    readiness_delay_seconds: float = Field(default=5.0, ge=0, le=600)
    # Then stop accepting and give in-flight requests this long to finish.
    drain_seconds: float = Field(default=30.0, ge=0, le=3600)


class PlanSettings(_Frozen):
    # How often each process looks for plans whose period turned (a refill is
    # idempotent by period key, so every replica and worker may look).
    refill_check_seconds: float = Field(default=30.0, gt=0, le=3600)
    # Shifts the clock plans read (periods, refills, next_refill_at): for
    # rehearsing a period boundary without waiting for it. 0 in production.
    clock_offset_seconds: float = Field(default=0.0, ge=-(10**9), le=10**9)


class WebhookSettings(_Frozen):
    # The delivery worker, on every process (each delivery is sent by one of them).
    enabled: bool = True
    # Endpoints on loopback, private, link-local (cloud metadata) or other
    # non-public addresses are refused unless this is true (tests, private nets).
    allow_private_addresses: bool = False
    poll_interval_seconds: float = Field(default=1.0, gt=0, le=60)
    timeout_seconds: float = Field(default=10.0, gt=0, le=60)
    # Waits between attempts (each ±20 %): the default tries for about 27 hours.
    retry_schedule_seconds: tuple[Annotated[float, Field(gt=0, le=7 * 86400)], ...] = Field(
        default=(5.0, 300.0, 1800.0, 7200.0, 18000.0, 36000.0, 36000.0), min_length=1
    )
    # An endpoint failing without a success for this long is disabled.
    disable_after_seconds: float = Field(default=86400.0, gt=0)
    concurrency: int = Field(default=16, ge=1, le=256)
    retention_days: int = Field(default=30, ge=1, le=3650)


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

    _v = field_validator("listen")(_check_listen)

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
