"""Order-book integrity: seqId chain, CRC32 checksum, level application, on real OKX frames and mutations."""

from __future__ import annotations

import importlib.util
import json
import random
import zlib
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from msgspec.structs import replace  # BookMessage is a msgspec Struct (one is built per book message)

from ingest.core.books import (
    BookMessage,
    BookPosition,
    BookSet,
    BreakKind,
    OrderBook,
    SnapshotBook,
    VerdictKind,
    okx_checksum,
)
from ingest.okx.channels import SubArg


@dataclass(frozen=True)
class Frame:
    inst: str
    msg: BookMessage


def load_frames(path: Path) -> list[Frame]:
    out = []
    for line in path.read_text().splitlines():
        m: dict[str, Any] = json.loads(line)
        for d in m["data"]:
            out.append(Frame(m["arg"]["instId"], BookMessage(
                snapshot=m.get("action") == "snapshot", bids=d["bids"], asks=d["asks"], ts=int(d["ts"]),
                checksum=d.get("checksum"), seq_id=d.get("seqId"), prev_seq_id=d.get("prevSeqId"),
            )))
    return out


@pytest.fixture(scope="module")
def real_frames(shared_okx: Path) -> list[Frame]:
    return load_frames(shared_okx / "frames" / "books.jsonl")


