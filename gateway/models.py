"""Plain values shared by the pipeline, the backends, the admin API and the CLI."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import Literal

__all__ = [
    "ApiKey",
    "AuditEntry",
    "Environment",
    "KeyLimits",
    "KeyRecord",
    "LedgerEntry",
    "Outcome",
    "Team",
    "TeamToken",
    "UsageRow",
]

Environment = Literal["live", "test"]


class Outcome(StrEnum):
    """One per request, for metrics, usage and logs (contract §1)."""

    OK = "ok"
    CLIENT_ERROR = "client_error"
    UPSTREAM_ERROR = "upstream_error"
    UNAUTHORIZED = "unauthorized"
    RATE_LIMITED = "rate_limited"
    INSUFFICIENT_CREDITS = "insufficient_credits"
    PAYLOAD_TOO_LARGE = "payload_too_large"
    BAD_REQUEST = "bad_request"
    NOT_FOUND = "not_found"
    REPLAYED = "replayed"
    UNAVAILABLE = "unavailable"


@dataclass(frozen=True, slots=True)
class Team:
    id: str
    name: str
    created_at: float
    rate_limit_per_minute: int | None = None
    quota_per_day: int | None = None
    quota_per_month: int | None = None


@dataclass(frozen=True, slots=True)
class KeyLimits:
    """A key's calendar limits (UTC days and calendar months), with its team's quotas.

    Spend caps are credits one key may spend per period, enforced in the
    reserve; quotas are requests admitted per period, beside the rate limit.
    A key with none of them carries no ``KeyLimits`` at all (``None``).
    """

    credit_cap_per_day: int | None = None
    credit_cap_per_month: int | None = None
    quota_per_day: int | None = None
    quota_per_month: int | None = None
    team_quota_per_day: int | None = None
    team_quota_per_month: int | None = None

    @property
    def capped(self) -> bool:
        return self.credit_cap_per_day is not None or self.credit_cap_per_month is not None

    @property
    def has_quota(self) -> bool:
        return (
            self.quota_per_day is not None
            or self.quota_per_month is not None
            or self.team_quota_per_day is not None
            or self.team_quota_per_month is not None
        )


@dataclass(frozen=True, slots=True)
class KeyRecord:
    """What authentication needs about a key; cached in process."""

    id: str
    team_id: str
    prefix: str
    environment: Environment
    rate_limit_per_minute: int | None
    team_rate_limit_per_minute: int | None
    disabled: bool
    expires_at: float | None
    revoked_at: float | None
    # Caps and quotas; None for the (usual) key without any, so it costs 8 bytes.
    limits: KeyLimits | None = None
    # When this process's key cache read it (its clock); not part of the key.
    # Kept here rather than beside it: a (record, time) pair per key costs 56 bytes.
    loaded_at: float = field(default=0.0, compare=False)

    def usable_at(self, now: float) -> bool:
        if self.disabled or self.revoked_at is not None:
            return False
        return self.expires_at is None or now < self.expires_at


@dataclass(frozen=True, slots=True)
class ApiKey:
    """A key as listed to its owners: never the secret, never the hash."""

    id: str
    team_id: str
    name: str
    prefix: str
    environment: Environment
    rate_limit_per_minute: int | None
    disabled: bool
    created_at: float
    last_used_at: float | None
    expires_at: float | None
    revoked_at: float | None
    credit_cap_per_day: int | None = None
    credit_cap_per_month: int | None = None
    quota_per_day: int | None = None
    quota_per_month: int | None = None


@dataclass(frozen=True, slots=True)
class LedgerEntry:
    """A credit entry ("c<n>": grant, adjust), a reservation ("r<id>": reserve,
    post, void, expire_void, expire_post) or a plan entry ("p<n>": refill, expire;
    the period key as its reason), as the team's ledger history lists it."""

    id: str
    team_id: str
    environment: Environment
    kind: str
    amount: int  # signed: what it did to the balance (a reservation: minus held or charged)
    reason: str | None
    reservation_id: str | None
    created_at: float
    cursor: str  # opaque: pass as ``before`` for the entries after this one


@dataclass(frozen=True, slots=True)
class TeamToken:
    """A team-scoped management token as listed: never the secret, never the hash."""

    id: str
    team_id: str
    name: str
    prefix: str
    created_at: float
    last_used_at: float | None
    revoked_at: float | None


@dataclass(frozen=True, slots=True)
class AuditEntry:
    """One admin action: who (admin or a team token), what, when, from where."""

    id: int
    at: float
    actor: str  # "admin", "cli", or "token:<token id>"
    action: str  # e.g. "key.create", "credits.grant"
    target: str | None  # the id acted on
    team_id: str | None
    client_ip: str | None
    details: dict[str, object]


@dataclass(frozen=True, slots=True)
class UsageRow:
    """Requests and credits of one key in one minute with one outcome."""

    minute: int  # unix seconds, a multiple of 60
    team_id: str
    key_id: str
    environment: Environment
    outcome: str
    requests: int
    credits: int
