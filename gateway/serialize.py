"""JSON shapes of admin resources, shared by the admin API, the CLI's ``--json`` and the console."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from gateway.manage import iso
from gateway.models import ApiKey, AuditEntry, LedgerEntry, Team, TeamToken
from gateway.storage import LoggedRequest

__all__ = ["audit_json", "key_json", "ledger_json", "request_json", "team_json", "token_json"]


def team_json(team: Team) -> dict[str, Any]:
    return {
        "id": team.id,
        "name": team.name,
        "created_at": iso(team.created_at),
        "rate_limit_per_minute": team.rate_limit_per_minute,
        "quota_per_day": team.quota_per_day,
        "quota_per_month": team.quota_per_month,
    }


def key_status(key: ApiKey, now: float) -> str:
    if key.revoked_at is not None:
        return "revoked"
    if key.disabled:
        return "disabled"
    if key.expires_at is not None and key.expires_at <= now:
        return "expired"
    return "active"


def key_json(key: ApiKey, now: float | None = None) -> dict[str, Any]:
    import time

    return {
        "id": key.id,
        "team": key.team_id,
        "name": key.name,
        "prefix": key.prefix,
        "environment": key.environment,
        "rate_limit_per_minute": key.rate_limit_per_minute,
        "disabled": key.disabled,
        "status": key_status(key, time.time() if now is None else now),
        "created_at": iso(key.created_at),
        "last_used_at": iso(key.last_used_at),
        "expires_at": iso(key.expires_at),
        "revoked_at": iso(key.revoked_at),
        "credit_cap_per_day": key.credit_cap_per_day,
        "credit_cap_per_month": key.credit_cap_per_month,
        "quota_per_day": key.quota_per_day,
        "quota_per_month": key.quota_per_month,
    }


def token_json(token: TeamToken) -> dict[str, Any]:
    return {
        "id": token.id,
        "team": token.team_id,
        "name": token.name,
        "prefix": token.prefix,
        "created_at": iso(token.created_at),
        "last_used_at": iso(token.last_used_at),
        "revoked_at": iso(token.revoked_at),
    }


def ledger_json(entry: LedgerEntry) -> dict[str, Any]:
    return {
        "id": entry.id,
        "environment": entry.environment,
        "kind": entry.kind,
        "amount": entry.amount,
        "reason": entry.reason,
        "reservation": entry.reservation_id,
        "created_at": iso(entry.created_at),
    }


def audit_json(entry: AuditEntry) -> dict[str, Any]:
    return {
        "id": entry.id,
        "at": iso(entry.at),
        "actor": entry.actor,
        "action": entry.action,
        "target": entry.target,
        "team": entry.team_id,
        "client_ip": entry.client_ip,
        "details": entry.details,
    }


def request_json(row: LoggedRequest) -> dict[str, Any]:
    """A request log row as the admin API and ``gateway requests --json`` show it."""
    e = row.entry
    moment = datetime.fromtimestamp(e.at, UTC).isoformat(timespec="milliseconds")
    return {
        "id": row.id,
        "time": moment.replace("+00:00", "Z"),
        "request_id": e.request_id,
        "key_id": e.key_id,
        "key_prefix": e.key_prefix,
        "environment": e.environment,
        "method": e.method,
        "route": e.route,
        "path": e.path,
        "status": e.status,
        "outcome": e.outcome,
        "credits": e.credits,
        "client_ip": e.client_ip,
        "user_agent": e.user_agent,
        "duration_ms": e.duration_ms,
    }
