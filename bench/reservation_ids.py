"""What the shape of a reservation id costs the ledger as its table grows.

    python bench/reservation_ids.py [--rows 300000] [--backends sqlite postgresql]

Every request inserts a reservation under an id the gateway makes, and the
id is the table's primary key. A random id lands on a random leaf of that
index: as the table grows, each batch dirties a page per reservation (each
written whole to the WAL at commit) and leaves pages half full. An id that
starts with the time lands on the index's right edge, next to the last one.

For each backend and id shape, a fresh ledger (the gateway's own backend
classes, as the gateway runs them) takes ``--rows`` reservations in batches
of 64, each batch reserved then posted, the way the pipeline's batches do.
Printed per slice of the table's growth: microseconds of CPU and of wall
clock per reservation, and bytes written per reservation (SQLite: the
process's ``write()`` bytes, WAL and checkpoints included; PostgreSQL:
the WAL position's advance, the whole server's); at the end, the primary key index's size.
"""

from __future__ import annotations

import argparse
import asyncio
import secrets
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from run import drop_database, scratch_database

from gateway.storage import Backend, ReserveRequest
from gateway.storage.registry import open_backend

BATCH = 64


def random_id() -> str:
    return "rsv_" + secrets.token_hex(12)


def ordered_id() -> str:
    return f"rsv_{time.time_ns() // 1_000_000:012x}{secrets.token_hex(10)}"


SHAPES: dict[str, Callable[[], str]] = {"random": random_id, "ordered": ordered_id}


def written_bytes() -> int:
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("wchar:"):
            return int(line.split()[1])
    return 0


async def wal_bytes(backend: Backend, kind: str) -> int:
    if kind == "sqlite":
        return written_bytes()
    pool = backend._pool  # type: ignore[attr-defined]  # a benchmark reads the server's counter
    return int(await pool.fetchval("SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), '0/0')"))


async def index_bytes(backend: Backend, kind: str) -> int:
    if kind == "sqlite":
        db = backend._conn  # type: ignore[attr-defined]
        return await backend._run(  # type: ignore[attr-defined, no-any-return]
            lambda: db.execute(
                "SELECT sum(pgsize) FROM dbstat WHERE name = 'sqlite_autoindex_reservations_1'"
            ).fetchone()[0]
        )
    pool = backend._pool  # type: ignore[attr-defined]
    return int(await pool.fetchval("SELECT pg_relation_size('reservations_pkey')"))


async def fill(kind: str, url: str, shape: str, rows: int, slices: int) -> list[str]:
    backend = open_backend(url, lease_seconds=300)
    await backend.open()
    await backend.migrate()
    lines = []
    try:
        team = (await backend.create_team("bench")).id
        await backend.grant(team, "live", 10**12, "bench", "bench")
        make_id = SHAPES[shape]
        per_slice = rows // slices // BATCH * BATCH
        for number in range(slices):
            wal, cpu, wall = (
                await wal_bytes(backend, kind),
                time.process_time(),
                time.perf_counter(),
            )
            for _ in range(per_slice // BATCH):
                ids = [make_id() for _ in range(BATCH)]
                requests = [ReserveRequest(i, team, "live", "key_1", 1) for i in ids]
                await backend.reserve_batch(requests)
                await backend.post_batch([(i, 1) for i in ids])
            cpu = (time.process_time() - cpu) / per_slice * 1e6
            wall = (time.perf_counter() - wall) / per_slice * 1e6
            wal = (await wal_bytes(backend, kind) - wal) / per_slice
            lines.append(
                f"  {kind:<10} {shape:<8} rows {number * per_slice:>8,}-{(number + 1) * per_slice:<8,}"
                f" {cpu:7.1f} µs CPU {wall:7.1f} µs wall {wal:8,.0f} bytes written"
            )
            print(lines[-1], flush=True)
        size = await index_bytes(backend, kind)
        lines.append(f"  {kind:<10} {shape:<8} primary key index {size / 2**20:,.1f} MiB")
        print(lines[-1], flush=True)
    finally:
        await backend.close()
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=300_000)
    parser.add_argument("--slices", type=int, default=3)
    parser.add_argument("--backends", nargs="+", default=["sqlite", "postgresql"],
                        choices=("sqlite", "postgresql"))  # fmt: skip
    args = parser.parse_args()
    print(
        f"{args.rows:,} reservations in batches of {BATCH}, reserved then posted; per reservation:"
    )
    for kind in args.backends:
        for shape in SHAPES:
            if kind == "sqlite":
                with tempfile.TemporaryDirectory(prefix="gateway-ids-") as workdir:
                    url = f"sqlite:///{workdir}/ledger.db"
                    asyncio.run(fill(kind, url, shape, args.rows, args.slices))
            else:
                name, dsn = scratch_database()
                try:
                    asyncio.run(fill(kind, dsn, shape, args.rows, args.slices))
                finally:
                    drop_database(name)


if __name__ == "__main__":
    main()
