"""The shared backend: store and ledger on PostgreSQL, through an asyncpg pool.

Same semantics as :mod:`gateway.storage.sqlite`, made safe for many replicas:

- Every ledger write is one statement calling a function the migrations
  install (``gateway_reserve``, ``gateway_resolve``, ``gateway_expire``), so a
  batch of any size costs one round trip and holds its balance rows only while
  the function runs. Lease deadlines come from the database clock, so replicas
  with skewed clocks agree on what has expired.
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
import secrets
from collections.abc import AsyncIterator, Callable, Sequence
from typing import TYPE_CHECKING, Any, TypeAlias

import asyncpg
import orjson

from gateway.config import PostgresSettings
from gateway.models import ApiKey, Environment, KeyRecord, LedgerEntry, Team
from gateway.storage import (
    Conflict,
    ExpiryPolicy,
    KeyChange,
    Mismatch,
    NotFound,
    ReserveRequest,
    ReserveResult,
    StorageUnavailable,
)
from gateway.storage._schema import POSTGRES_MIGRATIONS

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
    asyncpg.exceptions.OperatorInterventionError,
    asyncpg.exceptions.InsufficientResourcesError,
    asyncpg.exceptions.ReadOnlySQLTransactionError,
    asyncpg.exceptions.TransactionRollbackError,
)

# Connecting can also fail on the server's terms (no such database, bad password).
_CANNOT_CONNECT: tuple[type[BaseException], ...] = (*_UNAVAILABLE, asyncpg.PostgresError)

_KEY_COLUMNS = (
    "id, team_id, name, prefix, environment, rate_limit_per_minute, disabled, "
    "created_at, last_used_at, expires_at, revoked_at"
)


def _new_id(prefix: str) -> str:
    return f"{prefix}_{secrets.token_hex(8)}"


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
        async with self._connection() as conn:
            for version, script in POSTGRES_MIGRATIONS:
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
        rows = await self._fetch(
            "SELECT granted, available FROM gateway_reserve($1, $2, $3, $4, $5, $6)",
            [r.reservation_id for r in requests],
            [r.team_id for r in requests],
            [r.environment for r in requests],
            [r.key_id for r in requests],
            [r.amount for r in requests],
            self._lease,
        )
        return [ReserveResult(row["granted"], row["available"]) for row in rows]

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
        return int(await self._fetchval("SELECT gateway_expire($1, $2)", policy, limit))

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
        try:
            async with self._connection() as conn, conn.transaction():
                return await self._grant(
                    conn, team_id, environment, amount, reason, actor, idempotency_key
                )
        except asyncpg.UniqueViolationError:
            # Only a concurrent grant with the same key for the other environment
            # gets here (same-environment grants queue on the balance row).
            raise Conflict("this Idempotency-Key was used for a different grant") from None

    @staticmethod
    async def _grant(
        conn: Connection,
        team_id: str,
        environment: Environment,
        amount: int,
        reason: str,
        actor: str,
        idempotency_key: str | None,
    ) -> int:
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
                "SELECT amount, environment FROM credit_entries "
                "WHERE team_id = $1 AND idempotency_key = $2",
                team_id,
                idempotency_key,
            )
            if seen is not None:
                if seen["amount"] != amount or seen["environment"] != environment:
                    raise Conflict("this Idempotency-Key was used for a different grant")
                return current
        if current + amount < 0:
            raise Conflict(
                f"an adjustment of {amount} would take the {environment} balance "
                f"({current}) below zero"
            )
        await conn.execute(
            "INSERT INTO credit_entries (team_id, environment, kind, amount, reason, actor, "
            "idempotency_key) VALUES ($1, $2, $3, $4, $5, $6, $7)",
            team_id,
            environment,
            "grant" if amount >= 0 else "adjust",
            amount,
            reason,
            actor,
            idempotency_key,
        )
        await conn.execute(
            "UPDATE balances SET available = $3 WHERE team_id = $1 AND environment = $2",
            team_id,
            environment,
            current + amount,
        )
        return current + amount

    async def ledger_entries(
        self, team_id: str, limit: int, before: int | None
    ) -> list[LedgerEntry]:
        rows = await self._fetch(
            "SELECT id, team_id, environment, kind, amount, reason, created_at "
            "FROM credit_entries WHERE team_id = $1 AND id < $2 ORDER BY id DESC LIMIT $3",
            team_id,
            before if before is not None else 2**62,
            limit,
        )
        return [
            LedgerEntry(
                r["id"],
                r["team_id"],
                r["environment"],
                r["kind"],
                r["amount"],
                r["reason"],
                None,
                r["created_at"],
            )
            for r in rows
        ]

    async def pending_count(self) -> int:
        return int(
            await self._fetchval("SELECT count(*) FROM reservations WHERE resolution IS NULL")
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
