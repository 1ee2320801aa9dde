"""The archive's record <-> Arrow mapping: exact over every real OKX frame, one row per book level, partitions
and file names from Kafka coordinates, unfit values rejected with a reason, schema evolution by name."""

from __future__ import annotations

import io
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path

import duckdb
import msgspec
import orjson
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ingest.core.archive_schema import (
    DECIMAL,
    DECIMAL_FIELDS,
    NO_INST_ID,
    TS_MS,
    TS_NS,
    Coordinates,
    PartitionKey,
    arrow_schema,
    convert,
    decimal_fit_error,
    file_name,
    parse_file_name,
    parse_partition_path,
    partition_key,
    records_to_table,
    render_decimal,
    table_to_records,
)
from ingest.core.events import InboundFrame
from ingest.core.normalize import BookPush, RecordPush, TradePush, instrument_from_rest, normalize, trade_from_rest
from ingest.core.records import (
    RECORD_TYPES,
    BookAction,
    BookUpdate,
    DeadLetter,
    DeadLetterReason,
    GapEvent,
    GapKind,
    GapStatus,
    RawFrameEntry,
    RawFrames,
    Record,
    Source,
    StreamPosition,
    Ticker,
    TopicKind,
    Trade,
)
from ingest.okx.channels import Endpoint

RECV_NS = 1_786_540_436_123_456_789
CONN = "public-0#1"


def real_records(shared_okx: Path) -> Iterator[tuple[str, Record]]:
    """Every record the normalizer makes from every recorded or documented push and REST body we hold."""
    frames = shared_okx / "frames"
    for path in sorted(frames.rglob("*.jsonl")):
        for n, line in enumerate(path.read_bytes().splitlines()):
            if not line.strip():
                continue
            try:
                msg = orjson.loads(line)
            except orjson.JSONDecodeError:
                continue
            if not isinstance(msg, dict) or "data" not in msg or "arg" not in msg:
                continue
            endpoint = Endpoint.PRIVATE if msg["arg"].get("channel") in (
                "orders", "fills", "positions", "account", "balance_and_position", "orders-algo") else Endpoint.PUBLIC
            result = normalize(InboundFrame(CONN, "public-0", endpoint, n + 1, RECV_NS, line))
            if isinstance(result, TradePush | BookPush | RecordPush):
                for rec in result.records:
                    yield f"{path.name}:{n + 1}", rec
    for path in sorted(frames.rglob("*rest_public_instruments*.json")):
        for row in orjson.loads(path.read_bytes())["data"]:
            inst = instrument_from_rest(row, recv_ts_ns=RECV_NS)
            if not isinstance(inst, DeadLetter):
                yield path.name, inst
    for row in orjson.loads((frames / "rest_history_trades.json").read_bytes())["data"]:
        trade = trade_from_rest(row, recv_ts_ns=RECV_NS)
        assert not isinstance(trade, DeadLetter)
        yield "rest_history_trades.json", trade


def canonical(rec: Record) -> Record:
    """A record with every decimal string rendered canonically (the one change the archive makes)."""
    fields = DECIMAL_FIELDS[type(rec)]
    changes: dict[str, object] = {}
    for f in msgspec.structs.fields(rec):
        value = getattr(rec, f.name)
        if f.encode_name in fields and value:
            changes[f.name] = render_decimal(Decimal(value))
        elif f.name in ("asks", "bids"):
            changes[f.name] = tuple((render_decimal(Decimal(lv[0])), render_decimal(Decimal(lv[1])), lv[2], lv[3])
                                    for lv in value)
    return msgspec.structs.replace(rec, **changes)


def coords(n: int, topic: str = "okx.x", start: int = 100) -> list[Coordinates]:
    return [Coordinates(topic, 3, start + i, 1_786_540_436_000 + i) for i in range(n)]


def through_parquet(table: pa.Table) -> pa.Table:
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    buf.seek(0)
    return pq.read_table(buf)


def test_every_real_frame_round_trips_exactly_through_parquet(shared_okx: Path) -> None:
    by_kind: dict[TopicKind, list[tuple[str, Record]]] = {}
    for where, rec in real_records(shared_okx):
        by_kind.setdefault(rec.TOPIC, []).append((where, rec))
    # Every market and private record type the normalizer makes is covered by real data.
    assert set(by_kind) >= {k for k in TopicKind if k not in (TopicKind.GAPS, TopicKind.DLQ, TopicKind.RAW)}
    decimals_seen = 0
    for kind, items in by_kind.items():
        records = [rec for _, rec in items]
        converted = convert(kind, records, coords(len(records), f"okx.{kind.value}"))
        assert converted.rejected == [], (kind, [(items[r.index][0], r) for r in converted.rejected])
        table = through_parquet(converted.table)
        assert table.schema.equals(arrow_schema(kind), check_metadata=False)
        back = list(table_to_records(table))
        assert [b[0] for b in back] == [canonical(r) for r in records], kind
        assert [b[3] for b in back] == [c.offset for c in coords(len(records))]
        for field in table.schema:
            if field.type == DECIMAL:
                decimals_seen += table.column(field.name).null_count < table.num_rows
    assert decimals_seen > 50  # prices, sizes and rates really went through decimal columns


