"""Candlesticks from the trade log: bar alignment (UTC+8 for 6H and longer unless `utc`), OHLC and volumes.

REST candles are computed from the log on demand; the `candle<bar>` channel keeps a running `CandleAcc`
per subscribed bar so a push costs O(new trades), and both agree because both read the same trades.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal

from ingest.sim.instruments import InstrumentSpec
from ingest.sim.numbers import decimals_of, dstr, fmt_fixed, fmt_trim, to_units, units_to_decimal
from ingest.sim.tradelog import TradeLog

_S = 1000
_M = 60 * _S
_H = 60 * _M
_D = 24 * _H
_FIXED: dict[str, int] = {"1s": _S, "1m": _M, "3m": 3 * _M, "5m": 5 * _M, "15m": 15 * _M, "30m": 30 * _M,
                          "1H": _H, "2H": 2 * _H, "4H": 4 * _H, "6H": 6 * _H, "12H": 12 * _H, "1D": _D,
                          "2D": 2 * _D, "3D": 3 * _D, "5D": 5 * _D}
_HK_OFFSET = 8 * _H


def _parse(bar: str) -> tuple[str, int]:
    """(base bar, tz offset ms): bars of 6H and longer are aligned to Hong Kong time unless suffixed `utc`."""
    if bar.endswith("utc"):
        return bar[:-3], 0
    long_bar = bar in ("6H", "12H", "1D", "2D", "3D", "5D", "1W", "1M", "3M")
    return bar, _HK_OFFSET if long_bar else 0


def bar_open(ts_ms: int, bar: str) -> int:
    """Open time (epoch ms) of the `bar` candle containing `ts_ms`."""
    base, off = _parse(bar)
    if base in _FIXED:
        size = _FIXED[base]
        return (ts_ms + off) // size * size - off
    local = datetime.fromtimestamp((ts_ms + off) / 1000, tz=UTC)
    if base == "1W":
        day = local.replace(hour=0, minute=0, second=0, microsecond=0) - timedelta(days=local.weekday())
        return int(day.timestamp() * 1000) - off
    months = 3 if base == "3M" else 1
    month0 = (local.month - 1) // months * months + 1
    start = datetime(local.year, month0, 1, tzinfo=UTC)
    return int(start.timestamp() * 1000) - off


def bar_next(open_ms: int, bar: str) -> int:
    """Open time of the candle after the one opening at `open_ms`."""
    base, off = _parse(bar)
    if base in _FIXED:
        return open_ms + _FIXED[base]
    if base == "1W":
        return open_ms + 7 * _D
    local = datetime.fromtimestamp((open_ms + off) / 1000, tz=UTC)
    months = 3 if base == "3M" else 1
    month = local.month - 1 + months
    nxt = datetime(local.year + month // 12, month % 12 + 1, 1, tzinfo=UTC)
    return int(nxt.timestamp() * 1000) - off


@dataclass(slots=True)
class CandleAcc:
    """One candle being built: OHLC in price units, volumes as exact integer sums."""

    open_ms: int
    o: int
    h: int
    low: int
    c: int
    vol: int = 0  # size units
    quote: int = 0  # sum(px * sz): px_dec + sz_dec decimals
    inv_base: Decimal = field(default_factory=Decimal)  # inverse contracts: sum(sz * ctVal / px)

    def add(self, px: int, sz: int, inverse_term: Decimal | None = None) -> None:
        self.h = max(self.h, px)
        self.low = min(self.low, px)
        self.c = px
        self.vol += sz
        self.quote += px * sz
        if inverse_term is not None:
            self.inv_base += inverse_term


class CandleMath:
    """Formats candles of one instrument: OKX's 9-string rows [ts,o,h,l,c,vol,volCcy,volCcyQuote,confirm]."""

    def __init__(self, spec: InstrumentSpec) -> None:
        self.spec = spec
        self.px_dec = spec.px_dec
        self.sz_dec = spec.sz_dec
        self.ct_dec = decimals_of(spec.ct_val) if spec.ct_val else 0
        self.ct_units = to_units(spec.ct_val, self.ct_dec) if spec.ct_val else 1
        self.ct_val = Decimal(spec.ct_val) if spec.ct_val else Decimal(1)

    def inverse_term(self, px: int, sz: int) -> Decimal | None:
        """Base-currency volume of an inverse trade (sz contracts of ctVal USD at px)."""
        if not self.spec.is_inverse:
            return None
        return units_to_decimal(sz, self.sz_dec) * self.ct_val / units_to_decimal(px, self.px_dec)

    def row(self, acc: CandleAcc, confirm: bool) -> list[str]:
        spec = self.spec
        vol = fmt_trim(acc.vol, self.sz_dec)
        if not spec.is_derivative:
            vol_ccy = fmt_trim(acc.quote, self.px_dec + self.sz_dec)
            vol_quote = vol_ccy
        elif spec.is_inverse:
            vol_ccy = dstr(acc.inv_base, 8)
            vol_quote = fmt_trim(acc.vol * self.ct_units, self.sz_dec + self.ct_dec)
        else:
            vol_ccy = fmt_trim(acc.vol * self.ct_units, self.sz_dec + self.ct_dec)
            vol_quote = fmt_trim(acc.quote * self.ct_units, self.px_dec + self.sz_dec + self.ct_dec)
        return [str(acc.open_ms), fmt_fixed(acc.o, self.px_dec), fmt_fixed(acc.h, self.px_dec),
                fmt_fixed(acc.low, self.px_dec), fmt_fixed(acc.c, self.px_dec), vol, vol_ccy, vol_quote,
                "1" if confirm else "0"]

    def build(self, log: TradeLog, open_ms: int, bar: str) -> CandleAcc | None:
        """The candle opening at `open_ms` from the log; a trade-less bar repeats the previous close; None
        before the first trade."""
        end = bar_next(open_ms, bar)
        i0, i1 = log.index_ts(open_ms), log.index_ts(end)
        if i0 == i1:
            if i0 == 0:
                return None
            prev = log.px[i0 - 1]
            return CandleAcc(open_ms, prev, prev, prev, prev)
        first = log.px[i0]
        acc = CandleAcc(open_ms, first, first, first, first)
        inverse = self.spec.is_inverse
        for i in range(i0, i1):
            px, sz = log.px[i], log.sz[i]
            acc.add(px, sz, self.inverse_term(px, sz) if inverse else None)
        return acc

    def page(self, log: TradeLog, bar: str, now_ms: int, after: int | None, before: int | None, limit: int,
             max_bars: int | None = None) -> list[list[str]]:
        """Candles newest first, OKX paging: `after` = older than that open ts, `before` = newer than it."""
        if len(log) == 0:
            return []
        first = bar_open(log.ts[0], bar)
        current = bar_open(max(now_ms, log.ts[-1]), bar)
        if max_bars is not None:
            floor = current
            for _ in range(max_bars - 1):
                if floor <= first:
                    break
                floor = bar_open(floor - 1, bar)
            first = max(first, floor)
        hi = current if after is None else bar_open(after - 1, bar)
        lo = first if before is None else max(first, bar_next(bar_open(before, bar), bar))
        if hi < lo:
            return []
        opens: list[int] = []
        if before is not None and after is None:
            t = lo
            while t <= hi and len(opens) < limit:
                opens.append(t)
                t = bar_next(t, bar)
            opens.reverse()
        else:
            t = hi
            while t >= lo and len(opens) < limit:
                opens.append(t)
                t = bar_open(t - 1, bar)
        rows: list[list[str]] = []
        for t in opens:
            acc = self.build(log, t, bar)
            if acc is not None:
                rows.append(self.row(acc, confirm=t != current))
        return rows
