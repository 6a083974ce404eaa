"""The configuration's bounds and its self-contained sections (usage, logs, tracing,
plans, webhooks...), re-exported by :mod:`gateway.config`; like it, a leaf."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator

__all__ = [
    "MAX_BURST",
    "MAX_COST",
    "MAX_DURATION_SECONDS",
    "MAX_INTERVAL_SECONDS",
    "MAX_LEASE_SECONDS",
    "MAX_RATE_PER_MINUTE",
    "MAX_RETENTION_DAYS",
    "AdminSettings",
    "AnomalySettings",
    "CreditSettings",
    "Frozen",
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
    "SecuritySettings",
    "ShutdownSettings",
    "StatusSettings",
    "TracingSettings",
    "UsageSettings",
    "WebhookSettings",
    "check_listen",
    "parse_listen",
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


class Frozen(BaseModel):
    # No inf or nan anywhere: either one slips past gt/le checks or turns into
    # a timer, a lease or a deadline that no backend can hold.
    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)


_Frozen = Frozen


class UsageSettings(_Frozen):
    # Usage counters, last_used_at and the request log are written this often, in
    # batches. Small batches often: at 2 s a request-log COPY of ~1,000 rows put its
    # WAL ahead of the reserves' commits (enforced p99 8.7 ms at 500 req/s, 6.6 at
    # 0.25 s, 7.1 with the log off; docs/benchmarks.md), at no cost in throughput.
    flush_interval_seconds: float = Field(default=0.25, gt=0, le=60)
    # Client addresses seen per key and day (personal data: switchable, kept
    # for ip_retention_days), and refused credentials per prefix and address.
    client_ips: bool = True
    ip_retention_days: int = Field(default=30, ge=1, le=MAX_RETENTION_DAYS)
    auth_failure_retention_days: int = Field(default=30, ge=1, le=MAX_RETENTION_DAYS)
    # Usage counted per minute is kept per hour after this (totals unchanged): a busy
    # key writes a row a minute and outcome, some 1,500 a day, forever otherwise.
    minute_retention_days: int = Field(default=30, ge=1, le=MAX_RETENTION_DAYS)


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


def check_listen(value: str) -> str:
    parse_listen(value)
    return value


class StatusSettings(_Frozen):
    listen: str = "0.0.0.0:9091"
    _v = field_validator("listen")(check_listen)


class AdminSettings(_Frozen):
    enabled: bool = True
    listen: str = "127.0.0.1:9090"
    token: SecretStr | None = None
    _v = field_validator("listen")(check_listen)

    @field_validator("token")
    @classmethod
    def _token_strength(cls, value: SecretStr | None) -> SecretStr | None:
        if value is None or value.get_secret_value().strip() == "":
            return None
        if len(value.get_secret_value()) < 16:
            raise ValueError("the admin token must be at least 16 characters long")
        return value
