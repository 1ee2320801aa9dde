"""Order-book state and integrity for OKX depth channels (SPEC section 7): seqId chain and CRC32 checksum.

Pure: a book is fed decoded messages and answers with a `BookVerdict`; it never logs, reads a clock or
does I/O. The caller (the pipeline) turns a `BROKEN` verdict into a resubscribe request and a gap.

Incremental channels (`books`, `books-l2-tbt`, `books50-l2-tbt`) keep a full book: a snapshot resets it,
each update must chain on the previous message (`prevSeqId == last seqId`), and a non-zero `checksum` is
verified after applying every level. Since 2026-06-23 OKX sends `checksum: 0`, so the chain is the only
check on live data; historic data (2022) has no seqId at all, so there the checksum is the only check.
Snapshot channels (`books5`, `bbo-tbt`) replace the whole visible book with each message.

Prices are ordered by `Decimal` value (exact, so "30316" and "30316.0" are one level), while the level
keeps the exact strings OKX sent: the checksum must be computed over those strings, never re-formatted.
"""

from __future__ import annotations

import enum
import zlib
from bisect import bisect_left, insort
from collections.abc import Sequence
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation

import msgspec

from ingest.okx.channels import INCREMENTAL_BOOK_CHANNELS, SNAPSHOT_BOOK_CHANNELS, SubArg

#: One price level exactly as OKX sent it: `(px, sz, "0", numOrders)` (the 3rd element is deprecated).
Level = tuple[str, ...]

#: Levels per side that OKX's CRC32 covers (SPEC 7.3).
CHECKSUM_DEPTH = 25


class VerdictKind(enum.StrEnum):
    """What a book did with one message."""

    #: A snapshot reset the book (incremental channels) or replaced it (snapshot channels).
    SNAPSHOT = "snapshot"
    #: An update chained on the previous message and was applied.
    APPLIED = "applied"
    #: A keepalive: empty sides and `prevSeqId == seqId == last seqId` (incremental), or the same seqId
    #: re-sent (snapshot channels). Nothing changed.
    HEARTBEAT = "heartbeat"
    #: OKX restarted the sequence (`seqId < prevSeqId`, chain intact); applied, continue from the new seqId.
    RESET = "reset"
    #: The book is invalid (after a break, or no snapshot yet); the update was ignored until a snapshot.
    DROPPED = "dropped"
    #: The chain or the checksum failed: the book is now invalid; resubscribe and open a gap.
    BROKEN = "broken"


class BreakKind(enum.StrEnum):
    """Why a book broke."""

    #: `prevSeqId` did not link to the last seqId (or an update's chain mode differs from its snapshot's).
    SEQ_BREAK = "seq_break"
    #: A non-zero `checksum` differed from the CRC32 of the book after applying the message.
    CHECKSUM_MISMATCH = "checksum_mismatch"
    #: A level could not be read (price not a finite positive decimal); the book may be half-applied.
    MALFORMED = "malformed"


class BookMessage(msgspec.Struct, frozen=True, gc=False):
    """One entry of a depth push's `data` array, decoded but with level strings untouched.

    This, `BookPosition` and `BookVerdict` are msgspec Structs, not frozen dataclasses: one of each is built
    per book message, and a frozen dataclass's `__init__` (an `object.__setattr__` per field) cost ~10x more.

    `seq_id`/`prev_seq_id` are None where OKX did not send them (before 2023-06-20, or on snapshot
    channels for `prev_seq_id`); `checksum` None or 0 means "not present" (0 is sent since 2026-06-23).
    """

    snapshot: bool
    bids: Sequence[Sequence[str]]
    asks: Sequence[Sequence[str]]
    ts: int
    checksum: int | None = None
    seq_id: int | None = None
    prev_seq_id: int | None = None


class BookPosition(msgspec.Struct, frozen=True, gc=False):
    """Where a book stood: the seqId (None for seqId-less data) and exchange `ts` (ms) of a message."""

    seq_id: int | None
    ts: int


