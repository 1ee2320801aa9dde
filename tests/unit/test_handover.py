"""The hand-over's pure bookkeeping (core/handover.py): whatever the interleaving of the old owner's stream, the
new owner's subscription point and the moment `prepared` arrives, every unit is published exactly once when the
hand-over completes, and nothing is dropped when it falls back."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from ingest.core.handover import (
    Hold,
    Leaving,
    Prepared,
    Release,
    Released,
    Taken,
    decode_control,
    encode_control,
    unit_of,
)

STREAM = "trades-all:BTC-USDT"


def test_unit_of_reads_the_aligners_positions_from_event_keys() -> None:
    assert unit_of("trades-all:BTC-USDT:123") == (STREAM, 123)
    assert unit_of("trades:BTC-USDT:124:3") == ("trades:BTC-USDT", 124)
    assert unit_of("books:BTC-USDT:456:snapshot") == ("books:BTC-USDT", 456)
    assert unit_of("tickers:ETH-USDT:1700000000000") == ("tickers:ETH-USDT", 1700000000000)
    assert unit_of("trades-all:BTC-USDT:-7") == (STREAM, None), "negative tradeIds are outside the order"
    assert unit_of("books:BTC-USDT:ts17:snapshot:ab") == ("books:BTC-USDT", None)
    assert unit_of("gaps:abc:1") is None
    assert unit_of("dlq:ff") is None


def test_control_records_round_trip_and_garbage_is_ignored() -> None:
    for msg in (Prepared(3, "b", 7, "a", {STREAM: 10}, 1), Released(3, "a", "b", 7, {STREAM: 12, "x:y": None}, 2),
                Leaving(3, "a", 6, 3), Taken(3, "c", 8, 4)):
        assert decode_control(encode_control(msg)) == msg
    assert decode_control(b"{not json") is None
    assert decode_control(b'{"v": 99}') is None
    assert decode_control(None) is None


@given(total=st.integers(1, 60), old_until=st.integers(0, 60), new_from=st.integers(1, 60),
       prepared_after=st.integers(0, 60), old_lag=st.integers(0, 20))
def test_a_completed_hand_over_publishes_every_unit_exactly_once(
    total: int, old_until: int, new_from: int, prepared_after: int, old_lag: int
) -> None:
    """The old owner has published units 1..old_until when the move starts; the new owner receives new_from..total
    (it subscribed later, so new_from - 1 <= what the old owner will reach); `prepared` reaches the old owner after
    it published `prepared_after` more units."""
    new_from = min(new_from, total)
    old_until = min(old_until, new_from - 1)  # the new owner is subscribed before the old one stops
    new_units = list(range(new_from, total + 1))
    hold: Hold[int] = Hold(1, "old", 5, [STREAM], started=0.0, timeout_s=10.0)
    for u in new_units[: len(new_units) - min(old_lag, len(new_units) - 1)]:
        hold.offer(STREAM, u, u)
    rel = Release(1, 4, [STREAM], timeout_s=10.0, last={STREAM: old_until} if old_until else {})
    published = list(range(1, old_until + 1))
    prepared = Prepared(1, "new", 5, "old", dict(hold.first), 0)
    unit = old_until + 1
    steps = 0
    while not rel.done() and unit <= total:
        if steps == prepared_after and rel.target is None:
            assert rel.on_prepared(prepared, 1.0)
            continue
        if rel.allow(STREAM, unit):
            published.append(unit)
        unit += 1
        steps += 1
        if rel.target is None and unit > total:
            rel.on_prepared(prepared, 1.0)
    if rel.target is None:
        rel.on_prepared(prepared, 1.0)
    rel.tick(5.0, 1.0)
    assert rel.done()
    out, _ = hold.release(rel.released("old", 0).cuts)
    published += out
    for u in new_units[len(new_units) - min(old_lag, len(new_units) - 1):]:  # received after the release
        if hold.after_release(STREAM, u):
            published.append(u)
    assert sorted(published) == list(range(1, total + 1)), "every unit once, none missing"


def test_a_stale_prepared_of_an_older_generation_does_not_count() -> None:
    rel = Release(1, 6, [STREAM], timeout_s=10.0)
    assert not rel.on_prepared(Prepared(1, "new", 6, "old", {STREAM: 1}, 0), 0.0)
    assert rel.target is None


def test_the_fallback_publishes_everything_held_including_the_gap() -> None:
    hold: Hold[str] = Hold(1, "old", 5, [STREAM], started=0.0, timeout_s=10.0)
    hold.offer(STREAM, None, "gap", handover_gap=True)
    hold.offer(STREAM, 7, "t7")
    hold.offer(None, None, "dead letter")
    assert not hold.expired(9.9) and hold.expired(10.0)
    assert hold.fallback() == ["gap", "t7", "dead letter"]


def test_a_completed_hand_over_drops_its_own_gap_and_what_the_old_owner_published() -> None:
    hold: Hold[str] = Hold(1, "old", 5, [STREAM], started=0.0, timeout_s=10.0)
    hold.offer(STREAM, None, "gap", handover_gap=True)
    for n in (7, 8, 9):
        hold.offer(STREAM, n, f"t{n}")
    out, dropped = hold.release({STREAM: 8})
    assert out == ["t9"] and dropped == 3


def test_a_stream_quiet_at_the_new_owner_is_cut_at_the_old_owners_last_unit_after_the_grace() -> None:
    rel = Release(1, 4, [STREAM, "trades-all:ETH-USDT"], timeout_s=10.0, last={"trades-all:ETH-USDT": 3})
    rel.on_prepared(Prepared(1, "new", 5, "old", {STREAM: 10}, 0), 1.0)
    assert rel.allow("trades-all:ETH-USDT", 4)
    rel.tick(1.5, 1.0)
    assert not rel.done()
    rel.tick(2.0, 1.0)
    assert rel.cuts["trades-all:ETH-USDT"] == 4 and not rel.allow("trades-all:ETH-USDT", 5)
    assert rel.allow(STREAM, 10) and rel.done() and rel.cuts[STREAM] == 10
    assert not rel.allow(STREAM, 11)


def test_the_old_owner_waits_twice_the_timeout_for_prepared_and_then_a_timeout_for_the_overlap() -> None:
    """A new owner slow to subscribe (throttled connects) still gets the stream: the old owner does not cut first."""
    rel = Release(1, 4, [STREAM], timeout_s=10.0, started=100.0)
    assert not rel.expired(119.9), "a timeout without prepared is not enough to cut"
    assert rel.allow(STREAM, 5)
    assert rel.expired(120.0), "twice the timeout without prepared: no new owner came"
    late = Release(1, 4, [STREAM], timeout_s=10.0, started=100.0)
    assert late.on_prepared(Prepared(1, "new", 5, "old", {STREAM: 9}, 0), 118.0)
    assert not late.expired(127.9), "after prepared, a whole timeout for the overlap"
    assert late.expired(128.0)
