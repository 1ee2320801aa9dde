"""No frame can crash the recorder or grow its memory: every input ends as a record, a counted event or a dead letter.

Each concrete failure once seen in the field has its regression test here; the property test then covers the
whole class: any JSON value in any field of a real frame of every channel.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from pathlib import Path
from typing import Any

import msgspec
import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ingest.core.avro import RecordEncoder, decode
from ingest.core.events import Inbound, InboundFrame, LinkEvent, LinkEventKind
from ingest.core.gaps import StreamCheckpoint
from ingest.core.normalize import normalize
from ingest.core.records import BookUpdate, DeadLetter, DeadLetterReason, GapEvent, Trade
from ingest.core.streams import Position
from ingest.io.state import SavedState, StreamStateFile
from ingest.okx.channels import Endpoint, SubArg, endpoint_for
from ingest.services import pipeline as pipeline_module
from ingest.services.pipeline import Pipeline, gap_record
from tests.unit.test_pipeline import Capture

CONN = "public-0#1"
TRADES = SubArg("trades", "BTC-USDT")
_seq = itertools.count(1)


def frame(data: bytes | dict[str, Any], conn: str = CONN, endpoint: Endpoint = Endpoint.PUBLIC) -> InboundFrame:
    raw = data if isinstance(data, bytes) else msgspec.json.encode(data)  # msgspec: integers of any size
    return InboundFrame(conn, conn.split("#")[0], endpoint, next(_seq), 1_700_000_000_000_000_000, raw)


def subscribed(*args: SubArg, conn: str = CONN) -> LinkEvent:
    return LinkEvent(LinkEventKind.SUBSCRIBED, conn, conn.split("#")[0], 1_700_000_000_000_000_000, args)


def trade(tid: int | str, inst: str = "BTC-USDT") -> dict[str, Any]:
    return {"arg": {"channel": "trades", "instId": inst}, "data": [{
        "instId": inst, "tradeId": str(tid), "px": "63913.5", "sz": "0.001", "side": "buy", "ts": "1786540435948",
        "count": "1", "source": "0"}]}


def make(**kw: Any) -> tuple[Pipeline, Capture]:
    cap = Capture()
    inbox: asyncio.Queue[Inbound] = asyncio.Queue()
    return Pipeline(inbox, cap, RecordEncoder("okx."), **kw), cap


# ---- regressions: each failed on the code before this test ------------------------------------------------


async def test_a_trade_id_beyond_a_long_is_a_dead_letter_and_recording_goes_on() -> None:
    """It used to pass validation, open a trade hole whose bound overflowed the encoder and kill the pipeline."""
    pipe, cap = make()
    await pipe.handle(subscribed(TRADES))
    await pipe.handle(frame(trade(1)))
    await pipe.handle(frame(trade(2**63 + 5)))
    await pipe.handle(frame(trade(2)))
    assert [t.trade_id for t in cap.records(Trade)] == ["1", "2"]
    (dead,) = cap.records(DeadLetter)
    assert dead.reason_code is DeadLetterReason.BAD_NUMBER and dead.reason.startswith("data[0].tradeId")
    assert "64-bit" in dead.reason and dead.raw == msgspec.json.encode(trade(2**63 + 5))
    assert cap.records(GapEvent) == []  # the refused trade is no hole


def test_state_file_save_survives_a_position_beyond_64_bits(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A huge first trade used to make every periodic save raise, and the save at shutdown crash the daemon."""
    f = StreamStateFile(tmp_path / "0.streams.json")
    good = StreamCheckpoint(SubArg("trades", "ETH-USDT"), Position(1, 7, None), "c", None)
    bad = StreamCheckpoint(TRADES, Position(1, 2**64 + 1, None), "c", None)
    with caplog.at_level(logging.ERROR):
        f.save(5, [bad, good], None)
    state = f.load()
    assert state is not None and state.streams == (good,)  # the other streams are still saved
    assert any(r.message == "stream_state_skipped" for r in caplog.records)


async def test_a_record_that_cannot_be_encoded_becomes_a_dead_letter_and_the_batch_is_delivered() -> None:
    """A state file of the previous version could hold a tradeId beyond a long; the gap it reopens cannot be
    encoded. That used to raise out of the pipeline with the whole batch undelivered."""
    pipe, cap = make()
    old = StreamCheckpoint(TRADES, Position(1, 2**63 + 1, None), "public-0#0", None)
    assert pipe.restore(SavedState(1_600_000_000_000_000_000, (old,)), [TRADES]) == 1
    await pipe.handle(subscribed(TRADES))
    await pipe.handle_many([frame(trade(10)), frame(trade(11))])
    assert [t.trade_id for t in cap.records(Trade)] == ["10", "11"]
    (dead,) = cap.records(DeadLetter)
    assert dead.reason_code is DeadLetterReason.BAD_NUMBER and "GapEvent" in dead.reason
    assert pipe.stats.unencodable_records == 1


