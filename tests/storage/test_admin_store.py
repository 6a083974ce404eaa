"""What every backend promises the admin API, run against SQLite and PostgreSQL alike.

Team and key changes (and what reaches the key caches), rotation, team
tokens, the audit log, usage aggregates, the patterns anomaly detection reads,
and the ledger history with its cursor.
"""

from __future__ import annotations

import asyncio
import random
import re
import sqlite3
import time
from collections.abc import Awaitable, Callable
from typing import Any

import asyncpg
import pytest

from gateway.models import ApiKey, Environment, Team, UsageRow
from gateway.storage import (
    AuditRecord,
    Backend,
    Conflict,
    InvalidData,
    NotFound,
    ReserveRequest,
)
from gateway.storage.rules import decode_ledger_cursor, encode_ledger_cursor
from tests.storage.conftest import Backends

DAY = 86_400
# A whole day, in UTC, well in the past: usage minutes are plain epoch seconds.
T0 = 1_700_006_400


async def changes_since(db: Backend, seq: int) -> list[tuple[str | None, str | None]]:
    _, changes, gap = await db.key_changes_since(seq)
    assert not gap
    return [(c.key_hash, c.team_id) for c in changes]


async def a_key(
    db: Backend,
    team_id: str,
    key_hash: str = "hash-1",
    *,
    name: str = "ci",
    environment: Environment = "live",
    limit: int | None = None,
    expires_at: float | None = None,
) -> ApiKey:
    return await db.create_key(
        team_id,
        name,
        environment,
        key_hash,
        f"ckiq_{environment}_{key_hash[-4:]}",
        limit,
        expires_at,
    )


# -- teams --------------------------------------------------------------------------


async def test_update_team_sets_and_clears_the_limit(db: Backend) -> None:
    team = await db.create_team("acme")
    await a_key(db, team.id)
    updated = await db.update_team(team.id, 30)
    assert updated == await db.get_team(team.id)
    assert (updated.name, updated.created_at, updated.rate_limit_per_minute) == (
        "acme",
        team.created_at,
        30,
    )
    record = await db.find_key("hash-1")
    assert record is not None and record.team_rate_limit_per_minute == 30
    cleared = await db.update_team(team.id, None)
    assert cleared.rate_limit_per_minute is None
    with pytest.raises(NotFound):
        await db.update_team("team_nope", 5)


async def test_a_team_limit_change_reaches_the_key_caches(db: Backend) -> None:
    team = await db.create_team("acme")
    start = await db.latest_key_change()
    await db.update_team(team.id, 30)
    await db.update_team(team.id, None)
    assert await changes_since(db, start) == [(None, team.id), (None, team.id)]
    # Setting what is already there changes nothing cached.
    latest = await db.latest_key_change()
    await db.update_team(team.id, None)
    assert await db.latest_key_change() == latest
    # A failed update logs nothing.
    with pytest.raises(NotFound):
        await db.update_team("team_nope", 5)
    assert await db.latest_key_change() == latest


# -- keys: update -------------------------------------------------------------------


async def test_update_key_changes_only_the_given_fields(db: Backend) -> None:
    team = await db.create_team("acme")
    expires = time.time() + 3600
    key = await a_key(db, team.id, limit=10, expires_at=expires)

    renamed = await db.update_key(key.id, {"name": "deploy"})
    assert renamed.name == "deploy"
    assert renamed == await db.get_key(key.id)
    assert (renamed.rate_limit_per_minute, renamed.disabled) == (10, False)
    assert renamed.expires_at == pytest.approx(expires, abs=1e-5)

    later = expires + 600.5
    both = await db.update_key(key.id, {"rate_limit_per_minute": 99, "expires_at": later})
    assert both.rate_limit_per_minute == 99
    assert both.expires_at == pytest.approx(later, abs=1e-5)
    assert (both.name, both.disabled) == ("deploy", False)

    disabled = await db.update_key(key.id, {"disabled": True})
    assert disabled.disabled and disabled.rate_limit_per_minute == 99
    record = await db.find_key("hash-1")
    assert record is not None and record.disabled and not record.usable_at(time.time())

    cleared = await db.update_key(
        key.id, {"rate_limit_per_minute": None, "expires_at": None, "disabled": False}
    )
    assert (cleared.rate_limit_per_minute, cleared.expires_at, cleared.disabled) == (
        None,
        None,
        False,
    )
    assert (cleared.id, cleared.team_id, cleared.prefix, cleared.created_at) == (
        key.id,
        key.team_id,
        key.prefix,
        key.created_at,
    )
    record = await db.find_key("hash-1")
    assert record is not None and record.usable_at(time.time())
    assert record.rate_limit_per_minute is None and record.expires_at is None

    # No changes at all: the key as it is.
    assert await db.update_key(key.id, {}) == cleared


