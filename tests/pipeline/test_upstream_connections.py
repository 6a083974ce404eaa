"""The gateway's upstream connections (lean client): reuse, deadlines, departures, TLS.

The upstreams are raw servers on loopback (tests/upstream/raw.py); nothing is
timed: a test waits for states (a connection closed, a request in flight).
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import trustme

from gateway.upstream import LeanClient

from ..conftest import Harness, MakeGateway, bearer
from ..upstream.raw import Conn, RawServer, eventually, ok, response

ASSESS = "/api/v1/assess"


@pytest.fixture
async def raw() -> AsyncIterator[RawServer]:
    server = RawServer()
    await server.start()
    yield server
    await server.close()


async def on(make_gateway: MakeGateway, url: str, **upstream: Any) -> Harness:
    return await make_gateway(
        upstreams={"assess": {"url": url, "timeout_seconds": 5, **upstream}},
        routes=[{"path": ASSESS, "methods": ["POST", "GET"], "upstream": "assess", "cost": 1}],
    )


def client_of(gw: Harness) -> LeanClient:
    client = gw.gateway.upstreams["assess"].client
    assert isinstance(client, LeanClient)
    return client


async def keep_alive(conn: Conn) -> None:
    while True:
        request = await conn.request()
        await conn.send(ok(b"hello " + request.body))


async def test_connections_are_reused_across_requests(
    make_gateway: MakeGateway, raw: RawServer
) -> None:
    raw.scripts = [keep_alive]
    gw = await on(make_gateway, raw.url)
    key = await gw.key(credits=5)
    for n in range(3):
        resp = await gw.client.post(ASSESS, headers=bearer(key), data=b"%d" % n)
        assert resp.status == 200 and await resp.read() == b"hello %d" % n
    assert raw.connections == 1
    assert raw.requests[0].header("Host") == f"127.0.0.1:{raw.port}"
    assert client_of(gw).pool.idle == 1
    await gw.settle()
    assert await gw.balance() == 2


async def test_an_exchange_cut_by_its_deadline_closes_the_connection(
    make_gateway: MakeGateway, raw: RawServer
) -> None:
    async def part_then_silence(conn: Conn) -> None:
        await conn.request()
        await conn.send(response(b"200 OK", b"Content-Length: 100000", body=b"x" * 70000))
        await conn.until_closed()

    raw.scripts = [part_then_silence]
    gw = await on(make_gateway, raw.url, read_timeout_seconds=0.2)
    key = await gw.key(credits=5)
    async with gw.client.post(ASSESS, headers=bearer(key), data=b"{}") as resp:
        assert resp.status == 200
        with pytest.raises(aiohttp.ClientPayloadError):
            await resp.read()
    await eventually(lambda: raw.closed == 1, "the upstream connection was closed")
    assert client_of(gw).pool.open == 0, "a cut exchange's connection never goes back to the pool"
    await gw.settle()
    assert await gw.balance() == 5
    await gw.assert_reconciled()


async def test_a_504_before_the_status_closes_the_connection(
    make_gateway: MakeGateway, raw: RawServer
) -> None:
    async def silent(conn: Conn) -> None:
        await conn.request()
        await conn.until_closed()

    raw.scripts = [silent]
    gw = await on(make_gateway, raw.url, timeout_seconds=0.2)
    key = await gw.key(credits=5)
    resp = await gw.client.post(ASSESS, headers=bearer(key), data=b"{}")
    assert resp.status == 504
    await eventually(lambda: raw.closed == 1, "the upstream connection was closed")
    assert client_of(gw).pool.open == 0
    await gw.settle()
    assert await gw.balance() == 5


async def test_a_client_leaving_closes_the_upstream_connection(
    make_gateway: MakeGateway, raw: RawServer
) -> None:
    async def silent(conn: Conn) -> None:
        await conn.request()
        await conn.until_closed()

    raw.scripts = [silent]
    gw = await on(make_gateway, raw.url)
    key = await gw.key(credits=5)
    port = gw.client.server.port
    _, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(
        f"POST {ASSESS} HTTP/1.1\r\nHost: g\r\nAuthorization: Bearer {key}\r\n"
        "Content-Length: 2\r\n\r\n{}".encode()
    )
    await writer.drain()
    await eventually(lambda: len(raw.requests) == 1, "the request reached the upstream")
    writer.transport.abort()
    await eventually(lambda: raw.closed == 1, "the upstream connection was closed")
    assert client_of(gw).pool.open == 0
    await gw.settle()
    assert await gw.balance() == 5
    await gw.assert_reconciled()


async def test_an_upload_streams_to_the_upstream_chunked(
    make_gateway: MakeGateway, raw: RawServer
) -> None:
    raw.scripts = [keep_alive]
    gw = await on(make_gateway, raw.url)
    key = await gw.key(credits=5)

    async def body() -> AsyncIterator[bytes]:
        for _ in range(50):
            yield b"u" * 4096

    resp = await gw.client.post(ASSESS, headers=bearer(key), data=body())
    assert resp.status == 200
    assert await resp.read() == b"hello " + b"u" * 4096 * 50
    assert raw.requests[0].header("Transfer-Encoding") == "chunked"


@pytest.mark.parametrize("client", ["lean", "aiohttp"])
async def test_tls_upstreams_are_verified(
    make_gateway: MakeGateway, tmp_path: Path, client: str
) -> None:
    ca = trustme.CA()
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("localhost").configure_cert(server_ctx)
    raw = RawServer(scripts=[keep_alive], tls=server_ctx)
    await raw.start()
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    try:
        gw = await on(make_gateway, raw.url, client=client, ca_file=str(ca_file))
        key = await gw.key(credits=5)
        resp = await gw.client.post(ASSESS, headers=bearer(key), data=b"tls")
        assert resp.status == 200 and await resp.read() == b"hello tls"

        untrusting = await make_gateway(
            storage=f"sqlite:///{tmp_path / 'other.db'}",
            upstreams={"assess": {"url": raw.url, "client": client}},
            routes=[{"path": ASSESS, "methods": ["POST"], "upstream": "assess", "cost": 1}],
        )
        other = await untrusting.key(credits=5)
        refused = await untrusting.client.post(ASSESS, headers=bearer(other), data=b"tls")
        assert refused.status == 502
        await untrusting.settle()
        assert await untrusting.balance() == 5, (
            "a refused certificate is an upstream failure: refunded"
        )
    finally:
        await raw.close()
