"""Who is calling the admin API: the operator (admin token) or a team-scoped token."""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from aiohttp import web
from aiohttp.typedefs import Middleware

from gateway.app import GATEWAY, Gateway
from gateway.errors import json_response
from gateway.keys import is_token_shaped
from gateway.storage import NotFound

__all__ = ["ACTOR", "Actor", "auth_middleware"]

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
PUBLIC_PATHS = frozenset({"/admin/v1/openapi.json"})


@dataclass(frozen=True, slots=True)
class Actor:
    is_admin: bool
    team_id: str | None = None
    token_id: str | None = None

    @property
    def label(self) -> str:
        """How the audit log names this caller."""
        return "admin" if self.is_admin else f"token:{self.token_id}"

    def check_team(self, team_id: str) -> None:
        """Anything outside a team token's own team does not exist for it (404)."""
        if not self.is_admin and team_id != self.team_id:
            raise NotFound("not found")


ACTOR = web.RequestKey("actor", Actor)
ADMIN = Actor(is_admin=True)


def _unauthorized() -> web.Response:
    return json_response(
        401, {"error": "Unauthorized"}, {"WWW-Authenticate": 'Bearer realm="admin"'}
    )


def auth_middleware(gateway: Gateway) -> Middleware:
    token = gateway.settings.admin.token
    expected = token.get_secret_value().encode() if token is not None else None

    @web.middleware
    async def authenticate(request: web.Request, handler: Handler) -> web.StreamResponse:
        if not request.path.startswith("/admin/v1/") or request.path in PUBLIC_PATHS:
            return await handler(request)
        scheme, _, presented = request.headers.get("Authorization", "").partition(" ")
        presented = presented.strip()
        if scheme.lower() != "bearer" or not presented:
            return _unauthorized()
        # Compared in constant time; the length check leaks only the length.
        if expected is not None and hmac.compare_digest(presented.encode(), expected):
            request[ACTOR] = ADMIN
            return await handler(request)
        if is_token_shaped(presented):
            found = await request.app[GATEWAY].management.find_token(presented)
            if found is not None and found.revoked_at is None:
                request[ACTOR] = Actor(is_admin=False, team_id=found.team_id, token_id=found.id)
                return await handler(request)
        return _unauthorized()

    return authenticate
