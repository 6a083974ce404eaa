"""The embedded backend: store and ledger in one SQLite file.

Every call runs on one dedicated thread that owns the connection, so the event
loop never blocks and each batch is one transaction. (aiosqlite offers only
per-statement calls; a whole transaction has to run as one function in the
connection's thread, which is what ``_run`` does.)
"""

from __future__ import annotations

import asyncio
import secrets
import sqlite3
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import orjson

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
    IDEMPOTENCY_TTL_SECONDS,
    Conflict,
    ExpiryPolicy,
    GrantResult,
    IdempotencyClaim,
    IdempotencyRecord,
    InvalidData,
    KeyChange,
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

__all__ = ["SqliteBackend"]

T = TypeVar("T")
_CHANGE_RETENTION_SECONDS = 3600.0
# What sqlite3 raises for a value it cannot take (text that is not UTF-8, an
# integer beyond 64 bits, a constraint): asking again would be refused again.
# Not OperationalError (locked, I/O): that is StorageUnavailable, and passes.
_REFUSED_VALUES: tuple[type[Exception], ...] = (
    UnicodeEncodeError,
    OverflowError,
    sqlite3.IntegrityError,
    sqlite3.DataError,
)


def new_id(prefix: str) -> str:
    return f"{prefix}_{secrets.token_hex(8)}"


def _team(row: sqlite3.Row) -> Team:
    return Team(row["id"], row["name"], row["created_at"], row["rate_limit_per_minute"])


def _api_key(row: sqlite3.Row) -> ApiKey:
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
    )


_KEY_COLUMNS = (
    "id, team_id, name, prefix, environment, rate_limit_per_minute, disabled, "
    "created_at, last_used_at, expires_at, revoked_at"
)
# What a key cache holds of a key besides its hash: a change of one of these
# must reach the caches (the PostgreSQL trigger compares the same columns).
_CACHED_KEY_FIELDS = ("rate_limit_per_minute", "disabled", "expires_at")
_TOKEN_COLUMNS = "id, team_id, name, prefix, created_at, last_used_at, revoked_at"  # noqa: S105


def _token(row: sqlite3.Row) -> TeamToken:
    return TeamToken(
        id=row["id"],
        team_id=row["team_id"],
        name=row["name"],
        prefix=row["prefix"],
        created_at=row["created_at"],
        last_used_at=row["last_used_at"],
        revoked_at=row["revoked_at"],
    )


def _audit(row: sqlite3.Row) -> AuditEntry:
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


def _idempotency_record(row: sqlite3.Row) -> IdempotencyRecord:
    return IdempotencyRecord(
        state=row["state"],
        method=row["method"],
        path=row["path"],
        body_hash=row["body_hash"],
        status=row["status"],
        content_type=row["content_type"],
        body=row["body"],
        body_stored=bool(row["body_stored"]),
    )


# The unexpired record holding a key, if any.
_HELD_SQL = (
    "SELECT state, method, path, body_hash, status, content_type, body, body_stored, "
    "reservation_id FROM idempotency_keys "
    "WHERE team_id = ? AND environment = ? AND idempotency_key = ? AND created_at > ?"
)
# A claim of a key found free: absent, or held by an expired record, which the
# new one replaces.
_CLAIM_SQL = (
    "INSERT INTO idempotency_keys (team_id, environment, idempotency_key, state, method, "
    "path, reservation_id, created_at) VALUES (?, ?, ?, 'in_flight', ?, ?, ?, ?) "
    "ON CONFLICT (team_id, environment, idempotency_key) DO UPDATE SET "
    "state = excluded.state, method = excluded.method, path = excluded.path, "
    "reservation_id = excluded.reservation_id, body_hash = NULL, status = NULL, "
    "content_type = NULL, body = NULL, body_stored = 0, created_at = excluded.created_at, "
    "completed_at = NULL"
)