@dataclass(frozen=True, slots=True)
class BookBreak:
    """Details of a break, enough to log it and to form a gap event.

    `expected`/`got` are the last seqId vs the message's prevSeqId (SEQ_BREAK) or the computed CRC32 vs
    the frame's `checksum` (CHECKSUM_MISMATCH). `last_good` is the last position the book was valid at.
    """

    kind: BreakKind
    expected: int | None
    got: int | None
    last_good: BookPosition | None
    detail: str


class BookVerdict(msgspec.Struct, frozen=True, gc=False):
    """The outcome of one message. `checksum_checked` says whether a CRC32 was verified for it."""

    kind: VerdictKind
    position: BookPosition
    checksum_checked: bool = False
    broken: BookBreak | None = None
    #: For RESET: the seqId the sequence restarted from (the message's prevSeqId).
    reset_from: int | None = None

    @property
    def accepted(self) -> bool:
        """True when the message is part of a valid book (record it); False for DROPPED and BROKEN."""
        return self.kind not in (VerdictKind.DROPPED, VerdictKind.BROKEN)

    @property
    def needs_resubscribe(self) -> bool:
        return self.kind is VerdictKind.BROKEN


def okx_checksum(bids: Sequence[Sequence[str]], asks: Sequence[Sequence[str]]) -> int:
    """OKX's CRC32 over the best 25 bids and asks, best first, alternating bid/ask, `px:sz`, signed 32-bit.

    When one side is shorter, its missing entries are skipped and the other side continues alone.
    """
    b = [lvl[0] + ":" + lvl[1] for lvl in bids[:CHECKSUM_DEPTH]]
    a = [lvl[0] + ":" + lvl[1] for lvl in asks[:CHECKSUM_DEPTH]]
    n = min(len(b), len(a))
    parts = [x for pair in zip(b, a, strict=False) for x in pair]
    parts += b[n:] or a[n:]
    crc = zlib.crc32(":".join(parts).encode())
    return crc - (1 << 32) if crc >= (1 << 31) else crc


def _is_zero_size(sz: str) -> bool:
    """True for "0", "0.0", "0.000"...: OKX's delete marker. Cheap: no Decimal for the common case."""
    return sz == "0" or not sz.strip("0.")


class _Side:
    """One side of a book: exact levels by price value, plus the price values kept sorted ascending.

    A dict gives O(1) overwrite of an existing price (most updates); only new or deleted prices touch the
    sorted list (bisect + a memmove of at most a few hundred pointers), which beats a tree at 400 levels.
    `dec` caches price string -> Decimal so that overwriting or deleting a known price parses nothing.
    """

    __slots__ = ("dec", "keys", "levels")

    def __init__(self) -> None:
        self.levels: dict[Decimal, Level] = {}
        self.keys: list[Decimal] = []
        self.dec: dict[str, Decimal] = {}

    def clear(self) -> None:
        self.levels.clear()
        self.keys.clear()
        self.dec.clear()

    def apply(self, updates: Sequence[Sequence[str]]) -> None:
        """Apply levels in order; raises InvalidOperation/IndexError on an unreadable one (book then stale)."""
        levels, keys, dec = self.levels, self.keys, self.dec
        for level in updates:
            px, sz = level[0], level[1]
            key = dec.get(px)
            if sz == "0" or not sz.strip("0."):  # _is_zero_size, inlined: this loop runs per level
                if key is None:
                    key = Decimal(px)
                old = levels.pop(key, None)
                if old is not None:
                    del keys[bisect_left(keys, key)]
                    dec.pop(old[0], None)
                dec.pop(px, None)
                continue
            if key is None:
                key = Decimal(px)
                if not key.is_finite() or key <= 0:
                    raise InvalidOperation(f"price {px!r}")
                dec[px] = key
            count = len(levels)
            levels[key] = level if type(level) is tuple else tuple(level)
            if len(levels) != count:  # a new price: one dict operation instead of a lookup and a store
                insort(keys, key)

    def ascending(self, n: int | None) -> list[Level]:
        keys = self.keys if n is None else self.keys[:n]
        levels = self.levels
        return [levels[k] for k in keys]

    def descending(self, n: int | None) -> list[Level]:
        keys = self.keys
        sel = keys[::-1] if n is None else keys[: -n - 1 : -1]
        levels = self.levels
        return [levels[k] for k in sel]


