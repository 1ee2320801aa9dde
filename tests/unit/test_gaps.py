"""Gap tracking: every loss of data becomes a gap bounded by the last good and the first good position."""

from __future__ import annotations

import json
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from ingest.core.books import BookBreak, BookMessage, BookPosition, BreakKind, OrderBook
from ingest.core.events import LinkEvent, LinkEventKind
from ingest.core.gaps import Gap, GapKind, GapTracker, Position, gap_id
from ingest.core.streams import Handover, Proof, StreamOwners
from ingest.okx.channels import SubArg

TRADES = SubArg("trades", "BTC-USDT-SWAP")
TRADES_ALL = SubArg("trades-all", "BSV-USDT")
BOOKS = SubArg("books", "BTC-USDT")
TICKERS = SubArg("tickers", "BTC-USDT")


def ev(kind: LinkEventKind, conn: str, *args: SubArg, ts_ns: int = 0, code: str | None = None,
       replacement: str | None = None) -> LinkEvent:
    return LinkEvent(kind, conn, "public-0", ts_ns, args, code=code, reason="test", replacement=replacement)


def trade_records(path: Path) -> list[tuple[SubArg, Position, int]]:
    out = []
    for line in path.read_text().splitlines():
        msg = json.loads(line)
        for d in msg["data"]:
            pos = Position(int(d["ts"]), int(d["tradeId"]), d.get("seqId"))
            out.append((SubArg(msg["arg"]["channel"], msg["arg"]["instId"]), pos, int(d.get("count", "1"))))
    return out


def test_disconnect_opens_gap_with_last_good_position_and_first_record_after_closes_it() -> None:
    g = GapTracker()
    g.on_link_event(ev(LinkEventKind.SUBSCRIBED, "c1", TICKERS))
    assert g.on_record(TICKERS, "c1", Position(1000), 1) == []
    assert g.on_record(TICKERS, "c1", Position(1100), 2) == []
    assert g.on_link_event(ev(LinkEventKind.DISCONNECTED, "c1", TICKERS, ts_ns=50)) == []
    g.on_link_event(ev(LinkEventKind.SUBSCRIBED, "c2", TICKERS, ts_ns=60))
    (gap,) = g.on_record(TICKERS, "c2", Position(5000), 70)
    assert (gap.kind, gap.before, gap.after) == (GapKind.DISCONNECT, Position(1100), Position(5000))
    assert (gap.conn_before, gap.conn_after, gap.opened_ts_ns, gap.detected_ts_ns) == ("c1", "c2", 50, 70)
    assert (gap.channel, gap.inst_id) == ("tickers", "BTC-USDT")
    assert g.on_record(TICKERS, "c2", Position(5100), 80) == []


def test_book_gap_closes_only_at_the_first_snapshot_after_a_break() -> None:
    g = GapTracker()
    g.on_record(BOOKS, "c1", Position(1, None, 10), 1, snapshot=True)
    g.on_record(BOOKS, "c1", Position(2, None, 15), 2)
    book = OrderBook()
    book.apply(BookMessage(True, [], [], 1, None, 10, -1))
    book.apply(BookMessage(False, [], [["1", "1", "0", "1"]], 2, None, 15, 10))
    verdict = book.apply(BookMessage(False, [], [], 3, None, 20, 17))
    assert verdict.broken is not None and verdict.broken.last_good == BookPosition(15, 2)
    g.on_book_break(BOOKS, "c1", 3, verdict.broken)
    assert g.on_record(BOOKS, "c1", Position(4, None, 30), 4) == []  # an update cannot close it
    (gap,) = g.on_record(BOOKS, "c1", Position(5, None, 40), 5, snapshot=True)
    assert gap.kind is GapKind.SEQ_BREAK
    assert (gap.before, gap.after) == (Position(2, None, 15), Position(5, None, 40))
    assert "expected 15, got 17" in gap.reason


