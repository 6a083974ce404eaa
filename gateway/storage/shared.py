"""The public methods whose arguments both backends take the same way, written once.

Each gathers its arguments into one value and hands it to a small method of the
backend that only does the I/O in its dialect (``_insert_key``, ``_apply_grant``,
``_complete_idempotency``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from gateway.models import ApiKey, Environment, Team
from gateway.storage import KEY_LIMIT_FIELDS, Audit, GrantResult

__all__ = ["KEY_INSERT_COLUMNS", "GrantOrder", "NewKey", "SharedMethods"]

_TEAMS_A_PAGE = 500


@dataclass(frozen=True, slots=True)
class NewKey:
    """A key to create, as :meth:`Store.create_key` was given it."""

    team_id: str
    name: str
    environment: Environment
    key_hash: str
    prefix: str
    rate_limit_per_minute: int | None
    expires_at: float | None
    # Caps and quotas, in KEY_LIMIT_FIELDS' order (None: not set).
    limits: tuple[int | None, ...] = (None,) * len(KEY_LIMIT_FIELDS)

    def columns(self) -> tuple[object, ...]:
        """(team_id, name, prefix, key_hash, environment, rate_limit_per_minute, then
        the KEY_LIMIT_FIELDS), as inserted (see KEY_INSERT_COLUMNS)."""
        return (
            self.team_id,
            self.name,
            self.prefix,
            self.key_hash,
            self.environment,
            self.rate_limit_per_minute,
            *self.limits,
        )


# The columns NewKey.columns() fills, in its order.
KEY_INSERT_COLUMNS = (
    "team_id, name, prefix, key_hash, environment, rate_limit_per_minute, "
    + ", ".join(KEY_LIMIT_FIELDS)
)


@dataclass(frozen=True, slots=True)
class GrantOrder:
    """A grant or adjustment, as :meth:`Ledger.apply_grant` was given it."""

    team_id: str
    environment: Environment
    amount: int
    reason: str
    actor: str
    idempotency_key: str | None
    request_hash: str | None

    def entry(self, balance_after: int) -> tuple[object, ...]:
        """The values of its credit entry, in the order both backends insert them.

        (team_id, environment, kind, amount, reason, actor, idempotency_key,
        request_hash, balance_after)
        """
        kind = "grant" if self.amount >= 0 else "adjust"
        return (
            self.team_id,
            self.environment,
            kind,
            self.amount,
            self.reason,
            self.actor,
            self.idempotency_key,
            self.request_hash,
            balance_after,
        )


class SharedMethods:
    """Mixed into each backend; the backend supplies the underscored I/O methods."""

    async def create_key(
        self,
        team_id: str,
        name: str,
        environment: Environment,
        key_hash: str,
        prefix: str,
        rate_limit_per_minute: int | None,
        expires_at: float | None,
        *,
        limits: Mapping[str, int | None] | None = None,
        audit: Audit[ApiKey] | None = None,
    ) -> ApiKey:
        given = limits or {}
        new = NewKey(
            team_id, name, environment, key_hash, prefix, rate_limit_per_minute, expires_at,
            tuple(given.get(field) for field in KEY_LIMIT_FIELDS),
        )  # fmt: skip
        return await self._insert_key(new, audit)

    async def _insert_key(self, new: NewKey, audit: Audit[ApiKey] | None) -> ApiKey:
        raise NotImplementedError

    # Where this process's last whole pass of roll_up_usage ended: the next pass starts
    # there, not at the table's first hour (usage is only ever written for the present).
    _usage_folded_before = 0

    async def roll_up_usage(self, before: int) -> int:
        # Team by team (the primary key starts with the team), a day at a time, each
        # fold its own transaction: a first run over years of minutes stays in small steps.
        before -= before % 3600
        since = min(self._usage_folded_before, before)
        folded = 0
        after: str | None = None
        while teams := await self.list_teams(_TEAMS_A_PAGE, after):
            for team in teams:
                # (A minute to fold is never 0: minute 0 is an hour's own row.)
                while first := await self._first_minute_to_fold(team.id, before, since):
                    day_ends = first - first % 86_400 + 86_400
                    folded += await self._fold_minutes(team.id, first, min(day_ends, before))
            after = teams[-1].id
        self._usage_folded_before = before
        return folded

    async def list_teams(self, limit: int, after: str | None) -> list[Team]:
        raise NotImplementedError

    async def _first_minute_to_fold(self, team_id: str, before: int, since: int) -> int | None:
        raise NotImplementedError

    async def _fold_minutes(self, team_id: str, start: int, end: int) -> int:
        """Fold the team's minute rows in [start, end) (``end`` a whole hour) into their
        hours' rows; returns how many went."""
        raise NotImplementedError

    async def grant(
        self,
        team_id: str,
        environment: Environment,
        amount: int,
        reason: str,
        actor: str,
        idempotency_key: str | None = None,
    ) -> int:
        result = await self.apply_grant(
            team_id, environment, amount, reason, actor, idempotency_key
        )
        return result.balance

    async def apply_grant(
        self,
        team_id: str,
        environment: Environment,
        amount: int,
        reason: str,
        actor: str,
        idempotency_key: str | None = None,
        request_hash: str | None = None,
        *,
        audit: Audit[GrantResult] | None = None,
    ) -> GrantResult:
        order = GrantOrder(
            team_id, environment, amount, reason, actor, idempotency_key, request_hash
        )
        return await self._apply_grant(order, audit)

    async def _apply_grant(
        self, order: GrantOrder, audit: Audit[GrantResult] | None
    ) -> GrantResult:
        raise NotImplementedError

    async def complete_idempotency(
        self,
        team_id: str,
        environment: Environment,
        key: str,
        body_hash: str,
        status: int,
        content_type: str | None,
        body: bytes | None,
    ) -> None:
        answer = (body_hash, status, content_type, body)
        await self._complete_idempotency((team_id, environment, key), answer)

    async def _complete_idempotency(
        self,
        record: tuple[str, str, str],
        answer: tuple[str, int, str | None, bytes | None],
    ) -> None:
        """Complete the in-flight record (team, environment, key) with (body_hash,
        status, content_type, body)."""
        raise NotImplementedError
