"""Fencing: the lease that proves a batch's partitions are still this worker's, and the outlet that checks
it before every record (package docstring, "Fencing").
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Mapping

from aiokafka import AIOKafkaConsumer
from aiokafka.structs import OffsetAndMetadata, TopicPartition

from ingest.errors import IngestError
from ingest.io.aiokafka_compat import membership
from ingest.io.sink import EncodedRecord
from ingest.services.backfill.filler import Outlet
from ingest.services.backfill.stats import _Counters


class FencedError(IngestError):
    """This worker may no longer own the partitions of its batch: it publishes and commits nothing more for
    it (the batch is abandoned; their owner, maybe this worker again after it rejoins, redoes it)."""

    retriable = True


class _Lease:
    """Proof that this worker still owns a batch's partitions, checked before anything of the batch is put.

    Local checks every time (the partitions are still assigned, the group generation is the one the batch
    started in, no rejoin pending); and at least every session_timeout / 2 the group coordinator itself
    confirms it: the batch's start offsets are committed again (a no-op for the group), which the broker
    refuses for a member it expelled (a worker paused or cut off longer than the session timeout) or from
    an old generation. Without transactions this narrows, not closes, the window: records handed to the
    delivery before the worker was cut off may still be sent after it.
    """

    def __init__(self, consumer: AIOKafkaConsumer, starts: Mapping[TopicPartition, int], session_s: float,
                 timeout_s: float, counters: _Counters) -> None:
        self._consumer = consumer
        self._timeout_s = timeout_s
        self._starts = {tp: OffsetAndMetadata(off, "") for tp, off in starts.items()}
        self._generation = self._state()
        self._valid_s = session_s / 2
        self._confirmed_at: float | None = None
        self._counters = counters
        self.lost: str | None = None

    def _state(self) -> tuple[object, object] | None:
        state = membership(self._consumer)
        return None if state is None else state[:2]

    def _local(self) -> str | None:
        missing = set(self._starts) - self._consumer.assignment()
        if missing:
            return f"partitions {sorted(tp.partition for tp in missing)} are no longer assigned to this worker"
        state = membership(self._consumer)
        if state is not None and state[:2] != self._generation:
            return "the consumer group moved to a new generation"
        if state is not None and state[2]:
            return "the consumer group is rebalancing"
        return None

    async def check(self) -> None:
        """Return while the batch's partitions are provably this worker's; else raise FencedError."""
        known = self.lost is not None
        if self.lost is None:
            self.lost = self._local()
        if self.lost is None and (self._confirmed_at is None
                                  or time.monotonic() - self._confirmed_at > self._valid_s):
            sent = time.monotonic()
            try:
                async with asyncio.timeout(self._timeout_s):
                    await self._consumer.commit(dict(self._starts))
            except asyncio.CancelledError:  # the refusal made the consumer rejoin, which revoked the batch
                self.lost = "the partitions were revoked while the group coordinator was being asked"
                self._counters.fenced += 1  # once per batch: the batch is gone
                raise
            except Exception as exc:  # refused (expelled, old generation, rebalancing) or no answer
                self.lost = f"the group coordinator did not confirm the partitions: {type(exc).__name__}: {exc}"
            else:
                self._confirmed_at = sent
                self.lost = self._local()
        if self.lost is not None:
            if not known:  # counted once per batch, however many of its fills run into it
                self._counters.fenced += 1
            raise FencedError(f"stopped publishing for this batch: {self.lost}")


class _FencedOutlet:
    """The filler's outlet in the worker: the current batch's lease is checked before every record.

    `lease` returns the running batch's lease (None between batches); `delivery` is the worker's.
    """

    def __init__(self, lease: Callable[[], _Lease | None], delivery: Outlet) -> None:
        self._lease = lease
        self._delivery = delivery

    async def put(self, record: EncodedRecord) -> None:
        lease = self._lease()
        if lease is not None:
            await lease.check()
        await self._delivery.put(record)
