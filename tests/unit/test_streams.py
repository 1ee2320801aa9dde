"""Stream ownership across connections: a replacement connection yields no duplicate and no hole."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from hypothesis import given, settings
from hypothesis import strategies as st

from ingest.core.events import LinkEvent, LinkEventKind
from ingest.core.streams import Dedupe, Offer, Position, Proof, StreamOwners, dedupe_for
from ingest.okx.channels import SubArg

TRADES = SubArg("trades", "BTC-USDT")
TICKERS = SubArg("tickers", "BTC-USDT")
BOOKS5 = SubArg("books5", "BTC-USDT")
BOOKS = SubArg("books", "BTC-USDT")
CANDLES = SubArg("candle1m", "BTC-USDT")
ORDERS = SubArg("orders", inst_type="ANY")

#: What the unit generators need from hypothesis: `draw` of a composite strategy or of `st.data()`.
Draw = Callable[[st.SearchStrategy[int]], int]


def ev(kind: LinkEventKind, conn: str, arg: SubArg, ts_ns: int = 0, replacement: str | None = None) -> LinkEvent:
    return LinkEvent(kind, conn, "public-0", ts_ns, (arg,), replacement=replacement)


@dataclass(frozen=True)
class U:
    """A test unit: an index into the original sequence and its position."""

    index: int
    pos: Position


def trade_units(draw: Draw, n: int) -> list[U]:
    """Aggregated trades (count 1-5) with occasional liquidation fills (negative, unique tradeIds)."""
    units: list[U] = []
    tid, ts, neg = 1000, 1_700_000_000_000, -1
    for i in range(n):
        if draw(st.integers(0, 9)) == 0:
            units.append(U(i, Position(ts, neg)))
            neg -= draw(st.integers(1, 3))
        else:
            tid += draw(st.integers(1, 5))
            units.append(U(i, Position(ts, tid)))
        ts += draw(st.integers(0, 3))
    return units


def ts_units(draw: Draw, n: int) -> list[U]:
    ts = 1_700_000_000_000
    out = []
    for i in range(n):
        ts += draw(st.integers(1, 100))
        out.append(U(i, Position(ts)))
    return out


def seq_units(draw: Draw, n: int) -> list[U]:
    seq, ts = 333_794_734_980, 1_786_541_241_006
    out = []
    for i in range(n):
        seq += draw(st.integers(1, 40))
        ts += draw(st.integers(0, 100))
        out.append(U(i, Position(ts, None, seq)))
    return out


@st.composite
def overlap_scenario(draw: st.DrawFn) -> tuple[SubArg, list[U], list[tuple[str, object]], int, int, str | None]:
    """Old conn A delivers items[:m], replacement B delivers items[k:] (k <= m), interleaved arbitrarily after
    A's first unit; A's end (CUTOVER / DISCONNECTED) comes anywhere after A's last unit (optional when the
    copies overlap, since then B's stream provably takes over by itself)."""
    arg, make = draw(st.sampled_from([(TRADES, trade_units), (TICKERS, ts_units), (BOOKS5, seq_units)]))
    n = draw(st.integers(1, 40))
    items = make(draw, n)
    m = draw(st.integers(1, n))
    k = draw(st.integers(0, m))
    a: list[tuple[str, object]] = [("A", u) for u in items[:m]]
    b: list[tuple[str, object]] = [("B", u) for u in items[k:]]
    end = draw(st.sampled_from(["cutover", "disconnect"] + ([None] if k < m else [])))
    if end is not None:
        a.append(("A-end", end))
    # A is the old connection: its first unit was received before B existed; after that, any order.
    merged: list[tuple[str, object]] = [a.pop(0)]
    while a or b:
        take_a = bool(a) and (not b or draw(st.booleans()))
        merged.append((a if take_a else b).pop(0))
    return arg, items, merged, k, m, end


def run(owners: StreamOwners[U], arg: SubArg, merged: list[tuple[str, object]]) -> tuple[list[U], list[Offer[U]]]:
    out: list[U] = []
    offers: list[Offer[U]] = []
    offers.extend(owners.on_link_event(ev(LinkEventKind.SUBSCRIBED, "A", arg)))
    offers.extend(owners.on_link_event(ev(LinkEventKind.SUBSCRIBED, "B", arg)))
    for who, x in merged:
        if who == "A-end":
            kind = LinkEventKind.CUTOVER if x == "cutover" else LinkEventKind.DISCONNECTED
            offers.extend(owners.on_link_event(ev(kind, "A", arg, replacement="B")))
        else:
            assert isinstance(x, U)
            offers.append(owners.offer(arg, who, x.pos, x, ts_ns=0))
    for o in offers:
        out.extend(o.emit)
    return out, offers


