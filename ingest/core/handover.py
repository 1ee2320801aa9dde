"""Make-before-break hand-over of a shard between two live replicas (docs/CLUSTER.md, "Planned moves").

Pure bookkeeping, driven by `services/handover.py`:

* `unit_of`: the stream (`channel:instId`) and ordinal (tradeId, seqId or ts, the positions the 64008 aligner
  of `core/streams.py` orders by) of a record, read from its event key, so one rule decides "same event" on
  both replicas and in every consumer that dedupes by event key.
* `Hold` (the new owner, per shard): records are held, not published, until the old owner's `released` says
  where it cut each stream; then only what lies past each cut is published. On timeout everything held is
  published (the takeover path: nothing is dropped when nothing proves it is on the topic).
* `Release` (the old owner, per shard): keeps publishing each stream until it has published a record at or
  past the new owner's first held position (that record is the cut), then publishes nothing more of it.
  Streams the new owner has not seen are cut, after a grace, at their last published record.
* Control records (`Prepared`, `Released`, `Leaving`, `Taken`) on partition n of `<prefix>shards`, JSON.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from typing import Generic, TypeVar

import orjson

from ingest.core.streams import Dedupe, dedupe_for

__all__ = [
    "CONTROL_KEY",
    "ControlMessage",
    "Hold",
    "Leaving",
    "Prepared",
    "Release",
    "Released",
    "Taken",
    "decode_control",
    "encode_control",
    "unit_of",
]

T = TypeVar("T")

HANDOVER_FORMAT = 1
#: The Kafka key of every hand-over record (the partition is the shard).
CONTROL_KEY = b"handover"


def unit_of(event_key: str) -> tuple[str, int | None] | None:
    """The stream and ordinal of a record's event key (`trades-all:BTC-USDT:123`, `books:X:456:snapshot`,
    `tickers:X:1700000000000`); None for keys that name no instrument stream (gaps, dead letters). The ordinal is
    None when the key has no position (books without seqId, negative tradeIds: they are outside the order)."""
    parts = event_key.split(":", 3)
    if len(parts) < 3 or parts[0] in ("gaps", "dlq"):
        return None
    stream = f"{parts[0]}:{parts[1]}"
    try:
        n = int(parts[2])
    except ValueError:
        return stream, None
    if n < 0 and dedupe_for(parts[0]) is Dedupe.TRADE_ID:
        return stream, None
    return stream, n


def _covered(stream: str, ordinal: int, cut: int) -> bool:
    """Whether a unit at `ordinal` was published by the old owner that cut `stream` at `cut`. For channels whose
    ts may repeat with other content (candles), an equal position is kept: a repeat, never a loss."""
    if dedupe_for(stream.partition(":")[0]) is Dedupe.TS_INCLUSIVE:
        return ordinal < cut
    return ordinal <= cut


# ---- control records --------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Prepared:
    """The new owner (`member`, in `generation`) holds shard `shard` taken from `source`; `first` is each
    stream's first held position."""

    shard: int
    member: str
    generation: int
    source: str
    first: Mapping[str, int]
    ts_ns: int


@dataclass(frozen=True, slots=True)
class Released:
    """The old owner `member` stopped publishing shard `shard` for `to` (whose `generation` it answers): per
    stream its last published position (None: it published nothing of that stream while releasing)."""

    shard: int
    member: str
    to: str
    generation: int
    cuts: Mapping[str, int | None]
    ts_ns: int


@dataclass(frozen=True, slots=True)
class Leaving:
    """`member` is stopping (SIGTERM) and leaves the group: whoever gets `shard` next takes it over by hand-over."""

    shard: int
    member: str
    generation: int
    ts_ns: int


@dataclass(frozen=True, slots=True)
class Taken:
    """`member` took `shard` over without a hand-over (no live predecessor known): a releasing owner stops now."""

    shard: int
    member: str
    generation: int
    ts_ns: int


