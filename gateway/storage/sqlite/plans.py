"""SQLite: team plans and their refills (see :mod:`gateway.storage.plans`)."""

from __future__ import annotations

import sqlite3
import time

from gateway.models import Environment
from gateway.plans import Period, Plan, Refill, Rollover
from gateway.storage import Audit, NotFound, rules
from gateway.storage import rows as model
from gateway.storage.plans import refill_amounts
from gateway.storage.sqlite.core import SqliteCore

__all__ = ["SqlitePlans"]

_PLAN_SQL = f"SELECT {model.PLAN_COLUMNS} FROM plans"  # noqa: S608 - constant


class SqlitePlans(SqliteCore):
    """Plans and refills on SQLite; ``BEGIN IMMEDIATE`` serializes writers across processes."""

    async def set_plan(
        self,
        team_id: str,
        environment: Environment,
        allowance: int,
        period: Period,
        anchor_day: int,
        rollover: Rollover,
        max_balance: int | None,
        period_key: str,
        *,
        audit: Audit[tuple[Plan, Refill | None]] | None = None,
    ) -> tuple[Plan, Refill | None]:
        def set_plan(db: sqlite3.Connection) -> tuple[Plan, Refill | None]:
            if db.execute("SELECT 1 FROM teams WHERE id = ?", (team_id,)).fetchone() is None:
                raise rules.no_team(team_id)
            db.execute(
                "INSERT INTO plans (team_id, environment, allowance, period, anchor_day, "
                "rollover, max_balance, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?) "
                "ON CONFLICT (team_id, environment) DO UPDATE SET allowance = excluded.allowance, "
                "period = excluded.period, anchor_day = excluded.anchor_day, "
                "rollover = excluded.rollover, max_balance = excluded.max_balance, "
                "updated_at = excluded.updated_at",
                (team_id, environment, allowance, period, anchor_day, rollover, max_balance,
                 time.time()),
            )  # fmt: skip
            refill = self._refill(db, team_id, environment, period_key)
            plan = self._plan(db, team_id, environment)
            assert plan is not None  # written above, same transaction
            return self._write_audit(db, audit, (plan, refill))

        return await self._run(self._tx, set_plan)

    async def plans(self, team_id: str | None = None) -> list[Plan]:
        args: tuple[str, ...] = ()
        if team_id is None:
            query = _PLAN_SQL + " ORDER BY team_id, environment"
        else:
            query, args = _PLAN_SQL + " WHERE team_id = ? ORDER BY environment", (team_id,)
        rows = await self._run(lambda: self._db.execute(query, args).fetchall())
        return [model.plan(r) for r in rows]

    async def clear_plan(
        self, team_id: str, environment: Environment, *, audit: Audit[Plan] | None = None
    ) -> Plan:
        def clear(db: sqlite3.Connection) -> Plan:
            plan = self._plan(db, team_id, environment)
            if plan is None:
                raise NotFound(f"team {team_id!r} has no {environment} plan")
            db.execute(
                "DELETE FROM plans WHERE team_id = ? AND environment = ?", (team_id, environment)
            )
            return self._write_audit(db, audit, plan)

        return await self._run(self._tx, clear)

    async def refill(
        self,
        team_id: str,
        environment: Environment,
        period_key: str,
        *,
        audit: Audit[Refill] | None = None,
    ) -> Refill | None:
        def refill(db: sqlite3.Connection) -> Refill | None:
            made = self._refill(db, team_id, environment, period_key)
            return None if made is None else self._write_audit(db, audit, made)

        return await self._run(self._tx, refill)

    @staticmethod
    def _plan(db: sqlite3.Connection, team_id: str, environment: str) -> Plan | None:
        row = db.execute(
            _PLAN_SQL + " WHERE team_id = ? AND environment = ?", (team_id, environment)
        ).fetchone()
        return None if row is None else model.plan(row)

    def _refill(
        self, db: sqlite3.Connection, team_id: str, environment: Environment, period_key: str
    ) -> Refill | None:
        plan = self._plan(db, team_id, environment)
        if plan is None:
            return None
        row = db.execute(
            "INSERT INTO balances (team_id, environment, available) VALUES (?, ?, 0) "
            "ON CONFLICT (team_id, environment) DO UPDATE SET available = available "
            "RETURNING available, allowance",
            (team_id, environment),
        ).fetchone()
        available, allowance_left = int(row["available"]), int(row["allowance"])
        expired, refilled = refill_amounts(plan, available, allowance_left)
        now = time.time()
        entry = (
            "INSERT INTO plan_entries (team_id, environment, period_key, kind, amount, created_at) "
            "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING"
        )
        account = (team_id, environment, period_key)
        mark = "UPDATE plans SET current_period = ? WHERE team_id = ? AND environment = ?"
        if not db.execute(entry, (*account, "refill", refilled, now)).rowcount:
            # Refilled already (another process, a retry, or a plan set back to a
            # period it had): only remember it, so nobody asks again this period.
            db.execute(mark, (period_key, team_id, environment))
            return None
        if expired:
            db.execute(entry, (*account, "expire", -expired, now))
        # One statement sets both parts, so the spend-allowance-first trigger leaves it alone.
        db.execute(
            "UPDATE balances SET available = available - ? + ?, allowance = allowance - ? + ? "
            "WHERE team_id = ? AND environment = ?",
            (expired, refilled, expired, refilled, team_id, environment),
        )
        db.execute(mark, (period_key, team_id, environment))
        balance = available - expired + refilled
        return Refill(team_id, environment, period_key, refilled, expired, balance)
