"""The status listener: liveness, readiness with per-backend detail, and metrics."""

from __future__ import annotations

import asyncio
import contextlib

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from gateway.app import GATEWAY, Gateway
from gateway.config import MAX_BURST, MAX_RATE_PER_MINUTE
from gateway.errors import json_response
from gateway.limiter import Degradable, Limit, LimiterUnavailable

__all__ = ["create_status_app"]

_PING_TIMEOUT = 1.0


async def healthz(request: web.Request) -> web.Response:
    return json_response(200, {"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    gw = request.app[GATEWAY]
    storage: dict[str, object] = {"ok": True, "kind": gw.settings.storage_kind}
    try:
        async with asyncio.timeout(_PING_TIMEOUT):
            await gw.backend.ping()
    except Exception as exc:
        storage = {"ok": False, "kind": gw.settings.storage_kind, "error": type(exc).__name__}
    limiter = await _limiter_state(gw)
    key_feed = {"ok": gw.keys.following}
    # A fallback limiter still serves (degraded); a limiter that fails closed does not.
    ready = gw.ready and bool(storage["ok"]) and not limiter["refusing"]
    body = {
        "ready": ready,
        "degraded": bool(limiter["degraded"]) or not gw.keys.following,
        "backends": {"storage": storage, "limiter": limiter, "key_changes": key_feed},
    }
    return json_response(200 if ready else 503, body)


async def _limiter_state(gw: Gateway) -> dict[str, object]:
    settings = gw.settings.limiter
    state: dict[str, object] = {
        "ok": True,
        "kind": settings.kind,
        "degraded": False,
        "refusing": False,
    }
    limiter = gw.limiter
    if not isinstance(limiter, Degradable):  # in process: never down
        return state
    if limiter.degraded:
        # Readiness probes double as recovery probes: with no traffic, this is
        # what notices that Redis answers again.
        with contextlib.suppress(LimiterUnavailable):
            await limiter.check([Limit("readyz", MAX_RATE_PER_MINUTE, MAX_BURST)], "readyz")
    degraded = limiter.degraded
    gw.metrics.limiter_degraded.set(1 if degraded else 0)
    state.update(
        ok=not degraded,
        degraded=degraded,
        policy=settings.on_unavailable,
        refusing=degraded and settings.on_unavailable == "fail_closed",
    )
    if degraded and limiter.last_error:
        state["error"] = limiter.last_error
    return state


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
