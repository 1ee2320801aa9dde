"""OKX field kinds per record (SPEC sections 5 and 6): the field specs the reference validator and the REST
row builders check rows against. instId, instType and the ts field are handled by `_Spec` itself."""

from __future__ import annotations

from ingest.core.normalize.checks import (
    B,
    D,
    I,
    J,
    L,
    S,
    _all,
    _Spec,
)
from ingest.core.records import (
    AlgoOrder,
    Balance,
    Fill,
    FundingRate,
    IndexTicker,
    Instrument,
    Liquidation,
    MarkPrice,
    OpenInterest,
    Order,
    Position,
    PriceLimit,
    Ticker,
)

_TICKER = _Spec(Ticker, _all(D, "last lastSz askPx askSz bidPx bidSz open24h high24h low24h volCcy24h "
                                        "vol24h sodUtc0 sodUtc8"), required=["instId", "ts"])
_MARK_PRICE = _Spec(MarkPrice, {"markPx": D}, required=["markPx", "ts"])
_INDEX_TICKER = _Spec(IndexTicker, {"idxPx": D, **_all(D, "open24h high24h low24h sodUtc0 sodUtc8")},
                      required=["idxPx", "ts"])
_FUNDING_RATE = _Spec(FundingRate, {
    "method": S, "formulaType": S, "settState": S, "fundingTime": I, "nextFundingTime": I,
    **_all(D, "fundingRate nextFundingRate minFundingRate maxFundingRate interestRate impactValue premium "
                      "settFundingRate")})
_OPEN_INTEREST = _Spec(OpenInterest, {"oi": D, "oiCcy": D, "oiUsd": D}, required=["oi", "ts"])
_PRICE_LIMIT = _Spec(PriceLimit, {"buyLmt": D, "sellLmt": D, "enabled": B}, required=["ts"])
_INSTRUMENT = _Spec(Instrument, {
    **_all(S, "seriesId uly groupId instFamily category instCategory baseCcy quoteCcy settleCcy ctValCcy "
                      "optType ctType alias state ruleType openType"),
    **_all(D, "ctVal ctMult stk lever tickSz lotSz minSz maxLmtSz maxMktSz maxLmtAmt maxMktAmt maxTwapSz "
                      "maxIcebergSz maxTriggerSz maxStopSz initPxLmtPct floatPxLmtPct maxPxLmtPct rpiMinPxBand"),
    **_all(I, "listTime auctionEndTime contTdSwTime preMktSwTime expTime rpiMinLevel"),
    "futureSettlement": B, "instIdCode": L, "tradeQuoteCcyList": J, "upcChg": J,
}, required=["instId"], ts=None)
_LIQUIDATION_ROW = frozenset({"instId", "instType", "instFamily", "uly", "details"})
_LIQUIDATION = _Spec(Liquidation, {"side": S, "posSide": S, "bkPx": D, "sz": D, "bkLoss": D, "ccy": S,
                                   "instFamily": S, "uly": S}, required=["side", "bkPx", "sz", "ts"])
