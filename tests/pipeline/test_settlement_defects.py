"""Settlement on the request path: the rule table of ARCHITECTURE.md, one defect per test.

The rule the gateway follows (CONTRACT §1 Credits and Idempotency):

- the client is charged exactly when it received a complete 2xx answer, or
  left after the status line of a 2xx it was sent;
- an idempotency key is kept exactly when the attempt was charged or the
  upstream's complete answer was delivered; otherwise it is released, and a
  retry under it is forwarded afresh.

Upstreams here are raw asyncio servers on loopback, so that they can send
bytes aiohttp's server would refuse to write (control characters, statuses
outside 100-599, answers that break off). The gateway runs in process on the
default SQLite store; the two idempotency rows also run on PostgreSQL.

Nothing is timed: where a test must know that the gateway has reached a point
of the exchange, it waits for the gateway's own metrics to say so
(``gateway_upstream_duration_seconds`` is observed when the upstream's status
line has arrived; ``gateway_requests_in_flight`` drops when a request is done).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import orjson
import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from tests.storage.conftest import databases, postgres_admin_dsn, postgres_dsn, postgres_template

from ..conftest import Harness, MakeGateway, bearer

# Fixtures for the PostgreSQL runs (a migrated database of each test's own).
__all__ = ["databases", "postgres_admin_dsn", "postgres_dsn", "postgres_template"]

ASSESS = "/api/v1/assess"
# The pipeline reads answers up to this size with a declared length whole before
# sending anything; larger or chunked ones are streamed (status line first).
SMALL_BODY = 64 * 1024
LARGE = 3 * SMALL_BODY


# -- a raw HTTP/1.1 upstream ---------------------------------------------------------------


@dataclass
class RawRequest:
    head: bytes
    body: bytes

    def header(self, name: str) -> str | None:
        for line in self.head.decode("latin-1").split("\r\n")[1:]:
            key, _, value = line.partition(":")
            if key.strip().lower() == name.lower():
                return value.strip()
        return None


Answer = Callable[[asyncio.StreamWriter], Awaitable[None]]


async def _read_request(reader: asyncio.StreamReader) -> RawRequest:
    """One HTTP/1.1 request, head and body (fixed-length or chunked)."""
    head = await reader.readuntil(b"\r\n\r\n")
    request = RawRequest(head, b"")
    length = request.header("Content-Length")
    if "chunked" in (request.header("Transfer-Encoding") or "").lower():
        chunks = []
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0].strip(), 16)
            chunks.append((await reader.readexactly(size + 2))[:-2])
            if size == 0:  # no trailers: the last chunk's CRLF ends the body
                break
        request.body = b"".join(chunks)
    elif length:
        request.body = await reader.readexactly(int(length))
    return request


@dataclass
class RawUpstream:
    """Answers the n-th request it receives with ``answers[n]`` (the last one repeats).

    Every answer is written byte for byte as given, on a connection of its own:
    the upstream closes it after answering.
    """

    answers: list[Answer] = field(default_factory=list)
    requests: list[RawRequest] = field(default_factory=list)
    _server: asyncio.Server | None = None
    _tasks: set[asyncio.Task[Any]] = field(default_factory=set)

    @property
    def url(self) -> str:
        assert self._server is not None
        port = self._server.sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}"

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            for task in list(self._tasks):
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
            await self._server.wait_closed()
            self._server = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            request = await _read_request(reader)
            index = len(self.requests)
            self.requests.append(request)
            await self.answers[min(index, len(self.answers) - 1)](writer)
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass  # the gateway let go first
        except asyncio.CancelledError:
            pass  # the test is over (a leaf task: nothing waits for its cancellation)
        finally:
            self._tasks.discard(task)
            writer.transport.abort()


@pytest.fixture
async def raw_upstream() -> AsyncIterator[RawUpstream]:
    upstream = RawUpstream()
    await upstream.start()
    yield upstream
    await upstream.close()


def head(status_line: bytes, *headers: bytes) -> bytes:
    """A status line and headers as given, plus ``Connection: close``."""
    return (
        status_line
        + b"\r\n"
        + b"".join(h + b"\r\n" for h in headers)
        + b"Connection: close\r\n\r\n"
    )


def sends(*parts: bytes) -> Answer:
    """Write these bytes, then close the connection (FIN)."""

    async def answer(writer: asyncio.StreamWriter) -> None:
        writer.write(b"".join(parts))
        await writer.drain()
        writer.close()
        await writer.wait_closed()

    return answer


def ok(body: bytes = b'{"score": 42}', *extra: bytes) -> Answer:
    """A whole 200 answer of known length."""
    return sends(
        head(
            b"HTTP/1.1 200 OK",
            b"Content-Type: application/json",
            b"Content-Length: %d" % len(body),
            *extra,
        ),
        body,
    )


def chunked(body: bytes) -> bytes:
    return b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body)


# -- the gateway ---------------------------------------------------------------------------


@pytest.fixture(params=["sqlite", "postgresql"])
def store(request: pytest.FixtureRequest) -> dict[str, Any]:
    """Config overrides for the store: the default SQLite file, or a PostgreSQL database."""
    if request.param == "sqlite":
        return {}
    return {"storage": request.getfixturevalue("postgres_dsn")}


async def gateway_on(
    make_gateway: MakeGateway, upstream: RawUpstream, *, cost: int = 1, **overrides: Any
) -> Harness:
    return await make_gateway(
        upstreams={
            "assess": {"url": upstream.url, "timeout_seconds": 5, "read_timeout_seconds": 5}
        },
        routes=[{"path": ASSESS, "methods": ["POST"], "upstream": "assess", "cost": cost}],
        **overrides,
    )


def with_key(key: str, idempotency_key: str) -> dict[str, str]:
    return {**bearer(key), "Idempotency-Key": idempotency_key}


def post_bytes(key: str, body: bytes = b'{"a": 1}', *extra: str) -> bytes:
    """A POST the gateway answers and then closes (``Connection: close``)."""
    lines = [
        f"POST {ASSESS} HTTP/1.1",
        "Host: gateway",
        f"Authorization: Bearer {key}",
        "Content-Type: application/json",
        f"Content-Length: {len(body)}",
        "Connection: close",
        *extra,
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


@dataclass
class RawAnswer:
    """What a raw client got: status 0 when the connection closed before any answer."""

    status: int
    head: bytes
    body: bytes


def _dechunk(data: bytes) -> bytes:
    out, rest = [], data
    while rest:
        size_line, _, rest = rest.partition(b"\r\n")
        size = int(size_line.split(b";")[0].strip() or b"0", 16)
        if size == 0:
            break
        out.append(rest[:size])
        rest = rest[size + 2 :]
    return b"".join(out)


async def send_raw(gw: Harness, request: bytes) -> RawAnswer:
    """Send bytes as given; read until the gateway closes the connection."""
    port = gw.client.server.port
    assert port is not None
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(request)
        await writer.drain()
        data = b""
        with contextlib.suppress(ConnectionError):
            data = await reader.read()
    finally:
        writer.transport.abort()
    head_bytes, _, body = data.partition(b"\r\n\r\n")
    status = int(head_bytes.split(b" ", 2)[1]) if head_bytes else 0
    if b"\r\ntransfer-encoding: chunked" in head_bytes.lower():
        body = _dechunk(body)
    return RawAnswer(status, head_bytes, body)


def metric(gw: Harness, sample: str, **labels: str) -> float:
    """A sample of the gateway's own /metrics exposition (0 when absent)."""
    text = generate_latest(gw.gateway.metrics.collector_registry()).decode()
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == sample and all(s.labels.get(k) == v for k, v in labels.items()):
                return float(s.value)
    return 0.0


