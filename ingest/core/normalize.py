"""One WebSocket frame -> validated records, an OKX event, or a dead letter. Never an exception, never a drop.

`normalize(frame)` is the pipeline's entry point. It parses the frame once (msgspec, with JSON floats kept as
exact Decimals and big integers kept whole, so unknown fields survive byte-exact in meaning), tells events
from data pushes, checks every push against its channel's shape (required fields present, strings where OKX
sends strings, decimal strings finite, integers where OKX sends integers and within the range of the Avro
type that carries them (tradeIds too: gap bounds hold them as longs), candle arrays of the right length, a
channel we have a record for) and returns typed records whose common fields come from the frame. Anything
else becomes a `DeadLetter` that keeps the frame's bytes and says what was wrong where. A frame is all or
nothing: one bad row dead-letters the whole frame, so a re-normalized frame never duplicates half of itself.

The `*_from_rest` builders turn REST rows into records of exactly the same schema and key as the stream's,
with `source="rest"` and `recordId = rest:{channel}:{natural id}`.
"""

from __future__ import annotations

import enum
import math
import re
import zlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from decimal import Decimal
from typing import Annotated, Any, NoReturn, TypeVar, cast

import msgspec

from ingest.core.events import InboundFrame
from ingest.core.records import (
    AlgoOrder,
    Balance,
    BookAction,
    BookLevel,
    BookUpdate,
    Candle,
    DeadLetter,
    DeadLetterReason,
    Fill,
    FundingRate,
    IndexTicker,
    Instrument,
    Liquidation,
    MarkPrice,
    OkxRecord,
    OpenInterest,
    Order,
    Position,
    PriceLimit,
    RawFrameEntry,
    RawFrames,
    Source,
    Ticker,
    Trade,
)
from ingest.okx.channels import BOOK_CHANNELS, SNAPSHOT_BOOK_CHANNELS, SubArg, candle_bar, endpoint_for

# ---------------------------------------------------------------------------------------------- results


class TradeRef(msgspec.Struct, frozen=True, gc=False):
    """What gap detection needs of one trade message, already parsed: it covers ids
    `trade_id - count + 1 .. trade_id` (count is 1 on trades-all)."""

    trade_id: int
    count: int
    seq_id: int | None
    ts: int


class TradePush(msgspec.Struct, frozen=True, kw_only=True, gc=False):
    """A trades / trades-all push: its records and, aligned with them, their parsed trade ids."""

    arg: SubArg
    records: tuple[Trade, ...]
    refs: tuple[TradeRef, ...]


class BookPush(msgspec.Struct, frozen=True, kw_only=True, gc=False):
    """A depth push: each BookUpdate carries the parsed action, seqId, prevSeqId, checksum and levels the
    order-book tracker consumes."""

    arg: SubArg
    records: tuple[BookUpdate, ...]


class RecordPush(msgspec.Struct, frozen=True, kw_only=True, gc=False):
    """Any other data push. balance_and_position yields Balance and Position records together."""

    arg: SubArg
    records: tuple[OkxRecord, ...]


class EventName(enum.StrEnum):
    """The `event` values OKX sends (others arrive as they are)."""

    LOGIN = "login"
    SUBSCRIBE = "subscribe"
    UNSUBSCRIBE = "unsubscribe"
    ERROR = "error"
    NOTICE = "notice"
    CHANNEL_CONN_COUNT = "channel-conn-count"
    CHANNEL_CONN_COUNT_ERROR = "channel-conn-count-error"


class OkxEvent(msgspec.Struct, frozen=True, kw_only=True, gc=False):
    """A non-data message from OKX, for the pipeline to log and count (the ws layer acts on acks itself)."""

    event: str
    code: str | None = None
    msg: str | None = None
    okx_conn_id: str | None = None
    request_id: str | None = None
    arg: SubArg | None = None
    channel: str | None = None
    conn_count: str | None = None
    conn: str
    recv_seq: int
    recv_ts_ns: int


Normalized = TradePush | BookPush | RecordPush | OkxEvent | DeadLetter

# ---------------------------------------------------------------------------------------------- validation


