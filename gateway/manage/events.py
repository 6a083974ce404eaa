"""The events management changes tell (see :mod:`gateway.storage.events`), said once.

``data`` names the team and, where one is involved, the key (id and display
prefix): never a key, a token or a secret.
"""

from __future__ import annotations

from gateway.models import ApiKey, TeamToken
from gateway.plans import Refill
from gateway.storage import EventRecord

__all__ = ["credits_granted", "credits_refilled", "key_event", "key_rotated", "token_event"]


def key_event(kind: str, key: ApiKey) -> EventRecord:
    """``key.created``, ``key.revoked`` or ``key.leaked`` for ``key``."""
    data = {"team_id": key.team_id, "key_id": key.id, "prefix": key.prefix,
            "environment": key.environment, "name": key.name}  # fmt: skip
    return EventRecord(kind, key.team_id, data)


def key_rotated(old: ApiKey, new: ApiKey, grace_seconds: int) -> EventRecord:
    data = {"team_id": new.team_id, "key_id": old.id, "prefix": old.prefix,
            "new_key_id": new.id, "new_prefix": new.prefix,
            "environment": new.environment, "grace_seconds": grace_seconds}  # fmt: skip
    return EventRecord("key.rotated", new.team_id, data)


def token_event(kind: str, token: TeamToken) -> EventRecord:
    data = {"team_id": token.team_id, "token_id": token.id, "prefix": token.prefix,
            "name": token.name}  # fmt: skip
    return EventRecord(kind, token.team_id, data)


def credits_granted(
    team_id: str, environment: str, amount: int, reason: str, balance: int
) -> EventRecord:
    data = {"team_id": team_id, "environment": environment, "amount": amount,
            "reason": reason, "credits_available": balance}  # fmt: skip
    return EventRecord("credits.granted", team_id, data)


def credits_refilled(refill: Refill) -> EventRecord:
    data = {"team_id": refill.team_id, "environment": refill.environment,
            "period": refill.period_key, "refilled": refill.refilled,
            "expired": refill.expired}  # fmt: skip
    return EventRecord("credits.refilled", refill.team_id, data)
