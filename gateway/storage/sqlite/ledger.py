"""SQLite: reserve, post, void, expire, grants, balances, the ledger, reconcile, roll-up."""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Sequence

from gateway.models import Environment, LedgerEntry
from gateway.storage import (
    Audit,
    ExpiryPolicy,
    GrantResult,
    Mismatch,
    ReserveRequest,
    ReserveResult,
    rules,
    sql,
)
from gateway.storage import rows as model
from gateway.storage.shared import GrantOrder
from gateway.storage.sqlite.core import SqliteCore
from gateway.storage.sqlite.reserve import Spend, reserve_one

__all__ = ["SqliteLedger"]

_SPEND_RECONCILE = sql.KEY_SPEND_RECONCILE.format(
    period_start="substr(s.period_key, instr(s.period_key, ':') + 1)"
)


class SqliteLedger(SqliteCore):
    """The credit ledger on SQLite."""

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
        spend = Spend(db)
        for req in requests:
            account = (req.team_id, req.environment)
            if account not in available:
                row = db.execute(
                    "SELECT available FROM balances WHERE team_id = ? AND environment = ?",
                    account,
                ).fetchone()
                available[account] = 0 if row is None else int(row["available"])
            result, available[account] = reserve_one(
                db, req, available[account], now, deadline, spend
            )
            results.append(result)
        spend.write()
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
        return rules.balances_by_environment(found)

    async def _apply_grant(
        self, order: GrantOrder, audit: Audit[GrantResult] | None
    ) -> GrantResult:
        team_id, environment, amount = order.team_id, order.environment, order.amount

        def grant(db: sqlite3.Connection) -> GrantResult:
            if db.execute("SELECT 1 FROM teams WHERE id = ?", (team_id,)).fetchone() is None:
                raise rules.no_team(team_id)
            if order.idempotency_key is not None:
                seen = db.execute(
                    "SELECT amount, environment, request_hash, balance_after FROM credit_entries "
                    "WHERE team_id = ? AND idempotency_key = ?",
                    (team_id, order.idempotency_key),
                ).fetchone()
                if seen is not None:
                    return rules.replayed_grant(dict(seen), amount, environment, order.request_hash)
            row = db.execute(
                "SELECT available FROM balances WHERE team_id = ? AND environment = ?",
                (team_id, environment),
            ).fetchone()
            current = 0 if row is None else int(row["available"])
            rules.check_grant(current, amount, environment)
            db.execute(
                "INSERT INTO credit_entries (team_id, environment, kind, amount, reason, actor, "
                "idempotency_key, request_hash, balance_after, created_at) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (*order.entry(current + amount), time.time()),
            )
            db.execute(
                "INSERT INTO balances (team_id, environment, available) VALUES (?, ?, ?) "
                "ON CONFLICT (team_id, environment) DO UPDATE SET available = excluded.available",
                (team_id, environment, current + amount),
            )
            return self._write_audit(db, audit, GrantResult(current + amount, replayed=False))

        return await self._run(self._tx, grant)

    async def ledger_entries(
        self, team_id: str, limit: int, before: str | None
    ) -> list[LedgerEntry]:
        if before is None:
            query = _LEDGER_SQL.format(credit_cursor="", reservation_cursor="", plan_cursor="")
            args: tuple[object, ...] = (team_id, limit, team_id, limit, team_id, limit, limit)
        else:
            at, entry_id = rules.decode_ledger_cursor(before)
            query = _LEDGER_SQL.format(
                credit_cursor=" AND (created_at, 'c' || id) < (?, ?)",
                reservation_cursor=" AND (created_at, 'r' || id) < (?, ?)",
                plan_cursor=" AND (created_at, 'p' || id) < (?, ?)",
            )
            args = (team_id, at, entry_id, limit, team_id, at, entry_id, limit,
                    team_id, at, entry_id, limit, limit)  # fmt: skip
        rows = await self._run(lambda: self._db.execute(query, args).fetchall())
        return [model.ledger_entry(r, team_id) for r in rows]

    async def pending_count(self) -> int:
        row = await self._run(
            lambda: self._db.execute(
                "SELECT COUNT(*) AS n FROM reservations WHERE resolution IS NULL"
            ).fetchone()
        )
        return int(row["n"])

    async def reconcile(self) -> list[Mismatch]:
        rows = await self._run(lambda: self._db.execute(sql.RECONCILE).fetchall())
        spends = await self._run(lambda: self._db.execute(_SPEND_RECONCILE).fetchall())
        return model.mismatches(rows) + model.spend_mismatches(spends)

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


# Credit entries ("c<id>"), reservations ("r<id>", at the time they were made) and
# plan refills and expiries ("p<id>", their period key as the reason)
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
    UNION ALL
    SELECT * FROM (
        SELECT 'p' || id AS entry_id, environment, kind, amount, period_key AS reason,
               NULL AS reservation_id, created_at
        FROM plan_entries WHERE team_id = ?{plan_cursor}
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
