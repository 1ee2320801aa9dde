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
from ingest.core.handover import unit_of
from ingest.core.identity import EVENT_KEY_HEADER
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
from ingest.services.copies import CopyArbiter
from ingest.services.handover import HANDOVER_GAP_REASON, Handovers
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
                 resync_clock: Callable[[], Awaitable[None]] | None = None, member: str = "",
                 copy: int | None = None) -> None:
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
        self._hints: dict[int, str] = {}
        #: Gained shards taken over by hand-over (their positions open a gap a completed hand-over drops).
        self.prepared_from: dict[int, str] = {}
        #: The generation whose shards the connections last matched (tests and readiness follow it).
        self.applied_generation = -1
        self.owned: frozenset[int] = frozenset()
        self.generation = -1
        self.member = member
        #: This replica's copy with `cluster.copies` > 1 (stamped on every record), else None.
        self.copy = copy
        self.ownership: Ownership | None = None
        #: Make-before-break hand-over of planned moves (None: shards move as takeovers).
        self.handovers: Handovers | None = None
        #: Each shard's streams' last published position (the fence keeps it; a release starts from it).
        self.last_published: dict[int, dict[str, int]] = {}

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
        elif self.handovers is not None and self.ownership is not None:
            # Lost while alive and in good standing: keep recording them until the new owner has them.
            self.handovers.lost(self.owned - assignment.shards, self.generation, self.last_published)
        if self.handovers is not None:
            self.handovers.regained(assignment.shards)
        self._hints = dict(assignment.handover_from)
        self.owned, self.generation = assignment.shards, assignment.generation
        base = self.ownership if assignment.resumed and self.ownership is not None else None
        self.ownership = (base.advance(assignment.generation, assignment.shards) if base is not None else
                          Ownership(self.member, assignment.generation,
                                    dict.fromkeys(assignment.shards, assignment.generation)))
        self._wake.set()

    async def _reconcile(self) -> None:
        """Make the running managers those of the shards owned now."""
        releasing = self.handovers.releasing if self.handovers is not None else frozenset()
        wanted = {s for s in self.owned | releasing if self.by_shard.get(s)}
        running = set(self._tasks)
        keep = set() if self._restart_all else running & wanted
        self._restart_all = False
        lost = sorted(running - keep)
        gained = sorted(wanted - keep)
        for shard in lost:
            await self._stop(shard)
        if gained and self.handovers is not None:
            self.prepared_from = await self.handovers.gained(gained, self.generation, self._hints)
        if gained:
            # The positions of the streams gained, before their first frame reaches the pipeline.
            await self.on_gain({s: self.by_shard[s] for s in gained})
        for shard in gained:
            if shard in self.owned:  # not lost again while the positions were read
                if self.handovers is not None:
                    self.handovers.started(shard)
                self._start(shard)
        self.applied_generation = self.generation
        log.info("cluster_shards_applied", extra={
            "generation": self.generation, "owned": len(self.owned), "gained": gained, "lost": lost,
            "subscriptions": sum(len(self.by_shard.get(s, ())) for s in self.owned)})
        releasing = self.handovers.releasing if self.handovers is not None else frozenset()
        if set(self._tasks) != {s for s in self.owned | releasing if self.by_shard.get(s)}:
            self._wake.set()  # the assignment changed meanwhile

    @property
    def recording(self) -> frozenset[int]:
        """Owned shards whose connections run here: a shard just assigned is not one until its positions were
        restored and its connections started (until then this replica's state of its streams is stale)."""
        return self.owned & frozenset(self._tasks)

    def shard_live(self, shard: int) -> bool:
        """Whether every connection of a shard is live (its subscriptions acknowledged)."""
        manager = self._managers.get(shard)
        if manager is None:
            return False
        status = manager.status()
        return bool(status.connections) and status.live == len(status.connections)

    def wake(self, shard: int | None = None) -> None:
        """Reconcile again (a release ended: its shard's connections close)."""
        self._wake.set()

    async def leave(self) -> None:
        """A clean stop of a dynamic member: own nothing from now on and release every shard (the positions
        are no longer written for them; the fence lets them through while they are released). The last member
        (owning every shard) has nobody to hand to and keeps them to the end."""
        if self.handovers is None or self.ownership is None:
            return
        owned = self.owned
        if owned >= frozenset(range(self.shards)):
            # The last member: nobody to hand to. It keeps owning every shard until its connections close, so
            # what they still deliver is published and the stop writes their positions (for the next start).
            await self.handovers.leave(owned, self.generation, self.last_published, everything=True)
            return
        self.owned = frozenset()
        self.ownership = Ownership(self.member, self.generation, {})
        await self.handovers.leave(owned, self.generation, self.last_published)

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
                 member: str, interval_s: float, lease: Lease | None = None,
                 fence: FencedOutlet | None = None, arbiter: CopyArbiter | None = None) -> None:
        self.pipeline, self.delivery, self.store, self.shards = pipeline, delivery, store, shards
        self.fence = fence
        #: With copies: streams with a gap held back keep their older position (services/copies.py).
        self.arbiter = arbiter
        self.copy = shards.copy or 0
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
        # Not `owned`: a shard assigned a moment ago still has this replica's stale positions (from when it was
        # here before), and writing them would overwrite its last owner's, which its restore is about to read.
        generation, owned = self.shards.generation, self.shards.recording
        if self.shards.handovers is not None:  # held records are not on the topic: neither are their positions
            owned = owned - self.shards.handovers.holding
        await self.pipeline.between_batches()
        if self.fence is not None:
            # The pipeline's positions include what the fence holds for a lapsed lease: handed to delivery
            # first, or (the lease still expired) no position is saved below.
            await self.fence.release_held()
        streams, _ = self.pipeline.checkpoint()  # no await since: it matches what delivery was handed
        # Streams with a gap the arbiter holds now: a gap it publishes during the wait below is not in `accepted`.
        held = self.arbiter.holding if self.arbiter is not None else frozenset()
        saved_at, accepted = time.time_ns(), self.delivery.stats.records_in
        # Acknowledged, not merely journaled: a replica that takes over reads Kafka, not this disk.
        await self.delivery.wait_for(
            lambda d: d.failed or d.records_in - d.queued - d.journal_records >= accepted)
        if self.delivery.stats.failed or self.shards.generation != generation or (
                self.lease is not None and not self.lease.valid()):
            return 0  # a rebalance in between: the next save writes what is owned then
        mine = []
        holding = held | self.arbiter.holding if self.arbiter is not None else held
        for cp in streams:
            shard = shard_of_arg(cp.arg, self.shards.shards)
            if shard in owned and cp.arg in self.shards.by_shard.get(shard, ()) and cp.arg not in holding:
                mine.append(StreamPosition(shard, self.member, generation, saved_at, cp, self.copy))
        return await self.store.write(mine)

    async def restore(self, gained: Mapping[int, Sequence[SubArg]]) -> None:
        """Continue the streams of the shards gained where their last owner's acknowledged positions stand."""
        try:
            positions = await self.store.read(copy=self.copy)
        except Exception as exc:
            log.error("positions_unread", extra={"error": f"{type(exc).__name__}: {exc}"[:500],
                                                 "effect": "the takeover gap of these shards is not reported"})
            return
        args = [a for s in gained.values() for a in s]
        wanted = set(args)
        prepared = {a for s, sargs in gained.items() if s in self.shards.prepared_from for a in sargs}
        restored = 0
        for arg, p in positions.items():
            if arg in wanted:
                reason = HANDOVER_GAP_REASON if arg in prepared else "the recorder was not running"
                restored += self.pipeline.restore(SavedState(p.saved_ts_ns, (p.checkpoint,)), args, reason=reason)
        self.restored += restored
        log.info("positions_restored", extra={"shards": sorted(gained), "streams": restored,
                                              "from": sorted({p.member for a, p in positions.items()
                                                              if a in wanted})})


