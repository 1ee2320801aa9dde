"""The scripted private account: tests place, fill and cancel orders and move balances; OKX's pushes follow.

Each action changes the state and yields `PrivatePush`es in OKX's order (orders, fills, positions, account,
balance_and_position, orders-algo); the server renders them per subscription (instType/instFamily/instId/ccy
filters, `arg.uid`). The same state answers the private REST endpoints, so a reconciliation over REST sees
exactly what was pushed. Shapes follow SPEC section 6 and the key sets of OKX's documented examples.
"""

from __future__ import annotations

import random
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from decimal import Decimal

from ingest.okx.channels import SubArg
from ingest.sim.clock import SimClock
from ingest.sim.config import SimConfig
from ingest.sim.instruments import InstrumentSpec
from ingest.sim.market import AggTrade, InstrumentMarket, Market
from ingest.sim.numbers import dstr, to_units, units_to_decimal

Json = dict[str, object]
D0 = Decimal(0)
_STABLE = frozenset({"USDT", "USDC", "USD"})
_DAY_MS = 24 * 3600 * 1000

#: Key sets, in OKX's documented order (okx_docs_examples); rows are built from one superset of values.
ORDER_KEYS = (
    "accFillSz", "algoClOrdId", "algoId", "amendResult", "amendSource", "avgPx", "cancelSource", "category", "ccy",
    "clOrdId", "code", "cTime", "execType", "fee", "feeCcy", "fillFee", "fillFeeCcy", "fillNotionalUsd", "fillPx",
    "fillSz", "fillPnl", "fillTime", "fillPxVol", "fillPxUsd", "fillMarkVol", "fillFwdPx", "fillMarkPx", "fillIdxPx",
    "instId", "instType", "lever", "msg", "notionalUsd", "ordId", "ordType", "pnl", "posSide", "px", "pxUsd", "pxVol",
    "pxType", "quickMgnType", "rebate", "rebateCcy", "reduceOnly", "reqId", "side", "attachAlgoClOrdId", "slOrdPx",
    "slTriggerPx", "slTriggerPxType", "source", "state", "stpId", "stpMode", "sz", "tag", "tdMode", "tgtCcy",
    "tpOrdPx", "tpTriggerPx", "tpTriggerPxType", "attachAlgoOrds", "tradeId", "tradeQuoteCcy", "lastPx", "uTime",
    "isTpLimit", "linkedAlgoOrd",
)
ORDER_HISTORY_KEYS = (
    "accFillSz", "algoClOrdId", "algoId", "attachAlgoClOrdId", "attachAlgoOrds", "avgPx", "cTime", "cancelSource",
    "cancelSourceReason", "category", "ccy", "clOrdId", "fee", "feeCcy", "fillPx", "fillSz", "fillTime", "instId",
    "instType", "lever", "linkedAlgoOrd", "ordId", "ordType", "pnl", "posSide", "px", "pxType", "pxUsd", "pxVol",
    "quickMgnType", "rebate", "rebateCcy", "reduceOnly", "side", "slOrdPx", "slTriggerPx", "slTriggerPxType",
    "source", "state", "stpId", "stpMode", "sz", "tag", "tdMode", "tgtCcy", "tpOrdPx", "tpTriggerPx",
    "tpTriggerPxType", "tradeId", "tradeQuoteCcy", "uTime", "isTpLimit",
)
FILL_WS_KEYS = ("instId", "fillSz", "fillPx", "side", "ts", "ordId", "clOrdId", "tradeId", "execType", "count")
FILL_REST_KEYS = (
    "side", "fillSz", "fillPx", "fillPxVol", "fillFwdPx", "fee", "fillPnl", "ordId", "feeRate", "instType",
    "fillPxUsd", "instId", "clOrdId", "posSide", "billId", "subType", "fillMarkVol", "tag", "fillTime", "execType",
    "fillIdxPx", "tradeId", "fillMarkPx", "feeCcy", "ts", "tradeQuoteCcy",
)
POSITION_WS_KEYS = (
    "adl", "availPos", "avgPx", "cTime", "ccy", "deltaBS", "deltaPA", "gammaBS", "gammaPA", "imr", "instId",
    "instType", "interest", "idxPx", "last", "usdPx", "bePx", "lever", "liab", "liabCcy", "liqPx", "markPx", "margin",
    "mgnMode", "mgnRatio", "mmr", "notionalUsd", "optVal", "pTime", "pendingCloseOrdLiabVal", "pos", "baseBorrowed",
    "baseInterest", "quoteBorrowed", "quoteInterest", "posCcy", "posId", "posSide", "spotInUseAmt", "clSpotInUseAmt",
    "maxSpotInUseAmt", "spotInUseCcy", "bizRefId", "bizRefType", "thetaBS", "thetaPA", "tradeId", "uTime", "upl",
    "uplLastPx", "uplRatio", "uplRatioLastPx", "vegaBS", "vegaPA", "realizedPnl", "pnl", "fee", "fundingFee",
    "liqPenalty", "nonSettleAvgPx", "settledPnl", "closeOrderAlgo",
)
POSITION_REST_KEYS = (
    "adl", "availPos", "avgPx", "baseBal", "baseBorrowed", "baseInterest", "bePx", "bizRefId", "bizRefType", "cTime",
    "ccy", "clSpotInUseAmt", "closeOrderAlgo", "deltaBS", "deltaPA", "fee", "fundingFee", "gammaBS", "gammaPA",
    "idxPx", "imr", "instId", "instType", "interest", "last", "lever", "liab", "liabCcy", "liqPenalty", "liqPx",
    "margin", "markPx", "maxSpotInUseAmt", "mgnMode", "mgnRatio", "mmr", "notionalUsd", "optVal",
    "pendingCloseOrdLiabVal", "pnl", "pos", "posCcy", "posId", "posSide", "quoteBal", "quoteBorrowed",
    "quoteInterest", "realizedPnl", "spotInUseAmt", "spotInUseCcy", "thetaBS", "thetaPA", "tradeId", "uTime", "upl",
    "uplLastPx", "uplRatio", "uplRatioLastPx", "usdPx", "vegaBS", "vegaPA", "nonSettleAvgPx", "settledPnl",
)
BAL_POS_KEYS = (
    "posId", "tradeId", "instId", "instType", "mgnMode", "posSide", "pos", "ccy", "posCcy", "avgPx", "nonSettleAvgPx",
    "settledPnl", "uTime",
)
ACCOUNT_KEYS = (
    "adjEq", "availEq", "borrowFroz", "details", "imr", "isoEq", "mgnRatio", "mmr", "notionalUsd",
    "notionalUsdForBorrow", "notionalUsdForFutures", "notionalUsdForOption", "notionalUsdForSwap", "ordFroz",
    "totalEq", "uTime", "upl",
)
DETAIL_WS_KEYS = (
    "availBal", "availEq", "borrowFroz", "cashBal", "ccy", "coinUsdPrice", "crossLiab", "colRes", "collateralEnabled",
    "collateralRestrict", "colBorrAutoConversion", "disEq", "eq", "eqUsd", "smtSyncEq", "spotCopyTradingEq",
    "fixedBal", "frozenBal", "imr", "interest", "isoEq", "isoLiab", "isoUpl", "liab", "maxLoan", "mgnRatio", "mmr",
    "notionalLever", "ordFrozen", "rewardBal", "spotInUseAmt", "clSpotInUseAmt", "maxSpotInUseAmt", "spotIsoBal",
    "stgyEq", "twap", "uTime", "upl", "uplLiab", "spotBal", "openAvgPx", "accAvgPx", "spotUpl", "spotUplRatio",
    "totalPnl", "totalPnlRatio",
)
DETAIL_REST_KEYS = (
    "autoLendStatus", "autoLendMtAmt", "availBal", "availEq", "borrowFroz", "cashBal", "ccy", "crossLiab", "colRes",
    "collateralEnabled", "collateralRestrict", "colBorrAutoConversion", "disEq", "eq", "eqUsd", "smtSyncEq",
    "spotCopyTradingEq", "fixedBal", "frozenBal", "imr", "interest", "isoEq", "isoLiab", "isoUpl", "liab", "maxLoan",
    "mgnRatio", "mmr", "notionalLever", "ordFrozen", "rewardBal", "spotInUseAmt", "clSpotInUseAmt", "maxSpotInUse",
    "spotIsoBal", "stgyEq", "twap", "uTime", "upl", "uplLiab", "spotBal", "openAvgPx", "accAvgPx", "spotUpl",
    "spotUplRatio", "totalPnl", "totalPnlRatio",
)
ALGO_KEYS = (
    "actualPx", "actualSide", "actualSz", "algoClOrdId", "algoId", "attachAlgoOrds", "amendResult", "cTime", "uTime",
    "ccy", "clOrdId", "closeFraction", "failCode", "instId", "instType", "last", "lever", "notionalUsd", "ordId",
    "ordIdList", "ordPx", "ordType", "posSide", "quickMgnType", "reduceOnly", "reqId", "side", "slOrdPx",
    "slTriggerPx", "slTriggerPxType", "state", "sz", "tag", "tdMode", "tgtCcy", "tpOrdPx", "tpTriggerPx",
    "tpTriggerPxType", "triggerPx", "triggerTime", "tradeQuoteCcy", "amendPxOnTriggerType", "linkedOrd",
    "isTradeBorrowMode",
)


