"""Exchange deadlines kept by one periodic sweep instead of a timer per request.

Every forwarded request has up to three limits: the upstream's time to answer,
the quiet time allowed between body chunks after that, and the route's limit
on the whole exchange. Arming an event-loop timer for each (and moving it as
the exchange goes on, as ``asyncio.timeout`` and aiohttp's ``sock_read`` do)
was the largest cost of the plain proxy route: measured with bench/run.py,
dropping the per-request timers took it from 4,172 to 5,062 requests/s. Here
a request only records its deadlines in a set; one task wakes every
``resolution`` seconds and expires the exchanges that are past one. A limit
therefore fires up to one resolution late, never early.

Expiry works as ``asyncio.timeout`` does (Python 3.12's rules): the task is
cancelled, and on leaving the block that cancellation, if it is the only one
pending, becomes ``TimeoutError``; a cancellation from elsewhere stays one.
Written out here rather than wrapping an ``asyncio.Timeout``: the wrapper's two
extra coroutines per block were a third of the cost of a deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from types import TracebackType
from typing import Any

from gateway.config import MAX_RESOLUTION

__all__ = ["MAX_RESOLUTION", "Deadline", "Deadlines", "resolution_for"]

# The sweep keeps running this long after the last exchange ended, so that
# traffic with gaps does not start a new task for every request.
_LINGER_SECONDS = 1.0


def resolution_for(shortest_limit: float) -> float:
    """A sweep interval for limits of at least ``shortest_limit`` s: a tenth, 5-50 ms."""
    return min(MAX_RESOLUTION, max(0.005, shortest_limit / 10))


class Deadline:
    """One exchange's limits; use as ``async with deadlines.until(end)``."""

    __slots__ = ("_cancelling", "_cut", "_keeper", "_task", "end", "last", "quiet")

    def __init__(self, keeper: Deadlines, end: float) -> None:
        self._keeper = keeper
        self._task: asyncio.Task[Any] | None = None
        self._cancelling = 0  # cancellations already pending when the block began
        self._cut = False
        self.end = end  # monotonic time after which the exchange is cut
        self.quiet = math.inf  # seconds allowed without progress
        self.last = 0.0  # monotonic time of the last progress

    def answered(self, end: float, quiet: float) -> None:
        """The status line is in: from now on, the whole-exchange end and the quiet limit."""
        self.end = end
        self.quiet = quiet
        self.last = time.monotonic()

    def progress(self) -> None:
        """A body chunk moved: the quiet time starts again."""
        self.last = time.monotonic()

    def client_turn(self) -> None:
        """Waiting on the client, not the upstream: no quiet limit until the next progress."""
        self.last = math.inf

    def due(self, now: float) -> bool:
        return now >= self.end or now - self.last >= self.quiet

    def expire(self) -> None:
        """Cut the exchange: its task is cancelled and sees ``TimeoutError`` on exit."""
        if not self._cut and self._task is not None:
            self._cut = True
            self._task.cancel()

    async def __aenter__(self) -> Deadline:
        task = asyncio.current_task()
        if task is None:
            raise RuntimeError("a deadline is kept for a task; there is none")
        self._task = task
        self._cancelling = task.cancelling()
        self._keeper.track(self)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc_val: BaseException | None,
        exc_tb: TracebackType | None,
    ) -> None:
        self._keeper.forget(self)
        if not self._cut:
            return
        assert self._task is not None
        # Ours is the last pending cancellation: the block ran out of time.
        if (
            self._task.uncancel() <= self._cancelling
            and exc_type is not None
            and issubclass(exc_type, asyncio.CancelledError)
        ):
            raise TimeoutError from exc_val


class Deadlines:
    """The set of exchanges under way and the sweep that expires them."""

    def __init__(self, resolution: float = 0.05) -> None:
        if resolution <= 0:
            raise ValueError("resolution must be positive")
        self.resolution = resolution
        self._tracked: set[Deadline] = set()
        self._sweeper: asyncio.Task[None] | None = None

    def until(self, end: float) -> Deadline:
        """A deadline at ``end`` (``time.monotonic()`` time), to be entered with ``async with``."""
        return Deadline(self, end)

    def track(self, deadline: Deadline) -> None:
        self._tracked.add(deadline)
        if self._sweeper is None:
            self._sweeper = asyncio.get_running_loop().create_task(self._sweep())

    def forget(self, deadline: Deadline) -> None:
        self._tracked.discard(deadline)

    def __len__(self) -> int:
        return len(self._tracked)

    async def _sweep(self) -> None:
        idle_since: float | None = None
        try:
            while True:
                await asyncio.sleep(self.resolution)
                now = time.monotonic()
                if not self._tracked:
                    if idle_since is None:
                        idle_since = now
                    elif now - idle_since >= _LINGER_SECONDS:
                        return
                    continue
                idle_since = None
                expired = [d for d in self._tracked if d.due(now)]
                for deadline in expired:
                    self._tracked.discard(deadline)
                    deadline.expire()
        finally:
            self._sweeper = None

    async def close(self) -> None:
        """Stop the sweep (at shutdown, once no exchange is left)."""
        sweeper = self._sweeper
        if sweeper is not None:
            sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sweeper
