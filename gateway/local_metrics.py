"""Hot-path metrics kept in plain Python numbers and handed to prometheus-client at scrape.

Why by hand: a prometheus-client increment validates and takes a lock on every
call (six Python calls a counter, ten and a loop over the buckets a histogram
observation), and the request path makes about ten of them. These collectors
do one attribute update (one ``bisect`` for a histogram) and build the
exposition families only when ``/metrics`` is read. Everything runs on the
event loop thread, so no lock is needed.

They serve one process only. With ``--workers N`` the values must live in
prometheus-client's shared files, so :mod:`gateway.metrics` uses its own
metric classes there instead; both kinds offer the same ``labels(...)``
children with ``inc`` / ``dec`` / ``observe``.
"""

from __future__ import annotations

import math
from bisect import bisect_left
from collections.abc import Iterable, Iterator, Sequence
from typing import Generic, Protocol, TypeVar

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.utils import floatToGoString

__all__ = [
    "CounterChild",
    "GaugeChild",
    "HistogramChild",
    "LocalCounter",
    "LocalGauge",
    "LocalHistogram",
]


class CounterChild(Protocol):
    def inc(self, amount: float = 1) -> None: ...


class GaugeChild(Protocol):
    def inc(self, amount: float = 1) -> None: ...

    def dec(self, amount: float = 1) -> None: ...


class HistogramChild(Protocol):
    def observe(self, amount: float) -> None: ...


class _Count:
    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0.0

    def inc(self, amount: float = 1) -> None:
        if amount < 0:  # the one check prometheus-client makes that matters
            raise ValueError("counters only go up")
        self.value += amount

    def dec(self, amount: float = 1) -> None:
        self.value -= amount


class _Buckets:
    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last one is +Inf
        self.sum = 0.0

    def observe(self, amount: float) -> None:
        # bisect_left: the first bound >= amount, as Prometheus's "le" buckets want.
        self.counts[bisect_left(self.bounds, amount)] += 1
        self.sum += amount


Child = TypeVar("Child", _Count, _Buckets)


class _Local(Generic[Child]):
    """A labelled family: children by label values, rendered by ``collect``."""

    kind = "untyped"

    def __init__(
        self,
        name: str,
        documentation: str,
        labelnames: Sequence[str] = (),
        *,
        registry: CollectorRegistry,
    ) -> None:
        self.name = name
        self.documentation = documentation
        self.labelnames = tuple(labelnames)
        self._children: dict[tuple[str, ...], Child] = {}
        if not self.labelnames:
            self._children[()] = self._new_child()
        registry.register(self)

    def _new_child(self) -> Child:
        raise NotImplementedError

    def labels(self, *values: str) -> Child:
        child = self._children.get(values)
        if child is None:
            if len(values) != len(self.labelnames):
                raise ValueError(f"{self.name} takes labels {self.labelnames}, got {values!r}")
            child = self._children[values] = self._new_child()
        return child

    def _family(self) -> Metric:
        raise NotImplementedError

    def _add(self, family: Metric, labels: tuple[str, ...], child: Child) -> None:
        raise NotImplementedError

    def describe(self) -> Iterable[Metric]:
        return [self._family()]

    def collect(self) -> Iterator[Metric]:
        family = self._family()
        for labels, child in list(self._children.items()):
            self._add(family, labels, child)
        yield family


class LocalCounter(_Local[_Count]):
    def _new_child(self) -> _Count:
        return _Count()

    def inc(self, amount: float = 1) -> None:
        self.labels().inc(amount)

    def _family(self) -> Metric:
        return CounterMetricFamily(self.name, self.documentation, labels=self.labelnames)

    def _add(self, family: Metric, labels: tuple[str, ...], child: _Count) -> None:
        assert isinstance(family, CounterMetricFamily)
        family.add_metric(labels, child.value)


class LocalGauge(_Local[_Count]):
    def _new_child(self) -> _Count:
        return _Count()

    def inc(self, amount: float = 1) -> None:
        self._children[()].value += amount

    def dec(self, amount: float = 1) -> None:
        self._children[()].value -= amount

    def _family(self) -> Metric:
        return GaugeMetricFamily(self.name, self.documentation, labels=self.labelnames)

    def _add(self, family: Metric, labels: tuple[str, ...], child: _Count) -> None:
        assert isinstance(family, GaugeMetricFamily)
        family.add_metric(labels, child.value)


class LocalHistogram(_Local[_Buckets]):
    def __init__(
        self,
        name: str,
        documentation: str,
        labelnames: Sequence[str] = (),
        *,
        buckets: Sequence[float],
        registry: CollectorRegistry,
    ) -> None:
        bounds = tuple(float(b) for b in buckets if not math.isinf(b))
        if list(bounds) != sorted(set(bounds)):
            raise ValueError(f"{name}: buckets must be distinct and increasing")
        self.bounds = bounds
        super().__init__(name, documentation, labelnames, registry=registry)

    def _new_child(self) -> _Buckets:
        return _Buckets(self.bounds)

    def observe(self, amount: float) -> None:
        self.labels().observe(amount)

    def _family(self) -> Metric:
        return HistogramMetricFamily(self.name, self.documentation, labels=self.labelnames)

    def _add(self, family: Metric, labels: tuple[str, ...], child: _Buckets) -> None:
        assert isinstance(family, HistogramMetricFamily)
        cumulative: list[tuple[str, float]] = []
        total = 0
        for bound, count in zip((*self.bounds, math.inf), list(child.counts), strict=True):
            total += count
            cumulative.append((_le(bound), total))
        family.add_metric(list(labels), cumulative, child.sum)


def _le(bound: float) -> str:
    spelled: str = floatToGoString(bound)  # type: ignore[no-untyped-call]
    return spelled  # prometheus-client's own spelling: "0.005", "1.0", "+Inf"
