"""Team and team-token actions."""

from __future__ import annotations

from dataclasses import dataclass

from gateway.keys import display_prefix, generate_token
from gateway.manage._core import Core
from gateway.manage.actors import SYSTEM, Actor
from gateway.manage.audit import audit
from gateway.manage.bounds import NAME_MAX, QUOTA_MAX, RATE_LIMIT_MAX
from gateway.manage.events import token_event
from gateway.manage.inputs import Check
from gateway.models import Team, TeamToken

__all__ = ["TEAM_QUOTA_FIELDS", "CreatedToken", "TeamActions"]

# A team's calendar request quotas, shared by all its keys (see gateway/caps.py).
TEAM_QUOTA_FIELDS = ("quota_per_day", "quota_per_month")


@dataclass(frozen=True, slots=True)
class CreatedToken:
    token: TeamToken
    secret: str  # shown once, never again


class TeamActions(Core):
    async def create_team(
        self, name: str, rate_limit_per_minute: int | None = None, *, actor: Actor = SYSTEM
    ) -> Team:
        actor.require_admin("create teams")
        check = Check()
        check.text("name", name, NAME_MAX)
        check.integer("rate_limit_per_minute", rate_limit_per_minute, 1, RATE_LIMIT_MAX)
        check.done()
        return await self._backend.create_team(
            name, rate_limit_per_minute,
            audit=audit(actor, "team.create", lambda team: (team.id, team.id, {"name": name})),
        )  # fmt: skip

    async def update_team(
        self, team: str, rate_limit_per_minute: int | None, *, actor: Actor = SYSTEM
    ) -> Team:
        check = Check()
        check.integer("rate_limit_per_minute", rate_limit_per_minute, 1, RATE_LIMIT_MAX)
        check.done()
        owner = await self.team(team, actor=actor)
        said = (owner.id, owner.id, {"rate_limit_per_minute": rate_limit_per_minute})
        with self._changing(team_id=owner.id):
            return await self._backend.update_team(
                owner.id, rate_limit_per_minute, audit=audit(actor, "team.update", lambda _: said)
            )

    async def set_team_quotas(
        self, team: str, changes: dict[str, int | None], *, actor: Actor = SYSTEM
    ) -> Team:
        """Change ``quota_per_day`` and/or ``quota_per_month`` (None clears one); the
        other keeps its value."""
        check = Check()
        for name in sorted(set(changes) - set(TEAM_QUOTA_FIELDS)):
            check.unknown(name)
        check.counts(changes, dict.fromkeys(TEAM_QUOTA_FIELDS, QUOTA_MAX))
        check.done()
        # A team's quota is the provider's to set, not something its own token may raise.
        actor.require_admin("change a team's quotas")
        owner = await self.team(team, actor=actor)
        day = changes.get("quota_per_day", owner.quota_per_day)
        month = changes.get("quota_per_month", owner.quota_per_month)
        said = (owner.id, owner.id, dict(changes))
        with self._changing(team_id=owner.id):
            return await self._backend.update_team_quotas(
                owner.id, day, month, audit=audit(actor, "team.update", lambda _: said)
            )

    async def create_token(self, team: str, name: str, *, actor: Actor = SYSTEM) -> CreatedToken:
        check = Check()
        check.text("name", name, NAME_MAX)
        check.done()
        owner = await self.team(team, actor=actor)
        actor.require_admin("create management tokens")
        secret = generate_token()
        token = await self._backend.create_token(
            owner.id, name, self.hash(secret), display_prefix(secret),
            audit=audit(actor, "token.create", lambda made: (made.id, owner.id, {"name": name}),
                        tells=lambda made: token_event("token.created", made)),
        )  # fmt: skip
        return CreatedToken(token, secret)

    async def revoke_token(self, token_id: str, *, actor: Actor = SYSTEM) -> TeamToken:
        token = await self.token(token_id, actor=actor)
        return await self._backend.revoke_token(
            token.id,
            audit=audit(actor, "token.revoke", lambda _: (token.id, token.team_id, {}),
                        tells=lambda made: token_event("token.revoked", made)),
        )  # fmt: skip

    async def find_token(self, secret: str) -> TeamToken | None:
        return await self._backend.find_token(self.hash(secret))
