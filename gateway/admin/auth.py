"""Who is calling the admin API: the operator (admin token) or a team-scoped token.

The check itself is the management service's (``Management.authenticate``),
shared with the console's sign-in form.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from aiohttp import web
from aiohttp.typedefs import Middleware

from gateway.app import Gateway
from gateway.errors import error_response
from gateway.manage import Actor

__all__ = ["ACTOR", "auth_middleware"]

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
PUBLIC_PATHS = frozenset({"/admin/v1/openapi.json"})
ACTOR = web.RequestKey("actor", Actor)


def _unauthorized() -> web.Response:
    return error_response(401, "Unauthorized", {"WWW-Authenticate": 'Bearer realm="admin"'})


def auth_middleware(gateway: Gateway) -> Middleware:
    @web.middleware
    async def authenticate(request: web.Request, handler: Handler) -> web.StreamResponse:
        if not request.path.startswith("/admin/v1/") or request.path in PUBLIC_PATHS:
            return await handler(request)
        scheme, _, presented = request.headers.get("Authorization", "").partition(" ")
        found = None
        if scheme.lower() == "bearer":
            found = await gateway.management.authenticate(presented)
        if found is None:
            return _unauthorized()
        request[ACTOR] = found[0]
        return await handler(request)

    return authenticate