def test_book_gap_kinds_match_the_break_kinds() -> None:
    g = GapTracker()
    g.on_book_break(BOOKS, "c1", 1, BookBreak(BreakKind.CHECKSUM_MISMATCH, -5, 7, None, "checksum"))
    g.on_book_break(SubArg("books", "ETH-USDT"), "c1", 1, BookBreak(BreakKind.MALFORMED, None, None, None, "px"))
    assert sorted(x.kind for x in g.open_gaps(2)) == [GapKind.CHECKSUM_MISMATCH, GapKind.OTHER]


def test_real_2022_trades_are_contiguous_and_reveal_no_hole(shared_okx: Path) -> None:
    g = GapTracker()
    records = trade_records(shared_okx / "frames" / "cryptofeed_2022_trades.jsonl")
    assert len(records) == 74
    for i, (arg, pos, count) in enumerate(records):
        assert g.on_record(arg, "c1", pos, i, count=count) == []


def test_aggregated_trade_covering_the_next_ids_is_not_a_hole(shared_okx: Path) -> None:
    # Real 2026 frames: tradeId 2832749645 with count 10 follows 2832749635 (covers ...636..645).
    g = GapTracker()
    for i, (arg, pos, count) in enumerate(trade_records(shared_okx / "frames" / "ccxt_2026_trades.jsonl")):
        assert g.on_record(arg, "c1", pos, i, count=count) == []


def test_trade_hole_from_aggregated_count_has_exact_before_and_after_ids(shared_okx: Path) -> None:
    (a, pos_a, _), (_, pos_b, _) = trade_records(shared_okx / "frames" / "ccxt_2026_trades.jsonl")[:2]
    g = GapTracker()
    g.on_record(a, "c1", pos_a, 1)
    (gap,) = g.on_record(a, "c1", pos_b, 2, count=8)  # covers ...638..645: 636 and 637 are missing
    assert gap.kind is GapKind.TRADE_HOLE
    assert gap.before is not None and gap.after is not None
    assert (gap.before.trade_id, gap.after.trade_id) == (2832749635, 2832749638)
    assert gap.after.seq_id == pos_b.seq_id and gap.after.ts == pos_b.ts
    assert "2832749636..2832749637" in gap.reason


def test_trades_all_reveals_a_hole_of_one_id() -> None:
    g = GapTracker()
    g.on_record(TRADES_ALL, "b1", Position(1697760012017, 84834539), 1)
    (gap,) = g.on_record(TRADES_ALL, "b1", Position(1697760012020, 84834541), 2)
    assert gap.before is not None and gap.after is not None
    assert (gap.before.trade_id, gap.after.trade_id) == (84834539, 84834541)


def test_negative_trade_ids_neither_advance_the_sequence_nor_reveal_holes() -> None:
    g = GapTracker()
    g.on_record(TRADES, "c1", Position(1, 100), 1)
    assert g.on_record(TRADES, "c1", Position(2, -5), 2) == []  # a liquidation fill
    assert g.last_position(TRADES) == Position(2, 100)
    assert g.on_record(TRADES, "c1", Position(3, 101), 3) == []
    (gap,) = g.on_record(TRADES, "c1", Position(4, 103), 4)
    assert gap.before is not None and gap.before.trade_id == 101


def test_repeated_or_older_trade_ids_are_not_holes_and_do_not_move_the_position_back() -> None:
    g = GapTracker()
    g.on_record(TRADES, "c1", Position(1, 100), 1)
    assert g.on_record(TRADES, "c1", Position(1, 99), 2) == []
    last = g.last_position(TRADES)
    assert last is not None and last.trade_id == 100


@st.composite
def trades_with_removals(draw: st.DrawFn) -> tuple[list[tuple[Position, int]], list[bool]]:
    tid, ts, neg = 5000, 1_000, -1
    recs: list[tuple[Position, int]] = []
    for _ in range(draw(st.integers(2, 60))):
        if draw(st.integers(0, 7)) == 0:
            recs.append((Position(ts, neg), 1))
            neg -= 1
        else:
            count = draw(st.integers(1, 4))
            tid += count
            recs.append((Position(ts, tid), count))
        ts += 1
    keep = draw(st.lists(st.booleans(), min_size=len(recs), max_size=len(recs)))
    keep[0] = True
    return recs, keep


