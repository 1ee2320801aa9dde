"""Backfill planning, pure: which gaps to fetch together, how to walk OKX's history, what to publish.

The worker (`services/backfill/`) passes gap events and REST pages in; every decision is made here, with
time passed in and no I/O.

Windows (what one gap asks for, in its stream's own coordinates; conventions of core/gaps.py):
* trades, trades-all: the tradeIds strictly between `before.trade_id` (last good id) and `after.trade_id`
  (first id after). A side without an id is bounded by time instead: no `before` -> ts >= the time the gap
  opened; no `after` (the stream did not resume) -> ts <= the time it was detected. Negative tradeIds
  (liquidation and ADL fills, SPEC 4) are outside OKX's id sequence: one is inside a gap when its ts is
  within the gap's time bounds [before.ts, after.ts]. Paging by tradeId returns them at their place in
  time (the simulator's model; OKX does not document it), so an id walk runs until it has reached the
  `before` trade itself, and its cursor follows the ordinary ids. Two adjacent ordinary ids still make an
  empty window (not walked): a liquidation fill alone between them is not looked for.
* candle<bar>: confirmed bars opening in [before.ts, after.ts). The bar at before.ts is included: its
  confirmed version is what a disconnect usually costs. Unconfirmed bars are never published.
* fills, orders: ts (fill time, order uTime) in [before.ts, after.ts].
* funding-rate: the settlements with fundingTime in [before.ts, after.ts], from
  /public/funding-rate-history (SPEC-external, OKX v5 docs: newest first, `after` = older than a fundingTime,
  3 months kept). Each becomes a FundingRate record of the stream (ts = fundingTime, settFundingRate = the
  realized rate, settState settled). The predicted rates pushed between settlements are not kept by OKX;
  the settlements are what the stream's history is, so a covered window is `filled`.
* books: OKX keeps no book history; one fresh /market/books snapshot per stream re-baselines it (status
  partial: the missed increments themselves are gone).
* Everything else (tickers, mark price, positions, balances, algo orders, ...) has no REST history:
  unfillable at once, never retried.

Coalescing: gaps of one stream in one batch are merged into jobs before anything is fetched. Overlapping
windows always merge; tradeId windows also merge when fewer than one page of ids lies between them, and
candle windows when less than one page of bars does, because one walk is then cheaper than two. A job walks
its span once; each row counts for every member window that contains it and is published at most once.

Walks (SPEC 8.3: newest first, `after` = older than the cursor, exclusive):
* history-trades: type 1 (by tradeId) from `after=hi_id`; with only a time upper bound the first page is
  type 2 (`after=hi_ts+1`, by ts) and the walk continues by tradeId from that page's lowest id, because
  paging by ts alone can skip trades sharing a millisecond across a page boundary. The walk is complete
  once a page reaches `lo_id + 1` (nothing can lie strictly between) or, with a time lower bound, holds a
  row older than `lo_ts`; an empty page first means OKX's history ends there (older than it keeps).
* candles / history-candles by bar open time; fills-history and orders-history by billId / ordId with
  begin/end filters, complete on a short page.
A cursor that does not move down stops a walk (a misbehaving server cannot loop it).

Dedupe: the worker reads back what the data topic already holds for the stream into a `Present` set of
natural keys (tradeIds covered, a trades record with tradeId T and count C covering T-C+1..T; confirmed
candle open times; ordId+state; billId and ordId+tradeId), and publishes a row only if none of its keys is
present, adding its keys as it goes.

Statuses: a member window the walk covered is `filled` (even when every row was already in the topic);
one it did not fully cover because of a definitive answer (OKX's history ends before it, it is older than
OKX keeps, OKX refused the request for good) is `partial` if OKX returned any of its rows, `unfillable`
if none. A walk cut short by a transient failure (breaker open or probing, 429/50011, 5xx, timeout,
transport error) decides nothing: the gap stays `open` and is tried again later (`judge(transient=True)`).
"""

from __future__ import annotations