async def eventually(condition: Callable[[], bool], what: str) -> None:
    """Wait until ``condition`` holds (a state to reach, not a time to meet)."""
    for _ in range(2000):
        if condition():
            return
        await asyncio.sleep(0.005)
    raise AssertionError(f"never happened: {what}")


def upstream_answered(gw: Harness) -> float:
    """Status lines the gateway has read from the upstream."""
    return metric(gw, "gateway_upstream_duration_seconds_count", upstream="assess")


def in_flight(gw: Harness) -> float:
    return metric(gw, "gateway_requests_in_flight")


async def credits_available(gw: Harness, key: str) -> int:
    """The balance as a client reads it (GET /api/v1/credits)."""
    resp = await gw.client.get("/api/v1/credits", headers=bearer(key))
    assert resp.status == 200, await resp.text()
    value = (await resp.json())["credits_available"]
    assert isinstance(value, int)
    return value


def error_of(body: bytes) -> str:
    payload = orjson.loads(body)
    assert isinstance(payload, dict) and set(payload) == {"error"}, payload
    assert isinstance(payload["error"], str) and payload["error"]
    return payload["error"]


# -- 1. the client leaves after a 2xx status line, before a small body ---------------------


async def test_a_client_leaving_before_a_small_2xx_body_is_charged_once_and_keeps_its_key(
    store: dict[str, Any], make_gateway: MakeGateway, raw_upstream: RawUpstream
) -> None:
    """Charged (the work was done): so the key is kept, and a retry is neither
    forwarded nor charged again. The body never reached the client whole, so
    there is nothing to replay: the retry gets the contract's "not stored" 409."""
    headers_sent = asyncio.Event()
    finish = asyncio.Event()
    body = b'{"score": 42}'

    async def status_line_then_wait(writer: asyncio.StreamWriter) -> None:
        writer.write(
            head(
                b"HTTP/1.1 200 OK",
                b"Content-Type: application/json",
                b"Content-Length: %d" % len(body),
            )
        )
        await writer.drain()
        headers_sent.set()
        await finish.wait()
        writer.write(body)
        await writer.drain()

    raw_upstream.answers = [status_line_then_wait, ok(b'{"score": 0}')]
    gw = await gateway_on(make_gateway, raw_upstream, **store)
    key = await gw.key(credits=5)
    request = b'{"a": 1}'

    port = gw.client.server.port
    assert port is not None
    _, client = await asyncio.open_connection("127.0.0.1", port)
    try:
        client.write(post_bytes(key, request, "Idempotency-Key: leave-early"))
        await client.drain()
        await headers_sent.wait()
        await eventually(lambda: upstream_answered(gw) == 1, "the gateway read the 200 status line")
    finally:
        client.transport.abort()  # the client leaves before the body arrived
    await eventually(lambda: in_flight(gw) == 0, "the gateway finished the abandoned request")
    finish.set()
    await gw.settle()
    assert await gw.balance() == 4, "a client that left after a 2xx status line is charged"

    retry = await gw.client.post(ASSESS, headers=with_key(key, "leave-early"), data=request)
    retry_body = await retry.read()
    forwarded = len(raw_upstream.requests)
    assert forwarded == 1, (
        f"the retry was forwarded again (answered {retry.status} {retry_body[:200]!r}); "
        "the first attempt was charged, so its key must be kept"
    )
    # Nothing to replay (the body never arrived whole): 409 with an explanatory error.
    assert retry.status == 409, retry_body
    assert "Idempotent-Replayed" not in retry.headers
    error_of(retry_body)
    await gw.settle()
    assert await gw.balance() == 4, "charged twice for one Idempotency-Key"
    await gw.assert_reconciled()


