"""One request's record: its id, what it did, and how that is counted and logged."""

from __future__ import annotations

import itertools
import os
import re
import time
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from gateway.access_log import AccessLog
from gateway.anomaly import AnomalyDetector
from gateway.metrics import Metrics
from gateway.models import KeyRecord, Outcome
from gateway.request_log import RequestLog
from gateway.tracing import NO_TRACE, RequestTrace
from gateway.usage import UsageRecorder

__all__ = ["Exchange", "Recorder", "request_id"]

_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
# Request ids need to be unique, not secret: a random per-process prefix and a
# counter cost far less than reading the system's random source per request.
_ID_PREFIX = os.urandom(6).hex()
_ID_COUNTER = itertools.count()


def request_id(incoming: str | None) -> str:
    """The client's X-Request-Id when it is sane, else a new one."""
    if incoming is not None and _REQUEST_ID.match(incoming):
        return incoming
    return f"{_ID_PREFIX}{next(_ID_COUNTER):020x}"


@dataclass(slots=True)
class Exchange:
    """What one request did, for metrics, usage and the access log."""

    request_id: str
    method: str
    started: float
    client_ip: str = ""
    # The request target as sent (path and query) and the User-Agent, raw: the
    # request log makes them safe text off the request path.
    target: str = ""
    user_agent: str = ""
    route: str = "-"
    status: int = 0
    outcome: Outcome = Outcome.BAD_REQUEST
    key: KeyRecord | None = None
    credits: int = 0
    upstream_seconds: float | None = None
    rate_headers: dict[str, str] = field(default_factory=dict)
    # The streamed answer once its status line is on its way to the client.
    relayed: web.StreamResponse | None = None
    trace: RequestTrace = NO_TRACE

    def reply(self, response: web.StreamResponse, outcome: Outcome) -> web.StreamResponse:
        """Stamp a response the gateway itself answers with the request's id and rate headers."""
        self.status = response.status
        self.outcome = outcome
        response.headers["X-Request-Id"] = self.request_id
        if self.rate_headers:
            response.headers.update(self.rate_headers)
        return response


class Recorder:
    """Counts and logs every finished exchange (usage, anomaly signals, metrics, access log)."""

    def __init__(
        self,
        metrics: Metrics,
        usage: UsageRecorder,
        anomalies: AnomalyDetector | None,
        access_log: AccessLog | None,
        request_log: RequestLog | None = None,
    ) -> None:
        self._metrics = metrics
        self._usage = usage
        self._anomalies = anomalies
        self._access_log = access_log
        self._request_log = request_log

    def record(self, ex: Exchange) -> None:
        elapsed = time.monotonic() - ex.started
        key = ex.key
        if key is not None:
            used = ex.outcome is not Outcome.UNAUTHORIZED
            self._usage.record(key, ex.outcome.value, ex.credits, used=used)
            if used:
                self._usage.record_ip(key, ex.client_ip)
                if self._anomalies is not None:
                    self._anomalies.request(key.id, key.team_id, ex.client_ip)
            if self._request_log is not None:
                self._request_log.record(
                    key, ex.request_id, ex.method, ex.route, ex.target, ex.status,
                    ex.outcome.value, ex.credits, ex.client_ip, ex.user_agent, elapsed * 1000,
                )  # fmt: skip
        self._metrics.count_request(
            ex.route, ex.method, ex.status, ex.outcome.value, key.team_id if key else None
        )
        self._metrics.observe_request(ex.route, elapsed)
        if self._access_log is not None:
            self._access_log.write(_access_fields(ex, elapsed))
        if ex.trace is not NO_TRACE:
            ex.trace.finish(_span_attributes(ex))


def _span_attributes(ex: Exchange) -> dict[str, str | int]:
    """OpenTelemetry's HTTP server attributes, and who paid what (never the key itself)."""
    attributes: dict[str, str | int] = {
        "http.request.method": ex.method,
        "http.route": ex.route,
        "http.response.status_code": ex.status,
        "client.address": ex.client_ip,
        "gateway.request_id": ex.request_id,
        "gateway.outcome": ex.outcome.value,
        "gateway.credits": ex.credits,
    }
    key = ex.key
    if key is not None:
        attributes["gateway.key_id"] = key.id
        attributes["gateway.team_id"] = key.team_id
        attributes["gateway.environment"] = key.environment
    return attributes


def _access_fields(ex: Exchange, elapsed: float) -> dict[str, Any]:
    key = ex.key
    upstream_ms = round(ex.upstream_seconds * 1000, 3) if ex.upstream_seconds is not None else None
    return {
        "request_id": ex.request_id,
        "method": ex.method,
        "route": ex.route,
        "status": ex.status,
        "outcome": ex.outcome.value,
        "team_id": key.team_id if key else None,
        "key_id": key.id if key else None,
        "key_prefix": key.prefix if key else None,
        "credits": ex.credits,
        "upstream_ms": upstream_ms,
        "total_ms": round(elapsed * 1000, 3),
        "client_ip": ex.client_ip,
    }
