"""Gap arbitration between copies (`cluster.copies` > 1, docs/CLUSTER.md "Copies").

Every shard is recorded by one replica of each copy, so a gap one copy detects (its connection dropped, a
takeover inside its copy, a book that broke) is a loss only if no other copy recorded the window either. Each
copy writes its streams' acknowledged positions to `<prefix>positions` with the start of its unbroken run
(`StreamCheckpoint.since`); the arbiter holds every gap of its pipeline back until another copy's position
proves it recorded the gap's whole window (`core.cluster.copy_covers`: the gap is dropped and counted as
covered), or `cluster.copy_gap_wait_s` passes (the gap is published as usual, so the backfill fills it).

Nothing is lost on a crash: while a stream has a gap held back, its positions are not saved (the copy's next
owner of the stream reopens the gap from the older position and asks again), and a gap decided for publication
holds them back until the pipeline handed it to delivery. A stop publishes what is still undecided.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from ingest.core.cluster import StreamPosition, copy_covers
from ingest.core.events import DecidedGaps, Inbound
from ingest.core.gaps import Gap
from ingest.core.records import GapEvent
from ingest.okx.channels import SubArg

log = logging.getLogger(__name__)


class PeerPositions(Protocol):
    """The other copies' latest positions (io/positions.py PositionTail)."""

    changed: asyncio.Condition

    def positions(self, arg: SubArg) -> list[StreamPosition]: ...


@dataclass(slots=True)
class _Held:
    gap: Gap
    record: GapEvent
    deadline: float


class CopyArbiter:
    """Hold a pipeline's gaps until another copy covers them or the wait ends (see the module)."""

    def __init__(self, peers: PeerPositions, inbox: asyncio.Queue[Inbound], wait_s: float, *,
                 clock: Callable[[], float] = time.monotonic, now_ns: Callable[[], int] = time.time_ns) -> None:
        self.peers, self.inbox, self.wait_s = peers, inbox, wait_s
        self._clock, self._now_ns = clock, now_ns
        self._held: dict[str, _Held] = {}
        #: Streams whose positions must not be saved: a gap held, or decided and not yet handed to delivery.
        self._holding: dict[SubArg, int] = {}
        self._wake = asyncio.Event()
        self.covered = 0
        self.raised = 0

    @property
    def holding(self) -> frozenset[SubArg]:
        return frozenset(self._holding)

    @property
    def held(self) -> int:
        return len(self._held)

    def offer(self, gap: Gap, record: GapEvent) -> bool:
        """The pipeline's gate: keep every gap (True); covered ones are dropped at once."""
        if self._covered(gap):
            return True
        if gap.gap_id in self._held:  # the same gap again (a stream reopened and closed it): the newest counts
            self._release_stream(self._held.pop(gap.gap_id).gap.arg)
        self._held[gap.gap_id] = _Held(gap, record, self._clock() + self.wait_s)
        self._holding[gap.arg] = self._holding.get(gap.arg, 0) + 1
        self._wake.set()
        return True

    def _covered(self, gap: Gap) -> bool:
        for peer in self.peers.positions(gap.arg):
            if copy_covers(gap, peer):
                self.covered += 1
                log.info("gap_covered_by_copy", extra={
                    "gap_id": gap.gap_id, "kind": gap.kind.value, "channel": gap.channel, "inst_id": gap.inst_id,
                    "copy": peer.copy, "member": peer.member,
                    "effect": "not raised: another copy recorded the window"})
                return True
        return False

    def _release_stream(self, arg: SubArg) -> None:
        n = self._holding.get(arg, 0) - 1
        if n > 0:
            self._holding[arg] = n
        else:
            self._holding.pop(arg, None)

    async def run(self) -> None:
        """Decide the held gaps as the other copies' positions arrive and as waits end, until cancelled."""
        while True:
            if not self._held:
                self._wake.clear()
                await self._wake.wait()
                continue
            timeout = max(0.0, min(h.deadline for h in self._held.values()) - self._clock())
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout), self.peers.changed:
                    await self.peers.changed.wait()
            await self.decide()

    async def decide(self, *, final: bool = False) -> int:
        """Drop what is covered now; publish what waited long enough (everything, when `final`). How many gaps
        were published."""
        now = self._clock()
        out: list[_Held] = []
        for gap_id, h in list(self._held.items()):
            if self._covered(h.gap):
                del self._held[gap_id]
                self._release_stream(h.gap.arg)
            elif final or now >= h.deadline:
                out.append(h)
        if not out:
            return 0
        handed = asyncio.Event()
        item = DecidedGaps(tuple(h.record for h in out), self._now_ns(), handed.set)
        await self.inbox.put(item)  # cancelled while the queue is full: they stay held (a stop flushes them)
        taken = []
        for h in out:
            if self._held.get(h.gap.gap_id) is h:  # else replaced by a newer emission meanwhile (`offer` let go)
                del self._held[h.gap.gap_id]
                taken.append(h)
        try:
            self.raised += len(out)
            for h in out:
                log.info("gap_not_covered_by_copy", extra={
                    "gap_id": h.gap.gap_id, "channel": h.gap.channel, "inst_id": h.gap.inst_id,
                    "waited_s": self.wait_s, "effect": "published: no other copy showed the window recorded"})
            await handed.wait()
        finally:
            for h in taken:
                self._release_stream(h.gap.arg)
        return len(out)

    async def flush(self, timeout_s: float) -> None:
        """At a stop, with the pipeline still running: publish every gap still held (bounded)."""
        try:
            async with asyncio.timeout(timeout_s):
                await self.decide(final=True)
        except TimeoutError:
            log.error("copy_gaps_not_published", extra={"held": len(self._held), "timeout_s": timeout_s})