#: Connection ids in cluster mode start with their shard (`s17-public-0#...`, see ShardConnections._start).
_CONN_SHARD = re.compile(rb"^s([0-9]+)-[^#]*#")


def _note_unit(last: dict[int, dict[str, int]], shard: int, key: bytes) -> bool:
    unit = unit_of(key.decode(errors="replace"))
    if unit is not None and unit[1] is not None:
        last.setdefault(shard, {})[unit[0]] = unit[1]
        return True
    return False


def _event_key(headers: Headers) -> bytes | None:
    """The `event_key` header: fourth where the encoder puts it (schema, record_id, source, event_key)."""
    if len(headers) > 3 and headers[3][0] == EVENT_KEY_HEADER:
        return headers[3][1]
    for name, value in headers:
        if name == EVENT_KEY_HEADER:
            return value
    return None


def _stream_prefix(event_key: bytes) -> bytes:
    """`channel:instId` of an event key, as bytes (what `unit_of` calls the stream)."""
    return event_key[:event_key.find(b":", event_key.find(b":") + 1)]


def _note_batch(last: dict[int, dict[str, int]], published: Sequence[tuple[int, EncodedRecord]]) -> None:
    """Remember each stream's last published position (where a release of its shard starts from), parsing
    only each stream's last event key of the batch (records of one stream are in order, so the last with a
    position is the one that counts)."""
    latest: dict[tuple[int, bytes], bytes] = {}
    for shard, rec in published:
        key = _event_key(rec.headers)
        if key is not None:
            latest[shard, _stream_prefix(key)] = key
    todo = {slot for slot, key in latest.items() if not _note_unit(last, slot[0], key)}
    if todo:  # its last record has no position (a book without seqId): the last one that has
        for shard, rec in reversed(published):
            key = _event_key(rec.headers)
            if key is not None:
                slot = (shard, _stream_prefix(key))
                if slot in todo and _note_unit(last, shard, key):
                    todo.discard(slot)
                    if not todo:
                        return


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


