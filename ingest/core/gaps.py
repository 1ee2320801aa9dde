"""Gap detection per stream: where data may be missing, bounded by the last good and first good position.

Pure: fed the same LinkEvents and (published) records as the pipeline, in queue order, plus book breaks
and handovers; answers with `Gap`s for the pipeline to publish to `okx.gaps` for the backfill worker.

* A gap *opens* with the stream's last good position ("before") when its connection drops
  (DISCONNECTED), when it is handed to a connection that does not hold it (CUTOVER without the
  replacement's ack), when its book breaks, or on an unproven handover (`core/streams.py`).
* It *closes* with the first good record after ("after"): the first record after resubscribing, for
  incremental books the first snapshot. A proven handover (the new connection's data reaches back into
  what was published) cancels a disconnect gap: nothing was lost.
* SUBSCRIBE_FAILED closes an open gap (or makes one) with `after=None`: the backfill can still use it,
  bounded by `before` and `detected_ts_ns` (the failure time).
* A dead-lettered frame of a stream without ids (`on_dead_letter`) opens a gap like a disconnect does; the
  stream's next record closes it.
* Trade holes: `trades` and `trades-all` carry per-instrument tradeIds that OKX allocates one per
  match. A `trades` record with tradeId T and count C covers ids T-C+1..T (SPEC 5); `trades-all`
  covers exactly T. A record whose first covered id is beyond last id + 1 reveals a hole with exact
  bounds. Negative tradeIds (liquidation/ADL fills, SPEC 4) are outside that sequence: they neither
  advance it nor reveal holes. Trade `seqId` is *not* used for holes: SPEC only says simultaneous trades
  may share it, and its values are shared with other channels (gaps in it are normal), so no rule
  about missing trades follows from it. It is carried in positions for ordering and for the backfill.

Position conventions in a `Gap`: `before.trade_id` is the last in-sequence (positive) tradeId published,
`after.trade_id` the first id the closing record covers; the missing ids are strictly between them.
"""

from __future__ import annotations

import enum
import hashlib
from dataclasses import dataclass, field
from typing import Any

from ingest.core.books import BookBreak, BreakKind
from ingest.core.events import LinkEvent, LinkEventKind
from ingest.core.streams import Handover, Position, Proof
from ingest.okx.channels import INCREMENTAL_BOOK_CHANNELS, SubArg

__all__ = ["Gap", "GapKind", "GapTracker", "Position", "StreamCheckpoint", "gap_id"]

TRADE_CHANNELS = frozenset({"trades", "trades-all"})


class GapKind(enum.StrEnum):
    """Why data may be missing; the values are those of the Avro enum `GapKind` (core/records.py)."""

    DISCONNECT = "disconnect"
    #: Ownership moved to another connection without proof that nothing was missed in between.
    CUTOVER = "cutover"
    SUBSCRIBE_FAILED = "subscribe_failed"
    SEQ_BREAK = "seq_break"
    CHECKSUM_MISMATCH = "checksum_mismatch"
    TRADE_HOLE = "trade_hole"
    #: A frame of a stream without ids (tickers, candles, ...) became a dead letter: nothing else would tell
    #: its loss, so the gap is bounded by the last and the next good record's ts.
    DEAD_LETTER = "dead_letter"
    #: A book level that could not be read (the book was invalidated like on a break).
    OTHER = "other"


_BOOK_GAP_KIND = {
    BreakKind.SEQ_BREAK: GapKind.SEQ_BREAK,
    BreakKind.CHECKSUM_MISMATCH: GapKind.CHECKSUM_MISMATCH,
    BreakKind.MALFORMED: GapKind.OTHER,
}


@dataclass(frozen=True, slots=True)
class Gap:
    """A range of one stream where records may be missing: strictly after `before`, strictly before `after`.

    `before` None: nothing had been received on the stream yet (use `opened_ts_ns`, local time, as the
    lower bound). `after` None: the stream did not resume (subscribe failed, or still open at shutdown);
    `detected_ts_ns` is then the upper time bound. Times `*_ts_ns` are local receive times (ns).
    """

    gap_id: str
    kind: GapKind
    channel: str
    inst_id: str | None
    inst_type: str | None
    before: Position | None
    after: Position | None
    reason: str
    conn_before: str | None
    conn_after: str | None
    opened_ts_ns: int
    detected_ts_ns: int
    arg: SubArg = field(compare=False, repr=False)

    @property
    def is_open(self) -> bool:
        return self.after is None


