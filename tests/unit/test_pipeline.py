"""The pipeline turns frames and link events into exactly the records, gaps and dead letters a user expects.

Driven with real OKX frames from the shared folder and a capture outlet that decodes every value with
the .avsc files alone, so what is asserted is what a Kafka consumer would read.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Sequence
from pathlib import Path
from typing import TypeVar

import orjson
import pytest

from ingest.core.avro import RecordEncoder, decode
from ingest.core.events import Inbound, InboundFrame, LinkEvent, LinkEventKind
from ingest.core.records import BookUpdate, DeadLetter, GapEvent, RawFrames, Record, Trade
from ingest.io.sink import EncodedRecord
from ingest.okx.channels import Endpoint, SubArg
from ingest.services.pipeline import Pipeline


class Capture:
    """An outlet that keeps what it was given, decoded back with the schemas alone."""

    def __init__(self) -> None:
        self.encoded: list[EncodedRecord] = []

    async def put_many(self, records: Sequence[EncodedRecord]) -> None:
        self.encoded.extend(records)

    def records(self, kind: type[R]) -> list[R]:
        return [r for r in (decode(e.value) for e in self.encoded) if isinstance(r, kind)]


class Resubs:
    def __init__(self) -> None:
        self.asked: list[tuple[SubArg, str]] = []

    def request_resubscribe(self, arg: SubArg, reason: str) -> None:
        self.asked.append((arg, reason))


R = TypeVar("R", bound=Record)
_seq = itertools.count(1)


def frame(data: bytes | str | dict[str, object], conn: str = "public-0#1") -> InboundFrame:
    raw = data if isinstance(data, bytes) else (data.encode() if isinstance(data, str) else orjson.dumps(data))
    return InboundFrame(conn, conn.split("#")[0], Endpoint.PUBLIC, next(_seq), 1_700_000_000_000_000_000, raw)


def link(kind: LinkEventKind, conn: str, args: tuple[SubArg, ...], replacement: str | None = None) -> LinkEvent:
    return LinkEvent(kind, conn, conn.split("#")[0], 1_700_000_000_000_000_000, args, reason="test",
                     replacement=replacement)


def make(publish_raw: bool = False) -> tuple[Pipeline, Capture, Resubs]:
    cap, resubs = Capture(), Resubs()
    inbox: asyncio.Queue[Inbound] = asyncio.Queue(maxsize=100)
    return Pipeline(inbox, cap, RecordEncoder("okx."), resubscriber=resubs, publish_raw=publish_raw), cap, resubs


async def subscribe(pipe: Pipeline, *args: SubArg, conn: str = "public-0#1") -> None:
    """What the WebSocket layer reports once OKX acked `args`: the pipeline records only acked streams."""
    await pipe.handle(link(LinkEventKind.SUBSCRIBED, conn, args))


def lines(path: Path) -> list[bytes]:
    return [line for line in path.read_bytes().splitlines() if line.strip()]


async def test_real_book_stream_passes_whole_and_exact(shared_okx: Path) -> None:
    pipe, cap, resubs = make()
    frames = lines(shared_okx / "frames" / "books.jsonl")
    await subscribe(pipe, *{SubArg.from_okx(orjson.loads(f)["arg"]) for f in frames})
    for raw in frames:
        await pipe.handle(frame(raw))
    books = cap.records(BookUpdate)
    assert len(books) == 290 and not resubs.asked and not cap.records(GapEvent)
    first = orjson.loads(frames[0])["data"][0]
    assert books[0].asks[0] == tuple(first["asks"][0])  # the strings OKX sent, untouched
    assert all(r.topic == "okx.books" for r in cap.encoded)


async def test_dropped_book_update_breaks_the_chain_emits_gap_and_resubscribes(shared_okx: Path) -> None:
    pipe, cap, resubs = make()
    frames = lines(shared_okx / "frames" / "books.jsonl")
    btc = [f for f in frames if b'"BTC-USDT"' in f]
    await subscribe(pipe, SubArg("books", "BTC-USDT"))
    for raw in btc[:10] + btc[11:20]:  # update 10 never arrives
        await pipe.handle(frame(raw))
    gaps = cap.records(GapEvent)
    assert [(g.kind, g.inst_id) for g in gaps] == []  # a book gap closes only at the next snapshot
    assert [a for a, _ in resubs.asked] == [SubArg("books", "BTC-USDT")]
    published = cap.records(BookUpdate)
    assert len(published) == 10  # the delta that failed and every later one are dropped
    assert pipe.stats.book_breaks == 1 and pipe.stats.book_deltas_dropped == 8
    await pipe.handle(frame(btc[0]))  # the resubscription's fresh snapshot
    gaps = cap.records(GapEvent)
    assert len(gaps) == 1 and gaps[0].kind.value == "checksum_mismatch" and gaps[0].inst_id == "BTC-USDT"
    assert gaps[0].before is not None and gaps[0].after is not None


def trade(tid: int, count: int = 1, inst: str = "BTC-USDT", ts: int = 1_786_540_435_948) -> dict[str, object]:
    return {"arg": {"channel": "trades", "instId": inst}, "data": [{
        "instId": inst, "tradeId": str(tid), "px": "63913.5", "sz": "0.001", "side": "buy", "ts": str(ts + tid),
        "count": str(count), "source": "0", "seqId": 333793117432 + tid}]}


async def test_trade_hole_becomes_a_gap_with_exact_bounds() -> None:
    pipe, cap, _ = make()
    await subscribe(pipe, SubArg("trades", "BTC-USDT"))
    for tid, count in ((100, 1), (101, 1), (105, 2)):  # 105 with count 2 covers 104..105: 102 and 103 missing
        await pipe.handle(frame(trade(tid, count)))
    gaps = cap.records(GapEvent)
    assert len(gaps) == 1
    g = gaps[0]
    assert g.kind.value == "trade_hole" and g.before is not None and g.after is not None
    assert (g.before.trade_id, g.after.trade_id) == (101, 104)
    assert [t.trade_id for t in cap.records(Trade)] == ["100", "101", "105"]


async def test_disconnect_window_is_a_gap_bounded_by_last_and_first_good_trade() -> None:
    pipe, cap, _ = make()
    arg = SubArg("trades", "BTC-USDT")
    await pipe.handle(link(LinkEventKind.SUBSCRIBED, "public-0#1", (arg,)))
    await pipe.handle(frame(trade(7)))
    await pipe.handle(link(LinkEventKind.DISCONNECTED, "public-0#1", (arg,)))
    await pipe.handle(link(LinkEventKind.SUBSCRIBED, "public-0#2", (arg,)))
    await pipe.handle(frame(trade(12), conn="public-0#2"))
    gaps = cap.records(GapEvent)
    assert len(gaps) == 1 and gaps[0].kind.value == "disconnect"
    assert gaps[0].before is not None and gaps[0].after is not None
    assert (gaps[0].before.trade_id, gaps[0].after.trade_id) == (7, 12)
    assert cap.encoded[-1].key == b"trades:BTC-USDT"


async def test_notice_overlap_publishes_each_trade_once() -> None:
    pipe, cap, _ = make()
    arg = SubArg("trades", "BTC-USDT")
    old, new = "public-0#1", "public-0#2"
    await pipe.handle(link(LinkEventKind.SUBSCRIBED, old, (arg,)))
    for tid in (1, 2, 3):
        await pipe.handle(frame(trade(tid), conn=old))
    await pipe.handle(link(LinkEventKind.NOTICE, old, (arg,), replacement=new))
    await pipe.handle(link(LinkEventKind.SUBSCRIBED, new, (arg,)))
    # Both connections now carry the stream, interleaved as the sockets deliver.
    for tid, conn in ((4, new), (4, old), (5, old), (5, new), (6, new)):
        await pipe.handle(frame(trade(tid), conn=conn))
    await pipe.handle(link(LinkEventKind.CUTOVER, old, (arg,), replacement=new))
    await pipe.handle(link(LinkEventKind.DISCONNECTED, old, (arg,)))
    await pipe.handle(frame(trade(7), conn=new))
    assert [t.trade_id for t in cap.records(Trade)] == [str(i) for i in range(1, 8)]
    assert cap.records(GapEvent) == []


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"\xff\xfe", "not_utf8"),
        (b'{"arg":{"channel":"trades","instId":"BTC-USDT"},"data":[{"tradeId":"1"', "bad_json"),
        (b'{"arg":{"channel":"nope","instId":"X"},"data":[{}]}', "unknown_channel"),
        (orjson.dumps(trade(1)).replace(b'"px":"63913.5"', b'"px":63913.5'), "wrong_type"),
        (orjson.dumps(trade(1)).replace(b'"px":"63913.5"', b'"px":"NaN"'), "bad_number"),
    ],
)
async def test_bad_frames_become_dead_letters_with_raw_bytes(data: bytes, reason: str) -> None:
    pipe, cap, _ = make(publish_raw=True)
    f = frame(data)
    await pipe.handle(f)
    dead = cap.records(DeadLetter)
    assert len(dead) == 1 and dead[0].reason_code.value == reason and dead[0].raw == data
    raw = cap.records(RawFrames)
    assert len(raw) == 1 and [f.payload for f in raw[0].frames] == [data]  # kept verbatim for re-normalizing
    assert pipe.stats.dead_letters[reason] == 1


async def test_events_are_counted_not_published() -> None:
    pipe, cap, _ = make()
    await pipe.handle(frame(b'{"event":"subscribe","arg":{"channel":"trades","instId":"BTC-USDT"},"connId":"a1"}'))
    await pipe.handle(frame(b'{"event":"error","code":"60018","msg":"Wrong URL","connId":"a1"}'))
    assert cap.encoded == []
    assert pipe.stats.events["subscribe"] == 1 and pipe.stats.okx_errors["60018"] == 1


async def test_a_record_kafka_would_refuse_for_its_size_becomes_a_dead_letter_and_the_rest_flows() -> None:
    cap = Capture()
    inbox: asyncio.Queue[Inbound] = asyncio.Queue()
    pipe = Pipeline(inbox, cap, RecordEncoder("okx."), publish_raw=True, max_record_bytes=4_000)
    big = orjson.dumps(trade(1)).replace(b'"seqId"', b'"note":"' + b"x" * 6_000 + b'","seqId"')
    await subscribe(pipe, SubArg("trades", "BTC-USDT"))
    await pipe.handle(frame(big))
    await pipe.handle(frame(trade(2)))
    assert all(len(e.value) <= 4_000 for e in cap.encoded)
    dead = cap.records(DeadLetter)
    assert len(dead) == 2  # the raw frame and the trade carrying the huge unknown field
    assert all(d.reason_code.value == "other" and "exceeds kafka.max_record_bytes" in d.reason for d in dead)
    assert any(d.raw == big[:2_000] for d in dead)  # the raw frame's start is kept
    assert [t.trade_id for t in cap.records(Trade)] == ["2"]
    assert pipe.stats.oversize_records == 2


async def test_between_batches_waits_while_records_are_still_being_handed_over() -> None:
    """A checkpoint must never be taken while a batch's positions are ahead of what the outlet accepted."""
    entered, gate = asyncio.Event(), asyncio.Event()

    class Slow(Capture):
        async def put_many(self, records: Sequence[EncodedRecord]) -> None:
            entered.set()
            await gate.wait()  # the outlet is full (back-pressure)
            await super().put_many(records)

    out = Slow()
    pipe = Pipeline(asyncio.Queue(), out, RecordEncoder("okx."), publish_raw=False)
    handing = asyncio.create_task(pipe.handle(frame(trade(1))))
    await entered.wait()
    waiter = asyncio.create_task(pipe.between_batches())
    for _ in range(10):  # let every ready task run; the waiter must still be blocked
        await asyncio.sleep(0)
    assert not waiter.done() and out.encoded == []
    gate.set()
    await asyncio.wait_for(waiter, 5)
    await handing
    assert len(out.encoded) == 1


