"""Reads: lists (teams, keys, tokens, the audit log), usage reports, authentication failures.

A team token sees its own team only; anything else answers as if it did not exist.
"""

from __future__ import annotations

import math

from gateway.caps import Calendar
from gateway.manage._core import Core, iso
from gateway.manage.actors import SYSTEM, Actor
from gateway.manage.bounds import GRANULARITY, LIST_MAX, MAX_BUCKETS
from gateway.manage.inputs import Check, InputError, id_cursor
from gateway.models import ApiKey, AuditEntry, Team, TeamToken
from gateway.storage import AuthFailureCount

__all__ = ["Reads", "usage_range"]


def _limit(limit: int) -> None:
    check = Check()
    check.integer("limit", limit, 1, LIST_MAX)
    check.done()


def usage_range(
    granularity: str, start: float | None, end: float | None, now: float, buckets: int | None = None
) -> tuple[float, float, int]:
    """(start, end, step) of a usage report: at most MAX_BUCKETS buckets, start before end.

    A longer range starts later (the report's "from" says where).
    """
    check = Check()
    check.choice("granularity", granularity, tuple(GRANULARITY))
    check.integer("buckets", buckets, 1, MAX_BUCKETS)
    check.done()
    step = GRANULARITY[granularity]
    end = now if end is None else end
    start = end - step * (buckets or 24) if start is None else start
    if start >= end:
        raise InputError.field("from", "must be before 'to'")
    return max(start, end - MAX_BUCKETS * step), end, step


class Reads(Core):
    async def teams(
        self, limit: int = 100, after: str | None = None, *, actor: Actor = SYSTEM
    ) -> list[Team]:
        _limit(limit)
        after = id_cursor(after, "team")
        if actor.team_id is not None:
            own = await self.team(actor.team_id, actor=actor)
            return [own] if after is None or after < own.id else []
        return await self._backend.list_teams(limit, after)

    async def keys(
        self, team: str, limit: int = 100, after: str | None = None, *, actor: Actor = SYSTEM
    ) -> list[ApiKey]:
        _limit(limit)
        after = id_cursor(after, "key")
        owner = await self.team(team, actor=actor)
        return await self._backend.list_keys(owner.id, limit, after)

    async def key_spending(self, keys: list[ApiKey]) -> dict[str, tuple[int, int]]:
        """What each capped key of ``keys`` has spent today and this month (UTC, on the
        plans' clock); keys without a cap are left out. The keys were read with the
        caller's rights already."""
        capped = [k.id for k in keys if k.credit_cap_per_day or k.credit_cap_per_month]
        if not capped:
            return {}
        now = Calendar(self._plan_clock_offset).periods()
        found = await self._backend.key_spending(capped, [now.day, now.month])
        return {k: (found.get((k, now.day), 0), found.get((k, now.month), 0)) for k in capped}

    async def tokens(
        self, team: str, limit: int = 100, after: str | None = None, *, actor: Actor = SYSTEM
    ) -> list[TeamToken]:
        _limit(limit)
        after = id_cursor(after, "tok")
        owner = await self.team(team, actor=actor)
        return await self._backend.list_tokens(owner.id, limit, after)

    async def audit(
        self,
        team: str | None = None,
        limit: int = 100,
        before: int | None = None,
        *,
        actor: Actor = SYSTEM,
    ) -> list[AuditEntry]:
        """Newest first; a team token reads its own team's entries, whatever it asks for."""
        _limit(limit)
        team_id = actor.team_id
        if team_id is None and team:
            team_id = (await self.team(team, actor=actor)).id
        return await self._backend.list_audit(team_id, limit, before)

    async def usage(
        self,
        team: str,
        start: float,
        end: float,
        step: int,
        key_id: str | None = None,
        *,
        actor: Actor = SYSTEM,
    ) -> dict[str, object]:
        """Requests per bucket by outcome, credits charged, and the busiest keys."""
        owner = await self.team(team, actor=actor)
        if key_id is not None:
            key = await self.key(key_id, actor=actor)
            if key.team_id != owner.id:
                raise InputError(404, "No such key", [{"field": "key_id", "problem": "not found"}])
        first = int(start // step * step)
        rows = await self._backend.usage_buckets(owner.id, first, end, step, key_id)
        counts: dict[int, dict[str, int]] = {}
        credits: dict[int, int] = {}
        totals: dict[str, int] = {}
        for row in rows:
            per_outcome = counts.setdefault(row.start, {})
            per_outcome[row.outcome] = per_outcome.get(row.outcome, 0) + row.requests
            credits[row.start] = credits.get(row.start, 0) + row.credits
            totals[row.outcome] = totals.get(row.outcome, 0) + row.requests
        buckets = [
            {
                "start": iso(b),
                "requests": counts.get(b, {}),
                "total": sum(counts.get(b, {}).values()),
                "credits": credits.get(b, 0),
            }
            for b in range(first, math.ceil(end), step)
        ]
        top = await self._backend.usage_top_keys(owner.id, first, end, 10)
        return {
            "from": iso(start),
            "to": iso(end),
            "buckets": buckets,
            "totals": {
                "requests": totals,
                "total": sum(totals.values()),
                "credits": sum(credits.values()),
            },
            "top_keys": [
                {"key": k.key_id, "requests": k.requests, "credits": k.credits} for k in top
            ],
        }

    async def auth_failures(
        self, start: float, end: float, limit: int, *, actor: Actor = SYSTEM
    ) -> list[AuthFailureCount]:
        actor.require_admin("read other teams' authentication failures")
        _limit(limit)
        return await self._backend.auth_failure_counts(int(start), end, limit)
