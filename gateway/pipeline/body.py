"""The request body on its way upstream: small ones whole, others streamed within the limit."""

from __future__ import annotations

from collections.abc import AsyncIterator

from aiohttp import web
from aiohttp.streams import StreamReader

from gateway import errors
from gateway.deadlines import Deadlines
from gateway.errors import Refusal
from gateway.idempotency import Attempt
from gateway.models import Outcome
from gateway.pipeline._http import send_continue
from gateway.routing import Route

__all__ = ["SMALL_BODY", "BodyTooLarge", "RequestBodies"]

# Bodies up to this size with a declared length are moved in one piece (one
# write instead of several); larger or chunked ones stream with bounded memory.
SMALL_BODY = 64 * 1024


class BodyTooLarge(Exception):
    """The upload passed the route's body limit mid-stream."""


class RequestBodies:
    def __init__(self, deadlines: Deadlines) -> None:
        self._deadlines = deadlines

    async def read(
        self, request: web.BaseRequest, route: Route, end: float, attempt: Attempt | None
    ) -> bytes | AsyncIterator[bytes] | None:
        """The request body: small ones whole, others as a stream held to the route's limit."""
        if not request.body_exists:
            return None
        declared = request.content_length
        # Small and of known length (checked against the route's limit already):
        # read whole, so it goes out in one write with the headers.
        small = declared is not None and declared <= SMALL_BODY
        try:
            if small and request.content.is_eof():
                body = await request.read()  # it came with the headers: no wait
            else:
                async with self._deadlines.until(end):
                    await send_continue(request)
                    if not small:
                        return _stream_body(request.content, route.max_body_bytes, attempt)
                    body = await request.read()
        except TimeoutError:
            # The client has stalled: end its body here, or aiohttp would linger
            # for the rest of it before closing the connection.
            request.content.feed_eof()
            message = "The request body did not arrive within this route's time limit"
            raise Refusal(400, message, Outcome.BAD_REQUEST, close=True) from None
        except ConnectionError:
            # The client left before its body arrived: nothing was forwarded.
            raise errors.refuse_bad_request("The client closed the connection") from None
        if attempt is not None:
            attempt.sent(body)
        return body


async def _stream_body(
    content: StreamReader, limit: int, attempt: Attempt | None
) -> AsyncIterator[bytes]:
    received = 0
    while True:
        chunk = await content.readany()
        if not chunk:
            return
        received += len(chunk)
        if received > limit:
            raise BodyTooLarge
        if attempt is not None:
            attempt.sent(chunk)
        yield chunk
