"""The request as bytes: the head written as given, the body framed and sent with backpressure."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Mapping

from gateway.upstream.answer import UpstreamError
from gateway.upstream.connection import Connection

__all__ = ["request_head", "send_stream"]

# Methods whose request may carry a body; without one they say Content-Length: 0
# (as aiohttp's client does).
_BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})


def request_head(
    method: str, target: str, host: str, headers: Mapping[str, str], framing: str | None
) -> bytes:
    """The request line and headers: Host from the upstream URL, the others as given.

    ``framing`` is the body's framing header when the headers do not declare
    its length already. Raises UpstreamError for a line break inside a field
    (it would split the request).
    """
    lines = [f"{method} {target} HTTP/1.1\r\nHost: {host}\r\n"]
    lines += [f"{name}: {value}\r\n" for name, value in headers.items()]
    if framing is not None:
        lines.append(framing)
    lines.append("\r\n")
    text = "".join(lines)
    if text.count("\n") != len(lines) + 1 or text.count("\r") != len(lines) + 1:
        raise UpstreamError("a line break inside a request header")
    return text.encode("utf-8", "surrogateescape")


def framing_for(method: str, headers: Mapping[str, str], body: object) -> str | None:
    """The header that frames ``body``, unless the given headers already declare its length."""
    if "Content-Length" in headers:
        return None
    if body is None:
        return "Content-Length: 0\r\n" if method in _BODY_METHODS else None
    if isinstance(body, bytes):
        return f"Content-Length: {len(body)}\r\n"
    return "Transfer-Encoding: chunked\r\n"


async def send_stream(conn: Connection, body: AsyncIterator[bytes], chunked: bool) -> None:
    """Write a streamed body chunk by chunk, waiting for the socket to drain after each.

    A failure of the body's source ends the exchange with that exception (the
    forward stage turns an over-long upload into 413); a connection that went
    away is the reader's to report.
    """
    try:
        async for chunk in body:
            if not chunk:
                continue
            conn.write(b"%x\r\n%s\r\n" % (len(chunk), chunk) if chunked else chunk)
            await conn.drain()
        if chunked:
            conn.write(b"0\r\n\r\n")
    except (UpstreamError, OSError):
        pass
    except asyncio.CancelledError:
        raise
    except Exception as exc:
        conn.fail(exc)
    finally:
        aclose = getattr(body, "aclose", None)
        if aclose is not None:
            with contextlib.suppress(Exception):
                await aclose()
