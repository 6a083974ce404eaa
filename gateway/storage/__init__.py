"""The store (teams, keys, change feed) and the ledger (credits), as protocols.

The pipeline, admin API and CLI import only these; ``gateway.app`` and the CLI
pick a backend by the ``storage`` URL through :func:`gateway.storage.registry.open_backend`.
This module holds the core Protocols and re-exports the rest (the credit ledger in
:mod:`gateway.storage.ledger`, usage and the request log in
:mod:`gateway.storage.usage`, plans in :mod:`gateway.storage.plans`,
events and webhooks in :mod:`gateway.storage.events`) and the types they speak in
(:mod:`gateway.storage.types`); the rules both backends apply live in
:mod:`gateway.storage.rules`, the row mappers in :mod:`gateway.storage.rows`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Protocol, runtime_checkable

from gateway.models import (
    ApiKey,
    AuditEntry,
    Environment,
    KeyRecord,
    Team,
    TeamToken,
)
from gateway.storage.events import EventStore
from gateway.storage.ledger import Ledger
from gateway.storage.plans import PlanStore
from gateway.storage.quotas import QuotaCount, QuotaStore, QuotaTake
from gateway.storage.types import (
    IDEMPOTENCY_TTL_SECONDS,
    KEY_FIELDS,
    KEY_LIMIT_FIELDS,
    MAX_BALANCE,
    Audit,
    AuditRecord,
    AuthFailureCount,
    CapPeriods,
    Conflict,
    EventRecord,
    ExpiryPolicy,
    GrantResult,
    IdempotencyClaim,
    IdempotencyRecord,
    IdempotencyState,
    InvalidData,
    KeyChange,
    KeyIpDay,
    KeyReused,
    KeyUsage,
    LoggedRequest,
    Mismatch,
    NotFound,
    RequestEntry,
    RequestQuery,
    ReserveRequest,
    ReserveResult,
    StorageError,
    StorageUnavailable,
    UsageBucket,
)
from gateway.storage.usage import RequestLogStore, UsageStore

__all__ = [
    "IDEMPOTENCY_TTL_SECONDS",
    "KEY_FIELDS",
    "KEY_LIMIT_FIELDS",
    "MAX_BALANCE",
    "AdminStore",
    "Audit",
    "AuditRecord",
    "AuthFailureCount",
    "Backend",
    "CapPeriods",
    "Conflict",
    "EventRecord",
    "EventStore",
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
    "Ledger",
    "LoggedRequest",
    "Mismatch",
    "NotFound",
    "PlanStore",
    "PushesKeyChanges",
    "QuotaCount",
    "QuotaStore",
    "QuotaTake",
    "RequestEntry",
    "RequestLogStore",
    "RequestQuery",
    "ReserveRequest",
    "ReserveResult",
    "StorageError",
    "StorageUnavailable",
    "Store",
    "UsageBucket",
    "UsageStore",
]


class Store(Protocol):
    """Teams, keys and the change feed that keeps key caches honest.

    Every mutating method here, in :class:`AdminStore` and ``Ledger.apply_grant``
    takes ``audit``: called with what the change made, inside its transaction,
    its :class:`AuditRecord` is written in that transaction (none when the call
    changed nothing, as a replayed grant).
    """

    async def find_key(self, key_hash: str) -> KeyRecord | None: ...

    async def key_changes_since(self, seq: int) -> tuple[int, list[KeyChange], bool]:
        """Changes after ``seq``: (latest seq, changes, whether some were already pruned)."""
        ...

    async def latest_key_change(self) -> int: ...

    async def create_team(
        self,
        name: str,
        rate_limit_per_minute: int | None = None,
        *,
        audit: Audit[Team] | None = None,
    ) -> Team: ...

    async def get_team(self, id_or_name: str) -> Team: ...

    async def list_teams(self, limit: int, after: str | None) -> list[Team]: ...

    async def create_key(
        self,
        team_id: str,
        name: str,
        environment: Environment,
        key_hash: str,
        prefix: str,
        rate_limit_per_minute: int | None,
        expires_at: float | None,
        *,
        limits: Mapping[str, int | None] | None = None,
        audit: Audit[ApiKey] | None = None,
    ) -> ApiKey: ...

    async def get_key(self, key_id: str) -> ApiKey: ...

    async def list_keys(self, team_id: str, limit: int, after: str | None) -> list[ApiKey]: ...

    async def revoke_key(self, key_id: str, *, audit: Audit[ApiKey] | None = None) -> ApiKey: ...

    async def find_key_id_by_hash(self, key_hash: str) -> str | None: ...

    async def find_key_hash_by_id(self, key_id: str) -> str | None:
        """The stored hash of a key, revoked or not (it never changes); None when there is none.

        What a process that changes a key by id needs to drop that key from its own cache.
        """
        ...

    async def update_team(
        self, team_id: str, rate_limit_per_minute: int | None, *, audit: Audit[Team] | None = None
    ) -> Team:
        """Set (or, with None, clear) the team's limit; key caches hear of a change."""
        ...

    async def update_team_quotas(
        self,
        team_id: str,
        quota_per_day: int | None,
        quota_per_month: int | None,
        *,
        audit: Audit[Team] | None = None,
    ) -> Team:
        """Set (or clear) the team's calendar request quotas; key caches hear of a change."""
        ...

    async def update_key(
        self, key_id: str, changes: Mapping[str, object], *, audit: Audit[ApiKey] | None = None
    ) -> ApiKey:
        """Change the given fields of :data:`KEY_FIELDS` only; None clears a nullable one.

        NotFound for an unknown key, Conflict for a revoked one, ValueError for a
        field outside :data:`KEY_FIELDS`. A change of what authentication reads
        (limit, expiry, disabled) reaches the key caches; a new name does not
        need to.
        """
        ...

    async def rotate_key(
        self,
        key_id: str,
        new_hash: str,
        new_prefix: str,
        old_expires_at: float,
        *,
        audit: Audit[ApiKey] | None = None,
    ) -> ApiKey:
        """In one transaction: a new key like the old one, and the old one expiring.

        The new key has the old one's team, name, environment and limit, is
        enabled and never expires; the old key's ``expires_at`` becomes the
        earlier of its own and ``old_expires_at``. Conflict if the old key is
        revoked (or ``new_hash`` exists). Returns the new key.
        """
        ...


