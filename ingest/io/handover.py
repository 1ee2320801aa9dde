"""Hand-over records on the control topic `<prefix>shards` (partition n = shard n; docs/CLUSTER.md).

One producer (each write acknowledged before it counts) and one reader of every partition. The reader starts
at the end as the broker reports it; a broker whose reported end lags its last batch (Tansu) only makes it read
a few older records, which the hand-over ignores by generation and age, so nothing written after the start is
missed. `caught_up` waits for a fetch that began after a moment and found nothing more: every record written
before that moment has been read.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from ingest.config import KafkaSettings
from ingest.core.handover import CONTROL_KEY, ControlMessage, decode_control, encode_control
from ingest.io.aiokafka_compat import assign_whole_topic
from ingest.io.kafka_security import kafka_client_kwargs

log = logging.getLogger(__name__)


class ControlChannel:
    """Write and read hand-over records; `run()` reads until cancelled, into `messages` and `latest`."""

    def __init__(self, kafka: KafkaSettings, *, bootstrap_servers: str | None = None,
                 client_id: str | None = None, topic: str | None = None) -> None:
        self.kafka = kafka
        #: The control topic of this replica's group (one per copy, `ClusterSettings.control_topic`).
        self.topic = topic or f"{kafka.topic_prefix}shards"
        self._kwargs: dict[str, Any] = kafka_client_kwargs(kafka, bootstrap_servers=bootstrap_servers,
                                                           client_id=client_id)
        self._producer: AIOKafkaProducer | None = None
        self._consumer: AIOKafkaConsumer | None = None
        self.messages: asyncio.Queue[ControlMessage] = asyncio.Queue()
        #: The latest hand-over record read on each partition.
        self.latest: dict[int, ControlMessage] = {}
        self._empty_round = asyncio.Condition()
        self._round_started = 0.0
        self._caught_up_at = -1.0
        self.written = 0

    async def start(self) -> None:
        producer = AIOKafkaProducer(**self._kwargs, acks="all", linger_ms=0)
        await producer.start()
        self._producer = producer
        consumer = AIOKafkaConsumer(**self._kwargs, group_id=None, enable_auto_commit=False)
        await consumer.start()
        try:
            async with asyncio.timeout(self.kafka.request_timeout_ms / 1000):
                tps = await assign_whole_topic(consumer, self.topic)
            await consumer.seek_to_end(*tps)
        except BaseException:
            await consumer.stop()
            raise
        self._consumer = consumer

    async def send(self, msg: ControlMessage) -> None:
        """Write one record to its shard's partition and wait for the acknowledgement."""
        assert self._producer is not None, "start() first"
        future = await self._producer.send(self.topic, encode_control(msg), key=CONTROL_KEY, partition=msg.shard)
        await future
        self.written += 1

    async def run(self) -> None:
        consumer = self._consumer
        assert consumer is not None, "start() first"
        while True:
            started = time.monotonic()
            batch = await consumer.getmany(timeout_ms=100)
            count = 0
            for msgs in batch.values():
                for m in msgs:
                    msg = decode_control(m.value)
                    if msg is not None:
                        count += 1
                        self.latest[msg.shard] = msg
                        self.messages.put_nowait(msg)
            if not count:
                async with self._empty_round:
                    self._caught_up_at = started
                    self._empty_round.notify_all()

    async def caught_up(self, timeout_s: float) -> bool:
        """Wait until everything written before now has been read (False if that took over `timeout_s`)."""
        since = time.monotonic()
        try:
            async with asyncio.timeout(timeout_s), self._empty_round:
                await self._empty_round.wait_for(lambda: self._caught_up_at >= since)
            return True
        except TimeoutError:
            return False

    async def close(self) -> None:
        for client in (self._consumer, self._producer):
            if client is not None:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(client.stop(), self.kafka.request_timeout_ms / 1000)
        self._consumer = self._producer = None
