"""Open-loop load at a fixed arrival rate; latency measured from the intended send time.

A closed-loop tool (wrk) waits for each answer before sending the next, so a
slow answer delays the requests behind it and hides itself ("coordinated
omission"). Here request i is due at start + i/rate whether or not earlier
answers came back; its latency runs from that due time to its last byte, so
queueing anywhere — in the generator, the kernel or the server — is counted.

    python bench/openloop.py URL --rate 500 --seconds 10 [--header 'Name: value'] [--body '{}']

Prints one JSON object: sent, ok, errors, p50/p99/p99.9/max in milliseconds.
Written by hand on raw asyncio streams because a general HTTP client would add
more of its own latency than the gateway under test.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import time
from urllib.parse import urlsplit



def _request_bytes(url: str, method: str, headers: list[str], body: bytes) -> tuple[str, int, bytes]:
    parts = urlsplit(url)
    host = parts.hostname or "127.0.0.1"
    port = parts.port or 80
    path = parts.path or "/"
    lines = [f"{method} {path} HTTP/1.1", f"Host: {host}:{port}", f"Content-Length: {len(body)}"]
    lines += headers
    return host, port, ("\r\n".join(lines) + "\r\n\r\n").encode() + body


async def _read_response(reader: asyncio.StreamReader) -> int:
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head[9:12])
    length = 0
    chunked = False
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        lowered = name.strip().lower()
        if lowered == b"content-length":
            length = int(value.strip())
        elif lowered == b"transfer-encoding" and b"chunked" in value.lower():
            chunked = True
    if chunked:
        while True:
            size = int((await reader.readuntil(b"\r\n")).strip().split(b";")[0], 16)
            await reader.readexactly(size + 2)
            if size == 0:
                break
    elif length:
        await reader.readexactly(length)
    return status


async def run(url: str, rate: float, seconds: float, headers: list[str], body: bytes,
              method: str, connections: int) -> dict[str, float]:
    host, port, request = _request_bytes(url, method, headers, body)
    idle: asyncio.Queue[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = asyncio.Queue()
    for _ in range(connections):
        idle.put_nowait(await asyncio.open_connection(host, port))
    latencies: list[float] = []
    errors = 0
    ok = 0
    # perf_counter: the finest clock there is, for both pacing and measuring.
    clock = time.perf_counter
    total = int(rate * seconds)
    start = clock() + 0.05

    async def one(due: float) -> None:
        nonlocal errors, ok
        reader, writer = await idle.get()
        try:
            writer.write(request)
            status = await _read_response(reader)
        except (OSError, asyncio.IncompleteReadError, ValueError):
            errors += 1
            writer.close()
            try:
                idle.put_nowait(await asyncio.open_connection(host, port))
            except OSError:
                pass
            return
        latencies.append(clock() - due)
        if 200 <= status < 300:
            ok += 1
        else:
            errors += 1
        idle.put_nowait((reader, writer))

    tasks = []
    for i in range(total):
        due = start + i / rate
        delay = due - clock()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one(due)))
    await asyncio.gather(*tasks)
    while not idle.empty():
        _, writer = idle.get_nowait()
        writer.close()
    latencies.sort()

    def pct(p: float) -> float:
        if not latencies:
            return math.nan
        return latencies[min(len(latencies) - 1, int(p / 100 * len(latencies)))] * 1000

    return {
        "sent": total, "ok": ok, "errors": errors,
        "p50_ms": pct(50), "p99_ms": pct(99), "p999_ms": pct(99.9),
        "max_ms": latencies[-1] * 1000 if latencies else math.nan,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("url")
    parser.add_argument("--rate", type=float, default=500)
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--header", action="append", default=[])
    parser.add_argument("--body", default="{}")
    parser.add_argument("--method", default="POST")
    parser.add_argument("--connections", type=int, default=64)
    args = parser.parse_args()
    # The stock event loop on purpose: uvloop's timers tick in whole milliseconds,
    # which would add up to 1 ms of the generator's own lateness to every sample.
    result = asyncio.run(run(args.url, args.rate, args.seconds, args.header,
                             args.body.encode(), args.method, args.connections))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
