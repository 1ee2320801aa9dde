"""The REST backfill worker (`okx-ingest backfill`) and the on-demand range backfill (`--channel ...`).

The worker consumes `okx.gaps` in a Kafka consumer group, fetches what each open gap lost through OKX's
signed REST API (`io/rest.OkxRestClient`: process-wide per-endpoint limits, retries, breaker, audit log),
publishes it to the same topics with `source = rest` and the WebSocket schema and key, then publishes the
gap's next revision (`filled`, `partial` or `unfillable`) and only then commits the offset. What to fetch
and publish is decided in `core/backfill.py`; this module does the I/O.

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

import asyncio
import contextlib
import dataclasses
import logging
import sys
import tempfile
import time
from collections import Counter, defaultdict
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol, TextIO, TypeAlias

from aiokafka import AIOKafkaConsumer
from aiokafka.abc import ConsumerRebalanceListener
from aiokafka.errors import KafkaError
from aiokafka.structs import ConsumerRecord, OffsetAndMetadata, TopicPartition

from ingest.config import BackfillSettings, JournalSettings, KafkaSettings, Settings
from ingest.core.avro import DecodeError, RecordEncoder, decode
from ingest.core.backfill import (
    BOOK_DEPTH,
    BOOKS_PATH,
    DAY_MS,
    FILLS_PATH,
    HISTORY_KEEP_MS,
    UNFILLABLE_CODES,
    CandleWalk,
    CursorWalk,
    DataKind,
    FundingWalk,
    Job,
    Outcome,
    Present,
    ReadbackScope,
    Stream,
    TradeWalk,
    Window,
    candle_path,
    data_kind,
    emission_key,
    inst_types_for,
    judge,
    natural_keys,
    orders_path,
    plan_jobs,
    precheck,
    retry_delay,
    status_update,
)
from ingest.core.backoff import equal_jitter, full_jitter
from ingest.core.clock import ServerClock
from ingest.core.normalize import (
    book_from_rest,
    candle_from_rest,
    fill_from_rest,
    funding_rate_from_rest,
    order_from_rest,
    trade_from_rest,
)
from ingest.core.orders import BoundedSeen
from ingest.core.records import DeadLetter, GapEvent, GapStatus, OkxRecord, Record, TopicKind, topic_name
from ingest.core.rest_limits import CircuitOpenError
from ingest.core.rest_policy import AUTH_FAILURE_CODES
from ingest.credentials import CredentialStore, credentials_present
from ingest.errors import ConfigError, CredentialError, DeliveryError, IngestError, OkxApiError, ProtocolError
from ingest.io.aiokafka_compat import membership
from ingest.io.delivery import Delivery
from ingest.io.journal import Journal
from ingest.io.kafka import KafkaSink, describe
from ingest.io.readback import TOPIC_OF_KIND as _TOPIC
from ingest.io.readback import ReadbackError, TopicReadback, bootstrap_of, consumer_options
from ingest.io.rest import OkxRestClient
from ingest.io.sink import EncodedRecord
from ingest.okx.channels import candle_bar
from ingest.runtime import Runtime, bounded, finish_task, stop_task
from ingest.services.clock import ClockService

log = logging.getLogger(__name__)

#: A record as the consumers return it.
_Message: TypeAlias = ConsumerRecord


class BackfillError(IngestError):
    """The worker cannot go on: a setup problem (credentials rejected, TLS pin) or a broken dependency."""


# ----------------------------------------------------------------------------------------------- stats


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


# ----------------------------------------------------------------------------------------------- kafka


def discard_backlog(directory: Path, journal: JournalSettings) -> int:
    """Acknowledge (drop) what a previous run left unacknowledged in the worker's journal; returns how many.

    Safe because the worker commits a batch only after the broker acknowledged all of it: whatever is still
    journaled belongs to an uncommitted batch, which the partition's owner redoes (see module docstring).
    """
    j = Journal(directory, max_bytes=journal.max_bytes, segment_bytes=journal.segment_bytes, fsync=journal.fsync,
                cache_bytes=journal.cache_bytes)
    j.open()
    try:
        dropped = j.pending_records
        while entries := j.read(journal.drain_batch_bytes):
            j.ack(entries[-1].seq)
        return dropped
    finally:
        j.close_sync()


# -------------------------------------------------------------------------------------------- progress


@dataclass(frozen=True, slots=True)
class PageEvent:
    """One REST page of a job, for progress reporting."""

    stream: Stream
    span: Window
    reached_ts: int | None
    records: int
    requests: int


class Outlet(Protocol):
    """Where encoded records go (io/delivery.Delivery)."""

    async def put(self, record: EncodedRecord) -> None: ...


@dataclass(frozen=True, slots=True)
class GapResult:
    """One gap's outcome after its job, the tries it took, and whether it gave up (`failed`: decided partial
    on an error that is not OKX's answer; `deferred`: only transient failures, the gap stays open)."""

    outcome: Outcome
    attempts: int
    failed: bool = False

    @property
    def deferred(self) -> bool:
        return self.outcome.status is GapStatus.OPEN


@dataclass
class _JobState:
    """A job's progress, kept across retries so a retry resumes where the failure struck."""

    job: Job
    walks: list[TradeWalk | CandleWalk | CursorWalk | FundingWalk]
    index: int = 0
    found: Counter[int] = field(default_factory=Counter)
    published: Counter[int] = field(default_factory=Counter)
    rows: int = 0
    requests: int = 0
    capped: bool = False
    snapshot: str | None = None

    def covers(self, w: Window) -> bool:
        if self.job.stream.kind is DataKind.BOOKS or self.capped or not self.walks:
            return False  # a book snapshot re-baselines; it never fills what was missed
        return all(walk.covers(w) for walk in self.walks)


