"""HTTP semantics: streaming, Expect, mid-stream limits, break-offs (issue: proxy semantics)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from ..conftest import Harness, MakeGateway, bearer, raw_http


class Scripted:
    """An upstream whose handler a test provides."""

    def __init__(self) -> None:
        self.handler: Any = None
        self.events: list[str] = []
        self.server: TestServer | None = None

    async def handle(self, request: web.Request) -> web.StreamResponse:
        assert self.handler is not None
        return await self.handler(request)  # type: ignore[no-any-return]

    @property
    def url(self) -> str:
        assert self.server is not None
        return str(self.server.make_url("")).rstrip("/")


@pytest.fixture
async def scripted() -> AsyncIterator[Scripted]:
    state = Scripted()
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", state.handle)
    state.server = TestServer(app, host="127.0.0.1")
    await state.server.start_server()
    yield state
    await state.server.close()


async def gateway_on(make_gateway: MakeGateway, scripted: Scripted, **route: Any) -> Harness:
    return await make_gateway(
        upstreams={
            "assess": {"url": scripted.url, "timeout_seconds": 2, "read_timeout_seconds": 2}
        },
        routes=[
            {
                "path": "/api/v1/assess",
                "methods": ["POST", "GET", "OPTIONS"],
                "upstream": "assess",
                "cost": 1,
                **route,
            }
        ],
    )


async def test_upload_reaches_upstream_before_the_client_finishes(
    make_gateway: MakeGateway, scripted: Scripted
) -> None:
    first_chunk_seen = asyncio.Event()

    async def handler(request: web.Request) -> web.Response:
        total = 0
        async for chunk in request.content.iter_any():
            total += len(chunk)
            first_chunk_seen.set()
        return web.json_response({"received": total})

    scripted.handler = handler
    gw = await gateway_on(make_gateway, scripted)
    key = await gw.key()

    async def body() -> AsyncIterator[bytes]:
        yield b"a" * 1024
        # The last chunk is only sent once the upstream has the first one.
        await asyncio.wait_for(first_chunk_seen.wait(), 5)
        yield b"b" * 1024

    resp = await gw.client.post("/api/v1/assess", headers=bearer(key), data=body())
    assert resp.status == 200
    assert await resp.json() == {"received": 2048}


async def test_download_reaches_client_while_upstream_still_sends(
    make_gateway: MakeGateway, scripted: Scripted
) -> None:
    client_has_first = asyncio.Event()

    async def handler(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse()
        await response.prepare(request)
        await response.write(b"first;")
        await asyncio.wait_for(client_has_first.wait(), 5)
        await response.write(b"second")
        await response.write_eof()
        return response

    scripted.handler = handler
    gw = await gateway_on(make_gateway, scripted)
    key = await gw.key(credits=1)
    async with gw.client.post("/api/v1/assess", headers=bearer(key)) as resp:
        assert resp.status == 200
        first = await resp.content.readexactly(6)
        assert first == b"first;"
        client_has_first.set()
        assert await resp.content.read() == b"second"
    await gw.settle()
    assert await gw.balance() == 0
    await gw.assert_reconciled()


async def test_expect_continue_with_a_bad_key_never_reads_the_body(
    make_gateway: MakeGateway, scripted: Scripted
) -> None:
    scripted.handler = lambda request: web.json_response({})
    gw = await gateway_on(make_gateway, scripted)
    request = (
        b"POST /api/v1/assess HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer nope\r\n"
        b"Content-Length: 1000000\r\nExpect: 100-continue\r\n\r\n"
    )
    # No body is sent: the gateway must answer without waiting for it.
    status, body = await raw_http(gw.client, request, timeout=3)
    assert status == 401
    assert b"Invalid API key" in body
    assert b"100 Continue" not in body


async def test_expect_continue_is_sent_after_every_check_passes(
    make_gateway: MakeGateway, scripted: Scripted
) -> None:
    async def handler(request: web.Request) -> web.Response:
        return web.json_response({"received": len(await request.read())})

    scripted.handler = handler
    gw = await gateway_on(make_gateway, scripted)
    key = await gw.key(credits=1)
    assert gw.client.server.port is not None
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.client.server.port)
    try:
        writer.write(
            f"POST /api/v1/assess HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer {key}\r\n"
            "Content-Length: 5\r\nExpect: 100-continue\r\nConnection: close\r\n\r\n".encode()
        )
        interim = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 3)
        assert interim.startswith(b"HTTP/1.1 100 Continue")
        writer.write(b"hello")
        final = await asyncio.wait_for(reader.read(), 3)
    finally:
        writer.close()
    assert final.startswith(b"HTTP/1.1 200")
    assert final.endswith(b'{"received": 5}')


async def test_expect_continue_with_no_credits_is_402_unread(
    make_gateway: MakeGateway, scripted: Scripted
) -> None:
    scripted.handler = lambda request: web.json_response({})
    gw = await gateway_on(make_gateway, scripted)
    key = await gw.key(credits=0)
    request = (
        f"POST /api/v1/assess HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer {key}\r\n"
        "Content-Length: 1000000\r\nExpect: 100-continue\r\n\r\n"
    ).encode()
    status, body = await raw_http(gw.client, request, timeout=3)
    assert status == 402 and b"Insufficient credits" in body


async def test_chunked_upload_over_the_limit_is_413_and_voided(
    make_gateway: MakeGateway, scripted: Scripted
) -> None:
    async def handler(request: web.Request) -> web.Response:
        try:
            await request.read()
        except Exception:
            scripted.events.append("upstream request aborted")
            raise
        return web.json_response({})

    scripted.handler = handler
    gw = await gateway_on(make_gateway, scripted, max_body_bytes=64 * 1024)
    key = await gw.key(credits=1)

    async def body() -> AsyncIterator[bytes]:
        for _ in range(64):
            yield b"x" * 4096
            await asyncio.sleep(0)

    resp = await gw.client.post("/api/v1/assess", headers=bearer(key), data=body())
    assert resp.status == 413
    assert "65536 bytes" in (await resp.json())["error"]
    await gw.settle()
    assert await gw.balance() == 1
    await gw.assert_reconciled()


async def test_upstream_breaking_off_mid_body_aborts_the_client_and_voids(
    make_gateway: MakeGateway, scripted: Scripted
) -> None:
    async def handler(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Length": "100000"})
        await response.prepare(request)
        await response.write(b"x" * 1000)
        await asyncio.sleep(0.05)
        assert request.transport is not None
        request.transport.abort()  # a reset after the status line went out
        return response

    scripted.handler = handler
    gw = await gateway_on(make_gateway, scripted)
    key = await gw.key(credits=1)
    async with gw.client.post("/api/v1/assess", headers=bearer(key)) as resp:
        assert resp.status == 200
        with pytest.raises(aiohttp.ClientPayloadError):
            await resp.read()
    await gw.settle()
    assert await gw.balance() == 1
    await gw.assert_reconciled()


async def test_chunked_upstream_half_close_is_never_a_clean_ending(
    make_gateway: MakeGateway, scripted: Scripted
) -> None:
    async def handler(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse()  # chunked
        await response.prepare(request)
        await response.write(b"partial")
        await asyncio.sleep(0.05)
        assert request.transport is not None
        request.transport.write_eof() if request.transport.can_write_eof() else None
        request.transport.close()
        return response

    scripted.handler = handler
    gw = await gateway_on(make_gateway, scripted)
    key = await gw.key(credits=1)
    async with gw.client.post("/api/v1/assess", headers=bearer(key)) as resp:
        with pytest.raises(aiohttp.ClientPayloadError):
            await resp.read()
    await gw.settle()
    assert await gw.balance() == 1


async def test_client_leaving_before_the_status_line_cancels_and_voids(
    make_gateway: MakeGateway, scripted: Scripted
) -> None:
    cancelled = asyncio.Event()

    async def handler(request: web.Request) -> web.Response:
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            cancelled.set()
            raise
        return web.json_response({})

    scripted.handler = handler
    gw = await gateway_on(make_gateway, scripted)
    key = await gw.key(credits=1)
    assert gw.client.server.port is not None
    _reader, writer = await asyncio.open_connection("127.0.0.1", gw.client.server.port)
    writer.write(
        f"POST /api/v1/assess HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer {key}\r\n"
        "Content-Length: 0\r\n\r\n".encode()
    )
    await writer.drain()
    await asyncio.sleep(0.3)
    writer.close()
    await asyncio.wait_for(cancelled.wait(), 5)  # the upstream request was cancelled
    for _ in range(50):
        await gw.settle()
        if await gw.balance() == 1:
            break
        await asyncio.sleep(0.05)
    assert await gw.balance() == 1
    await gw.assert_reconciled()
    assert await gw.gateway.backend.pending_count() == 0


async def test_client_leaving_after_a_2xx_status_is_charged(
    make_gateway: MakeGateway, scripted: Scripted
) -> None:
    async def handler(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse()
        await response.prepare(request)
        for _ in range(100):
            await response.write(b"x" * 1000)
            await asyncio.sleep(0.02)
        await response.write_eof()
        return response

    scripted.handler = handler
    gw = await gateway_on(make_gateway, scripted)
    key = await gw.key(credits=1)
    assert gw.client.server.port is not None
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.client.server.port)
    writer.write(
        f"POST /api/v1/assess HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer {key}\r\n"
        "Content-Length: 0\r\n\r\n".encode()
    )
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 3)
    assert head.startswith(b"HTTP/1.1 200")
    writer.close()
    for _ in range(100):
        await gw.settle()
        if await gw.gateway.backend.pending_count() == 0:
            break
        await asyncio.sleep(0.05)
    assert await gw.gateway.backend.pending_count() == 0
    assert await gw.balance() == 0
    await gw.assert_reconciled()


async def test_exchange_cut_off_at_max_duration(
    make_gateway: MakeGateway, scripted: Scripted
) -> None:
    async def handler(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse()
        await response.prepare(request)
        for _ in range(100):
            await response.write(b"tick")
            await asyncio.sleep(0.05)
        return response

    scripted.handler = handler
    gw = await gateway_on(make_gateway, scripted, max_duration_seconds=0.5)
    key = await gw.key(credits=1)
    async with gw.client.post("/api/v1/assess", headers=bearer(key)) as resp:
        assert resp.status == 200
        with pytest.raises(aiohttp.ClientPayloadError):
            await resp.read()
    await gw.settle()
    assert await gw.balance() == 1
    await gw.assert_reconciled()


async def test_max_duration_before_the_status_line_is_504(
    make_gateway: MakeGateway, scripted: Scripted
) -> None:
    async def handler(request: web.Request) -> web.Response:
        await asyncio.sleep(5)
        return web.json_response({})

    scripted.handler = handler
    gw = await gateway_on(make_gateway, scripted, max_duration_seconds=0.3)
    key = await gw.key(credits=1)
    resp = await gw.client.post("/api/v1/assess", headers=bearer(key))
    assert resp.status == 504
    await gw.settle()
    assert await gw.balance() == 1


async def quiet_gateway(make_gateway: MakeGateway, scripted: Scripted) -> Harness:
    """A gateway whose upstream may stay silent for 0.5 s between body chunks."""
    return await make_gateway(
        upstreams={
            "assess": {"url": scripted.url, "timeout_seconds": 5, "read_timeout_seconds": 0.5}
        },
        routes=[{"path": "/api/v1/assess", "methods": ["POST"], "upstream": "assess", "cost": 1}],
    )


async def test_stream_silent_past_read_timeout_is_cut_and_refunded(
    make_gateway: MakeGateway, scripted: Scripted
) -> None:
    async def handler(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse()
        await response.prepare(request)
        for _ in range(15):  # 1.5 s of chunks, 0.1 s apart: three times the quiet limit
            await response.write(b"tick")
            await asyncio.sleep(0.1)
        await asyncio.sleep(5)  # then silence
        return response

    scripted.handler = handler
    gw = await quiet_gateway(make_gateway, scripted)
    key = await gw.key(credits=1)
    received = b""
    loop = asyncio.get_running_loop()
    async with gw.client.post("/api/v1/assess", headers=bearer(key)) as resp:
        assert resp.status == 200
        started = loop.time()
        with pytest.raises(aiohttp.ClientPayloadError):
            async for chunk in resp.content.iter_any():
                received += chunk
        cut_after = loop.time() - started
    # Every chunk arrived (progress restarts the quiet time), then the silence was cut
    # well before the upstream's 5 s of it ended.
    assert received == b"tick" * 15
    assert 1.5 <= cut_after < 4, cut_after
    await gw.settle()
    assert await gw.balance() == 1
    await gw.assert_reconciled()


async def test_small_answer_silent_past_read_timeout_is_504_and_refunded(
    make_gateway: MakeGateway, scripted: Scripted
) -> None:
    async def handler(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse()
        response.content_length = 100
        await response.prepare(request)
        await response.write(b"x" * 10)  # 10 of the 100 bytes promised, then silence
        await asyncio.sleep(5)
        return response

    scripted.handler = handler
    gw = await quiet_gateway(make_gateway, scripted)
    key = await gw.key(credits=1)
    resp = await gw.client.post("/api/v1/assess", headers=bearer(key))
    assert resp.status == 504
    assert await resp.json() == {"error": "Upstream timed out"}
    await gw.settle()
    assert await gw.balance() == 1
    await gw.assert_reconciled()


@pytest.mark.parametrize(("header", "charged"), [("0", 0), ("1", 1), ("7", 1), ("-1", 1), ("x", 1)])
async def test_upstream_charge_header(
    make_gateway: MakeGateway, scripted: Scripted, header: str, charged: int
) -> None:
    async def handler(request: web.Request) -> web.Response:
        return web.json_response({}, headers={"X-Gateway-Charge": header})

    scripted.handler = handler
    gw = await gateway_on(make_gateway, scripted)
    key = await gw.key(credits=5)
    resp = await gw.client.post("/api/v1/assess", headers=bearer(key))
    assert resp.status == 200
    assert "X-Gateway-Charge" not in resp.headers
    assert resp.headers["X-Credits-Remaining"] == str(5 - charged)
    await gw.settle()
    assert await gw.balance() == 5 - charged
    await gw.assert_reconciled()


async def test_options_preflight_is_free_and_unauthenticated(
    make_gateway: MakeGateway, scripted: Scripted
) -> None:
    async def handler(request: web.Request) -> web.Response:
        return web.Response(status=204, headers={"Access-Control-Allow-Origin": "*"})

    scripted.handler = handler
    gw = await gateway_on(make_gateway, scripted)
    await gw.key(credits=1)
    resp = await gw.client.options(
        "/api/v1/assess",
        headers={"Origin": "https://app.example", "Access-Control-Request-Method": "POST"},
    )
    assert resp.status == 204
    await gw.settle()
    assert await gw.balance() == 1


async def test_forwarded_header_only_from_trusted_proxies(
    make_gateway: MakeGateway, scripted: Scripted
) -> None:
    seen: list[dict[str, str]] = []

    async def handler(request: web.Request) -> web.Response:
        seen.append(dict(request.headers))
        return web.json_response({})

    scripted.handler = handler
    gw = await gateway_on(make_gateway, scripted)
    key = await gw.key()
    await gw.client.post(
        "/api/v1/assess",
        headers={
            **bearer(key),
            "Forwarded": "for=6.6.6.6",
            "X-Forwarded-Host": "evil",
            "X-Forwarded-Proto": "https",
        },
    )
    assert "Forwarded" not in seen[-1]
    assert seen[-1]["X-Forwarded-Proto"] == "http"
    assert seen[-1]["X-Forwarded-Host"] != "evil"


async def test_client_leaving_during_a_small_upload_voids(
    make_gateway: MakeGateway, scripted: Scripted
) -> None:
    scripted.handler = lambda request: web.json_response({})
    gw = await gateway_on(make_gateway, scripted)
    key = await gw.key(credits=1)
    assert gw.client.server.port is not None
    _reader, writer = await asyncio.open_connection("127.0.0.1", gw.client.server.port)
    writer.write(
        f"POST /api/v1/assess HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer {key}\r\n"
        "Content-Length: 1000\r\n\r\npartial".encode()
    )
    await writer.drain()
    await asyncio.sleep(0.2)
    writer.close()
    for _ in range(50):
        await gw.settle()
        if await gw.gateway.backend.pending_count() == 0 and await gw.balance() == 1:
            break
        await asyncio.sleep(0.05)
    assert await gw.balance() == 1
    assert await gw.gateway.backend.pending_count() == 0
    assert scripted.events == [] and gw.upstream.requests == []
    await gw.assert_reconciled()


async def test_a_client_slow_to_read_is_not_upstream_silence(
    make_gateway: MakeGateway, scripted: Scripted
) -> None:
    # The upstream sends its whole answer at once; the client takes it only
    # after three times the quiet limit. The gateway waits on the client
    # meanwhile, and that is not the upstream going quiet: the answer arrives
    # whole and is charged.
    size = 32 * 1024 * 1024  # more than loopback socket buffers hold

    async def handler(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse()
        await response.prepare(request)
        chunk = b"z" * 65536
        for _ in range(size // len(chunk)):
            await response.write(chunk)
        await response.write_eof()
        return response

    scripted.handler = handler
    gw = await quiet_gateway(make_gateway, scripted)
    key = await gw.key(credits=1)
    async with gw.client.post("/api/v1/assess", headers=bearer(key)) as resp:
        assert resp.status == 200
        await asyncio.sleep(1.5)
        received = 0
        async for chunk in resp.content.iter_any():
            received += len(chunk)
    assert received == size
    await gw.settle()
    assert await gw.balance() == 0
    await gw.assert_reconciled()


async def test_a_small_body_trickled_past_the_routes_limit_is_refused_and_refunded(
    make_gateway: MakeGateway, scripted: Scripted
) -> None:
    # The reservation is held while the body arrives: the route's limit on the
    # whole exchange covers that wait too, so the reservation never outlives
    # its lease while the client takes its time.
    async def handler(request: web.Request) -> web.Response:
        scripted.events.append("upstream called")
        return web.json_response({})

    scripted.handler = handler
    gw = await gateway_on(make_gateway, scripted, max_duration_seconds=0.5)
    key = await gw.key(credits=1)
    head = (
        "POST /api/v1/assess HTTP/1.1\r\nHost: gw\r\n"
        f"Authorization: Bearer {key}\r\nContent-Type: application/json\r\n"
        "Content-Length: 100\r\n\r\n"
    ).encode()
    loop = asyncio.get_running_loop()
    started = loop.time()
    status, body = await raw_http(gw.client, head + b'{"essay": "', timeout=5)
    took = loop.time() - started
    assert status == 400
    assert b"did not arrive within this route's time limit" in body
    assert 0.5 <= took < 3, took
    assert scripted.events == []
    await gw.settle()
    assert await gw.balance() == 1
    await gw.assert_reconciled()
