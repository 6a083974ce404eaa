"""The two-phase ledger under random sequences of operations, on both backends at once.

A hypothesis state machine drives a SQLite file and a PostgreSQL database of
its own side by side through grants and adjustments (some under an
Idempotency-Key, some replayed), reservations in batches (some claiming an
Idempotency-Key, some retrying an id), full, partial and late posts, voids,
the sweeper after a lease ran out, roll-ups, and the idempotency records'
complete / release / claim. After every step both backends must give the same
answers and the same balances, none below zero, reconcile() must find nothing,
and both must agree with a plain-Python model of the ledger, so that a bug the
two backends share is caught too.

Only the public Backend protocol and ``open_backend`` are used, so this holds
whatever the backends look like inside.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import pytest
from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from gateway.config import PostgresSettings
from gateway.models import Environment
from gateway.storage import (
    MAX_BALANCE,
    Backend,
    GrantResult,
    IdempotencyClaim,
    IdempotencyRecord,
    ReserveRequest,
    ReserveResult,
    StorageError,
)
from gateway.storage.registry import open_backend
from tests.storage.conftest import create_database, drop_database, unique_name

T = TypeVar("T")

# A lease this short runs out during the expire step's sleep, and never matters
# anywhere else: only expire_reservations looks at leases.
LEASE_SECONDS = 0.05
EXPIRE_SLEEP_SECONDS = 3 * LEASE_SECONDS
MAX_TEAMS = 3
ENVIRONMENTS: tuple[Environment, ...] = ("live", "test")
GRANT_KEYS = ("order-1", "order-2", "order-3")
IDEMPOTENCY_KEYS = ("idem-a", "idem-b")
METHOD, PATH = "POST", "/v1/score"

Account = tuple[int, Environment]  # (team number, environment)
# What a call came to: its answer, or the kind of refusal it raised.
Outcome = tuple[str, object]


@dataclass
class Reservation:
    account: Account
    amount: int
    pending: bool = True


@dataclass
class GrantSeen:
    environment: Environment
    amount: int
    request_hash: str | None
    balance_after: int


@dataclass
class Model:
    """The ledger as plain Python: what both backends must agree with."""

    balances: dict[Account, int] = field(default_factory=dict)
    # Reservations not rolled up yet, pending or resolved, by id.
    reservations: dict[str, Reservation] = field(default_factory=dict)
    # Grant Idempotency-Keys per team.
    grants: dict[tuple[int, str], GrantSeen] = field(default_factory=dict)
    # Idempotency records per (account, key): the record, and the reservation that made it.
    held: dict[tuple[Account, str], tuple[IdempotencyRecord, str | None]] = field(
        default_factory=dict
    )

    def pending(self) -> list[str]:
        return sorted(rid for rid, r in self.reservations.items() if r.pending)

    def resolve(self, rid: str, charged: int) -> bool:
        reservation = self.reservations.get(rid)
        if reservation is None or not reservation.pending:
            return False
        reservation.pending = False
        self.balances[reservation.account] += reservation.amount - min(
            max(charged, 0), reservation.amount
        )
        return True


def in_flight(method: str, path: str) -> IdempotencyRecord:
    return IdempotencyRecord("in_flight", method, path, None, None, None, None, False)


async def outcome(call: Awaitable[T]) -> Outcome:
    try:
        return ("ok", await call)
    except StorageError as exc:
        return ("refused", type(exc).__name__)


request_strategy = st.tuples(
    st.integers(0, MAX_TEAMS - 1),
    st.sampled_from(ENVIRONMENTS),
    st.integers(1, 8),
    # A fresh id, the previous id of this batch again, or a retry of a known id.
    st.one_of(st.just("new"), st.just("again"), st.integers(0, 60)),
    st.one_of(st.none(), st.sampled_from(IDEMPOTENCY_KEYS)),
)
charge_strategy = st.sampled_from(("full", "partial", "zero", "over", "negative"))
pick_strategy = st.tuples(st.booleans(), st.integers(0, 60))


class LedgerMachine(RuleBasedStateMachine):
    """SQLite and PostgreSQL side by side, and the model beside them."""

    admin_dsn: str = ""
    template: str = ""
    directory: Path = Path()
    runs = 0

    def __init__(self) -> None:
        super().__init__()
        LedgerMachine.runs += 1
        self.model = Model()
        self.teams: list[tuple[str, str]] = []  # (SQLite id, PostgreSQL id) per team number
        self.next_id = 0
        self.loop = asyncio.new_event_loop()
        self.database: str | None = None
        self.sqlite_path = self.directory / f"ledger-{self.runs}.db"
        self.opened: list[Backend] = []
        try:
            self.sqlite, self.postgres = self.run(self._open())
        except BaseException:
            self.teardown()
            raise

    async def _open(self) -> tuple[Backend, Backend]:
        sqlite = open_backend(f"sqlite:///{self.sqlite_path}", lease_seconds=LEASE_SECONDS)
        await sqlite.open()
        self.opened.append(sqlite)
        await sqlite.migrate()
        self.database = unique_name("ledger_machine")
        dsn = await create_database(self.admin_dsn, self.database, self.template)
        postgres = open_backend(
            dsn,
            lease_seconds=LEASE_SECONDS,
            postgres=PostgresSettings(pool_min_size=1, pool_max_size=2),
        )
        await postgres.open()
        self.opened.append(postgres)
        await postgres.migrate()  # the template is migrated already: nothing to do
        return sqlite, postgres

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        return self.loop.run_until_complete(coro)

    def both(self, call: Callable[[Backend, int], Awaitable[T]]) -> tuple[Outcome, Outcome]:
        """The outcome of ``call`` on each backend (the int picks its team ids)."""
        return self.run(outcome(call(self.sqlite, 0))), self.run(outcome(call(self.postgres, 1)))

    def team_id(self, backend: int, team: int) -> str:
        return self.teams[team][backend]

    def fresh_id(self) -> str:
        self.next_id += 1
        return f"res-{self.next_id}"

    def teardown(self) -> None:
        async def close() -> None:
            try:
                for backend in reversed(self.opened):
                    await backend.close()
            finally:
                if self.database is not None:
                    await drop_database(self.admin_dsn, self.database)

        try:
            self.run(close())
        finally:
            self.loop.run_until_complete(self.loop.shutdown_asyncgens())
            self.loop.run_until_complete(self.loop.shutdown_default_executor())
            self.loop.close()
            for suffix in ("", "-wal", "-shm"):
                Path(f"{self.sqlite_path}{suffix}").unlink(missing_ok=True)

    # -- teams ----------------------------------------------------------------------

    @initialize(live=st.integers(0, 40), test=st.integers(0, 40))
    def first_team(self, live: int, test: int) -> None:
        self.create_team()
        self.grant(0, "live", live, "seed", None, None)
        self.grant(0, "test", test, "seed", None, None)

    @precondition(lambda self: len(self.teams) < MAX_TEAMS)
    @rule()
    def create_team(self) -> None:
        name = f"team-{len(self.teams)}"
        sqlite, postgres = (
            self.run(self.sqlite.create_team(name)),
            self.run(self.postgres.create_team(name)),
        )
        assert sqlite.name == postgres.name == name
        number = len(self.teams)
        self.teams.append((sqlite.id, postgres.id))
        for environment in ENVIRONMENTS:
            self.model.balances[(number, environment)] = 0

    def account(self, team: int, environment: Environment) -> Account:
        return (team % len(self.teams), environment)

    # -- grants ---------------------------------------------------------------------

    def grant(
        self,
        team: int,
        environment: Environment,
        amount: int,
        reason: str,
        key: str | None,
        request_hash: str | None,
    ) -> None:
        account = self.account(team, environment)
        number = account[0]

        def call(db: Backend, backend: int) -> Awaitable[GrantResult]:
            return db.apply_grant(
                self.team_id(backend, number),
                environment,
                amount,
                reason,
                "test",
                key,
                request_hash,
            )

        sqlite, postgres = self.both(call)
        expected = self.expect_grant(account, amount, key, request_hash)
        assert sqlite == postgres == expected, (sqlite, postgres, expected)
        answer = expected[1]
        if isinstance(answer, GrantResult):
            event("grant: replayed" if answer.replayed else "grant: applied")
        else:
            event(f"grant: refused, {answer}")

    def expect_grant(
        self, account: Account, amount: int, key: str | None, request_hash: str | None
    ) -> Outcome:
        number, environment = account
        seen = None if key is None else self.model.grants.get((number, key))
        if seen is not None:
            if seen.request_hash is not None and request_hash is not None:
                same = seen.request_hash == request_hash
            else:
                same = (seen.amount, seen.environment) == (amount, environment)
            if not same:
                return ("refused", "KeyReused")
            return ("ok", GrantResult(seen.balance_after, replayed=True))
        after = self.model.balances[account] + amount
        if not 0 <= after <= MAX_BALANCE:
            return ("refused", "Conflict")
        self.model.balances[account] = after
        if key is not None:
            self.model.grants[(number, key)] = GrantSeen(environment, amount, request_hash, after)
        return ("ok", GrantResult(after, replayed=False))

    @rule(
        team=st.integers(0, MAX_TEAMS - 1),
        environment=st.sampled_from(ENVIRONMENTS),
        # Adjustments below zero (refused when they would take the balance
        # there) and a grant up to the bound (refused past it).
        amount=st.one_of(st.integers(-30, 80), st.just(MAX_BALANCE)),
        reason=st.sampled_from(("purchase", "correction")),
        key=st.one_of(st.none(), st.sampled_from(GRANT_KEYS)),
        hashed=st.booleans(),
    )
    def grant_credits(
        self,
        team: int,
        environment: Environment,
        amount: int,
        reason: str,
        key: str | None,
        hashed: bool,
    ) -> None:
        request_hash = None
        if hashed:
            request_hash = hashlib.sha256(f"{environment} {amount} {reason}".encode()).hexdigest()
        self.grant(team, environment, amount, reason, key, request_hash)

    @precondition(lambda self: self.model.grants)
    @rule(pick=st.integers(0, 60), changed=st.booleans(), hashed=st.booleans())
    def replay_grant(self, pick: int, changed: bool, hashed: bool) -> None:
        """A grant sent again under its Idempotency-Key: the same request, or another."""
        (number, key), seen = sorted(self.model.grants.items())[pick % len(self.model.grants)]
        amount = seen.amount + 1 if changed else seen.amount
        request_hash = seen.request_hash if hashed else None
        if changed and request_hash is not None:
            request_hash = hashlib.sha256(request_hash.encode()).hexdigest()
        self.grant(number, seen.environment, amount, "replayed", key, request_hash)

    # -- reservations ---------------------------------------------------------------

    @rule(requests=st.lists(request_strategy, min_size=1, max_size=5))
    def reserve(self, requests: list[tuple[int, Environment, int, str | int, str | None]]) -> None:
        batch: list[tuple[Account, str, int, str | None]] = []
        known = sorted(self.model.reservations)
        for team, environment, amount, which, key in requests:
            if which == "again" and batch:
                rid = batch[-1][1]
            elif isinstance(which, int) and known:
                rid = known[which % len(known)]
            else:
                rid = self.fresh_id()
            batch.append((self.account(team, environment), rid, amount, key))

        def call(db: Backend, backend: int) -> Awaitable[list[ReserveResult]]:
            return db.reserve_batch(
                [
                    ReserveRequest(
                        rid,
                        self.team_id(backend, number),
                        environment,
                        "key_1",
                        amount,
                        None if key is None else IdempotencyClaim(key, METHOD, PATH),
                    )
                    for (number, environment), rid, amount, key in batch
                ]
            )

        sqlite, postgres = self.both(call)
        expected = ("ok", self.expect_reserve(batch))
        assert sqlite == postgres == expected, (batch, sqlite, postgres, expected)
        for result in expected[1]:
            event("reserve: " + ("replay" if result.replay else str(result.granted)))

    def expect_reserve(
        self, batch: list[tuple[Account, str, int, str | None]]
    ) -> list[ReserveResult]:
        """Greedy in request order per account; an id known already is never taken twice."""
        model = self.model
        results: list[ReserveResult] = []
        for account, rid, amount, key in batch:
            have = model.balances[account]
            held = None if key is None else model.held.get((account, key))
            if held is not None and held[1] != rid:
                results.append(ReserveResult(False, have, held[0]))
                continue
            if have < amount:
                results.append(ReserveResult(False, have))
                continue
            if rid not in model.reservations:
                model.reservations[rid] = Reservation(account, amount)
                model.balances[account] = have = have - amount
            if key is not None and held is None:
                model.held[(account, key)] = (in_flight(METHOD, PATH), rid)
            results.append(ReserveResult(True, have))
        return results

    def pick(self, pending_only: bool, index: int) -> str:
        pending = self.model.pending()
        pool = pending if pending_only and pending else [*sorted(self.model.reservations), "nope"]
        return pool[index % len(pool)]

    @precondition(lambda self: self.model.reservations)
    @rule(
        items=st.lists(
            st.tuples(pick_strategy, charge_strategy, st.integers(0, 20)), min_size=1, max_size=4
        )
    )
    def post(self, items: list[tuple[tuple[bool, int], str, int]]) -> None:
        posts: list[tuple[str, int]] = []
        for (pending_only, index), how, n in items:
            rid = self.pick(pending_only, index)
            reservation = self.model.reservations.get(rid)
            amount = 1 if reservation is None else reservation.amount
            charge = {
                "full": amount,
                "partial": n % amount,
                "zero": 0,
                "over": amount + n + 1,
                "negative": -(n + 1),
            }[how]
            posts.append((rid, charge))
        sqlite, postgres = self.both(lambda db, _: db.post_batch(posts))
        expected = ("ok", sum(self.model.resolve(rid, charge) for rid, charge in posts))
        assert sqlite == postgres == expected, (posts, sqlite, postgres, expected)
        event(f"post: applied {expected[1]} of {len(posts)}")

    @precondition(lambda self: self.model.reservations)
    @rule(picks=st.lists(pick_strategy, min_size=1, max_size=4))
    def void(self, picks: list[tuple[bool, int]]) -> None:
        rids = [self.pick(pending_only, index) for pending_only, index in picks]
        sqlite, postgres = self.both(lambda db, _: db.void_batch(rids))
        expected = ("ok", sum(self.model.resolve(rid, 0) for rid in rids))
        assert sqlite == postgres == expected, (rids, sqlite, postgres, expected)
        event(f"void: applied {expected[1]} of {len(rids)}")

    @precondition(lambda self: self.model.pending())
    @rule(policy=st.sampled_from(("void", "post")), limit=st.integers(1, 8))
    def expire(self, policy: str, limit: int) -> None:
        """The sweeper after every lease ran out: all that is pending, ``limit`` at a time."""
        assert policy in ("void", "post")

        async def sweep(db: Backend) -> list[int]:
            swept: list[int] = []
            while not swept or swept[-1]:
                swept.append(
                    await db.expire_reservations("void" if policy == "void" else "post", limit)
                )
                assert len(swept) <= 100, swept
            return swept

        self.run(asyncio.sleep(EXPIRE_SLEEP_SECONDS))
        sqlite, postgres = self.run(sweep(self.sqlite)), self.run(sweep(self.postgres))
        pending = self.model.pending()
        assert all(n <= limit for n in sqlite + postgres), (sqlite, postgres)
        assert sum(sqlite) == sum(postgres) == len(pending), (sqlite, postgres, pending)
        event(f"expire: {min(len(pending), 3)}+ swept")
        for rid in pending:
            self.model.resolve(rid, self.model.reservations[rid].amount if policy == "post" else 0)
        # An Idempotency-Key still in flight after a whole lease is freed.
        self.model.held = {
            scope: held for scope, held in self.model.held.items() if held[0].state != "in_flight"
        }

    @precondition(lambda self: any(not r.pending for r in self.model.reservations.values()))
    @rule()
    def roll_up(self) -> None:
        sqlite, postgres = self.run(self.sqlite.roll_up(0)), self.run(self.postgres.roll_up(0))
        resolved = [rid for rid, r in self.model.reservations.items() if not r.pending]
        assert sqlite == postgres == len(resolved), (sqlite, postgres, resolved)
        event(f"roll_up: {min(len(resolved), 3)}+ folded")
        for rid in resolved:
            del self.model.reservations[rid]

    # -- idempotency records ----------------------------------------------------------

    @rule(
        team=st.integers(0, MAX_TEAMS - 1),
        environment=st.sampled_from(ENVIRONMENTS),
        key=st.sampled_from(IDEMPOTENCY_KEYS),
    )
    def claim_idempotency(self, team: int, environment: Environment, key: str) -> None:
        """A charged request that reserves nothing claims its key."""
        account = self.account(team, environment)
        claim = IdempotencyClaim(key, METHOD, PATH)

        def call(db: Backend, backend: int) -> Awaitable[IdempotencyRecord | None]:
            return db.claim_idempotency(self.team_id(backend, account[0]), environment, claim)

        sqlite, postgres = self.both(call)
        held = self.model.held.get((account, key))
        if held is None:
            self.model.held[(account, key)] = (in_flight(METHOD, PATH), None)
        expected = ("ok", None if held is None else held[0])
        assert sqlite == postgres == expected, (sqlite, postgres, expected)

    @rule(
        team=st.integers(0, MAX_TEAMS - 1),
        environment=st.sampled_from(ENVIRONMENTS),
        key=st.sampled_from(IDEMPOTENCY_KEYS),
        status=st.sampled_from((200, 201)),
        body=st.one_of(st.none(), st.binary(max_size=8)),
    )
    def complete_idempotency(
        self, team: int, environment: Environment, key: str, status: int, body: bytes | None
    ) -> None:
        account = self.account(team, environment)
        body_hash = hashlib.sha256(b"request").hexdigest()

        def call(db: Backend, backend: int) -> Awaitable[None]:
            return db.complete_idempotency(
                self.team_id(backend, account[0]),
                environment,
                key,
                body_hash,
                status,
                "application/json",
                body,
            )

        sqlite, postgres = self.both(call)
        assert sqlite == postgres == ("ok", None), (sqlite, postgres)
        held = self.model.held.get((account, key))
        if held is not None and held[0].state == "in_flight":
            record = IdempotencyRecord(
                "completed",
                METHOD,
                PATH,
                body_hash,
                status,
                "application/json",
                body,
                body is not None,
            )
            self.model.held[(account, key)] = (record, held[1])

    @rule(
        team=st.integers(0, MAX_TEAMS - 1),
        environment=st.sampled_from(ENVIRONMENTS),
        key=st.sampled_from(IDEMPOTENCY_KEYS),
    )
    def release_idempotency(self, team: int, environment: Environment, key: str) -> None:
        account = self.account(team, environment)

        def call(db: Backend, backend: int) -> Awaitable[None]:
            return db.release_idempotency(self.team_id(backend, account[0]), environment, key)

        sqlite, postgres = self.both(call)
        assert sqlite == postgres == ("ok", None), (sqlite, postgres)
        held = self.model.held.get((account, key))
        if held is not None and held[0].state == "in_flight":
            del self.model.held[(account, key)]

    # -- after every step ---------------------------------------------------------------

    @invariant()
    def backends_agree_with_each_other_and_the_model(self) -> None:
        self.run(self._check())

    async def _check(self) -> None:
        for number in range(len(self.teams)):
            expected = {
                environment: self.model.balances[(number, environment)]
                for environment in ENVIRONMENTS
            }
            sqlite = await self.sqlite.balances(self.team_id(0, number))
            postgres = await self.postgres.balances(self.team_id(1, number))
            assert sqlite == postgres == expected, (number, sqlite, postgres, expected)
            assert all(balance >= 0 for balance in sqlite.values()), sqlite
            for environment in ENVIRONMENTS:
                one = (
                    await self.sqlite.balance(self.team_id(0, number), environment),
                    await self.postgres.balance(self.team_id(1, number), environment),
                )
                assert one == (expected[environment],) * 2, (number, environment, one)
            # The same history on both (ids of credit entries and times differ).
            histories = [
                sorted(
                    (e.kind, e.environment, e.amount, e.reason, e.reservation_id or "")
                    for e in await db.ledger_entries(self.team_id(backend, number), 1000, None)
                )
                for backend, db in enumerate((self.sqlite, self.postgres))
            ]
            assert histories[0] == histories[1], (number, histories)
        pending = len(self.model.pending())
        counts = (await self.sqlite.pending_count(), await self.postgres.pending_count())
        assert counts == (pending, pending), (counts, pending)
        mismatches = (await self.sqlite.reconcile(), await self.postgres.reconcile())
        assert mismatches == ([], []), mismatches


# Green, it takes a fraction of the default timeout. Once it fails, hypothesis
# shrinks the sequence (for at most five minutes, each run with a database of
# its own): the default timeout would cut that short and hide the minimal case.
@pytest.mark.timeout(600)
def test_ledger_state_machine(
    postgres_admin_dsn: str, postgres_template: str, tmp_path: Path
) -> None:
    LedgerMachine.admin_dsn = postgres_admin_dsn
    LedgerMachine.template = postgres_template
    LedgerMachine.directory = tmp_path
    run_state_machine_as_test(
        LedgerMachine,
        settings=settings(
            max_examples=30,
            stateful_step_count=40,
            deadline=None,
            database=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
        ),
    )
