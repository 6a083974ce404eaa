"""What each cached key costs, by the line of code that allocated it.

    python bench/key_memory_trace.py [--keys 20000] [--no-anomalies] [--top 12]

The companion of bench/key_memory.py (which reads the process's RSS): runs one
gateway in this process (SQLite store, in-process limiter, a loopback aiohttp
upstream), sends one key through it to warm it up, then every one of
``--keys`` keys once over 8 keep-alive connections, and compares two
``tracemalloc`` snapshots taken after the usage counters were flushed. Prints
the bytes per key each allocation site keeps, and pymalloc's own totals
(``sys._debugmallocstats``), so that what RSS shows can be split into small
objects and the large blocks (dict tables, arrays) beside them.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import re
import shutil
import sys
import tempfile
import tracemalloc
from pathlib import Path

from aiohttp import web
from aiohttp.test_utils import TestServer

sys.path.insert(0, str(Path(__file__).resolve().parent))

from key_memory import _create_keys, send_each  # noqa: E402

from gateway.app import Gateway, PublicRunner  # noqa: E402
from gateway.config import settings_from_mapping  # noqa: E402


def _pymalloc_allocated() -> int:
    """Bytes in pymalloc's allocated blocks (small objects), from its own statistics."""
    # _debugmallocstats writes to the C stderr: catch file descriptor 2 itself.
    with tempfile.TemporaryFile() as captured:
        sys.stderr.flush()
        saved = os.dup(2)
        os.dup2(captured.fileno(), 2)
        try:
            sys._debugmallocstats()
        finally:
            os.dup2(saved, 2)
            os.close(saved)
        captured.seek(0)
        text = captured.read().decode()
    match = re.search(r"# bytes in allocated blocks\s*=\s*([\d,]+)", text)
    return int(match.group(1).replace(",", "")) if match else 0


async def _send_each(url: str, keys: list[str]) -> None:
    answered = await send_each(url, keys, connections=8)
    if answered != len(keys):
        raise RuntimeError(f"only {answered} of {len(keys)} requests were answered 2xx")


async def measure(count: int, anomalies: bool, top: int) -> None:
    workdir = Path(tempfile.mkdtemp(prefix="gateway-keytrace-"))
    try:
        keys = await _create_keys(workdir / "keys.db", count)

        async def answer(request: web.Request) -> web.Response:
            return web.json_response({"score": 42})

        upstream_app = web.Application()
        upstream_app.router.add_route("*", "/{tail:.*}", answer)
        upstream = TestServer(upstream_app, host="127.0.0.1")
        await upstream.start_server()
        settings = settings_from_mapping({
            "listen": "127.0.0.1:0",
            "admin": {"enabled": False},
            "storage": f"sqlite:///{workdir / 'keys.db'}",
            "upstreams": {"assess": {"url": str(upstream.make_url(""))}},
            "routes": [{"path": "/api/v1/assess", "methods": ["POST"], "upstream": "assess",
                        "cost": 1}],
            "anomalies": {"enabled": anomalies},
        })
        gateway = PublicRunner(Gateway(settings))
        await gateway.setup()
        await web.TCPSite(gateway, "127.0.0.1", 0).start()
        url = f"http://127.0.0.1:{gateway.addresses[0][1]}/api/v1/assess"
        try:
            await _send_each(url, [keys[0]] * 2000)
            # Half the keys for pymalloc's totals, the other half under tracemalloc
            # (whose own records would otherwise be counted with them).
            half = count // 2
            await asyncio.sleep(3)  # usage counters flushed (every 2 s)
            gc.collect()
            small_before = _pymalloc_allocated()
            await _send_each(url, keys[:half])
            await asyncio.sleep(3)
            gc.collect()
            small_after = _pymalloc_allocated()
            tracemalloc.start(8)
            before = tracemalloc.take_snapshot()
            await _send_each(url, keys[half:])
            await asyncio.sleep(3)
            gc.collect()
            after = tracemalloc.take_snapshot()
            tracemalloc.stop()
        finally:
            await gateway.cleanup()
            await upstream.close()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    stats = after.compare_to(before, "traceback")
    traced = count - half
    total = sum(stat.size_diff for stat in stats)
    print(f"{count} keys, anomaly signals {'on' if anomalies else 'off'}: "
          f"pymalloc's small objects {(small_after - small_before) / half:.0f} bytes a key "
          f"(first {half}); traced {total / traced:.0f} bytes a key, large blocks "
          f"included (the other {traced})")
    print()
    for stat in stats[:top]:
        print(f"{stat.size_diff / traced:7.1f} bytes a key, {stat.count_diff / traced:5.2f} "
              "blocks a key, allocated at:")
        ours = [frame for frame in stat.traceback if "/gateway/" in frame.filename]
        for frame in (ours or list(stat.traceback))[-3:]:
            where = frame.filename
            where = "gateway/" + where.rsplit("/gateway/", 1)[1] if "/gateway/" in where else where
            print(f"      {where}:{frame.lineno}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--keys", type=int, default=20_000)
    parser.add_argument("--no-anomalies", action="store_true")
    parser.add_argument("--top", type=int, default=12)
    args = parser.parse_args()
    asyncio.run(measure(args.keys, not args.no_anomalies, args.top))


if __name__ == "__main__":
    main()