async def test_an_error_inside_the_pipeline_costs_one_frame_as_a_dead_letter(monkeypatch: pytest.MonkeyPatch) -> None:
    """The last-resort guard: a bug after normalization used to be a log line only, the frame in no topic but raw."""
    pipe, cap = make()
    await pipe.handle(subscribed(TRADES))
    real = normalize

    def broken(f: InboundFrame) -> Any:
        if b'"tradeId":"2"' in f.data:
            raise RuntimeError("a bug")
        return real(f)

    monkeypatch.setattr(pipeline_module, "normalize", broken)
    await pipe.handle_many([frame(trade(1)), frame(trade(2)), frame(trade(3))])
    assert [t.trade_id for t in cap.records(Trade)] == ["1", "3"]
    (dead,) = cap.records(DeadLetter)
    assert dead.reason_code is DeadLetterReason.INTERNAL_ERROR and "RuntimeError: a bug" in dead.reason
    assert dead.raw == msgspec.json.encode(trade(2)) and pipe.stats.item_failures == 1


# ---- pushes nobody subscribed ------------------------------------------------------------------------------


def _book_snapshot(inst: str) -> dict[str, Any]:
    return {"arg": {"channel": "books", "instId": inst}, "action": "snapshot", "data": [{
        "asks": [["101", "1", "0", "1"]], "bids": [["99", "1", "0", "1"]], "ts": "1786540435948", "checksum": 0,
        "seqId": 10, "prevSeqId": -1}]}


async def test_four_thousand_never_subscribed_book_streams_create_no_state() -> None:
    pipe, cap = make()
    await pipe.handle(subscribed(SubArg("books", "BTC-USDT")))
    before = pipe.state_sizes()
    for i in range(4_000):
        await pipe.handle(frame(_book_snapshot(f"X{i}-USDT")))
    await pipe.handle(frame(_book_snapshot("BTC-USDT")))
    after = pipe.state_sizes()
    # Lookup caches are capped (the normalizer's at 50,000 entries, push args at 10,000, then cleared)...
    assert all(after.pop(k) <= 50_000 for k in ("normalize_args", "normalize_templates"))
    assert after.pop("push_arg_aliases") <= 10_000
    caches = ("normalize_args", "normalize_templates", "push_arg_aliases")
    assert after == {**{k: v for k, v in before.items() if k not in caches}, "books": 1, "gap_streams": 1,
                     "stream_owners": 1, "book_checkpoint_streams": 1, "stream_last_seen": 1}  # ...but the one held
    dead = cap.records(DeadLetter)
    assert len(dead) == 4_000 and pipe.stats.dead_letters["unsubscribed"] == 4_000
    assert {d.reason_code for d in dead} == {DeadLetterReason.UNSUBSCRIBED}
    assert dead[0].inst_id == "X0-USDT" and dead[0].channel == "books" and b'"X0-USDT"' in dead[0].raw
    assert [r.inst_id for r in cap.records(BookUpdate)] == ["BTC-USDT"]


async def test_the_stream_limit_refuses_state_beyond_it_and_says_so(caplog: pytest.LogCaptureFixture) -> None:
    pipe, cap = make(max_streams=2)
    args = [SubArg("trades", i) for i in ("A-USDT", "B-USDT", "C-USDT")]
    with caplog.at_level(logging.ERROR):
        await pipe.handle(subscribed(*args))
    assert any(r.message == "stream_limit_reached" for r in caplog.records)
    for inst in ("A-USDT", "C-USDT"):
        await pipe.handle(frame(trade(1, inst)))
    assert [t.inst_id for t in cap.records(Trade)] == ["A-USDT"]
    assert [d.reason_code for d in cap.records(DeadLetter)] == [DeadLetterReason.UNSUBSCRIBED]
    sizes = pipe.state_sizes()
    assert sizes["subscribed"] == 2 and sizes["gap_streams"] <= 2 and pipe.stats.streams_refused == 1


# ---- the whole class: any JSON value in any field of any channel's frame ----------------------------------

