"""The PostgreSQL backend's core: the pool, the kept reserve connection, migrations.

A failure to reach the server (refused, reset, timed out, shut down) is
raised as :class:`StorageUnavailable`; the caller answers 503.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any, TypeAlias, TypeVar

import asyncpg

from gateway.config import PostgresSettings
from gateway.storage import (
    Audit,
    EventRecord,
    StorageUnavailable,
    migrations,
    rules,
)
from gateway.storage.shared import SharedMethods

__all__ = [
    "CANNOT_CONNECT",
    "REFUSED_VALUES",
    "UNAVAILABLE",
    "Connection",
    "PostgresCore",
    "insert_event",
    "log",
]

log = logging.getLogger("gateway.storage.postgres")

T = TypeVar("T")

if TYPE_CHECKING:
    from asyncpg.pool import PoolConnectionProxy

    Connection: TypeAlias = PoolConnectionProxy[asyncpg.Record]

# Taken by every migrating process, so that replicas starting together migrate once.
_MIGRATION_LOCK = 0x6761_7465_7761_79  # "gateway"
_MIGRATION_TIMEOUT = 600.0
# PostgreSQL counts time from 2000-01-01 UTC.
_PG_EPOCH = 946_684_800
# The listener's checks: a dropped connection is noticed within about this long.

# What "the database cannot be reached right now" looks like. TimeoutError is the
# client-side command timeout; class 57 is the server shutting down or cancelling
# (statement_timeout), 53 out of connections or resources, 25006 a read-only
# standby after a failover, 40 a transaction the server rolled back.
UNAVAILABLE: tuple[type[BaseException], ...] = (
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
REFUSED_VALUES: tuple[type[Exception], ...] = (
    asyncpg.DataError,
    asyncpg.IntegrityConstraintViolationError,
    UnicodeEncodeError,
    OverflowError,
)

# Connecting can also fail on the server's terms (no such database, bad password).
CANNOT_CONNECT: tuple[type[BaseException], ...] = (*UNAVAILABLE, asyncpg.PostgresError)


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


class PostgresCore(SharedMethods):
    """The pool and its connections; the area classes build on it."""

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
        except CANNOT_CONNECT as exc:
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
        except UNAVAILABLE as exc:
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
        except UNAVAILABLE as exc:
            raise StorageUnavailable(f"PostgreSQL: {type(exc).__name__}: {exc}") from exc
        finally:
            self._pinned_busy = False

    @contextlib.asynccontextmanager
    async def _transaction(self) -> AsyncIterator[Connection]:
        async with self._connection() as conn, conn.transaction():
            yield conn

    @staticmethod
    async def _write_audit(conn: Connection, audit: Audit[T] | None, made: T) -> T:
        """Write the audit entry of the change that made ``made``, and its events, in its
        transaction."""
        if audit is not None:
            entry = audit(made)
            await conn.execute(
                "INSERT INTO audit_log (actor, action, target, team_id, client_ip, details) "
                "VALUES ($1, $2, $3, $4, $5, $6::jsonb)",
                *entry.values(),
            )
            for event in entry.events:
                await insert_event(conn, event)
        return made

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


async def insert_event(conn: Connection, event: EventRecord, *, dispatched: bool = False) -> str:
    """Write one event in the caller's transaction; its id ('' when its dedupe key was seen)."""
    event_id = rules.new_id("evt")
    written = await conn.fetchval(
        "INSERT INTO events (id, type, team_id, data, dedupe_key, dispatched) "
        "VALUES ($1, $2, $3, $4::jsonb, $5, $6) ON CONFLICT (dedupe_key) DO NOTHING RETURNING 1",
        event_id, event.type, event.team_id, event.data_json(), event.dedupe_key, dispatched,
    )  # fmt: skip
    return event_id if written else ""
