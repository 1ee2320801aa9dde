"""Replay's pure core: the total order, the two views' dedupe, gaps in band, books and their snapshots."""

from __future__ import annotations

import random
from collections.abc import Sequence
from decimal import Decimal
from typing import cast

import msgspec
import pyarrow as pa
from hypothesis import given, settings
from hypothesis import strategies as st

from ingest.core.archive_schema import DECIMAL, render_decimal
from ingest.core.records import (
    BookAction,
    BookLevel,
    BookUpdate,
    GapEvent,
    GapKind,
    GapStatus,
    Order,
    Record,
    Source,
    StreamPosition,
    Trade,
)
from ingest.core.replay import (
    BookSnapshot,
    BookSnapshots,
    Entry,
    View,
    canonical,
    gap_entries,
    merge,
    replay_items,
    sort_key,
)
from ingest.replay._arrow import _canonical

INST = "BTC-USDT"


def _trade(ts: int, trade_id: int, *, recv: int = 0, source: Source = Source.WS, inst: str = INST) -> Trade:
    rid = f"{'ws:c1:1' if source is Source.WS else 'rest:trades'}:{inst}:{trade_id}"
    return Trade(channel="trades", inst_id=inst, ts=ts, recv_ts_ns=recv or ts * 1_000_000 + 7, source=source,
                 record_id=rid, trade_id=str(trade_id), px="100.5", sz="1", side="buy")


def _entries(records: Sequence[Record], topic: str, partition: int = 0) -> list[Entry]:
    out: list[Entry] = [(sort_key(r, topic, partition, off), r) for off, r in enumerate(records)]
    out.sort(key=lambda e: e[0])
    return out


# ------------------------------------------------------------------------------------------------ order

keys = st.tuples(st.integers(0, 50), st.integers(0, 50), st.sampled_from(["a", "b"]), st.integers(0, 2),
                 st.integers(0, 1000))


@given(st.lists(st.lists(keys, max_size=30), max_size=6))
def test_merge_of_sorted_streams_is_the_total_order_of_all_their_entries(
    streams: list[list[tuple[int, int, str, int, int]]]
) -> None:
    # Real keys are unique (topic, partition, offset); the stream index as partition keeps them so here.
    sources: list[list[Entry]] = [sorted((((k[0], k[1], str(k[2]), n, i), _trade(k[0], i))
                                          for i, k in enumerate(s)), key=lambda e: e[0])
                                  for n, s in enumerate(streams)]
    merged = [k for k, _ in merge(sources)]
    assert merged == sorted(k for s in sources for k, _ in s)


def test_ties_on_exchange_time_go_by_receive_time_then_topic_partition_offset() -> None:
    a = _trade(10, 1, recv=5)
    b = _trade(10, 2, recv=3)
    c = _trade(10, 3, recv=3)
    items = list(replay_items([[(sort_key(a, "t", 0, 0), a)], [(sort_key(c, "t", 1, 0), c)],
                               [(sort_key(b, "t", 0, 9), b)]], [], start=0, end=100))
    assert [cast(Trade, i).trade_id for i in items] == ["2", "3", "1"]


# ------------------------------------------------------------------------------------------------ views

@settings(max_examples=60)
@given(st.lists(st.tuples(st.integers(1, 30), st.booleans(), st.booleans()), min_size=1, max_size=60),
       st.randoms(use_true_random=False))
