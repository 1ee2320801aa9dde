"""The natural event key: on every record (field and header), from exchange facts only, the same for the ws and
rest versions of one event, and what replay dedupes by."""

from __future__ import annotations

import io
import json
from collections import defaultdict
from pathlib import Path
from typing import Any

import fastavro
import msgspec
import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ingest.core.archive_schema import Coordinates, convert, table_to_records
from ingest.core.avro import (
    CONFLUENT_MAGIC,
    SINGLE_OBJECT_MAGIC,
    AvroSchema,
    RecordEncoder,
    decode,
    default_schemas,
)
from ingest.core.events import InboundFrame
from ingest.core.identity import EVENT_KEY_HEADER, canonical_number, event_key, has_event_key, record_event_key
from ingest.core.normalize import (
    BookPush,
    RecordPush,
    TradePush,
    book_from_rest,
    normalize,
    trade_from_rest,
)
from ingest.core.records import (
    LEGACY_RECORD_TYPES,
    RECORD_TYPES,
    BookAction,
    BookUpdate,
    Candle,
    DeadLetter,
    Liquidation,
    OkxRecord,
    Order,
    Position,
    RawFrameEntry,
    RawFrames,
    Record,
    Source,
    Trade,
)
from ingest.core.replay import View, replay_items, sort_key
from ingest.io.schemas import schema_directory
from ingest.okx.channels import Endpoint
from ingest.sim import SimConfig
from ingest.sim import frames as sim_frames
from ingest.sim.clock import SimClock
from ingest.sim.market import Market
from tests.unit.test_archive_schema import real_records
from tests.unit.test_records import records_of

RECV_NS = 1_786_540_436_123_456_789
ENCODER = RecordEncoder()
#: Fields that say who recorded a record and how; the key must not depend on any of them.
LOCAL = ("inst_type", "recv_ts_ns", "source", "conn_id", "recv_seq", "record_id", "extra")
EXCHANGE_FIELDS_IGNORED = frozenset(LOCAL) | {"exchange", "channel", "inst_id", "ts", "event_key"}


def _frame(data: bytes, *, conn: str = "public-0#1", seq: int = 1, recv_ns: int = RECV_NS,
           endpoint: Endpoint = Endpoint.PUBLIC) -> InboundFrame:
    return InboundFrame(conn, conn.split("#")[0], endpoint, seq, recv_ns, data)


def _records(frame: InboundFrame) -> list[Record]:
    result = normalize(frame)
    if isinstance(result, TradePush | BookPush | RecordPush):
        return list(result.records)
    return [result] if isinstance(result, DeadLetter) else []


def _content(rec: Record) -> tuple[object, ...]:
    return tuple((f.name, getattr(rec, f.name)) for f in msgspec.structs.fields(rec)
                 if f.name not in EXCHANGE_FIELDS_IGNORED)


# ------------------------------------------------------------------------------------------- real frames


def test_every_real_frame_gets_a_key_in_its_field_and_header_that_names_its_channel(shared_okx: Path) -> None:
    records = list(real_records(shared_okx))
    dead = [r for p in sorted((shared_okx / "frames").rglob("*.jsonl"))
            for n, line in enumerate(p.read_bytes().splitlines()) if line.strip()
            for r in _records(_frame(line, seq=n + 1)) if isinstance(r, DeadLetter)]
    assert len(records) > 1000 and dead  # real pushes and REST rows of every type, and frames that are not
    for where, rec in records + [("dead letter", d) for d in dead]:
        encoded = ENCODER.encode(rec)
        headers = dict(encoded.headers)
        key = headers[EVENT_KEY_HEADER].decode()
        assert key == event_key(rec) == rec.event_key  # type: ignore[attr-defined]
        back = decode(encoded.value)
        assert back == rec and record_event_key(back) == key, where
        prefix = rec.channel if isinstance(rec, OkxRecord) else "dlq"
        assert key.startswith(f"{prefix}:"), (where, key)


