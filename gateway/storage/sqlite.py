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
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

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
from gateway.storage._schema import SQLITE_MIGRATIONS

__all__ = ["SqliteBackend"]

T = TypeVar("T")
_CHANGE_RETENTION_SECONDS = 3600.0


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
        for version, script in SQLITE_MIGRATIONS:

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
        def grant(db: sqlite3.Connection) -> int:
            if db.execute("SELECT 1 FROM teams WHERE id = ?", (team_id,)).fetchone() is None:
                raise NotFound(f"no team {team_id!r}")
            if idempotency_key is not None:
                seen = db.execute(
                    "SELECT amount, environment FROM credit_entries "
                    "WHERE team_id = ? AND idempotency_key = ?",
                    (team_id, idempotency_key),
                ).fetchone()
                if seen is not None:
                    if seen["amount"] != amount or seen["environment"] != environment:
                        raise Conflict("this Idempotency-Key was used for a different grant")
                    row = db.execute(
                        "SELECT available FROM balances WHERE team_id = ? AND environment = ?",
                        (team_id, environment),
                    ).fetchone()
                    return int(row["available"])
            row = db.execute(
                "SELECT available FROM balances WHERE team_id = ? AND environment = ?",
                (team_id, environment),
            ).fetchone()
            current = 0 if row is None else int(row["available"])
            if current + amount < 0:
                raise Conflict(
                    f"an adjustment of {amount} would take the {environment} balance "
                    f"({current}) below zero"
                )
            db.execute(
                "INSERT INTO credit_entries (team_id, environment, kind, amount, reason, actor, "
                "idempotency_key, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    team_id,
                    environment,
                    "grant" if amount >= 0 else "adjust",
                    amount,
                    reason,
                    actor,
                    idempotency_key,
                    time.time(),
                ),
            )
            db.execute(
                "INSERT INTO balances (team_id, environment, available) VALUES (?, ?, ?) "
                "ON CONFLICT (team_id, environment) DO UPDATE SET available = excluded.available",
                (team_id, environment, current + amount),
            )
            return current + amount

        return await self._run(self._tx, grant)

    async def ledger_entries(
        self, team_id: str, limit: int, before: int | None
    ) -> list[LedgerEntry]:
        rows = await self._run(
            lambda: self._db.execute(
                "SELECT id, team_id, environment, kind, amount, reason, created_at "
                "FROM credit_entries WHERE team_id = ? AND id < ? ORDER BY id DESC LIMIT ?",
                (team_id, before if before is not None else 2**62, limit),
            ).fetchall()
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
        row = await self._run(
            lambda: self._db.execute(
                "SELECT COUNT(*) AS n FROM reservations WHERE resolution IS NULL"
            ).fetchone()
        )
        return int(row["n"])

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
