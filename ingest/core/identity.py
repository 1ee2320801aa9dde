"""The natural event key: which exchange event a record is, whoever recorded it and however (ws or rest).

`recordId` names one emission (a connection's frame, a REST fetch), so two replicas, the two connections of a
hand-over, or a backfill that re-fetches what the stream had give the same exchange event different recordIds.
The event key is built from what the exchange said only (ids, sequence numbers, exchange times, values), never
from our connection, receive time or fetch, so every copy of one event carries the same key and a consumer,
the archive or replay keeps one (docs/RECORDS.md, "Event keys", spells the key of every channel).

Rules, per record type (`{channel}` is the record's channel, which the REST version of a row shares):

- Trade: `{channel}:{instId}:{tradeId}`, and `:{count}` when `trades` aggregated more than one match under its
  last tradeId (an aggregate is another event than the single REST row of that id).
- BookUpdate: `{channel}:{instId}:{seqId}` for an update, `:{seqId}:snapshot` and `:{seqId}:checkpoint` for
  the full-book records (a snapshot at seqId N is not the update N), `:{seqId}:heartbeat:{ts}` for OKX's
  no-change update (empty, prevSeqId == seqId, which repeats the previous update's seqId). Books without a
  seqId (before 2023) are `{channel}:{instId}:ts{ts}:{action}:{digest of the levels}`.
- Candle: `{channel}:{instId}:{ts}:confirmed` for the final bar; an unconfirmed bar is pushed again and again
  with the same ts, so `{channel}:{instId}:{ts}:{digest of o/h/l/c/vol...}`.
- Tickers, mark prices, index tickers, open interest, price limits: `{channel}:{instId}:{ts}`; funding rates
  add `:{fundingTime}` (a REST settlement row has ts = fundingTime); a liquidation detail adds its side,
  posSide, bkPx and sz.
- Instrument (its ts is our receive time): `{channel}:{instId}:{digest of the definition}`.
- Order: `{channel}:{ordId}:{uTime}:{state}:{tradeId}:{px}:{sz}` (OKX's uTime plus what separates two
  updates of one millisecond: a fill's tradeId, an amend's px/sz); AlgoOrder `{channel}:{algoId}:{uTime}:{state}`.
- Fill: `{channel}:{instId}:{tradeId}:{ordId}` (`:{count}` for an aggregated one).
- Position, Balance (values move without uTime moving): `{channel}:{posId|instId or ccy|account}:{uTime}:{digest}`.
- GapEvent: `gaps:{gapId}:{revision}`; DeadLetter: `dlq:{digest of raw}`; RawFrames have none (a batch of
  one connection's frames is not an exchange event).

Decimal text in a key or a digest is canonical (`"1.50"` -> `"1.5"`), so a record read back from the archive's
decimal columns gives the key of the record Kafka carried. Pure: no I/O, no clock.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable
from decimal import Decimal, InvalidOperation
from typing import Any, cast

import msgspec

from ingest.core.records import (
    AlgoOrder,
    Balance,
    BookAction,
    BookLevel,
    BookUpdate,
    Candle,
    DeadLetter,
    Fill,
    FundingRate,
    GapEvent,
    IndexTicker,
    Instrument,
    Liquidation,
    MarkPrice,
    OpenInterest,
    Order,
    Position,
    PriceLimit,
    Record,
    Ticker,
    Trade,
)

__all__ = ["EVENT_KEY_HEADER", "canonical_number", "event_key", "has_event_key", "record_event_key"]

#: The Kafka header that carries the key (the same text as the `eventKey` field).
EVENT_KEY_HEADER = "event_key"

#: Fields of an OKX record that say who recorded it and how, not what the exchange said.
_LOCAL_FIELDS = frozenset({
    "exchange", "channel", "inst_id", "inst_type", "ts", "recv_ts_ns", "source", "conn_id", "recv_seq", "record_id",
    "extra", "event_key",
})


def canonical_number(text: str) -> str:
    """Decimal text without trailing zeros after the point or an exponent (`"1.50"` -> `"1.5"`, `"0.0"` -> `"0"`);
    any other text as it is. The archive renders decimals this way, so keys survive a round trip through it."""
    if "e" in text or "E" in text:
        try:
            value = Decimal(text)
        except InvalidOperation:
            return text
        if not value.is_finite():
            return text
        text = format(value, "f")
    if "." in text:
        head, _, tail = text.partition(".")
        if head.lstrip("-").isdigit() and (tail.isdigit() or not tail):
            text = text.rstrip("0").rstrip(".")
            if text in ("", "-", "-0"):
                return "0"
    return text


def _digest(parts: Iterable[object]) -> str:
    """16 hex digits naming a tuple of values (0x1f-separated text; None distinct from "")."""
    text = "\x1f".join("\x00" if p is None else canonical_number(p) if isinstance(p, str) else str(p) for p in parts)
    return hashlib.blake2b(text.encode(), digest_size=8).hexdigest()


def _count_suffix(count: str | None) -> str:
    if count is None or count in ("", "1"):
        return ""
    return f":{count}"


def _trade(rec: Trade) -> str:
    count = rec.count  # _count_suffix, inlined: replay computes this key for every trade written without one
    if count is None or count == "" or count == "1":
        return f"{rec.channel}:{rec.inst_id}:{rec.trade_id}"
    return f"{rec.channel}:{rec.inst_id}:{rec.trade_id}:{count}"


def _levels_digest(asks: tuple[BookLevel, ...], bids: tuple[BookLevel, ...]) -> str:
    return _digest(("a", *(x for lv in asks for x in lv[:2]), "b", *(x for lv in bids for x in lv[:2])))


def _book(rec: BookUpdate) -> str:
    seq = rec.seq_id
    action = rec.action
    if seq is None:
        return f"{rec.channel}:{rec.inst_id}:ts{rec.ts}:{action}:{_levels_digest(rec.asks, rec.bids)}"
    if action is BookAction.UPDATE:
        if rec.prev_seq_id == seq and not rec.asks and not rec.bids:
            return f"{rec.channel}:{rec.inst_id}:{seq}:heartbeat:{rec.ts}"
        return f"{rec.channel}:{rec.inst_id}:{seq}"
    return f"{rec.channel}:{rec.inst_id}:{seq}:{action}"


def _candle(rec: Candle) -> str:
    if rec.confirm:
        return f"{rec.channel}:{rec.inst_id}:{rec.ts}:confirmed"
    values = _digest((rec.bar, rec.o, rec.h, rec.l, rec.c, rec.vol, rec.vol_ccy, rec.vol_ccy_quote))
    return f"{rec.channel}:{rec.inst_id}:{rec.ts}:{values}"


def _at_ts(rec: Ticker | MarkPrice | IndexTicker | OpenInterest | PriceLimit) -> str:
    return f"{rec.channel}:{rec.inst_id}:{rec.ts}"


def _funding(rec: FundingRate) -> str:
    return f"{rec.channel}:{rec.inst_id}:{rec.ts}:{rec.funding_time or ''}"


def _liquidation(rec: Liquidation) -> str:
    return (f"{rec.channel}:{rec.inst_id}:{rec.ts}:{rec.side}:{rec.pos_side or ''}:{canonical_number(rec.bk_px)}:"
            f"{canonical_number(rec.sz)}")


_FIELD_NAMES: dict[type[Record], tuple[str, ...]] = {}


def _content_digest(rec: Record) -> str:
    """A digest of every field the exchange sent (not the recorder's: connection, receive time, recordId)."""
    cls = type(rec)
    names = _FIELD_NAMES.get(cls)
    if names is None:
        names = _FIELD_NAMES[cls] = tuple(
            f.name for f in msgspec.structs.fields(cls) if f.name not in _LOCAL_FIELDS)
    return _digest(getattr(rec, name) for name in names)


def _instrument(rec: Instrument) -> str:
    return f"{rec.channel}:{rec.inst_id}:{_content_digest(rec)}"


def _order(rec: Order) -> str:
    return (f"{rec.channel}:{rec.ord_id}:{rec.u_time}:{rec.state or ''}:{rec.trade_id or ''}:"
            f"{canonical_number(rec.px or '')}:{canonical_number(rec.sz or '')}")


def _algo_order(rec: AlgoOrder) -> str:
    return f"{rec.channel}:{rec.algo_id}:{rec.u_time}:{rec.state or ''}"


def _fill(rec: Fill) -> str:
    return f"{rec.channel}:{rec.inst_id}:{rec.trade_id}:{rec.ord_id}{_count_suffix(rec.count)}"


def _position(rec: Position) -> str:
    return f"{rec.channel}:{rec.pos_id or rec.inst_id}:{rec.u_time}:{_content_digest(rec)}"


def _balance(rec: Balance) -> str:
    return f"{rec.channel}:{rec.ccy or 'account'}:{rec.u_time}:{_content_digest(rec)}"


def _gap(rec: GapEvent) -> str:
    return f"gaps:{rec.gap_id}:{rec.revision}"


def _dead_letter(rec: DeadLetter) -> str:
    return f"dlq:{hashlib.blake2b(rec.raw, digest_size=8).hexdigest()}"


_KEYS: dict[type[Record], Callable[[Any], str]] = {
    Trade: _trade, BookUpdate: _book, Candle: _candle, Ticker: _at_ts, MarkPrice: _at_ts, IndexTicker: _at_ts,
    OpenInterest: _at_ts, PriceLimit: _at_ts, FundingRate: _funding, Liquidation: _liquidation,
    Instrument: _instrument, Order: _order, AlgoOrder: _algo_order, Fill: _fill, Position: _position,
    Balance: _balance, GapEvent: _gap, DeadLetter: _dead_letter,
}


def has_event_key(cls: type[Record]) -> bool:
    """Whether records of `cls` carry an event key (every type but the raw frames)."""
    return cls in _KEYS


def event_key_function(cls: type[Record]) -> Callable[[Any], str]:
    """The event key function of a keyed type (`has_event_key`), for callers that compute many keys of it."""
    return _KEYS[cls]


def event_key(record: Record) -> str | None:
    """The natural event key computed from `record`'s fields (module docstring); None for raw frames."""
    key = _KEYS.get(type(record))
    return None if key is None else key(record)


def record_event_key(record: Record) -> str | None:
    """The key a record carries (`eventKey`), or the computed one for records written before the field."""
    stored = cast("str | None", getattr(record, "event_key", None))
    return stored if stored is not None else event_key(record)
