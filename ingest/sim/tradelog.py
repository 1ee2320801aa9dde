"""Every individual trade of one instrument, in compact parallel arrays.

The same log answers the WebSocket pushes, `GET /market/trades`, `GET /market/history-trades` and the
candles, which is what makes "the history served over REST is the history pushed over WebSocket" true by
construction. Timestamps only grow, and so do the ids of ordinary trades, so both can be searched with
bisect. Liquidation and ADL fills have negative tradeIds (SPEC 4) and sit in the log at their time; paging
by tradeId walks the log in that order (`after=X`: the trades before trade X's place), so a walk between
two ordinary trades also returns the liquidation fills between them. (How OKX orders negative ids when
paging is not documented; this is the simulator's model.)
"""

from __future__ import annotations

from array import array
from bisect import bisect_left
from dataclasses import dataclass

from ingest.sim.numbers import fmt_trim


@dataclass(frozen=True, slots=True)
class TradeRow:
    """One trade as OKX's REST trade endpoints return it (and as `trades-all` pushes it): all strings."""

    inst_id: str
    trade_id: str
    px: str
    sz: str
    side: str
    ts: str
    source: str = "0"

    def to_okx(self) -> dict[str, str]:
        return {"instId": self.inst_id, "side": self.side, "sz": self.sz, "px": self.px, "source": self.source,
                "tradeId": self.trade_id, "ts": self.ts}


class TradeLog:
    """Append-only (until trimmed) log of one instrument's individual trades, oldest first."""

    __slots__ = ("_keys", "_max", "_negative", "ids", "inst_id", "px", "px_dec", "sides", "sources", "sz", "sz_dec",
                 "ts")

    def __init__(self, inst_id: str, px_dec: int, sz_dec: int, max_len: int) -> None:
        self.inst_id = inst_id
        self.px_dec = px_dec
        self.sz_dec = sz_dec
        self._max = max_len
        self.ids = array("q")
        self.px = array("q")
        self.sz = array("q")
        self.ts = array("q")
        self.sides = bytearray()  # 1 = buy, 0 = sell (taker side)
        self.sources = bytearray()  # 0 normal, 1 ELP/RPI
        #: Per row, the id of the latest ordinary (positive-id) trade at or before it: sorted, for bisect.
        self._keys = array("q")
        #: Index of each negative-id row (liquidation and ADL fills).
        self._negative: dict[int, int] = {}

    def __len__(self) -> int:
        return len(self.ids)

    def append(self, trade_id: int, px: int, sz: int, buy: bool, ts: int, source: int = 0) -> None:
        if trade_id < 0:
            self._negative[trade_id] = len(self.ids)
            self._keys.append(self._keys[-1] if self._keys else 0)
        else:
            self._keys.append(trade_id)
        self.ids.append(trade_id)
        self.px.append(px)
        self.sz.append(sz)
        self.ts.append(ts)
        self.sides.append(1 if buy else 0)
        self.sources.append(source)
        if len(self.ids) > self._max:
            self._trim(len(self.ids) - self._max + self._max // 10)

    def _trim(self, n: int) -> None:
        """Forget the oldest `n` trades (OKX keeps 3 months; the simulator keeps `max_len`)."""
        for arr in (self.ids, self.px, self.sz, self.ts, self._keys):
            del arr[:n]
        del self.sides[:n]
        del self.sources[:n]
        if self._negative:
            self._negative = {tid: i - n for tid, i in self._negative.items() if i >= n}

    def row(self, i: int) -> TradeRow:
        return TradeRow(self.inst_id, str(self.ids[i]), fmt_trim(self.px[i], self.px_dec),
                        fmt_trim(self.sz[i], self.sz_dec), "buy" if self.sides[i] else "sell", str(self.ts[i]),
                        str(self.sources[i]))

    def rows(self, start: int = 0, stop: int | None = None) -> list[TradeRow]:
        stop = len(self.ids) if stop is None else stop
        return [self.row(i) for i in range(max(0, start), min(stop, len(self.ids)))]

    def index_after_id(self, trade_id: int) -> int:
        """Index of the first trade after trade `trade_id`'s place (after the id, for ids no longer kept)."""
        i = self.index_of_id(trade_id)
        return i + 1 if i < len(self.ids) and self.ids[i] == trade_id else i

    def index_of_id(self, trade_id: int) -> int:
        """Index of trade `trade_id`, or where it would be (the first ordinary trade with a greater id)."""
        if trade_id < 0:
            found = self._negative.get(trade_id)
            return found if found is not None else 0
        return bisect_left(self._keys, trade_id)

    def index_ts(self, ts: int) -> int:
        """Index of the first trade at or after `ts`."""
        return bisect_left(self.ts, ts)

    def newest_first(self, lo: int, hi: int, limit: int, *, nearest_lo: bool = False) -> list[TradeRow]:
        """Up to `limit` trades of indexes [lo, hi), newest first; those nearest `hi` unless `nearest_lo`."""
        if hi <= lo:
            return []
        if nearest_lo:
            hi = min(hi, lo + limit)
        else:
            lo = max(lo, hi - limit)
        return [self.row(i) for i in range(hi - 1, lo - 1, -1)]
