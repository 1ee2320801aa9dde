"""The connections of the shards this replica owns in cluster mode (docs/CLUSTER.md).

One `ConnectionManager` per owned shard that has subscriptions, all under one connect limiter (OKX counts
connects per IP). A new assignment starts the managers of the shards gained and stops those of the shards
lost; stopping a manager closes its sockets only after every frame they received is in the inbox, so the
pipeline publishes everything the replica received before it let go. Shards kept are not touched.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence

from ingest.config import OkxSettings, WsSettings
from ingest.core.clock import ServerClock
from ingest.core.cluster import Ownership, StreamPosition, may_publish, shard_of, shard_of_arg, shards_of_args
from ingest.core.encoded import EncodedRecord
from ingest.core.events import Inbound
from ingest.credentials import CredentialStore
from ingest.io.cluster import Assignment, Lease
from ingest.io.delivery import Delivery
from ingest.io.positions import PositionStore
from ingest.io.state import SavedState
from ingest.io.ws import Connection
from ingest.io.ws_limiter import ConnectLimiter
from ingest.okx.channels import SubArg
from ingest.runtime import CANCEL_GRACE_S
from ingest.services.connections import ConnectionManager, ManagerStatus
from ingest.services.pipeline import Outlet, Pipeline

log = logging.getLogger(__name__)

#: Called with the shards gained (and their args) before their connections start: restore their positions.
GainHook = Callable[[Mapping[int, Sequence[SubArg]]], Awaitable[None]]


async def _no_hook(gained: Mapping[int, Sequence[SubArg]]) -> None:
    return None


class ShardConnections:
    """Every connection of the owned shards; a `Resubscriber` and a status like one `ConnectionManager`'s."""

    def __init__(self, okx: OkxSettings, ws: WsSettings, queue: asyncio.Queue[Inbound], args: Sequence[SubArg],
                 shards: int, *, credentials: CredentialStore | None = None, clock: ServerClock | None = None,
                 resync_clock: Callable[[], Awaitable[None]] | None = None, member: str = "") -> None:
        self._okx, self._ws, self._queue = okx, ws, queue
        self._credentials, self._clock, self._resync = credentials, clock, resync_clock
        self.shards = shards
        self.by_shard: Mapping[int, list[SubArg]] = shards_of_args(args, shards)
        self.limiter = ConnectLimiter(ws.connects_per_s)
        #: Set by the owner of the positions (services/cluster.py ClusterPositions.restore).
        self.on_gain: GainHook = _no_hook
        self._managers: dict[int, ConnectionManager] = {}
        self._tasks: dict[int, asyncio.Task[None]] = {}
        self._group: asyncio.TaskGroup | None = None
        self._wake = asyncio.Event()
        self._restart_all = False
        #: The generation whose shards the connections last matched (tests and readiness follow it).
        self.applied_generation = -1
        self.owned: frozenset[int] = frozenset()
        self.generation = -1
        self.member = member
        self.ownership: Ownership | None = None

    @property
    def connections(self) -> tuple[Connection, ...]:
        return tuple(c for m in self._managers.values() for c in m.connections)

    def args_owned(self) -> list[SubArg]:
        return [a for s in sorted(self.owned) for a in self.by_shard.get(s, ())]

    async def run(self) -> None:
        """Own the managers' tasks and carry out each new assignment, until cancelled; then every manager closes
        its sockets after its last frame."""
        async with asyncio.TaskGroup() as group:
            self._group = group
            try:
                while True:
                    await self._wake.wait()
                    self._wake.clear()
                    await self._reconcile()
            finally:
                self._group = None

    async def apply(self, assignment: Assignment) -> None:
        """Own exactly `assignment.shards` from now on. Called from the rebalance listener, so it returns at once
        (a member slow to finish its join misses heartbeats): the ownership, which the fence and the positions
        follow, changes now; the connections follow in `run` (lost shards drained, gained ones started)."""
        if not assignment.resumed:  # the session expired: every shard was someone else's meanwhile
            self._restart_all = True
        self.owned, self.generation = assignment.shards, assignment.generation
        base = self.ownership if assignment.resumed and self.ownership is not None else None
        self.ownership = (base.advance(assignment.generation, assignment.shards) if base is not None else
                          Ownership(self.member, assignment.generation,
                                    dict.fromkeys(assignment.shards, assignment.generation)))
        self._wake.set()

    async def _reconcile(self) -> None:
        """Make the running managers those of the shards owned now."""
        wanted = {s for s in self.owned if self.by_shard.get(s)}
        running = set(self._tasks)
        keep = set() if self._restart_all else running & wanted
        self._restart_all = False
        lost = sorted(running - keep)
        gained = sorted(wanted - keep)
        for shard in lost:
            await self._stop(shard)
        if gained:
            # The positions of the streams gained, before their first frame reaches the pipeline.
            await self.on_gain({s: self.by_shard[s] for s in gained})
        for shard in gained:
            if shard in self.owned:  # not lost again while the positions were read
                self._start(shard)
        self.applied_generation = self.generation
        log.info("cluster_shards_applied", extra={
            "generation": self.generation, "owned": len(self.owned), "gained": gained, "lost": lost,
            "subscriptions": sum(len(self.by_shard.get(s, ())) for s in self.owned)})
        if set(self._tasks) != {s for s in self.owned if self.by_shard.get(s)}:
            self._wake.set()  # the assignment changed meanwhile

    def _start(self, shard: int) -> None:
        args = self.by_shard.get(shard)
        if not args or self._group is None:
            return
        manager = ConnectionManager(self._okx, self._ws, self._queue, credentials=self._credentials,
                                    clock=self._clock, resync_clock=self._resync, args=list(args),
                                    limiter=self.limiter, name_prefix=f"s{shard}-")
        self._managers[shard] = manager
        self._tasks[shard] = self._group.create_task(manager.run(), name=f"shard-{shard}")

    async def _stop(self, shard: int) -> None:
        task = self._tasks.pop(shard, None)
        self._managers.pop(shard, None)
        if task is None:
            return
        task.cancel()
        # Its sockets close after their last frame is queued (bounded by ws.shutdown_timeout_s in each).
        await asyncio.wait({task}, timeout=self._ws.shutdown_timeout_s + CANCEL_GRACE_S)

    def request_resubscribe(self, arg: SubArg, reason: str) -> None:
        manager = self._managers.get(shard_of_arg(arg, self.shards))
        if manager is None:
            log.warning("ws_resubscribe_ignored", extra={"arg": str(arg), "reason": reason,
                                                         "why": "its shard is not owned here"})
            return
        manager.request_resubscribe(arg, reason)

    def status(self) -> ManagerStatus:
        parts = [m.status() for m in self._managers.values()]
        stopped: dict[str, str] = {}
        for p in parts:
            stopped.update(p.stopped)
        return ManagerStatus(tuple(c for p in parts for c in p.connections), self.limiter.admitted, stopped)


