"""The lean client: one pool per upstream, one connection per exchange, no timers of its own."""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Mapping
from urllib.parse import urlsplit

from multidict import CIMultiDictProxy

from gateway.config import UpstreamSettings
from gateway.upstream.answer import Body, UpstreamAnswer, UpstreamError
from gateway.upstream.connection import Connection, Stale
from gateway.upstream.framing import framing_for, request_head, send_stream
from gateway.upstream.pool import Pool

__all__ = ["LeanAnswer", "LeanClient", "tls_context"]

# Safe to send again when a reused connection closed before answering (RFC 9110 §9.2.2).
_IDEMPOTENT = frozenset({"GET", "HEAD", "PUT", "DELETE", "OPTIONS", "TRACE"})


def tls_context(settings: UpstreamSettings) -> ssl.SSLContext:
    """Certificates verified against the system's roots, or only ``ca_file``'s when set."""
    return ssl.create_default_context(cafile=settings.ca_file)


class LeanAnswer:
    """The answer on one connection; ``release`` returns the connection (or drops it)."""

    __slots__ = ("_conn", "_pool", "_writer", "content_length", "headers", "reason", "status")

    def __init__(self, conn: Connection, pool: Pool, writer: asyncio.Task[None] | None) -> None:
        self._conn: Connection | None = conn
        self._pool = pool
        self._writer = writer
        self.status = conn.status
        self.reason = conn.reason
        self.headers: CIMultiDictProxy[str] = conn.headers()
        length = self.headers.get("Content-Length")
        self.content_length = int(length) if length is not None else None

    async def read_chunk(self) -> bytes:
        conn = self._conn
        if conn is None:
            return b""
        return await conn.read_chunk()

    def release(self) -> None:
        conn = self._conn
        if conn is None:
            return
        self._conn = None
        writer = self._writer
        reusable = conn.reusable
        if writer is not None and not writer.done():
            writer.cancel()  # the upstream answered before taking the whole body
            reusable = False
        self._pool.release(conn, reusable)

    def close(self) -> None:
        conn = self._conn
        if conn is not None:
            conn.abort()
            self.release()


class LeanClient:
    def __init__(self, settings: UpstreamSettings) -> None:
        url = urlsplit(settings.url)
        tls = tls_context(settings) if url.scheme == "https" else None
        host = url.hostname or ""
        port = url.port or (443 if tls is not None else 80)
        self._host_header = url.netloc.rpartition("@")[2]
        self._prefix = url.path
        self._pool = Pool(
            host,
            port,
            tls,
            limit=settings.max_connections,
            keepalive=settings.keepalive_seconds,
            connect_timeout=settings.connect_timeout_seconds,
        )

    @property
    def pool(self) -> Pool:
        return self._pool

    async def request(
        self, method: str, target: str, headers: Mapping[str, str], body: Body
    ) -> UpstreamAnswer:
        head = request_head(
            method,
            self._prefix + target,
            self._host_header,
            headers,
            framing_for(method, headers, body),
        )
        conn = await self._pool.acquire()
        try:
            return await self._exchange(conn, method, head, body, headers)
        except Stale:
            if not (body is None or (isinstance(body, bytes) and method in _IDEMPOTENT)):
                raise UpstreamError("the upstream closed a reused connection") from None
        conn = await self._pool.acquire(fresh=True)
        return await self._exchange(conn, method, head, body, headers)

    async def _exchange(
        self, conn: Connection, method: str, head: bytes, body: Body, headers: Mapping[str, str]
    ) -> LeanAnswer:
        writer: asyncio.Task[None] | None = None
        try:
            conn.begin(head_only=method == "HEAD")
            if body is None:
                conn.write(head)
            elif isinstance(body, bytes):
                conn.write(head + body)
            else:
                conn.write(head)
                chunked = "Content-Length" not in headers
                writer = asyncio.get_running_loop().create_task(send_stream(conn, body, chunked))
            await conn.wait_head()
        except BaseException:
            # Cancelled (a deadline, the client left) or failed: never back to the pool.
            if writer is not None:
                writer.cancel()
            conn.abort()
            self._pool.release(conn, False)
            raise
        return LeanAnswer(conn, self._pool, writer)

    async def close(self) -> None:
        self._pool.close()
