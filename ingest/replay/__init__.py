"""Replay recorded OKX streams for backtests: one API over Kafka and the archive (docs/REPLAY.md).

    from ingest.replay import replay
    for item in replay("kafka://127.0.0.1:9092", "2026-12-01T10:00Z", "2026-12-01T11:00Z",
                       instruments=["BTC-USDT"], book_snapshots=(10, 1000)):
        ...

Items are the normalized records (`Trade`, `BookUpdate`, `Ticker`, ...), `GapEvent`s (latest revision, at their
position) and computed `BookSnapshot`s, in the total order of `ingest.core.replay`. `.batches()` gives the same
stream as Arrow record batches. Kafka and the archive give the same items for the same window.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
from collections.abc import Callable, Coroutine, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol, TypeVar

import pyarrow as pa

from ingest.config import KafkaSettings, Settings
from ingest.core.records import (
    BookAction,
    BookUpdate,
    GapEvent,
    GapStatus,
    OkxRecord,
    RawFrame,
    RawFrames,
    Record,
    Source,
    TopicKind,
)
from ingest.core.replay import (
    BookSnapshot,
    BookSnapshots,
    Entry,
    Item,
    LazyStream,
    SortKey,
    View,
    gap_entries,
    gap_position_ts,
    lazy_merge,
    replay_items,
)
from ingest.errors import IngestError
from ingest.okx.channels import BOOK_CHANNELS, INCREMENTAL_BOOK_CHANNELS, endpoint_for, is_candle
from ingest.replay._archive import ArchiveSource
from ingest.replay._kafka import REORDER_MARGIN_MS, KafkaReader, KafkaStreams, OnLate, SourceError

if TYPE_CHECKING:
    from ingest.replay._arrow import SliceCount

__all__ = [
    "BookSnapshot",
    "BookSnapshots",
    "GapEvent",
    "Item",
    "Replay",
    "ReplayError",
    "SourceError",
    "View",
    "kinds_for_channels",
    "parse_time",
    "replay",
]

T = TypeVar("T")

#: First lookback for a book's last snapshot or checkpoint before `start` (two checkpoint intervals).
BOOK_LOOKBACK_MS = 120_000
#: Longest lookback: a book with no snapshot or checkpoint in the day before `start` starts invalid.
BOOK_LOOKBACK_MAX_MS = 86_400_000


class ReplayError(IngestError):
    """A replay request that cannot be served as asked (bad window, unknown instrument or channel)."""


def parse_time(value: int | str | datetime) -> int:
    """Epoch ms of an int (ms), a datetime (naive = UTC) or an ISO-8601 text (UTC when no zone is given)."""
    if isinstance(value, int):
        return value
    if isinstance(value, str):
        try:
            value = datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            raise ReplayError(f"not an ISO-8601 time: {value!r} (e.g. 2026-12-01T10:00:00Z)") from None
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    return int(value.timestamp() * 1000)


_CHANNEL_KIND: dict[str, TopicKind] = {
    "trades": TopicKind.TRADES, "trades-all": TopicKind.TRADES, "tickers": TopicKind.TICKERS,
    "mark-price": TopicKind.MARK_PRICES, "index-tickers": TopicKind.INDEX_TICKERS,
    "funding-rate": TopicKind.FUNDING_RATES, "open-interest": TopicKind.OPEN_INTEREST,
    "liquidation-orders": TopicKind.LIQUIDATIONS, "price-limit": TopicKind.PRICE_LIMITS,
    "instruments": TopicKind.INSTRUMENTS, "orders": TopicKind.ORDERS, "fills": TopicKind.FILLS,
    "positions": TopicKind.POSITIONS, "account": TopicKind.BALANCES, "orders-algo": TopicKind.ALGO_ORDERS,
    **dict.fromkeys(BOOK_CHANNELS, TopicKind.BOOKS),
}
#: The topics that hold records of a channel (everything but gaps, dead letters and raw frames).
DATA_KINDS: tuple[TopicKind, ...] = tuple(k for k in TopicKind if k not in (TopicKind.GAPS, TopicKind.DLQ,
                                                                            TopicKind.RAW))


def kinds_for_channels(channels: Iterable[str] | None) -> tuple[TopicKind, ...]:
    """The topics to read for `channels` (all data topics when None); unknown channels raise ReplayError."""
    if channels is None:
        return DATA_KINDS
    kinds: list[TopicKind] = []
    for channel in channels:
        kind = TopicKind.CANDLES if is_candle(channel) else _CHANNEL_KIND.get(channel)
        if channel == "balance_and_position":
            kinds += [TopicKind.BALANCES, TopicKind.POSITIONS]
            continue
        if kind is None:
            known = "unknown OKX channel" if endpoint_for(channel) is None else "a channel replay does not record"
            raise ReplayError(f"--channel {channel!r}: {known}; e.g. trades, books, tickers, candle1m")
        kinds.append(kind)
    return tuple(dict.fromkeys(kinds))


class _Reader(Protocol):
    name: str

    def gaps(self, instruments: frozenset[str] | None) -> list[tuple[GapEvent, str, int, int]]: ...

    def streams(self, kind: TopicKind, lo: int, hi: int, keep: Callable[[Record], bool] | None,
                instruments: frozenset[str] | None, rest_horizon: int | None,
                on_late: OnLate = None) -> tuple[list[LazyStream], bool]: ...

    def problems(self) -> list[GapEvent]: ...

    def instruments(self) -> set[str] | None: ...

    def close(self) -> None: ...


def _keep_all(_record: Record) -> bool:
    return True


def _in_thread(coro: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine on a private event loop: the API is synchronous and may be called inside a loop."""
    with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="replay-kafka") as pool:
        return pool.submit(asyncio.run, coro).result()


