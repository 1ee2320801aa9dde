"""Copies (`cluster.copies` > 1): a gap one copy detects is raised only when no other copy recorded its window."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ingest.config import load_settings
from ingest.core.cluster import StreamPosition, copy_covers, decode_position, encode_position, position_key
from ingest.core.events import DecidedGaps, Inbound, LinkEvent, LinkEventKind
from ingest.core.gaps import Gap, GapKind, GapTracker, Position, StreamCheckpoint
from ingest.errors import ConfigError
from ingest.okx.channels import SubArg
from ingest.services.copies import CopyArbiter
from ingest.services.pipeline import gap_record

TRADES = SubArg("trades-all", inst_id="BTC-USDT")
TICKERS = SubArg("tickers", inst_id="BTC-USDT")
BOOKS = SubArg("books", inst_id="BTC-USDT")


def _down(conn: str, arg: SubArg, ts: int) -> LinkEvent:
    return LinkEvent(LinkEventKind.DISCONNECTED, conn, "public-0", ts, (arg,), reason="test")


def _record(missed: set[int], ids: range, cut_every: int | None = None) -> tuple[GapTracker, list[Gap]]:
    """One copy's tracker fed the trades `ids` it received (each missed run behind a dropped connection)."""
    tracker = GapTracker()
    gaps: list[Gap] = []
    conn = 0
    down = False
    for tid in ids:
        if tid in missed:
            if not down:
                gaps += tracker.on_link_event(_down(f"c{conn}", TRADES, tid * 10))
                conn, down = conn + 1, True
            continue
        down = False
        gaps += tracker.on_record(TRADES, f"c{conn}", Position(tid * 10, tid, None), tid * 10)
    return tracker, gaps


def _position(cp: StreamCheckpoint, saved_ts_ns: int = 0, copy: int = 1) -> StreamPosition:
    return StreamPosition(0, "other", 3, saved_ts_ns, cp, copy)


def _checkpoint(tracker: GapTracker, arg: SubArg = TRADES) -> StreamCheckpoint:
    return next(cp for cp in tracker.checkpoint() if cp.arg == arg)


@settings(max_examples=300, deadline=None)
@given(n=st.integers(5, 60), a_missed=st.sets(st.integers(2, 60)), b_missed=st.sets(st.integers(2, 60)),
       seen=st.integers(2, 60))
def test_a_gap_counts_as_covered_only_when_the_other_copy_received_every_trade_it_lacks(
        n: int, a_missed: set[int], b_missed: set[int], seen: int) -> None:
    ids = range(1, n + 1)
    _, gaps = _record(a_missed, ids)
    # The other copy's position as saved after it had received ids up to `seen` (any moment of its run).
    b, _ = _record(b_missed, range(1, min(seen, n) + 1))
    if not any(cp.arg == TRADES for cp in b.checkpoint()):
        return
    peer = _position(_checkpoint(b))
    b_received = {t for t in range(1, min(seen, n) + 1) if t not in b_missed}
    for gap in gaps:
        assert gap.before is not None and gap.after is not None
        lo, hi = gap.before.trade_id, gap.after.trade_id
        assert lo is not None and hi is not None
        lacking = set(range(lo + 1, hi))
        if copy_covers(gap, peer):
            assert lacking <= b_received, "covered means the other copy has every trade the gap lacks"
        elif not b_missed and seen >= hi:
            pytest.fail("a copy that missed nothing and is past the gap covers it")


def test_a_run_starts_at_the_first_record_and_again_after_each_gap() -> None:
    tracker, gaps = _record({4, 5}, range(1, 9))
    assert [(g.before.trade_id, g.after.trade_id) for g in gaps if g.before and g.after] == [(3, 6)]
    cp = _checkpoint(tracker)
    assert cp.since == Position(60, 6, None) and cp.last == Position(80, 8, None)
    assert StreamCheckpoint.from_json(cp.to_json()) == cp
    fresh, _ = _record(set(), range(1, 4))
    assert _checkpoint(fresh).since == Position(10, 1, None)


