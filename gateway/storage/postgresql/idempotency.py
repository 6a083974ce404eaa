"""PostgreSQL: Idempotency-Key records (claims made with a reservation are in ledger.py)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from gateway.models import (
    Environment,
)
from gateway.storage import (
    IdempotencyClaim,
    IdempotencyRecord,
)
from gateway.storage import rows as model
from gateway.storage.postgresql.core import PostgresCore

if TYPE_CHECKING:
    pass

__all__ = ["PostgresIdempotency"]


class PostgresIdempotency(PostgresCore):
    """The Idempotency-Key half of the Ledger on PostgreSQL."""

    async def claim_idempotency(
        self, team_id: str, environment: Environment, claim: IdempotencyClaim
    ) -> IdempotencyRecord | None:
        row = await self._fetchrow(
            "SELECT state, method, path, body_hash, status, content_type, body, body_stored "
            "FROM gateway_claim_idempotency($1, $2, $3, $4, $5)",
            team_id,
            environment,
            claim.key,
            claim.method,
            claim.path,
        )
        if row is None:
            return None
        return model.idempotency_record(row)

    async def _complete_idempotency(
        self,
        record: tuple[str, str, str],
        answer: tuple[str, int, str | None, bytes | None],
    ) -> None:
        async with self._connection() as conn:
            await conn.execute(
                "UPDATE idempotency_keys SET state = 'completed', body_hash = $4, status = $5, "
                "content_type = $6, body = $7, body_stored = $7::bytea IS NOT NULL, "
                "completed_at = now() "
                "WHERE team_id = $1 AND environment = $2 AND idempotency_key = $3 "
                "AND state = 'in_flight'",
                *record,
                *answer,
            )

    async def release_idempotency(self, team_id: str, environment: Environment, key: str) -> None:
        async with self._connection() as conn:
            await conn.execute(
                "DELETE FROM idempotency_keys "
                "WHERE team_id = $1 AND environment = $2 AND idempotency_key = $3 "
                "AND state = 'in_flight'",
                team_id,
                environment,
                key,
            )

    async def prune_idempotency(self, before: float) -> int:
        return int(
            await self._fetchval(
                "WITH gone AS (DELETE FROM idempotency_keys WHERE created_at < $1::timestamptz "
                "RETURNING 1) SELECT count(*) FROM gone",
                before,
            )
        )