class _KafkaReader:
    def __init__(self, kafka: KafkaSettings, bootstrap: str | None, exact_decimals: bool = False) -> None:
        self._reader = KafkaReader(kafka, bootstrap, exact_decimals=exact_decimals)
        self.name = f"kafka://{self._reader.bootstrap}"
        self._topics: set[str] | None = None
        self._session: KafkaStreams | None = None

    def _has(self, kind: TopicKind) -> bool:
        if self._topics is None:
            self._topics = _in_thread(self._reader.topics())
        return self._reader.topic(kind) in self._topics

    def gaps(self, instruments: frozenset[str] | None) -> list[tuple[GapEvent, str, int, int]]:
        if not self._has(TopicKind.GAPS):
            return []
        return [g for g in _in_thread(self._reader.read_gaps()) if instruments is None or g[0].inst_id in instruments]

    def streams(self, kind: TopicKind, lo: int, hi: int, keep: Callable[[Record], bool] | None,
                instruments: frozenset[str] | None, rest_horizon: int | None,
                on_late: OnLate = None) -> tuple[list[LazyStream], bool]:
        if not self._has(kind):
            return [], True
        if self._session is None:
            self._session = KafkaStreams(self._reader)
        return self._session.open(kind, lo, hi, keep if keep is not None else _keep_all, rest_horizon, on_late)

    def problems(self) -> list[GapEvent]:
        return []

    def instruments(self) -> set[str] | None:
        return None

    def close(self) -> None:
        if self._session is not None:
            self._session.close()
            self._session = None


class _ArchiveReader:
    def __init__(self, root: str | Path, lenient: bool, settings: Settings | None, window: tuple[int, int]) -> None:
        archive = (settings or Settings()).archive
        self._source = ArchiveSource(root, lenient=lenient, endpoint_override=archive.s3_endpoint_override,
                                     region=archive.s3_region)
        self._source.window = window
        self.name = self._source.name

    @property
    def source(self) -> ArchiveSource:
        return self._source

    def gaps(self, instruments: frozenset[str] | None) -> list[tuple[GapEvent, str, int, int]]:
        return self._source.read_gaps(instruments)

    def streams(self, kind: TopicKind, lo: int, hi: int, keep: Callable[[Record], bool] | None,
                instruments: frozenset[str] | None, rest_horizon: int | None,
                on_late: OnLate = None) -> tuple[list[LazyStream], bool]:
        # Backfilled rows need no horizon here, and nothing is ever late: each row group is sorted whole.
        return self._source.streams(kind, lo, hi, keep, instruments)

    def problems(self) -> list[GapEvent]:
        return list(self._source.problems)

    def instruments(self) -> set[str] | None:
        return {i for kind in self._source.kinds() if kind is not TopicKind.GAPS
                for i in self._source.instruments(kind)}

    def close(self) -> None:
        pass


