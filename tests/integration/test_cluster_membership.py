"""Cluster membership on the real Kafka-protocol broker: the group splits the shards, a dead member's move on."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable

import pytest

from ingest.config import ClusterSettings, KafkaSettings
from ingest.errors import ConfigError
from ingest.io.cluster import Assignment, GroupMembership
from tests.conftest import BrokerInfo

SHARDS = 16


#: Set by every member on each assignment: what `_until` waits on between two looks.
CHANGED = asyncio.Event()


class _Member:
    def __init__(self, name: str, cluster: ClusterSettings, kafka: KafkaSettings) -> None:
        self.assignments: list[Assignment] = []
        self.membership = GroupMembership(cluster, kafka, name, self._on)

    async def _on(self, a: Assignment) -> None:
        self.assignments.append(a)
        CHANGED.set()

    @property
    def shards(self) -> frozenset[int]:
        return self.assignments[-1].shards if self.assignments else frozenset()


@contextlib.asynccontextmanager
async def _running(member: _Member) -> AsyncIterator[asyncio.Task[None]]:
    task = asyncio.create_task(member.membership.run())
    try:
        yield task
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def _until(predicate: Callable[[], bool], timeout: float) -> None:  # noqa: ASYNC109
    async with asyncio.timeout(timeout):
        while not predicate():
            CHANGED.clear()
            await CHANGED.wait()


def _settings(broker: BrokerInfo, prefix: str) -> tuple[ClusterSettings, KafkaSettings]:
    # Dynamic members: Tansu loses track of a static member that joins a formed group and rebalances for ever
    # (docs/CLUSTER.md, "Brokers"); a round pending when a member dies then outlasts any timeout here.
    return (ClusterSettings(group_id=f"{prefix}g", shards=SHARDS, session_timeout_ms=6000, heartbeat_interval_ms=500,
                            static_membership=False),
            KafkaSettings(bootstrap_servers=broker.bootstrap_servers, topic_prefix=prefix))


async def test_three_members_split_the_shards_and_survivors_take_over_a_dead_ones(
    kafka_broker: BrokerInfo, topic_prefix: str
) -> None:
    cluster, kafka = _settings(kafka_broker, topic_prefix)
    members = [_Member(f"r{i}", cluster, kafka) for i in range(3)]
    await members[0].membership.ensure_topic()
    async with contextlib.AsyncExitStack() as stack:
        tasks = [await stack.enter_async_context(_running(m)) for m in members]

        def split() -> bool:
            owned = [m.shards for m in members]
            return (all(len(o) in (SHARDS // 3, SHARDS // 3 + 1) for o in owned)
                    and sorted(s for o in owned for s in o) == list(range(SHARDS)))

        await _until(split, 90)
        generation = max(m.assignments[-1].generation for m in members)
        # Stopped at the very instant its assignment completes, a member can leave the broker (Tansu) believing
        # it is still there, with no rebalance ever after (plain aiokafka consumers show it too): stop it once it
        # is a settled member, its first heartbeat of this generation accepted.
        beats = members[2].membership.heartbeats
        deadline = asyncio.get_running_loop().time() + 30
        while members[2].membership.heartbeats == beats:
            assert asyncio.get_running_loop().time() < deadline, "no heartbeat accepted after the assignment"
            await asyncio.sleep(0.05)  # polling a counter the member's own heartbeat task moves
        # A member that stops: its shards, and only those, move to the survivors (a death without leaving, by
        # SIGKILL, is tests/e2e/test_cluster_kill.py).
        dead = members[2]
        tasks[2].cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await tasks[2]
        lost = dead.shards
        survivors = members[:2]
        kept = {m.membership.member: m.shards for m in survivors}

        def taken_over() -> bool:
            owned = [m.shards for m in survivors]
            return sorted(s for o in owned for s in o) == list(range(SHARDS))

        await _until(taken_over, 60)
        for m in survivors:
            assert kept[m.membership.member] <= m.shards, "a survivor keeps what it had: only the dead one's move"
            assert m.assignments[-1].generation > generation
        assert lost <= survivors[0].shards | survivors[1].shards


async def test_a_control_topic_with_another_partition_count_is_refused(
    kafka_broker: BrokerInfo, topic_prefix: str
) -> None:
    cluster, kafka = _settings(kafka_broker, topic_prefix)
    await GroupMembership(cluster, kafka, "r0", _noop).ensure_topic()
    other = cluster.model_copy(update={"shards": SHARDS * 2})
    with pytest.raises(ConfigError) as err:
        await GroupMembership(other, kafka, "r0", _noop).ensure_topic()
    assert err.value.key == "cluster.shards"


async def _noop(a: Assignment) -> None:
    return None
