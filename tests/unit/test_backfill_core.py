"""The backfill's pure core: gap windows, coalescing, history walks against a model of OKX's paging, dedupe
decisions and status updates. Property tests drive the walks with a model server that pages exactly as
SPEC 8.3 says (newest first, `after` exclusive, the `limit` rows nearest the cursor)."""

from __future__ import annotations

import itertools

from hypothesis import given, settings
from hypothesis import strategies as st

from ingest.core.avro import RecordEncoder
from ingest.core.backfill import (
    CANDLES_PATH,
    DAY_MS,
    HISTORY_CANDLES_PATH,
    ORDERS_ARCHIVE_PATH,
    ORDERS_PATH,
    CandleWalk,
    CursorWalk,
    DataKind,
    Present,
    ReadbackScope,
    Stream,
    TradeWalk,
    Window,
    bar_ms,
    candle_path,
    coalesce,
    covered_trade_ids,
    data_kind,
    emission_key,
    inst_types_for,
    judge,
    natural_keys,
    orders_path,
    plan_jobs,
    status_update,
    window_of,
)
from ingest.core.records import Candle, Fill, GapEvent, GapKind, GapStatus, Order, Source, StreamPosition, Trade

NOW = 1_790_000_000_000
TRADES = Stream(DataKind.TRADES, "trades-all", "BTC-USDT")

# ------------------------------------------------------------------------------------------------ helpers


def gap(channel: str = "trades-all", *, before: StreamPosition | None = None, after: StreamPosition | None = None,
        inst_id: str | None = "BTC-USDT", opened_ms: int = NOW - 60_000, detected_ms: int = NOW - 1_000,
        gap_id: str = "g", status: GapStatus = GapStatus.OPEN, revision: int = 0) -> GapEvent:
    return GapEvent(gap_id=gap_id, revision=revision, kind=GapKind.DISCONNECT, status=status, reason="test",
                    channel=channel, inst_id=inst_id, before=before, after=after, opened_ts_ns=opened_ms * 1_000_000,
                    detected_ts_ns=detected_ms * 1_000_000)


def trade(tid: int, ts: int, *, count: int | None = None, channel: str = "trades-all",
          inst: str = "BTC-USDT") -> Trade:
    return Trade(channel=channel, inst_id=inst, ts=ts, recv_ts_ns=0, source=Source.WS, record_id=f"c:{tid}:0",
                 trade_id=str(tid), px="1", sz="1", side="buy", count=None if count is None else str(count))


Log = list[tuple[int, int]]  # (tradeId, ts), oldest first


def serve_trades(log: Log, query: dict[str, str]) -> list[tuple[int, int]]:
    """OKX's history-trades paging (SPEC 8.3): rows older than `after` (by id for type 1, by ts for type 2),
    the `limit` nearest it, newest first."""
    after, limit = int(query["after"]), int(query["limit"])
    older = [r for r in log if (r[0] if query["type"] == "1" else r[1]) < after]
    return sorted(older, reverse=True)[:limit]


def walk_all(walk: TradeWalk, log: Log, max_pages: int = 10_000) -> list[tuple[int, int]]:
    seen: list[tuple[int, int]] = []
    pages = 0
    while (q := walk.query()) is not None:
        page = serve_trades(log, q)
        walk.feed(page)
        seen.extend(page)
        pages += 1
        assert pages <= max_pages, "the walk does not terminate"
    return seen


@st.composite
def trade_logs(draw: st.DrawFn) -> Log:
    """Contiguous tradeIds (OKX allocates one per match) with non-decreasing ts, several per millisecond."""
    n = draw(st.integers(0, 450))
    first = draw(st.integers(1, 10_000))
    ts = NOW - DAY_MS
    out: Log = []
    for i in range(n):
        ts += draw(st.sampled_from([0, 0, 1, 2, 7]))
        out.append((first + i, ts))
    return out


# -------------------------------------------------------------------------------------------- windows


def test_trade_gap_window_is_the_ids_strictly_between_the_bounds() -> None:
    w = window_of(0, gap(before=StreamPosition(ts=NOW - 5000, trade_id=100),
                         after=StreamPosition(ts=NOW - 4000, trade_id=105)), DataKind.TRADES)
    assert (w.lo_id, w.hi_id) == (100, 105)
    assert [i for i in range(95, 110) if w.contains(NOW, i)] == [101, 102, 103, 104]