def _open(source: str | Path | Settings, settings: Settings | None, lenient: bool, exact: bool,
          window: tuple[int, int]) -> _Reader:
    if isinstance(source, Settings):
        return _KafkaReader(source.kafka, None, exact)
    text = str(source)
    if text == "kafka" or text.startswith("kafka://"):
        kafka = (settings or Settings()).kafka
        return _KafkaReader(kafka, text[len("kafka://"):] or None if text != "kafka" else None, exact)
    return _ArchiveReader(source, lenient, settings, window)


@dataclass
class ReplayStats:
    """What a finished iteration yielded (the CLI's summary line)."""

    items: int = 0
    gaps: int = 0
    snapshots: int = 0
    first_ts: int | None = None
    last_ts: int | None = None
    by_type: dict[str, int] = field(default_factory=dict)
    #: Kafka records of the window left out because they reached their partition more than REORDER_MARGIN_MS
    #: out of exchange-time order (after later records had been yielded): counted so a hole is never silent.
    late: int = 0
    #: The same for book records before `start` (the lookback to the last checkpoint): not items of the
    #: window, but the books missed them (a missed update breaks the chain until the next checkpoint).
    late_lookback: int = 0
    #: Recorded frames (okx.raw, from Kafka) left out of the last raw-frame read (`raw_stream`) for arriving
    #: too late, as `late` counts records: `replay serve` re-renders the records they carried instead of sending
    #: them verbatim. Set by that read, kept by the iterations that follow it (serve runs both at once).
    late_raw: int = 0