import enum
import re
from collections import defaultdict
from collections.abc import Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass

import msgspec

from ingest.core.records import Candle, Fill, FundingRate, GapEvent, GapStatus, OkxRecord, Order, Source, Trade
from ingest.okx.channels import candle_bar

DAY_MS = 86_400_000

TRADES_PATH = "/api/v5/market/history-trades"
CANDLES_PATH = "/api/v5/market/candles"
HISTORY_CANDLES_PATH = "/api/v5/market/history-candles"
BOOKS_PATH = "/api/v5/market/books"
FILLS_PATH = "/api/v5/trade/fills-history"
ORDERS_PATH = "/api/v5/trade/orders-history"
ORDERS_ARCHIVE_PATH = "/api/v5/trade/orders-history-archive"
FUNDING_PATH = "/api/v5/public/funding-rate-history"

#: How far back each history endpoint reaches (SPEC 8.3; "3 months" taken as 90 days).
HISTORY_KEEP_MS: Mapping[str, int] = {
    TRADES_PATH: 90 * DAY_MS,
    FILLS_PATH: 90 * DAY_MS,
    ORDERS_PATH: 7 * DAY_MS,
    ORDERS_ARCHIVE_PATH: 90 * DAY_MS,
    FUNDING_PATH: 90 * DAY_MS,
}
#: history-candles keeps 1s bars for 3 months only; other bars for "recent years" (no bound known).
ONE_SECOND_BARS_KEEP_MS = 90 * DAY_MS
#: /market/candles serves the latest 1440 bars of each size; older ones come from history-candles.
RECENT_CANDLES = 1440
#: Rows per page (SPEC 8.3 maxima; history-candles: 100, what older docs and clients still say).
PAGE_LIMIT: Mapping[str, int] = {
    TRADES_PATH: 100, CANDLES_PATH: 300, HISTORY_CANDLES_PATH: 100, FILLS_PATH: 100, ORDERS_PATH: 100,
    ORDERS_ARCHIVE_PATH: 100, FUNDING_PATH: 100,
}
#: /market/books depth per side for each book channel's snapshot.
BOOK_DEPTH: Mapping[str, int] = {"books": 400, "books-l2-tbt": 400, "books50-l2-tbt": 50, "books5": 5, "bbo-tbt": 1}
TRADE_CHANNELS = frozenset({"trades", "trades-all"})
INST_TYPES = ("SPOT", "MARGIN", "SWAP", "FUTURES", "OPTION")
#: OKX codes that say "this gap cannot be fetched" (permission, demo, unknown instrument, bad parameter):
#: the gap is unfillable, other gaps are unaffected.
UNFILLABLE_CODES: frozenset[str] = frozenset({"50030", "50120", "50038", "50014", "51000", "51001"})


class DataKind(enum.StrEnum):
    """How a channel's history is fetched back."""

    TRADES = "trades"
    CANDLES = "candles"
    BOOKS = "books"
    FILLS = "fills"
    ORDERS = "orders"
    FUNDING = "funding"


def data_kind(channel: str) -> DataKind | None:
    """The way `channel` is backfilled, or None when OKX's REST API keeps no history of it."""
    if channel in TRADE_CHANNELS:
        return DataKind.TRADES
    if channel.startswith("candle") and candle_bar(channel) is not None:
        return DataKind.CANDLES
    if channel in BOOK_DEPTH:
        return DataKind.BOOKS
    if channel == "fills":
        return DataKind.FILLS
    if channel == "orders":
        return DataKind.ORDERS
    if channel == "funding-rate":
        return DataKind.FUNDING
    return None


_BAR = re.compile(r"^(?P<n>[0-9]+)(?P<unit>[smHDWMY])(?:utc)?$")
_UNIT_MS = {"s": 1_000, "m": 60_000, "H": 3_600_000, "D": DAY_MS, "W": 7 * DAY_MS, "M": 31 * DAY_MS,
            "Y": 366 * DAY_MS}


