"""The values and errors the storage Protocols speak in (re-exported by :mod:`gateway.storage`)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Literal, NamedTuple, TypeVar

import orjson

from gateway.models import Environment

__all__ = [
    "IDEMPOTENCY_TTL_SECONDS",
    "KEY_FIELDS",
    "KEY_LIMIT_FIELDS",
    "MAX_BALANCE",
    "Audit",
    "AuditRecord",
    "AuthFailureCount",
    "CapPeriods",
    "Conflict",
    "EventRecord",
    "ExpiryPolicy",
    "GrantResult",
    "IdempotencyClaim",
    "IdempotencyRecord",
    "IdempotencyState",
    "InvalidData",
    "KeyChange",
    "KeyIpDay",
    "KeyReused",
    "KeyUsage",
    "LoggedRequest",
    "Mismatch",
    "NotFound",
    "RequestEntry",
    "RequestQuery",
    "ReserveRequest",
    "ReserveResult",
    "StorageError",
    "StorageUnavailable",
    "UsageBucket",
]

_R = TypeVar("_R")


@dataclass(frozen=True, slots=True)
class EventRecord:
    """An event to write: its type, the team it is for, what it says.

    ``dedupe_key`` makes a write idempotent (an anomaly two replicas both saw,
    a key's expiry found by every worker): a second event with the same key is
    not written.
    """

    type: str
    team_id: str
    data: Mapping[str, object]
    dedupe_key: str | None = None

    def data_json(self) -> str:
        return orjson.dumps(dict(self.data)).decode()


@dataclass(frozen=True, slots=True)
class AuditRecord:
    """One audit entry, written by the store in the same transaction as its change.

    The management service says what the entry holds; the store only writes it,
    so a change and its entry commit together or not at all, and a replay (which
    changes nothing) writes none.
    """

    actor: str
    action: str
    target: str | None
    team_id: str | None
    client_ip: str | None
    details: Mapping[str, object]
    # What the change tells webhook endpoints, written in the same transaction.
    events: tuple[EventRecord, ...] = ()

    def values(self) -> tuple[str | None, ...]:
        """(actor, action, target, team_id, client_ip, details as JSON text), as inserted."""
        details = orjson.dumps(dict(self.details)).decode()
        return (self.actor, self.action, self.target, self.team_id, self.client_ip, details)


# What a mutating store method is given to audit its change: it is called, inside
# the transaction, with what the change made (the new key, the grant's result...),
# because an entry often names what only the change knows (a new id).
Audit = Callable[[_R], AuditRecord]

# A key's calendar limits (credits, then requests, per period): nullable integers.
KEY_LIMIT_FIELDS = (
    "credit_cap_per_day",
    "credit_cap_per_month",
    "quota_per_day",
    "quota_per_month",
)
# What update_key may change; anything else is refused (ValueError).
KEY_FIELDS = frozenset(
    {"name", "rate_limit_per_minute", "expires_at", "disabled", *KEY_LIMIT_FIELDS}
)

ExpiryPolicy = Literal["void", "post"]

# How long an Idempotency-Key is remembered: a record older than this counts as
# absent (and may be overwritten by a new claim) on every backend.
IDEMPOTENCY_TTL_SECONDS = 86_400.0

# No balance grows past this (a grant that would is a Conflict): balance plus
# any grant then stays far inside a signed 64-bit integer on both backends.
MAX_BALANCE = 10**15


class StorageError(Exception):
    """Base of the errors a backend raises on purpose."""


class NotFound(StorageError):
    """No such team, key, token or reservation."""


class Conflict(StorageError):
    """The change contradicts the stored state (duplicate name, balance below zero...)."""


class KeyReused(Conflict):
    """An Idempotency-Key already used for a different request (the caller answers 422)."""


class StorageUnavailable(StorageError):
    """The database could not be reached; the caller answers 503."""


class InvalidData(StorageError):
    """The database refused a value it was given (not UTF-8, out of range, a constraint).

    Unlike :class:`StorageUnavailable`, the same call would be refused again.
    """


@dataclass(frozen=True, slots=True)
class KeyChange:
    """One entry of the change feed the key cache follows."""

    seq: int
    key_hash: str | None
    team_id: str | None


@dataclass(frozen=True, slots=True)
class IdempotencyClaim:
    """A client's ``Idempotency-Key`` on a charged request, claimed with its reservation.

    Scoped to the team and environment of the request.
    """

    key: str  # the client's Idempotency-Key, 1-255 visible ASCII
    method: str
    path: str


IdempotencyState = Literal["in_flight", "completed"]


@dataclass(frozen=True, slots=True)
class IdempotencyRecord:
    """What an earlier attempt under the same key left: in flight, or its answer."""

    state: IdempotencyState
    method: str
    path: str
    body_hash: str | None  # hex SHA-256 of the first attempt's request body (completed only)
    status: int | None  # the first attempt's status (completed only)
    content_type: str | None
    body: bytes | None  # the first attempt's response body; None if it was over the replay cap
    body_stored: bool  # False when the body was too large to keep


@dataclass(frozen=True, slots=True)
class CapPeriods:
    """The periods a capped key's reservation counts in: a UTC day and a calendar month.

    Period keys name them (``day:2026-12-05``, ``month:2026-12-01``; see
    :func:`gateway.caps.cap_periods`). The caps themselves are the ledger's to
    read, from the key as it stands when the reservation is made: the gateway
    only says that a key has caps and when "now" is.
    """

    day: str
    month: str


@dataclass(frozen=True, slots=True)
class ReserveRequest:
    reservation_id: str
    team_id: str
    environment: Environment
    key_id: str
    amount: int
    idempotency: IdempotencyClaim | None = None
    # Set for a key with a spend cap: the reserve then also checks and counts it.
    caps: CapPeriods | None = None


@dataclass(frozen=True, slots=True)
class ReserveResult:
    granted: bool
    # The balance after this reservation when granted, the balance seen when refused;
    # for a capped key, the smaller of that and what its caps have left.
    available: int
    # The record of an earlier attempt under the same Idempotency-Key: then
    # nothing was reserved (granted is False) and the caller answers from it.
    replay: IdempotencyRecord | None = None


@dataclass(frozen=True, slots=True)
class GrantResult:
    """A grant's answer: the balance right after it, and whether it was a replay."""

    balance: int
    replayed: bool


@dataclass(frozen=True, slots=True)
class Mismatch:
    """A balance that does not equal the sum of its ledger."""

    team_id: str
    environment: Environment
    stored: int
    derived: int
    # Set for a key's spend in one period (key_spend) that differs from its reservations.
    key_id: str | None = None
    period: str | None = None


# The usage reads' rows. NamedTuples, not dataclasses: a row is still the tuple
# it was (tests and callers compare whole rows), and its fields have names.


class UsageBucket(NamedTuple):
    """Requests and credits of one outcome in one bucket of :meth:`UsageStore.usage_buckets`."""

    start: int  # the bucket's first minute, epoch seconds
    outcome: str
    requests: int
    credits: int


class KeyUsage(NamedTuple):
    """One key's requests and credits over a range (:meth:`UsageStore.usage_top_keys`)."""

    key_id: str
    requests: int
    credits: int


class KeyIpDay(NamedTuple):
    """Requests of one key from one client address on one day (:meth:`UsageStore.key_ips`)."""

    day: int  # the day's first second, UTC
    key_id: str
    client_ip: str
    requests: int


class AuthFailureCount(NamedTuple):
    """Refusals by prefix, address and reason (:meth:`UsageStore.auth_failure_counts`)."""

    key_prefix: str  # "" when what was presented had no readable prefix
    client_ip: str
    reason: str
    failures: int


# The request log (see RequestLogStore).


class RequestEntry(NamedTuple):
    """One request as the request log keeps it (client text already made safe and bounded)."""

    at: float  # when it finished, epoch seconds
    team_id: str
    key_id: str
    key_prefix: str
    environment: str
    request_id: str
    method: str
    route: str
    path: str
    status: int
    outcome: str
    credits: int
    client_ip: str
    user_agent: str
    duration_ms: float


class LoggedRequest(NamedTuple):
    """A request log row: its id (a page cursor's half) and what was kept."""

    id: int
    entry: RequestEntry


@dataclass(frozen=True, slots=True)
class RequestQuery:
    """What a search of one team's request log asks for; None is "any"."""

    team_id: str
    limit: int
    key_id: str | None = None
    status: int | None = None
    # An inclusive range such as (400, 499) for "4xx"; ignored when status is set.
    status_range: tuple[int, int] | None = None
    outcome: str | None = None
    client_ip: str | None = None  # one address, or a network in CIDR notation
    path_prefix: str | None = None
    since: float | None = None  # at >= since
    until: float | None = None  # at < until
    before: tuple[float, int] | None = None  # (at, id) of the last row of the page before
    # Oldest first instead (an export reads forward); ``before`` is then the
    # (at, id) of the last row read, and rows after it come next.
    oldest_first: bool = False