_FRAMES = [
    "trades.jsonl", "trades-all.jsonl", "books.jsonl", "books5.jsonl", "tardis_bbo-tbt.jsonl",
    "tardis_books-l2-tbt.jsonl", "tickers.jsonl", "candle1m.jsonl", "tardis_mark-price.jsonl",
    "tardis_index-tickers.jsonl", "tardis_funding-rate.jsonl", "tardis_open-interest.jsonl",
    "tardis_price-limit.jsonl", "tardis_liquidation-orders.jsonl", "okx_docs_examples/okxdoc_2025_instruments.jsonl",
    "okx_docs_examples/okxdoc_2025_candle.jsonl", "orders.jsonl", "okx_docs_examples/okxdoc_2025_fills.jsonl",
    "okx_docs_examples/okxdoc_2025_positions.jsonl", "okx_docs_examples/okxdoc_2025_account.jsonl",
    "okx_docs_examples/okxdoc_2025_balance_and_position.jsonl", "okx_docs_examples/okxdoc_2025_orders-algo.jsonl",
    "okx_docs_examples/okxdoc_2025_login.jsonl", "okx_docs_examples/okxdoc_2025_subscribe.jsonl",
    "okx_docs_examples/okxdoc_2025_notice.jsonl", "errors.jsonl",
]


Case = tuple[list[bytes], dict[str, Any], list[bytes]]


def _cases(shared_okx: Path) -> list[Case]:
    """(frames sent before, the frame to mutate, frames sent after) per file: three consecutive pushes of one
    stream where the file has them (for incremental books the snapshot first), so a mutated frame meets
    live state (a book, a trade sequence) and leaves its effect on the next frame; else its first frame."""
    out: list[Case] = []
    for name in _FRAMES:
        lines = [line for line in (shared_okx / "frames" / name).read_bytes().splitlines() if line.strip()]
        msgs = [orjson.loads(line) for line in lines]
        pushes = [m for m in msgs if isinstance(m, dict) and "data" in m and "arg" in m]
        if not pushes:
            out.append(([], msgs[0], []))
            continue
        first = next((m for m in pushes if m.get("action") == "snapshot"), pushes[0])
        same = [m for m in pushes[pushes.index(first):] if m["arg"] == first["arg"]]
        if len(same) == 1:
            out.append(([], first, []))
        else:
            out.append(([orjson.dumps(same[0])], same[1], [orjson.dumps(m) for m in same[2:3]]))
    return out


def _paths(value: object, prefix: tuple[str | int, ...] = ()) -> list[tuple[str | int, ...]]:
    """Every place in a JSON document a value can be replaced: each key and each array element."""
    out = [prefix] if prefix else []
    if isinstance(value, dict):
        for k, v in value.items():
            out += _paths(v, (*prefix, k))
    elif isinstance(value, list):
        for i, v in enumerate(value[:3]):
            out += _paths(v, (*prefix, i))
    return out


_DELETE = object()


def _replace(doc: Any, path: tuple[str | int, ...], value: object) -> Any:
    head, *rest = path
    copy = dict(doc) if isinstance(doc, dict) else list(doc)
    if rest:
        copy[head] = _replace(doc[head], tuple(rest), value)  # type: ignore[index]
    elif value is _DELETE:
        del copy[head]  # type: ignore[arg-type]
    else:
        copy[head] = value  # type: ignore[index]
    return copy


_integers = st.integers() | st.integers(min_value=2**62, max_value=2**80) | st.integers(min_value=-(2**80),
                                                                                        max_value=-(2**62))
_scalars = (st.none() | st.booleans() | _integers | _integers.map(str)
            | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=30)
            | st.sampled_from(["", "0", "-1", "1e400", "9" * 40, "-9223372036854775809", "9223372036854775808",
                               "NaN", "1.5", "snapshot", "update", "buy", "BTC-USDT", "books", "trades"]))


def _nested(inner: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)


_json = st.recursive(_scalars, _nested, max_leaves=12)


def _like(original: object) -> st.SearchStrategy[object]:
    """Values of the original's own kind but of any size or form (where range bugs live), else any JSON."""
    if isinstance(original, bool) or not isinstance(original, int | str):
        return _json
    if isinstance(original, int) or original.lstrip("-").isdigit():
        return _integers | _integers.map(str) | st.sampled_from(["", "-0", "0" * 30, "1" + "0" * 30])
    return _json


def _lookup(doc: Any, path: tuple[str | int, ...]) -> object:
    for key in path:
        doc = doc[key]
    return doc


