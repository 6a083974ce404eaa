"""SQLite: usage aggregates, key IPs and auth failures, written in batches."""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence

from gateway.models import (
    UsageRow,
)
from gateway.storage import (
    AuthFailureCount,
    InvalidData,
    KeyIpDay,
    KeyUsage,
    UsageBucket,
    sql,
)
from gateway.storage import rows as model
from gateway.storage.sqlite.core import REFUSED_VALUES, SqliteCore

__all__ = ["SqliteUsage"]

_FIRST_MINUTE_TO_FOLD = sql.qmark(sql.FIRST_MINUTE_TO_FOLD)
# Read and written in one BEGIN IMMEDIATE transaction: no other writer in between.
_FOLD_INSERT = sql.qmark(f"""
INSERT INTO usage_minutes AS u (team_id, minute, key_id, environment, outcome, requests, credits)
SELECT team_id, minute - minute % 3600, key_id, environment, outcome, sum(requests), sum(credits)
FROM usage_minutes WHERE {sql.MINUTES_TO_FOLD}
GROUP BY team_id, minute - minute % 3600, key_id, environment, outcome
{sql.USAGE_UPSERT}
""")  # noqa: S608 - constant
_FOLD_DELETE = sql.qmark(f"DELETE FROM usage_minutes WHERE {sql.MINUTES_TO_FOLD}")  # noqa: S608 - constant


class SqliteUsage(SqliteCore):
    """UsageStore on SQLite: each batch one transaction."""

    # -- usage and patterns ---------------------------------------------------------

    async def add_usage(self, rows: list[UsageRow]) -> None:
        if not rows:
            return
        params = [
            (r.team_id, r.minute, r.key_id, r.environment, r.outcome, r.requests, r.credits)
            for r in rows
        ]
        await self._write_batch(
            "INSERT INTO usage_minutes AS u "
            "(team_id, minute, key_id, environment, outcome, requests, credits) "
            "VALUES (?, ?, ?, ?, ?, ?, ?) " + sql.USAGE_UPSERT,
            params,
        )

    async def _write_batch(self, statement: str, params: Sequence[Sequence[object]]) -> None:
        """``statement`` once per row, in one transaction; refused values raise InvalidData."""
        try:
            await self._run(self._tx, lambda db: db.executemany(statement, params))
        except REFUSED_VALUES as exc:
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

    async def _first_minute_to_fold(self, team_id: str, before: int, since: int) -> int | None:
        row = await self._run(
            lambda: self._db.execute(_FIRST_MINUTE_TO_FOLD, (team_id, before, since)).fetchone()
        )
        return None if row[0] is None else int(row[0])

    async def _fold_minutes(self, team_id: str, start: int, end: int) -> int:
        def fold(db: sqlite3.Connection) -> int:
            db.execute(_FOLD_INSERT, (team_id, start, end))
            return int(db.execute(_FOLD_DELETE, (team_id, start, end)).rowcount)

        return await self._run(self._tx, fold)

    async def usage_buckets(
        self, team_id: str, start: int, end: float, step: int, key_id: str | None
    ) -> list[UsageBucket]:
        query, args = sql.usage_buckets(team_id, start, end, step, key_id)
        rows = await self._run(lambda: self._db.execute(sql.qmark(query), args).fetchall())
        return [model.usage_bucket(r) for r in rows]

    async def usage_top_keys(
        self, team_id: str, start: int, end: float, limit: int
    ) -> list[KeyUsage]:
        rows = await self._run(
            lambda: self._db.execute(
                "SELECT key_id, SUM(requests) AS requests, SUM(credits) AS credits "
                "FROM usage_minutes WHERE team_id = ? AND minute >= ? AND minute < ? "
                "GROUP BY key_id ORDER BY requests DESC, key_id LIMIT ?",
                (team_id, start, end, limit),
            ).fetchall()
        )
        return [model.key_usage(r) for r in rows]

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
    ) -> list[KeyIpDay]:
        query, args = sql.key_ips(team_id, key_id, start_day, end_day)
        rows = await self._run(lambda: self._db.execute(sql.qmark(query), args).fetchall())
        return [model.key_ip_day(r) for r in rows]

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
    ) -> list[AuthFailureCount]:
        rows = await self._run(
            lambda: self._db.execute(
                "SELECT key_prefix, client_ip, reason, SUM(failures) AS n "
                "FROM auth_failure_minutes WHERE minute >= ? AND minute < ? "
                "GROUP BY key_prefix, client_ip, reason "
                "ORDER BY n DESC, key_prefix, client_ip, reason LIMIT ?",
                (start, end, limit),
            ).fetchall()
        )
        return [model.auth_failure_count(r) for r in rows]

    async def prune_patterns(self, ip_before: int, failures_before: int) -> int:
        def prune(db: sqlite3.Connection) -> int:
            ips = db.execute("DELETE FROM key_ip_days WHERE day < ?", (ip_before,)).rowcount
            failures = db.execute(
                "DELETE FROM auth_failure_minutes WHERE minute < ?", (failures_before,)
            ).rowcount
            return ips + failures

        return await self._run(self._tx, prune)
