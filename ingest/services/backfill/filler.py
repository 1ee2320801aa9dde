"""The gap filler: one stream's jobs fetched over REST, with the per-gap retry rule, published where the
topic lacks them (shared by the worker and the range CLI; the rule is in the package docstring).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Protocol, TypeVar

from ingest.config import BackfillSettings
from ingest.core.avro import RecordEncoder
from ingest.core.backfill import (
    BOOK_DEPTH,
    BOOKS_PATH,
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
    inst_types_for,
    judge,
    natural_keys,
    orders_path,
    retry_delay,
)
from ingest.core.backoff import equal_jitter
from ingest.core.normalize import (
    book_from_rest,
    candle_from_rest,
    fill_from_rest,
    funding_rate_from_rest,
    order_from_rest,
    trade_from_rest,
)
from ingest.core.records import DeadLetter, GapStatus, OkxRecord, Record
from ingest.core.rest_limits import CircuitOpenError
from ingest.core.rest_policy import AUTH_FAILURE_CODES
from ingest.errors import CredentialError, DeliveryError, IngestError, OkxApiError, ProtocolError
from ingest.io.readback import ReadbackError, TopicReadback
from ingest.io.rest import OkxRestClient
from ingest.io.sink import EncodedRecord
from ingest.okx.channels import candle_bar
from ingest.services.backfill.stats import _Counters

#: A REST row as the walk reads it (an object, or a candle's array) and the record it becomes.
_Row = TypeVar("_Row")
_Rec = TypeVar("_Rec", bound=OkxRecord)

#: One logger for the whole package, the name it had as one module (it is in every JSON log line).
log = logging.getLogger("ingest.services.backfill")


class BackfillError(IngestError):
    """The worker cannot go on: a setup problem (credentials rejected, TLS pin) or a broken dependency."""


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
        """One job with the per-gap retry policy (package docstring). Raises only what stops the worker:
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
        channel = state.job.stream.channel

        def place(row: Mapping[str, object]) -> tuple[int, int | None] | None:
            tid, ts = _as_int(row.get("tradeId")), _as_int(row.get("ts"))
            return None if tid is None or ts is None else (ts, tid)

        await self._history_page(
            state, await self.rest.get(walk.path, query), place,
            lambda row, recv_ns: trade_from_rest(row, recv_ts_ns=recv_ns, channel=channel),
            lambda placed: walk.feed([(tid, ts) for ts, tid in placed if tid is not None]), present)
        self._report(state, walk.min_ts)

    async def _candle_page(self, state: _JobState, walk: CandleWalk, query: dict[str, str],
                           present: Present) -> None:
        stream = state.job.stream
        inst_id = stream.inst_id
        assert inst_id is not None

        def place(array: list[object]) -> tuple[int, int | None] | None:
            ts = _as_int(array[0]) if array else None
            return None if ts is None else (ts, None)

        await self._history_page(
            state, await self.rest.get_arrays(walk.path, query), place,
            lambda array, recv_ns: candle_from_rest(array, inst_id=inst_id, channel=stream.channel,
                                                    recv_ts_ns=recv_ns),
            lambda placed: walk.feed([ts for ts, _ in placed]), present,
            wanted=lambda record: isinstance(record, DeadLetter) or bool(record.confirm))  # only closed bars
        self._report(state, walk.min_ts)

    async def _funding_page(self, state: _JobState, walk: FundingWalk, query: dict[str, str],
                            present: Present) -> None:
        def place(row: Mapping[str, object]) -> tuple[int, int | None] | None:
            ts = _as_int(row.get("fundingTime"))
            return None if ts is None else (ts, None)

        await self._history_page(
            state, await self.rest.get(walk.path, query), place,
            lambda row, recv_ns: funding_rate_from_rest(row, recv_ts_ns=recv_ns),
            lambda placed: walk.feed([ts for ts, _ in placed]), present)
        self._report(state, walk.min_ts)

    async def _history_page(
        self, state: _JobState, rows: Sequence[_Row], place: Callable[[_Row], tuple[int, int | None] | None],
        build: Callable[[_Row, int], _Rec | DeadLetter], feed: Callable[[list[tuple[int, int | None]]], None],
        present: Present, *, wanted: Callable[[_Rec | DeadLetter], bool] = lambda _: True,
    ) -> None:
        """The page step the trade, candle and funding walks share: a row is placed by its (ts, tradeId or
        None) or rejected (never guessed into a gap); the walk is fed the placed rows; then, in the walk's
        order (tradeId for trades, time otherwise), each row inside a gap is built and offered."""
        recv_ns = time.time_ns()
        state.requests += 1
        good: list[tuple[_Row, tuple[int, int | None]]] = []
        for row in rows:
            at = place(row)
            if at is None:
                await self._reject(build(row, recv_ns))
                continue
            good.append((row, at))
        feed([at for _, at in good])
        state.rows += len(good)
        for row, (ts, tid) in sorted(good, key=lambda g: g[1][0] if g[1][1] is None else g[1][1]):
            members = [m for m in state.job.members if m.contains(ts, tid)]
            if not members:
                continue
            record = build(row, recv_ns)
            if wanted(record):
                await self._offer(state, members, record, present)

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
