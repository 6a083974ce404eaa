"""Every error body and header of the contract, rendered in one place."""

from __future__ import annotations

import math

import orjson
from aiohttp import web

__all__ = [
    "MISSING_KEY",
    "bad_request",
    "error_response",
    "insufficient_credits",
    "invalid_key",
    "json_response",
    "rate_limited",
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


MISSING_KEY = "Missing API key"
INVALID_KEY = "Invalid API key"


def missing_key() -> web.Response:
    return error_response(401, MISSING_KEY, {"WWW-Authenticate": 'Bearer realm="api"'})


def invalid_key() -> web.Response:
    return error_response(
        401, INVALID_KEY, {"WWW-Authenticate": 'Bearer realm="api", error="invalid_token"'}
    )


def rate_limited(retry_after_seconds: float, limit: int) -> web.Response:
    retry_after = max(1, math.ceil(retry_after_seconds - 1e-9))
    return json_response(
        429,
        {"error": "Rate limit exceeded", "retry_after": retry_after, "limit": limit},
        {"Retry-After": str(retry_after)},
    )


def insufficient_credits(required: int, available: int) -> web.Response:
    return json_response(
        402,
        {
            "error": "Insufficient credits",
            "credits_required": required,
            "credits_available": available,
        },
    )


def bad_request(message: str = "Bad request") -> web.Response:
    return error_response(400, message)
