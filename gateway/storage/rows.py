"""Rows → models, written once for both backends.

``sqlite3.Row`` and ``asyncpg.Record`` both read a column as ``row["name"]``,
and both backends hand times over as epoch seconds (PostgreSQL through the
pool's ``timestamptz`` codec), so one mapper serves both. SQLite stores
booleans as 0/1: every flag goes through ``bool()``.
"""

from __future__ import annotations

from typing import Any, Protocol

import orjson

from gateway.models import ApiKey, AuditEntry, KeyLimits, KeyRecord, LedgerEntry, Team, TeamToken
from gateway.plans import Plan
from gateway.storage import (
    KEY_LIMIT_FIELDS,
    AuthFailureCount,
    IdempotencyRecord,
    KeyChange,
    KeyIpDay,
    KeyUsage,
    LoggedRequest,
    Mismatch,
    RequestEntry,
    UsageBucket,
)
from gateway.storage.rules import encode_ledger_cursor

__all__ = [
    "CACHED_KEY_FIELDS",
    "KEY_COLUMNS",
    "KEY_RECORD_COLUMNS",
    "PLAN_COLUMNS",
    "TEAM_COLUMNS",
    "TOKEN_COLUMNS",
    "Row",
    "api_key",
    "audit",
    "auth_failure_count",
    "idempotency_record",
    "key_change",
    "key_ip_day",
    "key_record",
    "key_usage",
    "ledger_entry",
    "logged_request",
    "mismatches",
    "plan",
    "spend_mismatches",
    "team",
    "token",
    "usage_bucket",
]

KEY_COLUMNS = (
    "id, team_id, name, prefix, environment, rate_limit_per_minute, disabled, "
    "created_at, last_used_at, expires_at, revoked_at, credit_cap_per_day, "
    "credit_cap_per_month, quota_per_day, quota_per_month"
)
# What authentication reads of a key ("k") and its team ("t"), for key_record().
KEY_RECORD_COLUMNS = (
    "k.id, k.team_id, k.prefix, k.environment, k.rate_limit_per_minute, k.disabled, "
    "k.expires_at, k.revoked_at, t.rate_limit_per_minute AS team_limit, "
    "k.credit_cap_per_day, k.credit_cap_per_month, k.quota_per_day, k.quota_per_month, "
    "t.quota_per_day AS team_quota_per_day, t.quota_per_month AS team_quota_per_month"
)
TOKEN_COLUMNS = "id, team_id, name, prefix, created_at, last_used_at, revoked_at"  # noqa: S105
TEAM_COLUMNS = "id, name, rate_limit_per_minute, created_at, quota_per_day, quota_per_month"
PLAN_COLUMNS = (
    "team_id, environment, allowance, period, anchor_day, rollover, max_balance, current_period"
)
# What a key cache holds of a key besides its hash: a change of one of these
# must reach the caches (the PostgreSQL trigger compares the same columns).
CACHED_KEY_FIELDS = ("rate_limit_per_minute", "disabled", "expires_at", *KEY_LIMIT_FIELDS)


class Row(Protocol):
    """A result row read by column name: ``sqlite3.Row`` or ``asyncpg.Record``."""

    def __getitem__(self, key: Any, /) -> Any: ...


def team(row: Row) -> Team:
    return Team(
        row["id"],
        row["name"],
        row["created_at"],
        row["rate_limit_per_minute"],
        row["quota_per_day"],
        row["quota_per_month"],
    )


def api_key(row: Row) -> ApiKey:
    return ApiKey(
        id=row["id"],
        team_id=row["team_id"],
        name=row["name"],
        prefix=row["prefix"],
        environment=row["environment"],
        rate_limit_per_minute=row["rate_limit_per_minute"],
        disabled=bool(row["disabled"]),
        created_at=row["created_at"],
        last_used_at=row["last_used_at"],
        expires_at=row["expires_at"],
        revoked_at=row["revoked_at"],
        credit_cap_per_day=row["credit_cap_per_day"],
        credit_cap_per_month=row["credit_cap_per_month"],
        quota_per_day=row["quota_per_day"],
        quota_per_month=row["quota_per_month"],
    )


def key_record(row: Row) -> KeyRecord:
    """What authentication needs of a key (``team_limit``: its team's limit)."""
    return KeyRecord(
        id=row["id"],
        team_id=row["team_id"],
        prefix=row["prefix"],
        environment=row["environment"],
        rate_limit_per_minute=row["rate_limit_per_minute"],
        team_rate_limit_per_minute=row["team_limit"],
        disabled=bool(row["disabled"]),
        expires_at=row["expires_at"],
        revoked_at=row["revoked_at"],
        limits=key_limits(row),
    )


