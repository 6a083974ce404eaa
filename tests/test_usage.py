"""The usage recorder's batches: a row the database refuses costs that row, not the batch."""

from __future__ import annotations

import logging
import time

import pytest

from gateway.models import KeyRecord
from gateway.storage import Backend
from gateway.usage import UsageRecorder
from tests.storage.conftest import Backends, backends, db, postgres_admin_dsn, postgres_template

__all__ = ["backends", "db", "postgres_admin_dsn", "postgres_template"]

DAY = 86400


def _record(key_id: str, team_id: str) -> KeyRecord:
    return KeyRecord(key_id, team_id, "ckiq_live_abcd", "live", None, None, False, None, None)


async def _real_key(db: Backend) -> KeyRecord:
    team = await db.create_team("acme")
    key = await db.create_key(team.id, "k", "live", "hash-1", "ckiq_live_abcd", None, None)
    return _record(key.id, team.id)


async def _requests(db: Backend, team_id: str) -> list[tuple[str, int, int]]:
    """(outcome, requests, credits) of the team in the last and the next hour, whatever the minute."""
    start = int(time.time() // 3600 * 3600) - 3600
    return [
        row[1:] for row in await db.usage_buckets(team_id, start, start + 3 * 3600, 3 * 3600, None)
    ]


async def _ips(db: Backend, team_id: str) -> list[tuple[str, str, int]]:
    """(key id, client IP, requests) of yesterday, today and tomorrow, summed over the days."""
    start = int(time.time() // DAY * DAY) - DAY
    summed: dict[tuple[str, str], int] = {}
    for _day, key_id, ip, n in await db.key_ips(team_id, None, start, start + 3 * DAY):
        summed[key_id, ip] = summed.get((key_id, ip), 0) + n
    return [(key_id, ip, n) for (key_id, ip), n in sorted(summed.items())]


def _warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == "gateway.usage" and r.levelno >= logging.WARNING
    ]


async def test_a_row_the_database_refuses_is_dropped_and_the_rest_written(
    db: Backend, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="gateway.usage")
    good = await _real_key(db)
    # Not UTF-8: no backend can store this id (the stand-in for any row it refuses).
    bad = _record("key_\udcff", good.team_id)
    usage = UsageRecorder(db, 60)
    for key in (good, bad, good):
        usage.record(key, "ok", 1, used=True)
        usage.record_ip(key, "10.0.0.1")
    await usage.flush()

    assert await _requests(db, good.team_id) == [("ok", 2, 2)]
    assert await _ips(db, good.team_id) == [(good.id, "10.0.0.1", 2)]
    assert (await db.get_key(good.id)).last_used_at is not None
    dropped = _warnings(caplog)
    assert len(dropped) == 3, dropped  # the usage counter, the address, last_used_at
    assert all("dropped" in line and "key_\\xff" in line for line in dropped), dropped

    # Dropped means gone: the next flush has nothing to retry.
    caplog.clear()
    usage.record(good, "ok", 1, used=True)
    await usage.flush()
    assert _warnings(caplog) == []
    assert await _requests(db, good.team_id) == [("ok", 3, 3)]


async def test_auth_failures_are_escaped_before_they_are_buffered(
    db: Backend, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="gateway.usage")
    usage = UsageRecorder(db, 60)
    usage.record_auth_failure("ckiq_live_\udcff\udcfeab", "10.0.0.9\udc80", "malformed")
    usage.record_auth_failure("ckiq_live_\udcff\udcfeab", "10.0.0.9\udc80", "malformed")
    usage.record_auth_failure("ckiq_live_WXYZ", "10.0.0.9", "unknown")
    usage.record_auth_failure(None, "x" * 5000, "malformed")
    await usage.flush()
    rows = await db.auth_failure_counts(0, time.time() + 60, 10)
    assert rows == [
        ("ckiq_live_\\xff\\xfeab", "10.0.0.9\\x80", "malformed", 2),
        ("", "x" * 99 + "…", "malformed", 1),
        ("ckiq_live_WXYZ", "10.0.0.9", "unknown", 1),
    ]
    assert _warnings(caplog) == []


async def test_client_addresses_are_escaped_before_they_are_buffered(db: Backend) -> None:
    key = await _real_key(db)
    usage = UsageRecorder(db, 60)
    usage.record_ip(key, "203.0.113.7\udcff\n")
    await usage.flush()
    assert await _ips(db, key.team_id) == [(key.id, "203.0.113.7\\xff\\x0a", 1)]


async def test_while_the_database_is_unreachable_every_row_is_kept(
    backends: Backends, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="gateway.usage")
    db = await backends.open()
    key = await _real_key(db)
    usage = UsageRecorder(db, 60)
    usage.record(key, "ok", 1, used=True)
    usage.record_ip(key, "10.0.0.1")
    usage.record_auth_failure("ckiq_live_WXYZ", "10.0.0.9", "unknown")
    await db.close()
    await usage.flush()
    await usage.flush()
    assert not any("dropped" in line for line in _warnings(caplog))
    assert any("will retry" in line for line in _warnings(caplog))

    await db.open()
    await usage.flush()
    assert await _requests(db, key.team_id) == [("ok", 1, 1)]
    assert await _ips(db, key.team_id) == [(key.id, "10.0.0.1", 1)]
    assert await db.auth_failure_counts(0, time.time() + 60, 10) == [
        ("ckiq_live_WXYZ", "10.0.0.9", "unknown", 1)
    ]
    assert (await db.get_key(key.id)).last_used_at is not None
