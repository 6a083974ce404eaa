"""The request pipeline: admit → authenticate → limit → settle-and-forward.

Each stage passes the request on or raises a :class:`~gateway.errors.Refusal`;
``handle`` turns a refusal into the contract's response in one place. Every
charge is decided by the request's :class:`Settlement`, never by a stage.
"""

from __future__ import annotations

import asyncio
import logging
import time

from aiohttp import web

from gateway import errors
from gateway.access_log import AccessLog
from gateway.anomaly import AnomalyDetector
from gateway.config import Settings
from gateway.credits import Credits
from gateway.deadlines import Deadlines, resolution_for
from gateway.errors import Refusal
from gateway.keycache import KeyCache
from gateway.limiter import Limiter, LocalLimiter
from gateway.limiter.quotas import QuotaCounter
from gateway.metrics import Metrics
from gateway.models import Outcome
from gateway.pipeline._http import unread
from gateway.pipeline.admission import Admission, check_declared_size
from gateway.pipeline.auth import Authenticator
from gateway.pipeline.exchange import Exchange, Recorder, request_id
from gateway.pipeline.forward import Forwarder, finish
from gateway.pipeline.limits import RateLimits
from gateway.pipeline.settlement import Settlements
from gateway.proxy import ClientAddress, UpstreamPool
from gateway.request_log import RequestLog
from gateway.routing import Router
from gateway.storage import Ledger, StorageError
from gateway.text import safe_text
from gateway.tracing import Tracing
from gateway.usage import UsageRecorder

__all__ = ["Exchange", "Pipeline"]

log = logging.getLogger("gateway.pipeline")


def _deadline_resolution(settings: Settings) -> float:
    """How often exchange deadlines are checked: a tenth of the shortest limit, 5-50 ms."""
    limits = [r.max_duration_seconds for r in settings.routes]
    for upstream in settings.upstreams.values():
        limits += (upstream.timeout_seconds, upstream.read_timeout_seconds)
    return resolution_for(min(limits, default=1.0))


class Pipeline:
    def __init__(
        self,
        settings: Settings,
        *,
        router: Router,
        keys: KeyCache,
        limiter: Limiter,
        lookups: LocalLimiter,
        credits: Credits,
        ledger: Ledger,
        upstreams: UpstreamPool,
        metrics: Metrics,
        usage: UsageRecorder,
        anomalies: AnomalyDetector | None = None,
        tracing: Tracing | None = None,
        access_log: AccessLog | None = None,
        request_log: RequestLog | None = None,
        quotas: QuotaCounter | None = None,
    ) -> None:
        self._tracing = tracing
        pepper = settings.keys.pepper
        self._metrics = metrics
        self._ledger = ledger
        self._metered_test = settings.credits.test_environment == "metered"
        self._addresses = ClientAddress(settings.trusted_proxies)
        self._deadlines = Deadlines(resolution=_deadline_resolution(settings))
        self._admission = Admission(router)
        self._auth = Authenticator(
            keys,
            pepper=pepper.get_secret_value().encode() if pepper else None,
            lookups=lookups,
            unknown_keys_per_minute=settings.security.unknown_keys_per_minute_per_ip,
            metrics=metrics,
            usage=usage,
            anomalies=anomalies,
        )
        self._limits = RateLimits(settings, limiter, metrics, quotas)
        self._settlements = Settlements(
            settings, credits, ledger, metrics, may_reserve_ahead=self._limits.may_reserve_ahead
        )
        self._forwarder = Forwarder(settings, upstreams, self._addresses, self._deadlines, metrics)
        self._recorder = Recorder(metrics, usage, anomalies, access_log, request_log)
        self._log_requests = request_log is not None

    async def handle(self, request: web.BaseRequest) -> web.StreamResponse:
        headers = request.headers
        ex = Exchange(request_id(headers.get("X-Request-Id")), request.method, time.monotonic())
        # Made safe text here, at the edge: a forwarded address is client input,
        # and everything recorded downstream (usage, anomalies, logs) holds it.
        ex.client_ip = safe_text(
            self._addresses.client_ip(request.remote, headers.get("X-Forwarded-For")), 100
        )
        if self._log_requests:
            ex.target = request.raw_path
            ex.user_agent = headers.get("User-Agent", "")
        if self._tracing is not None:
            ex.trace = self._tracing.start(headers, request.method)
        trace = ex.trace
        self._metrics.in_flight.inc()
        try:
            admitted = self._admission.admit(request, ex)
            route = admitted.route
            if route is None:
                return await self._balance(request, ex)
            key = None
            if route.auth and request.method != "OPTIONS":
                with trace.stage("authenticate"):
                    key = await self._auth.authenticate(request, ex)
            settlement = self._settlements.open(request, ex, route, key, admitted.path)
            async with settlement:
                if key is not None:
                    with trace.stage("rate_limit"):
                        await self._limits.check(ex, key)
                check_declared_size(request, route)
                with trace.stage("reserve"):
                    await settlement.reserve(request)
                with trace.stage("upstream"):
                    response = await self._forwarder.forward(request, ex, admitted, settlement)
            return await finish(request, response, settlement)
        except Refusal as refusal:
            return self._refuse(request, ex, refusal)
        except (asyncio.CancelledError, web.HTTPException, ConnectionError):
            raise
        except Exception:
            # A bug. The client still gets JSON with the request id to report; a
            # reservation already taken was voided by its settlement: never charged.
            log.exception("request failed", extra={"fields": {"request_id": ex.request_id}})
            return self._refuse(request, ex, Refusal(500, "Internal error", Outcome.UNAVAILABLE))
        finally:
            self._metrics.in_flight.dec()
            self._recorder.record(ex)

    def _refuse(
        self, request: web.BaseRequest, ex: Exchange, refusal: Refusal
    ) -> web.StreamResponse:
        """The one place a refusal becomes the client's answer."""
        response = refusal.render()
        if refusal.unread:
            unread(request, response)
        return ex.reply(response, refusal.outcome)

    async def _balance(self, request: web.BaseRequest, ex: Exchange) -> web.StreamResponse:
        """``GET /api/v1/credits``: the key's balance (free; counts against the rate limit)."""
        key = await self._auth.authenticate(request, ex)
        await self._limits.check(ex, key)
        available: int | None = None
        if key.environment == "live" or self._metered_test:
            try:
                available = await self._ledger.balance(key.team_id, key.environment)
            except StorageError:
                raise errors.refuse_unavailable() from None
        payload = {"credits_available": available, "environment": key.environment}
        return ex.reply(errors.json_response(200, payload), Outcome.OK)

    async def close(self) -> None:
        """Wait for background writes (called at shutdown)."""
        await self._settlements.close()
        await self._deadlines.close()