def test_records_share_a_key_only_when_the_exchange_said_the_same(shared_okx: Path) -> None:
    by_key: dict[str, list[tuple[str, Record]]] = defaultdict(list)
    for where, rec in real_records(shared_okx):
        if not where.startswith("okxdoc_"):  # the docs' examples reuse invented ids (seqId 123456) across versions
            by_key[event_key(rec) or ""].append((where, rec))
    repeated = 0
    for key, items in by_key.items():
        contents = {_content(rec) for _, rec in items}
        assert len(contents) == 1, (key, [w for w, _ in items])
        repeated += len(items) > 1
    assert repeated > 10  # the reference set really holds events captured twice (the case dedupe exists for)


def test_a_key_survives_the_archive_which_renders_decimals_canonically(shared_okx: Path) -> None:
    by_kind: dict[Any, list[Record]] = defaultdict(list)
    for _, rec in real_records(shared_okx):
        by_kind[rec.TOPIC].append(rec)
    for kind, records in by_kind.items():
        coords = [Coordinates("okx.x", 0, i, 0) for i in range(len(records))]
        back = [r for r, *_ in table_to_records(convert(kind, records, coords).table)]
        assert [event_key(r) for r in back] == [event_key(r) for r in records], kind


# ------------------------------------------------------------------------------------------- properties

okx_types = [cls for cls in RECORD_TYPES if issubclass(cls, OkxRecord)]
local_values = st.fixed_dictionaries({
    "inst_type": st.none() | st.sampled_from(["SPOT", "SWAP"]), "recv_ts_ns": st.integers(0, 2**62),
    "source": st.sampled_from(list(Source)), "conn_id": st.none() | st.text(max_size=12),
    "recv_seq": st.none() | st.integers(0, 2**40), "record_id": st.text(max_size=20),
    "extra": st.dictionaries(st.text(max_size=5), st.text(max_size=5), max_size=2),
})


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(okx_types).flatmap(records_of), local_values)
def test_the_key_does_not_depend_on_who_recorded_the_event_or_how(record: Record, local: dict[str, Any]) -> None:
    assert isinstance(record, OkxRecord)
    other = msgspec.structs.replace(record, **local)
    assert event_key(other) == event_key(record) is not None
    assert has_event_key(type(record))


def _trade(**kw: Any) -> Trade:
    fields: dict[str, Any] = dict(channel="trades", inst_id="BTC-USDT", ts=1, recv_ts_ns=2, source=Source.WS,
                                  record_id="r", trade_id="123", px="1", sz="1", side="buy")
    fields.update(kw)
    return Trade(**fields)


def _book(**kw: Any) -> BookUpdate:
    fields: dict[str, Any] = dict(channel="books", inst_id="BTC-USDT", ts=1, recv_ts_ns=2, source=Source.WS,
                                  record_id="r", action=BookAction.UPDATE, asks=(("1", "2", "0", "1"),), bids=(),
                                  seq_id=10, prev_seq_id=5)
    fields.update(kw)
    return BookUpdate(**fields)


ids = st.integers(-(2**40), 2**40)


@given(ids, ids, st.sampled_from(["trades", "trades-all"]), st.sampled_from(["BTC-USDT", "ETH-USDT-SWAP"]))
def test_trades_differ_by_id_channel_and_instrument(a: int, b: int, channel: str, inst: str) -> None:
    ka, kb = event_key(_trade(trade_id=str(a), channel=channel, inst_id=inst)), event_key(_trade(trade_id=str(b)))
    assert ka == f"{channel}:{inst}:{a}"
    assert (ka == kb) == (a == b and channel == "trades" and inst == "BTC-USDT")


@given(st.integers(2, 1000))
def test_an_aggregated_trade_is_another_event_than_the_single_trade_of_its_last_id(count: int) -> None:
    single, also_single = _trade(count=None), _trade(count="1")
    aggregate = _trade(count=str(count))
    assert event_key(single) == event_key(also_single) == "trades:BTC-USDT:123"
    assert event_key(aggregate) == f"trades:BTC-USDT:123:{count}"


