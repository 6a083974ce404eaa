"""The shared backend: store and ledger on PostgreSQL, through an asyncpg pool.

Same semantics as :mod:`gateway.storage.sqlite`, made safe for many replicas:

- Every ledger write is one statement calling a function the migrations
  install (``gateway_reserve``, ``gateway_resolve``, ``gateway_expire``,
  ``gateway_claim_idempotency``), so a batch of any size costs one round
  trip and holds its balance rows only while the function runs. Lease
  deadlines come from the database clock, so replicas with skewed clocks
  agree on what has expired.
- Key writes are logged to ``key_changes`` and announced with ``pg_notify`` by
  triggers, in the writing transaction; :meth:`PostgresBackend.listen_key_changes`
  follows the announcements on a connection of its own.
- A failure to reach the server (refused, reset, timed out, shut down) is
  raised as :class:`StorageUnavailable`; the caller answers 503.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import secrets
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, TypeAlias, TypeVar

import asyncpg
import orjson

from gateway.config import PostgresSettings
from gateway.models import (
    ApiKey,
    AuditEntry,
    Environment,
    KeyRecord,
    LedgerEntry,
    Team,
    TeamToken,
    UsageRow,
)
from gateway.storage import (
    Conflict,
    ExpiryPolicy,
    GrantResult,
    IdempotencyClaim,
    IdempotencyRecord,
    InvalidData,
    KeyChange,
    KeyReused,
    Mismatch,
    NotFound,
    ReserveRequest,
    ReserveResult,
    StorageUnavailable,
    check_grant,
    checked_key_changes,
    decode_ledger_cursor,
    encode_ledger_cursor,
    migrations,
    replayed_grant,
)

__all__ = ["NOTIFY_CHANNEL", "PostgresBackend"]

log = logging.getLogger("gateway.storage.postgres")

NOTIFY_CHANNEL = "gateway_key_changes"

if TYPE_CHECKING:
    from asyncpg.pool import PoolConnectionProxy

    Connection: TypeAlias = PoolConnectionProxy[asyncpg.Record]

# Taken by every migrating process, so that replicas starting together migrate once.
_MIGRATION_LOCK = 0x6761_7465_7761_79  # "gateway"
_MIGRATION_TIMEOUT = 600.0
# PostgreSQL counts time from 2000-01-01 UTC.
_PG_EPOCH = 946_684_800
# The listener's checks: a dropped connection is noticed within about this long.
_LISTEN_CHECK_SECONDS = 0.5
_RECONNECT_FIRST_SECONDS = 0.1
_RECONNECT_MAX_SECONDS = 2.0
_ROLL_UP_CHUNK = 10_000

# What "the database cannot be reached right now" looks like. TimeoutError is the
# client-side command timeout; class 57 is the server shutting down or cancelling
# (statement_timeout), 53 out of connections or resources, 25006 a read-only
# standby after a failover, 40 a transaction the server rolled back.
_UNAVAILABLE: tuple[type[BaseException], ...] = (
    OSError,
    TimeoutError,
    asyncpg.PostgresConnectionError,
    asyncpg.InterfaceError,
    # A session the server just terminated, used before asyncpg saw it close:
    # "cannot switch to state …; another operation is in progress".
    asyncpg.exceptions.InternalClientError,
    asyncpg.exceptions.OperatorInterventionError,
    asyncpg.exceptions.InsufficientResourcesError,
    asyncpg.exceptions.ReadOnlySQLTransactionError,
    asyncpg.exceptions.TransactionRollbackError,
)

# What the server or asyncpg's encoders raise for a value they cannot take (class
# 22: text that is not UTF-8 or holds NUL, a number out of range; class 23: a
# constraint): asking again would be refused again.
_REFUSED_VALUES: tuple[type[Exception], ...] = (
    asyncpg.DataError,
    asyncpg.IntegrityConstraintViolationError,
    UnicodeEncodeError,
    OverflowError,
)

# Connecting can also fail on the server's terms (no such database, bad password).
_CANNOT_CONNECT: tuple[type[BaseException], ...] = (*_UNAVAILABLE, asyncpg.PostgresError)

_KEY_COLUMNS = (
    "id, team_id, name, prefix, environment, rate_limit_per_minute, disabled, "
    "created_at, last_used_at, expires_at, revoked_at"
)
_TOKEN_COLUMNS = "id, team_id, name, prefix, created_at, last_used_at, revoked_at"  # noqa: S105
_TEAM_COLUMNS = "id, name, rate_limit_per_minute, created_at"

K = TypeVar("K", bound=tuple[Any, ...])


def _new_id(prefix: str) -> str:
    return f"{prefix}_{secrets.token_hex(8)}"


def _summed(rows: Iterable[tuple[K, int]]) -> list[tuple[K, int]]:
    """Counter rows with equal keys added up, in key order.

    One upsert may not touch a row twice; and every writer adding in the same
    (key) order means two of them never wait for each other's rows in a circle.
    """
    totals: dict[K, int] = {}
    for key, n in rows:
        totals[key] = totals.get(key, 0) + n
    return sorted(totals.items())


def _encode_time(epoch: float) -> tuple[int]:
    return (round((epoch - _PG_EPOCH) * 1_000_000),)


def _decode_time(value: tuple[int]) -> float:
    return value[0] / 1_000_000 + _PG_EPOCH


async def _init_connection(conn: asyncpg.Connection[asyncpg.Record]) -> None:
    # Times travel as epoch seconds, the models' unit, without datetime objects.
    await conn.set_type_codec(
        "timestamptz",
        schema="pg_catalog",
        encoder=_encode_time,
        decoder=_decode_time,
        format="tuple",
    )


async def _keep_session(conn: asyncpg.Connection[asyncpg.Record]) -> None:
    # asyncpg's default reset (UNLISTEN, RESET ALL, advisory unlock...) is one more
    # round trip per call. Pool connections never hold session state: LISTEN has
    # its own connection and locks are transaction-scoped. asyncpg still rolls
    # back any open transaction before this runs.
    return None


def _ended(conn: Connection) -> bool:
    """Whether a kept pool connection can no longer be used."""
    try:
        return conn.is_closed()
    except asyncpg.InterfaceError:
        # asyncpg hands a connection whose session ended back to its pool by
        # itself; the proxy kept here is then detached.
        return True


def _team(row: asyncpg.Record) -> Team:
    return Team(row["id"], row["name"], row["created_at"], row["rate_limit_per_minute"])


def _api_key(row: asyncpg.Record) -> ApiKey:
    return ApiKey(
        id=row["id"],
        team_id=row["team_id"],
        name=row["name"],
        prefix=row["prefix"],
        environment=row["environment"],
        rate_limit_per_minute=row["rate_limit_per_minute"],
        disabled=row["disabled"],
        created_at=row["created_at"],
        last_used_at=row["last_used_at"],
        expires_at=row["expires_at"],
        revoked_at=row["revoked_at"],
    )


def _token(row: asyncpg.Record) -> TeamToken:
    return TeamToken(
        id=row["id"],
        team_id=row["team_id"],
        name=row["name"],
        prefix=row["prefix"],
        created_at=row["created_at"],
        last_used_at=row["last_used_at"],
        revoked_at=row["revoked_at"],
    )


def _audit(row: asyncpg.Record) -> AuditEntry:
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


def _replay(row: asyncpg.Record) -> IdempotencyRecord | None:
    """The record a reserve result was answered with (``replay_*`` columns), if any."""
    if row["replay_state"] is None:
        return None
    return IdempotencyRecord(
        state=row["replay_state"],
        method=row["replay_method"],
        path=row["replay_path"],
        body_hash=row["replay_body_hash"],
        status=row["replay_status"],
        content_type=row["replay_content_type"],
        body=row["replay_body"],
        body_stored=row["replay_body_stored"],
    )


def _key_change(payload: str) -> KeyChange:
    data = orjson.loads(payload)
    return KeyChange(int(data["seq"]), data["key_hash"], data["team_id"])


class PostgresBackend:
    """Store and ledger on PostgreSQL; any number of replicas may share the database."""

    def __init__(self, dsn: str, settings: PostgresSettings, *, lease_seconds: float) -> None:
        self._dsn = dsn
        self._settings = settings
        self._lease = lease_seconds
        self._pool: asyncpg.Pool[asyncpg.Record] | None = None
        # One pool connection kept for reserve batches (see _reserve_connection).
        self._pinned: Connection | None = None
        self._pinned_busy = False

    # -- plumbing -----------------------------------------------------------------

    async def open(self) -> None:
        s = self._settings
        pool: asyncpg.Pool[asyncpg.Record] = asyncpg.create_pool(
            self._dsn,
            min_size=min(s.pool_min_size, s.pool_max_size),
            max_size=s.pool_max_size,
            statement_cache_size=s.statement_cache_size,
            command_timeout=s.command_timeout_seconds,
            timeout=s.command_timeout_seconds,
            init=_init_connection,
            reset=_keep_session,
            server_settings={"application_name": "gateway"},
        )
        try:
            await pool
        except _CANNOT_CONNECT as exc:
            pool.terminate()
            raise StorageUnavailable(f"PostgreSQL: cannot connect: {exc}") from exc
        self._pool = pool

    async def close(self) -> None:
        pool, self._pool = self._pool, None
        if pool is None:
            return
        pinned, self._pinned = self._pinned, None
        if pinned is not None and not self._pinned_busy:
            # Unreleased, it would hold pool.close() up until the timeout.
            await pool.release(pinned)
        try:
            await asyncio.wait_for(pool.close(), self._settings.command_timeout_seconds)
        except TimeoutError:
            pool.terminate()

    @contextlib.asynccontextmanager
    async def _connection(self) -> AsyncIterator[Connection]:
        pool = self._pool
        if pool is None:
            raise StorageUnavailable("the PostgreSQL backend is not open")
        try:
            async with pool.acquire(timeout=self._settings.command_timeout_seconds) as conn:
                yield conn
        except _UNAVAILABLE as exc:
            raise StorageUnavailable(f"PostgreSQL: {type(exc).__name__}: {exc}") from exc

    @contextlib.asynccontextmanager
    async def _reserve_connection(self) -> AsyncIterator[Connection]:
        """A connection for a reserve batch, without a trip through the pool.

        Reserve batches run one at a time (gateway.credits groups them) and
        each is on some request's critical path. Taking a pool connection per
        batch costs a task and a timer (asyncpg's acquire with a timeout goes
        through asyncio.wait_for) and a shielded release; measured at 500
        req/s, keeping one connection took the reserve's wall time from 0.67
        to 0.56 ms p50. A second caller at the same time goes through the pool
        as before, and so does every caller when the pool is too small to give
        one connection away (fewer than three: two stay for everything else).
        """
        pool = self._pool
        if self._pinned_busy or pool is None or self._settings.pool_max_size < 3:
            async with self._connection() as conn:
                yield conn
            return
        self._pinned_busy = True
        try:
            if self._pinned is not None and _ended(self._pinned):
                # The server ended the session while it was kept (as the pool
                # would notice on acquire): give it back, take a live one.
                stale, self._pinned = self._pinned, None
                with contextlib.suppress(Exception):
                    await pool.release(stale)
            if self._pinned is None:
                self._pinned = await pool.acquire(timeout=self._settings.command_timeout_seconds)
            conn = self._pinned
            try:
                yield conn
            except BaseException:
                # The session's state is unknown (broken, or a query cut short):
                # the pool checks it on release, and the next batch takes another.
                self._pinned = None
                with contextlib.suppress(Exception):
                    await pool.release(conn)
                raise
            if self._pool is not pool or self._pinned is not conn:
                # close() ran while this batch had (or was taking) the connection:
                # hand it back now, or pool.close() would wait for it until its timeout.
                if self._pinned is conn:
                    self._pinned = None
                with contextlib.suppress(Exception):
                    await pool.release(conn)
        except _UNAVAILABLE as exc:
            raise StorageUnavailable(f"PostgreSQL: {type(exc).__name__}: {exc}") from exc
        finally:
            self._pinned_busy = False

    async def _fetch(self, query: str, *args: Any) -> list[asyncpg.Record]:
        async with self._connection() as conn:
            return await conn.fetch(query, *args)

    async def _fetchrow(self, query: str, *args: Any) -> asyncpg.Record | None:
        async with self._connection() as conn:
            return await conn.fetchrow(query, *args)

    async def _fetchval(self, query: str, *args: Any) -> Any:
        async with self._connection() as conn:
            return await conn.fetchval(query, *args)

    async def ping(self) -> None:
        await self._fetchval("SELECT 1")

    async def migrate(self) -> list[int]:
        applied: list[int] = []
        # Read off the loop: they are files (in the installed package).
        versions = await asyncio.to_thread(migrations.load, "postgresql")
        async with self._connection() as conn:
            for version, script in ((m.version, m.sql) for m in versions):
                async with conn.transaction():
                    # Replicas starting together queue here; the later ones find the work done.
                    await conn.execute(
                        "SELECT pg_advisory_xact_lock($1)",
                        _MIGRATION_LOCK,
                        timeout=_MIGRATION_TIMEOUT,
                    )
                    await conn.execute(
                        "CREATE TABLE IF NOT EXISTS schema_migrations ("
                        "version integer PRIMARY KEY, "
                        "applied_at timestamptz NOT NULL DEFAULT now())"
                    )
                    done = await conn.fetchval(
                        "SELECT 1 FROM schema_migrations WHERE version = $1", version
                    )
                    if done:
                        continue
                    await conn.execute(script, timeout=_MIGRATION_TIMEOUT)
                    await conn.execute(
                        "INSERT INTO schema_migrations (version) VALUES ($1)", version
                    )
                    applied.append(version)
        return applied

    # -- store: keys and teams ----------------------------------------------------

    async def find_key(self, key_hash: str) -> KeyRecord | None:
        row = await self._fetchrow(
            "SELECT k.id, k.team_id, k.prefix, k.environment, k.rate_limit_per_minute, "
            "k.disabled, k.expires_at, k.revoked_at, t.rate_limit_per_minute AS team_limit "
            "FROM api_keys k JOIN teams t ON t.id = k.team_id WHERE k.key_hash = $1",
            key_hash,
        )
        if row is None:
            return None
        return KeyRecord(
            id=row["id"],
            team_id=row["team_id"],
            prefix=row["prefix"],
            environment=row["environment"],
            rate_limit_per_minute=row["rate_limit_per_minute"],
            team_rate_limit_per_minute=row["team_limit"],
            disabled=row["disabled"],
            expires_at=row["expires_at"],
            revoked_at=row["revoked_at"],
        )

    async def find_key_id_by_hash(self, key_hash: str) -> str | None:
        found = await self._fetchval("SELECT id FROM api_keys WHERE key_hash = $1", key_hash)
        return None if found is None else str(found)

    async def find_key_hash_by_id(self, key_id: str) -> str | None:
        found = await self._fetchval("SELECT key_hash FROM api_keys WHERE id = $1", key_id)
        return None if found is None else str(found)

    async def latest_key_change(self) -> int:
        return int(await self._fetchval("SELECT seq FROM key_change_counter"))

    async def key_changes_since(self, seq: int) -> tuple[int, list[KeyChange], bool]:
        rows = await self._fetch(
            "SELECT seq, key_hash, team_id FROM key_changes WHERE seq > $1 "
            "ORDER BY seq LIMIT 10000",
            seq,
        )
        if not rows:
            return seq, [], False
        changes = [KeyChange(r["seq"], r["key_hash"], r["team_id"]) for r in rows]
        # A gap right after what we saw means entries were pruned: the caller
        # must forget everything rather than trust a partial feed.
        gap = changes[0].seq > seq + 1 and seq > 0
        return changes[-1].seq, changes, gap

    async def create_team(self, name: str, rate_limit_per_minute: int | None = None) -> Team:
        try:
            row = await self._fetchrow(
                "INSERT INTO teams (id, name, rate_limit_per_minute) VALUES ($1, $2, $3) "
                "RETURNING id, name, rate_limit_per_minute, created_at",
                _new_id("team"),
                name,
                rate_limit_per_minute,
            )
        except asyncpg.UniqueViolationError:
            raise Conflict(f"a team named {name!r} already exists") from None
        assert row is not None
        return _team(row)

    async def get_team(self, id_or_name: str) -> Team:
        row = await self._fetchrow(
            "SELECT id, name, rate_limit_per_minute, created_at FROM teams "
            "WHERE id = $1 OR name = $1 ORDER BY id = $1 DESC LIMIT 1",
            id_or_name,
        )
        if row is None:
            raise NotFound(f"no team {id_or_name!r}")
        return _team(row)

    async def list_teams(self, limit: int, after: str | None) -> list[Team]:
        rows = await self._fetch(
            "SELECT id, name, rate_limit_per_minute, created_at FROM teams "
            "WHERE id > $1 ORDER BY id LIMIT $2",
            after or "",
            limit,
        )
        return [_team(r) for r in rows]

    async def create_key(
        self,
        team_id: str,
        name: str,
        environment: Environment,
        key_hash: str,
        prefix: str,
        rate_limit_per_minute: int | None,
        expires_at: float | None,
    ) -> ApiKey:
        # The trigger on api_keys logs and announces the new key in this transaction.
        try:
            row = await self._fetchrow(
                "INSERT INTO api_keys (id, team_id, name, prefix, key_hash, environment, "  # noqa: S608 - constant
                "rate_limit_per_minute, expires_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8) "
                f"RETURNING {_KEY_COLUMNS}",
                _new_id("key"),
                team_id,
                name,
                prefix,
                key_hash,
                environment,
                rate_limit_per_minute,
                expires_at,
            )
        except asyncpg.ForeignKeyViolationError:
            raise NotFound(f"no team {team_id!r}") from None
        except asyncpg.UniqueViolationError:
            raise Conflict("a key with this hash exists already") from None
        assert row is not None
        return _api_key(row)

    async def get_key(self, key_id: str) -> ApiKey:
        row = await self._fetchrow(
            f"SELECT {_KEY_COLUMNS} FROM api_keys WHERE id = $1",  # noqa: S608 - constant
            key_id,
        )
        if row is None:
            raise NotFound(f"no key {key_id!r}")
        return _api_key(row)

    async def list_keys(self, team_id: str, limit: int, after: str | None) -> list[ApiKey]:
        rows = await self._fetch(
            f"SELECT {_KEY_COLUMNS} FROM api_keys "  # noqa: S608 - constant
            "WHERE team_id = $1 AND id > $2 ORDER BY id LIMIT $3",
            team_id,
            after or "",
            limit,
        )
        return [_api_key(r) for r in rows]

    async def revoke_key(self, key_id: str) -> ApiKey:
        async with self._connection() as conn:
            row = await conn.fetchrow(
                "UPDATE api_keys SET revoked_at = now() WHERE id = $1 AND revoked_at IS NULL "  # noqa: S608 - constant
                f"RETURNING {_KEY_COLUMNS}",
                key_id,
            )
            if row is not None:
                return _api_key(row)
            exists = await conn.fetchval("SELECT 1 FROM api_keys WHERE id = $1", key_id)
        if exists is None:
            raise NotFound(f"no key {key_id!r}")
        raise Conflict(f"key {key_id!r} is already revoked")

    async def update_team(self, team_id: str, rate_limit_per_minute: int | None) -> Team:
        # The trigger on teams announces a changed limit to every key cache.
        row = await self._fetchrow(
            "UPDATE teams SET rate_limit_per_minute = $2 WHERE id = $1 "  # noqa: S608 - constant
            f"RETURNING {_TEAM_COLUMNS}",
            team_id,
            rate_limit_per_minute,
        )
        if row is None:
            raise NotFound(f"no team {team_id!r}")
        return _team(row)

    async def update_key(self, key_id: str, changes: Mapping[str, object]) -> ApiKey:
        # The trigger on api_keys announces a change of what caches hold (limit,
        # expiry, disabled); a new name changes nothing cached.
        checked = checked_key_changes(changes)
        async with self._connection() as conn:
            if checked:
                # Column names come from KEY_FIELDS only (checked_key_changes).
                assignments = ", ".join(
                    f"{field} = ${n}" for n, field in enumerate(checked, start=2)
                )
                row = await conn.fetchrow(
                    f"UPDATE api_keys SET {assignments} "  # noqa: S608 - checked names
                    f"WHERE id = $1 AND revoked_at IS NULL RETURNING {_KEY_COLUMNS}",
                    key_id,
                    *checked.values(),
                )
            else:
                row = await conn.fetchrow(
                    f"SELECT {_KEY_COLUMNS} FROM api_keys "  # noqa: S608 - constant
                    "WHERE id = $1 AND revoked_at IS NULL",
                    key_id,
                )
            if row is not None:
                return _api_key(row)
            exists = await conn.fetchval("SELECT 1 FROM api_keys WHERE id = $1", key_id)
        if exists is None:
            raise NotFound(f"no key {key_id!r}")
        raise Conflict(f"key {key_id!r} is revoked")

    async def rotate_key(
        self, key_id: str, new_hash: str, new_prefix: str, old_expires_at: float
    ) -> ApiKey:
        # One statement, so one transaction; the triggers announce both keys.
        try:
            async with self._connection() as conn:
                row = await conn.fetchrow(
                    _ROTATE_SQL, key_id, new_hash, new_prefix, old_expires_at, _new_id("key")
                )
                if row is not None:
                    return _api_key(row)
                exists = await conn.fetchval("SELECT 1 FROM api_keys WHERE id = $1", key_id)
        except asyncpg.UniqueViolationError:
            raise Conflict("a key with this hash exists already") from None
        if exists is None:
            raise NotFound(f"no key {key_id!r}")
        raise Conflict(f"key {key_id!r} is revoked")

    # -- admin: team tokens and the audit log -------------------------------------

    async def create_token(
        self, team_id: str, name: str, token_hash: str, prefix: str
    ) -> TeamToken:
        try:
            row = await self._fetchrow(
                "INSERT INTO team_tokens (id, team_id, name, prefix, token_hash) "  # noqa: S608 - constant
                f"VALUES ($1, $2, $3, $4, $5) RETURNING {_TOKEN_COLUMNS}",
                _new_id("tok"),
                team_id,
                name,
                prefix,
                token_hash,
            )
        except asyncpg.ForeignKeyViolationError:
            raise NotFound(f"no team {team_id!r}") from None
        except asyncpg.UniqueViolationError:
            raise Conflict("a token with this hash exists already") from None
        assert row is not None
        return _token(row)

    async def list_tokens(self, team_id: str, limit: int, after: str | None) -> list[TeamToken]:
        rows = await self._fetch(
            f"SELECT {_TOKEN_COLUMNS} FROM team_tokens "  # noqa: S608 - constant
            "WHERE team_id = $1 AND id > $2 ORDER BY id LIMIT $3",
            team_id,
            after or "",
            limit,
        )
        return [_token(r) for r in rows]

    async def get_token(self, token_id: str) -> TeamToken:
        row = await self._fetchrow(
            f"SELECT {_TOKEN_COLUMNS} FROM team_tokens WHERE id = $1",  # noqa: S608 - constant
            token_id,
        )
        if row is None:
            raise NotFound(f"no token {token_id!r}")
        return _token(row)

    async def revoke_token(self, token_id: str) -> TeamToken:
        async with self._connection() as conn:
            row = await conn.fetchrow(
                "UPDATE team_tokens SET revoked_at = now() "  # noqa: S608 - constant
                f"WHERE id = $1 AND revoked_at IS NULL RETURNING {_TOKEN_COLUMNS}",
                token_id,
            )
            if row is not None:
                return _token(row)
            exists = await conn.fetchval("SELECT 1 FROM team_tokens WHERE id = $1", token_id)
        if exists is None:
            raise NotFound(f"no token {token_id!r}")
        raise Conflict(f"token {token_id!r} is already revoked")

    async def find_token(self, token_hash: str) -> TeamToken | None:
        row = await self._fetchrow(
            f"SELECT {_TOKEN_COLUMNS} FROM team_tokens WHERE token_hash = $1",  # noqa: S608 - constant
            token_hash,
        )
        return None if row is None else _token(row)

    async def append_audit(
        self,
        actor: str,
        action: str,
        target: str | None,
        team_id: str | None,
        client_ip: str | None,
        details: dict[str, object],
    ) -> None:
        async with self._connection() as conn:
            await conn.execute(
                "INSERT INTO audit_log (actor, action, target, team_id, client_ip, details) "
                "VALUES ($1, $2, $3, $4, $5, $6::jsonb)",
                actor,
                action,
                target,
                team_id,
                client_ip,
                orjson.dumps(details).decode(),
            )

    async def list_audit(
        self, team_id: str | None, limit: int, before: int | None
    ) -> list[AuditEntry]:
        upper = before if before is not None else 2**62
        if team_id is None:
            rows = await self._fetch(
                "SELECT * FROM audit_log WHERE id < $1 ORDER BY id DESC LIMIT $2", upper, limit
            )
        else:
            rows = await self._fetch(
                "SELECT * FROM audit_log WHERE team_id = $1 AND id < $2 ORDER BY id DESC LIMIT $3",
                team_id,
                upper,
                limit,
            )
        return [_audit(r) for r in rows]

    # -- usage and patterns ---------------------------------------------------------

    async def add_usage(self, rows: list[UsageRow]) -> None:
        if not rows:
            return
        requests = _summed(
            ((r.team_id, r.minute, r.key_id, r.environment, r.outcome), r.requests) for r in rows
        )
        credits = dict(
            _summed(
                ((r.team_id, r.minute, r.key_id, r.environment, r.outcome), r.credits) for r in rows
            )
        )
        keys = [key for key, _ in requests]
        await self._write_batch(
            _ADD_USAGE_SQL,
            [k[0] for k in keys],
            [k[1] for k in keys],
            [k[2] for k in keys],
            [k[3] for k in keys],
            [k[4] for k in keys],
            [n for _, n in requests],
            [credits[k] for k in keys],
        )

    async def _write_batch(self, statement: str, *columns: list[Any]) -> None:
        """One statement over arrays of values; refused values raise InvalidData."""
        try:
            async with self._connection() as conn:
                await conn.execute(statement, *columns)
        except _REFUSED_VALUES as exc:
            raise InvalidData(f"PostgreSQL: {type(exc).__name__}: {exc}") from exc

    async def touch_keys(self, last_used: dict[str, float]) -> None:
        # The trigger on api_keys ignores last_used_at: nothing is announced.
        if not last_used:
            return
        items = sorted(last_used.items())
        await self._write_batch(
            _TOUCH_KEYS_SQL, [key_id for key_id, _ in items], [at for _, at in items]
        )

    async def usage_buckets(
        self, team_id: str, start: int, end: float, step: int, key_id: str | None
    ) -> list[tuple[int, str, int, int]]:
        query = (
            "SELECT $2::bigint + (minute - $2::bigint) / $4::bigint * $4::bigint AS bucket, "
            "outcome, sum(requests)::bigint AS requests, sum(credits)::bigint AS credits "
            "FROM usage_minutes WHERE team_id = $1 AND minute >= $2 AND minute < $3"
        )
        # minute < end holds for a whole minute exactly when minute < ceil(end).
        args: list[object] = [team_id, start, math.ceil(end), step]
        if key_id is not None:
            query += " AND key_id = $5"
            args.append(key_id)
        rows = await self._fetch(query + " GROUP BY 1, 2 ORDER BY 1, 2", *args)
        return [(int(r[0]), r[1], int(r[2]), int(r[3])) for r in rows]

    async def usage_top_keys(
        self, team_id: str, start: int, end: float, limit: int
    ) -> list[tuple[str, int, int]]:
        rows = await self._fetch(
            "SELECT key_id, sum(requests)::bigint AS requests, sum(credits)::bigint AS credits "
            "FROM usage_minutes WHERE team_id = $1 AND minute >= $2 AND minute < $3 "
            "GROUP BY key_id ORDER BY requests DESC, key_id LIMIT $4",
            team_id,
            start,
            math.ceil(end),
            limit,
        )
        return [(r[0], int(r[1]), int(r[2])) for r in rows]

    async def add_key_ips(self, rows: list[tuple[int, str, str, str, int]]) -> None:
        if not rows:
            return
        summed = _summed(((team, key, day, ip), n) for day, team, key, ip, n in rows)
        await self._write_batch(
            _ADD_KEY_IPS_SQL,
            [k[0] for k, _ in summed],
            [k[1] for k, _ in summed],
            [k[2] for k, _ in summed],
            [k[3] for k, _ in summed],
            [n for _, n in summed],
        )

    async def key_ips(
        self, team_id: str, key_id: str | None, start_day: int, end_day: int
    ) -> list[tuple[int, str, str, int]]:
        query = (
            "SELECT day, key_id, client_ip, requests FROM key_ip_days "
            "WHERE team_id = $1 AND day >= $2 AND day < $3"
        )
        args: list[object] = [team_id, start_day, end_day]
        if key_id is not None:
            query += " AND key_id = $4"
            args.append(key_id)
        rows = await self._fetch(query + " ORDER BY day, key_id, client_ip", *args)
        return [(int(r[0]), r[1], r[2], int(r[3])) for r in rows]

    async def add_auth_failures(self, rows: list[tuple[int, str, str, str, int]]) -> None:
        if not rows:
            return
        summed = _summed(((minute, prefix, ip, why), n) for minute, prefix, ip, why, n in rows)
        await self._write_batch(
            _ADD_AUTH_FAILURES_SQL,
            [k[0] for k, _ in summed],
            [k[1] for k, _ in summed],
            [k[2] for k, _ in summed],
            [k[3] for k, _ in summed],
            [n for _, n in summed],
        )

    async def auth_failure_counts(
        self, start: int, end: float, limit: int
    ) -> list[tuple[str, str, str, int]]:
        rows = await self._fetch(
            "SELECT key_prefix, client_ip, reason, sum(failures)::bigint AS n "
            "FROM auth_failure_minutes WHERE minute >= $1 AND minute < $2 "
            "GROUP BY key_prefix, client_ip, reason "
            "ORDER BY n DESC, key_prefix, client_ip, reason LIMIT $3",
            start,
            math.ceil(end),
            limit,
        )
        return [(r[0], r[1], r[2], int(r[3])) for r in rows]

    async def prune_patterns(self, ip_before: int, failures_before: int) -> int:
        return int(await self._fetchval(_PRUNE_PATTERNS_SQL, ip_before, failures_before))

    async def listen_key_changes(
        self,
        on_change: Callable[[KeyChange], None],
        on_connected: Callable[[], None],
        on_lost: Callable[[], None],
    ) -> None:
        """Follow key changes as they commit, until cancelled.

        Runs on a connection of its own (``listen_dsn`` when set: LISTEN needs a
        session, which a pool behind PgBouncer cannot promise). ``on_connected``
        is called once LISTEN is active, after every (re)connection: whatever
        changed while there was no connection was not announced, so the caller
        re-checks everything it holds. ``on_lost`` is called when an established
        connection drops, noticed within about half a second.
        """
        listen_dsn = self._settings.listen_dsn
        dsn = listen_dsn.get_secret_value() if listen_dsn is not None else self._dsn
        delay = _RECONNECT_FIRST_SECONDS
        failing = False
        while True:
            connected = False
            try:
                conn = await asyncpg.connect(
                    dsn,
                    timeout=self._settings.command_timeout_seconds,
                    statement_cache_size=0,
                    server_settings={"application_name": "gateway-listen"},
                )
            except _CANNOT_CONNECT as exc:
                if not failing:
                    log.warning("cannot listen for key changes, retrying: %s", exc)
                failing = True
            else:
                try:
                    lost = await self._subscribe(conn, on_change)
                    on_connected()
                    connected, failing = True, False
                    await self._watch(conn, lost)
                except _CANNOT_CONNECT as exc:
                    log.warning("lost the key change connection, reconnecting: %s", exc)
                finally:
                    conn.terminate()
            if connected:
                on_lost()
                delay = _RECONNECT_FIRST_SECONDS
            await asyncio.sleep(delay)
            delay = min(delay * 2, _RECONNECT_MAX_SECONDS)

    @staticmethod
    async def _subscribe(
        conn: asyncpg.Connection[asyncpg.Record], on_change: Callable[[KeyChange], None]
    ) -> asyncio.Event:
        """LISTEN on ``conn``; the event is set when the connection closes."""
        lost = asyncio.Event()

        def deliver(_conn: object, _pid: int, _channel: str, payload: object) -> None:
            try:
                change = _key_change(str(payload))
            except (ValueError, KeyError, TypeError):
                log.error("ignoring a malformed key change notification: %r", payload)
                return
            on_change(change)

        conn.add_termination_listener(lambda _conn: lost.set())
        await conn.add_listener(NOTIFY_CHANNEL, deliver)
        return lost

    @staticmethod
    async def _watch(conn: asyncpg.Connection[asyncpg.Record], lost: asyncio.Event) -> None:
        """Return (or raise) once the connection is gone."""
        while not conn.is_closed():
            # The termination listener fires when the server closes the
            # connection; the ping catches a network that silently went away.
            try:
                await asyncio.wait_for(lost.wait(), _LISTEN_CHECK_SECONDS)
            except TimeoutError:
                await conn.execute("SELECT 1", timeout=_LISTEN_CHECK_SECONDS * 2)
            else:
                return

    # -- ledger -------------------------------------------------------------------

    async def reserve_batch(self, requests: Sequence[ReserveRequest]) -> list[ReserveResult]:
        if not requests:
            return []
        if len(requests) == 1 and requests[0].idempotency is None:
            r = requests[0]
            async with self._reserve_connection() as conn:
                row = await conn.fetchrow(
                    _RESERVE_ONE_SQL,
                    r.reservation_id,
                    r.team_id,
                    r.environment,
                    r.key_id,
                    r.amount,
                    self._lease,
                )
            assert row is not None  # the function always returns one row
            return [ReserveResult(row["granted"], row["available"])]
        args = (
            [r.reservation_id for r in requests],
            [r.team_id for r in requests],
            [r.environment for r in requests],
            [r.key_id for r in requests],
            [r.amount for r in requests],
            self._lease,
        )
        claims = [r.idempotency for r in requests]
        if not any(claims):
            # Without claims the replay columns are not even sent.
            async with self._reserve_connection() as conn:
                rows = await conn.fetch(_RESERVE_SQL, *args)
            return [ReserveResult(row["granted"], row["available"]) for row in rows]
        async with self._reserve_connection() as conn:
            rows = await conn.fetch(
                _RESERVE_CLAIMING_SQL,
                *args,
                [c.key if c is not None else None for c in claims],
                [c.method if c is not None else None for c in claims],
                [c.path if c is not None else None for c in claims],
            )
        return [ReserveResult(row["granted"], row["available"], _replay(row)) for row in rows]

    async def post_batch(self, posts: Sequence[tuple[str, int]]) -> int:
        if not posts:
            return 0
        return int(
            await self._fetchval(
                "SELECT gateway_resolve($1, $2, 'post')",
                [reservation_id for reservation_id, _ in posts],
                [charged for _, charged in posts],
            )
        )

    async def void_batch(self, reservation_ids: Sequence[str]) -> int:
        if not reservation_ids:
            return 0
        return int(
            await self._fetchval(
                "SELECT gateway_resolve($1, $2, 'void')",
                list(reservation_ids),
                [0] * len(reservation_ids),
            )
        )

    async def expire_reservations(self, policy: ExpiryPolicy, limit: int = 1000) -> int:
        expired = int(await self._fetchval("SELECT gateway_expire($1, $2)", policy, limit))
        # An Idempotency-Key still "in flight" after a whole lease belongs to an
        # attempt that never finished (a crash): free it, so a retry is judged afresh.
        await self._fetchval(
            "WITH gone AS (DELETE FROM idempotency_keys WHERE state = 'in_flight' "
            "AND created_at < now() - make_interval(secs => $1) RETURNING 1) "
            "SELECT count(*) FROM gone",
            self._lease,
        )
        return expired

    async def balance(self, team_id: str, environment: Environment) -> int:
        found = await self._fetchval(
            "SELECT available FROM balances WHERE team_id = $1 AND environment = $2",
            team_id,
            environment,
        )
        return 0 if found is None else int(found)

    async def balances(self, team_id: str) -> dict[str, int]:
        rows = await self._fetch(
            "SELECT environment, available FROM balances WHERE team_id = $1", team_id
        )
        found = {r["environment"]: int(r["available"]) for r in rows}
        return {"live": found.get("live", 0), "test": found.get("test", 0)}

    async def grant(
        self,
        team_id: str,
        environment: Environment,
        amount: int,
        reason: str,
        actor: str,
        idempotency_key: str | None = None,
    ) -> int:
        result = await self.apply_grant(
            team_id, environment, amount, reason, actor, idempotency_key
        )
        return result.balance

    async def apply_grant(
        self,
        team_id: str,
        environment: Environment,
        amount: int,
        reason: str,
        actor: str,
        idempotency_key: str | None = None,
        request_hash: str | None = None,
    ) -> GrantResult:
        try:
            async with self._connection() as conn, conn.transaction():
                return await self._grant(
                    conn, team_id, environment, amount, reason, actor, idempotency_key,
                    request_hash,
                )  # fmt: skip
        except asyncpg.UniqueViolationError:
            # Only a concurrent grant with the same key for the other environment
            # gets here (same-environment grants queue on the balance row).
            raise KeyReused("this Idempotency-Key was used for a different grant") from None

    @staticmethod
    async def _grant(
        conn: Connection,
        team_id: str,
        environment: Environment,
        amount: int,
        reason: str,
        actor: str,
        idempotency_key: str | None,
        request_hash: str | None,
    ) -> GrantResult:
        if await conn.fetchval("SELECT 1 FROM teams WHERE id = $1", team_id) is None:
            raise NotFound(f"no team {team_id!r}")
        # Lock the account's row (creating it at zero) before looking at the
        # Idempotency-Key, so that a concurrent retry of this grant waits here
        # and then finds the entry written by the first.
        current = int(
            await conn.fetchval(
                "INSERT INTO balances AS b (team_id, environment, available) VALUES ($1, $2, 0) "
                "ON CONFLICT (team_id, environment) DO UPDATE SET available = b.available "
                "RETURNING available",
                team_id,
                environment,
            )
        )
        if idempotency_key is not None:
            seen = await conn.fetchrow(
                "SELECT amount, environment, request_hash, balance_after FROM credit_entries "
                "WHERE team_id = $1 AND idempotency_key = $2",
                team_id,
                idempotency_key,
            )
            if seen is not None:
                return replayed_grant(dict(seen), amount, environment, request_hash)
        check_grant(current, amount, environment)
        await conn.execute(
            "INSERT INTO credit_entries (team_id, environment, kind, amount, reason, actor, "
            "idempotency_key, request_hash, balance_after) "
            "VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
            team_id,
            environment,
            "grant" if amount >= 0 else "adjust",
            amount,
            reason,
            actor,
            idempotency_key,
            request_hash,
            current + amount,
        )
        await conn.execute(
            "UPDATE balances SET available = $3 WHERE team_id = $1 AND environment = $2",
            team_id,
            environment,
            current + amount,
        )
        return GrantResult(current + amount, replayed=False)

    async def ledger_entries(
        self, team_id: str, limit: int, before: str | None
    ) -> list[LedgerEntry]:
        if before is None:
            query = _LEDGER_SQL.format(credit_cursor="", reservation_cursor="")
            rows = await self._fetch(query, team_id, limit)
        else:
            at, entry_id = decode_ledger_cursor(before)
            query = _LEDGER_SQL.format(
                credit_cursor=_LEDGER_CURSOR.format(table="c", kind="c"),
                reservation_cursor=_LEDGER_CURSOR.format(table="r", kind="r"),
            )
            rows = await self._fetch(query, team_id, limit, at, entry_id)
        return [
            LedgerEntry(
                id=r["entry_id"],
                team_id=team_id,
                environment=r["environment"],
                kind=r["kind"],
                amount=int(r["amount"]),
                reason=r["reason"],
                reservation_id=r["reservation_id"],
                created_at=r["created_at"],
                cursor=encode_ledger_cursor(r["created_at"], r["entry_id"]),
            )
            for r in rows
        ]

    async def pending_count(self) -> int:
        return int(
            await self._fetchval("SELECT count(*) FROM reservations WHERE resolution IS NULL")
        )

    async def claim_idempotency(
        self, team_id: str, environment: Environment, claim: IdempotencyClaim
    ) -> IdempotencyRecord | None:
        row = await self._fetchrow(
            "SELECT state, method, path, body_hash, status, content_type, body, body_stored "
            "FROM gateway_claim_idempotency($1, $2, $3, $4, $5)",
            team_id,
            environment,
            claim.key,
            claim.method,
            claim.path,
        )
        if row is None:
            return None
        return IdempotencyRecord(
            state=row["state"],
            method=row["method"],
            path=row["path"],
            body_hash=row["body_hash"],
            status=row["status"],
            content_type=row["content_type"],
            body=row["body"],
            body_stored=row["body_stored"],
        )

    async def complete_idempotency(
        self,
        team_id: str,
        environment: Environment,
        key: str,
        body_hash: str,
        status: int,
        content_type: str | None,
        body: bytes | None,
    ) -> None:
        async with self._connection() as conn:
            await conn.execute(
                "UPDATE idempotency_keys SET state = 'completed', body_hash = $4, status = $5, "
                "content_type = $6, body = $7, body_stored = $7::bytea IS NOT NULL, "
                "completed_at = now() "
                "WHERE team_id = $1 AND environment = $2 AND idempotency_key = $3 "
                "AND state = 'in_flight'",
                team_id,
                environment,
                key,
                body_hash,
                status,
                content_type,
                body,
            )

    async def release_idempotency(self, team_id: str, environment: Environment, key: str) -> None:
        async with self._connection() as conn:
            await conn.execute(
                "DELETE FROM idempotency_keys "
                "WHERE team_id = $1 AND environment = $2 AND idempotency_key = $3 "
                "AND state = 'in_flight'",
                team_id,
                environment,
                key,
            )

    async def prune_idempotency(self, before: float) -> int:
        return int(
            await self._fetchval(
                "WITH gone AS (DELETE FROM idempotency_keys WHERE created_at < $1::timestamptz "
                "RETURNING 1) SELECT count(*) FROM gone",
                before,
            )
        )

    async def reconcile(self) -> list[Mismatch]:
        rows = await self._fetch(_RECONCILE_SQL)
        return [
            Mismatch(r["team_id"], r["environment"], int(r["stored"]), int(r["derived"]))
            for r in rows
            if int(r["stored"]) != int(r["derived"])
        ]

    async def roll_up(self, older_than_days: int) -> int:
        """Fold reservations resolved more than ``older_than_days`` ago into per-day rows.

        Works in chunks, each its own transaction, so the reservations table is
        never locked for long; replicas running it at once skip each other's rows.
        Returns how many reservations were folded.
        """
        total = 0
        while True:
            moved = int(await self._fetchval(_ROLL_UP_SQL, older_than_days, _ROLL_UP_CHUNK))
            total += moved
            if moved < _ROLL_UP_CHUNK:
                return total


# The claim-less form selects only what it reads: the replay columns (all NULL)
# are never sent.
_RESERVE_SQL = (
    "SELECT granted, available FROM gateway_reserve($1, $2, $3, $4, $5, $6, NULL, NULL, NULL)"
)
_RESERVE_ONE_SQL = "SELECT granted, available FROM gateway_reserve_one($1, $2, $3, $4, $5, $6)"
_RESERVE_CLAIMING_SQL = (
    "SELECT granted, available, replay_state, replay_method, replay_path, replay_body_hash, "
    "replay_status, replay_content_type, replay_body, replay_body_stored "
    "FROM gateway_reserve($1, $2, $3, $4, $5, $6, $7, $8, $9)"
)

# The old key stops at the earlier of its own expiry and the new one (LEAST
# ignores NULL: a key without expiry gets the new one) only if it is not
# revoked, and the new key is made from what the UPDATE returned: nothing
# happens, or both do.
_ROTATE_SQL = f"""
WITH old AS (
    UPDATE api_keys SET expires_at = least(expires_at, $4)
    WHERE id = $1 AND revoked_at IS NULL
    RETURNING team_id, name, environment, rate_limit_per_minute
)
INSERT INTO api_keys (id, team_id, name, prefix, key_hash, environment, rate_limit_per_minute)
SELECT $5, team_id, name, $3, $2, environment, rate_limit_per_minute FROM old
RETURNING {_KEY_COLUMNS}
"""  # noqa: S608 - constant

# Rows arrive summed and in key order (_summed), and are inserted in that order.
_ADD_USAGE_SQL = """
INSERT INTO usage_minutes AS u
    (team_id, minute, key_id, environment, outcome, requests, credits)
