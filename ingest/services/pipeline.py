"""The data pipeline: every inbound frame becomes records on Kafka, a dead letter, or a counted event.

One task owns all per-shard stream state (books, gap tracker, stream owners, order dedupe) and consumes
the single queue the WebSocket layer fills, so frames and connection events are seen in exactly the
order they happened; that order is what makes gap bounds and the 64008 cut-over dedupe right. The
pure core decides everything; this module only wires it and awaits the outlet (back-pressure).

Per frame: raw record (optional) -> normalize -> held check (a push for an arg no connection of this shard
acked is a dead letter, `unsubscribed`, and gets no state: the acks bound every per-stream map) -> for each
unit (one trade, one book message, or one push otherwise): stream ownership (drop duplicates of an overlap)
-> book check (drop deltas of a broken book, ask for a resubscribe; every `book_checkpoint_s` of receive
time a full-book checkpoint of a valid book) -> private dedupe (OKX's repeated order pushes) -> encode ->
outlet; gap events are published as soon as the tracker closes them. A dead-lettered frame of a stream
without ids opens a `dead_letter` gap. Nothing raises out of it: a failing item becomes an `internal_error`
dead letter, a record its schema cannot hold a dead letter too.

Private streams: when one of them loses its connection, or comes up for the first time, the pipeline asks
the private reconciler (`services/private.py`) for a REST read of the account, without waiting for it. The
answer comes back through the same queue as `RestRecords`, and the same private state decides what is news
(`core/ledger.py`: order states, fills by (instId, tradeId)); what the record already holds is dropped, the
rest is published with `source = rest`, and the hole's disconnect gap is published as filled.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import msgspec

from ingest.core.avro import RecordEncoder
from ingest.core.books import CHECKSUM_DEPTH, BookMessage, BookSet, VerdictKind, okx_checksum
from ingest.core.events import (
    Inbound,
    InboundFrame,
    LinkEvent,
    LinkEventKind,
    Reconciler,
    ReconcileRequest,
    RestRecords,
    Resubscriber,
)
from ingest.core.gaps import TRADE_CHANNELS, Gap, GapTracker, StreamCheckpoint
from ingest.core.gaps import GapKind as TrackerGapKind
from ingest.core.ledger import RECONCILED_CHANNELS, REST_FILLED_CHANNELS, PrivateLedger, reports_fill
from ingest.core.normalize import (
    BookPush,
    OkxEvent,
    RecordPush,
    TradePush,
    cache_sizes,
    frame_dead_letter,
    normalize,
    push_arg,
    raw_frames,
)
from ingest.core.orders import BoundedSeen, OrderPush, OrderPushDedupe
from ingest.core.records import (
    AlgoOrder,
    Balance,
    BookAction,
    BookUpdate,
    DeadLetter,
    DeadLetterReason,
    Fill,
    GapEvent,
    GapStatus,
    OkxRecord,
    Order,
    RawFrames,
    Record,
    Source,
    StreamPosition,
    TopicKind,
    Trade,
)
from ingest.core.records import GapKind as RecordGapKind
from ingest.core.records import Position as PositionRecord
from ingest.core.streams import Position, StreamOwners
from ingest.io.inbox import oldest
from ingest.io.sink import EncodedRecord
from ingest.io.state import SavedState
from ingest.okx import codes
from ingest.okx.channels import INCREMENTAL_BOOK_CHANNELS, Endpoint, SubArg

log = logging.getLogger(__name__)


class Outlet(Protocol):
    """Where encoded records go (io/delivery.Delivery); `put_many` waits when the outlet is full."""

    async def put_many(self, records: Sequence[EncodedRecord]) -> None: ...


class LatencyMarker(Protocol):
    """Samples receive -> ack latency (obs/metrics.AckLatency): `mark` a record with a receive time."""

    def mark(self, record: object, recv_ts_ns: int) -> None: ...


@dataclass
class PipelineStats:
    """Counters for metrics and tests; plain ints so the hot path pays nothing for them."""

    frames: int = 0
    link_events: int = 0
    records: Counter[str] = field(default_factory=Counter)
    dead_letters: Counter[str] = field(default_factory=Counter)
    events: Counter[str] = field(default_factory=Counter)
    okx_errors: Counter[str] = field(default_factory=Counter)
    gaps: Counter[str] = field(default_factory=Counter)
    book_resets: int = 0
    book_breaks: int = 0
    book_deltas_dropped: int = 0
    overlap_duplicates_dropped: int = 0
    private_repeats_dropped: int = 0
    resubscribes_requested: int = 0
    oversize_records: int = 0
    #: Items the last-resort guard caught (a frame among them became an internal_error dead letter).
    item_failures: int = 0
    #: Records their Avro schema could not hold (each became a dead letter).
    unencodable_records: int = 0
    #: Full-book checkpoint records published (okx.book_checkpoint_s).
    book_checkpoints: int = 0
    #: Args acked after `max_streams` were held (their pushes are dead letters).
    streams_refused: int = 0
    last_frame_ns: int = 0
    #: Seconds spent on batches (processing them and handing their records over), not waiting for input. Its
    #: rate near 1 is a saturated core (or delivery holding the pipeline) even while the inbox stays short:
    #: a pipeline that never waits reads its sockets only between bursts, so the backlog waits in TCP buffers.
    busy_s: float = 0.0
    #: Private reconciliation: REST reads asked for, answers handled, rows published (by topic) and dropped.
    reconcile_requests: int = 0
    reconciliations: int = 0
    rest_records: Counter[str] = field(default_factory=Counter)
    rest_rows_dropped: int = 0


def _position(pos: Position | None) -> StreamPosition | None:
    if pos is None:
        return None
    return StreamPosition(ts=pos.ts, trade_id=pos.trade_id, seq_id=pos.seq_id)


def gap_record(gap: Gap, shard: str) -> GapEvent:
    """The `okx.gaps` record of a gap the tracker found; status open until the backfill worker fills it."""
    return GapEvent(
        gap_id=gap.gap_id,
        kind=RecordGapKind(gap.kind.value),
        status=GapStatus.OPEN,
        reason=gap.reason,
        channel=gap.channel,
        inst_id=gap.inst_id,
        inst_type=gap.inst_type,
        before=_position(gap.before),
        after=_position(gap.after),
        opened_ts_ns=gap.opened_ts_ns,
        detected_ts_ns=gap.detected_ts_ns,
        conn_id=gap.conn_before,
        conn_after=gap.conn_after,
        shard=shard,
    )


def _book_message(rec: BookUpdate) -> BookMessage:
    return BookMessage(
        snapshot=rec.action is BookAction.SNAPSHOT,
        bids=rec.bids,
        asks=rec.asks,
        ts=rec.ts,
        checksum=rec.checksum,
        seq_id=rec.seq_id,
        prev_seq_id=rec.prev_seq_id,
    )


def _order_push(rec: Order | AlgoOrder) -> OrderPush:
    if isinstance(rec, Order):
        # Only an update that reports a fill is judged by its tradeId (rule 1): a later update of the order may
        # still carry its last tradeId (a cancel after a partial fill) and must not pass for a repeat of it.
        return OrderPush(
            inst_id=rec.inst_id or "", ord_id=rec.ord_id, state=rec.state or "", u_time=int(rec.u_time or 0),
            trade_id=(rec.trade_id or "") if reports_fill(rec) else "", acc_fill_sz=rec.acc_fill_sz or "",
            px=rec.px or "", sz=rec.sz or "",
            req_id=rec.req_id or "", amend_result=rec.amend_result or "", code=rec.code or "",
            detail=(rec.tp_trigger_px or "", rec.sl_trigger_px or "", rec.fill_sz or "", rec.avg_px or ""),
        )
    return OrderPush(
        inst_id=rec.inst_id or "", ord_id=f"algo:{rec.algo_id}", state=rec.state or "", u_time=int(rec.u_time or 0),
        sz=rec.sz or "", req_id=rec.req_id or "", amend_result=rec.amend_result or "", code=rec.fail_code or "",
        detail=(rec.trigger_px or "", rec.tp_trigger_px or "", rec.sl_trigger_px or "", rec.actual_sz or "",
                rec.actual_px or "", rec.ord_px or ""),
    )


#: A unit of stream ownership: the records that share one fate (one trade, or one push's records).
Unit = tuple[OkxRecord, ...]

#: Most inbound items processed per wake-up of the pipeline task (bounds the latency a batch adds: ~5 ms).
BATCH = 256

#: Private connections whose last frame time is remembered (older ones are forgotten first).
_MAX_PRIVATE_CONNS = 64

#: Streams whose ids reveal a lost frame by themselves (tradeId holes, the seqId chain of incremental books).
_ID_CHANNELS = TRADE_CHANNELS | INCREMENTAL_BOOK_CHANNELS

#: Most streams (args) one pipeline holds state for: far above what a shard subscribes (OKX allows a few
#: thousand args per connection and a shard has a few connections), so only a bug or abuse reaches it.
MAX_STREAMS = 50_000
#: Push args remembered with the acked arg they belong to (a cache: cleared when full).
_MAX_COVERING = 10_000


# isinstance targets built once: `A | B` in a call builds a new union object each time (about 1 us per frame).
_DATA_PUSH = (TradePush, BookPush, RecordPush)
_ROWS_PUSH = (TradePush, BookPush)
_ORDER_RECORD = (Order, AlgoOrder)

#: Fields of a subscription arg that OKX may leave out of its pushes' arg (positions: instFamily).
_MAY_OMIT = ("inst_family", "ccy", "extra_params")


def _received_ns(item: Inbound) -> int:
    """Local time (ns) an inbound item arrived: a frame's receive time, an event's or a REST answer's own."""
    return item.recv_ts_ns if isinstance(item, InboundFrame) else item.ts_ns


