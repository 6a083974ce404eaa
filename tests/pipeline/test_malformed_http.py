"""Malformed HTTP on a raw socket: refused with 400, nothing ambiguous forwarded."""

from __future__ import annotations

import pytest

from ..conftest import Harness, raw_http

KEYLESS = "POST /public HTTP/1.1\r\nHost: gw\r\n"


@pytest.mark.parametrize(
    ("name", "request_bytes"),
    [
        ("garbage request line", b"GARBAGE\r\n\r\n"),
        ("bad method token", b"PO(ST /public HTTP/1.1\r\nHost: gw\r\n\r\n"),
        ("bad version", b"POST /public HTTP/9.9\r\nHost: gw\r\n\r\n"),
        ("header line too long", (KEYLESS + "X-Long: " + "a" * 70000 + "\r\n\r\n").encode()),
        (
            "too many header bytes",
            (KEYLESS + "".join(f"X-H{i}: {'b' * 100}\r\n" for i in range(2000)) + "\r\n").encode(),
        ),
        (
            "content-length with transfer-encoding",
            (KEYLESS + "Content-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n").encode(),
        ),
        (
            "duplicate content-length",
            (KEYLESS + "Content-Length: 1\r\nContent-Length: 2\r\n\r\nab").encode(),
        ),
        ("negative content-length", (KEYLESS + "Content-Length: -1\r\n\r\n").encode()),
        ("content-length not a number", (KEYLESS + "Content-Length: 1e3\r\n\r\n").encode()),
        (
            "transfer-encoding not chunked last",
            (KEYLESS + "Transfer-Encoding: chunked, gzip\r\n\r\n").encode(),
        ),
        ("obs-fold", (KEYLESS + "X-Folded: a\r\n b\r\nContent-Length: 0\r\n\r\n").encode()),
        (
            "NUL in a header value",
            (KEYLESS + "X-Nul: a\x00b\r\nContent-Length: 0\r\n\r\n").encode(),
        ),
        (
            "bare CR in a header value",
            (KEYLESS + "X-Cr: a\rb\r\nContent-Length: 0\r\n\r\n").encode(),
        ),
        ("space before colon", (KEYLESS + "Content-Length : 0\r\n\r\n").encode()),
        (
            "absolute-form target",
            b"POST http://evil.example/public HTTP/1.1\r\nHost: gw\r\nContent-Length: 0\r\n\r\n",
        ),
        ("asterisk-form target", b"POST * HTTP/1.1\r\nHost: gw\r\nContent-Length: 0\r\n\r\n"),
        (
            "encoded dot segments",
            b"POST /public/%2e%2e/api/v1/assess HTTP/1.1\r\nHost: gw\r\nContent-Length: 0\r\n\r\n",
        ),
        (
            "encoded slash",
            b"POST /public%2f..%2fapi HTTP/1.1\r\nHost: gw\r\nContent-Length: 0\r\n\r\n",
        ),
        ("backslash", b"POST /public\\..\\api HTTP/1.1\r\nHost: gw\r\nContent-Length: 0\r\n\r\n"),
        ("empty segment", b"POST //public HTTP/1.1\r\nHost: gw\r\nContent-Length: 0\r\n\r\n"),
        (
            "control character in the path",
            b"POST /pub%01lic HTTP/1.1\r\nHost: gw\r\nContent-Length: 0\r\n\r\n",
        ),
        (
            "bad chunk size",
            (KEYLESS + "Transfer-Encoding: chunked\r\n\r\nzz\r\nab\r\n0\r\n\r\n").encode(),
        ),
    ],
)
async def test_malformed_requests_are_refused(gw: Harness, name: str, request_bytes: bytes) -> None:
    if b"Connection:" not in request_bytes:
        request_bytes = request_bytes.replace(b"\r\n", b"\r\nConnection: close\r\n", 1)
    status, _body = await raw_http(gw.client, request_bytes)
    assert status in (400, 431), f"{name}: got {status}"
    assert gw.upstream.requests == [], f"{name}: something was forwarded"


async def test_a_smuggled_second_request_is_not_forwarded(gw: Harness) -> None:
    smuggle = (
        b"POST /public HTTP/1.1\r\nHost: gw\r\nContent-Length: 44\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"0\r\n\r\nPOST /api/v1/assess HTTP/1.1\r\nHost: gw\r\n\r\n"
    )
    status, _ = await raw_http(gw.client, smuggle)
    assert status == 400
    assert gw.upstream.requests == []


async def test_well_formed_control_request_passes(gw: Harness) -> None:
    status, _ = await raw_http(
        gw.client,
        b"POST /public HTTP/1.1\r\nHost: gw\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok",
    )
    assert status == 200
    assert gw.upstream.requests[-1].body == b"ok"
