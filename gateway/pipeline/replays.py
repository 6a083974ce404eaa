"""The answer to a request whose Idempotency-Key was used before: 409, 422, or the first answer."""

from __future__ import annotations

from aiohttp import web

from gateway import errors, idempotency
from gateway.errors import Refusal
from gateway.models import Outcome
from gateway.pipeline._http import send_continue
from gateway.routing import Route
from gateway.storage import IdempotencyClaim, IdempotencyRecord

__all__ = ["Replay", "answer"]


class Replay(Refusal):
    """An earlier attempt's answer, sent again instead of forwarding."""

    def __init__(self, response: web.Response) -> None:
        super().__init__(response.status, "replayed", Outcome.REPLAYED, unread=False)
        self._response = response

    def render(self) -> web.Response:
        return self._response


def _in_flight() -> Refusal:
    message = "A request with this Idempotency-Key is still in progress"
    return Refusal(409, message, Outcome.REPLAYED)


def _mismatch(unread: bool) -> Refusal:
    message = "This Idempotency-Key was already used for a different request"
    return Refusal(422, message, Outcome.BAD_REQUEST, unread=unread)


def _not_stored() -> Refusal:
    message = (
        "The first response to this Idempotency-Key was too large (or not received whole) "
        "to be replayed; it was charged once and cannot be sent again"
    )
    return Refusal(409, message, Outcome.REPLAYED, unread=False)


async def answer(
    request: web.Request, route: Route, claim: IdempotencyClaim, record: IdempotencyRecord
) -> Refusal:
    """What to answer a retry under a used key (nothing is forwarded or charged)."""
    if record.state == "in_flight":
        return _in_flight()
    if record.method != claim.method or record.path != claim.path:
        return _mismatch(unread=True)
    body = await _read_body(request, route.max_body_bytes)
    if body is None:
        return errors.refuse_too_large(route.max_body_bytes)
    if idempotency.body_hash(body) != record.body_hash:
        return _mismatch(unread=False)
    if not record.body_stored:
        return _not_stored()
    return Replay(idempotency.replay(record, {}))


async def _read_body(request: web.Request, limit: int) -> bytes | None:
    """The whole request body, or None past ``limit`` (bounded: only replays read it)."""
    if not request.body_exists:
        return b""
    await send_continue(request)
    chunks: list[bytes] = []
    size = 0
    while chunk := await request.content.readany():
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
    return b"".join(chunks)
