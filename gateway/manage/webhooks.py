"""Webhook actions: endpoints, their deliveries, test events and balance alerts.

Input, permission (the operator, or a team token for its own team), the
receiver's address and the audit entry are checked and said here once; the
admin API, the console and the CLI only translate.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import cast
from urllib.parse import urlsplit

from gateway.events.guard import check_url, refused_address
from gateway.events.signing import new_secret
from gateway.manage._core import Core, iso
from gateway.manage.actors import SYSTEM, Actor
from gateway.manage.audit import audit
from gateway.manage.bounds import BALANCE_MAX, GRACE_MAX_SECONDS
from gateway.manage.inputs import Check, Unknown, text_problem
from gateway.models import Environment
from gateway.storage import EventRecord, NotFound
from gateway.storage.events import EVENT_TYPES, DeliveryAttempt, Endpoint

__all__ = ["CreatedWebhook", "WebhookActions", "attempt_view", "endpoint_view"]

DESCRIPTION_MAX = 500
_ID_MAX = 100
_RESOLVE_SECONDS = 5.0
_EVENTS_MAX = 50  # names listed (repeats are kept once)


@dataclass(frozen=True, slots=True)
class CreatedWebhook:
    endpoint: Endpoint
    secret: str  # shown this once


def endpoint_view(endpoint: Endpoint) -> dict[str, object]:
    return {
        "id": endpoint.id, "team_id": endpoint.team_id, "url": endpoint.url,
        "description": endpoint.description, "events": list(endpoint.events),
        "enabled": endpoint.enabled, "created_at": iso(endpoint.created_at),
        "failing_since": iso(endpoint.failing_since),
        "disabled_reason": endpoint.disabled_reason,
    }  # fmt: skip


def attempt_view(attempt: DeliveryAttempt) -> dict[str, object]:
    return {
        "id": attempt.id, "delivery_id": attempt.delivery_id, "event_id": attempt.event_id,
        "event_type": attempt.event_type, "at": iso(attempt.at), "state": attempt.state,
        "response_status": attempt.status, "latency_ms": attempt.latency_ms,
        "error": attempt.error, "next_attempt_at": iso(attempt.next_attempt_at),
    }  # fmt: skip


class WebhookActions(Core):
    async def _checked_url(self, check: Check, url: str | None) -> None:
        """Refuse a receiver the worker would refuse: not a URL, or not a public address."""
        if url is None:
            return
        problem = text_problem(url, 2048) or check_url(url)
        if problem is not None:
            check.fail("url", problem)
            return
        if self._webhook_settings.allow_private_addresses:
            return
        host = urlsplit(url).hostname or ""
        refused = refused_address(host) if _is_address(host) else await _refused_name(host)
        if refused is not None:
            check.fail("url", refused)

    @staticmethod
    def _checked_events(check: Check, events: Sequence[str] | None) -> None:
        if events is None:
            return
        if not events or len(events) > _EVENTS_MAX:
            check.fail("events", 'must list 1 or more event types (or "*" for all)')
            return
        for name in events:
            if name != "*" and name not in EVENT_TYPES:
                check.fail("events", f"{str(name)[:60]!r} is not an event type; one of "
                           + ", ".join(EVENT_TYPES))  # fmt: skip

    async def _endpoint(self, endpoint_id: str, actor: Actor) -> Endpoint:
        try:
            if text_problem(endpoint_id, _ID_MAX) is not None:
                raise NotFound
            found = await self._backend.get_webhook(endpoint_id)
        except NotFound:
            raise Unknown("webhook", "webhook_id") from None
        if not actor.may_see(found.team_id):
            raise Unknown("webhook", "webhook_id")
        return found

    async def create_webhook(
        self,
        team: str,
        url: str,
        events: Sequence[str],
        description: str = "",
        *,
        actor: Actor = SYSTEM,
    ) -> CreatedWebhook:
        check = Check()
        await self._checked_url(check, url)
        self._checked_events(check, events)
        check.text("description", description or None, DESCRIPTION_MAX, optional=True)
        check.done()
        owner = await self.team(team, actor=actor)
        secret = new_secret()
        made = await self._backend.create_webhook(
            owner.id, url, description, list(dict.fromkeys(events)), secret,
            audit=audit(actor, "webhook.create",
                        lambda e: (e.id, e.team_id, {"url": e.url, "events": list(e.events)})),
        )  # fmt: skip
        return CreatedWebhook(made, secret)

    async def webhooks(self, team: str, *, actor: Actor = SYSTEM) -> list[Endpoint]:
        owner = await self.team(team, actor=actor)
        return await self._backend.webhooks(owner.id)

    async def webhook(self, endpoint_id: str, *, actor: Actor = SYSTEM) -> Endpoint:
        return await self._endpoint(endpoint_id, actor)

    async def update_webhook(
        self, endpoint_id: str, changes: dict[str, object], *, actor: Actor = SYSTEM
    ) -> Endpoint:
        check = Check()
        for name in set(changes) - {"url", "events", "enabled", "description"}:
            check.unknown(name)
        await self._checked_url(check, cast(str | None, changes.get("url")))
        self._checked_events(check, cast(Sequence[str] | None, changes.get("events")))
        if "description" in changes:
            check.text("description", cast(str, changes["description"]) or None,
                       DESCRIPTION_MAX, optional=True)  # fmt: skip
        if "enabled" in changes and not isinstance(changes["enabled"], bool):
            check.fail("enabled", "must be true or false")
        check.done()
        found = await self._endpoint(endpoint_id, actor)
        if "events" in changes:
            changes = {**changes, "events": list(dict.fromkeys(cast(list[str], changes["events"])))}
        said = {k: (list(cast(Sequence[str], v)) if k == "events" else v)
                for k, v in changes.items()}  # fmt: skip
        return await self._backend.update_webhook(
            found.id, changes, audit=audit(actor, "webhook.update",
                                           lambda e: (e.id, e.team_id, said)),
        )  # fmt: skip

    async def delete_webhook(self, endpoint_id: str, *, actor: Actor = SYSTEM) -> Endpoint:
        found = await self._endpoint(endpoint_id, actor)
        return await self._backend.delete_webhook(
            found.id, audit=audit(actor, "webhook.delete", lambda e: (e.id, e.team_id, {}))
        )

    async def rotate_webhook_secret(
        self, endpoint_id: str, grace_seconds: int = 86400, *, actor: Actor = SYSTEM
    ) -> CreatedWebhook:
        """A new secret; the old one signs beside it for ``grace_seconds``."""
        check = Check()
        check.integer("grace_seconds", grace_seconds, 0, GRACE_MAX_SECONDS)
        check.done()
        found = await self._endpoint(endpoint_id, actor)
        secret = new_secret()
        made = await self._backend.rotate_webhook_secret(
            found.id, secret, time.time() + grace_seconds,
            audit=audit(actor, "webhook.rotate_secret",
                        lambda e: (e.id, e.team_id, {"grace_seconds": grace_seconds})),
        )  # fmt: skip
        return CreatedWebhook(made, secret)

    async def webhook_attempts(
        self, endpoint_id: str, limit: int = 50, before: int | None = None,
        *, actor: Actor = SYSTEM,
    ) -> list[DeliveryAttempt]:  # fmt: skip
        check = Check()
        check.integer("limit", limit, 1, 1000)
        check.integer("cursor", before, 1, 2**62)
        check.done()
        found = await self._endpoint(endpoint_id, actor)
        return await self._backend.delivery_attempts(found.id, limit, before)

    async def retry_delivery(
        self, endpoint_id: str, delivery_id: str, *, actor: Actor = SYSTEM
    ) -> str:
        found = await self._endpoint(endpoint_id, actor)
        try:
            if text_problem(delivery_id, _ID_MAX) is not None:
                raise NotFound
            return await self._backend.retry_delivery(
                found.id, delivery_id,
                audit=audit(actor, "webhook.retry", lambda d: (found.id, found.team_id,
                                                               {"delivery_id": d})),
            )  # fmt: skip
        except NotFound:
            raise Unknown("delivery", "delivery_id") from None

    async def test_webhook(self, endpoint_id: str, *, actor: Actor = SYSTEM) -> str:
        """Send a ``webhook.test`` event to this endpoint only; the event's id."""
        found = await self._endpoint(endpoint_id, actor)
        data = {"team_id": found.team_id, "webhook_id": found.id,
                "message": "a test event sent by hand"}  # fmt: skip
        return await self._backend.add_test_event(
            found.id, EventRecord("webhook.test", found.team_id, data)
        )

    async def set_alert(
        self,
        team: str,
        low_balance_threshold: int | None,
        *,
        environment: str = "live",
        actor: Actor = SYSTEM,
    ) -> dict[str, object]:
        """Where ``credits.low`` fires for the team's account in one environment (None: off)."""
        check = Check()
        check.choice("environment", environment, ("live", "test"))
        check.integer("low_balance_threshold", low_balance_threshold, 1, BALANCE_MAX)
        check.done()
        owner = await self.team(team, actor=actor)
        said = {"environment": environment, "low_balance_threshold": low_balance_threshold}
        await self._backend.set_alert(
            owner.id, cast(Environment, environment), low_balance_threshold,
            audit=audit(actor, "alert.set", lambda _: (owner.id, owner.id, said)),
        )  # fmt: skip
        return {"team_id": owner.id, **said}

    async def alerts(self, team: str, *, actor: Actor = SYSTEM) -> dict[str, int | None]:
        owner = await self.team(team, actor=actor)
        return await self._backend.alerts(owner.id)


async def _refused_name(host: str) -> str | None:
    """Why a name may not receive deliveries (it resolves to no public address)."""
    loop = asyncio.get_running_loop()
    try:
        found = await asyncio.wait_for(
            loop.getaddrinfo(host, None, type=socket.SOCK_STREAM), _RESOLVE_SECONDS
        )
    except (OSError, TimeoutError):
        return f"{host} cannot be resolved"
    refused = [refused_address(str(info[4][0])) for info in found]
    if found and all(r is not None for r in refused):
        return f"{host} resolves only to addresses that are not public"
    return None


def _is_address(host: str) -> bool:
    try:
        ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return False
    return True
