"""What the fault and soak suites share: real servers on loopback, load, and the ledger's figures.

Nothing here is a mock. The gateway is a ``gateway run`` child process
(:class:`tests.procs.GatewayProcess`); the upstreams are HTTP servers on
loopback in the test process that count what they really served; Redis and
PostgreSQL are real servers (the shared ones, or throwaway ones started here).
Every figure a test asserts comes from one of three witnesses that cannot
see each other: the clients (what came back), the upstream (what it served)
and the ledger in the database (what was charged).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import json
import os
import shutil
import sqlite3
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
from aiohttp import web
from aiohttp.test_utils import TestServer

from tests.conftest import ADMIN_TOKEN
from tests.procs import GatewayProcess
from tests.services import free_port

__all__ = [
    "ASSESS",
    "DOWNLOAD",
    "FAULT",
    "FREE",
    "HALF_CLOSE",
    "UPLOAD",
    "Admin",
    "FaultyUpstream",
    "Figures",
    "HalfClosingUpstream",
    "Outcome",
    "PostgresCluster",
    "Probe",
    "Relay",
    "Traffic",
    "abandon_download",
    "abandon_upload",
    "arrived",
    "bearer",
    "download",
    "figures",
    "gateway_config",
    "keep_sending",
    "leave_before_status",
    "metric_total",
    "open_fds",
    "reconcile",
    "wait_for",
    "watch_readyz",
]

ASSESS = "/api/v1/assess"  # charged, answers at once (after ``delay``)
FREE = "/api/v1/free"  # cost 0: needs a key, never a reservation
FAULT = "/api/v1/fault"  # charged; /timeout, /reset, /error below it
HALF_CLOSE = "/api/v1/halfclose"  # charged; served by HalfClosingUpstream
UPLOAD = "/api/v1/upload"  # charged; reads the whole body, then answers
DOWNLOAD = "/api/v1/download"  # charged; a streamed answer of many chunks

ADMIN_HEADERS = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
UPLOAD_DECLARED = 4 * 1024 * 1024  # what an abandoned upload announces
PIECE = 64 * 1024
_ids = itertools.count()


def bearer(key: str, request_id: str | None = None) -> dict[str, str]:
    headers = {"Authorization": f"Bearer {key}"}
    if request_id is not None:
        headers["X-Request-Id"] = request_id
    return headers


# -- upstreams --------------------------------------------------------------------------


class FaultyUpstream:
    """An aiohttp upstream on loopback with one path per behaviour.

    ``received[path]`` counts requests that arrived; ``served[path]`` counts 2xx
    answers whose status line went out on a connection that was still open (for
    the download, once its headers were written): what a client could get.
    ``undelivered`` counts answers the gateway no longer waited for, ``broken``
    exchanges that broke off mid-body (upload cut, download abandoned). The
    server cancels a handler whose connection is lost (aiohttp's
    ``handler_cancellation``, as the gateway itself runs), and that is counted too.
    ``arrived`` holds the ``X-Request-Id`` of every request that arrived, so a
    client can wait until its request is being forwarded before it leaves.
    """

    def __init__(
        self,
        *,
        delay: float = 0.0,
        slow_seconds: float = 1.5,
        download_chunks: int = 48,
        chunk_bytes: int = 32 * 1024,
        chunk_pause: float = 0.004,
    ) -> None:
        self.delay = delay
        self.slow_seconds = slow_seconds
        self.download_chunks = download_chunks
        self.chunk_bytes = chunk_bytes
        self.chunk_pause = chunk_pause
        self.received: Counter[str] = Counter()
        self.served: Counter[str] = Counter()
        self.undelivered: Counter[str] = Counter()
        self.broken: Counter[str] = Counter()
        self.arrived: set[str] = set()
        self._server: TestServer | None = None

    @property
    def url(self) -> str:
        assert self._server is not None
        return str(self._server.make_url("")).rstrip("/")

    @property
    def download_bytes(self) -> int:
        return self.download_chunks * self.chunk_bytes

    async def start(self) -> None:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_route("*", ASSESS, self._ok)
        app.router.add_route("*", FREE, self._ok)
        app.router.add_route("*", FAULT + "/timeout", self._slow)
        app.router.add_route("*", FAULT + "/reset", self._reset)
        app.router.add_route("*", FAULT + "/error", self._error)
        app.router.add_route("*", UPLOAD, self._upload)
        app.router.add_route("*", DOWNLOAD, self._download)
        self._server = TestServer(app, host="127.0.0.1")
        await self._server.start_server()

    async def close(self) -> None:
        if self._server is not None:
            await self._server.close()
            self._server = None

    def _arrive(self, request: web.Request) -> str:
        path = request.path
        self.received[path] += 1
        request_id = request.headers.get("X-Request-Id")
        if request_id is not None:
            self.arrived.add(request_id)
        return path

    def _answer(self, request: web.Request, path: str, status: int, body: Any) -> web.Response:
        transport = request.transport
        if transport is None or transport.is_closing():
            self.undelivered[path] += 1
        elif 200 <= status < 300:
            self.served[path] += 1
        return web.json_response(body, status=status)

    async def _ok(self, request: web.Request) -> web.Response:
        path = self._arrive(request)
        await request.read()
        if self.delay:
            try:
                await asyncio.sleep(self.delay)
            except asyncio.CancelledError:  # the gateway hung up (or died) first
                self.undelivered[path] += 1
                raise
        return self._answer(request, path, 200, {"score": 42})

    async def _slow(self, request: web.Request) -> web.Response:
        path = self._arrive(request)
        await request.read()
        try:
            await asyncio.sleep(self.slow_seconds)
        except asyncio.CancelledError:  # the gateway timed out and hung up
            self.undelivered[path] += 1
            raise
        return self._answer(request, path, 200, {"score": "too late"})

    async def _reset(self, request: web.Request) -> web.Response:
        self._arrive(request)
        assert request.transport is not None
        request.transport.abort()  # RST before any answer
        return web.Response()

    async def _error(self, request: web.Request) -> web.Response:
        path = self._arrive(request)
        await request.read()
        return self._answer(request, path, 500, {"error": "upstream exploded", "from": "upstream"})

    async def _upload(self, request: web.Request) -> web.Response:
        path = self._arrive(request)
        size = 0
        try:
            async for chunk in request.content.iter_any():
                size += len(chunk)
        except asyncio.CancelledError:  # the gateway cut the request off (aiohttp cancels)
            self.broken[path] += 1
            raise
        except Exception:  # the body broke off
            self.broken[path] += 1
            return web.Response(status=400)
        if request.content.exception() is not None:
            self.broken[path] += 1
            return web.Response(status=400)
        return self._answer(request, path, 200, {"received": size})

    async def _download(self, request: web.Request) -> web.StreamResponse:
        path = self._arrive(request)
        try:
            await asyncio.sleep(float(request.query.get("wait", "0")))
        except asyncio.CancelledError:  # the gateway gave up before the status line
            self.undelivered[path] += 1
            raise
        transport = request.transport
        if transport is None or transport.is_closing():
            self.undelivered[path] += 1
            return web.Response(status=204)
        response = web.StreamResponse(
            headers={"Content-Type": "application/octet-stream"},
        )
        response.content_length = self.download_bytes
        block = b"d" * self.chunk_bytes
        try:
            await response.prepare(request)
            self.served[path] += 1
            for _ in range(self.download_chunks):
                await response.write(block)
                await asyncio.sleep(self.chunk_pause)
            await response.write_eof()
        except asyncio.CancelledError:
            self.broken[path] += 1
            raise
        except ConnectionError:
            self.broken[path] += 1
        return response


async def _read_request(reader: asyncio.StreamReader) -> None:
    """Read one HTTP/1.1 request (head and body, fixed-length or chunked)."""
    head = await reader.readuntil(b"\r\n\r\n")
    length = 0
    chunked = False
    for line in head.decode("latin-1").split("\r\n")[1:]:
        name, _, value = line.partition(":")
        if name.strip().lower() == "content-length":
            length = int(value.strip())
        elif name.strip().lower() == "transfer-encoding" and "chunked" in value.lower():
            chunked = True
    if not chunked:
        await reader.readexactly(length)
        return
    while True:
        size = int((await reader.readuntil(b"\r\n")).split(b";")[0].strip(), 16)
        await reader.readexactly(size + 2)
        if size == 0:
            return


class HalfClosingUpstream:
    """A raw HTTP/1.1 upstream: a 200 status line and part of the body, then FIN.

    The write side is shut down (a half-close) after ``sent`` of the ``declared``
    bytes (or, ``chunked``, after one chunk and without the last chunk), so the
    answer can never be complete. ``status_lines`` counts 200 status lines sent.
    """

    def __init__(self, *, chunked: bool = False, declared: int = 65536, sent: int = 4096) -> None:
        self.chunked = chunked
        self.declared = declared
        self.sent = sent
        self.received = 0
        self.status_lines = 0
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    @property
    def url(self) -> str:
        assert self._server is not None
        port = self._server.sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}"

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            for writer in list(self._writers):
                writer.transport.abort()
            await self._server.wait_closed()
            self._server = None

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        try:
            await _read_request(reader)
            self.received += 1
            if self.chunked:
                head = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nTransfer-Encoding: chunked\r\n\r\n"
                body = f"{self.sent:x}\r\n".encode() + b"h" * self.sent + b"\r\n"
            else:
                head = (
                    b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n"
                    + f"Content-Length: {self.declared}\r\n\r\n".encode()
                )
                body = b"h" * self.sent
            writer.write(head + body)
            await writer.drain()
            self.status_lines += 1
            writer.write_eof()  # half-close: nothing more will come
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(reader.read(), 5)  # until the gateway lets go
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError):
            pass
        finally:
            self._writers.discard(writer)
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()


# -- gateway configuration -----------------------------------------------------------------


def gateway_config(
    storage: str,
    upstream: FaultyUpstream,
    *,
    limiter: str = "memory",
    half_close: HalfClosingUpstream | None = None,
    max_duration: float = 600.0,
    timeout: float = 5.0,
    credits: dict[str, Any] | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """A config for ``GatewayProcess``: every route of :class:`FaultyUpstream`."""
    upstreams: dict[str, Any] = {
        "main": {"url": upstream.url, "timeout_seconds": timeout, "read_timeout_seconds": timeout}
    }
    common = {"upstream": "main", "max_duration_seconds": max_duration}
    routes: list[dict[str, Any]] = [
        {"path": ASSESS, "methods": ["POST"], "cost": 1, **common},
        {"path": FREE, "methods": ["POST"], "cost": 0, **common},
        {"path": FAULT, "methods": ["POST"], "cost": 1, **common},
        {"path": UPLOAD, "methods": ["POST"], "cost": 1, "max_body_bytes": 1 << 26, **common},
        {"path": DOWNLOAD, "methods": ["GET"], "cost": 1, **common},
    ]
    if half_close is not None:
        upstreams["halfclose"] = {"url": half_close.url, "timeout_seconds": timeout}
        routes.append(
            {
                "path": HALF_CLOSE,
                "methods": ["POST"],
                "cost": 1,
                "upstream": "halfclose",
                "max_duration_seconds": max_duration,
            }
        )
    return {
        "storage": storage,
        "limiter": limiter,
        "logging": {"access_log": False},
        "credits": {"post_flush_interval_seconds": 0.1, **(credits or {})},
        "upstreams": upstreams,
        "routes": routes,
        **extra,
    }


# -- the admin API ------------------------------------------------------------------------


class Admin:
    """Teams, keys and grants through the gateway's own admin listener."""

    def __init__(self, session: aiohttp.ClientSession, gateway: GatewayProcess) -> None:
        self._session = session
        self._gateway = gateway

    async def call(self, method: str, path: str, body: Any = None) -> Any:
        url = self._gateway.admin_url + path
        async with self._session.request(method, url, json=body, headers=ADMIN_HEADERS) as resp:
            payload = await resp.json()
            assert resp.status < 300, (resp.status, payload)
            return payload

    async def team(self, name: str, credits: int = 0) -> str:
        """Create a team (and grant it ``credits``); returns its id."""
        team = await self.call("POST", "/admin/v1/teams", {"name": name})
        if credits:
            await self.call(
                "POST", f"/admin/v1/teams/{name}/credits", {"amount": credits, "reason": "test"}
            )
        return str(team["id"])

    async def key(self, team: str, rate_limit: int | None = 1_000_000) -> tuple[str, str]:
        """Create a live key; returns (the key, its id)."""
        body: dict[str, Any] = {"name": "k"}
        if rate_limit is not None:
            body["rate_limit_per_minute"] = rate_limit
        created = await self.call("POST", f"/admin/v1/teams/{team}/keys", body)
        return str(created["key"]), str(created["id"])


