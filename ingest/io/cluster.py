"""Membership of a recorder replica in its Kafka consumer group: the partitions of `<prefix>shards` it is
assigned are the shards it records (docs/CLUSTER.md).

Kafka's group protocol does membership, failure detection (the session timeout) and generations; the plan is
ours (`ShardAssignor`, on `core.cluster.assign`), computed by whichever member the broker makes leader from
what every member reports in its join metadata: its static name and the shards it holds. Nothing is ever
produced to the control topic for membership; its partitions only give the group something to assign.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.abc import ConsumerRebalanceListener
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.cluster import ClusterMetadata
from aiokafka.coordinator.assignors.abstract import AbstractPartitionAssignor
from aiokafka.coordinator.protocol import ConsumerProtocolMemberAssignment, ConsumerProtocolMemberMetadata

from ingest.config import ClusterSettings, KafkaSettings
from ingest.core.cluster import assign
from ingest.errors import ConfigError
from ingest.io.kafka_security import kafka_client_kwargs

log = logging.getLogger(__name__)

_TOPIC_EXISTS = 36
#: What a member tells the leader in its join metadata (JSON in user_data).
_META_VERSION = 1


@dataclass(frozen=True, slots=True)
class Assignment:
    """The shards this replica records from now on, in this group generation. `resumed` is False when this
    replica's session had expired since its previous assignment: it was out of the group in between (paused,
    partitioned), so even the shards it gets back were recorded by someone else meanwhile."""

    generation: int
    shards: frozenset[int]
    resumed: bool = True
    #: Shards gained from a member still in the group (the leader saw it hold them): taken over by hand-over.
    handover_from: Mapping[int, str] = field(default_factory=dict)


class Lease:
    """How long this replica may still act as a member: until a session timeout after the last heartbeat the
    broker answered (timed from when it was sent, the earliest the broker can have seen it). A process paused
    past that (SIGSTOP, a VM freeze) finds its lease expired the moment it runs again, before any heartbeat, while
    the group has already given its shards to others.

    While a rebalance this member takes part in is under way, aiokafka sends no heartbeats (the broker keeps the
    member while its JoinGroup waits, up to the rebalance timeout): a join begun while the lease held holds it
    until the join ends, so the shards kept through a rebalance are never fenced."""

    def __init__(self, session_s: float, monotonic: Callable[[], float] = time.monotonic) -> None:
        self.session_s = session_s
        self._monotonic = monotonic
        self._since: float | None = None
        self._join_at: float | None = None
        self.expired_once = False

    #: How long a join begun in time holds the lease at most, in sessions (Tansu's rounds last about one): a
    #: process paused in the middle of a join for longer is not taken for a member when it wakes.
    JOIN_HOLD = 1.5

    def _join_holds(self) -> bool:
        return self._join_at is not None and self._monotonic() < self._join_at + self.session_s * self.JOIN_HOLD

    def join_started(self) -> None:
        self._join_at = None  # valid() below: the last heartbeat's lease alone
        self._join_at = self._monotonic() if self.valid() else None

    def join_ended(self) -> None:
        """A join begun in time renews the lease as it ends: the broker answered it, even when with an error
        (Tansu answers the joins of a rebalance round with "unknown member" and its rounds last about a
        session, so without this a member in good standing would fence itself between two rounds)."""
        if self._join_holds():
            self.renew(self._monotonic())
        self._join_at = None

    def renew(self, sent_at: float) -> None:
        if self._since is None or sent_at > self._since:
            self._since = sent_at

    def valid(self) -> bool:
        if self._join_holds():
            return True
        ok = self._since is not None and self._monotonic() < self._since + self.session_s
        if not ok and self._since is not None:
            self.expired_once = True
        return ok


#: Called once per completed rebalance with the new assignment (it may wait: the group waits for it).
OnAssignment = Callable[[Assignment], Awaitable[None]]


class ShardAssignor(AbstractPartitionAssignor):  # type: ignore[misc]
    """aiokafka's assignor interface over `core.cluster.assign`: balanced, moving as few shards as possible.

    aiokafka calls `metadata`/`assign`/`on_assignment` on the object given in `partition_assignment_strategy`;
    this one is an instance (it carries the member name and what it holds), the interface declares classmethods.
    """

    name = "okx-ingest-shards"
    version = 0

    def __init__(self, member: str, topic: str, lease: Lease | None = None) -> None:
        self.member = member
        self.topic = topic
        self.held: frozenset[int] = frozenset()
        #: From the leader, with the last assignment: shard -> the live member that held it before.
        self.handover_from: dict[int, str] = {}
        self._lease = lease

    def metadata(self, topics: Iterable[str]) -> ConsumerProtocolMemberMetadata:
        # A member whose session expired claims nothing: others recorded its shards meanwhile and keep them.
        expired = self._lease is not None and self._lease.expired_once
        info = {"v": _META_VERSION, "member": self.member, "held": [] if expired else sorted(self.held)}
        return ConsumerProtocolMemberMetadata(self.version, sorted(topics), orjson.dumps(info))

    def assign(
        self, cluster: ClusterMetadata, members: Mapping[str, ConsumerProtocolMemberMetadata],
    ) -> dict[str, ConsumerProtocolMemberAssignment]:
        partitions = cluster.partitions_for_topic(self.topic) or set()
        shards = len(partitions)
        names: dict[str, str] = {}  # member name -> member id
        previous: dict[int, str] = {}
        for member_id, meta in sorted(members.items()):
            info = _member_info(meta.user_data)
            name = str(info.get("member") or member_id)
            if name in names:  # two ids with one name: only static membership prevents it; keep the first
                log.warning("cluster_duplicate_member", extra={"member": name, "ids": [names[name], member_id]})
                continue
            names[name] = member_id
            for s in info.get("held") or ():
                if isinstance(s, int):
                    previous.setdefault(s, name)
        plan = assign(names, shards, previous)
        log.info("cluster_plan", extra={"members": {m: len(ss) for m, ss in plan.items()}, "shards": shards})
        out = {member_id: ConsumerProtocolMemberAssignment(self.version, [], b"") for member_id in members}
        for name, ss in plan.items():
            # A shard moving away from a member that is still here is handed over (make-before-break).
            moving = {str(s): previous[s] for s in ss if previous.get(s, name) != name}
            out[names[name]] = ConsumerProtocolMemberAssignment(
                self.version, [ConsumerProtocolMemberAssignment.Assignment(self.topic, list(ss))],
                orjson.dumps({"v": _META_VERSION, "from": moving}))
        return out

    def on_assignment(self, assignment: ConsumerProtocolMemberAssignment) -> None:
        self.held = frozenset(p for t, ps in assignment.assignment if t == self.topic for p in ps)
        info = _member_info(assignment.user_data or b"")
        moving = info.get("from")
        self.handover_from = ({int(s): str(m) for s, m in moving.items() if str(s).isdigit()}
                              if isinstance(moving, dict) else {})


def _member_info(data: bytes) -> dict[str, Any]:
    try:
        info = orjson.loads(data) if data else {}
    except orjson.JSONDecodeError:
        return {}
    return info if isinstance(info, dict) else {}


class _Listener(ConsumerRebalanceListener):  # type: ignore[misc]
    """aiokafka revokes everything before each rebalance (eager protocol) and then assigns the full new set;
    only the set after the rebalance matters here, so revocation waits for it: shards kept keep recording."""

    def __init__(self, membership: GroupMembership) -> None:
        self._m = membership

    async def on_partitions_revoked(self, revoked: list[TopicPartition]) -> None:
        log.info("cluster_rebalance", extra={"member": self._m.member, "held": len(revoked)})

    async def on_partitions_assigned(self, assigned: list[TopicPartition]) -> None:
        await self._m._assigned(frozenset(tp.partition for tp in assigned if tp.topic == self._m.topic))


class GroupMembership:
    """One replica's membership: join with a static name, keep polling (so rebalances complete), hand each new
    assignment to `on_assignment`. `run()` until cancelled; a static member does not leave the group when it
    stops, so a restart within the session timeout gets its shards back without a rebalance."""

    def __init__(self, cluster: ClusterSettings, kafka: KafkaSettings, member: str, on_assignment: OnAssignment,
                 *, bootstrap_servers: str | None = None, copy: int = 0) -> None:
        assert cluster.group_id is not None
        self.settings = cluster
        self.kafka = kafka
        self.member = member
        #: With `cluster.copies` > 1 every copy is a group of its own, on a control topic of its own.
        self.copy = copy
        self.group_id = cluster.group_of(copy)
        self.topic = cluster.control_topic(kafka.topic_prefix, copy)
        self._on_assignment = on_assignment
        self._bootstrap = bootstrap_servers
        self.current: Assignment | None = None
        self.rebalances = 0
        #: Heartbeats the broker accepted in the generation of the current assignment.
        self.heartbeats = 0
        self.assigned = asyncio.Event()
        self._consumer: AIOKafkaConsumer | None = None
        # A little short of the session: the broker's clock and ours drift, and the fence must close first.
        self.lease = Lease(cluster.session_timeout_ms / 1000 * 0.9)
        self.assignor = ShardAssignor(member, self.topic, self.lease)

    def _kwargs(self) -> dict[str, Any]:
        return kafka_client_kwargs(self.kafka, bootstrap_servers=self._bootstrap,
                                   client_id=f"{self.kafka.client_id}-{self.member}")

    async def ensure_topic(self) -> None:
        """Create `<prefix>shards` with one partition per shard; refuse (exit 2) one with another count."""
        admin = AIOKafkaAdminClient(**self._kwargs())
        try:
            await admin.start()
            existing = {t["topic"]: t for t in await admin.describe_topics()}
            if self.topic not in existing:
                resp = await admin.create_topics([NewTopic(self.topic, num_partitions=self.settings.shards,
                                                           replication_factor=self.kafka.replication_factor)],
                                                 timeout_ms=self.kafka.request_timeout_ms)
                codes = [item[1] for item in resp.topic_errors]
                if any(c not in (0, _TOPIC_EXISTS) for c in codes):
                    raise ConfigError("cluster.shards", f"could not create the control topic {self.topic} "
                                      f"(error codes {codes})", "create it with one partition per shard")
                log.info("cluster_topic_created", extra={"topic": self.topic, "partitions": self.settings.shards})
            else:
                count = len(existing[self.topic].get("partitions") or [])
                if count != self.settings.shards:
                    raise ConfigError("cluster.shards", f"is {self.settings.shards} but the control topic "
                                      f"{self.topic} has {count} partitions",
                                      f"set cluster.shards = {count} in every replica (or recreate the topic "
                                      "with every replica stopped)")
        finally:
            with contextlib.suppress(Exception):
                await admin.close()

    async def run(self) -> None:
        s = self.settings
        consumer = AIOKafkaConsumer(
            **self._kwargs(), group_id=self.group_id, group_instance_id=self.member if s.static_membership else None,
            session_timeout_ms=s.session_timeout_ms, heartbeat_interval_ms=s.heartbeat_interval_ms,
            partition_assignment_strategy=(self.assignor,), enable_auto_commit=False,
            auto_offset_reset="latest", metadata_max_age_ms=60_000)
        consumer.subscribe([self.topic], listener=_Listener(self))
        self._consumer = consumer
        await consumer.start()
        self._track_heartbeats(consumer)
        try:
            while True:
                await consumer.getmany(timeout_ms=1_000)  # the control topic carries nothing we read yet
        finally:
            try:
                await asyncio.wait_for(consumer.stop(), self.kafka.request_timeout_ms / 1000)
            except Exception as exc:  # the stop goes on; a member left behind must be visible
                log.warning("cluster_stop_failed", extra={"member": self.member, "error": repr(exc)})

    def _track_heartbeats(self, consumer: AIOKafkaConsumer) -> None:
        """Renew the lease with every heartbeat the broker accepts, and hold it through a rebalance's join.
        aiokafka keeps those facts inside its coordinator's loops, so its (private, 0.11-0.14) `_do_heartbeat`
        and `_do_rejoin_group` are wrapped, on this consumer only."""
        coordinator = getattr(consumer, "_coordinator", None)
        beat = getattr(coordinator, "_do_heartbeat", None)
        if coordinator is None or beat is None:
            log.warning("cluster_lease_untracked", extra={"effect": "the lease lasts from assignment to assignment"})
            return

        async def tracked() -> bool:
            sent_at = time.monotonic()
            ok = bool(await beat())
            if ok and self.current is not None and self._generation() == self.current.generation:
                self.lease.renew(sent_at)
                self.heartbeats += 1
            return ok

        coordinator._do_heartbeat = tracked
        rejoin = getattr(coordinator, "_do_rejoin_group", None)
        if rejoin is None:
            return

        async def joining(subscription: object) -> bool:
            self.lease.join_started()
            try:
                return bool(await rejoin(subscription))
            finally:
                self.lease.join_ended()

        coordinator._do_rejoin_group = joining

    async def _assigned(self, shards: frozenset[int]) -> None:
        self.rebalances += 1
        generation = self._generation()
        resumed = not (self.lease.expired_once or (self.current is not None and not self.lease.valid()))
        self.lease.expired_once = False
        self.lease.renew(time.monotonic())  # the join that led here was answered: a member until a session on
        hints = {s: m for s, m in self.assignor.handover_from.items() if s in shards and m != self.member}
        self.current = Assignment(generation, shards, resumed, hints)
        log.info("cluster_assigned", extra={"member": self.member, "generation": generation,
                                            "shards": sorted(shards)})
        await self._on_assignment(self.current)
        self.assigned.set()

    def _generation(self) -> int:
        """The group generation of this assignment. aiokafka keeps it on its (private) coordinator; without it,
        the count of rebalances seen, which still grows with every assignment of this process."""
        coordinator = getattr(self._consumer, "_coordinator", None)
        generation = getattr(coordinator, "generation", None)
        return generation if isinstance(generation, int) and generation >= 0 else self.rebalances
