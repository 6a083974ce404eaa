"""PostgreSQL: calendar request quotas (see :mod:`gateway.storage.quotas`)."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from gateway.storage import sql
from gateway.storage.postgresql.core import PostgresCore
from gateway.storage.quotas import QuotaCount, QuotaTake
from gateway.storage.types import CapPeriods

__all__ = ["PostgresQuotas"]

_PRUNE_KEY_SPEND = f"WITH gone AS ({sql.KEY_SPEND_PRUNE} RETURNING 1) SELECT count(*) FROM gone"  # noqa: S608 - constant


class PostgresQuotas(PostgresCore):
    """Quota counts on PostgreSQL: one statement per request (``gateway_take_quota``)."""

    async def take_quota(self, counts: Sequence[QuotaCount]) -> QuotaTake:
        rows = await self._fetch(
            "SELECT used, taken FROM gateway_take_quota($1, $2, $3, $4)",
            [c.subject for c in counts],
            [c.period for c in counts],
            [c.limit for c in counts],
            [c.ends_at for c in counts],  # timestamptz travels as epoch seconds
        )
        taken = bool(rows[0]["taken"]) if rows else True
        return QuotaTake(taken, tuple(int(r["used"]) for r in rows))

    async def key_spending(
        self, key_ids: Sequence[str], periods: Sequence[str]
    ) -> dict[tuple[str, str], int]:
        rows = await self._fetch(
            "SELECT key_id, period_key, spent FROM key_spend "
            "WHERE key_id = ANY ($1) AND period_key = ANY ($2)",
            list(key_ids),
            list(periods),
        )
        return {(r["key_id"], r["period_key"]): int(r["spent"]) for r in rows}

    async def take_quotas(self, takes: Sequence[Sequence[QuotaCount]]) -> list[QuotaTake]:
        # Each take its own statement and transaction, at once on pool connections: one
        # transaction holding several takes' row locks could deadlock with another's.
        return list(await asyncio.gather(*(self.take_quota(counts) for counts in takes)))

    async def prune_quotas(self, now: float) -> int:
        found = await self._fetchval(
            "WITH gone AS (DELETE FROM quota_counts WHERE expires_at < $1 RETURNING 1) "
            "SELECT count(*) FROM gone",
            now,
        )
        return int(found)

    async def prune_key_spend(self, kept: CapPeriods) -> int:
        return int(await self._fetchval(_PRUNE_KEY_SPEND, kept.day, kept.month))
