"""Every Prometheus metric of the gateway, defined once, in base units.

A :class:`Metrics` instance owns its own registry, so several apps in one
process (tests) never collide, and nothing is created at import.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

__all__ = ["Metrics"]

# From well under a millisecond (cache hits, refusals) to the tens of seconds a
# long assessment may take.
LATENCY_BUCKETS = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
)


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "gateway_requests_total",
            "Requests answered, by route, method, status class and outcome.",
            ["route", "method", "status_class", "outcome"],
            registry=r,
        )
        self.request_duration = Histogram(
            "gateway_request_duration_seconds",
            "Time from request received to response finished.",
            ["route"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.upstream_duration = Histogram(
            "gateway_upstream_duration_seconds",
            "Time from forwarding to the upstream's status line.",
            ["upstream"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.credits = Counter(
            "gateway_credits_total",
            "Credits reserved, posted (charged) and voided (returned).",
            ["operation"],
            registry=r,
        )
        self.key_cache = Counter(
            "gateway_key_cache_lookups_total",
            "Key cache lookups by result.",
            ["result"],
            registry=r,
        )
        self.limiter_decisions = Counter(
            "gateway_rate_limit_decisions_total",
            "Rate limit decisions by result.",
            ["result"],
            registry=r,
        )
        self.in_flight = Gauge(
            "gateway_requests_in_flight",
            "Requests being handled right now.",
            registry=r,
        )
        self.unflushed = Gauge(
            "gateway_ledger_unflushed",
            "Posts and voids waiting to be written to the ledger.",
            registry=r,
        )
        self._request_children: dict[tuple[str, str, str, str], Counter] = {}

    def count_request(self, route: str, method: str, status: int, outcome: str) -> None:
        # Label lookups cost more than the increment; keep the children.
        key = (route, method, f"{status // 100}xx", outcome)
        child = self._request_children.get(key)
        if child is None:
            child = self.requests.labels(*key)
            self._request_children[key] = child
        child.inc()
