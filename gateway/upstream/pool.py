"""Keep-alive connections to one upstream: at most ``limit`` open, idle ones expire.

Connections are reused last-in first-out (the warmest first). When ``limit``
connections are open or opening, requests wait in line for one to come back.
An idle connection older than ``keepalive`` seconds is never used again:
closing it before the upstream does means a request is not written into a
socket the upstream is closing.
"""

from __future__ import annotations

import asyncio
import collections
import ssl

from gateway.upstream.answer import UpstreamError
from gateway.upstream.connection import Connection

__all__ = ["Pool"]


class Pool:
    def __init__(
        self,
        host: str,
        port: int,
        tls: ssl.SSLContext | None,
        *,
        limit: int,
        keepalive: float,
        connect_timeout: float,
    ) -> None:
        self._host, self._port, self._tls = host, port, tls
        self._limit = limit
        self._keepalive = keepalive
        self._connect_timeout = connect_timeout
        self._idle: list[Connection] = []
        self._open = 0  # connections open or being opened, idle ones included
        self._waiters: collections.deque[asyncio.Future[None]] = collections.deque()
        self._sweep: asyncio.TimerHandle | None = None
        self._closed = False

    @property
    def open(self) -> int:
        return self._open

    @property
    def idle(self) -> int:
        return len(self._idle)

    async def acquire(self, fresh: bool = False) -> Connection:
        """A live connection: an idle one unless ``fresh``, else a new one within the limit."""
        loop = asyncio.get_running_loop()
        while True:
            if self._closed:
                raise UpstreamError("the upstream's pool is closed")
            conn = self._take_idle(loop.time(), fresh)
            if conn is not None:
                return conn
            if self._open < self._limit:
                return await self._connect(loop)
            if fresh and self._idle:
                self._drop(self._idle.pop(0))  # room for the new connection
                continue
            await self._queue(loop)

    def release(self, conn: Connection, reusable: bool) -> None:
        """Back to the idle stack if it can carry another exchange, else closed."""
        if reusable and not conn.closed and not self._closed:
            conn.idle_since = asyncio.get_running_loop().time()
            self._idle.append(conn)
            if self._sweep is None:
                self._arm()
        else:
            self._drop(conn)
        self._wake_one()

    def close(self) -> None:
        self._closed = True
        while self._idle:
            self._drop(self._idle.pop())
        if self._sweep is not None:
            self._sweep.cancel()
            self._sweep = None
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)

    def _take_idle(self, now: float, fresh: bool) -> Connection | None:
        idle = self._idle
        while idle and not fresh:
            conn = idle.pop()
            if not conn.closed and now - conn.idle_since < self._keepalive:
                return conn
            self._drop(conn)
        return None

    async def _connect(self, loop: asyncio.AbstractEventLoop) -> Connection:
        self._open += 1
        try:
            async with asyncio.timeout(self._connect_timeout):
                _, conn = await loop.create_connection(
                    lambda: Connection(loop),
                    self._host,
                    self._port,
                    ssl=self._tls,
                    server_hostname=self._host if self._tls is not None else None,
                )
        except TimeoutError:
            self._lost_one()
            raise
        except OSError as exc:
            self._lost_one()
            raise UpstreamError(f"cannot connect to the upstream: {exc}") from exc
        except BaseException:
            self._lost_one()
            raise
        return conn

    async def _queue(self, loop: asyncio.AbstractEventLoop) -> None:
        waiter: asyncio.Future[None] = loop.create_future()
        self._waiters.append(waiter)
        try:
            await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                self._wake_one()  # the turn it was given passes to the next in line
            else:
                self._waiters.remove(waiter)
            raise

    def _drop(self, conn: Connection) -> None:
        conn.abort()
        self._lost_one()

    def _lost_one(self) -> None:
        self._open -= 1
        self._wake_one()

    def _wake_one(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    def _arm(self) -> None:
        self._sweep = asyncio.get_running_loop().call_later(self._keepalive, self._expire)

    def _expire(self) -> None:
        """Close idle connections past their keep-alive time (and ones the upstream closed)."""
        self._sweep = None
        now = asyncio.get_running_loop().time()
        keep: list[Connection] = []
        for conn in self._idle:
            if not conn.closed and now - conn.idle_since < self._keepalive:
                keep.append(conn)
            else:
                self._drop(conn)
        self._idle = keep
        if keep:
            self._arm()
