"""Replay's pure core: one total order over recorded streams, the two views, gaps in band, books rebuilt.

Pure: fed per-source streams of `Entry` (a sort key and a decoded record), answers with an iterator of typed
items. It never reads a clock or does I/O, so Kafka and the archive give the same items for the same entries.

Order (docs/REPLAY.md, "Order"): items are sorted by `ORDER_KEY` = (exchange ts ms, receive time ns, topic,
partition, offset). Every source stream must already be sorted by it; `merge` is a k-way merge
(`heapq.merge`), so memory is one entry per stream; `lazy_merge` opens a stream only once the merge reaches its
lower bound (an archive row group by its `ts` statistics), so a long window never has all its files open.
A gap sorts at the exchange ts of its last good position (`before.ts`), so it appears right after the last
record before the hole.

Views:
- `recorded`: what the live recorder published (`source = ws`) and every gap, at its latest revision.
- `repaired`: also the backfilled records (`source = rest`) in place, and gaps whose latest revision is
  `filled` dropped: they no longer interrupt anything.
Both views drop duplicates by recordId (one emission delivered twice) and by event key (core/identity.py:
the same exchange event recorded twice, by two replicas, the two connections of a hand-over, or the stream
and a backfill); the first in the order is kept. Records written before the `eventKey` field get theirs
computed. Duplicates of one event share its exchange ts, so dedupe keeps keys of the current ts only: O(1)
memory.

Books: one `OrderBook` (incremental channels) or `SnapshotBook` (books5, bbo-tbt) per (channel, instId),
fed with the recorder's seqId/prevSeqId rules (core/books.py). A snapshot or a checkpoint (action
`checkpoint`: the full book, chain kept) resyncs it; a gap on the stream that still interrupts invalidates it,
and no book snapshot is emitted for it until the next snapshot or checkpoint.

Book snapshots (`BookSnapshots(depth, interval_ms)`): at every boundary `b` (multiple of interval_ms on
exchange time, epoch aligned) with start <= b < end, each book that is valid emits its top `depth` levels as
they stood after every record with ts < b; the snapshot's ts is `b`, and it sorts before records with ts = b.
Quiet periods still emit (the book did not change, it is still the book). Invalid books emit nothing.
"""

from __future__ import annotations

import enum
import heapq
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from operator import itemgetter
from typing import NamedTuple, TypeVar

import msgspec

from ingest.core.archive_schema import DECIMAL_FIELDS, render_decimal
from ingest.core.books import BookMessage, OrderBook, SnapshotBook
from ingest.core.identity import event_key_function, has_event_key
from ingest.core.records import (
    BookLevel,
    BookUpdate,
    GapEvent,
    GapKind,
    GapStatus,
    OkxRecord,
    Record,
    Source,
    StreamPosition,
)
from ingest.okx.channels import BOOK_CHANNELS, INCREMENTAL_BOOK_CHANNELS

__all__ = [
    "ORDER_KEY",
    "BookSnapshot",
    "BookSnapshots",
    "Entry",
    "Item",
    "LazyStream",
    "SortKey",
    "View",
    "canonical",
    "gap_entries",
    "gap_position_ts",
    "latest_gaps",
    "lazy_merge",
    "merge",
    "replay_items",
    "sort_key",
]

#: (exchange ts ms, receive time ns, topic, partition, offset): the documented total order.
SortKey = tuple[int, int, str, int, int]
#: One record with where it sorts.
Entry = tuple[SortKey, Record]
#: The key function of the order, for `heapq.merge` and `sorted`.
ORDER_KEY = itemgetter(0)

R = TypeVar("R", bound=Record)

#: BookAction value of a recorder checkpoint (schemas/book_update.avsc, added with the book checkpoints).
CHECKPOINT = "checkpoint"
#: Depth of the initial books (`initial_books`): every level.
FULL_DEPTH = 1 << 30


class View(enum.StrEnum):
    """Which records a replay shows (module docstring)."""

    RECORDED = "recorded"
    REPAIRED = "repaired"


@dataclass(frozen=True, slots=True)
class BookSnapshots:
    """Emit the top `depth` levels of every valid book every `interval_ms` of exchange time."""

    depth: int
    interval_ms: int

    def __post_init__(self) -> None:
        if self.depth <= 0 or self.interval_ms <= 0:
            raise ValueError(f"book snapshots need depth > 0 and interval_ms > 0, got {self.depth}:{self.interval_ms}")


