"""The deterministic simulated market: one seeded random stream per instrument drives its book and trades.

Same seed and same calls -> same history: every random draw comes from `random.Random(f"{seed}/{instId}")`,
consumed only by `step()` and the explicit generators, never by who is subscribed. Each step is one book
image (OKX builds one every 10-100 ms): takers walk the book and produce individual trades (REST rows,
`trades-all`) aggregated per taker order and price (`trades`, with `count` and a shared `seqId`), makers
add, resize and cancel levels, and the depth channels get the changed levels as one update whose
`prevSeqId` is the previous book image's `seqId`.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from decimal import Decimal

from ingest.sim.book import Book
from ingest.sim.clock import SimClock
from ingest.sim.config import SimConfig
from ingest.sim.instruments import InstrumentSpec, spec_for
from ingest.sim.numbers import dstr, fmt_trim, to_units, units_to_decimal
from ingest.sim.tradelog import TradeLog, TradeRow


@dataclass(frozen=True, slots=True)
class AggTrade:
    """One `trades` push row: a taker order's fills at one price; `trade_id` is the last id, `count` the matches."""

    trade_id: int
    px: int
    sz: int
    buy: bool
    ts: int
    count: int
    seq_id: int
    source: int = 0


@dataclass(frozen=True, slots=True)
class Liquidation:
    """One `liquidation-orders` detail (a sample, as OKX sends at most one per contract per second)."""

    inst_id: str
    side: str
    pos_side: str
    bk_px: int
    sz: int
    ts: int


@dataclass(frozen=True, slots=True)
class Settlement:
    """One funding settlement of a SWAP, as /public/funding-rate-history returns it."""

    funding_time: int
    funding_rate: str
    realized_rate: str

    def to_okx(self, inst_id: str) -> dict[str, str]:
        return {"formulaType": "withRate", "fundingRate": self.funding_rate, "fundingTime": str(self.funding_time),
                "instId": inst_id, "instType": "SWAP", "method": "current_period",
                "realizedRate": self.realized_rate}


@dataclass(slots=True)
class StepResult:
    """What one market step changed for one instrument; the server turns it into pushes."""

    inst_id: str
    ts: int
    agg: list[AggTrade] = field(default_factory=list)
    #: Trade id of the first individual trade this step may have made (`trades-all` = trades from this id on).
    first_trade_id: int = 0
    book_update: bool = False
    heartbeat: bool = False
    reset: bool = False
    prev_seq: int = 0
    seq: int = 0
    delta_bids: dict[int, tuple[int, int]] = field(default_factory=dict)
    delta_asks: dict[int, tuple[int, int]] = field(default_factory=dict)
    liquidations: list[Liquidation] = field(default_factory=list)
    instrument_changed: bool = False


