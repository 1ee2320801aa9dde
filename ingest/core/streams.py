"""Stream ownership across physical connections: no duplicates and no hole when a connection is replaced.

During a 64008 make-before-break overlap both the old and the replacement connection deliver the same
stream, and their frames interleave in the pipeline's queue in any order. `StreamOwners` decides, per
stream, which connection is authoritative and which units to publish, so that downstream sees each
unit once and in order.

Rule (a refinement of "switch at the replacement's first frame", which loses the old connection's
in-flight frames whenever the replacement's first frame overtakes them):

* Ordered channels (trades by tradeId, books5/bbo-tbt by seqId+ts, ts-keyed channels by ts): units
  from the owner are published. Units from a newer connection are *held* until its stream is proven to
  overlap what was already published: it delivers a unit the owner already published (position not
  beyond the last published one, or a negative tradeId already seen). Then ownership moves to it, its
  held units not beyond the last published position are dropped and the rest are published, and the
  old connection's later units are dropped. If the owner ends first (CUTOVER or DISCONNECTED), the
  replacement takes over at once. A CUTOVER proves overlap by time when the replacement had acked its
  subscription (the old connection delivered everything before the cutover, the new one everything
  since its ack); a DISCONNECTED proves nothing, and the handover says so (the gap tracker then keeps
  its disconnect gap).
* After any switch the new owner's units not beyond the last published position are dropped until
  the first one beyond it ("dedupe window"). Outside that window the owner's units are always
  published: a single connection does not repeat, and OKX may restart sequences (resets), which must
  never be mistaken for duplicates.
* Incremental books: ownership moves at the replacement's first snapshot (SPEC 2: rebuild from the new
  connection's snapshot, never stitch); everything from the new owner is published after it, since a
  book's updates are meaningless without their snapshot. The handover is proven only if the snapshot
  is not beyond the last published seqId; otherwise the increments in between were never recorded.
* Private channels (`orders`, `fills`, ...): every unit of every live connection is published and the
  content rules of `core/orders.py` drop the repeats; ownership by position would be wrong there (one
  stream mixes many orders whose times are not ordered).

A "unit" is what shares one fate: one trade record for trades, one push message (all records of one
`data` array) otherwise, so records that share a ts within one message are never split.
"""

from __future__ import annotations

import enum
from collections import deque
from dataclasses import dataclass, field
from typing import Generic, NamedTuple, TypeVar

from ingest.core.events import LinkEvent, LinkEventKind
from ingest.okx.channels import INCREMENTAL_BOOK_CHANNELS, SNAPSHOT_BOOK_CHANNELS, SubArg, is_candle

T = TypeVar("T")


class Position(NamedTuple):
    """Where a stream stands after one record: exchange `ts` (ms), `trade_id`, `seq_id`; None = not present.

    A NamedTuple (immutable, built several times faster than a frozen dataclass): one is made per record.
    """

    ts: int | None = None
    trade_id: int | None = None
    seq_id: int | None = None


class Dedupe(enum.StrEnum):
    """How units of a channel are ordered when two connections deliver the same stream."""

    #: trades, trades-all: strictly increasing tradeIds; negative (liquidation/ADL) ids are outside the order.
    TRADE_ID = "trade_id"
    #: books5, bbo-tbt: (seqId, ts); the same seqId and ts is the same book image.
    SEQ_ID = "seq_id"
    #: One state per ts (tickers, mark-price, ...): an equal ts is the same state.
    TS = "ts"
    #: ts may repeat with different content (candles: ts is the bar's open; liquidation-orders): an equal ts
    #: is kept, so a switch may repeat one state but never drops one.
    TS_INCLUSIVE = "ts_inclusive"
    #: Incremental books: switch at the replacement's first snapshot.
    SNAPSHOT = "snapshot"
    #: Private channels: publish everything, repeats are removed by content (core/orders.py).
    UNION = "union"


_TS_INCLUSIVE_CHANNELS = frozenset({"liquidation-orders"})
_UNION_CHANNELS = frozenset({
    "orders", "fills", "orders-algo", "algo-advance", "account", "positions", "balance_and_position",
    "liquidation-warning", "account-greeks",
})


def dedupe_for(channel: str) -> Dedupe:
    """The dedupe policy of `channel` (ts-keyed unless known otherwise)."""
    if channel in ("trades", "trades-all"):
        return Dedupe.TRADE_ID
    if channel in INCREMENTAL_BOOK_CHANNELS:
        return Dedupe.SNAPSHOT
    if channel in SNAPSHOT_BOOK_CHANNELS:
        return Dedupe.SEQ_ID
    if channel in _UNION_CHANNELS:
        return Dedupe.UNION
    if channel in _TS_INCLUSIVE_CHANNELS or is_candle(channel):
        return Dedupe.TS_INCLUSIVE
    return Dedupe.TS


