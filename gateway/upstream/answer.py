"""What the forward stage may rely on, whichever client talks to the upstream."""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from typing import Protocol

from multidict import CIMultiDictProxy

__all__ = ["Body", "InvalidAnswer", "UpstreamAnswer", "UpstreamClient", "UpstreamError"]

# A request body: none, whole, or a stream of chunks (written with backpressure).
Body = bytes | AsyncIterator[bytes] | None


class UpstreamError(Exception):
    """The upstream could not be reached, broke off, or answered what HTTP/1.1 forbids.

    Raised by ``request`` before the status line (the client gets a 502) and by
    ``read_chunk`` after it (the stream is cut). A connect timeout is a plain
    ``TimeoutError`` instead (a 504); an exception raised by a streamed request
    body propagates as it is.
    """


class InvalidAnswer(UpstreamError):
    """The upstream answered what HTTP/1.1 does not allow (a bad status line, framing, header)."""


class UpstreamAnswer(Protocol):
    """An upstream's answer: the head at once, the body chunk by chunk."""

    @property
    def status(self) -> int: ...

    @property
    def reason(self) -> str: ...

    @property
    def headers(self) -> CIMultiDictProxy[str]:
        """As received, decoded as UTF-8 with surrogateescape (as aiohttp does)."""
        ...

    @property
    def content_length(self) -> int | None: ...

    async def read_chunk(self) -> bytes:
        """The next body bytes; ``b""`` once the body is whole; raises UpstreamError on a break."""
        ...

    def release(self) -> None:
        """Done with the answer: its connection goes back to the pool if it can be reused."""
        ...

    def close(self) -> None:
        """Drop the connection (the answer is abandoned)."""
        ...


class UpstreamClient(Protocol):
    async def request(
        self, method: str, target: str, headers: Mapping[str, str], body: Body
    ) -> UpstreamAnswer:
        """Send ``method target`` (origin-form: path and query, already encoded) and
        return once the answer's final status line and headers are in."""
        ...

    async def close(self) -> None: ...
