"""Refills with real processes: exactly once across replicas and workers at a period
boundary, and once (not once per missed period) after a gateway slept through some.

The boundary is brought near with ``plans.clock_offset_seconds``, not waited for.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg

from tests.services import redis_url
from tests.storage.conftest import databases, postgres_admin_dsn, postgres_dsn, postgres_template

from .conftest import ADMIN_TOKEN
from .procs import GatewayProcess
from .test_replicas import Counting, upstream

__all__ = ["databases", "postgres_admin_dsn", "postgres_dsn", "postgres_template", "upstream"]

ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
LEAD_SECONDS = 30.0  # how far before midnight (on the shifted clock) the processes start


def offset_to_midnight(lead: float) -> tuple[float, datetime]:
    """A clock offset putting now ``lead`` seconds before a UTC midnight, and that midnight."""
    now = time.time()
    midnight = datetime.fromtimestamp(now, UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    midnight += timedelta(days=1)
    return midnight.timestamp() - lead - now, midnight


def config(storage: str, upstream: Counting, offset: float) -> dict[str, Any]:
    return {
        "storage": storage,
        "limiter": {"url": redis_url(), "timeout_seconds": 2},
        "logging": {"access_log": False},
        "upstreams": {"assess": {"url": upstream.url}},
        "routes": [{"path": "/api/v1/assess", "upstream": "assess", "cost": 1}],
        "plans": {"clock_offset_seconds": offset, "refill_check_seconds": 0.1},
    }


async def admin_ready(node: GatewayProcess) -> None:
    """The admin listener is worker 0's: wait for it (``/readyz`` may be another worker's)."""
    for _ in range(200):
        try:
            _reader, writer = await asyncio.open_connection("127.0.0.1", node.admin_port)
            writer.close()
            return
        except OSError:
            await asyncio.sleep(0.1)
    raise AssertionError(node.log()[-2000:])


async def admin(session: aiohttp.ClientSession, node: GatewayProcess, method: str, path: str,
                body: Any = None) -> Any:  # fmt: skip
    async with session.request(method, node.admin_url + path, json=body, headers=ADMIN) as resp:
        payload = await resp.json()
        assert resp.status < 300, payload
        return payload


async def test_replicas_with_workers_refill_a_new_period_exactly_once(
    tmp_path: Path, postgres_dsn: str, upstream: Counting
) -> None:
    offset, midnight = offset_to_midnight(LEAD_SECONDS)
    nodes = [
        GatewayProcess(tmp_path, config(postgres_dsn, upstream, offset), name=f"replica{i}")
        for i in range(2)
    ]
    await asyncio.gather(*(node.start("--workers", "2") for node in nodes))
    try:
        await asyncio.gather(*(admin_ready(node) for node in nodes))
        async with aiohttp.ClientSession() as session:
            team = await admin(session, nodes[0], "POST", "/admin/v1/teams", {"name": "p"})
            key = (await admin(session, nodes[1], "POST", "/admin/v1/teams/p/keys",
                               {"name": "k"}))["key"]  # fmt: skip
            await admin(session, nodes[0], "POST", "/admin/v1/teams/p/credits",
                        {"amount": 1000, "reason": "paid top-up"})  # fmt: skip
            plan = await admin(session, nodes[1], "PUT", "/admin/v1/teams/p/plan",
                               {"allowance": 100, "period": "day"})  # fmt: skip
            before = f"day:{(midnight - timedelta(days=1)).date().isoformat()}"
            assert plan["current_period"] == before, "the processes took too long to start"
            headers = {"Authorization": f"Bearer {key}"}
            for i in range(30):  # spent from the allowance: 70 of it left
                url = nodes[i % 2].url + "/api/v1/assess"
                async with session.post(url, headers=headers, data=b"{}") as resp:
                    assert resp.status == 200
        after = f"day:{midnight.date().isoformat()}"
        conn = await asyncpg.connect(postgres_dsn)
        try:
            for _ in range(int(LEAD_SECONDS * 10) + 300):
                if await conn.fetchval(
                    "SELECT count(*) FROM plan_entries WHERE period_key = $1", after
                ):
                    break
                await asyncio.sleep(0.1)
            await asyncio.sleep(1.0)  # ten more looks by each of the four processes
            entries = await conn.fetch(
                "SELECT kind, amount FROM plan_entries WHERE period_key = $1 ORDER BY kind", after
            )
            assert [(e["kind"], e["amount"]) for e in entries] == [
                ("expire", -70),
                ("refill", 100),
            ]
            refills = await conn.fetchval(
                "SELECT count(*) FROM audit_log WHERE action = 'credits.refill' AND team_id = $1",
                team["id"],
            )
            assert refills == 1
        finally:
            await conn.close()
        async with aiohttp.ClientSession() as session:
            credits = await admin(session, nodes[0], "GET", "/admin/v1/teams/p/credits")
        assert credits["balances"]["live"] == 1000 + 100 - 30 - 70 + 100
    finally:
        codes = await asyncio.gather(*(node.stop() for node in nodes))
    assert codes == [0, 0], [node.log()[-2000:] for node in nodes]
    await reconcile_clean(nodes[0])


async def reconcile_clean(node: GatewayProcess) -> None:
    proc = await asyncio.create_subprocess_exec(
        "python", "-m", "gateway.cli", "credits", "reconcile", "--config", str(node.config_path),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await proc.communicate()
    assert proc.returncode == 0 and out.startswith(b"OK"), out + err


async def test_a_gateway_stopped_over_boundaries_catches_up_once(
    tmp_path: Path, upstream: Counting
) -> None:
    storage = f"sqlite:///{tmp_path / 'gateway.db'}"
    node = GatewayProcess(tmp_path, config(storage, upstream, 0.0), name="gw")
    await node.start()
    async with aiohttp.ClientSession() as session:
        await admin(session, node, "POST", "/admin/v1/teams", {"name": "p"})
        await admin(session, node, "POST", "/admin/v1/teams/p/credits",
                    {"amount": 40, "reason": "paid top-up"})  # fmt: skip
        await admin(session, node, "PUT", "/admin/v1/teams/p/plan",
                    {"allowance": 100, "period": "day"})  # fmt: skip
    assert await node.stop() == 0
    # Back three days and a bit later: one refill, for the day it wakes up in.
    later = GatewayProcess(tmp_path, config(storage, upstream, 3 * 86_400.0 + 3600), name="gw")
    await later.start()
    try:
        woke = f"day:{datetime.fromtimestamp(time.time() + 3 * 86_400 + 3600, UTC).date()}"
        db = sqlite3.connect(tmp_path / "gateway.db")
        try:
            for _ in range(200):
                if db.execute(
                    "SELECT 1 FROM plan_entries WHERE period_key = ?", (woke,)
                ).fetchone():
                    break
                await asyncio.sleep(0.1)
            await asyncio.sleep(1.0)  # ten more looks
            kinds = db.execute("SELECT kind, amount FROM plan_entries ORDER BY id").fetchall()
        finally:
            db.close()
        # The new period's refill row goes in first (it is what makes it once), then the expiry.
        assert kinds == [("refill", 100), ("refill", 100), ("expire", -100)]
        async with aiohttp.ClientSession() as session:
            credits = await admin(session, later, "GET", "/admin/v1/teams/p/credits")
        assert credits["balances"]["live"] == 140  # the top-up kept, one allowance
    finally:
        assert await later.stop() == 0
    await reconcile_clean(later)
