"""Who is calling the admin API: the operator (admin token) or a team-scoped token."""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from aiohttp import web
from aiohttp.typedefs import Middleware

from gateway.app import Gateway
from gateway.errors import error_response
from gateway.keys import is_token_shaped
from gateway.models import TeamToken
from gateway.storage import NotFound

__all__ = ["ACTOR", "Actor", "actor_for", "auth_middleware"]

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
    return error_response(401, "Unauthorized", {"WWW-Authenticate": 'Bearer realm="admin"'})


async def actor_for(gateway: Gateway, presented: str) -> tuple[Actor, TeamToken | None] | None:
    """Who a presented token is: the operator, a live team token, or nobody.

    The one check behind both the admin API's bearer header and the console's
    sign-in form. The admin token is compared in constant time.
    """
    presented = presented.strip()
    if not presented:
        return None
    token = gateway.settings.admin.token
    if token is not None and hmac.compare_digest(
        presented.encode(), token.get_secret_value().encode()
    ):
        return ADMIN, None
    if is_token_shaped(presented):
        found = await gateway.management.find_token(presented)
        if found is not None and found.revoked_at is None:
            return Actor(is_admin=False, team_id=found.team_id, token_id=found.id), found
    return None


def auth_middleware(gateway: Gateway) -> Middleware:
    @web.middleware
    async def authenticate(request: web.Request, handler: Handler) -> web.StreamResponse:
        if not request.path.startswith("/admin/v1/") or request.path in PUBLIC_PATHS:
            return await handler(request)
        scheme, _, presented = request.headers.get("Authorization", "").partition(" ")
        found = await actor_for(gateway, presented) if scheme.lower() == "bearer" else None
        if found is None:
            return _unauthorized()
        request[ACTOR] = found[0]
        return await handler(request)

    return authenticate
