"""Support for the replay end-to-end tests: Kafka contents with their coordinates, and an archive of them.

`write_archive` lays files out as docs/ARCHIVE.md and CONTRACT say (`{dataset}/date=/instId=/{topic}+{partition}+
{first}+{last}.parquet`) through the archive's own pure mapping (`ingest.core.archive_schema`), so the replay
archive source is tested on the real file format; the archive service itself is tested on its own.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
from pathlib import Path

import pyarrow.parquet as pq
from aiokafka import AIOKafkaConsumer
from aiokafka.structs import TopicPartition

from ingest.core.archive_schema import Coordinates, file_name, partition_key, records_to_table
from ingest.core.avro import decode
from ingest.core.records import Record, TopicKind, topic_name

Located = tuple[Record, Coordinates]


async def read_located(bootstrap: str, prefix: str, kind: TopicKind, timeout_s: float = 30.0) -> list[Located]:
    """Every record of a topic with its Kafka coordinates, read to the end of every partition."""
    topic = topic_name(prefix, kind)
    out: list[Located] = []
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False, group_id=None)
    async with asyncio.timeout(timeout_s):
        await consumer.start()
        try:
            parts = consumer.partitions_for_topic(topic)
            if not parts:
                return out
            tps = [TopicPartition(topic, p) for p in sorted(parts)]
            consumer.assign(tps)
            await consumer.seek_to_beginning(*tps)
            ends = await consumer.end_offsets(tps)
            for tp in tps:
                while True:  # the embedded broker's end lags its last batch: read until a fetch is empty
                    batch = await consumer.getmany(tp, timeout_ms=300)
                    msgs = batch.get(tp) or []
                    if not msgs and await consumer.position(tp) >= ends[tp]:
                        break
                    for m in msgs:
                        out.append((decode(m.value), Coordinates(topic, tp.partition, m.offset, m.timestamp)))
        finally:
            await consumer.stop()
    return out


def write_archive(root: Path, kind: TopicKind, located: list[Located]) -> list[Path]:
    """Archive files of `located` (one topic), one per (dataset, date, instId, partition), in offset order."""
    groups: dict[tuple[str, int], list[Located]] = defaultdict(list)
    for rec, coord in located:
        key = partition_key(rec, coord.kafka_ts_ms)
        groups[(key.path(), coord.partition)].append((rec, coord))
    written = []
    for (path, _), items in sorted(groups.items()):
        items.sort(key=lambda x: x[1].offset)
        table = records_to_table(kind, [r for r, _ in items], [c for _, c in items])
        first, last = items[0][1], items[-1][1]
        target = root / path / file_name(first.topic, first.partition, first.offset, last.offset)
        target.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(table, target)
        written.append(target)
    return written