class InstrumentMarket:
    """Book, trade log, sequence and derived prices of one instrument."""

    def __init__(self, spec: InstrumentSpec, config: SimConfig) -> None:
        self.spec = spec
        self.config = config
        self.rng = random.Random(f"{config.seed}/{spec.inst_id}")
        self.px_dec = spec.px_dec
        self.sz_dec = spec.sz_dec
        self.tick = to_units(spec.tick_sz, self.px_dec)
        self.lot = to_units(spec.lot_sz, self.sz_dec)
        self.min_lots = max(1, to_units(spec.min_sz, self.sz_dec) // self.lot)
        self.depth = config.book_depth
        self.book = Book()
        self.log = TradeLog(spec.inst_id, self.px_dec, self.sz_dec, config.max_trades_history)
        self.next_trade_id = self.rng.randint(100_000_000, 2_000_000_000)
        self.seq = self.rng.randint(1_000_000_000, 300_000_000_000)
        self.book_seq = self.seq
        self.idle_steps = 0
        self.frozen = False
        self.pending_reset: int | None = None
        self.pending_liquidations: list[Liquidation] = []
        self.instrument_changed = False
        self.ts = 0
        #: Funding settlements so far (SWAPs only), oldest first; the next one is due at `_next_settlement`.
        self.settlements: list[Settlement] = []
        #: The last negative tradeId given to a liquidation/ADL fill (they count down from -1_000_001).
        self.next_liquidation_id = -1_000_000
        self._next_settlement: int | None = None
        start = to_units(spec.start_px, self.px_dec)
        self.start_px = start - start % self.tick
        self.ct_val = Decimal(spec.ct_val) if spec.ct_val else Decimal(1)
        px_float = float(spec.start_px)
        notional = 20_000.0
        if not spec.is_derivative:
            typical = notional / px_float
        elif spec.is_inverse:
            typical = notional / float(self.ct_val)
        else:
            typical = notional / px_float / float(self.ct_val)
        self.typical_lots = max(float(self.min_lots), typical / float(spec.lot_sz))
        self.last_px = self.start_px
        self.last_sz = 0
        self.open24h = self.start_px
        self.high24h = self.start_px + self.tick * self.rng.randint(50, 500)
        self.low24h = max(self.tick, self.start_px - self.tick * self.rng.randint(50, 500))
        self.vol24h = int(self.typical_lots * self.rng.randint(2_000, 20_000)) * self.lot
        self.quote24h = self.vol24h * self.start_px
        self.oi = int(self.typical_lots * self.rng.randint(50_000, 500_000)) * self.lot
        self._init_book()
        self.book.take_delta()

    # --- sampling ---------------------------------------------------------------------------------------
    def _lots(self, scale: float, sigma: float) -> int:
        lots = int(self.typical_lots * scale * math.exp(self.rng.gauss(0.0, sigma)))
        return max(self.min_lots, min(lots, int(self.typical_lots * 50) + self.min_lots))

    def _poisson(self, mean: float) -> int:
        if mean <= 0:
            return 0
        limit, k, p = math.exp(-mean), 0, self.rng.random()
        while p > limit and k < 20:
            k += 1
            p *= self.rng.random()
        return k

    def _count_for(self, sz: int) -> int:
        return 1 + min(40, int(sz / self.lot / self.typical_lots)) + self.rng.randint(0, 2)

    # --- book ----------------------------------------------------------------------------------------------
    def _init_book(self) -> None:
        bid = self.start_px
        ask = self.start_px + self.tick
        for _ in range(self.depth):
            sz = self._lots(1.0, 1.0) * self.lot
            self.book.set(False, ask, sz, self._count_for(sz))
            ask += self.tick * self.rng.randint(1, 3)
            if bid > 0:
                sz = self._lots(1.0, 1.0) * self.lot
                self.book.set(True, bid, sz, self._count_for(sz))
                bid -= self.tick * self.rng.randint(1, 3)

    def _maintain_depth(self) -> None:
        book = self.book
        for is_bid in (True, False):
            if book.size(is_bid) == 0:
                other = book.best(not is_bid)
                anchor = self.last_px if other is None else other
                px = anchor - self.tick if is_bid else anchor + self.tick
                if px > 0:
                    sz = self._lots(1.0, 1.0) * self.lot
                    book.set(is_bid, px, sz, self._count_for(sz))
            while 0 < book.size(is_bid) < self.depth:
                worst = book.worst(is_bid)
                assert worst is not None
                gap = self.tick * self.rng.randint(1, 3)
                px = worst - gap if is_bid else worst + gap
                if px <= 0:
                    break
                sz = self._lots(1.0, 1.0) * self.lot
                book.set(is_bid, px, sz, self._count_for(sz))
            while book.size(is_bid) > self.depth:
                worst = book.worst(is_bid)
                assert worst is not None
                book.set(is_bid, worst, 0, 0)

    def _maker_change(self) -> None:
        book, rng = self.book, self.rng
        best_bid, best_ask = book.best(True), book.best(False)
        if best_bid is None or best_ask is None:
            return
        op = rng.random()
        is_bid = rng.random() < 0.5
        if op < 0.4:
            offset = rng.randint(-6, 1) * self.tick
            if is_bid:
                px = min(best_bid + offset, best_ask - self.tick)
            else:
                px = max(best_ask - offset, best_bid + self.tick)
            if px <= 0:
                return
            sz = self._lots(1.0, 1.0) * self.lot
            old = (book.bids if is_bid else book.asks).get(px)
            if old is not None:
                book.set(is_bid, px, old[0] + sz, old[1] + 1)
            else:
                book.set(is_bid, px, sz, self._count_for(sz))
        elif op < 0.8:
            n = book.size(is_bid)
            if n:
                px = book.price_at(is_bid, min(n - 1, int(rng.expovariate(1 / 8))))
                sz = self._lots(1.0, 1.0) * self.lot
                book.set(is_bid, px, sz, self._count_for(sz))
        else:
            n = book.size(is_bid)
            if n > 5:
                px = book.price_at(is_bid, min(n - 1, int(rng.expovariate(1 / 12))))
                book.set(is_bid, px, 0, 0)

    def _taker(self, ts: int, out: list[AggTrade]) -> None:
        book, rng = self.book, self.rng
        mid = self.mid()
        # A mild pull towards the start price keeps a long run's prices realistic.
        pull = max(-0.15, min(0.15, (self.start_px - mid) / max(1, self.start_px) * 30))
        buy = rng.random() < 0.5 + pull
        want = self._lots(0.15, 1.3) * self.lot
        self.seq += rng.randint(1, 6)
        levels_walked = 0
        while want > 0 and book.size(not buy) > 0 and levels_walked < 4:
            levels_walked += 1
            px = book.best(not buy)
            assert px is not None
            sz, cnt = (book.asks if buy else book.bids)[px]
            take = min(want, sz)
            lots = take // self.lot
            k = max(1, min(rng.randint(1, min(cnt, 4)), lots))
            cuts = sorted(rng.sample(range(1, lots), k - 1)) if k > 1 else []
            prev = 0
            for cut in [*cuts, lots]:
                self.next_trade_id += 1
                self.log.append(self.next_trade_id, px, (cut - prev) * self.lot, buy, ts)
                prev = cut
            out.append(AggTrade(self.next_trade_id, px, take, buy, ts, k, self.seq))
            rest = sz - take
            book.set(not buy, px, rest, max(1, cnt - k) if rest else 0)
            self._account_trade(px, take)
            want -= take

    def _account_trade(self, px: int, sz: int) -> None:
        self.last_px, self.last_sz = px, sz
        self.high24h = max(self.high24h, px)
        self.low24h = min(self.low24h, px)
        self.vol24h += sz
        self.quote24h += px * sz
        if self.spec.is_derivative:
            self.oi = max(self.lot, self.oi + (sz if self.rng.random() < 0.5 else -sz))

    # --- stepping ----------------------------------------------------------------------------------------
    def step(self, ts: int) -> StepResult:
        """Advance one book image at market time `ts`."""
        self.ts = ts
        if self.spec.inst_type == "SWAP":
            self._settle(ts)
        res = StepResult(self.spec.inst_id, ts, first_trade_id=self.next_trade_id + 1)
        if not self.frozen:
            for _ in range(self._poisson(self.config.takers_per_tick)):
                self._taker(ts, res.agg)
            for _ in range(self.rng.randint(0, 2 * self.config.maker_changes_per_tick)):
                self._maker_change()
            self._maintain_depth()
            if self.spec.is_derivative and self.rng.random() < 0.003:
                self.pending_liquidations.append(self._liquidation(ts))
        res.delta_bids, res.delta_asks = self.book.take_delta()
        res.prev_seq = self.book_seq
        if self.pending_reset is not None:
            self.seq = self.book_seq = self.pending_reset
            self.pending_reset = None
            res.book_update = res.reset = True
            self.idle_steps = 0
        elif res.delta_bids or res.delta_asks:
            self.seq += self.rng.randint(1, 12)
            self.book_seq = self.seq
            res.book_update = True
            self.idle_steps = 0
        else:
            self.idle_steps += 1
            if self.idle_steps >= self.config.heartbeat_ticks:
                res.book_update = res.heartbeat = True
                self.idle_steps = 0
        res.seq = self.book_seq
        if self.pending_liquidations:
            res.liquidations, self.pending_liquidations = self.pending_liquidations, []
        if self.instrument_changed:
            res.instrument_changed, self.instrument_changed = True, False
        return res

    def _settle(self, ts: int) -> None:
        """Record the settlements whose time has come (the rate is the one predicted at that moment)."""
        interval = self.config.funding_interval_ms
        if self._next_settlement is None:
            self._next_settlement = (ts // interval + 1) * interval
        while ts >= self._next_settlement:
            rate = self.funding(self._next_settlement - 1)[0]
            self.settlements.append(Settlement(self._next_settlement, rate, rate))
            self._next_settlement += interval

    def _liquidation(self, ts: int) -> Liquidation:
        long = self.rng.random() < 0.5
        mid = self.mid()
        bk = mid - self.tick * self.rng.randint(1, 30) if long else mid + self.tick * self.rng.randint(1, 30)
        return Liquidation(self.spec.inst_id, "sell" if long else "buy", "long" if long else "short",
                           max(self.tick, bk), self._lots(0.3, 1.0) * self.lot, ts)

    def generate_trades(self, n: int, ts: int) -> list[AggTrade]:
        """`n` single-match trades at `ts` for the fast path: logged like any trade, the book is not touched."""
        out: list[AggTrade] = []
        rng, tick, lot, log = self.rng, self.tick, self.lot, self.log
        ts = max(ts, log.ts[-1]) if len(log) else ts
        px = self.last_px
        for _ in range(n):
            px = max(tick, px + rng.randint(-2, 2) * tick)
            sz = self._lots(0.15, 1.3) * lot
            buy = rng.random() < 0.5
            self.next_trade_id += 1
            self.seq += rng.randint(1, 3)
            log.append(self.next_trade_id, px, sz, buy, ts)
            out.append(AggTrade(self.next_trade_id, px, sz, buy, ts, 1, self.seq))
            self._account_trade(px, sz)
        return out

    def record_trade(self, px: int, sz: int, buy: bool, ts: int) -> AggTrade:
        """A single trade from outside the random process (a scripted account fill)."""
        ts = max(ts, self.log.ts[-1]) if len(self.log) else ts
        self.next_trade_id += 1
        self.seq += 1
        self.log.append(self.next_trade_id, px, sz, buy, ts)
        self._account_trade(px, sz)
        return AggTrade(self.next_trade_id, px, sz, buy, ts, 1, self.seq)

    def record_liquidation_fill(self, ts: int, buy: bool = False) -> AggTrade:
        """A liquidation (or ADL) fill: a trade with a negative tradeId (SPEC 4), at the last price, logged at
        its time between the ordinary trades; it does not advance the ordinary id sequence."""
        ts = max(ts, self.log.ts[-1]) if len(self.log) else ts
        self.next_liquidation_id -= 1
        self.seq += 1
        sz = max(1, self.min_lots) * self.lot
        self.log.append(self.next_liquidation_id, self.last_px, sz, buy, ts)
        self._account_trade(self.last_px, sz)
        return AggTrade(self.next_liquidation_id, self.last_px, sz, buy, ts, 1, self.seq)

    # --- derived prices --------------------------------------------------------------------------------
    def mid(self) -> int:
        bid, ask = self.book.best(True), self.book.best(False)
        if bid is None or ask is None:
            return self.last_px
        mid = (bid + ask) // 2
        return mid - mid % self.tick

    def mark_px(self) -> int:
        return self.mid()

    def index_px(self) -> int:
        """The index: the mid less a small deterministic basis for derivatives."""
        mid = self.mid()
        if not self.spec.is_derivative:
            return mid
        idx = mid - mid // 5000
        return idx - idx % self.tick

    def px_str(self, units: int) -> str:
        return fmt_trim(units, self.px_dec)

    def sz_str(self, units: int) -> str:
        return fmt_trim(units, self.sz_dec)

    def funding(self, ts: int) -> tuple[str, str, str, str]:
        """(fundingRate, premium, fundingTime, nextFundingTime) from the mark/index premium."""
        mark, idx = Decimal(self.mark_px()), Decimal(max(1, self.index_px()))
        premium = (mark - idx) / idx
        rate = max(Decimal("-0.00375"), min(Decimal("0.00375"), premium + Decimal("0.0001")))
        interval = self.config.funding_interval_ms
        funding_time = (ts // interval + 1) * interval
        return dstr(rate, 16), dstr(premium, 16), str(funding_time), str(funding_time + interval)

    def open_interest(self) -> tuple[str, str, str]:
        """(oi contracts, oiCcy coin, oiUsd)."""
        oi = units_to_decimal(self.oi, self.sz_dec)
        px = units_to_decimal(max(self.tick, self.mark_px()), self.px_dec)
        coin = oi * self.ct_val / px if self.spec.is_inverse else oi * self.ct_val
        return dstr(oi), dstr(coin, 8), dstr(coin * px, 8)

    def price_limits(self) -> tuple[str, str]:
        mark = self.mark_px()
        buy = mark + mark // 50
        sell = mark - mark // 50
        return self.px_str(buy - buy % self.tick), self.px_str(max(self.tick, sell - sell % self.tick))


class Market:
    """All instruments, the market clock and the scripted market interventions."""

    def __init__(self, config: SimConfig, clock: SimClock) -> None:
        self.config = config
        self.clock = clock
        self.instruments: dict[str, InstrumentMarket] = {}
        self.steps = 0
        self._last_ts = 0
        for inst_id in config.instruments:
            self.instruments[inst_id] = InstrumentMarket(spec_for(inst_id), config)

    def next_ts(self) -> int:
        """Market time of the next event: virtual (start_ms + steps * tick_ms) or the simulator clock,
        never going backwards and strictly increasing per step so `ts` paging makes progress."""
        if self.config.start_ms is not None:
            ts = self.config.start_ms + self.steps * self.config.tick_ms
        else:
            ts = self.clock.now_ms()
        ts = max(ts, self._last_ts + 1)
        self._last_ts = ts
        return ts

    def now_ms(self) -> int:
        """Current market time: the virtual time when `start_ms` is set, else the simulator clock."""
        if self.config.start_ms is not None:
            return max(self._last_ts, self.config.start_ms + self.steps * self.config.tick_ms)
        return max(self._last_ts, self.clock.now_ms())

    def step(self) -> list[StepResult]:
        ts = self.next_ts()
        self.steps += 1
        return [m.step(ts) for m in self.instruments.values()]

    def get(self, inst_id: str) -> InstrumentMarket:
        try:
            return self.instruments[inst_id]
        except KeyError:
            raise KeyError(f"{inst_id} is not simulated; configured: {', '.join(self.instruments)}") from None

    def trades(self, inst_id: str) -> list[TradeRow]:
        """Every individual trade of `inst_id` so far, oldest first (the rows REST returns)."""
        return self.get(inst_id).log.rows()

    def specs(self) -> list[InstrumentSpec]:
        return [m.spec for m in self.instruments.values()]

    def index_source(self, index_id: str) -> InstrumentMarket | None:
        """The instrument whose price feeds index `index_id` (e.g. BTC-USDT): the spot pair, else any of the coin."""
        if index_id.count("-") != 1:
            return None
        if index_id in self.instruments and self.instruments[index_id].spec.inst_type == "SPOT":
            return self.instruments[index_id]
        coin, quote = index_id.split("-")
        for m in self.instruments.values():
            if m.spec.coin == coin and m.spec.quote_ccy in (quote, "USDT", "USD", "USDC"):
                return m
        return None

    # --- interventions -------------------------------------------------------------------------------
    def freeze(self, inst_id: str, frozen: bool = True) -> None:
        """Stop (or restart) trades and book changes, e.g. to see OKX's empty heartbeat updates."""
        self.get(inst_id).frozen = frozen

    def reset_sequence(self, inst_id: str, to: int | None = None) -> None:
        """Make the next book update a sequence reset: `seqId` below its `prevSeqId` (OKX maintenance)."""
        m = self.get(inst_id)
        target = m.rng.randint(1, 1000) if to is None else to
        if target >= m.book_seq:
            raise ValueError(f"a reset must go below the current seqId {m.book_seq}, got {target}")
        m.pending_reset = target

    def force_liquidation(self, inst_id: str) -> None:
        """Queue a `liquidation-orders` sample for the next step (derivatives only)."""
        m = self.get(inst_id)
        if not m.spec.is_derivative:
            raise ValueError(f"{inst_id} is not a derivative; OKX reports liquidations for SWAP/FUTURES")
        m.pending_liquidations.append(m._liquidation(m.ts or self.now_ms()))

    def set_instrument_state(self, inst_id: str, state: str) -> None:
        """Change an instrument's `state` (live, suspend, expired, preopen); pushed on `instruments` next step."""
        m = self.get(inst_id)
        spec = m.spec
        m.spec = InstrumentSpec(**{**{f: getattr(spec, f) for f in spec.__dataclass_fields__}, "state": state})
        m.instrument_changed = True

    def add_instrument(self, inst_id: str, state: str = "preopen") -> None:
        """List a new instrument (OKX pushes listings on `instruments`); it trades from the next step."""
        if inst_id in self.instruments:
            raise ValueError(f"{inst_id} is already simulated")
        spec = spec_for(inst_id)
        spec = InstrumentSpec(**{**{f: getattr(spec, f) for f in spec.__dataclass_fields__}, "state": state})
        m = InstrumentMarket(spec, self.config)
        m.instrument_changed = True
        self.instruments[inst_id] = m
