"""Management actions shared by the admin API and the CLI.

Key material is created here, returned to the caller once and never stored or
logged: the store keeps only its hash and display prefix.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from gateway.config import Settings
from gateway.keys import display_prefix, generate_key, hash_secret, parse_key
from gateway.models import ApiKey, Environment, LedgerEntry, Team
from gateway.storage import Backend, Mismatch, NotFound

__all__ = ["CreatedKey", "Management"]


@dataclass(frozen=True, slots=True)
class CreatedKey:
    key: ApiKey
    secret: str  # the full key: shown once, never again


class Management:
    def __init__(self, backend: Backend, settings: Settings) -> None:
        self._backend = backend
        pepper = settings.keys.pepper
        self._pepper = pepper.get_secret_value().encode() if pepper else None

    def hash(self, secret: str) -> str:
        return hash_secret(secret, self._pepper)

    async def create_team(self, name: str, rate_limit_per_minute: int | None = None) -> Team:
        return await self._backend.create_team(name, rate_limit_per_minute)

    async def team(self, id_or_name: str) -> Team:
        return await self._backend.get_team(id_or_name)

    async def teams(self, limit: int = 100, after: str | None = None) -> list[Team]:
        return await self._backend.list_teams(limit, after)

    async def create_key(
        self,
        team: str,
        name: str,
        environment: Environment = "live",
        rate_limit_per_minute: int | None = None,
        expires_at: float | None = None,
    ) -> CreatedKey:
        owner = await self._backend.get_team(team)
        secret = generate_key(environment)
        key = await self._backend.create_key(
            owner.id,
            name,
            environment,
            self.hash(secret),
            display_prefix(secret),
            rate_limit_per_minute,
            expires_at,
        )
        return CreatedKey(key, secret)

    async def keys(self, team: str, limit: int = 100, after: str | None = None) -> list[ApiKey]:
        owner = await self._backend.get_team(team)
        return await self._backend.list_keys(owner.id, limit, after)

    async def revoke_key(self, key_id: str) -> ApiKey:
        return await self._backend.revoke_key(key_id)

    async def revoke_leaked(self, secret: str) -> ApiKey:
        """Revoke a key given its full text, as a secret scanner reports it."""
        parsed = parse_key(secret.strip())
        if parsed is None:
            raise NotFound("that is not a valid key (wrong format or checksum)")
        key_id = await self._backend.find_key_id_by_hash(self.hash(parsed.text))
        if key_id is None:
            raise NotFound("no such key")
        return await self._backend.revoke_key(key_id)

    async def grant(
        self,
        team: str,
        amount: int,
        reason: str,
        *,
        environment: Environment = "live",
        actor: str = "admin",
        idempotency_key: str | None = None,
    ) -> tuple[Team, int]:
        owner = await self._backend.get_team(team)
        balance = await self._backend.grant(
            owner.id, environment, amount, reason, actor, idempotency_key
        )
        return owner, balance

    async def balances(self, team: str) -> tuple[Team, dict[str, int]]:
        owner = await self._backend.get_team(team)
        return owner, await self._backend.balances(owner.id)

    async def ledger(
        self, team: str, limit: int = 50, before: int | None = None
    ) -> list[LedgerEntry]:
        owner = await self._backend.get_team(team)
        return await self._backend.ledger_entries(owner.id, limit, before)

    async def reconcile(self) -> tuple[list[Mismatch], int]:
        """Balances that disagree with their ledger, and reservations still pending."""
        return await self._backend.reconcile(), await self._backend.pending_count()


def iso(ts: float | None) -> str | None:
    if ts is None:
        return None
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))