def test_repaired_view_keeps_each_trade_once_and_recorded_view_only_what_the_recorder_published(
    spec: list[tuple[int, bool, bool]], rnd: random.Random
) -> None:
    records: list[Trade] = []
    for tid, in_ws, in_rest in spec:
        ts = 1000 + tid  # one trade, one exchange ts, whichever path brought it
        if in_ws:
            records.append(_trade(ts, tid))
            records.append(_trade(ts, tid))  # a producer retry: the same emission twice
        if in_rest or not in_ws:
            records.append(_trade(ts, tid, source=Source.REST, recv=ts * 1_000_000 + 999))
    rnd.shuffle(records)
    half = len(records) // 2
    streams = [_entries(records[:half], "okx.trades", 0), _entries(records[half:], "okx.trades", 1)]
    repaired = [cast(Trade, i) for i in replay_items(streams, [], start=0, end=10_000)]
    assert sorted(int(t.trade_id) for t in repaired) == sorted({tid for tid, _, _ in spec})
    for t in repaired:  # the ws copy wins where both exist (it was received first)
        ws = any(tid == int(t.trade_id) and in_ws for tid, in_ws, _ in spec)
        assert t.source is (Source.WS if ws else Source.REST)
    recorded = [cast(Trade, i) for i in replay_items(streams, [], start=0, end=10_000, view=View.RECORDED)]
    assert sorted(int(t.trade_id) for t in recorded) == sorted({tid for tid, ws, _ in spec if ws})
    assert [t.ts for t in repaired] == sorted(t.ts for t in repaired)


def _gap(gap_id: str, before: int, after: int | None, status: GapStatus, revision: int = 0,
         channel: str = "trades") -> GapEvent:
    return GapEvent(gap_id=gap_id, revision=revision, kind=GapKind.DISCONNECT, status=status, reason="test",
                    channel=channel, inst_id=INST, before=StreamPosition(ts=before),
                    after=StreamPosition(ts=after) if after is not None else None,
                    detected_ts_ns=(before + 1) * 1_000_000)


def test_gaps_appear_at_their_position_with_their_latest_revision_and_filled_ones_leave_the_repaired_view() -> None:
    trades = _entries([_trade(ts, ts) for ts in (100, 200, 300, 400)], "okx.trades")
    gaps = [(_gap("g1", 200, 300, GapStatus.OPEN), "okx.gaps", 0, 0),
            (_gap("g1", 200, 300, GapStatus.FILLED, revision=1), "okx.gaps", 0, 5),
            (_gap("g2", 300, 400, GapStatus.OPEN), "okx.gaps", 0, 1),
            (_gap("g2", 300, 400, GapStatus.UNFILLABLE, revision=1), "okx.gaps", 0, 6),
            (_gap("g3", 900, None, GapStatus.OPEN), "okx.gaps", 0, 7)]  # after the window
    recorded = list(replay_items([trades], gap_entries(gaps, 0, 500), start=0, end=500, view=View.RECORDED))
    shape = [(type(i).__name__, i.gap_id if isinstance(i, GapEvent) else cast(Trade, i).trade_id) for i in recorded]
    assert shape == [("Trade", "100"), ("Trade", "200"), ("GapEvent", "g1"), ("Trade", "300"), ("GapEvent", "g2"),
                     ("Trade", "400")]
    statuses = {i.gap_id: i.status for i in recorded if isinstance(i, GapEvent)}
    assert statuses == {"g1": GapStatus.FILLED, "g2": GapStatus.UNFILLABLE}
    repaired = [i for i in replay_items([trades], gap_entries(gaps, 0, 500), start=0, end=500)
                if isinstance(i, GapEvent)]
    assert [g.gap_id for g in repaired] == ["g2"]


# ------------------------------------------------------------------------------------------------ books

def _lv(px: Decimal, sz: int) -> BookLevel:
    return (str(px), str(sz), "0", "1")


def _book(ts: int, action: str, seq: int, prev: int | None, bids: list[BookLevel], asks: list[BookLevel],
          channel: str = "books") -> BookUpdate:
    return BookUpdate(channel=channel, inst_id=INST, ts=ts, recv_ts_ns=ts * 1_000_000, source=Source.WS,
                      record_id=f"ws:c:{seq}:{action}", action=cast(BookAction, action), asks=tuple(asks),
                      bids=tuple(bids), seq_id=seq, prev_seq_id=prev)