class Proof(enum.StrEnum):
    """Whether a handover is known to have lost nothing."""

    #: The new owner's stream reaches back into what was already published (or, at a CUTOVER, its
    #: subscription was acked while the old connection was still delivering): nothing was missed.
    OVERLAP = "overlap"
    #: Nothing proves continuity (the old connection died first, or the pending buffer overflowed).
    NONE = "none"


@dataclass(frozen=True, slots=True)
class Handover:
    """Ownership of `arg` moved from `from_conn` to `to_conn` (feed it to `GapTracker.on_handover`)."""

    arg: SubArg
    from_conn: str | None
    to_conn: str
    proof: Proof
    last_published: Position | None
    ts_ns: int


class Offer(NamedTuple, Generic[T]):
    """What to do after one input: publish `emit` in this order; `dropped` units were duplicates or stale."""

    arg: SubArg
    emit: tuple[T, ...] = ()
    dropped: int = 0
    handover: Handover | None = None


class _Unit(NamedTuple, Generic[T]):
    pos: Position
    item: T
    snapshot: bool
    ts_ns: int


@dataclass(slots=True)
class _Stream(Generic[T]):
    policy: Dedupe
    owner: str | None = None
    last: Position | None = None
    window: bool = False
    subscribed: set[str] = field(default_factory=set)
    retired: deque[str] = field(default_factory=lambda: deque(maxlen=16))
    pending: dict[str, deque[_Unit[T]]] = field(default_factory=dict)
    neg_seen: set[int] = field(default_factory=set)
    neg_order: deque[int] = field(default_factory=deque)
    #: After the owner ended: who it was, and which connections then held an acked subscription.
    ended_owner: str | None = None
    ended_by_cutover_holders: frozenset[str] = frozenset()