def test_a_restored_stream_has_no_run_until_its_gap_closes() -> None:
    tracker, _ = _record(set(), range(1, 4))
    tracker.restore(_checkpoint(tracker), 5, "taken over")
    assert _checkpoint(tracker).since is None  # the predecessor's run is not this process's
    tracker.on_record(TRADES, "c9", Position(90, 9, None), 90)
    assert _checkpoint(tracker).since == Position(90, 9, None)


def _gap(arg: SubArg, before: Position | None, after: Position | None, detected: int = 100) -> Gap:
    return Gap(f"g-{arg.channel}-{before}-{after}", GapKind.DISCONNECT, arg.channel, arg.inst_id, "SPOT", before,
               after, "test", "c0", "c1", 1, detected, arg)


def test_tickers_compare_by_time_and_books_by_seq_id_and_time() -> None:
    ticks = StreamCheckpoint(TICKERS, Position(500, None, None), "x", "SPOT", since=Position(100, None, None))
    assert copy_covers(_gap(TICKERS, Position(200, None, None), Position(400, None, None)), _position(ticks))
    assert not copy_covers(_gap(TICKERS, Position(50, None, None), Position(400, None, None)), _position(ticks))
    assert not copy_covers(_gap(TICKERS, Position(200, None, None), Position(600, None, None)), _position(ticks))
    book = StreamCheckpoint(BOOKS, Position(900, None, 900), "x", "SPOT", since=Position(100, None, 100))
    assert copy_covers(_gap(BOOKS, Position(200, None, 200), Position(800, None, 800)), _position(book))
    assert not copy_covers(_gap(BOOKS, Position(200, None, 200), Position(901, None, 901)), _position(book))


def test_a_book_seq_id_reset_is_never_taken_for_a_covered_window() -> None:
    """OKX may restart a book's seqIds at maintenance: seqIds alone would call either side of a reset covered."""
    after_reset = StreamCheckpoint(BOOKS, Position(250, None, 50), "x", "SPOT", since=Position(190, None, 10))
    gap = _gap(BOOKS, Position(100, None, 1_000), Position(200, None, 30))  # before the reset -> after it
    assert not copy_covers(gap, _position(after_reset)), "the other copy's run began after the gap began"
    before_reset = StreamCheckpoint(BOOKS, Position(150, None, 2_000), "x", "SPOT", since=Position(50, None, 5))
    assert not copy_covers(gap, _position(before_reset)), "the other copy's run ended before the gap ended"


def test_an_equal_time_proves_nothing_for_streams_told_apart_by_time_alone() -> None:
    candles = SubArg("candle1m", inst_id="BTC-USDT")
    bar = StreamCheckpoint(candles, Position(60_000, None, None), "x", "SPOT", since=Position(0, None, None))
    # Every push of one bar carries its start time: a push of the bar after `before` may be missing.
    assert not copy_covers(_gap(candles, Position(0, None, None), Position(60_000, None, None)), _position(bar))


def test_trades_are_told_apart_by_trade_id_only() -> None:
    run = StreamCheckpoint(TRADES, Position(80, 8, None), "x", "SPOT", since=Position(10, None, None))
    assert not copy_covers(TRADE_GAP, _position(run)), "a run that began without a tradeId proves nothing"
    tracker = GapTracker()
    tracker.on_record(TRADES, "c0", Position(10, -5, None), 10)  # a liquidation's negative id
    tracker.on_record(TRADES, "c0", Position(20, 2, None), 20)
    assert _checkpoint(tracker).since == Position(20, 2, None), "the run starts at its first positive tradeId"


def test_a_failed_subscription_breaks_the_run() -> None:
    tracker, _ = _record(set(), range(1, 4))
    failed = LinkEvent(LinkEventKind.SUBSCRIBE_FAILED, "c0", "public-0", 35, (TRADES,), code="60018", reason="x")
    assert tracker.on_link_event(failed)
    assert _checkpoint(tracker).since is None
    tracker.on_record(TRADES, "c1", Position(90, 9, None), 90)  # resumed: no open gap closes, a new run starts
    assert _checkpoint(tracker).since == Position(90, 9, None)