class Replay:
    """An iterable replay of one window; each iteration reads the source again (identically), streaming:
    memory does not grow with the window (docs/REPLAY.md, "Memory")."""

    def __init__(self, source: str | Path | Settings, start: int, end: int, *, instruments: frozenset[str] | None,
                 channels: frozenset[str] | None, view: View, book_snapshots: BookSnapshots | None,
                 settings: Settings | None, lenient: bool, initial_books: bool, exact_decimals: bool) -> None:
        if start >= end:
            raise ReplayError(f"the window is empty: --from {_iso(start)} is not before --to {_iso(end)}")
        self.kinds = kinds_for_channels(channels)
        self.start, self.end = start, end
        self.instruments, self.channels, self.view = instruments, channels, view
        self.book_snapshots = book_snapshots
        self.initial_books = initial_books
        self._source, self._settings, self._lenient = source, settings, lenient
        self._reader = _open(source, settings, lenient, exact_decimals, (start, end))
        self.source_name = self._reader.name
        #: Kafka: records can reach a partition too late to be placed (`stats.late`); an archive cannot.
        self.from_kafka = isinstance(self._reader, _KafkaReader)
        self.stats = ReplayStats()
        self.problems: list[GapEvent] = []
        #: Where the last iteration began reading the books topic: the last snapshot or checkpoint before
        #: `start` of the books it rebuilds (None: it read no history before `start`).
        self.book_seek_ts: int | None = None

    def _filter(self) -> Callable[[Record], bool] | None:
        """What the sources are asked to keep: None (everything, no call per record) without a filter."""
        if self.instruments is None and self.channels is None and self.view is View.REPAIRED:
            return None
        return self._keep

    def _keep(self, record: Record) -> bool:
        if isinstance(record, OkxRecord):
            if self.instruments is not None and record.inst_id not in self.instruments:
                return False
            if self.channels is not None and record.channel not in self.channels:
                return False
            return not (self.view is View.RECORDED and record.source is Source.REST)
        return True

    def _raw_gaps(self) -> list[tuple[GapEvent, str, int, int]]:
        raw_gaps = self._reader.gaps(self.instruments)
        if self.channels is not None:
            raw_gaps = [g for g in raw_gaps if g[0].channel in self.channels]
        return raw_gaps

    def _plan(self) -> tuple[list[LazyStream], list[Entry]]:
        """The window's lazy streams (nothing read yet but footers and offsets) and its gap entries."""
        raw_gaps = self._raw_gaps()
        # Backfilled records for the window were written when their gap was filled: read until then.
        rest_horizon: int | None = None
        if self.view is View.REPAIRED:
            for gap, *_ in raw_gaps:
                if gap.status in (GapStatus.FILLED, GapStatus.PARTIAL) and gap_position_ts(gap) < self.end:
                    filled = (gap.updated_ts_ns or gap.detected_ts_ns) // 1_000_000
                    rest_horizon = max(rest_horizon or self.end, filled)
        if self.instruments is not None:
            self._check_instruments(self._reader.instruments())
        streams: list[LazyStream] = []
        self.book_seek_ts = None
        for kind in self.kinds:
            lo = self.start
            if kind is TopicKind.BOOKS and (self.book_snapshots is not None or self.initial_books):
                self.book_seek_ts = self._book_seek()
                lo = min(lo, self.book_seek_ts if self.book_seek_ts is not None else lo)
            # Books seeking back are one read from the seek to the end, not a lookback then the window: each
            # record is read, placed and counted (late or not) once; replay_items feeds what precedes `start`
            # to the books only.
            window, _ = self._reader.streams(kind, lo, self.end, self._filter(), self.instruments, rest_horizon,
                                             self._on_late)
            streams += window
        self.problems = self._reader.problems()
        gaps = gap_entries([*raw_gaps, *((p, "_archive", 0, i) for i, p in enumerate(self.problems))],
                           self.start, self.end)
        return streams, gaps

    def _on_late(self, key: SortKey, _record: Record) -> None:
        """A Kafka record left out for arriving too late: a window record, or one of the books' lookback."""
        if key[0] >= self.start:
            self.stats.late += 1
        else:
            self.stats.late_lookback += 1

    def _check_instruments(self, known: set[str] | None) -> None:
        """An instrument the source never recorded is an error (a typo must not look like a quiet market)."""
        if self.instruments is None or known is None or not known:
            return  # Kafka: what the window holds is what we know, checked once it was read; no data at all: said
        missing = sorted(i for i in self.instruments if i not in known)
        if missing:
            have = ", ".join(sorted(i for i in known if i)[:20]) or "none"
            raise ReplayError(f"unknown instrument {', '.join(missing)}: {self.source_name} has no record of it "
                              f"between {_iso(self.start)} and {_iso(self.end)} (it has {have})")

    def _book_seek(self) -> int | None:
        """The ts of the earliest last snapshot or checkpoint before `start` among the incremental books with
        records in the lookback (2 minutes, doubling up to a day until each has one): where the books topic is
        read from. A scan that keeps no record: memory stays flat however far back it goes. It counts no late
        record either (no `on_late`): the read from the seek on meets the same records and counts them once."""
        last_reset: dict[tuple[str, str | None], int] = {}
        seen: set[tuple[str, str | None]] = set()
        hi, lookback = self.start, BOOK_LOOKBACK_MS
        while True:
            lo = self.start - lookback
            streams, at_begin = self._reader.streams(TopicKind.BOOKS, lo, hi, self._filter(), self.instruments, None)
            for stream in streams:
                for (ts, *_), rec in stream.open():
                    if not isinstance(rec, BookUpdate) or rec.channel not in INCREMENTAL_BOOK_CHANNELS:
                        continue
                    key = (rec.channel, rec.inst_id)
                    seen.add(key)
                    if rec.source is Source.WS and str(rec.action) in (BookAction.SNAPSHOT, "checkpoint"):
                        last_reset[key] = max(last_reset.get(key, ts), ts)
            if seen <= last_reset.keys() or at_begin or lookback >= BOOK_LOOKBACK_MAX_MS:
                return min(last_reset.values(), default=None)
            hi, lookback = lo, lookback * 2

    def _new_stats(self) -> ReplayStats:
        """Fresh counts for an iteration; the raw-frame read's count is its own (`ReplayStats.late_raw`)."""
        self.stats = ReplayStats(late_raw=self.stats.late_raw)
        return self.stats

    def __iter__(self) -> Iterator[Item]:
        stats = self._new_stats()
        try:
            streams, gaps = self._plan()
            seen: set[str] = set()  # the instruments yielded, checked against the asked ones (Kafka only)
            from_kafka = isinstance(self._reader, _KafkaReader)
            # The sources and _plan filtered instruments and channels already, so archive problems (gaps named
            # after a dataset, not a channel) pass.
            for item in replay_items([lazy_merge(streams)], gaps, start=self.start, end=self.end, view=self.view,
                                     book_snapshots=self.book_snapshots, initial_books=self.initial_books):
                stats.items += 1
                if isinstance(item, OkxRecord):  # most items: one check
                    ts = item.ts
                    if from_kafka and item.inst_id is not None:
                        seen.add(item.inst_id)
                elif isinstance(item, GapEvent):
                    ts = gap_position_ts(item)
                    stats.gaps += 1
                else:
                    ts = item.ts
                    stats.snapshots += 1
                if stats.first_ts is None:
                    stats.first_ts = ts
                stats.last_ts = ts
                yield item
            self.problems = self._reader.problems()
            if from_kafka:
                self._check_instruments(seen)
        finally:
            self._reader.close()

    def batches(self, batch_size: int = 65_536) -> Iterator[pa.RecordBatch]:
        """The same stream as Arrow record batches of the flat row schema (docs/REPLAY.md, "Formats").

        From an archive, for trades and books without computed books, the rows come straight from the files'
        columns (ingest/replay/_arrow.py), one time slice at a time; otherwise from the items. Both stream.
        """
        from ingest.replay.formats import arrow_batches

        if isinstance(self._reader, _ArchiveReader) and self.book_snapshots is None and not self.initial_books:
            from ingest.replay._arrow import fast_batches

            self._check_instruments(self._reader.instruments())
            self._new_stats()
            fast = fast_batches(self._reader.source, self.kinds, self.start, self.end, self.view,
                                self.instruments, self.channels, self._gap_entries, batch_size,
                                lambda lo: arrow_batches(self._items_from(lo), batch_size), self._count_slice)
            if fast is not None:
                return fast
        return arrow_batches(iter(self), batch_size)

    def raw_frames(self) -> dict[tuple[str, int], bytes]:
        """The window's recorded frames (okx.raw, verbatim) by (connId, recvSeq), held whole (`raw_stream` read
        to its end); empty when the source has none."""
        return {key: payload for _ts, key, payload in self.raw_stream()}

    def raw_stream(self) -> Iterator[tuple[int, tuple[str, int], bytes]]:
        """The window's recorded frames (okx.raw, verbatim) in the order they reached the source (receive time),
        read as they are consumed: (the Kafka ts in ms of the raw record that carried the frame, (connId,
        recvSeq), payload), what `replay serve` sends instead of re-rendering. Raw records carry receive time
        only, so the read reaches REORDER_MARGIN_MS beyond the window on both sides. It has a reader of its own,
        so it runs beside an iteration of the items. Frames that reached Kafka too late to place are counted in
        `stats.late_raw` (their records are re-rendered)."""
        reader = _open(self._source, self._settings, self._lenient, False, (self.start, self.end))
        self.stats.late_raw = 0
        try:
            streams, _ = reader.streams(TopicKind.RAW, self.start - REORDER_MARGIN_MS, self.end + REORDER_MARGIN_MS,
                                        lambda _r: True, None, None, self._on_late_raw)
            for (ts, *_), rec in lazy_merge(streams):
                if isinstance(rec, RawFrames):
                    for f in rec.frames:
                        yield ts, (rec.conn_id, f.recv_seq), f.payload
                elif isinstance(rec, RawFrame):
                    yield ts, (rec.conn_id, rec.recv_seq), rec.payload
        finally:
            reader.close()

    def _on_late_raw(self, _key: SortKey, record: Record) -> None:
        self.stats.late_raw += len(record.frames) if isinstance(record, RawFrames) else 1

    def _items_from(self, lo: int) -> Iterator[Item]:
        """The item path over [lo, end), without the gaps that sort before `lo` (given already)."""
        rest = Replay(self._source, lo, self.end, instruments=self.instruments, channels=self.channels,
                      view=self.view, book_snapshots=None, settings=self._settings, lenient=self._lenient,
                      initial_books=False, exact_decimals=False)
        from ingest.replay._arrow import SliceCount

        for item in rest:  # counted as the iterator counts (the columns path counted the slices before `lo`)
            if not (isinstance(item, GapEvent) and gap_position_ts(item) < lo):
                ts = gap_position_ts(item) if isinstance(item, GapEvent) else item.ts
                self._count_slice(SliceCount(1, int(isinstance(item, GapEvent)), ts, ts))
                yield item
        self.problems = rest.problems

    def _count_slice(self, count: SliceCount) -> None:
        """`.batches()` from the columns: a slice's (or, past one the columns cannot give, an item's) count added
        to `stats` as the item iterator would have counted it."""
        stats = self.stats
        stats.items += count.items
        stats.gaps += count.gaps
        if stats.first_ts is None:
            stats.first_ts = count.first_ts
        if count.last_ts is not None:
            stats.last_ts = count.last_ts

    def _gap_entries(self) -> list[Entry]:
        raw_gaps = self._raw_gaps()
        self.problems = self._reader.problems()
        return gap_entries([*raw_gaps, *((p, "_archive", 0, i) for i, p in enumerate(self.problems))],
                           self.start, self.end)


