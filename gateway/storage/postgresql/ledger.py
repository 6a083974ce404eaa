"""PostgreSQL: reserve, post, void, expire, grants, balances, the ledger, reconcile, roll-up.

Every ledger write is one statement calling a function the migrations
install (``gateway_reserve``, ``gateway_resolve``, ``gateway_expire``), so a
batch of any size costs one round trip and holds its balance rows only while
the function runs. Lease deadlines come from the database clock, so replicas
with skewed clocks agree on what has expired.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import asyncpg

from gateway.models import Environment, LedgerEntry
from gateway.storage import (
    Audit,
    CapPeriods,
    ExpiryPolicy,
    GrantResult,
    IdempotencyRecord,
    Mismatch,
    ReserveRequest,
    ReserveResult,
    rules,
    sql,
)
from gateway.storage import rows as model
from gateway.storage.postgresql.core import PostgresCore
from gateway.storage.shared import GrantOrder

if TYPE_CHECKING:
    from gateway.storage.postgresql.core import Connection

__all__ = ["PostgresLedger"]

_ROLL_UP_CHUNK = 10_000
_SPEND_RECONCILE = sql.KEY_SPEND_RECONCILE.format(
    period_start="substr(s.period_key, strpos(s.period_key, ':') + 1)::date"
)


def _replay(row: asyncpg.Record) -> IdempotencyRecord | None:
    """The record a reserve result was answered with (``replay_*`` columns), if any."""
    if row["replay_state"] is None:
        return None
    return model.idempotency_record(row, "replay_")


class PostgresLedger(PostgresCore):
    """The credit ledger on PostgreSQL."""

    # -- ledger -------------------------------------------------------------------

    async def reserve_batch(self, requests: Sequence[ReserveRequest]) -> list[ReserveResult]:
        if not requests:
            return []
        if any(r.caps is not None for r in requests):
            return await self._reserve_with_caps(requests)
        return await self._reserve_uncapped(requests)

    async def _reserve_with_caps(self, requests: Sequence[ReserveRequest]) -> list[ReserveResult]:
        """Capped requests go through gateway_reserve_capped, the others as always.

        One statement per group of capped requests counting in the same day and
        month (one group, but for a batch that straddles midnight), each its own
        transaction: each locks balance rows in key order, so they cannot
        deadlock with each other or with anyone else.
        """
        groups: dict[CapPeriods | None, list[int]] = {}
        for i, r in enumerate(requests):
            groups.setdefault(r.caps, []).append(i)
        results: list[ReserveResult | None] = [None] * len(requests)
        for periods, chosen in groups.items():
            batch = [requests[i] for i in chosen]
            if periods is None:
                answered = await self._reserve_uncapped(batch)
            else:
                answered = await self._reserve_capped(batch, periods)
            for i, result in zip(chosen, answered, strict=True):
                results[i] = result
        return [r for r in results if r is not None]

    async def _reserve_capped(
        self, requests: Sequence[ReserveRequest], periods: CapPeriods
    ) -> list[ReserveResult]:
        """The function reads each key's caps; rows come back in the order asked."""
        return await self._reserve_batch(
            requests, _RESERVE_CAPPED_PLAIN_SQL, _RESERVE_CAPPED_SQL, periods.day, periods.month
        )

    async def _reserve_uncapped(self, requests: Sequence[ReserveRequest]) -> list[ReserveResult]:
        if len(requests) == 1 and requests[0].idempotency is None:
            r = requests[0]
            async with self._reserve_connection() as conn:
                row = await conn.fetchrow(
                    _RESERVE_ONE_SQL,
                    r.reservation_id,
                    r.team_id,
                    r.environment,
                    r.key_id,
                    r.amount,
                    self._lease,
                )
            assert row is not None  # the function always returns one row
            return [ReserveResult(row["granted"], row["available"])]
        return await self._reserve_batch(requests, _RESERVE_SQL, _RESERVE_CLAIMING_SQL)

    async def _reserve_batch(
        self,
        requests: Sequence[ReserveRequest],
        plain_sql: str,
        claiming_sql: str,
        *extra: str,
    ) -> list[ReserveResult]:
        """One statement for a batch: its columns, the lease, then ``extra``; the
        Idempotency-Key arrays (and the replay columns back) only when a request has a claim."""
        args = (
            [r.reservation_id for r in requests],
            [r.team_id for r in requests],
            [r.environment for r in requests],
            [r.key_id for r in requests],
            [r.amount for r in requests],
            self._lease,
            *extra,
        )
        claims = [r.idempotency for r in requests]
        if not any(claims):
            async with self._reserve_connection() as conn:
                rows = await conn.fetch(plain_sql, *args)
            return [ReserveResult(row[0], row[1]) for row in rows]
        async with self._reserve_connection() as conn:
            rows = await conn.fetch(
                claiming_sql,
                *args,
                [c.key if c is not None else None for c in claims],
                [c.method if c is not None else None for c in claims],
                [c.path if c is not None else None for c in claims],
            )
        return [ReserveResult(row["granted"], row["available"], _replay(row)) for row in rows]

    async def post_batch(self, posts: Sequence[tuple[str, int]]) -> int:
        if not posts:
            return 0
        return int(
            await self._fetchval(
                "SELECT gateway_resolve($1, $2, 'post')",
                [reservation_id for reservation_id, _ in posts],
                [charged for _, charged in posts],
            )
        )

    async def void_batch(self, reservation_ids: Sequence[str]) -> int:
        if not reservation_ids:
            return 0
        return int(
            await self._fetchval(
                "SELECT gateway_resolve($1, $2, 'void')",
                list(reservation_ids),
                [0] * len(reservation_ids),
            )
        )

    async def expire_reservations(self, policy: ExpiryPolicy, limit: int = 1000) -> int:
        expired = int(await self._fetchval("SELECT gateway_expire($1, $2)", policy, limit))
        # An Idempotency-Key still "in flight" after a whole lease belongs to an
        # attempt that never finished (a crash): free it, so a retry is judged afresh.
        await self._fetchval(
            "WITH gone AS (DELETE FROM idempotency_keys WHERE state = 'in_flight' "
            "AND created_at < now() - make_interval(secs => $1) RETURNING 1) "
            "SELECT count(*) FROM gone",
            self._lease,
        )
        return expired

    async def balance(self, team_id: str, environment: Environment) -> int:
        found = await self._fetchval(
            "SELECT available FROM balances WHERE team_id = $1 AND environment = $2",
            team_id,
            environment,
        )
        return 0 if found is None else int(found)

    async def balances(self, team_id: str) -> dict[str, int]:
        rows = await self._fetch(
            "SELECT environment, available FROM balances WHERE team_id = $1", team_id
        )
        found = {r["environment"]: int(r["available"]) for r in rows}
        return rules.balances_by_environment(found)

    async def _apply_grant(
        self, order: GrantOrder, audit: Audit[GrantResult] | None
    ) -> GrantResult:
        try:
            async with self._transaction() as conn:
                result = await self._grant(conn, order)
                if result.replayed:
                    return result
                return await self._write_audit(conn, audit, result)
        except asyncpg.UniqueViolationError:
            # Only a concurrent grant with the same key for the other environment
            # gets here (same-environment grants queue on the balance row).
            raise rules.grant_key_reused() from None

    @staticmethod
    async def _grant(conn: Connection, order: GrantOrder) -> GrantResult:
        team_id, environment, amount = order.team_id, order.environment, order.amount
        if await conn.fetchval("SELECT 1 FROM teams WHERE id = $1", team_id) is None:
            raise rules.no_team(team_id)
        # Lock the account's row (creating it at zero) before looking at the
        # Idempotency-Key, so that a concurrent retry of this grant waits here
        # and then finds the entry written by the first.
        current = int(
            await conn.fetchval(
                "INSERT INTO balances AS b (team_id, environment, available) VALUES ($1, $2, 0) "
                "ON CONFLICT (team_id, environment) DO UPDATE SET available = b.available "
                "RETURNING available",
                team_id,
                environment,
            )
        )
        if order.idempotency_key is not None:
            seen = await conn.fetchrow(
                "SELECT amount, environment, request_hash, balance_after FROM credit_entries "
                "WHERE team_id = $1 AND idempotency_key = $2",
                team_id,
                order.idempotency_key,
            )
            if seen is not None:
                return rules.replayed_grant(dict(seen), amount, environment, order.request_hash)
        rules.check_grant(current, amount, environment)
        await conn.execute(
            "INSERT INTO credit_entries (team_id, environment, kind, amount, reason, actor, "
            "idempotency_key, request_hash, balance_after) "
            "VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
            *order.entry(current + amount),
        )
        await conn.execute(
            "UPDATE balances SET available = $3 WHERE team_id = $1 AND environment = $2",
            team_id,
            environment,
            current + amount,
        )
        return GrantResult(current + amount, replayed=False)

    async def ledger_entries(
        self, team_id: str, limit: int, before: str | None
    ) -> list[LedgerEntry]:
        if before is None:
            query = _LEDGER_SQL.format(credit_cursor="", reservation_cursor="", plan_cursor="")
            rows = await self._fetch(query, team_id, limit)
        else:
            at, entry_id = rules.decode_ledger_cursor(before)
            query = _LEDGER_SQL.format(
                credit_cursor=_LEDGER_CURSOR.format(table="c", kind="c"),
                reservation_cursor=_LEDGER_CURSOR.format(table="r", kind="r"),
                plan_cursor=_LEDGER_CURSOR.format(table="p", kind="p"),
            )
            rows = await self._fetch(query, team_id, limit, at, entry_id)
        return [model.ledger_entry(r, team_id) for r in rows]

    async def pending_count(self) -> int:
        return int(
            await self._fetchval("SELECT count(*) FROM reservations WHERE resolution IS NULL")
        )

    async def reconcile(self) -> list[Mismatch]:
        rows = await self._fetch(sql.RECONCILE)
        spends = await self._fetch(_SPEND_RECONCILE)
        return model.mismatches(rows) + model.spend_mismatches(spends)

    async def roll_up(self, older_than_days: int) -> int:
        """Fold reservations resolved more than ``older_than_days`` ago into per-day rows.

        Works in chunks, each its own transaction, so the reservations table is
        never locked for long; replicas running it at once skip each other's rows.
        Returns how many reservations were folded.
        """
        total = 0
        while True:
            moved = int(await self._fetchval(_ROLL_UP_SQL, older_than_days, _ROLL_UP_CHUNK))
            total += moved
            if moved < _ROLL_UP_CHUNK:
                return total


