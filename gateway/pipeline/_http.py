"""Small HTTP moves the stages share: answering without the body, cutting a connection."""

from __future__ import annotations

from aiohttp import web

__all__ = ["CONTINUE", "abort", "expects_continue", "send_continue", "unread"]

CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"


def expects_continue(request: web.BaseRequest) -> bool:
    return request.headers.get("Expect", "").lower() == "100-continue"


async def send_continue(request: web.BaseRequest) -> None:
    """Tell a client waiting on ``Expect: 100-continue`` to send its body (every check passed)."""
    if expects_continue(request):
        await request.writer.write(CONTINUE)


def unread(request: web.BaseRequest, response: web.StreamResponse) -> web.StreamResponse:
    """Answer without reading the body; the connection then closes."""
    if request.body_exists and not request.content.at_eof():
        response.force_close()
        if expects_continue(request):
            # The client waits for 100 Continue and will never send the body:
            # end it here instead of lingering for bytes that will not come.
            request.content.feed_eof()
    return response


def abort(request: web.BaseRequest) -> None:
    """Cut the client connection: what it got must not look like a whole answer."""
    transport = request.transport
    if transport is not None:
        transport.abort()