SELECT n.team_id, n.minute, n.key_id, n.environment, n.outcome, n.requests, n.credits
FROM unnest($1::text[], $2::bigint[], $3::text[], $4::text[], $5::text[], $6::bigint[],
            $7::bigint[])
    WITH ORDINALITY AS n (team_id, minute, key_id, environment, outcome, requests, credits, o)
ORDER BY n.o
ON CONFLICT (team_id, minute, key_id, environment, outcome) DO UPDATE
SET requests = u.requests + excluded.requests, credits = u.credits + excluded.credits
"""

_ADD_KEY_IPS_SQL = """
INSERT INTO key_ip_days AS k (team_id, key_id, day, client_ip, requests)
SELECT n.team_id, n.key_id, n.day, n.client_ip, n.requests
FROM unnest($1::text[], $2::text[], $3::bigint[], $4::text[], $5::bigint[])
    WITH ORDINALITY AS n (team_id, key_id, day, client_ip, requests, o)
ORDER BY n.o
ON CONFLICT (team_id, key_id, day, client_ip) DO UPDATE
SET requests = k.requests + excluded.requests
"""

_ADD_AUTH_FAILURES_SQL = """
INSERT INTO auth_failure_minutes AS f (minute, key_prefix, client_ip, reason, failures)
SELECT n.minute, n.key_prefix, n.client_ip, n.reason, n.failures
FROM unnest($1::bigint[], $2::text[], $3::text[], $4::text[], $5::bigint[])
    WITH ORDINALITY AS n (minute, key_prefix, client_ip, reason, failures, o)
