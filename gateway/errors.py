"""Every error body and header of the contract, rendered in one place.

The request path raises :class:`Refusal` (built by the ``refuse_*`` functions
below) and renders it with :meth:`Refusal.render`; the admin listener uses
:func:`error_response` and :func:`detailed_error` for its own ``{"error", "details"}``
bodies.
"""

from __future__ import annotations

import math

import orjson
from aiohttp import web

from gateway.models import Outcome

__all__ = [
    "INVALID_KEY",
    "MISSING_KEY",
    "Refusal",
    "detailed_error",
    "error_response",
    "json_response",
    "refuse_bad_request",
    "refuse_insufficient_credits",
    "refuse_invalid_key",
    "refuse_method",
    "refuse_missing_key",
    "refuse_not_found",
    "refuse_rate_limited",
    "refuse_too_large",
    "refuse_unavailable",
    "refuse_upstream",
]

_JSON = "application/json"


def json_response(
    status: int, payload: object, headers: dict[str, str] | None = None
) -> web.Response:
    return web.Response(
        status=status, body=orjson.dumps(payload), content_type=_JSON, headers=headers
    )


def error_response(
    status: int, message: str, headers: dict[str, str] | None = None
) -> web.Response:
    return json_response(status, {"error": message}, headers)


def detailed_error(
    status: int, message: str, details: list[dict[str, str]], headers: dict[str, str] | None = None
) -> web.Response:
    """The admin API's body: ``error`` and a ``details`` list, one entry per bad field."""
    return json_response(status, {"error": message, "details": details}, headers)


MISSING_KEY = "Missing API key"
INVALID_KEY = "Invalid API key"


class Refusal(Exception):
    """A request the gateway answers itself, raised by the stage that decided it.

    ``render()`` is the one place a refusal becomes the contract's response;
    the pipeline records ``outcome`` for metrics, usage and logs. ``unread``
    says the request body was never read, so the connection must close after
    the answer (or a client waiting on ``Expect: 100-continue`` is released).
    """

    def __init__(
        self,
        status: int,
        message: str,
        outcome: Outcome,
        headers: dict[str, str] | None = None,
        *,
        payload: dict[str, object] | None = None,
        unread: bool = True,
        close: bool = False,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.outcome = outcome
        self.headers = headers
        self.payload = payload
        self.unread = unread
        self.close = close

    def render(self) -> web.Response:
        body = self.payload if self.payload is not None else {"error": self.message}
        response = json_response(self.status, body, self.headers)
        if self.close:
            response.force_close()
        return response


def refuse_missing_key() -> Refusal:
    return Refusal(
        401, MISSING_KEY, Outcome.UNAUTHORIZED, {"WWW-Authenticate": 'Bearer realm="api"'}
    )


def refuse_invalid_key() -> Refusal:
    return Refusal(
        401,
        INVALID_KEY,
        Outcome.UNAUTHORIZED,
        {"WWW-Authenticate": 'Bearer realm="api", error="invalid_token"'},
    )


def refuse_rate_limited(retry_after_seconds: float, limit: int) -> Refusal:
    retry_after = max(1, math.ceil(retry_after_seconds - 1e-9))
    return Refusal(
        429,
        "Rate limit exceeded",
        Outcome.RATE_LIMITED,
        {"Retry-After": str(retry_after)},
        payload={"error": "Rate limit exceeded", "retry_after": retry_after, "limit": limit},
    )


def refuse_insufficient_credits(required: int, available: int) -> Refusal:
    # X-Credits-Remaining says what the body says: for a key with a spend cap that
    # is what the key may still spend, which may be less than the team's balance.
    return Refusal(
        402,
        "Insufficient credits",
        Outcome.INSUFFICIENT_CREDITS,
        {"X-Credits-Remaining": str(available)},
        payload={
            "error": "Insufficient credits",
            "credits_required": required,
            "credits_available": available,
        },
    )


def refuse_bad_request(message: str) -> Refusal:
    return Refusal(400, message, Outcome.BAD_REQUEST)


def refuse_not_found() -> Refusal:
    return Refusal(404, "Not found", Outcome.NOT_FOUND)


def refuse_method(allowed: frozenset[str] | set[str]) -> Refusal:
    return Refusal(
        405, "Method not allowed", Outcome.NOT_FOUND, {"Allow": ", ".join(sorted(allowed))}
    )


def refuse_too_large(limit: int) -> Refusal:
    message = f"Request body is larger than this route's limit of {limit} bytes"
    return Refusal(413, message, Outcome.PAYLOAD_TOO_LARGE, close=True)


def refuse_unavailable() -> Refusal:
    return Refusal(503, "Service temporarily unavailable", Outcome.UNAVAILABLE)


def refuse_upstream(status: int, message: str) -> Refusal:
    """502 (unreachable, broke off, malformed answer) or 504 (timed out)."""
    return Refusal(status, message, Outcome.UPSTREAM_ERROR)
