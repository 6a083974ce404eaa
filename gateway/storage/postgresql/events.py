"""PostgreSQL: events, webhook endpoints and deliveries (see :mod:`gateway.storage.events`).

Fan-out and claims take their rows ``FOR UPDATE SKIP LOCKED``: workers on
every replica share the queue, and none waits for or repeats another's rows.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

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
    webhook_changes,
    webhook_disabled_event,
)
from gateway.storage.postgresql.core import PostgresCore, insert_event

if TYPE_CHECKING:
    from gateway.storage.postgresql.core import Connection

__all__ = ["PostgresEvents"]

_ENDPOINT_SQL = f"SELECT {ENDPOINT_COLUMNS} FROM webhook_endpoints"  # noqa: S608 - constant
_CREATE_ENDPOINT = (
    "INSERT INTO webhook_endpoints (id, team_id, url, description, events, secret) "  # noqa: S608
    f"VALUES ($1, $2, $3, $4, $5, $6) RETURNING {ENDPOINT_COLUMNS}"
)

# New events, fanned out to the enabled endpoints of their team that want their
# type ('*' is every type but the test event), then marked done.
_DISPATCH = """
WITH batch AS (
    SELECT id, type, team_id FROM events WHERE NOT dispatched
    ORDER BY created_at LIMIT $1 FOR UPDATE SKIP LOCKED
), fan AS (
    INSERT INTO webhook_deliveries (id, event_id, endpoint_id, state, next_attempt_at)
    SELECT 'whd_' || substr(md5(gen_random_uuid()::text), 1, 24), b.id, e.id, 'pending', now()
    FROM batch b JOIN webhook_endpoints e ON e.team_id = b.team_id AND e.enabled
    WHERE b.type = ANY (e.events) OR ('*' = ANY (e.events) AND b.type <> 'webhook.test')
    ON CONFLICT (event_id, endpoint_id) DO NOTHING
), done AS (
    UPDATE events SET dispatched = true WHERE id IN (SELECT id FROM batch) RETURNING 1
)
SELECT count(*) FROM done
"""
_CLAIM = """
WITH due AS (
    SELECT d.id FROM webhook_deliveries d
    JOIN webhook_endpoints e ON e.id = d.endpoint_id AND e.enabled
    WHERE d.state = 'pending' AND d.next_attempt_at <= now()
    ORDER BY d.next_attempt_at LIMIT $2
    FOR UPDATE OF d SKIP LOCKED
), claimed AS (
    UPDATE webhook_deliveries d
    SET next_attempt_at = now() + make_interval(secs => $1), attempts = d.attempts + 1
    FROM due WHERE d.id = due.id
    RETURNING d.id, d.endpoint_id, d.event_id, d.attempts
)
SELECT c.id, c.endpoint_id, c.attempts, e.team_id, e.url, e.secret, e.previous_secret,
       e.previous_secret_until, e.failing_since, ev.id AS event_id, ev.type, ev.created_at,
       ev.data::text AS data
FROM claimed c
JOIN webhook_endpoints e ON e.id = c.endpoint_id
JOIN events ev ON ev.id = c.event_id
"""
_ATTEMPTS = """
SELECT a.id, a.delivery_id, a.at, a.status, a.latency_ms, a.error, d.state, d.next_attempt_at,
       d.event_id, ev.type
