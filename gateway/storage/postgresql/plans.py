"""PostgreSQL: team plans and their refills (see :mod:`gateway.storage.plans`).

Replicas refilling the same period at once queue on the account's balance
row (locked first); the one that comes second finds the period's ``refill``
row committed, inserts nothing, and changes nothing.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from gateway.models import Environment
from gateway.plans import Period, Plan, Refill, Rollover
from gateway.storage import Audit, NotFound, rules
from gateway.storage import rows as model
from gateway.storage.plans import refill_amounts
from gateway.storage.postgresql.core import PostgresCore

if TYPE_CHECKING:
    from gateway.storage.postgresql.core import Connection

__all__ = ["PostgresPlans"]

_PLAN_SQL = f"SELECT {model.PLAN_COLUMNS} FROM plans"  # noqa: S608 - constant
_CLEAR_SQL = (
    "DELETE FROM plans WHERE team_id = $1 AND environment = $2 "  # noqa: S608 - constant
    f"RETURNING {model.PLAN_COLUMNS}"
)
_MARK_SQL = "UPDATE plans SET current_period = $3 WHERE team_id = $1 AND environment = $2"
_ENTRY_SQL = (
    "INSERT INTO plan_entries (team_id, environment, period_key, kind, amount) "
    "VALUES ($1, $2, $3, $4, $5) ON CONFLICT DO NOTHING RETURNING id"
)


class PostgresPlans(PostgresCore):
    """Plans and refills on PostgreSQL."""

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
        async with self._transaction() as conn:
            if await conn.fetchval("SELECT 1 FROM teams WHERE id = $1", team_id) is None:
                raise rules.no_team(team_id)
            await conn.execute(
                "INSERT INTO plans (team_id, environment, allowance, period, anchor_day, "
                "rollover, max_balance) VALUES ($1, $2, $3, $4, $5, $6, $7) "
                "ON CONFLICT (team_id, environment) DO UPDATE SET allowance = excluded.allowance, "
                "period = excluded.period, anchor_day = excluded.anchor_day, "
                "rollover = excluded.rollover, max_balance = excluded.max_balance, "
                "updated_at = now()",
                team_id, environment, allowance, period, anchor_day, rollover, max_balance,
            )  # fmt: skip
            refill = await self._refill(conn, team_id, environment, period_key)
            plan = await self._plan(conn, team_id, environment)
            assert plan is not None  # written above, same transaction
            return await self._write_audit(conn, audit, (plan, refill))

    async def plans(self, team_id: str | None = None) -> list[Plan]:
        if team_id is None:
            rows = await self._fetch(_PLAN_SQL + " ORDER BY team_id, environment")
        else:
            query = _PLAN_SQL + " WHERE team_id = $1 ORDER BY environment"
            rows = await self._fetch(query, team_id)
        return [model.plan(r) for r in rows]

    async def clear_plan(
        self, team_id: str, environment: Environment, *, audit: Audit[Plan] | None = None
    ) -> Plan:
        async with self._transaction() as conn:
            row = await conn.fetchrow(
                _CLEAR_SQL,
                team_id,
                environment,
            )
            if row is None:
                raise NotFound(f"team {team_id!r} has no {environment} plan")
            return await self._write_audit(conn, audit, model.plan(row))

    async def refill(
        self,
        team_id: str,
        environment: Environment,
        period_key: str,
        *,
        audit: Audit[Refill] | None = None,
    ) -> Refill | None:
        async with self._transaction() as conn:
            made = await self._refill(conn, team_id, environment, period_key)
            if made is None:
                return None
            return await self._write_audit(conn, audit, made)

    @staticmethod
    async def _plan(conn: Connection, team_id: str, environment: str) -> Plan | None:
        row = await conn.fetchrow(
            _PLAN_SQL + " WHERE team_id = $1 AND environment = $2", team_id, environment
        )
        return None if row is None else model.plan(row)

    async def _refill(
        self, conn: Connection, team_id: str, environment: Environment, period_key: str
    ) -> Refill | None:
        plan = await self._plan(conn, team_id, environment)
        if plan is None:
            return None
        # Lock the account first: concurrent refills of this period queue here.
        row = await conn.fetchrow(
            "INSERT INTO balances AS b (team_id, environment, available) VALUES ($1, $2, 0) "
            "ON CONFLICT (team_id, environment) DO UPDATE SET available = b.available "
            "RETURNING available, allowance",
            team_id,
            environment,
        )
        assert row is not None
        available, allowance_left = int(row["available"]), int(row["allowance"])
        expired, refilled = refill_amounts(plan, available, allowance_left)
        args = (team_id, environment, period_key)
        if await conn.fetchval(_ENTRY_SQL, *args, "refill", refilled) is None:
            # Refilled already (another replica, a retry, or a plan set back to a
            # period it had): only remember it, so nobody asks again this period.
            await conn.execute(_MARK_SQL, *args)
            return None
        if expired:
            await conn.execute(_ENTRY_SQL, *args, "expire", -expired)
        # One statement sets both parts, so the spend-allowance-first trigger leaves it alone.
        await conn.execute(
            "UPDATE balances SET available = available - $3 + $4, "
            "allowance = allowance - $3 + $4 WHERE team_id = $1 AND environment = $2",
            team_id,
            environment,
            expired,
            refilled,
        )
        await conn.execute(_MARK_SQL, *args)
        balance = available - expired + refilled
        return Refill(team_id, environment, period_key, refilled, expired, balance)
