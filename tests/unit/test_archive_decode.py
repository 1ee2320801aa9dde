"""The archive's column-wise decode (the replay item path) gives exactly the records of the row-by-row one and of
the records written: shared decimals, enums per distinct value, columns left to the fields' defaults, book levels
sliced per record, and the fallback for a layout `convert` never writes."""

from __future__ import annotations

import io
from typing import Any

import msgspec
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ingest.core import archive_schema
from ingest.core.archive_schema import Coordinates, records_to_table, table_records, table_to_records
from ingest.core.records import BookAction, BookLevel, BookUpdate, Record, Source, Ticker, TopicKind, Trade
from ingest.core.replay import canonical, sort_key
from ingest.replay._archive import _sort_keys

T0 = 1_796_000_000_000
# Few distinct values, so a column repeats them (each rendered once); zero and values below 1e-6 are the ones
# Arrow renders with an exponent; "" is OKX's "no value".
PRICES = ("30000.1", "30000.10", "0", "0.0000001", "1.5e-7", "123456789012345678.123456789012345678", "7")
SIZES = ("0.5", "1", "0", "2.000", "0.00000001", "")


def through_parquet(table: pa.Table) -> pa.Table:
    buf = io.BytesIO()
    pq.write_table(table, buf)
    buf.seek(0)
    return pq.read_table(buf)


def coords(n: int) -> list[Coordinates]:
    return [Coordinates("okx.x", 1, 100 + i, T0 + i) for i in range(n)]


def by_row(table: pa.Table, cls: type[Record]) -> list[Record]:
    """The generic decode: one constructor call with every present column per record."""
    present = [f for f in archive_schema._FIELDS[cls] if f.name in table.column_names]
    if cls is BookUpdate:
        return archive_schema._books_by_row(table, present)
    return archive_schema._records_by_row(table, cls, present)


def column(values: st.SearchStrategy[Any]) -> st.SearchStrategy[list[Any]]:
    """A column's values, cycled over the rows: all null, one constant (all default or all equal), or mixed."""
    return st.one_of(st.just([None]), values.map(lambda v: [v]),
                     st.lists(st.one_of(st.none(), values), min_size=2, max_size=4))


@st.composite
def trades(draw: st.DrawFn) -> list[Trade]:
    n = draw(st.integers(1, 150))
    exchange = draw(st.sampled_from(["okx", "okx", "other"]))
    optional = {attr: draw(column(values)) for attr, values in (
        ("inst_type", st.sampled_from(["SPOT", "SWAP"])), ("conn_id", st.sampled_from(["public-0#1", "p-1#2"])),
        ("count", st.sampled_from(["1", "3", ""])), ("okx_source", st.sampled_from(["0", "1"])),
        ("event_key", st.just("trades-all:BTC-USDT:1")), ("recv_seq", st.integers(0, 1 << 40)),
        ("seq_id", st.integers(0, 1 << 40)))}
    extra = draw(st.sampled_from([{}, {"k": "v"}, None]))
    px = draw(st.lists(st.sampled_from((*PRICES, "")), min_size=1, max_size=5))
    sz = draw(st.lists(st.sampled_from(SIZES), min_size=1, max_size=5))
    source = draw(st.sampled_from([[Source.WS], [Source.WS, Source.REST]]))
    out = []
    for i in range(n):
        kwargs = {attr: picks[i % len(picks)] for attr, picks in optional.items() if picks[i % len(picks)] is not None}
        if exchange != "okx" or i % 2:
            kwargs["exchange"] = exchange
        out.append(Trade(channel="trades-all" if i % 3 else "trades", inst_id="BTC-USDT", ts=T0 + i // 2,
                         recv_ts_ns=(T0 + i) * 1_000_000, source=source[i % len(source)], record_id=f"r{i}",
                         trade_id=str(i), px=px[i % len(px)], sz=sz[i % len(sz)], side="buy" if i % 2 else "sell",
                         extra=extra if extra is not None else {"i": str(i)} if i % 2 else {}, **kwargs))
    return out


@st.composite
def books(draw: st.DrawFn) -> list[BookUpdate]:
    n = draw(st.integers(1, 60))
    level = st.tuples(st.sampled_from(PRICES), st.sampled_from(SIZES[:-1]), st.sampled_from(["0", "2"]),
                      st.sampled_from(["0", "1", "12"]))
    sides = st.lists(level, max_size=4).map(as_levels)
    out = []
    for i in range(n):
        action = draw(st.sampled_from(list(BookAction)))
        out.append(BookUpdate(channel="books", inst_id="BTC-USDT", ts=T0 + i, recv_ts_ns=(T0 + i) * 1_000_000,
                              source=Source.WS, record_id=f"b{i}", action=action, asks=draw(sides),
                              bids=draw(sides), seq_id=draw(st.none() | st.integers(1, 99)), prev_seq_id=i,
                              checksum=draw(st.none() | st.integers(-5, 5))))
    return out