ORDER BY n.o
ON CONFLICT (minute, key_prefix, client_ip, reason) DO UPDATE
SET failures = f.failures + excluded.failures
"""

# The rows are locked in id order first, as every flush of every process does,
# so that two flushes never wait for each other in a circle. Only a later time
# is written; last_used_at is not among the columns the trigger compares.
_TOUCH_KEYS_SQL = """
WITH given AS (
    SELECT g.id, to_timestamp(g.at) AS at
    FROM unnest($1::text[], $2::float8[]) AS g (id, at)
), locked AS MATERIALIZED (
    SELECT k.id FROM api_keys k JOIN given g ON g.id = k.id
    WHERE k.last_used_at IS NULL OR k.last_used_at < g.at
    ORDER BY k.id
    FOR UPDATE OF k
)
UPDATE api_keys k SET last_used_at = g.at
FROM given g
WHERE k.id = g.id AND k.id IN (SELECT l.id FROM locked l)
  AND (k.last_used_at IS NULL OR k.last_used_at < g.at)
"""

_PRUNE_PATTERNS_SQL = """
WITH ips AS (
    DELETE FROM key_ip_days WHERE day < $1 RETURNING 1
), failures AS (
    DELETE FROM auth_failure_minutes WHERE minute < $2 RETURNING 1
)
SELECT (SELECT count(*) FROM ips) + (SELECT count(*) FROM failures)
"""

# Credit entries ("c<id>") and reservations ("r<id>", at the time they were made)
# of one team, newest first by (created_at, entry_id) in byte order, as on
# SQLite; each side is cut to the page size before the merge.
_LEDGER_SQL = """
SELECT e.* FROM (
    (SELECT ('c' || c.id::text) COLLATE "C" AS entry_id, c.environment, c.kind, c.amount,
            c.reason, NULL::text AS reservation_id, c.created_at
     FROM credit_entries c WHERE c.team_id = $1{credit_cursor}
     ORDER BY c.created_at DESC, entry_id DESC LIMIT $2)
    UNION ALL
    (SELECT ('r' || r.id) COLLATE "C" AS entry_id, r.environment,
            coalesce(r.resolution, 'reserve') AS kind,
            -(CASE WHEN r.resolution IS NULL THEN r.amount ELSE r.charged END)::bigint,
            NULL::text, r.id, r.created_at
     FROM reservations r WHERE r.team_id = $1{reservation_cursor}
     ORDER BY r.created_at DESC, entry_id DESC LIMIT $2)
) e
ORDER BY e.created_at DESC, e.entry_id DESC
LIMIT $2
"""
_LEDGER_CURSOR = (
    " AND ({table}.created_at, ('{kind}' || {table}.id::text) COLLATE \"C\")"
    ' < ($3::timestamptz, $4::text COLLATE "C")'
)

# One statement: the rows deleted are exactly the rows summed. The summary rows
# are written in key order, so two replicas rolling up at once cannot deadlock.
_ROLL_UP_SQL = """
WITH moved AS (
    DELETE FROM reservations
    WHERE id IN (
        SELECT id FROM reservations
        WHERE resolution IS NOT NULL AND resolved_at < now() - make_interval(days => $1)
        ORDER BY resolved_at
        LIMIT $2
        FOR UPDATE SKIP LOCKED
    )
    RETURNING team_id, environment, created_at, amount, charged
), summed AS (
    INSERT INTO reservation_rollups AS r
        (team_id, environment, day, reservations, reserved, charged)
    SELECT team_id, environment, (created_at AT TIME ZONE 'UTC')::date,
           count(*), sum(amount), sum(charged)
    FROM moved
    GROUP BY 1, 2, 3
    ORDER BY 1, 2, 3
    ON CONFLICT (team_id, environment, day) DO UPDATE
    SET reservations = r.reservations + excluded.reservations,
        reserved = r.reserved + excluded.reserved,
        charged = r.charged + excluded.charged
)
SELECT count(*) FROM moved
"""

# The balance derived from immutable facts: grants and adjustments, minus what
# pending reservations hold, minus what resolved ones charged (rolled up or not).
# One statement, so one snapshot: consistent while the ledger is being written.
_RECONCILE_SQL = """
WITH accounts AS (
    SELECT team_id, environment FROM balances
    UNION SELECT team_id, environment FROM credit_entries
    UNION SELECT team_id, environment FROM reservations
    UNION SELECT team_id, environment FROM reservation_rollups
),
granted AS (
    SELECT team_id, environment, sum(amount) AS total FROM credit_entries
    GROUP BY team_id, environment
),
spent AS (
    SELECT team_id, environment,
           sum(CASE WHEN resolution IS NULL THEN amount ELSE charged END) AS total
    FROM reservations GROUP BY team_id, environment
),
rolled AS (
    SELECT team_id, environment, sum(charged) AS total FROM reservation_rollups
    GROUP BY team_id, environment
)
SELECT a.team_id, a.environment,
       coalesce(b.available, 0) AS stored,
       coalesce(g.total, 0) - coalesce(s.total, 0) - coalesce(r.total, 0) AS derived
FROM accounts a
LEFT JOIN balances b USING (team_id, environment)
LEFT JOIN granted g USING (team_id, environment)
LEFT JOIN spent s USING (team_id, environment)
LEFT JOIN rolled r USING (team_id, environment)
"""