# -- load ----------------------------------------------------------------------------------


@dataclass(slots=True)
class Outcome:
    """One exchange as its client saw it."""

    kind: str
    started: float
    finished: float = 0.0
    status: int = 0  # 0: no status line arrived
    error: str | None = None  # the exception's class name when the exchange broke off
    body: bytes = b""

    @property
    def complete(self) -> bool:
        return self.status != 0 and self.error is None

    def json(self) -> Any:
        return json.loads(self.body)


class Traffic:
    """Every exchange of a test, and which are in flight right now."""

    def __init__(self) -> None:
        self.results: list[Outcome] = []
        self._in_flight: dict[int, Outcome] = {}

    @contextlib.contextmanager
    def track(self, kind: str) -> Iterator[Outcome]:
        """Record one exchange; a client-side failure is recorded, not raised."""
        outcome = Outcome(kind, time.monotonic())
        self._in_flight[id(outcome)] = outcome
        try:
            yield outcome
        except (aiohttp.ClientError, OSError, TimeoutError, asyncio.IncompleteReadError) as exc:
            outcome.error = type(exc).__name__
        finally:
            outcome.finished = time.monotonic()
            del self._in_flight[id(outcome)]
            self.results.append(outcome)

    async def request(
        self,
        session: aiohttp.ClientSession,
        kind: str,
        method: str,
        url: str,
        *,
        headers: dict[str, str] | None = None,
        data: bytes | None = None,
    ) -> Outcome:
        with self.track(kind) as outcome:
            async with session.request(method, url, headers=headers, data=data) as resp:
                outcome.status = resp.status
                outcome.body = await resp.read()
        return outcome

    def in_flight(self, kind: str | None = None) -> int:
        return sum(1 for o in self._in_flight.values() if kind is None or o.kind == kind)

    def of(self, kind: str, *, since: float = 0.0, until: float = float("inf")) -> list[Outcome]:
        """The exchanges of ``kind`` that started at or after ``since`` and ended by ``until``."""
        return [
            o for o in self.results if o.kind == kind and o.started >= since and o.finished <= until
        ]

    def statuses(self, kind: str) -> Counter[int | str]:
        """Status codes of ``kind``; exchanges that broke off count under their error."""
        return Counter(o.status if o.error is None else o.error for o in self.of(kind))