def test_open_trade_gap_is_bounded_by_the_detection_time_and_a_gap_without_before_by_its_opening() -> None:
    w = window_of(0, gap(after=None, before=StreamPosition(ts=NOW - 5000, trade_id=100)), DataKind.TRADES)
    assert w.hi_id is None and w.hi_ts == NOW - 1_000
    assert w.contains(NOW - 1_000, 101) and not w.contains(NOW - 999, 101) and not w.contains(NOW - 2000, 100)
    w2 = window_of(0, gap(before=None, after=StreamPosition(ts=NOW - 4000, trade_id=200)), DataKind.TRADES)
    assert w2.lo_id is None and w2.lo_ts == NOW - 60_000 and w2.contains(NOW - 60_000, 150)
    assert not w2.contains(NOW - 60_001, 150)


def test_candle_window_includes_the_bar_before_and_excludes_the_bar_after() -> None:
    w = window_of(0, gap("candle1m", before=StreamPosition(ts=NOW - 180_000), after=StreamPosition(ts=NOW - 60_000)),
                  DataKind.CANDLES)
    assert w.contains(NOW - 180_000) and w.contains(NOW - 120_000) and not w.contains(NOW - 60_000)


def test_negative_trade_ids_are_outside_any_id_window() -> None:
    w = window_of(0, gap(before=StreamPosition(ts=NOW, trade_id=-5), after=StreamPosition(ts=NOW, trade_id=10)),
                  DataKind.TRADES)
    assert w.lo_id is None  # a liquidation id says nothing about the sequence: bounded by time instead


@given(lo=st.integers(1, 1000), width=st.integers(1, 50), tid=st.integers(-10, 1100), ts=st.integers(0, 10**13))
def test_an_id_window_contains_exactly_the_ids_strictly_between_whatever_the_time(lo: int, width: int, tid: int,
                                                                                   ts: int) -> None:
    w = Window(0, NOW, NOW, lo, lo + width)
    assert w.contains(ts, tid) == (lo < tid < lo + width)
    assert w.empty == (width <= 1)


def test_channels_map_to_how_they_are_backfilled() -> None:
    assert data_kind("trades") is DataKind.TRADES and data_kind("trades-all") is DataKind.TRADES
    assert data_kind("candle1m") is DataKind.CANDLES and data_kind("candle1Dutc") is DataKind.CANDLES
    assert data_kind("mark-price-candle1m") is None  # no REST history here
    assert data_kind("books5") is DataKind.BOOKS and data_kind("bbo-tbt") is DataKind.BOOKS
    assert data_kind("fills") is DataKind.FILLS and data_kind("orders") is DataKind.ORDERS
    assert data_kind("tickers") is None and data_kind("positions") is None


# ------------------------------------------------------------------------------------------------ plans


def test_plan_decides_unsupported_old_and_empty_gaps_without_fetching() -> None:
    items = [
        (0, gap("tickers", before=StreamPosition(ts=NOW - 10), after=StreamPosition(ts=NOW))),
        (1, gap(before=StreamPosition(ts=NOW - 100 * DAY_MS, trade_id=5),
                after=StreamPosition(ts=NOW - 100 * DAY_MS, trade_id=50))),
        (2, gap(before=StreamPosition(ts=NOW - 10, trade_id=7), after=StreamPosition(ts=NOW, trade_id=8))),
        (3, gap(before=StreamPosition(ts=NOW - 10, trade_id=7), after=StreamPosition(ts=NOW, trade_id=20))),
        (4, gap("books", before=StreamPosition(ts=NOW - 10, seq_id=1), after=StreamPosition(ts=NOW, seq_id=9))),
        (5, gap("trades", inst_id=None)),
    ]
    plan = plan_jobs(items, NOW)
    assert plan.decided[0].status is GapStatus.UNFILLABLE and "no history" in plan.decided[0].note
    assert plan.decided[1].status is GapStatus.UNFILLABLE and "older than OKX keeps" in plan.decided[1].note
    assert plan.decided[2].status is GapStatus.FILLED and plan.decided[2].records == 0
    assert plan.decided[5].status is GapStatus.UNFILLABLE
    assert sorted(m.item for j in plan.jobs for m in j.members) == [3, 4]


@st.composite
def id_windows(draw: st.DrawFn) -> list[Window]:
    n = draw(st.integers(1, 40))
    out = []
    for i in range(n):
        lo = draw(st.integers(1, 3_000))
        out.append(Window(i, NOW - 1000, NOW, lo, lo + draw(st.integers(2, 400))))
    return out


