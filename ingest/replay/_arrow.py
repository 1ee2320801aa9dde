"""`.batches()` straight from the archive's columns, for trades and books: no record is ever built.

The item path decodes every record into a Struct (`archive_schema.table_records`): Python objects per record
and level (docs/PERFORMANCE.md, "Replay"). Here the same flat rows (ingest/replay/formats.py) come from Arrow
compute: filter by window, channel and view, dedupe by recordId and event key (first in the order wins, as in
`core/replay.py`), canonical decimal text, one sort over (ts, recvTsNs, topic, partition, offset, level). Gap
items are few and come from the item path's own rendering. Used when the replay asks for nothing the item path
alone computes (no book snapshots, no initial books) and reads only trades and books; tests prove the output
equals the item path's.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from decimal import Decimal
from typing import NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ingest.core.records import GapEvent, GapStatus, TopicKind
from ingest.core.replay import Entry, View
from ingest.replay._archive import ArchiveSource
from ingest.replay.formats import FLAT_SCHEMA, flat_rows


class SliceCount(NamedTuple):
    """What a time slice holds as the item path counts it (`Replay.stats`): records and gaps, not rows."""

    items: int
    gaps: int
    first_ts: int | None
    last_ts: int | None


#: Told each slice's count as it is given (before its batches are yielded).
OnCount = Callable[[SliceCount], None] | None

FAST_KINDS = frozenset({TopicKind.TRADES, TopicKind.BOOKS})
#: Rows per time slice of the window (a slice is sorted and deduped whole in Arrow, then streamed out).
SLICE_TARGET_ROWS = 1_000_000
_SORT = ["_sts", "_srecv", "_topic", "_partition", "_offset", "_row"]


#: Below this magnitude Arrow renders a decimal with an exponent ("1.0000000000E-8"), like Java's BigDecimal.
_PLAIN_FROM = Decimal("0.000001")


def _canonical(arr: pa.ChunkedArray) -> pa.ChunkedArray:
    """archive_schema.render_decimal, vectorized: a decimal128(38, 18) casts to text with all 18 fractional
    digits ("100.500000000000000000"), so trimming zeros then the point is exact; zero casts as "0E-18".

    Values below 1e-6 (a size of 0.00000001 BTC, a meme coin's price) cast with an exponent: they are rendered
    as 1 + |value| instead ("1.000000010000000000", plain and exact: 18 digits fit the scale), whose leading
    "1" becomes "0" (and "-0" for a negative value). No Python per value: a whole column may be this small."""
    text = arr.cast(pa.string())
    magnitude = pc.abs(arr)
    small = pc.fill_null(pc.less(magnitude, pa.scalar(_PLAIN_FROM, arr.type)), False)
    if pc.any(small).as_py():
        # Outside `small` the value is replaced by 0 so the narrower type (2 integer digits) always fits.
        tiny = pc.if_else(small, magnitude, pa.scalar(Decimal(0), arr.type)).cast(pa.decimal128(20, 18))
        shifted = pc.add(tiny, pa.scalar(Decimal(1), pa.decimal128(1, 0))).cast(pa.string())
        sign = pc.if_else(pc.less(arr, pa.scalar(Decimal(0), arr.type)), "-", "")
        plain = pc.binary_join_element_wise(sign, "0", pc.utf8_slice_codeunits(shifted, 1), "")
        text = pc.if_else(small, plain, text)
    text = pc.utf8_rtrim(pc.utf8_rtrim(text, characters="0"), characters=".")
    return pc.if_else(pc.equal(arr, pa.scalar(0, arr.type)), "0", text)


def _json_str(arr: pa.ChunkedArray) -> pa.ChunkedArray:
    """JSON text of a string column (null -> null); the caller checks there is nothing to escape."""
    quoted = pc.binary_join_element_wise(pa.scalar('"'), arr.cast(pa.string()), pa.scalar('"'), "")
    return pc.fill_null(quoted, "null")


def _dedupe(table: pa.Table, keys: list[str]) -> pa.Table:
    """Keep the first row (lowest `_idx`) of each group of `keys` (rows already in the total order)."""
    firsts = table.group_by(keys, use_threads=False).aggregate([("_idx", "min")]).column("_idx_min")
    return table.filter(pc.is_in(table.column("_idx"), value_set=firsts))


def _read(src: ArchiveSource, kind: TopicKind, lo: int, hi: int, instruments: frozenset[str] | None,
          channels: frozenset[str] | None, view: View) -> pa.Table | None:
    tables = []
    for path in src._files(kind, lambda d: d >= _date(lo) and d <= _date(hi - 1), instruments):
        t = src.window_table(path, kind, lo, hi)
        if t is not None and t.num_rows:
            tables.append(t)
    if not tables:
        return None
    table = pa.concat_tables(tables, promote_options="default")
    if channels is not None:
        table = table.filter(pc.is_in(table.column("channel"), value_set=pa.array(sorted(channels))))
    if view is View.RECORDED:
        table = table.filter(pc.equal(table.column("source"), "ws"))
    return table


def _date(ms: int) -> str:
    import datetime as dt

    return dt.datetime.fromtimestamp(ms / 1000, tz=dt.UTC).date().isoformat()


def _common(table: pa.Table, kind_name: str) -> dict[str, pa.ChunkedArray | pa.Array]:
    n = table.num_rows
    return {
        "type": pa.array([kind_name] * n, pa.string()) if n else pa.array([], pa.string()),
        "channel": table.column("channel"), "instId": table.column("instId"),
        "ts": table.column("ts").cast(pa.int64()), "recvTsNs": table.column("recvTsNs").cast(pa.int64()),
        "source": table.column("source"),
    }


def _trades(table: pa.Table) -> pa.Table | None:
    for name in ("count", "okxSource", "eventKey"):
        col = table.column(name)
        if pc.any(pc.match_substring_regex(pc.fill_null(col, ""), r'["\\\x00-\x1f]')).as_py():
            return None  # text JSON must escape: leave it to the item path
    if _has_extra(table):
        return None
    cols = _common(table, "trade")
    n = table.num_rows
    extra = pc.binary_join_element_wise('{"count":', _json_str(table.column("count")), ',"okxSource":',
                                        _json_str(table.column("okxSource")), ',"extra":{},"eventKey":',
                                        _json_str(table.column("eventKey")), "}", "")
    out = pa.table({
        **cols, "action": pa.nulls(n, pa.string()), "seqId": table.column("seqId"),
        "prevSeqId": pa.nulls(n, pa.int64()), "id": table.column("tradeId"), "side": table.column("side"),
        "level": pa.nulls(n, pa.int32()), "px": _canonical(table.column("px")), "sz": _canonical(table.column("sz")),
        "extra": extra,
        "_sts": cols["ts"], "_srecv": cols["recvTsNs"],
        "_topic": table.column("_topic"), "_partition": table.column("_partition"),
        "_offset": table.column("_offset"), "_row": pa.array(np.zeros(n, np.int64)),
        "_rid": table.column("recordId"), "_nk": _trade_keys(table),
    })
    return out


def _trade_keys(table: pa.Table) -> pa.ChunkedArray:
    """The event key of each trade row: the stored one, else core/identity.py's rule (records written before
    the field), `{channel}:{instId}:{tradeId}` and `:{count}` for an aggregate of more than one match."""
    count = table.column("count")
    suffix = pc.if_else(pc.or_kleene(pc.is_null(count), pc.is_in(count, value_set=pa.array(["", "1"]))), "",
                        pc.binary_join_element_wise(":", count, ""))
    computed = pc.binary_join_element_wise(table.column("channel"), ":", table.column("instId"), ":",
                                           table.column("tradeId"), suffix, "")
    return pc.coalesce(table.column("eventKey"), computed)


def _book_keys(table: pa.Table) -> pa.ChunkedArray | None:
    """The event key of each book row (core/identity.py's rule where none is stored), or None when a row has
    no seqId (pre-2023 books are keyed by a digest of their levels: the item path computes those)."""
    seq = table.column("seqId")
    stored = table.column("eventKey")
    if pc.any(pc.and_(pc.is_null(stored), pc.is_null(seq))).as_py():
        return None
    action = table.column("action")
    head = pc.binary_join_element_wise(table.column("channel"), ":", table.column("instId"), ":",
                                       seq.cast(pa.string()), "")
    # OKX's no-change update repeats the previous seqId and has no levels (its one row has no side).
    heartbeat = pc.fill_null(pc.and_(pc.and_(pc.equal(action, "update"), pc.equal(table.column("prevSeqId"), seq)),
                                     pc.is_null(table.column("side"))), False)
    ts = table.column("ts").cast(pa.int64()).cast(pa.string())
    computed = pc.if_else(
        pc.equal(action, "update"),
        pc.if_else(heartbeat, pc.binary_join_element_wise(head, ":heartbeat:", ts, ""), head),
        pc.binary_join_element_wise(head, ":", action, ""))
    return pc.coalesce(stored, computed)


def _has_extra(table: pa.Table) -> bool:
    # A map array's offsets say how many pairs each row has: any pair at all means some row has extras.
    return any(len(chunk.keys) for chunk in table.column("extra").chunks)


def _books(table: pa.Table) -> pa.Table | None:
    if _has_extra(table):
        return None
    n = table.num_rows
    side = table.column("side")
    # Rows of one record are contiguous (asks, then bids); the item path lists bids first, each side in order.
    offsets = np.asarray(table.column("_offset").cast(pa.int64()))
    parts = np.asarray(table.column("_partition").cast(pa.int64()))
    side_code = np.asarray(pc.fill_null(pc.if_else(pc.equal(side, "ask"), 1, 0), 0).cast(pa.int64()))
    key = np.stack([parts, offsets, side_code])
    starts = np.ones(n, bool)
    if n > 1:
        starts[1:] = np.any(key[:, 1:] != key[:, :-1], axis=0)
    idx = np.arange(n)
    run_start = np.maximum.accumulate(np.where(starts, idx, 0))
    level = idx - run_start
    level_col = pa.array(level.astype(np.int32))
    level_col = pc.if_else(pc.is_null(side), pa.nulls(n, pa.int32()), level_col)
    keys = _book_keys(table)
    if keys is None:
        return None
    checksum = table.column("checksum")
    extra = pc.binary_join_element_wise('{"checksum":', checksum.cast(pa.string()), "}", "")
    action = table.column("action")
    common = _common(table, "book_change")
    out = pa.table({
        **common, "_sts": common["ts"], "_srecv": common["recvTsNs"], "action": action, "seqId": table.column("seqId"),
        "prevSeqId": table.column("prevSeqId"), "id": table.column("recordId"), "side": pc.if_else(
            pc.equal(side, "ask"), "ask", pc.if_else(pc.equal(side, "bid"), "bid", pa.nulls(n, pa.string()))),
        "level": level_col, "px": _canonical(table.column("px")), "sz": _canonical(table.column("sz")),
        "extra": extra,
        "_topic": table.column("_topic"), "_partition": table.column("_partition"),
        "_offset": table.column("_offset"), "_row": pa.array(side_code * 1_000_000 + level),
        "_rid": table.column("recordId"),
        "_nk": keys,
    })
    return out


def _slice(src: ArchiveSource, kinds: tuple[TopicKind, ...], start: int, end: int, view: View,
           instruments: frozenset[str] | None, channels: frozenset[str] | None,
           gaps: list[Entry], count: OnCount = None) -> pa.Table | None:
    """The flat rows of [start, end) in order, or None when this path cannot give exactly the item path's rows;
    `count` is told what they hold as items."""
    parts = []
    for kind in kinds:
        table = _read(src, kind, start, end, instruments, channels, view)
        if table is None:
            continue
        flat = _trades(table) if kind is TopicKind.TRADES else _books(table)
        if flat is None:
            return None
        parts.append(flat)
    gap_rows = []
    for (ts, recv, topic, part, off), gap in gaps:
        assert isinstance(gap, GapEvent)
        if view is View.REPAIRED and gap.status is GapStatus.FILLED:
            continue
        for row in flat_rows(gap):
            gap_rows.append((*row, ts, recv, topic, part, off, 0, f"gap:{gap.gap_id}", None))
    if gap_rows:
        cols = list(zip(*gap_rows, strict=True))
        names = [*FLAT_SCHEMA.names, "_sts", "_srecv", "_topic", "_partition", "_offset", "_row", "_rid", "_nk"]
        kinds_of = {f.name: f.type for f in FLAT_SCHEMA}
        parts.append(pa.table({name: pa.array(col, type=kinds_of.get(name)) for name, col in
                               zip(names, cols, strict=True)}))
    if not parts:
        return FLAT_SCHEMA.empty_table()
    types = {f.name: f.type for f in FLAT_SCHEMA}
    types.update({"_sts": pa.int64(), "_srecv": pa.int64(), "_topic": pa.string(), "_partition": pa.int64(),
                  "_offset": pa.int64(), "_row": pa.int64(),
                  "_rid": pa.string(), "_nk": pa.string()})
    parts = [p.select(list(types)).cast(pa.schema([pa.field(k, v) for k, v in types.items()])) for p in parts]
    table = pa.concat_tables(parts).sort_by([(c, "ascending") for c in _SORT])
    table = table.append_column("_idx", pa.array(np.arange(table.num_rows)))
    table = _dedupe_records(table)
    if count is not None and table.num_rows:
        # An item is a record (its level rows share its coordinates and are contiguous in the order) or a gap
        # (its own row, never deduped: one revision per gap): count where the coordinates change.
        coord = table.column("_coord").to_numpy()
        ts = table.column("ts")
        count(SliceCount(int(np.count_nonzero(coord[1:] != coord[:-1])) + 1, len(gap_rows), ts[0].as_py(),
                         ts[-1].as_py()))
    out: pa.Table = table.select(FLAT_SCHEMA.names).cast(FLAT_SCHEMA)
    return out


def fast_batches(src: ArchiveSource, kinds: tuple[TopicKind, ...], start: int, end: int, view: View,
                 instruments: frozenset[str] | None, channels: frozenset[str] | None,
                 gaps: Callable[[], list[Entry]], batch_size: int,
                 items_from: Callable[[int], Iterator[pa.RecordBatch]] | None = None, count: OnCount = None,
                 ) -> Iterator[pa.RecordBatch] | None:
    """The flat batches of the window, one time slice at a time; None when this path cannot give exactly the
    item path's rows for the first slice. A later slice it cannot give continues with `items_from(slice start)`
    (the item path from there, without the gaps already given). `count` is told each slice's items, gaps and
    time span as the item path counts them (`Replay.stats`), before the slice's batches are yielded.

    Slices are independent: the order is by ts first and dedupe never looks across two exchange ts, so cutting
    at ts boundaries changes nothing. Each slice holds about `SLICE_TARGET_ROWS` rows (estimated from the row
    groups' statistics), so memory stays flat however long the window."""
    kinds = tuple(k for k in kinds if k in src.kinds())  # datasets the archive does not have add nothing
    if not set(kinds) <= FAST_KINDS:
        return None
    rows = sum(src.window_rows(kind, start, end, instruments) for kind in kinds)
    width = max(1, -(-(end - start) * SLICE_TARGET_ROWS // max(rows, 1)))
    bounds = [*range(start, end, width), end]
    all_gaps = gaps()  # after the listing: missing files are gaps too
    first = _slice(src, kinds, bounds[0], bounds[1], view, instruments, channels,
                   [g for g in all_gaps if g[0][0] < bounds[1]], count)
    if first is None:
        return None

    def run(first: pa.Table) -> Iterator[pa.RecordBatch]:
        yield from first.to_batches(max_chunksize=batch_size)
        for lo, hi in itertools.pairwise(bounds[1:]):
            flat = _slice(src, kinds, lo, hi, view, instruments, channels,
                          [g for g in all_gaps if lo <= g[0][0] < hi], count)
            if flat is None:
                if items_from is None:
                    raise ValueError(f"the columns path cannot give the rows from ts {lo} on, and has no item path")
                yield from items_from(lo)
                return
            yield from flat.to_batches(max_chunksize=batch_size)

    return run(first)


def _dedupe_records(table: pa.Table) -> pa.Table:
    """Whole records (all their level rows) that repeat an earlier one's recordId or event key at the same
    exchange ts are dropped, in both views (as core/replay.py does)."""
    # One int64 per record: topic number, partition, offset (offsets stay far below 2**40).
    topics = pc.unique(table.column("_topic"))
    coord = pc.add(pc.add(pc.multiply(pc.index_in(table.column("_topic"), value_set=topics).cast(pa.int64()),
                                      1 << 56),
                          pc.multiply(table.column("_partition"), 1 << 40)), table.column("_offset"))
    table = table.append_column("_coord", coord)
    heads = _dedupe(table, ["_coord"])  # one row per record: its first in the order
    keep = _dedupe(heads, ["ts", "_rid"])
    # Gap rows have no event key: their own coordinates keep them apart.
    ek = pc.binary_join_element_wise(keep.column("type"), pc.fill_null(keep.column("_nk"),
                                     keep.column("_coord").cast(pa.string())), "|")
    keep = _dedupe(keep.append_column("_ekey", ek), ["ts", "_ekey"])
    survivors = pc.is_in(table.column("_coord"), value_set=keep.column("_coord"))
    return table.filter(survivors)