async def keep_sending(
    stop: asyncio.Event,
    send: Callable[[], Awaitable[object]],
    *,
    pause: float = 0.0,
    count: int | None = None,
) -> int:
    """Call ``send`` until ``stop`` is set (or ``count`` times), pausing in between."""
    sent = 0
    while not stop.is_set() and (count is None or sent < count):
        await send()
        sent += 1
        if pause:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), pause)
    return sent


async def wait_for(
    condition: Callable[[], Awaitable[bool]], timeout: float, every: float = 0.05
) -> float:
    """Poll until ``condition`` holds; returns the seconds it took (raises on timeout)."""
    started = time.monotonic()
    while not await condition():
        if time.monotonic() - started > timeout:
            raise TimeoutError(f"condition not met within {timeout} s")
        await asyncio.sleep(every)
    return time.monotonic() - started


# -- clients that go away ------------------------------------------------------------------


async def arrived(upstream: FaultyUpstream, request_id: str) -> bool:
    return request_id in upstream.arrived


async def abandon_upload(
    traffic: Traffic, gateway: GatewayProcess, upstream: FaultyUpstream, key: str, reset: bool
) -> None:
    """Start a 4 MiB upload, wait until the upstream is receiving it, then hang up."""
    request_id = f"upload-left-{next(_ids)}"
    with traffic.track("upload_left") as outcome:
        _, writer = await asyncio.open_connection("127.0.0.1", gateway.port)
        try:
            writer.write(
                f"POST {UPLOAD} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {key}\r\n"
                f"X-Request-Id: {request_id}\r\nContent-Type: application/octet-stream\r\n"
                f"Content-Length: {UPLOAD_DECLARED}\r\n\r\n".encode()
                + b"u" * PIECE
            )
            await writer.drain()
            # Reserved and forwarding: the upstream has the request's head.
            await wait_for(functools.partial(arrived, upstream, request_id), 5, every=0.005)
            writer.write(b"u" * PIECE)
            await writer.drain()
        finally:
            if reset:
                writer.transport.abort()
            else:
                writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
        outcome.error = "reset" if reset else "closed"