_LIMIT_COLUMNS = (*KEY_LIMIT_FIELDS, "team_quota_per_day", "team_quota_per_month")


def key_limits(row: Row) -> KeyLimits | None:
    """A key's caps and quotas (with its team's), or None when it has none (most keys)."""
    values = [row[c] for c in _LIMIT_COLUMNS]
    if all(v is None for v in values):
        return None
    return KeyLimits(*values)


def token(row: Row) -> TeamToken:
    return TeamToken(
        id=row["id"],
        team_id=row["team_id"],
        name=row["name"],
        prefix=row["prefix"],
        created_at=row["created_at"],
        last_used_at=row["last_used_at"],
        revoked_at=row["revoked_at"],
    )


def audit(row: Row) -> AuditEntry:
    return AuditEntry(
        id=row["id"],
        at=row["at"],
        actor=row["actor"],
        action=row["action"],
        target=row["target"],
        team_id=row["team_id"],
        client_ip=row["client_ip"],
        details=orjson.loads(row["details"]),
    )


def idempotency_record(row: Row, prefix: str = "") -> IdempotencyRecord:
    """The record in ``row``; ``prefix`` names its columns (``replay_`` in a reserve result)."""
    return IdempotencyRecord(
        state=row[prefix + "state"],
        method=row[prefix + "method"],
        path=row[prefix + "path"],
        body_hash=row[prefix + "body_hash"],
        status=row[prefix + "status"],
        content_type=row[prefix + "content_type"],
        body=row[prefix + "body"],
        body_stored=bool(row[prefix + "body_stored"]),
    )


def plan(row: Row) -> Plan:
    max_balance = row["max_balance"]
    return Plan(
        row["team_id"],
        row["environment"],
        int(row["allowance"]),
        row["period"],
        int(row["anchor_day"]),
        row["rollover"],
        None if max_balance is None else int(max_balance),
        row["current_period"],
    )


def key_change(row: Row) -> KeyChange:
    return KeyChange(int(row["seq"]), row["key_hash"], row["team_id"])


def ledger_entry(row: Row, team_id: str) -> LedgerEntry:
    return LedgerEntry(
        id=row["entry_id"],
        team_id=team_id,
        environment=row["environment"],
        kind=row["kind"],
        amount=int(row["amount"]),
        reason=row["reason"],
        reservation_id=row["reservation_id"],
        created_at=row["created_at"],
        cursor=encode_ledger_cursor(row["created_at"], row["entry_id"]),
    )


def mismatches(rows: list[Any]) -> list[Mismatch]:
    """The accounts of a reconcile query (:data:`gateway.storage.sql.RECONCILE`) that differ."""
    return [
        Mismatch(r["team_id"], r["environment"], int(r["stored"]), int(r["derived"]))
        for r in rows
        if int(r["stored"]) != int(r["derived"])
    ]


def spend_mismatches(rows: list[Any]) -> list[Mismatch]:
    """The key spends of :data:`gateway.storage.sql.KEY_SPEND_RECONCILE` (all differ)."""
    return [
        Mismatch(
            r["team_id"],
            r["environment"],
            int(r["stored"]),
            int(r["derived"]),
            key_id=r["key_id"],
            period=r["period_key"],
        )
        for r in rows
    ]


# The usage reads select their columns in the order of their row type; sums come
# back as Decimal or int depending on the dialect, hence int().


def usage_bucket(row: Row) -> UsageBucket:
    return UsageBucket(int(row[0]), row[1], int(row[2]), int(row[3]))


def key_usage(row: Row) -> KeyUsage:
    return KeyUsage(row[0], int(row[1]), int(row[2]))


def key_ip_day(row: Row) -> KeyIpDay:
    return KeyIpDay(int(row[0]), row[1], row[2], int(row[3]))


def auth_failure_count(row: Row) -> AuthFailureCount:
    return AuthFailureCount(row[0], row[1], row[2], int(row[3]))


def logged_request(row: Row) -> LoggedRequest:
    """A request log row selected as sql.REQUEST_LOG_COLUMNS."""
    return LoggedRequest(
        int(row[0]),
        RequestEntry(
            float(row[1]), row[2], row[3], row[4], row[5], row[6], row[7], row[8], row[9],
            int(row[10]), row[11], int(row[12]), row[13], row[14], float(row[15]),
        ),
    )  # fmt: skip