# -- 2. a 2xx whose head the gateway cannot write to the client ----------------------------

SMALL = b'{"score": 42}'
BIG = b"b" * LARGE


SMALL_FRAMING = b"Content-Length: %d" % len(SMALL)
LARGE_FRAMING = b"Content-Length: %d" % LARGE
CHUNKED_FRAMING = b"Transfer-Encoding: chunked"


@pytest.mark.parametrize(
    ("status_line", "header", "framing", "payload"),
    [
        pytest.param(
            b"HTTP/1.1 200 OK", b"X-Note: a\x01b", SMALL_FRAMING, SMALL, id="header-0x01-small"
        ),
        pytest.param(
            b"HTTP/1.1 200 OK", b"X-Note: a\x7fb", SMALL_FRAMING, SMALL, id="header-0x7f-small"
        ),
        pytest.param(
            b"HTTP/1.1 200 O\x01K", b"X-Note: fine", SMALL_FRAMING, SMALL, id="reason-0x01-small"
        ),
        pytest.param(
            b"HTTP/1.1 200 OK", b"X-Note: a\x01b", LARGE_FRAMING, BIG, id="header-0x01-large"
        ),
        pytest.param(
            b"HTTP/1.1 200 O\x7fK",
            b"X-Note: fine",
            CHUNKED_FRAMING,
            chunked(SMALL),
            id="reason-0x7f-chunked",
        ),
    ],
)
async def test_a_2xx_head_the_gateway_cannot_write_is_a_502_and_not_charged(
    make_gateway: MakeGateway,
    raw_upstream: RawUpstream,
    status_line: bytes,
    header: bytes,
    framing: bytes,
    payload: bytes,
) -> None:
    """aiohttp refuses to write a control character in a header or the reason
    phrase. The client never got a 2xx status line, so it gets a 502 and is
    not charged, whether the body would have been sent whole or streamed."""
    raw_upstream.answers = [
        sends(head(status_line, b"Content-Type: application/json", header, framing), payload)
    ]
    gw = await gateway_on(make_gateway, raw_upstream)
    key = await gw.key(credits=5)

    answer = await send_raw(gw, post_bytes(key))
    assert answer.status == 502, (
        f"expected a 502 JSON error, got status {answer.status} "
        f"({'the connection closed with no answer' if not answer.status else answer.body[:200]!r})"
    )
    error_of(answer.body)
    assert len(raw_upstream.requests) == 1
    await gw.settle()
    assert await gw.balance() == 5, "charged for an answer the client never got"
    await gw.assert_reconciled()


