"""``Idempotency-Key`` on charged routes (contract §1 "Idempotency"), the pipeline's side.

The claim is made inside the reserve step (no extra round trip on a first
attempt). A first attempt that reaches the upstream records the request body's
hash and the answer (status, content type and, up to the replay cap, the
body); a retry with the same key, method, path and body gets that answer back
with ``Idempotent-Replayed: true``, and nothing is forwarded or charged.
"""

from __future__ import annotations

import hashlib
import re

from aiohttp import web

from gateway.storage import IdempotencyRecord

__all__ = ["Attempt", "body_hash", "replay", "valid_key"]

_VISIBLE_ASCII = re.compile(r"[\x21-\x7e]{1,255}\Z")


def valid_key(value: str) -> bool:
    return bool(_VISIBLE_ASCII.match(value))


class Attempt:
    """A first attempt under an Idempotency-Key: what it sent and what it got back."""

    def __init__(self, key: str, team_id: str, environment: str, cap: int) -> None:
        self.key = key
        self.team_id = team_id
        self.environment = environment
        self._cap = cap
        self._request_hash = hashlib.sha256()
        self._response: list[bytes] = []
        self._response_size = 0
        self.overflowed = False

    def sent(self, chunk: bytes) -> None:
        self._request_hash.update(chunk)

    def received(self, chunk: bytes) -> None:
        if self.overflowed:
            return
        self._response_size += len(chunk)
        if self._response_size > self._cap:
            # Past the replay cap the answer is not kept: memory stays bounded.
            self.overflowed = True
            self._response.clear()
            return
        self._response.append(chunk)

    @property
    def body_hash(self) -> str:
        return self._request_hash.hexdigest()

    def response_body(self) -> bytes | None:
        return None if self.overflowed else b"".join(self._response)


def body_hash(body: bytes) -> str:
    return hashlib.sha256(body).hexdigest()


def replay(record: IdempotencyRecord, headers: dict[str, str]) -> web.Response:
    """The first attempt's answer again, marked as a replay."""
    assert record.status is not None and record.body is not None
    response = web.Response(status=record.status, body=record.body, headers=headers)
    if record.content_type:
        response.headers["Content-Type"] = record.content_type
    response.headers["Idempotent-Replayed"] = "true"
    return response
