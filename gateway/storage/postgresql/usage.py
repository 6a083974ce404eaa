"""PostgreSQL: usage aggregates, key IPs and auth failures, written in batches."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, TypeVar

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
from gateway.storage.postgresql.core import REFUSED_VALUES, PostgresCore

if TYPE_CHECKING:
    pass

__all__ = ["PostgresUsage"]

K = TypeVar("K", bound=tuple[Any, ...])


def _summed(rows: Iterable[tuple[K, int]]) -> list[tuple[K, int]]:
    """Counter rows with equal keys added up, in key order.

    One upsert may not touch a row twice; and every writer adding in the same
    (key) order means two of them never wait for each other's rows in a circle.
    """
    totals: dict[K, int] = {}
    for key, n in rows:
        totals[key] = totals.get(key, 0) + n
    return sorted(totals.items())


class PostgresUsage(PostgresCore):
    """UsageStore on PostgreSQL: each batch one statement over arrays."""

    # -- usage and patterns ---------------------------------------------------------

    async def add_usage(self, rows: list[UsageRow]) -> None:
        if not rows:
            return
        requests = _summed(
            ((r.team_id, r.minute, r.key_id, r.environment, r.outcome), r.requests) for r in rows
        )
        credits = dict(
            _summed(
                ((r.team_id, r.minute, r.key_id, r.environment, r.outcome), r.credits) for r in rows
            )
        )
        keys = [key for key, _ in requests]
        await self._write_batch(
            _ADD_USAGE_SQL,
            [k[0] for k in keys],
            [k[1] for k in keys],
            [k[2] for k in keys],
            [k[3] for k in keys],
            [k[4] for k in keys],
            [n for _, n in requests],
            [credits[k] for k in keys],
        )

    async def _write_batch(self, statement: str, *columns: list[Any]) -> None:
        """One statement over arrays of values; refused values raise InvalidData."""
        try:
            async with self._connection() as conn:
                await conn.execute(statement, *columns)
        except REFUSED_VALUES as exc:
            raise InvalidData(f"PostgreSQL: {type(exc).__name__}: {exc}") from exc

    async def touch_keys(self, last_used: dict[str, float]) -> None:
        # The trigger on api_keys ignores last_used_at: nothing is announced.
        if not last_used:
            return
        items = sorted(last_used.items())
        await self._write_batch(
            _TOUCH_KEYS_SQL, [key_id for key_id, _ in items], [at for _, at in items]
        )

    async def usage_buckets(
        self, team_id: str, start: int, end: float, step: int, key_id: str | None
    ) -> list[UsageBucket]:
        query, args = sql.usage_buckets(team_id, start, end, step, key_id)
        rows = await self._fetch(query, *args)
        return [model.usage_bucket(r) for r in rows]

    async def usage_top_keys(
        self, team_id: str, start: int, end: float, limit: int
    ) -> list[KeyUsage]:
        rows = await self._fetch(
            "SELECT key_id, sum(requests)::bigint AS requests, sum(credits)::bigint AS credits "
            "FROM usage_minutes WHERE team_id = $1 AND minute >= $2 AND minute < $3 "
            "GROUP BY key_id ORDER BY requests DESC, key_id LIMIT $4",
            team_id,
            start,
            math.ceil(end),
            limit,
        )
        return [model.key_usage(r) for r in rows]

    async def add_key_ips(self, rows: list[tuple[int, str, str, str, int]]) -> None:
        if not rows:
            return
        summed = _summed(((team, key, day, ip), n) for day, team, key, ip, n in rows)
        await self._write_batch(
            _ADD_KEY_IPS_SQL,
            [k[0] for k, _ in summed],
            [k[1] for k, _ in summed],
            [k[2] for k, _ in summed],
            [k[3] for k, _ in summed],
            [n for _, n in summed],
        )

    async def key_ips(
        self, team_id: str, key_id: str | None, start_day: int, end_day: int
    ) -> list[KeyIpDay]:
        query, args = sql.key_ips(team_id, key_id, start_day, end_day)
        rows = await self._fetch(query, *args)
        return [model.key_ip_day(r) for r in rows]

    async def add_auth_failures(self, rows: list[tuple[int, str, str, str, int]]) -> None:
        if not rows:
            return
        summed = _summed(((minute, prefix, ip, why), n) for minute, prefix, ip, why, n in rows)
        await self._write_batch(
            _ADD_AUTH_FAILURES_SQL,
            [k[0] for k, _ in summed],
            [k[1] for k, _ in summed],
            [k[2] for k, _ in summed],
            [k[3] for k, _ in summed],
            [n for _, n in summed],
        )

    async def auth_failure_counts(
        self, start: int, end: float, limit: int
    ) -> list[AuthFailureCount]:
        rows = await self._fetch(
            "SELECT key_prefix, client_ip, reason, sum(failures)::bigint AS n "
            "FROM auth_failure_minutes WHERE minute >= $1 AND minute < $2 "
            "GROUP BY key_prefix, client_ip, reason "
            "ORDER BY n DESC, key_prefix, client_ip, reason LIMIT $3",
            start,
            math.ceil(end),
            limit,
        )
        return [model.auth_failure_count(r) for r in rows]

    async def _first_minute_to_fold(self, team_id: str, before: int, since: int) -> int | None:
        first = await self._fetchval(sql.FIRST_MINUTE_TO_FOLD, team_id, before, since)
        return None if first is None else int(first)

    async def _fold_minutes(self, team_id: str, start: int, end: int) -> int:
        return int(await self._fetchval(_FOLD_MINUTES_SQL, team_id, start, end))

    async def prune_patterns(self, ip_before: int, failures_before: int) -> int:
        return int(await self._fetchval(_PRUNE_PATTERNS_SQL, ip_before, failures_before))


# One statement: the minute rows are deleted (and so locked) as they are read, so a
# replica folding the same team at once finds them gone instead of counting them twice.
_FOLD_MINUTES_SQL = f"""
WITH moved AS (
    DELETE FROM usage_minutes WHERE {sql.MINUTES_TO_FOLD}
    RETURNING team_id, minute - minute % 3600 AS hour, key_id, environment, outcome,
              requests, credits
), hours AS (
    SELECT team_id, hour, key_id, environment, outcome, sum(requests) AS requests,
           sum(credits) AS credits, count(*) AS folded
    FROM moved GROUP BY team_id, hour, key_id, environment, outcome
), written AS (
    INSERT INTO usage_minutes AS u
        (team_id, minute, key_id, environment, outcome, requests, credits)
    SELECT team_id, hour, key_id, environment, outcome, requests, credits FROM hours
    ORDER BY team_id, hour, key_id, environment, outcome
    {sql.USAGE_UPSERT}
)
SELECT coalesce(sum(folded), 0) FROM hours
"""  # noqa: S608 - constant

# Rows arrive summed and in key order (_summed), and are inserted in that order.
_ADD_USAGE_SQL = f"""
INSERT INTO usage_minutes AS u
    (team_id, minute, key_id, environment, outcome, requests, credits)