def gap_id(kind: GapKind, arg: SubArg, before: Position | None, conn_before: str | None, opened_ts_ns: int) -> str:
    """A deterministic id: the same stream, start and cause give the same id (replays, backfill dedupe).

    `after` is left out on purpose, so a gap published as open at shutdown and the same gap closed
    later carry one id.
    """
    b = before or Position()
    text = "|".join(
        str(x) if x is not None else ""
        for x in (
            kind.value, arg.channel, arg.inst_id, arg.inst_type, arg.inst_family, arg.ccy, arg.extra_params,
            b.ts, b.trade_id, b.seq_id, conn_before, opened_ts_ns,
        )
    )
    return hashlib.sha256(text.encode()).hexdigest()[:32]


@dataclass(slots=True)
class _Open:
    kind: GapKind
    before: Position | None
    conn_before: str | None
    opened_ts_ns: int
    reason: str


@dataclass(slots=True)
class _Stream:
    last: Position | None = None
    last_conn: str | None = None
    inst_type: str | None = None
    holders: set[str] = field(default_factory=set)
    open: _Open | None = None
    #: Start of the unbroken run that ends at `last` (see StreamCheckpoint.since).
    since: Position | None = None


def _ascending(last: Position | None, pos: Position) -> bool:
    """True when `pos` (a positive trade id with a ts) simply extends `last`, so it can stand as the new last."""
    return pos.ts is not None and (last is None or last.trade_id is None
                                   or (pos.trade_id is not None and pos.trade_id >= last.trade_id))


@dataclass(frozen=True, slots=True)
class StreamCheckpoint:
    """What a restarted recorder needs to know of one stream to report the time it was not running.

    `open` is the stream's gap that was still open when saved (a planned stop opens one for every stream:
    its sockets closed), kept whole so the restarted process closes the very same gap (same id).
    """

    arg: SubArg
    last: Position | None
    last_conn: str | None
    inst_type: str | None
    open_kind: GapKind | None = None
    open_before: Position | None = None
    open_conn: str | None = None
    open_ts_ns: int | None = None
    open_reason: str = ""
    #: Where this process's unbroken run of the stream began (its first record, or the first after its last
    #: gap): with `last`, what it recorded without a hole (another copy's gap is checked against it).
    since: Position | None = None

    def to_json(self) -> dict[str, object]:
        return {"arg": self.arg.to_okx(), "last": list(self.last) if self.last else None,
                "last_conn": self.last_conn, "inst_type": self.inst_type,
                "since": list(self.since) if self.since else None,
                "open": None if self.open_kind is None else {
                    "kind": self.open_kind.value, "before": list(self.open_before) if self.open_before else None,
                    "conn": self.open_conn, "ts_ns": self.open_ts_ns, "reason": self.open_reason}}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> StreamCheckpoint:
        """Inverse of `to_json`; raises KeyError/ValueError/TypeError on anything malformed."""
        last = data.get("last")
        open_ = data.get("open")
        since = data.get("since")
        return cls(
            SubArg.from_okx(data["arg"]), Position(*last) if last else None, data.get("last_conn"),
            data.get("inst_type"),
            GapKind(open_["kind"]) if open_ else None,
            Position(*open_["before"]) if open_ and open_.get("before") else None,
            open_.get("conn") if open_ else None,
            int(open_["ts_ns"]) if open_ and open_.get("ts_ns") is not None else None,
            str(open_.get("reason", "")) if open_ else "",
            Position(*since) if since else None,
        )