def pick(values: Mapping[str, object], keys: Iterable[str]) -> Json:
    return {k: values[k] for k in keys}


def _ds(value: Decimal | None) -> str:
    return "" if value is None else dstr(value)


class AccountError(ValueError):
    """A scripted action that OKX would refuse (unknown order, order already final, bad size)."""


@dataclass(slots=True)
class Order:
    """One order of the scripted account, with the details of its latest fill."""

    ord_id: str
    cl_ord_id: str
    inst_id: str
    inst_type: str
    side: str
    ord_type: str
    px: Decimal | None
    sz: Decimal
    td_mode: str
    tag: str
    c_time: int
    u_time: int
    state: str = "live"
    acc_fill_sz: Decimal = D0
    notional: Decimal = D0  # sum(fill px * fill sz), for avgPx
    fee: Decimal = D0
    fee_ccy: str = ""
    rebate_ccy: str = ""
    pnl: Decimal = D0
    fill_px: Decimal | None = None
    fill_sz: Decimal = D0
    fill_fee: Decimal = D0
    fill_time: str = ""
    trade_id: str = ""
    exec_type: str = ""
    cancel_source: str = ""
    algo_id: str = ""
    req_id: str = ""

    @property
    def avg_px(self) -> Decimal | None:
        return self.notional / self.acc_fill_sz if self.acc_fill_sz else None

    @property
    def remaining(self) -> Decimal:
        return self.sz - self.acc_fill_sz

    @property
    def final(self) -> bool:
        return self.state in ("filled", "canceled", "mmp_canceled")


@dataclass(frozen=True, slots=True)
class Fill:
    """One fill, as `GET /api/v5/trade/fills` returns it."""

    inst_id: str
    inst_type: str
    trade_id: str
    ord_id: str
    cl_ord_id: str
    bill_id: str
    side: str
    px: Decimal
    sz: Decimal
    fee: Decimal
    fee_ccy: str
    fee_rate: Decimal
    exec_type: str
    ts: int
    pnl: Decimal
    quote_ccy: str


@dataclass(slots=True)
class Position:
    """A net-mode position in a SWAP/FUTURES instrument (contracts; negative = short)."""

    inst_id: str
    pos_id: str
    pos: Decimal = D0
    avg_px: Decimal = D0
    realized: Decimal = D0
    fee: Decimal = D0
    trade_id: str = ""
    c_time: int = 0
    u_time: int = 0


@dataclass(slots=True)
class AlgoOrder:
    algo_id: str
    inst_id: str
    inst_type: str
    side: str
    sz: Decimal
    ord_type: str
    trigger_px: Decimal
    ord_px: str
    c_time: int
    u_time: int
    state: str = "live"
    ord_ids: list[str] = field(default_factory=list)
    trigger_time: str = ""