class BookSnapshot(msgspec.Struct, frozen=True, kw_only=True, gc=False):
    """A computed book: best first, exact strings; `seq_id` is the seqId of the last record it reflects."""

    channel: str
    inst_id: str
    ts: int
    seq_id: int | None
    depth: int
    bids: tuple[tuple[str, str], ...]
    asks: tuple[tuple[str, str], ...]


#: What a replay yields: a record (Trade, BookUpdate, Ticker, ...), a gap (latest revision), a book snapshot.
Item = OkxRecord | GapEvent | BookSnapshot


def sort_key(record: Record, topic: str, partition: int, offset: int, kafka_ts_ms: int = 0) -> SortKey:
    """Where `record` sorts; records without an exchange ts (none of the data topics) use the Kafka ts."""
    if isinstance(record, OkxRecord):
        return (record.ts, record.recv_ts_ns, topic, partition, offset)
    if isinstance(record, GapEvent):
        return (gap_position_ts(record), record.detected_ts_ns, topic, partition, offset)
    return (kafka_ts_ms, 0, topic, partition, offset)


def gap_position_ts(gap: GapEvent) -> int:
    """Where a gap sits: at its last good record, else at its first good one, else when it was detected."""
    for pos in (gap.before, gap.after):
        if pos is not None and pos.ts is not None:
            return pos.ts
    return (gap.opened_ts_ns or gap.detected_ts_ns) // 1_000_000


def _gap_end_ts(gap: GapEvent) -> int | None:
    return gap.after.ts if gap.after is not None else None


def latest_gaps(entries: Iterable[tuple[GapEvent, str, int, int]]) -> list[tuple[GapEvent, str, int, int]]:
    """The latest revision of each gap_id (ties: the later Kafka coordinates), in first-seen order."""
    best: dict[str, tuple[GapEvent, str, int, int]] = {}
    for item in entries:
        gap, topic, part, off = item
        cur = best.get(gap.gap_id)
        if cur is None or (gap.revision, topic, part, off) > (cur[0].revision, cur[1], cur[2], cur[3]):
            best[gap.gap_id] = item
    return list(best.values())


def gap_entries(gaps: Iterable[tuple[GapEvent, str, int, int]], start: int, end: int) -> list[Entry]:
    """Sorted entries of the latest revision of every gap that overlaps [start, end)."""
    out: list[Entry] = []
    for gap, topic, part, off in latest_gaps(gaps):
        lo = gap_position_ts(gap)
        hi = _gap_end_ts(gap)
        if lo < end and (hi is None or hi >= start):
            # The detection time of the first revision keeps a gap's place when later revisions restamp it.
            out.append(((lo, gap.opened_ts_ns or gap.detected_ts_ns, topic, part, off), gap))
    out.sort(key=ORDER_KEY)
    return out


def merge(streams: Iterable[Iterable[Entry]]) -> Iterator[Entry]:
    """K-way merge of streams each sorted by ORDER_KEY (the merge of sorted streams is sorted)."""
    return heapq.merge(*streams, key=ORDER_KEY)


class LazyStream(NamedTuple):
    """A sorted stream not opened yet: every entry `open()` yields has ts >= `lower`."""

    lower: int
    open: Callable[[], Iterator[Entry]]


def lazy_merge(streams: Iterable[LazyStream]) -> Iterator[Entry]:
    """K-way merge that opens each stream only when the merge reaches its lower bound.

    Correct because an unopened stream holds nothing below its bound: while the smallest open entry is below
    every pending bound, it is the smallest of all. Streams with bound <= the smallest open ts are opened first
    (an equal ts may still sort before it by receive time). Memory: the streams whose ts ranges overlap the
    current position, one entry each plus what each holds internally.
    """
    pending = sorted(streams, key=itemgetter(0), reverse=True)  # pop() takes the lowest bound
    heap: list[tuple[SortKey, int, Entry, Iterator[Entry]]] = []
    n = 0
    while True:
        while pending and (not heap or pending[-1].lower <= heap[0][0][0]):
            it = pending.pop().open()
            first = next(it, None)
            if first is not None:
                heapq.heappush(heap, (first[0], n, first, it))
                n += 1
        if not heap:
            return
        _key, _n, entry, it = heap[0]
        yield entry
        nxt = next(it, None)
        if nxt is None:
            heapq.heappop(heap)
        else:
            heapq.heapreplace(heap, (nxt[0], n, nxt, it))
            n += 1


