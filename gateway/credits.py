"""Credits on the request path: grouped reserves, batched posts, retried voids, the sweeper.

Concurrent reservations are grouped (while one batch is in the database, the
next one gathers), the way TigerBeetle batches transfers: each request is still
answered exactly, but a busy balance row sees one statement per batch instead
of one per request. Posts are buffered and flushed at least every
``post_flush_interval_seconds``; a crash can therefore leave at most that much
served-but-unposted work, which the sweeper voids after the lease.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass

from gateway.batching import Grouper
from gateway.config import CreditSettings
from gateway.metrics import Metrics
from gateway.models import Environment
from gateway.storage import (
    CapPeriods,
    IdempotencyClaim,
    Ledger,
    ReserveRequest,
    ReserveResult,
    rules,
)

__all__ = ["Credits", "PendingReserve"]

log = logging.getLogger("gateway.credits")


@dataclass(frozen=True, slots=True)
class PendingReserve:
    """A reservation sent to the ledger whose outcome the request has not read yet."""

    id: str
    future: asyncio.Future[ReserveResult]


class Credits:
    """The pipeline's view of the ledger."""

    def __init__(
        self,
        ledger: Ledger,
        settings: CreditSettings,
        metrics: Metrics | None = None,
        backend_name: str = "ledger",
    ) -> None:
        self._ledger = ledger
        self._settings = settings
        self._metrics = metrics if metrics is not None else Metrics()
        self._backend = backend_name
        self._reserves: Grouper[ReserveRequest, ReserveResult] = Grouper(self._reserve_many)
        self._voids: Grouper[str, int] = Grouper(self._void_many)
        self._posts_now: Grouper[tuple[str, int], int] = Grouper(self._post_many)
        self._posts: list[tuple[str, int]] = []
        self._void_retry: set[str] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._oldest_post = 0.0
        self._flushing = 0
        self._flush_lock = asyncio.Lock()
        self.late_resolutions = 0

    async def _reserve_many(self, requests: Sequence[ReserveRequest]) -> list[ReserveResult]:
        with self._metrics.backend_call(self._backend, "reserve"):
            return await self._ledger.reserve_batch(requests)

    async def _void_many(self, ids: Sequence[str]) -> list[int]:
        with self._metrics.backend_call(self._backend, "void"):
            applied = await self._ledger.void_batch(ids)
        # The batch result is a count; each caller only needs to know it was done.
        return [applied] * len(ids)

    async def _post_many(self, posts: Sequence[tuple[str, int]]) -> list[int]:
        with self._metrics.backend_call(self._backend, "post"):
            applied = await self._ledger.post_batch(posts)
        self._count_late(len(posts) - applied)
        return [applied] * len(posts)

    def _count_late(self, late: int) -> None:
        if late > 0:
            # Already resolved (the sweeper got there first): never applied twice.
            self.late_resolutions += late
            self._metrics.late_resolutions.inc(late)

    async def reserve(
        self,
        team_id: str,
        environment: Environment,
        key_id: str,
        amount: int,
        claim: IdempotencyClaim | None = None,
        *,
        caps: CapPeriods | None = None,
    ) -> tuple[str, ReserveResult]:
        """Reserve ``amount``; raises the backend's error when the outcome is unknown.

        In that case the reservation id is queued for voiding, so a client that
        is answered 503 can never be charged.
        """
        pending = self.start_reserve(team_id, environment, key_id, amount, claim, caps=caps)
        return await self.finish_reserve(pending)

    def start_reserve(
        self,
        team_id: str,
        environment: Environment,
        key_id: str,
        amount: int,
        claim: IdempotencyClaim | None = None,
        *,
        caps: CapPeriods | None = None,
    ) -> PendingReserve:
        """Send a reservation on its way without waiting for it.

        The caller must then either :meth:`finish_reserve` or :meth:`abandon` it.
        """
        reservation_id = rules.new_reservation_id()
        request = ReserveRequest(reservation_id, team_id, environment, key_id, amount, claim, caps)
        return PendingReserve(reservation_id, self._reserves.submit(request))

    async def finish_reserve(self, pending: PendingReserve) -> tuple[str, ReserveResult]:
        """The outcome of :meth:`start_reserve` (the same contract as :meth:`reserve`)."""
        try:
            result = await asyncio.shield(pending.future)
        except asyncio.CancelledError:
            # The caller left while the batch was in the database: give it back.
            self.abandon(pending)
            raise
        except Exception:
            self._void_retry.add(pending.id)
            raise
        return pending.id, result

    def abandon(self, pending: PendingReserve) -> None:
        """Give back a reservation its request no longer needs, once its outcome is known."""
        pending.future.add_done_callback(lambda f: self._give_back(pending.id, f))

    def _give_back(self, reservation_id: str, future: asyncio.Future[ReserveResult]) -> None:
        if future.cancelled() or future.exception() is not None:
            # The outcome is unknown: voided when the database answers again.
            self._void_retry.add(reservation_id)
        elif future.result().granted:
            self.void_soon(reservation_id)  # at once, so the balance is whole again

    def post(self, reservation_id: str, charged: int) -> None:
        """Make a reservation final for ``charged`` (≤ reserved); flushed in the background."""
        if not self._posts:
            self._oldest_post = time.monotonic()
        self._posts.append((reservation_id, charged))

    async def post_now(self, reservation_id: str, charged: int) -> None:
        """Post at once, for a charge the upstream lowered: the part returned is in the
        balance before the client has its answer (a buffered post would show it late).

        If the ledger cannot be reached the post is buffered like any other.
        """
        try:
            await asyncio.shield(self._posts_now.submit((reservation_id, charged)))
        except asyncio.CancelledError:
            self.post(reservation_id, charged)
            raise
        except Exception as exc:
            log.warning("posting a lowered charge failed, will retry: %s", exc)
            self.post(reservation_id, charged)

    @property
    def flush_lag(self) -> float:
        """How long the oldest unwritten post has waited."""
        return time.monotonic() - self._oldest_post if self._posts else 0.0

    async def void(self, reservation_id: str) -> None:
        """Give a reservation back now; on failure it is retried in the background."""
        try:
            await asyncio.shield(self._voids.submit(reservation_id))
        except asyncio.CancelledError:
            self._void_retry.add(reservation_id)
            raise
        except Exception as exc:
            log.warning("void failed, will retry: %s", exc)
            self._void_retry.add(reservation_id)

    def void_soon(self, reservation_id: str) -> None:
        """Void without waiting: for ``finally`` blocks that must not await."""
        task = asyncio.create_task(self.void(reservation_id))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def flush(self) -> None:
        """Write buffered posts and retry failed voids (also called at shutdown).

        One flush at a time: a caller that finds one under way waits for it, so
        that when this returns, everything buffered before the call is written
        (or queued again after a failure).
        """
        async with self._flush_lock:
            await self._flush()

    async def _flush(self) -> None:
        if self._posts:
            posts, self._posts = self._posts, []
            oldest = self._oldest_post
            # Counted as unflushed while the statement is out, so nobody reads
            # "nothing left to write" in the middle of a write that may fail.
            self._flushing = len(posts)
            try:
                with self._metrics.backend_call(self._backend, "post"):
                    applied = await self._ledger.post_batch(posts)
            except BaseException as exc:
                # Failed or cancelled with the outcome unknown: queued again. A post
                # the database did apply is not applied twice (counted as late).
                self._posts[:0] = posts
                self._oldest_post = oldest
                if not isinstance(exc, Exception):
                    raise
                log.warning("posting %d reservations failed, will retry: %s", len(posts), exc)
                applied = len(posts)
            finally:
                self._flushing = 0
            self._count_late(len(posts) - applied)
        if self._void_retry:
            ids = list(self._void_retry)
            try:
                with self._metrics.backend_call(self._backend, "void"):
                    await self._ledger.void_batch(ids)
            except Exception as exc:
                log.warning("retrying %d voids failed: %s", len(ids), exc)
            else:
                self._void_retry.difference_update(ids)

    @property
    def unflushed(self) -> int:
        return len(self._posts) + self._flushing + len(self._void_retry)

    async def sweep(self) -> int:
        """Resolve reservations whose lease ran out, by the configured policy."""
        with self._metrics.backend_call(self._backend, "sweep"):
            swept = await self._ledger.expire_reservations(self._settings.on_lease_expiry)
            self._metrics.pending_reservations.set(await self._ledger.pending_count())
        return swept

    async def run(self) -> None:
        """Background loop: flush often, sweep now and then. Cancel to stop."""
        interval = self._settings.post_flush_interval_seconds
        sweep_every = max(1, round(self._settings.sweep_interval_seconds / interval))
        tick = 0
        while True:
            await asyncio.sleep(interval)
            tick += 1
            try:
                await self.flush()
                # While posts this process holds cannot be written, sweeping could
                # void the very reservations they charge: wait until they are written.
                if tick % sweep_every == 0 and not self._posts:
                    swept = await self.sweep()
                    if swept:
                        log.info("resolved %d reservations whose lease ran out", swept)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("credit background work failed; will try again")

    async def close(self) -> None:
        """Finish voids under way and flush what is buffered; called after the listeners stopped."""
        # A reserve still in the database may belong to a request that no longer
        # wants it (abandoned): wait for its outcome, so that its void goes out now.
        with contextlib.suppress(Exception):
            await self._reserves.idle()
        with contextlib.suppress(Exception):
            await self._posts_now.idle()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        with contextlib.suppress(Exception):
            await self.flush()
