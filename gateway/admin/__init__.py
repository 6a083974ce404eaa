"""The management API under ``/admin/v1`` and its OpenAPI document.

``gateway.listeners`` mounts it, with the console, on the admin listener.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from importlib.metadata import PackageNotFoundError, version

import orjson
from aiohttp import web

from gateway.admin.openapi import openapi_document
from gateway.admin.routes import add_routes
from gateway.app import Gateway
from gateway.errors import detailed_error
from gateway.manage import InputError
from gateway.storage import Conflict, NotFound, StorageUnavailable

__all__ = ["MAX_BODY", "add_admin_api", "error_middleware"]

log = logging.getLogger("gateway.admin")
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
MAX_BODY = 1024 * 1024


def _error(status: int, message: str, details: list[dict[str, str]] | None = None) -> web.Response:
    return detailed_error(status, message, details or [])


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """One error ladder: every failure is JSON with the code contract §2 assigns."""
    try:
        return await handler(request)
    except InputError as exc:
        return _error(exc.status, exc.message, exc.details)
    except NotFound:
        # The service answers "not found" itself (Unknown); this is a race with a delete.
        return _error(404, "Not found")
    except Conflict as exc:
        return _error(409, str(exc))
    except StorageUnavailable:
        return _error(503, "The database is unavailable")
    except web.HTTPRequestEntityTooLarge:
        return _error(413, "Request body over 1 MiB")
    except web.HTTPMethodNotAllowed as exc:
        response = _error(405, "Method not allowed")
        response.headers["Allow"] = ", ".join(sorted(exc.allowed_methods))
        return response
    except web.HTTPException as exc:
        if exc.status >= 400:
            return _error(exc.status, exc.reason)
        raise
    except Exception:
        # A bug: still JSON, and logged with the request id for the test that reproduces it.
        log.exception("admin request failed: %s %s", request.method, request.path)
        return _error(500, "Internal error")


def _package_version() -> str:
    try:
        return version("gateway")
    except PackageNotFoundError:  # running from a source tree
        return "0"


def add_admin_api(app: web.Application, gateway: Gateway) -> None:
    """The routes of the admin API and its OpenAPI document, on ``app``.

    ``app`` must have :func:`error_middleware` and the auth middleware
    (``gateway.admin.auth.auth_middleware``), in that order.
    """
    if gateway.settings.admin.token is None:
        raise RuntimeError("the admin API needs admin.token (GATEWAY_ADMIN_TOKEN)")
    add_routes(app)
    document = orjson.dumps(openapi_document(_package_version()))

    async def openapi(request: web.Request) -> web.Response:
        return web.Response(body=document, content_type="application/json")

    app.router.add_get("/admin/v1/openapi.json", openapi)