async def test_update_key_errors(db: Backend) -> None:
    team = await db.create_team("acme")
    key = await a_key(db, team.id)
    with pytest.raises(NotFound):
        await db.update_key("key_nope", {"name": "x"})
    with pytest.raises(ValueError, match="key_hash"):
        await db.update_key(key.id, {"key_hash": "stolen"})
    with pytest.raises(ValueError, match="disabled"):
        await db.update_key(key.id, {"disabled": None})
    with pytest.raises(ValueError, match="rate_limit_per_minute"):
        await db.update_key(key.id, {"rate_limit_per_minute": "10"})
    await db.revoke_key(key.id)
    with pytest.raises(Conflict):
        await db.update_key(key.id, {"disabled": True})
    with pytest.raises(Conflict):
        await db.update_key(key.id, {})
    assert (await db.get_key(key.id)).disabled is False


async def test_key_updates_that_change_what_caches_hold_reach_them(db: Backend) -> None:
    team = await db.create_team("acme")
    key = await a_key(db, team.id)
    for changes in (
        {"rate_limit_per_minute": 5},
        {"expires_at": time.time() + 60},
        {"disabled": True},
        {"rate_limit_per_minute": None, "expires_at": None, "disabled": False},
    ):
        before = await db.latest_key_change()
        await db.update_key(key.id, changes)
        assert await changes_since(db, before) == [("hash-1", None)], changes
    # The name, or a value set again, changes nothing a cache holds.
    before = await db.latest_key_change()
    await db.update_key(key.id, {"name": "renamed"})
    await db.update_key(key.id, {"disabled": False, "rate_limit_per_minute": None})
    assert await db.latest_key_change() == before


# -- keys: rotate -------------------------------------------------------------------


async def test_rotate_key_makes_a_like_key_and_expires_the_old_one(db: Backend) -> None:
    team = await db.create_team("acme")
    old = await a_key(db, team.id, environment="test", limit=42)
    await db.update_key(old.id, {"disabled": True})
    start = await db.latest_key_change()
    grace_end = time.time() + 300

    new = await db.rotate_key(old.id, "hash-new", "ckiq_test_neww", grace_end)

    assert new == await db.get_key(new.id)
    assert re.fullmatch(r"key_[0-9a-f]{16}", new.id) and new.id != old.id
    assert (new.team_id, new.name, new.environment, new.rate_limit_per_minute) == (
        team.id,
        "ci",
        "test",
        42,
    )
    assert (new.prefix, new.disabled, new.expires_at, new.revoked_at, new.last_used_at) == (
        "ckiq_test_neww",
        False,
        None,
        None,
        None,
    )
    assert abs(new.created_at - time.time()) < 60
    after = await db.get_key(old.id)
    assert after.expires_at == pytest.approx(grace_end, abs=1e-5)
    assert after.revoked_at is None and after.disabled
    record = await db.find_key("hash-new")
    assert record is not None and record.id == new.id and record.usable_at(time.time())
    assert await db.find_key_id_by_hash("hash-new") == new.id
    # Both keys reach the caches: the new one may have been cached as unknown.
    assert sorted(await changes_since(db, start), key=str) == [
        ("hash-1", None),
        ("hash-new", None),
    ]


async def test_rotate_keeps_an_earlier_expiry_and_a_grace_of_zero_stops_at_once(
    db: Backend,
) -> None:
    team = await db.create_team("acme")
    soon = time.time() + 60
    early = await a_key(db, team.id, "hash-early", expires_at=soon)
    await db.rotate_key(early.id, "hash-early-2", "ckiq_live_rly2", soon + 3600)
    assert (await db.get_key(early.id)).expires_at == pytest.approx(soon, abs=1e-5)

    now_key = await a_key(db, team.id, "hash-now", expires_at=soon)
    await db.rotate_key(now_key.id, "hash-now-2", "ckiq_live_now2", time.time())
    record = await db.find_key("hash-now")
    assert record is not None and record.expires_at is not None
    assert not record.usable_at(time.time())


async def test_rotate_errors_change_nothing(db: Backend) -> None:
    team = await db.create_team("acme")
    old = await a_key(db, team.id, "hash-old")
    taken = await a_key(db, team.id, "hash-taken")
    with pytest.raises(NotFound):
        await db.rotate_key("key_nope", "hash-x", "ckiq_live_xxxx", time.time())

    # One transaction: a new key that cannot be written leaves the old one alone.
    before = await db.latest_key_change()
    with pytest.raises(Conflict):
        await db.rotate_key(old.id, "hash-taken", "ckiq_live_tken", time.time())
    assert (await db.get_key(old.id)).expires_at is None
    assert sorted(k.id for k in await db.list_keys(team.id, 10, None)) == sorted([old.id, taken.id])
    assert await db.latest_key_change() == before

    await db.revoke_key(old.id)
    before = await db.latest_key_change()
    with pytest.raises(Conflict):
        await db.rotate_key(old.id, "hash-new", "ckiq_live_neww", time.time())
    assert await db.find_key_id_by_hash("hash-new") is None
    assert (await db.get_key(old.id)).expires_at is None
    assert await db.latest_key_change() == before