# -- 3. statuses outside 100-599, and 101 ---------------------------------------------------


@pytest.mark.parametrize(
    "answer",
    [
        pytest.param(
            head(b"HTTP/1.1 600 Beyond", b"Content-Length: %d" % len(SMALL)) + SMALL, id="600"
        ),
        pytest.param(
            head(b"HTTP/1.1 999 Beyond", b"Content-Length: %d" % len(SMALL)) + SMALL, id="999"
        ),
        pytest.param(
            b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n"
            + SMALL,
            id="101",
        ),
    ],
)
async def test_an_invalid_upstream_status_is_a_502_and_not_charged(
    make_gateway: MakeGateway, raw_upstream: RawUpstream, answer: bytes
) -> None:
    """A status that is no final HTTP status (outside 100-599), or a switch of
    protocols nobody asked for, is an upstream error: 502, and the contract
    refunds every non-2xx by default."""
    raw_upstream.answers = [sends(answer)]
    gw = await gateway_on(make_gateway, raw_upstream)
    key = await gw.key(credits=5)

    got = await send_raw(gw, post_bytes(key))
    assert got.status == 502, (
        f"expected a 502 JSON error, got status {got.status} "
        f"({'the connection closed with no answer' if not got.status else got.body[:200]!r})"
    )
    error_of(got.body)
    assert len(raw_upstream.requests) == 1
    await gw.settle()
    assert await gw.balance() == 5, "charged for an invalid upstream status"
    await gw.assert_reconciled()


# -- 4. X-Gateway-Charge: only one plain ASCII number in 0..cost lowers the charge ----------

COST = 5


@pytest.mark.parametrize(
    ("charge_headers", "charged"),
    [
        pytest.param([b"X-Gateway-Charge: \xc2\xb2"], COST, id="superscript-two"),
        pytest.param([b"X-Gateway-Charge: " + b"7" * 5000], COST, id="5000-digits"),
        pytest.param([b"X-Gateway-Charge: \xd9\xa3"], COST, id="arabic-indic-three"),
        pytest.param(
            [b"X-Gateway-Charge: 1", b"X-Gateway-Charge: 1"], COST, id="repeated-same-value"
        ),
        pytest.param(
            [b"X-Gateway-Charge: 1", b"X-Gateway-Charge: 2"], COST, id="repeated-two-values"
        ),
        pytest.param([b"X-Gateway-Charge: 2"], 2, id="valid-two"),
    ],
)
async def test_an_invalid_charge_header_charges_the_full_cost(
    make_gateway: MakeGateway, raw_upstream: RawUpstream, charge_headers: list[bytes], charged: int
) -> None:
    """The upstream did the work and answered 2xx: the client gets that answer.
    Only a single ``X-Gateway-Charge`` of plain ASCII digits in 0..cost lowers
    the charge; anything else is ignored and the route's full cost is posted."""
    raw_upstream.answers = [ok(SMALL, *charge_headers)]
    gw = await gateway_on(make_gateway, raw_upstream, cost=COST)
    key = await gw.key(credits=20)

    resp = await gw.client.post(ASSESS, headers=bearer(key), data=b'{"a": 1}')
    body = await resp.read()
    assert resp.status == 200, f"the upstream's 2xx was not delivered: {resp.status} {body!r}"
    assert body == SMALL
    assert "X-Gateway-Charge" not in resp.headers
    assert resp.headers.get("X-Credits-Remaining") == str(20 - charged), (
        f"X-Credits-Remaining {resp.headers.get('X-Credits-Remaining')}, "
        f"expected {20 - charged} (charged {charged})"
    )
    await gw.settle()
    assert await gw.balance() == 20 - charged
    await gw.assert_reconciled()


# -- 5. a streamed 2xx that breaks off mid-body releases its idempotency key ----------------


