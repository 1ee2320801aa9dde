"""Prometheus metrics read from the components' own stats at scrape time.

Components keep plain counters (ints in dataclasses) that cost nothing on the hot path; this collector
turns them into metric families only when Prometheus asks. Names follow Prometheus conventions
(`okx_ingest_..._total` for counters, `_seconds` for durations, base units).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Protocol

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector


class MetricSource(Protocol):
    """Anything that can describe its own state as metric families."""

    def collect(self) -> Iterable[Metric]: ...


def counter(name: str, doc: str, labels: tuple[str, ...] = ()) -> CounterMetricFamily:
    return CounterMetricFamily(f"okx_ingest_{name}", doc, labels=list(labels))


def gauge(name: str, doc: str, labels: tuple[str, ...] = ()) -> GaugeMetricFamily:
    return GaugeMetricFamily(f"okx_ingest_{name}", doc, labels=list(labels))


class StatsCollector(Collector):
    """A Prometheus collector over registered sources (callables returning metric families)."""

    def __init__(self) -> None:
        self.sources: list[Callable[[], Iterable[Metric]]] = []

    def add(self, source: Callable[[], Iterable[Metric]]) -> None:
        self.sources.append(source)

    def collect(self) -> Iterator[Metric]:
        for source in self.sources:
            yield from source()

    def describe(self) -> list[Metric]:
        # Families depend on runtime state; describing nothing keeps registration from calling collect().
        return []


def new_registry() -> tuple[CollectorRegistry, StatsCollector]:
    """A fresh registry (one per daemon, so tests can run several) with the stats collector attached."""
    registry = CollectorRegistry(auto_describe=False)
    collector = StatsCollector()
    registry.register(collector)
    return registry, collector