@settings(max_examples=400, deadline=None)
@given(overlap_scenario())
def test_two_interleaved_copies_yield_each_item_once_in_order(
    scenario: tuple[SubArg, list[U], list[tuple[str, object]], int, int, str | None],
) -> None:
    arg, items, merged, k, m, end = scenario
    out, offers = run(StreamOwners(), arg, merged)
    assert [u.index for u in out] == [u.index for u in items]
    handovers = [o.handover for o in offers if o.handover is not None]
    if k < m or end == "cutover":
        assert all(h.proof is Proof.OVERLAP for h in handovers)
    if k == m and end == "disconnect":
        # B's stream starts right after A's last unit, but nothing proves that nothing was in between.
        assert [h.proof for h in handovers] == ([Proof.NONE] if k < len(items) else [])


def test_replacement_units_ahead_of_the_owner_are_held_until_the_owner_catches_up() -> None:
    owners: StreamOwners[str] = StreamOwners()
    assert owners.offer(TRADES, "A", Position(1, 10), "t10", ts_ns=1).emit == ("t10",)
    # B's first trade overtakes A's in-flight trades 11 and 12: publishing it now would lose them.
    assert owners.offer(TRADES, "B", Position(3, 13), "t13", ts_ns=2).emit == ()
    assert owners.pending(TRADES) == 1
    assert owners.offer(TRADES, "A", Position(2, 11), "t11", ts_ns=3).emit == ("t11",)
    caught_up = owners.offer(TRADES, "A", Position(2, 13), "t13", ts_ns=4)
    assert caught_up.emit == ("t13",)
    assert caught_up.handover is not None and caught_up.handover.proof is Proof.OVERLAP
    assert owners.owner(TRADES) == "B"
    assert owners.offer(TRADES, "A", Position(4, 14), "t14-from-A", ts_ns=5).dropped == 1
    assert owners.offer(TRADES, "B", Position(4, 14), "t14", ts_ns=6).emit == ("t14",)


def test_aggregated_trade_already_published_by_the_old_connection_is_dropped_at_the_switch() -> None:
    owners: StreamOwners[str] = StreamOwners()
    owners.offer(TRADES, "A", Position(1, 2832749635), "a", ts_ns=1)
    owners.offer(TRADES, "A", Position(2, 2832749645), "b", ts_ns=2)  # count 10: covers ...636-645
    offer = owners.offer(TRADES, "B", Position(2, 2832749645), "b-again", ts_ns=3)
    assert offer.emit == () and offer.dropped == 1
    assert offer.handover is not None and offer.handover.to_conn == "B"


def test_owner_keeps_publishing_a_sequence_restart_outside_the_switch_window() -> None:
    owners: StreamOwners[str] = StreamOwners()
    owners.offer(BOOKS5, "A", Position(1000, None, 500), "s500", ts_ns=1)
    # SPEC 7.1: sequences may restart during maintenance; the owner's lower seqId is not a duplicate.
    assert owners.offer(BOOKS5, "A", Position(1100, None, 3), "s3", ts_ns=2).emit == ("s3",)
    # A re-sent snapshot (keepalive) from the owner is published too.
    assert owners.offer(BOOKS5, "A", Position(1100, None, 3), "s3-again", ts_ns=3).emit == ("s3-again",)


def test_books_switch_at_the_replacement_snapshot_and_keep_all_its_updates() -> None:
    owners: StreamOwners[str] = StreamOwners()
    owners.offer(BOOKS, "A", Position(1, None, 10), "A-snap", ts_ns=1, snapshot=True)
    owners.offer(BOOKS, "A", Position(2, None, 20), "A-u20", ts_ns=2)
    assert owners.offer(BOOKS, "B", Position(2, None, 20), "B-u?", ts_ns=3).dropped == 1  # no snapshot yet
    sw = owners.offer(BOOKS, "B", Position(2, None, 15), "B-snap", ts_ns=4, snapshot=True)
    assert sw.emit == ("B-snap",)
    assert sw.handover is not None and sw.handover.proof is Proof.OVERLAP  # 15 <= 20: nothing unrecorded
    # B's updates below the last published seqId must still be published: they chain on B's snapshot.
    assert owners.offer(BOOKS, "B", Position(2, None, 20), "B-u20", ts_ns=5).emit == ("B-u20",)
    assert owners.offer(BOOKS, "A", Position(3, None, 30), "A-u30", ts_ns=6).dropped == 1


