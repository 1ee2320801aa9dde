"""What the backfill counts: the stats snapshot for tests and health, its counters, its metric families."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ingest.io.readback import TOPIC_OF_KIND as _TOPIC


@dataclass(frozen=True, slots=True)
class BackfillStats:
    """A snapshot for metrics and tests. Gap counters count gaps whose status update was committed."""

    gaps_received: int
    gaps_pending: int
    gaps_filled: int
    gaps_partial: int
    gaps_unfillable: int
    gaps_failed: int
    gaps_deferred: int
    fenced: int
    gaps_ignored: int
    gaps_duplicate: int
    gaps_undecodable: int
    records_backfilled: Mapping[str, int]
    records_already_present: int
    dead_letters: int
    readback_records: int
    batches: int
    batches_abandoned: int
    commits: int
    partitions: int
    requests: Mapping[tuple[str, str], int]
    limiter_wait_s: Mapping[str, float]
    breakers_open: tuple[str, ...]
    #: okx.gaps records on this worker's partitions not yet committed (None until first measured).
    backlog: int | None = None
    #: When the oldest gap of the running batch was detected (local ns; None when no batch runs).
    oldest_pending_detected_ns: int | None = None

    @property
    def gaps_done(self) -> int:
        """Gaps finished with any status (failed ones are among the partial)."""
        return self.gaps_filled + self.gaps_partial + self.gaps_unfillable

    @property
    def records_total(self) -> int:
        return sum(self.records_backfilled.values())


@dataclass
class _Counters:
    """The mutable counters behind BackfillStats (plain ints: nothing to pay on the hot path)."""

    gaps_received: int = 0
    gaps_pending: int = 0
    gaps_by_status: Counter[str] = field(default_factory=Counter)
    gaps_failed: int = 0
    gaps_deferred: int = 0
    fenced: int = 0
    gaps_ignored: int = 0
    gaps_duplicate: int = 0
    gaps_undecodable: int = 0
    records: Counter[str] = field(default_factory=Counter)
    records_already_present: int = 0
    dead_letters: int = 0
    readback_records: int = 0
    batches: int = 0
    batches_abandoned: int = 0
    commits: int = 0
    partitions: int = 0
    backlog: int | None = None
    oldest_pending_detected_ns: int | None = None


def backfill_metrics(stats: BackfillStats) -> list[Any]:
    """Prometheus families over a stats snapshot (names per obs/metrics conventions)."""
    from ingest.obs.metrics import counter, gauge

    received = counter("backfill_gaps_received", "Open gaps taken from okx.gaps (each emission once)")
    received.add_metric([], stats.gaps_received)
    gaps = counter("backfill_gaps", "Gaps finished by the backfill worker, by status", ("status",))
    for status, n in (("filled", stats.gaps_filled), ("partial", stats.gaps_partial),
                      ("unfillable", stats.gaps_unfillable)):
        gaps.add_metric([status], n)
    failed = counter("backfill_gaps_failed", "Gaps decided partial on an error that was not OKX's answer "
                     "(an unreadable response, an internal error)")
    failed.add_metric([], stats.gaps_failed)
    deferred = counter("backfill_gaps_deferred", "Times a gap failed only transiently (breaker, 429/50011, 5xx, "
                       "timeout, slow Kafka) and was put back open to be retried later")
    deferred.add_metric([], stats.gaps_deferred)
    fenced = counter("backfill_fenced", "Times the worker stopped publishing for a batch because it could not "
                     "prove it still owned the batch's partitions (a rebalance, an expired session)")
    fenced.add_metric([], stats.fenced)
    pending = gauge("backfill_gaps_pending", "Gaps taken from okx.gaps and not yet finished")
    pending.add_metric([], stats.gaps_pending)
    records = counter("backfill_records", "Records backfilled, by topic kind", ("topic",))
    for topic, n in {**dict.fromkeys(sorted({k.value for k in _TOPIC.values()}), 0),
                     **stats.records_backfilled}.items():
        records.add_metric([topic], n)
    dup = counter("backfill_records_already_present", "Rows OKX returned that the topic already held")
    dup.add_metric([], stats.records_already_present)
    req = counter("backfill_rest_requests", "REST requests by endpoint and OKX code", ("endpoint", "code"))
    for (path, code), n in stats.requests.items():
        req.add_metric([path, code], n)
    wait = counter("backfill_rest_limiter_wait_seconds", "Time spent waiting for rate-limit slots", ("endpoint",))
    for path, s in stats.limiter_wait_s.items():
        wait.add_metric([path], s)
    parts = gauge("backfill_partitions", "okx.gaps partitions assigned to this worker")
    parts.add_metric([], stats.partitions)
    backlog = gauge("backfill_backlog_gaps", "okx.gaps records on this worker's partitions not yet done "
                                             "(consumer lag plus the running batch)")
    if stats.backlog is not None:
        backlog.add_metric([], stats.backlog)
    oldest = gauge("backfill_oldest_pending_gap_age_seconds",
                   "Age of the oldest gap in the running batch since it was detected (0 when idle)")
    detected = stats.oldest_pending_detected_ns
    oldest.add_metric([], 0.0 if detected is None else max(0.0, (time.time_ns() - detected) / 1e9))
    return [received, gaps, failed, deferred, fenced, pending, records, dup, req, wait, parts, backlog, oldest]
