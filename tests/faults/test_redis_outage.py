"""Redis stopped and restarted mid-load, with the default ``on_unavailable: fallback``.

A throwaway redis-server on a port of its own is the limiter; PostgreSQL (a
database of this test's own on the shared server) the store. Clients keep
sending through the whole outage: one key far below its limit, one hammered far
above it. What must hold (ARCHITECTURE "Failure policy"):

- no 5xx and no broken exchange: every request is decided, 200 or 429;
- the limit is still enforced while Redis is down (the in-process fallback
  refuses the hammered key too), and over the whole run the hammered key gets no
  more than one burst per limiter it met (Redis, the fallback, Redis again, which
  restarted empty) plus the refill;
- ``/readyz`` stays 200 and reports ``degraded`` while Redis is down;
- within 2 s of Redis answering again ``degraded`` is cleared and decisions are
  made in Redis again (the key's bucket reappears in the empty, restarted Redis;
  the ``limiter="redis"`` decision counter moves again);
- the ledger: charges equal the upstream's 2xx answers and the clients' 200s,
  nothing pending, ``gateway credits reconcile`` clean.
"""

from __future__ import annotations

import asyncio
import functools
import math
import time
from pathlib import Path

import aiohttp
import pytest
import redis.asyncio

from tests.services import RedisServer

from .fixtures import Spawner
from .harness import (
    ASSESS,
    Admin,
    FaultyUpstream,
    Probe,
    Traffic,
    bearer,
    figures,
    gateway_config,
    keep_sending,
    metric_total,
    reconcile,
    wait_for,
    watch_readyz,
)

HOT_LIMIT = 60  # per minute: a burst of 60, then one a second
BEFORE, DOWN, AFTER = 1.5, 3.0, 2.5  # seconds of load around the outage
RECOVERY_BOUND = 2.0
DETECTION_GRACE = 0.5  # the first request after the stop notices it


async def _until_refused(traffic: Traffic, since: float, phase: str) -> None:
    """Wait until the hot key has been refused in this phase (20 s at most)."""

    async def refused() -> bool:
        return any(o.status == 429 for o in traffic.of("hot", since=since))

    try:
        await wait_for(refused, timeout=20)
    except TimeoutError:
        pytest.fail(f"the hot key was never refused {phase} the outage: the limit did not hold")


