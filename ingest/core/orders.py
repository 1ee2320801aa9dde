"""OKX's repeated-order-push rules (SPEC 6 "Dedupe rules") and a bounded seen-set for the backfill.

OKX says the same `orders` message may arrive more than once, possibly with a different `uTime`, and
publishes four rules; a 64008 overlap (two connections holding `orders`) repeats every push as well.
`OrderPushDedupe.accept` applies, in this order (the first rule whose condition holds decides):

1. FILL: a non-empty `tradeId` marks a fill: keep each (instId, tradeId) once.
2. FILLED_NO_TRADE: no tradeId and `state=filled` (a SPOT/MARGIN market order completed): first per ordId.
3. CANCELED: `canceled` / `mmp_canceled` are terminal: first per ordId.
4. AMEND: a non-empty `amendResult` marks an amend response: first per (ordId, reqId). Scoped by ordId
   because reqId is client-chosen and a client may reuse it across orders; only amend responses, so a
   later push of the order that merely echoes the reqId is not mistaken for a repeat.
5. STATE_CHANGE (our rule for everything else, e.g. `live`, `partially_filled` without a fill): a push is
   a repeat when it equals an earlier push of the same order in everything but `uTime` that describes
   the order: state, accFillSz, px, sz, reqId, amendResult, code and the caller's `detail` (e.g.
   attached TP/SL prices). An amend that changes px or sz is therefore a new push, never a repeat.

Memory is bounded for a daemon that runs for months: every table is an LRU with a size cap and an age
cap; an order's memo is evicted soon after it reaches a terminal state (`terminal_ttl_ms`), others after
`max_age_ms` without a push. Time is passed in (`now_ms`), never read.
"""

from __future__ import annotations

import enum
from collections import OrderedDict
from collections.abc import Hashable, Iterator
from dataclasses import dataclass, field
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
S = TypeVar("S", bound=Hashable)

TERMINAL_CANCEL_STATES = frozenset({"canceled", "mmp_canceled"})
TERMINAL_STATES = TERMINAL_CANCEL_STATES | {"filled"}


class BoundedSeen(Generic[K]):
    """A set of recently seen keys, bounded by count (LRU) and by age; time is passed in.

    Ages count from a key's first sighting: a repeat never extends its life, so a key that keeps being
    repeated is still forgotten `max_age_ms` after it was first seen.
    """

    __slots__ = ("_max_age_ms", "_max_size", "_seen")

    def __init__(self, max_size: int, max_age_ms: int) -> None:
        if max_size < 1 or max_age_ms < 1:
            raise ValueError("max_size and max_age_ms must be >= 1")
        self._seen: OrderedDict[K, int] = OrderedDict()
        self._max_size = max_size
        self._max_age_ms = max_age_ms

    def first_time(self, key: K, now_ms: int) -> bool:
        """True (and remember `key`) when it was not seen within the bounds; False for a repeat."""
        self.prune(now_ms)
        if key in self._seen:
            return False
        self._seen[key] = now_ms
        if len(self._seen) > self._max_size:
            self._seen.popitem(last=False)
        return True

    def __contains__(self, key: object) -> bool:
        return key in self._seen

    def __len__(self) -> int:
        return len(self._seen)

    def prune(self, now_ms: int) -> None:
        """Forget keys first seen more than `max_age_ms` ago (oldest first, so this stops early)."""
        horizon = now_ms - self._max_age_ms
        seen = self._seen
        while seen:
            key, first = next(iter(seen.items()))
            if first >= horizon:
                break
            del seen[key]


class SeenSet(Generic[S, K]):
    """Per-stream bounded seen-sets for the backfill: a record already published (live or by an earlier
    backfill page) is not published again. Keys are the caller's natural ids: tradeId for trades,
    (ordId, state) for orders, billId for fills.
    """

    __slots__ = ("_max_age_ms", "_max_per_stream", "_max_streams", "_streams")

    def __init__(self, max_per_stream: int = 100_000, max_age_ms: int = 7 * 24 * 3600 * 1000,
                 max_streams: int = 10_000) -> None:
        self._streams: OrderedDict[S, BoundedSeen[K]] = OrderedDict()
        self._max_per_stream = max_per_stream
        self._max_age_ms = max_age_ms
        self._max_streams = max_streams

    def first_time(self, stream: S, key: K, now_ms: int) -> bool:
        """True when `key` is new for `stream` (and remember it); False for a duplicate."""
        seen = self._streams.get(stream)
        if seen is None:
            seen = self._streams[stream] = BoundedSeen(self._max_per_stream, self._max_age_ms)
            if len(self._streams) > self._max_streams:
                self._streams.popitem(last=False)
        else:
            self._streams.move_to_end(stream)
        return seen.first_time(key, now_ms)

    def seen(self, stream: S, key: K) -> bool:
        s = self._streams.get(stream)
        return s is not None and key in s

    def __len__(self) -> int:
        return sum(len(s) for s in self._streams.values())