class ClusterPositions:
    """The owner's side of `<prefix>positions`: every `interval_s`, the position of each stream of the shards it
    owns, once every record before it is acknowledged by Kafka; and on a takeover, the positions of the gained
    shards' streams restored into the pipeline, so the time nobody recorded them becomes gap events with the
    pipeline's usual bounds (the predecessor's last acknowledged position -> the first record here)."""

    def __init__(self, pipeline: Pipeline, delivery: Delivery, store: PositionStore, shards: ShardConnections,
                 member: str, interval_s: float, lease: Lease | None = None) -> None:
        self.pipeline, self.delivery, self.store, self.shards = pipeline, delivery, store, shards
        self.member = member
        self.interval_s = interval_s
        self.restored = 0
        self.lease = lease
        shards.on_gain = self.restore

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)  # a periodic timer, not synchronisation
            try:
                await self.save()
            except Exception as exc:  # a position not written costs a longer takeover gap, never the recording
                log.error("positions_not_saved", extra={"error": f"{type(exc).__name__}: {exc}"[:500]})

    async def save(self) -> int:
        """Write the acknowledged positions of the streams of the shards owned now; how many were written."""
        generation, owned = self.shards.generation, self.shards.owned
        await self.pipeline.between_batches()
        streams, _ = self.pipeline.checkpoint()  # no await since: it matches what delivery was handed
        saved_at, accepted = time.time_ns(), self.delivery.stats.records_in
        # Acknowledged, not merely journaled: a replica that takes over reads Kafka, not this disk.
        await self.delivery.wait_for(
            lambda d: d.failed or d.records_in - d.queued - d.journal_records >= accepted)
        if self.delivery.stats.failed or self.shards.generation != generation or (
                self.lease is not None and not self.lease.valid()):
            return 0  # a rebalance in between: the next save writes what is owned then
        mine = []
        for cp in streams:
            shard = shard_of_arg(cp.arg, self.shards.shards)
            if shard in owned and cp.arg in self.shards.by_shard.get(shard, ()):
                mine.append(StreamPosition(shard, self.member, generation, saved_at, cp))
        return await self.store.write(mine)

    async def restore(self, gained: Mapping[int, Sequence[SubArg]]) -> None:
        """Continue the streams of the shards gained where their last owner's acknowledged positions stand."""
        try:
            positions = await self.store.read()
        except Exception as exc:
            log.error("positions_unread", extra={"error": f"{type(exc).__name__}: {exc}"[:500],
                                                 "effect": "the takeover gap of these shards is not reported"})
            return
        args = [a for s in gained.values() for a in s]
        wanted = set(args)
        restored = 0
        for arg, p in positions.items():
            if arg in wanted:
                restored += self.pipeline.restore(SavedState(p.saved_ts_ns, (p.checkpoint,)), args)
        self.restored += restored
        log.info("positions_restored", extra={"shards": sorted(gained), "streams": restored,
                                              "from": sorted({p.member for a, p in positions.items()
                                                              if a in wanted})})


