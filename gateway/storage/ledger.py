"""The store's side of credits: the two-phase ledger's Protocol (see :mod:`gateway.credits`)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from gateway.models import Environment, LedgerEntry
from gateway.storage.types import (
    Audit,
    ExpiryPolicy,
    GrantResult,
    IdempotencyClaim,
    IdempotencyRecord,
    Mismatch,
    ReserveRequest,
    ReserveResult,
)

__all__ = ["Ledger"]


class Ledger(Protocol):
    """The two-phase credit ledger: reserve, then post or void, exactly once."""

    async def reserve_batch(self, requests: Sequence[ReserveRequest]) -> list[ReserveResult]:
        """Greedy in request order per account; an id reserved already is never taken twice.

        Each request is judged on the balance first: if it does not cover the
        amount, the answer is ``granted=False`` — also for an id reserved
        already (its reservation stays pending until posted, voided or
        expired). If it does, an id reserved already is ``granted`` without
        taking the amount again. (The gateway never sends an id twice: a
        reserve whose outcome it did not hear is voided, see gateway.credits.)

        A request with an :class:`IdempotencyClaim` is checked in the same
        statement: if an unexpired record exists for (team, environment, key)
        — left by an earlier attempt, or by an earlier request of this batch —
        nothing is reserved and the result is ``granted=False`` with the
        current balance and ``replay`` set. Otherwise it is reserved as usual
        and, only if granted, an in-flight record is written (a refusal leaves
        none: a retry is judged afresh). A retry of the very reservation id
        that made the record is treated like any retried id, not as a replay.
        """
        ...

    async def post_batch(self, posts: Sequence[tuple[str, int]]) -> int:
        """Post (reservation id, charged amount) pairs; returns how many applied."""
        ...

    async def void_batch(self, reservation_ids: Sequence[str]) -> int: ...

    async def expire_reservations(self, policy: ExpiryPolicy, limit: int = 1000) -> int: ...

    async def balance(self, team_id: str, environment: Environment) -> int: ...

    async def balances(self, team_id: str) -> dict[str, int]: ...

    async def grant(
        self,
        team_id: str,
        environment: Environment,
        amount: int,
        reason: str,
        actor: str,
        idempotency_key: str | None = None,
    ) -> int:
        """The new balance (see :meth:`apply_grant`)."""
        ...

    async def apply_grant(
        self,
        team_id: str,
        environment: Environment,
        amount: int,
        reason: str,
        actor: str,
        idempotency_key: str | None = None,
        request_hash: str | None = None,
        *,
        audit: Audit[GrantResult] | None = None,
    ) -> GrantResult:
        """Grant (or, negative, adjust) credits, once per Idempotency-Key of the team.

        A key seen before with the same request (``request_hash``, else amount
        and environment) answers the first grant's balance, ``replayed``, and
        changes nothing; with a different request it raises :class:`KeyReused`.
        A balance that would go below zero or past :data:`MAX_BALANCE` is a Conflict.
        """
        ...

    async def ledger_entries(
        self, team_id: str, limit: int, before: str | None
    ) -> list[LedgerEntry]:
        """Credit entries and reservations of a team, newest first.

        Ordered by (created_at, id), descending; ``before`` is the ``cursor`` of
        an entry returned earlier (ValueError when it is not one). A reservation
        appears once, at the time it was made, as "reserve" while pending and
        as its resolution afterwards.
        """
        ...

    async def pending_count(self) -> int: ...

    async def claim_idempotency(
        self, team_id: str, environment: Environment, claim: IdempotencyClaim
    ) -> IdempotencyRecord | None:
        """Claim a key for a charged request that reserves nothing, atomically, in one round trip.

        None when the claim was made (an in-flight record now exists); else
        the unexpired record an earlier attempt left, unchanged.
        """
        ...

    async def complete_idempotency(
        self,
        team_id: str,
        environment: Environment,
        key: str,
        body_hash: str,
        status: int,
        content_type: str | None,
        body: bytes | None,
    ) -> None:
        """Turn the in-flight record completed with the first attempt's answer.

        ``body`` None means it was too large to keep (``body_stored`` False).
        A record that is not in flight (completed, released, gone) is left alone.
        """
        ...

    async def release_idempotency(self, team_id: str, environment: Environment, key: str) -> None:
        """Delete the in-flight record of an attempt that never reached the upstream.

        A completed record is left alone.
        """
        ...

    async def prune_idempotency(self, before: float) -> int:
        """Delete records created before ``before`` (epoch seconds); returns how many."""
        ...

    async def reconcile(self) -> list[Mismatch]: ...

    async def roll_up(self, older_than_days: int) -> int:
        """Fold reservations resolved more than ``older_than_days`` ago into per-day rows.

        The rows (per team, environment and UTC day of reservation: count,
        reserved, charged) keep every balance derivable, and :meth:`reconcile`
        counts them. Returns how many reservations were folded.
        """
        ...