class GapFiller:
    """Fetches a stream's jobs over REST and publishes what the topic lacks (shared by worker and range CLI)."""

    def __init__(self, rest: OkxRestClient, outlet: Outlet, encoder: RecordEncoder, readback: TopicReadback | None,
                 settings: BackfillSettings, counters: _Counters, *,
                 on_page: Callable[[PageEvent], None] | None = None,
                 sleep: Callable[[float], Awaitable[None]] = asyncio.sleep) -> None:
        self.rest = rest
        self.outlet = outlet
        self.encoder = encoder
        self.readback = readback
        self.settings = settings
        self.counters = counters
        self.on_page = on_page
        self._sleep = sleep

    async def fill(self, stream: Stream, jobs: Sequence[Job], *, tried: int = 0) -> dict[int, GapResult]:
        """Read the topic back once for the stream, then run its jobs in order; one result per member gap.

        `tried`: how often these gaps already failed transiently (their `attempts`), so waits keep growing.
        """
        present = Present()
        if self.readback is not None and stream.kind is not DataKind.BOOKS:
            try:
                present = await self._read_back(stream, jobs, tried)
            except ReadbackError as exc:
                # Without knowing what the topic holds, publishing could duplicate it, and a slow Kafka says
                # nothing about OKX: the gaps stay open and are tried again later.
                failure = f"could not read the topic back after {self.settings.gap_max_attempts} attempts: {exc}"
                unread: dict[int, GapResult] = {}
                for job in jobs:
                    unread.update(self._results(_JobState(job, self._walks(job)), self.settings.gap_max_attempts,
                                                failure, False, transient=True))
                return unread
            log.debug("backfill_readback", extra={"stream": str(stream), "present": len(present)})
        results: dict[int, GapResult] = {}
        for job in jobs:
            results.update(await self.run_job(job, present, tried=tried))
        return results

    def _delays(self, tried: int) -> Iterator[float]:
        s = self.settings
        return equal_jitter(s.retry_initial_s, max(s.retry_initial_s, s.gap_retry_max_s), skip=tried)

    async def _read_back(self, stream: Stream, jobs: Sequence[Job], tried: int = 0) -> Present:
        """The topic's keys for the stream, retried like a gap (`gap_max_attempts`), never forever."""
        assert self.readback is not None
        s = self.settings
        delays = self._delays(tried)
        for attempt in range(1, s.gap_max_attempts + 1):
            try:
                return await self.readback.present(ReadbackScope.of(stream, jobs, s.readback_margin_ms))
            except ReadbackError as exc:
                if attempt >= s.gap_max_attempts:
                    raise
                delay = retry_delay(next(delays), None, s.gap_retry_max_s)
                log.warning("backfill_readback_retry", extra={"stream": str(stream), "attempt": attempt,
                                                              "error": str(exc), "retry_in_s": round(delay, 3)})
                await self._sleep(delay)
        raise AssertionError("unreachable")

    async def run_job(self, job: Job, present: Present, *, tried: int = 0) -> dict[int, GapResult]:
        """One job with the per-gap retry policy (module docstring). Raises only what stops the worker:
        DeliveryError, and BackfillError for rejected credentials or a TLS pin mismatch.

        Transient failures (breaker, 429/50011, 5xx, timeouts, transport) each cost one try and a real,
        growing wait (`equal_jitter`, at least the breaker's own retry_after); after `gap_max_attempts` such
        tries the gap is not decided but deferred: it stays open (`judge(transient=True)`)."""
        state = _JobState(job, self._walks(job))
        s = self.settings
        delays = self._delays(tried)
        attempts = 0
        while True:
            attempts += 1
            try:
                await self._drive(state, present)
                return self._results(state, attempts, None, False)
            except DeliveryError:
                raise
            except OkxApiError as exc:
                if not exc.retriable:
                    if exc.code in AUTH_FAILURE_CODES:
                        raise BackfillError(f"OKX rejected the worker's credentials: {exc}") from exc
                    if exc.code not in UNFILLABLE_CODES:
                        log.warning("backfill_unexpected_okx_code", extra={
                            "stream": str(job.stream), "code": exc.code, "okx_msg": exc.msg})
                    return self._results(state, attempts, f"OKX refused it: {exc.code} {exc.msg}", False)
                error: IngestError = exc
            except CredentialError as exc:
                if not exc.retriable:
                    if self.rest.credentials is None:
                        return self._results(state, attempts, "this private channel needs an API key with read "
                                             "permission (OKX_API_KEY, OKX_API_SECRET, OKX_API_PASSPHRASE)", False)
                    raise BackfillError(str(exc)) from exc
                error = exc  # signed traffic paused after auth failures: wait it out like a 5xx
            except ProtocolError as exc:  # OKX answered something unreadable for this range
                return self._results(state, attempts, f"OKX's answer could not be read: {exc}", True)
            except IngestError as exc:
                if not exc.retriable:
                    raise BackfillError(f"backfill of {job.stream} cannot go on: {exc}") from exc
                error = exc
            except Exception as exc:  # a bug must not wedge the group on one poison gap
                log.exception("backfill_job_crashed", extra={"stream": str(job.stream)})
                return self._results(state, attempts, f"internal error {type(exc).__name__}: {exc}", True)
            if attempts >= s.gap_max_attempts:
                return self._results(state, attempts, f"{attempts} tries failed transiently, last: {error}", False,
                                     transient=True)
            retry_after = error.retry_after_s if isinstance(error, CircuitOpenError) else None
            delay = retry_delay(next(delays), retry_after, s.gap_retry_max_s)
            log.warning("backfill_retry", extra={"stream": str(job.stream), "attempt": attempts, "error": str(error),
                                                 "retry_in_s": round(delay, 3)})
            await self._sleep(delay)

    def _results(self, state: _JobState, attempts: int, failure: str | None, failed: bool, *,
                 transient: bool = False) -> dict[int, GapResult]:
        job = state.job
        out: dict[int, GapResult] = {}
        for member in job.members:
            found, published = state.found[member.item], state.published[member.item]
            if job.stream.kind is DataKind.BOOKS:
                if state.snapshot is not None:
                    outcome = Outcome(GapStatus.PARTIAL, 1, f"OKX keeps no order-book history: published a fresh "
                                                            f"/market/books snapshot ({state.snapshot}) to re-baseline "
                                                            "the book; the updates missed in the gap are gone")
                elif transient:
                    outcome = Outcome(GapStatus.OPEN, 0, f"still open, retried later: {failure}")
                else:
                    outcome = Outcome(GapStatus.UNFILLABLE, 0, failure or "OKX returned no book")
                out[member.item] = GapResult(outcome, attempts, failed and state.snapshot is None)
                continue
            covered = state.covers(member)
            shortfall = failure or self._shortfall(state)
            outcome = judge(covered=covered, found=found, published=published, shortfall=shortfall,
                            transient=transient)
            out[member.item] = GapResult(outcome, attempts, failed and not covered)
        return out

    def _shortfall(self, state: _JobState) -> str:
        if state.capped:
            return f"stopped after {self.settings.max_records_per_gap} rows (backfill.max_records_per_gap)"
        for walk in state.walks:
            if isinstance(walk, TradeWalk) and walk.exhausted:
                if walk.min_id is None:
                    return "OKX's history-trades has no trades this old (older than it keeps)"
                return (f"OKX's history-trades ends at tradeId {walk.min_id} ({_iso(walk.min_ts)}); older trades are "
                        "no longer kept")
            if isinstance(walk, CandleWalk) and walk.exhausted:
                return f"OKX's {walk.path} has no bars before {_iso(walk.min_ts)}"
            if isinstance(walk, FundingWalk) and walk.exhausted:
                return (f"OKX's funding-rate-history has no settlements before {_iso(walk.min_ts)} (older than it "
                        "keeps, or before the instrument's first)")
            if walk.stalled:
                return f"OKX's paging of {walk.path} did not move past its cursor"
            if isinstance(walk, CursorWalk) and walk.complete and walk.floor_ts is not None:
                return f"older than OKX keeps: {walk.path} serves rows from {_iso(walk.floor_ts)} on"
        return "the walk ended early"

    # ---- walks

    def _walks(self, job: Job) -> list[TradeWalk | CandleWalk | CursorWalk | FundingWalk]:
        stream, span = job.stream, job.span
        now = self.rest.clock.now_ms()
        if stream.kind is DataKind.TRADES:
            assert stream.inst_id is not None
            return [TradeWalk(stream.inst_id, span)]
        if stream.kind is DataKind.CANDLES:
            bar = candle_bar(stream.channel)
            assert stream.inst_id is not None and bar is not None
            return [CandleWalk(stream.inst_id, bar, span, candle_path(bar, span.lo_ts, now))]
        if stream.kind is DataKind.FUNDING:
            assert stream.inst_id is not None
            return [FundingWalk(stream.inst_id, span)]
        if stream.kind is DataKind.FILLS:
            floor = now - HISTORY_KEEP_MS[FILLS_PATH]
            return [CursorWalk(FILLS_PATH, self._private_params(stream, it, span.lo_ts, span.hi_ts), floor)
                    for it in inst_types_for(stream.inst_type, stream.inst_id)]
        if stream.kind is DataKind.ORDERS:
            begin = span.lo_ts - int(self.settings.order_lookback_s * 1000)
            path = orders_path(begin, now)
            floor = now - HISTORY_KEEP_MS[path]
            return [CursorWalk(path, self._private_params(stream, it, begin, span.hi_ts), floor)
                    for it in inst_types_for(stream.inst_type, stream.inst_id)]
        return []

    @staticmethod
    def _private_params(stream: Stream, inst_type: str, begin: int, end: int) -> dict[str, str]:
        params = {"instType": inst_type}
        if stream.inst_id:
            params["instId"] = stream.inst_id
        params.update(begin=str(max(0, begin)), end=str(end))
        return params

    async def _drive(self, state: _JobState, present: Present) -> None:
        kind = state.job.stream.kind
        if kind is DataKind.BOOKS:
            await self._book(state)
            return
        while state.index < len(state.walks):
            walk = state.walks[state.index]
            while (query := walk.query()) is not None:
                if isinstance(walk, TradeWalk):
                    await self._trade_page(state, walk, query, present)
                elif isinstance(walk, CandleWalk):
                    await self._candle_page(state, walk, query, present)
                elif isinstance(walk, FundingWalk):
                    await self._funding_page(state, walk, query, present)
                else:
                    await self._private_page(state, walk, query, present)
                if state.rows >= self.settings.max_records_per_gap and not walk.done:
                    state.capped = True
                    walk.stop()
            state.index += 1

    async def _trade_page(self, state: _JobState, walk: TradeWalk, query: dict[str, str], present: Present) -> None:
        rows = await self.rest.get(walk.path, query)
        recv_ns = time.time_ns()
        state.requests += 1
        good: list[tuple[Mapping[str, object], int, int]] = []
        for item in rows:
            tid, ts = _as_int(item.get("tradeId")), _as_int(item.get("ts"))
            if tid is None or ts is None:
                await self._reject(trade_from_rest(item, recv_ts_ns=recv_ns, channel=state.job.stream.channel))
                continue
            good.append((item, tid, ts))
        walk.feed([(tid, ts) for _, tid, ts in good])
        state.rows += len(good)
        for row, tid, ts in sorted(good, key=lambda g: g[1]):
            members = [m for m in state.job.members if m.contains(ts, tid)]
            if members:
                await self._offer(state, members, trade_from_rest(row, recv_ts_ns=recv_ns,
                                                                  channel=state.job.stream.channel), present)
        self._report(state, walk.min_ts)

    async def _candle_page(self, state: _JobState, walk: CandleWalk, query: dict[str, str],
                           present: Present) -> None:
        stream = state.job.stream
        assert stream.inst_id is not None
        rows = await self.rest.get_arrays(walk.path, query)
        recv_ns = time.time_ns()
        state.requests += 1
        good: list[tuple[list[object], int]] = []
        for array in rows:
            ts = _as_int(array[0]) if array else None
            if ts is None:
                await self._reject(candle_from_rest(array, inst_id=stream.inst_id, channel=stream.channel,
                                                    recv_ts_ns=recv_ns))
                continue
            good.append((array, ts))
        walk.feed([ts for _, ts in good])
        state.rows += len(good)
        for row, ts in sorted(good, key=lambda g: g[1]):
            members = [m for m in state.job.members if m.contains(ts)]
            if not members:
                continue
            record = candle_from_rest(row, inst_id=stream.inst_id, channel=stream.channel, recv_ts_ns=recv_ns)
            if isinstance(record, DeadLetter) or record.confirm:
                await self._offer(state, members, record, present)
        self._report(state, walk.min_ts)

    async def _funding_page(self, state: _JobState, walk: FundingWalk, query: dict[str, str],
                            present: Present) -> None:
        rows = await self.rest.get(walk.path, query)
        recv_ns = time.time_ns()
        state.requests += 1
        good: list[tuple[Mapping[str, object], int]] = []
        for row in rows:
            ts = _as_int(row.get("fundingTime"))
            if ts is None:
                await self._reject(funding_rate_from_rest(row, recv_ts_ns=recv_ns))
                continue
            good.append((row, ts))
        walk.feed([ts for _, ts in good])
        state.rows += len(good)
        for settled, ts in sorted(good, key=lambda g: g[1]):
            members = [m for m in state.job.members if m.contains(ts)]
            if members:
                await self._offer(state, members, funding_rate_from_rest(settled, recv_ts_ns=recv_ns), present)
        self._report(state, walk.min_ts)

    async def _private_page(self, state: _JobState, walk: CursorWalk, query: dict[str, str],
                            present: Present) -> None:
        fills = walk.path == FILLS_PATH
        rows = await self.rest.get(walk.path, query)
        recv_ns = time.time_ns()
        state.requests += 1
        ids: list[int] = []
        reached: int | None = None
        for row in rows:
            rid = _as_int(row.get("billId" if fills else "ordId"))
            ts = _as_int(row.get("ts" if fills else "uTime"))
            record = fill_from_rest(row, recv_ts_ns=recv_ns) if fills else order_from_rest(row, recv_ts_ns=recv_ns)
            if rid is None or ts is None:
                await self._reject(record)
                continue
            ids.append(rid)
            state.rows += 1
            reached = ts if reached is None else min(reached, ts)
            members = [m for m in state.job.members if m.contains(ts)]
            if members:
                await self._offer(state, members, record, present)
        walk.feed(ids)
        self._report(state, reached)

    async def _book(self, state: _JobState) -> None:
        stream = state.job.stream
        assert stream.inst_id is not None
        rows = await self.rest.get(BOOKS_PATH, {"instId": stream.inst_id, "sz": str(BOOK_DEPTH[stream.channel])})
        recv_ns = time.time_ns()
        state.requests += 1
        if not rows:
            return
        record = book_from_rest(rows[0], inst_id=stream.inst_id, recv_ts_ns=recv_ns, channel=stream.channel)
        if isinstance(record, DeadLetter):
            await self._publish_dead(record)
            return
        await self._put(record)
        state.snapshot = f"seqId {record.seq_id}, ts {_iso(record.ts)}"
        for m in state.job.members:
            state.found[m.item] += 1
            state.published[m.item] += 1

    # ---- publishing

    async def _offer(self, state: _JobState, members: list[Window], record: OkxRecord | DeadLetter,
                     present: Present) -> None:
        """A row inside `members`: publish it unless the topic (or this run) already has it."""
        if isinstance(record, DeadLetter):
            await self._publish_dead(record)
            return
        for m in members:
            state.found[m.item] += 1
        keys = natural_keys(record)
        if keys and not present.first_time(keys):
            self.counters.records_already_present += 1
            return
        await self._put(record)
        for m in members:
            state.published[m.item] += 1

    async def _put(self, record: Record) -> None:
        encoded = self.encoder.encode(record)
        await self.outlet.put(encoded)
        self.counters.records[record.TOPIC.value] += 1

    async def _reject(self, record: OkxRecord | DeadLetter) -> None:
        """A row without a usable id or time: it cannot be placed in a gap; a dead letter if it is malformed."""
        if isinstance(record, DeadLetter):
            await self._publish_dead(record)
        else:
            log.warning("backfill_row_unplaced", extra={"channel": record.channel, "record_id": record.record_id})

    async def _publish_dead(self, record: DeadLetter) -> None:
        self.counters.dead_letters += 1
        log.warning("backfill_dead_letter", extra={"channel": record.channel, "reason": record.reason})
        await self.outlet.put(self.encoder.encode(record))

    def _report(self, state: _JobState, reached_ts: int | None) -> None:
        if self.on_page is not None:
            self.on_page(PageEvent(state.job.stream, state.job.span, reached_ts,
                                   sum(state.published.values()), state.requests))


