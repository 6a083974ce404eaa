"""The lean client against raw upstreams on loopback: framing, pooling, failures, TLS."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

import pytest
import trustme

from gateway.upstream import InvalidAnswer, LeanClient, UpstreamClient, UpstreamError
from gateway.upstream.connection import HIGH_WATER, MAX_HEAD_BYTES

from .raw import Conn, RawServer, chunk, eventually, ok, response

Make = Callable[..., UpstreamClient]
HEADERS = {"X-Test": "1"}


def lean(client: UpstreamClient) -> LeanClient:
    assert isinstance(client, LeanClient)
    return client


async def serve_forever(*answers: bytes) -> Callable[[Conn], object]:
    """A keep-alive script: the n-th request on a connection gets ``answers[n]`` (last repeats)."""

    async def script(conn: Conn) -> None:
        n = 0
        while True:
            await conn.request()
            await conn.send(answers[min(n, len(answers) - 1)])
            n += 1

    return script


async def body_of(
    client: UpstreamClient, method: str = "GET", target: str = "/", body: bytes | None = None
) -> tuple[int, bytes]:
    answer = await client.request(method, target, HEADERS, body)
    try:
        chunks = []
        while data := await answer.read_chunk():
            chunks.append(data)
        return answer.status, b"".join(chunks)
    finally:
        answer.release()


# -- the request as written ------------------------------------------------------------------


async def test_the_request_is_written_as_given_with_host_from_the_url(
    raw: RawServer, client_for: Make
) -> None:
    raw.scripts = [await serve_forever(ok())]
    client = client_for(raw.url + "/base")
    await body_of(client, "POST", "/x?q=%20a", None)
    await body_of(client, "PUT", "/y", b"abc")
    first, second = raw.requests
    assert first.line == "POST /base/x?q=%20a HTTP/1.1"
    assert first.header("Host") == f"127.0.0.1:{raw.port}"
    assert first.header("X-Test") == "1"
    assert first.header("Content-Length") == "0"
    assert first.header("User-Agent") is None and first.header("Accept-Encoding") is None
    assert second.body == b"abc" and second.header("Content-Length") == "3"
    assert raw.connections == 1, "the second request reuses the first connection"


async def test_a_streamed_body_goes_chunked_or_with_its_declared_length(
    raw: RawServer, client_for: Make
) -> None:
    raw.scripts = [await serve_forever(ok())]
    client = client_for(raw.url)

    async def parts() -> AsyncIterator[bytes]:
        for part in (b"ab", b"", b"cd"):
            yield part

    answer = await client.request("POST", "/", {}, parts())
    answer.release()
    answer = await client.request("POST", "/", {"Content-Length": "4"}, parts())
    answer.release()
    chunked, declared = raw.requests
    assert chunked.header("Transfer-Encoding") == "chunked" and chunked.body == b"abcd"
    assert declared.header("Transfer-Encoding") is None and declared.body == b"abcd"


async def test_an_upload_is_written_as_it_arrives(raw: RawServer, client_for: Make) -> None:
    """Backpressure on the way up: the next chunk is taken only once the upstream took the last."""
    got_first = asyncio.Event()
    more = asyncio.Event()

    async def script(conn: Conn) -> None:
        await conn.reader.readuntil(b"\r\n\r\n")
        assert await conn.reader.readuntil(b"first\r\n")
        got_first.set()
        await conn.reader.readuntil(b"0\r\n\r\n")
        await conn.send(ok())

    raw.scripts = [script]

    async def parts() -> AsyncIterator[bytes]:
        yield b"first"
        await more.wait()
        yield b"second"

    client = client_for(raw.url)
    pending = asyncio.ensure_future(client.request("POST", "/", {}, parts()))
    await got_first.wait()  # the upstream has the first chunk while the second is not there yet
    more.set()
    answer = await pending
    assert answer.status == 200
    answer.release()


async def test_a_slow_reader_pauses_the_socket_and_memory_stays_bounded(
    raw: RawServer, client_for: Make
) -> None:
    size = 64 * HIGH_WATER
    raw.scripts = [await serve_forever(ok(b"d" * size))]
    client = lean(client_for(raw.url))
    answer = await client.request("GET", "/", {}, None)
    conn = answer._conn  # type: ignore[attr-defined]
    await eventually(lambda: conn._reading_paused, "reading paused above the high-water mark")
    assert conn._buffered < 2 * HIGH_WATER
    total = 0
    while data := await answer.read_chunk():
        total += len(data)
        assert conn._buffered <= 2 * HIGH_WATER
    assert total == size
    answer.release()
    assert client.pool.idle == 1


# -- framings and statuses ---------------------------------------------------------------------


@pytest.mark.parametrize("client_kind", ["lean", "aiohttp"])
@pytest.mark.parametrize(
    ("wire", "status", "body", "reusable"),
    [
        pytest.param(ok(b"hello"), 200, b"hello", True, id="content-length"),
        pytest.param(
            response(
                b"200 OK",
                b"Transfer-Encoding: chunked",
                body=chunk(b"hel") + chunk(b"lo") + b"0\r\n\r\n",
            ),
            200,
            b"hello",
            True,
            id="chunked",
        ),
        pytest.param(
            response(
                b"200 OK",
                b"Transfer-Encoding: chunked",
                b"Trailer: X-T",
                body=chunk(b"hello") + b"0\r\nX-T: 1\r\n\r\n",
            ),
            200,
            b"hello",
            True,
            id="chunked-with-trailers",
        ),
        pytest.param(response(b"204 No Content"), 204, b"", True, id="204"),
        pytest.param(
            response(b"304 Not Modified", b"Content-Length: 10"),
            304,
            b"",
            True,
            id="304-with-length",
        ),
        pytest.param(
            b"HTTP/1.1 100 Continue\r\n\r\n" + ok(b"after"),
            200,
            b"after",
            True,
            id="100-continue-skipped",
        ),
        pytest.param(
            b"HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n" + ok(b"x"),
            200,
            b"x",
            True,
            id="103-skipped",
        ),
        pytest.param(
            response(b"599 Odd", b"Content-Length: 1", body=b"z"), 599, b"z", True, id="599"
        ),
        pytest.param(
            response(b"600 Beyond", b"Content-Length: 1", body=b"z"), 600, b"z", True, id="600"
        ),
    ],
)
async def test_framings_and_statuses(
    raw: RawServer,
    client_for: Make,
    client_kind: str,
    wire: bytes,
    status: int,
    body: bytes,
    reusable: bool,
) -> None:
    raw.scripts = [await serve_forever(wire)]
    client = client_for(raw.url, client=client_kind)
    assert await body_of(client) == (status, body)
    assert await body_of(client) == (status, body)
    assert raw.connections == 1


@pytest.mark.parametrize("client_kind", ["lean", "aiohttp"])
async def test_a_close_delimited_body_ends_with_the_connection(
    raw: RawServer, client_for: Make, client_kind: str
) -> None:
    async def script(conn: Conn) -> None:
        await conn.request()
        await conn.send(b"HTTP/1.1 200 OK\r\n\r\n", b"until ", b"the end")
        conn.writer.close()

    raw.scripts = [script]
    client = client_for(raw.url, client=client_kind)
    assert await body_of(client) == (200, b"until the end")


@pytest.mark.parametrize("client_kind", ["lean", "aiohttp"])
async def test_head_answers_have_no_body(
    raw: RawServer, client_for: Make, client_kind: str
) -> None:
    raw.scripts = [await serve_forever(response(b"200 OK", b"Content-Length: 1000"))]
    client = client_for(raw.url, client=client_kind)
    answer = await client.request("HEAD", "/", {}, None)
    assert answer.status == 200 and answer.content_length == 1000
    assert await answer.read_chunk() == b""
    answer.release()
    assert await body_of(client, "HEAD") == (200, b"")


@pytest.mark.parametrize("client_kind", ["lean", "aiohttp"])
async def test_101_is_returned_as_a_status(
    raw: RawServer, client_for: Make, client_kind: str
) -> None:
    raw.scripts = [
        await serve_forever(
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: x\r\nConnection: Upgrade\r\n\r\nraw"
        )
    ]
    client = client_for(raw.url, client=client_kind)
    answer = await client.request("GET", "/", {}, None)
    assert answer.status == 101
    answer.close()


async def test_headers_decode_as_utf8_with_surrogateescape(
    raw: RawServer, client_for: Make
) -> None:
    raw.scripts = [await serve_forever(ok(b"", b"X-A: \xc2\xb2", b"X-B: \xff", b"X-A: 2"))]
    for kind in ("lean", "aiohttp"):
        answer = await client_for(raw.url, client=kind).request("GET", "/", {}, None)
        assert answer.headers.getall("X-A") == ["²", "2"]
        assert answer.headers["X-B"] == "\udcff"
        answer.release()


@pytest.mark.parametrize(
    "wire",
    [
        pytest.param(b"HTTP/1.1 2000 OK\r\nContent-Length: 0\r\n\r\n", id="status-2000"),
        pytest.param(b"HTTX/1.1 200 OK\r\n\r\n", id="not-http"),
        pytest.param(
            b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\nabc",
            id="conflicting-lengths",
        ),
        pytest.param(
            b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
            id="length-and-chunked",
        ),
        pytest.param(b"HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n", id="length-not-a-number"),
        pytest.param(
            b"HTTP/1.1 200 OK\r\nX-A: a\x01b\r\nContent-Length: 0\r\n\r\n", id="control-character"
        ),
        pytest.param(b"HTTP/1.1 200 OK\r\nX A: b\r\nContent-Length: 0\r\n\r\n", id="space-in-name"),
    ],
)
async def test_a_malformed_answer_is_an_upstream_error(
    raw: RawServer, client_for: Make, wire: bytes
) -> None:
    raw.scripts = [await serve_forever(wire)]
    client = lean(client_for(raw.url))
    with pytest.raises(UpstreamError):
        await client.request("GET", "/", {}, None)
    assert client.pool.open == 0


async def test_an_answer_head_over_the_cap_is_refused(raw: RawServer, client_for: Make) -> None:
    line = b"X-Filler: " + b"f" * 990 + b"\r\n"
    fits = (
        b"HTTP/1.1 200 OK\r\n" + line * (MAX_HEAD_BYTES // 1024 - 4) + b"Content-Length: 0\r\n\r\n"
    )
    over = (
        b"HTTP/1.1 200 OK\r\n" + line * (MAX_HEAD_BYTES // 1000 + 2) + b"Content-Length: 0\r\n\r\n"
    )
    # Interim answers do not reset the count: endless 100s are refused too.
    interim = b"HTTP/1.1 100 Continue\r\n" + line * 10 + b"\r\n"
    raw.scripts = [await serve_forever(fits)]
    client = lean(client_for(raw.url))
    answer = await client.request("GET", "/", {}, None)
    assert answer.status == 200 and len(answer.headers.getall("X-Filler")) > 50
    assert await answer.read_chunk() == b""
    answer.release()
    for wire in (over, interim * 8):
        raw.scripts = [await serve_forever(wire)]
        client = lean(client_for(raw.url))
        with pytest.raises(InvalidAnswer, match="head over"):
            await client.request("GET", "/", {}, None)
        assert client.pool.open == 0


async def test_bad_chunk_framing_after_the_head_breaks_the_body(
    raw: RawServer, client_for: Make
) -> None:
    read_first = asyncio.Event()

    async def script(conn: Conn) -> None:
        await conn.request()
        await conn.send(response(b"200 OK", b"Transfer-Encoding: chunked", body=chunk(b"abc")))
        await read_first.wait()
        await conn.send(b"zz\r\n")
        await conn.until_closed()

    raw.scripts = [script]
    client = lean(client_for(raw.url))
    answer = await client.request("GET", "/", {}, None)
    assert await answer.read_chunk() == b"abc"
    read_first.set()
    with pytest.raises(UpstreamError):
        await answer.read_chunk()
    answer.release()
    assert client.pool.open == 0


async def test_an_invalid_body_seen_with_the_head_fails_the_request(
    raw: RawServer, client_for: Make
) -> None:
    """Known invalid before the head is handed over: nothing was relayed, so a clean 502."""
    raw.scripts = [
        await serve_forever(
            response(b"200 OK", b"Transfer-Encoding: chunked", body=chunk(b"abc") + b"zz\r\n")
        )
    ]
    for kind in ("lean", "aiohttp"):
        with pytest.raises(InvalidAnswer):
            await client_for(raw.url, client=kind).request("GET", "/", {}, None)


# -- break-offs ---------------------------------------------------------------------------------


@pytest.mark.parametrize("client_kind", ["lean", "aiohttp"])
@pytest.mark.parametrize("reset", [False, True], ids=["fin", "reset"])
@pytest.mark.parametrize(
    "sent",
    [
        pytest.param(b"", id="nothing"),
        pytest.param(b"HTTP/1.1 200", id="mid-status-line"),
        pytest.param(b"HTTP/1.1 200 OK\r\nContent-Le", id="mid-headers"),
        pytest.param(b"HTTP/1.1 100 Continue\r\n\r\n", id="after-100"),
    ],
)
async def test_a_break_before_the_status_is_an_upstream_error(
    raw: RawServer, client_for: Make, client_kind: str, reset: bool, sent: bytes
) -> None:
    async def script(conn: Conn) -> None:
        await conn.request()
        await conn.send(sent)
        if reset:
            conn.writer.transport.abort()
        else:
            conn.writer.close()
            await conn.until_closed()

    raw.scripts = [script]
    with pytest.raises(UpstreamError):
        await client_for(raw.url, client=client_kind).request("POST", "/", {}, b"x")


@pytest.mark.parametrize("client_kind", ["lean", "aiohttp"])
@pytest.mark.parametrize("reset", [False, True], ids=["fin", "reset"])
@pytest.mark.parametrize(
    "sent",
    [
        pytest.param(response(b"200 OK", b"Content-Length: 10"), id="length-no-body"),
        pytest.param(
            response(b"200 OK", b"Content-Length: 10", body=b"abc"), id="length-part-body"
        ),
        pytest.param(response(b"200 OK", b"Transfer-Encoding: chunked"), id="chunked-no-body"),
        pytest.param(
            response(b"200 OK", b"Transfer-Encoding: chunked", body=chunk(b"abc")),
            id="chunked-between-chunks",
        ),
        pytest.param(
            response(b"200 OK", b"Transfer-Encoding: chunked", body=b"a\r\nabc"),
            id="chunked-mid-chunk",
        ),
        pytest.param(
            response(b"200 OK", b"Transfer-Encoding: chunked", body=chunk(b"abc") + b"0\r\n"),
            id="chunked-before-last-crlf",
        ),
    ],
)
async def test_a_break_after_the_status_breaks_the_body(
    raw: RawServer, client_for: Make, client_kind: str, reset: bool, sent: bytes
) -> None:
    async def script(conn: Conn) -> None:
        await conn.request()
        await conn.send(sent)
        if reset:
            conn.writer.transport.abort()
        else:
            conn.writer.close()
            await conn.until_closed()

    raw.scripts = [script]
    answer = await client_for(raw.url, client=client_kind).request("GET", "/", {}, None)
    assert answer.status == 200
    with pytest.raises(UpstreamError):
        while await answer.read_chunk():
            pass
    answer.release()


# -- reuse, retry, limits, expiry ---------------------------------------------------------------


def closes_the_second_request(conn: Conn) -> object:
    async def script() -> None:
        await conn.request()
        await conn.send(ok(b"first"))
        await conn.reader.readuntil(b"\r\n\r\n")  # the next request arrives: close unanswered
        conn.writer.close()
        await conn.until_closed()

    return script()


@pytest.mark.parametrize(
    ("method", "body", "retried"),
    [
        pytest.param("GET", None, True, id="get"),
        pytest.param("POST", None, True, id="post-without-body"),
        pytest.param("PUT", b"x", True, id="put-with-bytes"),
        pytest.param("POST", b"x", False, id="post-with-bytes"),
        pytest.param("PUT", "stream", False, id="put-with-stream"),
    ],
)
async def test_a_reused_connection_closed_before_answering_is_retried_once_if_safe(
    raw: RawServer, client_for: Make, method: str, body: object, retried: bool
) -> None:
    raw.scripts = [closes_the_second_request, await serve_forever(ok(b"fresh"))]  # type: ignore[list-item]
    client = lean(client_for(raw.url))
    assert await body_of(client) == (200, b"first")

    async def stream() -> AsyncIterator[bytes]:
        yield b"x"

    payload = stream() if body == "stream" else body
    if retried:
        answer = await client.request(method, "/", {}, payload)  # type: ignore[arg-type]
        assert answer.status == 200 and await answer.read_chunk() == b"fresh"
        answer.release()
        assert raw.connections == 2
    else:
        with pytest.raises(UpstreamError):
            await client.request(method, "/", {}, payload)  # type: ignore[arg-type]
        assert len(raw.requests) == 1, "sent once only"


async def test_a_cancelled_exchange_closes_its_connection(raw: RawServer, client_for: Make) -> None:
    async def silent(conn: Conn) -> None:
        await conn.request()
        await conn.until_closed()

    raw.scripts = [silent]
    client = lean(client_for(raw.url))
    task = asyncio.ensure_future(client.request("GET", "/", {}, None))
    await eventually(lambda: len(raw.requests) == 1, "the request arrived")
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert client.pool.open == 0 and client.pool.idle == 0
    await eventually(lambda: raw.closed == 1, "the upstream saw the connection close")


async def test_a_cancelled_body_read_closes_its_connection(
    raw: RawServer, client_for: Make
) -> None:
    async def head_only(conn: Conn) -> None:
        await conn.request()
        await conn.send(response(b"200 OK", b"Content-Length: 5", body=b"ab"))
        await conn.until_closed()

    raw.scripts = [head_only]
    client = lean(client_for(raw.url))
    answer = await client.request("GET", "/", {}, None)
    assert await answer.read_chunk() == b"ab"
    task = asyncio.ensure_future(answer.read_chunk())
    await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    answer.release()
    assert client.pool.open == 0
    await eventually(lambda: raw.closed == 1, "the upstream saw the connection close")


async def test_requests_wait_for_a_connection_at_the_limit(
    raw: RawServer, client_for: Make
) -> None:
    raw.scripts = [await serve_forever(ok(b"a"))]
    client = lean(client_for(raw.url, max_connections=1))
    first = await client.request("GET", "/", {}, None)
    second = asyncio.ensure_future(body_of(client))
    third = asyncio.ensure_future(body_of(client))
    for _ in range(5):
        await asyncio.sleep(0)
    assert not second.done() and len(raw.requests) == 1, "the others wait in line"
    assert await first.read_chunk() == b"a"
    first.release()
    assert await second == (200, b"a") and await third == (200, b"a")
    assert raw.connections == 1 and client.pool.open == 1


async def test_a_waiter_cancelled_in_line_gives_its_turn_on(
    raw: RawServer, client_for: Make
) -> None:
    raw.scripts = [await serve_forever(ok(b"a"))]
    client = lean(client_for(raw.url, max_connections=1))
    first = await client.request("GET", "/", {}, None)
    gone = asyncio.ensure_future(body_of(client))
    stays = asyncio.ensure_future(body_of(client))
    await asyncio.sleep(0)
    gone.cancel()
    first.close()
    assert await stays == (200, b"a")
    assert client.pool.open == 1


async def test_idle_connections_expire(raw: RawServer, client_for: Make) -> None:
    raw.scripts = [await serve_forever(ok())]
    client = lean(client_for(raw.url, keepalive_seconds=0.05))
    await body_of(client)
    await eventually(lambda: raw.closed == 1, "the idle connection was closed")
    assert client.pool.open == 0
    await body_of(client)
    assert raw.connections == 2


async def test_connection_refused_is_an_upstream_error(client_for: Make) -> None:
    server = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    server.close()
    await server.wait_closed()
    for kind in ("lean", "aiohttp"):
        with pytest.raises(UpstreamError):
            await client_for(f"http://127.0.0.1:{port}", client=kind).request("GET", "/", {}, None)


async def test_the_connect_timeout(client_for: Make) -> None:
    # A listening socket whose backlog is full: further SYNs go unanswered.
    import socket

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    port = listener.getsockname()[1]
    fillers = []
    try:
        for _ in range(8):
            s = socket.socket()
            s.setblocking(False)
            s.connect_ex(("127.0.0.1", port))
            fillers.append(s)
        for kind in ("lean", "aiohttp"):
            client = client_for(
                f"http://127.0.0.1:{port}", client=kind, connect_timeout_seconds=0.2
            )
            with pytest.raises(TimeoutError):
                await client.request("GET", "/", {}, None)
    finally:
        for s in fillers:
            s.close()
        listener.close()


# -- TLS ------------------------------------------------------------------------------------------


@pytest.fixture
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.mark.parametrize("client_kind", ["lean", "aiohttp"])
async def test_tls_with_verified_certificates(
    ca: trustme.CA, tmp_path: object, client_for: Make, client_kind: str
) -> None:
    import pathlib
    import ssl

    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("localhost").configure_cert(server_ctx)
    raw = RawServer(tls=server_ctx)
    raw.scripts = [await serve_forever(ok(b"secret"))]
    await raw.start()
    try:
        ca_file = pathlib.Path(str(tmp_path)) / "ca.pem"
        ca.cert_pem.write_to_path(str(ca_file))
        trusted = client_for(raw.url, client=client_kind, ca_file=str(ca_file))
        assert await body_of(trusted) == (200, b"secret")
        assert await body_of(trusted) == (200, b"secret")
        untrusted = client_for(raw.url, client=client_kind)
        with pytest.raises(UpstreamError):
            await untrusted.request("GET", "/", {}, None)
    finally:
        await raw.close()
