"""Webhook delivery with real gateway processes: two replicas (two workers each) on
PostgreSQL deliver each event once; a gateway killed mid-delivery (on either backend)
delivers it after restart, with the same ``webhook-id``."""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.events.test_worker import Receiver, receiver
from tests.procs import GatewayProcess
from tests.services import redis_url
from tests.storage.conftest import (
    Databases,
    databases,
    postgres_admin_dsn,
    postgres_dsn,
    postgres_template,
)
from tests.test_plan_refills import admin, admin_ready

__all__ = ["databases", "postgres_admin_dsn", "postgres_dsn", "postgres_template", "receiver"]

pytestmark = pytest.mark.timeout(180)


def config(storage: str) -> dict[str, Any]:
    return {
        "storage": storage,
        "limiter": {"url": redis_url(), "timeout_seconds": 2},
        "logging": {"access_log": False},
        "upstreams": {"assess": {"url": "http://127.0.0.1:9"}},
        "routes": [{"path": "/api/v1/assess", "upstream": "assess", "cost": 1}],
        # A one-second timeout makes the claim's lease three seconds.
        "webhooks": {"allow_private_addresses": True, "poll_interval_seconds": 0.05,
                     "timeout_seconds": 1.0, "retry_schedule_seconds": [0.2, 0.2, 0.2]},
    }  # fmt: skip


async def until(check: Any, seconds: float, what: str) -> None:
    deadline = time.monotonic() + seconds
    while not check():
        assert time.monotonic() < deadline, what
        await asyncio.sleep(0.05)


async def test_two_replicas_with_two_workers_deliver_each_event_once(
    tmp_path: Path, postgres_dsn: str, receiver: Receiver
) -> None:
    nodes = [GatewayProcess(tmp_path, config(postgres_dsn), name=f"replica{i}") for i in range(2)]
    await asyncio.gather(*(node.start("--workers", "2") for node in nodes))
    try:
        await asyncio.gather(*(admin_ready(node) for node in nodes))
        async with aiohttp.ClientSession() as session:
            await admin(session, nodes[0], "POST", "/admin/v1/teams", {"name": "acme"})
            await admin(session, nodes[1], "POST", "/admin/v1/teams/acme/webhooks",
                        {"url": receiver.url, "events": ["key.created"]})  # fmt: skip
            await asyncio.gather(*(
                admin(session, nodes[n % 2], "POST", "/admin/v1/teams/acme/keys", {"name": f"k{n}"})
                for n in range(24)
            ))  # fmt: skip
        await until(lambda: len(receiver.got) >= 24, 30, f"{len(receiver.got)} of 24 delivered")
        await asyncio.sleep(1.0)  # four workers kept polling: nothing more arrives
    finally:
        await asyncio.gather(*(node.stop() for node in nodes))
    ids = receiver.ids()
    assert len(ids) == 24 and len(set(ids)) == 24
    for node in nodes:
        assert "Traceback" not in node.log()


@pytest.fixture(params=["sqlite", "postgres"])
async def storage(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'gateway.db'}"
        return
    dbs = Databases(
        request.getfixturevalue("postgres_admin_dsn"),
        request.getfixturevalue("postgres_template"),
    )
    try:
        yield await dbs.migrated()
    finally:
        await dbs.drop_all()


async def test_a_gateway_killed_mid_delivery_delivers_after_restart_with_the_same_id(
    tmp_path: Path, storage: str, receiver: Receiver
) -> None:
    receiver.hold = asyncio.Event()  # the first request is never answered
    first = GatewayProcess(tmp_path, config(storage), name="first")
    await first.start()
    try:
        await admin_ready(first)
        async with aiohttp.ClientSession() as session:
            await admin(session, first, "POST", "/admin/v1/teams", {"name": "acme"})
            await admin(session, first, "POST", "/admin/v1/teams/acme/webhooks",
                        {"url": receiver.url, "events": ["key.created"]})  # fmt: skip
            await admin(session, first, "POST", "/admin/v1/teams/acme/keys", {"name": "k"})
        await until(lambda: len(receiver.got) == 1, 15, "the first attempt never came")
    finally:
        await first.stop(signal.SIGKILL)
    held = receiver.hold
    receiver.hold = None  # later requests are answered at once
    held.set()
    second = GatewayProcess(tmp_path, config(storage), name="second")
    await second.start()
    try:
        await until(lambda: len(receiver.got) >= 2, 20, "not delivered after the restart")
        await asyncio.sleep(0.5)
    finally:
        await second.stop()
    ids = receiver.ids()
    assert len(ids) == 2 and ids[0] == ids[1]
    assert "Traceback" not in second.log()
