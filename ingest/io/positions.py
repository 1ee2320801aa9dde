"""The compacted `<prefix>positions` topic: per-stream positions of cluster mode, in Kafka rather than on one
replica's disk, so a replica taking a shard over knows exactly where its predecessor stopped.

Keyed by stream (`core.cluster.position_key`), JSON values (`core.cluster.encode_position`); compaction keeps the
latest position of every stream. Written with its own producer, each write awaited: the owner writes a position
only once the records before it are acknowledged, and the position itself is acknowledged before it counts.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterable
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from ingest.config import KafkaSettings
from ingest.core.cluster import StreamPosition, decode_position, encode_position, position_key
from ingest.io.aiokafka_compat import assign_whole_topic
from ingest.io.kafka_security import kafka_client_kwargs
from ingest.okx.channels import SubArg

log = logging.getLogger(__name__)

_TOPIC_EXISTS = 36
#: Compaction keeps each stream's latest position; a day's lag leaves every write readable for a while first.
TOPIC_CONFIG = {"cleanup.policy": "compact", "min.compaction.lag.ms": str(86_400_000)}


class PositionStore:
    """Read and write stream positions on `<prefix>positions` (`start` creates the topic when missing)."""

    def __init__(self, kafka: KafkaSettings, *, bootstrap_servers: str | None = None, client_id: str | None = None
                 ) -> None:
        self.kafka = kafka
        self.topic = f"{kafka.topic_prefix}positions"
        self._kwargs: dict[str, Any] = kafka_client_kwargs(kafka, bootstrap_servers=bootstrap_servers,
                                                           client_id=client_id)
        self._producer: AIOKafkaProducer | None = None
        self.written = 0

    async def start(self) -> None:
        admin = AIOKafkaAdminClient(**self._kwargs)
        try:
            await admin.start()
            existing = {t["topic"] for t in await admin.describe_topics()}
            if self.topic not in existing:
                await admin.create_topics([NewTopic(self.topic, num_partitions=self.kafka.partitions,
                                                    replication_factor=self.kafka.replication_factor,
                                                    topic_configs=TOPIC_CONFIG)],
                                          timeout_ms=self.kafka.request_timeout_ms)
                log.info("positions_topic_created", extra={"topic": self.topic})
        finally:
            with contextlib.suppress(Exception):
                await admin.close()
        producer = AIOKafkaProducer(**self._kwargs, acks="all", enable_idempotence=self.kafka.idempotence,
                                    linger_ms=self.kafka.linger_ms)
        await producer.start()
        self._producer = producer

    async def write(self, positions: Iterable[StreamPosition]) -> int:
        """Write positions and wait for every acknowledgement; how many were written."""
        assert self._producer is not None, "start() first"
        futures = [await self._producer.send(self.topic, encode_position(p),
                                             key=position_key(p.checkpoint.arg, p.copy))
                   for p in positions]
        if futures:
            await asyncio.gather(*futures)
        self.written += len(futures)
        return len(futures)

    async def read(self, timeout_s: float = 30.0, *, copy: int = 0) -> dict[SubArg, StreamPosition]:
        """The latest position of every stream on the topic written by `copy` (read from the beginning to its
        end now)."""
        out: dict[SubArg, StreamPosition] = {}
        consumer = AIOKafkaConsumer(**self._kwargs, group_id=None, enable_auto_commit=False)
        async with asyncio.timeout(timeout_s):
            await consumer.start()
            try:
                tps = await assign_whole_topic(consumer, self.topic)
                await consumer.seek_to_beginning(*tps)
                ends = await consumer.end_offsets(tps)
                while [tp for tp in tps if await consumer.position(tp) < ends[tp]]:
                    batch = await consumer.getmany(*tps, timeout_ms=200)
                    for msgs in batch.values():
                        for m in msgs:
                            p = decode_position(m.value)
                            if p is not None and p.copy == copy:
                                out[p.checkpoint.arg] = p  # per key in offset order: the latest wins
            finally:
                await consumer.stop()
        return out

    async def close(self) -> None:
        producer, self._producer = self._producer, None
        if producer is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(producer.stop(), self.kafka.request_timeout_ms / 1000)


class PositionTail:
    """The other copies' positions as they are written (`cluster.copies` > 1): reads `<prefix>positions` from
    its beginning and then follows it, keeping each stream's latest position of every copy but `copy`. `run()`
    until cancelled; `changed` is notified after every batch read."""

    def __init__(self, kafka: KafkaSettings, copy: int, *, bootstrap_servers: str | None = None,
                 client_id: str | None = None) -> None:
        self.kafka = kafka
        self.copy = copy
        self.topic = f"{kafka.topic_prefix}positions"
        self._kwargs: dict[str, Any] = kafka_client_kwargs(kafka, bootstrap_servers=bootstrap_servers,
                                                           client_id=client_id)
        self._consumer: AIOKafkaConsumer | None = None
        #: Each stream's latest position per other copy.
        self.latest: dict[SubArg, dict[int, StreamPosition]] = {}
        self.changed = asyncio.Condition()
        self.read_count = 0

    async def start(self) -> None:
        consumer = AIOKafkaConsumer(**self._kwargs, group_id=None, enable_auto_commit=False,
                                    auto_offset_reset="earliest")
        await consumer.start()
        try:
            async with asyncio.timeout(self.kafka.request_timeout_ms / 1000):
                tps = await assign_whole_topic(consumer, self.topic)
            await consumer.seek_to_beginning(*tps)
        except BaseException:
            await consumer.stop()
            raise
        self._consumer = consumer

    def positions(self, arg: SubArg) -> list[StreamPosition]:
        """The other copies' latest positions of one stream."""
        return list(self.latest.get(arg, {}).values())

    async def run(self) -> None:
        consumer = self._consumer
        assert consumer is not None, "start() first"
        while True:
            batch = await consumer.getmany(timeout_ms=200)
            count = 0
            for msgs in batch.values():
                for m in msgs:
                    p = decode_position(m.value)
                    if p is not None and p.copy != self.copy:
                        self.latest.setdefault(p.checkpoint.arg, {})[p.copy] = p
                        count += 1
            if count:
                self.read_count += count
                async with self.changed:
                    self.changed.notify_all()

    async def close(self) -> None:
        consumer, self._consumer = self._consumer, None
        if consumer is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(consumer.stop(), self.kafka.request_timeout_ms / 1000)
