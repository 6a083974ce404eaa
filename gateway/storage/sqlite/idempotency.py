"""SQLite: Idempotency-Key records (claims made with a reservation are in ledger.py)."""

from __future__ import annotations

import sqlite3
import time

from gateway.models import (
    Environment,
)
from gateway.storage import (
    IDEMPOTENCY_TTL_SECONDS,
    IdempotencyClaim,
    IdempotencyRecord,
)
from gateway.storage import rows as model
from gateway.storage.sqlite.core import SqliteCore

__all__ = ["CLAIM_SQL", "HELD_SQL", "SqliteIdempotency"]

# The unexpired record holding a key, if any.
HELD_SQL = (
    "SELECT state, method, path, body_hash, status, content_type, body, body_stored, "
    "reservation_id FROM idempotency_keys "
    "WHERE team_id = ? AND environment = ? AND idempotency_key = ? AND created_at > ?"
)
# A claim of a key found free: absent, or held by an expired record, which the
# new one replaces.
CLAIM_SQL = (
    "INSERT INTO idempotency_keys (team_id, environment, idempotency_key, state, method, "
    "path, reservation_id, created_at) VALUES (?, ?, ?, 'in_flight', ?, ?, ?, ?) "
    "ON CONFLICT (team_id, environment, idempotency_key) DO UPDATE SET "
    "state = excluded.state, method = excluded.method, path = excluded.path, "
    "reservation_id = excluded.reservation_id, body_hash = NULL, status = NULL, "
    "content_type = NULL, body = NULL, body_stored = 0, created_at = excluded.created_at, "
    "completed_at = NULL"
)


class SqliteIdempotency(SqliteCore):
    """The Idempotency-Key half of the Ledger on SQLite."""

    async def claim_idempotency(
        self, team_id: str, environment: Environment, claim: IdempotencyClaim
    ) -> IdempotencyRecord | None:
        def claim_key(db: sqlite3.Connection) -> IdempotencyRecord | None:
            now = time.time()
            held = db.execute(
                HELD_SQL, (team_id, environment, claim.key, now - IDEMPOTENCY_TTL_SECONDS)
            ).fetchone()
            if held is not None:
                return model.idempotency_record(held)
            db.execute(
                CLAIM_SQL, (team_id, environment, claim.key, claim.method, claim.path, None, now)
            )
            return None

        return await self._run(self._tx, claim_key)

    async def _complete_idempotency(
        self,
        record: tuple[str, str, str],
        answer: tuple[str, int, str | None, bytes | None],
    ) -> None:
        stored = int(answer[3] is not None)
        await self._run(
            self._tx,
            lambda db: db.execute(
                "UPDATE idempotency_keys SET state = 'completed', body_hash = ?, status = ?, "
                "content_type = ?, body = ?, body_stored = ?, completed_at = ? "
                "WHERE team_id = ? AND environment = ? AND idempotency_key = ? "
                "AND state = 'in_flight'",
                (*answer, stored, time.time(), *record),
            ),
        )

    async def release_idempotency(self, team_id: str, environment: Environment, key: str) -> None:
        await self._run(
            self._tx,
            lambda db: db.execute(
                "DELETE FROM idempotency_keys "
                "WHERE team_id = ? AND environment = ? AND idempotency_key = ? "
                "AND state = 'in_flight'",
                (team_id, environment, key),
            ),
        )

    async def prune_idempotency(self, before: float) -> int:
        return await self._run(
            self._tx,
            lambda db: (
                db.execute("DELETE FROM idempotency_keys WHERE created_at < ?", (before,)).rowcount
            ),
        )