# -- team tokens ----------------------------------------------------------------------


async def test_team_tokens(db: Backend) -> None:
    team = await db.create_team("acme")
    other = await db.create_team("other")
    token = await db.create_token(team.id, "ci bot", "tok-hash-1", "ckiq_tok_abcd")
    assert re.fullmatch(r"tok_[0-9a-f]{16}", token.id)
    assert (token.team_id, token.name, token.prefix) == (team.id, "ci bot", "ckiq_tok_abcd")
    assert token.last_used_at is None and token.revoked_at is None
    assert abs(token.created_at - time.time()) < 60
    assert not hasattr(token, "token_hash")
    assert await db.get_token(token.id) == token
    assert await db.find_token("tok-hash-1") == token
    assert await db.find_token("tok-hash-unknown") is None

    with pytest.raises(NotFound):
        await db.create_token("team_nope", "x", "tok-hash-2", "ckiq_tok_efgh")
    with pytest.raises(Conflict):
        await db.create_token(team.id, "dup", "tok-hash-1", "ckiq_tok_abcd")
    with pytest.raises(NotFound):
        await db.get_token("tok_nope")

    more = [
        await db.create_token(team.id, f"t{i}", f"tok-hash-m{i}", "ckiq_tok_mmmm") for i in range(4)
    ]
    theirs = await db.create_token(other.id, "theirs", "tok-hash-o", "ckiq_tok_oooo")
    everything = sorted([token, *more], key=lambda t: t.id)
    first = await db.list_tokens(team.id, 2, None)
    rest = await db.list_tokens(team.id, 10, first[-1].id)
    assert first + rest == everything and len(first) == 2
    assert await db.list_tokens(other.id, 10, None) == [theirs]
    assert await db.list_tokens(team.id, 10, everything[-1].id) == []


async def test_revoking_a_team_token(db: Backend) -> None:
    team = await db.create_team("acme")
    token = await db.create_token(team.id, "ci", "tok-hash-1", "ckiq_tok_abcd")
    revoked = await db.revoke_token(token.id)
    assert revoked.revoked_at is not None and abs(revoked.revoked_at - time.time()) < 60
    assert revoked == await db.get_token(token.id)
    # Still found by its hash: the caller sees it is revoked.
    assert await db.find_token("tok-hash-1") == revoked
    with pytest.raises(Conflict):
        await db.revoke_token(token.id)
    with pytest.raises(NotFound):
        await db.revoke_token("tok_nope")


# -- the audit log ----------------------------------------------------------------------


def entry(
    actor: str,
    action: str,
    target: str | None = None,
    team_id: str | None = None,
    client_ip: str | None = None,
    details: dict[str, object] | None = None,
) -> Callable[[object], AuditRecord]:
    """An audit entry that does not depend on what the change made."""
    record = AuditRecord(actor, action, target, team_id, client_ip, details or {})
    return lambda _made: record


async def test_audit_log_newest_first_paged_and_by_team(db: Backend) -> None:
    def created(actor: str, client_ip: str | None) -> Callable[[Team], AuditRecord]:
        return lambda t: AuditRecord(actor, "team.create", t.id, t.id, client_ip, {"name": t.name})

    a = await db.create_team("a", audit=created("admin", "10.0.0.1"))
    b = await db.create_team("b", audit=created("cli", None))
    key = await a_key(db, a.id)
    await db.update_key(
        key.id,
        {"disabled": True},
        audit=entry(
            "token:tok_1", "key.update", "key_1", a.id, "::1", {"changes": {"disabled": True}}
        ),
    )
    await db.update_team(b.id, 5, audit=entry("admin", "settings.reload"))
    await db.apply_grant(
        a.id, "live", 5, "seed", "admin",
        audit=entry("admin", "credits.grant", a.id, a.id, "10.0.0.1", {"amount": -5}),
    )  # fmt: skip

    everything = await db.list_audit(None, 10, None)
    assert [e.action for e in everything] == [
        "credits.grant",
        "settings.reload",
        "key.update",
        "team.create",
        "team.create",
    ]
    ids = [e.id for e in everything]
    assert ids == sorted(ids, reverse=True) and len(set(ids)) == 5
    assert all(abs(e.at - time.time()) < 60 for e in everything)
    update = everything[2]
    assert (update.actor, update.target, update.team_id, update.client_ip) == (
        "token:tok_1",
        "key_1",
        a.id,
        "::1",
    )
    assert update.details == {"changes": {"disabled": True}}
    assert everything[1].details == {} and everything[1].team_id is None

    page = await db.list_audit(None, 2, None)
    rest = await db.list_audit(None, 10, page[-1].id)
    assert page + rest == everything

    of_a = await db.list_audit(a.id, 10, None)
    assert [e.action for e in of_a] == ["credits.grant", "key.update", "team.create"]
    assert await db.list_audit(a.id, 10, of_a[0].id) == of_a[1:]
    assert [e.details for e in await db.list_audit(b.id, 10, None)] == [{"name": "b"}]
    assert await db.list_audit("team_nope", 10, None) == []


