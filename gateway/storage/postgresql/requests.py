"""PostgreSQL: the request log (COPY in, searches and pruning out)."""

from __future__ import annotations

from collections.abc import Sequence

from gateway.storage import InvalidData, LoggedRequest, RequestEntry, RequestQuery, sql
from gateway.storage import rows as model
from gateway.storage.postgresql.core import REFUSED_VALUES, PostgresCore

__all__ = ["PostgresRequests"]

_COLUMNS = [c.strip() for c in sql.REQUEST_LOG_INSERT_COLUMNS.split(",")]


class PostgresRequests(PostgresCore):
    async def add_requests(self, entries: Sequence[RequestEntry]) -> None:
        if not entries:
            return
        # COPY: one round trip and the server's fastest path for a batch of rows.
        try:
            async with self._connection() as conn:
                await conn.copy_records_to_table("request_log", records=entries, columns=_COLUMNS)
        except REFUSED_VALUES as exc:
            raise InvalidData(f"PostgreSQL: {type(exc).__name__}: {exc}") from exc

    async def find_requests(self, query: RequestQuery) -> list[LoggedRequest]:
        text, args = sql.request_search(query, "gateway_inet(client_ip) <<= CAST({n} AS cidr)")
        rows = await self._fetch(text, *args)
        return [model.logged_request(r) for r in rows]

    async def prune_requests(self, before: float, max_rows_per_team: int, batch: int) -> int:
        deleted = 0
        while True:  # a batch per statement: short transactions, no long locks
            n = int(await self._fetchval(_OLD, before, batch))
            deleted += n
            if n < batch:
                break
        for row in await self._fetch(_OVER_MAXIMUM, max_rows_per_team):
            while True:
                n = int(await self._fetchval(_BEYOND, row["team_id"], row["at"], row["id"], batch))
                deleted += n
                if n < batch:
                    break
        return deleted


_OLD = """
WITH gone AS (
    DELETE FROM request_log WHERE id IN (SELECT id FROM request_log WHERE at < $1 LIMIT $2)
    RETURNING 1
) SELECT count(*) FROM gone
"""
# Each team's newest row past its maximum (read off the (team_id, at, id) index).
_OVER_MAXIMUM = """
SELECT t.id AS team_id, cut.at, cut.id
FROM teams t
CROSS JOIN LATERAL (
    SELECT at, id FROM request_log r WHERE r.team_id = t.id
    ORDER BY at DESC, id DESC OFFSET $1 LIMIT 1
) cut
"""
_BEYOND = """
WITH gone AS (
    DELETE FROM request_log WHERE id IN (
        SELECT id FROM request_log WHERE team_id = $1 AND (at, id) <= ($2, $3) LIMIT $4
    ) RETURNING 1
) SELECT count(*) FROM gone
"""