class AdminStore(Protocol):
    """Team-scoped management tokens and the audit log of the admin API."""

    async def create_token(
        self,
        team_id: str,
        name: str,
        token_hash: str,
        prefix: str,
        *,
        audit: Audit[TeamToken] | None = None,
    ) -> TeamToken: ...

    async def list_tokens(self, team_id: str, limit: int, after: str | None) -> list[TeamToken]: ...

    async def get_token(self, token_id: str) -> TeamToken: ...

    async def revoke_token(
        self, token_id: str, *, audit: Audit[TeamToken] | None = None
    ) -> TeamToken: ...

    async def find_token(self, token_hash: str) -> TeamToken | None:
        """The token with this hash, revoked or not; None when there is none."""
        ...

    async def list_audit(
        self, team_id: str | None, limit: int, before: int | None
    ) -> list[AuditEntry]:
        """Newest first; ids below ``before``; one team's entries, or all (None)."""
        ...


class Backend(
    Store,
    AdminStore,
    UsageStore,
    RequestLogStore,
    Ledger,
    PlanStore,
    EventStore,
    QuotaStore,
    Protocol,
):
    """One database holding both; owns its connections."""

    async def open(self) -> None: ...

    async def close(self) -> None: ...

    async def migrate(self) -> list[int]: ...

    async def ping(self) -> None: ...


@runtime_checkable
class PushesKeyChanges(Protocol):
    """A backend that announces key changes as they commit (PostgreSQL ``LISTEN/NOTIFY``).

    A backend without it is polled through :meth:`Store.key_changes_since`.
    """

    async def listen_key_changes(
        self,
        on_change: Callable[[KeyChange], None],
        on_connected: Callable[[], None],
        on_lost: Callable[[], None],
    ) -> None:
        """Follow key changes as they commit, until cancelled."""
        ...