@pytest.fixture(scope="module")
def reference_checker(shared_okx: Path) -> ModuleType:
    """The independent checker shipped with the OKX reference (tools/verify_books.py)."""
    spec = importlib.util.spec_from_file_location("verify_books", shared_okx / "tools" / "verify_books.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run(frames: list[Frame]) -> list[tuple[int, str, VerdictKind, BreakKind | None]]:
    """Feed frames to one book per instrument; (index, inst, verdict kind, break kind) per frame."""
    books: dict[str, OrderBook] = {}
    out = []
    for i, f in enumerate(frames):
        v = books.setdefault(f.inst, OrderBook()).apply(f.msg)
        out.append((i, f.inst, v.kind, v.broken.kind if v.broken else None))
    return out


def with_seq_ids(frames: list[Frame], seed: int) -> list[Frame]:
    """The real frames with a valid synthetic seqId chain per instrument (checksums kept)."""
    rng = random.Random(seed)
    last: dict[str, int] = {}
    out = []
    for f in frames:
        if f.msg.snapshot:
            seq, prev = rng.randint(0, 10**9), -1
        else:
            prev = last[f.inst]
            seq = prev + rng.randint(1, 50)
        last[f.inst] = seq
        out.append(Frame(f.inst, replace(f.msg, seq_id=seq, prev_seq_id=prev)))
    return out


def update_indices(frames: list[Frame]) -> list[int]:
    return [i for i, f in enumerate(frames) if not f.msg.snapshot]


def next_of_same_inst(frames: list[Frame], i: int) -> int | None:
    return next((j for j in range(i + 1, len(frames)) if frames[j].inst == frames[i].inst), None)


# ---- the real 2022 recording -------------------------------------------------------------------


def test_real_books_recording_validates_every_checksum(real_frames: list[Frame]) -> None:
    assert len(real_frames) == 290
    assert sum(f.msg.snapshot for f in real_frames) == 3
    books: dict[str, OrderBook] = {}
    for f in real_frames:
        v = books.setdefault(f.inst, OrderBook()).apply(f.msg)
        assert v.kind is (VerdictKind.SNAPSHOT if f.msg.snapshot else VerdictKind.APPLIED)
        assert v.checksum_checked  # no seqId in 2022: the checksum is the chain
    assert any((f.msg.checksum or 0) < 0 for f in real_frames)  # the signed interpretation matters


def test_checksum_matches_the_independent_reference_checker(
    real_frames: list[Frame], reference_checker: ModuleType
) -> None:
    books: dict[str, OrderBook] = {}
    for f in real_frames:
        book = books.setdefault(f.inst, OrderBook())
        book.apply(f.msg)
        assert book.checksum() == reference_checker.okx_checksum(book.bids(), book.asks()) == f.msg.checksum


def test_checksum_string_alternates_bid_and_ask_and_continues_with_the_longer_side() -> None:
    # SPEC 7.3's documented example string.
    expected = zlib.crc32(b"3366.1:7:3366.8:9:3368:8:3372:8")
    signed = expected - (1 << 32) if expected >= 1 << 31 else expected
    assert okx_checksum([("3366.1", "7", "0", "1")],
                        [("3366.8", "9", "0", "1"), ("3368", "8", "0", "1"), ("3372", "8", "0", "1")]) == signed


@settings(max_examples=200, deadline=None)
@given(bids=st.lists(st.tuples(st.integers(1, 10**6), st.integers(1, 10**4)), max_size=40),
       asks=st.lists(st.tuples(st.integers(1, 10**6), st.integers(1, 10**4)), max_size=40))
def test_checksum_agrees_with_reference_on_arbitrary_books(
    bids: list[tuple[int, int]], asks: list[tuple[int, int]], reference_checker: ModuleType
) -> None:
    b = [(f"{p / 10:g}", str(s), "0", "1") for p, s in bids]
    a = [(f"{p / 100:g}", f"{s}.5", "0", "1") for p, s in asks]
    assert okx_checksum(b, a) == reference_checker.okx_checksum(b, a)


@settings(max_examples=150, deadline=None)
@given(st.data())
def test_dropped_duplicated_or_reordered_update_breaks_the_seq_chain_at_that_point(
    real_frames: list[Frame], data: st.DataObject
) -> None:
    frames = with_seq_ids(real_frames, data.draw(st.integers(0, 2**32)))
    i = data.draw(st.sampled_from(update_indices(frames)))
    mutation = data.draw(st.sampled_from(["drop", "duplicate", "reorder"]))
    mutated = list(frames)
    if mutation == "drop":
        nxt = next_of_same_inst(frames, i)
        del mutated[i]
        expect_at = None if nxt is None else nxt - 1
    elif mutation == "duplicate":
        mutated.insert(i + 1, frames[i])
        expect_at = i + 1
    else:
        nxt = next_of_same_inst(frames, i)
        if nxt is None:
            return
        mutated[i], mutated[nxt] = mutated[nxt], mutated[i]
        expect_at = i
    verdicts = run(mutated)
    breaks = [(j, bk) for j, _, kind, bk in verdicts if kind is VerdictKind.BROKEN]
    if expect_at is None:  # the last update of an instrument: nothing follows that could reveal it
        assert breaks == []
    else:
        assert breaks[0] == (expect_at, BreakKind.SEQ_BREAK)
        assert all(j >= expect_at for j, _ in breaks)


@settings(max_examples=60, deadline=None)
@given(st.data())
def test_dropped_update_without_seq_ids_is_caught_by_checksum_unless_invisible_in_the_top_25(
    real_frames: list[Frame], data: st.DataObject
) -> None:
    """2022 data has no seqId: a drop is caught exactly at the first later frame whose top 25 differ from the
    true book's, and never flagged while they agree (the checksum's blind spot is below the top 25)."""
    i = data.draw(st.sampled_from(update_indices(real_frames)))
    truth: dict[str, OrderBook] = {}
    books: dict[str, OrderBook] = {}
    for j, f in enumerate(real_frames):
        truth.setdefault(f.inst, OrderBook()).apply(f.msg)
        if j == i:
            continue
        v = books.setdefault(f.inst, OrderBook()).apply(f.msg)
        if j < i:
            assert v.accepted
            continue
        if f.inst != real_frames[i].inst:
            continue
        differs = truth[f.inst].checksum() != books[f.inst].checksum()
        if differs or not v.accepted:
            assert v.kind is VerdictKind.BROKEN and v.broken is not None
            assert v.broken.kind is BreakKind.CHECKSUM_MISMATCH
            return


def test_most_single_update_drops_in_the_real_recording_are_caught_by_checksum_alone(
    real_frames: list[Frame],
) -> None:
    caught = 0
    for i in update_indices(real_frames):
        verdicts = run(real_frames[:i] + real_frames[i + 1:])
        caught += any(kind is VerdictKind.BROKEN for _, _, kind, _ in verdicts)
    assert caught >= 270  # 273 of 287; the rest change only levels below the top 25, or are last


@settings(max_examples=150, deadline=None)
@given(st.data())
def test_changed_size_of_any_top_25_level_is_caught_by_checksum(
    real_frames: list[Frame], data: st.DataObject
) -> None:
    i = data.draw(st.integers(0, len(real_frames) - 1))
    target = real_frames[i]
    book = OrderBook()
    for f in real_frames[: i + 1]:
        if f.inst == target.inst:
            book.apply(f.msg)
    side = data.draw(st.sampled_from(["bids", "asks"]))
    top = book.bids(25) if side == "bids" else book.asks(25)
    px, sz = top[data.draw(st.integers(0, len(top) - 1))][:2]
    new_sz = data.draw(st.sampled_from([str(Decimal(sz) + 1), sz + "0" if "." in sz else sz + ".0"]))
    extra = [px, new_sz, "0", "1"]  # processed after the frame's own levels, so it wins
    msg = target.msg
    mutated = replace(msg, bids=[*msg.bids, extra]) if side == "bids" else replace(msg, asks=[*msg.asks, extra])
    verdicts = run([*[f for f in real_frames[:i]], Frame(target.inst, mutated)])
    _, _, kind, brk = verdicts[-1]
    assert (kind, brk) == (VerdictKind.BROKEN, BreakKind.CHECKSUM_MISMATCH)


# ---- seqId chain (SPEC 7.1) --------------------------------------------------------------------


def msg(prev: int, seq: int, bids: list[list[str]] | None = None, asks: list[list[str]] | None = None,
        ts: int = 0, checksum: int | None = 0) -> BookMessage:
    return BookMessage(prev == -1, bids or [], asks or [], ts, checksum, seq, prev)


def test_spec_example_snapshot_update_heartbeat_reset_update_is_accepted() -> None:
    book = OrderBook()
    kinds = [
        book.apply(m).kind for m in (
            msg(-1, 10, [["100", "1", "0", "1"]], [["101", "1", "0", "1"]]),
            msg(10, 15, [["99", "2", "0", "1"]]),
            msg(15, 15),
            msg(15, 3, asks=[["102", "5", "0", "1"]]),
            msg(3, 5, bids=[["99", "0", "0", "0"]]),
        )
    ]
    assert kinds == [VerdictKind.SNAPSHOT, VerdictKind.APPLIED, VerdictKind.HEARTBEAT, VerdictKind.RESET,
                     VerdictKind.APPLIED]
    assert book.valid and book.last_good == BookPosition(5, 0)
    assert book.bids() == [("100", "1", "0", "1")]


@st.composite
def valid_chain(draw: st.DrawFn) -> list[tuple[BookMessage, VerdictKind]]:
    seq = draw(st.integers(0, 10**12))
    chain = [(msg(-1, seq, [["100", "1", "0", "1"]], [["101", "1", "0", "1"]]), VerdictKind.SNAPSHOT)]
    for step in range(draw(st.integers(1, 40))):
        kind = draw(st.sampled_from([VerdictKind.APPLIED] * 4 + [VerdictKind.HEARTBEAT, VerdictKind.RESET]))
        if kind is VerdictKind.HEARTBEAT:
            chain.append((msg(seq, seq, ts=step), kind))
            continue
        if kind is VerdictKind.RESET:
            if seq == 0:
                continue
            nxt = draw(st.integers(0, seq - 1))
        else:
            nxt = seq + draw(st.integers(1, 10**6))
        px = str(draw(st.integers(50, 99)))
        chain.append((msg(seq, nxt, [[px, draw(st.sampled_from(["0", "3", "1.5"])), "0", "1"]], ts=step), kind))
        seq = nxt
    return chain


@settings(max_examples=300, deadline=None)
@given(valid_chain())
def test_generated_valid_chains_with_heartbeats_and_resets_are_accepted_in_full(
    chain: list[tuple[BookMessage, VerdictKind]],
) -> None:
    book = OrderBook()
    assert [book.apply(m).kind for m, _ in chain] == [k for _, k in chain]
    assert book.valid


@settings(max_examples=300, deadline=None)
@given(valid_chain(), st.data())
def test_any_single_corruption_of_prev_seq_id_is_detected_at_that_message(
    chain: list[tuple[BookMessage, VerdictKind]], data: st.DataObject
) -> None:
    i = data.draw(st.integers(0, len(chain) - 1))
    m = chain[i][0]
    assert m.prev_seq_id is not None
    bad = data.draw(st.integers(-2, 10**13).filter(lambda x: x != m.prev_seq_id))
    corrupted = [c for c, _ in chain]
    # A corrupted snapshot keeps its action: it is still a snapshot, with an impossible prevSeqId.
    corrupted[i] = replace(m, prev_seq_id=bad)
    book = OrderBook()
    verdicts = [book.apply(c) for c in corrupted]
    assert [v.kind for v in verdicts[:i]] == [k for _, k in chain[:i]]
    assert verdicts[i].kind is VerdictKind.BROKEN
    brk = verdicts[i].broken
    assert brk is not None and brk.kind is BreakKind.SEQ_BREAK
    assert all(v.kind is VerdictKind.DROPPED for v in verdicts[i + 1:])


def test_update_with_broken_chain_invalidates_book_and_emits_gap() -> None:
    book = OrderBook()
    book.apply(msg(-1, 10, [["100", "1", "0", "1"]], ts=1000))
    book.apply(msg(10, 15, [["99", "1", "0", "1"]], ts=1100))
    v = book.apply(msg(17, 20, [["98", "1", "0", "1"]], ts=1200))
    assert v.kind is VerdictKind.BROKEN and v.needs_resubscribe and not v.accepted
    assert v.broken is not None
    assert (v.broken.kind, v.broken.expected, v.broken.got) == (BreakKind.SEQ_BREAK, 15, 17)
    assert v.broken.last_good == BookPosition(15, 1100)
    assert not book.valid
    assert book.apply(msg(20, 25, [["97", "1", "0", "1"]])).kind is VerdictKind.DROPPED
    assert book.apply(msg(-1, 30, [["90", "1", "0", "1"]], ts=1300)).kind is VerdictKind.SNAPSHOT
    assert book.valid and book.bids() == [("90", "1", "0", "1")]


def test_heartbeat_that_does_not_repeat_the_last_seq_id_is_a_break() -> None:
    book = OrderBook()
    book.apply(msg(-1, 10))
    v = book.apply(msg(12, 12))
    assert v.kind is VerdictKind.BROKEN and v.broken is not None and v.broken.expected == 10


def test_reset_whose_prev_seq_id_does_not_link_is_a_break_not_a_reset() -> None:
    # SPEC 7.1: "A reset update still satisfies prevSeqId == lastSeqId; only its own seqId is lower."
    book = OrderBook()
    book.apply(msg(-1, 10))
    assert book.apply(msg(12, 3)).kind is VerdictKind.BROKEN


def test_update_without_seq_id_on_a_seq_id_chain_is_a_break() -> None:
    book = OrderBook()
    book.apply(msg(-1, 10))
    v = book.apply(BookMessage(False, [["1", "1", "0", "1"]], [], 0, 0))
    assert v.kind is VerdictKind.BROKEN and v.broken is not None and v.broken.kind is BreakKind.SEQ_BREAK


def test_update_before_any_snapshot_is_dropped() -> None:
    assert OrderBook().apply(msg(10, 15)).kind is VerdictKind.DROPPED


# ---- checksum handling -------------------------------------------------------------------------


def test_checksum_zero_or_absent_is_not_checked() -> None:
    book = OrderBook()
    for checksum in (0, None):
        v = book.apply(msg(-1, 1, [["100", "1", "0", "1"]], checksum=checksum))
        assert v.kind is VerdictKind.SNAPSHOT and not v.checksum_checked


def test_checksum_mismatch_invalidates_like_a_sequence_break() -> None:
    book = OrderBook()
    good = okx_checksum([("100", "1", "0", "1")], [])
    assert book.apply(msg(-1, 1, [["100", "1", "0", "1"]], checksum=good)).checksum_checked
    v = book.apply(msg(1, 2, [["100", "2", "0", "1"]], checksum=good))
    assert v.kind is VerdictKind.BROKEN and v.broken is not None
    assert v.broken.kind is BreakKind.CHECKSUM_MISMATCH and v.broken.expected == good
    assert v.broken.got == okx_checksum([("100", "2", "0", "1")], [])
    assert v.broken.last_good == BookPosition(1, 0)
    assert not book.valid


def test_checksum_uses_the_exact_strings_not_their_values() -> None:
    book = OrderBook()
    book.apply(msg(-1, 1, [["100.0", "1", "0", "1"]]))
    assert book.checksum() == okx_checksum([("100.0", "1", "0", "1")], [])
    assert book.checksum() != okx_checksum([("100", "1", "0", "1")], [])


# ---- applying levels (SPEC 7.2) ----------------------------------------------------------------


def test_size_zero_deletes_and_other_sizes_overwrite_keeping_exact_strings() -> None:
    book = OrderBook()
    book.apply(msg(-1, 1, [["100", "1", "0", "1"], ["99", "2", "0", "1"]], [["101", "3", "0", "2"]]))
    book.apply(msg(1, 2, [["100", "0", "0", "0"], ["99", "2.50", "0", "4"]], [["101", "0.000", "0", "0"]]))
    assert book.bids() == [("99", "2.50", "0", "4")]
    assert book.asks() == []


def test_same_price_in_another_spelling_is_the_same_level() -> None:
    book = OrderBook()
    book.apply(msg(-1, 1, [["100", "1", "0", "1"]]))
    book.apply(msg(1, 2, [["100.0", "7", "0", "1"]]))
    assert book.bids() == [("100.0", "7", "0", "1")]
    book.apply(msg(2, 3, [["100.00", "0", "0", "0"]]))
    assert book.bids() == []


def test_all_levels_of_a_message_are_applied_before_the_checksum() -> None:
    book = OrderBook()
    book.apply(msg(-1, 1, [["100", "1", "0", "1"]]))
    after = okx_checksum([("100", "3", "0", "1")], [])
    v = book.apply(msg(1, 2, [["100", "2", "0", "1"], ["100", "3", "0", "1"]], checksum=after))
    assert v.kind is VerdictKind.APPLIED and v.checksum_checked


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.decimals(min_value=Decimal("0.0001"), max_value=Decimal(10**6),
                                                     places=4), st.sampled_from(["0", "1", "2.5"])), max_size=80))
