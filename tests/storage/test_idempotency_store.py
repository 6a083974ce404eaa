"""The storage side of ``Idempotency-Key``, run against SQLite and PostgreSQL alike.

A claim rides along with its reservation (same statement, no extra round
trip); ``claim_idempotency`` is the claim for requests that reserve nothing.
Scope: (team, environment, key); a record counts for 24 hours from its creation.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import time

import asyncpg

from gateway.models import Environment
from gateway.storage import (
    IDEMPOTENCY_TTL_SECONDS,
    Backend,
    IdempotencyClaim,
    IdempotencyRecord,
    ReserveRequest,
    ReserveResult,
)
from tests.storage.conftest import Backends

CLAIM = IdempotencyClaim("key-1", "POST", "/api/v1/assess")
IN_FLIGHT = IdempotencyRecord(
    state="in_flight",
    method="POST",
    path="/api/v1/assess",
    body_hash=None,
    status=None,
    content_type=None,
    body=None,
    body_stored=False,
)
HASH = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"


async def team_with(db: Backend, credits: int, name: str = "t", env: Environment = "live") -> str:
    team = await db.create_team(name)
    if credits:
        await db.grant(team.id, env, credits, "seed", "test")
    return team.id


def req(
    rid: str,
    team: str,
    amount: int = 1,
    claim: IdempotencyClaim | None = CLAIM,
    environment: Environment = "live",
) -> ReserveRequest:
    return ReserveRequest(rid, team, environment, "key_1", amount, claim)


def in_flight(method: str = "POST", path: str = "/api/v1/assess") -> IdempotencyRecord:
    return IdempotencyRecord("in_flight", method, path, None, None, None, None, False)


async def records(backends: Backends) -> int:
    """How many idempotency records the database holds, straight from the table."""
    if backends.kind == "sqlite":
        with contextlib.closing(sqlite3.connect(backends.location)) as conn:
            return int(conn.execute("SELECT count(*) FROM idempotency_keys").fetchone()[0])
    conn = await asyncpg.connect(backends.location)
    try:
        return int(await conn.fetchval("SELECT count(*) FROM idempotency_keys"))
    finally:
        await conn.close()


async def age(backends: Backends, key: str, seconds: float) -> None:
    """Move the creation of every record of ``key`` ``seconds`` into the past."""
    if backends.kind == "sqlite":
        with contextlib.closing(sqlite3.connect(backends.location)) as conn:
            conn.execute(
                "UPDATE idempotency_keys SET created_at = created_at - ? WHERE idempotency_key = ?",
                (seconds, key),
            )
            conn.commit()
        return
    conn = await asyncpg.connect(backends.location)
    try:
        await conn.execute(
            "UPDATE idempotency_keys SET created_at = created_at - make_interval(secs => $1) "
            "WHERE idempotency_key = $2",
            seconds,
            key,
        )
    finally:
        await conn.close()


# -- a claim inside reserve_batch -------------------------------------------------------


async def test_a_first_claim_reserves_and_records_in_flight(
    db: Backend, backends: Backends
) -> None:
    team = await team_with(db, 5)
    assert await db.reserve_batch([req("r1", team, 2)]) == [ReserveResult(True, 3)]
    assert await db.balance(team, "live") == 3
    assert await db.pending_count() == 1
    assert await records(backends) == 1


async def test_a_second_claim_gets_the_in_flight_record_and_reserves_nothing(
    db: Backend,
) -> None:
    team = await team_with(db, 5)
    await db.reserve_batch([req("r1", team, 2)])
    again = await db.reserve_batch([req("r2", team, 2)])
    assert again == [ReserveResult(False, 3, IN_FLIGHT)]
    assert await db.balance(team, "live") == 3
    assert await db.pending_count() == 1
    # Whatever the retry asks for: method and path are the first attempt's.
    other = IdempotencyClaim(CLAIM.key, "PUT", "/api/v1/other")
    assert await db.reserve_batch([req("r3", team, 1, other)]) == [
        ReserveResult(False, 3, IN_FLIGHT)
    ]
    assert await db.reconcile() == []


async def test_a_replay_is_answered_even_without_credits_left(db: Backend) -> None:
    team = await team_with(db, 1)
    await db.reserve_batch([req("r1", team)])
    assert await db.reserve_batch([req("r2", team)]) == [ReserveResult(False, 0, IN_FLIGHT)]


async def test_a_refusal_records_nothing(db: Backend, backends: Backends) -> None:
    team = await team_with(db, 1)
    assert await db.reserve_batch([req("r1", team, 2)]) == [ReserveResult(False, 1)]
    assert await records(backends) == 0
    await db.grant(team, "live", 5, "top up", "test")
    # Judged afresh: the key is free.
    assert await db.reserve_batch([req("r2", team, 2)]) == [ReserveResult(True, 4)]
    assert await db.reserve_batch([req("r3", team, 2)]) == [ReserveResult(False, 4, IN_FLIGHT)]


async def test_a_refusal_for_an_account_without_a_balance_records_nothing(
    db: Backend, backends: Backends
) -> None:
    team = await team_with(db, 0)
    assert await db.reserve_batch([req("r1", team)]) == [ReserveResult(False, 0)]
    assert await records(backends) == 0


async def test_complete_then_claim_again_returns_the_completed_record(db: Backend) -> None:
    team = await team_with(db, 5)
    await db.reserve_batch([req("r1", team)])
    await db.post_batch([("r1", 1)])
    await db.complete_idempotency(
        team, "live", CLAIM.key, HASH, 201, "application/json", b'{"score": 7}'
    )
    completed = IdempotencyRecord(
        state="completed",
        method="POST",
        path="/api/v1/assess",
        body_hash=HASH,
        status=201,
        content_type="application/json",
        body=b'{"score": 7}',
        body_stored=True,
    )
    assert await db.reserve_batch([req("r2", team)]) == [ReserveResult(False, 4, completed)]
    assert await db.claim_idempotency(team, "live", CLAIM) == completed
    assert await db.balance(team, "live") == 4
    assert await db.pending_count() == 0
    assert await db.reconcile() == []


async def test_a_body_too_large_is_recorded_as_not_stored(db: Backend) -> None:
    team = await team_with(db, 5)
    await db.reserve_batch([req("r1", team)])
    await db.complete_idempotency(team, "live", CLAIM.key, HASH, 200, None, None)
    [result] = await db.reserve_batch([req("r2", team)])
    assert result.replay == IdempotencyRecord(
        "completed", "POST", "/api/v1/assess", HASH, 200, None, None, False
    )


async def test_an_empty_body_is_stored(db: Backend) -> None:
    team = await team_with(db, 5)
    await db.reserve_batch([req("r1", team)])
    await db.complete_idempotency(team, "live", CLAIM.key, HASH, 204, None, b"")
    [result] = await db.reserve_batch([req("r2", team)])
    assert result.replay == IdempotencyRecord(
        "completed", "POST", "/api/v1/assess", HASH, 204, None, b"", True
    )


async def test_a_large_binary_body_comes_back_byte_for_byte(db: Backend) -> None:
    team = await team_with(db, 5)
    body = bytes(range(256)) * 4096  # 1 MiB, every byte value, NULs included
    await db.reserve_batch([req("r1", team)])
    await db.complete_idempotency(team, "live", CLAIM.key, HASH, 200, "image/png", body)
    [result] = await db.reserve_batch([req("r2", team)])
    assert result.replay is not None and result.replay.body == body


async def test_completing_twice_keeps_the_first_answer(db: Backend) -> None:
    team = await team_with(db, 5)
    await db.reserve_batch([req("r1", team)])
    await db.complete_idempotency(team, "live", CLAIM.key, HASH, 200, "text/plain", b"first")
    await db.complete_idempotency(team, "live", CLAIM.key, "0" * 64, 500, None, b"second")
    record = await db.claim_idempotency(team, "live", CLAIM)
    assert record is not None
    assert (record.status, record.body, record.body_hash) == (200, b"first", HASH)


async def test_completing_an_unknown_key_changes_nothing(db: Backend, backends: Backends) -> None:
    team = await team_with(db, 5)
    await db.complete_idempotency(team, "live", "nobody", HASH, 200, None, b"x")
    await db.release_idempotency(team, "live", "nobody")
    assert await records(backends) == 0


async def test_release_deletes_an_in_flight_record_only(db: Backend) -> None:
    team = await team_with(db, 5)
    await db.reserve_batch([req("r1", team)])
    await db.void_batch(["r1"])
    await db.release_idempotency(team, "live", CLAIM.key)
    # The attempt never reached the upstream: the retry is a first attempt.
    assert await db.reserve_batch([req("r2", team)]) == [ReserveResult(True, 4)]
    await db.complete_idempotency(team, "live", CLAIM.key, HASH, 200, None, b"done")
    await db.release_idempotency(team, "live", CLAIM.key)
    [result] = await db.reserve_batch([req("r3", team)])
    assert not result.granted
    assert result.replay is not None and result.replay.state == "completed"
    assert await db.balance(team, "live") == 4


async def test_a_record_counts_for_24_hours(db: Backend, backends: Backends) -> None:
    team = await team_with(db, 5)
    await db.reserve_batch([req("r1", team)])
    await db.complete_idempotency(team, "live", CLAIM.key, HASH, 200, None, b"done")
    await age(backends, CLAIM.key, IDEMPOTENCY_TTL_SECONDS - 60)
    [result] = await db.reserve_batch([req("r2", team)])
    assert result.replay is not None and result.replay.state == "completed"
    await age(backends, CLAIM.key, 61)
    # Older than 24 hours: absent, and overwritten by the new first attempt.
    later = IdempotencyClaim(CLAIM.key, "PUT", "/api/v1/later")
    assert await db.reserve_batch([req("r3", team, 1, later)]) == [ReserveResult(True, 3)]
    assert await db.reserve_batch([req("r4", team)]) == [
        ReserveResult(False, 3, in_flight("PUT", "/api/v1/later"))
    ]
    assert await records(backends) == 1


async def test_an_expired_in_flight_record_is_absent_for_claim_idempotency_too(
    db: Backend, backends: Backends
) -> None:
    team = await team_with(db, 0)
    assert await db.claim_idempotency(team, "test", CLAIM) is None
    await age(backends, CLAIM.key, IDEMPOTENCY_TTL_SECONDS + 1)
    later = IdempotencyClaim(CLAIM.key, "DELETE", "/api/v1/x")
    assert await db.claim_idempotency(team, "test", later) is None
    assert await db.claim_idempotency(team, "test", CLAIM) == in_flight("DELETE", "/api/v1/x")


async def test_keys_are_scoped_to_team_and_environment(db: Backend) -> None:
    a = await team_with(db, 5, "a")
    b = await team_with(db, 5, "b")
    await db.grant(a, "test", 5, "seed", "test")
    results = await db.reserve_batch(
        [
            req("1", a),
            req("2", b),
            req("3", a, environment="test"),
            req("4", a),
            req("5", b),
            req("6", a, environment="test"),
        ]
    )
    assert results == [
        ReserveResult(True, 4),
        ReserveResult(True, 4),
        ReserveResult(True, 4),
        ReserveResult(False, 4, IN_FLIGHT),
        ReserveResult(False, 4, IN_FLIGHT),
        ReserveResult(False, 4, IN_FLIGHT),
    ]
    # Completing one scope leaves the others in flight.
    await db.complete_idempotency(a, "live", CLAIM.key, HASH, 200, None, b"a")
    assert await db.claim_idempotency(b, "live", CLAIM) == IN_FLIGHT
    assert await db.claim_idempotency(a, "test", CLAIM) == IN_FLIGHT
    record = await db.claim_idempotency(a, "live", CLAIM)
    assert record is not None and record.body == b"a"


async def test_keys_are_case_sensitive_and_taken_as_they_are(db: Backend) -> None:
    team = await team_with(db, 5)
    keys = ["Key", "key", "k" * 255, "~!@#$%^&*()_+{}|:\"<>?`-=[]\\;',./"]
    results = await db.reserve_batch(
        [req(f"r{i}", team, 1, IdempotencyClaim(k, "POST", "/p")) for i, k in enumerate(keys)]
    )
    assert [r.granted for r in results] == [True] * len(keys)


async def test_two_claims_with_the_same_key_in_one_batch(db: Backend) -> None:
    team = await team_with(db, 5)
    other = IdempotencyClaim("key-2", "POST", "/api/v1/assess")
    results = await db.reserve_batch(
        [
            req("1", team, 2),
            req("2", team, 1, None),
            req("3", team, 2, IdempotencyClaim(CLAIM.key, "PUT", "/x")),
            req("4", team, 9, other),  # refused: records nothing...
            req("5", team, 1, other),  # ...so this one is a first attempt
            req("6", team, 1, other),
        ]
    )
    assert results == [
        ReserveResult(True, 3),
        ReserveResult(True, 2),
        ReserveResult(False, 2, IN_FLIGHT),
        ReserveResult(False, 2),
        ReserveResult(True, 1),
        ReserveResult(False, 1, IN_FLIGHT),
    ]
    assert await db.balance(team, "live") == 1
    assert await db.pending_count() == 3
    assert await db.reconcile() == []


async def test_a_retried_reservation_id_with_its_own_claim_is_no_replay(db: Backend) -> None:
    # The same reserve run twice (its outcome was lost) is a retried id, granted
    # without taking again, as without a claim; a new attempt is still a replay.
    team = await team_with(db, 5)
    assert await db.reserve_batch([req("same", team, 2)]) == [ReserveResult(True, 3)]
    assert await db.reserve_batch([req("same", team, 2)]) == [ReserveResult(True, 3)]
    assert await db.reserve_batch([req("same", team, 2), req("same", team, 2)]) == [
        ReserveResult(True, 3),
        ReserveResult(True, 3),
    ]
    assert await db.reserve_batch([req("new", team, 2)]) == [ReserveResult(False, 3, IN_FLIGHT)]
    assert await db.pending_count() == 1
    assert await db.reconcile() == []


async def test_claim_less_reserve_batch_behaves_as_before(db: Backend, backends: Backends) -> None:
    a = await team_with(db, 5, "a")
    b = await team_with(db, 2, "b")
    await db.grant(a, "test", 1, "seed", "test")
    empty = await team_with(db, 0, "empty")
    batch = [
        req("1", b, 1, None),
        req("2", a, 3, None),
        req("3", empty, 1, None),
        req("4", a, 3, None),
        req("5", a, 1, None, "test"),
        req("6", b, 2, None),
        req("7", a, 2, None),
        req("8", b, 1, None),
        req("9", a, 1, None, "test"),
        req("2", a, 3, None),  # a retried id: granted, not taken again
    ]
    expected = [
        ReserveResult(True, 1),
        ReserveResult(True, 2),
        ReserveResult(False, 0),
        ReserveResult(False, 2),
        ReserveResult(True, 0),
        ReserveResult(False, 1),
        ReserveResult(True, 0),
        ReserveResult(True, 0),
        ReserveResult(False, 0),
        ReserveResult(False, 0),
    ]
    results = await db.reserve_batch(batch)
    assert results == expected
    assert all(r.replay is None for r in results)
    assert await db.balances(a) == {"live": 0, "test": 0}
    assert await db.pending_count() == 5
    assert await records(backends) == 0
    # The same claim-less requests inside a batch that has claims get the same answers.
    c = await team_with(db, 5, "c")
    mixed = await db.reserve_batch(
        [
            req("c1", c, 2, None),
            req("c2", c, 1),
            req("c3", c, 1, None),
            req("c4", c, 1),
            req("c5", c, 5, None),
            req("c6", c, 1, None),
        ]
    )
    assert mixed == [
        ReserveResult(True, 3),
        ReserveResult(True, 2),
        ReserveResult(True, 1),
        ReserveResult(False, 1, IN_FLIGHT),
        ReserveResult(False, 1),
        ReserveResult(True, 0),
    ]
    assert await db.reconcile() == []


# -- claim_idempotency ---------------------------------------------------------------


async def test_claim_idempotency_claims_once(db: Backend, backends: Backends) -> None:
    team = await team_with(db, 0)  # unlimited test credits: no balance at all
    assert await db.claim_idempotency(team, "test", CLAIM) is None
    assert await db.claim_idempotency(team, "test", CLAIM) == IN_FLIGHT
    other = IdempotencyClaim(CLAIM.key, "GET", "/elsewhere")
    assert await db.claim_idempotency(team, "test", other) == IN_FLIGHT
    assert await records(backends) == 1
    await db.complete_idempotency(team, "test", CLAIM.key, HASH, 200, "text/plain", b"ok")
    assert await db.claim_idempotency(team, "test", CLAIM) == IdempotencyRecord(
        "completed", "POST", "/api/v1/assess", HASH, 200, "text/plain", b"ok", True
    )


async def test_claim_idempotency_after_release_claims_afresh(db: Backend) -> None:
    team = await team_with(db, 0)
    assert await db.claim_idempotency(team, "test", CLAIM) is None
    await db.release_idempotency(team, "test", CLAIM.key)
    assert await db.claim_idempotency(team, "test", CLAIM) is None


async def test_claim_idempotency_and_reserve_see_each_others_records(db: Backend) -> None:
    team = await team_with(db, 5, env="test")
    assert await db.claim_idempotency(team, "test", CLAIM) is None
    assert await db.reserve_batch([req("r1", team, environment="test")]) == [
        ReserveResult(False, 5, IN_FLIGHT)
    ]
    other = IdempotencyClaim("key-2", "POST", "/api/v1/assess")
    await db.reserve_batch([req("r2", team, 1, other, "test")])
    assert await db.claim_idempotency(team, "test", other) == IN_FLIGHT
    assert await db.balance(team, "test") == 4
    # Held by a claim in an account without any balance: a replay, not a refusal.
    bare = await team_with(db, 0, "bare")
    assert await db.claim_idempotency(bare, "live", CLAIM) is None
    assert await db.reserve_batch([req("r3", bare)]) == [ReserveResult(False, 0, IN_FLIGHT)]


# -- concurrency ------------------------------------------------------------------------


async def test_concurrent_first_attempts_from_several_instances_one_wins(
    backends: Backends,
) -> None:
    nodes = [await backends.open() for _ in range(6)]
    db = nodes[0]
    team = await team_with(db, 1000)
    for round_ in range(5):
        claim = IdempotencyClaim(f"race-{round_}", "POST", "/api/v1/assess")
        results = await asyncio.gather(
            *(
                node.reserve_batch(
                    [req(f"n{i}-{round_}-a", team, 1, None), req(f"n{i}-{round_}", team, 3, claim)]
                )
                for i, node in enumerate(nodes)
            )
        )
        claimed = [batch[1] for batch in results]
        assert sum(r.granted for r in claimed) == 1
        assert all(
            r.replay is not None and r.replay.state == "in_flight" for r in claimed if not r.granted
        )
        assert all(batch[0].granted for batch in results)
    assert await db.balance(team, "live") == 1000 - 5 * (6 + 3)
    assert await db.reconcile() == []


async def test_concurrent_claims_and_reserves_of_one_key_one_wins(backends: Backends) -> None:
    nodes = [await backends.open() for _ in range(6)]
    db = nodes[0]
    team = await team_with(db, 100)
    for round_ in range(5):
        claim = IdempotencyClaim(f"mixed-{round_}", "POST", "/api/v1/assess")
        reserves = [
            node.reserve_batch([req(f"n{i}-{round_}", team, 1, claim)])
            for i, node in enumerate(nodes[:3])
        ]
        claims = [node.claim_idempotency(team, "live", claim) for node in nodes[3:]]
        reserved, claimed = await asyncio.gather(asyncio.gather(*reserves), asyncio.gather(*claims))
        winners = sum(batch[0].granted for batch in reserved) + sum(r is None for r in claimed)
        assert winners == 1
        assert all(r is None or r.state == "in_flight" for r in claimed)
    assert await db.reconcile() == []


async def test_concurrent_claim_idempotency_from_several_instances_one_wins(
    backends: Backends,
) -> None:
    nodes = [await backends.open() for _ in range(6)]
    team = await team_with(nodes[0], 0)
    for round_ in range(5):
        claim = IdempotencyClaim(f"unlimited-{round_}", "POST", "/api/v1/assess")
        results = await asyncio.gather(
            *(node.claim_idempotency(team, "test", claim) for node in nodes)
        )
        assert sum(r is None for r in results) == 1
        assert all(r == IN_FLIGHT for r in results if r is not None)


# -- retention and schema -------------------------------------------------------------


async def test_prune_deletes_records_created_before(db: Backend, backends: Backends) -> None:
    team = await team_with(db, 5)
    old = IdempotencyClaim("old", "POST", "/p")
    await db.reserve_batch([req("r1", team, 1, old), req("r2", team)])
    assert await db.claim_idempotency(team, "test", old) is None
    await db.complete_idempotency(team, "live", "old", HASH, 200, None, b"x")
    await age(backends, "old", 2 * IDEMPOTENCY_TTL_SECONDS)
    assert await db.prune_idempotency(time.time() - IDEMPOTENCY_TTL_SECONDS) == 2
    assert await db.prune_idempotency(time.time() - IDEMPOTENCY_TTL_SECONDS) == 0
    assert await records(backends) == 1
    assert await db.reserve_batch([req("r3", team)]) == [ReserveResult(False, 3, IN_FLIGHT)]
    assert await db.prune_idempotency(time.time() + 60) == 1
    assert await records(backends) == 0


async def test_the_previous_reserve_signature_still_works(postgres_dsn: str) -> None:
    # PostgreSQL only (SQLite has no stored functions). A rolling upgrade: the
    # release before this one keeps calling the version 1 function.
    backends = Backends("postgres", postgres_dsn)
    try:
        db = await backends.open()
        team = await team_with(db, 3)
        conn = await asyncpg.connect(postgres_dsn)
        try:
            rows = await conn.fetch(
                "SELECT granted, available FROM gateway_reserve($1, $2, $3, $4, $5, $6)",
                ["a", "b"],
                [team, team],
                ["live", "live"],
                ["k", "k"],
                [2, 2],
                60.0,
            )
        finally:
            await conn.close()
        assert [tuple(r) for r in rows] == [(True, 1), (False, 1)]
        assert await db.reconcile() == []
    finally:
        await backends.close_all()


async def test_an_attempt_in_flight_for_a_whole_lease_is_freed_by_the_sweeper(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from gateway.storage import IdempotencyClaim, ReserveRequest
    from gateway.storage.sqlite import SqliteBackend

    backend = SqliteBackend(str(tmp_path / "sweep.db"), lease_seconds=0.05)
    await backend.open()
    await backend.migrate()
    try:
        team = (await backend.create_team("t")).id
        await backend.grant(team, "live", 5, "seed", "test")
        claim = IdempotencyClaim("crashed", "POST", "/api/v1/assess")
        await backend.reserve_batch([ReserveRequest("r1", team, "live", "k", 1, claim)])
        assert (await backend.claim_idempotency(team, "live", claim)) is not None  # in flight
        import asyncio

        await asyncio.sleep(0.1)
        await backend.expire_reservations("void")
        assert await backend.claim_idempotency(team, "live", claim) is None  # free again
        assert await backend.reconcile() == []
    finally:
        await backend.close()