def test_a_gap_without_a_start_or_against_another_stream_is_never_covered() -> None:
    ticks = StreamCheckpoint(TICKERS, Position(500, None, None), "x", "SPOT", since=Position(100, None, None))
    assert not copy_covers(_gap(TICKERS, None, Position(400, None, None)), _position(ticks))
    other = SubArg("tickers", inst_id="ETH-USDT")
    assert not copy_covers(_gap(other, Position(200, None, None), Position(400, None, None)), _position(ticks))


def test_a_gap_that_did_not_close_is_covered_while_the_other_copy_runs_unbroken_past_it() -> None:
    ticks = StreamCheckpoint(TICKERS, Position(500, None, None), "x", "SPOT", since=Position(100, None, None))
    open_gap = _gap(TICKERS, Position(200, None, None), None, detected=400 * 1_000_000)
    assert copy_covers(open_gap, _position(ticks))
    stale = StreamCheckpoint(TICKERS, Position(300, None, None), "x", "SPOT", since=Position(100, None, None))
    assert not copy_covers(open_gap, _position(stale)), "no data from after the gap was detected"
    broken = StreamCheckpoint(TICKERS, Position(500, None, None), "x", "SPOT", GapKind.DISCONNECT,
                              Position(500, None, None), "x", 1, "lost", since=Position(100, None, None))
    assert not copy_covers(open_gap, _position(broken))


def test_each_copy_keeps_its_own_position_of_a_stream() -> None:
    cp = StreamCheckpoint(TRADES, Position(1, 2, None), "x", "SPOT", since=Position(1, 1, None))
    assert position_key(TRADES) == position_key(TRADES, 0) != position_key(TRADES, 1)
    p = StreamPosition(3, "rec-1", 4, 5, cp, 1)
    assert decode_position(encode_position(p)) == p
    old = encode_position(StreamPosition(3, "rec-1", 4, 5, cp)).replace(b',"copy":0', b"")
    assert decode_position(old) == StreamPosition(3, "rec-1", 4, 5, cp, 0), "positions written before copies"


class _Peers:
    def __init__(self) -> None:
        self.changed = asyncio.Condition()
        self.latest: dict[SubArg, list[StreamPosition]] = {}

    def positions(self, arg: SubArg) -> list[StreamPosition]:
        return self.latest.get(arg, [])


class _Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _arbiter() -> tuple[CopyArbiter, _Peers, asyncio.Queue[Inbound], _Clock]:
    peers, inbox, clock = _Peers(), asyncio.Queue[Inbound](), _Clock()
    return CopyArbiter(peers, inbox, 10.0, clock=clock), peers, inbox, clock


TRADE_GAP = _gap(TRADES, Position(30, 3, None), Position(60, 6, None))
COVERING = _position(StreamCheckpoint(TRADES, Position(80, 8, None), "x", "SPOT", since=Position(10, 1, None)))


async def test_a_gap_the_other_copy_already_covers_is_dropped_at_once() -> None:
    arbiter, peers, inbox, _ = _arbiter()
    peers.latest[TRADES] = [COVERING]
    assert arbiter.offer(TRADE_GAP, gap_record(TRADE_GAP, "0"))
    assert (arbiter.covered, arbiter.held, arbiter.holding) == (1, 0, frozenset())
    assert await arbiter.decide(final=True) == 0 and inbox.empty()


async def test_a_gap_covered_while_it_waits_is_dropped_and_its_stream_saves_positions_again() -> None:
    arbiter, peers, inbox, clock = _arbiter()
    arbiter.offer(TRADE_GAP, gap_record(TRADE_GAP, "0"))
    assert arbiter.holding == {TRADES}, "no position past a gap still undecided"
    clock.now = 5.0
    assert await arbiter.decide() == 0 and arbiter.held == 1
    peers.latest[TRADES] = [COVERING]
    clock.now = 6.0
    assert await arbiter.decide() == 0
    assert (arbiter.covered, arbiter.raised, arbiter.holding) == (1, 0, frozenset()) and inbox.empty()