def bar_ms(bar: str) -> int:
    """The length of one `bar` in ms (months and years rounded up: used for sizing, never for alignment)."""
    m = _BAR.match(bar)
    if m is None:
        raise ValueError(f"not an OKX bar size: {bar!r}")
    return int(m.group("n")) * _UNIT_MS[m.group("unit")]


def candle_path(bar: str, lo_ts: int, now_ms: int) -> str:
    """/market/candles while the range lies within its latest 1440 bars, else /market/history-candles."""
    if bar == "1s" or now_ms - lo_ts >= (RECENT_CANDLES - 1) * bar_ms(bar):
        return HISTORY_CANDLES_PATH
    return CANDLES_PATH


def orders_path(lo_ts: int, now_ms: int) -> str:
    """orders-history keeps 7 days; the archive 3 months."""
    return ORDERS_PATH if lo_ts >= now_ms - HISTORY_KEEP_MS[ORDERS_PATH] else ORDERS_ARCHIVE_PATH


_FUTURES = re.compile(r"-[0-9]{6}$")
_OPTION = re.compile(r"-[0-9]{6}-[0-9.]+-[CP]$")


def inst_types_for(inst_type: str | None, inst_id: str | None) -> tuple[str, ...]:
    """The instTypes to ask fills-history / orders-history for (they require one): the stream's own, else
    what the instId's shape allows (a spot pair trades as SPOT and MARGIN), else all of them."""
    if inst_type and inst_type != "ANY":
        return (inst_type,)
    if inst_id:
        if inst_id.endswith("-SWAP"):
            return ("SWAP",)
        if _OPTION.search(inst_id):
            return ("OPTION",)
        if _FUTURES.search(inst_id):
            return ("FUTURES",)
        return ("SPOT", "MARGIN")
    return INST_TYPES


# ------------------------------------------------------------------------------------------- windows


@dataclass(frozen=True, slots=True, order=True)
class Stream:
    """One backfillable stream: records of `channel` for one instrument (or instType, for private streams)."""

    kind: DataKind
    channel: str
    inst_id: str | None = None
    inst_type: str | None = None

    def __str__(self) -> str:
        return f"{self.channel}:{self.inst_id or self.inst_type or ''}"


@dataclass(frozen=True, slots=True)
class Window:
    """A range of one stream: ts in [lo_ts, hi_ts] on the sides without ids, ids strictly inside (lo_id, hi_id).

    `item` is the caller's handle for the gap (its place in the batch; -1 for a job's span).
    """

    item: int
    lo_ts: int
    hi_ts: int
    lo_id: int | None = None
    hi_id: int | None = None

    def contains(self, ts: int, trade_id: int | None = None) -> bool:
        """Whether a row (its ts, and tradeId for trades) falls strictly inside the gap."""
        if trade_id is not None and trade_id < 0:  # a liquidation/ADL fill: placed by its time only
            return self.lo_ts <= ts <= self.hi_ts
        if self.lo_id is not None:
            if trade_id is None or trade_id <= self.lo_id:
                return False
        elif ts < self.lo_ts:
            return False
        if self.hi_id is not None:
            return trade_id is not None and trade_id < self.hi_id
        return ts <= self.hi_ts

    @property
    def shape(self) -> tuple[bool, bool]:
        """Which sides are bounded by tradeIds (lower, upper)."""
        return self.lo_id is not None, self.hi_id is not None

    @property
    def empty(self) -> bool:
        """Nothing can lie inside: adjacent tradeIds, or a time range that ends before it starts."""
        if self.lo_id is not None and self.hi_id is not None:
            return self.hi_id <= self.lo_id + 1
        if self.lo_id is None and self.hi_id is None:
            return self.hi_ts < self.lo_ts
        return False


def stream_of(gap: GapEvent) -> Stream | None:
    """The stream a gap event is about, or None when its channel cannot be backfilled."""
    kind = data_kind(gap.channel)
    if kind is None:
        return None
    return Stream(kind, gap.channel, gap.inst_id, gap.inst_type)


