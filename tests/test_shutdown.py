"""SIGTERM under load: readiness fails first, nothing is cut short, nothing left pending."""

from __future__ import annotations

import asyncio
import signal
import sqlite3
from pathlib import Path

import aiohttp
from aiohttp import web
from aiohttp.test_utils import TestServer

from gateway.app import Gateway
from gateway.config import settings_from_mapping

from .procs import GatewayProcess


async def test_sigterm_under_load_drains_and_settles(tmp_path: Path) -> None:
    served = {"ok": 0}

    async def assess(request: web.Request) -> web.Response:
        await request.read()
        await asyncio.sleep(0.2)  # slow enough that SIGTERM lands mid-request
        served["ok"] += 1
        return web.json_response({"score": 1, "padding": "x" * 2000})

    app = web.Application()
    app.router.add_post("/api/v1/assess", assess)
    upstream = TestServer(app, host="127.0.0.1")
    await upstream.start_server()
    db = tmp_path / "gw.db"
    gateway = GatewayProcess(
        tmp_path,
        {
            "storage": f"sqlite:///{db}",
            "shutdown": {"readiness_delay_seconds": 0.5, "drain_seconds": 10},
            "logging": {"access_log": False},
            "upstreams": {"assess": {"url": str(upstream.make_url("")).rstrip("/")}},
            "routes": [{"path": "/api/v1/assess", "upstream": "assess", "cost": 1}],
        },
    )
    settings = settings_from_mapping({"storage": f"sqlite:///{db}"}, serving=False)
    admin = Gateway(settings)
    try:
        await gateway.start()
        await admin.backend.open()
        team = await admin.management.create_team("load")
        key = (await admin.management.create_key(team.id, "k", rate_limit_per_minute=100000)).secret
        await admin.management.grant(team.id, 1000, "load")
        headers = {"Authorization": f"Bearer {key}"}
        outcomes: list[str] = []
        stop_sending = asyncio.Event()

        async def client(session: aiohttp.ClientSession) -> None:
            while not stop_sending.is_set():
                try:
                    async with session.post(gateway.url + "/api/v1/assess", headers=headers, data=b"{}") as resp:
                        body = await resp.read()
                        outcomes.append("ok" if resp.status == 200 and len(body) > 2000 else f"status {resp.status}")
                except aiohttp.ClientPayloadError:
                    outcomes.append("cut short")
                except (aiohttp.ClientConnectionError, aiohttp.ServerDisconnectedError):
                    # Refused after the listener closed: never reached the gateway's handler.
                    outcomes.append("refused")
                    await asyncio.sleep(0.05)

        async with aiohttp.ClientSession() as session:
            clients = [asyncio.create_task(client(session)) for _ in range(20)]
            await asyncio.sleep(1.0)
            assert gateway.process is not None
            gateway.process.send_signal(signal.SIGTERM)
            await asyncio.sleep(0.1)
            async with session.get(gateway.status_url + "/readyz") as ready:
                assert ready.status == 503  # readiness fails first, while still serving
            code = await asyncio.wait_for(gateway.process.wait(), 30)
            stop_sending.set()
            await asyncio.gather(*clients)

        assert code == 0, gateway.log()
        assert "cut short" not in outcomes
        assert not [o for o in outcomes if o.startswith("status")], outcomes
        ok = outcomes.count("ok")
        assert ok > 20
        raw = sqlite3.connect(db)
        pending = raw.execute("SELECT COUNT(*) FROM reservations WHERE resolution IS NULL").fetchone()[0]
        charged = raw.execute("SELECT COALESCE(SUM(charged), 0) FROM reservations").fetchone()[0]
        raw.close()
        assert pending == 0
        assert charged == ok == served["ok"]
        mismatches, _ = await admin.management.reconcile()
        assert mismatches == []
        print(f"{ok} answered in full, {outcomes.count('refused')} refused after close, 0 cut short")
    finally:
        await admin.backend.close()
        await gateway.stop()
        await upstream.close()