def as_levels(levels: list[tuple[str, str, str, str]]) -> tuple[BookLevel, ...]:
    return tuple(levels)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(trades())
def test_trades_decoded_by_columns_equal_the_row_by_row_decode_and_the_records_written(records: list[Trade]
                                                                                        ) -> None:
    table = through_parquet(records_to_table(TopicKind.TRADES, records, coords(len(records))))
    decoded, heads = table_records(table)
    assert decoded == by_row(table, Trade) == [canonical(r) for r in records]
    assert heads.num_rows == len(decoded)
    # A default `extra` is each record's own dict, never one shared by all (mutating one changes no other).
    assert len({id(r.extra) for r in decoded if isinstance(r, Trade)}) == len(decoded)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(books())
def test_books_decoded_by_columns_equal_the_row_by_row_decode_and_the_records_written(records: list[BookUpdate]
                                                                                       ) -> None:
    table = through_parquet(records_to_table(TopicKind.BOOKS, records, coords(len(records))))
    decoded, heads = table_records(table)
    assert decoded == by_row(table, BookUpdate) == [canonical(r) for r in records]
    assert heads.column("_offset").to_pylist() == [c.offset for c in coords(len(records))]


def test_book_rows_with_bids_before_asks_still_give_each_side_in_row_order() -> None:
    """A layout `convert` never writes (another writer's file): the decode falls back to the generic path."""
    book = BookUpdate(channel="books", inst_id="BTC-USDT", ts=T0, recv_ts_ns=T0 * 1_000_000, source=Source.WS,
                      record_id="b", action=BookAction.SNAPSHOT, asks=(("2", "1", "0", "1"), ("3", "1", "0", "1")),
                      bids=(("1", "1", "0", "1"), ("0.5", "1", "0", "1")), seq_id=5, prev_seq_id=-1)
    table = records_to_table(TopicKind.BOOKS, [book], coords(1))
    swapped = table.take(pa.array([2, 0, 3, 1]))  # bid, ask, bid, ask
    assert pc.equal(swapped.column("side"), "bid")[0].as_py()
    assert [r for r, *_ in table_to_records(swapped)] == [book]


def test_a_column_older_files_lack_takes_the_fields_default_in_a_unified_read() -> None:
    trade = Trade(channel="trades", inst_id="BTC-USDT", ts=T0, recv_ts_ns=T0 * 1_000_000, source=Source.WS,
                  record_id="r", trade_id="1", px="1", sz="2", side="buy", okx_source="0", exchange="okx")
    table = records_to_table(TopicKind.TRADES, [trade, trade], coords(2))
    names = {"exchange": pa.nulls(2, pa.string()), "okxSource": pa.nulls(2, pa.string())}
    for name, nulls in names.items():  # what a dataset scan gives for a column one file lacks
        table = table.set_column(table.column_names.index(name), name, nulls)
    expected = msgspec.structs.replace(trade, okx_source=None)
    assert table_records(table)[0] == by_row(table, Trade) == [expected, expected]


def test_a_decimal_column_of_empty_strings_comes_back_as_empty_strings_not_the_default() -> None:
    """All null in Parquet, but `_empty` names it: "" (OKX's "no value"), which the None default is not."""
    tickers = [Ticker(channel="tickers", inst_id="BTC-USDT", ts=T0 + i, recv_ts_ns=T0 * 1_000_000, source=Source.WS,
                      record_id=f"t{i}", last="", bid_px=None, ask_px="" if i % 2 else None, ask_sz="1.50")
               for i in range(70)]
    table = through_parquet(records_to_table(TopicKind.TICKERS, tickers, coords(len(tickers))))
    assert table.column("last").null_count == table.column("askPx").null_count == len(tickers)
    decoded, _ = table_records(table)
    assert decoded == by_row(table, Ticker) == [canonical(t) for t in tickers]
    assert {(t.last, t.bid_px, t.ask_sz) for t in decoded if isinstance(t, Ticker)} == {("", None, "1.5")}


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(trades(), books())
def test_sort_keys_from_the_columns_equal_each_records_own_sort_key(trade_records: list[Trade],
                                                                    book_records: list[BookUpdate]) -> None:
    for kind, records in ((TopicKind.TRADES, trade_records), (TopicKind.BOOKS, book_records)):
        table = through_parquet(records_to_table(kind, records, coords(len(records))))
        decoded, heads = table_records(table)
        coordinates = [(c.topic, c.partition, c.offset) for c in coords(len(records))]
        assert list(_sort_keys(decoded, heads, kind)) == [sort_key(r, *c) for r, c in zip(decoded, coordinates,
                                                                                           strict=True)]
