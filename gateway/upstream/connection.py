"""One keep-alive connection to an upstream: an asyncio protocol feeding llhttp (httptools).

The protocol parses one answer per exchange. The head is collected until the
final status line (1xx answers other than 101 are skipped); the body is kept
as a list of chunks, and reading from the socket pauses while more than
``HIGH_WATER`` bytes wait for the reader, so memory stays flat whatever the
upstream sends. Trailers of a chunked body are dropped. Nothing here arms a
timer: the pipeline's deadlines cancel the task that waits.
"""

from __future__ import annotations

import asyncio
from typing import cast

import httptools
from multidict import CIMultiDict, CIMultiDictProxy

from gateway.upstream.answer import InvalidAnswer, UpstreamError

__all__ = ["HIGH_WATER", "MAX_HEAD_BYTES", "Connection", "Stale"]

# Body bytes buffered for the reader before the socket stops being read.
HIGH_WATER = 128 * 1024
# An answer's status line, header names and values (interim answers and trailers
# included) beyond this are refused as malformed: 502, nothing charged.
MAX_HEAD_BYTES = 64 * 1024


class Stale(UpstreamError):
    """A reused connection closed before any byte of the answer: the request may be resent."""


class _HeadOnly(Exception):
    """Stops the parser after the head of an answer to HEAD (llhttp would wait for a body)."""


class _HeadTooLarge(Exception):
    """The answer's status line and headers (or trailers) passed MAX_HEAD_BYTES."""


class _Surplus(Exception):
    """Stops the parser at bytes after a whole answer (nothing was asked for them)."""


def _text(raw: bytes) -> str:
    return raw.decode("utf-8", "surrogateescape")


