"""The REST backfill worker (`okx-ingest backfill`) and the on-demand range backfill (`--channel ...`).

Modules: `filler` (one stream's jobs over REST with the per-gap retry rule, shared by both), `worker` (the
group member: batches from okx.gaps, fills, status updates, commits), `lease` (fencing), `service`
(`run_worker`, the worker on the runtime with metrics and health), `range_cli` (`backfill_range` and its
progress), `clients` (the encoder and REST client both entry points build), `stats` (counters, metrics).
Everything the CLI and the tests use is importable from `ingest.services.backfill`.

The worker consumes `okx.gaps` in a Kafka consumer group, fetches what each open gap lost through OKX's
signed REST API (`io/rest.OkxRestClient`: process-wide per-endpoint limits, retries, breaker, audit log),
publishes it to the same topics with `source = rest` and the WebSocket schema and key, then publishes the
gap's next revision (`filled`, `partial` or `unfillable`) and only then commits the offset. What to fetch
and publish is decided in `core/backfill.py`; this package does the I/O.

Batches and commits. One `getmany` (at most `backfill.batch_max_gaps` records) is one batch: its open gaps
are coalesced per stream (so a flood of overlapping gaps costs a few walks, and the rate limiter paces
the rest), streams are filled `backfill.concurrency` at a time, then
    data records put -> delivery.flush() (the broker acknowledged them) -> status updates put -> flush ->
    commit (last offset + 1 per partition).
A worker that dies anywhere before the commit leaves the batch uncommitted: the group hands it to another
worker (after `session_timeout_ms`), which does it again. While a batch runs, the worker pauses its
partitions and keeps polling (nothing is fetched), so a long gap never exceeds `max_poll_interval_ms`.
A rebalance revokes every partition (eager protocol): the running batch is abandoned uncommitted, and the
records it already put are flushed before the partitions move, so the next owner can see them.
Records other than open gaps are skipped (our own status updates come back through the topic); the same
gap emission twice (an at-least-once duplicate) is processed once per process.

Exactly once in the topic. The worker publishes only rows strictly inside a gap (tradeIds between the
bounds; see core/backfill.py for every kind), and before fetching a stream it reads the data topic back:
from the first offset whose timestamp is at or after the stream's lower time bound (minus
`readback_margin_ms`; every record of the gap has a timestamp at or after it, so every earlier attempt's
records lie at or after that offset), to the end, on the instrument's partition (all partitions for fills
and orders, which are keyed by ordId). Rows whose natural keys are already there are not published again.
This covers a worker killed mid-gap, a batch abandoned on rebalance, a gap event delivered twice,
overlapping gaps, and time-bounded edges where the recorder's own records sit. For the same reason the
worker discards its delivery journal's unacknowledged backlog at start: every record in it belongs to an
uncommitted batch that its partition's owner redoes, so replaying it could only duplicate.
Fencing. A worker cut off from its group (paused or partitioned past `session_timeout_ms`) may have lost
its partitions without being told yet. Before it puts any record of a batch (data, status update) and
before it commits, it checks a lease (`_Lease`): the partitions are still assigned in the same group
generation, and at least every session_timeout / 2 the coordinator confirms the membership (the batch's
start offsets committed again, which the broker refuses for an expelled member). A refused or unanswered
check abandons the batch uncommitted (log `backfill_fenced`, metric `backfill_fenced`).
Limits (documented, not fixed here; the embedded broker has no transactions): records a worker handed to
its delivery before it was cut off may still be sent after it, and a produce request still in flight
when a worker is SIGKILLed may be appended after the next owner read back (milliseconds against a session
timeout); and
status updates, which may repeat after such a redo with the same `record_id` (`gap:{id}:{revision}`) for
consumers to drop. Books are re-baselined with a new snapshot on every attempt.

Only a definitive answer decides a gap. `unfillable` (published with the reason, committed, never retried)
means OKX said so: no REST history for the channel, older than OKX keeps, OKX's history ends before the
gap, 50030/50120 permission, unknown instrument, a private channel without an API key. Transient failures
(breaker open or its probe in flight, 429/50011, 5xx, timeouts, transport errors, a slow read-back) never
decide anything: each costs one of the gap's `gap_max_attempts` tries only after a real wait that grows
with every try (`equal_jitter` from `retry_initial_s` up to `gap_retry_max_s`, at least the breaker's own
retry_after); when the tries are used up the gap is deferred: a new `open` revision (attempts counted,
the reason in `note`) goes to okx.gaps and the offset is committed, so the group takes it up again later,
waiting longer each time (metric `backfill_gaps_deferred`, log `backfill_gap_deferred`). Rows already
published are found by the read-back on the next try and not published again. Authentication failures
stop the worker (fix the key; nothing is committed, nothing lost).
"""

from __future__ import annotations

from ingest.io.readback import ReadbackError, TopicReadback, bootstrap_of
from ingest.services.backfill.filler import BackfillError, GapFiller, GapResult, PageEvent
from ingest.services.backfill.lease import FencedError
from ingest.services.backfill.range_cli import RangeResult, backfill_range
from ingest.services.backfill.service import run_worker
from ingest.services.backfill.stats import BackfillStats, backfill_metrics
from ingest.services.backfill.stats import _Counters as _Counters
from ingest.services.backfill.worker import BackfillWorker, discard_backlog

__all__ = [
    "BackfillError",
    "BackfillStats",
    "BackfillWorker",
    "FencedError",
    "GapFiller",
    "GapResult",
    "PageEvent",
    "RangeResult",
    "ReadbackError",
    "TopicReadback",
    "backfill_metrics",
    "backfill_range",
    "bootstrap_of",
    "discard_backlog",
    "run_worker",
]