def test_levels_stay_sorted_by_value_bids_descending_asks_ascending(
    ops: list[tuple[bool, Decimal, str]],
) -> None:
    book = OrderBook()
    book.apply(msg(-1, 0))
    model: dict[bool, dict[Decimal, str]] = {True: {}, False: {}}
    for seq, (is_bid, px, sz) in enumerate(ops):
        level = [str(px), sz, "0", "1"]
        assert book.apply(msg(seq, seq + 1, [level] if is_bid else [], [] if is_bid else [level])).accepted
        if sz == "0":
            model[is_bid].pop(px, None)
        else:
            model[is_bid][px] = sz
    assert [Decimal(lvl[0]) for lvl in book.bids()] == sorted(model[True], reverse=True)
    assert [Decimal(lvl[0]) for lvl in book.asks()] == sorted(model[False])
    assert [lvl[1] for lvl in book.bids()] == [model[True][p] for p in sorted(model[True], reverse=True)]


@pytest.mark.parametrize("bad", ["abc", "NaN", "-1", "0", "Infinity"])
def test_unreadable_price_breaks_the_book(bad: str) -> None:
    book = OrderBook()
    book.apply(msg(-1, 1))
    v = book.apply(msg(1, 2, [[bad, "1", "0", "1"]]))
    assert v.kind is VerdictKind.BROKEN and v.broken is not None and v.broken.kind is BreakKind.MALFORMED


