"""SQLite: teams (their rate limit and calendar quotas)."""

from __future__ import annotations

import sqlite3
import time

from gateway.models import Team
from gateway.storage import Audit, rules
from gateway.storage import rows as model
from gateway.storage.sqlite.core import SqliteCore
from gateway.storage.sqlite.keys import log_key_change

__all__ = ["SqliteTeams"]


class SqliteTeams(SqliteCore):
    """The Store's team methods on SQLite."""

    async def create_team(
        self,
        name: str,
        rate_limit_per_minute: int | None = None,
        *,
        audit: Audit[Team] | None = None,
    ) -> Team:
        team = Team(rules.new_id("team"), name, time.time(), rate_limit_per_minute)

        def insert(db: sqlite3.Connection) -> Team:
            try:
                db.execute(
                    "INSERT INTO teams (id, name, rate_limit_per_minute, created_at) "
                    "VALUES (?, ?, ?, ?)",
                    (team.id, team.name, team.rate_limit_per_minute, team.created_at),
                )
            except sqlite3.IntegrityError:
                raise rules.team_exists(name) from None
            return self._write_audit(db, audit, team)

        return await self._run(self._tx, insert)

    async def get_team(self, id_or_name: str) -> Team:
        row = await self._run(
            lambda: self._db.execute(
                "SELECT * FROM teams WHERE id = ? OR name = ? ORDER BY id = ? DESC LIMIT 1",
                (id_or_name, id_or_name, id_or_name),
            ).fetchone()
        )
        if row is None:
            raise rules.no_team(id_or_name)
        return model.team(row)

    async def list_teams(self, limit: int, after: str | None) -> list[Team]:
        rows = await self._run(
            lambda: self._db.execute(
                "SELECT * FROM teams WHERE id > ? ORDER BY id LIMIT ?", (after or "", limit)
            ).fetchall()
        )
        return [model.team(r) for r in rows]

    async def update_team(
        self, team_id: str, rate_limit_per_minute: int | None, *, audit: Audit[Team] | None = None
    ) -> Team:
        def update(db: sqlite3.Connection) -> Team:
            old = db.execute(
                "SELECT rate_limit_per_minute FROM teams WHERE id = ?", (team_id,)
            ).fetchone()
            if old is None:
                raise rules.no_team(team_id)
            row = db.execute(
                "UPDATE teams SET rate_limit_per_minute = ? WHERE id = ? RETURNING *",
                (rate_limit_per_minute, team_id),
            ).fetchone()
            if old["rate_limit_per_minute"] != rate_limit_per_minute:
                log_key_change(db, None, team_id)
            return self._write_audit(db, audit, model.team(row))

        return await self._run(self._tx, update)

    async def update_team_quotas(
        self,
        team_id: str,
        quota_per_day: int | None,
        quota_per_month: int | None,
        *,
        audit: Audit[Team] | None = None,
    ) -> Team:
        def update(db: sqlite3.Connection) -> Team:
            old = db.execute(
                "SELECT quota_per_day, quota_per_month FROM teams WHERE id = ?", (team_id,)
            ).fetchone()
            if old is None:
                raise rules.no_team(team_id)
            row = db.execute(
                "UPDATE teams SET quota_per_day = ?, quota_per_month = ? WHERE id = ? RETURNING *",
                (quota_per_day, quota_per_month, team_id),
            ).fetchone()
            if tuple(old) != (quota_per_day, quota_per_month):
                log_key_change(db, None, team_id)
            return self._write_audit(db, audit, model.team(row))

        return await self._run(self._tx, update)