async def test_a_replayed_grant_writes_no_audit_entry(db: Backend) -> None:
    team = await db.create_team("a")
    said = entry("admin", "credits.grant", team.id, team.id)
    first = await db.apply_grant(team.id, "live", 5, "seed", "admin", "order-1", "h", audit=said)
    again = await db.apply_grant(team.id, "live", 5, "seed", "admin", "order-1", "h", audit=said)
    assert (first.replayed, again.replayed) == (False, True)
    assert [e.action for e in await db.list_audit(None, 10, None)] == ["credits.grant"]


async def refuse_audit_entries(backends: Backends, action: str) -> None:
    """Make the database refuse an audit row with this action, as a full disk or a bug would."""
    if backends.kind == "sqlite":
        raw = sqlite3.connect(backends.location)
        try:
            raw.execute(
                f"CREATE TRIGGER refuse_audit BEFORE INSERT ON audit_log WHEN NEW.action = '{action}' "
                "BEGIN SELECT RAISE(ABORT, 'audit refused'); END"
            )
            raw.commit()
        finally:
            raw.close()
        return
    conn = await asyncpg.connect(backends.location)
    try:
        await conn.execute(
            "CREATE FUNCTION refuse_audit() RETURNS trigger LANGUAGE plpgsql AS $$ "
            "BEGIN RAISE EXCEPTION 'audit refused'; END $$"
        )
        await conn.execute(
            "CREATE TRIGGER refuse_audit BEFORE INSERT ON audit_log FOR EACH ROW "
            f"WHEN (NEW.action = '{action}') EXECUTE FUNCTION refuse_audit()"
        )
    finally:
        await conn.close()


AUDIT_REFUSED = (sqlite3.IntegrityError, asyncpg.RaiseError)


async def test_a_change_whose_audit_entry_fails_is_not_made(
    db: Backend, backends: Backends
) -> None:
    """The entry is written in the change's transaction: no change without its entry."""
    team = await db.create_team("a")
    key = await a_key(db, team.id)
    token = await db.create_token(team.id, "ci", "token-hash", "ckiq_tok_ab")
    await db.grant(team.id, "live", 7, "seed", "test")
    await refuse_audit_entries(backends, "boom")
    boom = entry("admin", "boom")
    seq = await db.latest_key_change()

    attempts: list[Awaitable[object]] = [
        db.create_team("b", audit=boom),
        db.update_team(team.id, 9, audit=boom),
        a_key_audited(db, team.id, boom),
        db.update_key(key.id, {"disabled": True}, audit=boom),
        db.rotate_key(key.id, "hash-new", "ckiq_live_wxyz", time.time(), audit=boom),
        db.revoke_key(key.id, audit=boom),
        db.create_token(team.id, "two", "token-hash-2", "ckiq_tok_cd", audit=boom),
        db.revoke_token(token.id, audit=boom),
        db.apply_grant(team.id, "live", 5, "more", "admin", "order-9", "h", audit=boom),
    ]
    for attempt in attempts:
        with pytest.raises(AUDIT_REFUSED):
            await attempt

    assert [t.name for t in await db.list_teams(10, None)] == ["a"]
    assert (await db.get_team(team.id)).rate_limit_per_minute is None
    [still] = await db.list_keys(team.id, 10, None)
    assert (still.id, still.disabled, still.revoked_at, still.expires_at) == (
        key.id,
        False,
        None,
        None,
    )
    [same_token] = await db.list_tokens(team.id, 10, None)
    assert same_token.revoked_at is None
    assert await db.balance(team.id, "live") == 7
    assert await db.reconcile() == []
    assert await db.list_audit(None, 10, None) == []
    assert await changes_since(db, seq) == []
    # The same grant, retried once the database takes the entry, is a first grant.
    done = await db.apply_grant(team.id, "live", 5, "more", "admin", "order-9", "h")
    assert (done.balance, done.replayed) == (12, False)


async def a_key_audited(
    db: Backend, team_id: str, audit: Callable[[object], AuditRecord]
) -> ApiKey:
    return await db.create_key(
        team_id, "new", "live", "hash-other", "ckiq_live_othr", None, None, audit=audit
    )


async def test_the_audit_log_is_append_only(db: Backend, backends: Backends) -> None:
    await db.create_team("a", audit=entry("admin", "team.create", "team_1", "team_1"))
    if backends.kind == "sqlite":
        raw = sqlite3.connect(backends.location)
        try:
            with pytest.raises(sqlite3.IntegrityError):
                raw.execute("UPDATE audit_log SET actor = 'someone else'")
            with pytest.raises(sqlite3.IntegrityError):
                raw.execute("DELETE FROM audit_log")
        finally:
            raw.close()
    else:
        conn = await asyncpg.connect(backends.location)
        try:
            for statement in (
                "UPDATE audit_log SET actor = 'someone else'",
                "DELETE FROM audit_log",
                "TRUNCATE audit_log",
            ):
                with pytest.raises(asyncpg.RaiseError, match="append-only"):
                    await conn.execute(statement)
        finally:
            await conn.close()
    [entry_] = await db.list_audit(None, 10, None)
    assert entry_.actor == "admin"


