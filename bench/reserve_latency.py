"""What one credit reservation costs PostgreSQL, alone, against the statements around it.

    python bench/reserve_latency.py [--dsn DSN] [--calls 2000] [--gap-ms 2]

On a scratch database (created on the server named by ``--dsn``, default
``$GATEWAY_TEST_POSTGRES_DSN`` or the local server, and dropped at the end),
one connection, one call at a time, each with its commit: ``SELECT 1`` (the
round trip), a one-row insert (the round trip plus a disk commit), the batch
function ``gateway_reserve`` with a batch of one, the lean
``gateway_reserve_one`` (migration 6), and the backend's ``reserve_batch``
(the lean function through the kept connection, as the gateway calls it).
Prints p50 and p99 in milliseconds after 200 warm-up calls. This is the floor
under an enforced request's latency when it has the ledger to itself.

Then the backend's call again with ``--gap-ms`` of idleness before each call,
as at 500 requests/s: what waking an idle server process costs on this machine
(back to back, it never sleeps).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import time
import uuid
from collections.abc import Awaitable, Callable
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import uvloop

from gateway.config import PostgresSettings
from gateway.storage import ReserveRequest
from gateway.storage.postgresql import PostgresBackend

DEFAULT_DSN = "postgresql://postgres@127.0.0.1:5432/postgres"


async def timed(
    label: str, call: Callable[[], Awaitable[object]], calls: int, gap: float = 0.0
) -> None:
    for _ in range(200):
        await call()
    took = []
    for _ in range(calls):
        if gap:
            await asyncio.sleep(gap)
        started = time.perf_counter()
        await call()
        took.append(time.perf_counter() - started)
    took.sort()
    p50, p99 = took[len(took) // 2], took[int(len(took) * 0.99)]
    print(f"{label:44s} p50 {p50 * 1000:6.3f} ms   p99 {p99 * 1000:6.3f} ms")


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dsn", default=os.environ.get("GATEWAY_TEST_POSTGRES_DSN", DEFAULT_DSN))
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--gap-ms", type=float, default=2.0,
                        help="idle time before each call of the last measurement")
    args = parser.parse_args()

    name = f"gateway_reserve_latency_{uuid.uuid4().hex[:8]}"
    server = await asyncpg.connect(args.dsn)
    await server.execute(f'CREATE DATABASE "{name}"')
    dsn = urlunsplit(urlsplit(args.dsn)._replace(path=f"/{name}"))
    backend = PostgresBackend(dsn, PostgresSettings(), lease_seconds=660)
    try:
        await backend.open()
        await backend.migrate()
        team = (await backend.create_team("bench")).id
        await backend.grant(team, "live", 10**9, "bench", "bench")
        conn = await asyncpg.connect(dsn)
        try:
            await conn.execute("CREATE TABLE scratch (id text PRIMARY KEY)")
            commit = await conn.fetchval("SHOW synchronous_commit")
            print(f"synchronous_commit = {commit}; one connection, one call at a time\n")

            def new_id() -> str:
                return uuid.uuid4().hex

            await timed("SELECT 1", lambda: conn.fetchval("SELECT 1"), args.calls)
            await timed(
                "INSERT one row (commit)",
                lambda: conn.execute("INSERT INTO scratch VALUES ($1)", new_id()),
                args.calls,
            )
            await timed(
                "gateway_reserve, batch of one",
                lambda: conn.fetch(
                    "SELECT * FROM gateway_reserve($1, $2, $3, $4, $5, 660.0)",
                    [new_id()], [team], ["live"], ["key"], [1],
                ),
                args.calls,
            )
            await timed(
                "gateway_reserve_one",
                lambda: conn.fetch(
                    "SELECT * FROM gateway_reserve_one($1, $2, 'live', 'key', 1, 660.0)",
                    new_id(), team,
                ),
                args.calls,
            )
            def reserve() -> Awaitable[object]:
                return backend.reserve_batch([ReserveRequest(new_id(), team, "live", "key", 1)])

            await timed("PostgresBackend.reserve_batch (one request)", reserve, args.calls)
            await timed(
                f"  the same, {args.gap_ms:g} ms idle before each", reserve, args.calls,
                gap=args.gap_ms / 1000,
            )
        finally:
            await conn.close()
    finally:
        await backend.close()
        await server.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await server.close()


if __name__ == "__main__":
    uvloop.run(main())