def test_books_snapshot_beyond_the_last_published_seq_is_an_unproven_handover() -> None:
    owners: StreamOwners[str] = StreamOwners()
    owners.offer(BOOKS, "A", Position(1, None, 10), "A-snap", ts_ns=1, snapshot=True)
    sw = owners.offer(BOOKS, "B", Position(2, None, 40), "B-snap", ts_ns=2, snapshot=True)
    assert sw.emit == ("B-snap",)
    assert sw.handover is not None and sw.handover.proof is Proof.NONE


def test_reconnect_after_disconnect_hands_over_at_the_first_unit_and_drops_repeats() -> None:
    owners: StreamOwners[str] = StreamOwners()
    owners.offer(TICKERS, "A", Position(100), "x100", ts_ns=1)
    owners.offer(TICKERS, "A", Position(200), "x200", ts_ns=2)
    assert owners.on_link_event(ev(LinkEventKind.DISCONNECTED, "A", TICKERS)) == []
    assert owners.owner(TICKERS) is None
    first = owners.offer(TICKERS, "A2", Position(200), "x200-again", ts_ns=3)
    assert first.emit == () and first.dropped == 1
    assert first.handover is not None and first.handover.proof is Proof.OVERLAP
    assert owners.offer(TICKERS, "A2", Position(300), "x300", ts_ns=4).emit == ("x300",)


def test_disconnect_of_the_owner_flushes_the_held_replacement_units_as_unproven() -> None:
    owners: StreamOwners[str] = StreamOwners()
    owners.offer(TICKERS, "A", Position(100), "x100", ts_ns=1)
    owners.offer(TICKERS, "B", Position(300), "x300", ts_ns=2)
    owners.offer(TICKERS, "B", Position(400), "x400", ts_ns=3)
    (flush,) = owners.on_link_event(ev(LinkEventKind.DISCONNECTED, "A", TICKERS, ts_ns=9))
    assert flush.emit == ("x300", "x400")
    assert flush.handover is not None
    assert (flush.handover.from_conn, flush.handover.to_conn, flush.handover.proof) == ("A", "B", Proof.NONE)
    assert flush.handover.last_published == Position(100)


def test_cutover_to_an_acked_replacement_is_proven_by_time() -> None:
    owners: StreamOwners[str] = StreamOwners()
    owners.on_link_event(ev(LinkEventKind.SUBSCRIBED, "B", TICKERS))
    owners.offer(TICKERS, "A", Position(100), "x100", ts_ns=1)
    owners.offer(TICKERS, "B", Position(300), "x300", ts_ns=2)
    (flush,) = owners.on_link_event(ev(LinkEventKind.CUTOVER, "A", TICKERS, replacement="B"))
    assert flush.emit == ("x300",)
    assert flush.handover is not None and flush.handover.proof is Proof.OVERLAP
    assert owners.offer(TICKERS, "A", Position(300), "late-from-A", ts_ns=3).dropped == 1


def test_pending_overflow_forces_an_unproven_switch_instead_of_growing_without_bound() -> None:
    owners: StreamOwners[str] = StreamOwners(max_pending=3)
    owners.offer(TICKERS, "A", Position(1), "x1", ts_ns=1)
    for ts in (10, 11, 12):
        assert owners.offer(TICKERS, "B", Position(ts), f"x{ts}", ts_ns=ts).emit == ()
    forced = owners.offer(TICKERS, "B", Position(13), "x13", ts_ns=13)
    assert forced.emit == ("x10", "x11", "x12", "x13")
    assert forced.handover is not None and forced.handover.proof is Proof.NONE
    assert owners.pending(TICKERS) == 0


def test_liquidation_trade_already_published_proves_overlap_and_is_not_repeated() -> None:
    owners: StreamOwners[str] = StreamOwners()
    owners.offer(TRADES, "A", Position(1, 50), "t50", ts_ns=1)
    owners.offer(TRADES, "A", Position(1, -7), "liq-7", ts_ns=2)
    sw = owners.offer(TRADES, "B", Position(1, -7), "liq-7-again", ts_ns=3)
    assert sw.emit == () and sw.handover is not None and sw.handover.proof is Proof.OVERLAP
    assert owners.offer(TRADES, "B", Position(2, 51), "t51", ts_ns=4).emit == ("t51",)


