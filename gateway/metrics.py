"""Every Prometheus metric of the gateway, defined once, in base units.

A :class:`Metrics` instance owns its own registry, so several gateways in one
process (tests) never collide and nothing is created at import. With
``--workers N`` the values live in ``PROMETHEUS_MULTIPROC_DIR`` (set by
``gateway run`` before any worker imports prometheus-client) and a scrape of
any worker aggregates all of them.

Cardinality is bounded by design: routes, methods, outcomes and upstreams come
from the config; per-team series exist only when an operator turns them on,
and then for at most ``team_label_limit`` teams (the rest count as "other").
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.multiprocess import MultiProcessCollector

from gateway.local_metrics import GaugeChild, LocalCounter, LocalGauge, LocalHistogram

__all__ = ["LATENCY_BUCKETS", "Metrics"]

# From well under a millisecond (cache hits, refusals) to the tens of seconds a
# long assessment may take.
LATENCY_BUCKETS = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
    1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
)  # fmt: skip
# Backend calls are expected to be fast; the tail matters.
BACKEND_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)
OTHER_TEAMS = "other"


class Metrics:
    def __init__(self, *, team_labels: bool = False, team_label_limit: int = 100) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.multiprocess = "PROMETHEUS_MULTIPROC_DIR" in os.environ
        r = self.registry
        # The per-request metrics: in one process they are plain numbers rendered
        # at scrape (gateway/local_metrics.py); with workers they must live in
        # prometheus-client's shared files.
        counter: Any = Counter if self.multiprocess else LocalCounter
        histogram: Any = Histogram if self.multiprocess else LocalHistogram
        self.requests = counter(
            "gateway_requests",
            "Requests answered, by route, method, status class and outcome.",
            ["route", "method", "status_class", "outcome"],
            registry=r,
        )
        self.request_duration = histogram(
            "gateway_request_duration_seconds",
            "Time from request received to response handed to the client.",
            ["route"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.upstream_duration = histogram(
            "gateway_upstream_duration_seconds",
            "Time from forwarding to the upstream's status line.",
            ["upstream"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.credits = counter(
            "gateway_credits",
            "Credits reserved, posted (charged) and voided (returned).",
            ["operation"],
            registry=r,
        )
        self._declare_path_metrics(r, counter, histogram)
        self.in_flight: GaugeChild
        if self.multiprocess:
            self.in_flight = Gauge(
                "gateway_requests_in_flight",
                "Requests being handled right now.",
                registry=r,
                multiprocess_mode="livesum",
            )
        else:
            self.in_flight = LocalGauge(
                "gateway_requests_in_flight", "Requests being handled right now.", registry=r
            )
        self._declare_background_metrics(r)
        self._team_labels = team_labels
        self._team_limit = team_label_limit
        self._teams: set[str] = set()
        self._request_children: dict[tuple[str, str, int, str], Counter] = {}
        # Children of the per-request metrics by label values; every label here
        # comes from the configuration (routes, upstreams) or a fixed set.
        self._children: dict[tuple[object, ...], Any] = {}

    def _declare_path_metrics(self, r: CollectorRegistry, counter: Any, histogram: Any) -> None:
        """What the request path's parts report: ledger, key cache, refused credentials,
        the limiter and the backends."""
        self.late_resolutions = Counter(
            "gateway_ledger_late_resolutions",
            "Posts or voids that arrived after their reservation was already resolved.",
            registry=r,
        )
        self.key_cache = counter(
            "gateway_key_cache_lookups",
            "Key cache lookups: hit (answered from memory) or miss (asked the store).",
            ["result"],
            registry=r,
        )
        self.auth_failures = Counter(
            "gateway_auth_failures",
            "Refused credentials by reason.",
            ["reason"],
            registry=r,
        )
        self.limiter_decisions = counter(
            "gateway_rate_limit_decisions",
            "Rate limit decisions by result and by which limiter decided.",
            ["result", "limiter"],
            registry=r,
        )
        self.limiter_degraded = Gauge(
            "gateway_limiter_degraded",
            "1 while the shared limiter is unreachable and the fallback policy applies.",
            registry=r,
            multiprocess_mode="max",
        )
        self.backend_duration = histogram(
            "gateway_backend_call_duration_seconds",
            "Latency of calls to Redis and the database, by backend and operation.",
            ["backend", "operation"],
            buckets=BACKEND_BUCKETS,
            registry=r,
        )
        self.backend_errors = Counter(
            "gateway_backend_errors",
            "Failed calls to Redis and the database, by backend and operation.",
            ["backend", "operation"],
            registry=r,
        )

    def _declare_background_metrics(self, r: CollectorRegistry) -> None:
        """What the background loops report: the ledger's flushes and sweeps, per-team
        counts, anomaly signals and webhook deliveries."""
        self.pending_reservations = Gauge(
            "gateway_reservations_pending",
            "Reservations neither posted nor voided yet (sampled by the sweeper).",
            registry=r,
            multiprocess_mode="max",
        )
        self.unflushed = Gauge(
            "gateway_ledger_unflushed",
            "Posts and voids waiting to be written to the ledger.",
            registry=r,
            multiprocess_mode="livesum",
        )
        self.flush_lag = Gauge(
            "gateway_ledger_flush_lag_seconds",
            "Age of the oldest post waiting to be written.",
            registry=r,
            multiprocess_mode="max",
        )
        self.team_requests = Counter(
            "gateway_team_requests",
            "Requests per team and outcome (only when metrics.team_labels is on).",
            ["team", "outcome"],
            registry=r,
        )
        self.anomalies = Counter(
            "gateway_anomalies",
            "Anomaly signals raised, by kind.",
            ["kind"],
            registry=r,
        )
        self.webhook_deliveries = Counter(
            "gateway_webhook_deliveries",
            "Webhook delivery attempts by outcome: delivered, retry (failed, tried again "
            "later) or failed (given up).",
            ["outcome"],
            registry=r,
        )
        self.webhook_queue = Gauge(
            "gateway_webhook_queue_pending",
            "Webhook deliveries not yet made, of enabled endpoints (sampled by the worker).",
            registry=r,
            multiprocess_mode="max",
        )
        self.webhook_queue_age = Gauge(
            "gateway_webhook_queue_oldest_seconds",
            "How long the longest-waiting due webhook delivery has waited.",
            registry=r,
            multiprocess_mode="max",
        )

    def collector_registry(self) -> CollectorRegistry:
        """What ``/metrics`` renders: this process, or every worker in multiprocess mode."""
        if not self.multiprocess:
            return self.registry
        aggregate = CollectorRegistry()
        MultiProcessCollector(aggregate)  # type: ignore[no-untyped-call]
        return aggregate

    def _child(self, metric: Any, *labels: str) -> Any:
        # Label lookups cost more than the increment itself; keep the children.
        key = (id(metric), *labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*labels)
        return child

    def observe_request(self, route: str, seconds: float) -> None:
        self._child(self.request_duration, route).observe(seconds)

    def observe_upstream(self, upstream: str, seconds: float) -> None:
        self._child(self.upstream_duration, upstream).observe(seconds)

    def count_decision(self, decision: str, decided_by: str) -> None:
        self._child(self.limiter_decisions, decision, decided_by).inc()

    def count_credits(self, kind: str, amount: int) -> None:
        self._child(self.credits, kind).inc(amount)

    def count_request(
        self, route: str, method: str, status: int, outcome: str, team: str | None = None
    ) -> None:
        # Label lookups cost more than the increment; keep the children.
        key = (route, method, status // 100, outcome)
        child = self._request_children.get(key)
        if child is None:
            child = self.requests.labels(route, method, f"{status // 100}xx", outcome)
            self._request_children[key] = child
        child.inc()
        if self._team_labels and team is not None:
            if team not in self._teams:
                if len(self._teams) >= self._team_limit:
                    team = OTHER_TEAMS
                else:
                    self._teams.add(team)
            self.team_requests.labels(team, outcome).inc()

    @contextmanager
    def backend_call(self, backend: str, operation: str) -> Iterator[None]:
        """Time a call to Redis or the database and count its failures."""
        started = time.perf_counter()
        try:
            yield
        except Exception:
            self.backend_errors.labels(backend, operation).inc()
            raise
        finally:
            self._child(self.backend_duration, backend, operation).observe(
                time.perf_counter() - started
            )