def test_decimal_columns_are_exact_and_empty_strings_come_back(shared_okx: Path) -> None:
    trade = next(r for _, r in real_records(shared_okx) if isinstance(r, Trade))
    exact = msgspec.structs.replace(trade, px="123456789012345678.123456789012345678", sz="0.000000000000000001")
    table = records_to_table(TopicKind.TRADES, [exact], coords(1))
    assert table.schema.field("px").type == DECIMAL
    assert table.column("px")[0].as_py() == Decimal("123456789012345678.123456789012345678")
    (back, *_), = table_to_records(through_parquet(table))
    assert back == exact
    ticker = next(r for _, r in real_records(shared_okx) if r.TOPIC is TopicKind.TICKERS)
    blank = msgspec.structs.replace(ticker, last="", bid_px=None)
    table = through_parquet(records_to_table(TopicKind.TICKERS, [blank], coords(1)))
    assert table.column("last")[0].as_py() is None  # "" is no value to a query...
    (back, *_), = table_to_records(table)
    assert isinstance(back, Ticker)
    assert (back.last, back.bid_px) == ("", None)  # ...and comes back as "" to a replay


def test_a_value_that_does_not_fit_is_rejected_with_its_reason_and_the_rest_is_kept(shared_okx: Path) -> None:
    trades = [r for _, r in real_records(shared_okx) if isinstance(r, Trade)][:3]
    too_fine = msgspec.structs.replace(trades[1], sz="0.0000000000000000001")
    too_big = msgspec.structs.replace(trades[2], px="1" + "0" * 20)
    converted = convert(TopicKind.TRADES, [trades[0], too_fine, too_big], coords(3))
    assert [(r.index, r.field) for r in converted.rejected] == [(1, "sz"), (2, "px")]
    assert "more than 18 digits after the point" in converted.rejected[0].reason
    assert "more than 20 digits before the point" in converted.rejected[1].reason
    assert converted.table.column("_offset").to_pylist() == [100]
    with pytest.raises(ValueError, match="does not fit column sz"):
        records_to_table(TopicKind.TRADES, [too_fine], coords(1))
    # Trailing zeros past the scale are not a loss: they fit.
    assert decimal_fit_error("1.50000000000000000000000") is None


def test_books_are_one_row_per_level_change_and_a_heartbeat_is_one_row(shared_okx: Path) -> None:
    book = next(r for _, r in real_records(shared_okx) if isinstance(r, BookUpdate) and r.asks and r.bids)
    heartbeat = msgspec.structs.replace(book, action=BookAction.UPDATE, asks=(), bids=(), record_id="hb")
    table = through_parquet(records_to_table(TopicKind.BOOKS, [book, heartbeat], coords(2)))
    levels = len(book.asks) + len(book.bids)
    assert table.num_rows == levels + 1
    assert table.column("_offset").to_pylist() == [100] * levels + [101]
    assert table.column("side").to_pylist() == ["ask"] * len(book.asks) + ["bid"] * len(book.bids) + [None]
    assert table.column("px")[0].as_py() == Decimal(book.asks[0][0])
    assert table.column("numOrders")[0].as_py() == int(book.asks[0][3])
    assert table.column("isSnapshot").to_pylist() == [book.action is BookAction.SNAPSHOT] * levels + [False]
    assert [r for r, *_ in table_to_records(table)] == [canonical(book), heartbeat]


def test_timestamps_are_parquet_timestamps_and_coordinates_are_columns(shared_okx: Path) -> None:
    trade = next(r for _, r in real_records(shared_okx) if isinstance(r, Trade))
    table = through_parquet(records_to_table(TopicKind.TRADES, [trade], [Coordinates("okx.trades", 2, 7, 1234)]))
    assert (table.schema.field("ts").type, table.schema.field("recvTsNs").type) == (TS_MS, TS_NS)
    row = table.select(["_topic", "_partition", "_offset", "ts"]).to_pylist()[0]
    assert (row["_topic"], row["_partition"], row["_offset"]) == ("okx.trades", 2, 7)
    assert int(row["ts"].timestamp() * 1000) == trade.ts
    assert table.column("recvTsNs").cast(pa.int64())[0].as_py() == RECV_NS
    assert table.column("_kafka_ts").cast(pa.int64())[0].as_py() == 1234


def test_gaps_dead_letters_and_raw_frames_round_trip() -> None:
    gap = GapEvent(gap_id="g1", revision=2, kind=GapKind.TRADE_HOLE, status=GapStatus.FILLED, reason="hole",
                   channel="trades", inst_id="BTC-USDT", before=StreamPosition(ts=5, trade_id=10),
                   after=StreamPosition(ts=9, trade_id=20), detected_ts_ns=RECV_NS, records_filled=9)
    dead = DeadLetter(reason_code=DeadLetterReason.BAD_JSON, reason="not json", raw=b"\x00\xff", source=Source.WS,
                      recv_ts_ns=RECV_NS, record_id="d1")
    raw = RawFrames(conn_id=CONN, name="public-0", endpoint="public",
                    frames=(RawFrameEntry(recv_seq=1, recv_ts_ns=RECV_NS, payload=b'{"a":1}'),
                            RawFrameEntry(recv_seq=2, recv_ts_ns=RECV_NS + 1, payload=b"pong")))
    for kind, rec in ((TopicKind.GAPS, gap), (TopicKind.DLQ, dead), (TopicKind.RAW, raw)):
        table = through_parquet(records_to_table(kind, [rec], coords(1)))
        assert [r for r, *_ in table_to_records(table)] == [rec]