class GapTracker:
    """Last good position per stream and the gaps between them; one instance per pipeline."""

    def __init__(self) -> None:
        self._streams: dict[SubArg, _Stream] = {}

    def _stream(self, arg: SubArg) -> _Stream:
        st = self._streams.get(arg)
        if st is None:
            st = self._streams[arg] = _Stream(inst_type=arg.inst_type)
        return st

    def last_position(self, arg: SubArg) -> Position | None:
        st = self._streams.get(arg)
        return st.last if st is not None else None

    def forget(self, arg: SubArg) -> None:
        """Drop the state of an unsubscribed stream (its open gap, if any, is discarded)."""
        self._streams.pop(arg, None)

    def __len__(self) -> int:
        """Streams tracked (for the per-stream state gauge)."""
        return len(self._streams)

    def _make(self, arg: SubArg, st: _Stream, o: _Open, after: Position | None, conn_after: str | None,
              detected_ts_ns: int, reason: str | None = None) -> Gap:
        return Gap(
            gap_id(o.kind, arg, o.before, o.conn_before, o.opened_ts_ns), o.kind, arg.channel, arg.inst_id,
            st.inst_type, o.before, after, reason if reason is not None else o.reason, o.conn_before,
            conn_after, o.opened_ts_ns, detected_ts_ns, arg,
        )

    def _open(self, st: _Stream, kind: GapKind, conn: str | None, ts_ns: int, reason: str) -> None:
        if st.open is None:
            st.open = _Open(kind, st.last, conn, ts_ns, reason)

    # ---- inputs ---------------------------------------------------------------------------------

    def on_link_event(self, ev: LinkEvent) -> list[Gap]:
        """Track which connections hold each stream; open gaps on loss, close them on a final failure."""
        out: list[Gap] = []
        for arg in ev.args:
            st = self._stream(arg)
            if ev.kind is LinkEventKind.SUBSCRIBED:
                st.holders.add(ev.conn)
            elif ev.kind is LinkEventKind.DISCONNECTED:
                st.holders.discard(ev.conn)
                current = st.last_conn
                if current == ev.conn or (current is None and not st.holders):
                    self._open(st, GapKind.DISCONNECT, ev.conn, ev.ts_ns, f"connection {ev.conn} lost: {ev.reason}")
            elif ev.kind is LinkEventKind.CUTOVER:
                st.holders.discard(ev.conn)
                held = ev.replacement is not None and ev.replacement in st.holders
                is_current = st.last_conn == ev.conn or (st.last_conn is None and not st.holders)
                if is_current and held:
                    # The replacement has been receiving since its ack: it is the stream's connection now,
                    # so the old one's DISCONNECTED that follows is no loss.
                    st.last_conn = ev.replacement
                elif is_current:
                    self._open(st, GapKind.CUTOVER, ev.conn, ev.ts_ns,
                               f"cutover from {ev.conn} to {ev.replacement}, which does not hold the stream")
            elif ev.kind is LinkEventKind.SUBSCRIBE_FAILED:
                st.holders.discard(ev.conn)
                why = f"subscribe failed on {ev.conn} (code {ev.code}): {ev.reason}"
                st.since = None  # the run is broken: whatever comes next starts a new one
                if st.open is not None:
                    o, st.open = st.open, None
                    out.append(self._make(arg, st, o, None, None, ev.ts_ns, f"{o.reason}; {why}"))
                elif st.last_conn in (ev.conn, None) or not st.holders:
                    o = _Open(GapKind.SUBSCRIBE_FAILED, st.last, ev.conn, ev.ts_ns, why)
                    out.append(self._make(arg, st, o, None, None, ev.ts_ns))
        return out

    def resolve(self, arg: SubArg, after: Position, conn_after: str | None, ts_ns: int, reason: str) -> Gap | None:
        """Close the open gap of `arg` because what it lacked was recovered another way (the REST
        reconciliation of the private streams); the gap, or None when the stream has none open."""
        st = self._streams.get(arg)
        if st is None or st.open is None:
            return None
        o, st.open = st.open, None
        st.since = None  # recovered by REST, not received: the next record starts this process's new run
        return self._make(arg, st, o, after, conn_after, ts_ns, f"{o.reason}; {reason}")

    def on_book_break(self, arg: SubArg, conn: str, ts_ns: int, brk: BookBreak) -> None:
        """The book of `arg` broke (`BookVerdict.broken`): a gap until the next snapshot closes it."""
        reason = f"{brk.kind.value}: {brk.detail} (expected {brk.expected}, got {brk.got})"
        self._open(self._stream(arg), _BOOK_GAP_KIND[brk.kind], conn, ts_ns, reason)

    def on_dead_letter(self, arg: SubArg, conn: str, ts_ns: int, reason: str) -> None:
        """A frame of `arg` could not be normalized: a gap from the last good record until the next one. Only
        for streams without ids (trades reveal holes by tradeId, incremental books break their seqId chain)."""
        self._open(self._stream(arg), GapKind.DEAD_LETTER, conn, ts_ns, reason)

    def on_handover(self, h: Handover) -> None:
        """An ownership switch from `core/streams.py`; call before `on_record` for the units it published."""
        st = self._stream(h.arg)
        if h.proof is Proof.OVERLAP:
            if st.open is not None and st.open.kind in (GapKind.DISCONNECT, GapKind.CUTOVER) \
                    and st.open.conn_before == h.from_conn:
                st.open = None
        elif h.from_conn is not None:
            self._open(st, GapKind.CUTOVER, h.from_conn, h.ts_ns,
                       f"handover from {h.from_conn} to {h.to_conn} without proof of overlap")
        st.last_conn = h.to_conn

    def on_record(
        self,
        arg: SubArg,
        conn: str,
        pos: Position,
        recv_ts_ns: int,
        *,
        count: int = 1,
        snapshot: bool = False,
        inst_type: str | None = None,
    ) -> list[Gap]:
        """A record of `arg` that was published; returns the gap it closes or the trade hole it reveals.

        `count` is the `trades` aggregation count (1 for `trades-all` and pre-aggregation data);
        `snapshot` marks an incremental book's snapshot, the only record that closes a book's gap.
        """
        st = self._streams.get(arg) or self._stream(arg)
        if conn not in st.holders:
            st.holders.add(conn)
        if inst_type is not None:
            st.inst_type = inst_type
        trades = arg.channel in TRADE_CHANNELS
        tid = pos.trade_id
        in_seq = trades and tid is not None and tid > 0
        first = tid - max(count, 1) + 1 if in_seq and tid is not None else None
        out: list[Gap] = []
        if st.open is not None:
            if arg.channel in INCREMENTAL_BOOK_CHANNELS and not snapshot:
                return out
            o, st.open = st.open, None
            st.since = pos._replace(trade_id=first) if trades else pos
            out.append(self._make(arg, st, o, st.since, conn, recv_ts_ns))
        elif in_seq and first is not None and st.last is not None and st.last.trade_id is not None \
                and first > st.last.trade_id + 1:
            o = _Open(GapKind.TRADE_HOLE, st.last, st.last_conn, recv_ts_ns,
                      f"tradeIds {st.last.trade_id + 1}..{first - 1} missing")
            st.since = pos._replace(trade_id=first)
            out.append(self._make(arg, st, o, st.since, conn, recv_ts_ns))
        elif st.since is None or (in_seq and st.since.trade_id is None):
            # A run of trades starts at its first positive tradeId (the only ones its bounds can be told by).
            st.since = pos._replace(trade_id=first) if trades else pos
        # The common case (an in-sequence trade, or any non-trade record) keeps `pos` itself: no new object.
        st.last = pos if not trades or (in_seq and _ascending(st.last, pos)) else self._advance(
            st.last, pos, trades, in_seq)
        st.last_conn = conn
        return out

    @staticmethod
    def _advance(last: Position | None, pos: Position, trades: bool, in_seq: bool) -> Position:
        """The new last good position; for trades, trade_id stays the highest in-sequence id."""
        if not trades:
            return pos
        prev_tid = last.trade_id if last is not None else None
        tid = pos.trade_id if in_seq else None
        if tid is None or (prev_tid is not None and tid < prev_tid):
            tid = prev_tid
        return Position(pos.ts if pos.ts is not None else (last.ts if last else None), tid, pos.seq_id)

    def checkpoint(self) -> list[StreamCheckpoint]:
        """Every stream's last position and open gap, for a restarted process (`restore`)."""
        out = []
        for arg, st in self._streams.items():
            if st.last is None and st.open is None:
                continue
            o = st.open
            out.append(StreamCheckpoint(
                arg, st.last, st.last_conn, st.inst_type,
                o.kind if o else None, o.before if o else None, o.conn_before if o else None,
                o.opened_ts_ns if o else None, o.reason if o else "", st.since))
        return out

    def restore(self, cp: StreamCheckpoint, saved_ts_ns: int, reason: str) -> None:
        """Resume a stream of a previous process: its open gap as it was, or one from its last position
        (an unclean stop saved no gap: the recorder was not running from `saved_ts_ns` on)."""
        st = self._stream(cp.arg)
        st.last, st.last_conn = cp.last, cp.last_conn
        st.since = None  # the run that ended at `last` was the previous process's, not one of this process
        st.inst_type = st.inst_type or cp.inst_type
        if cp.open_kind is not None:
            st.open = _Open(cp.open_kind, cp.open_before, cp.open_conn, cp.open_ts_ns or saved_ts_ns,
                            cp.open_reason)
        elif cp.last is not None:
            st.open = _Open(GapKind.DISCONNECT, cp.last, cp.last_conn, saved_ts_ns, reason)

    def open_gaps(self, now_ts_ns: int) -> list[Gap]:
        """Every gap still open, with `after=None` and `detected_ts_ns=now` (publish them at shutdown)."""
        return [
            self._make(arg, st, st.open, None, None, now_ts_ns)
            for arg, st in self._streams.items()
            if st.open is not None
        ]