class OrderBook:
    """An incremental book (`books`, `books-l2-tbt`, `books50-l2-tbt`) with its seqId chain and checksum.

    The chain mode is fixed by each snapshot: a snapshot with a seqId makes every update need a linking
    prevSeqId; a snapshot without one (pre-2023 data) is validated by checksum alone.
    """

    __slots__ = ("_asks", "_bids", "_last", "_valid")

    def __init__(self) -> None:
        self._bids = _Side()
        self._asks = _Side()
        self._valid = False
        self._last: BookPosition | None = None

    @property
    def valid(self) -> bool:
        """False until the first snapshot and from a break until the next snapshot."""
        return self._valid

    @property
    def last_good(self) -> BookPosition | None:
        """The position of the last message the book accepted (kept after a break, for the gap)."""
        return self._last

    def bids(self, n: int | None = None) -> list[Level]:
        """The best `n` bids (all when None), best (highest) first, as OKX sent them."""
        return self._bids.descending(n)

    def asks(self, n: int | None = None) -> list[Level]:
        """The best `n` asks (all when None), best (lowest) first, as OKX sent them."""
        return self._asks.ascending(n)

    def checksum(self) -> int:
        """OKX's CRC32 of the book as it stands."""
        return okx_checksum(self.bids(CHECKSUM_DEPTH), self.asks(CHECKSUM_DEPTH))

    def invalidate(self) -> BookPosition | None:
        """Mark the book stale (the connection it came from is gone); returns the last good position.

        SPEC 7.1: never apply a new connection's updates on a book built from an old one, so a
        disconnect invalidates until the new subscription's snapshot.
        """
        self._valid = False
        return self._last

    def apply(self, msg: BookMessage) -> BookVerdict:
        """Apply one message and say what happened; the book is left invalid on any break."""
        pos = BookPosition(msg.seq_id, msg.ts)
        if msg.snapshot:
            return self._apply_snapshot(msg, pos)
        if not self._valid:
            return BookVerdict(VerdictKind.DROPPED, pos)
        last = self._last
        last_seq = last.seq_id if last is not None else None
        seq, prev = msg.seq_id, msg.prev_seq_id
        kind = VerdictKind.APPLIED
        if last_seq is not None or seq is not None or prev is not None:
            if last_seq is None or seq is None or prev is None:
                return self._break(
                    pos, BreakKind.SEQ_BREAK, last_seq, prev,
                    f"seqId presence changed mid-chain (last seqId {last_seq}, message {prev}->{seq})",
                )
            if prev != last_seq:
                return self._break(
                    pos, BreakKind.SEQ_BREAK, last_seq, prev, f"prevSeqId {prev} does not link to seqId {last_seq}"
                )
            if seq == prev and not msg.bids and not msg.asks:
                return self._verify(msg, pos, VerdictKind.HEARTBEAT, None)
            if seq < prev:
                kind = VerdictKind.RESET
        try:
            self._bids.apply(msg.bids)
            self._asks.apply(msg.asks)
        except (InvalidOperation, IndexError) as exc:
            return self._break(pos, BreakKind.MALFORMED, None, None, f"unreadable level: {exc!r}")
        return self._verify(msg, pos, kind, prev if kind is VerdictKind.RESET else None)

    def _apply_snapshot(self, msg: BookMessage, pos: BookPosition) -> BookVerdict:
        self._bids.clear()
        self._asks.clear()
        self._valid = True
        if msg.seq_id is not None and msg.prev_seq_id not in (None, -1):
            return self._break(
                pos, BreakKind.SEQ_BREAK, -1, msg.prev_seq_id, f"snapshot with prevSeqId {msg.prev_seq_id}, not -1"
            )
        try:
            self._bids.apply(msg.bids)
            self._asks.apply(msg.asks)
        except (InvalidOperation, IndexError) as exc:
            return self._break(pos, BreakKind.MALFORMED, None, None, f"unreadable level: {exc!r}")
        return self._verify(msg, pos, VerdictKind.SNAPSHOT, None)

    def _verify(self, msg: BookMessage, pos: BookPosition, kind: VerdictKind, reset_from: int | None) -> BookVerdict:
        expected = msg.checksum
        checked = bool(expected)
        if checked:
            got = self.checksum()
            if got != expected:
                return self._break(
                    pos, BreakKind.CHECKSUM_MISMATCH, expected, got, f"checksum {expected} but book gives {got}"
                )
        self._last = pos
        return BookVerdict(kind, pos, checked, None, reset_from)

    def _break(
        self, pos: BookPosition, kind: BreakKind, expected: int | None, got: int | None, detail: str
    ) -> BookVerdict:
        self._valid = False
        brk = BookBreak(kind, expected, got, self._last, detail)
        return BookVerdict(VerdictKind.BROKEN, pos, False, brk)