class SqliteBackend:
    """Store and ledger on SQLite; safe to share the file with CLI processes (WAL)."""

    def __init__(self, path: str, *, lease_seconds: float) -> None:
        self._path = path
        self._lease = lease_seconds
        self._executor: ThreadPoolExecutor | None = None
        self._conn: sqlite3.Connection | None = None

    # -- plumbing -----------------------------------------------------------------

    async def open(self) -> None:
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sqlite")
        await self._run(self._connect)

    def _connect(self) -> None:
        if self._path != ":memory:":
            Path(self._path).parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(self._path, isolation_level=None, timeout=10.0)
        conn.row_factory = sqlite3.Row
        conn.execute("PRAGMA journal_mode=WAL")
        # FULL: a commit (a grant, a batch of reservations) survives power loss
        # too, not only a process crash. Grouped reserves keep the fsyncs few.
        conn.execute("PRAGMA synchronous=FULL")
        conn.execute("PRAGMA foreign_keys=ON")
        self._conn = conn

    async def close(self) -> None:
        if self._executor is None:
            return
        if self._conn is not None:
            await self._run(self._conn.close)
            self._conn = None
        self._executor.shutdown(wait=True)
        self._executor = None

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        if self._executor is None:
            raise StorageUnavailable("the SQLite backend is not open")
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._executor, fn, *args)
        except sqlite3.OperationalError as exc:
            raise StorageUnavailable(f"SQLite: {exc}") from exc

    @property
    def _db(self) -> sqlite3.Connection:
        assert self._conn is not None
        return self._conn

    def _tx(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run ``fn`` in one write transaction (taken at once, so no upgrade deadlocks)."""
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        try:
            result = fn(db)
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")
        return result

    async def ping(self) -> None:
        await self._run(lambda: self._db.execute("SELECT 1").fetchone())

    async def migrate(self) -> list[int]:
        return await self._run(self._migrate)

    def _migrate(self) -> list[int]:
        db = self._db
        db.execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations ("
            "version INTEGER PRIMARY KEY, applied_at REAL NOT NULL)"
        )
        applied: list[int] = []
        for version, script in ((m.version, m.sql) for m in migrations.load("sqlite")):

            def step(db: sqlite3.Connection, version: int = version, script: str = script) -> bool:
                done = db.execute(
                    "SELECT 1 FROM schema_migrations WHERE version = ?", (version,)
                ).fetchone()
                if done:
                    return False
                for statement in script.split(";\n"):
                    if statement.strip():
                        db.execute(statement)
                db.execute(
                    "INSERT INTO schema_migrations (version, applied_at) VALUES (?, ?)",
                    (version, time.time()),
                )
                return True

            if self._tx(step):
                applied.append(version)
        return applied

    # -- store: keys and teams ----------------------------------------------------

    async def find_key(self, key_hash: str) -> KeyRecord | None:
        return await self._run(self._find_key, key_hash)

    def _find_key(self, key_hash: str) -> KeyRecord | None:
        row = self._db.execute(
            "SELECT k.id, k.team_id, k.prefix, k.environment, k.rate_limit_per_minute, "
            "k.disabled, k.expires_at, k.revoked_at, t.rate_limit_per_minute AS team_limit "
            "FROM api_keys k JOIN teams t ON t.id = k.team_id WHERE k.key_hash = ?",
            (key_hash,),
        ).fetchone()
        if row is None:
            return None
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
        )

    async def find_key_id_by_hash(self, key_hash: str) -> str | None:
        row = await self._run(
            lambda: self._db.execute(
                "SELECT id FROM api_keys WHERE key_hash = ?", (key_hash,)
            ).fetchone()
        )
        return None if row is None else str(row["id"])

    async def find_key_hash_by_id(self, key_id: str) -> str | None:
        row = await self._run(
            lambda: self._db.execute(
                "SELECT key_hash FROM api_keys WHERE id = ?", (key_id,)
            ).fetchone()
        )
        return None if row is None else str(row["key_hash"])

    async def latest_key_change(self) -> int:
        row = await self._run(
            lambda: self._db.execute(
                "SELECT COALESCE(MAX(seq), 0) AS s FROM key_changes"
            ).fetchone()
        )
        return int(row["s"])

    async def key_changes_since(self, seq: int) -> tuple[int, list[KeyChange], bool]:
        return await self._run(self._key_changes_since, seq)

    def _key_changes_since(self, seq: int) -> tuple[int, list[KeyChange], bool]:
        rows = self._db.execute(
            "SELECT seq, key_hash, team_id FROM key_changes WHERE seq > ? ORDER BY seq LIMIT 10000",
            (seq,),
        ).fetchall()
        if not rows:
            return seq, [], False
        changes = [KeyChange(r["seq"], r["key_hash"], r["team_id"]) for r in rows]
        # A gap right after what we saw means entries were pruned: the caller
        # must forget everything rather than trust a partial feed.
        gap = changes[0].seq > seq + 1 and seq > 0
        return changes[-1].seq, changes, gap

    @staticmethod
    def _log_change(db: sqlite3.Connection, key_hash: str | None, team_id: str | None) -> None:
        now = time.time()
        db.execute(
            "INSERT INTO key_changes (key_hash, team_id, changed_at) VALUES (?, ?, ?)",
            (key_hash, team_id, now),
        )
        db.execute(
            "DELETE FROM key_changes "
            "WHERE changed_at < ? AND seq < (SELECT MAX(seq) FROM key_changes)",
            (now - _CHANGE_RETENTION_SECONDS,),
        )

    async def create_team(self, name: str, rate_limit_per_minute: int | None = None) -> Team:
        team = Team(new_id("team"), name, time.time(), rate_limit_per_minute)

        def insert(db: sqlite3.Connection) -> Team:
            try:
                db.execute(
                    "INSERT INTO teams (id, name, rate_limit_per_minute, created_at) "
                    "VALUES (?, ?, ?, ?)",
                    (team.id, team.name, team.rate_limit_per_minute, team.created_at),
                )
            except sqlite3.IntegrityError:
                raise Conflict(f"a team named {name!r} already exists") from None
            return team

        return await self._run(self._tx, insert)

    async def get_team(self, id_or_name: str) -> Team:
        row = await self._run(
            lambda: self._db.execute(
                "SELECT * FROM teams WHERE id = ? OR name = ? ORDER BY id = ? DESC LIMIT 1",
                (id_or_name, id_or_name, id_or_name),
            ).fetchone()
        )
        if row is None:
            raise NotFound(f"no team {id_or_name!r}")
        return _team(row)

    async def list_teams(self, limit: int, after: str | None) -> list[Team]:
        rows = await self._run(
            lambda: self._db.execute(
                "SELECT * FROM teams WHERE id > ? ORDER BY id LIMIT ?", (after or "", limit)
            ).fetchall()
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
        key = ApiKey(
            id=new_id("key"),
            team_id=team_id,
            name=name,
            prefix=prefix,
            environment=environment,
            rate_limit_per_minute=rate_limit_per_minute,
            disabled=False,
            created_at=time.time(),
            last_used_at=None,
            expires_at=expires_at,
            revoked_at=None,
        )

        def insert(db: sqlite3.Connection) -> ApiKey:
            if db.execute("SELECT 1 FROM teams WHERE id = ?", (team_id,)).fetchone() is None:
                raise NotFound(f"no team {team_id!r}")
            db.execute(
                "INSERT INTO api_keys (id, team_id, name, prefix, key_hash, environment, "
                "rate_limit_per_minute, disabled, created_at, expires_at) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, 0, ?, ?)",
                (
                    key.id,
                    team_id,
                    name,
                    prefix,
                    key_hash,
                    environment,
                    rate_limit_per_minute,
                    key.created_at,
                    expires_at,
                ),
            )
            # A new key may have been looked up (and cached as unknown) before it existed.
            self._log_change(db, key_hash, None)
            return key

        return await self._run(self._tx, insert)

    async def get_key(self, key_id: str) -> ApiKey:
        row = await self._run(
            lambda: self._db.execute(
                f"SELECT {_KEY_COLUMNS} FROM api_keys WHERE id = ?",  # noqa: S608 - constant
                (key_id,),
            ).fetchone()
        )
        if row is None:
            raise NotFound(f"no key {key_id!r}")
        return _api_key(row)

    async def list_keys(self, team_id: str, limit: int, after: str | None) -> list[ApiKey]:
        rows = await self._run(
            lambda: self._db.execute(
                f"SELECT {_KEY_COLUMNS} FROM api_keys "  # noqa: S608 - constant
                "WHERE team_id = ? AND id > ? ORDER BY id LIMIT ?",
                (team_id, after or "", limit),
            ).fetchall()
        )
        return [_api_key(r) for r in rows]

    async def revoke_key(self, key_id: str) -> ApiKey:
        def revoke(db: sqlite3.Connection) -> None:
            row = db.execute(
                "SELECT key_hash, revoked_at FROM api_keys WHERE id = ?", (key_id,)
            ).fetchone()
            if row is None:
                raise NotFound(f"no key {key_id!r}")
            if row["revoked_at"] is not None:
                raise Conflict(f"key {key_id!r} is already revoked")
            db.execute("UPDATE api_keys SET revoked_at = ? WHERE id = ?", (time.time(), key_id))
            self._log_change(db, row["key_hash"], None)

        await self._run(self._tx, revoke)
        return await self.get_key(key_id)

    async def update_team(self, team_id: str, rate_limit_per_minute: int | None) -> Team:
        def update(db: sqlite3.Connection) -> Team:
            old = db.execute(
                "SELECT rate_limit_per_minute FROM teams WHERE id = ?", (team_id,)
            ).fetchone()
            if old is None:
                raise NotFound(f"no team {team_id!r}")
            row = db.execute(
                "UPDATE teams SET rate_limit_per_minute = ? WHERE id = ? RETURNING *",
                (rate_limit_per_minute, team_id),
            ).fetchone()
            if old["rate_limit_per_minute"] != rate_limit_per_minute:
                self._log_change(db, None, team_id)
            return _team(row)

        return await self._run(self._tx, update)

    async def update_key(self, key_id: str, changes: Mapping[str, object]) -> ApiKey:
        checked = checked_key_changes(changes)
        values = {
            field: int(value) if isinstance(value, bool) else value
            for field, value in checked.items()
        }

        def update(db: sqlite3.Connection) -> ApiKey:
            old = db.execute(
                f"SELECT key_hash, {_KEY_COLUMNS} FROM api_keys WHERE id = ?",  # noqa: S608 - constant
                (key_id,),
            ).fetchone()
            if old is None:
                raise NotFound(f"no key {key_id!r}")
            if old["revoked_at"] is not None:
                raise Conflict(f"key {key_id!r} is revoked")
            if not values:
                return _api_key(old)
            # Column names come from KEY_FIELDS only (checked_key_changes).
            assignments = ", ".join(f"{field} = ?" for field in values)
            new = db.execute(
                f"UPDATE api_keys SET {assignments} WHERE id = ? "  # noqa: S608 - checked names
                f"RETURNING {_KEY_COLUMNS}",
                (*values.values(), key_id),
            ).fetchone()
            if any(old[f] != new[f] for f in _CACHED_KEY_FIELDS):
                self._log_change(db, old["key_hash"], None)
            return _api_key(new)

        return await self._run(self._tx, update)

    async def rotate_key(
        self, key_id: str, new_hash: str, new_prefix: str, old_expires_at: float
    ) -> ApiKey:
        fresh_id = new_id("key")
        now = time.time()

        def rotate(db: sqlite3.Connection) -> ApiKey:
            old = db.execute(
                "SELECT key_hash, team_id, name, environment, rate_limit_per_minute, "
                "expires_at, revoked_at FROM api_keys WHERE id = ?",
                (key_id,),
            ).fetchone()
            if old is None:
                raise NotFound(f"no key {key_id!r}")
            if old["revoked_at"] is not None:
                raise Conflict(f"key {key_id!r} is revoked")
            try:
                new = db.execute(
                    "INSERT INTO api_keys (id, team_id, name, prefix, key_hash, environment, "  # noqa: S608 - constant
                    "rate_limit_per_minute, disabled, created_at) "
                    f"VALUES (?, ?, ?, ?, ?, ?, ?, 0, ?) RETURNING {_KEY_COLUMNS}",
                    (
                        fresh_id,
                        old["team_id"],
                        old["name"],
                        new_prefix,
                        new_hash,
                        old["environment"],
                        old["rate_limit_per_minute"],
                        now,
                    ),
                ).fetchone()
            except sqlite3.IntegrityError:
                raise Conflict("a key with this hash exists already") from None
            self._log_change(db, new_hash, None)
            expires = old_expires_at
            if old["expires_at"] is not None:
                expires = min(old["expires_at"], old_expires_at)
            if expires != old["expires_at"]:
                db.execute("UPDATE api_keys SET expires_at = ? WHERE id = ?", (expires, key_id))
                self._log_change(db, old["key_hash"], None)
            return _api_key(new)

        return await self._run(self._tx, rotate)

    # -- admin: team tokens and the audit log -------------------------------------

    async def create_token(
        self, team_id: str, name: str, token_hash: str, prefix: str
    ) -> TeamToken:
        token = TeamToken(new_id("tok"), team_id, name, prefix, time.time(), None, None)

        def insert(db: sqlite3.Connection) -> TeamToken:
            if db.execute("SELECT 1 FROM teams WHERE id = ?", (team_id,)).fetchone() is None:
                raise NotFound(f"no team {team_id!r}")
            try:
                db.execute(
                    "INSERT INTO team_tokens (id, team_id, name, prefix, token_hash, created_at) "
                    "VALUES (?, ?, ?, ?, ?, ?)",
                    (token.id, team_id, name, prefix, token_hash, token.created_at),
                )
            except sqlite3.IntegrityError:
                raise Conflict("a token with this hash exists already") from None
            return token

        return await self._run(self._tx, insert)

    async def list_tokens(self, team_id: str, limit: int, after: str | None) -> list[TeamToken]:
        rows = await self._run(
            lambda: self._db.execute(
                f"SELECT {_TOKEN_COLUMNS} FROM team_tokens "  # noqa: S608 - constant
                "WHERE team_id = ? AND id > ? ORDER BY id LIMIT ?",
                (team_id, after or "", limit),
            ).fetchall()
        )
        return [_token(r) for r in rows]

    async def get_token(self, token_id: str) -> TeamToken:
        row = await self._run(
            lambda: self._db.execute(
                f"SELECT {_TOKEN_COLUMNS} FROM team_tokens WHERE id = ?",  # noqa: S608 - constant
                (token_id,),
            ).fetchone()
        )
        if row is None:
            raise NotFound(f"no token {token_id!r}")
        return _token(row)

    async def revoke_token(self, token_id: str) -> TeamToken:
        def revoke(db: sqlite3.Connection) -> TeamToken:
            row = db.execute(
                "UPDATE team_tokens SET revoked_at = ? "  # noqa: S608 - constant
                f"WHERE id = ? AND revoked_at IS NULL RETURNING {_TOKEN_COLUMNS}",
                (time.time(), token_id),
            ).fetchone()
            if row is not None:
                return _token(row)
            if db.execute("SELECT 1 FROM team_tokens WHERE id = ?", (token_id,)).fetchone():
                raise Conflict(f"token {token_id!r} is already revoked")
            raise NotFound(f"no token {token_id!r}")

        return await self._run(self._tx, revoke)

    async def find_token(self, token_hash: str) -> TeamToken | None:
        row = await self._run(
            lambda: self._db.execute(
                f"SELECT {_TOKEN_COLUMNS} FROM team_tokens WHERE token_hash = ?",  # noqa: S608 - constant
                (token_hash,),
            ).fetchone()
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
        encoded = orjson.dumps(details).decode()
        await self._run(
            self._tx,
            lambda db: db.execute(
                "INSERT INTO audit_log (at, actor, action, target, team_id, client_ip, details) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)",
                (time.time(), actor, action, target, team_id, client_ip, encoded),
            ),
        )

    async def list_audit(
        self, team_id: str | None, limit: int, before: int | None
    ) -> list[AuditEntry]:
        upper = before if before is not None else 2**62
        if team_id is None:
            query = "SELECT * FROM audit_log WHERE id < ? ORDER BY id DESC LIMIT ?"
            args: tuple[object, ...] = (upper, limit)
        else:
            query = "SELECT * FROM audit_log WHERE team_id = ? AND id < ? ORDER BY id DESC LIMIT ?"
            args = (team_id, upper, limit)
        rows = await self._run(lambda: self._db.execute(query, args).fetchall())
        return [_audit(r) for r in rows]

    # -- usage and patterns ---------------------------------------------------------

    async def add_usage(self, rows: list[UsageRow]) -> None:
        if not rows:
            return
        params = [
            (r.team_id, r.minute, r.key_id, r.environment, r.outcome, r.requests, r.credits)
            for r in rows
        ]
        await self._write_batch(
            "INSERT INTO usage_minutes "
            "(team_id, minute, key_id, environment, outcome, requests, credits) "
            "VALUES (?, ?, ?, ?, ?, ?, ?) "
            "ON CONFLICT (team_id, minute, key_id, environment, outcome) DO UPDATE SET "
            "requests = requests + excluded.requests, credits = credits + excluded.credits",
            params,
        )

    async def _write_batch(self, statement: str, params: Sequence[Sequence[object]]) -> None:
        """``statement`` once per row, in one transaction; refused values raise InvalidData."""
        try:
            await self._run(self._tx, lambda db: db.executemany(statement, params))
        except _REFUSED_VALUES as exc:
            raise InvalidData(f"SQLite: {type(exc).__name__}: {exc}") from exc

    async def touch_keys(self, last_used: dict[str, float]) -> None:
        # last_used_at is not cached: no key change is logged.
        if not last_used:
            return
        params = [(at, key_id, at) for key_id, at in sorted(last_used.items())]
        await self._write_batch(
            "UPDATE api_keys SET last_used_at = ? "
            "WHERE id = ? AND (last_used_at IS NULL OR last_used_at < ?)",
            params,
        )

    async def usage_buckets(
        self, team_id: str, start: int, end: float, step: int, key_id: str | None
    ) -> list[tuple[int, str, int, int]]:
        query = (
            "SELECT ? + ((minute - ?) / ?) * ? AS bucket, outcome, "
            "SUM(requests) AS requests, SUM(credits) AS credits FROM usage_minutes "
            "WHERE team_id = ? AND minute >= ? AND minute < ?"
        )
        args: tuple[object, ...] = (start, start, step, step, team_id, start, end)
        if key_id is not None:
            query += " AND key_id = ?"
            args += (key_id,)
        query += " GROUP BY bucket, outcome ORDER BY bucket, outcome"
        rows = await self._run(lambda: self._db.execute(query, args).fetchall())
        return [(int(r[0]), r[1], int(r[2]), int(r[3])) for r in rows]

    async def usage_top_keys(
        self, team_id: str, start: int, end: float, limit: int
    ) -> list[tuple[str, int, int]]:
        rows = await self._run(
            lambda: self._db.execute(
                "SELECT key_id, SUM(requests) AS requests, SUM(credits) AS credits "
                "FROM usage_minutes WHERE team_id = ? AND minute >= ? AND minute < ? "
                "GROUP BY key_id ORDER BY requests DESC, key_id LIMIT ?",
                (team_id, start, end, limit),
            ).fetchall()
        )
        return [(r[0], int(r[1]), int(r[2])) for r in rows]

    async def add_key_ips(self, rows: list[tuple[int, str, str, str, int]]) -> None:
        if not rows:
            return
        params = [(team, key, day, ip, n) for day, team, key, ip, n in rows]
        await self._write_batch(
            "INSERT INTO key_ip_days (team_id, key_id, day, client_ip, requests) "
            "VALUES (?, ?, ?, ?, ?) "
            "ON CONFLICT (team_id, key_id, day, client_ip) DO UPDATE SET "
            "requests = requests + excluded.requests",
            params,
        )

    async def key_ips(
        self, team_id: str, key_id: str | None, start_day: int, end_day: int
    ) -> list[tuple[int, str, str, int]]:
        query = (
            "SELECT day, key_id, client_ip, requests FROM key_ip_days "
            "WHERE team_id = ? AND day >= ? AND day < ?"
        )
        args: tuple[object, ...] = (team_id, start_day, end_day)
        if key_id is not None:
            query += " AND key_id = ?"
            args += (key_id,)
        query += " ORDER BY day, key_id, client_ip"
        rows = await self._run(lambda: self._db.execute(query, args).fetchall())
        return [(int(r[0]), r[1], r[2], int(r[3])) for r in rows]

    async def add_auth_failures(self, rows: list[tuple[int, str, str, str, int]]) -> None:
        if not rows:
            return
        await self._write_batch(
            "INSERT INTO auth_failure_minutes "
            "(minute, key_prefix, client_ip, reason, failures) VALUES (?, ?, ?, ?, ?) "
            "ON CONFLICT (minute, key_prefix, client_ip, reason) DO UPDATE SET "
            "failures = failures + excluded.failures",
            rows,
        )

    async def auth_failure_counts(
        self, start: int, end: float, limit: int
    ) -> list[tuple[str, str, str, int]]:
        rows = await self._run(
            lambda: self._db.execute(
                "SELECT key_prefix, client_ip, reason, SUM(failures) AS n "
                "FROM auth_failure_minutes WHERE minute >= ? AND minute < ? "
                "GROUP BY key_prefix, client_ip, reason "
                "ORDER BY n DESC, key_prefix, client_ip, reason LIMIT ?",
                (start, end, limit),
            ).fetchall()
        )
        return [(r[0], r[1], r[2], int(r[3])) for r in rows]

    async def prune_patterns(self, ip_before: int, failures_before: int) -> int:
        def prune(db: sqlite3.Connection) -> int:
            ips = db.execute("DELETE FROM key_ip_days WHERE day < ?", (ip_before,)).rowcount
            failures = db.execute(
                "DELETE FROM auth_failure_minutes WHERE minute < ?", (failures_before,)
            ).rowcount
            return ips + failures

        return await self._run(self._tx, prune)

    # -- ledger -------------------------------------------------------------------

    async def reserve_batch(self, requests: Sequence[ReserveRequest]) -> list[ReserveResult]:
        return await self._run(self._tx, lambda db: self._reserve(db, requests))

    def _reserve(
        self, db: sqlite3.Connection, requests: Sequence[ReserveRequest]
    ) -> list[ReserveResult]:
        now = time.time()
        deadline = now + self._lease
        available: dict[tuple[str, str], int] = {}
        results: list[ReserveResult] = []
        for req in requests:
            account = (req.team_id, req.environment)
            if account not in available:
                row = db.execute(
                    "SELECT available FROM balances WHERE team_id = ? AND environment = ?",
                    account,
                ).fetchone()
                available[account] = 0 if row is None else int(row["available"])
            have = available[account]
            claim = req.idempotency
            held: sqlite3.Row | None = None
            if claim is not None:
                # Records written earlier in this batch are seen too (same transaction).
                held = db.execute(
                    _HELD_SQL,
                    (req.team_id, req.environment, claim.key, now - IDEMPOTENCY_TTL_SECONDS),
                ).fetchone()
                # A retry of the reservation that made the record is a retried id, no replay.
                if held is not None and held["reservation_id"] != req.reservation_id:
                    results.append(ReserveResult(False, have, _idempotency_record(held)))
                    continue
            if have < req.amount:
                results.append(ReserveResult(False, have))
                continue
            inserted = db.execute(
                "INSERT OR IGNORE INTO reservations (id, team_id, environment, key_id, amount, "
                "created_at, lease_deadline) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (
                    req.reservation_id,
                    req.team_id,
                    req.environment,
                    req.key_id,
                    req.amount,
                    now,
                    deadline,
                ),
            ).rowcount
            if inserted:  # a retried id was reserved already: never take twice
                have -= req.amount
                available[account] = have
            if claim is not None and held is None:
                db.execute(
                    _CLAIM_SQL,
                    (
                        req.team_id,
                        req.environment,
                        claim.key,
                        claim.method,
                        claim.path,
                        req.reservation_id,
                        now,
                    ),
                )
            results.append(ReserveResult(True, have))
        for (team_id, environment), have in available.items():
            db.execute(
                "UPDATE balances SET available = ? WHERE team_id = ? AND environment = ?",
                (have, team_id, environment),
            )
        return results

    async def post_batch(self, posts: Sequence[tuple[str, int]]) -> int:
        return await self._run(self._tx, lambda db: self._resolve(db, posts, "post"))

    async def void_batch(self, reservation_ids: Sequence[str]) -> int:
        return await self._run(
            self._tx, lambda db: self._resolve(db, [(r, 0) for r in reservation_ids], "void")
        )

    @staticmethod
    def _resolve(db: sqlite3.Connection, items: Sequence[tuple[str, int]], kind: str) -> int:
        """Resolve each pending reservation once; late or unknown ones change nothing."""
        now = time.time()
        applied = 0
        for reservation_id, charged in items:
            row = db.execute(
                "UPDATE reservations SET resolution = ?, charged = MIN(?, amount), resolved_at = ? "
                "WHERE id = ? AND resolution IS NULL "
                "RETURNING team_id, environment, amount - charged AS refund",
                (kind, max(charged, 0), now, reservation_id),
            ).fetchone()
            if row is None:
                continue
            applied += 1
            if row["refund"]:
                db.execute(
                    "UPDATE balances SET available = available + ? "
                    "WHERE team_id = ? AND environment = ?",
                    (row["refund"], row["team_id"], row["environment"]),
                )
        return applied

    async def expire_reservations(self, policy: ExpiryPolicy, limit: int = 1000) -> int:
        def expire(db: sqlite3.Connection) -> int:
            rows = db.execute(
                "SELECT id, amount FROM reservations "
                "WHERE resolution IS NULL AND lease_deadline < ? ORDER BY lease_deadline LIMIT ?",
                (time.time(), limit),
            ).fetchall()
            kind = "expire_" + policy
            items = [(r["id"], r["amount"] if policy == "post" else 0) for r in rows]
            # An Idempotency-Key still "in flight" after a whole lease belongs to an
            # attempt that never finished (a crash): free it, so a retry is judged afresh.
            db.execute(
                "DELETE FROM idempotency_keys WHERE state = 'in_flight' AND created_at < ?",
                (time.time() - self._lease,),
            )
            return self._resolve(db, items, kind)

        return await self._run(self._tx, expire)

    async def balance(self, team_id: str, environment: Environment) -> int:
        row = await self._run(
            lambda: self._db.execute(
                "SELECT available FROM balances WHERE team_id = ? AND environment = ?",
                (team_id, environment),
            ).fetchone()
        )
        return 0 if row is None else int(row["available"])

    async def balances(self, team_id: str) -> dict[str, int]:
        rows = await self._run(
            lambda: self._db.execute(
                "SELECT environment, available FROM balances WHERE team_id = ?", (team_id,)
            ).fetchall()
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
        def grant(db: sqlite3.Connection) -> GrantResult:
            if db.execute("SELECT 1 FROM teams WHERE id = ?", (team_id,)).fetchone() is None:
                raise NotFound(f"no team {team_id!r}")
            if idempotency_key is not None:
                seen = db.execute(
                    "SELECT amount, environment, request_hash, balance_after FROM credit_entries "
                    "WHERE team_id = ? AND idempotency_key = ?",
                    (team_id, idempotency_key),
                ).fetchone()
                if seen is not None:
                    return replayed_grant(dict(seen), amount, environment, request_hash)
            row = db.execute(
                "SELECT available FROM balances WHERE team_id = ? AND environment = ?",
                (team_id, environment),
            ).fetchone()
            current = 0 if row is None else int(row["available"])
            check_grant(current, amount, environment)
            db.execute(
                "INSERT INTO credit_entries (team_id, environment, kind, amount, reason, actor, "
                "idempotency_key, request_hash, balance_after, created_at) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    team_id,
                    environment,
                    "grant" if amount >= 0 else "adjust",
                    amount,
                    reason,
                    actor,
                    idempotency_key,
                    request_hash,
                    current + amount,
                    time.time(),
                ),
            )
            db.execute(
                "INSERT INTO balances (team_id, environment, available) VALUES (?, ?, ?) "
                "ON CONFLICT (team_id, environment) DO UPDATE SET available = excluded.available",
                (team_id, environment, current + amount),
            )
            return GrantResult(current + amount, replayed=False)

        return await self._run(self._tx, grant)

    async def ledger_entries(
        self, team_id: str, limit: int, before: str | None
    ) -> list[LedgerEntry]:
        if before is None:
            query = _LEDGER_SQL.format(credit_cursor="", reservation_cursor="")
            args: tuple[object, ...] = (team_id, limit, team_id, limit, limit)
        else:
            at, entry_id = decode_ledger_cursor(before)
            query = _LEDGER_SQL.format(
                credit_cursor=" AND (created_at, 'c' || id) < (?, ?)",
                reservation_cursor=" AND (created_at, 'r' || id) < (?, ?)",
            )
            args = (team_id, at, entry_id, limit, team_id, at, entry_id, limit, limit)
        rows = await self._run(lambda: self._db.execute(query, args).fetchall())
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
        row = await self._run(
            lambda: self._db.execute(
                "SELECT COUNT(*) AS n FROM reservations WHERE resolution IS NULL"
            ).fetchone()
        )
        return int(row["n"])

    async def claim_idempotency(
        self, team_id: str, environment: Environment, claim: IdempotencyClaim
    ) -> IdempotencyRecord | None:
        def claim_key(db: sqlite3.Connection) -> IdempotencyRecord | None:
            now = time.time()
            held = db.execute(
                _HELD_SQL, (team_id, environment, claim.key, now - IDEMPOTENCY_TTL_SECONDS)
            ).fetchone()
            if held is not None:
                return _idempotency_record(held)
            db.execute(
                _CLAIM_SQL, (team_id, environment, claim.key, claim.method, claim.path, None, now)
            )
            return None

        return await self._run(self._tx, claim_key)

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
        await self._run(
            self._tx,
            lambda db: db.execute(
                "UPDATE idempotency_keys SET state = 'completed', body_hash = ?, status = ?, "
                "content_type = ?, body = ?, body_stored = ?, completed_at = ? "
                "WHERE team_id = ? AND environment = ? AND idempotency_key = ? "
                "AND state = 'in_flight'",
                (
                    body_hash,
                    status,
                    content_type,
                    body,
                    int(body is not None),
                    time.time(),
                    team_id,
                    environment,
                    key,
                ),
            ),
        )

    async def release_idempotency(self, team_id: str, environment: Environment, key: str) -> None:
        await self._run(
            self._tx,
            lambda db: db.execute(
                "DELETE FROM idempotency_keys "
                "WHERE team_id = ? AND environment = ? AND idempotency_key = ? "
                "AND state = 'in_flight'",
                (team_id, environment, key),
            ),
        )

    async def prune_idempotency(self, before: float) -> int:
        return await self._run(
            self._tx,
            lambda db: (
                db.execute("DELETE FROM idempotency_keys WHERE created_at < ?", (before,)).rowcount
            ),
        )

    async def reconcile(self) -> list[Mismatch]:
        rows = await self._run(lambda: self._db.execute(_RECONCILE_SQL).fetchall())
        return [
            Mismatch(r["team_id"], r["environment"], int(r["stored"]), int(r["derived"]))
            for r in rows
            if int(r["stored"]) != int(r["derived"])
        ]

    async def roll_up(self, older_than_days: int) -> int:
        """Fold reservations resolved more than ``older_than_days`` ago into per-day rows.

        Works in chunks, each its own transaction, so reservations are never
        held up for long. Returns how many reservations were folded.
        """
        cutoff = time.time() - older_than_days * 86_400.0

        def chunk(db: sqlite3.Connection) -> int:
            # Both statements pick the same rows: same query, same transaction.
            db.execute(_ROLL_UP_SQL, (cutoff, _ROLL_UP_CHUNK))
            return db.execute(
                "DELETE FROM reservations WHERE id IN (" + _ROLL_UP_CHOSEN + ")",  # noqa: S608 - constant
                (cutoff, _ROLL_UP_CHUNK),
            ).rowcount

        total = 0
        while True:
            moved: int = await self._run(self._tx, chunk)
            total += moved
            if moved < _ROLL_UP_CHUNK:
                return total


# Credit entries ("c<id>") and reservations ("r<id>", at the time they were made)
# of one team, newest first by (created_at, entry_id); each side is cut to the
# page size before the merge, so a page reads at most twice its length.
_LEDGER_SQL = """
SELECT * FROM (
    SELECT * FROM (
        SELECT 'c' || id AS entry_id, environment, kind, amount, reason,
               NULL AS reservation_id, created_at
        FROM credit_entries WHERE team_id = ?{credit_cursor}
        ORDER BY created_at DESC, entry_id DESC LIMIT ?
    )
    UNION ALL
    SELECT * FROM (
        SELECT 'r' || id AS entry_id, environment, COALESCE(resolution, 'reserve') AS kind,
               -(CASE WHEN resolution IS NULL THEN amount ELSE charged END) AS amount,
               NULL AS reason, id AS reservation_id, created_at
        FROM reservations WHERE team_id = ?{reservation_cursor}
        ORDER BY created_at DESC, entry_id DESC LIMIT ?
    )
)
ORDER BY created_at DESC, entry_id DESC LIMIT ?
"""

_ROLL_UP_CHUNK = 10_000
_ROLL_UP_CHOSEN = (
    "SELECT id FROM reservations WHERE resolution IS NOT NULL AND resolved_at < ? "
    "ORDER BY resolved_at, id LIMIT ?"
)
_ROLL_UP_SQL = (
    "INSERT INTO reservation_rollups "
    "(team_id, environment, day, reservations, reserved, charged) "
    "SELECT team_id, environment, date(created_at, 'unixepoch'), "
    "COUNT(*), SUM(amount), SUM(charged) "
    "FROM reservations WHERE id IN (" + _ROLL_UP_CHOSEN + ") "
    "GROUP BY 1, 2, 3 "
    "ON CONFLICT (team_id, environment, day) DO UPDATE SET "
    "reservations = reservations + excluded.reservations, "
    "reserved = reserved + excluded.reserved, "
    "charged = charged + excluded.charged"
)


# The balance derived from immutable facts: grants and adjustments, minus what
# pending reservations hold, minus what resolved ones charged (rolled up or not).
_RECONCILE_SQL = """
WITH accounts AS (
    SELECT team_id, environment FROM balances
    UNION SELECT team_id, environment FROM credit_entries
    UNION SELECT team_id, environment FROM reservations
    UNION SELECT team_id, environment FROM reservation_rollups
),
granted AS (
    SELECT team_id, environment, SUM(amount) AS total FROM credit_entries
    GROUP BY team_id, environment
),
spent AS (
    SELECT team_id, environment,
           SUM(CASE WHEN resolution IS NULL THEN amount ELSE charged END) AS total
    FROM reservations GROUP BY team_id, environment
),
rolled AS (
    SELECT team_id, environment, SUM(charged) AS total FROM reservation_rollups
    GROUP BY team_id, environment
)
SELECT a.team_id, a.environment,
       COALESCE(b.available, 0) AS stored,
       COALESCE(g.total, 0) - COALESCE(s.total, 0) - COALESCE(r.total, 0) AS derived
FROM accounts a
LEFT JOIN balances b USING (team_id, environment)
LEFT JOIN granted g USING (team_id, environment)
LEFT JOIN spent s USING (team_id, environment)
LEFT JOIN rolled r USING (team_id, environment)
"""