@given(st.integers(0, 2**62), st.integers(0, 2**62))
def test_book_records_differ_by_seq_id_and_by_what_they_do_to_the_book(seq: int, other: int) -> None:
    update, snapshot, checkpoint = (_book(seq_id=seq), _book(seq_id=seq, action=BookAction.SNAPSHOT, prev_seq_id=-1),
                                    _book(seq_id=seq, action=BookAction.CHECKPOINT, prev_seq_id=None))
    keys = {event_key(update), event_key(snapshot), event_key(checkpoint)}
    assert keys == {f"books:BTC-USDT:{seq}", f"books:BTC-USDT:{seq}:snapshot", f"books:BTC-USDT:{seq}:checkpoint"}
    assert (event_key(_book(seq_id=other)) == event_key(update)) == (seq == other)
    # OKX's no-change update repeats the last seqId: it is not the update that had that seqId.
    heartbeat = _book(seq_id=seq, prev_seq_id=seq, asks=(), ts=99)
    assert event_key(heartbeat) == f"books:BTC-USDT:{seq}:heartbeat:99" != event_key(_book(seq_id=seq, prev_seq_id=seq))


def test_candles_are_keyed_by_bar_when_final_and_by_values_while_they_move() -> None:
    def candle(**kw: Any) -> Candle:
        fields: dict[str, Any] = dict(channel="candle1m", inst_id="BTC-USDT", ts=60_000, recv_ts_ns=1,
                                      source=Source.WS, record_id="r", bar="1m", o="1", h="2", l="1", c="1.5",
                                      vol="3", confirm=False)
        fields.update(kw)
        return Candle(**fields)

    moving, moved = candle(), candle(c="1.6", vol="4")
    assert event_key(moving) != event_key(moved) and event_key(moving) == event_key(candle(c="1.50", vol="3.0"))
    assert event_key(candle(confirm=True)) == event_key(candle(confirm=True, c="9", source=Source.REST)) \
        == "candle1m:BTC-USDT:60000:confirmed"


def test_orders_are_keyed_by_update_time_and_state_and_what_separates_updates_of_one_millisecond() -> None:
    def order(**kw: Any) -> Order:
        fields: dict[str, Any] = dict(channel="orders", inst_id="BTC-USDT", ts=5, recv_ts_ns=1, source=Source.WS,
                                      record_id="r", ord_id="42", u_time="5", state="partially_filled", px="10.0",
                                      sz="2")
        fields.update(kw)
        return Order(**fields)

    fill_a, fill_b = order(trade_id="7", fill_sz="1"), order(trade_id="8", fill_sz="1")
    assert event_key(fill_a) == "orders:42:5:partially_filled:7:10:2"
    assert event_key(fill_b) != event_key(fill_a)  # two fills of one taker order in one millisecond
    assert event_key(order(px="11")) != event_key(order())  # an amend in the same millisecond
    # The REST row of that state (fill* = the last fill) is the same event.
    assert event_key(order(trade_id="7", fill_sz="1.00", source=Source.REST, record_id="rest:orders:42:5")) \
        == event_key(fill_a)


def test_state_records_whose_values_move_without_their_update_time_moving_are_keyed_by_their_values() -> None:
    def position(**kw: Any) -> Position:
        fields: dict[str, Any] = dict(channel="positions", inst_id="BTC-USDT-SWAP", ts=5, recv_ts_ns=1,
                                      source=Source.WS, record_id="r", pos_id="p1", u_time="5", upl="1.5")
        fields.update(kw)
        return Position(**fields)

    assert event_key(position()) == event_key(position(upl="1.50", recv_ts_ns=9, conn_id="private-0#2"))
    assert event_key(position(upl="1.6")) != event_key(position())
    assert event_key(position()).startswith("positions:p1:5:")  # type: ignore[union-attr]
    liq = Liquidation(channel="liquidation-orders", inst_id="BTC-USDT-SWAP", ts=7, recv_ts_ns=1, source=Source.WS,
                      record_id="r", side="sell", pos_side="long", bk_px="100.50", sz="2")
    assert event_key(liq) == "liquidation-orders:BTC-USDT-SWAP:7:sell:long:100.5:2"


