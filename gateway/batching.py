"""Micro-batching: concurrent calls to a backend go out together, one batch at a time.

While one batch is with the backend, the calls made meanwhile queue up and
form the next one. Under no load a call goes out alone and at once (nothing
waits for a timer); under load each call shares one round trip with those
around it, the way TigerBeetle batches transfers. Every caller still gets its
own result, in the order the batch ran them.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import Generic, TypeVar

__all__ = ["Grouper"]

Req = TypeVar("Req")
Res = TypeVar("Res")


class Grouper(Generic[Req, Res]):
    """Run ``run`` on batches of at most ``max_batch`` submitted items, one batch at a time.

    ``run`` returns one result per item, in order. If it raises, every caller
    of that batch gets the exception (the outcome is unknown to all of them).
    A caller that is cancelled leaves its item in the batch: the backend may
    still act on it, which the caller must allow for.
    """

    def __init__(
        self,
        run: Callable[[Sequence[Req]], Awaitable[Sequence[Res]]],
        max_batch: int = 512,
        on_idle: Callable[[], None] | None = None,
    ) -> None:
        self._run = run
        self._max_batch = max_batch
        self._on_idle = on_idle
        self._queue: list[tuple[Req, asyncio.Future[Res]]] = []
        self._task: asyncio.Task[None] | None = None

    def submit(self, item: Req) -> asyncio.Future[Res]:
        future: asyncio.Future[Res] = asyncio.get_running_loop().create_future()
        self._queue.append((item, future))
        if self._task is None:
            self._task = asyncio.create_task(self._drain())
        return future

    async def idle(self) -> None:
        """Wait until every item submitted so far has its result (for shutdown)."""
        while self._task is not None:
            await asyncio.shield(self._task)
        # Results were set before the batch task ended; let their callbacks run.
        await asyncio.sleep(0)

    async def _drain(self) -> None:
        try:
            while self._queue:
                batch = self._queue[: self._max_batch]
                del self._queue[: self._max_batch]
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
            if self._on_idle is not None and not self._queue:
                self._on_idle()
