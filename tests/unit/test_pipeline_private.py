"""The pipeline's private path: repeated pushes, when it asks for a REST read, and what of the answer it keeps.

Driven like test_pipeline.py (frames, link events, a capture outlet decoding with the .avsc files) plus a
reconciler stub that records the requests; the REST answers are built with the same row builders the real
reconciler uses.
"""

from __future__ import annotations

import asyncio
import itertools

import orjson

from ingest.core.avro import RecordEncoder
from ingest.core.events import Inbound, InboundFrame, LinkEvent, LinkEventKind, ReconcileRequest, RestRecords
from ingest.core.normalize import balances_from_rest, fill_from_rest, order_from_rest
from ingest.core.records import Balance, DeadLetter, Fill, GapEvent, OkxRecord, Order
from ingest.okx.channels import Endpoint, SubArg
from ingest.services.pipeline import Pipeline
from tests.unit.test_pipeline import Capture

ORDERS = SubArg("orders", inst_type="ANY")
ACCOUNT = SubArg("account")
T0 = 1_700_000_000_000_000_000
_seq = itertools.count(1)


class Requests:
    def __init__(self) -> None:
        self.asked: list[ReconcileRequest] = []

    def request_reconcile(self, request: ReconcileRequest) -> None:
        self.asked.append(request)


def make() -> tuple[Pipeline, Capture, Requests]:
    cap, reqs = Capture(), Requests()
    inbox: asyncio.Queue[Inbound] = asyncio.Queue(maxsize=100)
    pipe = Pipeline(inbox, cap, RecordEncoder("okx."), reconciler=reqs, publish_raw=False, now_ns=lambda: T0)
    return pipe, cap, reqs


def row(ord_id: str = "11", state: str = "live", acc: str = "0", *, u_time: int = 1_000, trade_id: str = "",
        fill_sz: str = "0") -> dict[str, object]:
    return {"instId": "BTC-USDT", "instType": "SPOT", "ordId": ord_id, "state": state, "accFillSz": acc,
            "px": "100", "sz": "2", "side": "buy", "ordType": "limit", "uTime": str(u_time), "cTime": "900",
            "tradeId": trade_id, "fillSz": fill_sz, "code": "0"}


def push(*rows: dict[str, object], conn: str = "private-0#1", ts_ns: int = T0) -> InboundFrame:
    msg = {"arg": {"channel": "orders", "instType": "ANY", "uid": "7"}, "data": list(rows)}
    return InboundFrame(conn, "private-0", Endpoint.PRIVATE, next(_seq), ts_ns, orjson.dumps(msg))


def link(kind: LinkEventKind, conn: str, *args: SubArg, ts_ns: int = T0) -> LinkEvent:
    return LinkEvent(kind, conn, conn.split("#")[0], ts_ns, args, reason="test")


def answer(seq: int, *records: OkxRecord | DeadLetter, covers: tuple[SubArg, ...] = (ORDERS,)) -> RestRecords:
    return RestRecords(seq=seq, reason="test", ts_ns=T0 + 9, since_ms=500, fetched_ms=5_000, covers=covers,
                       records=records)


def rest_order(**kw: object) -> Order:
    rec = order_from_rest(row(**kw), recv_ts_ns=T0)  # type: ignore[arg-type]
    assert isinstance(rec, Order)
    return rec


def rest_fill(trade_id: str, bill_id: str) -> Fill:
    rec = fill_from_rest({"instId": "BTC-USDT", "instType": "SPOT", "tradeId": trade_id, "ordId": "11",
                          "billId": bill_id, "fillPx": "100", "fillSz": "1", "side": "buy", "ts": "1200"},
                         recv_ts_ns=T0)
    assert isinstance(rec, Fill)
    return rec


def states(cap: Capture) -> list[tuple[str | None, str | None, str]]:
    return [(o.state, o.acc_fill_sz, o.source.value) for o in cap.records(Order)]


async def test_repeated_pushes_are_dropped_and_a_cancel_after_a_partial_fill_is_kept() -> None:
    pipe, cap, _ = make()
    await pipe.handle(link(LinkEventKind.SUBSCRIBED, "private-0#1", ORDERS))
    partial = row(state="partially_filled", acc="1", trade_id="5", fill_sz="1", u_time=1_100)
    for r in (row(), row(u_time=1_001), partial, {**partial, "uTime": "1101"}):
        await pipe.handle(push(r))
    # OKX leaves the last tradeId on the cancel: it is a new state, not a repeat of fill 5.
    await pipe.handle(push(row(state="canceled", acc="1", trade_id="5", fill_sz="0", u_time=1_200)))
    assert states(cap) == [("live", "0", "ws"), ("partially_filled", "1", "ws"), ("canceled", "1", "ws")]
    assert pipe.stats.private_repeats_dropped == 2