def window_of(item: int, gap: GapEvent, kind: DataKind) -> Window:
    """The window of one gap event (see the module docstring for each kind)."""
    before, after = gap.before, gap.after
    detected = gap.detected_ts_ns // 1_000_000
    opened = gap.opened_ts_ns // 1_000_000 if gap.opened_ts_ns is not None else detected
    lo_ts = before.ts if before is not None and before.ts is not None else opened
    hi_ts = after.ts if after is not None and after.ts is not None else detected
    lo_id: int | None = None
    hi_id: int | None = None
    if kind is DataKind.TRADES:
        if before is not None and before.trade_id is not None and before.trade_id > 0:
            lo_id = before.trade_id
        if after is not None and after.trade_id is not None and after.trade_id > 0:
            hi_id = after.trade_id
    elif kind is DataKind.CANDLES and after is not None and after.ts is not None:
        hi_ts = after.ts - 1  # the bar at after.ts is live on the stream again
    return Window(item, lo_ts, hi_ts, lo_id, hi_id)


def span_of(windows: Sequence[Window]) -> Window:
    """The smallest window holding all of `windows` (which share one shape)."""
    lo_id = min(w.lo_id for w in windows if w.lo_id is not None) if windows[0].lo_id is not None else None
    hi_id = max(w.hi_id for w in windows if w.hi_id is not None) if windows[0].hi_id is not None else None
    return Window(-1, min(w.lo_ts for w in windows), max(w.hi_ts for w in windows), lo_id, hi_id)


# ---------------------------------------------------------------------------------------------- plans


@dataclass(frozen=True, slots=True)
class Outcome:
    """How one gap ended: its new status, records this run published for it, and a note for humans."""

    status: GapStatus
    records: int
    note: str


@dataclass(frozen=True, slots=True)
class Job:
    """One walk of a stream's history covering `span`, on behalf of the member windows inside it."""

    stream: Stream
    span: Window
    members: tuple[Window, ...]


@dataclass(frozen=True, slots=True)
class Plan:
    """What to fetch (jobs) and what was decided without fetching (by item)."""

    jobs: tuple[Job, ...]
    decided: Mapping[int, Outcome]


def precheck(stream: Stream | None, window: Window, channel: str, now_ms: int) -> Outcome | None:
    """Decide a gap without fetching when possible: no REST history, nothing missing, or older than OKX keeps."""
    if stream is None:
        return Outcome(GapStatus.UNFILLABLE, 0, f"OKX's REST API keeps no history of channel {channel!r}; "
                                                "the stream itself re-baselines it")
    if stream.kind in (DataKind.TRADES, DataKind.CANDLES, DataKind.BOOKS, DataKind.FUNDING) and not stream.inst_id:
        return Outcome(GapStatus.UNFILLABLE, 0, f"gap on {channel!r} names no instId")
    if stream.kind is DataKind.BOOKS:
        return None
    if window.empty:
        return Outcome(GapStatus.FILLED, 0, "nothing is missing between the gap's bounds")
    keep: int | None = None
    what = ""
    if stream.kind is DataKind.TRADES:
        keep, what = HISTORY_KEEP_MS[TRADES_PATH], "history-trades"
    elif stream.kind is DataKind.FILLS:
        keep, what = HISTORY_KEEP_MS[FILLS_PATH], "fills-history"
    elif stream.kind is DataKind.ORDERS:
        keep, what = HISTORY_KEEP_MS[ORDERS_ARCHIVE_PATH], "orders-history-archive"
    elif stream.kind is DataKind.FUNDING:
        keep, what = HISTORY_KEEP_MS[FUNDING_PATH], "funding-rate-history"
    elif candle_bar(channel) == "1s":
        keep, what = ONE_SECOND_BARS_KEEP_MS, "history-candles (1s bars)"
    if keep is not None and window.hi_ts < now_ms - keep:
        return Outcome(GapStatus.UNFILLABLE, 0, f"older than OKX keeps: {what} serves the last {keep // DAY_MS} "
                                                "days only")
    return None