# ---------------------------------------------------------------------------------------------- lag


def _frame_at(recv_ts_ns: int, tid: int) -> InboundFrame:
    return InboundFrame("public-0#1", "public-0", Endpoint.PUBLIC, tid, recv_ts_ns, orjson.dumps(trade(tid)))


async def test_lag_is_the_age_of_the_oldest_item_waiting_and_zero_when_none_waits() -> None:
    t0 = 1_700_000_000_000_000_000
    now = [t0]
    inbox: asyncio.Queue[Inbound] = asyncio.Queue()
    pipe = Pipeline(inbox, Capture(), RecordEncoder("okx."), publish_raw=False, now_ns=lambda: now[0])
    assert pipe.lag_s() == 0.0  # nothing received: not behind
    inbox.put_nowait(_frame_at(t0, 1))
    inbox.put_nowait(_frame_at(t0 + 2_000_000_000, 2))
    now[0] = t0 + 3_500_000_000
    assert pipe.lag_s() == 3.5  # the oldest frame's age, not the newest's
    inbox.get_nowait()
    assert pipe.lag_s() == 1.5
    inbox.get_nowait()
    inbox.put_nowait(LinkEvent(LinkEventKind.DISCONNECTED, "public-0#1", "public-0", t0 + 3_000_000_000, ()))
    assert pipe.lag_s() == 0.5  # an event waits like a frame, from its own time
    inbox.get_nowait()
    now[0] = t0 - 1  # a clock stepped back: never a negative lag
    inbox.put_nowait(_frame_at(t0, 3))
    assert pipe.lag_s() == 0.0


