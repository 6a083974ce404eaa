"""The access log's own writer: whole lines, both formats, written in atomic chunks."""

from __future__ import annotations

import io
import logging
from pathlib import Path

import aiohttp
import orjson

from gateway.access_log import AccessLog
from gateway.logs import LogFormatter

from .conftest import Upstream
from .procs import GatewayProcess

FIELDS = {"request_id": "r1", "status": 200, "route": "/api/v1/assess", "key_id": None}


def test_json_lines_match_the_other_log_lines() -> None:
    sink = io.BytesIO()
    log = AccessLog("json", sink)
    log.write(FIELDS)
    assert sink.getvalue() == b""  # buffered until the next flush
    log.flush()
    (line,) = sink.getvalue().decode().splitlines()
    parsed = orjson.loads(line)
    assert parsed | {"ts": "-"} == {
        "ts": "-",
        "level": "info",
        "logger": "gateway.access",
        "msg": "request",
        **FIELDS,
    }
    # The same shape as a line the stdlib path writes for any other logger.
    record = logging.LogRecord("gateway.access", logging.INFO, __file__, 1, "request", (), None)
    record.fields = FIELDS
    other = orjson.loads(LogFormatter("json").format(record))
    assert list(other) == list(parsed)
    assert len(parsed["ts"]) == len(other["ts"]) and parsed["ts"].endswith("Z")


def test_logfmt_lines() -> None:
    sink = io.BytesIO()
    log = AccessLog("logfmt", sink)
    log.write({**FIELDS, "client_ip": "a b"})
    log.flush()
    line = sink.getvalue().decode()
    assert line.endswith("\n")
    assert "logger=gateway.access msg=request request_id=r1 status=200" in line
    assert 'client_ip="a b"' in line and "key_id= " in line


class _Writes(io.BytesIO):
    def __init__(self) -> None:
        super().__init__()
        self.writes: list[bytes] = []

    def write(self, data: bytes) -> int:  # type: ignore[override]
        self.writes.append(bytes(data))
        return super().write(data)


def test_a_flush_writes_whole_lines_in_chunks_a_pipe_keeps_whole() -> None:
    sink = _Writes()
    log = AccessLog("json", sink)
    for i in range(500):
        log.write({**FIELDS, "request_id": f"r{i}"})
    log.flush()
    assert len(sink.writes) > 1
    assert all(len(w) <= 4096 and w.endswith(b"\n") for w in sink.writes)
    ids = [orjson.loads(line)["request_id"] for line in sink.getvalue().splitlines()]
    assert ids == [f"r{i}" for i in range(500)]


def test_a_full_buffer_is_written_without_waiting_for_the_tick() -> None:
    sink = io.BytesIO()
    log = AccessLog("json", sink)
    for _ in range(5000):
        log.write(FIELDS)
    assert sink.getvalue()  # past the buffer's bound it went out at once


async def test_a_gateway_process_writes_one_line_per_request_by_shutdown(
    tmp_path: Path, upstream: Upstream
) -> None:
    gateway = GatewayProcess(
        tmp_path,
        {
            "storage": f"sqlite:///{tmp_path / 'gw.db'}",
            "upstreams": {"assess": {"url": upstream.url}},
            "routes": [{"path": "/public", "methods": ["GET"], "upstream": "assess", "auth": False}],
        },
    )
    await gateway.start()
    try:
        async with aiohttp.ClientSession() as session:
            for i in range(3):
                headers = {"X-Request-Id": f"access-{i}"}
                async with session.get(gateway.url + "/public", headers=headers) as resp:
                    assert resp.status == 200
    finally:
        assert await gateway.stop() == 0
    lines = [orjson.loads(line) for line in gateway.log().splitlines() if line.startswith("{")]
    access = [line["request_id"] for line in lines if line["logger"] == "gateway.access"]
    assert access == ["access-0", "access-1", "access-2"]