def _book_message(rec: BookUpdate) -> BookMessage:
    """The record as the book takes it. The checksum is not re-verified: the recorder did it on OKX's exact
    strings, and replay renders decimals canonically ("30316.0" -> "30316"), which changes the CRC32."""
    action = str(rec.action)
    if action == CHECKPOINT:
        # A checkpoint resets like a snapshot but keeps the chain: prevSeqId is null, seqId the last one.
        return BookMessage(True, rec.bids, rec.asks, rec.ts, None, rec.seq_id, None)
    return BookMessage(action == "snapshot", rec.bids, rec.asks, rec.ts, None, rec.seq_id, rec.prev_seq_id)


def _decimal_attrs() -> dict[type[Record], tuple[str, ...]]:
    out: dict[type[Record], tuple[str, ...]] = {}
    for cls, names in DECIMAL_FIELDS.items():
        by_name = {f.encode_name: f.name for f in msgspec.structs.fields(cls)}
        out[cls] = tuple(sorted(by_name[n] for n in names if n in by_name))
    return out


_DECIMAL_ATTRS = _decimal_attrs()


def _canonical_text(text: str) -> str:
    # Only trailing zeros after a point or an exponent make OKX's text differ from the canonical one.
    if ("." in text and text[-1] == "0") or "e" in text or "E" in text or text[-1] == ".":
        try:
            return render_decimal(Decimal(text))
        except InvalidOperation:
            return text
    return text


def _canonical_levels(levels: tuple[BookLevel, ...]) -> tuple[BookLevel, ...]:
    out = []
    changed = False
    for lv in levels:
        px, sz = _canonical_text(lv[0]), _canonical_text(lv[1])
        if px is not lv[0] or sz is not lv[1]:
            changed = True
            out.append((px, sz, lv[2], lv[3]))
        else:
            out.append(lv)
    return tuple(out) if changed else levels


def canonical(record: R) -> R:
    """`record` with every decimal field rendered canonically (archive_schema.render_decimal), so a record
    read from Kafka equals the same record read back from the archive's decimal128 columns."""
    changes: dict[str, object] = {}
    for attr in _DECIMAL_ATTRS.get(type(record), ()):
        value = getattr(record, attr)
        if value:
            text = _canonical_text(value)
            if text is not value:
                changes[attr] = text
    if isinstance(record, BookUpdate):
        asks, bids = _canonical_levels(record.asks), _canonical_levels(record.bids)
        if asks is not record.asks:
            changes["asks"] = asks
        if bids is not record.bids:
            changes["bids"] = bids
    return msgspec.structs.replace(record, **changes) if changes else record


class Books:
    """The books of one replay, keyed by (channel, instId), created on first record (pure state)."""

    __slots__ = ("_books",)

    def __init__(self) -> None:
        self._books: dict[tuple[str, str], OrderBook | SnapshotBook] = {}

    def apply(self, rec: BookUpdate) -> None:
        key = (rec.channel, rec.inst_id)
        book = self._books.get(key)
        if book is None:
            book = OrderBook() if rec.channel in INCREMENTAL_BOOK_CHANNELS else SnapshotBook()
            self._books[key] = book
        if rec.source is Source.REST and isinstance(book, OrderBook):
            # A REST snapshot (the backfill of a book gap) carries no chain position a later ws update
            # links to, so it cannot resync an incremental book; the next ws snapshot or checkpoint does.
            return
        book.apply(_book_message(rec))

    def invalidate(self, channel: str, inst_id: str | None) -> None:
        if inst_id is None:
            return
        key = (channel, inst_id)
        book = self._books.get(key)
        if isinstance(book, OrderBook):
            book.invalidate()
        elif book is not None:
            self._books[key] = SnapshotBook()  # stale until the next complete message

    def snapshots(self, ts: int, depth: int) -> list[BookSnapshot]:
        """Every valid book's top `depth`, in (channel, instId) order, stamped `ts`."""
        out = []
        for (channel, inst_id), book in sorted(self._books.items(), key=itemgetter(0)):
            if not book.valid:
                continue
            last = book.last_good
            out.append(BookSnapshot(
                channel=channel, inst_id=inst_id, ts=ts, seq_id=last.seq_id if last is not None else None,
                depth=depth, bids=tuple((lv[0], lv[1]) for lv in book.bids(depth)),
                asks=tuple((lv[0], lv[1]) for lv in book.asks(depth))))
        return out

    def book(self, channel: str, inst_id: str) -> OrderBook | SnapshotBook | None:
        return self._books.get((channel, inst_id))