@settings(max_examples=300, deadline=None)
@given(trades_with_removals())
def test_every_missing_trade_id_is_in_exactly_one_hole_with_exact_bounds(
    case: tuple[list[tuple[Position, int]], list[bool]],
) -> None:
    recs, keep = case
    g = GapTracker()
    gaps: list[Gap] = []
    for i, ((pos, count), k) in enumerate(zip(recs, keep, strict=True)):
        if k:
            gaps.extend(g.on_record(TRADES, "c1", pos, i, count=count))
    reported: list[int] = []
    for gap in gaps:
        assert gap.kind is GapKind.TRADE_HOLE and gap.before is not None and gap.after is not None
        assert gap.before.trade_id is not None and gap.after.trade_id is not None
        reported.extend(range(gap.before.trade_id + 1, gap.after.trade_id))
    # Only a kept in-sequence trade on each side reveals a removed one (liquidation fills bound nothing).
    kept_seq = [i for i, ((pos, _), k) in enumerate(zip(recs, keep, strict=True)) if k and (pos.trade_id or 0) > 0]
    missing = [
        t
        for i, ((pos, count), k) in enumerate(zip(recs, keep, strict=True))
        if not k and kept_seq and kept_seq[0] < i < kept_seq[-1] and pos.trade_id is not None and pos.trade_id > 0
        for t in range(pos.trade_id - count + 1, pos.trade_id + 1)
    ]
    assert reported == missing


def test_subscribe_failed_after_disconnect_emits_the_gap_without_after() -> None:
    g = GapTracker()
    g.on_record(TRADES, "c1", Position(1000, 7), 1)
    g.on_link_event(ev(LinkEventKind.DISCONNECTED, "c1", TRADES, ts_ns=10))
    (gap,) = g.on_link_event(ev(LinkEventKind.SUBSCRIBE_FAILED, "c2", TRADES, ts_ns=20, code="60018"))
    assert (gap.kind, gap.before, gap.after, gap.is_open) == (GapKind.DISCONNECT, Position(1000, 7), None, True)
    assert (gap.opened_ts_ns, gap.detected_ts_ns) == (10, 20)
    assert "60018" in gap.reason
    assert g.open_gaps(99) == []


def test_subscribe_failed_on_a_stream_that_never_delivered_is_still_a_gap() -> None:
    g = GapTracker()
    (gap,) = g.on_link_event(ev(LinkEventKind.SUBSCRIBE_FAILED, "c1", BOOKS, ts_ns=5, code="64003"))
    assert (gap.kind, gap.before, gap.after, gap.detected_ts_ns) == (GapKind.SUBSCRIBE_FAILED, None, None, 5)


def test_shutdown_lists_open_gaps_with_the_id_they_keep_when_closed() -> None:
    def scenario() -> GapTracker:
        g = GapTracker()
        g.on_record(TICKERS, "c1", Position(1000), 1)
        g.on_link_event(ev(LinkEventKind.DISCONNECTED, "c1", TICKERS, ts_ns=10))
        return g

    (open_gap,) = scenario().open_gaps(now_ts_ns=500)
    assert open_gap.after is None and open_gap.detected_ts_ns == 500
    (closed,) = scenario().on_record(TICKERS, "c2", Position(2000), 20)
    assert closed.gap_id == open_gap.gap_id


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 3), st.integers(1, 5)), min_size=1, max_size=30))
def test_gap_ids_are_deterministic_and_distinct_per_gap(script: list[tuple[int, int]]) -> None:
    def play() -> list[Gap]:
        g = GapTracker()
        out: list[Gap] = []
        tid, n = 10, 0
        for t, (op, step) in enumerate(script, start=1):
            if op == 0:
                n += 1
                out += g.on_link_event(ev(LinkEventKind.DISCONNECTED, f"c{n}", TRADES, ts_ns=t))
            else:
                tid += step
                out += g.on_record(TRADES, f"c{n}", Position(t, tid), t)
        return out

    first, second = play(), play()
    assert [x.gap_id for x in first] == [x.gap_id for x in second]
    assert len({x.gap_id for x in first}) == len(first)


