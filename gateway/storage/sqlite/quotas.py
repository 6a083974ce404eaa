"""SQLite: calendar request quotas (see :mod:`gateway.storage.quotas`)."""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence

from gateway.storage import sql
from gateway.storage.quotas import QuotaCount, QuotaTake
from gateway.storage.sqlite.core import SqliteCore
from gateway.storage.types import CapPeriods

_PRUNE_KEY_SPEND = sql.qmark(sql.KEY_SPEND_PRUNE)

__all__ = ["SqliteQuotas"]


class SqliteQuotas(SqliteCore):
    """Quota counts on SQLite; ``BEGIN IMMEDIATE`` serializes takers across processes."""

    async def take_quota(self, counts: Sequence[QuotaCount]) -> QuotaTake:
        [taken] = await self.take_quotas([counts])
        return taken

    async def take_quotas(self, takes: Sequence[Sequence[QuotaCount]]) -> list[QuotaTake]:
        # One transaction for the batch: one thread hop and one commit, not one a request.
        return await self._run(self._tx, lambda db: [_take(db, counts) for counts in takes])

    async def key_spending(
        self, key_ids: Sequence[str], periods: Sequence[str]
    ) -> dict[tuple[str, str], int]:
        def read(db: sqlite3.Connection) -> dict[tuple[str, str], int]:
            found: dict[tuple[str, str], int] = {}
            for period in periods:
                for key_id in key_ids:
                    row = db.execute(
                        "SELECT spent FROM key_spend WHERE key_id = ? AND period_key = ?",
                        (key_id, period),
                    ).fetchone()
                    if row is not None:
                        found[key_id, period] = int(row["spent"])
            return found

        return await self._run(read, self._db)

    async def prune_quotas(self, now: float) -> int:
        return await self._run(
            self._tx,
            lambda db: db.execute("DELETE FROM quota_counts WHERE expires_at < ?", (now,)).rowcount,
        )

    async def prune_key_spend(self, kept: CapPeriods) -> int:
        return await self._run(
            self._tx,
            lambda db: db.execute(_PRUNE_KEY_SPEND, (kept.day, kept.month)).rowcount,
        )


def _take(db: sqlite3.Connection, counts: Sequence[QuotaCount]) -> QuotaTake:
    used = []
    for count in counts:
        row = db.execute(
            "SELECT used FROM quota_counts WHERE subject = ? AND period_key = ?",
            (count.subject, count.period),
        ).fetchone()
        used.append(0 if row is None else int(row["used"]))
    if any(u >= c.limit for u, c in zip(used, counts, strict=True)):
        return QuotaTake(False, tuple(used))
    for count in counts:
        db.execute(
            "INSERT INTO quota_counts (subject, period_key, used, expires_at) "
            "VALUES (?, ?, 1, ?) ON CONFLICT (subject, period_key) "
            "DO UPDATE SET used = used + 1",
            (count.subject, count.period, count.ends_at),
        )
    return QuotaTake(True, tuple(u + 1 for u in used))
