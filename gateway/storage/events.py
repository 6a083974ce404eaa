"""The store's side of events and webhooks: the outbox, endpoints and deliveries.

An event is a row written in the transaction of the change it tells of (an
outbox): by the audit writer for management changes, by triggers on the
balances for ``credits.low`` and ``credits.exhausted``, and by the delivery
worker for what only a clock or the traffic knows (``key.expired``,
``anomaly.detected``). A rolled-back change leaves no event.

A worker on every process fans new events out to the team's enabled endpoints
that want their type (one delivery per event and endpoint, unique), then
claims due deliveries: a claim moves the delivery's next attempt one lease
ahead in the claiming statement (``FOR UPDATE SKIP LOCKED`` on PostgreSQL, the
write lock on SQLite), so no two workers send it at once, and a worker killed
mid-send leaves it due again when the lease ends: at least once, same id.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal, NamedTuple, Protocol, cast

import orjson

from gateway.models import Environment
from gateway.storage.types import Audit, EventRecord, NotFound

__all__ = [
    "ENDPOINT_COLUMNS",
    "EVENT_TYPES",
    "AttemptResult",
    "DeliveryAttempt",
    "DueDelivery",
    "Endpoint",
    "EventRecord",
    "EventStore",
    "QueueStats",
    "delivery_attempt",
    "due_delivery",
    "endpoint",
    "key_expired_event",
    "no_webhook",
    "stored_event_types",
    "wants_event",
    "webhook_changes",
    "webhook_disabled_event",
]

EVENT_TYPES = (
    "credits.low",
    "credits.exhausted",
    "credits.granted",
    "credits.refilled",
    "key.created",
    "key.revoked",
    "key.rotated",
    "key.expired",
    "key.leaked",
    "anomaly.detected",
    "token.created",
    "token.revoked",
    "webhook.disabled",
    "webhook.test",
)

DeliveryState = Literal["pending", "delivered", "failed"]


class Endpoint(NamedTuple):
    """A webhook endpoint as shown (never its secret)."""

    id: str
    team_id: str
    url: str
    description: str
    events: tuple[str, ...]
    enabled: bool
    created_at: float
    failing_since: float | None
    disabled_reason: str | None


class DueDelivery(NamedTuple):
    """A delivery claimed for sending, with all it takes to send it."""

    id: str
    endpoint_id: str
    team_id: str
    url: str
    secrets: tuple[str, ...]  # the current secret, then the previous one within its grace
    event_id: str
    event_type: str
    event_at: float
    data: str  # the event's data, JSON text
    attempts: int  # this one included
    failing_since: float | None


class AttemptResult(NamedTuple):
    """What one attempt came to, and what happens next."""

    delivery_id: str
    at: float
    status: int | None  # the receiver's status code; None when none came
    latency_ms: float
    error: str | None
    state: DeliveryState  # delivered, pending (again at next_attempt_at) or failed
    next_attempt_at: float | None
    disable_endpoint: str | None  # why the endpoint is disabled now, if it is


class DeliveryAttempt(NamedTuple):
    """One attempt as listed: newest first, with its delivery's state."""

    id: int
    delivery_id: str
    event_id: str
    event_type: str
    at: float
    status: int | None
    latency_ms: float
    error: str | None
    state: DeliveryState
    next_attempt_at: float | None


class QueueStats(NamedTuple):
    pending: int
    oldest_due_seconds: float  # how long the longest-waiting due delivery has waited


class EventStore(Protocol):
    """Events, webhook endpoints and their deliveries."""

    async def add_events(self, events: Sequence[EventRecord]) -> int:
        """Write events (those whose dedupe key was seen are skipped); how many were new."""
        ...

    async def add_expired_key_events(self, since: float, now: float) -> int:
        """A ``key.expired`` event for each key that expired in (since, now], once per expiry."""
        ...

    async def create_webhook(
        self,
        team_id: str,
        url: str,
        description: str,
        events: Sequence[str],
        secret: str,
        *,
        audit: Audit[Endpoint] | None = None,
    ) -> Endpoint: ...

    async def webhooks(self, team_id: str) -> list[Endpoint]: ...

    async def get_webhook(self, endpoint_id: str) -> Endpoint:
        """NotFound when there is none."""
        ...

    async def update_webhook(
        self,
        endpoint_id: str,
        changes: Mapping[str, object],
        *,
        audit: Audit[Endpoint] | None = None,
    ) -> Endpoint:
        """Change url, description, events or enabled (enabling clears the failure record)."""
        ...

    async def delete_webhook(
        self, endpoint_id: str, *, audit: Audit[Endpoint] | None = None
    ) -> Endpoint: ...

    async def rotate_webhook_secret(
        self,
        endpoint_id: str,
        secret: str,
        previous_valid_until: float,
        *,
        audit: Audit[Endpoint] | None = None,
    ) -> Endpoint:
        """The new secret signs from now; the old one too, beside it, until the given time."""
        ...

    async def set_alert(
        self,
        team_id: str,
        environment: Environment,
        low_balance_threshold: int | None,
        *,
        audit: Audit[int | None] | None = None,
    ) -> int | None:
        """Where ``credits.low`` fires for the account (None: never); armed again at once."""
        ...

    async def alerts(self, team_id: str) -> dict[str, int | None]:
        """The low-balance threshold per environment."""
        ...

    async def dispatch_events(self, limit: int) -> int:
        """Fan new events out to the endpoints that want them; how many events were taken."""
        ...

    async def claim_deliveries(self, lease_seconds: float, limit: int) -> list[DueDelivery]:
        """Take up to ``limit`` due deliveries of enabled endpoints for ``lease_seconds``."""
        ...

    async def record_attempt(self, result: AttemptResult) -> None:
        """Record an attempt and its consequence (delivered, again later, failed, disabled)."""
        ...

    async def delivery_attempts(
        self, endpoint_id: str, limit: int, before: int | None = None
    ) -> list[DeliveryAttempt]:
        """The endpoint's attempts, newest first (ids below ``before``)."""
        ...

    async def retry_delivery(
        self, endpoint_id: str, delivery_id: str, *, audit: Audit[str] | None = None
    ) -> str:
        """Make the delivery due now (again, if it was done or failed). NotFound if none."""
        ...

    async def add_test_event(self, endpoint_id: str, event: EventRecord) -> str:
        """Write ``event`` with a delivery to this endpoint only; its id."""
        ...

    async def webhook_queue(self) -> QueueStats: ...

    async def prune_events(self, before: float, batch: int) -> int:
        """Remove events older than ``before`` whose deliveries are all done or failed."""
        ...


