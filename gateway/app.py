"""The one place that picks backends and wires the gateway together."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any

from aiohttp import web

from gateway.access_log import AccessLog
from gateway.anomaly import AnomalyDetector
from gateway.caps import cap_periods_at
from gateway.config import MAX_BURST, MAX_RATE_PER_MINUTE, Settings
from gateway.credits import Credits
from gateway.events.worker import DeliveryWorker
from gateway.keycache import KeyCache
from gateway.limiter import Limit, Limiter, LimiterUnavailable
from gateway.limiter.memory import MemoryLimiter
from gateway.limiter.quotas import QuotaCounter, StoreQuotaCounter
from gateway.manage import Management
from gateway.metrics import Metrics
from gateway.pipeline import Pipeline
from gateway.proxy import UpstreamPool
from gateway.request_log import RequestLog
from gateway.routing import Router
from gateway.storage import Backend, PushesKeyChanges
from gateway.storage.registry import open_backend
from gateway.tracing import Tracing
from gateway.usage import UsageRecorder

__all__ = ["GATEWAY", "Gateway", "PublicRunner"]

log = logging.getLogger("gateway")


class Gateway:
    """Every long-lived part of one gateway process, and their lifecycle."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.metrics = Metrics(
            team_labels=settings.metrics.team_labels,
            team_label_limit=settings.metrics.team_label_limit,
        )
        self.backend: Backend = open_backend(
            settings.storage, lease_seconds=settings.lease_seconds, postgres=settings.postgres
        )
        self.limiter, quotas = _limiter(settings, self.backend)
        storage = settings.storage_kind
        self.keys = KeyCache(
            self.backend, settings.keys, metrics=self.metrics, backend_name=storage
        )
        self.credits = Credits(
            self.backend, settings.credits, metrics=self.metrics, backend_name=storage
        )
        self.usage = UsageRecorder(
            self.backend,
            settings.usage.flush_interval_seconds,
            client_ips=settings.usage.client_ips,
        )
        self.anomalies = (
            AnomalyDetector(settings.anomalies, self.metrics)
            if settings.anomalies.enabled
            else None
        )
        self.router = Router(settings)
        self.upstreams = UpstreamPool(settings.upstreams)
        # The process that changes a key must not serve it on the feed's schedule.
        self.management = Management(self.backend, settings, listener=self.keys)
        self.tracing = Tracing(settings.tracing) if settings.tracing.enabled else None
        self.access_log = _access_log(settings)
        self.request_log = _request_log(settings, self.backend)
        self.webhooks = (
            DeliveryWorker(self.backend, settings.webhooks, self.metrics)
            if settings.webhooks.enabled
            else None
        )
        if self.webhooks is not None and self.anomalies is not None:
            self.anomalies.on_raise = self.webhooks.anomaly
        self.pipeline = Pipeline(
            settings,
            router=self.router,
            keys=self.keys,
            limiter=self.limiter,
            lookups=MemoryLimiter(),
            credits=self.credits,
            ledger=self.backend,
            upstreams=self.upstreams,
            metrics=self.metrics,
            usage=self.usage,
            anomalies=self.anomalies,
            tracing=self.tracing,
            access_log=self.access_log,
            request_log=self.request_log,
            quotas=quotas,
        )
        self.ready = False
        self._tasks: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        await self.backend.open()
        if self.settings.storage_kind == "sqlite" or self.settings.postgres.migrate_on_start:
            await self.backend.migrate()
        await self.keys.start_following()
        if self.settings.limiter.kind == "redis":
            # Connect and load the script now, not inside the first burst of requests.
            # Redis down at start is an outage like any later one: the limiter has
            # logged it and applies on_unavailable (under fail_closed, 503s that
            # /readyz reports) until Redis answers, with no restart needed.
            with contextlib.suppress(LimiterUnavailable):
                warm_up = Limit("warm-up", MAX_RATE_PER_MINUTE, MAX_BURST)
                await self.limiter.check([warm_up], "warm-up")
        # PostgreSQL pushes key changes (LISTEN/NOTIFY); SQLite is polled.
        if isinstance(self.backend, PushesKeyChanges):
            follow = self.keys.listen(self.backend.listen_key_changes)
        else:
            follow = self.keys.follow()
        self._tasks = [
            asyncio.create_task(follow, name="key-changes"),
            asyncio.create_task(self.credits.run(), name="credits"),
            asyncio.create_task(self.usage.run(), name="usage"),
            asyncio.create_task(self._retention(), name="retention"),
            asyncio.create_task(self._refills(), name="plan-refills"),
        ]
        if self.anomalies is not None:
            self._tasks.append(asyncio.create_task(self._anomaly_clock(), name="anomalies"))
        if self.access_log is not None:
            self._tasks.append(asyncio.create_task(self.access_log.run(), name="access-log"))
        if self.request_log is not None:
            self._tasks.append(asyncio.create_task(self.request_log.run(), name="request-log"))
        if self.webhooks is not None:
            self._tasks.append(asyncio.create_task(self.webhooks.run(), name="webhooks"))
        self.ready = True

    async def _anomaly_clock(self) -> None:
        """Close anomaly windows even when no request arrives to do it."""
        assert self.anomalies is not None
        interval = self.settings.anomalies.window_seconds / 4
        while True:
            await asyncio.sleep(interval)
            self.anomalies.tick()

    async def _refills(self) -> None:
        """Refill plans whose period turned: at start-up (catching up after downtime), then
        every ``plans.refill_check_seconds``. Each refill is idempotent by period key,
        so every replica and worker runs this."""
        while True:
            try:
                for refill in await self.management.refill_due():
                    log.info(
                        "refilled %s/%s for %s: +%d, %d expired",
                        refill.team_id, refill.environment, refill.period_key,
                        refill.refilled, refill.expired,
                    )  # fmt: skip
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("plan refills failed, will try again: %s", exc)
            await asyncio.sleep(self.settings.plans.refill_check_seconds)

    async def _retention(self) -> None:
        """Roll old resolved reservations up into per-day rows, now and then."""
        credits = self.settings.credits
        while True:
            try:
                folded = await self.backend.roll_up(credits.retention_days)
                if folded:
                    log.info("rolled up %d resolved reservations", folded)
                usage = self.settings.usage
                now = time.time()
                # Idempotency keys count for 24 h; a margin for clocks and in-flight retries.
                await self.backend.prune_idempotency(now - 25 * 3600)
                # Quota counts of ended periods (on the calendar's clock, see gateway/caps.py).
                calendar = now + self.settings.plans.clock_offset_seconds
                await self.backend.prune_quotas(calendar)
                # Capped keys' spend, kept as long as the reservations it counts: a
                # period older than the roll-up horizon could not be reconciled anyway.
                horizon = calendar - credits.retention_days * 86_400
                await self.backend.prune_key_spend(cap_periods_at(horizon))
                await self.backend.roll_up_usage(int(now - usage.minute_retention_days * 86400))
                await self.backend.prune_patterns(
                    int(now - usage.ip_retention_days * 86400),
                    int(now - usage.auth_failure_retention_days * 86400),
                )
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("ledger retention failed, will try again: %s", exc)
            await asyncio.sleep(credits.retention_interval_seconds)

    async def stop(self) -> None:
        self.ready = False
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            try:
                await task
            except asyncio.CancelledError:
                pass
            except Exception:
                # A background task that died must not keep the ledger from flushing.
                log.exception("background task %s had failed", task.get_name())
        self._tasks = []
        await self.pipeline.close()
        if self.access_log is not None:
            self.access_log.flush()
        await self.credits.close()
        with contextlib.suppress(Exception):
            await self.usage.flush()
        if self.request_log is not None:
            with contextlib.suppress(Exception):
                await self.request_log.flush()
        await self.upstreams.close()
        await self.limiter.close()
        await self.backend.close()
        if self.tracing is not None:
            # Sends what is queued (bounded by the exporter's timeout) off the loop.
            await asyncio.to_thread(self.tracing.close)


