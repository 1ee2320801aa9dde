"""What `normalize` returns for a frame: records of one push, an OKX event, or (from core.records) a dead letter."""

from __future__ import annotations

import enum

import msgspec

from ingest.core.records import (
    BookUpdate,
    DeadLetter,
    OkxRecord,
    Trade,
)
from ingest.okx.channels import SubArg


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
