"""The request log's writer: a row per request with a known key, written in batches.

A request only appends a tuple of what it already knows to a buffer; the
background loop makes the client's text safe and bounded, and writes the batch
(COPY on PostgreSQL). A full buffer (the database away for long) drops new
rows and counts them: the log never slows or blocks a request.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Protocol

from gateway.models import KeyRecord
from gateway.storage import RequestEntry
from gateway.text import safe_text
from gateway.usage import write_batch

__all__ = ["RequestLog", "RequestSink"]

log = logging.getLogger("gateway.request_log")

# Rows kept while the database is away, and written per statement.
MAX_BUFFERED = 100_000
BATCH_ROWS = 2_000
_MAX_PATH = 512
_MAX_USER_AGENT = 200
# Pruning runs this often; each statement deletes at most this many rows.
PRUNE_INTERVAL_SECONDS = 300.0
PRUNE_BATCH = 5_000

# Rows are turned into entries this many at a time, the loop let go between:
# a flush never holds the event loop for more than a few milliseconds.
CHUNK_ROWS = 1_000

# What a request leaves: (at, team id, key id, key prefix, environment, request id,
# method, route, target, status, outcome, credits, client ip, user agent, duration
# ms); the target and user agent still raw, the client address already made safe by
# the pipeline. Only strings and numbers: the collector stops tracking such a tuple
# at its first pass, so a full buffer adds nothing to later collections.
_Raw = tuple[float, str, str, str, str, str, str, str, str, int, str, int, str, str, float]


class RequestSink(Protocol):
    """Where batches go (a :class:`gateway.storage.RequestLogStore`)."""

    async def add_requests(self, entries: list[RequestEntry]) -> None: ...

    async def prune_requests(self, before: float, max_rows_per_team: int, batch: int) -> int: ...


class RequestLog:
    def __init__(
        self,
        sink: RequestSink,
        interval_seconds: float,
        retention_days: int,
        max_rows_per_team: int,
    ) -> None:
        self._sink = sink
        self._interval = interval_seconds
        self._retention_seconds = retention_days * 86_400
        self._max_rows_per_team = max_rows_per_team
        self._rows: list[_Raw] = []
        # Rows a flush could not write (the database away), already made safe.
        self._retry: list[RequestEntry] = []
        self.dropped = 0

    def record(
        self,
        key: KeyRecord,
        request_id: str,
        method: str,
        route: str,
        path: str,
        status: int,
        outcome: str,
        credits: int,
        client_ip: str,
        user_agent: str,
        duration_ms: float,
    ) -> None:
        """Remember one finished request of ``key`` (cheap: no text is touched here)."""
        if len(self._rows) + len(self._retry) >= MAX_BUFFERED:
            self.dropped += 1
            return
        self._rows.append(
            (time.time(), key.team_id, key.id, key.prefix, key.environment, request_id, method,
             route, path, status, outcome, credits, client_ip, user_agent, duration_ms)
        )  # fmt: skip

    @property
    def buffered(self) -> int:
        return len(self._rows) + len(self._retry)

    async def flush(self) -> None:
        """Write what was buffered; keep what the database could not take for the next flush."""
        rows, self._rows = self._rows, []
        entries, self._retry = self._retry, []
        for start in range(0, len(rows), CHUNK_ROWS):
            entries += [_entry(raw) for raw in rows[start : start + CHUNK_ROWS]]
            await asyncio.sleep(0)
        for start in range(0, len(entries), BATCH_ROWS):
            self._retry += await write_batch(
                "request log rows", self._write, entries[start : start + BATCH_ROWS], tuple
            )

    async def _write(self, entries: list[RequestEntry]) -> None:
        await self._sink.add_requests(entries)

    async def prune(self) -> int:
        before = time.time() - self._retention_seconds
        return await self._sink.prune_requests(before, self._max_rows_per_team, PRUNE_BATCH)

    async def run(self) -> None:
        last_prune = 0.0
        while True:
            await asyncio.sleep(self._interval)
            try:
                await self.flush()
                if time.monotonic() - last_prune >= PRUNE_INTERVAL_SECONDS:
                    last_prune = time.monotonic()
                    deleted = await self.prune()
                    if deleted:
                        log.info("pruned %d request log rows", deleted)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("request log flush failed; will try again")


def _entry(raw: _Raw) -> RequestEntry:
    # The query string is left out: clients put tokens and personal data there.
    at, team, key, prefix, env, request_id, method, route, path, status, outcome, credits = raw[:12]
    ip, agent, ms = raw[12:]
    return RequestEntry(
        at, team, key, prefix, env, request_id, method, route,
        safe_text(path.partition("?")[0], _MAX_PATH), status, outcome, credits,
        ip, safe_text(agent, _MAX_USER_AGENT), round(ms, 3),
    )  # fmt: skip
