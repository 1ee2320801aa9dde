"""Book checkpoints: every `okx.book_checkpoint_s` of receive time, the whole verified book of each incremental
book stream on okx.books, so a reader can start from it; the chain goes on from its seqId.

Proved against an independent rebuild: a plain dict book fed only the decoded records a consumer reads.
"""

from __future__ import annotations

import asyncio
import itertools
from decimal import Decimal
from typing import Any

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ingest.config import OkxSettings
from ingest.core.avro import RecordEncoder
from ingest.core.books import okx_checksum
from ingest.core.events import Inbound, InboundFrame, LinkEvent, LinkEventKind
from ingest.core.records import BookAction, BookUpdate
from ingest.okx.channels import Endpoint, SubArg
from ingest.services.pipeline import Pipeline
from tests.unit.test_pipeline import Capture

ARG = SubArg("books", "BTC-USDT")
CONN = "public-0#1"
S = 1_000_000_000
T0 = 1_700_000_000 * S


class Stream:
    """A book stream as OKX sends it: a snapshot, then updates chained by seqId (checksum 0, as since 2026)."""

    def __init__(self) -> None:
        self.seq = 1000
        self.recv_seq = itertools.count(1)

    def push(self, action: str, asks: list[list[str]], bids: list[list[str]], recv_ns: int, *,
             prev: int | None = None, step: int = 3) -> InboundFrame:
        prev_seq = -1 if action == "snapshot" else (self.seq if prev is None else prev)
        self.seq += step
        data = {"arg": {"channel": ARG.channel, "instId": ARG.inst_id}, "action": action, "data": [{
            "asks": asks, "bids": bids, "ts": str(recv_ns // 1_000_000 - 5), "checksum": 0,
            "prevSeqId": prev_seq, "seqId": self.seq}]}
        return InboundFrame(CONN, "public-0", Endpoint.PUBLIC, next(self.recv_seq), recv_ns, msgspec.json.encode(data))


def level(px: int, sz: int) -> list[str]:
    return [f"{px / 10:.1f}", str(sz), "0", str(max(1, sz // 3))]


def make(checkpoint_s: float = 5.0) -> tuple[Pipeline, Capture]:
    cap = Capture()
    inbox: asyncio.Queue[Inbound] = asyncio.Queue()
    return Pipeline(inbox, cap, RecordEncoder("okx."), book_checkpoint_s=checkpoint_s), cap


def subscribed() -> LinkEvent:
    return LinkEvent(LinkEventKind.SUBSCRIBED, CONN, "public-0", T0, (ARG,))


class Rebuilt:
    """The book a consumer rebuilds from okx.books alone, in a dozen lines that share nothing with core/books."""

    def __init__(self) -> None:
        self.asks: dict[Decimal, tuple[str, ...]] = {}
        self.bids: dict[Decimal, tuple[str, ...]] = {}

    def apply(self, rec: BookUpdate) -> None:
        if rec.action is not BookAction.UPDATE:  # snapshot and checkpoint replace the book
            self.asks, self.bids = {}, {}
        for side, levels in ((self.asks, rec.asks), (self.bids, rec.bids)):
            for lvl in levels:
                if Decimal(lvl[1]) == 0:
                    side.pop(Decimal(lvl[0]), None)
                else:
                    side[Decimal(lvl[0])] = tuple(lvl)

    def image(self) -> tuple[list[tuple[str, ...]], list[tuple[str, ...]]]:
        return ([self.asks[k] for k in sorted(self.asks)], [self.bids[k] for k in sorted(self.bids, reverse=True)])


updates = st.lists(st.tuples(st.booleans(), st.integers(9_000, 11_000), st.integers(0, 30),
                             st.integers(0, 3 * S)), min_size=1, max_size=60)


@settings(max_examples=60, deadline=None)
@given(steps=updates)
def test_each_checkpoint_is_the_book_rebuilt_from_the_records_before_it_and_the_chain_goes_on(
        steps: list[tuple[bool, int, int, int]]) -> None:
    pipe, cap = make(5.0)
    stream = Stream()
    now = T0

    async def run() -> None:
        nonlocal now
        await pipe.handle(subscribed())
        await pipe.handle(stream.push("snapshot", [level(10_010 + i, 5) for i in range(10)],
                                      [level(9_990 - i, 5) for i in range(10)], now))
        for ask, px, sz, gap_ns in steps:
            now += gap_ns
            lvl = [level(px + (20 if ask else -20), sz)]  # sz 0 deletes the level
            await pipe.handle(stream.push("update", lvl if ask else [], [] if ask else lvl, now))

    asyncio.run(run())
    books = cap.records(BookUpdate)
    checkpoints = [b for b in books if b.action is BookAction.CHECKPOINT]
    elapsed = sum(s[3] for s in steps)
    assert len(checkpoints) <= elapsed // (5 * S)  # at most one per interval, and the last image starts each
    rebuilt, from_checkpoint = Rebuilt(), None
    for i, rec in enumerate(books):
        if rec.action is BookAction.CHECKPOINT:
            asks, bids = rebuilt.image()
            assert (list(rec.asks), list(rec.bids)) == (asks, bids)  # exactly the book the records before built
            assert rec.seq_id == books[i - 1].seq_id and rec.prev_seq_id is None and rec.ts == books[i - 1].ts
            assert rec.record_id == f"ckpt:books:BTC-USDT:{rec.seq_id}" and rec.source.value == "ws"
            assert rec.checksum == okx_checksum(bids[:25], asks[:25])
            if i + 1 < len(books):
                assert books[i + 1].prev_seq_id == rec.seq_id  # the next update chains onto it
            if from_checkpoint is None:
                from_checkpoint = Rebuilt()
        if from_checkpoint is not None:
            from_checkpoint.apply(rec)
        rebuilt.apply(rec)
    if from_checkpoint is not None:
        assert from_checkpoint.image() == rebuilt.image()  # starting at a checkpoint gives the same book


async def test_a_quiet_interval_gives_one_checkpoint_and_each_interval_after_it_another() -> None:
    pipe, cap = make(5.0)
    stream = Stream()
    await pipe.handle(subscribed())
    await pipe.handle(stream.push("snapshot", [level(10_010, 5)], [level(9_990, 5)], T0))
    for second in range(1, 17):  # one update a second for 16 s: checkpoints after 5, 10 and 15 s
        await pipe.handle(stream.push("update", [level(10_011, second)], [], T0 + second * S))
    checkpoints = [b for b in cap.records(BookUpdate) if b.action is BookAction.CHECKPOINT]
    assert [c.recv_ts_ns for c in checkpoints] == [T0 + 5 * S, T0 + 10 * S, T0 + 15 * S]
    assert checkpoints[-1].asks == (tuple(level(10_010, 5)), tuple(level(10_011, 15)))
    assert pipe.stats.book_checkpoints == 3


async def test_no_checkpoint_of_a_broken_book_until_its_next_snapshot() -> None:
    pipe, cap = make(5.0)
    stream = Stream()
    await pipe.handle(subscribed())
    await pipe.handle(stream.push("snapshot", [level(10_010, 5)], [level(9_990, 5)], T0))
    await pipe.handle(stream.push("update", [level(10_011, 1)], [], T0 + S, prev=1))  # breaks the chain
    for second in range(2, 12):
        await pipe.handle(stream.push("update", [level(10_012, second)], [], T0 + second * S))
    assert not [b for b in cap.records(BookUpdate) if b.action is BookAction.CHECKPOINT]
    await pipe.handle(stream.push("snapshot", [level(10_020, 5)], [level(9_980, 5)], T0 + 12 * S))
    await pipe.handle(stream.push("update", [level(10_021, 1)], [], T0 + 18 * S))
    (checkpoint,) = [b for b in cap.records(BookUpdate) if b.action is BookAction.CHECKPOINT]
    assert checkpoint.asks == (tuple(level(10_020, 5)), tuple(level(10_021, 1)))


async def test_zero_turns_checkpoints_off() -> None:
    pipe, cap = make(0.0)
    stream = Stream()
    await pipe.handle(subscribed())
    await pipe.handle(stream.push("snapshot", [level(10_010, 5)], [level(9_990, 5)], T0))
    for second in range(1, 200, 7):
        await pipe.handle(stream.push("update", [level(10_011, second)], [], T0 + second * S))
    assert all(b.action is not BookAction.CHECKPOINT for b in cap.records(BookUpdate))


@pytest.mark.parametrize(("value", "ok"), [({}, 60.0), ({"book_checkpoint_s": 0}, 0.0),
                                           ({"book_checkpoint_s": 2.5}, 2.5)])
def test_book_checkpoint_setting_defaults_to_a_minute_and_zero_is_off(value: dict[str, Any], ok: float) -> None:
    assert OkxSettings(**value).book_checkpoint_s == ok


def test_a_negative_book_checkpoint_interval_is_refused() -> None:
    with pytest.raises(ValueError, match="book_checkpoint_s"):
        OkxSettings(book_checkpoint_s=-1)