@given(windows=id_windows(), merge=st.integers(1, 200))
def test_coalescing_puts_every_gap_in_one_job_whose_span_holds_it_and_keeps_jobs_apart(windows: list[Window],
                                                                                          merge: int) -> None:
    jobs = coalesce(TRADES, windows, merge_ids=merge)
    members = [m.item for j in jobs for m in j.members]
    assert sorted(members) == sorted(w.item for w in windows)
    for j in jobs:
        assert j.span.lo_id is not None and j.span.hi_id is not None
        for m in j.members:
            assert m.lo_id is not None and m.hi_id is not None
            assert j.span.lo_id <= m.lo_id and m.hi_id <= j.span.hi_id
    spans = sorted((j.span.lo_id, j.span.hi_id) for j in jobs if j.span.lo_id is not None and j.span.hi_id is not None)
    for (_, hi1), (lo2, _) in itertools.pairwise(spans):
        assert lo2 - hi1 >= merge  # overlapping or near windows were merged; the rest are a page apart


def test_coalescing_merges_time_windows_only_when_they_overlap() -> None:
    a, b, c = Window(0, 100, 200), Window(1, 150, 300), Window(2, 301, 400)
    jobs = coalesce(Stream(DataKind.FILLS, "fills", None, "SPOT"), [c, a, b])
    assert [[m.item for m in j.members] for j in jobs] == [[0, 1], [2]]
    assert (jobs[0].span.lo_ts, jobs[0].span.hi_ts) == (100, 300)


def test_book_gaps_of_one_stream_share_one_snapshot_job() -> None:
    books = Stream(DataKind.BOOKS, "books", "BTC-USDT")
    assert len(coalesce(books, [Window(0, 1, 2), Window(1, 500, 900)])) == 1


# ------------------------------------------------------------------------------------------------ walks