async def abandon_download(
    traffic: Traffic, session: aiohttp.ClientSession, gateway: GatewayProcess, key: str
) -> None:
    """Get the 200 status line and a little of the body, then hang up."""
    with traffic.track("download_left") as outcome:
        async with session.get(gateway.url + DOWNLOAD, headers=bearer(key)) as resp:
            outcome.status = resp.status
            await resp.content.readexactly(2 * PIECE)
            resp.close()  # drops the connection mid-body
        outcome.error = "closed"


async def leave_before_status(
    traffic: Traffic,
    session: aiohttp.ClientSession,
    gateway: GatewayProcess,
    upstream: FaultyUpstream,
    key: str,
) -> None:
    """Ask for a download the upstream answers after 1 s; leave once it is forwarded."""
    request_id = f"download-early-{next(_ids)}"

    async def get() -> None:
        headers = bearer(key, request_id)
        async with session.get(gateway.url + DOWNLOAD + "?wait=1", headers=headers) as resp:
            await resp.read()

    with traffic.track("download_early") as outcome:
        task = asyncio.create_task(get())
        try:
            await wait_for(functools.partial(arrived, upstream, request_id), 5, every=0.005)
        finally:
            task.cancel()  # closes the connection before any status line came
            with contextlib.suppress(asyncio.CancelledError):
                await task
        outcome.error = "left"