async def test_the_first_subscription_asks_once_per_stream_and_a_reconnect_asks_from_the_last_frame() -> None:
    pipe, _, reqs = make()
    await pipe.handle(link(LinkEventKind.SUBSCRIBED, "private-0#1", ORDERS, ACCOUNT))
    assert [(sorted(map(str, r.args)), r.initial, r.since_ns) for r in reqs.asked] == [
        (["orders:ANY"], True, T0), (["account"], True, T0)]
    await pipe.handle(push(row(), ts_ns=T0 + 5_000))
    await pipe.handle(link(LinkEventKind.DISCONNECTED, "private-0#1", ORDERS, ACCOUNT, ts_ns=T0 + 90_000))
    assert len(reqs.asked) == 2, "nothing to read while nobody holds the streams"
    await pipe.handle(link(LinkEventKind.SUBSCRIBED, "private-0#2", ORDERS, ts_ns=T0 + 99_000))
    last = reqs.asked[-1]
    assert (last.args, last.initial, last.since_ns) == (frozenset({ORDERS}), False, T0 + 5_000)
    assert last.open_since_ms == 900, "the order recorded open was created at 900: the history must reach it"


async def test_a_proven_cutover_is_no_hole_but_a_refused_stream_is_read_at_once() -> None:
    pipe, _, reqs = make()
    await pipe.handle(link(LinkEventKind.SUBSCRIBED, "private-0#1", ORDERS, ACCOUNT))
    await pipe.handle(link(LinkEventKind.SUBSCRIBED, "private-0#2", ORDERS, ACCOUNT))
    cutover = LinkEvent(LinkEventKind.CUTOVER, "private-0#1", "private-0", T0, (ORDERS, ACCOUNT),
                        replacement="private-0#2")
    await pipe.handle(cutover)
    assert len(reqs.asked) == 2
    await pipe.handle(LinkEvent(LinkEventKind.SUBSCRIBE_FAILED, "private-0#2", "private-0", T0 + 1, (ACCOUNT,),
                                reason="channel-conn-count-error: 30 connections hold account"))
    assert [str(a) for a in reqs.asked[-1].args] == ["account"] and "conn-count" in reqs.asked[-1].reason


async def test_a_rest_answer_publishes_only_what_the_record_lacks_and_fills_the_gap() -> None:
    pipe, cap, reqs = make()
    await pipe.handle(link(LinkEventKind.SUBSCRIBED, "private-0#1", ORDERS, ACCOUNT))
    await pipe.handle(answer(reqs.asked[-1].seq))
    await pipe.handle(push(row("11"), row("12")))
    await pipe.handle(push(row("12", state="partially_filled", acc="1", trade_id="5", fill_sz="1", u_time=1_100)))
    await pipe.handle(link(LinkEventKind.DISCONNECTED, "private-0#1", ORDERS, ACCOUNT))
    await pipe.handle(link(LinkEventKind.SUBSCRIBED, "private-0#2", ORDERS, ACCOUNT))
    seq = reqs.asked[-1].seq
    balances = balances_from_rest({"uTime": "1", "totalEq": "1", "details": [{"ccy": "USDT", "cashBal": "5",
                                                                             "uTime": "1"}]}, recv_ts_ns=T0)
    assert isinstance(balances, tuple)
    await pipe.handle(answer(
        seq,
        rest_order(ord_id="11"),  # unchanged: on record already
        rest_order(ord_id="12", state="filled", acc="2", u_time=1_300, trade_id="6", fill_sz="1"),  # changed
        rest_fill("5", "b5"),  # pushed on the orders channel before the outage
        rest_fill("6", "b6"),  # missed
        *balances,  # the account channel is held again: its snapshot is the reconciliation
    ))
    assert states(cap)[-1] == ("filled", "2", "rest") and len(cap.records(Order)) == 4
    assert [(f.trade_id, f.source.value) for f in cap.records(Fill)] == [("6", "rest")]
    assert cap.records(Balance) == []
    gaps = [g for g in cap.records(GapEvent) if g.channel == "orders"]
    assert [(g.kind.value, g.status.value, g.records_filled) for g in gaps] == [("disconnect", "filled", 2)]
    assert pipe.stats.rest_records == {"orders": 1, "fills": 1} and pipe.stats.rest_rows_dropped == 4
    # The push of the fill REST already recorded arrives late: a repeat, dropped.
    await pipe.handle(push(row("12", state="filled", acc="2", trade_id="6", fill_sz="1", u_time=1_300),
                           conn="private-0#2"))
    assert len(cap.records(Order)) == 4


