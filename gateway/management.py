"""Management actions shared by the admin API, the console and the CLI.

Key material is created here, returned to the caller once and never stored or
logged: the store keeps only its hash and display prefix.

Every change to a key, or to a team's limit, is also told to this process's
key cache (a :class:`KeyChangeListener`) before the action returns: the change
feed brings it to other processes within a second, but the process that made
it must not serve the old key even once after saying it was changed.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Protocol

from gateway.config import Settings
from gateway.keys import display_prefix, generate_key, generate_token, hash_secret, parse_key
from gateway.models import ApiKey, AuditEntry, Environment, LedgerEntry, Team, TeamToken
from gateway.storage import Backend, Conflict, Mismatch, NotFound

__all__ = ["CreatedKey", "CreatedToken", "KeyChangeListener", "Management"]


@dataclass(frozen=True, slots=True)
class CreatedKey:
    key: ApiKey
    secret: str  # the full key: shown once, never again


@dataclass(frozen=True, slots=True)
class CreatedToken:
    token: TeamToken
    secret: str  # shown once, never again


KEY_FIELDS = frozenset({"name", "rate_limit_per_minute", "expires_at", "disabled"})


class KeyChangeListener(Protocol):
    """Hears of a key (by hash) or a team's keys (by team id) changed through this process."""

    def on_key_changed(self, key_hash: str | None, team_id: str | None) -> None: ...