# ---- snapshot channels and the book set -------------------------------------------------------


def test_books5_real_frames_replace_the_book_and_track_seq_id_only_as_far_as_spec_goes(shared_okx: Path) -> None:
    books: dict[str, SnapshotBook] = {}
    for f in load_frames(shared_okx / "frames" / "books5.jsonl"):
        v = books.setdefault(f.inst, SnapshotBook()).apply(f.msg)
        assert v.kind is VerdictKind.SNAPSHOT and f.msg.seq_id is not None
    book = books["BTC-USDT"]
    assert book.bids(1) == [("64073", "0.2330179", "0", "41")]
    last = book.last_good
    assert last is not None and last.seq_id == 79706756227
    resend = BookMessage(False, book.bids(), book.asks(), last.ts + 60_000, None, last.seq_id)
    assert book.apply(resend).kind is VerdictKind.HEARTBEAT
    restarted = book.apply(replace(resend, seq_id=5))
    assert (restarted.kind, restarted.reset_from) == (VerdictKind.RESET, 79706756227)


def test_book_set_invalidated_on_disconnect_drops_updates_until_the_new_snapshot() -> None:
    books = BookSet()
    arg = SubArg("books", "BTC-USDT")
    books.apply(arg, msg(-1, 10, [["100", "1", "0", "1"]], ts=5))
    assert books.invalidate(arg) == BookPosition(10, 5)
    assert books.apply(arg, msg(10, 11, [["99", "1", "0", "1"]])).kind is VerdictKind.DROPPED
    assert books.apply(arg, msg(-1, 12, [["98", "1", "0", "1"]])).kind is VerdictKind.SNAPSHOT
    assert isinstance(books.book(SubArg("bbo-tbt", "BTC-USDT")), SnapshotBook)
    with pytest.raises(ValueError, match="not an order-book channel"):
        books.book(SubArg("trades", "BTC-USDT"))
