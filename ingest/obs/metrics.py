"""Prometheus metrics read from the components' own stats at scrape time.

Components keep plain counters (ints in dataclasses) that cost nothing on the hot path; this collector
turns them into metric families only when Prometheus asks. Names follow Prometheus conventions
(`okx_ingest_..._total` for counters, `_seconds` for durations, base units).

Each process builds its registry with `new_component_registry(component)`: build info and process metrics come
with it. Components so far: `recorder` (supervisor.py), `backfill` (services/backfill/); the archiver takes
`archive` and names its families `okx_ingest_archive_*` (README "Metrics" lists the reserved names), so the
dashboard and alert rules in deploy/ can select every process the same way.
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


# ---- process-wide series every component exposes -------------------------------------------------------

#: Receive -> broker-ack buckets (seconds): the healthy path is milliseconds, an outage drains in minutes.
ACK_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
                       300.0, 900.0)


def build_info(component: str) -> Callable[[], Iterable[Metric]]:
    """`okx_ingest_build_info{version,python,component} 1`: joins other series to the running release."""
    import platform

    from ingest import __version__

    def collect() -> Iterable[Metric]:
        info = gauge("build_info", "Always 1; labels name the running release", ("version", "python", "component"))
        info.add_metric([__version__, platform.python_version(), component], 1)
        return [info]

    return collect


def new_component_registry(component: str) -> tuple[CollectorRegistry, StatsCollector]:
    """`new_registry()` plus build info and the process/platform/GC collectors of prometheus-client.

    Process metrics (`process_cpu_seconds_total`, `process_resident_memory_bytes`, open fds, ...) come from
    /proc of this process; a fresh registry per daemon keeps tests that run several in one process apart.
    """
    from prometheus_client import GCCollector, PlatformCollector, ProcessCollector

    registry, collector = new_registry()
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    GCCollector(registry=registry)
    collector.add(build_info(component))
    return registry, collector


class AckLatency:
    """Receive -> broker-ack latency, sampled once per pipeline batch.

    The pipeline marks the last record of a batch with the receive time of the batch's first frame; the sink
    wrapper (`io.measured.MeasuredSink`) reports the records Kafka acknowledged, and a marked one observes
    `now - receive time`: the worst case of its batch, since delivery keeps order and a batch's records are
    acknowledged no later than its last. Marks are held by object identity (a strong reference keeps the id
    unique) and bounded: a mark whose record comes back from disk as a new object after an outage is dropped
    with the oldest.
    """

    def __init__(self, registry: CollectorRegistry, *, max_pending: int = 1024,
                 now_ns: Callable[[], int] | None = None) -> None:
        import time

        from prometheus_client import Histogram

        self.histogram = Histogram("okx_ingest_receive_to_ack_seconds",
                                   "Time from receiving a frame to Kafka acknowledging its records (sampled per "
                                   "pipeline batch: its first frame to its last record)",
                                   buckets=ACK_LATENCY_BUCKETS, registry=registry)
        self._pending: dict[int, tuple[object, int]] = {}
        self._max_pending = max_pending
        self._now_ns = now_ns or time.time_ns

    def mark(self, record: object, recv_ts_ns: int) -> None:
        pending = self._pending
        if len(pending) >= self._max_pending:
            del pending[next(iter(pending))]
        pending[id(record)] = (record, recv_ts_ns)

    def acked(self, records: Iterable[object]) -> None:
        pending = self._pending
        if not pending:
            return
        ids = set(map(id, records))
        now = self._now_ns()
        for key in [k for k in pending if k in ids]:
            _, recv_ns = pending.pop(key)
            self.histogram.observe(max(0.0, (now - recv_ns) / 1e9))
