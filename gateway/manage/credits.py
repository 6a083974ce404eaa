"""Credit actions: grants and adjustments (idempotent), balances, the ledger, reconcile."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import orjson

from gateway.idempotency import valid_key
from gateway.manage._core import Core
from gateway.manage.actors import SYSTEM, Actor
from gateway.manage.audit import audit
from gateway.manage.bounds import AMOUNT_MAX, REASON_MAX
from gateway.manage.events import credits_granted
from gateway.manage.inputs import Check, InputError
from gateway.models import Environment, LedgerEntry, Team
from gateway.storage import KeyReused, Mismatch
from gateway.storage.rules import decode_ledger_cursor

__all__ = ["CreditActions", "Granted"]


@dataclass(frozen=True, slots=True)
class Granted:
    team: Team
    environment: Environment
    balance: int  # right after the grant (a replay answers the first grant's)
    replayed: bool


def _request_hash(environment: str, amount: int, reason: str) -> str:
    """What a grant asked for: a replay must ask for exactly the same."""
    return hashlib.sha256(orjson.dumps([environment, amount, reason])).hexdigest()


class CreditActions(Core):
    async def grant(
        self,
        team: str,
        amount: int,
        reason: str,
        *,
        environment: Environment = "live",
        actor: Actor = SYSTEM,
        idempotency_key: str | None = None,
    ) -> Granted:
        check = Check()
        check.integer("amount", amount, -AMOUNT_MAX, AMOUNT_MAX)
        if amount == 0:
            check.fail("amount", "must not be 0")
        check.choice("environment", environment, ("live", "test"))
        check.text("reason", reason, REASON_MAX)
        check.done()
        # The proxy's own check: 1-255 visible ASCII characters, no spaces.
        if idempotency_key is not None and not valid_key(idempotency_key):
            raise InputError.field("Idempotency-Key", "must be 1-255 visible ASCII characters")
        owner = await self.team(team, actor=actor)
        actor.require_admin("grant credits")
        action = "credits.grant" if amount > 0 else "credits.adjust"
        said = (
            owner.id,
            owner.id,
            {"amount": amount, "environment": environment, "reason": reason},
        )
        try:
            result = await self._backend.apply_grant(
                owner.id, environment, amount, reason, actor.label, idempotency_key,
                _request_hash(environment, amount, reason),
                # Not called for a replay: a replay changes nothing and tells nothing.
                audit=audit(actor, action, lambda _: said, tells=lambda made: (
                    credits_granted(owner.id, environment, amount, reason, made.balance)
                    if amount > 0 else None
                )),
            )  # fmt: skip
        except KeyReused:
            raise InputError.field(
                "Idempotency-Key", "was used before for a different grant"
            ) from None
        return Granted(owner, environment, result.balance, result.replayed)

    async def balances(self, team: str, *, actor: Actor = SYSTEM) -> tuple[Team, dict[str, int]]:
        owner = await self.team(team, actor=actor)
        return owner, await self._backend.balances(owner.id)

    async def ledger(
        self, team: str, limit: int = 50, before: str | None = None, *, actor: Actor = SYSTEM
    ) -> list[LedgerEntry]:
        if before is not None:
            try:
                decode_ledger_cursor(before)
            except ValueError:
                raise InputError.field(
                    "cursor", "must be a next_cursor this API returned"
                ) from None
        owner = await self.team(team, actor=actor)
        return await self._backend.ledger_entries(owner.id, limit, before)

    async def reconcile(self) -> tuple[list[Mismatch], int]:
        """Balances that disagree with their ledger, and reservations still pending."""
        return await self._backend.reconcile(), await self._backend.pending_count()