async def test_a_gap_nobody_covered_is_published_after_the_wait_and_holds_positions_until_handed_over() -> None:
    arbiter, peers, inbox, clock = _arbiter()
    behind = _position(StreamCheckpoint(TRADES, Position(50, 5, None), "x", "SPOT", since=Position(10, 1, None)))
    peers.latest[TRADES] = [behind]  # the other copy has not reached the gap's end
    record = gap_record(TRADE_GAP, "0")
    arbiter.offer(TRADE_GAP, record)
    clock.now = 10.0
    deciding = asyncio.create_task(arbiter.decide())
    item = await inbox.get()
    assert isinstance(item, DecidedGaps) and item.records == (record,)
    assert arbiter.holding == {TRADES}, "still held: the pipeline has not handed the gap to delivery"
    item.handed()
    assert await deciding == 1
    assert (arbiter.raised, arbiter.held, arbiter.holding) == (1, 0, frozenset())


async def test_a_stop_publishes_every_gap_still_held() -> None:
    arbiter, _, inbox, _ = _arbiter()
    arbiter.offer(TRADE_GAP, gap_record(TRADE_GAP, "0"))

    async def pipeline() -> None:
        item = await inbox.get()
        assert isinstance(item, DecidedGaps)
        item.handed()

    consumer = asyncio.create_task(pipeline())
    await arbiter.flush(5.0)
    await consumer
    assert arbiter.raised == 1 and arbiter.held == 0


async def test_the_running_arbiter_publishes_a_gap_whose_wait_is_over() -> None:
    arbiter, _, inbox, clock = _arbiter()
    arbiter.offer(TRADE_GAP, gap_record(TRADE_GAP, "0"))
    clock.now = 11.0
    task = asyncio.create_task(arbiter.run())
    try:
        item = await asyncio.wait_for(inbox.get(), 5)
        assert isinstance(item, DecidedGaps) and [r.gap_id for r in item.records] == [TRADE_GAP.gap_id]
        item.handed()
    finally:
        task.cancel()


def test_a_replicas_copy_comes_from_its_setting_or_the_number_ending_its_name(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text('[kafka]\nbootstrap_servers = "k:9092"\n[cluster]\ngroup_id = "g"\ncopies = 2\n')
    c = load_settings(path).cluster
    assert [c.copy_of(f"okx-ingest-{i}") for i in range(4)] == [0, 1, 0, 1]
    assert (c.group_of(1), c.control_topic("okx.", 1)) == ("g-copy1", "okx.shards-copy1")
    with pytest.raises(ConfigError) as err:
        c.copy_of("recorder")
    assert err.value.key == "cluster.copy_index"
    path.write_text('[kafka]\nbootstrap_servers = "k:9092"\n[cluster]\ngroup_id = "g"\ncopies = 2\ncopy_index = 1\n')
    assert load_settings(path).cluster.copy_of("recorder") == 1
    path.write_text('[kafka]\nbootstrap_servers = "k:9092"\n[cluster]\ngroup_id = "g"\n')
    one = load_settings(path).cluster
    assert (one.copy_of("x"), one.group_of(0), one.control_topic("okx.", 0)) == (0, "g", "okx.shards")


async def test_a_gap_emitted_again_while_its_first_emission_is_published_stays_held() -> None:
    peers, clock = _Peers(), _Clock()
    inbox: asyncio.Queue[Inbound] = asyncio.Queue(maxsize=1)
    inbox.put_nowait(DecidedGaps((), 0))  # the pipeline is behind: the next put waits
    arbiter = CopyArbiter(peers, inbox, 10.0, clock=clock)
    arbiter.offer(TRADE_GAP, gap_record(TRADE_GAP, "0"))
    clock.now = 11.0
    deciding = asyncio.create_task(arbiter.decide())
    await asyncio.sleep(0)  # it waits for room in the queue
    arbiter.offer(TRADE_GAP, gap_record(TRADE_GAP, "0"))  # the same gap, emitted again meanwhile
    inbox.get_nowait()
    item = await inbox.get()
    assert isinstance(item, DecidedGaps)
    item.handed()
    await deciding
    assert arbiter.held == 1 and arbiter.holding == {TRADES}, "the newer emission still holds its stream back"
