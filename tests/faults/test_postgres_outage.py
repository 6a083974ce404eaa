"""PostgreSQL stopped and restarted mid-load (a throwaway cluster, never the shared server).

The store is a PostgreSQL cluster of this test's own (initdb + pg_ctl on a free
port, run as a non-root user); the limiter is the shared Redis. Clients keep
sending through the outage to a free route (``cost: 0``) and a charged one,
with keys the gateway has already cached. The server is stopped both ways:
``fast`` (sessions are told and ended) and ``immediate`` (a crash: connections
drop mid-statement, crash recovery on restart). What must hold (ARCHITECTURE
"Failure policy", docs/operations.md "Failure behaviour"):

- while the database is down, cached keys keep working on the free route (200),
  the charged route answers 503 ``{"error": ...}``, and ``/readyz`` answers 503
  with the storage backend marked down;
- within 5 s of the database answering again, charged requests are served;
- nothing is charged for a request that was not served: charges equal the
  charged route's 200s and the upstream's 2xx answers on it;
- with a short lease and sweep interval, no reservation is left pending once
  the sweeper has run, and ``gateway credits reconcile`` is clean.
"""

from __future__ import annotations

import asyncio
import functools
import time

import aiohttp
import pytest

from tests.services import redis_url

from .fixtures import Spawner
from .harness import (
    ASSESS,
    FREE,
    Admin,
    FaultyUpstream,
    PostgresCluster,
    Probe,
    Traffic,
    bearer,
    figures,
    gateway_config,
    keep_sending,
    reconcile,
    wait_for,
    watch_readyz,
)

BEFORE, DOWN, AFTER = 1.5, 3.0, 1.5
RECOVERY_BOUND = 5.0
# Short, but longer than the outage: a lease that runs out while the database is down
# lets the sweeper void reservations whose posts still wait in the gateway, a bug of
# its own that test_posts_outlasting_lease.py pins down (an xfail there).
LEASE, SWEEP, MAX_DURATION = 6.0, 0.5, 2.0
# asyncpg's words when a session PostgreSQL terminated is used before its close arrives.
ASYNCPG_RACE = "cannot switch to state"