async def test_a_gap_a_push_closed_before_the_answer_is_published_again_as_filled() -> None:
    pipe, cap, reqs = make()
    await pipe.handle(link(LinkEventKind.SUBSCRIBED, "private-0#1", ORDERS))
    await pipe.handle(answer(reqs.asked[-1].seq))
    await pipe.handle(push(row("11")))
    await pipe.handle(link(LinkEventKind.DISCONNECTED, "private-0#1", ORDERS))
    await pipe.handle(link(LinkEventKind.SUBSCRIBED, "private-0#2", ORDERS))
    await pipe.handle(push(row("13", u_time=2_000), conn="private-0#2"))  # closes the gap, published as open
    await pipe.handle(answer(reqs.asked[-1].seq, rest_order(ord_id="11", state="canceled", u_time=1_500)))
    gaps = [(g.revision, g.status.value) for g in cap.records(GapEvent)]
    assert gaps == [(0, "open"), (1, "filled")]


async def test_rest_balances_are_published_while_the_account_channel_is_not_held() -> None:
    pipe, cap, reqs = make()
    await pipe.handle(LinkEvent(LinkEventKind.SUBSCRIBE_FAILED, "private-0#1", "private-0", T0, (ACCOUNT,),
                                code="64003", reason="refused"))
    balances = balances_from_rest({"uTime": "1", "totalEq": "1", "details": [{"ccy": "USDT", "cashBal": "5",
                                                                             "uTime": "1"}]}, recv_ts_ns=T0)
    assert isinstance(balances, tuple)
    await pipe.handle(answer(reqs.asked[-1].seq, *balances, covers=(ACCOUNT,)))
    assert [(b.ccy, b.cash_bal, b.source.value) for b in cap.records(Balance)] == [
        (None, None, "rest"), ("USDT", "5", "rest")]


async def test_an_answer_for_one_stream_never_reports_another_streams_hole_filled() -> None:
    pipe, cap, reqs = make()
    positions = SubArg("positions", inst_type="ANY")
    await pipe.handle(link(LinkEventKind.SUBSCRIBED, "private-0#1", ORDERS, positions))
    await pipe.handle(answer(reqs.asked[-1].seq, covers=(ORDERS, positions)))
    await pipe.handle(link(LinkEventKind.DISCONNECTED, "private-0#1", ORDERS, positions, ts_ns=T0 + 1))
    await pipe.handle(link(LinkEventKind.SUBSCRIBED, "private-0#2", ORDERS, ts_ns=T0 + 2))
    orders_read = reqs.asked[-1]
    await pipe.handle(link(LinkEventKind.SUBSCRIBED, "private-0#2", positions, ts_ns=T0 + 3))
    positions_read = reqs.asked[-1]
    assert positions_read.seq > orders_read.seq
    cap.encoded.clear()
    await pipe.handle(answer(positions_read.seq, covers=(positions,)))  # the orders read is still out (or failed)
    assert [g for g in cap.records(GapEvent) if g.channel == "orders" and g.status.value == "filled"] == []


async def test_a_read_that_failed_for_good_leaves_the_hole_open_and_is_asked_again() -> None:
    pipe, cap, reqs = make()
    await pipe.handle(link(LinkEventKind.SUBSCRIBED, "private-0#1", ORDERS))
    await pipe.handle(answer(reqs.asked[-1].seq))
    await pipe.handle(link(LinkEventKind.DISCONNECTED, "private-0#1", ORDERS, ts_ns=T0 + 1))
    await pipe.handle(link(LinkEventKind.SUBSCRIBED, "private-0#2", ORDERS, ts_ns=T0 + 2))
    failed_read = reqs.asked[-1]
    cap.encoded.clear()
    await pipe.handle(RestRecords(seq=failed_read.seq, reason="test: failed", ts_ns=T0 + 9, since_ms=500,
                                  fetched_ms=5_000, covers=(ORDERS,), records=(), failed=True))
    assert [g for g in cap.records(GapEvent) if g.status.value == "filled"] == []
    await pipe.handle(link(LinkEventKind.DISCONNECTED, "private-0#2", ORDERS, ts_ns=T0 + 10))
    await pipe.handle(link(LinkEventKind.SUBSCRIBED, "private-0#3", ORDERS, ts_ns=T0 + 11))
    again = reqs.asked[-1]
    assert again.seq > failed_read.seq and again.since_ns <= 500 * 1_000_000  # reaches back over the old hole
