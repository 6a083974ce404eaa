"""Key actions: create, change, rotate, revoke (also by leaked secret).

Key material is created here, returned to the caller once and never stored or
logged: the store keeps only its hash and display prefix. Every change is told
to this process's key cache before the action returns (see ``Core._changing``).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from gateway.keys import display_prefix, generate_key, parse_key
from gateway.manage._core import Core, iso
from gateway.manage.actors import SYSTEM, Actor
from gateway.manage.audit import Said, audit
from gateway.manage.bounds import (
    CAP_MAX,
    GRACE_MAX_SECONDS,
    KEY_SECRET_MAX,
    NAME_MAX,
    QUOTA_MAX,
    RATE_LIMIT_MAX,
)
from gateway.manage.events import key_event, key_rotated
from gateway.manage.inputs import Check, Unknown
from gateway.models import ApiKey, Environment
from gateway.storage import KEY_FIELDS as STORED_KEY_FIELDS

__all__ = ["KEY_FIELDS", "CreatedKey", "KeyActions"]

KEY_FIELDS = STORED_KEY_FIELDS
# Each limit field and its largest value; null clears it.
LIMIT_BOUNDS = {
    "credit_cap_per_day": CAP_MAX,
    "credit_cap_per_month": CAP_MAX,
    "quota_per_day": QUOTA_MAX,
    "quota_per_month": QUOTA_MAX,
}


@dataclass(frozen=True, slots=True)
class CreatedKey:
    key: ApiKey
    secret: str  # the full key: shown once, never again


def _check_key_fields(changes: dict[str, object]) -> None:
    unknown = sorted(set(changes) - KEY_FIELDS)
    check = Check()
    for name in unknown:
        check.unknown(name)
    if "name" in changes:
        given = changes["name"]
        check.text("name", given if isinstance(given, str) else None, NAME_MAX)
    limit = changes.get("rate_limit_per_minute")
    check.integer("rate_limit_per_minute", limit if isinstance(limit, int) else None, 1,
                  RATE_LIMIT_MAX)  # fmt: skip
    check.counts(changes, LIMIT_BOUNDS)
    expires = changes.get("expires_at")
    check.time("expires_at", float(expires) if isinstance(expires, int | float) else None)
    check.done()


class KeyActions(Core):
    async def create_key(
        self,
        team: str,
        name: str,
        environment: Environment = "live",
        rate_limit_per_minute: int | None = None,
        expires_at: float | None = None,
        *,
        limits: dict[str, int | None] | None = None,
        actor: Actor = SYSTEM,
    ) -> CreatedKey:
        """A new key; ``limits`` may set its caps and quotas (LIMIT_BOUNDS' fields)."""
        check = Check()
        check.text("name", name, NAME_MAX)
        check.choice("environment", environment, ("live", "test"))
        check.integer("rate_limit_per_minute", rate_limit_per_minute, 1, RATE_LIMIT_MAX)
        check.time("expires_at", expires_at)
        for field in sorted(set(limits or {}) - set(LIMIT_BOUNDS)):
            check.unknown(field)
        check.counts(limits or {}, LIMIT_BOUNDS)
        check.done()
        owner = await self.team(team, actor=actor)
        secret = generate_key(environment)
        key_hash = self.hash(secret)
        # It may have been looked up, and cached as unknown, before it existed.
        said: dict[str, object] = {"name": name, "environment": environment, **(limits or {})}
        with self._changing(key_hash):
            key = await self._backend.create_key(
                owner.id, name, environment, key_hash, display_prefix(secret),
                rate_limit_per_minute, expires_at, limits=limits,
                audit=audit(actor, "key.create", lambda made: (made.id, owner.id, said),
                            tells=lambda made: key_event("key.created", made)),
            )  # fmt: skip
        return CreatedKey(key, secret)

    async def _hash_of(self, key: ApiKey) -> str:
        # Read before the change: a key's hash never changes, and a failure here
        # leaves nothing changed rather than a change this process did not hear of.
        key_hash = await self._backend.find_key_hash_by_id(key.id)
        if key_hash is None:
            raise Unknown("key", "key_id")
        return key_hash

    async def update_key(
        self, key_id: str, changes: dict[str, object], *, actor: Actor = SYSTEM
    ) -> ApiKey:
        _check_key_fields(changes)
        key = await self.key(key_id, actor=actor)
        if not changes:
            return key

        def said(updated: ApiKey) -> Said:
            return (
                key.id,
                key.team_id,
                {
                    k: (iso(updated.expires_at) if k == "expires_at" else v)
                    for k, v in changes.items()
                },
            )

        # The store refuses a revoked key atomically (409): no second look here.
        with self._changing(await self._hash_of(key)):
            return await self._backend.update_key(
                key.id, changes, audit=audit(actor, "key.update", said)
            )

    async def rotate_key(
        self, key_id: str, grace_seconds: int = 0, *, actor: Actor = SYSTEM
    ) -> CreatedKey:
        """A new key with the same settings; the old one expires after the grace period."""
        check = Check()
        check.integer("grace_seconds", grace_seconds, 0, GRACE_MAX_SECONDS)
        check.done()
        old = await self.key(key_id, actor=actor)
        old_hash = await self._hash_of(old)
        secret = generate_key(old.environment)
        new_hash = self.hash(secret)
        said: Callable[[ApiKey], Said] = lambda new: (  # noqa: E731 - one expression
            old.id,
            old.team_id,
            {"new_key": new.id, "grace_seconds": grace_seconds},
        )
        with self._changing(old_hash), self._changing(new_hash):
            new = await self._backend.rotate_key(
                old.id, new_hash, display_prefix(secret), time.time() + grace_seconds,
                audit=audit(actor, "key.rotate", said,
                            tells=lambda new: key_rotated(old, new, grace_seconds)),
            )  # fmt: skip
        return CreatedKey(new, secret)

    async def revoke_key(self, key_id: str, *, actor: Actor = SYSTEM) -> ApiKey:
        key = await self.key(key_id, actor=actor)
        with self._changing(await self._hash_of(key)):
            return await self._backend.revoke_key(
                key.id,
                audit=audit(actor, "key.revoke", lambda _: (key.id, key.team_id, {}),
                            tells=lambda made: key_event("key.revoked", made)),
            )  # fmt: skip

    async def key_by_secret(self, secret: str, *, actor: Actor = SYSTEM) -> ApiKey:
        """The key a leaked secret belongs to (what a secret scanner reports)."""
        parsed = parse_key(secret.strip()) if len(secret) <= KEY_SECRET_MAX else None
        if parsed is None:
            raise Unknown("key", "key", "is not a valid key (wrong format or checksum)")
        key_id = await self._backend.find_key_id_by_hash(self.hash(parsed.text))
        if key_id is None:
            raise Unknown("key", "key")
        return await self.key(key_id, actor=actor, field="key")

    async def revoke_leaked(self, secret: str, *, actor: Actor = SYSTEM) -> ApiKey:
        """Revoke a key given its full text, as a secret scanner reports it."""
        key = await self.key_by_secret(secret, actor=actor)
        said = (key.id, key.team_id, {"prefix": key.prefix})
        with self._changing(await self._hash_of(key)):
            return await self._backend.revoke_key(
                key.id,
                audit=audit(actor, "key.revoke_leaked", lambda _: said,
                            tells=lambda made: key_event("key.leaked", made)),
            )  # fmt: skip