@dataclass(frozen=True, slots=True)
class PrivatePush:
    """Rows for one private channel; the server renders one message per matching subscription."""

    channel: str
    rows: tuple[tuple[str, str, Json], ...]  # (instType, instId, row)
    event_type: str | None = None  # account/positions: "event_update"; balance_and_position rows carry their own
    ccys: tuple[str, ...] = ()  # account: the currencies that changed (the row is rendered per `ccy` filter)


class ScriptedAccount:
    """The one account behind the configured API key. Every mutating method is async: it returns once the
    resulting pushes were written to the subscribed sockets."""

    def __init__(self, config: SimConfig, market: Market, clock: SimClock) -> None:
        self.config = config
        self.market = market
        self.clock = clock
        self.uid = config.uid
        self._rng = random.Random(f"{config.seed}/account")
        self._next_id = 680_800_019_749_904_384 + self._rng.randint(0, 10**12)
        self._last_ms = 0
        self.balances: dict[str, Decimal] = {ccy: Decimal(v) for ccy, v in config.initial_balances}
        self._bal_utime: dict[str, int] = {}
        self.orders: dict[str, Order] = {}
        self.fills: list[Fill] = []
        self.positions: dict[str, Position] = {}
        self.algos: dict[str, AlgoOrder] = {}
        self._last_order_push: dict[str, Json] = {}
        #: Set by the server: delivers pushes (and public trades from fills) and waits until written.
        self.publish: Callable[[list[PrivatePush]], Awaitable[None]] | None = None
        self.publish_trade: Callable[[str, AggTrade], None] | None = None

    # --- ids and time ----------------------------------------------------------------------------------
    def _id(self) -> str:
        self._next_id += self._rng.randint(1_000, 5_000_000)
        return str(self._next_id)

    def _now(self) -> int:
        """Event time on the market's clock (virtual when the market is), strictly increasing."""
        self._last_ms = max(self.market.now_ms(), self._last_ms + 1)
        return self._last_ms

    def _market(self, inst_id: str) -> InstrumentMarket:
        try:
            return self.market.get(inst_id)
        except KeyError as exc:
            raise AccountError(str(exc)) from None

    # --- prices ------------------------------------------------------------------------------------------
    def usd_px(self, ccy: str) -> Decimal:
        """USD value of one unit of `ccy` (stablecoins 1; else the mid of a simulated pair of that coin)."""
        if ccy in _STABLE:
            return Decimal(1)
        for m in self.market.instruments.values():
            if m.spec.coin == ccy and m.spec.quote_ccy in _STABLE:
                return units_to_decimal(m.mid(), m.px_dec)
        return D0

    def _mark(self, m: InstrumentMarket) -> Decimal:
        return units_to_decimal(m.mark_px(), m.px_dec)

    # --- scripted actions ---------------------------------------------------------------------------------
    async def place_order(self, inst_id: str, side: str, sz: str, px: str | None = None, *, ord_type: str = "limit",
                          cl_ord_id: str = "", tag: str = "", algo_id: str = "") -> str:
        """A new order (pushed with state `live`); returns its ordId. Limit orders freeze balance."""
        m = self._market(inst_id)
        if side not in ("buy", "sell"):
            raise AccountError(f"side must be buy or sell, got {side!r}")
        if ord_type != "market" and px is None:
            raise AccountError(f"a {ord_type} order needs a px")
        size = self._check_size(m, sz)
        price = self._check_px(m, px) if px is not None else None
        now = self._now()
        order = Order(self._id(), cl_ord_id, inst_id, m.spec.inst_type, side, ord_type, price, size,
                      "cross" if m.spec.is_derivative else "cash", tag, now, now, algo_id=algo_id)
        self.orders[order.ord_id] = order
        pushes = [self._order_push(order)]
        if not m.spec.is_derivative and price is not None:
            pushes.append(self._account_push(self._frozen_ccys(order)))
        await self._send(pushes)
        return order.ord_id

    async def fill(self, ord_id: str, sz: str | None = None, px: str | None = None, *, exec_type: str = "T") -> str:
        """Fill (part of) an order: pushes orders, fills, positions, account and balance_and_position, and the
        public trade on `trades`/`trades-all`. Returns the tradeId."""
        order = self._order(ord_id)
        if order.final:
            raise AccountError(f"order {ord_id} is {order.state}")
        m = self._market(order.inst_id)
        fill_sz = order.remaining if sz is None else self._check_size(m, sz)
        if fill_sz > order.remaining:
            raise AccountError(f"fill of {fill_sz} exceeds the remaining {order.remaining} of {ord_id}")
        if px is not None:
            fill_px = self._check_px(m, px)
        elif order.px is not None:
            fill_px = order.px
        else:
            fill_px = units_to_decimal(m.mid(), m.px_dec)
        now = self._now()
        taker_buy = (order.side == "buy") == (exec_type == "T")
        trade = m.record_trade(to_units(str(fill_px), m.px_dec), to_units(str(fill_sz), m.sz_dec), taker_buy, now)
        if self.publish_trade is not None:
            self.publish_trade(order.inst_id, trade)
        spec = m.spec
        rate = self._fee_rate(spec, exec_type)
        quote_value = fill_px * fill_sz * (self._ct_val(spec) if spec.is_derivative else 1)
        if spec.is_inverse:
            fee_ccy = spec.settle_ccy
            fee = -(fill_sz * self._ct_val(spec) / fill_px * rate)
        elif spec.is_derivative:
            fee_ccy, fee = spec.settle_ccy, -(quote_value * rate)
        elif order.side == "buy":
            fee_ccy, fee = spec.base_ccy, -(fill_sz * rate)
        else:
            fee_ccy, fee = spec.quote_ccy, -(quote_value * rate)
        changed_ccys: set[str] = {fee_ccy}
        pnl = D0
        if spec.is_derivative:
            pnl = self._apply_position(m, order.side, fill_sz, fill_px, str(trade.trade_id), now, fee)
            self._credit(spec.settle_ccy, pnl + fee, now)
            changed_ccys.add(spec.settle_ccy)
        else:
            sign = 1 if order.side == "buy" else -1
            self._credit(spec.base_ccy, sign * fill_sz, now)
            self._credit(spec.quote_ccy, -sign * fill_px * fill_sz, now)
            self._credit(fee_ccy, fee, now)
            changed_ccys |= {spec.base_ccy, spec.quote_ccy}
        order.acc_fill_sz += fill_sz
        order.notional += fill_px * fill_sz
        order.fee += fee
        order.pnl += pnl
        order.fee_ccy = fee_ccy
        order.rebate_ccy = spec.quote_ccy if fee_ccy == spec.base_ccy else (spec.base_ccy or spec.settle_ccy)
        order.fill_px, order.fill_sz, order.fill_fee = fill_px, fill_sz, fee
        order.fill_time, order.trade_id, order.exec_type = str(now), str(trade.trade_id), exec_type
        order.state = "filled" if order.remaining == 0 else "partially_filled"
        order.u_time = now
        fill = Fill(order.inst_id, spec.inst_type, str(trade.trade_id), order.ord_id, order.cl_ord_id, self._id(),
                    order.side, fill_px, fill_sz, fee, fee_ccy, -rate, exec_type, now, pnl,
                    spec.quote_ccy or spec.settle_ccy)
        self.fills.append(fill)
        pushes = [self._order_push(order), self._fill_push(fill)]
        if spec.is_derivative:
            pushes.append(self._positions_push([order.inst_id]))
        pushes.append(self._account_push(changed_ccys))
        pushes.append(self._bal_pos_push("filled", changed_ccys, [order.inst_id] if spec.is_derivative else [],
                                         [(order.inst_id, str(trade.trade_id))]))
        await self._send(pushes)
        order.fill_px, order.fill_sz, order.fill_fee, order.exec_type = None, D0, D0, ""
        return str(trade.trade_id)

    async def cancel(self, ord_id: str) -> None:
        """Cancel a live or partially filled order (state `canceled`, cancelSource "1": by the user)."""
        order = self._order(ord_id)
        if order.final:
            raise AccountError(f"order {ord_id} is {order.state}")
        order.state = "canceled"
        order.cancel_source = "1"
        order.u_time = self._now()
        pushes = [self._order_push(order)]
        if order.inst_type == "SPOT" and order.px is not None:
            pushes.append(self._account_push(self._frozen_ccys(order)))
        await self._send(pushes)

    async def repeat_order_push(self, ord_id: str, times: int = 1, *, new_utime: bool = True) -> None:
        """Send the order's last push again, as OKX sometimes does (with a different uTime by default)."""
        row = self._last_order_push.get(ord_id)
        if row is None:
            raise AccountError(f"order {ord_id} was never pushed")
        order = self.orders[ord_id]
        pushes = []
        for _ in range(times):
            again = dict(row)
            if new_utime:
                again["uTime"] = str(self._now())
            pushes.append(PrivatePush("orders", ((order.inst_type, order.inst_id, again),)))
        await self._send(pushes)

    async def set_balance(self, ccy: str, amount: str) -> None:
        """Set a currency's cash balance (a deposit or withdrawal): account + balance_and_position pushes."""
        now = self._now()
        self.balances[ccy] = Decimal(amount)
        self._bal_utime[ccy] = now
        await self._send([self._account_push({ccy}), self._bal_pos_push("transferred", {ccy}, [], [])])

    async def transfer(self, ccy: str, amount: str) -> None:
        """Add (or, negative, remove) `amount` of `ccy`."""
        await self.set_balance(ccy, dstr(self.balances.get(ccy, D0) + Decimal(amount)))

    async def place_algo(self, inst_id: str, side: str, sz: str, trigger_px: str, *, ord_type: str = "trigger",
                         ord_px: str = "-1") -> str:
        """An algo order on `orders-algo` (business endpoint); returns its algoId."""
        m = self._market(inst_id)
        now = self._now()
        algo = AlgoOrder(self._id(), inst_id, m.spec.inst_type, side, self._check_size(m, sz), ord_type,
                         self._check_px(m, trigger_px), ord_px, now, now)
        self.algos[algo.algo_id] = algo
        await self._send([self._algo_push(algo)])
        return algo.algo_id

    async def trigger_algo(self, algo_id: str) -> str:
        """The algo triggers: state `effective` and a market order is placed; returns that ordId."""
        algo = self._algo(algo_id)
        algo.state, algo.u_time = "effective", self._now()
        algo.trigger_time = str(algo.u_time)
        ord_id = await self.place_order(algo.inst_id, algo.side, dstr(algo.sz), ord_type="market", algo_id=algo_id)
        algo.ord_ids.append(ord_id)
        await self._send([self._algo_push(algo)])
        return ord_id

    async def cancel_algo(self, algo_id: str) -> None:
        algo = self._algo(algo_id)
        algo.state, algo.u_time = "canceled", self._now()
        await self._send([self._algo_push(algo)])

    # --- state helpers -----------------------------------------------------------------------------------
    def _order(self, ord_id: str) -> Order:
        try:
            return self.orders[ord_id]
        except KeyError:
            raise AccountError(f"no order {ord_id}") from None

    def _algo(self, algo_id: str) -> AlgoOrder:
        try:
            return self.algos[algo_id]
        except KeyError:
            raise AccountError(f"no algo order {algo_id}") from None

    @staticmethod
    def _units(value: str, decimals: int, what: str, step: str) -> int:
        try:
            return to_units(value, decimals)
        except (ValueError, ArithmeticError):
            raise AccountError(f"{what} {value} is not a positive multiple of {step}") from None

    @classmethod
    def _check_size(cls, m: InstrumentMarket, sz: str) -> Decimal:
        units = cls._units(sz, m.sz_dec, "size", f"lotSz {m.spec.lot_sz}")
        if units <= 0 or units % m.lot:
            raise AccountError(f"size {sz} is not a positive multiple of lotSz {m.spec.lot_sz}")
        return Decimal(sz)

    @classmethod
    def _check_px(cls, m: InstrumentMarket, px: str) -> Decimal:
        units = cls._units(px, m.px_dec, "price", f"tickSz {m.spec.tick_sz}")
        if units <= 0 or units % m.tick:
            raise AccountError(f"price {px} is not a positive multiple of tickSz {m.spec.tick_sz}")
        return Decimal(px)

    @staticmethod
    def _ct_val(spec: InstrumentSpec) -> Decimal:
        return Decimal(spec.ct_val) if spec.ct_val else Decimal(1)

    @staticmethod
    def _fee_rate(spec: InstrumentSpec, exec_type: str) -> Decimal:
        if spec.is_derivative:
            return Decimal("0.0005") if exec_type == "T" else Decimal("0.0002")
        return Decimal("0.001") if exec_type == "T" else Decimal("0.0008")

    def _credit(self, ccy: str, amount: Decimal, now: int) -> None:
        self.balances[ccy] = self.balances.get(ccy, D0) + amount
        self._bal_utime[ccy] = now

    def _frozen_ccys(self, order: Order) -> set[str]:
        spec = self._market(order.inst_id).spec
        return {spec.quote_ccy if order.side == "buy" else spec.base_ccy}

    def frozen(self, ccy: str) -> Decimal:
        """Balance held by open spot limit orders."""
        total = D0
        for o in self.orders.values():
            if o.final or o.px is None or o.inst_type != "SPOT":
                continue
            spec = self.market.get(o.inst_id).spec
            if o.side == "buy" and spec.quote_ccy == ccy:
                total += o.px * o.remaining
            elif o.side == "sell" and spec.base_ccy == ccy:
                total += o.remaining
        return total

    def _apply_position(self, m: InstrumentMarket, side: str, sz: Decimal, px: Decimal, trade_id: str, now: int,
                        fee: Decimal) -> Decimal:
        """Net-mode position update; returns the realized PnL (settle currency) of the reduced part."""
        pos = self.positions.get(m.spec.inst_id)
        if pos is None:
            pos = Position(m.spec.inst_id, self._id(), c_time=now)
            self.positions[m.spec.inst_id] = pos
        signed = sz if side == "buy" else -sz
        pnl = D0
        ct = self._ct_val(m.spec)
        if pos.pos == 0 or (pos.pos > 0) == (signed > 0):
            total = pos.pos + signed
            pos.avg_px = (pos.avg_px * abs(pos.pos) + px * sz) / abs(total)
            pos.pos = total
        else:
            closed = min(abs(pos.pos), sz)
            direction = 1 if pos.pos > 0 else -1
            if m.spec.is_inverse:
                pnl = direction * closed * ct * (1 / pos.avg_px - 1 / px)
            else:
                pnl = direction * closed * ct * (px - pos.avg_px)
            pos.pos += signed
            if pos.pos != 0 and (pos.pos > 0) != (direction > 0):
                pos.avg_px = px
            elif pos.pos == 0:
                pos.avg_px = D0
        pos.realized += pnl
        pos.fee += fee
        pos.trade_id = trade_id
        pos.u_time = now
        if pos.c_time == 0:
            pos.c_time = now
        return pnl

    def upl(self, pos: Position) -> Decimal:
        if pos.pos == 0:
            return D0
        m = self.market.get(pos.inst_id)
        mark, ct = self._mark(m), self._ct_val(m.spec)
        if m.spec.is_inverse:
            return pos.pos * ct * (1 / pos.avg_px - 1 / mark)
        return pos.pos * ct * (mark - pos.avg_px)

    # --- row builders --------------------------------------------------------------------------------------
    def order_values(self, o: Order) -> Json:
        m = self.market.get(o.inst_id)
        spec = m.spec
        notional_usd = (o.px or units_to_decimal(m.mid(), m.px_dec)) * o.sz * (self._ct_val(spec)
                                                                                if spec.is_derivative else 1)
        fill_notional = (o.fill_px * o.fill_sz) if o.fill_px is not None else None
        return {
            "accFillSz": dstr(o.acc_fill_sz), "algoClOrdId": "", "algoId": o.algo_id, "amendResult": "",
            "amendSource": "", "avgPx": _ds(o.avg_px), "cancelSource": o.cancel_source, "cancelSourceReason": "",
            "category": "normal", "ccy": "", "clOrdId": o.cl_ord_id, "code": "0", "cTime": str(o.c_time),
            "execType": o.exec_type, "fee": dstr(o.fee), "feeCcy": o.fee_ccy or self._default_fee_ccy(spec, o.side),
            "fillFee": dstr(o.fill_fee), "fillFeeCcy": o.fee_ccy if o.fill_px is not None else "",
            "fillNotionalUsd": _ds(fill_notional), "fillPx": _ds(o.fill_px), "fillSz": dstr(o.fill_sz),
            "fillPnl": dstr(o.pnl) if o.fill_px is not None else "0", "fillTime": o.fill_time, "fillPxVol": "",
            "fillPxUsd": "", "fillMarkVol": "", "fillFwdPx": "", "fillMarkPx": "", "fillIdxPx": "",
            "instId": o.inst_id, "instType": o.inst_type, "lever": "10" if spec.is_derivative else "0", "msg": "",
            "notionalUsd": dstr(notional_usd), "ordId": o.ord_id, "ordType": o.ord_type, "pnl": dstr(o.pnl),
            "posSide": "net" if spec.is_derivative else "", "px": _ds(o.px), "pxUsd": "", "pxVol": "", "pxType": "",
            "quickMgnType": "", "rebate": "0", "rebateCcy": o.rebate_ccy or self._default_rebate_ccy(spec, o.side),
            "reduceOnly": "false", "reqId": o.req_id, "side": o.side, "attachAlgoClOrdId": "", "slOrdPx": "",
            "slTriggerPx": "", "slTriggerPxType": "", "source": "", "state": o.state, "stpId": "", "stpMode": "",
            "sz": dstr(o.sz), "tag": o.tag, "tdMode": o.td_mode, "tgtCcy": "", "tpOrdPx": "", "tpTriggerPx": "",
            "tpTriggerPxType": "", "attachAlgoOrds": [], "tradeId": o.trade_id,
            "tradeQuoteCcy": spec.quote_ccy if not spec.is_derivative else "",
            "lastPx": m.px_str(m.last_px), "uTime": str(o.u_time), "isTpLimit": "false",
            "linkedAlgoOrd": {"algoId": ""},
        }

    @staticmethod
    def _default_fee_ccy(spec: InstrumentSpec, side: str) -> str:
        if spec.is_derivative:
            return spec.settle_ccy
        return spec.base_ccy if side == "buy" else spec.quote_ccy

    @staticmethod
    def _default_rebate_ccy(spec: InstrumentSpec, side: str) -> str:
        if spec.is_derivative:
            return spec.settle_ccy
        return spec.quote_ccy if side == "buy" else spec.base_ccy

    def fill_values(self, f: Fill) -> Json:
        return {
            "side": f.side, "fillSz": dstr(f.sz), "fillPx": dstr(f.px), "fillPxVol": "", "fillFwdPx": "",
            "fee": dstr(f.fee), "fillPnl": dstr(f.pnl), "ordId": f.ord_id, "feeRate": dstr(f.fee_rate),
            "instType": f.inst_type, "fillPxUsd": "", "instId": f.inst_id, "clOrdId": f.cl_ord_id,
            "posSide": "net", "billId": f.bill_id, "subType": "1" if f.side == "buy" else "2", "fillMarkVol": "",
            "tag": "", "fillTime": str(f.ts), "execType": f.exec_type, "fillIdxPx": "", "tradeId": f.trade_id,
            "fillMarkPx": "", "feeCcy": f.fee_ccy, "ts": str(f.ts), "tradeQuoteCcy": f.quote_ccy, "count": "1",
        }

    def fill_ws_row(self, f: Fill) -> Json:
        row = pick(self.fill_values(f), FILL_WS_KEYS)
        # OKX echoes clOrdId on `fills` only when it is a positive int64 string (SPEC 6).
        row["clOrdId"] = f.cl_ord_id if f.cl_ord_id.isdigit() and 0 < int(f.cl_ord_id) < 2**63 else "0"
        return row

    def position_values(self, pos: Position) -> Json:
        m = self.market.get(pos.inst_id)
        spec = m.spec
        mark = self._mark(m)
        ct = self._ct_val(spec)
        upl = self.upl(pos)
        notional_coin = abs(pos.pos) * ct / mark if spec.is_inverse else abs(pos.pos) * ct
        notional_usd = abs(pos.pos) * ct if spec.is_inverse else notional_coin * mark
        lever = Decimal(10)
        imr = (notional_coin if spec.is_inverse else notional_usd) / lever
        if not pos.avg_px:
            margin_base = D0
        elif spec.is_inverse:
            margin_base = abs(pos.pos) * ct / pos.avg_px
        else:
            margin_base = abs(pos.pos) * ct * pos.avg_px
        upl_ratio = upl / (margin_base / lever) if margin_base else D0
        liq = D0
        if pos.pos:
            liq = pos.avg_px * (1 - Decimal("0.09")) if pos.pos > 0 else pos.avg_px * (1 + Decimal("0.09"))
        px_dec = m.px_dec
        return {
            "adl": "1" if pos.pos else "", "availPos": dstr(abs(pos.pos)), "avgPx": dstr(pos.avg_px, px_dec + 4),
            "baseBal": "", "baseBorrowed": "", "baseInterest": "", "bePx": dstr(pos.avg_px, px_dec + 4),
            "bizRefId": "", "bizRefType": "", "cTime": str(pos.c_time), "ccy": spec.settle_ccy,
            "clSpotInUseAmt": "", "closeOrderAlgo": [], "deltaBS": "", "deltaPA": "", "fee": dstr(pos.fee),
            "fundingFee": "0", "gammaBS": "", "gammaPA": "", "idxPx": m.px_str(m.index_px()), "imr": dstr(imr, 8),
            "instId": pos.inst_id, "instType": spec.inst_type, "interest": "0", "last": m.px_str(m.last_px),
            "lever": "10", "liab": "", "liabCcy": "", "liqPenalty": "0", "liqPx": dstr(liq, px_dec) if pos.pos else "",
            "margin": "", "markPx": dstr(mark), "maxSpotInUseAmt": "", "mgnMode": "cross",
            "mgnRatio": dstr(Decimal(100) + upl_ratio, 8) if pos.pos else "", "mmr": dstr(imr / 20, 8),
            "notionalUsd": dstr(notional_usd, 8), "optVal": "", "pTime": str(self._now()),
            "pendingCloseOrdLiabVal": "0", "pnl": dstr(pos.realized), "pos": dstr(pos.pos), "posCcy": "",
            "posId": pos.pos_id, "posSide": "net", "quoteBal": "", "quoteBorrowed": "", "quoteInterest": "",
            "realizedPnl": dstr(pos.realized + pos.fee), "spotInUseAmt": "", "spotInUseCcy": "", "thetaBS": "",
            "thetaPA": "", "tradeId": pos.trade_id, "uTime": str(pos.u_time), "upl": dstr(upl, 12),
            "uplLastPx": dstr(upl, 12), "uplRatio": dstr(upl_ratio, 12), "uplRatioLastPx": dstr(upl_ratio, 12),
            "usdPx": "", "vegaBS": "", "vegaPA": "", "nonSettleAvgPx": "", "settledPnl": "",
        }

    def detail_values(self, ccy: str) -> Json:
        cash = self.balances.get(ccy, D0)
        frozen = self.frozen(ccy)
        upl = sum((self.upl(p) for p in self.positions.values()
                   if self.market.get(p.inst_id).spec.settle_ccy == ccy), D0)
        eq = cash + upl
        usd = self.usd_px(ccy)
        utime = str(self._bal_utime.get(ccy, 0) or self.market.now_ms())
        return {
            "autoLendStatus": "off", "autoLendMtAmt": "0", "availBal": dstr(cash - frozen),
            "availEq": dstr(eq - frozen), "borrowFroz": "0", "cashBal": dstr(cash), "ccy": ccy,
            "coinUsdPrice": dstr(usd), "crossLiab": "0", "colRes": "0", "collateralEnabled": False,
            "collateralRestrict": False, "colBorrAutoConversion": "0", "disEq": dstr(eq * usd, 12), "eq": dstr(eq),
            "eqUsd": dstr(eq * usd, 12), "smtSyncEq": "0", "spotCopyTradingEq": "0", "fixedBal": "0",
            "frozenBal": dstr(frozen), "imr": "", "interest": "0", "isoEq": "0", "isoLiab": "0", "isoUpl": "0",
            "liab": "0", "maxLoan": "0", "mgnRatio": "", "mmr": "", "notionalLever": "", "ordFrozen": dstr(frozen),
            "rewardBal": "0", "spotInUseAmt": "", "clSpotInUseAmt": "", "maxSpotInUseAmt": "", "maxSpotInUse": "",
            "spotIsoBal": "0", "stgyEq": "0", "twap": "0", "uTime": utime, "upl": dstr(upl, 12), "uplLiab": "0",
            "spotBal": "", "openAvgPx": "", "accAvgPx": "", "spotUpl": "", "spotUplRatio": "", "totalPnl": "",
            "totalPnlRatio": "",
        }

    def account_row(self, ccys: Iterable[str], detail_keys: tuple[str, ...]) -> Json:
        details = [pick(self.detail_values(c), detail_keys) for c in sorted(ccys)]
        total = sum((self.usd_px(c) * (self.balances.get(c, D0)) for c in self.balances), D0)
        upl = sum((self.upl(p) * self.usd_px(self.market.get(p.inst_id).spec.settle_ccy)
                   for p in self.positions.values()), D0)
        eq = total + upl
        values: Json = {
            "adjEq": dstr(eq, 12), "availEq": dstr(eq, 12), "borrowFroz": "0", "details": details, "imr": "0",
            "isoEq": "0", "mgnRatio": "", "mmr": "0", "notionalUsd": "0", "notionalUsdForBorrow": "0",
            "notionalUsdForFutures": "0", "notionalUsdForOption": "0", "notionalUsdForSwap": "0", "ordFroz": "0",
            "totalEq": dstr(eq, 12), "uTime": str(self.market.now_ms()), "upl": dstr(upl, 12),
        }
        return pick(values, ACCOUNT_KEYS)

    def nonzero_ccys(self) -> list[str]:
        return sorted(c for c, v in self.balances.items() if v != 0 or self.frozen(c) != 0)

    def open_positions(self) -> list[Position]:
        return [p for p in self.positions.values() if p.pos != 0]

    def bal_pos_row(self, event_type: str, ccys: Iterable[str], inst_ids: Iterable[str],
                    trades: Iterable[tuple[str, str]]) -> Json:
        now = str(self._now())
        bal = [{"ccy": c, "cashBal": dstr(self.balances.get(c, D0)), "uTime": str(self._bal_utime.get(c, 0) or now)}
               for c in sorted(ccys)]
        pos = [pick(self.position_values(self.positions[i]), BAL_POS_KEYS) for i in inst_ids if i in self.positions]
        row: Json = {"pTime": now, "eventType": event_type, "balData": bal, "posData": pos,
                     "trades": [{"instId": i, "tradeId": t} for i, t in trades]}
        return row

    def algo_row(self, a: AlgoOrder) -> Json:
        m = self.market.get(a.inst_id)
        values: Json = {
            "actualPx": "", "actualSide": a.side if a.state == "effective" else "",
            "actualSz": dstr(a.sz) if a.state == "effective" else "0", "algoClOrdId": "", "algoId": a.algo_id,
            "attachAlgoOrds": [], "amendResult": "", "cTime": str(a.c_time), "uTime": str(a.u_time), "ccy": "",
            "clOrdId": "", "closeFraction": "", "failCode": "", "instId": a.inst_id, "instType": a.inst_type,
            "last": m.px_str(m.last_px), "lever": "10" if m.spec.is_derivative else "0",
            "notionalUsd": dstr(a.trigger_px * a.sz), "ordId": a.ord_ids[-1] if a.ord_ids else "",
            "ordIdList": list(a.ord_ids), "ordPx": a.ord_px, "ordType": a.ord_type,
            "posSide": "net" if m.spec.is_derivative else "", "quickMgnType": "", "reduceOnly": "false", "reqId": "",
            "side": a.side, "slOrdPx": "", "slTriggerPx": "", "slTriggerPxType": "", "state": a.state,
            "sz": dstr(a.sz), "tag": "", "tdMode": "cross" if m.spec.is_derivative else "cash", "tgtCcy": "",
            "tpOrdPx": "", "tpTriggerPx": "", "tpTriggerPxType": "", "triggerPx": dstr(a.trigger_px),
            "triggerTime": a.trigger_time, "tradeQuoteCcy": m.spec.quote_ccy if not m.spec.is_derivative else "",
            "amendPxOnTriggerType": "0", "linkedOrd": {"ordId": ""}, "isTradeBorrowMode": "",
        }
        return pick(values, ALGO_KEYS)

    # --- pushes --------------------------------------------------------------------------------------------
    def _order_push(self, o: Order) -> PrivatePush:
        row = pick(self.order_values(o), ORDER_KEYS)
        self._last_order_push[o.ord_id] = row
        return PrivatePush("orders", ((o.inst_type, o.inst_id, row),))

    def _fill_push(self, f: Fill) -> PrivatePush:
        return PrivatePush("fills", ((f.inst_type, f.inst_id, self.fill_ws_row(f)),))

    def _positions_push(self, inst_ids: Iterable[str]) -> PrivatePush:
        rows = tuple((self.market.get(i).spec.inst_type, i, pick(self.position_values(self.positions[i]),
                                                                   POSITION_WS_KEYS)) for i in inst_ids)
        return PrivatePush("positions", rows, "event_update")

    def _account_push(self, ccys: Iterable[str]) -> PrivatePush:
        return PrivatePush("account", (), "event_update", tuple(sorted(ccys)))

    def _bal_pos_push(self, event_type: str, ccys: Iterable[str], inst_ids: Iterable[str],
                      trades: Iterable[tuple[str, str]]) -> PrivatePush:
        return PrivatePush("balance_and_position", (("", "", self.bal_pos_row(event_type, ccys, inst_ids, trades)),))

    def _algo_push(self, a: AlgoOrder) -> PrivatePush:
        return PrivatePush("orders-algo", ((a.inst_type, a.inst_id, self.algo_row(a)),))

    async def _send(self, pushes: list[PrivatePush]) -> None:
        if self.config.repeat_order_pushes:
            repeated: list[PrivatePush] = []
            for p in pushes:
                repeated.append(p)
                if p.channel == "orders":
                    repeated.extend([p] * self.config.repeat_order_pushes)
            pushes = repeated
        if self.publish is not None:
            await self.publish(pushes)

    # --- rendering per subscription -------------------------------------------------------------------------
    def matches(self, arg: SubArg, inst_type: str, inst_id: str) -> bool:
        """OKX's private filters: instType (ANY matches all), instFamily, instId."""
        if arg.inst_type and arg.inst_type != "ANY" and arg.inst_type != inst_type:
            return False
        if arg.inst_id and arg.inst_id != inst_id:
            return False
        if arg.inst_family:
            try:
                family = self.market.get(inst_id).spec.inst_family
            except KeyError:
                return False
            if family != arg.inst_family:
                return False
        return True

    def push_arg(self, arg: SubArg) -> Json:
        out: Json = dict(arg.to_okx())
        out.pop("extraParams", None)
        out["uid"] = self.uid
        return out

    def render(self, push: PrivatePush, arg: SubArg) -> Json | None:
        """The message `arg`'s subscriber gets for `push`, or None when nothing in it matches."""
        if push.channel == "account":
            ccys = [c for c in push.ccys if not arg.ccy or c == arg.ccy]
            if not ccys:
                return None
            return {"arg": self.push_arg(arg), "eventType": "event_update", "curPage": 1,
                    "data": [self.account_row(ccys, DETAIL_WS_KEYS)]}
        rows = [row for inst_type, inst_id, row in push.rows
                if push.channel == "balance_and_position" or self.matches(arg, inst_type, inst_id)]
        if not rows:
            return None
        msg: Json = {"arg": self.push_arg(arg)}
        if push.event_type is not None:
            msg["eventType"] = push.event_type
            msg["curPage"] = 1
        msg["data"] = rows
        return msg

    def snapshots(self, arg: SubArg) -> list[Json]:
        """Messages sent right after subscribing: paginated snapshots for account and positions, one
        balance_and_position snapshot; none for orders, fills and orders-algo (OKX sends none)."""
        page = max(1, self.config.private_page_size)
        if arg.channel == "account":
            ccys = [c for c in self.nonzero_ccys() if not arg.ccy or c == arg.ccy]
            chunks = [ccys[i:i + page] for i in range(0, len(ccys), page)] or [[]]
            return [{"arg": self.push_arg(arg), "eventType": "snapshot", "curPage": n + 1,
                     "lastPage": n == len(chunks) - 1, "data": [self.account_row(chunk, DETAIL_WS_KEYS)]}
                    for n, chunk in enumerate(chunks)]
        if arg.channel == "positions":
            rows = [pick(self.position_values(p), POSITION_WS_KEYS) for p in self.open_positions()
                    if self.matches(arg, self.market.get(p.inst_id).spec.inst_type, p.inst_id)]
            pages = [rows[i:i + page] for i in range(0, len(rows), page)] or [[]]
            return [{"arg": self.push_arg(arg), "eventType": "snapshot", "curPage": n + 1,
                     "lastPage": n == len(pages) - 1, "data": chunk} for n, chunk in enumerate(pages)]
        if arg.channel == "balance_and_position":
            row = self.bal_pos_row("snapshot", self.nonzero_ccys(), [p.inst_id for p in self.open_positions()], [])
            return [{"arg": self.push_arg(arg), "data": [row]}]
        return []

    # --- REST views ------------------------------------------------------------------------------------------
    def fills_since(self, since_ms: int) -> list[Fill]:
        return [f for f in self.fills if f.ts >= since_ms]

    def order_history(self, now_ms: int) -> list[Order]:
        """Completed orders of the last 7 days; canceled orders without fills only for 2 hours (SPEC 8.3)."""
        out = []
        for o in self.orders.values():
            if not o.final:
                continue
            if o.state != "filled" and o.acc_fill_sz == 0 and o.u_time < now_ms - 2 * 3600 * 1000:
                continue
            if o.u_time < now_ms - 7 * _DAY_MS:
                continue
            out.append(o)
        return out

    def order_history_row(self, o: Order) -> Json:
        values = self.order_values(o)
        last = next((f for f in reversed(self.fills) if f.ord_id == o.ord_id), None)
        if last is not None:
            values.update(fillPx=dstr(last.px), fillSz=dstr(last.sz), fillTime=str(last.ts), tradeId=last.trade_id)
        return pick(values, ORDER_HISTORY_KEYS)

    def positions_rest_rows(self, inst_type: str | None, inst_ids: set[str] | None) -> list[Json]:
        rows = []
        for p in self.open_positions():
            spec = self.market.get(p.inst_id).spec
            if inst_type and spec.inst_type != inst_type:
                continue
            if inst_ids and p.inst_id not in inst_ids:
                continue
            rows.append(pick(self.position_values(p), POSITION_REST_KEYS))
        return rows

    def balance_rest_row(self, ccys: set[str] | None) -> Json:
        chosen = [c for c in self.nonzero_ccys() if not ccys or c in ccys]
        return self.account_row(chosen, DETAIL_REST_KEYS)