@given(st.decimals(allow_nan=False, allow_infinity=False, places=8))
def test_canonical_numbers_are_the_archive_rendering(value: Any) -> None:
    from ingest.core.archive_schema import render_decimal

    for text in (str(value), f"{value:f}", f"{value:f}00" if "." in f"{value:f}" else f"{value:f}.000"):
        assert canonical_number(text) == render_decimal(value)
    assert canonical_number("BTC-USDT") == "BTC-USDT" and canonical_number("") == ""


def test_gaps_and_dead_letters_have_keys_and_raw_frames_none() -> None:
    dead_a = _records(_frame(b'{"arg":', conn="public-0#1", seq=3))
    dead_b = _records(_frame(b'{"arg":', conn="public-9#4", seq=77, recv_ns=5))
    assert event_key(dead_a[0]) == event_key(dead_b[0]) and event_key(dead_a[0]).startswith("dlq:")  # type: ignore[union-attr]
    raw = RawFrames(conn_id="c", name="n", endpoint="/ws/v5/public",
                    frames=(RawFrameEntry(recv_seq=1, recv_ts_ns=1, payload=b"{}"),))
    assert event_key(raw) is None and not has_event_key(RawFrames)
    assert EVENT_KEY_HEADER not in dict(ENCODER.encode(raw).headers)
    assert all(has_event_key(cls) for cls in RECORD_TYPES if cls is not RawFrames)
    assert not any(has_event_key(cls) for cls in LEGACY_RECORD_TYPES)


def test_a_key_already_on_a_record_is_what_the_encoder_publishes() -> None:
    trade = _trade(event_key="trades:BTC-USDT:set-by-an-older-build")
    encoded = ENCODER.encode(trade)
    assert dict(encoded.headers)[EVENT_KEY_HEADER] == b"trades:BTC-USDT:set-by-an-older-build"
    assert decode(encoded.value) == trade


# ------------------------------------------------------------------------------------ ws and rest agree


def _sim_market(steps: int) -> Market:
    config = SimConfig(instruments=("BTC-USDT", "ETH-USDT-SWAP"), seed=11, start_ms=1_767_225_600_000,
                       api_key="k" * 8, api_secret="s" * 8, passphrase="p" * 8)
    market = Market(config, SimClock())
    for _ in range(steps):
        market.step()
    return market


def test_the_ws_and_rest_versions_of_each_simulated_trade_and_book_share_the_key() -> None:
    market = _sim_market(300)
    for inst in ("BTC-USDT", "ETH-USDT-SWAP"):
        m = market.get(inst)
        ws = [r for i, f in enumerate(sim_frames.trades_all(m, 0, len(m.log)))
              for r in _records(_frame(f.encode(), seq=i + 1))]
        rest = [trade_from_rest(row.to_okx(), recv_ts_ns=RECV_NS, channel="trades-all") for row in m.log.rows()]
        assert len(ws) == len(rest) > 50
        assert [event_key(r) for r in ws] == [event_key(r) for r in rest]
        singles = [r for r in rest if isinstance(r, Trade)]
        ws_trades = [r for r in ws if isinstance(r, Trade)]
        assert len(singles) == len(ws_trades) == len(ws)
        # Two emissions (a connection's frame, a REST fetch), one event.
        assert all(a.record_id != b.record_id for a, b in zip(ws_trades, singles, strict=True))
        # The aggregated channel: a taker order that matched once is the REST row of its id.
        agg = _records(_frame(f'{{"arg":{{"channel":"trades","instId":"{inst}"}},"data":[{{"instId":"{inst}",'
                              f'"tradeId":"{singles[-1].trade_id}","px":"{singles[-1].px}","sz":"{singles[-1].sz}",'
                              f'"side":"{singles[-1].side}","ts":"{singles[-1].ts}","count":"1","source":"0",'
                              f'"seqId":5}}]}}'.encode()))
        assert event_key(agg[0]) == event_key(trade_from_rest(m.log.rows()[-1].to_okx(), recv_ts_ns=1,
                                                              channel="trades"))
        snapshot = _records(_frame(sim_frames.book_snapshot(m, "books", 400, m.ts, 0).encode()))
        row = {"asks": sim_frames.level_rows(m, m.book.top(False, 400)),
               "bids": sim_frames.level_rows(m, m.book.top(True, 400)), "ts": str(m.ts), "seqId": m.book_seq}
        from_rest = book_from_rest(orjson.loads(orjson.dumps(row)), inst_id=inst, recv_ts_ns=RECV_NS)
        assert isinstance(from_rest, BookUpdate) and from_rest.source is Source.REST
        assert event_key(snapshot[0]) == event_key(from_rest) == f"books:{inst}:{m.book_seq}:snapshot"


