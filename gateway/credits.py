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
import secrets
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Generic, TypeVar

from gateway.config import CreditSettings
from gateway.metrics import Metrics
from gateway.models import Environment
from gateway.storage import IdempotencyClaim, Ledger, ReserveRequest, ReserveResult

__all__ = ["Credits"]

log = logging.getLogger("gateway.credits")

Req = TypeVar("Req")
Res = TypeVar("Res")
_MAX_BATCH = 512


class _Grouper(Generic[Req, Res]):
    """Run calls one batch at a time; calls made meanwhile form the next batch."""

    def __init__(self, run: Callable[[Sequence[Req]], Awaitable[Sequence[Res]]]) -> None:
        self._run = run
        self._queue: list[tuple[Req, asyncio.Future[Res]]] = []
        self._task: asyncio.Task[None] | None = None

    def submit(self, item: Req) -> asyncio.Future[Res]:
        future: asyncio.Future[Res] = asyncio.get_running_loop().create_future()
        self._queue.append((item, future))
        if self._task is None:
            self._task = asyncio.create_task(self._drain())
        return future

    async def _drain(self) -> None:
        try:
            while self._queue:
                batch = self._queue[:_MAX_BATCH]
                del self._queue[:_MAX_BATCH]
                try:
                    results = await self._run([item for item, _ in batch])
                except Exception as exc:  # the batch's outcome is unknown: tell every caller
                    for _, future in batch:
                        if not future.done():
                            future.set_exception(exc)
                    continue
                for (_, future), result in zip(batch, results, strict=True):
                    if not future.done():
                        future.set_result(result)
        finally:
            self._task = None


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
        self._reserves: _Grouper[ReserveRequest, ReserveResult] = _Grouper(self._reserve_many)
        self._voids: _Grouper[str, int] = _Grouper(self._void_many)
        self._posts: list[tuple[str, int]] = []
        self._void_retry: set[str] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._oldest_post = 0.0
        self._flushing = 0
        self.late_resolutions = 0

    async def _reserve_many(self, requests: Sequence[ReserveRequest]) -> list[ReserveResult]:
        with self._metrics.backend_call(self._backend, "reserve"):
            return await self._ledger.reserve_batch(requests)

    async def _void_many(self, ids: Sequence[str]) -> list[int]:
        with self._metrics.backend_call(self._backend, "void"):
            applied = await self._ledger.void_batch(ids)
        # The batch result is a count; each caller only needs to know it was done.
        return [applied] * len(ids)

    async def reserve(
        self,
        team_id: str,
        environment: Environment,
        key_id: str,
        amount: int,
        claim: IdempotencyClaim | None = None,
    ) -> tuple[str, ReserveResult]:
        """Reserve ``amount``; raises the backend's error when the outcome is unknown.

        In that case the reservation id is queued for voiding, so a client that
        is answered 503 can never be charged.
        """
        reservation_id = "rsv_" + secrets.token_hex(12)
        request = ReserveRequest(reservation_id, team_id, environment, key_id, amount, claim)
        future = self._reserves.submit(request)
        try:
            result = await asyncio.shield(future)
        except asyncio.CancelledError:
            # The caller left while the batch was in the database: give it back.
            future.add_done_callback(lambda f: self._void_if_granted(reservation_id, f))
            raise
        except Exception:
            self._void_retry.add(reservation_id)
            raise
        return reservation_id, result

    def _void_if_granted(self, reservation_id: str, future: asyncio.Future[ReserveResult]) -> None:
        if future.cancelled() or future.exception() is not None or future.result().granted:
            self._void_retry.add(reservation_id)

    def post(self, reservation_id: str, charged: int) -> None:
        """Make a reservation final for ``charged`` (≤ reserved); flushed in the background."""
        if not self._posts:
            self._oldest_post = time.monotonic()
        self._posts.append((reservation_id, charged))

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
        """Write buffered posts and retry failed voids (also called at shutdown)."""
        if self._posts:
            posts, self._posts = self._posts, []
            oldest = self._oldest_post
            # Counted as unflushed while the statement is out, so nobody reads
            # "nothing left to write" in the middle of a write that may fail.
            self._flushing = len(posts)
            try:
                with self._metrics.backend_call(self._backend, "post"):
                    applied = await self._ledger.post_batch(posts)
            except Exception as exc:
                log.warning("posting %d reservations failed, will retry: %s", len(posts), exc)
                self._posts[:0] = posts
                self._oldest_post = oldest
                applied = len(posts)
            finally:
                self._flushing = 0
            late = len(posts) - applied
            if late > 0:
                # Already resolved (the sweeper got there first): never applied twice.
                self.late_resolutions += late
                self._metrics.late_resolutions.inc(late)
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
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        with contextlib.suppress(Exception):
            await self.flush()