def plan_jobs(gaps: Sequence[tuple[int, GapEvent]], now_ms: int, *, merge_ids: int = 100) -> Plan:
    """Turn a batch of open gap events (item, gap) into coalesced jobs and outright decisions."""
    decided: dict[int, Outcome] = {}
    by_stream: dict[Stream, list[Window]] = defaultdict(list)
    for item, gap in gaps:
        stream = stream_of(gap)
        window = window_of(item, gap, stream.kind) if stream is not None else Window(item, 0, 0)
        verdict = precheck(stream, window, gap.channel, now_ms)
        if verdict is not None:
            decided[item] = verdict
        else:
            assert stream is not None
            by_stream[stream].append(window)
    jobs: list[Job] = []
    for stream in sorted(by_stream):
        jobs.extend(coalesce(stream, by_stream[stream], merge_ids=merge_ids))
    return Plan(tuple(jobs), decided)


def coalesce(stream: Stream, windows: Sequence[Window], *, merge_ids: int = 100) -> list[Job]:
    """Merge the windows of one stream into jobs (see module docstring); every window lands in exactly one."""
    if not windows:
        return []
    if stream.kind is DataKind.BOOKS:
        return [Job(stream, span_of(list(windows)), tuple(windows))]
    merge_ms = 0
    if stream.kind is DataKind.CANDLES:
        bar = candle_bar(stream.channel)
        merge_ms = PAGE_LIMIT[HISTORY_CANDLES_PATH] * bar_ms(bar) if bar is not None else 0
    shapes: dict[tuple[bool, bool], list[Window]] = defaultdict(list)
    for w in windows:
        shapes[w.shape].append(w)
    jobs: list[Job] = []
    for shape in sorted(shapes):
        by_id = shape == (True, True)
        group = sorted(shapes[shape], key=lambda w: (w.lo_id, w.hi_id, w.item) if by_id else (w.lo_ts, w.hi_ts,
                                                                                             w.item))
        current = [group[0]]
        top_id, top_ts = group[0].hi_id, group[0].hi_ts  # the highest upper bounds in `current`
        for w in group[1:]:
            if by_id:
                assert w.lo_id is not None and w.hi_id is not None and top_id is not None
                near = w.lo_id - top_id < merge_ids
            else:
                near = w.lo_ts <= top_ts + merge_ms
            if near:
                current.append(w)
                top_ts = max(top_ts, w.hi_ts)
                if top_id is not None and w.hi_id is not None:
                    top_id = max(top_id, w.hi_id)
            else:
                jobs.append(Job(stream, span_of(current), tuple(current)))
                current = [w]
                top_id, top_ts = w.hi_id, w.hi_ts
        jobs.append(Job(stream, span_of(current), tuple(current)))
    return jobs


# ---------------------------------------------------------------------------------------------- walks