def _access_log(settings: Settings) -> AccessLog | None:
    logs = settings.logging
    # Access lines are INFO: off with the access log, or at a level above INFO.
    return AccessLog(logs.format) if logs.access_log and logs.level in ("DEBUG", "INFO") else None


def _request_log(settings: Settings, backend: Backend) -> RequestLog | None:
    requests = settings.request_log
    if not requests.enabled:
        return None
    return RequestLog(
        backend,
        settings.usage.flush_interval_seconds,
        requests.retention_days,
        requests.max_rows_per_team,
    )


def _limiter(settings: Settings, backend: Backend) -> tuple[Limiter, QuotaCounter]:
    """The rate limiter, and who counts calendar quotas when the limiter has not (the store)."""
    if settings.limiter.kind == "memory":
        return MemoryLimiter(), StoreQuotaCounter(backend)
    from gateway.limiter.fallback import FallbackLimiter
    from gateway.limiter.redis import RedisLimiter

    redis = RedisLimiter(settings.limiter)
    limiter = FallbackLimiter(redis, settings.limiter)
    # Redis counts quotas inside its decisions; the store while Redis is down.
    return limiter, StoreQuotaCounter(backend)


GATEWAY = web.AppKey("gateway", Gateway)


class PublicRunner(web.BaseRunner):
    """The public listener: aiohttp's low-level server handing every request to the pipeline,
    and the gateway's lifecycle (started at setup, stopped once the listener has drained).

    Not a ``web.Application``: the pipeline routes by itself (gateway/routing.py), and an
    Application's URL dispatch, match info and middleware chain around one catch-all route
    cost 6.5 % of a plain request's instructions (bench/instructions.py, session 11). The
    low-level server sends no ``100 Continue`` of its own: the pipeline sends it once every
    check passed.
    """

    __slots__ = ("_started", "gateway")

    def __init__(self, gateway: Gateway, **kwargs: Any) -> None:
        kwargs.setdefault("handler_cancellation", True)  # a client gone cancels its handler
        kwargs.setdefault("access_log", None)  # gateway/access_log.py writes the lines
        super().__init__(**kwargs)
        self.gateway = gateway
        self._started = False

    async def shutdown(self) -> None:
        return None

    async def _make_server(self) -> web.Server:
        await self.gateway.start()
        self._started = True
        return web.Server(self.gateway.pipeline.handle, **self._kwargs)

    async def _cleanup_server(self) -> None:
        # In-flight requests have drained: now flush the ledger and close the backends.
        if self._started:
            self._started = False
            await self.gateway.stop()
