"""SQL whose text is the same in both dialects, written once.

Both dialects read keywords and function names in any letter case; a query
with parameters would differ only in their style (``?`` against ``$1``).
"""

from __future__ import annotations

import math
import re

from gateway.storage.types import RequestQuery

__all__ = [
    "FIRST_MINUTE_TO_FOLD",
    "KEY_SPEND_PRUNE",
    "KEY_SPEND_RECONCILE",
    "MINUTES_TO_FOLD",
    "RECONCILE",
    "REQUEST_LOG_COLUMNS",
    "REQUEST_LOG_INSERT_COLUMNS",
    "USAGE_UPSERT",
    "key_ips",
    "qmark",
    "request_search",
    "usage_buckets",
]

_NUMBERED = re.compile(r"\$(\d+)")


def qmark(query: str) -> str:
    """``query`` with PostgreSQL's ``$n`` parameters written as SQLite's ``?n``."""
    return _NUMBERED.sub(r"?\1", query)


def usage_buckets(
    team_id: str, start: int, end: float, step: int, key_id: str | None
) -> tuple[str, list[object]]:
    """The query of :meth:`UsageStore.usage_buckets` (``$n`` style) and its arguments."""
    # minute < end holds for a whole minute exactly when minute < ceil(end).
    args: list[object] = [team_id, start, math.ceil(end), step]
    query = (
        "SELECT CAST($2 AS bigint) + (minute - CAST($2 AS bigint)) / CAST($4 AS bigint) "
        "* CAST($4 AS bigint) AS bucket, outcome, CAST(SUM(requests) AS bigint) AS requests, "
        "CAST(SUM(credits) AS bigint) AS credits "
        "FROM usage_minutes WHERE team_id = $1 AND minute >= $2 AND minute < $3"
    )
    if key_id is not None:
        query += " AND key_id = $5"
        args.append(key_id)
    return query + " GROUP BY 1, 2 ORDER BY 1, 2", args


def key_ips(
    team_id: str, key_id: str | None, start_day: int, end_day: int
) -> tuple[str, list[object]]:
    """The query of :meth:`UsageStore.key_ips` (``$n`` style) and its arguments."""
    query = (
        "SELECT day, key_id, client_ip, requests FROM key_ip_days "
        "WHERE team_id = $1 AND day >= $2 AND day < $3"
    )
    args: list[object] = [team_id, start_day, end_day]
    if key_id is not None:
        query += " AND key_id = $4"
        args.append(key_id)
    return query + " ORDER BY day, key_id, client_ip", args


# What a request log row holds, in RequestEntry's order (after the id when read).
REQUEST_LOG_INSERT_COLUMNS = (
    "at, team_id, key_id, key_prefix, environment, request_id, method, route, path, "
    "status, outcome, credits, client_ip, user_agent, duration_ms"
)
REQUEST_LOG_COLUMNS = "id, " + REQUEST_LOG_INSERT_COLUMNS


def request_search(
    q: RequestQuery, within_network: str, is_address: str
) -> tuple[str, list[object]]:
    """The query of :meth:`RequestLogStore.find_requests` (``$n`` style) and its arguments.

    ``within_network`` and ``is_address`` are the dialect's tests that the row's
    address lies in the network, or is the address, given as parameter ``{n}``
    (canonical text, checked by the caller). Newest first by (at, id),
    which the indexes on (team_id, [key_id | status,] at, id) read in order.
    """
    args: list[object] = [q.team_id]
    where = ["team_id = $1"]

    def add(condition: str, value: object) -> None:
        args.append(value)
        where.append(condition.format(n=f"${len(args)}"))

    if q.key_id is not None:
        add("key_id = {n}", q.key_id)
    if q.status is not None:
        add("status = {n}", q.status)
    elif q.status_range is not None:
        add("status >= {n}", q.status_range[0])
        add("status <= {n}", q.status_range[1])
    if q.outcome is not None:
        add("outcome = {n}", q.outcome)
    if q.client_ip is not None:
        add(within_network if "/" in q.client_ip else is_address, q.client_ip)
    if q.path_prefix is not None:
        # Not LIKE: SQLite's ignores letter case, and a prefix may hold % or _.
        add("substr(path, 1, length({n})) = {n}", q.path_prefix)
    if q.since is not None:
        add("at >= {n}", q.since)
    if q.until is not None:
        add("at < {n}", q.until)
    beyond, order = (">", "ASC") if q.oldest_first else ("<", "DESC")
    if q.before is not None:
        args.extend(q.before)
        at, row_id = f"${len(args) - 1}", f"${len(args)}"
        where.append(f"(at {beyond} {at} OR (at = {at} AND id {beyond} {row_id}))")
    args.append(q.limit)
    query = (
        f"SELECT {REQUEST_LOG_COLUMNS} FROM request_log WHERE "  # noqa: S608 - built from constants
        + " AND ".join(where)
        + f" ORDER BY at {order}, id {order} LIMIT ${len(args)}"
    )
    return query, args