def replay_items(
    streams: Iterable[Iterable[Entry]],
    gaps: Iterable[Entry],
    *,
    start: int,
    end: int,
    view: View = View.REPAIRED,
    book_snapshots: BookSnapshots | None = None,
    instruments: frozenset[str] | None = None,
    channels: frozenset[str] | None = None,
    books: Books | None = None,
    initial_books: bool = False,
) -> Iterator[Item]:
    """The items of [start, end) in the documented order (module docstring).

    Entries before `start` are fed to the books (a seek goes back to a snapshot or checkpoint) but not
    yielded; entries at or after `end` stop the replay. `gaps` are sorted gap entries (`gap_entries`).
    `initial_books`: first yield every book valid at `start`, full depth, stamped `start` (what an engine
    that takes deltas needs to start mid-stream).
    """
    # Books only matter to what is yielded through snapshots: without them (and no caller's books to keep
    # up to date) they are not rebuilt, which is a third of the item path's time.
    track_books = books is not None or book_snapshots is not None or initial_books
    books = books if books is not None else Books()
    repaired = view is View.REPAIRED
    interval = book_snapshots.interval_ms if book_snapshots is not None else 0
    depth = book_snapshots.depth if book_snapshots is not None else 0
    next_boundary = -(-start // interval) * interval if interval else end
    seen: set[str] = set()  # recordIds of the current ts
    seen_keys: set[str] = set()  # event keys of the current ts
    seen_ts: int | None = None
    pending_initial = initial_books
    filtered = instruments is not None or channels is not None
    rest = Source.REST
    # record_event_key, inlined (the loop runs once per item): the stored key, else the type's own function.
    key_functions: dict[type[Record], Callable[[Record], str] | None] = {}
    horizon = min(start if pending_initial else end, end, next_boundary)
    sources = [*streams, gaps] if not isinstance(gaps, list) or gaps else list(streams)
    for (ts, _recv, _t, _p, _o), rec in (sources[0] if len(sources) == 1 else merge(sources)):
        if ts >= horizon:  # one comparison per item for the three bounds below
            if pending_initial and ts >= start:
                pending_initial = False
                yield from books.snapshots(start, FULL_DEPTH)
            if ts >= end:
                break
            while next_boundary <= ts:
                yield from books.snapshots(next_boundary, depth)
                next_boundary += interval
            horizon = min(start if pending_initial else end, end, next_boundary)
        if not isinstance(rec, OkxRecord):
            if not isinstance(rec, GapEvent):
                continue
            if repaired and rec.status is GapStatus.FILLED:
                continue
            if (instruments is not None and rec.inst_id not in instruments) or (
                channels is not None and rec.channel not in channels
            ):
                continue
            if track_books and rec.channel in BOOK_CHANNELS:
                books.invalidate(rec.channel, rec.inst_id)
            yield rec
            continue
        if filtered and ((instruments is not None and rec.inst_id not in instruments) or (
            channels is not None and rec.channel not in channels
        )):
            continue
        if rec.source is rest and not repaired:
            continue
        rid = rec.record_id
        new_ts = ts != seen_ts
        if new_ts:  # the first record of its ts is no duplicate: the sets start again with its keys
            seen_ts = ts
            seen = {rid}
        elif rid in seen:
            continue
        else:
            seen.add(rid)
        ek = rec.event_key  # every market and private record type declares it (tests/unit/test_records.py)
        if ek is None:
            cls = type(rec)
            if cls in key_functions:
                compute = key_functions[cls]
            else:
                compute = key_functions[cls] = event_key_function(cls) if has_event_key(cls) else None
            ek = compute(rec) if compute is not None else None
        if new_ts:
            seen_keys = set() if ek is None else {ek}
        elif ek is not None:
            if ek in seen_keys:
                continue
            seen_keys.add(ek)
        if track_books and isinstance(rec, BookUpdate) and rec.channel in BOOK_CHANNELS:
            books.apply(rec)
        if ts >= start:
            yield rec
    if pending_initial:
        yield from books.snapshots(start, FULL_DEPTH)
    while next_boundary < end:
        yield from books.snapshots(next_boundary, depth)
        next_boundary += interval


def archive_gap(path: str, reason: str, channel: str, inst_id: str | None, start: int, end: int) -> GapEvent:
    """A gap item for an archive file that could not be read (`--lenient`): bounded by the window."""
    return GapEvent(gap_id=f"archive:{path}", kind=GapKind.OTHER, status=GapStatus.UNFILLABLE,
                    reason=f"archive file {path} could not be read: {reason}", channel=channel, inst_id=inst_id,
                    before=StreamPosition(ts=start), after=StreamPosition(ts=end), detected_ts_ns=start * 1_000_000)
