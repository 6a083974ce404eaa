"""The hand-kept hot-path metrics render exactly what prometheus-client's own would."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from gateway.local_metrics import LocalCounter, LocalGauge, LocalHistogram
from gateway.metrics import LATENCY_BUCKETS


def _exposition(registry: CollectorRegistry) -> list[str]:
    # prometheus-client adds *_created series; ours leave them out on purpose.
    text = generate_latest(registry).decode()
    return sorted(line for line in text.splitlines() if "_created" not in line)


@given(
    st.lists(
        st.tuples(
            st.sampled_from(["/a", "/b"]),
            st.one_of(
                st.sampled_from(LATENCY_BUCKETS),  # exactly on a bound: "le" includes it
                st.floats(min_value=0, max_value=100, allow_nan=False),
            ),
        ),
        max_size=60,
    )
)
def test_histogram_matches_prometheus_client(observations: list[tuple[str, float]]) -> None:
    ours, theirs = CollectorRegistry(), CollectorRegistry()
    local = LocalHistogram("t_seconds", "Doc.", ["route"], buckets=LATENCY_BUCKETS, registry=ours)
    reference = Histogram("t_seconds", "Doc.", ["route"], buckets=LATENCY_BUCKETS, registry=theirs)
    for route in ("/a", "/b"):  # both families list both children, observed or not
        local.labels(route)
        reference.labels(route)
    for route, seconds in observations:
        local.labels(route).observe(seconds)
        reference.labels(route).observe(seconds)
    assert _exposition(ours) == _exposition(theirs)


@given(st.lists(st.tuples(st.sampled_from(["ok", "error"]), st.integers(0, 1000)), max_size=40))
def test_counter_matches_prometheus_client(increments: list[tuple[str, int]]) -> None:
    ours, theirs = CollectorRegistry(), CollectorRegistry()
    local = LocalCounter("t_requests", "Doc.", ["outcome"], registry=ours)
    reference = Counter("t_requests", "Doc.", ["outcome"], registry=theirs)
    for outcome, amount in increments:
        local.labels(outcome).inc(amount)
        reference.labels(outcome).inc(amount)
    assert _exposition(ours) == _exposition(theirs)


def test_gauge_goes_both_ways() -> None:
    ours, theirs = CollectorRegistry(), CollectorRegistry()
    local = LocalGauge("t_in_flight", "Doc.", registry=ours)
    reference = Gauge("t_in_flight", "Doc.", registry=theirs)
    for gauge in (local, reference):
        gauge.inc()
        gauge.inc()
        gauge.dec()
    assert _exposition(ours) == _exposition(theirs)
    assert "t_in_flight 1.0" in _exposition(ours)


def test_bad_use_is_refused() -> None:
    registry = CollectorRegistry()
    counter = LocalCounter("t_total_things", "Doc.", ["a"], registry=registry)
    with pytest.raises(ValueError, match="counters only go up"):
        counter.labels("x").inc(-1)
    with pytest.raises(ValueError, match="takes labels"):
        counter.labels("x", "y")
    with pytest.raises(ValueError, match=r"Duplicated|already registered"):
        LocalCounter("t_total_things", "Doc.", ["a"], registry=registry)
    with pytest.raises(ValueError, match="increasing"):
        LocalHistogram("t_h", "Doc.", buckets=(1.0, 0.5), registry=registry)