class StreamOwners(Generic[T]):
    """Per-stream owner connection and dedupe across connections; pure, fed in queue order.

    `offer` is called once per unit with the connection it came on; `on_link_event` with every
    LinkEvent. Both answer with the units to publish now. `T` is whatever the pipeline publishes.
    """

    def __init__(self, max_pending: int = 10_000, negative_ids_kept: int = 4096) -> None:
        if max_pending < 1 or negative_ids_kept < 1:
            raise ValueError("max_pending and negative_ids_kept must be >= 1")
        self._streams: dict[SubArg, _Stream[T]] = {}
        self._max_pending = max_pending
        self._neg_kept = negative_ids_kept

    def owner(self, arg: SubArg) -> str | None:
        """The connection whose units are published for `arg` now (None before any, or after it ended)."""
        st = self._streams.get(arg)
        return st.owner if st is not None else None

    def last_published(self, arg: SubArg) -> Position | None:
        st = self._streams.get(arg)
        return st.last if st is not None else None

    def pending(self, arg: SubArg) -> int:
        """Units held from replacement connections, waiting for proof of overlap."""
        st = self._streams.get(arg)
        return sum(len(q) for q in st.pending.values()) if st is not None else 0

    def __len__(self) -> int:
        """Streams tracked (for the per-stream state gauge)."""
        return len(self._streams)

    def forget(self, arg: SubArg) -> None:
        """Drop the state of an unsubscribed stream."""
        self._streams.pop(arg, None)

    def _stream(self, arg: SubArg) -> _Stream[T]:
        st = self._streams.get(arg)
        if st is None:
            st = self._streams[arg] = _Stream(dedupe_for(arg.channel))
        return st

    # ---- ordering -------------------------------------------------------------------------------

    @staticmethod
    def _cmp(policy: Dedupe, pos: Position, last: Position) -> int:
        """-1 behind, 0 same, 1 beyond the last published position (negative tradeIds are not compared)."""
        if policy is Dedupe.TRADE_ID:
            a, b = pos.trade_id, last.trade_id
            if a is None or b is None:
                return 1
            return (a > b) - (a < b)
        if policy is Dedupe.SEQ_ID and pos.seq_id is not None and last.seq_id is not None:
            # A lower seqId with a later ts is a sequence restart, not a repeat.
            if pos.seq_id > last.seq_id or (pos.ts or 0) > (last.ts or 0):
                return 1
            return 0 if pos.seq_id == last.seq_id and pos.ts == last.ts else -1
        a_ts, b_ts = pos.ts, last.ts
        if a_ts is None or b_ts is None:
            return 1
        return (a_ts > b_ts) - (a_ts < b_ts)

    def _negative(self, st: _Stream[T], pos: Position) -> bool:
        return st.policy is Dedupe.TRADE_ID and pos.trade_id is not None and pos.trade_id < 0

    def _covered(self, st: _Stream[T], pos: Position) -> bool:
        """True when `pos` was already published (drop it from a new owner; it proves overlap)."""
        if self._negative(st, pos):
            return pos.trade_id in st.neg_seen
        if st.last is None:
            return False
        c = self._cmp(st.policy, pos, st.last)
        return c < 0 if st.policy is Dedupe.TS_INCLUSIVE else c <= 0

    def _reaches_back(self, st: _Stream[T], pos: Position) -> bool:
        """True when a unit from another connection proves that its stream overlaps what was published."""
        if self._negative(st, pos):
            return pos.trade_id in st.neg_seen
        return st.last is not None and self._cmp(st.policy, pos, st.last) <= 0

    def _publish(self, st: _Stream[T], unit: _Unit[T]) -> None:
        pos = unit.pos
        if self._negative(st, pos):
            tid = pos.trade_id
            assert tid is not None
            if tid not in st.neg_seen:
                st.neg_seen.add(tid)
                st.neg_order.append(tid)
                if len(st.neg_order) > self._neg_kept:
                    st.neg_seen.discard(st.neg_order.popleft())
            if st.last is not None and pos.ts is not None:
                st.last = Position(pos.ts, st.last.trade_id, st.last.seq_id)
            return
        st.last = pos

    # ---- inputs ---------------------------------------------------------------------------------

    def offer(
        self, arg: SubArg, conn: str, pos: Position, item: T, *, ts_ns: int, snapshot: bool = False
    ) -> Offer[T]:
        """One unit of `arg` received on `conn`; `snapshot` marks an incremental book's snapshot."""
        st = self._streams.get(arg)
        if (st is not None and conn == st.owner and not st.window and not st.pending
                and st.policy is not Dedupe.UNION and not self._negative(st, pos) and conn not in st.retired):
            # The steady state (the owner's next unit, no overlap in progress): what _from_owner does, cheaply.
            st.last = pos
            return Offer(arg, (item,))
        if st is None:
            st = self._stream(arg)
        unit = _Unit(pos, item, snapshot, ts_ns)
        if conn in st.retired:
            return Offer(arg, dropped=1)
        if st.policy is Dedupe.UNION:
            st.owner = conn
            return Offer(arg, (item,))
        if st.owner is None:
            return self._take_over_idle(arg, st, conn, unit)
        if conn == st.owner:
            return self._from_owner(arg, st, unit)
        if st.policy is Dedupe.SNAPSHOT:
            if not snapshot:
                return Offer(arg, dropped=1)
            return self._switch(arg, st, conn, [unit], self._snapshot_proof(st, pos), ts_ns)
        if self._reaches_back(st, pos):
            queued = list(st.pending.pop(conn, ()))
            return self._switch(arg, st, conn, [*queued, unit], Proof.OVERLAP, ts_ns)
        queue = st.pending.setdefault(conn, deque())
        queue.append(unit)
        if len(queue) > self._max_pending:
            st.pending.pop(conn)
            return self._switch(arg, st, conn, list(queue), Proof.NONE, ts_ns)
        return Offer(arg)

    def _snapshot_proof(self, st: _Stream[T], pos: Position) -> Proof:
        last = st.last
        if last is None:
            return Proof.NONE
        if pos.seq_id is not None and last.seq_id is not None:
            # A lower seqId with a later ts is OKX restarting its sequence (maintenance), not an overlap:
            # the snapshot proves nothing about what was missed in between.
            overlaps = pos.seq_id <= last.seq_id and (pos.ts is None or last.ts is None or pos.ts <= last.ts)
            return Proof.OVERLAP if overlaps else Proof.NONE
        if pos.ts is not None and last.ts is not None:
            return Proof.OVERLAP if pos.ts <= last.ts else Proof.NONE
        return Proof.NONE

    def _take_over_idle(self, arg: SubArg, st: _Stream[T], conn: str, unit: _Unit[T]) -> Offer[T]:
        """No live owner: the first unit (for books: the first snapshot) of a connection takes over."""
        if st.policy is Dedupe.SNAPSHOT and not unit.snapshot:
            return Offer(arg, dropped=1)
        if st.last is None and st.ended_owner is None:
            st.owner = conn
            self._publish(st, unit)
            return Offer(arg, (unit.item,))
        if st.policy is Dedupe.SNAPSHOT:
            proof = self._snapshot_proof(st, unit.pos)
        else:
            proof = Proof.OVERLAP if self._reaches_back(st, unit.pos) else Proof.NONE
        if conn in st.ended_by_cutover_holders:
            proof = Proof.OVERLAP
        queued = list(st.pending.pop(conn, ()))
        return self._switch(arg, st, conn, [*queued, unit], proof, unit.ts_ns)

    def _in_window(self, st: _Stream[T], pos: Position) -> bool:
        """True to drop a unit of a new owner that was already published; the first ordered unit beyond the
        last published position closes the window (a not-yet-seen negative tradeId passes but does not)."""
        if not st.window:
            return False
        if self._covered(st, pos):
            return True
        if not self._negative(st, pos):
            st.window = False
        return False

    def _from_owner(self, arg: SubArg, st: _Stream[T], unit: _Unit[T]) -> Offer[T]:
        if self._in_window(st, unit.pos):
            return Offer(arg, dropped=1)
        self._publish(st, unit)
        emitted: list[T] = [unit.item]
        dropped = 0
        handover = None
        if st.pending and st.policy is not Dedupe.SNAPSHOT:
            for cand, queue in list(st.pending.items()):
                if queue and self._reaches_back(st, queue[0].pos):
                    del st.pending[cand]
                    follow = self._switch(arg, st, cand, list(queue), Proof.OVERLAP, unit.ts_ns)
                    emitted.extend(follow.emit)
                    dropped += follow.dropped
                    handover = follow.handover
                    break
        return Offer(arg, tuple(emitted), dropped, handover)

    def _switch(
        self, arg: SubArg, st: _Stream[T], conn: str, units: list[_Unit[T]], proof: Proof, ts_ns: int
    ) -> Offer[T]:
        """Make `conn` the owner and publish its `units` (those not already published)."""
        old = st.owner if st.owner is not None else st.ended_owner
        if st.owner is not None and st.owner != conn:
            st.retired.append(st.owner)
        handover = Handover(arg, old, conn, proof, st.last, ts_ns)
        st.owner = conn
        st.ended_owner = None
        st.ended_by_cutover_holders = frozenset()
        st.pending.pop(conn, None)
        emitted: list[T] = []
        dropped = 0
        if st.policy is Dedupe.SNAPSHOT:
            st.window = False
            for u in units:
                self._publish(st, u)
                emitted.append(u.item)
        else:
            st.window = st.last is not None or bool(st.neg_seen)
            for u in units:
                if self._in_window(st, u.pos):
                    dropped += 1
                    continue
                self._publish(st, u)
                emitted.append(u.item)
        return Offer(arg, tuple(emitted), dropped, handover)

    def on_link_event(self, ev: LinkEvent) -> list[Offer[T]]:
        """Track acks and connection ends; an owner's end hands its streams to a replacement at once."""
        out: list[Offer[T]] = []
        for arg in ev.args:
            st = self._stream(arg)
            if ev.kind is LinkEventKind.SUBSCRIBED:
                st.subscribed.add(ev.conn)
            elif ev.kind is LinkEventKind.SUBSCRIBE_FAILED:
                st.subscribed.discard(ev.conn)
                st.pending.pop(ev.conn, None)
            elif ev.kind in (LinkEventKind.DISCONNECTED, LinkEventKind.CUTOVER):
                cutover = ev.kind is LinkEventKind.CUTOVER
                if cutover:
                    if ev.conn not in st.retired:
                        st.retired.append(ev.conn)
                else:
                    st.subscribed.discard(ev.conn)
                    st.pending.pop(ev.conn, None)
                    if ev.conn in st.retired:
                        st.retired.remove(ev.conn)
                if st.owner == ev.conn:
                    offer = self._owner_ended(arg, st, ev, cutover)
                    if offer is not None:
                        out.append(offer)
        return out

    def _owner_ended(self, arg: SubArg, st: _Stream[T], ev: LinkEvent, cutover: bool) -> Offer[T] | None:
        holders = frozenset(c for c in st.subscribed if c != ev.conn) if cutover else frozenset()
        st.subscribed.discard(ev.conn)
        if st.policy is Dedupe.UNION:
            st.owner = None
            return None
        candidates = [(c, q) for c, q in st.pending.items() if q]
        if not candidates or st.policy is Dedupe.SNAPSHOT:
            st.ended_owner = st.owner
            st.owner = None
            st.ended_by_cutover_holders = holders
            return None
        # The candidate whose held stream starts earliest covers the most.
        cand, queue = min(candidates, key=lambda cq: self._start_rank(st, cq[1][0].pos))
        del st.pending[cand]
        proof = Proof.OVERLAP if cand in holders or self._reaches_back(st, queue[0].pos) else Proof.NONE
        st.ended_owner = st.owner
        st.owner = None
        return self._switch(arg, st, cand, list(queue), proof, ev.ts_ns)

    @staticmethod
    def _start_rank(st: _Stream[T], pos: Position) -> tuple[int, int]:
        return (pos.trade_id or 0, pos.ts or 0) if st.policy is Dedupe.TRADE_ID else (pos.seq_id or 0, pos.ts or 0)
