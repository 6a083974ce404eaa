"""The key cache against a real SQLite store: what it keeps per key, and what callers get."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from gateway.config import KeySettings
from gateway.keycache import KeyCache
from gateway.keys import display_prefix, generate_key, hash_secret
from gateway.models import KeyRecord
from gateway.storage.sqlite import SqliteBackend


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[SqliteBackend]:
    backend = SqliteBackend(str(tmp_path / "keys.db"), lease_seconds=60)
    await backend.open()
    await backend.migrate()
    yield backend
    await backend.close()


async def _keys(store: SqliteBackend, team_id: str, count: int, limit: int) -> list[str]:
    hashes = []
    for i in range(count):
        secret = generate_key("live")
        key_hash = hash_secret(secret, None)
        await store.create_key(
            team_id, f"k{i}", "live", key_hash, display_prefix(secret), limit, None
        )
        hashes.append(key_hash)
    return hashes


async def test_keys_of_one_team_share_its_values_and_callers_get_the_cached_record(
    store: SqliteBackend,
) -> None:
    team = await store.create_team("shared", rate_limit_per_minute=5000)
    cache = KeyCache(store, KeySettings())
    first, second = await _keys(store, team.id, 2, limit=1000)

    loaded = [await cache.lookup(first), await cache.lookup(second)]
    # The records handed to the requests that waited for the store are the ones
    # kept: anything a request leaves behind shares the cache's copies.
    cached = [await cache.lookup(first), await cache.lookup(second)]
    assert cache.misses == 2 and cache.hits == 2
    a, b = loaded
    assert a is not None and b is not None
    assert cached[0] is a and cached[1] is b
    # Each row read brings its own copies; one of each is kept.
    assert a.team_id == team.id and a.team_id is b.team_id
    assert a.environment is b.environment
    assert a.rate_limit_per_minute == 1000 and a.rate_limit_per_minute is b.rate_limit_per_minute
    assert a.team_rate_limit_per_minute == 5000
    assert a.team_rate_limit_per_minute is b.team_rate_limit_per_minute


async def test_an_unknown_hash_is_none_and_remembered(store: SqliteBackend) -> None:
    cache = KeyCache(store, KeySettings())
    unknown = hash_secret(generate_key("live"), None)
    assert await cache.lookup(unknown) is None
    assert await cache.lookup(unknown) is None
    assert cache.misses == 1 and cache.hits == 1


class HeldStore:
    """The real store, its first key lookup held after reading until released.

    A real database answers too fast to catch a lookup in flight while a key
    changes; holding the answer (already read, so from before the change) pins
    that interleaving.
    """

    def __init__(self, store: SqliteBackend) -> None:
        self._store = store
        self.read = asyncio.Event()
        self.release = asyncio.Event()

    async def find_key(self, key_hash: str) -> KeyRecord | None:
        record = await self._store.find_key(key_hash)
        if not self.read.is_set():
            self.read.set()
            await self.release.wait()
        return record

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)


async def test_a_request_after_a_change_does_not_wait_for_a_lookup_from_before_it(
    store: SqliteBackend,
) -> None:
    team = await store.create_team("acme")
    secret = generate_key("live")
    key_hash = hash_secret(secret, None)
    key = await store.create_key(team.id, "k", "live", key_hash, display_prefix(secret), None, None)
    held = HeldStore(store)
    cache = KeyCache(held, KeySettings())  # type: ignore[arg-type]
    before = asyncio.create_task(cache.lookup(key_hash))
    await held.read.wait()
    await store.revoke_key(key.id)
    cache.on_key_changed(key_hash, None)
    assert not cache.loading(key_hash)
    after = asyncio.create_task(cache.lookup(key_hash))
    await asyncio.sleep(0)
    held.release.set()
    record = await after
    assert record is not None and record.revoked_at is not None
    # The answer from before the change goes to those who asked before it, and is not kept.
    old = await before
    assert old is not None and old.revoked_at is None
    cached = cache.cached(key_hash)
    assert isinstance(cached, KeyRecord) and cached.revoked_at is not None