async def download(
    traffic: Traffic, session: aiohttp.ClientSession, gateway: GatewayProcess, key: str, size: int
) -> None:
    with traffic.track("download") as outcome:
        async with session.get(gateway.url + DOWNLOAD, headers=bearer(key)) as resp:
            outcome.status = resp.status
            assert len(await resp.read()) == size


# -- the status listener ------------------------------------------------------------------


@dataclass(slots=True)
class Probe:
    at: float
    status: int  # 0: no answer
    body: dict[str, Any] = field(default_factory=dict)

    @property
    def degraded(self) -> bool:
        return bool(self.body.get("degraded"))


async def watch_readyz(
    session: aiohttp.ClientSession,
    gateway: GatewayProcess,
    stop: asyncio.Event,
    probes: list[Probe],
    every: float = 0.05,
) -> None:
    """Ask ``/readyz`` every ``every`` seconds until ``stop``."""
    timeout = aiohttp.ClientTimeout(total=3)
    while not stop.is_set():
        at = time.monotonic()
        try:
            async with session.get(gateway.status_url + "/readyz", timeout=timeout) as resp:
                probes.append(Probe(at, resp.status, await resp.json()))
        except (aiohttp.ClientError, TimeoutError):
            probes.append(Probe(at, 0))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), every)


async def metric_total(
    session: aiohttp.ClientSession, gateway: GatewayProcess, name: str, **labels: str
) -> float:
    """The sum of the samples of ``name`` whose labels include ``labels``."""
    async with session.get(gateway.status_url + "/metrics") as resp:
        text = await resp.text()
    wanted = [f'{k}="{v}"' for k, v in labels.items()]
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            series, _, value = line.rpartition(" ")
            if all(w in series for w in wanted):
                total += float(value)
    return total


# -- the ledger ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Figures:
    """One team's live ledger, read straight from the database."""

    reservations: int
    pending: int
    posted: int
    voided: int
    expired: int
    charged: int
    balance: int
    oldest_pending_seconds: float | None


_FIGURES = """
SELECT count(*) AS reservations,
       coalesce(sum(CASE WHEN resolution IS NULL THEN 1 ELSE 0 END), 0) AS pending,
       coalesce(sum(CASE WHEN resolution = 'post' THEN 1 ELSE 0 END), 0) AS posted,
       coalesce(sum(CASE WHEN resolution = 'void' THEN 1 ELSE 0 END), 0) AS voided,
       coalesce(sum(CASE WHEN resolution LIKE 'expire%' THEN 1 ELSE 0 END), 0) AS expired,
       coalesce(sum(charged), 0) AS charged,
       {oldest} AS oldest
FROM reservations WHERE team_id = {team} AND environment = 'live'
"""
_BALANCE = "SELECT available FROM balances WHERE team_id = {team} AND environment = 'live'"