async def test_lag_counts_the_batch_the_pipeline_holds_while_the_outlet_makes_it_wait() -> None:
    """Frames taken from the queue but not yet handed over are still behind: a blocked outlet shows as lag."""
    t0 = 1_700_000_000_000_000_000
    now = [t0]
    entered, gate = asyncio.Event(), asyncio.Event()

    class Held(Capture):
        async def put_many(self, records: Sequence[EncodedRecord]) -> None:
            entered.set()
            await gate.wait()
            await super().put_many(records)

    inbox: asyncio.Queue[Inbound] = asyncio.Queue()
    out = Held()
    pipe = Pipeline(inbox, out, RecordEncoder("okx."), publish_raw=False, now_ns=lambda: now[0])
    await subscribe(pipe, SubArg("trades", "BTC-USDT"))
    inbox.put_nowait(_frame_at(t0, 1))
    inbox.put_nowait(_frame_at(t0 + 1_000_000_000, 2))
    assert pipe.stats.busy_s == 0
    task = asyncio.create_task(pipe.run())
    try:
        await entered.wait()
        assert inbox.empty()  # both frames are in the batch the outlet holds
        now[0] = t0 + 4_000_000_000
        inbox.put_nowait(_frame_at(t0 + 3_000_000_000, 3))  # a newer one waits behind it
        assert pipe.lag_s() == 4.0
        gate.set()
        await asyncio.wait_for(inbox.join(), 5)
        assert [t.trade_id for t in out.records(Trade)] == ["1", "2", "3"]
        assert pipe.lag_s() == 0.0  # caught up
        assert pipe.stats.busy_s > 0  # the batches' time, counted for the saturation metric
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