def test_gap_id_depends_on_where_the_gap_starts() -> None:
    a = gap_id(GapKind.DISCONNECT, TRADES, Position(1, 5), "c1", 10)
    assert a == gap_id(GapKind.DISCONNECT, TRADES, Position(1, 5), "c1", 10)
    assert a != gap_id(GapKind.DISCONNECT, TRADES, Position(1, 6), "c1", 10)
    assert a != gap_id(GapKind.DISCONNECT, TRADES_ALL, Position(1, 5), "c1", 10)


def test_proven_handover_cancels_the_disconnect_gap() -> None:
    g = GapTracker()
    g.on_link_event(ev(LinkEventKind.SUBSCRIBED, "old", TICKERS))
    g.on_link_event(ev(LinkEventKind.SUBSCRIBED, "new", TICKERS))
    g.on_record(TICKERS, "old", Position(100), 1)
    g.on_link_event(ev(LinkEventKind.DISCONNECTED, "old", TICKERS, ts_ns=2))
    g.on_handover(Handover(TICKERS, "old", "new", Proof.OVERLAP, Position(100), 3))
    assert g.on_record(TICKERS, "new", Position(150), 4) == []
    assert g.open_gaps(5) == []


def test_unproven_handover_opens_a_gap_closed_by_the_new_owners_first_record() -> None:
    g = GapTracker()
    g.on_record(TICKERS, "old", Position(100), 1)
    g.on_handover(Handover(TICKERS, "old", "new", Proof.NONE, Position(100), 3))
    (gap,) = g.on_record(TICKERS, "new", Position(300), 4)
    assert (gap.kind, gap.before, gap.after, gap.conn_before, gap.conn_after) == (
        GapKind.CUTOVER, Position(100), Position(300), "old", "new")


def test_disconnect_of_a_connection_already_replaced_opens_no_gap() -> None:
    g = GapTracker()
    g.on_record(TICKERS, "old", Position(100), 1)
    g.on_handover(Handover(TICKERS, "old", "new", Proof.OVERLAP, Position(100), 2))
    g.on_record(TICKERS, "new", Position(200), 3)
    assert g.on_link_event(ev(LinkEventKind.CUTOVER, "old", TICKERS, replacement="new")) == []
    assert g.on_link_event(ev(LinkEventKind.DISCONNECTED, "old", TICKERS)) == []
    assert g.open_gaps(9) == []


def test_cutover_to_a_replacement_that_does_not_hold_the_stream_opens_a_gap() -> None:
    g = GapTracker()
    g.on_link_event(ev(LinkEventKind.SUBSCRIBED, "old", TICKERS))
    g.on_record(TICKERS, "old", Position(100), 1)
    g.on_link_event(ev(LinkEventKind.SUBSCRIBE_FAILED, "new", TICKERS, code="64007"))
    assert g.open_gaps(2) == []  # the old connection still delivers
    g.on_link_event(ev(LinkEventKind.CUTOVER, "old", TICKERS, ts_ns=3, replacement="new"))
    (gap,) = g.open_gaps(4)
    assert (gap.kind, gap.before, gap.conn_before) == (GapKind.CUTOVER, Position(100), "old")