# The claim-less form selects only what it reads: the replay columns (all NULL)
# are never sent.
_RESERVE_SQL = (
    "SELECT granted, available FROM gateway_reserve($1, $2, $3, $4, $5, $6, NULL, NULL, NULL)"
)
_RESERVE_ONE_SQL = "SELECT granted, available FROM gateway_reserve_one($1, $2, $3, $4, $5, $6)"
# gateway_reserve_capped answers in the order asked (its ORDER BY ord).
_RESERVE_CAPPED_SQL = (
    "SELECT granted, available, replay_state, replay_method, replay_path, "
    "replay_body_hash, replay_status, replay_content_type, replay_body, replay_body_stored "
    "FROM gateway_reserve_capped($1, $2, $3, $4, $5, $6, $9, $10, $11, $7, $8)"
)
_RESERVE_CAPPED_PLAIN_SQL = (
    "SELECT granted, available "
    "FROM gateway_reserve_capped($1, $2, $3, $4, $5, $6, NULL, NULL, NULL, $7, $8)"
)
_RESERVE_CLAIMING_SQL = (
    "SELECT granted, available, replay_state, replay_method, replay_path, replay_body_hash, "
    "replay_status, replay_content_type, replay_body, replay_body_stored "
    "FROM gateway_reserve($1, $2, $3, $4, $5, $6, $7, $8, $9)"
)

