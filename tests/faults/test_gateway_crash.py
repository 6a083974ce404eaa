"""The gateway killed with SIGKILL under load, then restarted on the same database.

PostgreSQL (a database of this test's own on the shared server) and the shared
Redis; a short lease (routes' ``max_duration_seconds`` short enough for config
validation to accept it) and a short sweep interval. After the kill and the
restart, once the lease has run out and the sweeper has run:

- every reservation is resolved (none pending);
- charges never exceed the upstream's 2xx answers (a client is never charged
  for what it was not served);
- the shortfall (served but not charged) stays within docs/operations.md "Money: what a
  crash can cost": the posts buffered for at most ``post_flush_interval_seconds``
  (the requests completed in the last flush interval) plus the requests in
  flight at the crash;
- the restarted gateway charges exactly again, and the balance reconciles.
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
    Admin,
    FaultyUpstream,
    Traffic,
    bearer,
    figures,
    gateway_config,
    keep_sending,
    reconcile,
    wait_for,
)

LEASE, SWEEP, MAX_DURATION = 3.0, 0.5, 2.0
FLUSH = 0.25  # the default post_flush_interval_seconds
# The flush loop sleeps FLUSH, then writes: a post made just after a write began
# waits FLUSH plus that write plus the next one. On loopback a write takes
# milliseconds; this allows for them (and for the test's own scheduling).
FLUSH_SLACK = 0.1
CLIENTS = 24
LOAD_SECONDS = 2.5
CREDITS = 1_000_000


@pytest.mark.timeout(60)
async def test_sigkill_under_load_loses_at_most_the_stated_bound(
    postgres_dsn: str,
    fault_upstream: FaultyUpstream,
    session: aiohttp.ClientSession,
    spawn: Spawner,
) -> None:
    fault_upstream.delay = 0.02  # every request spends a while in flight
    config = gateway_config(
        postgres_dsn,
        fault_upstream,
        limiter=redis_url(),
        max_duration=MAX_DURATION,
        credits={
            "reservation_lease_seconds": LEASE,
            "sweep_interval_seconds": SWEEP,
            "post_flush_interval_seconds": FLUSH,
        },
    )
    gateway = spawn(config)
    await gateway.start()
    admin = Admin(session, gateway)
    team = await admin.team("crash", credits=CREDITS)
    key, _ = await admin.key("crash")

    traffic = Traffic()
    stop = asyncio.Event()
    send = functools.partial(
        traffic.request, session, "load", "POST", gateway.url + ASSESS,
        headers=bearer(key), data=b"{}",
    )  # fmt: skip
    tasks = [asyncio.create_task(keep_sending(stop, send)) for _ in range(CLIENTS)]
    try:
        await asyncio.sleep(LOAD_SECONDS)
        assert gateway.process is not None
        gateway.process.kill()  # SIGKILL: no drain, no flush
        killed = time.monotonic()
        in_flight = traffic.in_flight("load")
        await gateway.process.wait()
    finally:
        stop.set()
        await asyncio.gather(*tasks)
    before_kill = traffic.of("load", until=killed)
    assert all(o.status == 200 and o.complete for o in before_kill), "a request failed"
    after_kill = traffic.of("load", since=killed)
    assert all(o.status == 0 for o in after_kill)  # refused: nothing was listening
    # Answers the clients got in full, some read from the socket after the kill.
    answered = [o for o in traffic.results if o.status == 200 and o.complete]
    # Let the upstream finish what it was doing, then freeze its count.
    await asyncio.sleep(0.2)
    served = fault_upstream.served[ASSESS]
    at_kill = await figures(postgres_dsn, team)

    # Restart on the same database and wait for the lease to run out and a sweep.
    await gateway.start()
    restarted = time.monotonic()

    async def resolved() -> bool:
        return (await figures(postgres_dsn, team)).pending == 0

    resolved_in = await wait_for(resolved, timeout=LEASE + 10 * SWEEP + 5)
    after = await figures(postgres_dsn, team)

    charged = after.charged
    shortfall = served - charged
    recent = sum(1 for o in before_kill if o.finished > killed - FLUSH)
    recent_slack = sum(1 for o in before_kill if o.finished > killed - FLUSH - FLUSH_SLACK)
    bound = recent_slack + in_flight
    print(
        f"SIGKILL after {LOAD_SECONDS} s of load from {CLIENTS} clients: clients got "
        f"{len(answered)} answers ({len(before_kill)} before the kill), the upstream served {served} 2xx, {in_flight} requests in "
        f"flight at the kill; at the kill the ledger had {at_kill.posted} posted and "
        f"{at_kill.pending} pending; after the restart and {resolved_in:.1f} s "
        f"({LEASE} s lease): {after.posted} posted, {after.expired} expired by the sweeper, "
        f"{after.pending} pending; charged {charged}; shortfall (served, not charged) "
        f"{shortfall}; bound: {recent} completed in the last flush interval "
        f"({recent_slack} with {FLUSH_SLACK} s slack) + {in_flight} in flight = {bound}"
    )
    assert after.pending == 0
    assert after.reservations == after.posted + after.expired  # nothing else happened
    assert charged <= served
    assert len(answered) <= served
    assert 0 <= shortfall <= bound
    assert after.balance == CREDITS - charged

    # The restarted gateway charges exactly again.
    again = [await send() for _ in range(20)]
    assert all(o.status == 200 for o in again)

    async def posted_again() -> bool:
        return (await figures(postgres_dsn, team)).posted == after.posted + len(again)

    await wait_for(posted_again, timeout=5)
    final = await figures(postgres_dsn, team)
    assert final.charged == charged + len(again) and final.pending == 0
    assert fault_upstream.served[ASSESS] == served + len(again)
    assert await gateway.stop() == 0, gateway.log()[-3000:]
    assert (await reconcile(gateway.config_path))["pending_reservations"] == 0
    print(f"restarted in {restarted - killed:.1f} s; 20 more requests charged 20")