async def figures(storage: str, team_id: str) -> Figures:
    """The ledger of ``team_id`` in the gateway's store (``sqlite:///…`` or ``postgresql://…``)."""
    if storage.startswith("sqlite:///"):
        return await asyncio.to_thread(_sqlite_figures, storage.removeprefix("sqlite:///"), team_id)
    conn = await asyncpg.connect(storage, timeout=5)
    try:
        oldest = "extract(epoch FROM now() - min(created_at) FILTER (WHERE resolution IS NULL))"
        row = await conn.fetchrow(_FIGURES.format(oldest=oldest, team="$1"), team_id)
        balance = await conn.fetchval(_BALANCE.format(team="$1"), team_id)
    finally:
        await conn.close()
    assert row is not None
    return _figures(dict(row), balance)


def _sqlite_figures(path: str, team_id: str) -> Figures:
    db = sqlite3.connect(path, timeout=10)
    try:
        db.row_factory = sqlite3.Row
        oldest = "? - min(CASE WHEN resolution IS NULL THEN created_at END)"
        row = db.execute(
            _FIGURES.format(oldest=oldest, team="?"), (time.time(), team_id)
        ).fetchone()
        found = db.execute(_BALANCE.format(team="?"), (team_id,)).fetchone()
    finally:
        db.close()
    return _figures(dict(row), found[0] if found else 0)


def _figures(row: dict[str, Any], balance: int | None) -> Figures:
    oldest = row["oldest"]
    return Figures(
        reservations=int(row["reservations"]),
        pending=int(row["pending"]),
        posted=int(row["posted"]),
        voided=int(row["voided"]),
        expired=int(row["expired"]),
        charged=int(row["charged"]),
        balance=int(balance or 0),
        oldest_pending_seconds=None if oldest is None else float(oldest),
    )


