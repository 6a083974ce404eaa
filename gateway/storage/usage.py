"""The store's side of usage counting and the request log: their Protocols
(re-exported by :mod:`gateway.storage`)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from gateway.models import UsageRow
from gateway.storage.types import (
    AuthFailureCount,
    KeyIpDay,
    KeyUsage,
    LoggedRequest,
    RequestEntry,
    RequestQuery,
    UsageBucket,
)

__all__ = ["RequestLogStore", "UsageStore"]


class UsageStore(Protocol):
    """Usage aggregates and the patterns anomaly detection reads, written in batches.

    Each batch write is all or nothing. It raises :class:`InvalidData` when
    the database refuses a value in it (the batch without that row may
    succeed) and :class:`StorageUnavailable` when the database cannot be used
    now.
    """

    async def add_usage(self, rows: list[UsageRow]) -> None:
        """Add to the per-minute counters; safe for many writers at once."""
        ...

    async def touch_keys(self, last_used: dict[str, float]) -> None:
        """Raise each key's ``last_used_at`` to the time given; no key change is logged."""
        ...

    async def usage_buckets(
        self, team_id: str, start: int, end: float, step: int, key_id: str | None
    ) -> list[UsageBucket]:
        """Requests and credits by bucket and outcome over minutes in [start, end).

        A minute falls in the bucket ``start + (minute - start) // step * step``.
        """
        ...

    async def usage_top_keys(
        self, team_id: str, start: int, end: float, limit: int
    ) -> list[KeyUsage]:
        """Each key's requests and credits over minutes in [start, end), busiest first."""
        ...

    async def add_key_ips(self, rows: list[tuple[int, str, str, str, int]]) -> None:
        """Add (day start, team id, key id, client IP, requests) rows to the daily counters."""
        ...

    async def key_ips(
        self, team_id: str, key_id: str | None, start_day: int, end_day: int
    ) -> list[KeyIpDay]:
        """Requests by day, key and client address for days in [start_day, end_day)."""
        ...

    async def add_auth_failures(self, rows: list[tuple[int, str, str, str, int]]) -> None:
        """Add (minute, key prefix or "", client IP, reason, count) rows to the counters."""
        ...

    async def auth_failure_counts(
        self, start: int, end: float, limit: int
    ) -> list[AuthFailureCount]:
        """Refusals by key prefix, address and reason over minutes in [start, end), most first."""
        ...

    async def roll_up_usage(self, before: int) -> int:
        """Fold the per-minute usage of every hour before ``before`` (rounded down to an
        hour) into one row an hour, at the hour's first second, per team, key, environment
        and outcome; returns how many minute rows went. Totals never change; a report by
        minute over those hours sees each hour's count at its start."""
        ...

    async def prune_patterns(self, ip_before: int, failures_before: int) -> int:
        """Delete key-IP days before ``ip_before`` and failure minutes before
        ``failures_before`` (client IPs are personal data); returns rows deleted."""
        ...


class RequestLogStore(Protocol):
    """The request log: written in batches off the request path, searched per team."""

    async def add_requests(self, entries: Sequence[RequestEntry]) -> None:
        """Append a batch (all or nothing; InvalidData for a value the database refuses)."""
        ...

    async def find_requests(self, query: RequestQuery) -> list[LoggedRequest]:
        """One team's rows matching the query, newest first (by time, then id)."""
        ...

    async def prune_requests(self, before: float, max_rows_per_team: int, batch: int) -> int:
        """Delete rows older than ``before`` and each team's oldest beyond its
        maximum, ``batch`` rows per statement; returns how many were deleted."""
        ...
