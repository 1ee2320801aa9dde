"""Records/s into the embedded broker through Delivery (queue -> journal -> Kafka sink), against a bare
aiokafka producer (`send()` per record, same codec, acks=all) in the same run, printed as a ratio.

    .venv/bin/python -m bench.delivery_bench [--records 200000] [--fsync batch] [--compression zstd]

Both sides send the same records (realistic size: ~300-byte Avro value, instId key out of 20, three
headers) and wait for every acknowledgement; Delivery additionally journals every record to disk.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import tempfile
import time
from pathlib import Path
from typing import Literal, cast

from aiokafka import AIOKafkaProducer

from ingest.config import Compression, KafkaSettings
from ingest.io.broker import EmbeddedBroker
from ingest.io.delivery import Delivery
from ingest.io.journal import Journal
from ingest.io.kafka import KafkaSink
from ingest.io.sink import EncodedRecord

INSTRUMENTS = [f"{base}-USDT-SWAP".encode() for base in
               ("BTC", "ETH", "SOL", "XRP", "DOGE", "ADA", "AVAX", "LINK", "DOT", "TRX",
                "LTC", "BCH", "ATOM", "NEAR", "APT", "ARB", "OP", "SUI", "TON", "PEPE")]


def make_records(n: int, topic: str) -> list[EncodedRecord]:
    body = os.urandom(120) + b"0.000123450000" * 12
    return [
        EncodedRecord(
            topic=topic,
            key=INSTRUMENTS[i % len(INSTRUMENTS)],
            value=body + i.to_bytes(8, "little"),
            headers=(("schema", b"okx.ingest.v1.Trade"), ("record_id", f"c1:{i}:0".encode()), ("source", b"ws")),
            ts_ms=1_700_000_000_000 + i,
        )
        for i in range(n)
    ]


async def bare_producer(bootstrap: str, records: list[EncodedRecord], codec: str | None) -> float:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", compression_type=codec, linger_ms=5,
                                max_batch_size=1_048_576)
    await producer.start()
    try:
        await producer.send_and_wait(records[0].topic, b"warm-up")
        start = time.perf_counter()
        for r in records:
            await producer.send(r.topic, r.value, key=r.key, headers=list(r.headers), timestamp_ms=r.ts_ms)
        await producer.flush()
        return time.perf_counter() - start
    finally:
        await producer.stop()


async def through_delivery(bootstrap: str, records: list[EncodedRecord], compression: Compression,
                           fsync: Literal["never", "segment", "batch"], directory: Path) -> float:
    settings = KafkaSettings(compression=compression)  # bootstrap "embedded": idempotence off, as in production
    sink = KafkaSink(settings, bootstrap_servers=bootstrap, topics=[records[0].topic])
    journal = Journal(directory, fsync=fsync)
    delivery = Delivery(sink, journal)
    await delivery.start()
    try:
        start = time.perf_counter()
        for r in records:
            await delivery.put(r)
        await delivery.flush()
        return time.perf_counter() - start
    finally:
        await delivery.close()


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--records", type=int, default=200_000)
    parser.add_argument("--fsync", choices=["never", "segment", "batch"], default="batch")
    parser.add_argument("--compression", choices=[c.value for c in Compression], default="zstd")
    args = parser.parse_args()
    compression = Compression(args.compression)
    codec = None if compression is Compression.NONE else compression.value
    broker = EmbeddedBroker()
    await broker.start()
    try:
        bare_s = await bare_producer(broker.bootstrap_servers, make_records(args.records, "bench.bare"), codec)
        with tempfile.TemporaryDirectory(prefix="delivery-bench-") as tmp:
            ours_s = await through_delivery(broker.bootstrap_servers, make_records(args.records, "bench.delivery"),
                                            compression, cast(Literal["never", "segment", "batch"], args.fsync),
                                            Path(tmp))
    finally:
        await broker.stop()
    bare_rate, ours_rate = args.records / bare_s, args.records / ours_s
    print(f"records={args.records} compression={compression.value} fsync={args.fsync}")
    print(f"bare aiokafka send():          {bare_rate:>10,.0f} records/s")
    print(f"Delivery (journal + KafkaSink): {ours_rate:>10,.0f} records/s")
    print(f"ratio Delivery / bare:          {ours_rate / bare_rate:>10.2f}")


if __name__ == "__main__":
    asyncio.run(main())