def _accounted(pipe: Pipeline) -> int:
    """Everything a frame can end as: records (not raw, not gaps), dead letters, counted events and drops."""
    s = pipe.stats
    return (sum(n for topic, n in s.records.items() if topic not in ("raw", "gaps", "dlq"))
            + sum(s.dead_letters.values()) + sum(s.events.values()) + s.book_deltas_dropped + s.book_breaks
            + s.overlap_duplicates_dropped + s.private_repeats_dropped)


@pytest.fixture(scope="module")
def cases(shared_okx: Path) -> list[Case]:
    return _cases(shared_okx)


def _numeric(value: object) -> bool:
    return (isinstance(value, int) and not isinstance(value, bool)) or (
        isinstance(value, str) and value.lstrip("-").replace(".", "", 1).isdigit())


def _check_one(case: Case, path: tuple[str | int, ...], value: object) -> None:
    """Send `case` with the value at `path` replaced: nothing raises, the frame ends as something, every record
    decodes, no guard had to step in, and the state file and the shutdown's gap report can hold what is left."""
    before, target, after = case
    mutated = _replace(target, path, value)
    arg = target.get("arg")
    channel = arg.get("channel") if isinstance(arg, dict) else None
    endpoint = (endpoint_for(channel) if isinstance(channel, str) else None) or Endpoint.PUBLIC
    pipe, cap = make(publish_raw=True)

    async def run() -> None:
        if isinstance(arg, dict) and "data" in target:
            await pipe.handle(subscribed(SubArg.from_okx(arg)))
        for raw in before:
            await pipe.handle(frame(raw, endpoint=endpoint))
        seen = _accounted(pipe)
        await pipe.handle(frame(mutated, endpoint=endpoint))  # must not raise, whatever the value
        assert _accounted(pipe) > seen, f"the frame ended nowhere: {mutated!r}"
        for raw in after:
            await pipe.handle(frame(raw, endpoint=endpoint))

    asyncio.run(run())
    for enc in cap.encoded:
        decode(enc.value)  # a consumer with the .avsc files reads every record
    # No guard had to step in: the normalizer refused what the schemas cannot hold...
    assert pipe.stats.item_failures == 0 and pipe.stats.unencodable_records == 0
    # ...and what the state file and the shutdown report hold fits them too.
    orjson.dumps([c.to_json() for c in pipe.checkpoint()[0]])
    encoder = RecordEncoder("okx.")
    for gap in pipe.open_gaps():
        encoder.encode(gap_record(gap, "0"))


_SETTINGS = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                              HealthCheck.too_slow])


@pytest.mark.parametrize("index", range(len(_FRAMES)), ids=_FRAMES)
@_SETTINGS
@given(data=st.data())
def test_any_json_value_in_any_field_of_any_channel_never_raises_and_always_ends_somewhere(
        cases: list[Case], index: int, data: st.DataObject) -> None:
    target = cases[index][1]
    path = data.draw(st.sampled_from(_paths(target)), label="path")
    _check_one(cases[index], path, data.draw(st.just(_DELETE) | _json | _like(_lookup(target, path)), label="value"))


@pytest.mark.parametrize("index", range(len(_FRAMES)), ids=_FRAMES)
@_SETTINGS
@given(data=st.data())
def test_numbers_of_any_size_in_any_numeric_field_never_raise_and_always_end_somewhere(
        cases: list[Case], index: int, data: st.DataObject) -> None:
    """Where range bugs live: each numeric field (number or numeric string) of the frame, any size or form."""
    target = cases[index][1]
    paths = [p for p in _paths(target) if _numeric(_lookup(target, p))]
    if not paths:
        return  # an event frame without numbers: the test above covers it
    path = data.draw(st.sampled_from(paths), label="path")
    _check_one(cases[index], path, data.draw(_like(_lookup(target, path)), label="value"))


# ---- a dead letter on a stream without ids leaves a gap -----------------------------------------------------

TICKERS = SubArg("tickers", "BTC-USDT")


def ticker(ts: int | str, last: str = "63913.5", inst: str = "BTC-USDT") -> dict[str, Any]:
    return {"arg": {"channel": "tickers", "instId": inst}, "data": [{
        "instType": "SPOT", "instId": inst, "last": last, "lastSz": "0.1", "askPx": "63914", "askSz": "1",
        "bidPx": "63913", "bidSz": "1", "ts": str(ts)}]}


