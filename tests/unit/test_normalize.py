"""normalize(): real OKX frames become exact records; everything else becomes a dead letter, never an exception."""

from __future__ import annotations

import zlib
from collections.abc import Callable, Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import msgspec
import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import ingest.core.normalize as normalize_module
import ingest.core.normalize.specs as normalize_specs
from ingest.core.avro import RecordEncoder, decode
from ingest.core.events import InboundFrame
from ingest.core.normalize import (
    RAW_ENTRY_OVERHEAD,
    BookPush,
    Normalized,
    OkxEvent,
    RecordPush,
    TradePush,
    TradeRef,
    algo_order_from_rest,
    balances_from_rest,
    book_from_rest,
    candle_from_rest,
    fill_from_rest,
    instrument_from_rest,
    normalize,
    order_from_rest,
    position_from_rest,
    raw_frames,
    trade_from_rest,
)
from ingest.core.records import (
    AlgoOrder,
    Balance,
    BookAction,
    BookUpdate,
    Candle,
    DeadLetter,
    DeadLetterReason,
    Fill,
    FundingRate,
    IndexTicker,
    Instrument,
    Liquidation,
    MarkPrice,
    OkxRecord,
    OpenInterest,
    Order,
    Position,
    PriceLimit,
    Record,
    Source,
    Ticker,
    Trade,
)
from ingest.okx.channels import Endpoint, SubArg

CONN = "public-0#3"
ENCODER = RecordEncoder()
RECV_NS = 1_786_540_436_123_456_789


def frame(data: bytes, seq: int = 7, endpoint: Endpoint = Endpoint.PUBLIC) -> InboundFrame:
    return InboundFrame(CONN, "public-0", endpoint, seq, RECV_NS, data)


def lines(shared_okx: Path, name: str) -> list[bytes]:
    return [line for line in (shared_okx / "frames" / name).read_bytes().splitlines() if line.strip()]


def pushes(shared_okx: Path, name: str) -> list[bytes]:
    """The data pushes of a frames file (docs files also hold requests, acks and errors)."""
    return [line for line in lines(shared_okx, name) if orjson.loads(line).keys() >= {"arg", "data"}]


def only(result: Normalized) -> OkxRecord:
    assert isinstance(result, TradePush | BookPush | RecordPush), result
    assert len(result.records) == 1
    return result.records[0]


def records(result: Normalized) -> tuple[OkxRecord, ...]:
    assert isinstance(result, TradePush | BookPush | RecordPush), result
    return result.records


def dead(result: Normalized) -> DeadLetter:
    assert isinstance(result, DeadLetter), result
    return result


EXACT = msgspec.json.Decoder(float_hook=Decimal)


def edit(data: bytes, change: Callable[[dict[str, Any]], object]) -> bytes:
    """A real frame with one change applied to its JSON (floats kept exact)."""
    msg = EXACT.decode(data)
    change(msg)
    return msgspec.json.Encoder(decimal_format="number").encode(msg)


def test_frame_fields_fill_the_common_fields_of_every_record(shared_okx: Path) -> None:
    result = normalize(frame(lines(shared_okx, "trades.jsonl")[1], seq=42))
    trade = only(result)
    assert (trade.exchange, trade.channel, trade.source, trade.conn_id, trade.recv_seq, trade.recv_ts_ns) == \
        ("okx", "trades", Source.WS, CONN, 42, RECV_NS)
    assert trade.record_id == f"{CONN}:42:0"
    assert trade.inst_type is None  # trades rows do not carry it, and it is never guessed


# ------------------------------------------------------------------------------------------------ trades


def test_trades_push_keeps_okx_strings_and_gives_parsed_trade_ids(shared_okx: Path) -> None:
    result = normalize(frame(lines(shared_okx, "trades.jsonl")[1]))
    assert isinstance(result, TradePush)
    assert result.arg == SubArg("trades", inst_id="BTC-USDT-SWAP")
    assert result.records == (Trade(
        channel="trades", inst_id="BTC-USDT-SWAP", ts=1786540436090, recv_ts_ns=RECV_NS, source=Source.WS,
        conn_id=CONN, recv_seq=7, record_id=f"{CONN}:7:0", trade_id="2832749645", px="63913.4", sz="34.95",
        side="sell", count="10", seq_id=333793118093, okx_source="0"),)
    assert result.refs == (TradeRef(trade_id=2832749645, count=10, seq_id=333793118093, ts=1786540436090),)


@pytest.mark.parametrize("name", ["trades.jsonl", "cryptofeed_2022_trades.jsonl", "tardis_trades.jsonl",
                                  "trades-all.jsonl", "okx_docs_examples/okxdoc_2025_trades.jsonl",
                                  "okx_docs_examples/okxdoc_2025_trades-all.jsonl"])
def test_every_recorded_trade_normalizes_with_the_exact_strings_okx_sent(shared_okx: Path, name: str) -> None:
    for data in pushes(shared_okx, name):
        msg = orjson.loads(data)
        result = normalize(frame(data))
        assert isinstance(result, TradePush)
        for row, trade, ref in zip(msg["data"], result.records, result.refs, strict=True):
            assert isinstance(trade, Trade)
            assert (trade.inst_id, trade.trade_id, trade.px, trade.sz, trade.side, trade.ts) == \
                (row["instId"], row["tradeId"], row["px"], row["sz"], row["side"], int(row["ts"]))
            assert (trade.count, trade.seq_id, trade.okx_source) == \
                (row.get("count"), row.get("seqId"), row.get("source"))
            assert ref == TradeRef(int(row["tradeId"]), int(row.get("count", 1)), row.get("seqId"), int(row["ts"]))
            assert trade.extra == {}


# ------------------------------------------------------------------------------------------------ books


def okx_checksum(bids: list[tuple[str, str]], asks: list[tuple[str, str]]) -> int:
    parts: list[str] = []
    for i in range(25):
        if i < len(bids):
            parts += bids[i]
        if i < len(asks):
            parts += asks[i]
    crc = zlib.crc32(":".join(parts).encode())
    return crc - (1 << 32) if crc >= 1 << 31 else crc


