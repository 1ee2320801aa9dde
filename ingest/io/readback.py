"""Reading back what a data topic already holds for one stream, so a backfill publishes only what is missing.

Kafka I/O for the backfill worker (`ingest.services.backfill`, package docstring "exactly once"); what counts
as present (natural keys, the scope's time bounds) is decided in `ingest.core.backfill`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from aiokafka import AIOKafkaConsumer
from aiokafka.errors import KafkaError
from aiokafka.partitioner import murmur2
from aiokafka.structs import TopicPartition

from ingest.config import KafkaSettings
from ingest.core.avro import DecodeError, decode
from ingest.core.backfill import DataKind, Present, ReadbackScope
from ingest.core.records import OkxRecord, TopicKind, topic_name
from ingest.errors import IngestError
from ingest.io.kafka_security import kafka_client_kwargs

#: The topic each data kind is published to (and read back from).
TOPIC_OF_KIND: Mapping[DataKind, TopicKind] = {
    DataKind.TRADES: TopicKind.TRADES, DataKind.CANDLES: TopicKind.CANDLES, DataKind.BOOKS: TopicKind.BOOKS,
    DataKind.FILLS: TopicKind.FILLS, DataKind.ORDERS: TopicKind.ORDERS, DataKind.FUNDING: TopicKind.FUNDING_RATES,
}
#: The Avro record each data kind's topic holds (the `schema` header), to decode only what matters.
_SCHEMA: Mapping[DataKind, bytes] = {
    DataKind.TRADES: b"okx.ingest.v1.Trade", DataKind.CANDLES: b"okx.ingest.v1.Candle",
    DataKind.FILLS: b"okx.ingest.v1.Fill", DataKind.ORDERS: b"okx.ingest.v1.Order",
    DataKind.FUNDING: b"okx.ingest.v1.FundingRate",
}
#: Kinds whose records are keyed by instId (one partition holds a stream); fills and orders are keyed by ordId.
_KEYED_BY_INST = frozenset({DataKind.TRADES, DataKind.CANDLES, DataKind.BOOKS, DataKind.FUNDING})


class ReadbackError(IngestError):
    """Reading a data topic back did not finish in time; retried like a gap, then the gap is reported partial."""

    retriable = True


class ReadbackCounters(Protocol):
    """Where a read-back counts the records it fetched (the worker's counters)."""

    readback_records: int


@dataclass(slots=True)
class _OwnCounters:
    readback_records: int = 0


def bootstrap_of(kafka: KafkaSettings) -> str:
    """Where the worker finds Kafka: the configured servers, or the recorder's embedded broker on loopback."""
    return f"127.0.0.1:{kafka.embedded_port}" if kafka.embedded else kafka.bootstrap_servers


def consumer_options(kafka: KafkaSettings, bootstrap: str) -> dict[str, Any]:
    """Connection options for the worker's consumers: the sink's (TLS, SASL), under the worker's client id."""
    return kafka_client_kwargs(kafka, bootstrap_servers=bootstrap, client_id=f"{kafka.client_id}-backfill")


class TopicReadback:
    """Reads back what a data topic already holds for one stream (module docstring, "exactly once").

    Each read uses a fresh consumer without a group: its bootstrap metadata lists every topic as it is now
    (a long-lived consumer would not see topics or partitions created after it started), and no fetch
    position survives from one read to the next.
    """

    def __init__(self, kafka: KafkaSettings, bootstrap: str, *, timeout_s: float,
                 counters: ReadbackCounters | None = None) -> None:
        self._options = consumer_options(kafka, bootstrap)
        self._prefix = kafka.topic_prefix
        self._timeout_s = timeout_s
        self._counters: ReadbackCounters = counters if counters is not None else _OwnCounters()

    async def present(self, scope: ReadbackScope) -> Present:
        """The natural keys the topic holds within `scope` (read from scope.since_ts to the current end)."""
        kind = scope.stream.kind
        if kind not in _SCHEMA:
            return Present()
        topic = topic_name(self._prefix, TOPIC_OF_KIND[kind])
        key = scope.stream.inst_id.encode() if kind in _KEYED_BY_INST and scope.stream.inst_id else None
        consumer = AIOKafkaConsumer(**self._options, group_id=None, enable_auto_commit=False)
        try:
            async with asyncio.timeout(self._timeout_s):
                await consumer.start()
                return await self._read(consumer, topic, key, _SCHEMA[kind], scope)
        except TimeoutError:
            raise ReadbackError(f"reading {topic} back for {scope.stream} took over {self._timeout_s} s; "
                                "is Kafka slow? (backfill.readback_timeout_s)") from None
        except KafkaError as exc:
            raise ReadbackError(f"reading {topic} back for {scope.stream} failed: {exc}") from exc
        finally:
            await consumer.stop()

    async def _read(self, consumer: AIOKafkaConsumer, topic: str, key: bytes | None, schema: bytes,
                    scope: ReadbackScope) -> Present:
        parts = consumer.partitions_for_topic(topic)
        present = Present()
        if not parts:
            return present
        ordered = sorted(parts)
        if key is not None:  # the sink's rule (Java client's murmur2), so the stream's partition
            tps = [TopicPartition(topic, ordered[(murmur2(key) & 0x7FFFFFFF) % len(ordered)])]
        else:
            tps = [TopicPartition(topic, p) for p in ordered]
        ends: dict[TopicPartition, int] = await consumer.end_offsets(tps)
        starts = await self._starts(consumer, tps, scope.since_ts, ends)
        consumer.assign(tps)
        for tp in tps:
            consumer.seek(tp, starts[tp])
        todo = {tp for tp in tps if starts[tp] < ends[tp]}
        while todo:
            batch = await consumer.getmany(*todo, timeout_ms=500)
            for msgs in batch.values():
                # Every fetched record counts, also past the end taken at the start: they are in the topic,
                # and the embedded broker reports a partition's end as its last batch's first offset + 1.
                for m in msgs:
                    self._counters.readback_records += 1
                    if (key is not None and m.key != key) or m.value is None:
                        continue
                    headers = dict(m.headers)
                    if headers.get("schema") != schema:
                        continue
                    try:
                        record = decode(m.value, schema_name=schema.decode())
                    except DecodeError:
                        continue
                    if isinstance(record, OkxRecord):
                        present.add_all(scope.keys(record))
            for tp in list(todo):
                if await consumer.position(tp) >= ends[tp]:
                    todo.discard(tp)
        return present

    @staticmethod
    async def _starts(consumer: AIOKafkaConsumer, tps: list[TopicPartition], since_ts: int,
                      ends: Mapping[TopicPartition, int]) -> dict[TopicPartition, int]:
        """First offset with a timestamp >= since_ts per partition (none: nothing to read there)."""
        try:
            found = await consumer.offsets_for_times({tp: max(0, since_ts) for tp in tps})
        except KafkaError:  # a broker without timestamp lookups: read the whole partition
            begins: dict[TopicPartition, int] = await consumer.beginning_offsets(tps)
            return dict(begins)
        return {tp: (found[tp].offset if found.get(tp) is not None else ends[tp]) for tp in tps}