async def test_a_dead_lettered_ticker_leaves_a_dead_letter_gap_bounded_by_the_good_tickers_around_it() -> None:
    pipe, cap = make()
    await pipe.handle(subscribed(TICKERS))
    await pipe.handle(frame(ticker(1_786_540_435_000)))
    await pipe.handle(frame(ticker(1_786_540_436_000, last="NaN")))
    assert cap.records(GapEvent) == []  # open until the stream's next good record
    await pipe.handle(frame(ticker(1_786_540_437_000)))
    (gap,) = cap.records(GapEvent)
    assert gap.kind.value == "dead_letter" and (gap.channel, gap.inst_id) == ("tickers", "BTC-USDT")
    assert gap.before is not None and gap.after is not None
    assert (gap.before.ts, gap.after.ts) == (1_786_540_435_000, 1_786_540_437_000)
    assert "data[0].last" in gap.reason and len(cap.records(DeadLetter)) == 1


async def test_dead_letters_leave_no_extra_gap_where_ids_tell_and_no_state_for_streams_nobody_holds() -> None:
    pipe, cap = make()
    await pipe.handle(subscribed(TRADES, TICKERS))
    await pipe.handle(frame(trade(1)))
    await pipe.handle(frame({**trade(2), "data": [{**trade(2)["data"][0], "px": "NaN"}]}))
    await pipe.handle(frame(trade(3)))  # the tradeId hole tells exactly what is missing
    await pipe.handle(frame(ticker(1, last="NaN", inst="ETH-USDT")))  # never subscribed
    assert [g.kind.value for g in cap.records(GapEvent)] == ["trade_hole"]
    assert pipe.state_sizes()["gap_streams"] == 2  # the two held streams, not ETH-USDT's


@pytest.mark.parametrize(("subscribed_arg", "push_arg"), [
    # positions by instFamily: OKX's push arg leaves instFamily out (OKX docs' own example)
    ({"channel": "positions", "instType": "FUTURES", "instFamily": "BTC-USD"},
     {"channel": "positions", "uid": "77982378738415879", "instType": "FUTURES"}),
    # fills of the whole account: each push names its instId
    ({"channel": "fills"}, {"channel": "fills", "instId": "BTC-USDT-SWAP", "uid": "614488474791111"}),
    # account by currency: the push arg may carry the uid only
    ({"channel": "account", "ccy": "BTC"}, {"channel": "account", "uid": "44584"}),
])
async def test_a_push_whose_arg_differs_from_its_subscription_only_as_okx_does_is_recorded_under_it(
        subscribed_arg: dict[str, str], push_arg: dict[str, str], shared_okx: Path) -> None:
    names = {"positions": "okxdoc_2025_positions.jsonl", "fills": "okxdoc_2025_fills.jsonl",
             "account": "okxdoc_2025_account.jsonl"}
    path = shared_okx / "frames" / "okx_docs_examples" / names[subscribed_arg["channel"]]
    push = next(m for m in map(orjson.loads, path.read_bytes().splitlines()) if "data" in m and "arg" in m)
    pipe, cap = make()
    held = SubArg.from_okx(subscribed_arg)
    await pipe.handle(subscribed(held, conn="private-0#1"))
    await pipe.handle(frame({**push, "arg": push_arg}, conn="private-0#1", endpoint=Endpoint.PRIVATE))
    assert cap.records(DeadLetter) == [] and sum(pipe.stats.records.values()) >= 1
    sizes = pipe.state_sizes()
    assert sizes["gap_streams"] == 1 and sizes["stream_owners"] == 1  # one stream: the subscription's


@pytest.mark.parametrize("push_arg", [
    {"channel": "books"},  # no instId: whose book would it be?
    {"channel": "books", "instId": "ETH-USDT"},
    {"channel": "books5", "instId": "BTC-USDT"},
])
async def test_a_push_for_another_stream_of_a_subscribed_channel_is_unsubscribed(push_arg: dict[str, str]) -> None:
    pipe, cap = make()
    await pipe.handle(subscribed(SubArg("books", "BTC-USDT")))
    data = _book_snapshot("BTC-USDT")
    rows = [{**data["data"][0], "instId": push_arg.get("instId", "BTC-USDT")}]
    await pipe.handle(frame({**data, "arg": push_arg, "data": rows}))
    assert [d.reason_code for d in cap.records(DeadLetter)] == [DeadLetterReason.UNSUBSCRIBED]
    assert pipe.state_sizes()["books"] == 0
