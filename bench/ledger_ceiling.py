"""How many reservations per second one team's balance row takes.

Every request of a team reserves against the same balance row, so that row is
the ledger's ceiling. This measures it two ways, with 1, 8 and 64 concurrent
callers:

- grouped: through ``gateway.credits.Credits``, which gathers the reservations
  made while a batch is in the database into the next ``reserve_batch`` call
  (what the gateway does);
- per request: one ``reserve_batch`` call per reservation (the naive way).

    python bench/ledger_ceiling.py [--dsn DSN] [--seconds 2] [--rounds 3] [--pool-max 10]
                                   [--sqlite] [--caps]

``--caps`` adds ``grouped cap``: the grouped way with day and month spend caps
on the key (never reached), to set what a cap costs the ledger beside
``grouped``. Each line also gives this process's CPU per reservation (the
gateway's share of the work; the database's is not in it).

PostgreSQL: a scratch database is created on the server named by ``--dsn``
(default ``$GATEWAY_TEST_POSTGRES_DSN``, else the local server) and dropped at
the end. ``--sqlite`` adds the same runs on a scratch SQLite file. Each
configuration runs ``--rounds`` times, interleaved; the median rate is printed
with the range. Figures are printed, never judged: they depend on the machine,
above all on how fast its disk syncs a commit, and on what else runs on it.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import statistics
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg

from gateway.caps import Calendar
from gateway.config import CreditSettings, PostgresSettings
from gateway.credits import Credits
from gateway.storage import Backend, ReserveRequest, ReserveResult
from gateway.storage.postgresql import PostgresBackend
from gateway.storage.sqlite import SqliteBackend

CONCURRENCY = (1, 8, 64)
DEFAULT_DSN = "postgresql://postgres@127.0.0.1:5432/postgres"


@dataclass
class CountingLedger:
    """Passes reserve_batch through, counting calls and batch sizes."""

    backend: Backend
    sizes: list[int] = field(default_factory=list)

    async def reserve_batch(self, requests: Sequence[ReserveRequest]) -> list[ReserveResult]:
        self.sizes.append(len(requests))
        return await self.backend.reserve_batch(requests)


@dataclass
class Run:
    mode: str
    callers: int
    reservations: int
    seconds: float
    calls: int
    latencies: list[float]
    cpu: float  # this process's CPU seconds over the run

    @property
    def rate(self) -> float:
        return self.reservations / self.seconds


def summary(storage: str, runs: list[Run]) -> str:
    """One line for the rounds of one (mode, callers): median rate, its range, latencies."""
    rates = sorted(run.rate for run in runs)
    latencies = sorted(lat for run in runs for lat in run.latencies)
    calls = sum(run.calls for run in runs)
    batch = sum(run.reservations for run in runs) / calls if calls else 0.0
    p50 = statistics.median(latencies) * 1000
    p99 = latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))] * 1000
    spread = f"{rates[0]:,.0f}-{rates[-1]:,.0f}"
    cpu_us = sum(run.cpu for run in runs) / sum(run.reservations for run in runs) * 1e6
    return (
        f"{storage:<9} {runs[0].mode:<12} {runs[0].callers:>7} "
        f"{statistics.median(rates):>10,.0f} {spread:>15} {batch:>9.1f} {p50:>8.2f} {p99:>8.2f}"
        f" {cpu_us:>7.1f}"
    )


HEADER = (
    f"{'storage':<9} {'mode':<12} {'callers':>7} {'reserve/s':>10} {'range':>15} "
    f"{'per call':>9} {'p50 ms':>8} {'p99 ms':>8} {'CPU µs':>7}"
)


async def measure(
    mode: str,
    callers: int,
    seconds: float,
    reserve: Callable[[], Awaitable[object]],
    counter: CountingLedger,
) -> Run:
    latencies: list[float] = []
    stop_at = time.perf_counter() + seconds
    counter.sizes.clear()

    async def caller() -> None:
        while time.perf_counter() < stop_at:
            started = time.perf_counter()
            await reserve()
            latencies.append(time.perf_counter() - started)

    started, cpu_started = time.perf_counter(), time.process_time()
    await asyncio.gather(*(caller() for _ in range(callers)))
    elapsed = time.perf_counter() - started
    cpu = time.process_time() - cpu_started
    return Run(mode, callers, len(latencies), elapsed, len(counter.sizes), latencies, cpu)


async def bench(
    storage: str, backend: Backend, seconds: float, rounds: int, with_caps: bool = False
) -> None:
    team = (await backend.create_team(f"bench-{uuid.uuid4().hex[:8]}")).id
    await backend.grant(team, "live", 10**15, "benchmark", "bench")
    counter = CountingLedger(backend)
    credits = Credits(counter, CreditSettings())  # type: ignore[arg-type]

    async def grouped() -> None:
        _, result = await credits.reserve(team, "live", "key_bench", 1)
        assert result.granted

    async def per_request() -> None:
        rid = "rsv_" + secrets.token_hex(12)
        [result] = await counter.reserve_batch([ReserveRequest(rid, team, "live", "key_bench", 1)])
        assert result.granted

    # Caps far above what a run can spend: every reservation is counted, none refused.
    key = await backend.create_key(team, "bench", "live", "hash-" + team, "ckiq_live_b", None, None)
    await backend.update_key(key.id, {"credit_cap_per_day": 10**12, "credit_cap_per_month": 10**12})
    caps = Calendar().periods().caps

    async def grouped_capped() -> None:
        _, result = await credits.reserve(team, "live", key.id, 1, caps=caps)
        assert result.granted

    modes: list[tuple[str, Callable[[], Awaitable[None]]]] = [
        ("grouped", grouped),
        ("per request", per_request),
    ]
    if with_caps:
        modes.insert(1, ("grouped cap", grouped_capped))
    await measure("warm-up", 8, min(seconds, 1.0), grouped, counter)
    # Rounds interleave every configuration, so that a slow spell of the disk
    # (checkpoints, neighbours) spreads over all of them instead of one.
    results: dict[tuple[str, int], list[Run]] = {}
    for _ in range(rounds):
        for callers in CONCURRENCY:
            for mode, reserve in modes:
                run = await measure(mode, callers, seconds, reserve, counter)
                results.setdefault((mode, callers), []).append(run)
    for runs in results.values():
        print(summary(storage, runs), flush=True)
    assert await backend.reconcile() == []


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dsn", default=os.environ.get("GATEWAY_TEST_POSTGRES_DSN", DEFAULT_DSN))
    parser.add_argument("--seconds", type=float, default=2.0, help="per run")
    parser.add_argument("--rounds", type=int, default=3, help="runs per configuration")
    parser.add_argument("--pool-max", type=int, default=PostgresSettings().pool_max_size)
    parser.add_argument("--sqlite", action="store_true", help="also measure SQLite")
    parser.add_argument("--caps", action="store_true", help="also measure capped reserves")
    args = parser.parse_args()

    print(HEADER)
    name = f"gateway_bench_{os.getpid()}_{uuid.uuid4().hex[:8]}"
    admin = await asyncpg.connect(args.dsn)
    await admin.execute(f'CREATE DATABASE "{name}"')
    try:
        parts = urlsplit(args.dsn)
        dsn = urlunsplit(parts._replace(path="/" + name))
        settings = PostgresSettings(pool_min_size=args.pool_max, pool_max_size=args.pool_max)
        pg = PostgresBackend(dsn, settings, lease_seconds=600)
        await pg.open()
        try:
            await pg.migrate()
            await bench(f"pg/{args.pool_max}", pg, args.seconds, args.rounds, args.caps)
        finally:
            await pg.close()
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()

    if args.sqlite:
        with tempfile.TemporaryDirectory() as tmp:
            lite = SqliteBackend(str(Path(tmp) / "bench.db"), lease_seconds=600)
            await lite.open()
            try:
                await lite.migrate()
                await bench("sqlite", lite, args.seconds, args.rounds, args.caps)
            finally:
                await lite.close()


if __name__ == "__main__":
    asyncio.run(main())
