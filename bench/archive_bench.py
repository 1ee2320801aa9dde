"""Archive throughput, read-back speed and size, each against a baseline measured in the same run.

`.venv/bin/python -m bench.archive_bench [--trades N] [--books N] [--runs N]` (docs/PERFORMANCE.md, "Archive").
- archiving: the real `Archiver` (consumer group, decode, conversion, Parquet, fsync + rename, manifests,
  commits) consuming N published records from the embedded broker into a local directory, as records per
  second of this process's CPU time, against a bare aiokafka consume + Avro decode of the same records;
- reading back: DuckDB scanning the day of archived trades (rows/s) against pyarrow reading the same files;
- size: the archive's bytes against the same records' Avro values zstd-compressed in 1 MB batches, as the
  Kafka producer's `compression_type=zstd` would.
The broker runs in its own process, so its CPU is not counted on either side.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import duckdb
import pyarrow.dataset as pads
import zstandard
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.structs import TopicPartition

from ingest.config import Settings
from ingest.core.avro import RecordEncoder, decode
from ingest.core.records import BookAction, BookLevel, BookUpdate, Record, Source, Trade
from ingest.io.archive_store import ArchiveStore
from ingest.io.broker import EmbeddedBroker
from ingest.services.archive import Archiver

DAY = 1_796_083_200_000  # 2026-12-01T00:00:00Z
INSTS = ("BTC-USDT", "ETH-USDT", "SOL-USDT", "XRP-USDT")
KAFKA_BATCH = 1024 * 1024  # producer batch.size-like unit for the zstd comparison
ZSTD_LEVEL = 3  # zstd's default level, which the Kafka producers use


def trades(n: int) -> list[Trade]:
    """`n` trades spread over one UTC day, round-robin over the instruments; prices a random walk of one tick
    (0.1) per trade, as real trade prices move (uniform random prices would be a worst case for every codec)."""
    rnd = random.Random(1)
    step = 86_400_000 // max(n, 1)
    ticks = [600_000] * len(INSTS)
    walk: list[int] = []
    for i in range(n):
        ticks[i % len(INSTS)] += rnd.choice((-1, 0, 0, 1))
        walk.append(ticks[i % len(INSTS)])
    return [Trade(channel="trades-all", inst_id=INSTS[i % len(INSTS)], ts=DAY + i * step,
                  recv_ts_ns=(DAY + i * step) * 1_000_000 + rnd.randrange(10**6), source=Source.WS,
                  conn_id="public-0#1", recv_seq=i, record_id=f"public-0#1:{i}:0", trade_id=str(500_000_000 + i),
                  px=f"{walk[i] / 10:.1f}", sz=f"{rnd.randrange(1, 99_999) / 100_000:.5f}",
                  side="buy" if rnd.random() < 0.5 else "sell") for i in range(n)]


def books(n: int) -> list[BookUpdate]:
    """One 400-level snapshot per instrument, then `n` small updates (2 bids, 1 ask) spread over the day."""
    rnd = random.Random(2)
    step = 86_400_000 // max(n, 1)
    out: list[BookUpdate] = []
    for inst in INSTS[:2]:
        bids: tuple[BookLevel, ...] = tuple((f"{59000 - k / 10:.1f}", "1.5", "0", "2") for k in range(400))
        asks: tuple[BookLevel, ...] = tuple((f"{59100 + k / 10:.1f}", "0.7", "0", "1") for k in range(400))
        out.append(BookUpdate(channel="books", inst_id=inst, ts=DAY, recv_ts_ns=DAY * 1_000_000, source=Source.WS,
                              record_id=f"b:{inst}:0", action=BookAction.SNAPSHOT, bids=bids, asks=asks,
                              seq_id=1, prev_seq_id=-1, checksum=0))

    def lv(lo: int) -> BookLevel:
        return (f"{lo + rnd.randrange(400) / 10:.1f}", f"{rnd.randrange(0, 500) / 100}", "0", str(rnd.randrange(5)))

    for i in range(n):
        ts = DAY + i * step
        out.append(BookUpdate(channel="books", inst_id=INSTS[i % 2], ts=ts, recv_ts_ns=ts * 1_000_000,
                              source=Source.WS, record_id=f"b:{i}", action=BookAction.UPDATE,
                              bids=(lv(59000), lv(59000)), asks=(lv(59100),), seq_id=i // 2 + 2,
                              prev_seq_id=i // 2 + 1, checksum=0))
    return out


@dataclass
class RunFigures:
    """One run's measurements."""

    base_rps: float  # bare consume + decode, records per CPU second
    arch_rps: float  # the Archiver, records per CPU second
    arch_wall_s: float
    duck_rows_s: float
    pa_rows_s: float
    archive_bytes: int
    trades_archive_bytes: int
    zstd_bytes: int
    trades_zstd_bytes: int
    avro_bytes: int
    rows_total: int
    trade_files: int
    rows: int