@dataclass(frozen=True, slots=True)
class OrderPush:
    """The fields of one `orders` push that the dedupe rules look at (strings as OKX sent them; "" = empty)."""

    inst_id: str
    ord_id: str
    state: str
    u_time: int
    trade_id: str = ""
    acc_fill_sz: str = ""
    px: str = ""
    sz: str = ""
    req_id: str = ""
    amend_result: str = ""
    code: str = ""
    #: Further fields whose change makes a push new (e.g. attached TP/SL trigger prices), in a fixed order.
    detail: tuple[str, ...] = ()


class OrderRule(enum.StrEnum):
    """Which rule decided a push."""

    FILL = "fill"
    FILLED_NO_TRADE = "filled_no_trade"
    CANCELED = "canceled"
    AMEND = "amend"
    STATE_CHANGE = "state_change"


@dataclass(frozen=True, slots=True)
class OrderVerdict:
    """Keep (publish) or drop one push, and the rule that decided it."""

    keep: bool
    rule: OrderRule


@dataclass(slots=True)
class _OrderMemo:
    last_ms: int
    terminal_ms: int | None = None
    filled_no_trade: bool = False
    canceled: bool = False
    fingerprints: set[tuple[str, ...]] = field(default_factory=set)


class OrderPushDedupe:
    """OKX's order-push rules with bounded memory; one instance per account stream."""

    def __init__(
        self,
        *,
        max_orders: int = 200_000,
        max_age_ms: int = 24 * 3600 * 1000,
        terminal_ttl_ms: int = 15 * 60 * 1000,
        max_fills: int = 500_000,
        max_fingerprints_per_order: int = 512,
    ) -> None:
        self._orders: OrderedDict[str, _OrderMemo] = OrderedDict()
        #: ordId -> when it became terminal, oldest first: evicted precisely after `terminal_ttl_ms`.
        self._terminal: OrderedDict[str, int] = OrderedDict()
        self._fills: BoundedSeen[tuple[str, str]] = BoundedSeen(max_fills, max_age_ms)
        self._max_orders = max_orders
        self._max_age_ms = max_age_ms
        self._terminal_ttl_ms = terminal_ttl_ms
        self._max_fp = max_fingerprints_per_order

    def __len__(self) -> int:
        """Orders remembered (for a gauge)."""
        return len(self._orders)

    def accept(self, push: OrderPush, now_ms: int) -> OrderVerdict:
        """Apply the rules to one push received at local time `now_ms`."""
        self.prune(now_ms)
        if push.trade_id:
            keep = self._fills.first_time((push.inst_id, push.trade_id), now_ms)
            self._touch(push, now_ms)
            return OrderVerdict(keep, OrderRule.FILL)
        memo = self._touch(push, now_ms)
        if push.state == "filled":
            keep = not memo.filled_no_trade
            memo.filled_no_trade = True
            return OrderVerdict(keep, OrderRule.FILLED_NO_TRADE)
        if push.state in TERMINAL_CANCEL_STATES:
            keep = not memo.canceled
            memo.canceled = True
            return OrderVerdict(keep, OrderRule.CANCELED)
        if push.amend_result:
            return OrderVerdict(self._first_fingerprint(memo, ("amend", push.req_id)), OrderRule.AMEND)
        fingerprint = (
            "state", push.state, push.acc_fill_sz, push.px, push.sz, push.req_id, push.amend_result, push.code,
            *push.detail,
        )
        return OrderVerdict(self._first_fingerprint(memo, fingerprint), OrderRule.STATE_CHANGE)

    def _first_fingerprint(self, memo: _OrderMemo, fingerprint: tuple[str, ...]) -> bool:
        if fingerprint in memo.fingerprints:
            return False
        if len(memo.fingerprints) >= self._max_fp:
            # A pathological order (thousands of amends): forget its older fingerprints, keep dedupe bounded.
            memo.fingerprints.clear()
        memo.fingerprints.add(fingerprint)
        return True

    def _touch(self, push: OrderPush, now_ms: int) -> _OrderMemo:
        memo = self._orders.get(push.ord_id)
        if memo is None:
            memo = self._orders[push.ord_id] = _OrderMemo(now_ms)
            if len(self._orders) > self._max_orders:
                evicted, _ = self._orders.popitem(last=False)
                self._terminal.pop(evicted, None)
        else:
            memo.last_ms = now_ms
            self._orders.move_to_end(push.ord_id)
        if push.state in TERMINAL_STATES and memo.terminal_ms is None:
            memo.terminal_ms = now_ms
            self._terminal[push.ord_id] = now_ms
        return memo

    def prune(self, now_ms: int) -> None:
        """Evict orders terminal for longer than `terminal_ttl_ms` and orders without a push for `max_age_ms`."""
        self._fills.prune(now_ms)
        orders, terminal = self._orders, self._terminal
        while terminal:
            ord_id, since = next(iter(terminal.items()))
            if now_ms - since <= self._terminal_ttl_ms:
                break
            del terminal[ord_id]
            orders.pop(ord_id, None)
        while orders:
            ord_id, memo = next(iter(orders.items()))
            if now_ms - memo.last_ms <= self._max_age_ms:
                break
            del orders[ord_id]
            terminal.pop(ord_id, None)

    def orders(self) -> Iterator[str]:
        """Remembered ordIds, least recently pushed first."""
        return iter(self._orders)
