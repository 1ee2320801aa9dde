"""The positions topic with copies: each copy reads back its own positions, and the tail sees the others'."""

from __future__ import annotations

import asyncio
import contextlib

from ingest.config import KafkaSettings
from ingest.core.cluster import StreamPosition
from ingest.core.gaps import Position, StreamCheckpoint
from ingest.io.positions import PositionStore, PositionTail
from ingest.okx.channels import SubArg
from tests.conftest import BrokerInfo

ARG = SubArg("trades-all", inst_id="BTC-USDT")


def _pos(copy: int, last: int) -> StreamPosition:
    cp = StreamCheckpoint(ARG, Position(last * 10, last, None), f"s1-c{copy}#1", "SPOT", since=Position(10, 1, None))
    return StreamPosition(1, f"rec-{copy}", 2, last, cp, copy)


async def test_each_copy_restores_its_own_positions_and_follows_the_other_copies(
    kafka_broker: BrokerInfo, topic_prefix: str
) -> None:
    kafka = KafkaSettings(bootstrap_servers=kafka_broker.bootstrap_servers, topic_prefix=topic_prefix,
                          enable_idempotence=False)
    store = PositionStore(kafka)
    await store.start()
    tail = PositionTail(kafka, 0)
    try:
        await store.write([_pos(0, 5), _pos(1, 7)])
        assert (await store.read(copy=1))[ARG] == _pos(1, 7)
        assert (await store.read())[ARG] == _pos(0, 5), "copy 0 (and a cluster without copies) reads its own"
        await tail.start()
        task = asyncio.create_task(tail.run())
        try:
            async with asyncio.timeout(30), tail.changed:
                await tail.changed.wait_for(lambda: tail.positions(ARG) == [_pos(1, 7)])
            await store.write([_pos(0, 8), _pos(1, 9)])  # written while it follows
            async with asyncio.timeout(30), tail.changed:
                await tail.changed.wait_for(lambda: tail.positions(ARG) == [_pos(1, 9)])
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
    finally:
        await tail.close()
        await store.close()
