"""The admin listener: the management API under ``/admin/v1``."""

from __future__ import annotations

import hmac
import logging
from collections.abc import Awaitable, Callable

from aiohttp import web
from aiohttp.typedefs import Middleware

from gateway.admin._input import InputError
from gateway.admin.routes import add_routes
from gateway.app import GATEWAY, Gateway
from gateway.errors import json_response
from gateway.storage import Conflict, NotFound, StorageUnavailable

__all__ = ["create_admin_app"]

log = logging.getLogger("gateway.admin")
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
MAX_BODY = 1024 * 1024


@web.middleware
async def _errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """One error ladder: every failure is JSON with a 4xx/5xx code the contract names."""
    try:
        return await handler(request)
    except InputError as exc:
        return json_response(exc.status, {"error": exc.message, "details": exc.details})
    except NotFound as exc:
        return json_response(404, {"error": str(exc), "details": []})
    except Conflict as exc:
        return json_response(409, {"error": str(exc), "details": []})
    except StorageUnavailable:
        return json_response(503, {"error": "The database is unavailable", "details": []})
    except web.HTTPRequestEntityTooLarge:
        return json_response(413, {"error": "Request body over 1 MiB", "details": []})
    except web.HTTPException as exc:
        if exc.status >= 400:
            return json_response(exc.status, {"error": exc.reason, "details": []})
        raise
    except Exception:
        log.exception("admin request failed: %s %s", request.method, request.path)
        return json_response(500, {"error": "Internal error", "details": []})


def _token_check(gateway: Gateway) -> Middleware:
    token = gateway.settings.admin.token
    expected = token.get_secret_value().encode() if token is not None else None

    @web.middleware
    async def check(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path.startswith("/admin/v1/") and request.path != "/admin/v1/openapi.json":
            header = request.headers.get("Authorization", "")
            scheme, _, presented = header.partition(" ")
            ok = (
                expected is not None
                and scheme.lower() == "bearer"
                and hmac.compare_digest(presented.strip().encode(), expected)
            )
            if not ok:
                return json_response(401, {"error": "Unauthorized"})
        return await handler(request)

    return check


def create_admin_app(gateway: Gateway) -> web.Application:
    if gateway.settings.admin.token is None:
        raise RuntimeError("the admin API needs admin.token (GATEWAY_ADMIN_TOKEN)")
    app = web.Application(middlewares=[_errors, _token_check(gateway)], client_max_size=MAX_BODY)
    app[GATEWAY] = gateway
    add_routes(app)
    return app
