"""The SQLite backend's core: its one connection, on one thread, and migrations.

Every call runs on one dedicated thread that owns the connection, so the event
loop never blocks and each batch is one transaction. (aiosqlite offers only
per-statement calls; a whole transaction has to run as one function in the
connection's thread, which is what ``_run`` does.)
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from gateway.storage import (
    Audit,
    EventRecord,
    StorageUnavailable,
    migrations,
    rules,
)
from gateway.storage.shared import SharedMethods

__all__ = ["REFUSED_VALUES", "SqliteCore", "insert_event"]

T = TypeVar("T")
# What sqlite3 raises for a value it cannot take (text that is not UTF-8, an
# integer beyond 64 bits, a constraint): asking again would be refused again.
# Not OperationalError (locked, I/O): that is StorageUnavailable, and passes.
REFUSED_VALUES: tuple[type[Exception], ...] = (
    UnicodeEncodeError,
    OverflowError,
    sqlite3.IntegrityError,
    sqlite3.DataError,
)


class SqliteCore(SharedMethods):
    """The connection, its thread and transactions; the area classes build on it."""

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
        # The request log's search by network (PostgreSQL compares inet instead).
        conn.create_function("ip_within", 2, rules.ip_within, deterministic=True)
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

    @staticmethod
    def _write_audit(db: sqlite3.Connection, audit: Audit[T] | None, made: T) -> T:
        """Write the audit entry of the change that made ``made``, and its events, in its
        transaction."""
        if audit is not None:
            entry = audit(made)
            db.execute(
                "INSERT INTO audit_log (at, actor, action, target, team_id, client_ip, details) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)",
                (time.time(), *entry.values()),
            )
            for event in entry.events:
                insert_event(db, event)
        return made

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


def insert_event(db: sqlite3.Connection, event: EventRecord, *, dispatched: bool = False) -> str:
    """Write one event in the caller's transaction; its id ('' when its dedupe key was seen)."""
    event_id = rules.new_id("evt")
    cursor = db.execute(
        "INSERT INTO events (id, type, team_id, data, created_at, dedupe_key, dispatched) "
        "VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (dedupe_key) DO NOTHING",
        (event_id, event.type, event.team_id, event.data_json(), time.time(), event.dedupe_key,
         int(dispatched)),
    )  # fmt: skip
    return event_id if cursor.rowcount else ""