# -- rows, mapped once for both backends ----------------------------------------------

ENDPOINT_COLUMNS = (
    "id, team_id, url, description, events, enabled, created_at, failing_since, disabled_reason"
)


def endpoint(row: Any) -> Endpoint:
    events = row["events"]
    # SQLite keeps the list as JSON text, PostgreSQL as text[].
    types = orjson.loads(events) if isinstance(events, str) else events
    return Endpoint(
        row["id"], row["team_id"], row["url"], row["description"], tuple(types),
        bool(row["enabled"]), row["created_at"], row["failing_since"], row["disabled_reason"],
    )  # fmt: skip


def due_delivery(row: Any, now: float) -> DueDelivery:
    secrets = [row["secret"]]
    until = row["previous_secret_until"]
    if row["previous_secret"] is not None and until is not None and until > now:
        secrets.append(row["previous_secret"])
    data = row["data"]
    return DueDelivery(
        row["id"], row["endpoint_id"], row["team_id"], row["url"], tuple(secrets),
        row["event_id"], row["type"], row["created_at"],
        data if isinstance(data, str) else orjson.dumps(data).decode(),
        int(row["attempts"]), row["failing_since"],
    )  # fmt: skip


def delivery_attempt(row: Any) -> DeliveryAttempt:
    return DeliveryAttempt(
        int(row["id"]), row["delivery_id"], row["event_id"], row["type"], row["at"],
        row["status"], float(row["latency_ms"]), row["error"], row["state"],
        row["next_attempt_at"] if row["state"] == "pending" else None,
    )  # fmt: skip


def stored_event_types(types: Sequence[str]) -> str:
    """The endpoint's event types as SQLite keeps them (JSON text)."""
    return orjson.dumps(list(types)).decode()


# -- rules, written once for both backends ---------------------------------------------

# What update_webhook may change; anything else is refused (ValueError).
WEBHOOK_FIELDS = frozenset({"url", "description", "events", "enabled"})


def webhook_changes(
    changes: Mapping[str, object], stored: Callable[[Sequence[str]], object]
) -> dict[str, object]:
    """The columns to set for ``changes``; enabling an endpoint forgets its failures."""
    unknown = set(changes) - WEBHOOK_FIELDS
    if unknown:
        raise ValueError(f"update_webhook cannot change {sorted(unknown)}")
    values = dict(changes)
    if "events" in values:
        values["events"] = stored(cast(Sequence[str], values["events"]))
    if values.get("enabled") is True:
        values["failing_since"] = None
        values["disabled_reason"] = None
    return values


def wants_event(types: Sequence[str], event_type: str) -> bool:
    """Whether an endpoint that asked for ``types`` gets ``event_type`` ("*" is every type)."""
    return event_type in types or ("*" in types and event_type != "webhook.test")


def no_webhook(endpoint_id: str) -> NotFound:
    return NotFound(f"no webhook {endpoint_id!r}")


def key_expired_event(row: Any) -> EventRecord:
    """``key.expired`` for a key row (id, team_id, prefix, environment, expires_at), once."""
    data = {"team_id": row["team_id"], "key_id": row["id"], "prefix": row["prefix"],
            "environment": row["environment"], "expired_at": float(row["expires_at"])}  # fmt: skip
    once = f"key.expired:{row['id']}:{float(row['expires_at'])!r}"
    return EventRecord("key.expired", row["team_id"], data, dedupe_key=once)


def webhook_disabled_event(team_id: str, endpoint_id: str, url: str, reason: str) -> EventRecord:
    data = {"team_id": team_id, "webhook_id": endpoint_id, "url": url, "reason": reason}
    return EventRecord("webhook.disabled", team_id, data)