# SQLite; each side is cut to the page size before the merge.
_LEDGER_SQL = """
SELECT e.* FROM (
    (SELECT ('c' || c.id::text) COLLATE "C" AS entry_id, c.environment, c.kind, c.amount,
            c.reason, NULL::text AS reservation_id, c.created_at
     FROM credit_entries c WHERE c.team_id = $1{credit_cursor}
     ORDER BY c.created_at DESC, entry_id DESC LIMIT $2)
    UNION ALL
    (SELECT ('r' || r.id) COLLATE "C" AS entry_id, r.environment,
            coalesce(r.resolution, 'reserve') AS kind,
            -(CASE WHEN r.resolution IS NULL THEN r.amount ELSE r.charged END)::bigint,
            NULL::text, r.id, r.created_at
     FROM reservations r WHERE r.team_id = $1{reservation_cursor}
     ORDER BY r.created_at DESC, entry_id DESC LIMIT $2)
    UNION ALL
    (SELECT ('p' || p.id::text) COLLATE "C" AS entry_id, p.environment, p.kind, p.amount,
            p.period_key, NULL::text, p.created_at
     FROM plan_entries p WHERE p.team_id = $1{plan_cursor}
     ORDER BY p.created_at DESC, entry_id DESC LIMIT $2)
) e
ORDER BY e.created_at DESC, e.entry_id DESC
LIMIT $2
"""
_LEDGER_CURSOR = (
    " AND ({table}.created_at, ('{kind}' || {table}.id::text) COLLATE \"C\")"
    ' < ($3::timestamptz, $4::text COLLATE "C")'
)

# One statement: the rows deleted are exactly the rows summed. The summary rows
# are written in key order, so two replicas rolling up at once cannot deadlock.
_ROLL_UP_SQL = """
WITH moved AS (
    DELETE FROM reservations
    WHERE id IN (
        SELECT id FROM reservations
        WHERE resolution IS NOT NULL AND resolved_at < now() - make_interval(days => $1)
        ORDER BY resolved_at
        LIMIT $2
        FOR UPDATE SKIP LOCKED
    )
    RETURNING team_id, environment, created_at, amount, charged
), summed AS (
    INSERT INTO reservation_rollups AS r
        (team_id, environment, day, reservations, reserved, charged)
    SELECT team_id, environment, (created_at AT TIME ZONE 'UTC')::date,
           count(*), sum(amount), sum(charged)
    FROM moved
    GROUP BY 1, 2, 3
    ORDER BY 1, 2, 3
    ON CONFLICT (team_id, environment, day) DO UPDATE
    SET reservations = r.reservations + excluded.reservations,
        reserved = r.reserved + excluded.reserved,
        charged = r.charged + excluded.charged
)
SELECT count(*) FROM moved
"""

# The balance derived from immutable facts: grants and adjustments, minus what
# pending reservations hold, minus what resolved ones charged (rolled up or not).