def _covers(held: SubArg, push: SubArg) -> bool:
    """Whether a push with arg `push` belongs to the subscription `held` (see Pipeline._holder)."""
    for name in ("inst_id", "inst_type", "inst_family", "ccy", "extra_params"):
        mine, theirs = getattr(held, name), getattr(push, name)
        if mine != theirs and not (theirs is None and name in _MAY_OMIT) and not (mine is None and name == "inst_id") \
                and not (mine == "ANY" and name == "inst_type"):
            return False
    return held.channel == push.channel


@dataclass(slots=True)
class _PrivateStream:
    """Reconciliation state of one private arg."""

    #: Connections that hold it now -> when they acked it (local ns).
    holders: dict[str, int] = field(default_factory=dict)
    #: Data may be missing since then (local ns) and no REST read was asked for yet.
    hole_since_ns: int | None = None
    #: The last REST read asked for this stream and not yet answered.
    pending_seq: int | None = None
    #: Gap events published as open for the pending read's hole; published again as filled by its answer.
    awaiting: list[GapEvent] = field(default_factory=list)
    initial: bool = True


class Pipeline:
    """Consumes the shard's inbound queue; see the module docstring for the path of a frame."""

    def __init__(
        self,
        inbox: asyncio.Queue[Inbound],
        outlet: Outlet,
        encoder: RecordEncoder,
        *,
        resubscriber: Resubscriber | None = None,
        reconciler: Reconciler | None = None,
        shard: str = "0",
        publish_raw: bool = True,
        max_record_bytes: int = 1_000_000,
        max_streams: int = MAX_STREAMS,
        book_checkpoint_s: float = 60.0,
        now_ns: Callable[[], int] = time.time_ns,
        latency: LatencyMarker | None = None,
    ) -> None:
        self.inbox = inbox
        self._outlet = outlet
        self._encoder = encoder
        self._resubscriber = resubscriber
        self.shard = shard
        self._publish_raw = publish_raw
        self._now_ns = now_ns
        self.stats = PipelineStats()
        self._books = BookSet()
        self._gaps = GapTracker()
        self._owners: StreamOwners[Unit] = StreamOwners()
        self._orders = OrderPushDedupe()
        self._fills: BoundedSeen[tuple[str, str]] = BoundedSeen(500_000, 7 * 24 * 3600 * 1000)
        self._out: list[Record] = []
        self._max_record_bytes = max_record_bytes
        #: Frames per okx.raw record, in bytes: half the record limit leaves room for the record's own fields.
        self._raw_bytes = max_record_bytes // 2
        #: Set while no put_many is in progress (see between_batches).
        self._putting = asyncio.Event()
        self._putting.set()
        self._reconciler = reconciler
        self._ledger = PrivateLedger()
        self._private: dict[SubArg, _PrivateStream] = {}
        self._private_last_ns: dict[str, int] = {}
        self._started_ns = now_ns()
        self._reconcile_seq = 0
        self._latency = latency
        #: Local receive time (ns) of each stream's last data push, for staleness metrics.
        self.stream_last_ns: dict[SubArg, int] = {}
        #: Every arg a connection of this shard acked (SUBSCRIBED): the only streams that get state. A push for
        #: any other arg is a dead letter, so what OKX (or anyone) pushes cannot grow memory.
        self._held: set[SubArg] = set()
        self._held_by_channel: dict[str, list[SubArg]] = {}
        #: Push args that differ from the acked arg they belong to (OKX leaves out instFamily or ccy, adds instId
        #: or uid): push arg -> held arg, None for nobody's. A cache, cleared at its cap and on each new ack.
        self._covering: dict[SubArg, SubArg | None] = {}
        self._max_streams = max_streams
        #: Checkpoints: receive time (the frames' clock, never read here) of each incremental book's last full
        #: image on the topic (its snapshot or checkpoint); 0 turns them off.
        self._checkpoint_ns = int(book_checkpoint_s * 1e9)
        self._last_image_ns: dict[SubArg, int] = {}
        #: Receive time (ns) of the first item of the batch being processed (taken from the queue but not yet
        #: handed to the outlet), None between batches: with the queue's head, what `lag_s` reads.
        self._batch_received_ns: int | None = None
        #: With `cluster.copies` > 1: offered every gap before it is published; True keeps it back (it comes
        #: back as `DecidedGaps` when no other copy covered it).
        self.gap_gate: Callable[[Gap, GapEvent], bool] | None = None
        self._handed: list[Callable[[], None]] = []

    # ---- driving ------------------------------------------------------------------------------------

    async def run(self) -> None:
        """Process the queue until cancelled. When it is busy, up to BATCH items are taken per wake-up and their
        records handed to the outlet together; items are still processed strictly in queue order."""
        inbox = self.inbox
        while True:
            items = [await inbox.get()]
            while len(items) < BATCH and not inbox.empty():
                items.append(inbox.get_nowait())
            self._batch_received_ns = _received_ns(items[0])  # once per batch: the lag costs no frame anything
            started = time.perf_counter()
            try:
                await self.handle_many(items)
            finally:
                self.stats.busy_s += time.perf_counter() - started
                self._batch_received_ns = None
                for _ in items:
                    inbox.task_done()

    def lag_s(self) -> float:
        """How long what was received has waited: the age of the oldest frame (or event) received and not yet
        processed, i.e. of the batch in progress or else the queue's head; 0 when nothing waits. Read when
        metrics or readiness are asked for, so it costs the data path nothing. A backlog still in the sockets'
        buffers is not received yet and not seen here (`stats.busy_s` shows a core that never waits)."""
        since = self._batch_received_ns
        if since is None:
            head = oldest(self.inbox)
            if head is None:
                return 0.0
            since = _received_ns(head)
        return max(0.0, (self._now_ns() - since) / 1e9)

    def checkpoint(self) -> tuple[list[StreamCheckpoint], int | None]:
        """Every stream's position and open gap, and when private data last arrived (for `restore`)."""
        return self._gaps.checkpoint(), max(self._private_last_ns.values(), default=None)

    def restore(self, state: SavedState, args: Iterable[SubArg], *, reason: str = "the recorder was not running"
                ) -> int:
        """Continue where a previous process stopped: each stream still subscribed gets its last position and
        an open gap for the time nobody recorded it (closed by its first record, or filled by the private REST
        reconciliation). Returns how many streams were restored."""
        wanted = set(args)
        restored = 0
        for cp in state.streams:
            if cp.arg in wanted:
                self._gaps.restore(cp, state.saved_ts_ns, reason)
                restored += 1
        if state.private_last_ns is not None:
            # The first private REST read reaches back to the last private frame the previous process saw.
            self._started_ns = min(self._started_ns, state.private_last_ns)
        return restored

    def state_sizes(self) -> dict[str, int]:
        """Entries of every per-stream map (a gauge each): all are bounded, by `max_streams` or their own cap."""
        return {"subscribed": len(self._held), "books": len(self._books), "gap_streams": len(self._gaps),
                "stream_owners": len(self._owners), "private_streams": len(self._private),
                "private_conns": len(self._private_last_ns), "order_dedupe": len(self._orders),
                "fills_seen": len(self._fills), "private_ledger": len(self._ledger),
                "book_checkpoint_streams": len(self._last_image_ns),
                "push_arg_aliases": len(self._covering), "stream_last_seen": len(self.stream_last_ns),
                **cache_sizes()}

    def open_gaps(self) -> list[Gap]:
        """Gaps not yet closed by data (reported at shutdown)."""
        return self._gaps.open_gaps(self._now_ns())

    async def handle(self, item: Inbound) -> None:
        """One frame, link event or REST answer; never raises for bad data."""
        await self.handle_many((item,))

    async def handle_many(self, items: Sequence[Inbound]) -> None:
        """Items in order, then their records to the outlet in one call (which may wait: back-pressure)."""
        out = self._out
        if self._publish_raw:
            # Before anything else looks at them: whatever happens to a frame later, its bytes are on okx.raw.
            out.extend(raw_frames([i for i in items if isinstance(i, InboundFrame)], self._raw_bytes))
        for item in items:
            try:
                if isinstance(item, InboundFrame):
                    self._frame(item)
                elif isinstance(item, LinkEvent):
                    self._link(item)
                elif isinstance(item, RestRecords):
                    self._rest(item)
                else:  # gaps a copy arbiter held back, then decided to publish
                    self._out.extend(item.records)
                    self._handed.append(item.handed)
            except Exception as exc:
                self._failed(item, exc)
        if out:
            records = self.stats.records
            encode = self._encoder.encode
            encoders = self._encoder.encoders  # type -> its encoder, so a record costs one call to encode
            limit = self._max_record_bytes
            encoded = []
            counts: dict[TopicKind, int] = {}
            for rec in out:
                try:
                    full = encoders.get(type(rec))
                    enc = encode(rec) if full is None else full(rec)
                    if len(enc.value) > limit:
                        rec = self._oversize(rec, len(enc.value))
                        enc = encode(rec)
                except Exception as exc:
                    # A value the normalizer let through that its Avro type cannot hold (a bug there): one
                    # dead letter instead of a pipeline that dies with the batch it had not handed over.
                    dead = self._unencodable(rec, exc, items)
                    if dead is None:
                        continue
                    rec, enc = dead
                topic = rec.TOPIC  # counted by enum member, folded below: `.value` is a Python-level property
                counts[topic] = counts.get(topic, 0) + 1
                encoded.append(enc)
            out.clear()
            for topic, n in counts.items():
                records[topic.value] += n
            if self._latency is not None:
                first = next((i for i in items if isinstance(i, InboundFrame)), None)
                if first is not None:
                    self._latency.mark(encoded[-1], first.recv_ts_ns)
            self._putting.clear()
            try:
                await self._outlet.put_many(encoded)
            finally:
                self._putting.set()
            if self._handed:
                for handed in self._handed:
                    handed()
                self._handed.clear()

    def _failed(self, item: Inbound, exc: Exception) -> None:
        """The last-resort guard of one item: whatever went wrong, a frame ends as a dead letter (its bytes are
        on okx.raw too, published first) and anything else as a logged, counted failure."""
        self.stats.item_failures += 1
        try:
            log.error("pipeline_item_failed", extra={"item": type(item).__name__,
                                                     "error": f"{type(exc).__name__}: {exc}"[:500]}, exc_info=exc)
            if isinstance(item, InboundFrame):
                self._dead(DeadLetter(
                    reason_code=DeadLetterReason.INTERNAL_ERROR,
                    reason=f"pipeline error {type(exc).__name__}: {exc}"[:2000], raw=item.data, source=Source.WS,
                    conn_id=item.conn, name=item.name, endpoint=str(item.endpoint), recv_seq=item.recv_seq,
                    recv_ts_ns=item.recv_ts_ns, record_id=f"{item.conn}:{item.recv_seq}:failed"))
        except Exception:  # not even the dead letter could be built: the count and okx.raw still have it
            log.exception("pipeline_item_failed", extra={"item": type(item).__name__})

    def _unencodable(self, rec: Record, exc: Exception,
                     items: Sequence[Inbound]) -> tuple[Record, EncodedRecord] | None:
        """A record its Avro schema cannot hold, as a dead letter with the frame it came from (None, counted and
        logged, if even that cannot be encoded)."""
        self.stats.unencodable_records += 1
        conn, seq = getattr(rec, "conn_id", None), getattr(rec, "recv_seq", None)
        raw = next((i.data for i in items if isinstance(i, InboundFrame) and i.conn == conn and i.recv_seq == seq),
                   None)
        what = f"{rec.AVRO_NAME} {rec.emission_id()} cannot be encoded: {type(exc).__name__}: {exc}"[:2000]
        log.error("record_unencodable", extra={"schema": rec.AVRO_NAME, "record_id": rec.emission_id(),
                                               "error": f"{type(exc).__name__}: {exc}"[:500]})
        code = DeadLetterReason.BAD_NUMBER if isinstance(exc, OverflowError) else DeadLetterReason.INTERNAL_ERROR
        dead = DeadLetter(
            reason_code=code, reason=what, raw=raw if raw is not None else repr(rec)[:100_000].encode(),
            source=Source.REST if getattr(rec, "source", None) is Source.REST else Source.WS, conn_id=conn,
            endpoint=getattr(rec, "endpoint", None), recv_seq=seq,
            recv_ts_ns=getattr(rec, "recv_ts_ns", None) or self._now_ns(), channel=getattr(rec, "channel", None),
            inst_id=getattr(rec, "inst_id", None), record_id=f"unencodable:{rec.emission_id()}")
        self.stats.dead_letters[code.value] += 1
        try:
            return dead, self._encoder.encode(dead)
        except Exception:
            log.exception("dead_letter_unencodable", extra={"record_id": dead.record_id})
            return None

    def _oversize(self, rec: Record, size: int) -> DeadLetter:
        """A record Kafka would refuse for its size, as a dead letter with the start of its content.

        Sending it would fail delivery for good and, resent from the journal at every start, wedge it; a dead
        letter saying what was cut keeps everything else flowing (a raw frame's records are still published).
        """
        keep = self._max_record_bytes // 2
        # A RawFrames record is too big only when it holds one frame: raw_frames caps batches at half the limit.
        first = rec.frames[0] if isinstance(rec, RawFrames) else None
        payload = first.payload if first is not None else self._encoder.value(rec)
        self.stats.oversize_records += 1
        log.error("record_too_large", extra={"schema": rec.AVRO_NAME, "bytes": size, "limit": self._max_record_bytes,
                                             "record_id": rec.emission_id()})
        return DeadLetter(
            reason_code=DeadLetterReason.OTHER,
            reason=(f"{rec.AVRO_NAME} of {size} bytes exceeds kafka.max_record_bytes ({self._max_record_bytes}); "
                    f"raw holds its first {min(keep, len(payload))} of {len(payload)} bytes"),
            raw=payload[:keep], source=Source.WS, conn_id=getattr(rec, "conn_id", None),
            endpoint=getattr(rec, "endpoint", None),
            recv_seq=first.recv_seq if first is not None else getattr(rec, "recv_seq", None),
            recv_ts_ns=(first.recv_ts_ns if first is not None else getattr(rec, "recv_ts_ns", None)) or self._now_ns(),
            channel=getattr(rec, "channel", None), inst_id=getattr(rec, "inst_id", None),
            record_id=f"oversize:{rec.emission_id()}",
        )

    async def between_batches(self) -> None:
        """Return at a moment when every record of the items processed so far was handed to the outlet (so a
        checkpoint taken right after matches what the outlet holds); the caller must not await before using it."""
        while not self._putting.is_set():
            await self._putting.wait()

    # ---- link events ----------------------------------------------------------------------------------

    def _link(self, ev: LinkEvent) -> None:
        self.stats.link_events += 1
        if ev.kind is LinkEventKind.SUBSCRIBED:
            held = self._held
            for arg in ev.args:
                if arg not in held:
                    if len(held) >= self._max_streams:
                        self.stats.streams_refused += 1
                        log.error("stream_limit_reached", extra={
                            "arg": str(arg), "limit": self._max_streams,
                            "effect": "its pushes become dead letters (unsubscribed); split the instruments "
                                      "over more shards"})
                        continue
                    held.add(arg)
                    self._held_by_channel.setdefault(arg.channel, []).append(arg)
                    self._covering.clear()
        if self.stats.streams_refused:  # past the limit: refused args get no state from their events either
            ev = dataclasses.replace(ev, args=tuple(a for a in ev.args if a in self._held))
        owned_before = {arg: self._owners.owner(arg) for arg in ev.args}
        for offer in self._owners.on_link_event(ev):
            if offer.handover is not None:
                self._gaps.on_handover(offer.handover)
            for unit in offer.emit:
                self._publish_unit(offer.arg, unit)
        if ev.kind is LinkEventKind.DISCONNECTED:
            for arg in ev.args:
                # Only the owner's loss invalidates the book: after a cut-over the old connection's end is harmless.
                if arg.channel in INCREMENTAL_BOOK_CHANNELS and owned_before.get(arg) in (ev.conn, None):
                    self._books.invalidate(arg)
        for gap in self._gaps.on_link_event(ev):
            self._gap(gap)
        if self._reconciler is not None:
            self._private_link(ev)
        if ev.kind in (LinkEventKind.DISCONNECTED, LinkEventKind.SUBSCRIBE_FAILED, LinkEventKind.NOTICE):
            log.info("link_event", extra={"kind": ev.kind.value, "conn": ev.conn, "subscriptions": len(ev.args),
                                          "code": ev.code, "reason": ev.reason})

    # ---- frames ---------------------------------------------------------------------------------------

    def _frame(self, frame: InboundFrame) -> None:
        self.stats.frames += 1
        self.stats.last_frame_ns = frame.recv_ts_ns
        if frame.endpoint is Endpoint.PRIVATE and self._reconciler is not None:
            self._private_last_ns[frame.conn] = frame.recv_ts_ns  # where a hole in its streams would begin
        result = normalize(frame)
        if isinstance(result, _DATA_PUSH):
            if result.arg not in self._held:
                held = self._holder(result.arg)
                if held is None:
                    self._dead(frame_dead_letter(
                        frame, DeadLetterReason.UNSUBSCRIBED,
                        f"a push for {result.arg}, which this shard never subscribed",
                        channel=result.arg.channel, inst_id=result.arg.inst_id))
                    return
                result = msgspec.structs.replace(result, arg=held)  # the stream's state is the acked arg's
            self.stream_last_ns[result.arg] = frame.recv_ts_ns
        if isinstance(result, _ROWS_PUSH) and not result.records:
            self.stats.events["empty_push"] += 1  # counted: OKX sent a push with no rows
        elif isinstance(result, TradePush):
            self._trades(frame, result)
        elif isinstance(result, BookPush):
            for rec in result.records:
                pos = Position(rec.ts, None, rec.seq_id)
                self._offer(result.arg, frame, pos, (rec,), snapshot=rec.action is BookAction.SNAPSHOT)
        elif isinstance(result, RecordPush):
            if result.records:
                ts = max(r.ts for r in result.records)
                self._offer(result.arg, frame, Position(ts, None, None), result.records)
            else:
                self.stats.events["empty_push"] += 1
        elif isinstance(result, OkxEvent):
            self._event(result)
        else:
            self._dead(result)
            if result.channel is not None and result.channel not in _ID_CHANNELS:
                self._dead_letter_gap(frame, result)

    def _holder(self, arg: SubArg) -> SubArg | None:
        """The acked arg a push arg belongs to when they differ (None: nobody subscribed it). OKX's push arg may
        leave out the subscription's instFamily, ccy or extraParams, name the instId of a subscription by
        instType or of an account-wide one (a fill's), and the instType of an `ANY` one; any other difference is
        another stream. Its records then share the acked arg's state, which is what bounds that state."""
        try:
            return self._covering[arg]
        except KeyError:
            pass
        holder = next((h for h in self._held_by_channel.get(arg.channel, ()) if _covers(h, arg)), None)
        if len(self._covering) >= _MAX_COVERING:
            self._covering.clear()
        self._covering[arg] = holder
        return holder

    def _dead_letter_gap(self, frame: InboundFrame, dead: DeadLetter) -> None:
        """The stream of a dead-lettered push loses that frame: a `dead_letter` gap, closed by its next record
        (only for a stream this shard holds, so a bad push for any other arg creates no state)."""
        arg = push_arg(frame.data)
        if arg is not None and arg not in self._held:
            arg = self._holder(arg)
        if arg is None:
            return
        self._gaps.on_dead_letter(arg, frame.conn, frame.recv_ts_ns,
                                  f"frame {frame.conn}:{frame.recv_seq} became a dead letter: {dead.reason}"[:500])

    def _trades(self, frame: InboundFrame, push: TradePush) -> None:
        for rec, ref in zip(push.records, push.refs, strict=True):
            self._offer(push.arg, frame, Position(ref.ts, ref.trade_id, ref.seq_id), (rec,))

    def _offer(self, arg: SubArg, frame: InboundFrame, pos: Position, unit: Unit, *, snapshot: bool = False) -> None:
        offer = self._owners.offer(arg, frame.conn, pos, unit, ts_ns=frame.recv_ts_ns, snapshot=snapshot)
        self.stats.overlap_duplicates_dropped += offer.dropped
        if offer.handover is not None:
            self._gaps.on_handover(offer.handover)
        for emitted in offer.emit:
            self._publish_unit(arg, emitted)

    def _publish_unit(self, arg: SubArg, unit: Unit) -> None:
        """A unit that stream ownership let through: check books, dedupe private repeats, publish, track gaps."""
        first = unit[0]
        conn = first.conn_id or ""
        if isinstance(first, BookUpdate):
            verdict = self._books.apply(arg, _book_message(first))
            if verdict.kind is VerdictKind.RESET:
                self.stats.book_resets += 1
                log.info("book_sequence_reset", extra={"arg": str(arg), "from": verdict.reset_from,
                                                       "to": first.seq_id})
            if not verdict.accepted:
                if verdict.broken is not None:
                    self.stats.book_breaks += 1
                    self._gaps.on_book_break(arg, conn, first.recv_ts_ns, verdict.broken)
                    log.warning("book_broken", extra={"arg": str(arg), "kind": verdict.broken.kind.value,
                                                      "expected": verdict.broken.expected,
                                                      "got": verdict.broken.got, "conn": conn})
                    self._resubscribe(arg, f"book {verdict.broken.kind.value}")
                else:
                    self.stats.book_deltas_dropped += 1
                return
            pos = Position(first.ts, None, first.seq_id)
            self._out.append(first)
            if self._checkpoint_ns and arg.channel in INCREMENTAL_BOOK_CHANNELS:
                self._maybe_checkpoint(arg, first)
            self._track(arg, conn, pos, first, snapshot=first.action is BookAction.SNAPSHOT)
            return
        if isinstance(first, Trade):
            self._out.append(first)
            count = int(first.count) if first.count else 1
            self._track(arg, conn, Position(first.ts, int(first.trade_id), first.seq_id), first, count=count)
            return
        kept = [r for r in unit if self._private_first_time(r)]
        if not kept:
            return
        self._out.extend(kept)
        self._track(arg, conn, Position(max(r.ts for r in unit), None, None), first)

    def _maybe_checkpoint(self, arg: SubArg, update: BookUpdate) -> None:
        """After an accepted message of a valid incremental book: publish the whole book once
        `book_checkpoint_s` passed (by receive time) since its last full image, so a reader can start there
        instead of at the last snapshot, which may be days back. The chain goes on: the next update's
        prevSeqId is the checkpoint's seqId. Without seqIds (pre-2023 data) there is no chain to continue."""
        now = update.recv_ts_ns
        if update.action is BookAction.SNAPSHOT:
            self._last_image_ns[arg] = now
            return
        last = self._last_image_ns.get(arg)
        if last is None:
            self._last_image_ns[arg] = now
            return
        book = self._books.book(arg)
        if now - last < self._checkpoint_ns or not book.valid or update.seq_id is None:
            return
        self._last_image_ns[arg] = now
        asks, bids = book.asks(), book.bids()
        self.stats.book_checkpoints += 1
        self._out.append(msgspec.structs.replace(
            update, action=BookAction.CHECKPOINT, asks=tuple(asks), bids=tuple(bids), prev_seq_id=None,
            checksum=okx_checksum(bids[:CHECKSUM_DEPTH], asks[:CHECKSUM_DEPTH]),
            record_id=f"ckpt:{arg.channel}:{update.inst_id}:{update.seq_id}", extra={}))

    def _track(self, arg: SubArg, conn: str, pos: Position, rec: OkxRecord, *, snapshot: bool = False,
               count: int = 1) -> None:
        for gap in self._gaps.on_record(arg, conn, pos, rec.recv_ts_ns, count=count, snapshot=snapshot,
                                        inst_type=rec.inst_type):
            self._gap(gap)

    def _private_first_time(self, rec: OkxRecord) -> bool:
        """OKX's repeated-push rules for orders/algo orders, and each fill once (SPEC 6)."""
        if isinstance(rec, _ORDER_RECORD):
            if self._orders.accept(_order_push(rec), rec.ts).keep:
                if not isinstance(rec, Order):
                    return True
                if not self._ledger.repeats_rest(rec):  # a state a REST reconciliation already published
                    self._ledger.push_published(rec, rec.ts)
                    return True
        elif isinstance(rec, Fill):
            if self._fills.first_time((rec.inst_id or "", rec.trade_id), rec.ts):
                return True
        else:
            return True
        self.stats.private_repeats_dropped += 1
        return False

    def _resubscribe(self, arg: SubArg, reason: str) -> None:
        if self._resubscriber is not None:
            self.stats.resubscribes_requested += 1
            self._resubscriber.request_resubscribe(arg, reason)

    def _gap(self, gap: Gap) -> None:
        self.stats.gaps[gap.kind.value] += 1
        log.warning("gap_detected", extra={"gap_id": gap.gap_id, "kind": gap.kind.value, "channel": gap.channel,
                                           "inst_id": gap.inst_id, "reason": gap.reason,
                                           "open": gap.after is None})
        record = gap_record(gap, self.shard)
        if self.gap_gate is not None and self.gap_gate(gap, record):
            return  # held: another copy may have recorded its window (services/copies.py)
        self._out.append(record)
        if gap.channel in REST_FILLED_CHANNELS and gap.after is not None \
                and gap.kind in (TrackerGapKind.DISCONNECT, TrackerGapKind.CUTOVER):
            stream = self._private.get(gap.arg)
            if stream is not None and stream.pending_seq is not None:
                stream.awaiting.append(record)  # the pending REST read recovers what it lacks

    def _event(self, ev: OkxEvent) -> None:
        self.stats.events[ev.event] += 1
        if ev.event == "error":
            self.stats.okx_errors[ev.code or "?"] += 1

    def _dead(self, dead: DeadLetter) -> None:
        self.stats.dead_letters[dead.reason_code.value] += 1
        log.warning("dead_letter", extra={"reason_code": dead.reason_code.value, "reason": dead.reason,
                                          "conn": dead.conn_id, "recv_seq": dead.recv_seq, "channel": dead.channel})
        self._out.append(dead)

    # ---- private reconciliation ---------------------------------------------------------------------

    def _private_link(self, ev: LinkEvent) -> None:
        """Track who holds each private stream; a REST read is asked for when one comes up for the first
        time, and after every loss once it is held again (at once if another connection holds it)."""
        kind = ev.kind
        if kind is LinkEventKind.NOTICE:
            return
        for arg in ev.args:
            if arg.channel not in RECONCILED_CHANNELS:
                continue
            st = self._private.get(arg)
            if st is None:
                st = self._private[arg] = _PrivateStream(hole_since_ns=self._started_ns)
            if kind is LinkEventKind.SUBSCRIBED:
                st.holders[ev.conn] = ev.ts_ns
                if st.hole_since_ns is not None:
                    self._ask(arg, st, "first subscription" if st.initial else f"resubscribed on {ev.conn}")
                continue
            held = st.holders.pop(ev.conn, None) is not None
            if kind is LinkEventKind.CUTOVER:
                continue  # the WebSocket layer proved the replacement carried these on without a hole
            if held:
                start = self._private_last_ns.get(ev.conn, ev.ts_ns)
                st.hole_since_ns = start if st.hole_since_ns is None else min(st.hole_since_ns, start)
            if kind is LinkEventKind.SUBSCRIBE_FAILED and ev.code in codes.FATAL_LOGIN_CODES:
                continue  # OKX refused the key itself: a REST read signed with it would be refused too
            if kind is LinkEventKind.SUBSCRIBE_FAILED and not st.holders:
                # No data will come for it on this connection: put its current state on record now.
                if st.hole_since_ns is None:
                    st.hole_since_ns = self._private_last_ns.get(ev.conn, ev.ts_ns)
                self._ask(arg, st, f"subscribe failed on {ev.conn} ({ev.code}): {ev.reason}")
            elif st.holders and st.hole_since_ns is not None:
                self._ask(arg, st, f"lost on {ev.conn}, still held by {', '.join(sorted(st.holders))}")
        if kind is not LinkEventKind.SUBSCRIBED and len(self._private_last_ns) > _MAX_PRIVATE_CONNS:
            for conn in list(self._private_last_ns)[:-_MAX_PRIVATE_CONNS]:
                del self._private_last_ns[conn]

    def _ask(self, arg: SubArg, st: _PrivateStream, reason: str) -> None:
        assert self._reconciler is not None and st.hole_since_ns is not None
        self._reconcile_seq += 1
        request = ReconcileRequest(seq=self._reconcile_seq, reason=f"{arg}: {reason}", since_ns=st.hole_since_ns,
                                   args=frozenset({arg}), open_since_ms=self._ledger.open_since_ms(),
                                   initial=st.initial)
        st.hole_since_ns = None
        st.pending_seq = request.seq
        st.initial = False
        self.stats.reconcile_requests += 1
        self._reconciler.request_reconcile(request)

    def _rest(self, item: RestRecords) -> None:
        """A REST read of the private account: publish what the record lacks, then mark its holes filled."""
        self.stats.reconciliations += 1
        held = {arg.channel for arg, st in self._private.items() if st.holders}
        published: Counter[str] = Counter()
        dropped = 0
        for rec in item.records:
            if isinstance(rec, DeadLetter):
                self._dead(rec)
            elif self._rest_is_news(rec, held, item.fetched_ms):
                self._out.append(rec)
                published[rec.TOPIC.value] += 1
            else:
                dropped += 1
        self.stats.rest_records.update(published)
        self.stats.rest_rows_dropped += dropped
        filled = self._fill_private_gaps(item, sum(n for t, n in published.items() if t in ("orders", "fills")))
        log.info("private_reconciled", extra={"seq": item.seq, "reason": item.reason[:300], "rows": len(item.records),
                                              "published": dict(published), "already_recorded": dropped,
                                              "gaps_filled": filled, "since_ms": item.since_ms})

    def _rest_is_news(self, rec: OkxRecord, held: set[str], fetched_ms: int) -> bool:
        """Whether one REST row adds to the record (`core/ledger.py`; snapshot channels see the module doc)."""
        if isinstance(rec, Order):
            return self._ledger.rest_order_is_news(rec, fetched_ms)
        if isinstance(rec, Fill):
            key = (rec.inst_id or "", rec.trade_id)
            # While the fills channel is recorded okx.fills must hold every fill; otherwise a fill the orders
            # stream recorded (a push with its tradeId) is on record already.
            if "fills" not in held and self._ledger.trade_recorded(*key):
                return False
            return self._fills.first_time(key, rec.ts)
        if isinstance(rec, PositionRecord):
            return "positions" not in held  # a held positions channel sent its snapshot on subscribe
        if isinstance(rec, Balance):
            return "account" not in held  # likewise the account channel
        return True

    def _fill_private_gaps(self, item: RestRecords, recovered: int) -> int:
        """Publish, as filled, the holes of the streams whose pending read this answer is; returns how many."""
        note = (f"reconciled from REST back to OKX time {item.since_ms}: {recovered} order states and fills the "
                "stream missed were published with source=rest (each order's latest state and every fill; an "
                "order's intermediate states in between are not available over REST)")
        now = self._now_ns()
        filled = 0
        covers = set(item.covers)
        for arg, st in self._private.items():
            # Only the streams this read was for: another stream's pending read may still fail.
            if st.pending_seq is None or st.pending_seq > item.seq or arg not in covers:
                continue
            st.pending_seq = None
            if item.failed:
                # Nothing recovered: the holes stay open (their gaps were published open), and the next
                # (re)subscription asks again from where this hole began.
                since_ns = item.since_ms * 1_000_000
                st.hole_since_ns = since_ns if st.hole_since_ns is None else min(st.hole_since_ns, since_ns)
                st.awaiting.clear()
                continue
            if arg.channel not in REST_FILLED_CHANNELS:
                st.awaiting.clear()
                continue
            updates = [msgspec.structs.replace(g, revision=g.revision + 1, status=GapStatus.FILLED, updated_ts_ns=now,
                                               records_filled=recovered, note=note) for g in st.awaiting]
            st.awaiting.clear()
            if st.hole_since_ns is None and st.holders:
                conn = max(st.holders, key=lambda c: st.holders[c])
                gap = self._gaps.resolve(arg, Position(item.fetched_ms, None, None), conn, item.ts_ns,
                                         "filled by the REST reconciliation")
                if gap is not None:
                    self.stats.gaps[gap.kind.value] += 1
                    updates.append(msgspec.structs.replace(gap_record(gap, self.shard), status=GapStatus.FILLED,
                                                           updated_ts_ns=now, records_filled=recovered, note=note))
            for record in updates:
                log.info("gap_filled", extra={"gap_id": record.gap_id, "channel": record.channel,
                                              "revision": record.revision, "records_filled": recovered})
            self._out.extend(updates)
            filled += len(updates)
        return filled
