"""The msgspec fast paths of trades, books and tickers, most of the traffic."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Annotated, Any, Protocol, TypeVar, cast

import msgspec

from ingest.core.events import InboundFrame
from ingest.core.normalize.checks import (
    _D,
    _EPOCH_MS,
    _INT64_MAX,
    _INT64_MIN,
    _LEVELS_MATCH,
    _POSITIVE,
    R,
)
from ingest.core.normalize.reference import (
    _TRADE_CHANNELS,
    _cached_sub_arg,
)
from ingest.core.normalize.results import BookPush, RecordPush, TradePush, TradeRef
from ingest.core.records import (
    BookAction,
    BookLevel,
    BookUpdate,
    OkxRecord,
    Source,
    Ticker,
    Trade,
)
from ingest.okx.channels import BOOK_CHANNELS, SNAPSHOT_BOOK_CHANNELS, SubArg

# Trades, books and tickers are most of the traffic. Their frames are decoded straight into typed Structs (msgspec
# checks the types, the required fields and the 4-string levels in C), checked with one regex per row or book side,
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


_Text = str | msgspec.UnsetType


class _FastTicker(msgspec.Struct, forbid_unknown_fields=True, gc=False):
    instId: str
    ts: str
    instType: _Text = _UNSET
    last: _Text = _UNSET
    lastSz: _Text = _UNSET
    askPx: _Text = _UNSET
    askSz: _Text = _UNSET
    bidPx: _Text = _UNSET
    bidSz: _Text = _UNSET
    open24h: _Text = _UNSET
    high24h: _Text = _UNSET
    low24h: _Text = _UNSET
    volCcy24h: _Text = _UNSET
    vol24h: _Text = _UNSET
    sodUtc0: _Text = _UNSET
    sodUtc8: _Text = _UNSET


class _FastTickers(msgspec.Struct, forbid_unknown_fields=True, gc=False):
    arg: _FastArg
    data: list[_FastTicker]


class _FastPush(Protocol):
    """What the fast paths' push Structs share: the arg, read to gate the channel before any row."""

    @property
    def arg(self) -> _FastArg: ...


P = TypeVar("P", bound=_FastPush)
_TICKER_CHANNELS = frozenset({"tickers"})
_TRADES_DECODER = msgspec.json.Decoder(_FastTrades)
_TICKERS_DECODER = msgspec.json.Decoder(_FastTickers)
# The decimals of one ticker row ("" allowed: none of them is required) joined by "|", one regex per count of
# present fields: a "|" inside a value adds a separator, so it cannot pass.
_TICKER_DECIMALS = [re.compile("").fullmatch] + [
    re.compile(rf"(?:{_D})?(?:\|(?:{_D})?){{{n - 1}}}").fullmatch for n in range(1, 14)]
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
        elif cls is Ticker:
            template = Ticker(channel=channel, inst_id=inst_id, ts=0, recv_ts_ns=0, source=Source.WS, record_id="")
        else:
            template = BookUpdate(channel=channel, inst_id=inst_id, ts=0, recv_ts_ns=0, source=Source.WS,
                                  record_id="", action=BookAction.SNAPSHOT, asks=(), bids=())
        cached = _TEMPLATES[(channel, inst_id)] = (template, _cached_sub_arg((channel, inst_id, None, None, None,
                                                                              None)))
    return cast(R, cached[0]), cached[1]


def _decode(decoder: msgspec.json.Decoder[P], frame: InboundFrame, channels: frozenset[str]) -> P | None:
    """The frame as its channel's fast Struct, or None (not that shape, or another channel) for the generic
    path to decide. One gate for the three paths; it runs once per frame, never per field."""
    try:
        push = decoder.decode(frame.data)
    except (msgspec.DecodeError, UnicodeDecodeError):
        return None
    return push if push.arg.channel in channels else None


def _fast_trades(frame: InboundFrame) -> TradePush | None:
    push = _decode(_TRADES_DECODER, frame, _TRADE_CHANNELS)
    if push is None:
        return None
    channel = push.arg.channel
    inst_id = push.arg.instId
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
    push = _decode(_BOOKS_DECODER, frame, BOOK_CHANNELS)
    if push is None:
        return None
    channel = push.arg.channel
    inst_id = push.arg.instId
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


def _fast_tickers(frame: InboundFrame) -> RecordPush | None:
    push = _decode(_TICKERS_DECODER, frame, _TICKER_CHANNELS)
    if push is None:
        return None
    channel = push.arg.channel
    inst_id = push.arg.instId
    template, sub = _template(Ticker, channel, inst_id)
    replace = msgspec.structs.replace
    prefix = f"{frame.conn}:{frame.recv_seq}:"
    records: list[OkxRecord] = []
    for i, row in enumerate(push.data):
        values = (row.last, row.lastSz, row.askPx, row.askSz, row.bidPx, row.bidSz, row.open24h, row.high24h,
                  row.low24h, row.volCcy24h, row.vol24h, row.sodUtc0, row.sodUtc8)
        present = [v for v in values if v is not _UNSET]
        if row.instId != inst_id or _EPOCH_MS(row.ts) is None \
                or _TICKER_DECIMALS[len(present)]("|".join(present)) is None:
            return None
        last, last_sz, ask_px, ask_sz, bid_px, bid_sz, open24h, high24h, low24h, vol_ccy24h, vol24h, sod0, sod8 = (
            None if v is _UNSET else v for v in values)
        records.append(replace(template, ts=int(row.ts), recv_ts_ns=frame.recv_ts_ns, conn_id=frame.conn,
                               recv_seq=frame.recv_seq, record_id=f"{prefix}{i}",
                               inst_type=None if row.instType is _UNSET else row.instType, last=last,
                               last_sz=last_sz, ask_px=ask_px, ask_sz=ask_sz, bid_px=bid_px, bid_sz=bid_sz,
                               open24h=open24h, high24h=high24h, low24h=low24h, vol_ccy24h=vol_ccy24h,
                               vol24h=vol24h, sod_utc0=sod0, sod_utc8=sod8, extra={}))
    return RecordPush(arg=sub, records=tuple(records))


_FAST_PATHS: dict[bytes, Callable[[InboundFrame], TradePush | BookPush | RecordPush | None]] = {
    **{c.encode(): _fast_trades for c in _TRADE_CHANNELS},
    **{c.encode(): _fast_books for c in BOOK_CHANNELS},
    b"tickers": _fast_tickers,
}
_FAST_PREFIX = b'{"arg":{"channel":"'