class _Walk:
    """What every history walk tracks: its cursor, the pages it read, and why it ended (if it has)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.cursor: int | None = None
        self.min_ts: int | None = None
        self.pages = 0
        #: Reached the lower bound / history ran out before it / the cursor stopped moving / told to stop.
        self.complete = False
        self.exhausted = False
        self.stalled = False
        self.stopped = False

    @property
    def done(self) -> bool:
        return self.complete or self.exhausted or self.stalled or self.stopped


class TradeWalk(_Walk):
    """A newest-first walk of /market/history-trades down through a job's span (type 2 first page only when
    the span's upper bound is a time)."""

    path = TRADES_PATH

    def __init__(self, inst_id: str, span: Window, limit: int = PAGE_LIMIT[TRADES_PATH]) -> None:
        super().__init__(limit)
        self.inst_id = inst_id
        self.span = span
        self.min_id: int | None = None

    def query(self) -> dict[str, str] | None:
        """The next request's parameters, or None when the walk is over."""
        if self.done:
            return None
        if self.cursor is not None:
            return {"instId": self.inst_id, "type": "1", "after": str(self.cursor), "limit": str(self.limit)}
        if self.span.hi_id is not None:
            return {"instId": self.inst_id, "type": "1", "after": str(self.span.hi_id), "limit": str(self.limit)}
        return {"instId": self.inst_id, "type": "2", "after": str(self.span.hi_ts + 1), "limit": str(self.limit)}

    def feed(self, page: Sequence[tuple[int, int]]) -> None:
        """One page's (tradeId, ts) pairs, as returned."""
        self.pages += 1
        if not page:
            self.exhausted = True
            return
        ordinary = [tid for tid, _ in page if tid > 0]
        # The cursor follows the ordinary ids; a page of liquidation fills only pages on from its oldest row.
        low = min(ordinary) if ordinary else page[-1][0]
        if self.cursor is not None and (low >= self.cursor if low > 0 and self.cursor > 0 else low == self.cursor):
            self.stalled = True
            return
        self.cursor = low
        if ordinary:
            self.min_id = low if self.min_id is None else min(self.min_id, low)
        low_ts = min(ts for _, ts in page)
        self.min_ts = low_ts if self.min_ts is None else min(self.min_ts, low_ts)
        self.complete = self.covers(self.span)

    def covers(self, w: Window) -> bool:
        """Whether every row of `w` has been returned by the pages so far."""
        if self.complete:
            return True
        if w.lo_id is not None:  # down to the `before` trade itself: fills at its place come with it
            # (or to the first id after it when OKX keeps nothing older: then nothing older is to be had)
            return self.min_id is not None and (self.min_id <= w.lo_id
                                                or (self.exhausted and self.min_id <= w.lo_id + 1))
        return self.min_ts is not None and self.min_ts < w.lo_ts

    def stop(self) -> None:
        self.stopped = True


class CandleWalk(_Walk):
    """A newest-first walk of /market/(history-)candles by bar open time down to the span's lower bound."""

    def __init__(self, inst_id: str, bar: str, span: Window, path: str) -> None:
        super().__init__(PAGE_LIMIT[path])
        self.inst_id = inst_id
        self.bar = bar
        self.span = span
        self.path = path

    def query(self) -> dict[str, str] | None:
        if self.done:
            return None
        after = self.cursor if self.cursor is not None else self.span.hi_ts + 1
        return {"instId": self.inst_id, "bar": self.bar, "after": str(after), "limit": str(self.limit)}

    def feed(self, opens: Sequence[int]) -> None:
        """One page's bar open times."""
        self.pages += 1
        if not opens:
            self.exhausted = True
            return
        low = min(opens)
        if self.cursor is not None and low >= self.cursor:
            self.stalled = True
            return
        self.cursor = low
        self.min_ts = low if self.min_ts is None else min(self.min_ts, low)
        self.complete = low <= self.span.lo_ts

    def covers(self, w: Window) -> bool:
        return self.complete or (self.min_ts is not None and self.min_ts <= w.lo_ts)

    def stop(self) -> None:
        self.stopped = True


class FundingWalk(_Walk):
    """A newest-first walk of /public/funding-rate-history by fundingTime down to the span's lower bound."""

    path = FUNDING_PATH

    def __init__(self, inst_id: str, span: Window) -> None:
        super().__init__(PAGE_LIMIT[FUNDING_PATH])
        self.inst_id = inst_id
        self.span = span

    def query(self) -> dict[str, str] | None:
        if self.done:
            return None
        after = self.cursor if self.cursor is not None else self.span.hi_ts + 1
        return {"instId": self.inst_id, "after": str(after), "limit": str(self.limit)}

    def feed(self, times: Sequence[int]) -> None:
        """One page's fundingTimes."""
        self.pages += 1
        if not times:
            self.exhausted = True
            return
        low = min(times)
        if self.cursor is not None and low >= self.cursor:
            self.stalled = True
            return
        self.cursor = low
        self.min_ts = low if self.min_ts is None else min(self.min_ts, low)
        self.complete = low <= self.span.lo_ts

    def covers(self, w: Window) -> bool:
        return self.complete or (self.min_ts is not None and self.min_ts <= w.lo_ts)

    def stop(self) -> None:
        self.stopped = True


