"""Idempotency-Keys on the request path: the claim, the answer to a key used before
(409, 422, or the first answer again), and the record a settlement leaves behind."""

from __future__ import annotations

import logging

from aiohttp import web

from gateway import errors, idempotency
from gateway.errors import Refusal
from gateway.models import KeyRecord, Outcome
from gateway.pipeline._http import send_continue
from gateway.pipeline.rules import Verdict
from gateway.routing import Route
from gateway.storage import IdempotencyClaim, IdempotencyRecord, Ledger, StorageError

__all__ = ["Replay", "answer", "claim", "record"]

log = logging.getLogger("gateway.pipeline")


def claim(request: web.BaseRequest, route: Route, path: str) -> IdempotencyClaim | None:
    """The request's Idempotency-Key claim (charged routes only), or a 400 for a bad key."""
    value = request.headers.get("Idempotency-Key")
    if value is None or not route.charges(request.method):
        return None
    if not idempotency.valid_key(value):
        raise errors.refuse_bad_request("Idempotency-Key must be 1-255 visible ASCII characters")
    return IdempotencyClaim(value, request.method, path)


async def record(
    ledger: Ledger,
    key: KeyRecord,
    attempt: idempotency.Attempt,
    verdict: Verdict,
    status: int | None,
    content_type: str | None,
) -> None:
    """Keep the key as used (with the answer, when it was delivered whole) or release it."""
    try:
        if verdict.keep_key and status is not None:
            body = attempt.response_body() if verdict.store_answer else None
            await ledger.complete_idempotency(
                key.team_id,
                key.environment,
                attempt.key,
                attempt.body_hash,
                status,
                content_type,
                body,
            )
        else:
            await ledger.release_idempotency(key.team_id, key.environment, attempt.key)
    except StorageError as exc:
        # An in-flight record left behind is freed by the sweeper after a lease.
        log.warning("idempotency record not written: %s", exc)


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
    request: web.BaseRequest, route: Route, claim: IdempotencyClaim, record: IdempotencyRecord
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


async def _read_body(request: web.BaseRequest, limit: int) -> bytes | None:
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
