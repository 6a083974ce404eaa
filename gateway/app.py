"""The one place that picks backends and wires the gateway together."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

from aiohttp import web

from gateway.config import Settings
from gateway.credits import Credits
from gateway.keycache import KeyCache
from gateway.limiter import Limiter
from gateway.limiter.memory import MemoryLimiter
from gateway.management import Management
from gateway.metrics import Metrics
from gateway.pipeline import Pipeline
from gateway.proxy import UpstreamPool
from gateway.routing import Router
from gateway.storage import Backend, open_backend

__all__ = ["GATEWAY", "Gateway", "create_app"]

log = logging.getLogger("gateway")


class Gateway:
    """Every long-lived part of one gateway process, and their lifecycle."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.metrics = Metrics(
            team_labels=settings.metrics.team_labels,
            team_label_limit=settings.metrics.team_label_limit,
        )
        self.backend: Backend = open_backend(settings.storage, lease_seconds=settings.lease_seconds)
        self.limiter: Limiter = MemoryLimiter()
        storage = settings.storage_kind
        self.keys = KeyCache(
            self.backend, settings.keys, metrics=self.metrics, backend_name=storage
        )
        self.credits = Credits(
            self.backend, settings.credits, metrics=self.metrics, backend_name=storage
        )
        self.router = Router(settings)
        self.upstreams = UpstreamPool(settings.upstreams)
        self.management = Management(self.backend, settings)
        self.pipeline = Pipeline(
            settings,
            router=self.router,
            keys=self.keys,
            limiter=self.limiter,
            credits=self.credits,
            ledger=self.backend,
            upstreams=self.upstreams,
            metrics=self.metrics,
        )
        self.ready = False
        self._tasks: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        await self.backend.open()
        await self.backend.migrate()
        await self.keys.start_following()
        self._tasks = [
            asyncio.create_task(self.keys.follow(), name="key-changes"),
            asyncio.create_task(self.credits.run(), name="credits"),
        ]
        self.ready = True

    async def stop(self) -> None:
        self.ready = False
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks = []
        await self.credits.close()
        await self.upstreams.close()
        await self.limiter.close()
        await self.backend.close()


GATEWAY = web.AppKey("gateway", Gateway)


async def _defer_expect(request: web.Request) -> None:
    """Send no ``100 Continue`` yet: the pipeline sends it once every check passed."""
    return None


def create_app(settings: Settings, gateway: Gateway | None = None) -> web.Application:
    """The public listener's application; it owns the gateway's lifecycle."""
    gw = gateway if gateway is not None else Gateway(settings)
    app = web.Application()
    app[GATEWAY] = gw
    app.router.add_route("*", "/{tail:.*}", gw.pipeline.handle, expect_handler=_defer_expect)

    async def lifecycle(app: web.Application) -> AsyncIterator[None]:
        await gw.start()
        yield
        await gw.stop()

    app.cleanup_ctx.append(lifecycle)
    return app