class SnapshotBook:
    """A snapshot channel (`books5`, `bbo-tbt`): each message replaces the visible book.

    SPEC 7.1 gives these channels a seqId but no prevSeqId, and says gaps in seqIds are normal, so a
    missed message cannot be detected here (disconnects are the gap tracker's business). What can be said:
    the same seqId again is OKX's keepalive re-send (HEARTBEAT), and a lower seqId is a sequence restart
    (RESET, reported for counting; the message is still a complete book, so it is accepted).
    """

    __slots__ = ("_asks", "_bids", "_last")

    def __init__(self) -> None:
        self._bids: tuple[Level, ...] = ()
        self._asks: tuple[Level, ...] = ()
        self._last: BookPosition | None = None

    @property
    def valid(self) -> bool:
        return self._last is not None

    @property
    def last_good(self) -> BookPosition | None:
        return self._last

    def bids(self, n: int | None = None) -> list[Level]:
        return list(self._bids if n is None else self._bids[:n])

    def asks(self, n: int | None = None) -> list[Level]:
        return list(self._asks if n is None else self._asks[:n])

    def invalidate(self) -> BookPosition | None:
        """Nothing to invalidate: the next message is a complete book anyway. Returns the last position."""
        return self._last

    def apply(self, msg: BookMessage) -> BookVerdict:
        """Replace the book; HEARTBEAT for the same seqId again, RESET for a lower one."""
        pos = BookPosition(msg.seq_id, msg.ts)
        last_seq = self._last.seq_id if self._last is not None else None
        kind = VerdictKind.SNAPSHOT
        reset_from = None
        if msg.seq_id is not None and last_seq is not None:
            if msg.seq_id == last_seq:
                kind = VerdictKind.HEARTBEAT
            elif msg.seq_id < last_seq:
                kind, reset_from = VerdictKind.RESET, last_seq
        self._bids = tuple(tuple(lvl) for lvl in msg.bids)
        self._asks = tuple(tuple(lvl) for lvl in msg.asks)
        self._last = pos
        return BookVerdict(kind, pos, False, None, reset_from)


class BookSet:
    """All books of a pipeline, one per depth stream, created on first use."""

    __slots__ = ("_books",)

    def __init__(self) -> None:
        self._books: dict[SubArg, OrderBook | SnapshotBook] = {}

    def book(self, arg: SubArg) -> OrderBook | SnapshotBook:
        """The book of `arg` (created empty); raises ValueError for a channel that is not a depth channel."""
        book = self._books.get(arg)
        if book is None:
            if arg.channel in INCREMENTAL_BOOK_CHANNELS:
                book = OrderBook()
            elif arg.channel in SNAPSHOT_BOOK_CHANNELS:
                book = SnapshotBook()
            else:
                raise ValueError(f"{arg} is not an order-book channel; expected one of "
                                 f"{sorted(INCREMENTAL_BOOK_CHANNELS | SNAPSHOT_BOOK_CHANNELS)}")
            self._books[arg] = book
        return book

    def apply(self, arg: SubArg, msg: BookMessage) -> BookVerdict:
        return self.book(arg).apply(msg)

    def invalidate(self, arg: SubArg) -> BookPosition | None:
        """Called on DISCONNECTED for each arg: the next message must be a fresh snapshot."""
        book = self._books.get(arg)
        return book.invalidate() if book is not None else None

    def forget(self, arg: SubArg) -> None:
        """Drop the state of an unsubscribed stream."""
        self._books.pop(arg, None)

    def __len__(self) -> int:
        return len(self._books)
