"""The request log's search at scale: build N rows on PostgreSQL, time the admin API's queries.

    python bench/request_log_search.py [--rows 10000000] [--repeat 20] [--dsn postgresql://...]

Makes a throwaway database (dropped at the end), migrates it, fills the request
log with ``--rows`` rows by one INSERT ... SELECT over generate_series (one team
holds them all, the worst case for a search by team; 50 keys; 30 days; 94 %
status 200, 3 % 429, 2 % 402, 1 % 502; client addresses from 10.0.0.0/16 and
a few from 192.168.0.0/16; two paths), ANALYZEs it, then runs each search the
admin API makes (the same SQL, through the backend's find_requests) ``--repeat``
times and prints p50 and p99 in milliseconds, plus the table's size per million
rows. Loopback only; bounded by the row count.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
import uuid

import asyncpg

from gateway.config import PostgresSettings
from gateway.storage import RequestQuery
from gateway.storage.postgresql import PostgresBackend

FILL = """
INSERT INTO request_log (at, team_id, key_id, key_prefix, environment, request_id, method,
    route, path, status, outcome, credits, client_ip, user_agent, duration_ms)
SELECT to_timestamp($2::double precision - ($1::bigint - g) * (2592000.0 / $1::bigint)),
       'team_big',
       'key_' || lpad((g % 50)::text, 4, '0'),
       'ckiq_live_' || lpad((g % 50)::text, 4, '0'),
       'live',
       md5(g::text),
       'POST',
       '/api/v1/assess',
       CASE WHEN g % 10 = 0 THEN '/api/v1/assess/batch' ELSE '/api/v1/assess' END,
       CASE WHEN g % 100 < 94 THEN 200 WHEN g % 100 < 97 THEN 429
            WHEN g % 100 < 99 THEN 402 ELSE 502 END,
       CASE WHEN g % 100 < 94 THEN 'ok' WHEN g % 100 < 97 THEN 'rate_limited'
            WHEN g % 100 < 99 THEN 'insufficient_credits' ELSE 'upstream_error' END,
       CASE WHEN g % 100 < 94 THEN 1 ELSE 0 END,
       CASE WHEN g % 1000 = 7 THEN '192.168.' || (g % 7) || '.' || (g % 200)
            ELSE '10.0.' || (g % 250) || '.' || (g % 199) END,
       'bench/1.0',
       1.0 + (g % 50)
FROM generate_series(1, $1::bigint) g
"""


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=10_000_000)
    parser.add_argument("--repeat", type=int, default=20)
    parser.add_argument("--dsn", default="postgresql://postgres@127.0.0.1:5432/postgres")
    args = parser.parse_args()
    name = f"gateway_bench_search_{uuid.uuid4().hex[:8]}"
    admin = await asyncpg.connect(args.dsn)
    await admin.execute(f'CREATE DATABASE "{name}"')
    dsn = args.dsn.rsplit("/", 1)[0] + "/" + name
    backend = PostgresBackend(dsn, PostgresSettings(pool_min_size=1), lease_seconds=60)
    try:
        await backend.open()
        await backend.migrate()
        now = time.time()
        conn = await asyncpg.connect(dsn)
        started = time.monotonic()
        await conn.execute(FILL, args.rows, now, timeout=3600)
        await conn.execute("ANALYZE request_log")
        filled = time.monotonic() - started
        size = await conn.fetchval("SELECT pg_total_relation_size('request_log')")
        await conn.close()
        print(f"{args.rows:,} rows in {filled:.0f} s; table with indexes "
              f"{size / 2**20:,.0f} MiB, {size / 2**20 / (args.rows / 1e6):,.0f} MiB per million rows")
        newest = (await backend.find_requests(RequestQuery("team_big", 100)))
        deep = newest[-1]
        searches = {
            "newest 100": RequestQuery("team_big", 100),
            "one key": RequestQuery("team_big", 100, key_id="key_0007"),
            "status 502": RequestQuery("team_big", 100, status=502),
            "status 4xx": RequestQuery("team_big", 100, status_range=(400, 499)),
            "outcome rate_limited": RequestQuery("team_big", 100, outcome="rate_limited"),
            "network 192.168.0.0/16": RequestQuery("team_big", 100, client_ip="192.168.0.0/16"),
            "address 10.0.7.7": RequestQuery("team_big", 100, client_ip="10.0.7.7"),
            "path prefix /api/v1/assess/b": RequestQuery("team_big", 100, path_prefix="/api/v1/assess/b"),
            "one day, 10 days ago": RequestQuery("team_big", 100, since=now - 11 * 86400, until=now - 10 * 86400),
            "key + 5xx + last day": RequestQuery("team_big", 100, key_id="key_0007", status_range=(500, 599), since=now - 86400),
            "next page (cursor)": RequestQuery("team_big", 100, before=(deep.entry.at, deep.id)),
        }
        print(f"{'search':32} {'rows':>5} {'p50 ms':>8} {'p99 ms':>8}")
        for label, query in searches.items():
            times = []
            for _ in range(args.repeat):
                t = time.perf_counter()
                found = await backend.find_requests(query)
                times.append((time.perf_counter() - t) * 1000)
            times.sort()
            p99 = times[min(len(times) - 1, int(len(times) * 0.99))]
            print(f"{label:32} {len(found):>5} {statistics.median(times):>8.1f} {p99:>8.1f}")
    finally:
        await backend.close()
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()


if __name__ == "__main__":
    asyncio.run(main())