async def reconcile(config_path: Path) -> dict[str, Any]:
    """``gateway credits reconcile --json`` in a process of its own; asserts it exits 0."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "gateway.cli",
        "credits",
        "reconcile",
        "--json",
        "--config",
        str(config_path),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(process.communicate(), 60)
    except TimeoutError:
        process.kill()
        await process.wait()
        raise
    assert process.returncode == 0, (process.returncode, out.decode(), err.decode())
    result: dict[str, Any] = json.loads(out)
    assert result["ok"] is True and result["mismatches"] == [], result
    return result


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


# -- a network path that passes a close on late ---------------------------------------------


class Relay:
    """A TCP relay on loopback in front of a server, like a proxy or a network hop.

    Bytes pass both ways as they come, with two faults to inject:

    - ``close_delay``: when the server ends a connection, its last bytes pass
      at once but the close only so many seconds later (a client-side close
      passes at once). With PostgreSQL behind it, a session the server
      terminates (``FATAL: terminating connection``) stays open at the client
      for that long after the notice, which a direct connection does only for
      a moment.
    - ``cut_on``: a client packet containing these bytes never reaches the
      server; both connections are reset instead (the network lost the
      statement and the session with it).
    """

    def __init__(self, target_port: int, close_delay: float = 0.0) -> None:
        self.target_port = target_port
        self.close_delay = close_delay
        self.cut_on: bytes | None = None
        self.cuts = 0
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def port(self) -> int:
        assert self._server is not None
        return int(self._server.sockets[0].getsockname()[1])

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            for writer in list(self._writers):
                writer.transport.abort()
            for task in list(self._tasks):
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
            await self._server.wait_closed()
            self._server = None

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self._writers.add(writer)
        # Cancelled by close(): end quietly (asyncio's server callback would log it).
        with contextlib.suppress(asyncio.CancelledError):
            await self._relay(reader, writer)
        self._tasks.discard(task)

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            try:
                target_reader, target_writer = await asyncio.open_connection(
                    "127.0.0.1", self.target_port
                )
            except OSError:
                writer.transport.abort()  # nothing listens behind: refuse
                return
            self._writers.add(target_writer)
            try:
                await asyncio.gather(
                    self._pump(reader, target_writer, writer, late=False),
                    self._pump(target_reader, writer, target_writer, late=True),
                )
            finally:
                self._writers.discard(target_writer)
                target_writer.transport.abort()
        finally:
            self._writers.discard(writer)
            writer.transport.abort()

    async def _pump(
        self,
        source: asyncio.StreamReader,
        sink: asyncio.StreamWriter,
        source_writer: asyncio.StreamWriter,
        *,
        late: bool,
    ) -> None:
        with contextlib.suppress(OSError):
            while data := await source.read(65536):
                if not late and self.cut_on is not None and self.cut_on in data:
                    self.cuts += 1
                    sink.transport.abort()
                    source_writer.transport.abort()
                    return
                sink.write(data)
                await sink.drain()
        if late and self.close_delay:  # the delay in force when the server closed
            await asyncio.sleep(self.close_delay)
        sink.close()


# -- a throwaway PostgreSQL ----------------------------------------------------------------


def _pg_binary(name: str) -> str:
    found = shutil.which(name)
    if found is not None:
        return found
    candidates = sorted(
        Path("/usr/lib/postgresql").glob(f"*/bin/{name}"),
        key=lambda p: [int(x) if x.isdigit() else 0 for x in p.parts[-3].split(".")],
    )
    if not candidates:
        raise RuntimeError(f"{name} not found (apt-get install postgresql)")
    return str(candidates[-1])


def _pg_user() -> str | None:
    """Whom to run the server as: initdb and postgres refuse to run as root."""
    if os.geteuid() != 0:
        return None
    import pwd

    for name in ("postgres", "nobody"):
        with contextlib.suppress(KeyError):
            pwd.getpwnam(name)
            return name
    raise RuntimeError("running as root and neither 'postgres' nor 'nobody' exists")


class PostgresCluster:
    """A PostgreSQL cluster of its own (initdb + pg_ctl) on a free loopback port.

    Stopped and started at will without touching the shared server. Its files
    live in a directory of its own (not pytest's tmp_path, which another user
    may not enter); :meth:`destroy` stops the server and removes them.
    """

    def __init__(self) -> None:
        self.port = free_port()
        self.user = _pg_user()
        self.directory = Path(tempfile.mkdtemp(prefix="gateway-faults-pg."))
        self.directory.chmod(0o711)
        self.home = self.directory / "pg"
        self.home.mkdir()
        if self.user is not None:
            shutil.chown(self.home, self.user)
        self.data = self.home / "data"
        self.log = self.home / "postgres.log"
        self.running = False

    @property
    def dsn(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    async def _run(self, *args: str, timeout: float = 60.0) -> None:
        command = [*args]
        if self.user is not None:
            command = ["runuser", "-u", self.user, "--", *command]
        output = self.directory / "commands.log"
        with output.open("ab") as sink:
            process = await asyncio.create_subprocess_exec(
                *command,
                cwd=self.directory,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=sink,
                stderr=sink,
            )
            try:
                code = await asyncio.wait_for(process.wait(), timeout)
            except TimeoutError:
                process.kill()
                await process.wait()
                raise
        if code != 0:
            log = self.log.read_text(errors="replace")[-3000:] if self.log.exists() else ""
            raise RuntimeError(
                f"{' '.join(args[:2])} failed ({code}):\n{output.read_text()[-2000:]}\n{log}"
            )

    async def init(self) -> None:
        await self._run(
            _pg_binary("initdb"), "-D", str(self.data), "-U", "postgres", "-A", "trust",
            "-E", "UTF8", "--no-sync",
        )  # fmt: skip

    async def start(self) -> None:
        options = (
            f"-c listen_addresses=127.0.0.1 -p {self.port} -c unix_socket_directories={self.home}"
            # Speed without lying to the gateway: fsync off only matters if the machine
            # crashes, but a commit it was told about must survive a server crash
            # (pg_ctl stop -m immediate), so synchronous_commit stays on.
            " -c fsync=off -c full_page_writes=off"
        )
        self.running = True  # from here on, destroy() must try to stop it
        await self._run(
            _pg_binary("pg_ctl"), "-D", str(self.data), "-l", str(self.log), "-o", options,
            "-w", "-t", "30", "start",
        )  # fmt: skip

    async def stop(self, mode: str = "fast") -> None:
        await self._run(_pg_binary("pg_ctl"), "-D", str(self.data), "-m", mode, "-w", "stop")
        self.running = False

    async def destroy(self) -> None:
        try:
            if self.running:
                with contextlib.suppress(RuntimeError):
                    await self.stop("immediate")
        finally:
            shutil.rmtree(self.directory, ignore_errors=True)