ControlMessage = Prepared | Released | Leaving | Taken


def encode_control(msg: ControlMessage) -> bytes:
    base: dict[str, object] = {"v": HANDOVER_FORMAT, "shard": msg.shard, "member": msg.member,
                               "generation": msg.generation, "ts_ns": msg.ts_ns}
    if isinstance(msg, Prepared):
        base.update(type="prepared", source=msg.source, first=dict(msg.first))
    elif isinstance(msg, Released):
        base.update(type="released", to=msg.to, cuts=dict(msg.cuts))
    elif isinstance(msg, Leaving):
        base.update(type="leaving")
    else:
        base.update(type="taken")
    return orjson.dumps(base)


def decode_control(data: bytes | None) -> ControlMessage | None:
    """The hand-over record in a control-topic value; None for anything else (it is ignored)."""
    if not data:
        return None
    try:
        d = orjson.loads(data)
        if not isinstance(d, dict) or d.get("v") != HANDOVER_FORMAT:
            return None
        shard, member, generation, ts = int(d["shard"]), str(d["member"]), int(d["generation"]), int(d["ts_ns"])
        kind = d.get("type")
        if kind == "prepared":
            first = {str(k): int(v) for k, v in dict(d["first"]).items()}
            return Prepared(shard, member, generation, str(d["source"]), first, ts)
        if kind == "released":
            cuts = {str(k): (None if v is None else int(v)) for k, v in dict(d["cuts"]).items()}
            return Released(shard, member, str(d["to"]), generation, cuts, ts)
        if kind == "leaving":
            return Leaving(shard, member, generation, ts)
        if kind == "taken":
            return Taken(shard, member, generation, ts)
    except (orjson.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError):
        return None
    return None


# ---- the new owner ----------------------------------------------------------------------------------------


@dataclass(slots=True)
class _Held(Generic[T]):
    stream: str | None
    ordinal: int | None
    #: The gap the positions topic opened for this stream (the predecessor's last position -> here): a completed
    #: hand-over proves it empty, a fallback publishes it.
    handover_gap: bool
    item: T


@dataclass(slots=True)
class Hold(Generic[T]):
    """One shard the new owner prepares: everything it receives is held until `release` or `fallback`."""

    shard: int
    source: str
    generation: int
    streams: Collection[str]
    started: float
    timeout_s: float
    held: list[_Held[T]] = field(default_factory=list)
    first: dict[str, int] = field(default_factory=dict)
    prepared: bool = False
    #: After `release`: streams whose later units at or before the cut are still dropped (their first unit past it
    #: ends this), in case the new owner's stream started later than the old owner's cut.
    window: dict[str, int] = field(default_factory=dict)

    def offer(self, stream: str | None, ordinal: int | None, item: T, *, handover_gap: bool = False) -> None:
        self.held.append(_Held(stream, ordinal, handover_gap, item))
        if stream is not None and ordinal is not None and not handover_gap:
            self.first.setdefault(stream, ordinal)

    def ready(self, now: float, wait_s: float) -> bool:
        """Time to write `prepared`: every stream has a first record, or `wait_s` passed (quiet streams)."""
        if self.prepared:
            return False
        return all(s in self.first for s in self.streams) or now >= self.started + wait_s

    def expired(self, now: float) -> bool:
        return now >= self.started + self.timeout_s

    def release(self, cuts: Mapping[str, int | None]) -> tuple[list[T], int]:
        """What to publish once the old owner cut each stream at `cuts`, and how many held units it dropped."""
        out: list[T] = []
        dropped = 0
        past: set[str] = set()
        for h in self.held:
            if h.stream is None:
                out.append(h.item)
                continue
            cut = cuts.get(h.stream)
            if h.handover_gap:
                if cut is None:
                    out.append(h.item)  # the old owner published nothing: the gap may be real
                else:
                    dropped += 1
                continue
            if cut is not None and h.ordinal is not None and _covered(h.stream, h.ordinal, cut):
                dropped += 1
            else:
                out.append(h.item)
                past.add(h.stream)
        self.held = []
        # Streams whose held units all lie at or before the cut (or that had none) may still deliver covered units.
        self.window = {s: c for s, c in cuts.items() if c is not None and s not in past}
        return out, dropped

    def after_release(self, stream: str, ordinal: int | None) -> bool:
        """Whether a unit received after `release` is published (False: the old owner published it already)."""
        cut = self.window.get(stream)
        if cut is None or ordinal is None:
            return True
        if _covered(stream, ordinal, cut):
            return False
        del self.window[stream]
        return True

    def fallback(self) -> list[T]:
        """Everything held, in order: no `released` came, so nothing proves any of it is on the topic."""
        out = [h.item for h in self.held]
        self.held = []
        self.window = {}
        return out


