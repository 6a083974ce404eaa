"""The lean client and aiohttp's, side by side: one corpus of upstream behaviours, same outcomes.

Each case is a raw upstream on loopback (every framing, every break-off point,
trickles, odd statuses and headers, 1xx, HEAD, 204/304). The same request goes
through a gateway whose upstream uses the lean client and through one that
uses aiohttp's; the client must see the same status, headers (but Date,
Server, the request id and the rate limit's clock), body and ending (whole, or
cut), and the ledger must hold the same charge. Where the two would differ,
the case says so and why.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from ..conftest import Harness, MakeGateway
from .raw import Conn, RawServer, chunk, ok, response

ASSESS = "/api/v1/assess"
BIG = b"b" * (200 * 1024)  # above the gateway's whole-read size: streamed
IGNORED = frozenset({"date", "server", "x-request-id", "ratelimit", "x-ratelimit-reset"})


@dataclass
class Case:
    wire: tuple[bytes, ...]  # what the upstream writes, piece by piece
    end: str = "keep"  # after writing: "keep" the connection, close it ("fin"), or "reset"
    method: str = "POST"
    pause: float = 0.0  # between pieces: a trickle


def trickle(data: bytes, size: int = 7) -> tuple[bytes, ...]:
    return tuple(data[i : i + size] for i in range(0, len(data), size))


CL_HEAD = response(b"200 OK", b"Content-Type: text/plain", b"Content-Length: %d" % len(BIG))
CHUNKED_HEAD = response(b"200 OK", b"Content-Type: text/plain", b"Transfer-Encoding: chunked")

CASES: dict[str, Case] = {
    # framings
    "length-small": Case((ok(b'{"score": 42}', b"Content-Type: application/json"),)),
    "length-large": Case((CL_HEAD + BIG,)),
    "length-zero": Case((ok(b""),)),
    "chunked": Case((CHUNKED_HEAD + chunk(b"hello ") + chunk(b"world") + b"0\r\n\r\n",)),
    "chunked-large": Case((CHUNKED_HEAD + chunk(BIG) + b"0\r\n\r\n",)),
    "chunked-trailers": Case((CHUNKED_HEAD + chunk(b"hi") + b"0\r\nX-Trailer: t\r\n\r\n",)),
    "chunked-extensions": Case((CHUNKED_HEAD + b"2;ext=1\r\nhi\r\n0\r\n\r\n",)),
    "close-delimited": Case(
        (b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\nto the end",), "fin"
    ),
    "http-1.0": Case((b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok",), "fin"),
    "connection-close": Case((ok(b"bye", close=True),), "fin"),
    "gzip-passes-through": Case((ok(b"\x1f\x8b\x08\x00notreally", b"Content-Encoding: gzip"),)),
    # trickles
    "trickle-head-and-body": Case(trickle(ok(b"slow body " * 5)), pause=0.002),
    "trickle-chunked": Case(trickle(CHUNKED_HEAD + chunk(b"a" * 50) + b"0\r\n\r\n"), pause=0.002),
    # statuses
    "201": Case((response(b"201 Created", b"Content-Length: 2", body=b"{}"),)),
    "299": Case((response(b"299 Odd", b"Content-Length: 0"),)),
    "302-not-followed": Case(
        (response(b"302 Found", b"Location: /elsewhere", b"Content-Length: 0"),)
    ),
    "404": Case((response(b"404 Not Found", b"Content-Length: 4", body=b"nope"),)),
    "500": Case((response(b"500 Internal Server Error", b"Content-Length: 4", body=b"boom"),)),
    "503-large": Case((response(b"503 Busy", b"Content-Length: %d" % len(BIG), body=BIG),)),
    "599": Case((response(b"599 Odd", b"Content-Length: 0"),)),
    "600": Case((response(b"600 Beyond", b"Content-Length: 0"),)),
    "101": Case(
        (b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: x\r\nConnection: Upgrade\r\n\r\n",)
    ),
    "empty-reason": Case((b"HTTP/1.1 200 \r\nContent-Length: 2\r\n\r\nok",)),
    "no-reason": Case((b"HTTP/1.1 200\r\nContent-Length: 2\r\n\r\nok",)),
    "reason-non-ascii": Case((b"HTTP/1.1 200 \xc3\xa9t\xc3\xa9\r\nContent-Length: 2\r\n\r\nok",)),
    "reason-control": Case((b"HTTP/1.1 200 O\x01K\r\nContent-Length: 2\r\n\r\nok",)),
    "invalid-status-line": Case((b"HTTP/1.1 2000 OK\r\nContent-Length: 2\r\n\r\nok",), "fin"),
    "not-http": Case((b"SSH-2.0-OpenSSH\r\n\r\n",), "fin"),
    # interim answers
    "100-continue": Case(
        (b"HTTP/1.1 100 Continue\r\n\r\n", ok(b"after")),
    ),
    "103-early-hints": Case((b"HTTP/1.1 103 Early Hints\r\nLink: </x>\r\n\r\n" + ok(b"after"),)),
    # HEAD, 204, 304
    "head": Case((response(b"200 OK", b"Content-Length: 1234"),), method="HEAD"),
    "head-chunked": Case((response(b"200 OK", b"Transfer-Encoding: chunked"),), method="HEAD"),
    "204": Case((response(b"204 No Content"),)),
    "304": Case((response(b"304 Not Modified", b'ETag: "x"'),), method="GET"),
    # headers
    "duplicate-headers": Case(
        (ok(b"x", b"X-A: 1", b"X-A: 2", b"Set-Cookie: a=1", b"Set-Cookie: b=2"),)
    ),
    "empty-header-value": Case((ok(b"x", b"X-Empty:"),)),
    "header-utf8": Case((ok(b"x", b"X-Name: \xc3\xa9"),)),
    "header-not-utf8": Case((ok(b"x", b"X-Name: \xff"),)),
    "header-control": Case((ok(b"x", b"X-Name: a\x01b"),), "fin"),
    "header-del": Case((ok(b"x", b"X-Name: a\x7fb"),), "fin"),
    "charge-lowered": Case((ok(b"x", b"X-Gateway-Charge: 1"),)),
    "charge-invalid": Case((ok(b"x", b"X-Gateway-Charge: \xc2\xb2"),)),
    "hop-by-hop-listed": Case((ok(b"x", b"Connection: X-Secret", b"X-Secret: s"),)),
    "conflicting-lengths": Case(
        (b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\nabc",), "fin"
    ),
    "length-and-chunked": Case(
        (b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",),
        "fin",
    ),
    # break-offs before the status line
    "nothing-fin": Case((), "fin"),
    "nothing-reset": Case((), "reset"),
    "mid-status-line": Case((b"HTTP/1.1 20",), "fin"),
    "mid-headers-reset": Case((b"HTTP/1.1 200 OK\r\nContent-Le",), "reset"),
    "after-100-fin": Case((b"HTTP/1.1 100 Continue\r\n\r\n",), "fin"),
    # break-offs after the status line
    "small-body-short": Case((ok(b"x" * 10)[:-4],), "fin"),
    "small-body-reset": Case((ok(b"x" * 10)[:-4],), "reset"),
    "large-body-short": Case((CL_HEAD + BIG[:5000],), "fin"),
    "large-body-reset": Case((CL_HEAD + BIG[:5000],), "reset"),
    "large-no-body": Case((CL_HEAD,), "fin"),
    "chunked-no-body": Case((CHUNKED_HEAD,), "fin"),
    "chunked-between-chunks": Case((CHUNKED_HEAD + chunk(b"abc"),), "fin"),
    "chunked-mid-chunk": Case((CHUNKED_HEAD + b"a\r\nabc",), "reset"),
    "chunked-before-last-crlf": Case((CHUNKED_HEAD + chunk(b"abc") + b"0\r\n",), "fin"),
    "chunked-bad-size": Case((CHUNKED_HEAD + chunk(b"abc") + b"zz\r\n",), "fin"),
}


@dataclass(frozen=True)
class Seen:
    """What the client saw: the status, headers, body and whether the answer ended whole."""

    status: int
    headers: tuple[tuple[str, str], ...]
    body: bytes
    whole: bool
    charged: int


def _parse(data: bytes, method: str) -> tuple[int, tuple[tuple[str, str], ...], bytes, bool]:
    head, sep, rest = data.partition(b"\r\n\r\n")
    if not sep:
        return 0, (), b"", False
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    headers = tuple(
        (name.strip().lower(), value.strip())
        for name, _, value in (line.partition(":") for line in lines[1:])
        if name.strip().lower() not in IGNORED
    )
    fields = dict(headers)
    if method == "HEAD" or status in (204, 304):
        return status, headers, b"", rest == b""
    if fields.get("transfer-encoding") == "chunked":
        body, whole = _dechunk(rest)
        return status, headers, body, whole
    length = int(fields.get("content-length", "-1"))
    return status, headers, rest[:length], length >= 0 and len(rest) == length


def _dechunk(data: bytes) -> tuple[bytes, bool]:
    out, rest = [], data
    while rest:
        size_line, sep, rest = rest.partition(b"\r\n")
        if not sep:
            break
        size = int(size_line.split(b";")[0].strip() or b"0", 16)
        if size == 0:
            return b"".join(out), rest == b"\r\n"
        out.append(rest[:size])
        rest = rest[size + 2 :]
    return b"".join(out), False


async def _send(
    gw: Harness, key: str, method: str
) -> tuple[int, tuple[tuple[str, str], ...], bytes, bool]:
    port = gw.client.server.port
    assert port is not None
    body = b'{"a": 1}' if method == "POST" else b""
    request = (
        f"{method} {ASSESS} HTTP/1.1\r\nHost: gateway\r\nAuthorization: Bearer {key}\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    ).encode() + body
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    data = b""
    try:
        writer.write(request)
        await writer.drain()
        with contextlib.suppress(ConnectionError):
            while part := await reader.read(65536):
                data += part
    finally:
        writer.transport.abort()
    return _parse(data, method)


def _script(case: Case) -> Any:
    async def script(conn: Conn) -> None:
        await conn.request()
        for piece in case.wire:
            await conn.send(piece)
            if case.pause:
                await asyncio.sleep(case.pause)
        if case.end == "reset":
            conn.writer.transport.abort()
        elif case.end == "fin":
            conn.writer.close()
        await conn.until_closed()

    return script


async def _through(make_gateway: MakeGateway, tmp_path: Path, case: Case, client: str) -> Seen:
    raw = RawServer(scripts=[_script(case)])
    await raw.start()
    try:
        gw = await make_gateway(
            storage=f"sqlite:///{tmp_path / client}.db",
            upstreams={
                "assess": {
                    "url": raw.url,
                    "client": client,
                    "timeout_seconds": 5,
                    "read_timeout_seconds": 5,
                }
            },
            routes=[{"path": ASSESS, "methods": ["POST", "GET"], "upstream": "assess", "cost": 3}],
        )
        key = await gw.key(credits=10)
        status, headers, body, whole = await _send(gw, key, case.method)
        await gw.settle()
        charged = 10 - await gw.balance()
        await gw.assert_reconciled()
        assert len(raw.requests) == 1, "the request went upstream once"
        return Seen(status, headers, body, whole, charged)
    finally:
        await raw.close()


@pytest.mark.parametrize("name", list(CASES))
async def test_both_clients_give_the_client_the_same(
    make_gateway: MakeGateway, tmp_path: Path, name: str
) -> None:
    case = CASES[name]
    lean = await _through(make_gateway, tmp_path, case, "lean")
    fallback = await _through(make_gateway, tmp_path, case, "aiohttp")
    assert lean == fallback
