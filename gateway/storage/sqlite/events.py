"""SQLite: events, webhook endpoints and deliveries (see :mod:`gateway.storage.events`).

Claims need no row locks here: every write transaction takes the database's
write lock (``BEGIN IMMEDIATE``), so a claim by one process is complete before
another process looks.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Mapping, Sequence

import orjson

from gateway.models import Environment
from gateway.storage import Audit, EventRecord, NotFound, rules
from gateway.storage.events import (
    ENDPOINT_COLUMNS,
    AttemptResult,
    DeliveryAttempt,
    DueDelivery,
    Endpoint,
    QueueStats,
    delivery_attempt,
    due_delivery,
    endpoint,
    key_expired_event,
    no_webhook,
    stored_event_types,
    wants_event,
    webhook_changes,
    webhook_disabled_event,
)
from gateway.storage.sqlite.core import SqliteCore, insert_event

__all__ = ["SqliteEvents"]

_ENDPOINT_SQL = f"SELECT {ENDPOINT_COLUMNS} FROM webhook_endpoints"  # noqa: S608 - constant
_CLAIMED_SQL = """
SELECT d.id, d.endpoint_id, d.attempts, e.team_id, e.url, e.secret, e.previous_secret,
       e.previous_secret_until, e.failing_since, ev.id AS event_id, ev.type, ev.created_at, ev.data
FROM webhook_deliveries d
JOIN webhook_endpoints e ON e.id = d.endpoint_id
JOIN events ev ON ev.id = d.event_id
WHERE d.id = ?
"""
_ATTEMPTS_SQL = """
SELECT a.id, a.delivery_id, a.at, a.status, a.latency_ms, a.error, d.state, d.next_attempt_at,
       d.event_id, ev.type
