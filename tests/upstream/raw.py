"""A raw HTTP/1.1 upstream on loopback: each connection runs a script written byte by byte."""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Request:
    head: bytes
    body: bytes

    def header(self, name: str) -> str | None:
        for line in self.head.decode("latin-1").split("\r\n")[1:]:
            key, _, value = line.partition(":")
            if key.strip().lower() == name.lower():
                return value.strip()
        return None

    @property
    def line(self) -> str:
        return self.head.decode("latin-1").split("\r\n", 1)[0]


async def read_request(reader: asyncio.StreamReader) -> Request:
    """One request, head and body (fixed-length or chunked, trailers not expected)."""
    head = await reader.readuntil(b"\r\n\r\n")
    request = Request(head, b"")
    length = request.header("Content-Length")
    if "chunked" in (request.header("Transfer-Encoding") or "").lower():
        chunks = []
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0].strip(), 16)
            chunks.append((await reader.readexactly(size + 2))[:-2])
            if size == 0:
                break
        request.body = b"".join(chunks)
    elif length:
        request.body = await reader.readexactly(int(length))
    return request


@dataclass
class Conn:
    """One accepted connection, as its script sees it."""

    index: int
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    server: RawServer

    async def request(self) -> Request:
        request = await read_request(self.reader)
        self.server.requests.append(request)
        return request

    async def send(self, *parts: bytes) -> None:
        self.writer.write(b"".join(parts))
        await self.writer.drain()

    async def until_closed(self) -> None:
        """Wait until the peer closes (EOF or reset)."""
        with contextlib.suppress(OSError):
            while await self.reader.read(65536):
                pass


Script = Callable[[Conn], Awaitable[None]]


@dataclass
class RawServer:
    """Runs ``scripts[n]`` for the n-th connection (the last one repeats); aborts it after."""

    scripts: list[Script] = field(default_factory=list)
    requests: list[Request] = field(default_factory=list)
    connections: int = 0
    closed: int = 0
    tls: ssl.SSLContext | None = None
    _server: asyncio.Server | None = None
    _tasks: set[asyncio.Task[Any]] = field(default_factory=set)

    @property
    def port(self) -> int:
        assert self._server is not None
        return int(self._server.sockets[0].getsockname()[1])

    @property
    def url(self) -> str:
        scheme = "https" if self.tls else "http"
        host = "localhost" if self.tls else "127.0.0.1"
        return f"{scheme}://{host}:{self.port}"

    async def start(self) -> RawServer:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0, ssl=self.tls)
        return self

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
        index = self.connections
        self.connections += 1
        try:
            script = self.scripts[min(index, len(self.scripts) - 1)]
            await script(Conn(index, reader, writer, self))
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ssl.SSLError):
            pass
        except asyncio.CancelledError:
            pass
        finally:
            self.closed += 1
            self._tasks.discard(task)
            writer.transport.abort()


def response(status: bytes, *headers: bytes, body: bytes = b"", close: bool = False) -> bytes:
    """A status line, headers as given (plus Connection: close when asked), then ``body``."""
    lines = [b"HTTP/1.1 " + status, *headers]
    if close:
        lines.append(b"Connection: close")
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


def ok(body: bytes = b"ok", *headers: bytes, close: bool = False) -> bytes:
    return response(b"200 OK", b"Content-Length: %d" % len(body), *headers, body=body, close=close)


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


async def eventually(condition: Callable[[], bool], what: str) -> None:
    """Wait until ``condition`` holds (a state to reach, not a time to meet)."""
    for _ in range(4000):
        if condition():
            return
        await asyncio.sleep(0.005)
    raise AssertionError(f"never happened: {what}")
