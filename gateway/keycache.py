"""In-process key cache: hash → key record, with a separate negative cache.

Anyone can forge a key with a valid checksum, so unknown hashes live in their
own bounded cache and can never push real keys out. Changes made by any
process reach the cache through the store's change feed; while the feed is
unreachable, entries older than one second are looked up again. Changes made
through this process's management service reach it at once
(:meth:`KeyCache.on_key_changed`).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import sys
import time
from collections.abc import Awaitable, Callable

from gateway.config import KeySettings
from gateway.metrics import Metrics
from gateway.models import KeyRecord
from gateway.storage import KeyChange, StorageError, Store

__all__ = ["MISS", "CacheMiss", "KeyCache"]

log = logging.getLogger("gateway.keycache")
_UNFOLLOWED_TTL = 1.0
# Distinct rate limits kept as shared objects; a deployment has a handful.
_MAX_SHARED_LIMITS = 1024
Subscribe = Callable[
    [Callable[[KeyChange], None], Callable[[], None], Callable[[], None]], Awaitable[None]
]


class CacheMiss:
    """The cache knows nothing about a hash."""


MISS = CacheMiss()


def _compact(key_hash: str) -> bytes | str:
    """The hash as bytes when it is hex (every real one is); else as given."""
    try:
        return bytes.fromhex(key_hash)
    except ValueError:
        return key_hash


def _retrieve(task: asyncio.Task[KeyRecord | None]) -> None:
    # Every waiter may have left; read the exception so asyncio does not warn about it.
    if not task.cancelled():
        task.exception()


class KeyCache:
    def __init__(
        self,
        store: Store,
        settings: KeySettings,
        clock: Callable[[], float] = time.monotonic,
        metrics: Metrics | None = None,
        backend_name: str = "store",
    ) -> None:
        self._store = store
        self._metrics = metrics if metrics is not None else Metrics()
        self._backend_name = backend_name
        self._settings = settings
        self._clock = clock
        # Keyed by the hash's 32 bytes rather than its 64 hex digits: 48 bytes a key.
        self._positive: dict[bytes | str, KeyRecord] = {}
        self._negative: dict[str, float] = {}
        self._inflight: dict[str, asyncio.Task[KeyRecord | None]] = {}
        self._limits: dict[int, int] = {}
        self._generation = 0
        self._seq = 0
        self.following = False
        self.hits = 0
        self.misses = 0
        self._hit = self._metrics.key_cache.labels("hit")
        self._miss = self._metrics.key_cache.labels("miss")

    def __len__(self) -> int:
        return len(self._positive)

    async def lookup(self, key_hash: str) -> KeyRecord | None:
        """The key's record, or ``None`` if no such key exists.

        Raises :class:`StorageError` only when the store is down and nothing
        (not even a stale entry) is known about this hash.
        """
        found = self.cached(key_hash)
        if not isinstance(found, CacheMiss):
            return found
        return await self.load(key_hash)

    def cached(self, key_hash: str) -> KeyRecord | CacheMiss | None:
        """What memory knows: a record, ``None`` (known unknown), or ``MISS``."""
        now = self._clock()
        entry = self._positive.get(_compact(key_hash))
        ttl = self._settings.cache_ttl_seconds if self.following else _UNFOLLOWED_TTL
        if entry is not None and now - entry.loaded_at < ttl:
            self.hits += 1
            self._hit.inc()
            return entry
        if entry is None:
            until = self._negative.get(key_hash)
            if until is not None and now < until:
                self.hits += 1
                self._hit.inc()
                return None
        return MISS

    def loading(self, key_hash: str) -> bool:
        """True while a store lookup of this hash is under way (others just wait for it)."""
        return key_hash in self._inflight

    async def load(self, key_hash: str) -> KeyRecord | None:
        """Ask the store (after :meth:`cached` said ``MISS``)."""
        self.misses += 1
        self._miss.inc()
        try:
            return await self._fetch(key_hash)
        except StorageError:
            entry = self._positive.get(_compact(key_hash))
            if entry is not None:  # stale-if-error: cached keys keep working
                return entry
            raise

    async def _fetch(self, key_hash: str) -> KeyRecord | None:
        # One lookup per hash however many requests wait for it, in a task of its
        # own so that a caller that goes away cannot cancel it for the others.
        task = self._inflight.get(key_hash)
        if task is None:
            task = asyncio.create_task(self._load(key_hash))
            task.add_done_callback(_retrieve)
            self._inflight[key_hash] = task
        return await asyncio.shield(task)

    async def _load(self, key_hash: str) -> KeyRecord | None:
        generation = self._generation
        try:
            with self._metrics.backend_call(self._backend_name, "find_key"):
                record = await self._store.find_key(key_hash)
        finally:
            # An invalidation may have let a newer lookup of this hash take the slot.
            if self._inflight.get(key_hash) is asyncio.current_task():
                del self._inflight[key_hash]
        if generation == self._generation:  # no invalidation raced this lookup
            return self._remember(key_hash, record)
        return record

    def _remember(self, key_hash: str, record: KeyRecord | None) -> KeyRecord | None:
        """Cache what the store said; returns the record as cached (callers use that one)."""
        now = self._clock()
        if record is None:
            negative = self._negative
            if len(negative) >= self._settings.negative_cache_size:
                negative.pop(next(iter(negative)))
            negative[key_hash] = now + self._settings.negative_cache_ttl_seconds
            return None
        positive = self._positive
        slot = _compact(key_hash)
        positive.pop(slot, None)
        # Every row read brings its own copies of the team id, environment and
        # limits; many keys share them, so one copy of each is kept (the cache's
        # memory is per key: about 1/10 less with 100,000 keys). The requests
        # that waited for this lookup get this copy too, so that what they leave
        # behind (anomaly signals keep the team id) shares it as well.
        record = dataclasses.replace(
            record,
            team_id=sys.intern(record.team_id),
            environment="live" if record.environment == "live" else "test",
            rate_limit_per_minute=self._shared(record.rate_limit_per_minute),
            team_rate_limit_per_minute=self._shared(record.team_rate_limit_per_minute),
            loaded_at=now,
        )
        if len(positive) >= self._settings.cache_size:
            positive.pop(next(iter(positive)))
        positive[slot] = record
        return record

    def _shared(self, limit: int | None) -> int | None:
        # Python keeps one copy of each int only up to 256; a limit of 1,000 read
        # for 100,000 keys would otherwise be 100,000 objects of 28 bytes.
        if limit is None:
            return None
        if len(self._limits) >= _MAX_SHARED_LIMITS:
            return limit
        return self._limits.setdefault(limit, limit)

    def invalidate(self, key_hash: str) -> None:
        self._generation += 1
        self._positive.pop(_compact(key_hash), None)
        self._negative.pop(key_hash, None)
        # A lookup under way may have read the row before the change: whoever asks
        # from now on starts a lookup of its own instead of waiting for that answer.
        self._inflight.pop(key_hash, None)

    def invalidate_team(self, team_id: str) -> None:
        self._generation += 1
        for key_hash in [h for h, r in self._positive.items() if r.team_id == team_id]:
            del self._positive[key_hash]
        # Whose keys the lookups under way are is not known until they answer.
        self._inflight.clear()

    def on_key_changed(self, key_hash: str | None, team_id: str | None) -> None:
        """Forget what a change made stale: one key (by hash), or every key of a team."""
        if key_hash is not None:
            self.invalidate(key_hash)
        if team_id is not None:
            self.invalidate_team(team_id)

    def clear(self) -> None:
        self._generation += 1
        self._positive.clear()
        self._negative.clear()
        self._inflight.clear()

    async def start_following(self) -> None:
        """Remember where the change feed is now; call before serving."""
        self._seq = await self._store.latest_key_change()
        self.following = True

    async def poll_once(self) -> int:
        """Apply the changes since the last poll; returns how many there were."""
        seq, changes, gap = await self._store.key_changes_since(self._seq)
        if gap:
            self.clear()
        for change in changes:
            self.on_key_changed(change.key_hash, change.team_id)
        self._seq = seq
        return len(changes)

    async def follow(self) -> None:
        """Poll the change feed forever (SQLite); cancel to stop."""
        interval = self._settings.invalidation_poll_seconds
        while True:
            try:
                if not self.following:
                    # After an outage notifications may have been missed: start clean.
                    await self.start_following()
                    self.clear()
                await self.poll_once()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if self.following:
                    log.warning("key change feed unreachable, re-checking keys every 1 s: %s", exc)
                self.following = False
            await asyncio.sleep(interval)

    async def listen(self, subscribe: Subscribe) -> None:
        """Follow pushed notifications (PostgreSQL LISTEN/NOTIFY); cancel to stop.

        ``subscribe(on_change, on_connected, on_lost)`` runs until cancelled and
        reconnects by itself. Notifications sent while disconnected are lost, so
        every reconnect forgets the whole cache (entries are fetched again on
        their next use), and while disconnected entries older than 1 s are
        re-checked.
        """

        def on_change(change: KeyChange) -> None:
            self.on_key_changed(change.key_hash, change.team_id)

        def on_connected() -> None:
            self.clear()
            self.following = True

        def on_lost() -> None:
            if self.following:
                log.warning("key change notifications lost, re-checking keys every 1 s")
            self.following = False

        self.following = False
        while True:
            try:
                await subscribe(on_change, on_connected, on_lost)
            except asyncio.CancelledError:
                raise
            except Exception:
                # Whatever broke the subscription, keys must not be trusted for a
                # minute meanwhile: fall back to 1 s re-checks and subscribe again.
                on_lost()
                log.exception("key change subscription failed; subscribing again")
                await asyncio.sleep(1.0)
