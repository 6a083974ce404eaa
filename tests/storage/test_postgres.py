"""PostgreSQL only: several replicas on one database, key change notifications, failures.

"Replicas" are backend instances with pools of their own on the same
database, which is what separate gateway processes are to PostgreSQL.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest
from pydantic import SecretStr

from gateway.config import PostgresSettings
from gateway.storage import (
    IdempotencyClaim,
    KeyChange,
    ReserveRequest,
    ReserveResult,
    StorageUnavailable,
    migrations,
)
from gateway.storage.postgresql import PostgresBackend
from gateway.storage.registry import open_backend
from tests import services
from tests.storage.conftest import Databases

ALL_VERSIONS = [m.version for m in migrations.load("postgresql")]


@dataclass
class Replicas:
    """Backend instances on one database, closed after the test."""

    dsn: str
    opened: list[PostgresBackend] = field(default_factory=list)

    async def open(
        self, *, lease_seconds: float = 60.0, dsn: str | None = None, **settings: object
    ) -> PostgresBackend:
        options: dict[str, object] = {"pool_min_size": 1, "pool_max_size": 4, **settings}
        backend = PostgresBackend(
            dsn or self.dsn,
            PostgresSettings.model_validate(options),
            lease_seconds=lease_seconds,
        )
        await backend.open()
        self.opened.append(backend)
        return backend


@pytest.fixture
async def replicas(postgres_dsn: str) -> AsyncIterator[Replicas]:
    made = Replicas(postgres_dsn)
    try:
        yield made
    finally:
        for backend in made.opened:
            await backend.close()


@contextlib.asynccontextmanager
async def raw(dsn: str) -> AsyncIterator[asyncpg.Connection[asyncpg.Record]]:
    conn = await asyncpg.connect(dsn)
    try:
        yield conn
    finally:
        await conn.close()


def req(rid: str, team: str, amount: int = 1) -> ReserveRequest:
    return ReserveRequest(rid, team, "live", "key_1", amount)


async def eventually(check: Callable[[], bool], within: float, what: str) -> float:
    """Wait until ``check()``; returns how long it took."""
    start = time.monotonic()
    while not check():
        if time.monotonic() - start > within:
            pytest.fail(f"{what} did not happen within {within} s")
        await asyncio.sleep(0.01)
    return time.monotonic() - start


# -- the ledger under concurrency ----------------------------------------------------


async def test_four_replicas_never_grant_more_than_the_balance(replicas: Replicas) -> None:
    n = 150
    first = await replicas.open()
    nodes = [first] + [await replicas.open() for _ in range(3)]
    teams = [(await first.create_team(name)).id for name in ("a", "b")]
    for team in teams:
        await first.grant(team, "live", n, "seed", "test")

    # 3N requests per team, interleaved across both teams (so batches lock
    # several balance rows, in whatever order they arrive), shuffled, and sent
    # by four replicas at once in batches of 1 to 8.
    requests = [req(f"{team}-{i}", team) for i in range(3 * n) for team in teams]
    random.Random(7).shuffle(requests)
    rng = random.Random(11)
    batches: list[list[ReserveRequest]] = []
    while requests:
        size = rng.randint(1, 8)
        batches.append(requests[:size])
        del requests[:size]

    granted: dict[str, int] = dict.fromkeys(teams, 0)

    async def replica(node: PostgresBackend, mine: list[list[ReserveRequest]]) -> None:
        async def send(batch: list[ReserveRequest]) -> None:
            for request, result in zip(batch, await node.reserve_batch(batch), strict=True):
                granted[request.team_id] += result.granted
                assert result.available >= 0

        for start in range(0, len(mine), 4):
            await asyncio.gather(*(send(b) for b in mine[start : start + 4]))

    await asyncio.gather(*(replica(node, batches[i::4]) for i, node in enumerate(nodes)))

    assert granted == dict.fromkeys(teams, n)
    for team in teams:
        assert await first.balance(team, "live") == 0
    assert await first.pending_count() == 2 * n
    assert await first.reconcile() == []


async def test_racing_sweepers_and_posts_resolve_each_reservation_once(
    replicas: Replicas,
) -> None:
    total = 300
    a = await replicas.open(lease_seconds=0.3)
    b = await replicas.open(lease_seconds=0.3)
    team = (await a.create_team("t")).id
    await a.grant(team, "live", total, "seed", "test")
    ids = [f"r{i}" for i in range(total)]
    await a.reserve_batch([req(rid, team) for rid in ids])
    await asyncio.sleep(0.4)

    async def sweeper(node: PostgresBackend) -> int:
        resolved = 0
        while swept := await node.expire_reservations("void", limit=7):
            resolved += swept
        return resolved

    async def poster() -> int:
        # Posts arriving as the lease runs out: some win, the sweepers get the rest.
        return sum([await b.post_batch([(rid, 1)]) for rid in ids[::3]])

    swept_a, swept_b, posted = await asyncio.gather(sweeper(a), sweeper(b), poster())
    assert swept_a > 0 and swept_b > 0
    assert swept_a + swept_b + posted == total
    assert await a.balance(team, "live") == total - posted
    assert await a.pending_count() == 0
    assert await a.reconcile() == []
    async with raw(replicas.dsn) as conn:
        resolutions = await conn.fetch(
            "SELECT resolution, count(*) AS n FROM reservations GROUP BY resolution"
        )
    assert {r["resolution"]: r["n"] for r in resolutions} == {
        "expire_void": swept_a + swept_b,
        **({"post": posted} if posted else {}),
    }


async def test_a_reservation_id_sent_by_two_replicas_at_once_reserves_once(
    replicas: Replicas,
) -> None:
    a = await replicas.open()
    b = await replicas.open()
    team = (await a.create_team("t")).id
    await a.grant(team, "live", 100, "seed", "test")
    for i in range(20):
        first, second = await asyncio.gather(
            a.reserve_batch([req(f"same-{i}", team, 2)]),
            b.reserve_batch([req(f"same-{i}", team, 2)]),
        )
        assert first[0].granted and second[0].granted
    assert await a.balance(team, "live") == 60
    assert await a.pending_count() == 20
    assert await a.reconcile() == []


async def test_a_grant_retried_on_several_replicas_at_once_applies_once(
    replicas: Replicas,
) -> None:
    nodes = [await replicas.open() for _ in range(3)]
    team = (await nodes[0].create_team("t")).id
    answers = await asyncio.gather(
        *(
            node.grant(team, "live", 10, "purchase", "admin", "order-1")
            for node in nodes
            for _ in range(3)
        )
    )
    assert answers == [10] * 9
    assert await nodes[0].balance(team, "live") == 10
    assert len(await nodes[0].ledger_entries(team, 10, None)) == 1
    assert await nodes[0].reconcile() == []


async def test_the_lease_deadline_comes_from_the_database_clock(replicas: Replicas) -> None:
    node = await replicas.open(lease_seconds=90)
    team = (await node.create_team("t")).id
    await node.grant(team, "live", 1, "seed", "test")
    await node.reserve_batch([req("r", team)])
    async with raw(replicas.dsn) as conn:
        lease = await conn.fetchval(
            "SELECT extract(epoch FROM lease_deadline - created_at) FROM reservations"
        )
        lag = await conn.fetchval("SELECT extract(epoch FROM now() - created_at) FROM reservations")
    assert float(lease) == 90
    assert 0 <= float(lag) < 5


async def test_the_statement_cache_can_be_off(replicas: Replicas) -> None:
    # statement_cache_size=0 is what PgBouncer in transaction mode needs: no
    # named prepared statement may outlive its transaction.
    node = await replicas.open(statement_cache_size=0, pool_max_size=1)
    team = await node.create_team("t")
    await node.grant(team.id, "live", 5, "seed", "test")
    for i in range(3):
        await node.reserve_batch([req(f"r{i}", team.id), req(f"r{i}b", team.id)])
    assert await node.post_batch([("r0", 1)]) == 1
    assert await node.void_batch(["r1", "r1b"]) == 2
    key = await node.create_key(team.id, "k", "live", "hash-1", "ckiq_live_abcd", None, None)
    assert (await node.revoke_key(key.id)).revoked_at is not None
    assert await node.reconcile() == []
    assert await node.balance(team.id, "live") == 2
    async with node._connection() as conn:  # the one pooled connection
        assert await conn.fetchval("SELECT count(*) FROM pg_prepared_statements") == 0


async def test_reserve_and_post_never_scan_the_whole_reservations_table(
    replicas: Replicas,
) -> None:
    # PL/pgSQL caches a generic plan after five calls, blind to how many ids a
    # batch holds: for posts that was a hash join over a sequential scan, and
    # every flush then read every reservation ever made.
    node = await replicas.open(pool_max_size=1)
    team = await node.create_team("t")
    await node.grant(team.id, "live", 10_000, "seed", "test")
    async with node._connection() as conn, conn.transaction():
        for i in range(12):
            ids = [f"scan-{i}-{j}" for j in range(200)]
            rows = await conn.fetch(
                "SELECT * FROM gateway_reserve($1, $2, $3, $4, $5, 60.0)",
                ids,
                [team.id] * 200,
                ["live"] * 200,
                ["key_1"] * 200,
                [1] * 200,
            )
            assert all(r["granted"] for r in rows)
            posted = await conn.fetchval("SELECT gateway_resolve($1, $2, 'post')", ids, [1] * 200)
            assert posted == 200
        scans = await conn.fetchrow(
            "SELECT seq_scan, idx_scan FROM pg_stat_xact_user_tables WHERE relname = 'reservations'"
        )
    assert scans is not None
    assert scans["idx_scan"] >= 24  # the lookups were seen, and all went by index
    assert scans["seq_scan"] == 0


async def test_hot_ledger_functions_keep_one_plan_without_sequential_scans(
    replicas: Replicas,
) -> None:
    # Planned per call, the reserve spent more time planning than running
    # (migration 5); a cached plan is only safe because none may scan a table.
    node = await replicas.open()
    async with node._connection() as conn:
        rows = await conn.fetch(
            "SELECT p.oid::regprocedure::text AS signature, p.proconfig FROM pg_proc p "
            "WHERE p.proname IN ('gateway_reserve', 'gateway_reserve_one', 'gateway_resolve', "
            "'gateway_claim_idempotency') "
            "AND p.prolang = (SELECT oid FROM pg_language WHERE lanname = 'plpgsql')"
        )
    assert len(rows) == 4, [r["signature"] for r in rows]
    for row in rows:
        settings = set(row["proconfig"] or [])
        assert {"plan_cache_mode=force_generic_plan", "enable_seqscan=off"} <= settings, row


async def test_a_lone_reservation_is_answered_as_the_batch_function_would(
    replicas: Replicas,
) -> None:
    # gateway_reserve_one (migration 6) stands in for gateway_reserve on a batch
    # of one without a claim: same answers and same writes, case by case, each
    # case run through both functions on twin accounts.
    node = await replicas.open()
    cases = [
        # balance row, amount, id already reserved -> granted, available, balance, rows
        ((None, 1, False), (False, 0, 0, 0)),  # no balance row
        ((0, 1, False), (False, 0, 0, 0)),
        ((4, 5, False), (False, 4, 4, 0)),  # short
        ((5, 5, False), (True, 0, 0, 1)),  # exactly enough
        ((9, 2, False), (True, 7, 7, 1)),
        ((9, 2, True), (True, 9, 9, 1)),  # a retry: granted, nothing taken twice
        ((1, 2, True), (False, 1, 1, 1)),  # a retry once the balance fell short
    ]
    async with node._connection() as conn:
        for n, ((balance, amount, retry), expected) in enumerate(cases):
            for function in ("batch", "one"):
                team = (await node.create_team(f"twin-{n}-{function}")).id
                if balance is not None:
                    await conn.execute(
                        "INSERT INTO balances (team_id, environment, available) "
                        "VALUES ($1, 'live', $2)",
                        team,
                        balance,
                    )
                rid = f"one-{n}-{function}"
                if retry:
                    await conn.execute(
                        "INSERT INTO reservations (id, team_id, environment, key_id, amount, "
                        "created_at, lease_deadline) "
                        "VALUES ($1, $2, 'live', 'key_1', $3, now(), now() + interval '1 minute')",
                        rid,
                        team,
                        amount,
                    )
                if function == "batch":
                    row = await conn.fetchrow(
                        "SELECT granted, available FROM gateway_reserve($1, $2, $3, $4, $5, 60.0)",
                        [rid],
                        [team],
                        ["live"],
                        ["key_1"],
                        [amount],
                    )
                else:
                    row = await conn.fetchrow(
                        "SELECT granted, available "
                        "FROM gateway_reserve_one($1, $2, 'live', 'key_1', $3, 60.0)",
                        rid,
                        team,
                        amount,
                    )
                assert row is not None
                rows = await conn.fetchval(
                    "SELECT count(*) FROM reservations WHERE team_id = $1", team
                )
                got = (row["granted"], row["available"], await node.balance(team, "live"), rows)
                assert got == expected, (function, cases[n], got)


async def test_reserve_batch_sends_a_lone_unclaimed_reservation_to_the_lean_function(
    replicas: Replicas, postgres_dsn: str
) -> None:
    node = await replicas.open()
    team = (await node.create_team("lean")).id
    await node.grant(team, "live", 10, "seed", "test")
    # This test's own database: the lean function is wrapped to leave a trace.
    async with raw(postgres_dsn) as conn:
        await conn.execute(
            "CREATE TABLE lean_calls (id text); "
            "ALTER FUNCTION gateway_reserve_one(text, text, text, text, integer, double precision) "
            "RENAME TO gateway_reserve_one_inner; "
            "CREATE FUNCTION gateway_reserve_one(a text, b text, c text, d text, e integer, "
            "f double precision) RETURNS TABLE (granted boolean, available bigint) "
            "LANGUAGE sql AS $$ INSERT INTO lean_calls VALUES (a); "
            "SELECT * FROM gateway_reserve_one_inner(a, b, c, d, e, f) $$"
        )
    assert await node.reserve_batch([ReserveRequest("r1", team, "live", "key_1", 4)]) == [
        ReserveResult(True, 6)
    ]
    claimed = IdempotencyClaim("idem-1", "POST", "/x")
    assert await node.reserve_batch([ReserveRequest("r2", team, "live", "key_1", 1, claimed)]) == [
        ReserveResult(True, 5)
    ]
    both = [ReserveRequest(f"r{i}", team, "live", "key_1", 3) for i in (3, 4)]
    assert await node.reserve_batch(both) == [ReserveResult(True, 2), ReserveResult(False, 2)]
    assert await node.reserve_batch([ReserveRequest("r5", team, "live", "key_1", 3)]) == [
        ReserveResult(False, 2)
    ]
    async with raw(postgres_dsn) as conn:
        lean = [r["id"] for r in await conn.fetch("SELECT id FROM lean_calls")]
    assert lean == ["r1", "r5"]  # not the claim, not the batch of two
    assert await node.balance(team, "live") == 2


async def test_reserve_keeps_one_connection_and_replaces_it_when_it_breaks(
    replicas: Replicas, postgres_dsn: str
) -> None:
    node = await replicas.open(pool_max_size=3)
    team = (await node.create_team("pinned")).id
    await node.grant(team, "live", 100, "seed", "test")

    def one(rid: str) -> list[ReserveRequest]:
        return [ReserveRequest(rid, team, "live", "key_1", 1)]

    async def reserving_sessions(conn: asyncpg.Connection[asyncpg.Record]) -> set[int]:
        rows = await conn.fetch(
            "SELECT pid FROM pg_stat_activity WHERE datname = current_database() "
            "AND query LIKE '%gateway_reserve_one%' AND pid <> pg_backend_pid()"
        )
        return {r["pid"] for r in rows}

    async with raw(postgres_dsn) as conn:
        for n in range(5):
            assert await node.reserve_batch(one(f"p{n}")) == [ReserveResult(True, 99 - n)]
        first = await reserving_sessions(conn)
        assert len(first) == 1  # every batch on the same session
        # Concurrent callers do not wait for it: the others go through the pool.
        results = await asyncio.gather(*(node.reserve_batch(one(f"c{n}")) for n in range(6)))
        assert sorted(r[0].available for r in results) == list(range(89, 95))
        # The kept session dies. If the gateway has not seen the server's goodbye
        # yet, the batch sent on it fails as unavailable (and was never applied);
        # if it has, the session is replaced first. Either way the next batch
        # gets a new session.
        await conn.execute("SELECT pg_terminate_backend($1)", first.pop())
        try:
            applied = len(await node.reserve_batch(one("after-kill")))
        except StorageUnavailable:
            applied = 0
        assert await node.reserve_batch(one("again")) == [ReserveResult(True, 88 - applied)]
        # Ended while idle, once its close has arrived: never used, replaced.
        await conn.execute(
            "SELECT pg_terminate_backend($1)", (await reserving_sessions(conn)).pop()
        )
        await asyncio.sleep(0.3)
        assert await node.reserve_batch(one("closed")) == [ReserveResult(True, 87 - applied)]
    assert await node.balance(team, "live") == 87 - applied
    await node.close()  # returns the kept connection: close does not wait for it


async def test_close_during_a_reserve_batch_waits_for_it_not_for_the_timeout(
    replicas: Replicas, postgres_dsn: str
) -> None:
    node = await replicas.open(pool_max_size=3, command_timeout_seconds=3)
    team = (await node.create_team("closing")).id
    await node.grant(team, "live", 10, "seed", "test")
    assert await node.reserve_batch([ReserveRequest("warm", team, "live", "k", 1)])
    loop = asyncio.get_running_loop()
    async with raw(postgres_dsn) as conn:
        # Hold the team's balance row: the next batch waits on the kept connection.
        holding = conn.transaction()
        await holding.start()
        await conn.execute("SELECT 1 FROM balances WHERE team_id = $1 FOR UPDATE", team)
        reserving = asyncio.create_task(
            node.reserve_batch([ReserveRequest("late", team, "live", "k", 1)])
        )
        await asyncio.sleep(0.2)
        closing = asyncio.create_task(node.close())
        await asyncio.sleep(0.2)
        assert not reserving.done() and not closing.done()
        await holding.commit()
        released = loop.time()
        assert await reserving == [ReserveResult(True, 8)]
        await closing
        # The batch handed its connection back as it finished: pool.close() did
        # not wait out the 3 s command timeout for it.
        assert loop.time() - released < 2.0


async def test_a_small_pool_keeps_no_connection_for_reserves(replicas: Replicas) -> None:
    node = await replicas.open(pool_min_size=1, pool_max_size=2)
    team = (await node.create_team("small")).id
    await node.grant(team, "live", 10, "seed", "test")
    for n in range(3):
        assert await node.reserve_batch([ReserveRequest(f"s{n}", team, "live", "k", 1)]) == [
            ReserveResult(True, 9 - n)
        ]
    assert node._pinned is None  # both connections stay in the pool


async def test_open_backend_picks_postgres_for_both_url_schemes(postgres_dsn: str) -> None:
    for dsn in (postgres_dsn, "postgres://" + postgres_dsn.split("://", 1)[1]):
        backend = open_backend(dsn, lease_seconds=60, postgres=PostgresSettings(pool_min_size=1))
        assert isinstance(backend, PostgresBackend)
        await backend.open()
        try:
            await backend.ping()
        finally:
            await backend.close()


async def test_roll_up_by_two_replicas_at_once_counts_each_reservation_once(
    replicas: Replicas,
) -> None:
    a = await replicas.open()
    b = await replicas.open()
    team = (await a.create_team("t")).id
    await a.grant(team, "live", 500, "seed", "test")
    ids = [f"r{i}" for i in range(500)]
    await a.reserve_batch([req(rid, team) for rid in ids])
    await a.post_batch([(rid, i % 2) for i, rid in enumerate(ids)])
    rolled = await asyncio.gather(a.roll_up(0), b.roll_up(0))
    assert sum(rolled) == 500
    assert await a.reconcile() == []
    assert await a.balance(team, "live") == 250
    async with raw(replicas.dsn) as conn:
        row = await conn.fetchrow("SELECT reservations, reserved, charged FROM reservation_rollups")
    assert row is not None and tuple(row) == (500, 500, 250)


# -- migrations ---------------------------------------------------------------------


async def test_replicas_migrating_at_once_apply_each_version_once(databases: Databases) -> None:
    blank = Replicas(await databases.blank())
    try:
        nodes = [await blank.open() for _ in range(4)]
        applied = await asyncio.gather(*(node.migrate() for node in nodes))
        assert sorted(v for versions in applied for v in versions) == ALL_VERSIONS
        assert await nodes[0].migrate() == []
        async with raw(blank.dsn) as conn:
            recorded = await conn.fetch("SELECT version FROM schema_migrations ORDER BY version")
        assert [r["version"] for r in recorded] == ALL_VERSIONS
    finally:
        for node in blank.opened:
            await node.close()


# -- key change notifications ---------------------------------------------------------


@dataclass
class Listener:
    """Runs ``listen_key_changes`` and records what it reports."""

    changes: list[KeyChange] = field(default_factory=list)
    connected: int = 0
    lost: int = 0
    task: asyncio.Task[None] | None = None

    def start(self, backend: PostgresBackend) -> None:
        self.task = asyncio.create_task(
            backend.listen_key_changes(self.changes.append, self._connected, self._lost)
        )

    def _connected(self) -> None:
        self.connected += 1

    def _lost(self) -> None:
        self.lost += 1

    async def stop(self) -> None:
        assert self.task is not None
        self.task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.task
        assert self.task.cancelled()


@pytest.fixture
async def listener() -> AsyncIterator[Listener]:
    made = Listener()
    try:
        yield made
    finally:
        if made.task is not None:
            await made.stop()


async def test_a_key_write_on_one_replica_reaches_another_within_a_second(
    replicas: Replicas, listener: Listener
) -> None:
    writer = await replicas.open()
    reader = await replicas.open()
    listener.start(reader)
    await eventually(lambda: listener.connected == 1, 5, "connecting")
    team = await writer.create_team("t")

    key = await writer.create_key(team.id, "k", "live", "hash-1", "ckiq_live_abcd", None, None)
    took = await eventually(lambda: len(listener.changes) == 1, 1.0, "the create notification")
    await writer.revoke_key(key.id)
    took = max(took, await eventually(lambda: len(listener.changes) == 2, 1.0, "the revoke"))
    assert took < 1.0
    assert [(c.key_hash, c.team_id) for c in listener.changes] == [("hash-1", None)] * 2
    # The notifications carry the feed's numbers.
    _, feed, _ = await reader.key_changes_since(0)
    assert listener.changes == feed

    # Writes that do not go through the backend are announced all the same.
    async with raw(replicas.dsn) as conn:
        await conn.execute("UPDATE teams SET rate_limit_per_minute = 5 WHERE id = $1", team.id)
        await conn.execute("UPDATE api_keys SET disabled = true WHERE id = $1", key.id)
        await conn.execute("UPDATE api_keys SET last_used_at = now() WHERE id = $1", key.id)
        await conn.execute("UPDATE teams SET name = 'renamed' WHERE id = $1", team.id)
    await eventually(lambda: len(listener.changes) == 4, 1.0, "the raw updates")
    assert [(c.key_hash, c.team_id) for c in listener.changes[2:]] == [
        (None, team.id),
        ("hash-1", None),
    ]
    await asyncio.sleep(0.2)
    assert len(listener.changes) == 4  # last_used_at and names change nothing cached
    assert listener.lost == 0


async def test_a_rotation_racing_an_update_of_the_same_key_does_not_deadlock(
    replicas: Replicas,
) -> None:
    node = await replicas.open()
    team = await node.create_team("t")
    old = await node.create_key(team.id, "k", "live", "hash-old", "ckiq_live_abcd", None, None)
    before = await node.latest_key_change()
    async with raw(replicas.dsn) as rotation, raw(replicas.dsn) as update:
        await rotation.execute("BEGIN")
        await rotation.execute(
            "INSERT INTO api_keys (id, team_id, name, prefix, key_hash, environment) "
            "VALUES ('key_new', $1, 'k', 'ckiq_live_efgh', 'hash-new', 'live')",
            team.id,
        )
        await update.execute("BEGIN")
        await update.execute("UPDATE api_keys SET disabled = true WHERE id = $1", old.id, timeout=2)
        # The rotation now waits for the update's row lock; the update must be
        # able to log its change and commit all the same.
        expire = asyncio.create_task(
            rotation.execute("UPDATE api_keys SET expires_at = now() WHERE id = $1", old.id)
        )
        await asyncio.sleep(0.1)
        await asyncio.wait_for(update.execute("COMMIT"), 2)
        await asyncio.wait_for(expire, 2)
        await rotation.execute("COMMIT")
    _, changes, _ = await node.key_changes_since(before)
    assert sorted(c.key_hash or "" for c in changes) == ["hash-new", "hash-old", "hash-old"]


async def test_a_killed_listen_connection_is_reported_and_restored(
    replicas: Replicas, listener: Listener
) -> None:
    node = await replicas.open()
    listener.start(node)
    await eventually(lambda: listener.connected == 1, 5, "connecting")
    database = urlsplit(replicas.dsn).path.lstrip("/")
    async with raw(replicas.dsn) as conn:
        killed = await conn.fetchval(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
            "WHERE datname = $1 AND application_name = 'gateway-listen'",
            database,
        )
    assert killed == 1
    await eventually(lambda: listener.lost == 1, 1.0, "noticing the loss")
    await eventually(lambda: listener.connected == 2, 3.0, "reconnecting")

    team = await node.create_team("t")
    await node.create_key(team.id, "k", "live", "hash-1", "ckiq_live_abcd", None, None)
    await eventually(lambda: len(listener.changes) == 1, 1.0, "a notification after reconnecting")


async def test_listen_dsn_is_used_for_listening(
    replicas: Replicas, listener: Listener, postgres_dsn: str
) -> None:
    # The pool points nowhere; only the LISTEN connection can work.
    proxy = await TcpProxy.start(postgres_dsn)
    try:
        node = await replicas.open(dsn=proxy.dsn, listen_dsn=SecretStr(postgres_dsn))
        await proxy.stop()
        listener.start(node)
        await eventually(lambda: listener.connected == 1, 5, "connecting")
        with pytest.raises(StorageUnavailable):
            await node.ping()
    finally:
        await proxy.stop()


# -- failures ---------------------------------------------------------------------------


@dataclass
class TcpProxy:
    """A loopback TCP forwarder to the test server that a test can cut, like a network."""

    target: tuple[str, int]
    dsn: str
    port: int
    server: asyncio.Server | None = None
    writers: set[asyncio.StreamWriter] = field(default_factory=set)

    @classmethod
    async def start(cls, dsn: str) -> TcpProxy:
        parts = urlsplit(dsn)
        port = services.free_port()
        netloc = f"{parts.username}@127.0.0.1:{port}" if parts.username else f"127.0.0.1:{port}"
        proxy = cls(
            (parts.hostname or "127.0.0.1", parts.port or 5432),
            urlunsplit(parts._replace(netloc=netloc)),
            port,
        )
        await proxy.resume()
        return proxy

    async def resume(self) -> None:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", self.port)

    async def stop(self) -> None:
        """Refuse new connections and cut every open one."""
        if self.server is not None:
            self.server.close()
            self.server = None
        for writer in list(self.writers):
            writer.transport.abort()
        self.writers.clear()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection(*self.target)
        self.writers |= {writer, up_writer}

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            with contextlib.suppress(OSError):
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            dst.transport.abort()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))
        self.writers -= {writer, up_writer}


async def test_an_unreachable_server_is_storage_unavailable(listener: Listener) -> None:
    port = services.free_port()
    backend = PostgresBackend(
        f"postgresql://postgres@127.0.0.1:{port}/postgres",
        PostgresSettings(pool_min_size=1, command_timeout_seconds=1),
        lease_seconds=60,
    )
    with pytest.raises(StorageUnavailable):
        await backend.open()
    with pytest.raises(StorageUnavailable):
        await backend.reserve_batch([req("r", "team")])
    # The listener keeps trying (and can be stopped) without reporting a connection.
    listener.start(backend)
    await asyncio.sleep(0.3)
    assert (listener.connected, listener.lost, listener.changes) == (0, 0, [])
    await backend.close()


async def test_losing_the_server_after_opening_is_storage_unavailable_then_recovers(
    replicas: Replicas, listener: Listener
) -> None:
    proxy = await TcpProxy.start(replicas.dsn)
    try:
        node = await replicas.open(dsn=proxy.dsn, command_timeout_seconds=1)
        team = (await node.create_team("t")).id
        await node.grant(team, "live", 5, "seed", "test")
        listener.start(node)
        await eventually(lambda: listener.connected == 1, 5, "connecting")

        await proxy.stop()
        started = time.monotonic()
        with pytest.raises(StorageUnavailable):
            await node.reserve_batch([req("r1", team)])
        with pytest.raises(StorageUnavailable):
            await node.balance(team, "live")
        with pytest.raises(StorageUnavailable):
            await node.create_team("u")
        assert time.monotonic() - started < 5
        await eventually(lambda: listener.lost == 1, 1.0, "the listener noticing")

        await proxy.resume()
        await eventually(lambda: listener.connected == 2, 5, "the listener reconnecting")
        results = await node.reserve_batch([req("r2", team)])
        assert results[0].granted
        assert await node.reconcile() == []
    finally:
        await proxy.stop()


async def test_pooled_connections_killed_by_the_server_are_replaced(replicas: Replicas) -> None:
    node = await replicas.open(pool_min_size=2, pool_max_size=2)
    team = (await node.create_team("t")).id
    database = urlsplit(replicas.dsn).path.lstrip("/")
    async with raw(replicas.dsn) as conn:
        killed = await conn.fetchval(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
            "WHERE datname = $1 AND application_name = 'gateway'",
            database,
        )
    assert killed == 2
    await asyncio.sleep(0.1)
    await node.grant(team, "live", 1, "seed", "test")
    assert await node.balance(team, "live") == 1


async def test_a_statement_that_times_out_is_storage_unavailable_and_leaves_nothing(
    replicas: Replicas,
) -> None:
    node = await replicas.open(command_timeout_seconds=0.3)
    team = (await node.create_team("t")).id
    await node.grant(team, "live", 5, "seed", "test")
    async with raw(replicas.dsn) as conn, conn.transaction():
        # Someone holds the balance row (a stuck transaction, a long migration).
        await conn.execute("SELECT 1 FROM balances WHERE team_id = $1 FOR UPDATE", team)
        started = time.monotonic()
        with pytest.raises(StorageUnavailable):
            await node.reserve_batch([req("r", team)])
        assert time.monotonic() - started < 2
    # The timed-out statement was cancelled, not left to finish later.
    await asyncio.sleep(0.1)
    assert await node.balance(team, "live") == 5
    assert await node.pending_count() == 0
    assert (await node.reserve_batch([req("r2", team)]))[0].granted