@settings(max_examples=150, deadline=None)
@given(log=trade_logs(), data=st.data())
def test_a_trade_walk_between_ids_finds_exactly_the_trades_inside_and_knows_when_history_ran_out(
    log: Log, data: st.DataObject
) -> None:
    base = log[0][0] if log else 100
    lo = data.draw(st.integers(base - 60, base + len(log) + 20))
    hi = data.draw(st.integers(lo + 1, lo + 500))
    span = Window(0, NOW - 2 * DAY_MS, NOW, lo, hi)
    walk = TradeWalk("BTC-USDT", span)
    seen = walk_all(walk, log, max_pages=len(log) // 100 + 3)
    inside = {r for r in log if lo < r[0] < hi}
    assert {r for r in seen if span.contains(r[1], r[0])} == inside
    reaches = any(tid <= lo for tid, _ in log if tid < hi)  # the `before` trade itself (fills at its place)
    assert walk.complete == reaches
    assert walk.covers(span) == any(tid <= lo + 1 for tid, _ in log if tid < hi)  # or OKX keeps nothing older
    assert walk.exhausted == (not reaches)  # the history ended above the gap's lower bound


def serve_in_time_order(log: Log, query: dict[str, str]) -> list[tuple[int, int]]:
    """history-trades type 1 over a log in time order that holds liquidation fills (negative ids): `after=X`
    returns the `limit` rows just before trade X's place, newest first (the simulator's model)."""
    after, limit = int(query["after"]), int(query["limit"])
    ids = [tid for tid, _ in log]
    # An id no longer (or not yet) kept: the place of the first ordinary id above it.
    end = ids.index(after) if after in ids else next((i for i, tid in enumerate(ids) if tid > after), len(log))
    return log[max(0, end - limit):end][::-1]


@settings(max_examples=150, deadline=None)
@given(log=trade_logs(), data=st.data())
def test_liquidation_fills_between_the_bounds_in_time_are_inside_an_id_gap_and_found_by_the_walk(
    log: Log, data: st.DataObject
) -> None:
    if len(log) < 3:
        return
    mixed: Log = []
    next_fill = -1_000_000
    for row in log:  # liquidation fills (negative ids) between the ordinary trades, at their times
        mixed.append(row)
        if data.draw(st.integers(0, 9)) == 0:
            next_fill -= 1
            mixed.append((next_fill, row[1]))
    a = data.draw(st.integers(0, len(log) - 2))
    b = data.draw(st.integers(a + 1, len(log) - 1))
    (lo, lo_ts), (hi, hi_ts) = log[a], log[b]
    span = Window(0, lo_ts, hi_ts, lo, hi)
    walk = TradeWalk("BTC-USDT", span)
    seen: list[tuple[int, int]] = []
    while (q := walk.query()) is not None:
        page = serve_in_time_order(mixed, q)
        walk.feed(page)
        seen.extend(page)
    start, end = mixed.index(log[a]), mixed.index(log[b])
    between = {r for r in mixed[start + 1:end]}  # everything that happened between the two bounds
    found = {r for r in seen if span.contains(r[1], r[0])}
    assert between <= found and walk.covers(span)
    assert all(tid < 0 and lo_ts <= ts <= hi_ts for tid, ts in found - between)  # same-ms fills: deduped


@settings(max_examples=150, deadline=None)
@given(log=trade_logs(), data=st.data())
def test_a_trade_walk_bounded_by_time_starts_by_ts_then_pages_by_id_and_skips_no_trade_sharing_a_millisecond(
    log: Log, data: st.DataObject
) -> None:
    if not log:
        log = [(1, NOW - DAY_MS)]
    t0, t1 = log[0][1], log[-1][1]
    lo_ts = data.draw(st.integers(t0 - 5, t1 + 5))
    hi_ts = data.draw(st.integers(lo_ts, t1 + 10))
    span = Window(0, lo_ts, hi_ts)
    walk = TradeWalk("BTC-USDT", span)
    first = walk.query()
    assert first is not None and first["type"] == "2" and first["after"] == str(hi_ts + 1)
    seen = walk_all(walk, log, max_pages=len(log) // 100 + 3)
    assert {r for r in seen if span.contains(r[1], r[0])} == {r for r in log if lo_ts <= r[1] <= hi_ts}
    assert walk.covers(span) == any(ts < lo_ts for _, ts in log)


def test_a_trade_walk_stops_when_the_server_does_not_move_its_cursor() -> None:
    walk = TradeWalk("BTC-USDT", Window(0, 0, NOW, 10, 1_000))
    walk.feed([(500, NOW), (400, NOW)])
    walk.feed([(450, NOW)])  # not below the cursor 400: a misbehaving server
    assert walk.stalled and walk.query() is None and not walk.covers(walk.span)


def test_member_windows_above_where_history_ends_are_covered_and_those_below_are_not() -> None:
    log = [(i, NOW - 1000 + i) for i in range(300, 700)]
    upper, lower = Window(1, 0, NOW, 500, 600), Window(2, 0, NOW, 100, 350)
    walk = TradeWalk("BTC-USDT", Window(-1, 0, NOW, 100, 600))
    walk_all(walk, log)
    assert walk.exhausted and walk.covers(upper) and not walk.covers(lower)


@settings(max_examples=100, deadline=None)
@given(n=st.integers(0, 900), data=st.data())
def test_a_candle_walk_returns_every_bar_of_its_range_once(n: int, data: st.DataObject) -> None:
    minute = 60_000
    bars = [NOW - (n - i) * minute for i in range(n)]
    lo = data.draw(st.integers(NOW - (n + 5) * minute, NOW)) // minute * minute
    hi = data.draw(st.integers(lo, NOW + minute))
    walk = CandleWalk("BTC-USDT", "1m", Window(0, lo, hi), CANDLES_PATH)
    seen: list[int] = []
    while (q := walk.query()) is not None:
        page = sorted((b for b in bars if b < int(q["after"])), reverse=True)[:int(q["limit"])]
        walk.feed(page)
        seen.extend(page)
    assert sorted(b for b in seen if lo <= b <= hi) == [b for b in bars if lo <= b <= hi]
    assert walk.covers(walk.span) == any(b <= lo for b in bars)


def test_a_cursor_walk_is_complete_on_a_short_page_and_resumes_below_its_cursor() -> None:
    walk = CursorWalk(ORDERS_PATH, {"instType": "SPOT"})
    walk.feed(list(range(500, 400, -1)))
    assert walk.query() == {"instType": "SPOT", "limit": "100", "after": "401"}
    walk.feed([300, 200])
    assert walk.complete and walk.query() is None
    old = CursorWalk(ORDERS_PATH, {}, floor_ts=NOW - 7 * DAY_MS)
    old.feed([])
    assert not old.covers(Window(0, NOW - 8 * DAY_MS, NOW)) and old.covers(Window(0, NOW - DAY_MS, NOW))


def test_endpoints_are_chosen_by_how_far_back_the_range_reaches() -> None:
    assert candle_path("1m", NOW - 60 * 60_000, NOW) == CANDLES_PATH
    assert candle_path("1m", NOW - 2000 * 60_000, NOW) == HISTORY_CANDLES_PATH
    assert candle_path("1s", NOW - 10_000, NOW) == HISTORY_CANDLES_PATH
    assert bar_ms("1m") == 60_000 and bar_ms("1M") > 28 * DAY_MS and bar_ms("6Hutc") == 6 * 3_600_000
    assert orders_path(NOW - DAY_MS, NOW) == ORDERS_PATH and orders_path(NOW - 8 * DAY_MS, NOW) == ORDERS_ARCHIVE_PATH


def test_private_history_is_asked_per_inst_type_it_can_be() -> None:
    assert inst_types_for("SWAP", None) == ("SWAP",)
    assert inst_types_for("ANY", "BTC-USDT") == ("SPOT", "MARGIN")
    assert inst_types_for(None, "BTC-USD-261225") == ("FUTURES",)
    assert inst_types_for(None, "BTC-USD-261225-60000-C") == ("OPTION",)
    assert len(inst_types_for(None, None)) == 5


# ----------------------------------------------------------------------------------------------- dedupe


def test_an_aggregated_trade_covers_count_ids_ending_at_its_trade_id() -> None:
    assert list(covered_trade_ids(123, 3)) == [121, 122, 123]
    assert natural_keys(trade(123, NOW, count=3)) == [("t", 121), ("t", 122), ("t", 123)]
    assert list(covered_trade_ids(-7, 3)) == [-7]


def test_readback_scope_keeps_only_its_streams_ids_inside_the_range() -> None:
    scope = ReadbackScope(TRADES, NOW - 10_000, NOW, 100, 110)
    assert scope.keys(trade(104, NOW, count=10)) == [("t", i) for i in range(101, 105)]
    assert scope.keys(trade(105, NOW, channel="trades")) == []
    assert scope.keys(trade(105, NOW, inst="ETH-USDT")) == []


def test_orders_fills_and_candles_dedupe_on_their_natural_keys() -> None:
    order = Order(channel="orders", inst_id="BTC-USDT", inst_type="SPOT", ts=NOW, recv_ts_ns=0, source=Source.WS,
                  record_id="x", ord_id="42", state="filled", u_time=str(NOW))
    fill = Fill(channel="fills", inst_id="BTC-USDT", ts=NOW, recv_ts_ns=0, source=Source.REST, record_id="y",
                trade_id="9", ord_id="42", bill_id="777", fill_px="1", fill_sz="1", side="buy")
    candle = Candle(channel="candle1m", inst_id="BTC-USDT", ts=NOW, recv_ts_ns=0, source=Source.REST, record_id="z",
                    bar="1m", o="1", h="1", l="1", c="1", confirm=True)
    assert natural_keys(order) == [("o", "42", "filled")]
    assert natural_keys(fill) == [("b", "777"), ("f", "42", "9")]
    assert natural_keys(candle) == [("c", NOW)]
    ws_fill = Fill(channel="fills", inst_id="BTC-USDT", ts=NOW, recv_ts_ns=0, source=Source.WS, record_id="w",
                   trade_id="9", ord_id="42", fill_px="1", fill_sz="1", side="buy")
    present = Present(natural_keys(ws_fill))
    assert not present.first_time(natural_keys(fill))  # the stream already carried this fill


@settings(max_examples=100, deadline=None)
@given(log=trade_logs(), data=st.data())
def test_redoing_a_gap_after_a_partial_run_publishes_every_missing_id_exactly_once(
    log: Log, data: st.DataObject
) -> None:
    """A worker dies after publishing part of a gap; the next reads the topic back and publishes the rest."""
    if len(log) < 3:
        return
    lo = log[0][0]
    hi = log[-1][0]
    span = Window(0, NOW - 2 * DAY_MS, NOW, lo, hi)
    topic: list[int] = [lo, hi]  # what the recorder published around the gap
    killed_after = data.draw(st.integers(0, len(log)))
    first = TradeWalk("BTC-USDT", span)
    present = Present()
    published = 0
    while (q := first.query()) is not None and published < killed_after:
        page = serve_trades(log, q)
        first.feed(page)
        for tid, ts in page:
            if span.contains(ts, tid) and published < killed_after and present.first_time([("t", tid)]):
                topic.append(tid)
                published += 1
    scope = ReadbackScope(TRADES, span.lo_ts, span.hi_ts, lo, hi)
    readback = Present(k for tid in topic for k in scope.keys(trade(tid, NOW)))
    second = TradeWalk("BTC-USDT", span)
    while (q := second.query()) is not None:
        page = serve_trades(log, q)
        second.feed(page)
        topic.extend(tid for tid, ts in page if span.contains(ts, tid) and readback.first_time([("t", tid)]))
    assert sorted(topic) == [tid for tid, _ in log]  # every id, each once


# --------------------------------------------------------------------------------------------- statuses


def test_covered_gaps_are_filled_and_the_rest_partial_or_unfillable() -> None:
    assert judge(covered=True, found=5, published=3, shortfall="x").status is GapStatus.FILLED
    assert judge(covered=True, found=0, published=0, shortfall="x").status is GapStatus.FILLED
    partial = judge(covered=False, found=5, published=5, shortfall="history ends at 7")
    assert partial.status is GapStatus.PARTIAL and partial.note.startswith("history ends at 7")
    assert judge(covered=False, found=0, published=0, shortfall="old").status is GapStatus.UNFILLABLE


def test_a_status_update_is_the_gaps_next_revision_with_the_same_id_and_key() -> None:
    g = gap(before=StreamPosition(ts=NOW - 5, trade_id=1), after=StreamPosition(ts=NOW, trade_id=9), revision=0)
    g = status_update(g, judge(covered=True, found=7, published=7, shortfall=""), attempts=2, now_ns=NOW * 10**6)
    assert (g.status, g.revision, g.attempts, g.records_filled) == (GapStatus.FILLED, 1, 2, 7)
    assert g.kafka_key() == b"trades-all:BTC-USDT" and g.emission_id() == "gap:g:1" and g.updated_ts_ns == NOW * 10**6
    encoded = RecordEncoder("okx.").encode(g)
    assert dict(encoded.headers)["record_id"] == b"gap:g:1"


def test_emissions_of_one_gap_are_recognised_as_duplicates() -> None:
    a = gap(after=StreamPosition(ts=NOW, trade_id=9))
    assert emission_key(a) == emission_key(gap(after=StreamPosition(ts=NOW, trade_id=9)))
    assert emission_key(a) != emission_key(gap(after=None))  # the same gap closed later is new work


async def test_a_topic_that_cannot_be_read_back_leaves_the_gap_open_after_bounded_growing_retries() -> None:
    """A slow or unreachable Kafka says nothing about OKX: the gap is not decided (it stays open, to be taken up
    again later), and the worker does not redo one batch forever (gap_max_attempts, each after a real wait)."""
    from types import SimpleNamespace

    from ingest.config import BackfillSettings
    from ingest.core.avro import RecordEncoder
    from ingest.core.clock import ServerClock
    from ingest.services.backfill import GapFiller, ReadbackError, _Counters

    class Unreadable:
        calls = 0

        async def present(self, scope: ReadbackScope) -> Present:
            self.calls += 1
            raise ReadbackError("reading okx.trades back took over 120 s")

    sleeps: list[float] = []

    async def sleep(delay: float) -> None:
        sleeps.append(delay)

    readback = Unreadable()
    rest = SimpleNamespace(clock=ServerClock(lambda: NOW))  # only its clock is consulted before any request
    settings = BackfillSettings(gap_max_attempts=3, retry_initial_s=0.25)
    filler = GapFiller(rest, None, RecordEncoder(), readback, settings,  # type: ignore[arg-type]
                       _Counters(), sleep=sleep)
    g = gap(before=StreamPosition(ts=NOW - 50_000, trade_id=100), after=StreamPosition(ts=NOW - 40_000, trade_id=200))
    [job] = plan_jobs([(7, g)], NOW).jobs
    result = (await filler.fill(job.stream, [job]))[7]
    assert readback.calls == 3 and len(sleeps) == 2
    assert sleeps[0] >= 0.125 and sleeps[1] >= 0.25  # equal jitter: half the growing ceiling at least
    assert result.deferred and not result.failed and result.outcome.status is GapStatus.OPEN
    assert "could not read the topic back" in result.outcome.note
