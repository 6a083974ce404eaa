"""The server side's floor: instructions per request of an HTTP server that does nothing.

    python bench/server_floor.py [--requests 2000]

Two servers answer every request with the same small JSON, under callgrind
(counting on for exactly ``--requests`` requests, as bench/instructions.py
counts the gateway), both on uvloop:

- ``aiohttp``: aiohttp's low-level server (``web.Server``, what the gateway's
  public listener runs since session 11), the handler reading the body and
  returning a ``web.Response``;
- ``httptools``: an ``asyncio.Protocol`` feeding llhttp through ``httptools``
  and writing a prepared answer: about the least any Python server can do.

Their difference is what the gateway's public listener spends in the server
library before the pipeline starts; set it beside a plain request's total
(``python bench/instructions.py --target plain``) to see the share. Neither
server is fit to serve: no limits, no errors, no keep-alive rules.
"""

from __future__ import annotations

import argparse
import asyncio
import glob
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import cast

sys.path.insert(0, str(Path(__file__).resolve().parent))

from instructions import callgrind, send
from run import free_port, wait_port

BODY = b'{"score": 0.5}'


def serve_aiohttp(port: int) -> None:
    import uvloop
    from aiohttp import web

    async def handle(request: web.BaseRequest) -> web.Response:
        await request.read()
        return web.Response(body=BODY, content_type="application/json")

    async def main() -> None:
        runner = web.ServerRunner(web.Server(handle, handler_cancellation=True), access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        await asyncio.Event().wait()

    uvloop.run(main())


def serve_httptools(port: int) -> None:
    import httptools
    import uvloop

    answer = (
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
        % (len(BODY), BODY)
    )

    class Protocol(asyncio.Protocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
            self.parser = httptools.HttpRequestParser(self)
            self.headers: list[tuple[bytes, bytes]] = []
            self.body: list[bytes] = []

        def data_received(self, data: bytes) -> None:
            self.parser.feed_data(data)

        def on_header(self, name: bytes, value: bytes) -> None:
            self.headers.append((name, value))

        def on_body(self, body: bytes) -> None:
            self.body.append(body)

        def on_message_complete(self) -> None:
            self.transport.write(answer)
            self.headers, self.body = [], []

    async def main() -> None:
        await asyncio.get_running_loop().create_server(Protocol, "127.0.0.1", port)
        await asyncio.Event().wait()

    uvloop.run(main())


SERVERS = {"aiohttp": serve_aiohttp, "httptools": serve_httptools}


def measure(name: str, requests: int, workdir: Path) -> float:
    port = free_port()
    out = workdir / f"{name}.callgrind"
    command = [
        "valgrind", "--tool=callgrind", "--instr-atstart=no", f"--callgrind-out-file={out}",
        sys.executable, __file__, "--serve", name, "--port", str(port),
    ]  # fmt: skip
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # noqa: S603
    try:
        wait_port(port, timeout=120)
        url = f"http://127.0.0.1:{port}/api/v1/assess"
        send(url, [], min(500, requests))  # warm-up, uncounted
        time.sleep(1)
        callgrind(process.pid, "-i", "on")
        answered = send(url, [], requests)
        callgrind(process.pid, "-i", "off")
        callgrind(process.pid, "-d")
    finally:
        process.terminate()
        process.wait(30)
    if answered != requests:
        raise RuntimeError(f"{name}: {requests - answered} of {requests} requests failed")
    totals = 0
    for dump in glob.glob(f"{out}*"):
        match = re.search(r"^totals: (\d+)", Path(dump).read_text(errors="replace"), re.M)
        totals += int(match.group(1)) if match else 0
    return totals / requests


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--serve", choices=sorted(SERVERS), help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        SERVERS[args.serve](args.port)
        return
    print(f"server floor: instructions per request under callgrind, {args.requests} requests")
    with tempfile.TemporaryDirectory(prefix="gateway-floor-") as workdir:
        for name in SERVERS:
            print(f"  {name:<10} {measure(name, args.requests, Path(workdir)):10,.0f}", flush=True)


if __name__ == "__main__":
    main()
