"""End-to-end harness: the real daemon against the simulator and a real Kafka-protocol broker.

What a test asserts is what a user's consumer reads: records are consumed from Kafka and decoded with the
.avsc files alone (`ingest.core.avro.decode` loads nothing but `schemas/`).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from aiokafka import AIOKafkaConsumer
from aiokafka.errors import KafkaConnectionError
from aiokafka.structs import TopicPartition

from ingest.config import Settings, load_settings
from ingest.core.avro import decode
from ingest.core.records import Record, TopicKind, topic_name
from ingest.sim import SimServer
from ingest.supervisor import Daemon

R = TypeVar("R", bound=Record)


def daemon_settings(sim: SimServer, bootstrap: str, prefix: str, journal_dir: Path, **sections: Any) -> Settings:
    """Settings of a daemon that records from `sim` into `bootstrap`, with test-sized timings."""
    okx: dict[str, Any] = {"ws_base_url": sim.ws_base, "rest_base_url": sim.rest_base}
    okx.update(sections.pop("okx", {}))
    # The embedded test broker refuses the idempotent producer (see tests/integration/test_broker.py).
    kafka: dict[str, Any] = {"bootstrap_servers": bootstrap, "topic_prefix": prefix, "partitions": 3,
                             "enable_idempotence": False}
    kafka.update(sections.pop("kafka", {}))
    ws: dict[str, Any] = {"backoff_min_s": 0.01, "backoff_max_s": 0.2, "healthy_after_s": 0.5}
    ws.update(sections.pop("ws", {}))
    journal: dict[str, Any] = {"dir": str(journal_dir)}
    journal.update(sections.pop("journal", {}))
    obs: dict[str, Any] = {"metrics_port": 0, "log_format": "text"}
    obs.update(sections.pop("obs", {}))
    # With the embedded broker the recorder also archives in-process: into the test's directory.
    archive: dict[str, Any] = {"url": str(journal_dir / "archive"), "metrics_port": 0, "drain_timeout_s": 10}
    archive.update(sections.pop("archive", {}))
    return load_settings(None, okx=okx, kafka=kafka, ws=ws, journal=journal, obs=obs, archive=archive, **sections)


@dataclass
class RunningDaemon:
    daemon: Daemon
    stop: asyncio.Event
    task: asyncio.Task[int]
    exit_code: int | None = field(default=None)

    async def shutdown(self) -> int:
        self.stop.set()
        self.exit_code = await asyncio.wait_for(self.task, 60)
        return self.exit_code


@contextlib.asynccontextmanager
async def running(settings: Settings, env: dict[str, str] | None = None) -> AsyncIterator[RunningDaemon]:
    """Run a daemon until the block ends (graceful SIGTERM-equivalent shutdown unless the test did it)."""
    daemon = Daemon(settings, env=env)
    stop = asyncio.Event()
    task = asyncio.create_task(daemon.run(stop))
    run = RunningDaemon(daemon, stop, task)
    started = asyncio.create_task(daemon.started.wait())
    done, _ = await asyncio.wait({task, started}, timeout=60, return_when=asyncio.FIRST_COMPLETED)
    if started not in done:
        started.cancel()
        raise AssertionError(f"daemon did not start (exit code {task.result() if task.done() else 'pending'})")
    try:
        yield run
    finally:
        if not task.done():
            await run.shutdown()


class TopicReader:
    """Reads whole topics from the beginning and decodes every value with the schemas alone."""

    def __init__(self, bootstrap: str, prefix: str) -> None:
        self.bootstrap = bootstrap
        self.prefix = prefix

    async def read(self, kind: TopicKind, *, at_least: int = 0,
                   timeout_s: float = 30.0) -> list[tuple[int, bytes | None, Record, dict[str, bytes]]]:
        """(partition, key, record, headers) of everything in the topic now, in partition order.

        Reads up to the end offsets taken at the start (re-taken while fewer than `at_least` records are
        there), so it returns as soon as the topic is read, without waiting for silence.
        """
        topic = topic_name(self.prefix, kind)
        out: list[tuple[int, bytes | None, Record, dict[str, bytes]]] = []
        async with asyncio.timeout(timeout_s):
            consumer = await self._consumer()
            try:
                partitions = consumer.partitions_for_topic(topic)
                while not partitions:
                    await consumer._client.force_metadata_update()  # the topic may be brand new
                    partitions = consumer.partitions_for_topic(topic)
                tps = [TopicPartition(topic, p) for p in sorted(partitions)]
                consumer.assign(tps)
                await consumer.seek_to_beginning(*tps)
                while True:
                    # Tansu reports an end offset inside the last batch; whole batches are kept regardless.
                    ends = await consumer.end_offsets(tps)
                    while [tp for tp in tps if await consumer.position(tp) < ends[tp]]:
                        batch = await consumer.getmany(*tps, timeout_ms=200)
                        for tp, msgs in sorted(batch.items(), key=lambda kv: kv[0].partition):
                            for m in msgs:
                                out.append((tp.partition, m.key, decode(m.value), dict(m.headers)))
                    if len(out) >= at_least:
                        break
                    await asyncio.sleep(0.05)  # polling an external broker for records still in flight
            finally:
                await consumer.stop()
        return out

    async def _consumer(self) -> AIOKafkaConsumer:
        """A started consumer; retries while the broker is not (yet) accepting connections."""
        while True:
            consumer = AIOKafkaConsumer(bootstrap_servers=self.bootstrap, enable_auto_commit=False, group_id=None)
            try:
                await consumer.start()
                return consumer
            except KafkaConnectionError:
                await consumer.stop()
                await asyncio.sleep(0.1)  # polling an external broker that is (re)starting

    async def records(self, kind: TopicKind, cls: type[R], *, at_least: int = 0) -> list[R]:
        return [r for _, _, r, _ in await self.read(kind, at_least=at_least) if isinstance(r, cls)]


def sim_holders(sim: SimServer) -> Counter[tuple[str, str]]:
    """How many open simulator connections hold each (channel, instId)."""
    out: Counter[tuple[str, str]] = Counter()
    for c in sim.hub.conns.values():
        if not c.closing:
            for sub in c.subs:
                out[(sub.channel, sub.inst_id or "")] += 1
    return out
