"""A soak: minutes of steady, mixed load through one gateway process, with flat resources.

Run with ``scripts/test -m soak`` (excluded from the default run). The length is
``GATEWAY_SOAK_SECONDS`` (default 180) and the sampling interval
``GATEWAY_SOAK_SAMPLE_SECONDS`` (default 5). Production backends: PostgreSQL
(a database of this test's own on the shared server) and Redis (a redis-server
of its own: the shared one may be flushed by others, which would hand the
rate-limited key fresh bursts).

The load is steady (every client paces itself) and mixes every outcome a
gateway sees in production: served (200), no credits (402), over the limit
(429), bad keys (401: malformed, bad checksum, and unknown keys that cost a
store lookup), upstream 500s (refunded), clients that leave mid-upload, mid-
download and before the status line, and whole streamed downloads.

Every ``GATEWAY_SOAK_SAMPLE_SECONDS`` the gateway process's resident memory
(``VmRSS`` in /proc/<pid>/status) and open file descriptors (/proc/<pid>/fd) are
sampled. After a warm-up (the first sixth of the run, at least 20 s: caches,
pools and allocator arenas fill), they must stay flat:

- RSS: no sample more than ``RSS_TOLERANCE`` (8 MiB) above the first sample
  after the warm-up, and the median of the last third of the samples no more
  than ``RSS_DRIFT`` (4 MiB) above the median of the first third: at about 140
  requests a second, a leak of half a KiB a request breaks it within the
  default run (a quiet run moves by under 1 MiB);
- file descriptors: no sample more than ``FD_TOLERANCE`` (16) above the most
  seen during the warm-up (connections come and go with the load; a leak grows
  without bound).

At the end: no reservation pending for longer than the lease (none pending at
all once the last requests settled), charges equal the upstream's 2xx answers
on charged routes, and ``gateway credits reconcile`` is clean.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import statistics
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import aiohttp
import pytest

from gateway.keys import generate_key
from tests.faults.fixtures import Spawner
from tests.faults.harness import (
    ASSESS,
    DOWNLOAD,
    FAULT,
    UPLOAD,
    Admin,
    FaultyUpstream,
    Traffic,
    abandon_download,
    abandon_upload,
    bearer,
    download,
    figures,
    gateway_config,
    keep_sending,
    leave_before_status,
    open_fds,
    reconcile,
    wait_for,
)
from tests.procs import GatewayProcess, rss_bytes
from tests.services import RedisServer

SOAK_SECONDS = float(os.environ.get("GATEWAY_SOAK_SECONDS", "180"))
SAMPLE_SECONDS = float(os.environ.get("GATEWAY_SOAK_SAMPLE_SECONDS", "5"))
MIB = 1024 * 1024
RSS_TOLERANCE = 8 * MIB
RSS_DRIFT = 4 * MIB
FD_TOLERANCE = 16
LEASE, SWEEP, MAX_DURATION = 10.0, 1.0, 5.0
LIMITED_PER_MINUTE = 60


@dataclass(frozen=True, slots=True)
class Sample:
    at: float  # seconds since the load began
    rss: int
    fds: int
    requests: int


async def _sample(
    gateway: GatewayProcess, traffic: Traffic, stop: asyncio.Event, samples: list[Sample]
) -> None:
    began = time.monotonic()
    while not stop.is_set():
        samples.append(
            Sample(
                time.monotonic() - began,
                rss_bytes(gateway.pid),
                open_fds(gateway.pid),
                len(traffic.results),
            )
        )
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), SAMPLE_SECONDS)


def _bad_checksum(key: str) -> str:
    last = "A" if key[-1] != "A" else "B"
    return key[:-1] + last


@pytest.mark.soak
@pytest.mark.timeout(int(SOAK_SECONDS) + 180)
async def test_soak_mixed_load_keeps_memory_and_descriptors_flat(
    postgres_dsn: str,
    throwaway_redis: RedisServer,
    fault_upstream: FaultyUpstream,
    session: aiohttp.ClientSession,
    spawn: Spawner,
) -> None:
    config = gateway_config(
        postgres_dsn,
        fault_upstream,
        limiter=throwaway_redis.url,
        max_duration=MAX_DURATION,
        credits={"reservation_lease_seconds": LEASE, "sweep_interval_seconds": SWEEP},
    )
    gateway = spawn(config)
    await gateway.start()
    admin = Admin(session, gateway)
    teams = {
        "soak-main": await admin.team("soak-main", credits=100_000_000),
        "soak-limited": await admin.team("soak-limited", credits=100_000_000),
        "soak-broke": await admin.team("soak-broke"),
    }
    key, _ = await admin.key("soak-main")
    limited, _ = await admin.key("soak-limited", rate_limit=LIMITED_PER_MINUTE)
    broke, _ = await admin.key("soak-broke")
    malformed = "ckiq_live_not-a-key"
    forged = _bad_checksum(generate_key("live"))

    traffic = Traffic()
    request = functools.partial(traffic.request, session)
    url = gateway.url

    def post(kind: str, path: str, secret: str) -> Callable[[], Awaitable[object]]:
        return functools.partial(
            request, kind, "POST", url + path, headers=bearer(secret), data=b"{}"
        )

    async def unknown_key() -> None:  # a valid checksum: costs a store lookup
        await request("unknown", "POST", url + ASSESS, headers=bearer(generate_key("live")))

    # (what, how many clients, pause between requests in seconds)
    mix: list[tuple[Callable[[], Awaitable[object]], int, float]] = [
        (post("ok", ASSESS, key), 4, 0.04),
        (post("limited", ASSESS, limited), 1, 0.05),
        (post("broke", ASSESS, broke), 1, 0.1),
        (post("malformed", ASSESS, malformed), 1, 0.2),
        (post("forged", ASSESS, forged), 1, 0.2),
        (unknown_key, 1, 2.5),  # below the 60/min unknown-key budget per address
        (post("upstream_500", FAULT + "/error", key), 1, 0.1),
        (functools.partial(download, traffic, session, gateway, key, fault_upstream.download_bytes), 1, 0.5),
        (functools.partial(abandon_download, traffic, session, gateway, key), 1, 0.3),
        (functools.partial(abandon_upload, traffic, gateway, fault_upstream, key, True), 1, 0.3),
        (functools.partial(abandon_upload, traffic, gateway, fault_upstream, key, False), 1, 0.3),
        (
            functools.partial(leave_before_status, traffic, session, gateway, fault_upstream, key),
            1,
            0.5,
        ),
    ]  # fmt: skip
    stop = asyncio.Event()
    samples: list[Sample] = []
    tasks = [
        asyncio.create_task(keep_sending(stop, send, pause=pause))
        for send, clients, pause in mix
        for _ in range(clients)
    ]
    sampler = asyncio.create_task(_sample(gateway, traffic, stop, samples))
    began = time.monotonic()
    try:
        await asyncio.sleep(SOAK_SECONDS)
    finally:
        stop.set()
        await asyncio.gather(*tasks, sampler)
    elapsed = time.monotonic() - began

    # The samples and the mix first, so that they are on record whatever fails below.
    print(f"\n{'t (s)':>7} {'RSS (MiB)':>10} {'fds':>5} {'requests':>9}")
    for s in samples:
        print(f"{s.at:7.1f} {s.rss / MIB:10.1f} {s.fds:5d} {s.requests:9d}")
    counts = {kind: len(traffic.of(kind)) for kind in sorted({o.kind for o in traffic.results})}
    limited_ok = sum(o.status == 200 for o in traffic.of("limited"))
    print(
        f"{len(traffic.results)} requests in {elapsed:.0f} s "
        f"({len(traffic.results) / elapsed:.0f}/s): {counts}; the {LIMITED_PER_MINUTE}/min "
        f"key admitted {limited_ok}"
    )

    # Right after the load: nothing pending longer than the lease.
    oldest = [(await figures(postgres_dsn, t)).oldest_pending_seconds for t in teams.values()]
    assert all(age is None or age < LEASE for age in oldest), oldest

    # The outcomes: each kind got what it must, and nothing else.
    expect: dict[str, set[int | str]] = {
        "ok": {200},
        "limited": {200, 429},
        "broke": {402},
        "malformed": {401},
        "forged": {401},
        "unknown": {401},
        "upstream_500": {500},
        "download": {200},
        "download_left": {"closed"},
        "download_early": {"left"},
        "upload_left": {"reset", "closed"},
    }
    assert set(counts) == set(expect), counts
    for kind, allowed in expect.items():
        seen = set(traffic.statuses(kind))
        assert seen and seen <= allowed, (kind, traffic.statuses(kind))
    assert set(traffic.statuses("limited")) == {200, 429}
    assert limited_ok <= LIMITED_PER_MINUTE + elapsed * LIMITED_PER_MINUTE / 60 + 1

    # Settled: nothing pending once the last requests are over; charges equal the
    # upstream's 2xx answers on charged routes (402, 401, 429 and 500 cost nothing).
    async def settled() -> bool:
        for team in teams.values():
            if (await figures(postgres_dsn, team)).pending:
                return False
        return True

    await wait_for(settled, timeout=10)
    ledgers = {name: await figures(postgres_dsn, team) for name, team in teams.items()}
    charged = sum(ledger.charged for ledger in ledgers.values())
    served = sum(fault_upstream.served[path] for path in (ASSESS, DOWNLOAD, UPLOAD))
    print(
        f"charged {charged} = upstream 2xx {served}; main team balance "
        f"{ledgers['soak-main'].balance}, {ledgers['soak-main'].voided} voided"
    )
    assert fault_upstream.served[UPLOAD] == 0
    assert ledgers["soak-broke"].reservations == 0 and ledgers["soak-broke"].balance == 0
    assert charged == served, (charged, served, ledgers)
    assert ledgers["soak-limited"].charged == limited_ok
    assert all(ledger.expired == 0 for ledger in ledgers.values())
    assert (await reconcile(gateway.config_path))["pending_reservations"] == 0

    # Resources: flat after the warm-up.
    warm_up = max(20.0, SOAK_SECONDS / 6)
    steady = [s for s in samples if s.at >= warm_up]
    early = [s for s in samples if s.at < warm_up]
    assert len(steady) >= 3, "the soak is too short to judge (raise GATEWAY_SOAK_SECONDS)"
    base = steady[0]
    third = max(1, len(steady) // 3)
    first_third = statistics.median(s.rss for s in steady[:third])
    last_third = statistics.median(s.rss for s in steady[-third:])
    peak_rss = max(s.rss for s in steady)
    peak_fds = max(s.fds for s in steady)
    fd_base = max(s.fds for s in early) if early else base.fds
    print(
        f"RSS after warm-up {base.rss / MIB:.1f} MiB, peak {peak_rss / MIB:.1f} MiB "
        f"(+{(peak_rss - base.rss) / MIB:.1f}, tolerance {RSS_TOLERANCE / MIB:.0f}); median "
        f"first third {first_third / MIB:.1f}, last third {last_third / MIB:.1f} MiB (drift "
        f"tolerance {RSS_DRIFT / MIB:.0f}); fds warm-up peak {fd_base}, later peak {peak_fds} "
        f"(tolerance {FD_TOLERANCE})"
    )
    assert peak_rss - base.rss <= RSS_TOLERANCE
    assert last_third - first_third <= RSS_DRIFT
    assert peak_fds - fd_base <= FD_TOLERANCE
    assert await gateway.stop() == 0, gateway.log()[-3000:]