# The balance derived from immutable facts: grants, adjustments, plan refills and
# expiries, minus what pending reservations hold, minus what resolved ones charged
# (rolled up or not).
# One statement, so one snapshot: consistent while the ledger is being written.
RECONCILE = """
WITH accounts AS (
    SELECT team_id, environment FROM balances
    UNION SELECT team_id, environment FROM credit_entries
    UNION SELECT team_id, environment FROM reservations
    UNION SELECT team_id, environment FROM reservation_rollups
    UNION SELECT team_id, environment FROM plan_entries
),
granted AS (
    SELECT team_id, environment, sum(amount) AS total FROM (
        SELECT team_id, environment, amount FROM credit_entries
        UNION ALL SELECT team_id, environment, amount FROM plan_entries
    ) AS entries
    GROUP BY team_id, environment
),
spent AS (
    SELECT team_id, environment,
           sum(CASE WHEN resolution IS NULL THEN amount ELSE charged END) AS total
    FROM reservations GROUP BY team_id, environment
),
rolled AS (
    SELECT team_id, environment, sum(charged) AS total FROM reservation_rollups
    GROUP BY team_id, environment
)
SELECT a.team_id, a.environment,
       coalesce(b.available, 0) AS stored,
       coalesce(g.total, 0) - coalesce(s.total, 0) - coalesce(r.total, 0) AS derived
FROM accounts a
LEFT JOIN balances b USING (team_id, environment)
LEFT JOIN granted g USING (team_id, environment)
LEFT JOIN spent s USING (team_id, environment)
LEFT JOIN rolled r USING (team_id, environment)
"""

# Each capped key's spend per period against its reservations of that period
# (held while pending, charged once resolved). A period some of whose
# reservations retention may have folded into roll-ups (a roll-up row of the
# key's account from the period's first day on) cannot be derived: skipped.
# {period_start} is the dialect's way to read the date out of "day:2026-12-05".
# Adding to a usage counter that exists (the table aliased ``u``): flushes and folds.
USAGE_UPSERT = (
    "ON CONFLICT (team_id, minute, key_id, environment, outcome) DO UPDATE "
    "SET requests = u.requests + excluded.requests, credits = u.credits + excluded.credits"
)

# The per-minute usage rows of team $1 in [$2, $3) that are not an hour's own row
# (minute % 3600 = 0): what :meth:`UsageStore.roll_up_usage` folds.
MINUTES_TO_FOLD = "team_id = $1 AND minute >= $2 AND minute < $3 AND minute % 3600 <> 0"

# The first of them in [$3, $2), where the fold goes on.
FIRST_MINUTE_TO_FOLD = (
    "SELECT min(minute) FROM usage_minutes "
    "WHERE team_id = $1 AND minute < $2 AND minute >= $3 AND minute % 3600 <> 0"
)

# Period keys hold ISO dates ("day:2026-12-05", "month:2026-12-01"), so within a
# kind they sort as the periods do: every earlier day or month compares less.
KEY_SPEND_PRUNE = (
    "DELETE FROM key_spend WHERE (period_key LIKE 'day:%' AND period_key < $1) "
    "OR (period_key LIKE 'month:%' AND period_key < $2)"
)

KEY_SPEND_RECONCILE = """
WITH counted AS (
    SELECT key_id, cap_day AS period_key,
           sum(CASE WHEN resolution IS NULL THEN amount ELSE charged END) AS total
    FROM reservations WHERE cap_day IS NOT NULL GROUP BY key_id, cap_day
    UNION ALL
    SELECT key_id, cap_month AS period_key,
           sum(CASE WHEN resolution IS NULL THEN amount ELSE charged END) AS total
    FROM reservations WHERE cap_month IS NOT NULL GROUP BY key_id, cap_month
)
SELECT k.team_id, k.environment, s.key_id, s.period_key, s.spent AS stored,
       coalesce(c.total, 0) AS derived
FROM key_spend s
JOIN api_keys k ON k.id = s.key_id
LEFT JOIN counted c ON c.key_id = s.key_id AND c.period_key = s.period_key
WHERE s.spent <> coalesce(c.total, 0)
  AND NOT EXISTS (
    SELECT 1 FROM reservation_rollups u
    WHERE u.team_id = k.team_id AND u.environment = k.environment
      AND u.day >= {period_start}
  )
"""
