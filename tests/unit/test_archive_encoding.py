"""The archive's Parquet encodings: delta where it pays, read back exactly by DuckDB, Polars and pyarrow, and the
size it buys against the same records zstd-compressed the way Kafka stores them."""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path

import duckdb
import polars as pl
import pyarrow.parquet as pq
import zstandard

from bench.archive_bench import books, trades
from ingest.core.archive_schema import Coordinates, convert
from ingest.core.avro import RecordEncoder
from ingest.core.records import Record, TopicKind
from ingest.io.archive_store import parquet_bytes


def write(tmp_path: Path, kind: TopicKind, records: list[Record], name: str) -> Path:
    coords = [Coordinates(f"okx.{kind.value}", 0, i, getattr(r, "ts", 0)) for i, r in enumerate(records)]
    path = tmp_path / name
    path.write_bytes(parquet_bytes(convert(kind, records, coords).table))
    return path


def encodings(path: Path) -> dict[str, set[str]]:
    meta = pq.ParquetFile(path).metadata
    out: dict[str, set[str]] = {}
    for rg in range(meta.num_row_groups):
        for c in range(meta.num_columns):
            col = meta.row_group(rg).column(c)
            out.setdefault(col.path_in_schema, set()).update(col.encodings)
    return out


def test_times_offsets_and_ids_are_delta_encoded_and_read_back_exactly(tmp_path: Path) -> None:
    sample = trades(5_000)
    path = write(tmp_path, TopicKind.TRADES, list(sample), "t.parquet")
    enc = encodings(path)
    for col in ("ts", "recvTsNs", "recvSeq", "_offset", "_kafka_ts"):
        assert "DELTA_BINARY_PACKED" in enc[col], (col, enc[col])
    assert "DELTA_BYTE_ARRAY" in enc["recordId"] and "DELTA_BYTE_ARRAY" in enc["tradeId"]
    assert any("DICTIONARY" in e for e in enc["side"])  # low-cardinality strings keep their dictionary
    total_sz = sum(Decimal(t.sz) for t in sample)
    rel = duckdb.sql(f"select count(*), sum(sz), max(ts), sum(_offset), min(tradeId) from read_parquet('{path}')")
    assert rel is not None
    n, sz, _, offsets, first_id = rel.fetchall()[0]
    assert (n, sz, offsets, first_id) == (len(sample), total_sz, sum(range(len(sample))), sample[0].trade_id)
    frame = pl.read_parquet(path)
    assert frame["recordId"].to_list() == [t.record_id for t in sample]
    assert frame["recvSeq"].to_list() == [t.recv_seq for t in sample]
    assert pq.read_table(path).column("recvTsNs").cast("int64").to_pylist() == [t.recv_ts_ns for t in sample]


def test_an_archived_day_of_trades_is_at_most_1_5x_its_zstd_kafka_values(tmp_path: Path) -> None:
    """Files of an instrument-hour, as the archiver writes them, against the Avro values in 1 MB zstd batches
    (level 3, as the producer's compression_type=zstd; keys and headers not counted, which favours Kafka)."""
    sample = trades(40_000)
    hours: dict[tuple[str, int], list[Record]] = {}
    for t in sample:
        hours.setdefault((t.inst_id, t.ts // 3_600_000), []).append(t)
    archive = sum(write(tmp_path, TopicKind.TRADES, rs, f"{i}.parquet").stat().st_size
                  for i, rs in enumerate(hours.values()))
    encoder = RecordEncoder("okx.")
    values = [encoder.encode(t).value for t in sample]
    kafka, batch = 0, bytearray()
    for v in values:
        batch += v
        if len(batch) >= 1 << 20:
            kafka += len(zstandard.ZstdCompressor(level=3).compress(bytes(batch)))
            batch.clear()
    kafka += len(zstandard.ZstdCompressor(level=3).compress(bytes(batch)))
    assert archive <= 1.5 * kafka, f"archive {archive} B is {archive / kafka:.2f}x the zstd values ({kafka} B)"


def test_book_levels_read_back_through_the_delta_encoded_columns(tmp_path: Path) -> None:
    sample = books(200)
    path = write(tmp_path, TopicKind.BOOKS, list(sample), "b.parquet")
    levels = sum(len(b.asks) + len(b.bids) or 1 for b in sample)
    rel = duckdb.sql(f"select count(*), count(distinct _offset), sum(seqId) from read_parquet('{path}')")
    assert rel is not None
    n, records, _ = rel.fetchall()[0]
    assert (n, records) == (levels, len(sample))
    assert "DELTA_BINARY_PACKED" in encodings(path)["seqId"]