async def publish(bootstrap: str, prefix: str, records: list[Record]) -> dict[str, list[bytes]]:
    """Publish with the recorder's encoder; returns the encoded values per topic (for the size figure)."""
    encoder = RecordEncoder(prefix)
    values: dict[str, list[bytes]] = {}
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=20, compression_type="zstd",
                                max_batch_size=KAFKA_BATCH, max_request_size=4 * KAFKA_BATCH)
    await producer.start()
    try:
        for rec in records:
            e = encoder.encode(rec)
            values.setdefault(e.topic, []).append(e.value)
            await producer.send(e.topic, e.value, key=e.key, headers=list(e.headers), timestamp_ms=e.ts_ms)
        await producer.flush()
    finally:
        await producer.stop()
    return values


def zstd_batched(values: list[bytes]) -> int:
    """Bytes of `values` compressed the way a producer batch is: concatenated up to 1 MB, one frame each."""
    cctx = zstandard.ZstdCompressor(level=ZSTD_LEVEL)
    total, batch, size = 0, [], 0
    for v in values:
        batch.append(v)
        size += len(v)
        if size >= KAFKA_BATCH:
            total += len(cctx.compress(b"".join(batch)))
            batch, size = [], 0
    if batch:
        total += len(cctx.compress(b"".join(batch)))
    return total


async def cpu_of(fn: Callable[[], Awaitable[int]]) -> tuple[float, float, int]:
    """(process CPU seconds, wall seconds, count) of one call."""
    c0, w0 = time.process_time(), time.perf_counter()
    n = await fn()
    return time.process_time() - c0, time.perf_counter() - w0, n


async def bare_consume(bootstrap: str, topics: list[str], n: int) -> int:
    """The floor: fetch every record of `topics` and decode it, nothing else."""
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=None, auto_offset_reset="earliest")
    await consumer.start()
    count = 0
    try:
        tps = [TopicPartition(t, p) for t in topics for p in sorted(consumer.partitions_for_topic(t) or set())]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        while count < n:
            batch = await consumer.getmany(timeout_ms=1000, max_records=10_000)
            if not batch:
                break
            for msgs in batch.values():
                for m in msgs:
                    assert m.value is not None
                    decode(m.value)
                    count += 1
    finally:
        await consumer.stop()
    return count


async def archive(bootstrap: str, prefix: str, root: Path, n: int) -> int:
    """The real Archiver from the group's start until every record is in a durable file and committed."""
    settings = Settings.model_validate({
        "kafka": {"bootstrap_servers": bootstrap, "topic_prefix": prefix},
        "archive": {"url": str(root), "group_id": f"{prefix}archive", "idle_close_s": 0.2, "metrics_port": 0},
        "obs": {"metrics_port": 0}})
    archiver = Archiver(settings, ArchiveStore.from_url(str(root)))
    stop = asyncio.Event()
    task = asyncio.create_task(archiver.run(stop))
    s = archiver.stats
    deadline = time.monotonic() + 600
    try:
        while not (s.records_in >= n and s.open_files == 0 and s.last_commit):
            if task.done() or time.monotonic() > deadline:
                raise RuntimeError(f"archiver stopped or stalled at {s.records_in}/{n} records")
            await asyncio.sleep(0.02)  # polling the archiver's progress (a benchmark, not a test)
    finally:
        stop.set()
        async with asyncio.timeout(60):
            await task
    return s.records_written


def read_back(root: Path) -> tuple[float, float, int]:
    """(DuckDB rows/s, pyarrow rows/s, rows) over the day of trades, fastest of 3 each."""
    files = sorted(str(p) for p in (root / "trades").rglob("*.parquet"))
    glob = f"{root}/trades/**/*.parquet"
    sql = (f"select count(*), sum(px), sum(sz), max(ts), count(distinct tradeId) from read_parquet('{glob}', "
           "hive_partitioning=true) where date='2026-12-01'")

    def duck() -> int:
        rel = duckdb.sql(sql)
        assert rel is not None
        return int(rel.fetchall()[0][0])

    def arrow() -> int:
        return int(pads.dataset(files, format="parquet").to_table().num_rows)

    def best(fn: Callable[[], int]) -> tuple[float, int]:
        t, n = float("inf"), 0
        for _ in range(3):
            t0 = time.perf_counter()
            n = fn()
            t = min(t, time.perf_counter() - t0)
        return t, n

    d_s, d_n = best(duck)
    a_s, a_n = best(arrow)
    if d_n != a_n:
        raise RuntimeError(f"DuckDB saw {d_n} rows, pyarrow {a_n}")
    return d_n / d_s, a_n / a_s, d_n


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*.parquet"))


