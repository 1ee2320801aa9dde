"""The aiokafka internals the producer stop relies on exist in the installed aiokafka, and the stop is bounded.

`make compat` runs this module against the oldest and the newest aiokafka the pin allows, so a release that
drops the internals fails here, loudly, instead of a shutdown silently waiting out its timeout.
"""

from __future__ import annotations

import asyncio
import socket

from aiokafka import AIOKafkaProducer

from ingest.io.aiokafka_compat import abandon_queued_batches, missing_internals, stop_producer


def unused_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_the_installed_aiokafka_has_every_internal_the_stop_needs() -> None:
    producer = AIOKafkaProducer(bootstrap_servers="127.0.0.1:1")
    assert missing_internals(producer) == []


async def test_queued_batches_of_an_unreachable_broker_are_failed_and_the_stop_returns() -> None:
    producer = AIOKafkaProducer(bootstrap_servers=f"127.0.0.1:{unused_port()}", request_timeout_ms=60_000)
    # Not started: batches queue in the accumulator and wait for a broker that never answers.
    fut = await producer._message_accumulator.add_message(  # the internal path send() takes after metadata
        _tp("t", 0), b"k", b"v", timeout=60.0, timestamp_ms=None, headers=[])
    assert abandon_queued_batches(producer) == 1
    assert fut.done() and fut.exception() is not None
    async with asyncio.timeout(30):
        await stop_producer(producer, 1.0)


def _tp(topic: str, partition: int) -> object:
    from aiokafka.structs import TopicPartition

    return TopicPartition(topic, partition)