def test_candle_states_of_the_forming_bar_may_repeat_at_a_switch_but_are_never_dropped() -> None:
    owners: StreamOwners[str] = StreamOwners()
    owners.offer(CANDLES, "A", Position(60_000), "bar1-v1", ts_ns=1)
    owners.offer(CANDLES, "A", Position(120_000), "bar2-v1", ts_ns=2)
    sw = owners.offer(CANDLES, "B", Position(120_000), "bar2-v2", ts_ns=3)
    assert sw.emit == ("bar2-v2",)
    assert owners.offer(CANDLES, "B", Position(60_000), "bar1-late", ts_ns=4).emit == ("bar1-late",)


def test_private_channels_publish_every_connection_and_leave_repeats_to_content_dedupe() -> None:
    owners: StreamOwners[str] = StreamOwners()
    assert owners.offer(ORDERS, "A", Position(5), "o1", ts_ns=1).emit == ("o1",)
    assert owners.offer(ORDERS, "B", Position(5), "o1-again", ts_ns=2).emit == ("o1-again",)
    assert owners.offer(ORDERS, "A", Position(4), "o0", ts_ns=3).emit == ("o0",)


def test_channel_policies_follow_spec() -> None:
    assert dedupe_for("trades") is Dedupe.TRADE_ID
    assert dedupe_for("trades-all") is Dedupe.TRADE_ID
    assert dedupe_for("books") is Dedupe.SNAPSHOT
    assert dedupe_for("books50-l2-tbt") is Dedupe.SNAPSHOT
    assert dedupe_for("bbo-tbt") is Dedupe.SEQ_ID
    assert dedupe_for("tickers") is Dedupe.TS
    assert dedupe_for("candle1H") is Dedupe.TS_INCLUSIVE
    assert dedupe_for("orders") is Dedupe.UNION


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_candles_through_a_switch_lose_nothing_and_repeat_at_most_the_state_at_the_switch(data: st.DataObject) -> None:
    items = ts_units(data.draw, data.draw(st.integers(2, 30)))
    m = data.draw(st.integers(1, len(items)))
    k = data.draw(st.integers(0, m - 1))
    a = [("A", u) for u in items[:m]]
    b = [("B", u) for u in items[k:]]
    merged = [a.pop(0)]
    while a or b:
        merged.append((a if a and (not b or data.draw(st.booleans())) else b).pop(0))
    owners: StreamOwners[U] = StreamOwners()
    out = [x for who, u in merged for x in owners.offer(CANDLES, who, u.pos, u, ts_ns=0).emit]
    collapsed = [u for i, u in enumerate(out) if i == 0 or out[i - 1] != u]
    assert [u.index for u in collapsed] == [u.index for u in items]
    assert len(out) - len(collapsed) <= 1


def test_a_reconnect_snapshot_after_a_sequence_restart_does_not_prove_overlap() -> None:
    """OKX restarts seqIds at maintenance: a later snapshot with a lower seqId must keep the disconnect gap."""
    from ingest.core.events import LinkEvent, LinkEventKind
    from ingest.core.streams import Handover, Position, Proof, StreamOwners
    from ingest.okx.channels import SubArg

    arg = SubArg("books", "BTC-USDT")
    owners: StreamOwners[str] = StreamOwners()
    owners.offer(arg, "a#1", Position(1_000, None, 9_000), "snap-a", ts_ns=1, snapshot=True)
    owners.on_link_event(LinkEvent(LinkEventKind.DISCONNECTED, "a#1", "a", 2, (arg,)))
    restarted = owners.offer(arg, "a#2", Position(600_000, None, 7), "snap-b", ts_ns=3, snapshot=True)
    assert restarted.emit == ("snap-b",)
    assert isinstance(restarted.handover, Handover) and restarted.handover.proof is Proof.NONE
    replayed = StreamOwners[str]()
    replayed.offer(arg, "a#1", Position(1_000, None, 9_000), "snap-a", ts_ns=1, snapshot=True)
    replayed.on_link_event(LinkEvent(LinkEventKind.DISCONNECTED, "a#1", "a", 2, (arg,)))
    same_image = replayed.offer(arg, "a#2", Position(1_000, None, 9_000), "snap-c", ts_ns=3, snapshot=True)
    assert same_image.handover is not None and same_image.handover.proof is Proof.OVERLAP