SELECT n.team_id, n.minute, n.key_id, n.environment, n.outcome, n.requests, n.credits
FROM unnest($1::text[], $2::bigint[], $3::text[], $4::text[], $5::text[], $6::bigint[],
            $7::bigint[])
    WITH ORDINALITY AS n (team_id, minute, key_id, environment, outcome, requests, credits, o)
ORDER BY n.o
{sql.USAGE_UPSERT}
"""  # noqa: S608 - constant

_ADD_KEY_IPS_SQL = """
INSERT INTO key_ip_days AS k (team_id, key_id, day, client_ip, requests)
SELECT n.team_id, n.key_id, n.day, n.client_ip, n.requests
FROM unnest($1::text[], $2::text[], $3::bigint[], $4::text[], $5::bigint[])
    WITH ORDINALITY AS n (team_id, key_id, day, client_ip, requests, o)
ORDER BY n.o
ON CONFLICT (team_id, key_id, day, client_ip) DO UPDATE
SET requests = k.requests + excluded.requests
"""

_ADD_AUTH_FAILURES_SQL = """
INSERT INTO auth_failure_minutes AS f (minute, key_prefix, client_ip, reason, failures)
SELECT n.minute, n.key_prefix, n.client_ip, n.reason, n.failures
FROM unnest($1::bigint[], $2::text[], $3::text[], $4::text[], $5::bigint[])
    WITH ORDINALITY AS n (minute, key_prefix, client_ip, reason, failures, o)
ORDER BY n.o
ON CONFLICT (minute, key_prefix, client_ip, reason) DO UPDATE
SET failures = f.failures + excluded.failures
"""

# The rows are locked in id order first, as every flush of every process does,
# so that two flushes never wait for each other in a circle. Only a later time
# is written; last_used_at is not among the columns the trigger compares.
_TOUCH_KEYS_SQL = """
WITH given AS (
    SELECT g.id, to_timestamp(g.at) AS at
    FROM unnest($1::text[], $2::float8[]) AS g (id, at)
), locked AS MATERIALIZED (
    SELECT k.id FROM api_keys k JOIN given g ON g.id = k.id
    WHERE k.last_used_at IS NULL OR k.last_used_at < g.at
    ORDER BY k.id
    FOR UPDATE OF k
)
UPDATE api_keys k SET last_used_at = g.at
FROM given g
WHERE k.id = g.id AND k.id IN (SELECT l.id FROM locked l)
  AND (k.last_used_at IS NULL OR k.last_used_at < g.at)
"""

_PRUNE_PATTERNS_SQL = """
WITH ips AS (
    DELETE FROM key_ip_days WHERE day < $1 RETURNING 1
), failures AS (
    DELETE FROM auth_failure_minutes WHERE minute < $2 RETURNING 1
)
SELECT (SELECT count(*) FROM ips) + (SELECT count(*) FROM failures)
"""

# Credit entries ("c<id>") and reservations ("r<id>", at the time they were made)
# of one team, newest first by (created_at, entry_id) in byte order, as on