FROM webhook_attempts a
JOIN webhook_deliveries d ON d.id = a.delivery_id
JOIN events ev ON ev.id = d.event_id
WHERE a.endpoint_id = ? AND a.id < ?
ORDER BY a.id DESC LIMIT ?
"""


class SqliteEvents(SqliteCore):
    async def add_events(self, events: Sequence[EventRecord]) -> int:
        def add(db: sqlite3.Connection) -> int:
            return sum(1 for event in events if insert_event(db, event))

        return await self._run(self._tx, add) if events else 0

    async def add_expired_key_events(self, since: float, now: float) -> int:
        def add(db: sqlite3.Connection) -> int:
            rows = db.execute(
                "SELECT id, team_id, prefix, environment, expires_at FROM api_keys "
                "WHERE expires_at > ? AND expires_at <= ? AND revoked_at IS NULL",
                (since, now),
            ).fetchall()
            return sum(1 for row in rows if insert_event(db, key_expired_event(row)))

        return await self._run(self._tx, add)

    async def create_webhook(
        self,
        team_id: str,
        url: str,
        description: str,
        events: Sequence[str],
        secret: str,
        *,
        audit: Audit[Endpoint] | None = None,
    ) -> Endpoint:
        endpoint_id = rules.new_id("whep")

        def create(db: sqlite3.Connection) -> Endpoint:
            if db.execute("SELECT 1 FROM teams WHERE id = ?", (team_id,)).fetchone() is None:
                raise rules.no_team(team_id)
            db.execute(
                "INSERT INTO webhook_endpoints (id, team_id, url, description, events, secret, "
                "created_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (endpoint_id, team_id, url, description, stored_event_types(events), secret,
                 time.time()),
            )  # fmt: skip
            return self._write_audit(db, audit, self._endpoint(db, endpoint_id))

        return await self._run(self._tx, create)

    @staticmethod
    def _endpoint(db: sqlite3.Connection, endpoint_id: str) -> Endpoint:
        row = db.execute(_ENDPOINT_SQL + " WHERE id = ?", (endpoint_id,)).fetchone()
        if row is None:
            raise no_webhook(endpoint_id)
        return endpoint(row)

    async def webhooks(self, team_id: str) -> list[Endpoint]:
        def read() -> list[Endpoint]:
            query = _ENDPOINT_SQL + " WHERE team_id = ? ORDER BY created_at, id"
            return [endpoint(r) for r in self._db.execute(query, (team_id,)).fetchall()]

        return await self._run(read)

    async def get_webhook(self, endpoint_id: str) -> Endpoint:
        return await self._run(self._endpoint, self._db, endpoint_id)

    async def update_webhook(
        self,
        endpoint_id: str,
        changes: Mapping[str, object],
        *,
        audit: Audit[Endpoint] | None = None,
    ) -> Endpoint:
        values = webhook_changes(changes, stored_event_types)

        def update(db: sqlite3.Connection) -> Endpoint:
            self._endpoint(db, endpoint_id)
            if values:
                assignments = ", ".join(f"{name} = ?" for name in values)
                db.execute(
                    f"UPDATE webhook_endpoints SET {assignments} WHERE id = ?",  # noqa: S608
                    (*values.values(), endpoint_id),
                )
            return self._write_audit(db, audit, self._endpoint(db, endpoint_id))

        return await self._run(self._tx, update)

    async def delete_webhook(
        self, endpoint_id: str, *, audit: Audit[Endpoint] | None = None
    ) -> Endpoint:
        def delete(db: sqlite3.Connection) -> Endpoint:
            gone = self._endpoint(db, endpoint_id)
            db.execute("DELETE FROM webhook_attempts WHERE endpoint_id = ?", (endpoint_id,))
            db.execute("DELETE FROM webhook_endpoints WHERE id = ?", (endpoint_id,))
            return self._write_audit(db, audit, gone)

        return await self._run(self._tx, delete)

    async def rotate_webhook_secret(
        self,
        endpoint_id: str,
        secret: str,
        previous_valid_until: float,
        *,
        audit: Audit[Endpoint] | None = None,
    ) -> Endpoint:
        def rotate(db: sqlite3.Connection) -> Endpoint:
            self._endpoint(db, endpoint_id)
            db.execute(
                "UPDATE webhook_endpoints SET previous_secret = secret, secret = ?, "
                "previous_secret_until = ? WHERE id = ?",
                (secret, previous_valid_until, endpoint_id),
            )
            return self._write_audit(db, audit, self._endpoint(db, endpoint_id))

        return await self._run(self._tx, rotate)

    async def set_alert(
        self,
        team_id: str,
        environment: Environment,
        low_balance_threshold: int | None,
        *,
        audit: Audit[int | None] | None = None,
    ) -> int | None:
        def set_alert(db: sqlite3.Connection) -> int | None:
            if db.execute("SELECT 1 FROM teams WHERE id = ?", (team_id,)).fetchone() is None:
                raise rules.no_team(team_id)
            db.execute(
                "INSERT INTO balances (team_id, environment, available, low_threshold) "
                "VALUES (?, ?, 0, ?) ON CONFLICT (team_id, environment) DO UPDATE SET "
                "low_threshold = excluded.low_threshold, low_armed = 1",
                (team_id, environment, low_balance_threshold),
            )
            return self._write_audit(db, audit, low_balance_threshold)

        return await self._run(self._tx, set_alert)

    async def alerts(self, team_id: str) -> dict[str, int | None]:
        def read() -> dict[str, int | None]:
            rows = self._db.execute(
                "SELECT environment, low_threshold FROM balances WHERE team_id = ?", (team_id,)
            ).fetchall()
            found = {r["environment"]: r["low_threshold"] for r in rows}
            return {env: found.get(env) for env in ("live", "test")}

        return await self._run(read)

    async def dispatch_events(self, limit: int) -> int:
        def dispatch(db: sqlite3.Connection) -> int:
            rows = db.execute(
                "SELECT id, type, team_id FROM events WHERE dispatched = 0 "
                "ORDER BY created_at LIMIT ?",
                (limit,),
            ).fetchall()
            now = time.time()
            for row in rows:
                for target in db.execute(
                    "SELECT id, events FROM webhook_endpoints WHERE team_id = ? AND enabled = 1",
                    (row["team_id"],),
                ).fetchall():
                    if wants_event(endpoint_types(target["events"]), row["type"]):
                        db.execute(
                            "INSERT INTO webhook_deliveries (id, event_id, endpoint_id, state, "
                            "next_attempt_at, created_at) VALUES (?, ?, ?, 'pending', ?, ?) "
                            "ON CONFLICT (event_id, endpoint_id) DO NOTHING",
                            (rules.new_id("whd"), row["id"], target["id"], now, now),
                        )
                db.execute("UPDATE events SET dispatched = 1 WHERE id = ?", (row["id"],))
            return len(rows)

        return await self._run(self._tx, dispatch)

    async def claim_deliveries(self, lease_seconds: float, limit: int) -> list[DueDelivery]:
        def claim(db: sqlite3.Connection) -> list[DueDelivery]:
            now = time.time()
            ids = [
                r[0]
                for r in db.execute(
                    "SELECT d.id FROM webhook_deliveries d "
                    "JOIN webhook_endpoints e ON e.id = d.endpoint_id AND e.enabled = 1 "
                    "WHERE d.state = 'pending' AND d.next_attempt_at <= ? "
                    "ORDER BY d.next_attempt_at LIMIT ?",
                    (now, limit),
                ).fetchall()
            ]
            claimed = []
            for delivery_id in ids:
                db.execute(
                    "UPDATE webhook_deliveries SET next_attempt_at = ?, attempts = attempts + 1 "
                    "WHERE id = ?",
                    (now + lease_seconds, delivery_id),
                )
                row = db.execute(_CLAIMED_SQL, (delivery_id,)).fetchone()
                claimed.append(due_delivery(row, now))
            return claimed

        return await self._run(self._tx, claim)

    async def record_attempt(self, result: AttemptResult) -> None:
        def record(db: sqlite3.Connection) -> None:
            row = db.execute(
                "SELECT d.endpoint_id, e.team_id, e.url FROM webhook_deliveries d "
                "JOIN webhook_endpoints e ON e.id = d.endpoint_id WHERE d.id = ?",
                (result.delivery_id,),
            ).fetchone()
            if row is None:
                return  # the endpoint was deleted while its delivery was out
            endpoint_id = row["endpoint_id"]
            db.execute(
                "INSERT INTO webhook_attempts (delivery_id, endpoint_id, at, status, latency_ms, "
                "error) VALUES (?, ?, ?, ?, ?, ?)",
                (result.delivery_id, endpoint_id, result.at, result.status, result.latency_ms,
                 result.error),
            )  # fmt: skip
            db.execute(
                "UPDATE webhook_deliveries SET state = ?, next_attempt_at = ? WHERE id = ?",
                (result.state, result.next_attempt_at, result.delivery_id),
            )
            if result.state == "delivered":
                db.execute(
                    "UPDATE webhook_endpoints SET failing_since = NULL WHERE id = ?",
                    (endpoint_id,),
                )
                return
            db.execute(
                "UPDATE webhook_endpoints SET failing_since = COALESCE(failing_since, ?) "
                "WHERE id = ?",
                (result.at, endpoint_id),
            )
            if result.disable_endpoint is not None:
                db.execute(
                    "UPDATE webhook_endpoints SET enabled = 0, disabled_reason = ? "
                    "WHERE id = ? AND enabled = 1",
                    (result.disable_endpoint, endpoint_id),
                )
                insert_event(db, webhook_disabled_event(
                    row["team_id"], endpoint_id, row["url"], result.disable_endpoint
                ))  # fmt: skip

        await self._run(self._tx, record)

    async def delivery_attempts(
        self, endpoint_id: str, limit: int, before: int | None = None
    ) -> list[DeliveryAttempt]:
        def read() -> list[DeliveryAttempt]:
            self._endpoint(self._db, endpoint_id)
            args = (endpoint_id, 2**62 if before is None else before, limit)
            return [delivery_attempt(r) for r in self._db.execute(_ATTEMPTS_SQL, args)]

        return await self._run(read)

    async def retry_delivery(
        self, endpoint_id: str, delivery_id: str, *, audit: Audit[str] | None = None
    ) -> str:
        def retry(db: sqlite3.Connection) -> str:
            cursor = db.execute(
                "UPDATE webhook_deliveries SET state = 'pending', next_attempt_at = ? "
                "WHERE id = ? AND endpoint_id = ?",
                (time.time(), delivery_id, endpoint_id),
            )
            if not cursor.rowcount:
                raise NotFound(f"no delivery {delivery_id!r} of webhook {endpoint_id!r}")
            return self._write_audit(db, audit, delivery_id)

        return await self._run(self._tx, retry)

    async def add_test_event(self, endpoint_id: str, event: EventRecord) -> str:
        def add(db: sqlite3.Connection) -> str:
            self._endpoint(db, endpoint_id)
            event_id = insert_event(db, event, dispatched=True)
            now = time.time()
            db.execute(
                "INSERT INTO webhook_deliveries (id, event_id, endpoint_id, state, "
                "next_attempt_at, created_at) VALUES (?, ?, ?, 'pending', ?, ?)",
                (rules.new_id("whd"), event_id, endpoint_id, now, now),
            )
            return event_id

        return await self._run(self._tx, add)

    async def webhook_queue(self) -> QueueStats:
        def read() -> QueueStats:
            row = self._db.execute(
                "SELECT count(*) AS n, MIN(next_attempt_at) AS oldest FROM webhook_deliveries d "
                "JOIN webhook_endpoints e ON e.id = d.endpoint_id AND e.enabled = 1 "
                "WHERE d.state = 'pending'"
            ).fetchone()
            oldest = row["oldest"]
            waited = 0.0 if oldest is None else max(0.0, time.time() - oldest)
            return QueueStats(int(row["n"]), waited)

        return await self._run(read)

    async def prune_events(self, before: float, batch: int) -> int:
        def prune(db: sqlite3.Connection) -> int:
            return db.execute(
                "DELETE FROM events WHERE id IN (SELECT id FROM events WHERE created_at < ? "
                "AND dispatched = 1 AND NOT EXISTS (SELECT 1 FROM webhook_deliveries d "
                "WHERE d.event_id = events.id AND d.state = 'pending') LIMIT ?)",
                (before, batch),
            ).rowcount

        return await self._run(self._tx, prune)


def endpoint_types(stored: str) -> list[str]:
    types: list[str] = orjson.loads(stored)
    return types