class CursorWalk(_Walk):
    """A newest-first walk by id cursor (`after` = billId / ordId) within server-side begin/end filters:
    complete on a page shorter than the limit (it is never `exhausted`: the filters bound it)."""

    def __init__(self, path: str, params: Mapping[str, str], floor_ts: int | None = None) -> None:
        super().__init__(PAGE_LIMIT[path])
        self.path = path
        self.params = dict(params)
        #: The oldest time the endpoint still keeps: windows reaching below it are not covered.
        self.floor_ts = floor_ts

    def query(self) -> dict[str, str] | None:
        if self.done:
            return None
        q = {**self.params, "limit": str(self.limit)}
        if self.cursor is not None:
            q["after"] = str(self.cursor)
        return q

    def feed(self, ids: Sequence[int]) -> None:
        self.pages += 1
        if len(ids) < self.limit:
            self.complete = True
        if not ids:
            return
        low = min(ids)
        if self.cursor is not None and low >= self.cursor:
            self.stalled = True
            self.complete = False
            return
        self.cursor = low

    def covers(self, w: Window) -> bool:
        return self.complete and (self.floor_ts is None or w.lo_ts >= self.floor_ts)

    def stop(self) -> None:
        self.stopped = True


# ---------------------------------------------------------------------------------------------- dedupe


class Present:
    """Natural keys of what a topic already holds for one stream, plus what this run has published."""

    __slots__ = ("_keys",)

    def __init__(self, keys: Iterable[Hashable] = ()) -> None:
        self._keys: set[Hashable] = set(keys)

    def __len__(self) -> int:
        return len(self._keys)

    def __contains__(self, key: object) -> bool:
        return key in self._keys

    def has_any(self, keys: Iterable[Hashable]) -> bool:
        return any(k in self._keys for k in keys)

    def add_all(self, keys: Iterable[Hashable]) -> None:
        self._keys.update(keys)

    def first_time(self, keys: Sequence[Hashable]) -> bool:
        """True (and remember `keys`) when none of them is present: publish; False: a duplicate."""
        if self.has_any(keys):
            return False
        self._keys.update(keys)
        return True


def covered_trade_ids(trade_id: int, count: int | None) -> range:
    """The tradeIds one trades record covers: T-C+1..T for an aggregated record (SPEC 5), else T."""
    n = count if count is not None and count > 0 and trade_id > 0 else 1
    return range(trade_id - n + 1, trade_id + 1)


def _int(text: str | None) -> int | None:
    if text is None:
        return None
    try:
        return int(text)
    except ValueError:
        return None


def natural_keys(record: OkxRecord) -> list[Hashable]:
    """The keys under which a record counts as already published (see module docstring)."""
    if isinstance(record, Trade):
        tid = _int(record.trade_id)
        if tid is None:
            return [("trade", record.trade_id)]
        return [("t", i) for i in covered_trade_ids(tid, _int(record.count))]
    if isinstance(record, Candle):
        return [("c", record.ts)] if record.confirm else []
    if isinstance(record, FundingRate):  # a settlement published from REST; pushes settle nothing by time
        return [("fs", record.funding_time)] if record.source is Source.REST and record.funding_time else []
    if isinstance(record, Order):
        return [("o", record.ord_id, record.state or "")]
    if isinstance(record, Fill):
        keys: list[Hashable] = [("b", record.bill_id)] if record.bill_id else []
        tid = _int(record.trade_id)
        if tid is None:
            keys.append(("f", record.ord_id, record.trade_id))
        else:
            keys.extend(("f", record.ord_id, str(i)) for i in covered_trade_ids(tid, _int(record.count)))
        return keys
    return []


