"""REST rows -> records of exactly the same schema and key as the stream's, with `source="rest"` and
`recordId = rest:{channel}:{natural id}`."""

from __future__ import annotations

import zlib
from collections.abc import Callable, Mapping, Sequence
from typing import TypeVar

import msgspec

from ingest.core.normalize.checks import (
    _JSON_TEXT,
    R,
    _Ctx,
    _Invalid,
)
from ingest.core.normalize.reference import (
    _account,
    _book,
    _candle,
    _trade,
)
from ingest.core.normalize.specs import (
    _ALGO_ORDER,
    _FILL,
    _FUNDING_SETTLEMENT,
    _INSTRUMENT,
    _ORDER,
    _POSITION,
)
from ingest.core.records import (
    AlgoOrder,
    Balance,
    BookAction,
    BookUpdate,
    Candle,
    DeadLetter,
    DeadLetterReason,
    Fill,
    FundingRate,
    Instrument,
    Order,
    Position,
    Source,
    Trade,
)

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
