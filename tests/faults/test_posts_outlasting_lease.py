"""The gateway cannot write its posts for longer than the lease, but everything else works.

What a database outage longer than ``credits.reservation_lease_seconds`` does
to the requests served just before it: their posts wait in the gateway's
buffer, retried every flush, while their leases run out. When the database
answers again the flush loop posts first and sweeps after, but only within one
tick; the outage test saw the other order (a flush failing just before the
database came back, the sweep just after) void 16 served requests in 2 of 6
runs. Here the order is forced: the gateway reaches PostgreSQL through a
:class:`Relay` that loses every post statement (and its session), so posts fail
while the sweeper, the voids and the reservations go through, for as long as
the test wants. The gateway knows these requests were served (ARCHITECTURE
"Failure policy": database unreachable, "never a lost charge"): its own sweeper
must not void what it holds a post for.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import AsyncIterator
from urllib.parse import urlsplit, urlunsplit

import aiohttp
import pytest

from .fixtures import Spawner
from .harness import (
    ASSESS,
    Admin,
    FaultyUpstream,
    Relay,
    Traffic,
    bearer,
    figures,
    gateway_config,
    metric_total,
    reconcile,
    wait_for,
)

LEASE, SWEEP, MAX_DURATION = 2.0, 0.5, 1.0
POST_STATEMENT = b"gateway_resolve($1, $2, 'post')"  # gateway/storage/postgresql/ledger.py post_batch


class ChargesLost(AssertionError):
    """Served requests ended up uncharged."""


@pytest.fixture
async def relay(postgres_dsn: str) -> AsyncIterator[Relay]:
    port = urlsplit(postgres_dsn).port
    assert port is not None
    server = Relay(port)
    await server.start()
    try:
        yield server
    finally:
        await server.close()


@pytest.mark.timeout(60)
async def test_posts_held_past_the_lease_are_not_voided_by_the_gateways_own_sweeper(
    postgres_dsn: str,
    relay: Relay,
    fault_upstream: FaultyUpstream,
    session: aiohttp.ClientSession,
    spawn: Spawner,
) -> None:
    parts = urlsplit(postgres_dsn)
    storage = urlunsplit(parts._replace(netloc=f"{parts.username}@127.0.0.1:{relay.port}"))
    config = gateway_config(
        storage,
        fault_upstream,
        max_duration=MAX_DURATION,
        # Statements travel as text (no prepared-statement cache), so the relay can
        # tell a post from the rest; key changes are heard on a direct session.
        postgres={"statement_cache_size": 0, "listen_dsn": postgres_dsn},
        credits={
            "reservation_lease_seconds": LEASE,
            "sweep_interval_seconds": SWEEP,
            "post_flush_interval_seconds": 0.1,
        },
    )
    gateway = spawn(config)
    await gateway.start()
    admin = Admin(session, gateway)
    team = await admin.team("held-posts", credits=1_000)
    key, _ = await admin.key("held-posts")
    traffic = Traffic()
    send = functools.partial(
        traffic.request, session, "charged", "POST", gateway.url + ASSESS,
        headers=bearer(key), data=b"{}",
    )  # fmt: skip

    relay.cut_on = POST_STATEMENT  # from now on no post reaches the database
    served = [await send() for _ in range(10)]
    assert all(o.status == 200 for o in served), [o.status for o in served]
    await asyncio.sleep(LEASE + 3 * SWEEP)  # the leases ran out; the sweeper ran
    cuts = relay.cuts
    relay.cut_on = None  # posts get through again

    async def flushed() -> bool:
        return await metric_total(session, gateway, "gateway_ledger_unflushed") == 0

    await wait_for(flushed, timeout=10)
    ledger = await figures(postgres_dsn, team)
    late = await metric_total(session, gateway, "gateway_ledger_late_resolutions_total")
    print(
        f"{len(served)} requests served while posts were lost ({cuts} post statements cut); "
        f"ledger: {ledger.posted} posted, {ledger.expired} voided by the sweeper, charged "
        f"{ledger.charged}; {late:.0f} late posts never applied; upstream served "
        f"{fault_upstream.served[ASSESS]}"
    )
    assert cuts > 0 and ledger.pending == 0
    assert fault_upstream.served[ASSESS] == len(served)
    assert (await reconcile(gateway.config_path))["pending_reservations"] == 0
    assert await gateway.stop() == 0, gateway.log()[-3000:]
    if ledger.charged != len(served):
        raise ChargesLost(
            f"{len(served)} served, {ledger.charged} charged, {ledger.expired} voided by the "
            f"sweeper, {late:.0f} late posts"
        )