_ORDER = _Spec(Order, {
    **_all(S, "ordId clOrdId tag tgtCcy ccy pxType ordType side posSide tdMode tradeId fillFeeCcy execType "
                      "state attachAlgoClOrdId tpTriggerPxType slTriggerPxType stpId stpMode feeCcy rebateCcy source "
                      "cancelSource cancelSourceReason amendSource category isTpLimit reqId amendResult reduceOnly "
                      "quickMgnType algoClOrdId algoId code msg tradeQuoteCcy"),
    **_all(D, "px pxUsd pxVol sz notionalUsd fillPx fillSz fillPnl fillFee fillPxVol fillPxUsd fillMarkVol "
                      "fillFwdPx fillMarkPx fillIdxPx accFillSz fillNotionalUsd avgPx lever tpTriggerPx tpOrdPx "
                      "slTriggerPx slOrdPx fee rebate pnl lastPx"),
    "fillTime": I, "uTime": I, "cTime": I, "attachAlgoOrds": J, "linkedAlgoOrd": J,
}, required=["ordId", "instId", "uTime"], ts="uTime", renames={"source": "okxSource"})
_FILL = _Spec(Fill, {
    **_all(S, "tradeId ordId clOrdId billId subType tag side posSide execType feeCcy tradeQuoteCcy"),
    **_all(D, "fillPx fillSz fillIdxPx fillPnl fillPxVol fillPxUsd fillMarkVol fillFwdPx fillMarkPx fee "
                      "feeRate"),
    "fillTime": I, "count": I,
}, required=["tradeId", "ordId", "instId", "fillPx", "fillSz", "side", "ts"])
_POSITION = _Spec(Position, {
    **_all(S, "posId mgnMode posSide posCcy liabCcy tradeId adl bizRefId bizRefType ccy spotInUseCcy "
                      "eventType"),
    **_all(D, "pos availPos avgPx nonSettleAvgPx settledPnl upl uplRatio uplLastPx uplRatioLastPx lever liqPx "
                      "markPx imr margin mgnRatio mmr liab interest notionalUsd optVal pendingCloseOrdLiabVal last "
                      "idxPx usdPx bePx deltaBS deltaPA gammaBS gammaPA thetaBS thetaPA vegaBS vegaPA spotInUseAmt "
                      "clSpotInUseAmt maxSpotInUseAmt realizedPnl pnl fee fundingFee liqPenalty baseBal baseBorrowed "
                      "baseInterest quoteBal quoteBorrowed quoteInterest"),
    "pTime": I, "cTime": I, "uTime": I, "closeOrderAlgo": J,
}, required=["instId", "uTime"], ts="uTime")
_BALANCE = _Spec(Balance, {
    **_all(S, "ccy twap colRes colBorrAutoConversion autoLendStatus eventType"),
    **_all(D, "totalEq isoEq adjEq availEq ordFroz imr mmr borrowFroz mgnRatio notionalUsd notionalUsdForBorrow "
                      "notionalUsdForSwap notionalUsdForFutures notionalUsdForOption upl eq cashBal disEq fixedBal "
                      "availBal frozenBal ordFrozen liab uplLiab crossLiab isoLiab rewardBal interest maxLoan eqUsd "
                      "notionalLever coinUsdPrice stgyEq isoUpl spotInUseAmt clSpotInUseAmt maxSpotInUseAmt "
                      "spotIsoBal smtSyncEq spotCopyTradingEq spotBal openAvgPx accAvgPx spotUpl spotUplRatio totalPnl "
                      "totalPnlRatio autoLendMtAmt"),
    "uTime": I, "pTime": I, "collateralRestrict": B, "collateralEnabled": B,
}, ts=None)
_ALGO_ORDER = _Spec(AlgoOrder, {
    **_all(S, "algoId algoClOrdId ordId clOrdId ccy ordType side posSide tdMode tgtCcy state tpTriggerPxType "
                      "slTriggerPxType triggerPxType actualSide tag reduceOnly failCode reqId amendResult "
                      "amendPxOnTriggerType quickMgnType isTradeBorrowMode chaseType maxChaseType "
                      "tradeQuoteCcy"),
    **_all(D, "sz lever tpTriggerPx tpOrdPx slTriggerPx slOrdPx triggerPx ordPx last actualSz actualPx "
                      "notionalUsd closeFraction chaseVal maxChaseVal"),
    "triggerTime": I, "cTime": I, "uTime": I, "ordIdList": J, "attachAlgoOrds": J, "linkedOrd": J,
}, required=["algoId", "instId", "uTime"], ts="uTime")


#: /public/funding-rate-history rows: a settlement, its time as the record's ts, the realized rate as
#: settFundingRate (OKX docs: realizedRate is the actual funding rate of that settlement).
_FUNDING_SETTLEMENT = _Spec(FundingRate, {
    "method": S, "formulaType": S, "fundingTime": I, "fundingRate": D, "realizedRate": D},
    required=["fundingTime"], ts="fundingTime", renames={"realizedRate": "settFundingRate"})