# -- usage ----------------------------------------------------------------------------------


def usage(minute: int, key: str, outcome: str, requests: int, credits: int = 0) -> UsageRow:
    return UsageRow(minute, "team_a", key, "live", outcome, requests, credits)


async def test_add_usage_adds_to_the_counters(db: Backend) -> None:
    await db.add_usage([])
    await db.add_usage([usage(T0, "key_1", "ok", 3, 3), usage(T0, "key_1", "rate_limited", 2)])
    await db.add_usage(
        [
            usage(T0, "key_1", "ok", 4, 2),
            # The same counter twice in one batch counts twice.
            usage(T0 + 60, "key_2", "ok", 1, 1),
            usage(T0 + 60, "key_2", "ok", 1, 1),
            UsageRow(T0, "team_a", "key_1", "test", "ok", 5, 0),
            UsageRow(T0, "team_b", "key_9", "live", "ok", 100, 100),
        ]
    )
    assert await db.usage_buckets("team_a", T0, T0 + 120, 60, None) == [
        (T0, "ok", 12, 5),
        (T0, "rate_limited", 2, 0),
        (T0 + 60, "ok", 2, 2),
    ]
    assert await db.usage_buckets("team_b", T0, T0 + 120, 60, None) == [(T0, "ok", 100, 100)]


async def test_usage_buckets_by_minute_hour_and_day(db: Backend) -> None:
    rows = [
        usage(T0, "key_1", "ok", 1, 1),
        usage(T0 + 59 * 60, "key_1", "ok", 2, 2),  # last minute of the first hour
        usage(T0 + 3600, "key_2", "ok", 4, 4),
        usage(T0 + 3600, "key_2", "upstream_error", 8),
        usage(T0 + 23 * 3600 + 59 * 60, "key_1", "client_error", 16),  # last minute of the day
        usage(T0 + DAY, "key_1", "ok", 32, 32),  # the next day
    ]
    await db.add_usage(rows)

    by_minute = await db.usage_buckets("team_a", T0, T0 + 3600 + 60, 60, None)
    assert by_minute == [
        (T0, "ok", 1, 1),
        (T0 + 59 * 60, "ok", 2, 2),
        (T0 + 3600, "ok", 4, 4),
        (T0 + 3600, "upstream_error", 8, 0),
    ]
    by_hour = await db.usage_buckets("team_a", T0, T0 + 2 * DAY, 3600, None)
    assert by_hour == [
        (T0, "ok", 3, 3),
        (T0 + 3600, "ok", 4, 4),
        (T0 + 3600, "upstream_error", 8, 0),
        (T0 + 23 * 3600, "client_error", 16, 0),
        (T0 + DAY, "ok", 32, 32),
    ]
    by_day = await db.usage_buckets("team_a", T0, T0 + 2 * DAY, DAY, None)
    assert by_day == [
        (T0, "client_error", 16, 0),
        (T0, "ok", 7, 7),
        (T0, "upstream_error", 8, 0),
        (T0 + DAY, "ok", 32, 32),
    ]
    # Buckets count from start, whatever it is; the end is exclusive, and may
    # fall inside a minute (which then counts).
    assert await db.usage_buckets("team_a", T0 + 1800, T0 + DAY, 3600, None) == [
        (T0 + 1800, "ok", 2 + 4, 2 + 4),
        (T0 + 1800, "upstream_error", 8, 0),
        (T0 + 1800 + 23 * 3600, "client_error", 16, 0),
    ]
    assert await db.usage_buckets("team_a", T0, T0 + 3600, 3600, None) == [(T0, "ok", 3, 3)]
    assert await db.usage_buckets("team_a", T0, T0 + 3600.5, 3600, None) == [
        (T0, "ok", 3, 3),
        (T0 + 3600, "ok", 4, 4),
        (T0 + 3600, "upstream_error", 8, 0),
    ]
    # One key only.
    assert await db.usage_buckets("team_a", T0, T0 + 2 * DAY, DAY, "key_2") == [
        (T0, "ok", 4, 4),
        (T0, "upstream_error", 8, 0),
    ]
    assert await db.usage_buckets("team_a", T0, T0 + 2 * DAY, DAY, "key_nope") == []
    assert await db.usage_buckets("team_nope", T0, T0 + 2 * DAY, DAY, None) == []


