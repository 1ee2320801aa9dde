"""Output formats of a replay: JSONL, the flat row schema (CSV, Parquet, Arrow batches) and hftbacktest's npz.

JSONL: one object per item, `type` (`trade`, `book_change`, `book_snapshot`, `ticker`, ..., `gap`), `channel`,
`instId`, `ts` (exchange ms; a gap's position) and the record's Avro fields, decimals as exact strings.

Flat rows (CSV, Parquet, `.batches()`): one schema for every item, one row per trade, per book level
(book_change and book_snapshot), per gap and per other record; fields without a column go to `extra` (JSON).

hftbacktest: its 8-field event array (`ev, exch_ts, local_ts, px, qty, order_id, ival, fval`), ns timestamps,
EXCH|LOCAL events; a snapshot, checkpoint or full-depth initial book is DEPTH_CLEAR (both sides) then
DEPTH_SNAPSHOT levels, an update DEPTH levels, a trade TRADE with BUY/SELL (the taker side), a gap that
interrupts a book DEPTH_CLEAR of both sides; top-N book snapshots are left out (they would truncate the book).
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO, Any

import msgspec
import numpy as np
import orjson
import pyarrow as pa
import pyarrow.parquet as pq

from ingest.core.records import BookUpdate, GapEvent, OkxRecord, Record, Trade
from ingest.core.replay import FULL_DEPTH, BookSnapshot, Item, gap_position_ts
from ingest.okx.channels import BOOK_CHANNELS

_TYPE_NAMES = {
    "Trade": "trade", "BookUpdate": "book_change", "Ticker": "ticker", "Candle": "candle",
    "MarkPrice": "mark_price", "IndexTicker": "index_ticker", "FundingRate": "funding_rate",
    "OpenInterest": "open_interest", "Liquidation": "liquidation", "PriceLimit": "price_limit",
    "Instrument": "instrument", "Order": "order", "Fill": "fill", "Position": "position", "Balance": "balance",
    "AlgoOrder": "algo_order", "GapEvent": "gap", "BookSnapshot": "book_snapshot",
}


def item_type(item: Item | Record) -> str:
    """The `type` of an item in every format."""
    name = type(item).__name__
    return _TYPE_NAMES.get(name, name.lower())


def item_ts(item: Item) -> int:
    """The exchange ms an item sorts at (a gap's position)."""
    return gap_position_ts(item) if isinstance(item, GapEvent) else item.ts


def item_object(item: Item) -> dict[str, Any]:
    """The JSONL object of an item: type, channel, instId, ts first, then its fields (Avro names)."""
    head: dict[str, Any] = {"type": item_type(item), "channel": item.channel, "instId": item.inst_id,
                            "ts": item_ts(item)}
    if isinstance(item, BookSnapshot):
        head.update(seqId=item.seq_id, depth=item.depth, bids=[list(lv) for lv in item.bids],
                    asks=[list(lv) for lv in item.asks])
        return head
    body = msgspec.to_builtins(item)
    for key in ("channel", "instId", "ts"):
        body.pop(key, None)
    head.update(body)
    return head


def jsonl_lines(items: Iterable[Item]) -> Iterator[bytes]:
    """One JSON object per item and line; deterministic (fixed key order), so equal runs are byte-identical."""
    dumps = orjson.dumps
    for item in items:
        yield dumps(item_object(item)) + b"\n"


# ----------------------------------------------------------------------------------------------- flat rows

FLAT_SCHEMA = pa.schema([
    pa.field("type", pa.string(), nullable=False),
    pa.field("channel", pa.string()),
    pa.field("instId", pa.string()),
    pa.field("ts", pa.int64(), nullable=False),
    pa.field("recvTsNs", pa.int64()),
    pa.field("source", pa.string()),
    pa.field("action", pa.string()),
    pa.field("seqId", pa.int64()),
    pa.field("prevSeqId", pa.int64()),
    pa.field("id", pa.string()),
    pa.field("side", pa.string()),
    pa.field("level", pa.int32()),
    pa.field("px", pa.string()),
    pa.field("sz", pa.string()),
    pa.field("extra", pa.string()),
], metadata={b"okx.replay.rows": b"1"})
FLAT_COLUMNS = tuple(FLAT_SCHEMA.names)
Row = tuple[Any, ...]

_COMMON = ("exchange", "channel", "instId", "instType", "ts", "recvTsNs", "source", "connId", "recvSeq", "recordId")


def _extra(body: dict[str, Any], drop: Iterable[str]) -> str | None:
    for key in drop:
        body.pop(key, None)
    for key in _COMMON:
        body.pop(key, None)
    return orjson.dumps(body).decode() if body else None


def flat_rows(item: Item) -> Iterator[Row]:
    """The rows of one item in FLAT_COLUMNS order."""
    kind = item_type(item)
    if isinstance(item, BookSnapshot):
        for side, levels in (("bid", item.bids), ("ask", item.asks)):
            for i, (px, sz) in enumerate(levels):
                yield (kind, item.channel, item.inst_id, item.ts, None, None, None, item.seq_id, None, None, side, i,
                       px, sz, None)
        if not item.bids and not item.asks:
            yield (kind, item.channel, item.inst_id, item.ts, None, None, None, item.seq_id, None, None, None, None,
                   None, None, None)
        return
    if isinstance(item, GapEvent):
        body = msgspec.to_builtins(item)
        yield (kind, item.channel, item.inst_id, gap_position_ts(item), None, None, str(item.status), None, None,
               item.gap_id, None, None, None, None, _extra(body, ("gapId", "status")))
        return
    rec: OkxRecord = item
    head = (kind, rec.channel, rec.inst_id, rec.ts, rec.recv_ts_ns, str(rec.source))
    if isinstance(rec, BookUpdate):
        extra = None if rec.checksum is None else orjson.dumps({"checksum": rec.checksum}).decode()
        n = 0
        for side, book_levels in (("bid", rec.bids), ("ask", rec.asks)):
            for i, lv in enumerate(book_levels):
                yield (*head, str(rec.action), rec.seq_id, rec.prev_seq_id, rec.record_id, side, i, lv[0], lv[1],
                       extra)
                n += 1
        if n == 0:
            yield (*head, str(rec.action), rec.seq_id, rec.prev_seq_id, rec.record_id, None, None, None, None, extra)
        return
    body = msgspec.to_builtins(rec)
    if isinstance(rec, Trade):
        yield (*head, None, rec.seq_id, None, rec.trade_id, rec.side, None, rec.px, rec.sz,
               _extra(body, ("tradeId", "side", "px", "sz", "seqId")))
        return
    yield (*head, None, None, None, rec.record_id, None, None, None, None, _extra(body, ()))


def arrow_batches(items: Iterator[Item], batch_size: int = 65_536) -> Iterator[pa.RecordBatch]:
    """The flat rows of `items` as record batches of at most `batch_size` rows."""
    rows: list[Row] = []
    for item in items:
        rows.extend(flat_rows(item))
        if len(rows) >= batch_size:
            yield _batch(rows)
            rows = []
    if rows:
        yield _batch(rows)


def _batch(rows: list[Row]) -> pa.RecordBatch:
    columns = list(zip(*rows, strict=True))
    return pa.RecordBatch.from_arrays([pa.array(col, type=f.type) for col, f in zip(columns, FLAT_SCHEMA, strict=True)],
                                      schema=FLAT_SCHEMA)


def write_csv(items: Iterable[Item], out: IO[str]) -> None:
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(FLAT_COLUMNS)
    for item in items:
        writer.writerows(flat_rows(item))


def write_parquet(items: Iterator[Item], path: Path | IO[bytes]) -> None:
    with pq.ParquetWriter(path, FLAT_SCHEMA, compression="zstd") as writer:
        for batch in arrow_batches(items):
            writer.write_batch(batch)


# ------------------------------------------------------------------------------------------------ hftbacktest

#: hftbacktest's event flags (hftbacktest/src/types.rs), repeated so exporting needs no hftbacktest install.
DEPTH_EVENT, TRADE_EVENT, DEPTH_CLEAR_EVENT, DEPTH_SNAPSHOT_EVENT = 1, 2, 3, 4
BUY_EVENT, SELL_EVENT = 1 << 29, 1 << 28
EXCH_EVENT, LOCAL_EVENT = 1 << 31, 1 << 30
HFT_DTYPE = np.dtype({"names": ["ev", "exch_ts", "local_ts", "px", "qty", "order_id", "ival", "fval"],
                      "formats": ["<u8", "<i8", "<i8", "<f8", "<f8", "<u8", "<i8", "<f8"],
                      "offsets": [0, 8, 16, 24, 32, 40, 48, 56], "itemsize": 64, "aligned": True})
_BOTH = EXCH_EVENT | LOCAL_EVENT


def hftbacktest_events(items: Iterable[Item]) -> np.ndarray[Any, np.dtype[Any]]:
    """The events of one instrument's items (books of one depth channel and its trades).

    Local time is the receive time; snapshots computed by replay (no receive time) use the exchange time.
    Both flags are set on every event, as hftbacktest's own converters do for recorded feeds.
    """
    rows: list[tuple[int, int, int, float, float, int, int, float]] = []
    for item in items:
        if isinstance(item, BookSnapshot):
            if item.depth >= FULL_DEPTH:  # a top-N snapshot is not the whole book: it would truncate it
                t = item.ts * 1_000_000
                _book_rows(rows, t, t, item.bids, item.asks, True)
        elif isinstance(item, BookUpdate):
            exch = item.ts * 1_000_000
            full = str(item.action) in ("snapshot", "checkpoint")
            _book_rows(rows, exch, max(item.recv_ts_ns, exch), item.bids, item.asks, full)
        elif isinstance(item, Trade):
            exch = item.ts * 1_000_000
            side = BUY_EVENT if item.side == "buy" else SELL_EVENT
            rows.append((TRADE_EVENT | _BOTH | side, exch, max(item.recv_ts_ns, exch), float(item.px),
                         float(item.sz), 0, 0, 0.0))
        elif isinstance(item, GapEvent) and item.channel in BOOK_CHANNELS:
            t = gap_position_ts(item) * 1_000_000
            rows.append((DEPTH_CLEAR_EVENT | _BOTH, t, t, 0.0, 0.0, 0, 0, 0.0))  # no side: both sides
    return np.array(rows, dtype=HFT_DTYPE)


def _book_rows(rows: list[tuple[int, int, int, float, float, int, int, float]], exch: int, local: int,
               bids: Iterable[tuple[str, ...]], asks: Iterable[tuple[str, ...]], full: bool) -> None:
    bids, asks = list(bids), list(asks)
    if full:
        # Snapshots and checkpoints here are whole books: a DEPTH_CLEAR without a side clears both sides.
        rows.append((DEPTH_CLEAR_EVENT | _BOTH, exch, local, 0.0, 0.0, 0, 0, 0.0))
    ev = DEPTH_SNAPSHOT_EVENT if full else DEPTH_EVENT
    for side, levels in ((BUY_EVENT, bids), (SELL_EVENT, asks)):
        for lv in levels:
            rows.append((ev | _BOTH | side, exch, local, float(lv[0]), float(lv[1]), 0, 0, 0.0))


def write_hftbacktest(items: Iterable[Item], out: Path | IO[bytes]) -> int:
    """Write `np.savez_compressed(out, data=events)`, hftbacktest's npz layout; returns the event count."""
    events = hftbacktest_events(items)
    buf: Path | IO[bytes] = out
    if not isinstance(out, Path):
        buf = io.BytesIO()
    np.savez_compressed(buf, data=events)
    if isinstance(buf, io.BytesIO) and not isinstance(out, Path):
        out.write(buf.getvalue())
    return len(events)