FROM webhook_attempts a
JOIN webhook_deliveries d ON d.id = a.delivery_id
JOIN events ev ON ev.id = d.event_id
WHERE a.endpoint_id = $1 AND a.id < $2
ORDER BY a.id DESC LIMIT $3
"""


class PostgresEvents(PostgresCore):
    async def add_events(self, events: Sequence[EventRecord]) -> int:
        if not events:
            return 0
        async with self._transaction() as conn:
            return sum([1 for event in events if await insert_event(conn, event)])

    async def add_expired_key_events(self, since: float, now: float) -> int:
        async with self._transaction() as conn:
            rows = await conn.fetch(
                "SELECT id, team_id, prefix, environment, expires_at FROM api_keys "
                "WHERE expires_at > $1 AND expires_at <= $2 AND revoked_at IS NULL",
                since, now,
            )  # fmt: skip
            return sum([1 for row in rows if await insert_event(conn, key_expired_event(row))])

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
        async with self._transaction() as conn:
            if await conn.fetchval("SELECT 1 FROM teams WHERE id = $1", team_id) is None:
                raise rules.no_team(team_id)
            row = await conn.fetchrow(
                _CREATE_ENDPOINT,
                rules.new_id("whep"), team_id, url, description, list(events), secret,
            )  # fmt: skip
            return await self._write_audit(conn, audit, endpoint(row))

    @staticmethod
    async def _endpoint(conn: Connection, endpoint_id: str) -> Endpoint:
        row = await conn.fetchrow(_ENDPOINT_SQL + " WHERE id = $1", endpoint_id)
        if row is None:
            raise no_webhook(endpoint_id)
        return endpoint(row)

    async def webhooks(self, team_id: str) -> list[Endpoint]:
        rows = await self._fetch(_ENDPOINT_SQL + " WHERE team_id = $1 ORDER BY created_at, id",
                                 team_id)  # fmt: skip
        return [endpoint(r) for r in rows]

    async def get_webhook(self, endpoint_id: str) -> Endpoint:
        async with self._connection() as conn:
            return await self._endpoint(conn, endpoint_id)

    async def update_webhook(
        self,
        endpoint_id: str,
        changes: Mapping[str, object],
        *,
        audit: Audit[Endpoint] | None = None,
    ) -> Endpoint:
        values = webhook_changes(changes, list)
        async with self._transaction() as conn:
            await self._endpoint(conn, endpoint_id)
            if values:
                names = list(values)
                assignments = ", ".join(f"{n} = ${i + 2}" for i, n in enumerate(names))
                await conn.execute(
                    f"UPDATE webhook_endpoints SET {assignments} WHERE id = $1",  # noqa: S608
                    endpoint_id, *values.values(),
                )  # fmt: skip
            return await self._write_audit(conn, audit, await self._endpoint(conn, endpoint_id))

    async def delete_webhook(
        self, endpoint_id: str, *, audit: Audit[Endpoint] | None = None
    ) -> Endpoint:
        async with self._transaction() as conn:
            gone = await self._endpoint(conn, endpoint_id)
            await conn.execute("DELETE FROM webhook_attempts WHERE endpoint_id = $1", endpoint_id)
            await conn.execute("DELETE FROM webhook_endpoints WHERE id = $1", endpoint_id)
            return await self._write_audit(conn, audit, gone)

    async def rotate_webhook_secret(
        self,
        endpoint_id: str,
        secret: str,
        previous_valid_until: float,
        *,
        audit: Audit[Endpoint] | None = None,
    ) -> Endpoint:
        async with self._transaction() as conn:
            await self._endpoint(conn, endpoint_id)
            await conn.execute(
                "UPDATE webhook_endpoints SET previous_secret = secret, secret = $2, "
                "previous_secret_until = $3 WHERE id = $1",
                endpoint_id, secret, previous_valid_until,
            )  # fmt: skip
            return await self._write_audit(conn, audit, await self._endpoint(conn, endpoint_id))

    async def set_alert(
        self,
        team_id: str,
        environment: Environment,
        low_balance_threshold: int | None,
        *,
        audit: Audit[int | None] | None = None,
    ) -> int | None:
        async with self._transaction() as conn:
            if await conn.fetchval("SELECT 1 FROM teams WHERE id = $1", team_id) is None:
                raise rules.no_team(team_id)
            await conn.execute(
                "INSERT INTO balances (team_id, environment, available, low_threshold) "
                "VALUES ($1, $2, 0, $3) ON CONFLICT (team_id, environment) DO UPDATE SET "
                "low_threshold = excluded.low_threshold, low_armed = true",
                team_id, environment, low_balance_threshold,
            )  # fmt: skip
            return await self._write_audit(conn, audit, low_balance_threshold)

    async def alerts(self, team_id: str) -> dict[str, int | None]:
        rows = await self._fetch(
            "SELECT environment, low_threshold FROM balances WHERE team_id = $1", team_id
        )
        found = {r["environment"]: r["low_threshold"] for r in rows}
        return {env: found.get(env) for env in ("live", "test")}

    async def dispatch_events(self, limit: int) -> int:
        return int(await self._fetchval(_DISPATCH, limit))

    async def claim_deliveries(self, lease_seconds: float, limit: int) -> list[DueDelivery]:
        rows = await self._fetch(_CLAIM, lease_seconds, limit)
        now = time.time()
        return [due_delivery(r, now) for r in rows]

    async def record_attempt(self, result: AttemptResult) -> None:
        async with self._transaction() as conn:
            row = await conn.fetchrow(
                "SELECT d.endpoint_id, e.team_id, e.url FROM webhook_deliveries d "
                "JOIN webhook_endpoints e ON e.id = d.endpoint_id WHERE d.id = $1 FOR UPDATE OF e",
                result.delivery_id,
            )
            if row is None:
                return  # the endpoint was deleted while its delivery was out
            endpoint_id = row["endpoint_id"]
            await conn.execute(
                "INSERT INTO webhook_attempts (delivery_id, endpoint_id, at, status, latency_ms, "
                "error) VALUES ($1, $2, $3, $4, $5, $6)",
                result.delivery_id, endpoint_id, result.at, result.status, result.latency_ms,
                result.error,
            )  # fmt: skip
            await conn.execute(
                "UPDATE webhook_deliveries SET state = $2, next_attempt_at = $3 WHERE id = $1",
                result.delivery_id, result.state, result.next_attempt_at,
            )  # fmt: skip
            if result.state == "delivered":
                await conn.execute(
                    "UPDATE webhook_endpoints SET failing_since = NULL WHERE id = $1 "
                    "AND failing_since IS NOT NULL",
                    endpoint_id,
                )
                return
            await conn.execute(
                "UPDATE webhook_endpoints SET failing_since = COALESCE(failing_since, $2) "
                "WHERE id = $1",
                endpoint_id, result.at,
            )  # fmt: skip
            if result.disable_endpoint is None:
                return
            disabled = await conn.fetchval(
                "UPDATE webhook_endpoints SET enabled = false, disabled_reason = $2 "
                "WHERE id = $1 AND enabled RETURNING 1",
                endpoint_id, result.disable_endpoint,
            )  # fmt: skip
            if disabled:
                await insert_event(conn, webhook_disabled_event(
                    row["team_id"], endpoint_id, row["url"], result.disable_endpoint
                ))  # fmt: skip

    async def delivery_attempts(
        self, endpoint_id: str, limit: int, before: int | None = None
    ) -> list[DeliveryAttempt]:
        async with self._connection() as conn:
            await self._endpoint(conn, endpoint_id)
            rows = await conn.fetch(
                _ATTEMPTS, endpoint_id, 2**62 if before is None else before, limit
            )
        return [delivery_attempt(r) for r in rows]

    async def retry_delivery(
        self, endpoint_id: str, delivery_id: str, *, audit: Audit[str] | None = None
    ) -> str:
        async with self._transaction() as conn:
            found = await conn.fetchval(
                "UPDATE webhook_deliveries SET state = 'pending', next_attempt_at = now() "
                "WHERE id = $1 AND endpoint_id = $2 RETURNING 1",
                delivery_id, endpoint_id,
            )  # fmt: skip
            if found is None:
                raise NotFound(f"no delivery {delivery_id!r} of webhook {endpoint_id!r}")
            return await self._write_audit(conn, audit, delivery_id)

    async def add_test_event(self, endpoint_id: str, event: EventRecord) -> str:
        async with self._transaction() as conn:
            await self._endpoint(conn, endpoint_id)
            event_id = await insert_event(conn, event, dispatched=True)
            await conn.execute(
                "INSERT INTO webhook_deliveries (id, event_id, endpoint_id, state, "
                "next_attempt_at) VALUES ($1, $2, $3, 'pending', now())",
                rules.new_id("whd"), event_id, endpoint_id,
            )  # fmt: skip
            return event_id

    async def webhook_queue(self) -> QueueStats:
        row = await self._fetchrow(
            "SELECT count(*) AS n, MIN(d.next_attempt_at) AS oldest FROM webhook_deliveries d "
            "JOIN webhook_endpoints e ON e.id = d.endpoint_id AND e.enabled "
            "WHERE d.state = 'pending'"
        )
        assert row is not None
        oldest = row["oldest"]
        waited = 0.0 if oldest is None else max(0.0, time.time() - oldest)
        return QueueStats(int(row["n"]), waited)

    async def prune_events(self, before: float, batch: int) -> int:
        return int(await self._fetchval(
            "WITH gone AS (DELETE FROM events WHERE id IN (SELECT id FROM events "
            "WHERE created_at < $1 AND dispatched AND NOT EXISTS (SELECT 1 FROM "
            "webhook_deliveries d WHERE d.event_id = events.id AND d.state = 'pending') "
            "LIMIT $2) RETURNING 1) SELECT count(*) FROM gone",
            before, batch,
        ))  # fmt: skip