async def test_usage_top_keys(db: Backend) -> None:
    await db.add_usage(
        [
            usage(T0, "key_1", "ok", 5, 5),
            usage(T0 + 60, "key_1", "rate_limited", 10),
            usage(T0, "key_2", "ok", 20, 20),
            usage(T0, "key_3", "ok", 15, 1),
            usage(T0, "key_4", "ok", 15, 2),
            usage(T0 + 3600, "key_5", "ok", 1000, 1000),  # outside the range below
            UsageRow(T0, "team_b", "key_9", "live", "ok", 500, 500),
        ]
    )
    assert await db.usage_top_keys("team_a", T0, T0 + 3600, 10) == [
        ("key_2", 20, 20),
        ("key_1", 15, 5),
        ("key_3", 15, 1),
        ("key_4", 15, 2),
    ]
    assert await db.usage_top_keys("team_a", T0, T0 + 3600, 2) == [
        ("key_2", 20, 20),
        ("key_1", 15, 5),
    ]
    assert await db.usage_top_keys("team_a", T0 + 60, T0 + 3600.5, 10) == [
        ("key_5", 1000, 1000),
        ("key_1", 10, 0),
    ]


async def test_concurrent_usage_flushes_from_several_processes_lose_nothing(
    backends: Backends,
) -> None:
    nodes = [await backends.open() for _ in range(4)]
    minutes = [T0 + 60 * i for i in range(5)]
    keys = [f"key_{i}" for i in range(6)]
    outcomes = ["ok", "rate_limited"]
    flushes = 10
    rng = random.Random(5)

    async def process(node: Backend) -> None:
        for _ in range(flushes):
            # Every counter in every flush, in an order of its own: the most
            # contended case (all processes add to the same rows at once).
            rows = [usage(m, k, o, 1, 2) for m in minutes for k in keys for o in outcomes]
            rng.shuffle(rows)
            await node.add_usage(rows)

    await asyncio.gather(*(process(node) for node in nodes))
    total = len(nodes) * flushes
    buckets = await nodes[0].usage_buckets("team_a", T0, T0 + 300, 60, None)
    assert buckets == [
        (m, o, total * len(keys), 2 * total * len(keys)) for m in minutes for o in outcomes
    ]
    top = await nodes[0].usage_top_keys("team_a", T0, T0 + 300, 10)
    per_key = total * len(minutes) * len(outcomes)
    assert top == [(k, per_key, 2 * per_key) for k in keys]


async def test_touch_keys_keeps_the_latest_time_and_logs_no_key_change(db: Backend) -> None:
    team = await db.create_team("acme")
    k1 = await a_key(db, team.id, "hash-1")
    k2 = await a_key(db, team.id, "hash-2")
    before = await db.latest_key_change()
    now = time.time()
    await db.touch_keys({})
    await db.touch_keys({k1.id: now - 10, k2.id: now - 20, "key_nope": now})
    assert (await db.get_key(k1.id)).last_used_at == pytest.approx(now - 10, abs=1e-5)
    assert (await db.get_key(k2.id)).last_used_at == pytest.approx(now - 20, abs=1e-5)
    # An older time (a slow flush from another process) never moves it back.
    await db.touch_keys({k1.id: now - 100, k2.id: now})
    assert (await db.get_key(k1.id)).last_used_at == pytest.approx(now - 10, abs=1e-5)
    assert (await db.get_key(k2.id)).last_used_at == pytest.approx(now, abs=1e-5)
    assert await db.latest_key_change() == before
    assert await db.key_changes_since(before) == (before, [], False)


async def test_concurrent_touches_from_several_processes_neither_deadlock_nor_go_back(
    backends: Backends,
) -> None:
    nodes = [await backends.open() for _ in range(4)]
    team = await nodes[0].create_team("acme")
    keys = [await a_key(nodes[0], team.id, f"hash-{i}") for i in range(8)]
    base = time.time()
    rng = random.Random(3)

    async def process(node: Backend, n: int) -> None:
        for flush in range(10):
            ids = [k.id for k in keys]
            rng.shuffle(ids)
            await node.touch_keys({key_id: base + flush + n / 10 for key_id in ids})

    await asyncio.wait_for(asyncio.gather(*(process(node, n) for n, node in enumerate(nodes))), 30)
    for key in keys:
        assert (await nodes[0].get_key(key.id)).last_used_at == pytest.approx(
            base + 9 + 3 / 10, abs=1e-5
        )


# -- usage patterns ---------------------------------------------------------------------------


