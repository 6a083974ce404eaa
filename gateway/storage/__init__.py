"""The store (teams, keys, change feed) and the ledger (credits), as protocols.

The pipeline, admin API and CLI import only these; ``gateway.app`` and the CLI
pick a backend by the ``storage`` URL through :func:`open_backend`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, Protocol

from gateway.models import ApiKey, Environment, KeyRecord, LedgerEntry, Team

if TYPE_CHECKING:
    from gateway.config import PostgresSettings

__all__ = [
    "Backend",
    "Conflict",
    "KeyChange",
    "Ledger",
    "Mismatch",
    "NotFound",
    "ReserveRequest",
    "ReserveResult",
    "StorageError",
    "StorageUnavailable",
    "Store",
]

ExpiryPolicy = Literal["void", "post"]


class StorageError(Exception):
    """Base of the errors a backend raises on purpose."""


class NotFound(StorageError):
    """No such team, key, token or reservation."""


class Conflict(StorageError):
    """The change contradicts the stored state (duplicate name, balance below zero...)."""


class StorageUnavailable(StorageError):
    """The database could not be reached; the caller answers 503."""


@dataclass(frozen=True, slots=True)
class KeyChange:
    """One entry of the change feed the key cache follows."""

    seq: int
    key_hash: str | None
    team_id: str | None


@dataclass(frozen=True, slots=True)
class ReserveRequest:
    reservation_id: str
    team_id: str
    environment: Environment
    key_id: str
    amount: int


@dataclass(frozen=True, slots=True)
class ReserveResult:
    granted: bool
    # The balance after this reservation when granted, the balance seen when refused.
    available: int


@dataclass(frozen=True, slots=True)
class Mismatch:
    """A balance that does not equal the sum of its ledger."""

    team_id: str
    environment: Environment
    stored: int
    derived: int


class Store(Protocol):
    """Teams, keys and the change feed that keeps key caches honest."""

    async def find_key(self, key_hash: str) -> KeyRecord | None: ...

    async def key_changes_since(self, seq: int) -> tuple[int, list[KeyChange], bool]:
        """Changes after ``seq``: (latest seq, changes, whether some were already pruned)."""
        ...

    async def latest_key_change(self) -> int: ...

    async def create_team(self, name: str, rate_limit_per_minute: int | None = None) -> Team: ...

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
    ) -> ApiKey: ...

    async def get_key(self, key_id: str) -> ApiKey: ...

    async def list_keys(self, team_id: str, limit: int, after: str | None) -> list[ApiKey]: ...

    async def revoke_key(self, key_id: str) -> ApiKey: ...

    async def find_key_id_by_hash(self, key_hash: str) -> str | None: ...


class Ledger(Protocol):
    """The two-phase credit ledger: reserve, then post or void, exactly once."""

    async def reserve_batch(self, requests: Sequence[ReserveRequest]) -> list[ReserveResult]: ...

    async def post_batch(self, posts: Sequence[tuple[str, int]]) -> int:
        """Post (reservation id, charged amount) pairs; returns how many applied."""
        ...

    async def void_batch(self, reservation_ids: Sequence[str]) -> int: ...

    async def expire_reservations(self, policy: ExpiryPolicy, limit: int = 1000) -> int: ...

    async def balance(self, team_id: str, environment: Environment) -> int: ...

    async def balances(self, team_id: str) -> dict[str, int]: ...

    async def grant(
        self,
        team_id: str,
        environment: Environment,
        amount: int,
        reason: str,
        actor: str,
        idempotency_key: str | None = None,
    ) -> int: ...

    async def ledger_entries(
        self, team_id: str, limit: int, before: int | None
    ) -> list[LedgerEntry]: ...

    async def pending_count(self) -> int: ...

    async def reconcile(self) -> list[Mismatch]: ...

    async def roll_up(self, older_than_days: int) -> int:
        """Fold reservations resolved more than ``older_than_days`` ago into per-day rows.

        The rows (per team, environment and UTC day of reservation: count,
        reserved, charged) keep every balance derivable, and :meth:`reconcile`
        counts them. Returns how many reservations were folded.
        """
        ...


class Backend(Store, Ledger, Protocol):
    """One database holding both; owns its connections."""

    async def open(self) -> None: ...

    async def close(self) -> None: ...

    async def migrate(self) -> list[int]: ...

    async def ping(self) -> None: ...


def open_backend(
    url: str, *, lease_seconds: float, postgres: PostgresSettings | None = None
) -> Backend:
    """The backend named by a ``storage`` URL (not yet opened).

    ``postgres`` tunes a PostgreSQL backend (pool, timeouts, LISTEN DSN) and
    is ignored for SQLite.
    """
    if url.startswith("sqlite:///"):
        from gateway.storage.sqlite import SqliteBackend

        return SqliteBackend(url.removeprefix("sqlite:///"), lease_seconds=lease_seconds)
    if url.startswith(("postgresql://", "postgres://")):
        from gateway.config import PostgresSettings
        from gateway.storage.postgres import PostgresBackend

        settings = postgres if postgres is not None else PostgresSettings()
        return PostgresBackend(url, settings, lease_seconds=lease_seconds)
    raise StorageError(f"storage backend {url.split(':', 1)[0]!r} is not available in this build")