def _iso(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, tz=UTC).isoformat().replace("+00:00", "Z")


def replay(
    source: str | Path | Settings,
    start: int | str | datetime,
    end: int | str | datetime,
    *,
    instruments: Iterable[str] | None = None,
    channels: Iterable[str] | None = None,
    view: View | Literal["repaired", "recorded"] = "repaired",
    book_snapshots: BookSnapshots | tuple[int, int] | None = None,
    settings: Settings | None = None,
    lenient: bool = False,
    initial_books: bool = False,
    exact_decimals: bool = False,
) -> Replay:
    """A replay of [start, end) (docs/REPLAY.md).

    `source`: `"kafka"` (the Kafka settings of `settings`), `"kafka://HOST:PORT"` (those settings with another
    bootstrap address), a `Settings`, or an archive root (a path or `s3://bucket/prefix`). `book_snapshots`:
    `(depth, interval_ms)`. `lenient`: an unreadable archive file becomes a gap item instead of an error.
    `initial_books`: first yield every book valid at `start` in full. `exact_decimals`: keep OKX's strings
    from Kafka ("100.50") instead of the canonical rendering both sources share ("100.5"); the archive
    stores decimal values, so it always renders canonically.
    """
    snaps = BookSnapshots(*book_snapshots) if isinstance(book_snapshots, tuple) else book_snapshots
    try:
        the_view = View(view)
    except ValueError:
        raise ReplayError(f"view {view!r}: expected repaired or recorded") from None
    return Replay(source, parse_time(start), parse_time(end),
                  instruments=frozenset(instruments) if instruments is not None else None,
                  channels=frozenset(channels) if channels is not None else None, view=the_view,
                  book_snapshots=snaps, settings=settings, lenient=lenient, initial_books=initial_books,
                  exact_decimals=exact_decimals)
