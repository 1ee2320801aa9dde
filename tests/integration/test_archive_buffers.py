"""The archiver's buffers against the real broker: what they really hold in memory stays within what the shared
budget counts, whatever the number of instruments, and an idle instrument's file closes by record time."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import msgspec
from aiokafka import AIOKafkaProducer

from ingest.core.avro import RecordEncoder
from ingest.core.records import BookAction, BookUpdate, Record, Source
from ingest.io.archive_store import ArchiveStore
from ingest.services.archive import Archiver
from tests.conftest import BrokerInfo
from tests.integration.test_archive import DAY1, publish, running, settings_for, trade, until


async def publish_to_partition_0(bootstrap: str, prefix: str, records: Sequence[Record]) -> None:
    """Into one Kafka partition, whatever the topic's partition count (idle closing goes per partition)."""
    encoder = RecordEncoder(prefix)
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all")
    await producer.start()
    try:
        for record in records:
            e = encoder.encode(record)
            await producer.send(e.topic, e.value, key=e.key, headers=list(e.headers), timestamp_ms=e.ts_ms,
                                partition=0)
        await producer.flush()
    finally:
        await producer.stop()


def deep_size(obj: Any, seen: set[int]) -> int:
    """Bytes of `obj` and of everything it references, each object counted once."""
    if id(obj) in seen:
        return 0
    seen.add(id(obj))
    size = sys.getsizeof(obj)
    if isinstance(obj, msgspec.Struct):
        size += sum(deep_size(getattr(obj, f), seen) for f in obj.__struct_fields__)
    elif isinstance(obj, tuple | list):
        size += sum(deep_size(x, seen) for x in obj)
    elif isinstance(obj, dict):
        size += sum(deep_size(k, seen) + deep_size(v, seen) for k, v in obj.items())
    return size


def deep_book(inst: str, i: int, levels: int) -> BookUpdate:
    asks = tuple((f"{100 + j}.{i % 7}", f"{j + 1}.25", "0", str(j % 5 + 1)) for j in range(levels))
    bids = tuple((f"{99 - j}.{i % 7}", f"{j + 2}.5", "0", str(j % 3 + 1)) for j in range(levels))
    return BookUpdate(channel="books", inst_id=inst, ts=DAY1 + i, recv_ts_ns=(DAY1 + i) * 1_000_000,
                      source=Source.WS, record_id=f"b:{inst}:{i}", action=BookAction.SNAPSHOT, asks=asks, bids=bids,
                      seq_id=i + 1, prev_seq_id=-1, checksum=0)


async def test_what_the_buffers_hold_in_memory_stays_within_what_the_budget_counts(
        kafka_broker: BrokerInfo, topic_prefix: str, tmp_path: Path) -> None:
    """The budget (`archive.max_buffer_bytes`) caps counted bytes; this proves the count is not an
    underestimate of the real Python objects held, for 1,000 instruments of trades and deep books alike."""
    records: list[Record] = [trade(f"I{i:04d}-USDT", j, DAY1 + j) for j in range(3) for i in range(1000)]
    records += [deep_book(f"I{i:04d}-USDT", i, 50) for i in range(0, 1000, 10)]
    await publish(kafka_broker.bootstrap_servers, topic_prefix, records)
    root = tmp_path / "archive"
    # Nothing closes (a frozen clock, idle and open limits far away): every record stays buffered, to measure.
    settings = settings_for(kafka_broker, topic_prefix, str(root), idle_close_s=1e9, max_open_s=1e9,
                            max_buffer_bytes=1 << 40, drain_timeout_s=60)
    archiver = Archiver(settings, ArchiveStore.from_url(str(root)), clock=lambda: 0.0)
    async with running(archiver):
        await until(lambda: archiver.stats.records_in >= len(records), timeout_s=110, what="every record buffered")
        bufs = list(archiver._bufs.values())
        assert archiver.stats.open_files == 1000 * 2 // 2 + 100 and not list(root.rglob("*.parquet"))
        seen: set[int] = set()
        held = sum(deep_size(b.items, seen) + deep_size(b.coords, seen) for b in bufs)
        counted = archiver.stats.buffered_bytes
    assert held <= counted, f"buffers hold {held} bytes, the budget counts {counted}"
    assert counted <= 4 * held  # and not so pessimistic that the budget would mean little


async def test_an_idle_instruments_file_closes_by_record_time_while_others_keep_arriving(
        kafka_broker: BrokerInfo, topic_prefix: str, tmp_path: Path) -> None:
    """Closing goes by exchange/receive time too, not only the wall clock: an instrument that has had nothing
    for `idle_close_s` of its partition's record time closes its file, even when a backlog is read in an
    instant (here the wall clock is frozen, so only record time can close it)."""
    idle = [trade("IDLE-USDT", i, DAY1 + i) for i in range(3)]
    busy = [trade("BUSY-USDT", i, DAY1 + 1000 * i) for i in range(3, 40)]  # 37 s more of record time
    await publish_to_partition_0(kafka_broker.bootstrap_servers, topic_prefix, idle + busy)
    root = tmp_path / "archive"
    settings = settings_for(kafka_broker, topic_prefix, str(root), idle_close_s=30, max_open_s=1e9)
    archiver = Archiver(settings, ArchiveStore.from_url(str(root)), clock=lambda: 0.0)
    idle_dir = root / "trades" / "date=2026-12-01" / "instId=IDLE-USDT"
    busy_dir = root / "trades" / "date=2026-12-01" / "instId=BUSY-USDT"
    async with running(archiver):
        await until(lambda: archiver.stats.records_in >= len(idle) + len(busy) and any(idle_dir.glob("*.parquet")),
                    what="the idle instrument's file")
        assert not list(busy_dir.glob("*.parquet")) and archiver.stats.open_files == 1  # still open: not idle
    assert len(list(busy_dir.glob("*.parquet"))) == 1  # written by the drain at stop