Headers = tuple[tuple[str, bytes], ...]


class FencedOutlet:
    """In front of delivery in cluster mode: a record goes on only while this replica's lease holds and it owns
    the record's shard (or a hand-over of the shard lets it through, services/handover.py); it then carries
    `owner`, `generation` and `shard` headers. Records of shards that moved are dropped and counted (`fenced`):
    a replica woken from a pause past its session publishes nothing for shards that moved, even before its next
    heartbeat tells it so.

    While the lease is expired but the assignment still names the shard, records are held, not dropped: the
    broker may still count this member (a heartbeat late by less than the 10% margin of the lease, a broker
    restart), and then keeps its shards, so nobody else records them. The next assignment decides: shards kept
    without interruption get their held records published, in order, before anything newer; shards gone (or
    every shard, after a rejoin with an expired session) drop them, the new owner's takeover gap covering them.
    The hold is bounded (`hold_max_bytes`); what it cannot take is dropped and logged as lost."""

    #: Entries of the instrument -> shard caches before they are cleared (keys are instruments and connection
    #: ids: a handful per shard, so the bound only matters for a replica reconnecting for weeks).
    CACHE_MAX = 65_536

    def __init__(self, delivery: Outlet, shards: ShardConnections, lease: Lease, gaps_topic: str,
                 hold_max_bytes: int = 64 << 20) -> None:
        self.delivery, self.shards, self.lease = delivery, shards, lease
        self.gaps_topic = gaps_topic
        self.fenced = 0
        self.hold_max_bytes = hold_max_bytes
        #: Records held while the lease was expired (see the class): (record, its generation, its shard).
        self._held: list[tuple[EncodedRecord, int, int | None]] = []
        self._held_bytes = 0
        self._hold_logged = False
        self._member = shards.member.encode()
        self._by_key: dict[bytes, int | None] = {}
        self._by_gap_key: dict[bytes, int | None] = {}
        # Derived from one Ownership (rebuilt when the assignment changes): the header tail of each shard
        # publishable now (None: records that name no shard).
        self._own: Ownership | None = None
        self._tails: dict[int | None, Headers] = {}

    @property
    def held(self) -> int:
        """Records held for an expired lease (no position is saved while any are)."""
        return len(self._held)

    def _shard(self, rec: EncodedRecord) -> int | None:
        key = rec.key
        if not key:
            return None
        cache = self._by_gap_key if rec.topic == self.gaps_topic else self._by_key
        try:
            return cache[key]
        except KeyError:
            shard = record_shard(rec, self.gaps_topic, self.shards.shards)
            if len(cache) >= self.CACHE_MAX:
                cache.clear()
            cache[key] = shard
            return shard

    def _tails_for(self, own: Ownership) -> dict[int | None, Headers]:
        if own is not self._own:
            self._own = own
            gen = own.generation
            self._tails = {None: self._stamp(gen, None)}
            self._tails.update((s, self._stamp(gen, s)) for s in own.since if may_publish(own, own.member, gen, s))
        return self._tails

    def _stamp(self, generation: int, shard: int | None) -> Headers:
        tail: Headers = (("owner", self._member), ("generation", str(generation).encode()))
        if self.shards.copy is not None:
            tail = (*tail, ("copy", str(self.shards.copy).encode()))
        return tail if shard is None else (*tail, ("shard", str(shard).encode()))

    async def put_many(self, records: Sequence[EncodedRecord]) -> None:
        handovers = self.shards.handovers
        if handovers is None:
            await self._put(records, None)
            return
        async with handovers.lock:  # records a completed hand-over releases go out before later ones
            await self._put(records, handovers)

    async def _put(self, records: Sequence[EncodedRecord], handovers: Handovers | None) -> None:
        own = self.shards.ownership
        if own is None:
            self._drop(len(records), "no assignment")
            return
        valid = self.lease.valid()
        if not valid and (handovers is None or not handovers.releases):
            self._hold(own, records)
            return
        out: list[EncodedRecord] = self._release(own) if valid and self._held else []
        tails = self._tails_for(own) if valid else {}
        shard_of_record = self._shard
        noted: list[tuple[int, EncodedRecord]] | None = [] if handovers is not None else None
        hold: list[EncodedRecord] = []
        dropped = 0
        for rec in records:
            shard = shard_of_record(rec)
            tail = tails.get(shard)
            if shard is not None and handovers is not None and handovers.involved(shard):
                if not handovers.filter(shard, rec, tail is not None):
                    continue
                if tail is None:
                    tail = self._stamp(own.generation, shard)
            elif tail is None:
                if not valid and (shard is None or shard in own.since):
                    hold.append(rec)  # the lease lapsed while a hand-over releases: held like the rest
                else:
                    dropped += 1
                continue
            if noted is not None and shard is not None:
                noted.append((shard, rec))
            out.append(EncodedRecord(rec.topic, rec.key, rec.value, rec.headers + tail, rec.ts_ms))
        if noted:
            _note_batch(self.shards.last_published, noted)
        if dropped:
            self._drop(dropped, "shard not owned")
        if hold:
            self._hold(own, hold)
        if out:
            await self.delivery.put_many(out)

    async def deliver(self, records: Sequence[EncodedRecord]) -> None:
        """Records a hand-over releases from its hold (already decided: stamped and delivered)."""
        own = self.shards.ownership
        generation = own.generation if own is not None else -1
        out = []
        noted: list[tuple[int, EncodedRecord]] = []
        for rec in records:
            shard = self._shard(rec)
            if shard is not None:
                noted.append((shard, rec))
            out.append(EncodedRecord(rec.topic, rec.key, rec.value, rec.headers + self._stamp(generation, shard),
                                     rec.ts_ms))
        _note_batch(self.shards.last_published, noted)
        await self.delivery.put_many(out)

    async def release_held(self) -> None:
        """Publish (or drop, see the class) what was held, once the lease is valid again: called between
        batches by the positions' timer, so a quiet stream's held records do not wait for its next record."""
        own = self.shards.ownership
        if not self._held or own is None or not self.lease.valid():
            return
        handovers = self.shards.handovers
        if handovers is None:
            out = self._release(own)
        else:
            async with handovers.lock:
                out = self._release(own)
        if out:
            await self.delivery.put_many(out)

    def _hold(self, own: Ownership, records: Sequence[EncodedRecord]) -> None:
        gen = own.generation
        lost = 0
        for rec in records:
            shard = self._shard(rec)
            if shard is not None and shard not in own.since:
                lost += 1  # not ours even by the last assignment
                continue
            size = len(rec.value)
            if self._held_bytes + size > self.hold_max_bytes:
                lost += 1
                if not self._hold_logged:
                    self._hold_logged = True
                    log.error("cluster_hold_full", extra={
                        "held": len(self._held), "bytes": self._held_bytes,
                        "effect": "records of owned shards dropped while the lease is expired: lost unless the "
                                  "shard moves (its takeover gap is backfilled); see the fenced metric"})
                continue
            self._held.append((rec, gen, shard))
            self._held_bytes += size
        self._drop(lost, "lease expired")

    def _release(self, own: Ownership) -> list[EncodedRecord]:
        """The held records the current ownership still allows, stamped with the generation they were made in."""
        out: list[EncodedRecord] = []
        dropped = 0
        noted: list[tuple[int, EncodedRecord]] = []
        for rec, gen, shard in self._held:
            if shard is not None and not may_publish(own, own.member, gen, shard):
                dropped += 1
                continue
            if shard is not None:
                noted.append((shard, rec))
            out.append(EncodedRecord(rec.topic, rec.key, rec.value, rec.headers + self._stamp(gen, shard),
                                     rec.ts_ms))
        if self.shards.handovers is not None:
            _note_batch(self.shards.last_published, noted)
        log.info("cluster_hold_released", extra={"published": len(out), "dropped": dropped})
        self._held, self._held_bytes, self._hold_logged = [], 0, False
        self._drop(dropped, "held through an expired lease; the shard moved meanwhile")
        return out

    def _drop(self, n: int, why: str) -> None:
        if n and not self.fenced:
            log.warning("cluster_fenced", extra={"records": n, "why": why, "effect": "dropped: another replica owns "
                                                 "them now (logged once; see the fenced metric)"})
        self.fenced += n