def test_every_record_type_has_a_schema() -> None:
    for cls in RECORD_TYPES:
        schema = arrow_schema(cls.TOPIC)
        assert {"_topic", "_partition", "_offset", "_kafka_ts"} <= set(schema.names)
        assert all(f.type != pa.float64() for f in schema)  # never floats


def test_partition_key_uses_the_exchange_date_and_files_are_named_by_coordinates(shared_okx: Path) -> None:
    trade = next(r for _, r in real_records(shared_okx) if isinstance(r, Trade))
    late = msgspec.structs.replace(trade, ts=1_764_633_599_999)  # 2025-12-01T23:59:59.999Z
    assert partition_key(late, kafka_ts_ms=1_764_633_600_500) == PartitionKey("trades", "2025-12-01", trade.inst_id)
    gap = GapEvent(gap_id="g", kind=GapKind.DISCONNECT, status=GapStatus.OPEN, reason="x", channel="trades",
                   detected_ts_ns=1)
    assert partition_key(gap, kafka_ts_ms=1_764_633_600_500) == PartitionKey("gaps", "2025-12-02", NO_INST_ID)
    name = file_name("okx.trades", 4, 17, 1_000_000)
    assert name == "okx.trades+4+00000000000000000017+00000000000001000000.parquet"
    assert parse_file_name(name) == ("okx.trades", 4, 17, 1_000_000)
    assert parse_file_name(".okx.trades+4+1+2.parquet.tmp") is None
    key = PartitionKey("books", "2026-12-01", "BTC-USDT-SWAP")
    assert key.path() == "books/date=2026-12-01/instId=BTC-USDT-SWAP"
    assert parse_partition_path("root/" + key.path()) == key


def test_a_file_written_before_a_field_was_added_reads_with_the_new_files(tmp_path: Path, shared_okx: Path) -> None:
    trades = [r for _, r in real_records(shared_okx) if isinstance(r, Trade)][:2]
    new = records_to_table(TopicKind.TRADES, trades[:1], coords(1))
    old = records_to_table(TopicKind.TRADES, trades[1:], coords(1, start=200)).drop_columns(["okxSource"])
    pq.write_table(old, tmp_path / "old.parquet")
    pq.write_table(new, tmp_path / "new.parquet")
    (old_rec, *_), = table_to_records(pq.read_table(tmp_path / "old.parquet"))
    assert old_rec == canonical(msgspec.structs.replace(trades[1], okx_source=None))
    frame = pl.scan_parquet(tmp_path / "*.parquet", missing_columns="insert").select("okxSource", "_offset").collect()
    assert sorted(frame.rows(), key=lambda r: r[1]) == [(trades[0].okx_source, 100), (None, 200)]
    rel = duckdb.sql(f"select okxSource, _offset from read_parquet('{tmp_path}/*.parquet', union_by_name=true) "
                     "order by _offset")
    assert rel is not None and rel.fetchall() == [(trades[0].okx_source, 100), (None, 200)]


@pytest.mark.parametrize("attrs", [
    ("inst_id", "ts=0, **__import__('os').environ, px"),  # anything but a field name is compiled into source
    ("inst_id", "no_such_field"), ("inst_id", "inst_id"), ("inst_id", "class"),
])
def test_the_generated_row_constructor_refuses_anything_but_the_records_own_field_names(attrs: tuple[str, ...]
                                                                                        ) -> None:
    """A real check (ValueError), not an assert that `python -O` strips before the names are exec'd."""
    from ingest.core.archive_schema import _maker

    with pytest.raises(ValueError, match="cannot build a constructor"):
        _maker(Trade, attrs)


def test_the_generated_row_constructor_builds_the_record_from_its_field_names(shared_okx: Path) -> None:
    from ingest.core.archive_schema import _maker

    trade = next(r for _, r in real_records(shared_okx) if isinstance(r, Trade))
    names = tuple(f.name for f in msgspec.structs.fields(Trade))
    assert _maker(Trade, names)(*msgspec.structs.astuple(trade)) == trade


def test_a_record_missing_a_required_value_is_rejected_by_convert_and_the_others_kept(shared_okx: Path) -> None:
    trades = [r for _, r in real_records(shared_okx) if isinstance(r, Trade)][:3]
    timeless = msgspec.structs.replace(trades[1], ts=None)  # a hand-built record: the wire cannot carry it
    got = convert(TopicKind.TRADES, [trades[0], timeless, trades[2]], coords(3))
    assert [(r.index, r.field) for r in got.rejected] == [(1, "ts")]
    assert got.table.column("recordId").to_pylist() == [trades[0].record_id, trades[2].record_id]
