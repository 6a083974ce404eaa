"""A credential that is not UTF-8 is refused and recorded like any other.

It used to poison every later batch of failure counts (the database refused
the whole batch, which was retried forever), so one request blinded
/admin/v1/auth-failures for everybody before a brute-force attempt.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import Any

import orjson
import pytest

from gateway.listeners import create_admin_app
from gateway.logs import LogFormatter
from tests.storage.conftest import Databases, postgres_admin_dsn, postgres_template

from ..conftest import Harness, MakeGateway, bearer, raw_http
from .conftest import Admin

__all__ = ["postgres_admin_dsn", "postgres_template"]

# 0xff and 0xfe can begin no UTF-8 sequence; the 32 x's make it key-length.
POISON = b"ckiq_live_\xff\xfeAB" + b"x" * 32
ESCAPED_PREFIX = "ckiq_live_\\xff\\xfeAB"


@pytest.fixture(params=["sqlite", "postgres"])
async def admin_on(
    request: pytest.FixtureRequest, make_gateway: MakeGateway, aiohttp_client: Any
) -> AsyncIterator[Admin]:
    """The admin API of a gateway on each store; usage is flushed by the test alone."""
    overrides: dict[str, Any] = {"usage": {"flush_interval_seconds": 60}}
    if request.param == "sqlite":
        harness = await make_gateway(**overrides)
        yield Admin(await aiohttp_client(create_admin_app(harness.gateway)), harness)
        return
    # As tests/storage/conftest.py's backends fixture: the async postgres_dsn
    # fixture cannot be asked for from inside a running loop, the sync ones can.
    dbs = Databases(
        request.getfixturevalue("postgres_admin_dsn"),
        request.getfixturevalue("postgres_template"),
    )
    try:
        harness = await make_gateway(storage=await dbs.migrated(), **overrides)
        try:
            yield Admin(await aiohttp_client(create_admin_app(harness.gateway)), harness)
        finally:
            # Stopped before its database is dropped, so that its last flush finds it.
            await harness.client.close()
    finally:
        await dbs.drop_all()


async def _send_poison(harness: Harness) -> tuple[int, bytes]:
    return await raw_http(
        harness.client,
        b"POST /api/v1/assess HTTP/1.1\r\nHost: gateway\r\n"
        b"Authorization: Bearer " + POISON + b"\r\n"
        b"Content-Length: 0\r\nConnection: close\r\n\r\n",
    )


async def test_a_key_that_is_not_utf8_is_listed_with_the_others(admin_on: Admin) -> None:
    harness = admin_on.harness
    status, body = await _send_poison(harness)
    assert (status, orjson.loads(body)) == (401, {"error": "Invalid API key"})
    resp = await harness.client.post("/api/v1/assess", headers=bearer("ckiq_test_WXYZ" + "y" * 34))
    assert resp.status == 401
    await harness.gateway.usage.flush()

    listed = await admin_on.call("GET", "/admin/v1/auth-failures", expect=200)
    counts = {item["key_prefix"]: item["count"] for item in listed["items"]}
    assert counts == {ESCAPED_PREFIX: 1, "ckiq_test_WXYZ": 1}, listed
    assert {item["client_ip"] for item in listed["items"]} == {"127.0.0.1"}

    # The store took the batch: later failures are counted, nothing is stuck.
    await _send_poison(harness)
    await harness.gateway.usage.flush()
    listed = await admin_on.call("GET", "/admin/v1/auth-failures", expect=200)
    counts = {item["key_prefix"]: item["count"] for item in listed["items"]}
    assert counts == {ESCAPED_PREFIX: 2, "ckiq_test_WXYZ": 1}, listed


async def test_the_log_line_of_that_request_is_written(
    gw: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    status, _ = await _send_poison(gw)
    assert status == 401
    refused = [r for r in caplog.records if r.getMessage() == "auth failure"]
    assert len(refused) == 1
    line = LogFormatter("json").format(refused[0])
    line.encode("utf-8", "strict")
    fields = orjson.loads(line)
    assert fields["key_prefix"] == ESCAPED_PREFIX
    assert fields["reason"] and fields["client_ip"] == "127.0.0.1"
    logfmt = LogFormatter("logfmt").format(refused[0])
    logfmt.encode("utf-8", "strict")
    assert f"key_prefix={ESCAPED_PREFIX}" in logfmt.replace('"', "").replace("\\\\", "\\")