@pytest.mark.timeout(60)
async def test_redis_outage_mid_load_falls_back_and_recovers(
    tmp_path: Path,
    postgres_dsn: str,
    throwaway_redis: RedisServer,
    fault_upstream: FaultyUpstream,
    session: aiohttp.ClientSession,
    spawn: Spawner,
) -> None:
    gateway = spawn(gateway_config(postgres_dsn, fault_upstream, limiter=throwaway_redis.url))
    await gateway.start()
    admin = Admin(session, gateway)
    team = await admin.team("redis-outage", credits=1_000_000)
    steady, steady_id = await admin.key("redis-outage", rate_limit=1_000_000)
    hot, _ = await admin.key("redis-outage", rate_limit=HOT_LIMIT)
    bucket = f"gw:rl:{{{team}}}:k:{steady_id}"  # gateway.limiter.redis.bucket_key

    traffic = Traffic()
    stop = asyncio.Event()
    probes: list[Probe] = []
    url = gateway.url + ASSESS
    send_steady = functools.partial(
        traffic.request, session, "steady", "POST", url, headers=bearer(steady), data=b"{}"
    )
    send_hot = functools.partial(
        traffic.request, session, "hot", "POST", url, headers=bearer(hot), data=b"{}"
    )
    tasks = [asyncio.create_task(keep_sending(stop, send_steady, pause=0.02)) for _ in range(4)]
    tasks += [asyncio.create_task(keep_sending(stop, send_hot, pause=0.01)) for _ in range(3)]
    watcher = asyncio.create_task(watch_readyz(session, gateway, stop, probes))
    client = redis.asyncio.Redis.from_url(throwaway_redis.url)
    started = time.monotonic()
    try:
        # Each phase lasts its time, and on a busy machine until the hot key has met
        # its limit in it: every phase must show the limit being enforced.
        await asyncio.sleep(BEFORE)
        await _until_refused(traffic, started, "before")
        redis_decisions = await metric_total(
            session, gateway, "gateway_rate_limit_decisions_total", limiter="redis"
        )
        stopping = time.monotonic()
        await asyncio.to_thread(throwaway_redis.stop)
        down = time.monotonic()
        await asyncio.sleep(DOWN)
        detected = down + DETECTION_GRACE
        await _until_refused(traffic, detected, "during")
        fallback_decisions = await metric_total(
            session, gateway, "gateway_rate_limit_decisions_total", limiter="fallback"
        )
        restarting = time.monotonic()
        await asyncio.to_thread(throwaway_redis.start)
        up = time.monotonic()  # redis-server answers PING again, empty

        async def bucket_back() -> bool:
            return bool(await client.exists(bucket))

        in_redis_after = await wait_for(bucket_back, timeout=10, every=0.01)
        back = time.monotonic()  # decided in Redis again from here on
        await asyncio.sleep(AFTER)
        await _until_refused(traffic, back, "after")
        redis_decisions_after = await metric_total(
            session, gateway, "gateway_rate_limit_decisions_total", limiter="redis"
        )
    finally:
        stop.set()
        await asyncio.gather(*tasks, watcher)
        await client.aclose()
    elapsed = time.monotonic() - started

    # Every request decided: 200 or 429, never a 5xx, never a broken exchange.
    assert set(traffic.statuses("steady")) == {200}, traffic.statuses("steady")
    assert set(traffic.statuses("hot")) == {200, 429}, traffic.statuses("hot")
    for refused in (o for o in traffic.of("hot") if o.status == 429):
        body = refused.json()
        assert body["error"] == "Rate limit exceeded" and body["limit"] == HOT_LIMIT, body
        assert isinstance(body["retry_after"], int) and body["retry_after"] >= 1, body

    # The policy holds in every phase, the fallback's included.
    phases = {
        "before": (started, stopping),
        "down": (detected, restarting),
        "after": (back, math.inf),
    }
    counts = {}
    for phase, (since, until) in phases.items():
        hot_here = traffic.of("hot", since=since, until=until)
        steady_here = traffic.of("steady", since=since, until=until)
        counts[phase] = (
            len(steady_here),
            sum(o.status == 200 for o in hot_here),
            sum(o.status == 429 for o in hot_here),
        )
        assert steady_here, f"no requests decided {phase} the outage"
        assert any(o.status == 429 for o in hot_here), f"the limit did not hold {phase}"
    admitted = sum(o.status == 200 for o in traffic.of("hot"))
    # Each limiter the key met (Redis, the fallback, the restarted empty Redis) can
    # admit one full burst, and together they refill at most at the key's rate; one
    # more per limiter for rounding.
    bound = 3 * HOT_LIMIT + math.ceil(elapsed * HOT_LIMIT / 60) + 3
    assert admitted <= bound, (admitted, bound)
    assert fallback_decisions > 0
    assert redis_decisions_after > redis_decisions  # Redis decides again

    # /readyz: serving throughout, degraded while Redis was down, then cleared.
    assert all(p.status == 200 for p in probes), [p for p in probes if p.status != 200][:5]
    outage = [p for p in probes if detected <= p.at < restarting]
    assert outage and all(p.degraded for p in outage), outage[:5]
    assert all(p.body["backends"]["limiter"]["degraded"] for p in outage)
    cleared = [p for p in probes if p.at >= up and not p.degraded]
    assert cleared, "readiness never stopped reporting degraded"
    recovered_in = cleared[0].at - up
    assert all(not p.degraded for p in probes if p.at >= cleared[0].at)
    assert recovered_in < RECOVERY_BOUND and in_redis_after < RECOVERY_BOUND

    # The ledger: every 200 charged once, nothing else.
    async def settled() -> bool:
        return (await figures(postgres_dsn, team)).pending == 0

    await wait_for(settled, timeout=5)
    ledger = await figures(postgres_dsn, team)
    ok = sum(o.status == 200 for o in traffic.results)
    print(
        f"Redis outage {restarting - down:.1f} s under load; steady/hot-200/hot-429 per phase: "
        f"{counts}; hot key admitted {admitted} (bound {bound}); readyz degraded while down "
        f"({len(outage)} probes), cleared {recovered_in * 1000:.0f} ms after Redis returned, "
        f"key's bucket back in Redis after {in_redis_after * 1000:.0f} ms; {fallback_decisions:.0f} "
        f"fallback decisions; charged {ledger.charged} = 200s {ok} = upstream 2xx "
        f"{fault_upstream.served[ASSESS]}"
    )
    assert ledger.charged == ledger.posted == ok == fault_upstream.served[ASSESS]
    # A void is a reservation sent while the limit decision was out (the pipeline
    # overlaps the two on Redis) for a request the limiter then refused: the key's
    # room changed under it (the switch to the fallback and back). Never charged,
    # and only ever for a refused request.
    refused = sum(o.status == 429 for o in traffic.results)
    assert ledger.reservations == ledger.posted + ledger.voided
    assert ledger.voided <= refused and ledger.expired == 0
    assert ledger.balance == 1_000_000 - ok
    assert (await reconcile(gateway.config_path))["pending_reservations"] == 0
    assert await gateway.stop() == 0, gateway.log()[-3000:]