class _Reference:
    """An independent book: a dict per side, sorted on demand."""

    def __init__(self) -> None:
        self.bids: dict[Decimal, str] = {}
        self.asks: dict[Decimal, str] = {}

    def apply(self, bids: list[BookLevel], asks: list[BookLevel], reset: bool) -> None:
        if reset:
            self.bids.clear()
            self.asks.clear()
        for side, levels in ((self.bids, bids), (self.asks, asks)):
            for px, sz, _, _ in levels:
                if Decimal(sz) == 0:
                    side.pop(Decimal(px), None)
                else:
                    side[Decimal(px)] = sz

    def top(self, depth: int) -> tuple[tuple[tuple[str, str], ...], tuple[tuple[str, str], ...]]:
        bids = tuple((str(p), self.bids[p]) for p in sorted(self.bids, reverse=True)[:depth])
        asks = tuple((str(p), self.asks[p]) for p in sorted(self.asks)[:depth])
        return bids, asks


def _side_updates(rnd: random.Random, lo: int, hi: int) -> list[BookLevel]:
    return [_lv(Decimal(rnd.randrange(lo, hi)) / 10, rnd.choice([0, 0, 1, 2, 5])) for _ in range(rnd.randrange(4))]


@settings(max_examples=40, deadline=None)
@given(st.randoms(use_true_random=False), st.integers(1, 5), st.sampled_from([7, 50, 100]))
def test_book_snapshots_equal_an_independent_book_at_every_interval_boundary(
    rnd: random.Random, depth: int, interval: int
) -> None:
    ref = _Reference()
    records: list[BookUpdate] = []
    expected: dict[int, tuple[object, ...]] = {}
    seq, ts = 10, 0
    snap_bids = [_lv(Decimal(p) / 10, 1) for p in range(900, 990, 7)]
    snap_asks = [_lv(Decimal(p) / 10, 1) for p in range(1010, 1090, 7)]
    records.append(_book(ts, "snapshot", seq, -1, snap_bids, snap_asks))
    ref.apply(snap_bids, snap_asks, True)
    boundary = 0
    states: list[tuple[int, int, tuple[object, ...]]] = [(ts, seq, ref.top(depth))]
    for _ in range(rnd.randrange(1, 60)):
        ts += rnd.randrange(0, 40)
        bids, asks = _side_updates(rnd, 900, 1000), _side_updates(rnd, 1001, 1100)
        action = "checkpoint" if rnd.random() < 0.1 else "update"
        if action == "checkpoint":
            ref.apply([], [], False)
            b, a = ref.top(1000)
            records.append(_book(ts, "checkpoint", seq, None, [_lv(Decimal(p), int(s)) for p, s in b],
                                 [_lv(Decimal(p), int(s)) for p, s in a]))
        else:
            records.append(_book(ts, "update", seq + 1, seq, bids, asks))
            ref.apply(bids, asks, False)
            seq += 1
        states.append((ts, seq, ref.top(depth)))
    end = ts + 2 * interval
    while boundary < end:
        before = [s for s in states if s[0] < boundary]
        if before:
            expected[boundary] = (before[-1][1], *before[-1][2])
        boundary += interval
    got = {s.ts: (s.seq_id, s.bids, s.asks) for s in replay_items(
        [_entries(records, "okx.books")], [], start=0, end=end,
        book_snapshots=BookSnapshots(depth, interval)) if isinstance(s, BookSnapshot)}
    assert got == expected


def test_a_book_inside_an_unrepaired_gap_emits_no_snapshot_until_a_checkpoint_resyncs_it() -> None:
    bids, asks = [_lv(Decimal(99), 1)], [_lv(Decimal(101), 1)]
    records = [_book(0, "snapshot", 1, -1, bids, asks), _book(150, "update", 2, 1, [_lv(Decimal(98), 3)], []),
               _book(450, "checkpoint", 2, None, [*bids, _lv(Decimal(98), 3)], asks)]
    gaps = [(_gap("b1", 150, None, GapStatus.UNFILLABLE, channel="books"), "okx.gaps", 0, 0)]
    items = list(replay_items([_entries(records, "okx.books")],
                              gap_entries(gaps, 0, 600), start=0, end=600, book_snapshots=BookSnapshots(5, 100)))
    snaps = [i.ts for i in items if isinstance(i, BookSnapshot)]
    assert snaps == [100, 500]  # 0: nothing yet; 200-400: inside the gap; 500: after the checkpoint
    after = next(i for i in items if isinstance(i, BookSnapshot) and i.ts == 500)
    assert after.bids == (("99", "1"), ("98", "3")) and after.seq_id == 2