def test_book_levels_are_kept_verbatim_so_every_recorded_checksum_verifies_from_the_records(
        shared_okx: Path) -> None:
    books: dict[str, dict[str, dict[Decimal, tuple[str, str]]]] = {}
    verified = 0
    for data in lines(shared_okx, "cryptofeed_2022_books.jsonl"):
        for update in records(normalize(frame(data))):
            assert isinstance(update, BookUpdate)
            if update.action is BookAction.SNAPSHOT:
                books[update.inst_id] = {"bids": {}, "asks": {}}
            book = books[update.inst_id]
            for side, levels in (("bids", update.bids), ("asks", update.asks)):
                for px, sz, _, _ in levels:
                    if Decimal(sz) == 0:
                        book[side].pop(Decimal(px), None)
                    else:
                        book[side][Decimal(px)] = (px, sz)
            bids = [book["bids"][k] for k in sorted(book["bids"], reverse=True)]
            asks = [book["asks"][k] for k in sorted(book["asks"])]
            assert okx_checksum(bids, asks) == update.checksum
            verified += 1
    assert verified == 290


def test_books5_push_is_a_snapshot_with_its_seq_id_and_row_inst_id(shared_okx: Path) -> None:
    data = lines(shared_okx, "books5.jsonl")[0]
    result = normalize(frame(data))
    assert isinstance(result, BookPush)
    update = result.records[0]
    row = orjson.loads(data)["data"][0]
    assert (update.action, update.seq_id, update.prev_seq_id, update.checksum, update.inst_id, update.ts) == \
        (BookAction.SNAPSHOT, 333794734980, None, None, "BTC-USDT-SWAP", 1786541241006)
    assert update.asks == tuple(tuple(level) for level in row["asks"])
    assert update.bids[0] == ("63921.4", "421.93", "0", "28")


def test_incremental_books_carry_action_seq_ids_and_the_zero_checksum_of_2026(shared_okx: Path) -> None:
    snapshot, update = (records(normalize(frame(d)))[0] for d in
                        pushes(shared_okx, "okx_docs_examples/okxdoc_2026zh_books.jsonl")[:2])
    assert isinstance(snapshot, BookUpdate) and isinstance(update, BookUpdate)
    assert (snapshot.action, snapshot.prev_seq_id, snapshot.seq_id, snapshot.checksum) == \
        (BookAction.SNAPSHOT, -1, 123456, 0)
    assert (update.action, update.prev_seq_id, update.seq_id) == (BookAction.UPDATE, 123456, 123457)


@pytest.mark.parametrize("name", ["tardis_books-l2-tbt.jsonl", "tardis_bbo-tbt.jsonl", "books5.jsonl",
                                  "okx_docs_examples/okxdoc_2025_books.jsonl",
                                  "okx_docs_examples/okxdoc_2026zh_books.jsonl"])
def test_every_recorded_depth_push_normalizes(shared_okx: Path, name: str) -> None:
    for data in pushes(shared_okx, name):
        msg = orjson.loads(data)
        result = normalize(frame(data))
        assert isinstance(result, BookPush)
        for row, update in zip(msg["data"], result.records, strict=True):
            assert update.channel == msg["arg"]["channel"]
            assert update.action == msg.get("action", "snapshot")
            assert [list(level) for level in update.asks] == row["asks"]
            assert [list(level) for level in update.bids] == row["bids"]
            assert (update.seq_id, update.prev_seq_id, update.checksum) == \
                (row.get("seqId"), row.get("prevSeqId"), row.get("checksum"))


# ------------------------------------------------------------------------------------------------ other channels


def test_ticker_push_keeps_every_field_as_sent(shared_okx: Path) -> None:
    data = lines(shared_okx, "tickers.jsonl")[0]
    ticker = only(normalize(frame(data)))
    assert isinstance(ticker, Ticker)
    row = orjson.loads(data)["data"][0]
    assert (ticker.inst_type, ticker.last, ticker.vol_ccy24h, ticker.sod_utc8, ticker.ts) == \
        ("SPOT", "63707.3", "229576048.730317321", "63445.9", 1786613174873)
    assert msgspec.to_builtins(ticker)["volCcy24h"] == row["volCcy24h"]


def test_candle_push_names_the_nine_elements_and_reads_confirm(shared_okx: Path) -> None:
    candle = only(normalize(frame(lines(shared_okx, "candle1m.jsonl")[0], endpoint=Endpoint.BUSINESS)))
    assert candle == Candle(
        channel="candle1m", inst_id="BTC-USDT-SWAP", ts=1786540440000, recv_ts_ns=RECV_NS, source=Source.WS,
        conn_id=CONN, recv_seq=7, record_id=f"{CONN}:7:0", bar="1m", o="63913.0", h="63951.8", l="63913.0",
        c="63951.8", vol="1803.61", vol_ccy="18.0361", vol_ccy_quote="1153203.99426000", confirm=False)


@pytest.mark.parametrize(("channel", "row", "expected"), [
    ("candle1D", ["1597026383085", "8533.02", "8553.74", "8527.17", "8548.26", "45247", "529.5858061"],
     {"vol_ccy": "529.5858061", "vol_ccy_quote": None, "confirm": None}),
    ("candle1D", ["1597026383085", "8533.02", "8553.74", "8527.17", "8548.26", "45247", "529.5858061", "1"],
     {"vol_ccy": "529.5858061", "vol_ccy_quote": None, "confirm": True}),
    ("mark-price-candle1D", ["1597026383085", "3.721", "3.743", "3.677", "3.708", "1"],
     {"vol": None, "vol_ccy": None, "confirm": True}),
    ("index-candle30m", ["1597026383085", "3.721", "3.743", "3.677", "3.708"],
     {"bar": "30m", "confirm": None}),
])
def test_candle_arrays_of_every_documented_length_map_to_named_fields(
        channel: str, row: list[str], expected: dict[str, object]) -> None:
    data = orjson.dumps({"arg": {"channel": channel, "instId": "BTC-USDT"}, "data": [row]})
    candle = only(normalize(frame(data, endpoint=Endpoint.BUSINESS)))
    assert isinstance(candle, Candle)
    assert (candle.ts, candle.o, candle.h, candle.l, candle.c) == (1597026383085, *row[1:5])
    for attr, value in expected.items():
        assert getattr(candle, attr) == value, attr


def test_each_liquidation_detail_becomes_one_record_with_its_rows_instrument(shared_okx: Path) -> None:
    result = normalize(frame(lines(shared_okx, "tardis_liquidation-orders.jsonl")[0]))
    assert isinstance(result, RecordPush)
    assert result.arg == SubArg("liquidation-orders", inst_type="FUTURES")
    liquidation = only(result)
    assert isinstance(liquidation, Liquidation)
    assert (liquidation.inst_id, liquidation.inst_type, liquidation.inst_family, liquidation.uly) == \
        ("XRP-USD-230929", "FUTURES", "XRP-USD", "XRP-USD")
    assert (liquidation.side, liquidation.pos_side, liquidation.bk_px, liquidation.sz, liquidation.ts) == \
        ("buy", "short", "0.55205", "39", 1680173247614)