#: Connection ids in cluster mode start with their shard (`s17-public-0#...`, see ShardConnections._start).
_CONN_SHARD = re.compile(rb"^s([0-9]+)-[^#]*#")


def record_shard(record: EncodedRecord, gaps_topic: str, shards: int) -> int | None:
    """The shard a record belongs to: by the connection that received it (raw frames, dead letters), the
    instrument of a gap's stream, or the instrument key of market data; None when it names none."""
    key = record.key
    if not key:
        return None
    m = _CONN_SHARD.match(key)
    if m is not None:
        return int(m.group(1))
    if record.topic == gaps_topic:
        key = key.partition(b":")[2]
        if not key:
            return None
    return shard_of(key.decode(errors="replace"), shards)


class FencedOutlet:
    """In front of delivery in cluster mode: a record goes on only while this replica's lease holds and it owns
    the record's shard; it then carries `owner`, `generation` and `shard` headers. Anything else is dropped and
    counted (`fenced`): a replica woken from a pause past its session publishes nothing for shards that moved,
    even before its next heartbeat tells it so."""

    def __init__(self, delivery: Outlet, shards: ShardConnections, lease: Lease, gaps_topic: str) -> None:
        self.delivery, self.shards, self.lease = delivery, shards, lease
        self.gaps_topic = gaps_topic
        self.fenced = 0
        self._member = shards.member.encode()

    async def put_many(self, records: Sequence[EncodedRecord]) -> None:
        own = self.shards.ownership
        if own is None or not self.lease.valid():
            self._drop(len(records), "lease expired" if own is not None else "no assignment")
            return
        out: list[EncodedRecord] = []
        generation = str(own.generation).encode()
        count = self.shards.shards
        for rec in records:
            shard = record_shard(rec, self.gaps_topic, count)
            if shard is None:
                out.append(rec._replace(headers=(*rec.headers, ("owner", self._member), ("generation", generation))))
            elif may_publish(own, own.member, own.generation, shard):
                out.append(rec._replace(headers=(*rec.headers, ("owner", self._member), ("generation", generation),
                                                 ("shard", str(shard).encode()))))
            else:
                self._drop(1, f"shard {shard} not owned")
        if out:
            await self.delivery.put_many(out)

    def _drop(self, n: int, why: str) -> None:
        if n and not self.fenced:
            log.warning("cluster_fenced", extra={"records": n, "why": why, "effect": "dropped: another replica owns "
                                                 "them now (logged once; see the fenced metric)"})
        self.fenced += n
