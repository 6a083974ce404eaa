"""Usage counting off the request path: per-minute aggregates flushed in batches.

Each request adds to an in-memory counter keyed by (minute, team, key,
environment, outcome); a background loop writes the counters and the keys'
``last_used_at`` every few seconds. No request writes to the database for usage.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import astuple
from typing import Protocol, TypeVar

from gateway.models import KeyRecord, UsageRow
from gateway.storage import InvalidData
from gateway.text import safe_text

__all__ = ["UsageRecorder", "UsageSink", "write_batch"]

log = logging.getLogger("gateway.usage")
_Bucket = tuple[int, str, str, str, str]
# Counters kept while the store is down, before the oldest are dropped (and logged).
_MAX_BUCKETS = 200_000
# Client text is bounded before it is buffered: an address (IPv6 with a zone
# fits in 100) comes from X-Forwarded-For behind a trusted proxy, unchecked,
# and a display prefix of 14 characters is at most 14 escapes of 10.
_MAX_ADDRESS = 100
_MAX_PREFIX = 140
_MAX_ERROR = 300
R = TypeVar("R")


class UsageSink(Protocol):
    """Where batches go (a :class:`gateway.storage.UsageStore`): each write is all or
    nothing and raises :class:`InvalidData` for a value the database refuses."""

    async def add_usage(self, rows: list[UsageRow]) -> None: ...

    async def touch_keys(self, last_used: dict[str, float]) -> None: ...

    async def add_key_ips(self, rows: list[tuple[int, str, str, str, int]]) -> None: ...

    async def add_auth_failures(self, rows: list[tuple[int, str, str, str, int]]) -> None: ...


class UsageRecorder:
    def __init__(
        self, sink: UsageSink, interval_seconds: float, *, client_ips: bool = True
    ) -> None:
        self._sink = sink
        self._interval = interval_seconds
        self._client_ips = client_ips
        self._counts: dict[_Bucket, list[int]] = {}
        self._last_used: dict[str, float] = {}
        self._ips: dict[tuple[int, str, str, str], int] = {}
        self._failures: dict[tuple[int, str, str, str], int] = {}
        self.dropped = 0

    def record_ip(self, key: KeyRecord, client_ip: str) -> None:
        """Remember that ``key`` was used from ``client_ip`` today (if switched on)."""
        if not self._client_ips or not client_ip:
            return
        day = int(time.time() // 86400 * 86400)
        row = (day, key.team_id, key.id, safe_text(client_ip, _MAX_ADDRESS))
        count = self._ips.get(row)
        if count is not None:
            self._ips[row] = count + 1
        elif len(self._ips) < _MAX_BUCKETS:
            self._ips[row] = 1

    def record_auth_failure(self, prefix: str | None, client_ip: str, reason: str) -> None:
        """Count one refused credential; ``prefix`` and ``client_ip`` are the client's text."""
        row = (
            int(time.time() // 60 * 60),
            safe_text(prefix, _MAX_PREFIX) if prefix else "",
            safe_text(client_ip, _MAX_ADDRESS),
            reason,
        )
        count = self._failures.get(row)
        if count is not None:
            self._failures[row] = count + 1
        elif len(self._failures) < _MAX_BUCKETS:
            self._failures[row] = 1

    def record(self, key: KeyRecord, outcome: str, credits: int, used: bool) -> None:
        """Count one request of ``key``; ``used`` when it got past authentication."""
        now = time.time()
        bucket = (int(now // 60 * 60), key.team_id, key.id, key.environment, outcome)
        counter = self._counts.get(bucket)
        if counter is None:
            self._counts[bucket] = [1, credits]
        else:
            counter[0] += 1
            counter[1] += credits
        if used:
            self._last_used[key.id] = now

    async def flush(self) -> None:
        """Write what was counted; keep what the database could not take for the next flush.

        A row the database refuses (:class:`InvalidData`) is dropped with a
        warning and the rest of its batch written; any other failure keeps the
        whole batch for the next flush.
        """
        counts, self._counts = self._counts, {}
        last_used, self._last_used = self._last_used, {}
        if counts:
            rows = [
                UsageRow(minute, team, key, "live" if env == "live" else "test", outcome, n, c)
                for (minute, team, key, env, outcome), (n, c) in counts.items()
            ]
            unwritten = await write_batch("usage counters", self._sink.add_usage, rows, astuple)
            self._merge_back({_bucket(row): [row.requests, row.credits] for row in unwritten})
        ips, self._ips = self._ips, {}
        if ips:
            ip_rows = [(*row, n) for row, n in ips.items()]
            for day, team, key, ip, n in await write_batch(
                "client addresses", self._sink.add_key_ips, ip_rows, tuple
            ):
                self._ips[day, team, key, ip] = self._ips.get((day, team, key, ip), 0) + n
        failures, self._failures = self._failures, {}
        if failures:
            failure_rows = [(*row, n) for row, n in failures.items()]
            for minute, prefix, ip, why, n in await write_batch(
                "auth failure counts", self._sink.add_auth_failures, failure_rows, tuple
            ):
                row = (minute, prefix, ip, why)
                self._failures[row] = self._failures.get(row, 0) + n
        if last_used:
            kept = await write_batch(
                "last_used_at times", self._touch_keys, list(last_used.items()), tuple
            )
            for key_id, at in kept:
                self._last_used[key_id] = max(at, self._last_used.get(key_id, 0.0))

    async def _touch_keys(self, items: list[tuple[str, float]]) -> None:
        await self._sink.touch_keys(dict(items))

    def _merge_back(self, counts: dict[_Bucket, list[int]]) -> None:
        for bucket, (n, c) in counts.items():
            counter = self._counts.setdefault(bucket, [0, 0])
            counter[0] += n
            counter[1] += c
        while len(self._counts) > _MAX_BUCKETS:
            self._counts.pop(next(iter(self._counts)))
            self.dropped += 1

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self._interval)
            try:
                await self.flush()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("usage flush failed; will try again")


def _bucket(row: UsageRow) -> _Bucket:
    return (row.minute, row.team_id, row.key_id, row.environment, row.outcome)


async def write_batch(
    what: str,
    write: Callable[[list[R]], Awaitable[None]],
    rows: list[R],
    fields: Callable[[R], Iterable[object]],
) -> list[R]:
    """Write ``rows``; return those to try again at the next flush.

    A batch the database refuses is halved until each refused row is alone,
    and that row is dropped: k bad rows among n cost about 2k*log2(n) writes,
    and one bad row can no longer hold back every other (or be retried forever).
    """
    try:
        await write(rows)
    except InvalidData as exc:
        if len(rows) == 1:
            log.warning(
                "dropped one of the %s, which the database refused: %s (%s)",
                what,
                safe_text(", ".join(map(str, fields(rows[0]))), _MAX_ERROR),
                safe_text(str(exc), _MAX_ERROR),
            )
            return []
        half = len(rows) // 2
        unwritten = await write_batch(what, write, rows[:half], fields)
        if unwritten:  # the database went away meanwhile: the other half waits too
            return unwritten + rows[half:]
        return await write_batch(what, write, rows[half:], fields)
    except Exception as exc:
        log.warning(
            "writing %d %s failed, will retry: %s", len(rows), what, safe_text(str(exc), _MAX_ERROR)
        )
        return rows
    return []
