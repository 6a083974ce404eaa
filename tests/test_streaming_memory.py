"""A 1 GiB upload and a 1 GiB download through a real gateway process keep its memory flat."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from gateway.app import Gateway
from gateway.config import settings_from_mapping

from .procs import GatewayProcess, rss_bytes

GIB = 1024**3
CHUNK = 1024 * 1024
BUDGET = 50 * 1024 * 1024


async def _upstream() -> tuple[TestServer, dict[str, int]]:
    seen = {"uploaded": 0}

    async def upload(request: web.Request) -> web.Response:
        async for chunk in request.content.iter_chunked(CHUNK):
            seen["uploaded"] += len(chunk)
        return web.json_response({"received": seen["uploaded"]})

    async def download(request: web.Request) -> web.StreamResponse:
        mib = int(request.query.get("mib", GIB // CHUNK))
        response = web.StreamResponse(headers={"Content-Length": str(mib * CHUNK)})
        await response.prepare(request)
        block = b"d" * CHUNK
        for _ in range(mib):
            await response.write(block)
        await response.write_eof()
        return response

    app = web.Application()
    app.router.add_post("/upload", upload)
    app.router.add_get("/download", download)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    return server, seen


@pytest.mark.timeout(300)
async def test_one_gib_each_way_with_flat_memory(tmp_path: Path) -> None:
    upstream, seen = await _upstream()
    gateway = GatewayProcess(
        tmp_path,
        {
            "storage": f"sqlite:///{tmp_path / 'gw.db'}",
            "logging": {"access_log": False},
            "upstreams": {
                "up": {"url": str(upstream.make_url("")).rstrip("/"), "timeout_seconds": 120}
            },
            "routes": [
                {
                    "path": "/upload",
                    "methods": ["POST"],
                    "upstream": "up",
                    "cost": 1,
                    "max_body_bytes": 2 * GIB,
                },
                {"path": "/download", "methods": ["GET"], "upstream": "up", "cost": 1},
            ],
        },
    )
    settings = settings_from_mapping(
        {"storage": f"sqlite:///{tmp_path / 'gw.db'}", "admin": {"enabled": False}}
    )
    try:
        await gateway.start()
        # Make a key through the same database the gateway process uses.
        gw = Gateway(settings)
        await gw.backend.open()
        await gw.backend.migrate()
        team = await gw.management.create_team("big")
        key = (await gw.management.create_key(team.id, "bulk")).secret
        await gw.management.grant(team.id, 10, "bulk")
        await gw.backend.close()
        headers = {"Authorization": f"Bearer {key}"}
        before = rss_bytes(gateway.pid)

        async def body() -> AsyncIterator[bytes]:
            block = b"u" * CHUNK
            for _ in range(GIB // CHUNK):
                yield block

        timeout = aiohttp.ClientTimeout(total=240)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            async with session.post(gateway.url + "/upload", data=body(), headers=headers) as resp:
                assert resp.status == 200, await resp.text()
                assert (await resp.json())["received"] == GIB
            after_upload = rss_bytes(gateway.pid, "VmHWM")
            received = 0
            async with session.get(gateway.url + "/download", headers=headers) as resp:
                assert resp.status == 200
                async for chunk in resp.content.iter_chunked(CHUNK):
                    received += len(chunk)
            assert received == GIB
            # A slow reader: the upstream can send 256 MiB at once, the client
            # reads a little and stalls. Back-pressure must hold the rest upstream.
            async with session.get(gateway.url + "/download?mib=256", headers=headers) as resp:
                await resp.content.readexactly(CHUNK)
                await asyncio.sleep(1.5)
                stalled = rss_bytes(gateway.pid)
                rest = 0
                async for chunk in resp.content.iter_chunked(CHUNK):
                    rest += len(chunk)
                assert rest == 255 * CHUNK
        peak = rss_bytes(gateway.pid, "VmHWM")
        print(
            f"gateway RSS before {before / 2**20:.1f} MiB, peak after upload "
            f"{after_upload / 2**20:.1f} MiB, with a stalled reader {stalled / 2**20:.1f} MiB, "
            f"peak overall {peak / 2**20:.1f} MiB"
        )
        assert stalled - before < BUDGET
        assert seen["uploaded"] == GIB
        assert peak - before < BUDGET
    finally:
        await gateway.stop()
        await upstream.close()
    await asyncio.sleep(0)