class Management:
    def __init__(
        self,
        backend: Backend,
        settings: Settings,
        listener: KeyChangeListener | None = None,
    ) -> None:
        self._backend = backend
        self._listener = listener
        pepper = settings.keys.pepper
        self._pepper = pepper.get_secret_value().encode() if pepper else None

    @contextlib.contextmanager
    def _changing(self, key_hash: str | None = None, team_id: str | None = None) -> Iterator[None]:
        """Tell the listener once the change is made, or may have been.

        Also when the store call fails: a connection lost around the commit
        leaves the change unknown, and forgetting a cached key costs one lookup.
        """
        try:
            yield
        finally:
            if self._listener is not None:
                self._listener.on_key_changed(key_hash, team_id)

    async def _key_hash(self, key_id: str) -> str:
        # Read before the change: a key's hash never changes, and a failure here
        # leaves nothing changed rather than a change this process did not hear of.
        key_hash = await self._backend.find_key_hash_by_id(key_id)
        if key_hash is None:
            raise NotFound(f"no key {key_id!r}")
        return key_hash

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
        key_hash = self.hash(secret)
        # It may have been looked up, and cached as unknown, before it existed.
        with self._changing(key_hash):
            key = await self._backend.create_key(
                owner.id,
                name,
                environment,
                key_hash,
                display_prefix(secret),
                rate_limit_per_minute,
                expires_at,
            )
        return CreatedKey(key, secret)

    async def key(self, key_id: str) -> ApiKey:
        return await self._backend.get_key(key_id)

    async def key_by_secret(self, secret: str) -> ApiKey:
        """The key a leaked secret belongs to (what a secret scanner reports)."""
        parsed = parse_key(secret.strip())
        if parsed is None:
            raise NotFound("that is not a valid key (wrong format or checksum)")
        key_id = await self._backend.find_key_id_by_hash(self.hash(parsed.text))
        if key_id is None:
            raise NotFound("no such key")
        return await self._backend.get_key(key_id)

    async def update_key(self, key_id: str, changes: dict[str, object]) -> ApiKey:
        unknown = set(changes) - KEY_FIELDS
        if unknown:
            raise ValueError(f"unknown key fields: {sorted(unknown)}")
        key = await self._backend.get_key(key_id)
        if key.revoked_at is not None:
            raise Conflict(f"key {key_id!r} is revoked")
        if not changes:
            return key
        with self._changing(await self._key_hash(key_id)):
            return await self._backend.update_key(key_id, changes)

    async def rotate_key(self, key_id: str, grace_seconds: int) -> CreatedKey:
        """A new key with the same settings; the old one expires after the grace period."""
        old = await self._backend.get_key(key_id)
        if old.revoked_at is not None:
            raise Conflict(f"key {key_id!r} is revoked")
        old_hash = await self._key_hash(key_id)
        secret = generate_key(old.environment)
        new_hash = self.hash(secret)
        with self._changing(old_hash), self._changing(new_hash):
            new = await self._backend.rotate_key(
                key_id, new_hash, display_prefix(secret), time.time() + grace_seconds
            )
        return CreatedKey(new, secret)

    async def update_team(self, team_id: str, rate_limit_per_minute: int | None) -> Team:
        with self._changing(team_id=team_id):
            return await self._backend.update_team(team_id, rate_limit_per_minute)

    async def create_token(self, team: str, name: str) -> CreatedToken:
        owner = await self._backend.get_team(team)
        secret = generate_token()
        token = await self._backend.create_token(
            owner.id, name, self.hash(secret), display_prefix(secret)
        )
        return CreatedToken(token, secret)

    async def tokens(
        self, team: str, limit: int = 100, after: str | None = None
    ) -> list[TeamToken]:
        owner = await self._backend.get_team(team)
        return await self._backend.list_tokens(owner.id, limit, after)

    async def token(self, token_id: str) -> TeamToken:
        return await self._backend.get_token(token_id)

    async def revoke_token(self, token_id: str) -> TeamToken:
        return await self._backend.revoke_token(token_id)

    async def find_token(self, secret: str) -> TeamToken | None:
        return await self._backend.find_token(self.hash(secret))

    async def record_audit(
        self,
        *,
        actor: str,
        action: str,
        target: str | None,
        team_id: str | None,
        client_ip: str | None,
        details: dict[str, object],
    ) -> None:
        await self._backend.append_audit(actor, action, target, team_id, client_ip, details)

    async def audit(
        self, team_id: str | None, limit: int = 100, before: int | None = None
    ) -> list[AuditEntry]:
        return await self._backend.list_audit(team_id, limit, before)

    async def usage(
        self, team_id: str, start: float, end: float, step: int, key_id: str | None = None
    ) -> dict[str, object]:
        """Requests per bucket by outcome, credits charged, and the busiest keys."""
        first = int(start // step * step)
        rows = await self._backend.usage_buckets(team_id, first, end, step, key_id)
        counts: dict[int, dict[str, int]] = {}
        credits: dict[int, int] = {}
        totals: dict[str, int] = {}
        for bucket_start, outcome, requests, charged in rows:
            per_outcome = counts.setdefault(bucket_start, {})
            per_outcome[outcome] = per_outcome.get(outcome, 0) + requests
            credits[bucket_start] = credits.get(bucket_start, 0) + charged
            totals[outcome] = totals.get(outcome, 0) + requests
        buckets = [
            {
                "start": iso(b),
                "requests": counts.get(b, {}),
                "total": sum(counts.get(b, {}).values()),
                "credits": credits.get(b, 0),
            }
            for b in range(first, math.ceil(end), step)
        ]
        top = await self._backend.usage_top_keys(team_id, first, end, 10)
        return {
            "from": iso(start),
            "to": iso(end),
            "buckets": buckets,
            "totals": {
                "requests": totals,
                "total": sum(totals.values()),
                "credits": sum(credits.values()),
            },
            "top_keys": [{"key": k, "requests": r, "credits": c} for k, r, c in top],
        }

    async def auth_failures(
        self, start: int, end: float, limit: int
    ) -> list[tuple[str, str, str, int]]:
        return await self._backend.auth_failure_counts(start, end, limit)

    async def keys(self, team: str, limit: int = 100, after: str | None = None) -> list[ApiKey]:
        owner = await self._backend.get_team(team)
        return await self._backend.list_keys(owner.id, limit, after)

    async def revoke_key(self, key_id: str) -> ApiKey:
        with self._changing(await self._key_hash(key_id)):
            return await self._backend.revoke_key(key_id)

    async def revoke_leaked(self, secret: str) -> ApiKey:
        """Revoke a key given its full text, as a secret scanner reports it."""
        parsed = parse_key(secret.strip())
        if parsed is None:
            raise NotFound("that is not a valid key (wrong format or checksum)")
        key_hash = self.hash(parsed.text)
        key_id = await self._backend.find_key_id_by_hash(key_hash)
        if key_id is None:
            raise NotFound("no such key")
        with self._changing(key_hash):
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
        self, team: str, limit: int = 50, before: str | None = None
    ) -> list[LedgerEntry]:
        owner = await self._backend.get_team(team)
        return await self._backend.ledger_entries(owner.id, limit, before)

    async def reconcile(self) -> tuple[list[Mismatch], int]:
        """Balances that disagree with their ledger, and reservations still pending."""
        return await self._backend.reconcile(), await self._backend.pending_count()


def iso(ts: float | None) -> str | None:
    """RFC 3339 in UTC, whole seconds (four-digit years, also before 1000)."""
    if ts is None:
        return None
    moment = datetime.fromtimestamp(math.floor(ts), UTC)
    return moment.isoformat(timespec="seconds").replace("+00:00", "Z")