def _as_int(value: object) -> int | None:
    if isinstance(value, str):
        try:
            return int(value)
        except ValueError:
            return None
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    return None


def _iso(ms: int | None) -> str:
    if ms is None:
        return "?"
    return datetime.fromtimestamp(ms / 1000, tz=UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _first_error(exc: BaseException) -> BaseException:
    """The first leaf of an exception group (TaskGroup), so callers see one error with its own type."""
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    return exc


# ---------------------------------------------------------------------------------------------- fencing


class FencedError(IngestError):
    """This worker may no longer own the partitions of its batch: it publishes and commits nothing more for
    it (the batch is abandoned; their owner, maybe this worker again after it rejoins, redoes it)."""

    retriable = True


class _Lease:
    """Proof that this worker still owns a batch's partitions, checked before anything of the batch is put.

    Local checks every time (the partitions are still assigned, the group generation is the one the batch
    started in, no rejoin pending); and at least every session_timeout / 2 the group coordinator itself
    confirms it: the batch's start offsets are committed again (a no-op for the group), which the broker
    refuses for a member it expelled (a worker paused or cut off longer than the session timeout) or from
    an old generation. Without transactions this narrows, not closes, the window: records handed to the
    delivery before the worker was cut off may still be sent after it.
    """

    def __init__(self, consumer: AIOKafkaConsumer, starts: Mapping[TopicPartition, int], session_s: float,
                 timeout_s: float, counters: _Counters) -> None:
        self._consumer = consumer
        self._timeout_s = timeout_s
        self._starts = {tp: OffsetAndMetadata(off, "") for tp, off in starts.items()}
        self._generation = self._state()
        self._valid_s = session_s / 2
        self._confirmed_at: float | None = None
        self._counters = counters
        self.lost: str | None = None

    def _state(self) -> tuple[object, object] | None:
        state = membership(self._consumer)
        return None if state is None else state[:2]

    def _local(self) -> str | None:
        missing = set(self._starts) - self._consumer.assignment()
        if missing:
            return f"partitions {sorted(tp.partition for tp in missing)} are no longer assigned to this worker"
        state = membership(self._consumer)
        if state is not None and state[:2] != self._generation:
            return "the consumer group moved to a new generation"
        if state is not None and state[2]:
            return "the consumer group is rebalancing"
        return None

    async def check(self) -> None:
        """Return while the batch's partitions are provably this worker's; else raise FencedError."""
        known = self.lost is not None
        if self.lost is None:
            self.lost = self._local()
        if self.lost is None and (self._confirmed_at is None
                                  or time.monotonic() - self._confirmed_at > self._valid_s):
            sent = time.monotonic()
            try:
                async with asyncio.timeout(self._timeout_s):
                    await self._consumer.commit(dict(self._starts))
            except asyncio.CancelledError:  # the refusal made the consumer rejoin, which revoked the batch
                self.lost = "the partitions were revoked while the group coordinator was being asked"
                self._counters.fenced += 1  # once per batch: the batch is gone
                raise
            except Exception as exc:  # refused (expelled, old generation, rebalancing) or no answer
                self.lost = f"the group coordinator did not confirm the partitions: {type(exc).__name__}: {exc}"
            else:
                self._confirmed_at = sent
                self.lost = self._local()
        if self.lost is not None:
            if not known:  # counted once per batch, however many of its fills run into it
                self._counters.fenced += 1
            raise FencedError(f"stopped publishing for this batch: {self.lost}")


class _FencedOutlet:
    """The filler's outlet in the worker: the current batch's lease is checked before every record."""

    def __init__(self, worker: BackfillWorker) -> None:
        self._worker = worker

    async def put(self, record: EncodedRecord) -> None:
        lease = self._worker._lease
        if lease is not None:
            await lease.check()
        await self._worker.delivery.put(record)


# ---------------------------------------------------------------------------------------------- worker


class _Rebalance(ConsumerRebalanceListener):  # type: ignore[misc]
    """Abandon the running batch before partitions move, so no two workers fill one gap at once."""

    def __init__(self, worker: BackfillWorker) -> None:
        self._worker = worker

    async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        await self._worker._on_revoked(revoked)

    async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        self._worker._on_assigned(assigned)


class BackfillWorker:
    """One member of the backfill consumer group (see module docstring): `run(stop)` until `stop` is set.

    Owns its delivery (journal under `backfill.journal_dir`, default `<journal.dir>/backfill-<shard>`), its
    gap consumer and its read-back consumer; the REST client is shared and owned by the caller.
    """

    def __init__(self, settings: Settings, rest: OkxRestClient, *, bootstrap_servers: str | None = None,
                 encoder: RecordEncoder | None = None, name: str | None = None) -> None:
        self.settings = settings
        self.rest = rest
        bf = settings.backfill
        kafka = settings.kafka
        self.name = name or f"backfill-{settings.shard}"
        self.bootstrap = bootstrap_servers or bootstrap_of(kafka)
        self.encoder = encoder or RecordEncoder(kafka.topic_prefix)
        self.gaps_topic = topic_name(kafka.topic_prefix, TopicKind.GAPS)
        self.journal_dir = bf.journal_dir or settings.journal.dir / f"backfill-{settings.shard}"
        topics = [topic_name(kafka.topic_prefix, k) for k in TopicKind]
        sink = KafkaSink(kafka, bootstrap_servers=self.bootstrap, topics=topics)
        self.delivery = Delivery.from_settings(sink, settings.journal.model_copy(update={"dir": self.journal_dir}),
                                               kafka)
        self._counters = _Counters()
        self.readback = (TopicReadback(kafka, self.bootstrap, timeout_s=bf.readback_timeout_s,
                                       counters=self._counters) if bf.readback else None)
        self.filler = GapFiller(rest, _FencedOutlet(self), self.encoder, self.readback, bf, self._counters)
        self._lease: _Lease | None = None
        self._consumer: AIOKafkaConsumer | None = None
        self._batch: asyncio.Task[None] | None = None
        self._seen: BoundedSeen[tuple[object, ...]] = BoundedSeen(200_000, 7 * DAY_MS)
        self._changed = asyncio.Event()

    # ---- public

    def stats(self) -> BackfillStats:
        c = self._counters
        rest = self.rest.stats()
        return BackfillStats(
            gaps_received=c.gaps_received, gaps_pending=c.gaps_pending,
            gaps_filled=c.gaps_by_status[GapStatus.FILLED.value],
            gaps_partial=c.gaps_by_status[GapStatus.PARTIAL.value],
            gaps_unfillable=c.gaps_by_status[GapStatus.UNFILLABLE.value], gaps_failed=c.gaps_failed,
            gaps_deferred=c.gaps_deferred, fenced=c.fenced,
            gaps_ignored=c.gaps_ignored, gaps_duplicate=c.gaps_duplicate, gaps_undecodable=c.gaps_undecodable,
            records_backfilled=dict(c.records), records_already_present=c.records_already_present,
            dead_letters=c.dead_letters, readback_records=c.readback_records, batches=c.batches,
            batches_abandoned=c.batches_abandoned, commits=c.commits, partitions=c.partitions,
            requests=dict(rest.requests), limiter_wait_s=dict(rest.limiter_wait_s),
            breakers_open=tuple(sorted(p for p, st in rest.breakers.items() if st.value != "closed")),
            backlog=c.backlog, oldest_pending_detected_ns=c.oldest_pending_detected_ns,
        )

    async def wait_for(self, predicate: Callable[[BackfillStats], bool], timeout_s: float | None = None) -> None:
        """Return once `predicate(stats())` holds, re-checked at every state change (never by polling)."""
        async with asyncio.timeout(timeout_s):
            while not predicate(self.stats()):
                await self._changed.wait()

    async def run(self, stop: asyncio.Event | None = None) -> None:
        """Join the group and fill gaps until `stop` is set; raises on what the worker cannot go on with."""
        stop = stop or asyncio.Event()
        bf = self.settings.backfill
        dropped = await asyncio.to_thread(discard_backlog, self.journal_dir, self.settings.journal)
        if dropped:
            log.warning("backfill_journal_discarded", extra={
                "records": dropped, "dir": str(self.journal_dir),
                "why": "they belong to batches that were never committed; their partitions' owners redo them"})
        await self.delivery.start()
        try:
            consumer = AIOKafkaConsumer(
                **consumer_options(self.settings.kafka, self.bootstrap), group_id=bf.group_id,
                enable_auto_commit=False, auto_offset_reset="earliest", session_timeout_ms=bf.session_timeout_ms,
                heartbeat_interval_ms=bf.heartbeat_interval_ms, max_poll_interval_ms=bf.max_poll_interval_ms,
                rebalance_timeout_ms=bf.max_poll_interval_ms)
            await consumer.start()
            self._consumer = consumer
            consumer.subscribe([self.gaps_topic], listener=_Rebalance(self))
            log.info("backfill_started", extra={"worker": self.name, "group": bf.group_id, "topic": self.gaps_topic,
                                                "kafka": self.bootstrap, "journal": str(self.journal_dir)})
            delays = full_jitter(0.5, 30.0)
            while not stop.is_set():
                batch = await consumer.getmany(timeout_ms=bf.poll_timeout_ms, max_records=bf.batch_max_gaps)
                await self._measure_backlog(consumer, batch)
                if not batch:
                    continue
                try:
                    await self._run_batch(consumer, batch, stop)
                    delays = full_jitter(0.5, 30.0)
                except IngestError as exc:
                    if not exc.retriable:
                        raise
                    wait = next(delays)
                    log.warning("backfill_batch_retry", extra={"error": str(exc), "retry_in_s": round(wait, 3)})
                    self._rewind(consumer, batch)
                    await asyncio.sleep(wait)  # backoff while Kafka or OKX recovers, not synchronisation
        finally:
            await self._close()

    # ---- batches

    async def _run_batch(self, consumer: AIOKafkaConsumer, batch: Mapping[TopicPartition, list[_Message]],
                         stop: asyncio.Event) -> None:
        """Process one polled batch while keeping the group membership alive; commit when fully acknowledged."""
        records = [m for tp in sorted(batch, key=lambda t: (t.topic, t.partition)) for m in batch[tp]]
        offsets = {tp: msgs[-1].offset + 1 for tp, msgs in batch.items() if msgs}
        self._lease = _Lease(consumer, {tp: msgs[0].offset for tp, msgs in batch.items() if msgs},
                             self.settings.backfill.session_timeout_ms / 1000,
                             self.settings.kafka.request_timeout_ms / 1000, self._counters)
        consumer.pause(*consumer.assignment())
        task = asyncio.create_task(self._process(consumer, records, offsets), name="backfill-batch")
        self._batch = task
        stopper = asyncio.create_task(stop.wait(), name="backfill-stop")
        keepalive_s = min(5.0, self.settings.backfill.max_poll_interval_ms / 4000)
        try:
            while not task.done():
                await asyncio.wait({task, stopper}, timeout=keepalive_s, return_when=asyncio.FIRST_COMPLETED)
                if task.done():
                    break
                if stopper.done():
                    await self._settle(task)
                    break
                # Poll (paused: fetches nothing) so a long batch never counts as a dead consumer.
                extra = await consumer.getmany(timeout_ms=0)
                for tp, msgs in extra.items():  # newly assigned after a rebalance: fetch them again later
                    if msgs:
                        consumer.seek(tp, msgs[0].offset)
        finally:
            stopper.cancel()
            if not task.done():  # cancelled from outside (or the poll failed): the batch must not outlive us
                await self._settle(task)
            self._batch = None
            lease, self._lease = self._lease, None
            with contextlib.suppress(Exception):
                consumer.resume(*consumer.paused())
        if lease is not None and lease.lost is not None:
            log.warning("backfill_fenced", extra={"worker": self.name, "gaps": len(records), "why": lease.lost,
                                                  "consequence": "nothing more published or committed for it"})
            self._counters.gaps_pending = 0
            self._counters.oldest_pending_detected_ns = None
            self._notify()
        if task.cancelled():
            self._counters.batches_abandoned += 1
            log.info("backfill_batch_abandoned", extra={"gaps": len(records),
                                                        "why": "stopping or partitions revoked; not committed"})
            return
        exc = task.exception()
        if exc is not None:
            raise _first_error(exc)

    async def _process(self, consumer: AIOKafkaConsumer, records: list[_Message],
                       offsets: Mapping[TopicPartition, int]) -> None:
        items = self._open_gaps(records)
        now_ms = self.rest.clock.now_ms()
        plan = plan_jobs(items, now_ms)
        results: dict[int, GapResult] = {i: GapResult(o, 0) for i, o in plan.decided.items()}
        by_stream: dict[Stream, list[Job]] = defaultdict(list)
        for job in plan.jobs:
            by_stream[job.stream].append(job)
        slots = asyncio.Semaphore(self.settings.backfill.concurrency)
        gaps = dict(items)

        async def fill(stream: Stream, jobs: list[Job]) -> None:
            tried = max(gaps[m.item].attempts for job in jobs for m in job.members)
            async with slots:
                results.update(await self.filler.fill(stream, jobs, tried=tried))

        try:
            async with asyncio.TaskGroup() as tg:
                for stream, jobs in by_stream.items():
                    tg.create_task(fill(stream, jobs), name=f"backfill-{stream}")
        except BaseExceptionGroup as group:
            raise _first_error(group) from None
        await self.delivery.flush()  # the data is acknowledged before any gap is marked done
        now_ns = time.time_ns()
        updates: list[tuple[GapEvent, GapEvent, GapResult]] = []
        lease = self._lease
        for item, gap in items:
            result = results[item]
            update = status_update(gap, result.outcome, attempts=result.attempts, now_ns=now_ns)
            if lease is not None:
                await lease.check()
            await self.delivery.put(self.encoder.encode(update))
            updates.append((gap, update, result))
        await self.delivery.flush()
        if lease is not None:
            await lease.check()
        await self._commit(consumer, offsets)
        c = self._counters
        c.batches += 1
        for gap, update, result in updates:
            self._seen.first_time(emission_key(gap), now_ms)
            if result.deferred:
                # Only transient failures: nothing about the gap is decided. Its new open revision is on
                # okx.gaps, so this group takes it up again (with longer waits: `attempts` keeps counting).
                c.gaps_deferred += 1
                log.warning("backfill_gap_deferred", extra={
                    "gap_id": gap.gap_id, "channel": gap.channel, "inst_id": gap.inst_id,
                    "attempts": update.attempts, "revision": update.revision, "records": update.records_filled,
                    "note": update.note})
                continue
            c.gaps_by_status[update.status.value] += 1
            c.gaps_failed += result.failed
            log.info("backfill_gap_done", extra={
                "gap_id": gap.gap_id, "channel": gap.channel, "inst_id": gap.inst_id, "kind": gap.kind.value,
                "status": update.status.value, "records": update.records_filled, "attempts": update.attempts,
                "revision": update.revision, "note": update.note})
        self._notify()

    def _open_gaps(self, records: Sequence[_Message]) -> list[tuple[int, GapEvent]]:
        """The open gap events of a batch, each emission once; everything else is counted and skipped."""
        c = self._counters
        items: list[tuple[int, GapEvent]] = []
        keys: set[tuple[object, ...]] = set()
        for i, m in enumerate(records):
            gap = self._decode(m)
            if gap is None:
                c.gaps_undecodable += 1
                continue
            if gap.status is not GapStatus.OPEN:
                c.gaps_ignored += 1
                continue
            key = emission_key(gap)
            if key in self._seen or key in keys:
                c.gaps_duplicate += 1
                continue
            keys.add(key)
            items.append((i, gap))
        c.gaps_received += len(items)
        c.gaps_pending = len(items)
        c.oldest_pending_detected_ns = min((g.detected_ts_ns for _, g in items), default=None)
        self._notify()
        return items

    @staticmethod
    def _decode(m: _Message) -> GapEvent | None:
        if m.value is None:
            return None
        schema = dict(m.headers).get("schema")
        try:
            record = decode(m.value, schema_name=schema.decode() if schema else None)
        except DecodeError as exc:
            log.warning("backfill_gap_undecodable", extra={"partition": m.partition, "offset": m.offset,
                                                           "error": str(exc)})
            return None
        if not isinstance(record, GapEvent):
            log.warning("backfill_not_a_gap", extra={"partition": m.partition, "offset": m.offset,
                                                     "schema": type(record).__name__})
            return None
        return record

    async def _measure_backlog(self, consumer: AIOKafkaConsumer,
                               batch: Mapping[TopicPartition, list[_Message]]) -> None:
        """Gap records on our partitions not yet committed: the high watermark of each (from the last fetch)
        minus the fetch position, plus the batch just taken. Never fails the worker: a metric only."""
        try:
            async with asyncio.timeout(1.0):
                behind = 0
                for tp in consumer.assignment():
                    high = consumer.highwater(tp)
                    if high is None:
                        return  # not fetched yet: unknown, not zero
                    behind += max(0, high - await consumer.position(tp))
        except Exception as exc:  # the next poll measures again
            log.debug("backfill_backlog_unmeasured", extra={"error": describe(exc)})
            return
        self._counters.backlog = behind + sum(len(msgs) for msgs in batch.values())

    async def _commit(self, consumer: AIOKafkaConsumer, offsets: Mapping[TopicPartition, int]) -> None:
        try:
            await consumer.commit(dict(offsets))
        except KafkaError as exc:
            # Partitions moved during the batch: their new owner redoes it (read-back keeps the data single).
            log.warning("backfill_commit_failed", extra={"error": str(exc), "offsets": {
                f"{tp.topic}/{tp.partition}": off for tp, off in offsets.items()}})
            return
        self._counters.commits += 1

    @staticmethod
    def _rewind(consumer: AIOKafkaConsumer, batch: Mapping[TopicPartition, list[_Message]]
                ) -> None:
        assigned = consumer.assignment()
        for tp, msgs in batch.items():
            if msgs and tp in assigned:
                consumer.seek(tp, msgs[0].offset)

    # ---- group membership

    async def _settle(self, task: asyncio.Task[None]) -> bool:
        """Cancel the batch and wait for it to end, at most `backfill.stop_timeout_s`; False if it did not.

        An abandoned batch commits nothing: its commit is its last step, after everything it put was
        acknowledged, and a cancelled batch never gets there.
        """
        return await stop_task(task, self.settings.backfill.stop_timeout_s, what=f"{self.name} batch")

    async def _on_revoked(self, revoked: set[TopicPartition]) -> None:
        task = self._batch
        if task is not None and not task.done():
            await self._settle(task)
        try:
            # What the abandoned batch already put must reach the broker before another worker reads back.
            await self.delivery.flush(timeout_s=self.settings.journal.close_timeout_s)
        except (TimeoutError, DeliveryError) as exc:
            log.warning("backfill_flush_before_rebalance_failed", extra={"error": str(exc) or type(exc).__name__})
        self._counters.partitions = 0
        if revoked:
            log.info("backfill_partitions_revoked", extra={"worker": self.name, "partitions": len(revoked)})
        self._notify()

    def _on_assigned(self, assigned: set[TopicPartition]) -> None:
        self._counters.partitions = len(assigned)
        log.info("backfill_partitions_assigned", extra={"worker": self.name,
                                                        "partitions": sorted(tp.partition for tp in assigned)})
        self._notify()

    async def _close(self) -> None:
        """Every step bounded (`backfill.stop_timeout_s`; the delivery `journal.close_timeout_s` on top): a stop
        during a Kafka outage returns, leaving what was not acknowledged journaled (discarded at the next
        start: its batch was not committed and is redone)."""
        bf = self.settings.backfill
        task = self._batch
        if task is not None and not task.done():
            await self._settle(task)
        consumer, self._consumer = self._consumer, None
        if consumer is not None:  # leave-group is a courtesy: if it does not finish, the session expires
            await bounded(consumer.stop(), bf.stop_timeout_s, what=f"{self.name} gap consumer stop")
        close_s = self.settings.journal.close_timeout_s
        await bounded(self.delivery.close(timeout_s=close_s), close_s + bf.stop_timeout_s,
                      what=f"{self.name} delivery close")
        log.info("backfill_stopped", extra={"worker": self.name, **_summary(self.stats())})
        self._notify()

    def _notify(self) -> None:
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()


def _summary(stats: BackfillStats) -> dict[str, object]:
    return {"gaps_filled": stats.gaps_filled, "gaps_partial": stats.gaps_partial,
            "gaps_unfillable": stats.gaps_unfillable, "gaps_failed": stats.gaps_failed,
            "gaps_deferred": stats.gaps_deferred,
            "records": stats.records_total, "commits": stats.commits}


# ------------------------------------------------------------------------------------------ entry points


async def _encoder(settings: Settings) -> RecordEncoder:
    """The same wire format as the recorder: single-object, or Confluent ids from the schema registry."""
    prefix = settings.kafka.topic_prefix
    encoder = RecordEncoder(prefix)
    if not settings.kafka.schema_registry_url:
        return encoder
    import orjson

    from ingest.core.records import RECORD_TYPES
    from ingest.io.registry import SchemaRegistry

    async with SchemaRegistry.from_settings(settings.kafka) as registry:
        ids = {cls.AVRO_NAME: await registry.schema_id(topic_name(prefix, cls.TOPIC),
                                                       orjson.dumps(encoder.schemas[cls.AVRO_NAME].source).decode())
               for cls in RECORD_TYPES}
    return RecordEncoder(prefix, schema_ids=ids)


async def _rest_client(settings: Settings, *, private: bool) -> tuple[OkxRestClient, ClockService]:
    """The process's REST client (credentials when present or needed) with a measured server-time offset."""
    store = CredentialStore.from_settings(settings.okx) if private or credentials_present() else None
    if store is not None:
        from ingest.obs.redact import REDACTOR

        REDACTOR.set_secrets(store.current().values())
    clock = ServerClock(lambda: time.time_ns() // 1_000_000)
    rest = OkxRestClient.from_settings(settings, clock, store)
    service = ClockService.from_settings(rest, clock, settings.obs)
    rest.on_clock_expired = service.resync
    try:
        await service.measure()
    except IngestError as exc:
        log.warning("clock_unmeasured", extra={"error": str(exc), "note": "signing with the local clock"})
    return rest, service


async def run_worker(settings: Settings) -> int:
    """`okx-ingest backfill`: one worker of the group until SIGTERM/SIGINT; 0 on a clean stop, 1 on failure.

    Also serves /metrics, /healthz and /readyz (obs.metrics_host/port, as the deploy files probe), keeps the
    server-time offset measured, and follows credential rotation (secret files polled, SIGHUP re-reads).
    """
    from ingest.obs.health import HealthServer, Readiness
    from ingest.obs.metrics import new_component_registry
    from ingest.services.permissions import require_safe_key
    from ingest.services.process import (
        configure_observability,
        credential_metrics,
        exit_code_for,
        install_signals,
        keep_credentials,
        key_verifier,
    )

    configure_observability(settings)
    stop, reload = asyncio.Event(), asyncio.Event()
    remove_signals = install_signals(stop, reload)
    rest, clock_service = await _rest_client(settings, private=False)
    health: HealthServer | None = None
    try:
        if rest.credentials is not None:  # refuse an over-privileged key before any signed request
            await require_safe_key(rest, settings.okx)
        worker = BackfillWorker(settings, rest, encoder=await _encoder(settings))
        registry, collector = new_component_registry("backfill")

        def metrics() -> list[Any]:
            return backfill_metrics(worker.stats()) + credential_metrics(rest.credentials)

        def readiness() -> Readiness:
            d = worker.delivery.stats
            reasons = [r for r, bad in ((f"delivery failed: {d.last_error}", d.failed),
                                        ("Kafka unreachable", not d.broker_up)) if bad]
            return Readiness(not reasons, tuple(reasons), {"partitions": worker.stats().partitions})

        collector.add(metrics)
        health = HealthServer(registry, readiness, settings.obs.metrics_host, settings.backfill.metrics_port,
                              port_key="backfill.metrics_port")
        await health.start()
        runtime = Runtime("backfill", stop_timeout_s=settings.backfill.stop_timeout_s)
        async with runtime:
            runtime.spawn("clock", clock_service.run())
            if rest.credentials is not None:
                verify = key_verifier(settings, rest.clock)  # a rotated key is checked before any use
                runtime.spawn("credentials", keep_credentials(rest.credentials, settings.okx.credential_poll_s,
                                                              reload, verify=verify))
            worker_stop = asyncio.Event()
            worker_task = runtime.spawn("worker", worker.run(worker_stop), essential=True)
            # A helper that dies (a rotated key that may withdraw) stops the worker too: fail closed.
            ended = await runtime.wait(stop)
            worker_stop.set()
            if runtime.pop("worker") is not None:
                # Its own stop is bounded step by step (batch, consumer, delivery); this bounds the whole.
                await finish_task(worker_task, settings.backfill.stop_timeout_s * 2
                                  + settings.journal.close_timeout_s, what="backfill worker")
        if ended.error is not None:
            log.error("backfill_stopped", extra={"task": ended.task, "error": repr(ended.error)})
            return exit_code_for(ended.error)
        return ended.exit_code
    except IngestError as exc:
        log.error("backfill_failed", extra={"error": str(exc)})
        return exit_code_for(exc)
    finally:
        if health is not None:
            await health.stop()
        await rest.aclose()
        remove_signals()


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


# ---------------------------------------------------------------------------------------- range backfill


class _Progress(Protocol):
    def update(self, event: PageEvent) -> None: ...

    def close(self, records: int, requests: int) -> None: ...


class _LineProgress:
    """Plain progress lines (no terminal): one every `interval_s`, plus the first and a final one."""

    def __init__(self, label: str, since_ms: int, until_ms: int, out: TextIO, interval_s: float) -> None:
        self._label, self._since, self._until, self._out = label, since_ms, until_ms, out
        self._interval = interval_s
        self._last: float | None = None

    def update(self, event: PageEvent) -> None:
        now = time.monotonic()
        if self._last is not None and now - self._last < self._interval:
            return
        self._last = now
        total = max(1, self._until - self._since)
        reached = event.reached_ts
        pct = 100 if reached is None or reached <= self._since else int(100 * (self._until - reached) / total)
        print(f"backfill {self._label}: {min(100, max(0, pct))}% (reached {_iso(reached)}), {event.records} records, "
              f"{event.requests} requests", file=self._out, flush=True)

    def close(self, records: int, requests: int) -> None:
        """Nothing: the summary line that follows says how the range ended (RangeResult.summary)."""


class _BarProgress:
    """A tqdm bar over the time range (the walk goes from `until` back to `since`)."""

    def __init__(self, label: str, since_ms: int, until_ms: int, out: TextIO) -> None:
        from tqdm import tqdm

        self._since, self._until = since_ms, until_ms
        self._bar = tqdm(total=max(1, until_ms - since_ms), desc=f"backfill {label}", unit="ms", unit_scale=True,
                         file=out, leave=True, bar_format="{l_bar}{bar}| {postfix}")
        self._done = 0

    def update(self, event: PageEvent) -> None:
        reached = self._since if event.reached_ts is None else max(self._since, event.reached_ts)
        covered = min(self._until, self._until - reached)
        if covered > self._done:
            self._bar.update(covered - self._done)
            self._done = covered
        self._bar.set_postfix_str(f"{event.records} records, {event.requests} requests")

    def close(self, records: int, requests: int) -> None:
        self._bar.set_postfix_str(f"{records} records, {requests} requests")
        self._bar.close()


@dataclass(frozen=True, slots=True)
class RangeResult:
    """How `backfill --channel` ended: the range's status, what it published, and why (for the summary line).

    Exit codes (`exit_code`): 0 filled; 3 partial (OKX returned part of the range, the rest is older than it
    keeps or its history ends); 4 unfillable (OKX keeps none of it); 1 not finished: Kafka was unreachable or
    did not acknowledge, or OKX kept failing transiently (run it again). 2 is a usage or settings error.
    """

    status: GapStatus | None
    records: int
    note: str
    requests: int = 0

    @property
    def exit_code(self) -> int:
        return {GapStatus.FILLED: 0, GapStatus.PARTIAL: 3, GapStatus.UNFILLABLE: 4}.get(self.status, 1) \
            if self.status is not None else 1

    @property
    def summary(self) -> str:
        what = self.status.value if self.status is not None and self.status is not GapStatus.OPEN else "not finished"
        return (f"{what}, {self.records} records published, {self.requests} requests"
                + (f": {self.note}" if self.note else ""))


async def _kafka_reachable(kafka: KafkaSettings, bootstrap: str) -> str | None:
    """None when a client can connect to Kafka within its request timeout, else why not (a bounded check,
    so an unreachable Kafka ends the command at once instead of after every retry of the read-back)."""
    from aiokafka.client import AIOKafkaClient

    client = AIOKafkaClient(**consumer_options(kafka, bootstrap))
    try:
        async with asyncio.timeout(kafka.request_timeout_ms / 1000):
            await client.bootstrap()
        return None
    except TimeoutError:
        return f"no answer within {kafka.request_timeout_ms} ms (kafka.request_timeout_ms)"
    except KafkaError as exc:
        return str(exc) or type(exc).__name__
    finally:
        with contextlib.suppress(Exception):
            async with asyncio.timeout(kafka.request_timeout_ms / 1000):
                await client.close()


async def backfill_range(settings: Settings, channel: str, inst_id: str, since_ms: int, until_ms: int, tty: bool,
                         *, out: TextIO | None = None, rest: OkxRestClient | None = None,
                         bootstrap_servers: str | None = None) -> RangeResult:
    """`okx-ingest backfill --channel C --inst I --since T --until T`: fetch [since, until) of one stream and
    publish what the topic lacks (same dedupe as the worker); returns the status and the records published.

    Books have no history: one current snapshot is published whatever the range. A progress bar on a
    terminal (`tty`), plain progress lines otherwise, on `out` (default stderr); the last line says how it
    ended, in the same words as the status (RangeResult.summary).
    """
    out = out if out is not None else sys.stderr
    kind = data_kind(channel)
    if kind is None:
        raise ConfigError("--channel", f"OKX's REST API keeps no history of channel {channel!r}",
                          "use trades, trades-all, candle<bar>, books*, funding-rate, fills or orders")
    if until_ms <= since_ms:
        raise ConfigError("--until", "the range is empty", "give an --until later than --since")
    owned: tuple[OkxRestClient, ClockService] | None = None
    if rest is None:
        owned = await _rest_client(settings, private=kind in (DataKind.FILLS, DataKind.ORDERS))
        rest = owned[0]
    stream = Stream(kind, channel, inst_id, None)
    window = Window(0, since_ms, until_ms - 1)
    label = f"{channel} {inst_id}"
    progress: _Progress = (_BarProgress(label, since_ms, until_ms, out) if tty else
                           _LineProgress(label, since_ms, until_ms, out, settings.backfill.progress_interval_s))
    counters = _Counters()
    bootstrap = bootstrap_servers or bootstrap_of(settings.kafka)
    requests = 0

    def on_page(event: PageEvent) -> None:
        nonlocal requests
        requests = event.requests
        progress.update(event)

    def done(result: RangeResult) -> RangeResult:
        result = dataclasses.replace(result, requests=requests)
        print(f"backfill {label}: {result.summary}", file=out, flush=True)
        return result

    try:
        verdict = precheck(stream, window, channel, rest.clock.now_ms())
        if verdict is not None:
            return done(RangeResult(verdict.status, 0, f"nothing fetched: {verdict.note}"))
        kafka = settings.kafka
        unreachable = await _kafka_reachable(kafka, bootstrap)
        if unreachable is not None:
            return done(RangeResult(None, 0, f"Kafka at {bootstrap} is unreachable: {unreachable}; nothing "
                                             "fetched (check kafka.bootstrap_servers)"))
        with tempfile.TemporaryDirectory(prefix="okx-ingest-backfill-") as journal_dir:
            sink = KafkaSink(kafka, bootstrap_servers=bootstrap, topics=[topic_name(kafka.topic_prefix, k)
                                                                         for k in (_TOPIC[kind], TopicKind.DLQ)])
            journal = settings.journal
            delivery = Delivery.from_settings(sink, journal.model_copy(update={"dir": Path(journal_dir)}), kafka)
            readback = (TopicReadback(kafka, bootstrap, timeout_s=settings.backfill.readback_timeout_s,
                                      counters=counters) if settings.backfill.readback else None)
            await delivery.start()
            undelivered: str | None = None
            try:
                filler = GapFiller(rest, delivery, await _encoder(settings), readback, settings.backfill, counters,
                                   on_page=on_page)
                job = Job(stream, window, (window,))
                results = await filler.fill(stream, [job])
                try:
                    await delivery.flush(timeout_s=journal.close_timeout_s)
                except (TimeoutError, DeliveryError) as exc:
                    undelivered = str(exc) or f"not acknowledged within {journal.close_timeout_s} s"
            finally:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(journal.close_timeout_s + 5.0):
                        await delivery.close(timeout_s=0.0 if undelivered else None)
        outcome = results[0].outcome
        records = sum(counters.records.values())
        progress.close(records, requests)
        if undelivered is not None:
            return done(RangeResult(None, records, f"Kafka did not acknowledge the records: {undelivered}; run "
                                                   "again (what reached the topic is not published twice)"))
        note = "" if outcome.status is GapStatus.FILLED else outcome.note
        return done(RangeResult(outcome.status, records, note))
    finally:
        if owned is not None:
            await owned[0].aclose()


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