class Connection(asyncio.Protocol):
    """The socket, the parser of the current answer, and the waiters of the task using it."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.exchanges = 0  # answers begun on this connection
        self.idle_since = 0.0
        self._parser: httptools.HttpResponseParser | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._write_paused = False
        self._drain_waiter: asyncio.Future[None] | None = None
        self._reset(head_only=False)

    def _reset(self, head_only: bool) -> None:
        self._head_only = head_only
        self.received = False  # any byte of the answer arrived
        self.head_done = False
        self.complete = False
        self.keep_alive = False
        self.error: BaseException | None = None
        self.status = 0
        self._reason = b""
        self._raw_headers: list[tuple[bytes, bytes]] = []
        self._head_bytes = 0
        self._chunks: list[bytes] = []
        self._buffered = 0
        self._reading_paused = False
        self._close_delimited = False

    # -- the exchange (called by the client) --------------------------------------------

    def begin(self, head_only: bool) -> None:
        """A new exchange: a fresh parser (llhttp's state is per answer here)."""
        self._reset(head_only)
        self.exchanges += 1
        self._parser = httptools.HttpResponseParser(self)

    def write(self, data: bytes) -> None:
        assert self.transport is not None
        self.transport.write(data)

    async def drain(self) -> None:
        """Wait while the socket's send buffer is above its high-water mark."""
        if self.closed:
            raise UpstreamError("the upstream closed the connection")
        if self._write_paused:
            waiter = self._drain_waiter = self._loop.create_future()
            try:
                await waiter
            finally:
                self._drain_waiter = None
            if self.closed:
                raise UpstreamError("the upstream closed the connection")

    async def wait_head(self) -> None:
        while not self.head_done:
            if self.error is not None:
                raise self.error
            await self._wait()
        if isinstance(self.error, InvalidAnswer):
            raise self.error  # found invalid before the head was handed over: nothing relayed

    async def read_chunk(self) -> bytes:
        while True:
            chunks = self._chunks
            if chunks:
                data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
                self._chunks = []
                self._buffered = 0
                if self._reading_paused and self.transport is not None:
                    self._reading_paused = False
                    self.transport.resume_reading()
                return data
            if self.error is not None:
                raise UpstreamError("the upstream broke off its answer") from self.error
            if self.complete:
                return b""
            await self._wait()

    @property
    def reusable(self) -> bool:
        """Whether the answer was read whole and the connection may carry another exchange."""
        return (
            self.complete
            and self.keep_alive
            and self.error is None
            and not self.closed
            and not self._chunks
        )

    @property
    def reason(self) -> str:
        return _text(self._reason)

    def headers(self) -> CIMultiDictProxy[str]:
        return CIMultiDictProxy(CIMultiDict([(_text(n), _text(v)) for n, v in self._raw_headers]))

    def fail(self, error: BaseException) -> None:
        """End the exchange with ``error`` and drop the connection."""
        if self.error is None:
            self.error = error
        self.abort()
        self._wake()

    def abort(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.abort()

    async def _wait(self) -> None:
        waiter = self._waiter = self._loop.create_future()
        try:
            await waiter
        finally:
            self._waiter = None

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    # -- asyncio.Protocol ---------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports do not derive from asyncio.Transport, but behave as one.
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        parser = self._parser
        if parser is None or self.complete:
            # Bytes nobody asked for (between exchanges, or after an answer): the
            # connection is out of step and must not be used again.
            self.abort()
            return
        self.received = True
        try:
            parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self.complete = True  # a 101: the head is the answer; the connection is not reused
            self.keep_alive = False
        except httptools.HttpParserCallbackError as exc:
            if isinstance(exc.__context__, _Surplus):
                self.keep_alive = False  # out of step: dropped once this answer is read
            elif isinstance(exc.__context__, _HeadTooLarge):
                self.fail(InvalidAnswer(f"an answer head over {MAX_HEAD_BYTES} bytes"))
            elif not isinstance(exc.__context__, _HeadOnly):
                self.fail(InvalidAnswer(f"an answer the gateway cannot read: {exc}"))
        except httptools.HttpParserError as exc:
            self.fail(InvalidAnswer(f"a malformed answer: {exc}"))
        self._wake()

    def eof_received(self) -> bool | None:
        return None  # the transport closes itself; connection_lost ends the exchange

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._parser_done()
        if self._drain_waiter is not None and not self._drain_waiter.done():
            self._drain_waiter.set_result(None)
        self._wake()

    def _parser_done(self) -> None:
        if self._parser is None or self.complete or self.error is not None:
            return
        if self.head_done and self._close_delimited:
            self.complete = True  # a body delimited by the connection's end
        elif not self.received and self.exchanges > 1:
            self.error = Stale("a reused connection closed before the answer")
        elif self.head_done:
            self.error = UpstreamError("the upstream closed the connection mid-body")
        else:
            self.error = UpstreamError("the upstream closed the connection before answering")

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        if self._drain_waiter is not None and not self._drain_waiter.done():
            self._drain_waiter.set_result(None)

    # -- httptools callbacks ------------------------------------------------------------

    def on_message_begin(self) -> None:
        if self.complete:
            raise _Surplus

    def on_status(self, status: bytes) -> None:
        self._reason += status
        self._count_head(len(status))

    def on_header(self, name: bytes, value: bytes) -> None:
        # Counted also for trailers (dropped, but an endless stream of them is no answer).
        self._count_head(len(name) + len(value))
        if not self.head_done:
            self._raw_headers.append((name, value))

    def _count_head(self, size: int) -> None:
        # llhttp sets no bound of its own: without one, an upstream sending headers
        # forever would grow this process without limit (aiohttp stops at 8 KiB a line).
        self._head_bytes += size
        if self._head_bytes > MAX_HEAD_BYTES:
            raise _HeadTooLarge

    def on_headers_complete(self) -> None:
        parser = self._parser
        assert parser is not None
        status = parser.get_status_code()
        if 100 <= status < 200 and status != 101:
            self._reason, self._raw_headers = b"", []  # an interim answer: wait for the final one
            return
        self.status = status
        self.head_done = True
        self.keep_alive = parser.should_keep_alive()
        self._close_delimited = self._ends_with_connection(status)
        if self._head_only:
            self.complete = True
            raise _HeadOnly

    def _ends_with_connection(self, status: int) -> bool:
        if status in (204, 304) or status == 101:
            return False
        for name, value in self._raw_headers:
            lower = name.lower()
            if lower == b"content-length" or (
                lower == b"transfer-encoding" and b"chunked" in value.lower()
            ):
                return False
        return True

    def on_body(self, body: bytes) -> None:
        self._chunks.append(body)
        self._buffered += len(body)
        if self._buffered > HIGH_WATER and not self._reading_paused and self.transport:
            self._reading_paused = True
            self.transport.pause_reading()

    def on_message_complete(self) -> None:
        if self.head_done:
            self.complete = True
