"""What every area of the management service shares: the store, the audit log, lookups
that answer "not found" alike for what is missing and what the actor may not see."""

from __future__ import annotations

import contextlib
import hmac
import math
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Protocol

from gateway.config import Settings
from gateway.keys import hash_secret, is_token_shaped
from gateway.manage.actors import ADMIN, SYSTEM, Actor, team_token
from gateway.manage.inputs import Unknown, text_problem
from gateway.models import ApiKey, Team, TeamToken
from gateway.storage import Backend, NotFound

__all__ = ["Core", "KeyChangeListener", "iso"]


class KeyChangeListener(Protocol):
    """Hears of a key (by hash) or a team's keys (by team id) changed through this process."""

    def on_key_changed(self, key_hash: str | None, team_id: str | None) -> None: ...


class Core:
    def __init__(
        self,
        backend: Backend,
        settings: Settings,
        listener: KeyChangeListener | None = None,
    ) -> None:
        self._backend = backend
        self._listener = listener
        pepper = settings.keys.pepper
        self._pepper = pepper.get_secret_value().encode() if pepper else None
        token = settings.admin.token
        self._admin_token = token.get_secret_value().encode() if token is not None else None
        self._plan_clock_offset = settings.plans.clock_offset_seconds
        self._webhook_settings = settings.webhooks

    @contextlib.contextmanager
    def _changing(self, key_hash: str | None = None, team_id: str | None = None) -> Iterator[None]:
        """Tell the listener once the change is made, or may have been.

        Also when the store call fails: a connection lost around the commit
        leaves the change unknown, and forgetting a cached key costs one lookup.
        """
        try:
            yield
        finally:
            if self._listener is not None:
                self._listener.on_key_changed(key_hash, team_id)

    def hash(self, secret: str) -> str:
        return hash_secret(secret, self._pepper)

    async def authenticate(self, presented: str) -> tuple[Actor, TeamToken | None] | None:
        """Who a presented token is: the operator, a live team token, or nobody.

        The one check behind the admin API's bearer header and the console's
        sign-in form. The admin token is compared in constant time; anything
        but visible ASCII (undecodable bytes too) is nobody.
        """
        presented = presented.strip()
        if not presented or not presented.isascii() or not presented.isprintable():
            return None
        if self._admin_token is not None and hmac.compare_digest(
            presented.encode(), self._admin_token
        ):
            return ADMIN, None
        if is_token_shaped(presented):
            found = await self._backend.find_token(self.hash(presented))
            if found is not None and found.revoked_at is None:
                return team_token(found.id, found.team_id), found
        return None

    async def team(self, id_or_name: str, *, actor: Actor = SYSTEM, field: str = "team") -> Team:
        """The team, as the actor may see it."""
        try:
            if text_problem(id_or_name, 200) is not None:
                raise NotFound  # no team has such a name (NUL breaks PostgreSQL)
            found = await self._backend.get_team(id_or_name)
        except NotFound:
            raise Unknown("team", field) from None
        if not actor.may_see(found.id):
            raise Unknown("team", field)
        return found

    async def key(self, key_id: str, *, actor: Actor = SYSTEM, field: str = "key_id") -> ApiKey:
        try:
            if text_problem(key_id, 200) is not None:
                raise NotFound
            found = await self._backend.get_key(key_id)
        except NotFound:
            raise Unknown("key", field) from None
        if not actor.may_see(found.team_id):
            raise Unknown("key", field)
        return found

    async def token(self, token_id: str, *, actor: Actor = SYSTEM) -> TeamToken:
        try:
            if text_problem(token_id, 200) is not None:
                raise NotFound
            found = await self._backend.get_token(token_id)
        except NotFound:
            raise Unknown("token", "token_id") from None
        if not actor.may_see(found.team_id):
            raise Unknown("token", "token_id")
        return found


def iso(ts: float | None) -> str | None:
    """RFC 3339 in UTC, whole seconds (four-digit years, also before 1000)."""
    if ts is None:
        return None
    moment = datetime.fromtimestamp(math.floor(ts), UTC)
    return moment.isoformat(timespec="seconds").replace("+00:00", "Z")