# ------------------------------------------------------------------------------------ old data, replay


def _previous_schema(name: str) -> AvroSchema:
    (path,) = [p for p in (schema_directory() / "previous").glob("*.avsc") if json.loads(p.read_text())["name"] == name]
    return AvroSchema.from_json(json.loads(path.read_text()))


def test_records_written_before_the_field_still_decode_and_get_their_key_computed() -> None:
    trade = _trade(conn_id="public-0#1", recv_seq=4)
    old = _previous_schema("Trade")
    assert old.fingerprint != default_schemas()["okx.ingest.v1.Trade"].fingerprint
    body = io.BytesIO()
    fields = msgspec.to_builtins(trade)
    del fields["eventKey"]
    fastavro.schemaless_writer(body, old.parsed, fields)
    for value, schema_name in ((SINGLE_OBJECT_MAGIC + old.fingerprint + body.getvalue(), None),
                               (CONFLUENT_MAGIC + (7).to_bytes(4, "big") + body.getvalue(), "okx.ingest.v1.Trade")):
        back = decode(value, schema_name=schema_name)
        assert isinstance(back, Trade) and back == trade and back.event_key is None
        assert record_event_key(back) == "trades:BTC-USDT:123"


def test_every_schema_file_before_this_field_is_kept_so_its_data_reads() -> None:
    schemas = default_schemas()
    names = {s.name for s in schemas.previous.values()}
    assert names == {cls.AVRO_NAME for cls in RECORD_TYPES if has_event_key(cls)}
    for old in schemas.previous.values():
        assert old.fingerprint not in schemas.by_fingerprint


def _entries(records: list[Record], topic: str, partition: int) -> list[Any]:
    return sorted(((sort_key(r, topic, partition, off), r) for off, r in enumerate(records)), key=lambda e: e[0])


@pytest.mark.parametrize("view", list(View))
def test_replay_shows_each_event_once_when_two_replicas_recorded_it(view: View) -> None:
    market = _sim_market(200)
    m = market.get("BTC-USDT")
    lines = sim_frames.trades_all(m, 0, len(m.log))
    replica_a = [r for i, f in enumerate(lines) for r in _records(_frame(f.encode(), conn="public-0#1", seq=i + 1))]
    # The second replica joined later, over another connection, and received each frame a little later.
    replica_b = [r for i, f in enumerate(lines[len(lines) // 3:])
                 for r in _records(_frame(f.encode(), conn="public-3#2", seq=i + 1, recv_ns=RECV_NS + 5_000))]
    for rec in replica_b[:5]:  # and its first records reached Kafka without keys (written by an older build)
        assert rec.event_key is None  # type: ignore[attr-defined]
    for rec in replica_a:
        ENCODER.encode(rec)  # published: the key is in the record now
    items = list(replay_items([_entries(replica_a, "okx.trades", 0), _entries(replica_b, "okx.trades", 1)], [],
                              start=0, end=2**62, view=view))
    trades = [i for i in items if isinstance(i, Trade)]
    assert [t.trade_id for t in trades] == [row.trade_id for row in m.log.rows()]
    assert {t.conn_id for t in trades} == {"public-0#1"}  # the first copy in the order is kept