class _Invalid(Exception):
    """A validation failure inside the normalizer; becomes a DeadLetter, never leaves this module."""

    def __init__(self, code: DeadLetterReason, path: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.path = path
        self.message = message

    def under(self, prefix: str) -> _Invalid:
        """The same failure, located inside `prefix` (paths are built only when something fails)."""
        self.path = f"{prefix}.{self.path}" if self.path and not self.path.startswith("[") else prefix + self.path
        return self

    @property
    def reason(self) -> str:
        return f"{self.path}: {self.message}" if self.path else self.message


_MISSING: Any = object()
_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1
# Plain decimal notation, ASCII digits only (`\d` would admit other scripts' digits). The integer part is
# bounded so float(s) stays finite too.
_PLAIN_DECIMAL = re.compile(r"-?[0-9]{1,300}(?:\.[0-9]+)?").fullmatch
_EXP_DECIMAL = re.compile(r"-?[0-9]+(?:\.[0-9]+)?[eE][+-]?[0-9]{1,5}").fullmatch
_INTEGER = re.compile(r"-?[0-9]{1,30}").fullmatch
_EPOCH_MS = re.compile(r"[0-9]{1,18}").fullmatch
_POSITIVE = re.compile(r"[1-9][0-9]{0,17}").fullmatch
# All levels of one side joined as "px|sz|x|n;px|sz|x|n..." checked by one regex call; a level that is not
# four decimal/integer strings fails it and is then located by the slow path.
_D = r"-?[0-9]{1,300}(?:\.[0-9]+)?"
_LEVEL = rf"{_D}\|{_D}\|{_D}\|[0-9]{{1,30}}"
_LEVELS = re.compile(rf"{_LEVEL}(?:;{_LEVEL})*")
_LEVELS_MATCH = _LEVELS.fullmatch


def _show(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _type_name(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | Decimal):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


def _wrong_type(key: str, value: object, expected: str) -> NoReturn:
    raise _Invalid(DeadLetterReason.WRONG_TYPE, key, f"expected {expected}, got {_type_name(value)} {_show(value)}")


def _missing(key: str) -> NoReturn:
    raise _Invalid(DeadLetterReason.MISSING_FIELD, key, "required field is missing")


def _check_decimal(key: str, value: str) -> str:
    """A decimal string OKX sent: plain notation, or exponent notation that stays finite as a float."""
    if _PLAIN_DECIMAL(value) is None and (_EXP_DECIMAL(value) is None or not math.isfinite(float(value))):
        raise _Invalid(DeadLetterReason.BAD_NUMBER, key, f"{_show(value)} is not a finite decimal")
    return value


def _req_str(row: Mapping[str, object], key: str) -> str:
    value = row.get(key, _MISSING)
    if type(value) is str and value:
        return value
    if value is _MISSING:
        _missing(key)
    if type(value) is str:
        raise _Invalid(DeadLetterReason.BAD_VALUE, key, "required field is empty")
    _wrong_type(key, value, "a string")


def _req_decimal(row: Mapping[str, object], key: str) -> str:
    value = row.get(key, _MISSING)
    if type(value) is str:
        if _PLAIN_DECIMAL(value) is not None:
            return value
        return _check_decimal(key, value)
    if value is _MISSING:
        _missing(key)
    _wrong_type(key, value, "a decimal string")


def _epoch_ms(key: str, value: object) -> int:
    if type(value) is str and _EPOCH_MS(value) is not None:
        return int(value)
    if type(value) is str:
        raise _Invalid(DeadLetterReason.BAD_NUMBER, key, f"{_show(value)} is not epoch milliseconds")
    _wrong_type(key, value, "a string of epoch milliseconds")


def _req_ts(row: Mapping[str, object], key: str = "ts") -> int:
    value = row.get(key, _MISSING)
    if value is _MISSING:
        _missing(key)
    return _epoch_ms(key, value)


def _opt_long(row: Mapping[str, object], key: str) -> int | None:
    value = row.get(key, _MISSING)
    if value is _MISSING:
        return None
    if type(value) is int and _INT64_MIN <= value <= _INT64_MAX:
        return value
    if type(value) is int:
        raise _Invalid(DeadLetterReason.BAD_NUMBER, key, f"{value} does not fit a 64-bit integer")
    _wrong_type(key, value, "an integer")


_JSON_TEXT = msgspec.json.Encoder(decimal_format="number")


def _json_text(value: object) -> str:
    return _JSON_TEXT.encode(value).decode()


def _extras(row: Mapping[str, object], known: frozenset[str], prefix: str = "") -> dict[str, str]:
    """Unknown keys of `row` as JSON text, so a field OKX adds is kept, not dropped."""
    return {prefix + k: _json_text(v) for k, v in row.items() if k not in known}


# ---------------------------------------------------------------------------------------------- field specs


class _Kind(enum.Enum):
    """How a known OKX field is checked and stored."""

    STR = "string"
    DEC = "decimal string (\"\" allowed)"
    INT = "integer string (\"\" allowed)"
    BOOL = "boolean"
    LONG = "integer"
    JSON = "any JSON, stored as JSON text"


S, D, I, B, L, J = _Kind.STR, _Kind.DEC, _Kind.INT, _Kind.BOOL, _Kind.LONG, _Kind.JSON  # noqa: E741

R = TypeVar("R", bound=OkxRecord)


def _all(kind: _Kind, names: str) -> dict[str, _Kind]:
    """`kind` for each of the space-separated OKX field `names`."""
    return dict.fromkeys(names.split(), kind)


class _Spec:
    """How the rows of one record type are checked: OKX field -> (Struct attribute, kind), required fields,
    and which field is the record's ts (None: the receive time, for rows without an event time)."""

    def __init__(self, cls: type[OkxRecord], fields: Mapping[str, _Kind], *, required: Sequence[str] = (),
                 ts: str | None = "ts", renames: Mapping[str, str] | None = None) -> None:
        attrs = {f.encode_name: f.name for f in msgspec.structs.fields(cls)}
        renames = renames or {}
        self.cls = cls
        self.fields: dict[str, tuple[str, _Kind]] = {}
        for okx_name, kind in fields.items():
            avro_name = renames.get(okx_name, okx_name)
            if avro_name not in attrs:
                raise TypeError(f"{cls.__name__} has no field {avro_name!r} for OKX field {okx_name!r}")
            self.fields[okx_name] = (attrs[avro_name], kind)
        self.required = frozenset(required)
        self.ts = ts
        self.known = frozenset(self.fields) | {"instId", "instType"} | ({ts} if ts else set())

    def build(self, row: object, common: dict[str, Any], ctx: _Ctx, *,
              more: Mapping[str, object] | None = None, parent_extra: Mapping[str, str] | None = None) -> OkxRecord:
        """One record from one row; `more` adds values from the enclosing push (eventType, pTime...)."""
        if type(row) is not dict:
            _wrong_type("", row, "an object")
        kwargs: dict[str, Any] = dict(common)
        if more:
            kwargs.update(more)
        extra: dict[str, str] = dict(ctx.extra)
        if parent_extra:
            extra.update(parent_extra)
        fields = self.fields
        for key, value in row.items():
            spec = fields.get(key)
            if spec is None:
                if key not in self.known:
                    extra[key] = _json_text(value)
                continue
            attr, kind = spec
            kwargs[attr] = _check(kind, key, value, key in self.required)
        for key in self.required:
            if key not in row:
                _missing(key)
        inst_id = row.get("instId", _MISSING)
        if inst_id is _MISSING:
            inst_id = ctx.inst_id
        elif type(inst_id) is not str or not inst_id:
            _wrong_type("instId", inst_id, "a non-empty string")
        elif ctx.inst_id is not None and inst_id != ctx.inst_id and ctx.check_inst_id:
            raise _Invalid(DeadLetterReason.BAD_VALUE, "instId", f"{inst_id!r} differs from arg.instId "
                           f"{ctx.inst_id!r}")
        if inst_id is None and self.cls is not Balance:
            _missing("instId")
        inst_type = row.get("instType", _MISSING)
        if inst_type is _MISSING:
            inst_type = ctx.inst_type
        elif type(inst_type) is not str:
            _wrong_type("instType", inst_type, "a string")
        kwargs["inst_id"] = inst_id
        kwargs["inst_type"] = inst_type
        # Required fields were checked above, so a missing ts field here is an optional one: use receive time.
        stamp = row.get(self.ts, _MISSING) if self.ts is not None else _MISSING
        kwargs["ts"] = ctx.recv_ts_ns // 1_000_000 if stamp is _MISSING else _epoch_ms(str(self.ts), stamp)
        kwargs["extra"] = extra
        return self.cls(**kwargs)


def _check(kind: _Kind, key: str, value: object, required: bool) -> object:
    if kind is S:
        if type(value) is str and (value or not required):
            return value
    elif kind is D:
        if type(value) is str:
            if value == "" and not required:
                return value
            if _PLAIN_DECIMAL(value) is not None:
                return value
            return _check_decimal(key, value)
    elif kind is I:
        if type(value) is str:
            if (value == "" and not required) or _INTEGER(value) is not None:
                return value
            raise _Invalid(DeadLetterReason.BAD_NUMBER, key, f"{_show(value)} is not an integer")
    elif kind is B:
        if type(value) is bool:
            return value
    elif kind is L:
        if type(value) is int:
            if _INT64_MIN <= value <= _INT64_MAX:
                return value
            raise _Invalid(DeadLetterReason.BAD_NUMBER, key, f"{value} does not fit a 64-bit integer")
    else:
        return _json_text(value)
    if type(value) is str and required and not value:
        raise _Invalid(DeadLetterReason.BAD_VALUE, key, "required field is empty")
    _wrong_type(key, value, "a " + kind.value)


# OKX field kinds per record (SPEC sections 5 and 6). instId, instType and the ts field are handled by _Spec.
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

# ---------------------------------------------------------------------------------------------- context


class _Ctx:
    """What every record of one frame (or REST row) shares."""

    __slots__ = ("channel", "check_inst_id", "conn", "extra", "inst_id", "inst_type", "recv_seq", "recv_ts_ns",
                 "rid_prefix", "source", "uid")

    def __init__(self, *, channel: str, conn: str | None, recv_seq: int | None, recv_ts_ns: int, source: Source,
                 rid_prefix: str, inst_id: str | None = None, inst_type: str | None = None, uid: str | None = None,
                 extra: dict[str, str] | None = None, check_inst_id: bool = True) -> None:
        self.channel = channel
        self.conn = conn
        self.recv_seq = recv_seq
        self.recv_ts_ns = recv_ts_ns
        self.source = source
        self.rid_prefix = rid_prefix
        self.inst_id = inst_id
        self.inst_type = inst_type
        self.uid = uid
        self.extra = extra or {}
        self.check_inst_id = check_inst_id

    def common(self, index: int) -> dict[str, Any]:
        return {"channel": self.channel, "recv_ts_ns": self.recv_ts_ns, "source": self.source,
                "conn_id": self.conn, "recv_seq": self.recv_seq, "record_id": f"{self.rid_prefix}{index}"}


# ---------------------------------------------------------------------------------------------- channels


_TRADE_KEYS = frozenset({"instId", "tradeId", "px", "sz", "side", "ts", "count", "source", "seqId"})


def _trade(row: object, ctx: _Ctx, index: int) -> tuple[Trade, TradeRef]:
    """One trades / trades-all row (also a REST trades row): the hot path, checked field by field."""
    if type(row) is not dict:
        _wrong_type("", row, "an object")
    inst_id = _req_str(row, "instId")
    if ctx.inst_id is not None and inst_id != ctx.inst_id:
        raise _Invalid(DeadLetterReason.BAD_VALUE, "instId", f"{inst_id!r} differs from arg.instId {ctx.inst_id!r}")
    trade_id = row.get("tradeId", _MISSING)
    if type(trade_id) is not str or _INTEGER(trade_id) is None:
        if trade_id is _MISSING:
            _missing("tradeId")
        if type(trade_id) is str:
            raise _Invalid(DeadLetterReason.BAD_NUMBER, "tradeId", f"{_show(trade_id)} is not an integer")
        _wrong_type("tradeId", trade_id, "an integer string")
    tid = int(trade_id)
    if not _INT64_MIN <= tid <= _INT64_MAX:
        # Gap bounds carry it as an Avro long (okx.gaps before/after.tradeId, the stream-state file).
        raise _Invalid(DeadLetterReason.BAD_NUMBER, "tradeId", f"{_show(trade_id)} does not fit a 64-bit integer")
    px = _req_decimal(row, "px")
    sz = _req_decimal(row, "sz")
    side = row.get("side", _MISSING)
    if side != "buy" and side != "sell":
        if side is _MISSING:
            _missing("side")
        if type(side) is str:
            raise _Invalid(DeadLetterReason.BAD_VALUE, "side", f"{_show(side)} is not buy or sell")
        _wrong_type("side", side, "a string")
    ts = _req_ts(row)
    present = 6
    count = row.get("count", _MISSING)
    if count is _MISSING:
        count = None
        n = 1
    elif type(count) is str and _POSITIVE(count) is not None:
        present += 1
        n = int(count)
    elif type(count) is str:
        raise _Invalid(DeadLetterReason.BAD_VALUE, "count", f"{_show(count)} is not a positive integer")
    else:
        _wrong_type("count", count, "a positive integer string")
    okx_source = row.get("source", _MISSING)
    if okx_source is _MISSING:
        okx_source = None
    elif type(okx_source) is str:
        present += 1
    else:
        _wrong_type("source", okx_source, "a string")
    seq_id = _opt_long(row, "seqId")
    if seq_id is not None:
        present += 1
    extra = {**ctx.extra, **_extras(row, _TRADE_KEYS)} if len(row) != present else dict(ctx.extra)
    record = Trade(channel=ctx.channel, inst_id=inst_id, ts=ts, recv_ts_ns=ctx.recv_ts_ns, source=ctx.source,
                   conn_id=ctx.conn, recv_seq=ctx.recv_seq, record_id=f"{ctx.rid_prefix}{index}", trade_id=trade_id,
                   px=px, sz=sz, side=side, count=count, seq_id=seq_id, okx_source=okx_source, extra=extra)
    return record, TradeRef(tid, n, seq_id, ts)


def _levels(row: Mapping[str, object], key: str) -> tuple[BookLevel, ...]:
    """One side of a book row: every level four strings, px and sz decimal, the other two integers."""
    levels = row.get(key, _MISSING)
    if type(levels) is not list:
        if levels is _MISSING:
            _missing(key)
        _wrong_type(key, levels, "an array of levels")
    if not levels:
        return ()
    try:
        # "#" for anything but a 4-element list makes the regex fail, so the slow path names the culprit
        joined = ";".join(["|".join(level) if type(level) is list and len(level) == 4 else "#" for level in levels])
    except TypeError:  # a non-string inside a level
        joined = None
    if joined is None or _LEVELS_MATCH(joined) is None:
        _find_bad_level(key, levels)
    return tuple(map(tuple, levels))


def _find_bad_level(key: str, levels: list[object]) -> NoReturn:
    """Name the first level that failed the one-regex check."""
    for i, level in enumerate(levels):
        where = f"{key}[{i}]"
        if type(level) is not list:
            _wrong_type(where, level, "a level array [px, sz, \"0\", numOrders]")
        if len(level) != 4:
            raise _Invalid(DeadLetterReason.BAD_VALUE, where, f"a level has 4 items, not {len(level)}: {_show(level)}")
        for j, item in enumerate(level):
            if type(item) is not str:
                _wrong_type(f"{where}[{j}]", item, "a string")
        for j in (0, 1, 2):
            _check_decimal(f"{where}[{j}]", level[j])
        if _INTEGER(level[3]) is None or level[3].startswith("-"):
            raise _Invalid(DeadLetterReason.BAD_NUMBER, f"{where}[3]", f"{_show(level[3])} is not an order count")
    # Every level passed on its own, so the joined form failed on a separator inside a string.
    raise _Invalid(DeadLetterReason.BAD_VALUE, key, "a level string contains '|' or ';'")


_BOOK_KEYS = frozenset({"asks", "bids", "ts", "checksum", "seqId", "prevSeqId", "instId"})


def _book(row: object, ctx: _Ctx, index: int, action: BookAction) -> BookUpdate:
    if type(row) is not dict:
        _wrong_type("", row, "an object")
    asks = _levels(row, "asks")
    bids = _levels(row, "bids")
    ts = _req_ts(row)
    inst_id = row.get("instId", _MISSING)
    if inst_id is _MISSING:
        if ctx.inst_id is None:
            raise _Invalid(DeadLetterReason.MISSING_FIELD, "instId", "neither the row nor arg has an instId")
        inst_id = ctx.inst_id
    elif type(inst_id) is not str or not inst_id:
        _wrong_type("instId", inst_id, "a non-empty string")
    elif ctx.inst_id is not None and inst_id != ctx.inst_id:
        raise _Invalid(DeadLetterReason.BAD_VALUE, "instId", f"{inst_id!r} differs from arg.instId {ctx.inst_id!r}")
    seq_id = _opt_long(row, "seqId")
    prev_seq_id = _opt_long(row, "prevSeqId")
    checksum = _opt_long(row, "checksum")
    extra = dict(ctx.extra) if _BOOK_KEYS.issuperset(row) else {**ctx.extra, **_extras(row, _BOOK_KEYS)}
    return BookUpdate(channel=ctx.channel, inst_id=inst_id, ts=ts, recv_ts_ns=ctx.recv_ts_ns, source=ctx.source,
                      conn_id=ctx.conn, recv_seq=ctx.recv_seq, record_id=f"{ctx.rid_prefix}{index}", action=action,
                      asks=asks, bids=bids, seq_id=seq_id, prev_seq_id=prev_seq_id, checksum=checksum, extra=extra)


_CANDLE_FIELDS = ("ts", "o", "h", "l", "c", "vol", "volCcy", "volCcyQuote", "confirm")
# Element names by array length. candle<bar>: 7 (2021), 8 (confirm added), 9 (volCcyQuote added before it).
# mark-price-candle<bar> / index-candle<bar>: 5, or 6 with confirm.
_CANDLE_LAYOUTS: dict[tuple[bool, int], tuple[str, ...]] = {
    (False, 7): ("ts", "o", "h", "l", "c", "vol", "volCcy"),
    (False, 8): ("ts", "o", "h", "l", "c", "vol", "volCcy", "confirm"),
    (False, 9): _CANDLE_FIELDS,
    (True, 5): ("ts", "o", "h", "l", "c"),
    (True, 6): ("ts", "o", "h", "l", "c", "confirm"),
}


def _candle(row: object, ctx: _Ctx, index: int) -> Candle:
    if type(row) is not list:
        _wrong_type("", row, "a candle array")
    bar = candle_bar(ctx.channel)
    if bar is None:
        raise _Invalid(DeadLetterReason.UNKNOWN_CHANNEL, "", f"{ctx.channel!r} is not a candle channel")
    price_only = not ctx.channel.startswith("candle")
    longest = 6 if price_only else 9
    layout = _CANDLE_LAYOUTS.get((price_only, min(len(row), longest)))
    if layout is None:
        expected = "5 or 6" if price_only else "7 to 9"
        raise _Invalid(DeadLetterReason.BAD_VALUE, "", f"a candle array has {expected} elements, got {len(row)}")
    values: dict[str, Any] = {}
    for i, name in enumerate(layout):
        item = row[i]
        if type(item) is not str:
            _wrong_type(f"[{i}]", item, "a string")
        if name == "ts":
            values["ts"] = _epoch_ms(f"[{i}]", item)
        elif name == "confirm":
            if item not in ("0", "1"):
                raise _Invalid(DeadLetterReason.BAD_VALUE, f"[{i}]", f"confirm is \"0\" or \"1\", got {_show(item)}")
            values["confirm"] = item == "1"
        else:
            if not item and name in ("o", "h", "l", "c"):
                raise _Invalid(DeadLetterReason.BAD_VALUE, f"[{i}]", f"{name} is empty")
            values[name] = _check(D, f"[{i}]", item, False)
    extra = dict(ctx.extra)
    if len(row) > longest:  # elements OKX appended after the documented ones
        extra.update({f"[{i}]": _json_text(v) for i, v in enumerate(row) if i >= longest})
    if ctx.inst_id is None:
        raise _Invalid(DeadLetterReason.MISSING_FIELD, "instId", "a candle push needs arg.instId")
    return Candle(channel=ctx.channel, inst_id=ctx.inst_id, inst_type=ctx.inst_type, ts=values["ts"],
                  recv_ts_ns=ctx.recv_ts_ns, source=ctx.source, conn_id=ctx.conn, recv_seq=ctx.recv_seq,
                  record_id=f"{ctx.rid_prefix}{index}", bar=bar, o=values["o"], h=values["h"], l=values["l"],
                  c=values["c"], vol=values.get("vol"), vol_ccy=values.get("volCcy"),
                  vol_ccy_quote=values.get("volCcyQuote"), confirm=values.get("confirm"), extra=extra)


def _liquidations(row: object, ctx: _Ctx, start: int) -> list[OkxRecord]:
    """One liquidation-orders row -> one record per detail, each carrying the row's instrument fields."""
    if type(row) is not dict:
        _wrong_type("", row, "an object")
    details = row.get("details", _MISSING)
    if type(details) is not list:
        if details is _MISSING:
            _missing("details")
        _wrong_type("details", details, "an array")
    inst_id = _req_str(row, "instId")
    parent = {k: v for k, v in row.items() if k in ("instId", "instType", "instFamily", "uly")}
    parent_extra = _extras(row, _LIQUIDATION_ROW, "parent.")
    sub = _Ctx(channel=ctx.channel, conn=ctx.conn, recv_seq=ctx.recv_seq, recv_ts_ns=ctx.recv_ts_ns,
               source=ctx.source, rid_prefix=ctx.rid_prefix, inst_id=inst_id, inst_type=ctx.inst_type,
               extra=ctx.extra)
    out: list[OkxRecord] = []
    for i, detail in enumerate(details):
        if type(detail) is not dict:
            raise _Invalid(DeadLetterReason.WRONG_TYPE, f"details[{i}]", "expected an object")
        try:
            out.append(_LIQUIDATION.build({**parent, **detail}, sub.common(start + i), sub,
                                          parent_extra=parent_extra))
        except _Invalid as exc:
            raise exc.under(f"details[{i}]") from None
    return out


def _account(row: object, ctx: _Ctx, start: int, push: Mapping[str, object]) -> list[OkxRecord]:
    """One account row -> the totals record (ccy null) and one record per currency detail."""
    if type(row) is not dict:
        _wrong_type("", row, "an object")
    details = row.get("details", [])
    if type(details) is not list:
        _wrong_type("details", details, "an array")
    totals = {k: v for k, v in row.items() if k != "details"}
    out: list[OkxRecord] = [_balance(totals, ctx, start, push)]
    for i, detail in enumerate(details):
        try:
            if type(detail) is not dict:
                _wrong_type("", detail, "an object")
            ccy = detail.get("ccy", _MISSING)
            if type(ccy) is not str or not ccy:
                if ccy is _MISSING:
                    _missing("ccy")
                if ccy == "":
                    raise _Invalid(DeadLetterReason.BAD_VALUE, "ccy", "a currency row without a currency")
                _wrong_type("ccy", ccy, "a string")
            out.append(_balance(detail, ctx, start + 1 + i, push))
        except _Invalid as exc:
            raise exc.under(f"details[{i}]") from None
    return out


def _balance(row: Mapping[str, object], ctx: _Ctx, index: int, more: Mapping[str, object],
             parent_extra: Mapping[str, str] | None = None) -> OkxRecord:
    """A Balance from one object; its ts is uTime, or pTime when uTime is empty."""
    record = _BALANCE.build(row, ctx.common(index), ctx, more={"uid": ctx.uid, **more}, parent_extra=parent_extra)
    assert isinstance(record, Balance)
    if record.u_time:
        ts = _epoch_ms("uTime", record.u_time)
    elif record.p_time:
        ts = _epoch_ms("pTime", record.p_time)
    else:
        raise _Invalid(DeadLetterReason.MISSING_FIELD, "uTime", "no uTime, and the push has no pTime either")
    return msgspec.structs.replace(record, ts=ts)


def _push_level(push: Mapping[str, object]) -> dict[str, object]:
    """eventType / curPage / lastPage of an account or positions push, checked."""
    out: dict[str, object] = {}
    event_type = push.get("eventType", _MISSING)
    if event_type is not _MISSING:
        out["event_type"] = _check(S, "eventType", event_type, False)
    cur_page = push.get("curPage", _MISSING)
    if cur_page is not _MISSING:
        out["cur_page"] = _check(L, "curPage", cur_page, False)
    last_page = push.get("lastPage", _MISSING)
    if last_page is not _MISSING:
        out["last_page"] = _check(B, "lastPage", last_page, False)
    return out


_BAP_ROW = frozenset({"pTime", "eventType", "balData", "posData", "trades"})


def _balance_and_position(row: object, ctx: _Ctx, start: int) -> list[OkxRecord]:
    """One balance_and_position row -> a Balance per balData entry and a Position per posData entry."""
    if type(row) is not dict:
        _wrong_type("", row, "an object")
    more: dict[str, object] = {}
    if "pTime" in row:
        more["p_time"] = _check(I, "pTime", row["pTime"], False)
    if "eventType" in row:
        more["event_type"] = _check(S, "eventType", row["eventType"], False)
    if "trades" in row:
        more["trades"] = _check(J, "trades", row["trades"], False)
    parent_extra = _extras(row, _BAP_ROW, "parent.")
    out: list[OkxRecord] = []
    for key in ("balData", "posData"):
        entries = row.get(key, [])
        if type(entries) is not list:
            _wrong_type(key, entries, "an array")
        for i, entry in enumerate(entries):
            try:
                if key == "balData":
                    if type(entry) is not dict:
                        _wrong_type("", entry, "an object")
                    out.append(_balance(entry, ctx, start + len(out), more, parent_extra))
                else:
                    out.append(_POSITION.build(entry, ctx.common(start + len(out)), ctx,
                                               more={"uid": ctx.uid, **more}, parent_extra=parent_extra))
            except _Invalid as exc:
                raise exc.under(f"{key}[{i}]") from None
    return out


RowHandler = Callable[[object, _Ctx, int, Mapping[str, object]], list[OkxRecord]]


def _generic(spec: _Spec, *, private: bool = False, push_level: bool = False) -> RowHandler:
    def handle(row: object, ctx: _Ctx, start: int, push: Mapping[str, object]) -> list[OkxRecord]:
        more: dict[str, object] = _push_level(push) if push_level else {}
        if private:
            more["uid"] = ctx.uid
        return [spec.build(row, ctx.common(start), ctx, more=more)]
    return handle


def _account_handler(row: object, ctx: _Ctx, start: int, push: Mapping[str, object]) -> list[OkxRecord]:
    return _account(row, ctx, start, _push_level(push))


_ROW_HANDLERS: dict[str, RowHandler] = {
    "tickers": _generic(_TICKER),
    "mark-price": _generic(_MARK_PRICE),
    "index-tickers": _generic(_INDEX_TICKER),
    "funding-rate": _generic(_FUNDING_RATE),
    "open-interest": _generic(_OPEN_INTEREST),
    "price-limit": _generic(_PRICE_LIMIT),
    "instruments": _generic(_INSTRUMENT),
    "liquidation-orders": lambda row, ctx, start, push: _liquidations(row, ctx, start),
    "orders": _generic(_ORDER, private=True),
    "fills": _generic(_FILL, private=True),
    "orders-algo": _generic(_ALGO_ORDER, private=True),
    "positions": _generic(_POSITION, private=True, push_level=True),
    "account": _account_handler,
    "balance_and_position": lambda row, ctx, start, push: _balance_and_position(row, ctx, start),
}
#: Channels whose rows belong to several instruments: arg.instId (if any) only filters, so rows may differ.
_MULTI_INSTRUMENT = frozenset({"orders", "fills", "orders-algo", "positions", "balance_and_position", "account",
                               "liquidation-orders", "instruments"})
_TRADE_CHANNELS = frozenset({"trades", "trades-all"})
_PUSH_KEYS = frozenset({"arg", "data", "id"})
_PUSH_KEYS_BY_CHANNEL: dict[str, frozenset[str]] = {
    **{c: _PUSH_KEYS | {"action"} for c in BOOK_CHANNELS},
    "account": _PUSH_KEYS | {"eventType", "curPage", "lastPage"},
    "positions": _PUSH_KEYS | {"eventType", "curPage", "lastPage"},
}
_ARG_KEYS = frozenset({"channel", "instId", "instType", "instFamily", "ccy", "extraParams", "uid"})


def supports(channel: str) -> bool:
    """True when `normalize` turns pushes of `channel` into records (others are dead-lettered)."""
    return (channel in _ROW_HANDLERS or channel in _TRADE_CHANNELS or channel in BOOK_CHANNELS
            or candle_bar(channel) is not None)


# ---------------------------------------------------------------------------------------------- fast paths
# Trades and books are most of the traffic. Their frames are decoded straight into typed Structs (msgspec checks
# the types, the required fields and the 4-string levels in C), checked with one regex per row or book side,
# and become records by copying a per-instrument template. Anything unusual (an unknown field, a null, an
# exponent-notation decimal, a bad value) returns None, and the generic path, which is the reference, decides.
# tests/unit/test_normalize.py checks that both paths give equal results.

_Long = Annotated[int, msgspec.Meta(ge=_INT64_MIN, le=_INT64_MAX)]
_NonEmpty = Annotated[str, msgspec.Meta(min_length=1)]
_UNSET = msgspec.UNSET


class _FastArg(msgspec.Struct, forbid_unknown_fields=True, gc=False):
    channel: str
    instId: _NonEmpty


class _FastTrade(msgspec.Struct, forbid_unknown_fields=True, gc=False):
    instId: str
    tradeId: str
    px: str
    sz: str
    side: str
    ts: str
    count: str | msgspec.UnsetType = _UNSET
    source: str | msgspec.UnsetType = _UNSET
    seqId: _Long | msgspec.UnsetType = _UNSET


class _FastTrades(msgspec.Struct, forbid_unknown_fields=True, gc=False):
    arg: _FastArg
    data: list[_FastTrade]


class _FastBook(msgspec.Struct, forbid_unknown_fields=True, gc=False):
    asks: tuple[BookLevel, ...]
    bids: tuple[BookLevel, ...]
    ts: str
    checksum: _Long | msgspec.UnsetType = _UNSET
    prevSeqId: _Long | msgspec.UnsetType = _UNSET
    seqId: _Long | msgspec.UnsetType = _UNSET
    instId: str | msgspec.UnsetType = _UNSET


class _FastBooks(msgspec.Struct, forbid_unknown_fields=True, gc=False):
    arg: _FastArg
    data: list[_FastBook]
    action: str | msgspec.UnsetType = _UNSET


_TRADES_DECODER = msgspec.json.Decoder(_FastTrades)
_BOOKS_DECODER = msgspec.json.Decoder(_FastBooks)
# tradeId|px|sz|ts in one regex call; a "|" inside a value adds a separator, so it cannot pass.
_TRADE_NUMBERS = re.compile(rf"-?[0-9]{{1,30}}\|{_D}\|{_D}\|[0-9]{{1,18}}").fullmatch
_TEMPLATES: dict[tuple[str, str], tuple[Any, SubArg]] = {}


def _template(cls: type[R], channel: str, inst_id: str) -> tuple[R, SubArg]:
    """A record of `cls` with the per-stream fields set, copied (msgspec replace) for each new record
    (several times faster than calling the constructor with every field by keyword), and the stream's arg."""
    cached = _TEMPLATES.get((channel, inst_id))
    if cached is None or type(cached[0]) is not cls:
        if len(_TEMPLATES) >= 50_000:
            _TEMPLATES.clear()
        template: OkxRecord
        if cls is Trade:
            template = Trade(channel=channel, inst_id=inst_id, ts=0, recv_ts_ns=0, source=Source.WS, record_id="",
                             trade_id="", px="", sz="", side="")
        else:
            template = BookUpdate(channel=channel, inst_id=inst_id, ts=0, recv_ts_ns=0, source=Source.WS,
                                  record_id="", action=BookAction.SNAPSHOT, asks=(), bids=())
        cached = _TEMPLATES[(channel, inst_id)] = (template, _cached_sub_arg((channel, inst_id, None, None, None,
                                                                              None)))
    return cast(R, cached[0]), cached[1]


def _fast_trades(frame: InboundFrame) -> TradePush | None:
    try:
        push = _TRADES_DECODER.decode(frame.data)
    except (msgspec.DecodeError, UnicodeDecodeError):
        return None
    channel = push.arg.channel
    inst_id = push.arg.instId
    if channel not in _TRADE_CHANNELS:
        return None
    template, sub = _template(Trade, channel, inst_id)
    replace = msgspec.structs.replace
    prefix = f"{frame.conn}:{frame.recv_seq}:"
    records: list[Trade] = []
    refs: list[TradeRef] = []
    for i, row in enumerate(push.data):
        trade_id, ts, side = row.tradeId, row.ts, row.side
        if (row.instId != inst_id or (side != "buy" and side != "sell")
                or _TRADE_NUMBERS(f"{trade_id}|{row.px}|{row.sz}|{ts}") is None):
            return None
        count: str | None = None
        n = 1
        if row.count is not _UNSET:
            count = row.count
            if _POSITIVE(count) is None:
                return None
            n = int(count)
        tid = int(trade_id)
        if not _INT64_MIN <= tid <= _INT64_MAX:
            return None
        seq_id = None if row.seqId is _UNSET else row.seqId
        ms = int(ts)
        records.append(replace(template, ts=ms, recv_ts_ns=frame.recv_ts_ns, conn_id=frame.conn,
                               recv_seq=frame.recv_seq, record_id=f"{prefix}{i}", trade_id=trade_id, px=row.px,
                               sz=row.sz, side=side, count=count, seq_id=seq_id,
                               okx_source=None if row.source is _UNSET else row.source, extra={}))
        refs.append(TradeRef(tid, n, seq_id, ms))
    return TradePush(arg=sub, records=tuple(records), refs=tuple(refs))


def _fast_books(frame: InboundFrame) -> BookPush | None:
    try:
        push = _BOOKS_DECODER.decode(frame.data)
    except (msgspec.DecodeError, UnicodeDecodeError):
        return None
    channel = push.arg.channel
    inst_id = push.arg.instId
    if channel not in BOOK_CHANNELS:
        return None
    if push.action == "update":
        action = BookAction.UPDATE
    elif push.action == "snapshot" or (push.action is _UNSET and channel in SNAPSHOT_BOOK_CHANNELS):
        action = BookAction.SNAPSHOT
    else:
        return None
    template, sub = _template(BookUpdate, channel, inst_id)
    replace = msgspec.structs.replace
    prefix = f"{frame.conn}:{frame.recv_seq}:"
    records: list[BookUpdate] = []
    for i, row in enumerate(push.data):
        asks, bids = row.asks, row.bids
        if ((row.instId is not _UNSET and row.instId != inst_id) or _EPOCH_MS(row.ts) is None
                or (asks and _LEVELS_MATCH(";".join(["|".join(level) for level in asks])) is None)
                or (bids and _LEVELS_MATCH(";".join(["|".join(level) for level in bids])) is None)):
            return None
        records.append(replace(template, ts=int(row.ts), recv_ts_ns=frame.recv_ts_ns, conn_id=frame.conn,
                               recv_seq=frame.recv_seq, record_id=f"{prefix}{i}", action=action, asks=asks,
                               bids=bids, seq_id=None if row.seqId is _UNSET else row.seqId,
                               prev_seq_id=None if row.prevSeqId is _UNSET else row.prevSeqId,
                               checksum=None if row.checksum is _UNSET else row.checksum, extra={}))
    return BookPush(arg=sub, records=tuple(records))


_FAST_PATHS: dict[bytes, Callable[[InboundFrame], TradePush | BookPush | None]] = {
    **{c.encode(): _fast_trades for c in _TRADE_CHANNELS},
    **{c.encode(): _fast_books for c in BOOK_CHANNELS},
}
_FAST_PREFIX = b'{"arg":{"channel":"'

# ---------------------------------------------------------------------------------------------- entry point

_DECODER = msgspec.json.Decoder(float_hook=Decimal)
# SubArg is a frozen dataclass (slow to build); pushes of one stream repeat the same arg, so share instances.
_SUBARG_CACHE: dict[tuple[str | None, ...], SubArg] = {}
_SUBARG_KEYS = ("channel", "instId", "instType", "instFamily", "ccy", "extraParams")


def cache_sizes() -> dict[str, int]:
    """Entries of the normalizer's per-stream caches (each cleared at 50,000), for the state gauge."""
    return {"normalize_args": len(_SUBARG_CACHE), "normalize_templates": len(_TEMPLATES)}


def normalize(frame: InboundFrame) -> Normalized:
    """Records, an event or a dead letter for one frame. Never raises: even a bug here becomes a dead letter."""
    try:
        data = frame.data
        if data.startswith(_FAST_PREFIX):
            fast = _FAST_PATHS.get(data[19:data.find(b'"', 19)])
            if fast is not None:
                result = fast(frame)
                if result is not None:
                    return result
        return _normalize(frame)
    except Exception as exc:  # a normalizer bug must cost one frame, not the pipeline
        return _dead(frame, DeadLetterReason.INTERNAL_ERROR, f"normalizer error {type(exc).__name__}: {exc}")


def _normalize(frame: InboundFrame) -> Normalized:
    """The reference path for every frame (and the fallback of the fast paths)."""
    try:
        msg = _DECODER.decode(frame.data)
    except UnicodeDecodeError as exc:
        return _dead(frame, DeadLetterReason.NOT_UTF8, f"frame is not UTF-8: {exc}")
    except (msgspec.DecodeError, RecursionError) as exc:
        try:  # the parser stops at the first bad byte, which may be a bad UTF-8 sequence
            frame.data.decode()
        except UnicodeDecodeError as utf8:
            return _dead(frame, DeadLetterReason.NOT_UTF8, f"frame is not UTF-8: {utf8}")
        return _dead(frame, DeadLetterReason.BAD_JSON, f"frame is not JSON: {exc}")
    if type(msg) is not dict:
        return _dead(frame, DeadLetterReason.NOT_OBJECT, f"frame is {_type_name(msg)}, not a JSON object")
    if "event" in msg:
        return _event(frame, msg)
    arg = msg.get("arg")
    if type(arg) is not dict or "data" not in msg:
        if "arg" not in msg:
            return _dead(frame, DeadLetterReason.UNRECOGNIZED, "frame has neither event nor arg+data")
        if type(arg) is not dict:
            return _dead(frame, DeadLetterReason.WRONG_TYPE, f"expected an object, got {_type_name(arg)}", "arg")
        return _dead(frame, DeadLetterReason.MISSING_FIELD, "a push without data", "data")
    channel = arg.get("channel")
    if type(channel) is not str:
        code = DeadLetterReason.MISSING_FIELD if channel is None else DeadLetterReason.WRONG_TYPE
        return _dead(frame, code, "arg.channel must be a string", "arg.channel")
    inst_id = arg.get("instId")
    inst_id = inst_id if type(inst_id) is str else None
    if not supports(channel):
        if endpoint_for(channel) is not None:
            return _dead(frame, DeadLetterReason.UNSUPPORTED_CHANNEL, f"no record type for channel {channel!r}",
                         "arg.channel", channel, inst_id)
        return _dead(frame, DeadLetterReason.UNKNOWN_CHANNEL, f"unknown channel {channel!r}", "arg.channel",
                     channel, inst_id)
    try:
        return _push(frame, msg, arg, channel)
    except _Invalid as exc:
        return _dead(frame, exc.code, exc.reason, exc.path or None, channel, inst_id)


def _sub_arg(arg: dict[str, object]) -> SubArg:
    """SubArg.from_okx, memoised on the string values it reads."""
    return _cached_sub_arg(tuple(v if type(v) is str else None for v in map(arg.get, _SUBARG_KEYS)))


def _cached_sub_arg(key: tuple[str | None, ...]) -> SubArg:
    sub = _SUBARG_CACHE.get(key)
    if sub is None:
        channel, inst_id, inst_type, inst_family, ccy, extra_params = key
        assert channel is not None
        sub = SubArg(channel, inst_id, inst_type, inst_family, ccy, extra_params)
        if len(_SUBARG_CACHE) >= 50_000:
            _SUBARG_CACHE.clear()
        _SUBARG_CACHE[key] = sub
    return sub


def _push(frame: InboundFrame, msg: dict[str, object], arg: dict[str, object], channel: str) -> Normalized:
    extra: dict[str, str] = {}
    for key, value in arg.items():
        if key in _ARG_KEYS:
            if type(value) is not str:
                _wrong_type(f"arg.{key}", value, "a string")
        else:
            extra[f"arg.{key}"] = _json_text(value)
    if len(msg) != 2:
        extra.update(_extras(msg, _PUSH_KEYS_BY_CHANNEL.get(channel, _PUSH_KEYS), "push."))
    rows = msg["data"]
    if type(rows) is not list:
        _wrong_type("data", rows, "an array")
    sub = _sub_arg(arg)
    uid = arg.get("uid")
    ctx = _Ctx(channel=channel, conn=frame.conn, recv_seq=frame.recv_seq, recv_ts_ns=frame.recv_ts_ns,
               source=Source.WS, rid_prefix=f"{frame.conn}:{frame.recv_seq}:", inst_id=sub.inst_id,
               inst_type=sub.inst_type, uid=uid if type(uid) is str else None, extra=extra,
               check_inst_id=channel not in _MULTI_INSTRUMENT)
    if channel in _TRADE_CHANNELS:
        trades: list[Trade] = []
        refs: list[TradeRef] = []
        for i, row in enumerate(rows):
            try:
                record, ref = _trade(row, ctx, i)
            except _Invalid as exc:
                raise exc.under(f"data[{i}]") from None
            trades.append(record)
            refs.append(ref)
        return TradePush(arg=sub, records=tuple(trades), refs=tuple(refs))
    if channel in BOOK_CHANNELS:
        action = _book_action(msg, channel)
        books: list[BookUpdate] = []
        for i, row in enumerate(rows):
            try:
                books.append(_book(row, ctx, i, action))
            except _Invalid as exc:
                raise exc.under(f"data[{i}]") from None
        return BookPush(arg=sub, records=tuple(books))
    records: list[OkxRecord] = []
    handler = _ROW_HANDLERS.get(channel)
    for i, row in enumerate(rows):
        try:
            if handler is None:
                records.append(_candle(row, ctx, len(records)))
            else:
                records.extend(handler(row, ctx, len(records), msg))
        except _Invalid as exc:
            raise exc.under(f"data[{i}]") from None
    return RecordPush(arg=sub, records=tuple(records))


def _book_action(msg: Mapping[str, object], channel: str) -> BookAction:
    action = msg.get("action", _MISSING)
    if action is _MISSING:
        if channel in SNAPSHOT_BOOK_CHANNELS:
            return BookAction.SNAPSHOT
        _missing("action")
    if action == "snapshot":
        return BookAction.SNAPSHOT
    if action == "update":
        return BookAction.UPDATE
    if type(action) is str:
        raise _Invalid(DeadLetterReason.BAD_VALUE, "action", f"{_show(action)} is not snapshot or update")
    _wrong_type("action", action, "a string")


def _event(frame: InboundFrame, msg: dict[str, object]) -> OkxEvent | DeadLetter:
    """An event frame. OKX sends codes and counts as strings; numbers are accepted too, since losing a login
    error to a type quibble would be worse than reading "60009" from 60009."""
    try:
        event = msg["event"]
        if type(event) is not str:
            _wrong_type("event", event, "a string")
        text: dict[str, str | None] = {}
        for key in ("code", "msg", "connId", "id", "channel", "connCount"):
            value = msg.get(key)
            if value is None or type(value) is str:
                text[key] = value
            elif type(value) is int:
                text[key] = str(value)
            else:
                _wrong_type(key, value, "a string")
        arg = msg.get("arg")
        sub = None
        if arg is not None:
            if type(arg) is not dict or type(arg.get("channel")) is not str:
                _wrong_type("arg", arg, "an object with a channel")
            sub = _sub_arg(arg)
    except _Invalid as exc:
        return _dead(frame, exc.code, exc.reason, exc.path)
    return OkxEvent(event=event, code=text["code"], msg=text["msg"], okx_conn_id=text["connId"],
                    request_id=text["id"], arg=sub, channel=text["channel"] or (sub.channel if sub else None),
                    conn_count=text["connCount"], conn=frame.conn, recv_seq=frame.recv_seq,
                    recv_ts_ns=frame.recv_ts_ns)


def _dead(frame: InboundFrame, code: DeadLetterReason, reason: str, path: str | None = None,
          channel: str | None = None, inst_id: str | None = None) -> DeadLetter:
    if path and not reason.startswith(path):
        reason = f"{path}: {reason}"
    return DeadLetter(reason_code=code, reason=reason, path=path, raw=frame.data, source=Source.WS,
                      conn_id=frame.conn, name=frame.name, endpoint=str(frame.endpoint), recv_seq=frame.recv_seq,
                      recv_ts_ns=frame.recv_ts_ns, channel=channel, inst_id=inst_id,
                      record_id=f"{frame.conn}:{frame.recv_seq}:dlq")


def push_arg(data: bytes) -> SubArg | None:
    """The subscription arg of a push frame when it can be read (None otherwise): which stream a dead letter
    belongs to. Only called for dead letters, so it parses again rather than burden the normal path."""
    try:
        msg = _DECODER.decode(data)
    except (msgspec.DecodeError, UnicodeDecodeError, RecursionError):
        return None
    arg = msg.get("arg") if type(msg) is dict and "data" in msg else None
    if type(arg) is not dict or type(arg.get("channel")) is not str:
        return None
    return _sub_arg(arg)


def frame_dead_letter(frame: InboundFrame, code: DeadLetterReason, reason: str, *, channel: str | None = None,
                      inst_id: str | None = None) -> DeadLetter:
    """The dead letter of a frame that normalized but that the pipeline refuses (e.g. an unsubscribed arg)."""
    return _dead(frame, code, reason, None, channel, inst_id)


#: Most Avro bytes a RawFrameEntry adds besides its payload (two longs and a length, 10 + 10 + 5, rounded up).
RAW_ENTRY_OVERHEAD = 32


def raw_frames(frames: Iterable[InboundFrame], max_bytes: int) -> list[RawFrames]:
    """The okx.raw records of `frames`, each frame's bytes exactly as received.

    One record per connection (in order of first appearance), its frames in receive order, split where OKX's
    connId changes or where the frames would pass `max_bytes` (payload plus RAW_ENTRY_OVERHEAD each; a
    bigger frame gets a record alone). Per connection, the records hold its frames in order, each once.
    """
    runs: dict[str, list[list[InboundFrame]]] = {}
    sizes: dict[str, int] = {}
    for frame in frames:
        conn = frame.conn
        chunks = runs.get(conn)
        size = len(frame.data) + RAW_ENTRY_OVERHEAD
        if chunks is None:
            runs[conn] = [[frame]]
        else:
            last = chunks[-1]
            if last[-1].okx_conn_id == frame.okx_conn_id and sizes[conn] + size <= max_bytes:
                last.append(frame)
                sizes[conn] += size
                continue
            chunks.append([frame])
        sizes[conn] = size
    return [
        RawFrames(conn_id=chunk[0].conn, name=chunk[0].name, endpoint=str(chunk[0].endpoint),
                  okx_conn_id=chunk[0].okx_conn_id,
                  frames=tuple([RawFrameEntry(recv_seq=f.recv_seq, recv_ts_ns=f.recv_ts_ns, payload=f.data)
                                for f in chunk]))
        for chunks in runs.values() for chunk in chunks
    ]


# ---------------------------------------------------------------------------------------------- REST rows

T = TypeVar("T")


def _rest(channel: str, row: object, recv_ts_ns: int, build: Callable[[_Ctx], T], *,
          inst_id: str | None = None, multi: bool = True) -> T | DeadLetter:
    """Run one REST-row builder; a bad row becomes a DeadLetter holding the row as JSON."""
    ctx = _Ctx(channel=channel, conn=None, recv_seq=None, recv_ts_ns=recv_ts_ns, source=Source.REST,
               rid_prefix="", inst_id=inst_id, check_inst_id=not multi)
    try:
        return build(ctx)
    except _Invalid as exc:
        return _rest_dead(channel, row, recv_ts_ns, exc.code, exc.reason, exc.path or None, inst_id)
    except Exception as exc:  # same promise as normalize: the caller gets a dead letter, not a crash
        return _rest_dead(channel, row, recv_ts_ns, DeadLetterReason.INTERNAL_ERROR,
                          f"normalizer error {type(exc).__name__}: {exc}", None, inst_id)


def _rest_dead(channel: str, row: object, recv_ts_ns: int, code: DeadLetterReason, reason: str, path: str | None,
               inst_id: str | None) -> DeadLetter:
    try:
        raw = _JSON_TEXT.encode(row)
    except (TypeError, ValueError, OverflowError):
        raw = repr(row).encode()
    return DeadLetter(reason_code=code, reason=reason, path=path, raw=raw, source=Source.REST,
                      endpoint=None, recv_ts_ns=recv_ts_ns, channel=channel, inst_id=inst_id,
                      record_id=f"rest:{channel}:dlq:{zlib.crc32(raw):08x}:{recv_ts_ns}")


def _with_id(record: R, natural_id: str) -> R:
    return msgspec.structs.replace(record, record_id=f"rest:{record.channel}:{natural_id}")


def trade_from_rest(row: Mapping[str, object], *, recv_ts_ns: int, channel: str = "trades") -> Trade | DeadLetter:
    """A /market/trades or /market/history-trades row as the Trade the `channel` stream would carry
    (count and seqId null: REST rows are single trades). recordId: rest:{channel}:{instId}:{tradeId}."""
    def build(ctx: _Ctx) -> Trade:
        record, _ = _trade(row, ctx, 0)
        return _with_id(record, f"{record.inst_id}:{record.trade_id}")
    return _rest(channel, row, recv_ts_ns, build)


def candle_from_rest(row: Sequence[object], *, inst_id: str, channel: str, recv_ts_ns: int) -> Candle | DeadLetter:
    """A REST candles array ([ts, o, h, l, c, vol, volCcy, volCcyQuote, confirm]) as the Candle of `channel`
    (e.g. candle1m, mark-price-candle1H). recordId: rest:{channel}:{instId}:{ts}:{confirm}; an unconfirmed
    bar keeps changing, so backfill should publish confirmed bars only."""
    def build(ctx: _Ctx) -> Candle:
        record = _candle(list(row) if isinstance(row, tuple) else row, ctx, 0)
        confirm = "" if record.confirm is None else int(record.confirm)
        return _with_id(record, f"{record.inst_id}:{record.ts}:{confirm}")
    return _rest(channel, row, recv_ts_ns, build, inst_id=inst_id)


def book_from_rest(row: Mapping[str, object], *, inst_id: str, recv_ts_ns: int,
                   channel: str = "books") -> BookUpdate | DeadLetter:
    """A /market/books row as a snapshot BookUpdate of `channel`. recordId: rest:{channel}:{instId}:{ts}
    (:{seqId} when the row has one)."""
    def build(ctx: _Ctx) -> BookUpdate:
        record = _book(row, ctx, 0, BookAction.SNAPSHOT)
        seq = "" if record.seq_id is None else f":{record.seq_id}"
        return _with_id(record, f"{record.inst_id}:{record.ts}{seq}")
    return _rest(channel, row, recv_ts_ns, build, inst_id=inst_id)


#: /public/funding-rate-history rows: a settlement, its time as the record's ts, the realized rate as
#: settFundingRate (OKX docs: realizedRate is the actual funding rate of that settlement).
_FUNDING_SETTLEMENT = _Spec(FundingRate, {
    "method": S, "formulaType": S, "fundingTime": I, "fundingRate": D, "realizedRate": D},
    required=["fundingTime"], ts="fundingTime", renames={"realizedRate": "settFundingRate"})


def funding_rate_from_rest(row: Mapping[str, object], *, recv_ts_ns: int) -> FundingRate | DeadLetter:
    """A /public/funding-rate-history row as the FundingRate of the `funding-rate` stream at that settlement
    (ts = fundingTime, settState settled). recordId: rest:funding-rate:{instId}:{fundingTime}."""
    def build(ctx: _Ctx) -> FundingRate:
        record = _FUNDING_SETTLEMENT.build(row, ctx.common(0), ctx)
        assert isinstance(record, FundingRate)
        record = msgspec.structs.replace(record, sett_state="settled")
        return _with_id(record, f"{record.inst_id}:{record.funding_time}")
    return _rest("funding-rate", row, recv_ts_ns, build)


def fill_from_rest(row: Mapping[str, object], *, recv_ts_ns: int) -> Fill | DeadLetter:
    """A /trade/fills or /trade/fills-history row. recordId: rest:fills:{billId} (or {instId}:{tradeId}:{ordId})."""
    def build(ctx: _Ctx) -> Fill:
        record = _FILL.build(row, ctx.common(0), ctx)
        assert isinstance(record, Fill)
        natural = record.bill_id or f"{record.inst_id}:{record.trade_id}:{record.ord_id}"
        return _with_id(record, natural)
    return _rest("fills", row, recv_ts_ns, build)


def order_from_rest(row: Mapping[str, object], *, recv_ts_ns: int) -> Order | DeadLetter:
    """A /trade/orders-history(-archive) or /trade/order row. recordId: rest:orders:{ordId}:{uTime}."""
    def build(ctx: _Ctx) -> Order:
        record = _ORDER.build(row, ctx.common(0), ctx)
        assert isinstance(record, Order)
        return _with_id(record, f"{record.ord_id}:{record.u_time}")
    return _rest("orders", row, recv_ts_ns, build)


def algo_order_from_rest(row: Mapping[str, object], *, recv_ts_ns: int) -> AlgoOrder | DeadLetter:
    """A /trade/orders-algo-pending or -history row. recordId: rest:orders-algo:{algoId}:{uTime}."""
    def build(ctx: _Ctx) -> AlgoOrder:
        record = _ALGO_ORDER.build(row, ctx.common(0), ctx)
        assert isinstance(record, AlgoOrder)
        return _with_id(record, f"{record.algo_id}:{record.u_time}")
    return _rest("orders-algo", row, recv_ts_ns, build)


def position_from_rest(row: Mapping[str, object], *, recv_ts_ns: int) -> Position | DeadLetter:
    """A /account/positions row. A snapshot's mark-to-market values change without uTime changing, so each
    fetch is its own emission: recordId rest:positions:{posId}:{uTime}:{recvTsNs}."""
    def build(ctx: _Ctx) -> Position:
        record = _POSITION.build(row, ctx.common(0), ctx)
        assert isinstance(record, Position)
        return _with_id(record, f"{record.pos_id or record.inst_id}:{record.u_time}:{recv_ts_ns}")
    return _rest("positions", row, recv_ts_ns, build)


def balances_from_rest(row: Mapping[str, object], *, recv_ts_ns: int) -> tuple[Balance, ...] | DeadLetter:
    """A /account/balance row as the account channel would carry it: the totals record and one per currency.
    recordId: rest:account:{ccy or "account"}:{uTime}:{recvTsNs} (each fetch is its own emission)."""
    def build(ctx: _Ctx) -> tuple[Balance, ...]:
        records = _account(row, ctx, 0, {})
        out: list[Balance] = []
        for record in records:
            assert isinstance(record, Balance)
            out.append(_with_id(record, f"{record.ccy or 'account'}:{record.u_time}:{recv_ts_ns}"))
        return tuple(out)
    return _rest("account", row, recv_ts_ns, build)


def instrument_from_rest(row: Mapping[str, object], *, recv_ts_ns: int) -> Instrument | DeadLetter:
    """A /public/instruments row. recordId: rest:instruments:{instId}:{recvTsNs}."""
    def build(ctx: _Ctx) -> Instrument:
        record = _INSTRUMENT.build(row, ctx.common(0), ctx)
        assert isinstance(record, Instrument)
        return _with_id(record, f"{record.inst_id}:{recv_ts_ns}")
    return _rest("instruments", row, recv_ts_ns, build)