def test_64008_overlap_through_stream_owners_yields_no_gap_and_no_duplicate() -> None:
    """The pipeline's order: link events to both, units through StreamOwners, published ones to GapTracker."""
    owners: StreamOwners[int] = StreamOwners()
    g = GapTracker()
    published: list[int] = []
    gaps: list[Gap] = []

    def feed_event(e: LinkEvent) -> None:
        gaps.extend(g.on_link_event(e))
        for offer in owners.on_link_event(e):
            publish(offer.arg, e.replacement or e.conn, offer.emit, offer.handover)

    def publish(arg: SubArg, conn: str, ids: tuple[int, ...], handover: Handover | None) -> None:
        if handover is not None:
            g.on_handover(handover)
            conn = handover.to_conn
        for tid in ids:
            published.append(tid)
            gaps.extend(g.on_record(arg, conn, Position(tid, tid), tid))

    def feed(conn: str, tid: int) -> None:
        offer = owners.offer(TRADES, conn, Position(tid, tid), tid, ts_ns=tid)
        publish(TRADES, conn, offer.emit, offer.handover)

    feed_event(ev(LinkEventKind.SUBSCRIBED, "old", TRADES))
    for tid in (1, 2, 3):
        feed("old", tid)
    feed_event(ev(LinkEventKind.NOTICE, "old", TRADES, replacement="new"))
    feed_event(ev(LinkEventKind.SUBSCRIBED, "new", TRADES))
    for conn, tid in (("new", 6), ("old", 4), ("new", 7), ("old", 5), ("old", 6), ("new", 8), ("old", 7)):
        feed(conn, tid)
    feed_event(ev(LinkEventKind.CUTOVER, "old", TRADES, replacement="new"))
    feed_event(ev(LinkEventKind.DISCONNECTED, "old", TRADES))
    feed("new", 9)
    assert published == [1, 2, 3, 4, 5, 6, 7, 8, 9]
    assert gaps == [] and g.open_gaps(100) == []


def test_cutover_to_an_acked_replacement_that_has_not_delivered_yet_leaves_no_open_gap() -> None:
    g = GapTracker()
    g.on_link_event(ev(LinkEventKind.SUBSCRIBED, "old", TRADES))
    g.on_record(TRADES, "old", Position(1, 10), 1)
    g.on_link_event(ev(LinkEventKind.SUBSCRIBED, "new", TRADES))
    assert g.on_link_event(ev(LinkEventKind.CUTOVER, "old", TRADES, replacement="new")) == []
    assert g.on_link_event(ev(LinkEventKind.DISCONNECTED, "old", TRADES)) == []
    assert g.open_gaps(5) == []  # an illiquid stream may stay quiet on "new" for a long time
    assert g.on_record(TRADES, "new", Position(9, 11), 9) == []


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_overlap_of_two_connections_never_reports_a_gap_and_publishes_every_trade_once(data: st.DataObject) -> None:
    n = data.draw(st.integers(2, 30))
    m = data.draw(st.integers(1, n))
    k = data.draw(st.integers(0, m - 1))  # the replacement starts before the old connection's last trade
    a = [("old", t) for t in range(1, m + 1)]
    b = [("new", t) for t in range(k + 1, n + 1)]
    merged = [a.pop(0)]
    while a or b:
        merged.append((a if a and (not b or data.draw(st.booleans())) else b).pop(0))
    end_at = data.draw(st.integers(max(i for i, (c, _) in enumerate(merged) if c == "old") + 1, len(merged)))
    end = data.draw(st.sampled_from([LinkEventKind.CUTOVER, LinkEventKind.DISCONNECTED]))
    owners: StreamOwners[int] = StreamOwners()
    g = GapTracker()
    published: list[int] = []
    gaps: list[Gap] = []

    def publish(conn: str, emit: tuple[int, ...], handover: Handover | None) -> None:
        if handover is not None:
            g.on_handover(handover)
            conn = handover.to_conn
        for tid in emit:
            published.append(tid)
            gaps.extend(g.on_record(TRADES, conn, Position(tid, tid), tid))

    for e in (ev(LinkEventKind.SUBSCRIBED, "old", TRADES), ev(LinkEventKind.SUBSCRIBED, "new", TRADES)):
        gaps.extend(g.on_link_event(e))
        owners.on_link_event(e)
    for i, (conn, tid) in enumerate([*merged, ("end", 0)]):
        if i == end_at:
            e = ev(end, "old", TRADES, replacement="new")
            gaps.extend(g.on_link_event(e))
            for offer in owners.on_link_event(e):
                publish("new", offer.emit, offer.handover)
        if conn != "end":
            offer = owners.offer(TRADES, conn, Position(tid, tid), tid, ts_ns=i)
            publish(conn, offer.emit, offer.handover)
    assert published == list(range(1, n + 1))
    assert gaps == [] and g.open_gaps(10**9) == []