async def test_key_ips_add_up_per_day(db: Backend) -> None:
    await db.add_key_ips([])
    await db.add_key_ips(
        [
            (T0, "team_a", "key_1", "10.0.0.1", 5),
            (T0, "team_a", "key_1", "10.0.0.2", 1),
            (T0, "team_a", "key_2", "10.0.0.1", 7),
            (T0 + DAY, "team_a", "key_1", "10.0.0.1", 2),
            (T0, "team_b", "key_9", "10.0.0.1", 100),
        ]
    )
    await db.add_key_ips(
        [(T0, "team_a", "key_1", "10.0.0.1", 3), (T0, "team_a", "key_1", "10.0.0.1", 1)]
    )
    assert await db.key_ips("team_a", None, T0, T0 + 2 * DAY) == [
        (T0, "key_1", "10.0.0.1", 9),
        (T0, "key_1", "10.0.0.2", 1),
        (T0, "key_2", "10.0.0.1", 7),
        (T0 + DAY, "key_1", "10.0.0.1", 2),
    ]
    assert await db.key_ips("team_a", "key_1", T0 + DAY, T0 + 2 * DAY) == [
        (T0 + DAY, "key_1", "10.0.0.1", 2)
    ]
    assert await db.key_ips("team_a", "key_2", T0, T0 + DAY) == [(T0, "key_2", "10.0.0.1", 7)]
    assert await db.key_ips("team_a", None, T0 + 2 * DAY, T0 + 3 * DAY) == []


async def test_auth_failure_counts(db: Backend) -> None:
    await db.add_auth_failures([])
    await db.add_auth_failures(
        [
            (T0, "ckiq_live_abcd", "10.0.0.1", "unknown", 3),
            (T0 + 60, "ckiq_live_abcd", "10.0.0.1", "unknown", 4),
            (T0, "", "10.0.0.2", "malformed", 5),
            (T0, "ckiq_live_efgh", "10.0.0.3", "revoked", 1),
            (T0 + 3600, "", "10.0.0.9", "malformed", 50),  # outside the range below
        ]
    )
    await db.add_auth_failures([(T0, "", "10.0.0.2", "malformed", 1)])
    assert await db.auth_failure_counts(T0, T0 + 3600, 10) == [
        ("ckiq_live_abcd", "10.0.0.1", "unknown", 7),
        ("", "10.0.0.2", "malformed", 6),
        ("ckiq_live_efgh", "10.0.0.3", "revoked", 1),
    ]
    assert await db.auth_failure_counts(T0, T0 + 3600.5, 1) == [("", "10.0.0.9", "malformed", 50)]
    assert await db.auth_failure_counts(T0 + 61, T0 + 3600, 10) == []


@pytest.mark.parametrize(
    "refused",
    [
        "not UTF-8 \udcff",  # what aiohttp makes of header bytes that are not UTF-8
        2**64,  # beyond a 64-bit integer
    ],
)
async def test_a_batch_with_a_refused_value_raises_invalid_data_and_writes_nothing(
    db: Backend, refused: object
) -> None:
    team = await db.create_team("acme")
    key = await db.create_key(team.id, "k", "live", "hash-1", "ckiq_live_abcd", None, None)
    text: Any = refused if isinstance(refused, str) else "x"
    number: Any = 1 if isinstance(refused, str) else refused
    batches: list[Callable[[], Awaitable[None]]] = [
        lambda: db.add_usage(
            [
                UsageRow(T0, team.id, key.id, "live", "ok", 1, 1),
                UsageRow(T0, team.id, text, "live", "ok", number, 1),
            ]
        ),
        lambda: db.add_key_ips(
            [(T0, team.id, key.id, "10.0.0.1", 1), (T0, team.id, key.id, text, number)]
        ),
        lambda: db.add_auth_failures(
            [(T0, "", "10.0.0.1", "malformed", 1), (T0, text, "10.0.0.1", "malformed", number)]
        ),
    ]
    if isinstance(refused, str):
        batches.append(lambda: db.touch_keys({key.id: T0, text: T0}))
    for batch in batches:
        with pytest.raises(InvalidData):
            await batch()
    assert await db.usage_buckets(team.id, T0, T0 + 60, 60, None) == []
    assert await db.key_ips(team.id, None, T0, T0 + DAY) == []
    assert await db.auth_failure_counts(T0, T0 + 60, 10) == []
    assert (await db.get_key(key.id)).last_used_at is None


async def test_prune_patterns_deletes_old_ips_and_failures(db: Backend) -> None:
    await db.add_key_ips(
        [
            (T0 - DAY, "team_a", "key_1", "10.0.0.1", 1),
            (T0 - DAY, "team_a", "key_2", "10.0.0.2", 1),
            (T0, "team_a", "key_1", "10.0.0.1", 1),
        ]
    )
    await db.add_auth_failures(
        [
            (T0 - 60, "", "10.0.0.1", "malformed", 1),
            (T0, "", "10.0.0.1", "malformed", 2),
        ]
    )
    assert await db.prune_patterns(T0, T0) == 3
    assert await db.prune_patterns(T0, T0) == 0
    assert await db.key_ips("team_a", None, 0, T0 + DAY) == [(T0, "key_1", "10.0.0.1", 1)]
    assert await db.auth_failure_counts(0, T0 + DAY, 10) == [("", "10.0.0.1", "malformed", 2)]
    # Each kind has its own retention.
    assert await db.prune_patterns(T0 + DAY, 0) == 1
    assert await db.auth_failure_counts(0, T0 + DAY, 10) == [("", "10.0.0.1", "malformed", 2)]


