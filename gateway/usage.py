"""Usage counting off the request path: per-minute aggregates flushed in batches.

Each request adds to an in-memory counter keyed by (minute, team, key,
environment, outcome); a background loop writes the counters and the keys'
``last_used_at`` every few seconds. No request writes to the database for usage.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Protocol

from gateway.models import KeyRecord, UsageRow

__all__ = ["UsageRecorder", "UsageSink"]

log = logging.getLogger("gateway.usage")
_Bucket = tuple[int, str, str, str, str]
# Counters kept while the store is down, before the oldest are dropped (and logged).
_MAX_BUCKETS = 200_000


class UsageSink(Protocol):
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
        row = (int(time.time() // 86400 * 86400), key.team_id, key.id, client_ip)
        count = self._ips.get(row)
        if count is not None:
            self._ips[row] = count + 1
        elif len(self._ips) < _MAX_BUCKETS:
            self._ips[row] = 1

    def record_auth_failure(self, prefix: str | None, client_ip: str, reason: str) -> None:
        row = (int(time.time() // 60 * 60), prefix or "", client_ip, reason)
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
        counts, self._counts = self._counts, {}
        last_used, self._last_used = self._last_used, {}
        if counts:
            rows = [
                UsageRow(minute, team, key, "live" if env == "live" else "test", outcome, n, c)
                for (minute, team, key, env, outcome), (n, c) in counts.items()
            ]
            try:
                await self._sink.add_usage(rows)
            except Exception as exc:
                log.warning("writing %d usage counters failed, will retry: %s", len(rows), exc)
                self._merge_back(counts)
        ips, self._ips = self._ips, {}
        if ips:
            try:
                await self._sink.add_key_ips([(*row, n) for row, n in ips.items()])
            except Exception as exc:
                log.warning("writing client addresses failed, will retry: %s", exc)
                for row, n in ips.items():
                    self._ips[row] = self._ips.get(row, 0) + n
        failures, self._failures = self._failures, {}
        if failures:
            try:
                await self._sink.add_auth_failures([(*row, n) for row, n in failures.items()])
            except Exception as exc:
                log.warning("writing auth failure counts failed, will retry: %s", exc)
                for row, n in failures.items():
                    self._failures[row] = self._failures.get(row, 0) + n
        if last_used:
            try:
                await self._sink.touch_keys(last_used)
            except Exception as exc:
                log.warning("updating last_used_at failed, will retry: %s", exc)
                for key_id, at in last_used.items():
                    self._last_used[key_id] = max(at, self._last_used.get(key_id, 0.0))

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