# ---- the old owner ----------------------------------------------------------------------------------------


@dataclass(slots=True)
class Release:
    """One shard the old owner hands over: it lost it in `generation` (or is leaving) and publishes it until
    every stream is cut. It never cuts before the new owner's `prepared` (the new owner receives the streams
    then): it waits up to 2 x `timeout_s` from `started` for it, and after it up to `timeout_s` for the overlap.
    Only the first bound passing (no new owner came) cuts without `prepared`: a gap the next owner's positions
    record, never a silent one."""

    shard: int
    generation: int
    streams: Collection[str]
    timeout_s: float
    last: dict[str, int] = field(default_factory=dict)
    target: Prepared | None = None
    prepared_at: float | None = None
    cuts: dict[str, int | None] = field(default_factory=dict)
    started: float = 0.0

    def allow(self, stream: str, ordinal: int | None) -> bool:
        """Whether a unit of `stream` is still published; the first one at or past the new owner's first held
        position is the stream's cut (published, and nothing of the stream after it)."""
        if stream in self.cuts:
            return False
        if ordinal is None:
            return True
        self.last[stream] = ordinal
        target = self.target
        if target is not None:
            first = target.first.get(stream)
            if first is not None and ordinal >= first:
                self.cuts[stream] = ordinal
        return True

    def on_prepared(self, p: Prepared, now: float) -> bool:
        """Accept a `prepared` newer than the loss (a stale one of an older generation does not count); a newer
        target replaces an older one only while nothing is cut yet. True if accepted."""
        if p.generation <= self.generation or self.cuts:
            return False
        if self.target is not None and p.generation < self.target.generation:
            return False
        self.target, self.prepared_at = p, now
        for stream, first in p.first.items():
            last = self.last.get(stream)
            if stream in self.streams and last is not None and last >= first:
                self.cuts[stream] = last
        return True

    def tick(self, now: float, quiet_s: float) -> None:
        """`quiet_s` after `prepared`, streams the new owner had not seen are cut at their last published unit."""
        if self.target is None or self.prepared_at is None or now < self.prepared_at + quiet_s:
            return
        for stream in self.streams:
            if stream not in self.cuts and stream not in self.target.first:
                self.cuts[stream] = self.last.get(stream)

    def done(self) -> bool:
        return self.target is not None and all(s in self.cuts for s in self.streams)

    def stop_now(self) -> None:
        """Stop publishing every stream (another replica took the shard over without a hand-over)."""
        for stream in self.streams:
            self.cuts.setdefault(stream, self.last.get(stream))

    def expired(self, now: float) -> bool:
        """Whether the release gives up: no `prepared` within 2 x timeout of the loss, or no overlap within a
        timeout of `prepared`."""
        if self.prepared_at is None:
            return now >= self.started + 2 * self.timeout_s
        return now >= self.prepared_at + self.timeout_s

    def released(self, member: str, ts_ns: int) -> Released:
        assert self.target is not None
        return Released(self.shard, member, self.target.member, self.target.generation, dict(self.cuts), ts_ns)