# -- the ledger history ------------------------------------------------------------------


def req(rid: str, team: str, amount: int = 1) -> ReserveRequest:
    return ReserveRequest(rid, team, "live", "key_1", amount)


async def test_ledger_entries_show_reservations_and_their_resolution(backends: Backends) -> None:
    db = await backends.open(lease_seconds=0.05)
    team = (await db.create_team("acme")).id
    await db.grant(team, "live", 20, "purchase", "admin")
    await db.reserve_batch([req("lost", team, 2)])
    await asyncio.sleep(0.1)
    await db.expire_reservations("void")
    await db.grant(team, "test", 5, "trial", "admin")
    await db.reserve_batch([req("posted", team, 3), req("voided", team, 2)])
    await db.post_batch([("posted", 1)])
    await db.void_batch(["voided"])
    await db.reserve_batch([req("pending", team, 4)])
    await db.grant(team, "live", -1, "correction", "admin")

    entries = await db.ledger_entries(team, 50, None)
    by_kind = {e.kind: e for e in entries}
    assert sorted(by_kind) == sorted(["grant", "reserve", "post", "void", "expire_void", "adjust"])
    assert len(entries) == 7
    assert (by_kind["reserve"].reservation_id, by_kind["reserve"].amount) == ("pending", -4)
    assert (by_kind["post"].reservation_id, by_kind["post"].amount) == ("posted", -1)
    assert (by_kind["void"].reservation_id, by_kind["void"].amount) == ("voided", 0)
    assert (by_kind["expire_void"].reservation_id, by_kind["expire_void"].amount) == ("lost", 0)
    assert (by_kind["adjust"].amount, by_kind["adjust"].reason) == (-1, "correction")
    for entry in entries:
        assert entry.team_id == team and abs(entry.created_at - time.time()) < 60
        if entry.reservation_id is None:
            assert entry.kind in ("grant", "adjust") and entry.reason is not None
            assert re.fullmatch(r"c[0-9]+", entry.id)
        else:
            assert entry.reason is None and entry.id == "r" + entry.reservation_id
    # Newest first, by time then id.
    order = [(e.created_at, e.id) for e in entries]
    assert order == sorted(order, reverse=True)
    assert [e.reason for e in entries if e.kind == "grant"] == ["trial", "purchase"]
    # The history adds up to the balances.
    balances = await db.balances(team)
    assert sum(e.amount for e in entries) == balances["live"] + balances["test"]
    assert await db.ledger_entries("team_nope", 10, None) == []


async def test_paging_the_ledger_has_no_gaps_or_repeats(db: Backend) -> None:
    team = (await db.create_team("acme")).id
    other = (await db.create_team("other")).id
    await db.grant(other, "live", 100, "theirs", "admin")
    await db.reserve_batch([req("theirs-1", other)])
    for round_ in range(4):
        await db.grant(team, "live", 10, f"grant {round_}", "admin")
        # One batch: its reservations share one created_at (ties).
        ids = [f"r{round_}-{i}" for i in range(5)]
        await db.reserve_batch([req(rid, team) for rid in ids])
        await db.post_batch([(ids[0], 1), (ids[1], 0)])
        await db.void_batch([ids[2]])
    everything = await db.ledger_entries(team, 1000, None)
    assert len(everything) == 4 * 6
    assert len({e.id for e in everything}) == len(everything)
    assert [(e.created_at, e.id) for e in everything] == sorted(
        ((e.created_at, e.id) for e in everything), reverse=True
    )

    for size in (1, 2, 3, 5, 7, 24, 25):
        pages: list[list[str]] = []
        cursor: str | None = None
        while True:
            page = await db.ledger_entries(team, size, cursor)
            assert len(page) <= size
            if not page:
                break
            pages.append([e.id for e in page])
            cursor = page[-1].cursor
        assert [i for page in pages for i in page] == [e.id for e in everything], size


async def test_a_ledger_cursor_is_opaque_and_checked(db: Backend) -> None:
    team = (await db.create_team("acme")).id
    await db.grant(team, "live", 10, "purchase", "admin")
    [entry] = await db.ledger_entries(team, 10, None)
    assert re.fullmatch(r"[A-Za-z0-9_-]+", entry.cursor)
    assert decode_ledger_cursor(entry.cursor) == (entry.created_at, entry.id)
    assert decode_ledger_cursor(encode_ledger_cursor(1.5, "rrsv_x y")) == (1.5, "rrsv_x y")
    # Times past what the backends store, and NUL bytes, are not ours either.
    too_late, nul = encode_ledger_cursor(1e300, "c1"), encode_ledger_cursor(1.0, "c1\x00")
    for bad in ("", "12", "!!!", encode_ledger_cursor(1.0, "x1"), "bmFuIGMx", too_late, nul):
        with pytest.raises(ValueError):
            await db.ledger_entries(team, 10, bad)