@pytest.mark.timeout(60)
@pytest.mark.parametrize("mode", ["fast", "immediate"])
async def test_postgres_outage_mid_load_fails_closed_and_recovers(
    mode: str,
    pg_cluster: PostgresCluster,
    fault_upstream: FaultyUpstream,
    session: aiohttp.ClientSession,
    spawn: Spawner,
) -> None:
    storage = pg_cluster.dsn
    config = gateway_config(
        storage,
        fault_upstream,
        limiter=redis_url(),
        max_duration=MAX_DURATION,
        credits={"reservation_lease_seconds": LEASE, "sweep_interval_seconds": SWEEP},
    )
    gateway = spawn(config)
    await gateway.start()
    admin = Admin(session, gateway)
    team = await admin.team("pg-outage", credits=1_000_000)
    key, _ = await admin.key("pg-outage")

    traffic = Traffic()
    stop = asyncio.Event()
    probes: list[Probe] = []
    free = functools.partial(
        traffic.request, session, "free", "POST", gateway.url + FREE,
        headers=bearer(key), data=b"{}",
    )  # fmt: skip
    charged = functools.partial(
        traffic.request, session, "charged", "POST", gateway.url + ASSESS,
        headers=bearer(key), data=b"{}",
    )  # fmt: skip
    assert (await free()).status == 200 and (await charged()).status == 200  # key cached
    tasks = [asyncio.create_task(keep_sending(stop, free, pause=0.02)) for _ in range(4)]
    tasks += [asyncio.create_task(keep_sending(stop, charged, pause=0.02)) for _ in range(4)]
    watcher = asyncio.create_task(watch_readyz(session, gateway, stop, probes))

    try:
        await asyncio.sleep(BEFORE)
        await pg_cluster.stop(mode)  # fast: sessions ended; immediate: a crash
        down = time.monotonic()
        await asyncio.sleep(DOWN)
        restarting = time.monotonic()
        await pg_cluster.start()
        up = time.monotonic()  # pg_ctl start -w: accepting connections

        async def served_again() -> bool:
            return any(o.status == 200 for o in traffic.of("charged", since=up))

        await wait_for(served_again, timeout=15, every=0.01)
        await asyncio.sleep(AFTER)
    finally:
        stop.set()
        await asyncio.gather(*tasks, watcher)
    quiet = time.monotonic()

    # A race this stop can hit on a direct connection, pinned down deterministically by
    # test_postgres_sessions.py (an xfail there): a session PostgreSQL ended while idle
    # is used before its close arrives and the gateway answers 500 (or its key-change
    # listener dies, and SIGTERM then exits 1). Such 500s are set aside here and the
    # test ends as xfailed once everything else has been checked; any other 500 fails.
    known = [o for o in traffic.results if o.status == 500]
    if known:
        assert ASYNCPG_RACE in gateway.log(), known[:3]
        assert all(o.json() == {"error": "Internal error"} for o in known), known[:3]
        traffic.results = [o for o in traffic.results if o.status != 500]

    # Throughout: the free route never failed; the charged one answered 200 or 503.
    assert set(traffic.statuses("free")) == {200}, traffic.statuses("free")
    assert set(traffic.statuses("charged")) == {200, 503}, traffic.statuses("charged")
    for refused in (o for o in traffic.of("charged") if o.status == 503):
        body = refused.json()
        assert set(body) == {"error"} and isinstance(body["error"], str), body

    # While it was down: cached keys kept working, charges were refused.
    free_down = traffic.of("free", since=down, until=restarting)
    charged_down = traffic.of("charged", since=down, until=restarting)
    assert free_down and all(o.status == 200 for o in free_down)
    assert charged_down and all(o.status == 503 for o in charged_down)
    ready_down = [p for p in probes if down <= p.at and p.at + 1.0 < restarting]
    assert ready_down and all(p.status == 503 for p in ready_down), ready_down[:3]
    assert all(p.body["backends"]["storage"]["ok"] is False for p in ready_down)

    # Recovery within 5 s of PostgreSQL accepting connections again.
    first = min(
        (o for o in traffic.of("charged", since=up) if o.status == 200), key=lambda o: o.finished
    )
    recovered_in = first.finished - up
    ready_again = [p for p in probes if p.at >= up and p.status == 200]
    assert ready_again, "readiness never came back"
    ready_in = ready_again[0].at - up
    assert recovered_in < RECOVERY_BOUND and ready_in < RECOVERY_BOUND
    assert all(o.status == 200 for o in traffic.of("charged", since=first.finished))

    # The ledger: after the lease and a sweep, nothing pending; every 200 charged, once.
    await asyncio.sleep(0.3)
    pending_before_sweep = (await figures(storage, team)).pending

    async def swept() -> bool:
        return (await figures(storage, team)).pending == 0

    await asyncio.sleep(LEASE + 2 * SWEEP)
    await wait_for(swept, timeout=10)
    ledger = await figures(storage, team)
    served = sum(o.status == 200 for o in traffic.of("charged"))
    refusals = sum(o.status == 503 for o in traffic.of("charged"))
    print(
        f"PostgreSQL stopped ({mode}), down {restarting - down:.1f} s under load: free route "
        f"{len(free_down)}/{len(free_down)} 200 while down, charged route {len(charged_down)} "
        f"503 while down ({refusals} in all); charged requests served again "
        f"{recovered_in * 1000:.0f} ms and /readyz 200 {ready_in * 1000:.0f} ms after it "
        f"returned; ledger: {ledger.reservations} reservations, {ledger.posted} posted, "
        f"{ledger.voided} voided, {ledger.expired} swept, pending {pending_before_sweep} "
        f"before the sweep and {ledger.pending} after; charged {ledger.charged} = charged 200s "
        f"{served} = upstream 2xx {fault_upstream.served[ASSESS]}; "
        f"{time.monotonic() - quiet:.1f} s from load end to settled"
    )
    assert fault_upstream.served[ASSESS] == served
    assert ledger.charged == ledger.posted == served
    assert ledger.balance == 1_000_000 - served
    assert (await reconcile(gateway.config_path))["pending_reservations"] == 0
    code = await gateway.stop()
    # The race of test_postgres_sessions.py (a session PostgreSQL ended while idle)
    # is answered 503 now and survives SIGTERM: no 500, a clean exit.
    assert not known, f"{len(known)} requests got 500"
    assert code == 0, gateway.log()[-3000:]
