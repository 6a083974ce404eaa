"""SQL whose text is the same in both dialects, written once.

Both dialects read keywords and function names in any letter case; a query
with parameters would differ only in their style (``?`` against ``$1``).
"""

from __future__ import annotations

__all__ = ["RECONCILE"]

# The balance derived from immutable facts: grants and adjustments, minus what
# pending reservations hold, minus what resolved ones charged (rolled up or not).
# One statement, so one snapshot: consistent while the ledger is being written.
RECONCILE = """
WITH accounts AS (
    SELECT team_id, environment FROM balances
    UNION SELECT team_id, environment FROM credit_entries
    UNION SELECT team_id, environment FROM reservations
    UNION SELECT team_id, environment FROM reservation_rollups
),
granted AS (
    SELECT team_id, environment, sum(amount) AS total FROM credit_entries
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
