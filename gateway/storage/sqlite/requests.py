"""SQLite: the request log (batches in, searches and pruning out)."""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence

from gateway.storage import InvalidData, LoggedRequest, RequestEntry, RequestQuery, sql
from gateway.storage import rows as model
from gateway.storage.sqlite.core import REFUSED_VALUES, SqliteCore

__all__ = ["SqliteRequests"]

_INSERT = (
    f"INSERT INTO request_log ({sql.REQUEST_LOG_INSERT_COLUMNS}) "  # noqa: S608 - constant
    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)


class SqliteRequests(SqliteCore):
    async def add_requests(self, entries: Sequence[RequestEntry]) -> None:
        if not entries:
            return
        try:
            await self._run(self._tx, lambda db: db.executemany(_INSERT, entries))
        except REFUSED_VALUES as exc:
            raise InvalidData(f"SQLite: {type(exc).__name__}: {exc}") from exc

    async def find_requests(self, query: RequestQuery) -> list[LoggedRequest]:
        text, args = sql.request_search(query, "ip_within(client_ip, {n})")
        rows = await self._run(lambda: self._db.execute(sql.qmark(text), args).fetchall())
        return [model.logged_request(r) for r in rows]

    async def prune_requests(self, before: float, max_rows_per_team: int, batch: int) -> int:
        deleted = 0
        while True:  # old rows first, a batch per transaction so writers get turns
            n = int(await self._run(self._tx, lambda db: _delete(db, _OLD, (before, batch))))
            deleted += n
            if n < batch:
                break
        teams = await self._run(
            lambda: [r[0] for r in self._db.execute("SELECT id FROM teams").fetchall()]
        )
        for team_id in teams:
            cutoff = await self._run(
                lambda t=team_id: self._db.execute(_CUTOFF, (t, max_rows_per_team)).fetchone()
            )
            while cutoff is not None:
                args = (team_id, cutoff[0], cutoff[0], cutoff[1], batch)
                n = int(await self._run(self._tx, lambda db, a=args: _delete(db, _BEYOND, a)))
                deleted += n
                if n < batch:
                    break
        return deleted


def _delete(db: sqlite3.Connection, statement: str, args: tuple[object, ...]) -> int:
    return int(db.execute(statement, args).rowcount)


_OLD = "DELETE FROM request_log WHERE id IN (SELECT id FROM request_log WHERE at < ? LIMIT ?)"
# The newest row past the team's maximum: it and everything older go.
_CUTOFF = (
    "SELECT at, id FROM request_log WHERE team_id = ? ORDER BY at DESC, id DESC LIMIT 1 OFFSET ?"
)
_BEYOND = (
    "DELETE FROM request_log WHERE id IN (SELECT id FROM request_log WHERE team_id = ? "
    "AND (at < ? OR (at = ? AND id <= ?)) LIMIT ?)"
)
