"""Make-before-break hand-over of shards between live replicas (docs/CLUSTER.md, "Planned moves").

The old owner of a shard that moves keeps recording and publishing it (*releasing*) while the new owner
subscribes it and holds its records (*preparing*). The new owner writes `prepared` (each stream's first held
position) to the shard's control partition; the old owner publishes each stream until it has published a
record at or past that position, stops there (the cut), writes `released` and closes the shard's connections;
the new owner then publishes what lies past each cut and drops the rest. No gap event, no duplicate. Bounded by
`cluster.handover_timeout_s` on both sides: the old owner then simply stops, the new owner publishes everything
it held (the takeover path: the positions topic bounds the gap, the backfill fills it; nothing is dropped).

The decisions are `core.handover`'s; this drives them: it classifies records for the fence, writes and reads
the control records (`io.handover.ControlChannel`), and times the steps.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from ingest.core.avro import decode
from ingest.core.encoded import EncodedRecord
from ingest.core.handover import Hold, Leaving, Prepared, Release, Released, Taken, unit_of
from ingest.core.identity import EVENT_KEY_HEADER
from ingest.core.records import GapEvent
from ingest.io.handover import ControlChannel
from ingest.okx.channels import SubArg

log = logging.getLogger(__name__)

#: The reason of the gap the positions topic opens for a stream gained by hand-over: a completed hand-over drops
#: it (the old owner's cut proves nothing is missing), a fallback publishes it.
HANDOVER_GAP_REASON = "moved to this replica by a planned hand-over that did not complete"
#: The new owner writes `prepared` when every stream has a first record, or after this long (quiet streams).
PREPARE_WAIT_S = 2.0
#: After `prepared`, the old owner cuts the streams the new owner had not seen yet after this long.
QUIET_CUT_S = 1.0
#: How long a gaining replica waits to read the control partitions up to now (a `leaving` just written).
CATCH_UP_S = 2.0
TICK_S = 0.05
#: Upper bounds of the hand-over duration histogram (seconds).
DURATION_BUCKETS = (0.5, 1.0, 2.0, 3.0, 5.0, 10.0, 20.0, 30.0, 60.0)


def stream_name(arg: SubArg) -> str | None:
    """The stream of an arg as event keys name it (`channel:instId`); None for args not scoped by one instId."""
    return f"{arg.channel}:{arg.inst_id}" if arg.inst_id else None


def _event_key(rec: EncodedRecord) -> str | None:
    for name, value in rec.headers:
        if name == EVENT_KEY_HEADER:
            return value.decode(errors="replace")
    return None


@dataclass
class HandoverStats:
    results: dict[str, int] = field(default_factory=lambda: dict.fromkeys(
        ("completed", "fallback", "released", "release_timeout", "release_preempted"), 0))
    durations: list[float] = field(default_factory=list)
    dropped: int = 0


class Handovers:
    """Every shard this replica prepares (`holds`) or releases (`releases`)."""

    def __init__(self, channel: ControlChannel, member: str, by_shard: Mapping[int, Sequence[SubArg]],
                 timeout_s: float, gaps_topic: str, *, monotonic: Callable[[], float] = time.monotonic) -> None:
        self.channel, self.member, self.timeout_s = channel, member, timeout_s
        self.gaps_topic = gaps_topic
        self.streams = {s: [n for n in (stream_name(a) for a in args) if n is not None] for s, args in by_shard.items()}
        self.holds: dict[int, Hold[EncodedRecord]] = {}
        self.releases: dict[int, Release] = {}
        #: A `prepared` for this replica or a `taken` read before this replica learnt it lost the shard (the
        #: group's members learn a new assignment at different moments): applied to the release when it starts.
        self._early: dict[int, Prepared | Taken] = {}
        #: Streams of shards released completely whose window after the cut is still open.
        self._windows: dict[int, Hold[EncodedRecord]] = {}
        self._monotonic = monotonic
        self.stats = HandoverStats()
        #: Whether a shard's connections are all live (subscribed): `prepared` is timed from then, so a stream
        #: quiet at the new owner is cut only once the new owner receives it.
        self.is_live: Callable[[int], bool] = lambda shard: True
        self._live: set[int] = set()
        #: Called when a release ended (the shard's connections can close now).
        self.on_released: Callable[[int], None] = lambda shard: None
        #: The fence's lock: records released from a hold go out before any later record of their shard.
        self.lock = asyncio.Lock()
        self._ended = asyncio.Event()
        #: Where records released from a hold go (set by the fence: its delivery).
        self.deliver: Callable[[Sequence[EncodedRecord]], Awaitable[None]] | None = None

    # ---- what the fence asks ---------------------------------------------------------------------------

    def involved(self, shard: int) -> bool:
        return shard in self.holds or shard in self.releases or shard in self._windows

    @property
    def holding(self) -> frozenset[int]:
        return frozenset(self.holds)

    @property
    def releasing(self) -> frozenset[int]:
        return frozenset(self.releases)

    def filter(self, shard: int, rec: EncodedRecord, owned: bool) -> bool:
        """Whether `rec` of `shard` goes out now (False: held, or after the cut, or not ours)."""
        hold = self.holds.get(shard)
        key = _event_key(rec)
        unit = unit_of(key) if key is not None else None
        if hold is not None:
            if rec.topic == self.gaps_topic:
                gap = self._handover_gap(rec)
                hold.offer(gap, None, rec, handover_gap=gap is not None)
            elif unit is None:
                hold.offer(None, None, rec)
            else:
                hold.offer(unit[0], unit[1], rec)
            return False
        window = self._windows.get(shard)
        if window is not None and unit is not None:
            keep = window.after_release(unit[0], unit[1])
            if not window.window:
                del self._windows[shard]
            if not keep:
                self.stats.dropped += 1
                return False
        release = self.releases.get(shard)
        if release is not None and not owned:
            if unit is None:
                return not release.done() and not release.expired(self._monotonic())
            return release.allow(unit[0], unit[1]) and not release.expired(self._monotonic())
        return owned

    def _handover_gap(self, rec: EncodedRecord) -> str | None:
        """The stream of a gap event that is the hand-over's own (opened from the positions topic), else None."""
        try:
            gap = decode(rec.value)
        except Exception:  # an undecodable record is published like any other
            return None
        if isinstance(gap, GapEvent) and gap.reason == HANDOVER_GAP_REASON and gap.inst_id:
            return f"{gap.channel}:{gap.inst_id}"
        return None

    # ---- what the connections tell ---------------------------------------------------------------------

    def lost(self, shards: Iterable[int], generation: int, last: Mapping[int, Mapping[str, int]]) -> None:
        """Shards this live replica lost (a rebalance, or its own clean stop): it releases them."""
        now = self._monotonic()
        for s in shards:
            if s in self.releases or not self.streams.get(s):
                continue
            early = self._early.pop(s, None)
            if isinstance(early, Taken) and early.generation > generation:
                self.stats.results["release_preempted"] += 1
                log.info("handover_release_ended", extra={"shard": s, "result": "release_preempted", "seconds": 0.0,
                                                          "to": None, "why": f"{early.member} took it over"})
                continue
            rel = self.releases[s] = Release(s, generation, self.streams[s], self.timeout_s,
                                             dict(last.get(s, {})), started=now)
            log.info("handover_releasing", extra={"shard": s, "generation": generation})
            if isinstance(early, Prepared):  # the new owner was quicker than this replica's own assignment
                rel.on_prepared(early, now)

    def regained(self, shards: Iterable[int]) -> None:
        """Shards assigned back while being released: they are simply kept (still recorded and published here)."""
        for s in shards:
            if self.releases.pop(s, None) is not None:
                log.info("handover_release_cancelled", extra={"shard": s, "why": "assigned back to this replica"})

    async def gained(self, gained: Sequence[int], generation: int, hints: Mapping[int, str]) -> dict[int, str]:
        """Which gained shards come from a live predecessor (shard -> it): the leader said so, or the shard's
        latest control record is a recent `leaving` of another member. The others are taken over as before."""
        out = {s: m for s, m in hints.items() if s in gained and m != self.member}
        rest = [s for s in gained if s not in out]
        if rest and self.timeout_s > 0:
            await self.channel.caught_up(CATCH_UP_S)
            now_ns = time.time_ns()
            for s in rest:
                msg = self.channel.latest.get(s)
                if (isinstance(msg, Leaving) and msg.member != self.member
                        and now_ns - msg.ts_ns < self.timeout_s * 1e9):
                    out[s] = msg.member
        now = self._monotonic()
        for s in gained:
            if s in out and self.streams.get(s):
                self.holds[s] = Hold(s, out[s], generation, self.streams[s], now, self.timeout_s)
                log.info("handover_preparing", extra={"shard": s, "from": out[s], "generation": generation})
        for s in gained:
            if s not in self.holds:
                await self._send(Taken(s, self.member, generation, time.time_ns()))
        return {s: out[s] for s in self.holds if s in out}

    def started(self, shard: int) -> None:
        """The shard's connections start now: `prepared` is timed from here."""
        hold = self.holds.get(shard)
        if hold is not None:
            hold.started = self._monotonic()

    async def leave(self, shards: Iterable[int], generation: int, last: Mapping[int, Mapping[str, int]], *,
                    everything: bool = False) -> None:
        """A clean stop: release every shard, and say so on each shard's control partition before leaving the
        group, so whoever gets it next prepares it instead of taking it over. A member that owns `everything`
        (every shard) is the last one: there is nobody to hand to, so it releases nothing (waiting for a
        `prepared` that cannot come would only delay the stop by the whole bound)."""
        owned = sorted(shards)
        for s in list(self.holds):  # nothing is lost: what was held is published (the takeover path)
            await self._fallback(s, "this replica is stopping", announce=False)
        if everything:
            log.info("handover_not_needed", extra={"shards": len(owned),
                                                   "why": "the last member owns every shard: nobody to hand to"})
            return
        self.lost(owned, generation, last)
        for s in owned:
            await self._send(Leaving(s, self.member, generation, time.time_ns()))

    async def wait_released(self, timeout_s: float) -> None:
        try:
            async with asyncio.timeout(timeout_s):
                while self.releases:
                    self._ended.clear()
                    await self._ended.wait()
        except TimeoutError:
            log.error("handover_release_unfinished", extra={"shards": sorted(self.releases)})

    # ---- driving ---------------------------------------------------------------------------------------

    async def run(self) -> None:
        async with asyncio.TaskGroup() as group:
            group.create_task(self.channel.run(), name="handover-reader")
            while True:
                await asyncio.sleep(TICK_S)  # a periodic timer: the steps below are timed
                await self.step()

    async def step(self) -> None:
        """Handle the control records read, then whatever is due now."""
        while not self.channel.messages.empty():
            await self.on_message(self.channel.messages.get_nowait())
        now = self._monotonic()
        for s, hold in list(self.holds.items()):
            if s not in self._live:
                if not self.is_live(s):
                    if hold.expired(now):
                        await self._fallback(s, "its connections did not come up in time", announce=True)
                    continue
                self._live.add(s)
                hold.started = now  # the quiet wait and the timeout count from the subscriptions
            if hold.ready(now, PREPARE_WAIT_S):
                hold.prepared = True
                await self._send(Prepared(s, self.member, hold.generation, hold.source, dict(hold.first),
                                          time.time_ns()))
                log.info("handover_prepared", extra={"shard": s, "from": hold.source, "streams": len(hold.first)})
            elif hold.expired(now):
                await self._fallback(s, "no released record in time", announce=True)
        for s, rel in list(self.releases.items()):
            rel.tick(now, QUIET_CUT_S)
            if rel.done():
                await self._send(rel.released(self.member, time.time_ns()))
                self._end_release(s, "released", now - rel.started)
            elif rel.expired(now):
                if rel.target is None:  # no new owner came: the cut is a gap, bounded by the positions topic
                    log.error("handover_release_timeout", extra={
                        "shard": s, "cuts": {k: rel.last.get(k) for k in rel.streams},
                        "effect": "cut before any prepared record: the next owner's gap (from the positions topic) "
                                  "covers it"})
                self._end_release(s, "release_timeout", now - rel.started)

    async def on_message(self, msg: object) -> None:
        if isinstance(msg, Prepared):
            rel = self.releases.get(msg.shard)
            if msg.source == self.member and msg.member != self.member:
                if rel is not None:
                    rel.on_prepared(msg, self._monotonic())
                else:
                    self._early[msg.shard] = msg
        elif isinstance(msg, Taken):
            rel = self.releases.get(msg.shard)
            if msg.member != self.member:
                if rel is None:
                    self._early[msg.shard] = msg
                elif msg.generation > rel.generation:
                    rel.stop_now()
                    self._end_release(msg.shard, "release_preempted", self._monotonic() - rel.started)
        elif isinstance(msg, Released):
            hold = self.holds.get(msg.shard)
            if (hold is not None and msg.to == self.member and msg.member == hold.source
                    and msg.generation == hold.generation):
                await self._complete(msg.shard, hold, msg)

    async def _complete(self, shard: int, hold: Hold[EncodedRecord], msg: Released) -> None:
        async with self.lock:
            out, dropped = hold.release(msg.cuts)
            del self.holds[shard]
            self._live.discard(shard)
            if hold.window:
                self._windows[shard] = hold
            self.stats.dropped += dropped
            if out and self.deliver is not None:
                await self._deliver_released(shard, out)
        took = self._monotonic() - hold.started
        self.stats.results["completed"] += 1
        self.stats.durations.append(took)
        log.info("handover_completed", extra={"shard": shard, "from": hold.source, "seconds": round(took, 3),
                                              "published": len(out), "dropped": dropped})

    async def _deliver_released(self, shard: int, out: list[EncodedRecord]) -> None:
        """Records released from a hold pass the release filter too (a shard prepared here and lost again)."""
        assert self.deliver is not None
        if shard in self.releases:
            out = [r for r in out if self.filter(shard, r, owned=False)]
        if out:
            await self.deliver(out)

    async def _fallback(self, shard: int, why: str, *, announce: bool) -> None:
        """Publish everything held (the takeover path). With `announce` (a timeout: this replica keeps the shard)
        it also writes `taken`, so an old owner still releasing stops publishing instead of holding on."""
        hold = self.holds.get(shard)
        if hold is None:
            return
        self._live.discard(shard)
        async with self.lock:
            del self.holds[shard]
            out = hold.fallback()
            if out and self.deliver is not None:
                await self._deliver_released(shard, out)
        if announce:
            await self._send(Taken(shard, self.member, hold.generation, time.time_ns()))
        self.stats.results["fallback"] += 1
        log.warning("handover_fallback", extra={"shard": shard, "from": hold.source, "why": why,
                                                "published": len(out),
                                                "effect": "takeover: the positions topic bounds the gap"})

    def _end_release(self, shard: int, result: str, took: float) -> None:
        rel = self.releases.pop(shard, None)
        if rel is None:
            return
        self.stats.results[result] += 1
        self._ended.set()
        log.info("handover_release_ended", extra={"shard": shard, "result": result, "seconds": round(took, 3),
                                                  "to": rel.target.member if rel.target else None})
        self.on_released(shard)

    async def _send(self, msg: Prepared | Released | Leaving | Taken) -> None:
        try:
            await self.channel.send(msg)
        except Exception as exc:  # the hand-over then times out into the takeover path: nothing is lost
            log.error("handover_record_not_written", extra={"shard": msg.shard, "type": type(msg).__name__,
                                                            "error": f"{type(exc).__name__}: {exc}"[:300]})