async def one_run(broker: EmbeddedBroker, run: int, n_trades: int, n_books: int) -> RunFigures:
    prefix = f"bench{run}-{time.time_ns() % 10**9}."
    records: list[Record] = [*trades(n_trades), *books(n_books)]
    values = await publish(broker.bootstrap_servers, prefix, records)
    topics = sorted(values)
    n = len(records)
    base_cpu, _, got = await cpu_of(lambda: bare_consume(broker.bootstrap_servers, topics, n))
    if got != n:
        raise RuntimeError(f"the bare consumer saw {got} of {n} records")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        arch_cpu, arch_wall, written = await cpu_of(lambda: archive(broker.bootstrap_servers, prefix, root, n))
        if written != n:
            raise RuntimeError(f"the archiver wrote {written} of {n} records")
        duck_rps, pa_rps, rows = read_back(root)
        if rows != n_trades:
            raise RuntimeError(f"{rows} trade rows read back, {n_trades} published")
        return RunFigures(
            base_rps=n / base_cpu, arch_rps=n / arch_cpu, arch_wall_s=arch_wall, duck_rows_s=duck_rps,
            pa_rows_s=pa_rps, archive_bytes=dir_bytes(root), trades_archive_bytes=dir_bytes(root / "trades"),
            zstd_bytes=sum(zstd_batched(v) for v in values.values()),
            trades_zstd_bytes=zstd_batched(values[f"{prefix}trades"]), rows=rows,
            avro_bytes=sum(len(v) for vs in values.values() for v in vs), rows_total=n,
            trade_files=len(list((root / "trades").rglob("*.parquet"))))


def report(runs: list[RunFigures], n: int) -> None:
    def med(key: Callable[[RunFigures], float]) -> float:
        return statistics.median(key(r) for r in runs)

    def rng(key: Callable[[RunFigures], float], fmt: str = ",.0f") -> str:
        vals = [key(r) for r in runs]
        return f"[{min(vals):{fmt}}-{max(vals):{fmt}}]"

    print(f"\nmedians of {len(runs)} runs, {n:,} records each ([min-max]):")
    print(f"archiving: bare aiokafka consume + decode {med(lambda r: r.base_rps):,.0f} records/CPU-s "
          f"{rng(lambda r: r.base_rps)} (baseline)")
    print(f"archiving: Archiver {med(lambda r: r.arch_rps):,.0f} records/CPU-s {rng(lambda r: r.arch_rps)} = "
          f"{med(lambda r: r.arch_rps / r.base_rps):.3f}x baseline {rng(lambda r: r.arch_rps / r.base_rps, '.3f')}; "
          f"wall {med(lambda r: r.arch_wall_s):.1f} s; target >= 200,000/CPU-s")
    print(f"writing: {med(lambda r: r.rows_total / r.arch_wall_s):,.0f} records/s wall "
          f"{rng(lambda r: r.rows_total / r.arch_wall_s)}, "
          f"Parquet {med(lambda r: r.archive_bytes / r.arch_wall_s) / 1e6:.2f} MB/s from "
          f"{med(lambda r: r.avro_bytes / r.arch_wall_s) / 1e6:.2f} MB/s of Avro values "
          f"({runs[0].trade_files} trade files for the day)")
    print(f"reading: pyarrow dataset read {med(lambda r: r.pa_rows_s):,.0f} rows/s {rng(lambda r: r.pa_rows_s)} "
          "(baseline)")
    print(f"reading: DuckDB scan {med(lambda r: r.duck_rows_s):,.0f} rows/s {rng(lambda r: r.duck_rows_s)} = "
          f"{med(lambda r: r.duck_rows_s / r.pa_rows_s):.3f}x baseline ({runs[0].rows:,} trade rows)")
    print(f"size: trades archive {runs[0].trades_archive_bytes:,} B vs zstd values {runs[0].trades_zstd_bytes:,} B "
          f"= {med(lambda r: r.trades_archive_bytes / r.trades_zstd_bytes):.3f}x; target <= 1.5x")
    print(f"size: whole archive {runs[0].archive_bytes:,} B vs zstd values {runs[0].zstd_bytes:,} B "
          f"= {med(lambda r: r.archive_bytes / r.zstd_bytes):.3f}x")


async def amain(n_trades: int, n_books: int, n_runs: int) -> None:
    broker = EmbeddedBroker()
    await broker.start()
    try:
        runs: list[RunFigures] = []
        for i in range(n_runs):
            r = await one_run(broker, i, n_trades, n_books)
            print(f"run {i + 1}: base {r.base_rps:,.0f}/CPU-s, archiver {r.arch_rps:,.0f}/CPU-s "
                  f"({r.arch_rps / r.base_rps:.3f}x, wall {r.arch_wall_s:.1f} s), DuckDB {r.duck_rows_s:,.0f} rows/s, "
                  f"pyarrow {r.pa_rows_s:,.0f} rows/s, size {r.trades_archive_bytes / r.trades_zstd_bytes:.3f}x",
                  flush=True)
            runs.append(r)
        report(runs, n_trades + n_books + 2)
    finally:
        await broker.stop()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--trades", type=int, default=200_000)
    p.add_argument("--books", type=int, default=50_000, help="book updates (plus one snapshot per instrument)")
    p.add_argument("--runs", type=int, default=3)
    args = p.parse_args()
    asyncio.run(amain(args.trades, args.books, args.runs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
