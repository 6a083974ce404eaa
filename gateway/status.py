"""The status listener: liveness, readiness with per-backend detail, and metrics."""

from __future__ import annotations

import asyncio

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from gateway.app import GATEWAY, Gateway
from gateway.errors import json_response

__all__ = ["create_status_app"]

_PING_TIMEOUT = 1.0


async def healthz(request: web.Request) -> web.Response:
    return json_response(200, {"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    gw = request.app[GATEWAY]
    storage: dict[str, object] = {"ok": True}
    try:
        async with asyncio.timeout(_PING_TIMEOUT):
            await gw.backend.ping()
    except Exception as exc:
        storage = {"ok": False, "error": type(exc).__name__}
    limiter = {"ok": True, "kind": gw.settings.limiter.kind}
    key_feed = {"ok": gw.keys.following}
    ready = gw.ready and bool(storage["ok"])
    body = {
        "ready": ready,
        "degraded": not gw.keys.following,
        "backends": {"storage": storage, "limiter": limiter, "key_changes": key_feed},
    }
    return json_response(200 if ready else 503, body)


async def metrics(request: web.Request) -> web.Response:
    gw = request.app[GATEWAY]
    gw.metrics.unflushed.set(gw.credits.unflushed)
    gw.metrics.flush_lag.set(gw.credits.flush_lag)
    body = generate_latest(gw.metrics.collector_registry())
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


def create_status_app(gateway: Gateway) -> web.Application:
    app = web.Application()
    app[GATEWAY] = gateway
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
    return app