def test_a_broken_chain_stops_snapshots_until_the_next_snapshot_and_quiet_periods_still_emit() -> None:
    bids, asks = [_lv(Decimal(99), 1)], [_lv(Decimal(101), 1)]
    records = [_book(0, "snapshot", 1, -1, bids, asks), _book(120, "update", 5, 3, [_lv(Decimal(98), 3)], []),
               _book(330, "snapshot", 9, -1, bids, asks)]
    items = list(replay_items([_entries(records, "okx.books")], [], start=0,
                              end=500, book_snapshots=BookSnapshots(1, 100)))
    assert [(i.ts, i.seq_id) for i in items if isinstance(i, BookSnapshot)] == [(100, 1), (400, 9)]


def test_records_before_the_window_build_the_book_but_are_not_yielded() -> None:
    bids, asks = [_lv(Decimal(99), 1)], [_lv(Decimal(101), 1)]
    records = [_book(0, "snapshot", 1, -1, bids, asks), _book(50, "update", 2, 1, [_lv(Decimal(98), 3)], []),
               _book(1050, "update", 3, 2, [], [_lv(Decimal(102), 2)])]
    items = list(replay_items([_entries(records, "okx.books")], [], start=1000,
                              end=1100, book_snapshots=BookSnapshots(2, 1000)))
    assert isinstance(items[0], BookSnapshot) and items[0].ts == 1000 and items[0].bids == (("99", "1"), ("98", "3"))
    assert [cast(BookUpdate, i).seq_id for i in items[1:]] == [3]


def test_repaired_view_dedupes_orders_by_ordid_and_utime_and_keeps_distinct_updates() -> None:
    def order(ts: int, u_time: str, source: Source, rid: str) -> Order:
        return Order(channel="orders", inst_id=INST, ts=ts, recv_ts_ns=ts * 1_000_000 + (9 if source is Source.REST
                                                                                          else 1),
                     source=source, record_id=rid, ord_id="42", u_time=u_time, state="live")

    records = [order(100, "100", Source.WS, "ws:1"), order(100, "100", Source.REST, "rest:orders:42:100"),
               order(200, "200", Source.WS, "ws:2"), order(300, "300", Source.REST, "rest:orders:42:300")]
    items = list(replay_items([_entries(records, "okx.orders")], [], start=0, end=1000))
    assert [(i.ts, i.source) for i in items if isinstance(i, Order)] == [
        (100, Source.WS), (200, Source.WS), (300, Source.REST)]


# ------------------------------------------------------------------------------------------------ decimals

#: The largest decimal128(38, 18) value the archive stores (text: negating a Decimal rounds to 28 digits).
_DEC_MAX = "99999999999999999999.999999999999999999"


@settings(max_examples=200, deadline=None)
@given(st.lists(st.decimals(min_value=Decimal("-" + _DEC_MAX), max_value=Decimal(_DEC_MAX),
                            places=18, allow_nan=False, allow_infinity=False), min_size=1, max_size=20)
       | st.lists(st.integers(-10**12, 10**12).map(lambda n: Decimal(n).scaleb(-18)), min_size=1, max_size=20))
def test_arrow_decimal_text_is_the_canonical_text_of_every_value_tiny_ones_too(values: list[Decimal]) -> None:
    """The columns path of `.batches()` and the item path render every decimal alike, without an exponent."""
    got = _canonical(pa.chunked_array([pa.array([*values, None], DECIMAL)])).to_pylist()
    assert got == [*(render_decimal(v) for v in values), None]
    assert not any("E" in g or "e" in g for g in got if g is not None)


def test_kafka_decimal_strings_with_an_exponent_or_trailing_zeros_become_plain_canonical_text() -> None:
    t = msgspec.structs.replace(_trade(1, 1), px="1E-8", sz="0.000000010")
    assert (canonical(t).px, canonical(t).sz) == ("0.00000001", "0.00000001")