@dataclass(frozen=True, slots=True)
class ReadbackScope:
    """Which records read back from a topic matter for one stream's jobs, so memory stays bounded by them."""

    stream: Stream
    lo_ts: int
    hi_ts: int
    lo_id: int | None = None
    hi_id: int | None = None

    @classmethod
    def of(cls, stream: Stream, jobs: Sequence[Job], margin_ms: int) -> ReadbackScope:
        spans = [j.span for j in jobs]
        ids = all(s.lo_id is not None and s.hi_id is not None for s in spans)
        lo_id = min(s.lo_id for s in spans if s.lo_id is not None) if ids else None
        hi_id = max(s.hi_id for s in spans if s.hi_id is not None) if ids else None
        return cls(stream, min(s.lo_ts for s in spans) - margin_ms, max(s.hi_ts for s in spans) + margin_ms,
                   lo_id, hi_id)

    @property
    def since_ts(self) -> int:
        """Read the topic from the first offset with a timestamp at or after this (every record this scope
        can need has a ts at or after it)."""
        return self.lo_ts

    def keys(self, record: OkxRecord) -> list[Hashable]:
        """The natural keys of `record` that concern this scope (none for other streams)."""
        s = self.stream
        if record.channel != s.channel:
            return []
        if s.inst_id is not None and record.inst_id != s.inst_id:
            return []
        if s.inst_type not in (None, "ANY") and record.inst_type not in (None, s.inst_type):
            return []
        if isinstance(record, Trade) and self.lo_id is not None and self.hi_id is not None:
            lo, hi = self.lo_id, self.hi_id
            if not self.lo_ts <= record.ts <= self.hi_ts:  # liquidation fills are placed by time
                return [k for k in natural_keys(record) if isinstance(k, tuple) and k[0] == "t"
                        and isinstance(k[1], int) and lo < k[1] < hi]
            return [k for k in natural_keys(record) if isinstance(k, tuple) and k[0] == "t"
                    and isinstance(k[1], int) and (lo < k[1] < hi or k[1] < 0)]
        if not self.lo_ts <= record.ts <= self.hi_ts:
            return []
        return natural_keys(record)


# --------------------------------------------------------------------------------------------- outcomes


def judge(*, covered: bool, found: int, published: int, shortfall: str, transient: bool = False) -> Outcome:
    """The status of one gap after its walk: `found` rows of it came back, `published` were new.

    `transient`: the walk ended on a failure that says nothing about what OKX keeps (breaker, 429/50011, 5xx,
    timeout, transport, a slow read-back). Such a gap is never decided: it stays `open` (a new revision for
    the worker to take up again later), whatever the walk found so far.
    """
    known = found - published
    done = f"{published} records backfilled" + (f", {known} already in the topic" if known else "")
    if covered:
        return Outcome(GapStatus.FILLED, published, done)
    if transient:
        return Outcome(GapStatus.OPEN, published, f"still open, retried later: {shortfall}; {done}")
    return Outcome(GapStatus.PARTIAL if found else GapStatus.UNFILLABLE, published, f"{shortfall}; {done}")


def retry_delay(backoff_s: float, retry_after_s: float | None, cap_s: float) -> float:
    """How long a gap waits before its next try after a transient failure: the growing backoff, or longer
    when the failure names its own wait (an open breaker's cooldown), never beyond `cap_s` and never 0."""
    return min(cap_s, max(backoff_s, retry_after_s or 0.0))


def status_update(gap: GapEvent, outcome: Outcome, *, attempts: int, now_ns: int) -> GapEvent:
    """The gap's next revision on okx.gaps: same id and key, status moved on, counts and note filled in."""
    return msgspec.structs.replace(
        gap, status=outcome.status, revision=gap.revision + 1, attempts=gap.attempts + attempts,
        records_filled=outcome.records, note=outcome.note[:2000], updated_ts_ns=now_ns,
    )


def emission_key(gap: GapEvent) -> tuple[object, ...]:
    """What makes two gap records the same piece of work (duplicates of one emission)."""
    after = gap.after
    return (gap.gap_id, gap.revision, gap.status.value, None if after is None else (after.ts, after.trade_id,
                                                                                   after.seq_id))
