"""Settlement: one object per exchange owns everything it decides about money.

It reserves the credit (with the Idempotency-Key's claim, in the same step),
is told by the forward stage what happened, and on exit applies the rule table
of :mod:`gateway.pipeline.rules`: post, partly post or void the reservation,
keep or release the key. Nowhere else in the pipeline is a charge decided.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine
from types import TracebackType
from typing import Any

from aiohttp import web

from gateway import errors, idempotency
from gateway.caps import Calendar, cap_periods
from gateway.config import Settings
from gateway.credits import Credits, PendingReserve
from gateway.metrics import Metrics
from gateway.models import KeyRecord
from gateway.pipeline import replays
from gateway.pipeline.exchange import Exchange
from gateway.pipeline.rules import Facts, decide, parse_charge
from gateway.routing import Route
from gateway.storage import IdempotencyClaim, Ledger, StorageError

__all__ = ["Settlement", "Settlements"]

log = logging.getLogger("gateway.pipeline")


class Settlements:
    """Makes each exchange's :class:`Settlement` and keeps their background writes."""

    def __init__(
        self,
        settings: Settings,
        credits: Credits,
        ledger: Ledger,
        metrics: Metrics,
        *,
        may_reserve_ahead: Callable[[KeyRecord], bool],
    ) -> None:
        self._may_reserve_ahead = may_reserve_ahead
        self.credits = credits
        self.ledger = ledger
        self.metrics = metrics
        self.replay_cap = settings.idempotency.replay_cap_bytes
        self._metered_test = settings.credits.test_environment == "metered"
        self.calendar = Calendar(settings.plans.clock_offset_seconds)
        self._background: set[asyncio.Task[None]] = set()

    def open(
        self, request: web.BaseRequest, ex: Exchange, route: Route, key: KeyRecord | None, path: str
    ) -> Settlement:
        """The settlement of one request, its reservation perhaps already on its way.

        With the limiter's leave (see gateway/limiter/watch.py) a plain charged
        request reserves while its limit is decided; if it is refused after all,
        the settlement voids what it reserved on exit, never charged. Not with an
        Idempotency-Key (its claim goes with the reservation) nor a body the route
        will refuse.
        """
        cost = 0
        if key is not None and (key.environment == "live" or self._metered_test):
            cost = route.charges(ex.method)
        settlement = Settlement(self, ex, route, key, cost, path)
        if cost and key is not None:
            declared = request.content_length
            if (
                (declared is None or declared <= route.max_body_bytes)
                and "Idempotency-Key" not in request.headers
                and self._may_reserve_ahead(key)
            ):
                settlement.reserve_ahead(key)
        return settlement

    def spawn(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(work)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def close(self) -> None:
        """Wait for background writes (called at shutdown)."""
        if self._background:
            await asyncio.gather(*self._background, return_exceptions=True)


class Settlement:
    """The reservation and the Idempotency-Key of one exchange, and the rule that ends them."""

    __slots__ = (
        "_attempt",
        "_available_after",
        "_content_type",
        "_early",
        "_ex",
        "_owner",
        "_reservation",
        "cost",
        "facts",
        "key",
        "path",
        "route",
    )

    def __init__(
        self,
        owner: Settlements,
        ex: Exchange,
        route: Route,
        key: KeyRecord | None,
        cost: int,
        path: str,
    ) -> None:
        self._owner = owner
        self._ex = ex
        self._content_type: str | None = None
        self.route = route
        self.key = key
        self.cost = cost
        self.path = path
        self.facts = Facts()
        self._reservation: str | None = None
        self._available_after = 0
        self._attempt: idempotency.Attempt | None = None
        self._early: PendingReserve | None = None

    def reserve_ahead(self, key: KeyRecord) -> None:
        """Send the reservation now; :meth:`reserve` reads its outcome (or exit gives it back)."""
        owner = self._owner
        self._early = owner.credits.start_reserve(
            key.team_id, key.environment, key.id, self.cost,
            caps=cap_periods(key.limits, owner.calendar),
        )  # fmt: skip

    @property
    def attempt(self) -> idempotency.Attempt | None:
        """The first attempt under an Idempotency-Key (what it sent and got), if any."""
        return self._attempt

    async def reserve(self, request: web.BaseRequest) -> None:
        """Reserve the cost and claim the Idempotency-Key, in one step.

        Raises a :class:`Refusal`: 402, 503, 400 for a bad key, or the answer to
        a key already used (a replay, 409 or 422).
        """
        key = self.key
        if key is None:
            return
        claim = replays.claim(request, self.route, self.path)
        if self.cost:
            await self._reserve_credit(request, key, claim)
        elif claim is not None:
            try:
                ledger = self._owner.ledger
                record = await ledger.claim_idempotency(key.team_id, key.environment, claim)
            except StorageError:
                raise errors.refuse_unavailable() from None
            if record is not None:
                raise await replays.answer(request, self.route, claim, record)
        if claim is not None:
            self._attempt = idempotency.Attempt(
                claim.key, key.team_id, key.environment, self._owner.replay_cap
            )

    async def _reserve_credit(
        self, request: web.BaseRequest, key: KeyRecord, claim: IdempotencyClaim | None
    ) -> None:
        credits = self._owner.credits
        early, self._early = self._early, None
        try:
            if early is not None:
                reservation_id, result = await credits.finish_reserve(early)
            else:
                reservation_id, result = await credits.reserve(
                    key.team_id, key.environment, key.id, self.cost, claim,
                    caps=cap_periods(key.limits, self._owner.calendar),
                )  # fmt: skip
        except StorageError:
            log.warning("credit reservation failed: database unavailable")
            raise errors.refuse_unavailable() from None
        if result.replay is not None:
            assert claim is not None
            raise await replays.answer(request, self.route, claim, result.replay)
        if not result.granted:
            raise errors.refuse_insufficient_credits(self.cost, result.available)
        self._reservation = reservation_id
        self._available_after = result.available
        self._owner.metrics.count_credits("reserved", self.cost)

    def answered(self, status: int, charge_values: list[str], content_type: str | None) -> None:
        """The upstream's (valid, final) status arrived, with its X-Gateway-Charge values."""
        facts = self.facts
        facts.status = status
        self._content_type = content_type
        if self._reservation is None:
            return
        if 200 <= status < 300:
            facts.chargeable = True
            facts.charge = parse_charge(charge_values, self.cost)
        elif status not in self.route.refund_statuses:
            facts.chargeable = True
            facts.charge = self.cost

    def credits_remaining(self) -> int | None:
        """The balance after this answer's charge, for a chargeable 2xx (X-Credits-Remaining)."""
        facts = self.facts
        if not facts.chargeable or facts.status is None or not 200 <= facts.status < 300:
            return None
        return self._available_after + (self.cost - facts.charge)

    async def __aenter__(self) -> Settlement:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        owner = self._owner
        if self._early is not None:  # refused before its reservation was read
            owner.credits.abandon(self._early)
            self._early = None
        if isinstance(exc, asyncio.CancelledError) and self.facts.status is not None:
            self.facts.client_left = True  # the client went away (handler cancelled)
        with self._ex.trace.stage("settle"):
            await self._apply(exc)

    async def _apply(self, exc: BaseException | None) -> None:
        owner = self._owner
        verdict = decide(self.facts)
        # Awaiting is fine unless the task is being cancelled: then only
        # non-blocking work (buffered posts, background voids) is done.
        can_wait = exc is None or isinstance(exc, Exception)
        if self._reservation is not None:
            await self._settle(verdict.charge, can_wait)
        attempt = self._attempt
        if attempt is None:
            return
        assert self.key is not None
        work = replays.record(
            owner.ledger, self.key, attempt, verdict, self.facts.status, self._content_type
        )
        # Written before the client learns the outcome, so that a retry sent the
        # moment it does finds the key as this rule left it (not "in progress").
        if can_wait:
            await work
        else:
            owner.spawn(work)

    async def _settle(self, charge: int | None, can_wait: bool) -> None:
        reservation, self._reservation = self._reservation, None
        assert reservation is not None
        credits, metrics = self._owner.credits, self._owner.metrics
        if charge is None:
            if can_wait:  # give the credit back before answering: the balance is whole
                await credits.void(reservation)
            else:
                credits.void_soon(reservation)
            metrics.count_credits("voided", self.cost)
            return
        if charge < self.cost and can_wait:
            await credits.post_now(reservation, charge)
        else:
            credits.post(reservation, charge)
        self._ex.credits = charge
        metrics.count_credits("posted", charge)
        if charge < self.cost:
            metrics.count_credits("voided", self.cost - charge)