@pytest.mark.parametrize(
    "broken",
    [
        pytest.param(
            head(b"HTTP/1.1 200 OK", b"Content-Type: text/plain", LARGE_FRAMING) + b"b" * 4096,
            id="large-content-length",
        ),
        pytest.param(
            head(b"HTTP/1.1 200 OK", b"Content-Type: text/plain", CHUNKED_FRAMING)
            + b"1000\r\n"
            + b"b" * 4096
            + b"\r\n",
            id="chunked",
        ),
    ],
)
async def test_a_streamed_2xx_broken_off_mid_body_is_voided_and_its_key_released(
    store: dict[str, Any], make_gateway: MakeGateway, raw_upstream: RawUpstream, broken: bytes
) -> None:
    """Voided, so nothing was charged and the complete answer was never
    delivered: the key must be released, and a retry forwarded afresh (and
    charged once when it completes), not refused with 409 for 24 hours."""
    raw_upstream.answers = [sends(broken), ok(SMALL)]
    gw = await gateway_on(make_gateway, raw_upstream, **store)
    key = await gw.key(credits=5)

    async with gw.client.post(ASSESS, headers=with_key(key, "broken"), data=b"{}") as first:
        assert first.status == 200
        with pytest.raises(aiohttp.ClientPayloadError):
            await first.read()
    await gw.settle()
    assert await gw.balance() == 5, "charged for an answer that broke off"

    retry = await gw.client.post(ASSESS, headers=with_key(key, "broken"), data=b"{}")
    retry_body = await retry.read()
    assert retry.status == 200, (
        f"the retry was refused ({retry.status} {retry_body[:200]!r}): the voided attempt "
        "kept its Idempotency-Key"
    )
    assert "Idempotent-Replayed" not in retry.headers
    assert retry_body == SMALL
    assert len(raw_upstream.requests) == 2
    await gw.settle()
    assert await gw.balance() == 4
    await gw.assert_reconciled()


# -- 6. a balance read right after an answer reflects that answer ---------------------------


@pytest.mark.parametrize(
    ("cost", "charge_headers", "charged"),
    [
        pytest.param(1, [b"X-Gateway-Charge: 0"], 0, id="waived"),
        pytest.param(COST, [b"X-Gateway-Charge: 2"], 2, id="partial"),
        pytest.param(COST, [], COST, id="full"),
    ],
)
async def test_a_balance_read_right_after_an_answer_reflects_its_charge(
    make_gateway: MakeGateway,
    raw_upstream: RawUpstream,
    cost: int,
    charge_headers: list[bytes],
    charged: int,
) -> None:
    """Posts may be batched off the request path, but what was returned to the
    balance must not wait for them: right after an answer the client reads
    before - charge, never the whole reservation still taken. Posts are flushed
    only once a second here (the longest interval the config allows), so a
    flush between the answer and the read cannot hide the difference."""
    raw_upstream.answers = [ok(SMALL, *charge_headers)]
    gw = await gateway_on(
        make_gateway, raw_upstream, cost=cost, credits={"post_flush_interval_seconds": 1.0}
    )
    key = await gw.key(credits=20)

    resp = await gw.client.post(ASSESS, headers=bearer(key), data=b'{"a": 1}')
    assert resp.status == 200 and await resp.read() == SMALL
    assert resp.headers["X-Credits-Remaining"] == str(20 - charged)
    available = await credits_available(gw, key)
    assert available == 20 - charged, (
        f"GET /api/v1/credits read {available} right after an answer charged {charged} "
        f"of {cost}: expected {20 - charged}"
    )
    await gw.settle()
    assert await gw.balance() == 20 - charged
    await gw.assert_reconciled()


# -- 7. a small 2xx body that breaks off (a control row) ------------------------------------


async def test_a_small_2xx_body_broken_off_is_a_502_not_charged_and_its_key_released(
    make_gateway: MakeGateway, raw_upstream: RawUpstream
) -> None:
    """A small answer is read whole before anything goes to the client: when it
    breaks off, the client gets a 502 (no status line of a 2xx went out), is
    not charged, and a retry under the same key is forwarded afresh."""
    truncated = (
        head(b"HTTP/1.1 200 OK", b"Content-Type: application/json", b"Content-Length: 100")
        + b'{"score":'
    )
    raw_upstream.answers = [sends(truncated), ok(SMALL)]
    gw = await gateway_on(make_gateway, raw_upstream)
    key = await gw.key(credits=5)

    first = await gw.client.post(ASSESS, headers=with_key(key, "short"), data=b"{}")
    assert first.status == 502
    error_of(await first.read())
    await gw.settle()
    assert await gw.balance() == 5

    retry = await gw.client.post(ASSESS, headers=with_key(key, "short"), data=b"{}")
    assert retry.status == 200 and await retry.read() == SMALL
    assert "Idempotent-Replayed" not in retry.headers
    assert len(raw_upstream.requests) == 2
    await gw.settle()
    assert await gw.balance() == 4
    await gw.assert_reconciled()
