"""What the private record already shows, so a REST read of the account adds only what changed.

OKX's REST views of an account are states, not events: an orders-pending/orders-history row is an order as
it is now (its `fill*` fields describe its last fill), a fills row is one fill. After a hole in the private
streams the reconciler reads them (`services/private.py`) and the pipeline asks this ledger what is news:

* Orders: a REST row is news when the order's state (state, accFillSz, px, sz) differs from the last state
  published for that ordId by either source, unless it is stale: older (`uTime`) than that state, or open
  while the record already shows the order final (a push overtook the fetch). A WebSocket push that merely
  repeats a state a REST row already put on record is a repeat (the reconnect race: a change made just
  before the fetch is in the REST answer and also pushed, in either order). An amend response
  (`amendResult`) is an event of its own and never counts as such a repeat; the WebSocket rules of
  `core/orders.py` still apply before this.
* Fills pushed on the `orders` channel (a push with a tradeId) are remembered as (instId, tradeId), so the
  pipeline can tell a REST fill the orders stream already recorded.
* `open_since_ms`: the creation time of the oldest order whose last recorded state is open. Such an order
  may have completed during a hole, so the order history must be read back to it.

Memory is bounded (an LRU with a size cap, entries forgotten `max_age_ms` after their last change: longer
than OKX's 7-day order history, so a row REST can still return is never mistaken for news because its order
was forgotten). Time is passed in, never read.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation

from ingest.core.orders import BoundedSeen
from ingest.core.records import Order

#: Private channels a REST read of the account reconciles after a hole (see `services/private.py`).
RECONCILED_CHANNELS = frozenset({"orders", "fills", "positions", "account", "balance_and_position"})
#: Of those, the channels without a snapshot on subscribe, whose missed records REST reconstructs: a hole in
#: them counts as filled once the reconciliation is published. (The others resend their state on subscribe;
#: their changes during a hole cannot be read back from anywhere.)
REST_FILLED_CHANNELS = frozenset({"orders", "fills"})
#: The states in which an order still rests in the book (everything else is terminal).
OPEN_ORDER_STATES = frozenset({"live", "partially_filled"})
#: REST states of one order kept to recognise WebSocket repeats (a handful is plenty: each is a later state).
_REST_STATES_PER_ORDER = 8

#: (state, accFillSz, px, sz), decimals normalised: what identifies one state of an order.
OrderState = tuple[str, str, str, str]


def _number(text: str | None) -> str:
    """A decimal string in one canonical form ("0.010" and "0.01" are one value); other text unchanged."""
    if not text:
        return ""
    try:
        value = Decimal(text)
    except InvalidOperation:
        return text
    if not value.is_finite():
        return text
    return format(value.normalize(), "f")


def _int(text: str | None) -> int:
    return int(text) if text and text.isdigit() else 0


def reports_fill(rec: Order) -> bool:
    """True when this order update reports a fill: a tradeId and a non-zero fillSz.

    The `fill*` fields describe the update itself (SPEC 6), but `tradeId` may still name the order's last
    fill on a later update (a cancel after a partial fill): such an update is not a repeat of that fill.
    """
    return bool(rec.trade_id) and _number(rec.fill_sz) not in ("", "0")


def order_state(rec: Order) -> OrderState:
    """The state of an order a record describes, comparable across WebSocket pushes and REST rows."""
    return rec.state or "", _number(rec.acc_fill_sz), _number(rec.px), _number(rec.sz)


@dataclass(slots=True)
class _OrderEntry:
    state: OrderState
    u_time_ms: int
    c_time_ms: int | None
    touched_ms: int
    rest_states: list[OrderState] = field(default_factory=list)


class PrivateLedger:
    """Per ordId the last published state, per order-channel fill its (instId, tradeId); bounded."""

    def __init__(self, *, max_orders: int = 200_000, max_age_ms: int = 8 * 24 * 3600 * 1000,
                 max_trades: int = 500_000) -> None:
        if max_orders < 1 or max_age_ms < 1:
            raise ValueError("max_orders and max_age_ms must be >= 1")
        self._orders: OrderedDict[str, _OrderEntry] = OrderedDict()
        self._trades: BoundedSeen[tuple[str, str]] = BoundedSeen(max_trades, max_age_ms)
        self._max_orders = max_orders
        self._max_age_ms = max_age_ms
        self._now_ms = 0

    def __len__(self) -> int:
        """Orders remembered."""
        return len(self._orders)

    # ---- WebSocket pushes ----------------------------------------------------------------------------

    def repeats_rest(self, rec: Order) -> bool:
        """True when this push only repeats a state a REST row already published (and is no amend response)."""
        if rec.amend_result:
            return False
        entry = self._orders.get(rec.ord_id)
        return entry is not None and order_state(rec) in entry.rest_states

    def push_published(self, rec: Order, now_ms: int) -> None:
        """A WebSocket push of `rec` was published: its state is now the order's last recorded one."""
        self._record(rec, order_state(rec), now_ms, rest=False)
        if reports_fill(rec):
            self._trades.first_time((rec.inst_id or "", rec.trade_id or ""), self._now_ms)

    def trade_recorded(self, inst_id: str, trade_id: str) -> bool:
        """True when a push on the `orders` channel already recorded this fill."""
        return (inst_id, trade_id) in self._trades

    # ---- REST rows -----------------------------------------------------------------------------------

    def rest_order_is_news(self, rec: Order, now_ms: int) -> bool:
        """True (and recorded as published) when this REST row shows a state the record does not have."""
        state = order_state(rec)
        entry = self._orders.get(rec.ord_id)
        if entry is not None:
            if entry.state == state or _int(rec.u_time) < entry.u_time_ms:
                return False
            if entry.state[0] not in OPEN_ORDER_STATES and state[0] in OPEN_ORDER_STATES:
                return False  # final states are final: this row was read before the push that ended the order
        self._record(rec, state, now_ms, rest=True)
        return True

    # ---- queries -------------------------------------------------------------------------------------

    def open_since_ms(self) -> int | None:
        """Creation time (OKX ms) of the oldest order recorded as open, None when none is (or it is unknown)."""
        times = [e.c_time_ms for e in self._orders.values()
                 if e.state[0] in OPEN_ORDER_STATES and e.c_time_ms is not None]
        return min(times) if times else None

    def last_state(self, ord_id: str) -> OrderState | None:
        entry = self._orders.get(ord_id)
        return entry.state if entry is not None else None

    # ---- internals -----------------------------------------------------------------------------------

    def _record(self, rec: Order, state: OrderState, now_ms: int, *, rest: bool) -> None:
        self._now_ms = max(self._now_ms, now_ms)
        self._prune()
        entry = self._orders.get(rec.ord_id)
        c_time = _int(rec.c_time) or None
        u_time = _int(rec.u_time)
        if entry is None:
            entry = self._orders[rec.ord_id] = _OrderEntry(state, u_time, c_time, self._now_ms)
            if len(self._orders) > self._max_orders:
                self._orders.popitem(last=False)
        else:
            entry.state = state
            entry.u_time_ms = max(entry.u_time_ms, u_time)
            entry.touched_ms = self._now_ms
            if c_time is not None:
                entry.c_time_ms = c_time
            self._orders.move_to_end(rec.ord_id)
        if rest and state not in entry.rest_states:
            entry.rest_states.append(state)
            del entry.rest_states[:-_REST_STATES_PER_ORDER]

    def _prune(self) -> None:
        horizon = self._now_ms - self._max_age_ms
        orders = self._orders
        while orders:
            ord_id, entry = next(iter(orders.items()))
            if entry.touched_ms >= horizon:
                break
            del orders[ord_id]
        self._trades.prune(self._now_ms)
