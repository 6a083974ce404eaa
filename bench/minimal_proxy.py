"""The simplest aiohttp pass-through that works: the bar the gateway's plain route must clear.

    python bench/minimal_proxy.py --listen 127.0.0.1:8081 --upstream http://127.0.0.1:8080

One aiohttp server, one pooled ClientSession, uvloop (as the gateway runs):
each request is read whole, sent upstream with the client's headers minus the
hop-by-hop ones, and the answer is read whole and returned. No auth, no
limits, no metrics, no logging, no timeouts, no streaming: nothing a real
gateway could skip. bench/run.py measures it as ``aiohttp_min``.
"""

from __future__ import annotations

import argparse

import aiohttp
import uvloop
from aiohttp import web

# The hop-by-hop headers (RFC 9110 §7.6.1) plus the two aiohttp sets itself.
_DROP = frozenset(
    {"connection", "keep-alive", "proxy-connection", "te", "trailer", "transfer-encoding",
     "upgrade", "host", "content-length"}
)


def make_app(upstream: str) -> web.Application:
    app = web.Application()

    async def start(app: web.Application) -> None:
        connector = aiohttp.TCPConnector(limit=128)
        app["session"] = aiohttp.ClientSession(upstream, connector=connector, auto_decompress=False)

    async def stop(app: web.Application) -> None:
        await app["session"].close()

    async def forward(request: web.Request) -> web.Response:
        headers = {k: v for k, v in request.headers.items() if k.lower() not in _DROP}
        body = await request.read()
        async with app["session"].request(
            request.method, request.rel_url, headers=headers, data=body, allow_redirects=False
        ) as answer:
            data = await answer.read()
            out = {k: v for k, v in answer.headers.items() if k.lower() not in _DROP}
            return web.Response(status=answer.status, headers=out, body=data)

    app.on_startup.append(start)
    app.on_cleanup.append(stop)
    app.router.add_route("*", "/{tail:.*}", forward)
    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--listen", required=True, help="host:port")
    parser.add_argument("--upstream", required=True, help="base URL")
    args = parser.parse_args()
    host, _, port = args.listen.rpartition(":")
    web.run_app(make_app(args.upstream), host=host, port=int(port), access_log=None,
                print=None, loop=uvloop.new_event_loop())


if __name__ == "__main__":
    main()
