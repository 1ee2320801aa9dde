"""The one place that touches aiokafka's private producer internals, checked against the versions we allow.

aiokafka's `AIOKafkaProducer.stop()` waits for every queued batch, which with the idempotent producer means
until the broker is back: a shutdown during a Kafka outage would hang. aiokafka has no public way to abandon
queued batches (checked for 0.11 through 0.14), so `abandon_queued_batches` fails them through the message
accumulator. Those batches are never lost: delivery resends them from the journal on the next start.

If a future aiokafka drops these internals, `missing_internals()` names what is gone; the stop then logs an
error once per process (the stop itself stays bounded by `bounded`, so it still cannot hang), and the test
suite fails loudly on such a version instead of the product degrading silently.
"""

from __future__ import annotations

import logging
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.errors import ProducerClosed
from aiokafka.structs import TopicPartition

from ingest.runtime import bounded

log = logging.getLogger(__name__)

#: The private attributes relied upon: producer -> accumulator, and the accumulator's batch queues.
_ACCUMULATOR = "_message_accumulator"
_ACCUMULATOR_NEEDS = ("fail_all", "_batches", "_pending_batches")

_warned = False


def missing_internals(producer: AIOKafkaProducer) -> list[str]:
    """The private names this module needs that `producer` (an unstarted one is enough) does not have."""
    accumulator = getattr(producer, _ACCUMULATOR, None)
    if accumulator is None:
        return [_ACCUMULATOR]
    return [f"{_ACCUMULATOR}.{name}" for name in _ACCUMULATOR_NEEDS if not hasattr(accumulator, name)]


def abandon_queued_batches(producer: AIOKafkaProducer) -> int:
    """Fail every batch queued in `producer` (resent later from the journal); how many were failed."""
    global _warned
    missing = missing_internals(producer)
    if missing:
        if not _warned:
            _warned = True
            log.error("aiokafka_internals_missing", extra={
                "missing": missing, "consequence": "a stop during a Kafka outage waits for its timeout; "
                "pin aiokafka to a checked version (see pyproject.toml)"})
        return 0
    accumulator: Any = getattr(producer, _ACCUMULATOR)
    futures = [b.future for q in accumulator._batches.values() for b in q]
    futures += [b.future for b in accumulator._pending_batches]
    if futures:
        accumulator.fail_all(ProducerClosed())
        for fut in futures:  # retrieve, so asyncio does not log "exception was never retrieved"
            if fut.done() and not fut.cancelled():
                fut.exception()
    return len(futures)


async def stop_producer(producer: AIOKafkaProducer, timeout_s: float) -> bool:
    """Stop a producer without waiting for batches of a failed write, within `timeout_s`; True if it stopped."""
    abandon_queued_batches(producer)
    done = await bounded(_stop(producer), timeout_s, what="stopping the Kafka producer")
    return done is True


async def _stop(producer: AIOKafkaProducer) -> bool:
    await producer.stop()
    return True


# ------------------------------------------------------------------------------------ consumer membership

#: The private attributes the backfill's fencing reads: consumer -> group coordinator, and its state.
_COORDINATOR = "_coordinator"
_COORDINATOR_NEEDS = ("generation", "member_id", "_rejoin_needed_fut")


def missing_membership_internals(consumer: AIOKafkaConsumer) -> list[str]:
    """The private names `membership` needs that `consumer` (an unstarted group consumer will not do: its
    coordinator exists once started) does not have."""
    coordinator = getattr(consumer, _COORDINATOR, None)
    if coordinator is None:
        return [_COORDINATOR]
    return [f"{_COORDINATOR}.{name}" for name in _COORDINATOR_NEEDS if not hasattr(coordinator, name)]


def membership(consumer: AIOKafkaConsumer) -> tuple[object, object, bool] | None:
    """(generation, member_id, rejoin pending) of a started group consumer as aiokafka knows them, or None
    when the internals are gone (logged once): the caller then relies on the broker's answers alone."""
    global _warned_membership
    missing = missing_membership_internals(consumer)
    if missing:
        if not _warned_membership:
            _warned_membership = True
            log.error("aiokafka_internals_missing", extra={
                "missing": missing, "consequence": "the backfill's fencing checks only the coordinator's answers; "
                "pin aiokafka to a checked version (see pyproject.toml)"})
        return None
    coordinator: Any = getattr(consumer, _COORDINATOR)
    rejoin = coordinator._rejoin_needed_fut
    return coordinator.generation, coordinator.member_id, bool(rejoin.done())


_warned_membership = False


async def assign_whole_topic(consumer: AIOKafkaConsumer, topic: str) -> list[TopicPartition]:
    """Assign every partition of `topic` to a started consumer (no group), refreshing the metadata until the
    topic shows (one created a moment ago); the caller bounds the wait and seeks. The refresh is aiokafka's
    private `_client.force_metadata_update` (public for 0.11 through 0.14 only as that)."""
    partitions = consumer.partitions_for_topic(topic)
    while not partitions:
        await consumer._client.force_metadata_update()
        partitions = consumer.partitions_for_topic(topic)
    tps = [TopicPartition(topic, p) for p in sorted(partitions)]
    consumer.assign(tps)
    return tps