def test_old_funding_rate_frames_without_ts_use_the_receive_time(shared_okx: Path) -> None:
    old = only(normalize(frame(lines(shared_okx, "tardis_funding-rate.jsonl")[1])))
    assert isinstance(old, FundingRate)
    assert (old.ts, old.funding_rate, old.next_funding_rate, old.funding_time) == \
        (RECV_NS // 1_000_000, None, "0.0003", "1640851200000")
    current = only(normalize(frame(pushes(shared_okx, "okx_docs_examples/okxdoc_2025_funding-rate.jsonl")[0])))
    assert isinstance(current, FundingRate)
    assert (current.ts, current.method, current.next_funding_rate, current.sett_state) == \
        (1700724675402, "current_period", "", "settled")


@pytest.mark.parametrize(("name", "cls", "checks"), [
    ("tardis_mark-price.jsonl", MarkPrice, {"mark_px": "36.232", "inst_type": "FUTURES"}),
    ("tardis_index-tickers.jsonl", IndexTicker, {"idx_px": "35.583", "inst_type": None}),
    ("tardis_open-interest.jsonl", OpenInterest, {"oi": "236870", "oi_usd": None}),
    ("okx_docs_examples/okxdoc_2025_open-interest.jsonl", OpenInterest,
     {"oi": "2216113.01000000309", "oi_usd": "1939251795.54769270396321"}),
    ("tardis_price-limit.jsonl", PriceLimit, {"buy_lmt": "0.98122", "enabled": None}),
    ("okx_docs_examples/okxdoc_2025_price-limit.jsonl", PriceLimit, {"sell_lmt": "300", "enabled": True}),
    ("okx_docs_examples/okxdoc_2025_instruments.jsonl", Instrument,
     {"inst_id_code": 1000000000, "future_settlement": False, "max_iceberg_sz": "9999999999.0000000000000000",
      "ts": RECV_NS // 1_000_000}),
])
def test_public_channel_push_becomes_its_record(shared_okx: Path, name: str, cls: type[OkxRecord],
                                                 checks: dict[str, object]) -> None:
    record = only(normalize(frame(pushes(shared_okx, name)[0])))
    assert type(record) is cls
    for attr, value in checks.items():
        assert getattr(record, attr) == value, attr


# ------------------------------------------------------------------------------------------------ private


def test_order_push_keeps_every_field_nested_ones_as_json_text(shared_okx: Path) -> None:
    data = pushes(shared_okx, "okx_docs_examples/okxdoc_2025_orders.jsonl")[0]
    order = only(normalize(frame(data, endpoint=Endpoint.PRIVATE)))
    assert isinstance(order, Order)
    assert (order.ord_id, order.uid, order.inst_type, order.ts, order.state, order.fill_fee) == \
        ("452197707845865472", "614488474791936", "SPOT", 1654084353264, "filled", "-0.02522168")
    assert (order.attach_algo_ords, order.linked_algo_ord, order.okx_source) == ("[]", '{"algoId":""}', "")
    assert order.kafka_key() == b"452197707845865472"
    row = orjson.loads(data)["data"][0]
    named = {msgspec.structs.fields(Order)[i].encode_name for i in range(len(msgspec.structs.fields(Order)))}
    assert set(row) - {"source"} <= named  # every documented field has a home; source is okxSource
    assert order.extra == {}


@pytest.mark.parametrize(("name", "cls", "count"), [
    ("orders.jsonl", Order, 1),
    ("okx_docs_examples/okxdoc_2025_fills.jsonl", Fill, 1),
    ("okx_docs_examples/okxdoc_2025_positions.jsonl", Position, 1),
    ("ccxt_comment_2023_positions.jsonl", Position, 1),
    ("okx_docs_examples/okxdoc_2025_orders-algo.jsonl", AlgoOrder, 1),
])
def test_private_channel_push_becomes_its_records(shared_okx: Path, name: str, cls: type[OkxRecord],
                                                   count: int) -> None:
    for data in pushes(shared_okx, name):
        result = records(normalize(frame(data, endpoint=Endpoint.PRIVATE)))
        assert [type(r) for r in result] == [cls] * count * len(orjson.loads(data)["data"])


def test_positions_push_carries_the_push_level_event_type_and_pages(shared_okx: Path) -> None:
    position = records(normalize(frame(pushes(shared_okx, "okx_docs_examples/okxdoc_2025_positions.jsonl")[0])))[0]
    assert isinstance(position, Position)
    assert (position.event_type, position.cur_page, position.last_page, position.uid) == \
        ("snapshot", 1, True, "77982378738415879")
    assert position.close_order_algo is not None and '"closeFraction":"0.6"' in position.close_order_algo
    assert (position.delta_bs, position.ts) == ("", 1619507761462)


def test_account_push_becomes_a_totals_record_and_one_record_per_currency(shared_okx: Path) -> None:
    totals, usdt = records(normalize(frame(pushes(shared_okx, "okx_docs_examples/okxdoc_2025_account.jsonl")[0])))
    assert isinstance(totals, Balance) and isinstance(usdt, Balance)
    assert (totals.ccy, totals.total_eq, totals.ts, totals.kafka_key()) == \
        (None, "55868.06403501676", 1705564223311, b"account")
    assert (usdt.ccy, usdt.eq, usdt.collateral_enabled, usdt.ts, usdt.kafka_key()) == \
        ("USDT", "4892.951170691435", False, 1705564213903, b"USDT")
    assert totals.inst_id is None and (totals.event_type, totals.last_page) == ("snapshot", True)
    assert [r.record_id for r in (totals, usdt)] == [f"{CONN}:7:0", f"{CONN}:7:1"]


def test_balance_and_position_push_gives_balances_and_positions_with_their_trades(shared_okx: Path) -> None:
    balance, position = records(normalize(frame(
        pushes(shared_okx, "okx_docs_examples/okxdoc_2025_balance_and_position.jsonl")[0])))
    assert isinstance(balance, Balance) and isinstance(position, Position)
    assert (balance.ccy, balance.cash_bal, balance.event_type, balance.p_time) == \
        ("BTC", "1", "snapshot", "1597026383085")
    assert (position.inst_id, position.pos, position.avg_px) == ("BTC-USD-191018", "10", "3320")
    assert position.trades == balance.trades == '[{"instId":"BTC-USD-191018","tradeId":"2"}]'


# ------------------------------------------------------------------------------------------------ events


@pytest.mark.parametrize(("name", "index", "expected"), [
    ("login.jsonl", 1, {"event": "login", "code": "0", "okx_conn_id": "a4d3ae55"}),
    ("errors.jsonl", 1, {"event": "error", "code": "60011", "msg": "Please log in", "okx_conn_id": None}),
    ("okx_docs_examples/okxdoc_2025_notice.jsonl", 0, {"event": "notice", "code": "64008"}),
    ("okx_docs_examples/okxdoc_2025_conn-count.jsonl", 1,
     {"event": "channel-conn-count-error", "channel": "orders", "conn_count": "20"}),
    ("ccxt_2026_subscribe_acks.jsonl", 0,
     {"event": "subscribe", "arg": SubArg("tickers", inst_id="BTC-USDT"), "okx_conn_id": "d604ccd0"}),
    ("okx_docs_examples/okxdoc_2025_unsubscribe.jsonl", 2, {"event": "unsubscribe", "channel": "tickers"}),
    ("okx_docs_examples/okxdoc_2025_account.jsonl", 3, {"event": "error", "code": "60012", "request_id": "1512"}),
])
def test_event_frames_are_typed_events_not_records(shared_okx: Path, name: str, index: int,
                                                    expected: dict[str, object]) -> None:
    event = normalize(frame(lines(shared_okx, name)[index], seq=9))
    assert isinstance(event, OkxEvent)
    assert (event.conn, event.recv_seq, event.recv_ts_ns) == (CONN, 9, RECV_NS)
    for attr, value in expected.items():
        assert getattr(event, attr) == value, attr


# ------------------------------------------------------------------------------------------------ dead letters

TRADE = (b'{"arg":{"channel":"trades","instId":"BTC-USDT-SWAP"},"data":[{"instId":"BTC-USDT-SWAP",'
         b'"tradeId":"2832749635","px":"63913.5","sz":"1","side":"buy","ts":"1786540435948","count":"1",'
         b'"source":"0","seqId":333793117432}]}')
BOOK = (b'{"arg":{"channel":"books","instId":"BTC-USDT"},"action":"update","data":[{"asks":[["8476.98","415","0",'
        b'"13"]],"bids":[["8476.97","256","0","12"],["8475.55","101","0","1"]],"ts":"1597026383085","checksum":0,'
        b'"prevSeqId":123456,"seqId":123457}]}')
CANDLE = (b'{"arg":{"channel":"candle1m","instId":"BTC-USDT"},"data":[["1786538760000","64040.2","64040.2",'
          b'"64025.7","64033.5","2.16787395","138825.265446816","138825.265446816","0"]]}')


def trade_row(**changes: object) -> bytes:
    def apply(msg: dict[str, Any]) -> None:
        for key, value in changes.items():
            if value is DELETE:
                del msg["data"][0][key]
            else:
                msg["data"][0][key] = value
    return edit(TRADE, apply)


DELETE = object()


@pytest.mark.parametrize(("data", "code", "path"), [
    (b"\xff\xfe{}", DeadLetterReason.NOT_UTF8, None),
    (b'{"arg":{"channel":"trades","instId":"\xc3\x28"},"data":[]}', DeadLetterReason.NOT_UTF8, None),
    (TRADE[: len(TRADE) // 2], DeadLetterReason.BAD_JSON, None),
    (b"pong", DeadLetterReason.BAD_JSON, None),
    (b"", DeadLetterReason.BAD_JSON, None),
    (b'{"a":1} {"b":2}', DeadLetterReason.BAD_JSON, None),
    (b"[1, 2]", DeadLetterReason.NOT_OBJECT, None),
    (b'"trades"', DeadLetterReason.NOT_OBJECT, None),
    (b'{"op":"subscribe","args":[{"channel":"trades"}]}', DeadLetterReason.UNRECOGNIZED, None),
    (b'{"arg":{"channel":"trades","instId":"BTC-USDT"}}', DeadLetterReason.MISSING_FIELD, "data"),
    (b'{"arg":"trades","data":[]}', DeadLetterReason.WRONG_TYPE, "arg"),
    (TRADE.replace(b'"channel":"trades"', b'"channel":"tradez"'), DeadLetterReason.UNKNOWN_CHANNEL, "arg.channel"),
    (TRADE.replace(b'"channel":"trades"', b'"channel":"opt-summary"'), DeadLetterReason.UNSUPPORTED_CHANNEL,
     "arg.channel"),
    (TRADE.replace(b'"channel":"trades"', b'"channel":"candle7m"'), DeadLetterReason.UNKNOWN_CHANNEL,
     "arg.channel"),
    (edit(TRADE, lambda m: m.update(data={"a": 1})), DeadLetterReason.WRONG_TYPE, "data"),
    (edit(TRADE, lambda m: m["arg"].update(instId=5)), DeadLetterReason.WRONG_TYPE, "arg.instId"),
    (trade_row(px=DELETE), DeadLetterReason.MISSING_FIELD, "data[0].px"),
    (trade_row(px=Decimal("63913.5")), DeadLetterReason.WRONG_TYPE, "data[0].px"),
    (trade_row(px=None), DeadLetterReason.WRONG_TYPE, "data[0].px"),
    (trade_row(count=None), DeadLetterReason.WRONG_TYPE, "data[0].count"),
    (trade_row(count="0"), DeadLetterReason.BAD_VALUE, "data[0].count"),
    (trade_row(tradeId=2832749635), DeadLetterReason.WRONG_TYPE, "data[0].tradeId"),
    (trade_row(tradeId="28327x"), DeadLetterReason.BAD_NUMBER, "data[0].tradeId"),
    (trade_row(side="long"), DeadLetterReason.BAD_VALUE, "data[0].side"),
    (trade_row(seqId="333793117432"), DeadLetterReason.WRONG_TYPE, "data[0].seqId"),
    (trade_row(seqId=2**64), DeadLetterReason.BAD_NUMBER, "data[0].seqId"),
    (trade_row(seqId=True), DeadLetterReason.WRONG_TYPE, "data[0].seqId"),
    (trade_row(ts="1786540435948000000000"), DeadLetterReason.BAD_NUMBER, "data[0].ts"),
    (trade_row(ts="-1"), DeadLetterReason.BAD_NUMBER, "data[0].ts"),
    (trade_row(instId="ETH-USDT-SWAP"), DeadLetterReason.BAD_VALUE, "data[0].instId"),
    (edit(TRADE, lambda m: m["data"].append("x")), DeadLetterReason.WRONG_TYPE, "data[1]"),
    (edit(BOOK, lambda m: m.pop("action")), DeadLetterReason.MISSING_FIELD, "action"),
    (edit(BOOK, lambda m: m.update(action="partial")), DeadLetterReason.BAD_VALUE, "action"),
    (edit(BOOK, lambda m: m["data"][0]["asks"][0].pop()), DeadLetterReason.BAD_VALUE, "data[0].asks[0]"),
    (edit(BOOK, lambda m: m["data"][0]["bids"][1].__setitem__(0, "NaN")), DeadLetterReason.BAD_NUMBER,
     "data[0].bids[1][0]"),
    (edit(BOOK, lambda m: m["data"][0]["bids"][1].__setitem__(3, 1)), DeadLetterReason.WRONG_TYPE,
     "data[0].bids[1][3]"),
    (edit(BOOK, lambda m: m["data"][0]["bids"].__setitem__(0, "8476.97|256|0|12")), DeadLetterReason.WRONG_TYPE,
     "data[0].bids[0]"),
    (edit(BOOK, lambda m: m["data"][0]["bids"][0].__setitem__(0, "1|2")), DeadLetterReason.BAD_NUMBER,
     "data[0].bids[0][0]"),
    (edit(BOOK, lambda m: m["data"][0].pop("bids")), DeadLetterReason.MISSING_FIELD, "data[0].bids"),
    (edit(BOOK, lambda m: m["data"][0].update(checksum="0")), DeadLetterReason.WRONG_TYPE, "data[0].checksum"),
    (edit(CANDLE, lambda m: m["data"][0].pop()), DeadLetterReason.BAD_VALUE, "data[0][7]"),
    (edit(CANDLE, lambda m: m["data"].__setitem__(0, m["data"][0][:6])), DeadLetterReason.BAD_VALUE, "data[0]"),
    (edit(CANDLE, lambda m: m["data"].__setitem__(0, {"ts": "1"})), DeadLetterReason.WRONG_TYPE, "data[0]"),
    (edit(CANDLE, lambda m: m["data"][0].__setitem__(8, "2")), DeadLetterReason.BAD_VALUE, "data[0][8]"),
    (edit(CANDLE, lambda m: m["data"][0].__setitem__(1, "")), DeadLetterReason.BAD_VALUE, "data[0][1]"),
    (edit(CANDLE, lambda m: m["data"][0].__setitem__(2, 64040.2)), DeadLetterReason.WRONG_TYPE, "data[0][2]"),
])
def test_every_kind_of_bad_frame_is_a_dead_letter_that_keeps_the_bytes(
        data: bytes, code: DeadLetterReason, path: str | None) -> None:
    letter = dead(normalize(frame(data, seq=11)))
    assert (letter.reason_code, letter.path) == (code, path), letter.reason
    assert letter.raw == data
    assert (letter.source, letter.conn_id, letter.name, letter.endpoint, letter.recv_seq, letter.recv_ts_ns) == \
        (Source.WS, CONN, "public-0", "/ws/v5/public", 11, RECV_NS)
    assert letter.record_id == f"{CONN}:11:dlq"
    assert letter.reason and (path is None or letter.reason.startswith(path))


@pytest.mark.parametrize("text", ["NaN", "nan", "inf", "-inf", "Infinity", "1e999", "-1e400", "1_000", " 1", "1 ",
                                  "+1", "1.", ".5", "0x10", "١٢", "1,5", "", "--1", "1e", "e5"])
def test_numeric_strings_must_be_finite_plain_decimals(text: str) -> None:
    letter = dead(normalize(frame(trade_row(sz=text))))
    assert letter.path == "data[0].sz"
    assert letter.reason_code in (DeadLetterReason.BAD_NUMBER, DeadLetterReason.BAD_VALUE)


@pytest.mark.parametrize("text", ["0", "-0", "0.00000001", "9999999999.0000000000000000", "1e-5", "2.5E+3"])
def test_decimal_strings_in_any_finite_notation_are_kept_as_sent(text: str) -> None:
    trade = only(normalize(frame(trade_row(sz=text))))
    assert isinstance(trade, Trade) and trade.sz == text


def test_dead_letter_names_channel_and_instrument_when_readable() -> None:
    letter = dead(normalize(frame(trade_row(px="NaN"))))
    assert (letter.channel, letter.inst_id) == ("trades", "BTC-USDT-SWAP")
    assert letter.reason == "data[0].px: 'NaN' is not a finite decimal"


def test_a_bug_in_a_channel_handler_costs_one_frame_not_the_pipeline(
        shared_okx: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*_: object) -> list[OkxRecord]:
        raise RuntimeError("boom")
    monkeypatch.setitem(normalize_module._ROW_HANDLERS, "tickers", broken)
    monkeypatch.delitem(normalize_module._FAST_PATHS, b"tickers")  # the reference path's handler is the one broken
    letter = dead(normalize(frame(lines(shared_okx, "tickers.jsonl")[0])))
    assert letter.reason_code is DeadLetterReason.INTERNAL_ERROR and "boom" in letter.reason
    monkeypatch.setitem(normalize_module._FAST_PATHS, b"trades", broken)
    assert dead(normalize(frame(TRADE))).reason_code is DeadLetterReason.INTERNAL_ERROR


# ------------------------------------------------------------------------------------------------ nothing lost


def test_fields_okx_adds_are_kept_as_json_text_in_extra() -> None:
    def add(msg: dict[str, Any]) -> None:
        msg["data"][0]["newField"] = {"a": Decimal("1.50"), "b": [123456789012345678901234567890, None]}
        msg["data"][0]["flag"] = "x"
        msg["newTop"] = 1
        msg["arg"]["uly"] = "BTC-USD"
    trade = only(normalize(frame(edit(TRADE, add))))
    assert trade.extra == {"newField": '{"a":1.50,"b":[123456789012345678901234567890,null]}', "flag": '"x"',
                           "push.newTop": "1", "arg.uly": '"BTC-USD"'}


def test_unknown_fields_of_every_record_shape_are_kept() -> None:
    book = only(normalize(frame(edit(BOOK, lambda m: m["data"][0].update(rpi=True)))))
    assert book.extra == {"rpi": "true"}
    candle = only(normalize(frame(edit(CANDLE, lambda m: m["data"][0].append("42")))))
    assert candle.extra == {"[9]": '"42"'}
    ticker = only(normalize(frame(
        b'{"arg":{"channel":"tickers","instId":"BTC-USDT"},"data":[{"instId":"BTC-USDT","last":"1","ts":"1",'
        b'"newPx":"2"}]}')))
    assert ticker.extra == {"newPx": '"2"'}


def test_raw_frames_record_keeps_each_frame_exactly() -> None:
    frames = [InboundFrame(CONN, "public-0", Endpoint.PUBLIC, 5, RECV_NS, b"\x00anything", "a4d3ae55"),
              InboundFrame(CONN, "public-0", Endpoint.PUBLIC, 6, RECV_NS + 7, b'{"event":"x"}', "a4d3ae55")]
    (record,) = raw_frames(frames, 1_000)
    assert (record.conn_id, record.name, record.endpoint, record.okx_conn_id) == (
        CONN, "public-0", "/ws/v5/public", "a4d3ae55")
    assert [(f.recv_seq, f.recv_ts_ns, f.payload) for f in record.frames] == [
        (5, RECV_NS, b"\x00anything"), (6, RECV_NS + 7, b'{"event":"x"}')]
    assert record.emission_id() == f"{CONN}:5-6"
    assert record.kafka_key() == CONN.encode()
    assert record.kafka_ts_ms() == (RECV_NS + 7) // 1_000_000
    body = RecordEncoder("okx.").encode(record).value
    assert decode(body) == record


_raw_inputs = st.lists(st.tuples(st.sampled_from(["public-0#1", "business-0#1", "private-0#2"]),
                                 st.sampled_from([None, "a1", "b2"]), st.binary(max_size=40)), max_size=60)


@given(_raw_inputs, st.integers(min_value=1, max_value=400))
def test_raw_frames_hold_every_frame_once_in_order_per_connection(
        spec: list[tuple[str, str | None, bytes]], cap: int) -> None:
    seqs: dict[str, int] = {}
    frames = []
    for conn, okx_conn, data in spec:
        seqs[conn] = seqs.get(conn, 0) + 1
        frames.append(InboundFrame(conn, conn.partition("#")[0], Endpoint.PUBLIC, seqs[conn], RECV_NS, data, okx_conn))
    records = raw_frames(frames, cap)
    for conn in seqs:
        theirs = [r for r in records if r.conn_id == conn]
        got = [(f.recv_seq, f.payload, r.okx_conn_id) for r in theirs for f in r.frames]
        assert got == [(f.recv_seq, f.data, f.okx_conn_id) for f in frames if f.conn == conn]
    for r in records:
        assert r.frames
        assert len(r.frames) == 1 or sum(len(f.payload) + RAW_ENTRY_OVERHEAD for f in r.frames) <= cap


# ------------------------------------------------------------------------------------------------ properties


def every_frame(shared_okx: Path) -> Iterator[bytes]:
    for path in sorted((shared_okx / "frames").rglob("*.jsonl")):
        yield from (line for line in path.read_bytes().splitlines() if line.strip())


def test_fast_path_and_reference_path_agree_on_every_recorded_frame(shared_okx: Path) -> None:
    compared = 0
    for data in every_frame(shared_okx):
        compared += 1
        assert normalize(frame(data)) == normalize_module._normalize(frame(data))
    assert compared > 800


def test_ticker_fast_path_takes_real_tickers_and_gives_the_reference_records(shared_okx: Path) -> None:
    from ingest.core.normalize.fast import _fast_tickers

    taken = 0
    for name in ("tickers.jsonl", "tardis_tickers.jsonl", "ccxt_2026_tickers.jsonl"):
        for data in pushes(shared_okx, name):
            fast = _fast_tickers(frame(data))
            if fast is not None:
                taken += 1
                assert fast == normalize_module._normalize(frame(data))
    assert taken > 10  # the fast path is the one real tickers take, not a fallback every time


@pytest.mark.parametrize(("field", "value"), [
    ("askPx", ""), ("askPx", "1|2"), ("askPx", "1e3"), ("askPx", "1e999"), ("askPx", "-0.5"), ("askPx", None),
    ("ts", "12a"), ("ts", ""), ("instId", "ETH-USDT"), ("instType", 5), ("sodUtc8", "NaN"), ("newField", "x")])
def test_ticker_edge_values_give_what_the_reference_path_gives(shared_okx: Path, field: str, value: object) -> None:
    def change(msg: dict[str, Any]) -> None:
        msg["data"][0][field] = value

    data = edit(pushes(shared_okx, "tickers.jsonl")[0], change)
    assert normalize(frame(data)) == normalize_module._normalize(frame(data))


def test_ticker_without_optional_fields_keeps_them_null(shared_okx: Path) -> None:
    def change(msg: dict[str, Any]) -> None:
        for key in ("last", "bidPx", "instType"):
            del msg["data"][0][key]

    data = edit(pushes(shared_okx, "tickers.jsonl")[0], change)
    ticker = only(normalize(frame(data)))
    assert isinstance(ticker, Ticker) and (ticker.last, ticker.bid_px, ticker.inst_type) == (None, None, None)
    assert ticker.ask_px is not None and normalize(frame(data)) == normalize_module._normalize(frame(data))


RESULT_TYPES = (TradePush, BookPush, RecordPush, OkxEvent, DeadLetter)


def assert_well_formed(data: bytes, result: Normalized) -> None:
    assert isinstance(result, RESULT_TYPES)
    if isinstance(result, DeadLetter):
        assert result.raw == data and result.reason


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=300))
def test_arbitrary_bytes_never_raise(data: bytes) -> None:
    assert_well_formed(data, normalize(frame(data)))


@st.composite
def mutated_frames(draw: st.DrawFn, corpus: list[bytes]) -> bytes:
    data = bytearray(draw(st.sampled_from(corpus)))
    for _ in range(draw(st.integers(1, 4))):
        action = draw(st.sampled_from(["flip", "cut", "insert", "delete"]))
        at = draw(st.integers(0, max(len(data) - 1, 0)))
        if action == "flip" and data:
            data[at] = draw(st.integers(0, 255))
        elif action == "cut":
            del data[at:]
        elif action == "insert":
            data[at:at] = draw(st.sampled_from([b'"', b",", b"{", b"]", b"null", b"-", b"e9", b"\xff", b'"NaN"']))
        elif data:
            del data[at]
    return bytes(data)


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.text(max_size=8)
    | st.sampled_from(["", "0", "-1", "1e999", "NaN", "buy", "snapshot", "update", "1786540435948"]),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=6)


@st.composite
def edited_frames(draw: st.DrawFn, corpus: list[bytes]) -> bytes:
    """A real frame with a few values replaced, removed or added at any depth of its JSON."""
    msg = EXACT.decode(draw(st.sampled_from(corpus)))
    for _ in range(draw(st.integers(1, 3))):
        node: Any = msg
        while isinstance(node, dict | list) and node and draw(st.booleans()):
            key = draw(st.sampled_from(sorted(node) if isinstance(node, dict) else range(len(node))))
            child = node[key]
            if not isinstance(child, dict | list) or not child:
                break
            node = child
        if isinstance(node, dict) and node:
            key = draw(st.sampled_from(sorted(node)))
            choice = draw(st.integers(0, 2))
            if choice == 0:
                node[key] = draw(JSON_VALUES)
            elif choice == 1:
                del node[key]
            else:
                node[draw(st.text(max_size=6))] = draw(JSON_VALUES)
        elif isinstance(node, list) and node:
            node[draw(st.integers(0, len(node) - 1))] = draw(JSON_VALUES)
    encoded: bytes = msgspec.json.Encoder(decimal_format="number").encode(msg)
    return encoded


@pytest.fixture(scope="module")
def corpus(shared_okx: Path) -> list[bytes]:
    return [data for data in every_frame(shared_okx) if len(data) < 4000]


@pytest.fixture(scope="module")
def hot_corpus(shared_okx: Path) -> list[bytes]:
    names = ["trades.jsonl", "cryptofeed_2022_trades.jsonl", "tardis_trades-all.jsonl", "books5.jsonl",
             "tardis_books-l2-tbt.jsonl", "tardis_bbo-tbt.jsonl", "okx_docs_examples/okxdoc_2026zh_books.jsonl",
             "tickers.jsonl", "tardis_tickers.jsonl", "ccxt_2026_tickers.jsonl"]
    return [data for name in names for data in lines(shared_okx, name) if len(data) < 4000]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_mutated_real_frames_never_raise(corpus: list[bytes], data: st.DataObject) -> None:
    mutated = data.draw(mutated_frames(corpus))
    assert_well_formed(mutated, normalize(frame(mutated)))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_edited_real_frames_never_raise_and_fast_path_agrees_with_reference(
        corpus: list[bytes], hot_corpus: list[bytes], data: st.DataObject) -> None:
    edited = data.draw(edited_frames(data.draw(st.sampled_from([corpus, hot_corpus]))))
    result = normalize(frame(edited))
    assert_well_formed(edited, result)
    assert result == normalize_module._normalize(frame(edited))


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_whatever_normalize_returns_for_edited_frames_encodes_and_decodes(
        corpus: list[bytes], hot_corpus: list[bytes], data: st.DataObject) -> None:
    edited = data.draw(edited_frames(data.draw(st.sampled_from([corpus, hot_corpus]))))
    result = normalize(frame(edited))
    produced: tuple[Record, ...] = () if isinstance(result, OkxEvent) else \
        (result,) if isinstance(result, DeadLetter) else result.records
    for record in produced:
        assert decode(ENCODER.encode(record).value) == record


# ------------------------------------------------------------------------------------------------ REST rows


def as_stream(record: OkxRecord) -> OkxRecord:
    """The record with the fields that say where it came from blanked, to compare REST with WS."""
    return msgspec.structs.replace(record, source=Source.WS, record_id="", conn_id=None, recv_seq=None,
                                   recv_ts_ns=0)


def test_rest_trade_row_gives_the_same_record_as_the_stream_for_the_same_trade(shared_okx: Path) -> None:
    data = lines(shared_okx, "trades-all.jsonl")[0]
    ws = only(normalize(frame(data, endpoint=Endpoint.BUSINESS)))
    row = orjson.loads(data)["data"][0]  # history-trades rows have the same fields
    rest = trade_from_rest(row, recv_ts_ns=RECV_NS + 5, channel="trades-all")
    assert isinstance(rest, Trade)
    assert as_stream(rest) == as_stream(ws)
    assert (rest.source, rest.conn_id, rest.recv_seq, rest.recv_ts_ns) == (Source.REST, None, None, RECV_NS + 5)
    assert rest.record_id == "rest:trades-all:BSV-USDT:84834539"
    assert rest.kafka_key() == ws.kafka_key()


def test_rest_history_trades_rows_become_trades_records(shared_okx: Path) -> None:
    body = orjson.loads(lines(shared_okx, "okx_docs_examples/okxdoc_2025_rest_history_trades.jsonl")[0])
    trades = [trade_from_rest(row, recv_ts_ns=RECV_NS) for row in body["data"]]
    assert [t.record_id for t in trades] == ["rest:trades:BTC-USDT:242720720", "rest:trades:BTC-USDT:242720719"]
    assert all(isinstance(t, Trade) and t.channel == "trades" and t.count is None for t in trades)


def test_rest_candle_rows_give_the_same_record_as_the_stream(shared_okx: Path) -> None:
    body = orjson.loads(lines(shared_okx, "okx_docs_examples/okxdoc_2025_rest_candles.jsonl")[0])
    for row in body["data"]:
        rest = candle_from_rest(row, inst_id="BTC-USDT", channel="candle1H", recv_ts_ns=RECV_NS)
        ws = only(normalize(frame(orjson.dumps({"arg": {"channel": "candle1H", "instId": "BTC-USDT"},
                                                "data": [row]}))))
        assert isinstance(rest, Candle)
        assert as_stream(rest) == as_stream(ws)
        assert rest.record_id == f"rest:candle1H:BTC-USDT:1597026383085:{row[8]}"


def test_rest_book_snapshot_is_a_snapshot_book_update(shared_okx: Path) -> None:
    body = orjson.loads(lines(shared_okx, "okx_docs_examples/okxdoc_2025_rest_books.jsonl")[0])
    rest = book_from_rest(body["data"][0], inst_id="BTC-USDT", recv_ts_ns=RECV_NS)
    ws = only(normalize(frame(orjson.dumps({"arg": {"channel": "books", "instId": "BTC-USDT"},
                                            "action": "snapshot", "data": body["data"]}))))
    assert isinstance(rest, BookUpdate)
    assert as_stream(rest) == as_stream(ws)
    assert (rest.action, rest.asks, rest.record_id) == \
        (BookAction.SNAPSHOT, (("41006.8", "0.60038921", "0", "1"),), "rest:books:BTC-USDT:1629966436396")


def test_rest_private_rows_become_the_private_records(shared_okx: Path) -> None:
    def row(name: str) -> dict[str, Any]:
        data: dict[str, Any] = orjson.loads(lines(shared_okx, f"okx_docs_examples/{name}")[0])["data"][0]
        return data

    fill = fill_from_rest(row("okxdoc_2025_rest_fills_history.jsonl"), recv_ts_ns=RECV_NS)
    assert isinstance(fill, Fill)
    assert (fill.bill_id, fill.fee, fill.ts, fill.record_id, fill.kafka_key()) == \
        ("680800019754098688", "-0.00000192834", 1708587373362, "rest:fills:680800019754098688",
         b"680800019749904384")
    order = order_from_rest(row("okxdoc_2025_rest_orders_history.jsonl"), recv_ts_ns=RECV_NS)
    assert isinstance(order, Order)
    assert (order.cancel_source_reason, order.state, order.record_id) == \
        ("", "filled", "rest:orders:680800019749904384:1708587373362")
    position = position_from_rest(row("okxdoc_2025_rest_account_positions.jsonl"), recv_ts_ns=RECV_NS)
    assert isinstance(position, Position)
    assert position.record_id == f"rest:positions:1752810569801498626:1724742632153:{RECV_NS}"
    balances = balances_from_rest(row("okxdoc_2025_rest_account_balance.jsonl"), recv_ts_ns=RECV_NS)
    assert isinstance(balances, tuple)
    totals, usdt = balances
    assert (totals.ccy, usdt.ccy, usdt.auto_lend_status, usdt.extra) == (None, "USDT", "off", {"maxSpotInUse": '""'})
    assert [b.record_id for b in balances] == [f"rest:account:account:1705474164160:{RECV_NS}",
                                               f"rest:account:USDT:1705449605015:{RECV_NS}"]
    assert all(b.channel == "account" and b.source is Source.REST for b in balances)


def test_rest_algo_order_row_is_the_same_record_as_the_stream_gives(shared_okx: Path) -> None:
    data = pushes(shared_okx, "okx_docs_examples/okxdoc_2025_orders-algo.jsonl")[0]
    ws = only(normalize(frame(data, endpoint=Endpoint.BUSINESS)))
    rest = algo_order_from_rest(orjson.loads(data)["data"][0], recv_ts_ns=RECV_NS)
    assert isinstance(rest, AlgoOrder) and isinstance(ws, AlgoOrder)
    assert as_stream(rest) == msgspec.structs.replace(as_stream(ws), uid=None)  # uid comes from the WS arg
    assert (rest.record_id, rest.linked_ord, rest.kafka_key()) == \
        ("rest:orders-algo:581878926302093312:1708679675245", '{"ordId":"98192973880283"}', b"581878926302093312")


@pytest.mark.parametrize("name", ["cryptofeed_2022_rest_public_instruments_SPOT.json",
                                  "cryptofeed_2022_rest_public_instruments_SWAP.json",
                                  "cryptofeed_2022_rest_public_instruments_FUTURES.json"])
def test_every_recorded_rest_instrument_row_becomes_an_instrument(shared_okx: Path, name: str) -> None:
    rows = orjson.loads((shared_okx / "frames" / name).read_bytes())["data"]
    instruments = [instrument_from_rest(row, recv_ts_ns=RECV_NS) for row in rows]
    assert instruments and all(isinstance(i, Instrument) for i in instruments)


def test_a_bad_rest_row_is_a_rest_dead_letter_holding_the_row() -> None:
    letter = trade_from_rest({"instId": "BTC-USDT", "tradeId": "1", "px": "NaN", "sz": "1", "side": "buy",
                              "ts": "1"}, recv_ts_ns=RECV_NS)
    assert isinstance(letter, DeadLetter)
    assert (letter.source, letter.conn_id, letter.reason_code, letter.path, letter.channel) == \
        (Source.REST, None, DeadLetterReason.BAD_NUMBER, "px", "trades")
    assert orjson.loads(letter.raw)["px"] == "NaN"
    assert letter.record_id.startswith("rest:trades:dlq:")
    assert isinstance(candle_from_rest(["1", "2"], inst_id="X", channel="candle1m", recv_ts_ns=1), DeadLetter)
    assert isinstance(balances_from_rest({"details": "no"}, recv_ts_ns=1), DeadLetter)


@pytest.mark.parametrize(("trade_id", "fits"), [(str(2**63 - 1), True), (str(-(2**63)), True),
                                                 (str(2**63), False), (str(-(2**63) - 1), False), ("9" * 30, False)])
def test_a_trade_id_must_fit_the_long_that_gap_bounds_carry_on_both_paths(trade_id: str, fits: bool) -> None:
    data = orjson.dumps({"arg": {"channel": "trades-all", "instId": "BTC-USDT"}, "data": [{
        "instId": "BTC-USDT", "tradeId": trade_id, "px": "1", "sz": "1", "side": "buy", "ts": "1786540435948"}]})
    for result in (normalize(frame(data)), normalize_module._normalize(frame(data))):
        if fits:
            assert isinstance(result, TradePush) and result.refs[0].trade_id == int(trade_id)
        else:
            assert isinstance(result, DeadLetter) and result.reason_code is DeadLetterReason.BAD_NUMBER
            assert result.path == "data[0].tradeId"


def test_every_integer_field_the_normalizer_checks_is_a_long_in_its_schema() -> None:
    """The normalizer's integer check is the 64-bit range; a field of Avro type int would need a narrower one."""
    checked = 0
    for spec in vars(normalize_specs).values():
        if not isinstance(spec, normalize_module._Spec):
            continue
        schema = ENCODER.schemas[spec.cls.AVRO_NAME].source
        types = {f["name"]: f["type"] for f in schema["fields"]}  # type: ignore[attr-defined]
        attrs = {f.name: f.encode_name for f in msgspec.structs.fields(spec.cls)}
        for attr, kind in spec.fields.values():
            if kind is normalize_module._Kind.LONG:
                checked += 1
                assert types[attrs[attr]] in ("long", ["null", "long"]), (spec.cls.__name__, attr)
    for cls in (Position, Balance):  # curPage of a push, checked by the same 64-bit rule
        fields = {f["name"]: f["type"] for f in ENCODER.schemas[cls.AVRO_NAME].source["fields"]}  # type: ignore[attr-defined]
        assert fields["curPage"] == ["null", "long"]
        checked += 1
    assert checked >= 3
