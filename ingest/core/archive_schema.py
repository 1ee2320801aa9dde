"""Records <-> Arrow tables for the Parquet archive: one schema per topic kind, exact decimals, Kafka coordinates.

Pure (no I/O, no clock): the archive service writes what `convert` returns and the replay source reads files
back through `table_to_records`, so both sides share one mapping (docs/ARCHIVE.md documents the columns).

- Columns are the Avro field names, in Avro order, then the Kafka coordinates `_topic`, `_partition`, `_offset`,
  `_kafka_ts` (and `_empty`, below). `ts` is `timestamp[ms, UTC]`, every `...TsNs` field `timestamp[ns, UTC]`.
- Decimal strings (every field the normalizer checks as a decimal) are `decimal128(38, 18)`: exact for every
  real OKX value we hold (tests/unit/test_archive_schema.py goes over all of shared/okx/frames). A value that
  needs more digits does not fit and is rejected with its reason, never rounded.
- OKX's `""` ("no value") and a missing value are both null in a decimal column; `_empty` lists the decimal
  fields that were `""`, so the reversal gives back the record exactly (decimals rendered canonically: no
  exponent, no trailing zeros after the point).
- Books are one row per level change (`side`, `px`, `sz`, `liqOrders`, `numOrders`) with `isSnapshot`; a book
  record without levels is one row with null level columns. Rows of one record are contiguous and share
  `_offset`.
"""

from __future__ import annotations

import datetime as dt
import decimal
import enum
import functools
import keyword
import re
import types
import typing
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from decimal import Decimal
from typing import Any, NamedTuple
from urllib.parse import quote, unquote

import msgspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ingest.core.normalize import checks as _checks
from ingest.core.normalize import specs as _specs
from ingest.core.records import (
    RECORD_TYPES,
    BookAction,
    BookLevel,
    BookUpdate,
    Candle,
    RawFrameEntry,
    Record,
    StreamPosition,
    TopicKind,
    Trade,
)

#: Bumped when a column changes in a way readers must know about (docs/ARCHIVE.md, "schema changes").
SCHEMA_VERSION = 1
#: Precision and scale of every decimal column: 20 integer and 18 fractional digits.
DECIMAL_PRECISION, DECIMAL_SCALE = 38, 18
DECIMAL = pa.decimal128(DECIMAL_PRECISION, DECIMAL_SCALE)
TS_MS = pa.timestamp("ms", tz="UTC")
TS_NS = pa.timestamp("ns", tz="UTC")
#: Partition value for records without an instrument (balances totals, gaps of a channel, dead letters...).
NO_INST_ID = "_none_"
#: Schema metadata keys: which kind of records a file holds and the layout version.
META_KIND = b"okx.archive.kind"
META_VERSION = b"okx.archive.version"
COORDINATE_COLUMNS = ("_topic", "_partition", "_offset", "_kafka_ts")
EMPTY_COLUMN = "_empty"
BOOK_LEVEL_COLUMNS = ("side", "px", "sz", "liqOrders", "numOrders")

RECORD_TYPE_BY_KIND: dict[TopicKind, type[Record]] = {cls.TOPIC: cls for cls in RECORD_TYPES}

_EMPTY_LIST = pa.list_(pa.string())
_COORDINATE_FIELDS = (
    pa.field("_topic", pa.string(), nullable=False), pa.field("_partition", pa.int32(), nullable=False),
    pa.field("_offset", pa.int64(), nullable=False), pa.field("_kafka_ts", pa.timestamp("ms", tz="UTC"),
                                                               nullable=False),
)


class Coordinates(NamedTuple):
    """Where a record sits in Kafka: the identity that names archive files and makes rewrites idempotent."""

    topic: str
    partition: int
    offset: int
    kafka_ts_ms: int


class Rejected(NamedTuple):
    """A record that does not fit its columns, kept (with why) for the `_rejected` dataset."""

    index: int  # type: ignore[assignment]  # tuple.index: the name is the clearest for a position
    field: str
    reason: str


class Converted(NamedTuple):
    """The table of the records that fit, and the ones that did not (by index into the input)."""

    table: pa.Table
    rejected: list[Rejected]


class PartitionKey(NamedTuple):
    """One directory of the archive: dataset, UTC date of the exchange time, instrument."""

    dataset: str
    date: str
    inst_id: str

    def path(self) -> str:
        """`trades/date=2026-12-01/instId=BTC-USDT`, the value percent-encoded where a path needs it."""
        return f"{self.dataset}/date={self.date}/instId={quote(self.inst_id, safe='-_.@')}"


# ----------------------------------------------------------------------------------------------- field kinds


def _decimal_fields() -> dict[type[Record], frozenset[str]]:
    """Avro names of the decimal-string fields of each record type, taken from the normalizer's own field
    specs (so a field it starts checking as a decimal becomes a decimal column) plus its hand-written paths."""
    found: dict[type[Record], set[str]] = {cls: set() for cls in RECORD_TYPES}
    for value in vars(_specs).values():
        if isinstance(value, _checks._Spec):
            names = {f.name: f.encode_name for f in msgspec.structs.fields(value.cls)}
            found[value.cls] |= {names[attr] for attr, kind in value.fields.values() if kind is _checks.D}
    found[Trade] |= {"px", "sz"}
    found[Candle] |= {"o", "h", "l", "c", "vol", "volCcy", "volCcyQuote"}
    return {cls: frozenset(names) for cls, names in found.items()}


DECIMAL_FIELDS = _decimal_fields()


class _Col(enum.Enum):
    STR = "string"
    DEC = "decimal"
    INT = "int64"
    BOOL = "bool"
    TS_MS = "timestamp ms"
    TS_NS = "timestamp ns"
    MAP = "map"
    BYTES = "binary"
    POSITION = "stream position"
    FRAMES = "raw frames"


_POSITION_TYPE = pa.struct([pa.field("ts", pa.int64()), pa.field("tradeId", pa.int64()), pa.field("seqId", pa.int64())])
_FRAMES_TYPE = pa.list_(pa.struct([pa.field("recvSeq", pa.int64(), nullable=False),
                                   pa.field("recvTsNs", pa.int64(), nullable=False),
                                   pa.field("payload", pa.binary(), nullable=False)]))
_ARROW: dict[_Col, pa.DataType] = {
    _Col.STR: pa.string(), _Col.DEC: DECIMAL, _Col.INT: pa.int64(), _Col.BOOL: pa.bool_(), _Col.TS_MS: TS_MS,
    _Col.TS_NS: TS_NS, _Col.MAP: pa.map_(pa.string(), pa.string()), _Col.BYTES: pa.binary(),
    _Col.POSITION: _POSITION_TYPE, _Col.FRAMES: _FRAMES_TYPE,
}


class _Field(NamedTuple):
    attr: str
    name: str
    col: _Col
    nullable: bool
    enum_type: type[enum.Enum] | None


def _col_of(cls: type[Record], name: str, hint: Any) -> tuple[_Col, bool, type[enum.Enum] | None]:
    args = typing.get_args(hint)
    nullable = (typing.get_origin(hint) in (typing.Union, types.UnionType)) and type(None) in args
    if nullable:
        (hint,) = [a for a in args if a is not type(None)]
    if name == "ts":
        return _Col.TS_MS, nullable, None
    if name.endswith("TsNs"):
        return _Col.TS_NS, nullable, None
    if hint is str:
        return (_Col.DEC if name in DECIMAL_FIELDS[cls] else _Col.STR), nullable, None
    if hint is bool:
        return _Col.BOOL, nullable, None
    if hint is int:
        return _Col.INT, nullable, None
    if hint is bytes:
        return _Col.BYTES, nullable, None
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        return _Col.STR, nullable, hint
    if hint is StreamPosition:
        return _Col.POSITION, nullable, None
    if typing.get_origin(hint) is dict:
        return _Col.MAP, nullable, None
    if typing.get_origin(hint) is tuple and cls.TOPIC is TopicKind.RAW:
        return _Col.FRAMES, nullable, None
    raise TypeError(f"{cls.__name__}.{name}: no archive column for {hint!r}")


def _fields(cls: type[Record]) -> tuple[_Field, ...]:
    out = []
    for f in msgspec.structs.fields(cls):
        if cls is BookUpdate and f.name in ("asks", "bids"):
            continue
        col, nullable, enum_type = _col_of(cls, f.encode_name, f.type)
        out.append(_Field(f.name, f.encode_name, col, nullable, enum_type))
    return tuple(out)


_FIELDS: dict[type[Record], tuple[_Field, ...]] = {cls: _fields(cls) for cls in RECORD_TYPES}
#: Where each of `_FIELDS` sits in `msgspec.structs.astuple` of a record.
_POSITIONS: dict[type[Record], tuple[int, ...]] = {
    cls: tuple([f.name for f in msgspec.structs.fields(cls)].index(fd.attr) for fd in _FIELDS[cls])
    for cls in RECORD_TYPES}
_DATASET: dict[type[Record], str] = {cls: cls.TOPIC.value for cls in RECORD_TYPES}
_BOOK_LEVEL_FIELDS = (
    pa.field("side", pa.string()), pa.field("px", DECIMAL), pa.field("sz", DECIMAL), pa.field("liqOrders", pa.string()),
    pa.field("numOrders", pa.int64()), pa.field("isSnapshot", pa.bool_(), nullable=False),
)


def arrow_schema(kind: TopicKind) -> pa.Schema:
    """The Arrow schema of the files of one dataset (the topic kind's value), with kind and version metadata."""
    cls = RECORD_TYPE_BY_KIND[kind]
    fields: list[pa.Field] = []
    for f in _FIELDS[cls]:
        fields.append(pa.field(f.name, _ARROW[f.col], nullable=f.nullable or f.col is _Col.DEC))
        if cls is BookUpdate and f.name == "action":
            fields.extend(_BOOK_LEVEL_FIELDS)
    fields.extend(_COORDINATE_FIELDS)
    fields.append(pa.field(EMPTY_COLUMN, _EMPTY_LIST))
    return pa.schema(fields, metadata={META_KIND: kind.value.encode(), META_VERSION: str(SCHEMA_VERSION).encode()})


# ------------------------------------------------------------------------------------------------ decimals

_CANONICAL_ZERO = Decimal(0)
_DEC_CONTEXT = decimal.Context(prec=DECIMAL_PRECISION + 2)
_LIMIT = Decimal(10) ** (DECIMAL_PRECISION - DECIMAL_SCALE)


def decimal_fit_error(text: str) -> str | None:
    """Why `text` cannot be stored exactly in `decimal128(38, 18)`, or None when it can."""
    try:
        value = Decimal(text)
    except decimal.InvalidOperation:
        return f"{text!r} is not a decimal"
    if not value.is_finite():
        return f"{text!r} is not finite"
    exponent = value.as_tuple().exponent
    assert isinstance(exponent, int)
    if exponent < -DECIMAL_SCALE and value != value.quantize(Decimal(1).scaleb(-DECIMAL_SCALE), context=_DEC_CONTEXT):
        return f"{text!r} has more than {DECIMAL_SCALE} digits after the point"
    if abs(value) >= _LIMIT:
        return f"{text!r} has more than {DECIMAL_PRECISION - DECIMAL_SCALE} digits before the point"
    return None


def render_decimal(value: Decimal) -> str:
    """The canonical text of a decimal: plain notation, no trailing zeros after the point, `0` for zero."""
    if value == _CANONICAL_ZERO:
        return "0"
    text = format(value, "f")
    if "." in text:
        text = text.rstrip("0").rstrip(".")
    return text


# ------------------------------------------------------------------------------------------- records -> table


def partition_key(record: Record, kafka_ts_ms: int) -> PartitionKey:
    """The directory a record belongs in: UTC date of its exchange time (`ts`; records without one use the
    Kafka timestamp) and its instrument (`_none_` without one)."""
    ts = getattr(record, "ts", None)
    dataset = _DATASET.get(type(record)) or record.TOPIC.value
    return partition_key_of(dataset, ts if isinstance(ts, int) else None, getattr(record, "inst_id", None),
                            kafka_ts_ms)


def partition_key_of(dataset: str, ts: int | None, inst_id: str | None, kafka_ts_ms: int) -> PartitionKey:
    """`partition_key` from the fields it reads (the archiver's bulk path has no record object)."""
    ms = ts if ts is not None else kafka_ts_ms
    return PartitionKey(dataset, _date_of_hour(ms // 3_600_000), inst_id or NO_INST_ID)


@functools.lru_cache(maxsize=4096)
def _date_of_hour(hour: int) -> str:
    """The UTC date of an epoch hour (UTC days are whole hours), cached: the archiver asks once per record."""
    return dt.datetime.fromtimestamp(hour * 3600, tz=dt.UTC).date().isoformat()


def file_name(topic: str, partition: int, first_offset: int, last_offset: int) -> str:
    """A file's name from its Kafka coordinates, so redoing the same work rewrites the same object."""
    return f"{topic}+{partition}+{first_offset:020d}+{last_offset:020d}.parquet"


_FILE_NAME = re.compile(r"(?P<topic>.+)\+(?P<partition>[0-9]+)\+(?P<first>[0-9]{20})\+(?P<last>[0-9]{20})\.parquet")


class FileCoordinates(NamedTuple):
    topic: str
    partition: int
    first_offset: int
    last_offset: int


def parse_file_name(name: str) -> FileCoordinates | None:
    """The coordinates in an archive file name; None for any other name (temporary files, manifests)."""
    m = _FILE_NAME.fullmatch(name)
    if m is None:
        return None
    return FileCoordinates(m["topic"], int(m["partition"]), int(m["first"]), int(m["last"]))


def parse_partition_path(path: str) -> PartitionKey | None:
    """`trades/date=2026-12-01/instId=BTC-USDT` (relative to the root) -> its key."""
    parts = path.strip("/").split("/")
    if len(parts) < 3 or not parts[-2].startswith("date=") or not parts[-1].startswith("instId="):
        return None
    return PartitionKey(parts[-3], parts[-2][5:], unquote(parts[-1][7:]))


def _dec_column(values: list[str | None], empties: list[list[str] | None], name: str,
                rejected: dict[int, Rejected]) -> pa.Array:
    """A decimal column from OKX strings; "" becomes null (noted in `_empty`); unfit values are rejected."""
    texts: list[str | None] = []
    for i, v in enumerate(values):
        if v == "":
            lst = empties[i]
            if lst is None:
                empties[i] = [name]
            else:
                lst.append(name)
            texts.append(None)
        else:
            texts.append(v)
    arr = pa.array(texts, pa.string())
    try:
        return pc.cast(arr, DECIMAL)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        pass
    for i, v in enumerate(texts):  # the slow path names each value that does not fit
        if v is not None:
            err = decimal_fit_error(v)
            if err is not None:
                rejected.setdefault(i, Rejected(i, name, err))
                texts[i] = None
    return pc.cast(pa.array(texts, pa.string()), DECIMAL)


def _int_column(values: Sequence[int | None], name: str, rejected: dict[int, Rejected]) -> pa.Array:
    try:
        return pa.array(values, pa.int64())
    except (OverflowError, pa.ArrowInvalid):
        out: list[int | None] = []
        for i, v in enumerate(values):
            if v is not None and not -(1 << 63) <= v < (1 << 63):
                rejected.setdefault(i, Rejected(i, name, f"{v} does not fit a 64-bit integer"))
                v = None
            out.append(v)
        return pa.array(out, pa.int64())


def _column(f: _Field, values: list[Any], empties: list[list[str] | None], rejected: dict[int, Rejected]) -> pa.Array:
    col = f.col
    if col is _Col.DEC:
        return _dec_column(values, empties, f.name, rejected)
    if col is _Col.INT or col is _Col.TS_MS or col is _Col.TS_NS:
        ints = _int_column(values, f.name, rejected)
        return ints if col is _Col.INT else ints.cast(_ARROW[col])
    if col is _Col.MAP:
        return pa.array([None if v is None else list(v.items()) for v in values], _ARROW[col])
    if col is _Col.POSITION:
        return pa.array([None if v is None else {"ts": v.ts, "tradeId": v.trade_id, "seqId": v.seq_id}
                         for v in values], _POSITION_TYPE)
    if col is _Col.FRAMES:
        return pa.array([[{"recvSeq": e.recv_seq, "recvTsNs": e.recv_ts_ns, "payload": e.payload} for e in v]
                         for v in values], _FRAMES_TYPE)
    if f.enum_type is not None:
        return pa.array([None if v is None else v.value for v in values], pa.string())
    return pa.array(values, _ARROW[col])


def _book_rows(records: Sequence[BookUpdate], coords: Sequence[Coordinates]
               ) -> tuple[list[int], dict[str, list[Any]]]:
    """Explode book records into one row per level: row -> index of its record, and the level columns."""
    owner: list[int] = []
    side: list[str | None] = []
    px: list[str | None] = []
    sz: list[str | None] = []
    liq: list[str | None] = []
    num: list[str | None] = []
    snap: list[bool] = []
    for i, rec in enumerate(records):
        is_snapshot = rec.action is not BookAction.UPDATE
        if not rec.asks and not rec.bids:
            owner.append(i)
            side.append(None)
            px.append(None)
            sz.append(None)
            liq.append(None)
            num.append(None)
            snap.append(is_snapshot)
            continue
        for name, levels in (("ask", rec.asks), ("bid", rec.bids)):
            for level in levels:
                owner.append(i)
                side.append(name)
                px.append(level[0])
                sz.append(level[1])
                liq.append(level[2])
                num.append(level[3])
                snap.append(is_snapshot)
    return owner, {"side": side, "px": px, "sz": sz, "liqOrders": liq, "numOrders": num, "isSnapshot": snap}


def convert(kind: TopicKind, records: Sequence[Record], coords: Sequence[Coordinates]) -> Converted:
    """The table of `records` (all of `kind`, in Kafka order) and the records that do not fit a column.

    Rejection is per record: a book record with one unfit level is rejected whole, so no record is ever split.
    """
    cls = RECORD_TYPE_BY_KIND[kind]
    if len(records) != len(coords):
        raise ValueError("records and coords differ in length")
    for rec in records:
        if type(rec) is not cls:
            raise TypeError(f"a {type(rec).__name__} is not a {kind.value} record")
    rejected: dict[int, Rejected] = {}
    n = len(records)
    owner: list[int] | None = None
    level_cols: dict[str, list[Any]] = {}
    if cls is BookUpdate:
        owner, level_cols = _book_rows(typing.cast(Sequence[BookUpdate], records), coords)
    empties: list[list[str] | None] = [None] * n
    arrays: dict[str, pa.Array] = {}
    # One C call per record (astuple) and one transposition, instead of a getattr per field and record.
    columns = list(zip(*map(msgspec.structs.astuple, records), strict=True)) if n else []
    schema = arrow_schema(kind)
    for f, pos in zip(_FIELDS[cls], _POSITIONS[cls], strict=True):
        arr = arrays[f.name] = _column(f, list(columns[pos]) if n else [], empties, rejected)
        if arr.null_count and not schema.field(f.name).nullable:  # a hand-built record (`ts=None`): not castable
            for i in pc.indices_nonzero(arr.is_null()).to_pylist():
                rejected.setdefault(i, Rejected(i, f.name, "no value, and the column requires one"))
    arrays["_topic"] = pa.array([c.topic for c in coords], pa.string())
    arrays["_partition"] = pa.array([c.partition for c in coords], pa.int32())
    arrays["_offset"] = pa.array([c.offset for c in coords], pa.int64())
    arrays["_kafka_ts"] = pa.array([c.kafka_ts_ms for c in coords], pa.int64()).cast(TS_MS)
    record_table = pa.table(arrays)
    if owner is not None:
        record_table = record_table.take(pa.array(owner, pa.int64()))
        level_rejected: dict[int, Rejected] = {}
        levels = {
            "side": pa.array(level_cols["side"], pa.string()),
            "px": _dec_column(level_cols["px"], [None] * len(owner), "px", level_rejected),
            "sz": _dec_column(level_cols["sz"], [None] * len(owner), "sz", level_rejected),
            "liqOrders": pa.array(level_cols["liqOrders"], pa.string()),
            "numOrders": _order_counts(level_cols["numOrders"], level_rejected),
            "isSnapshot": pa.array(level_cols["isSnapshot"], pa.bool_()),
        }
        for row, rej in level_rejected.items():
            rejected.setdefault(owner[row], Rejected(owner[row], rej.field, rej.reason))
        for name, arr in levels.items():
            record_table = record_table.append_column(name, arr)
        empty_col = pa.array([empties[i] for i in owner], _EMPTY_LIST)
    else:
        empty_col = pa.array(empties, _EMPTY_LIST)
    record_table = record_table.append_column(EMPTY_COLUMN, empty_col)
    if rejected:
        bad = pa.array(sorted(rejected), pa.int64())
        row_owner = pa.array(owner, pa.int64()) if owner is not None else pa.array(range(n), pa.int64())
        record_table = record_table.filter(pc.invert(pc.is_in(row_owner, value_set=bad)))
    table = record_table.select(schema.names).cast(schema)
    return Converted(table, [rejected[i] for i in sorted(rejected)])


def _order_counts(values: list[str | None], rejected: dict[int, Rejected]) -> pa.Array:
    """numOrders as integers; a count whose text would not come back the same (`"01"`) does not fit."""
    out: list[int | None] = []
    for i, v in enumerate(values):
        if v is None:
            out.append(None)
            continue
        n = int(v) if v.isdigit() else None
        if n is None or str(n) != v or n >= 1 << 63:
            rejected.setdefault(i, Rejected(i, "numOrders", f"{v!r} is not a canonical order count"))
            out.append(None)
        else:
            out.append(n)
    return pa.array(out, pa.int64())


#: Column kinds `convert_columns` builds from decoded columns (a dataset with any other keeps the record path).
_COLUMNAR = frozenset({_Col.STR, _Col.DEC, _Col.INT, _Col.TS_MS, _Col.TS_NS, _Col.MAP})


def columnar(kind: TopicKind) -> bool:
    """Whether `convert_columns` can build this dataset's files (flat records: no book levels, no raw frames)."""
    cls = RECORD_TYPE_BY_KIND[kind]
    return cls is not BookUpdate and all(f.col in _COLUMNAR for f in _FIELDS[cls])


def convert_columns(kind: TopicKind, decoded: pa.Table, coords: Sequence[Coordinates]) -> pa.Table | None:
    """`convert` from the records' decoded columns (core/avro_batch.py: Avro field names, maps as lists of
    {key, value}), for the archiver's bulk path: the same table `convert` makes of the same records, or None
    where that needs the record path (a value that does not fit its column, a missing required value), which
    then decides, record by record, with its rejections."""
    cls = RECORD_TYPE_BY_KIND[kind]
    n = decoded.num_rows
    if n != len(coords) or not columnar(kind):
        return None
    schema = arrow_schema(kind)
    arrays: dict[str, pa.Array | pa.ChunkedArray] = {}
    empty_rows: dict[str, Any] = {}
    try:
        for f in _FIELDS[cls]:
            col = decoded.column(f.name)
            if f.col is _Col.DEC:
                blank = pc.fill_null(pc.equal(col, ""), False)
                if pc.any(blank).as_py():
                    empty_rows[f.name] = blank
                    col = pc.if_else(blank, pa.scalar(None, col.type), col)
                arr = pc.cast(col, DECIMAL)
            elif f.col is _Col.MAP:
                lists = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
                lists = lists.cast(pa.list_(pa.struct([("key", pa.string()), ("value", pa.string())])))
                if lists.null_count:
                    return None
                flat = lists.flatten()
                arr = pa.MapArray.from_arrays(lists.offsets, flat.field("key"), flat.field("value"))
            elif f.col is _Col.STR and f.enum_type is not None:
                arr = pc.cast(col, pa.string())  # an enum arrives as a dictionary of its symbols
            else:
                arr = col if f.col is _Col.STR or f.col is _Col.INT else pc.cast(col, _ARROW[f.col])
            if arr.null_count and not schema.field(f.name).nullable:
                return None
            arrays[f.name] = arr
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError, KeyError):
        return None
    arrays["_topic"] = pa.array([c.topic for c in coords], pa.string())
    arrays["_partition"] = pa.array([c.partition for c in coords], pa.int32())
    arrays["_offset"] = pa.array([c.offset for c in coords], pa.int64())
    arrays["_kafka_ts"] = pa.array([c.kafka_ts_ms for c in coords], pa.int64()).cast(TS_MS)
    if empty_rows:  # "" in a decimal column: null there, its name in `_empty` (in field order, as `convert`)
        masks = {name: m.to_pylist() for name, m in empty_rows.items()}
        empties = [[name for name, m in masks.items() if m[i]] or None for i in range(n)]
        arrays[EMPTY_COLUMN] = pa.array(empties, _EMPTY_LIST)
    else:
        arrays[EMPTY_COLUMN] = pa.nulls(n, _EMPTY_LIST)
    out: pa.Table = pa.table(arrays).select(schema.names).cast(schema)
    return out


def records_to_table(kind: TopicKind, records: Sequence[Record], coords: Sequence[Coordinates]) -> pa.Table:
    """`convert` for callers that hold only fitting records (tests, replay fixtures): raises on any unfit one."""
    converted = convert(kind, records, coords)
    if converted.rejected:
        first = converted.rejected[0]
        raise ValueError(f"record {first.index} does not fit column {first.field}: {first.reason}")
    return converted.table


# ------------------------------------------------------------------------------------------- table -> records


def table_kind(table: pa.Table) -> TopicKind:
    """The kind named in a table's (file's) schema metadata."""
    meta = table.schema.metadata or {}
    value = meta.get(META_KIND)
    if value is None:
        raise ValueError("the table carries no okx.archive.kind metadata; pass kind=")
    return TopicKind(value.decode())


def _one_chunk(arr: pa.ChunkedArray | pa.Array) -> pa.Array:
    return arr.combine_chunks() if isinstance(arr, pa.ChunkedArray) else arr


def _shared(values: Sequence[Any], indices: pa.Array) -> list[Any]:
    """`values[i]` for every index, None for a null one: one Python object per distinct value, shared by its
    rows (equal values of immutable types), which is several times cheaper than one object per row."""
    lookup = np.empty(len(values) + 1, dtype=object)
    for k, v in enumerate(values):
        lookup[k] = v  # element by element: numpy would unpack a tuple value into a row
    shared: list[Any] = lookup[np.asarray(pc.fill_null(indices, len(values)))].tolist()
    return shared


def _decimal_texts(arr: pa.ChunkedArray | pa.Array) -> list[str | None]:
    """`render_decimal` of every value, in bulk; each distinct value rendered once when values repeat (prices
    and sizes do: a few distinct values per thousand rows)."""
    if pa.types.is_decimal(arr.type) and arr.type.scale > 0 and len(arr) >= 64:
        encoded = pc.dictionary_encode(_one_chunk(arr))
        if 2 * len(encoded.dictionary) <= len(arr):
            return _shared(_rendered(encoded.dictionary), encoded.indices)
    return _rendered(arr)


def _rendered(arr: pa.ChunkedArray | pa.Array) -> list[str | None]:
    """Arrow renders a decimal128 with its scale's fractional digits ("100.500000000000000000"), so trimming
    the zeros, then the point, is the canonical text. Arrow switches to an exponent for values below 1e-6
    ("1.0E-7") and renders zero as "0E-18": those go through Python."""
    if not pa.types.is_decimal(arr.type) or arr.type.scale <= 0:
        return [None if v is None else render_decimal(v) for v in arr.to_pylist()]
    text = pc.cast(arr, pa.string())
    out: list[str | None] = pc.utf8_rtrim(pc.utf8_rtrim(text, characters="0"), characters=".").to_pylist()
    odd = pc.match_substring(text, "E")
    if pc.any(odd).as_py():
        values = arr.to_pylist()
        for i in pc.indices_nonzero(pc.fill_null(odd, False)).to_pylist():
            out[i] = render_decimal(values[i])
    return out


def _py_column(table: pa.Table, name: str, col: _Col) -> list[Any]:
    """A column as Python values; timestamps as integers of their unit, decimals canonical text."""
    arr = table.column(name)
    if col is _Col.TS_MS or col is _Col.TS_NS:
        return arr.cast(pa.int64()).to_pylist()  # type: ignore[no-any-return]
    if col is _Col.DEC:
        return _decimal_texts(arr)
    if col is _Col.POSITION:
        return [None if v is None else StreamPosition(ts=v["ts"], trade_id=v["tradeId"], seq_id=v["seqId"])
                for v in arr.to_pylist()]
    return arr.to_pylist()  # type: ignore[no-any-return]


def _member(enum_type: type[enum.Enum], value: Any) -> enum.Enum:
    members: dict[Any, enum.Enum] = enum_type._value2member_map_
    member = members.get(value)
    return member if member is not None else enum_type(value)


def _field_values(table: pa.Table, f: _Field) -> list[Any]:
    """A column as the field's Python values (enums, dicts and raw frames built), nulls left as None."""
    if f.enum_type is not None:
        encoded = pc.dictionary_encode(_one_chunk(table.column(f.name)))
        enum_type = f.enum_type
        return _shared([_member(enum_type, v) for v in encoded.dictionary.to_pylist()], encoded.indices)
    values = _py_column(table, f.name, f.col)
    if f.col is _Col.MAP:
        return [v if v is None else dict(v) for v in values]
    if f.col is _Col.FRAMES:
        return [v if v is None else tuple(RawFrameEntry(recv_seq=e["recvSeq"], recv_ts_ns=e["recvTsNs"],
                                                        payload=e["payload"]) for e in v) for v in values]
    return values


_MAKERS: dict[tuple[type[Record], tuple[str, ...]], Callable[..., Record]] = {}


def _maker(cls: type[Record], attrs: tuple[str, ...]) -> Callable[..., Record]:
    """`make(v0, v1, ...) == cls(attrs[0]=v0, ...)`: records are keyword-only, and one compiled call with
    literal keywords per row is several times cheaper than building a kwargs dict per row."""
    key = (cls, attrs)
    fn = _MAKERS.get(key)
    if fn is None:
        # The names are compiled into source below: only the class's own field names, never anything else
        # (a real check, not an assert that `python -O` strips).
        known = {f.name for f in msgspec.structs.fields(cls)}
        bad = [a for a in attrs if a not in known or not a.isidentifier() or keyword.iskeyword(a)]
        if bad or len(set(attrs)) != len(attrs):
            raise ValueError(f"{cls.__name__}: cannot build a constructor for {attrs!r} (not its field names, "
                             f"or repeated): {', '.join(map(repr, bad)) or 'repeated'}")
        params = ", ".join(f"v{i}" for i in range(len(attrs)))
        call = ", ".join(f"{a}=v{i}" for i, a in enumerate(attrs))
        scope: dict[str, Any] = {"cls": cls}
        exec(f"def make({params}):\n    return cls({call})\n", scope)  # names checked above: struct fields
        fn = _MAKERS[key] = scope["make"]
    return fn


class _Default(enum.Enum):
    """A field without a default (its absence from a constructor call is an error)."""

    NONE = enum.auto()


def _defaults(cls: type[Record]) -> dict[str, Any]:
    """Each field's default by attribute name; a factory's default as the factory (`dict` for `extra`)."""
    out: dict[str, Any] = {}
    for f in msgspec.structs.fields(cls):
        if f.default is not msgspec.NODEFAULT:
            out[f.name] = f.default
        elif f.default_factory is not msgspec.NODEFAULT:
            out[f.name] = f.default_factory
        else:
            out[f.name] = _Default.NONE
    return out


_DEFAULTS: dict[type[Record], dict[str, Any]] = {cls: _defaults(cls) for cls in RECORD_TYPES}


def _left_to_default(table: pa.Table, cls: type[Record], f: _Field, emptied: frozenset[str]) -> bool:
    """Whether every row of the field's column is what the record's default gives, so the constructor call
    can leave the field out (msgspec fills it in C, a fresh `{}` per record for `extra`): null columns
    (fields OKX does not send on a channel, columns older files lack), `exchange` always "okx", no extras."""
    default = _DEFAULTS[cls][f.attr]
    if default is _Default.NONE or f.name in emptied:
        return False
    arr = table.column(f.name)
    if arr.null_count == len(arr):
        # A nullable field is None there, which only a None default gives; a non-nullable one takes its
        # default, as the row-by-row path (`_kwargs`) does.
        return default is None or not f.nullable
    if arr.null_count:
        return False
    if f.col is _Col.MAP:
        return default is dict and all(int(np.asarray(c.offsets)[0]) == int(np.asarray(c.offsets)[-1])
                                        for c in arr.chunks)
    if f.col is _Col.STR and f.enum_type is None and isinstance(default, str):
        return bool(pc.all(pc.equal(arr, default)).as_py())
    return False


def _columns(table: pa.Table, cls: type[Record], present: Sequence[_Field]
             ) -> tuple[list[_Field], list[list[Any]]] | None:
    """The fields a constructor call must pass and their values (a null the `_empty` column names turned
    back into ""), the others left to their defaults (`_left_to_default`); or None when a non-nullable
    field has a null left among values (the field's default applies, row by row)."""
    n = table.num_rows
    empties: list[list[str] | None] | None = None
    emptied: frozenset[str] = frozenset()
    if EMPTY_COLUMN in table.column_names and table.column(EMPTY_COLUMN).null_count < n:
        empty_col = table.column(EMPTY_COLUMN)
        empties = empty_col.to_pylist()
        emptied = frozenset(pc.unique(pc.list_flatten(empty_col)).to_pylist())
    fields: list[_Field] = []
    out = []
    for f in present:
        if _left_to_default(table, cls, f, emptied):
            continue
        values = _field_values(table, f)
        if table.column(f.name).null_count:
            if empties is not None and f.name in emptied:
                for i, empty in enumerate(empties):
                    if empty is not None and values[i] is None and f.name in empty:
                        values[i] = ""
            if not f.nullable and None in values:
                return None
        fields.append(f)
        out.append(values)
    return fields, out


def table_records(table: pa.Table, kind: TopicKind | None = None) -> tuple[list[Record], pa.Table]:
    """The records of an archive table in table order, and the table of their first rows: their Kafka
    coordinates and sort columns (the table itself, but for books, whose records span one row per level).

    Reverses `convert` exactly except decimal rendering. Columns a file lacks (written before a field was
    added) take the field's default; columns this build does not know are ignored. Columns are converted
    whole, then each record is one call (the replay item path's hot loop, docs/PERFORMANCE.md "Replay").
    """
    kind = kind if kind is not None else table_kind(table)
    cls = RECORD_TYPE_BY_KIND[kind]
    if table.num_rows == 0:
        return [], table
    if table.schema.field("_kafka_ts").type != TS_MS:
        table = table.set_column(table.column_names.index("_kafka_ts"), "_kafka_ts",
                                 table.column("_kafka_ts").cast(TS_MS))
    names = set(table.column_names)
    present = [f for f in _FIELDS[cls] if f.name in names]
    if cls is BookUpdate:
        return _books_from_table(table, present)
    built = _columns(table, cls, present)
    if built is None:
        return _records_by_row(table, cls, present), table
    fields, columns = built
    make = _maker(cls, tuple(f.attr for f in fields))
    records = list(map(make, *columns)) if columns else [make() for _ in range(table.num_rows)]
    return records, table


def table_to_records(table: pa.Table, kind: TopicKind | None = None) -> Iterator[tuple[Record, str, int, int]]:
    """The records of an archive table with their Kafka (topic, partition, offset), in table order
    (`table_records`)."""
    records, heads = table_records(table, kind)
    if not records:
        return iter(())
    return zip(records, heads.column("_topic").to_pylist(), heads.column("_partition").to_pylist(),
               heads.column("_offset").to_pylist(), strict=True)


def _records_by_row(table: pa.Table, cls: type[Record], present: Sequence[_Field]) -> list[Record]:
    """Row by row, each null of a non-nullable field left out so the field's default applies (old files)."""
    n = table.num_rows
    cols = {f.name: _py_column(table, f.name, f.col) for f in present}
    empties = table.column(EMPTY_COLUMN).to_pylist() if EMPTY_COLUMN in table.column_names else [None] * n
    return [cls(**_kwargs(present, cols, i, empties[i])) for i in range(n)]


def _record_starts(table: pa.Table) -> list[int]:
    """The first row of each record: rows of one record are contiguous and share their Kafka coordinates."""
    n = table.num_rows
    topics = np.asarray(pc.dictionary_encode(table.column("_topic")).combine_chunks().indices)
    parts = np.asarray(table.column("_partition").cast(pa.int64()))
    offs = np.asarray(table.column("_offset").cast(pa.int64()))
    new = np.ones(n, bool)
    if n > 1:
        new[1:] = (topics[1:] != topics[:-1]) | (parts[1:] != parts[:-1]) | (offs[1:] != offs[:-1])
    starts: list[int] = np.flatnonzero(new).tolist()
    return starts


def _level_bounds(side: pa.ChunkedArray, starts: list[int], n: int) -> tuple[list[int], list[int]] | None:
    """Where each record's asks end and its bids end, when its rows are its asks then its bids (what
    `convert` writes; a record without levels is one row with a null side); None for any other layout."""
    is_ask = np.asarray(pc.fill_null(pc.equal(side, "ask"), False))
    is_null = np.asarray(pc.is_null(side))
    first = np.asarray(starts, np.int64)
    lengths = np.diff(np.append(first, n))
    rises = np.flatnonzero(is_ask[1:] & ~is_ask[:-1]) + 1  # an ask right after a bid: a new record's, or disorder
    if len(rises) and not np.isin(rises, first).all():
        return None
    nulls = np.flatnonzero(is_null)
    if len(nulls) and not (np.isin(nulls, first).all() and (lengths[np.searchsorted(first, nulls)] == 1).all()):
        return None
    ask_ends: list[int] = (first + np.add.reduceat(is_ask.astype(np.int64), first)).tolist()
    bid_ends: list[int] = (first + lengths - np.add.reduceat(is_null.astype(np.int64), first)).tolist()
    return ask_ends, bid_ends


def _books_from_table(table: pa.Table, present: Sequence[_Field]) -> tuple[list[Record], pa.Table]:
    """Book records from their level rows: the record's fields from its first row, its levels in row order."""
    n = table.num_rows
    starts = _record_starts(table)
    heads = table.take(pa.array(starts, pa.int64()))
    built = _columns(heads, BookUpdate, present)
    bounds = _level_bounds(table.column("side"), starts, n) if built is not None else None
    if built is None or bounds is None:
        return _books_by_row(table, present), heads
    fields, columns = built
    px = _decimal_texts(table.column("px"))
    sz = _decimal_texts(table.column("sz"))
    liq = (pc.fill_null(table.column("liqOrders"), "0").to_pylist() if "liqOrders" in table.column_names
           else ["0"] * n)
    num = pc.fill_null(table.column("numOrders").cast(pa.string()), "None").to_pylist()
    # A tuple, so a record's levels are one slice each; level rows have px and sz.
    levels = typing.cast("tuple[BookLevel, ...]", tuple(zip(px, sz, liq, num, strict=True)))
    ask_ends, bid_ends = bounds
    asks = [levels[i:m] for i, m in zip(starts, ask_ends, strict=True)]
    bids = [levels[m:j] for m, j in zip(ask_ends, bid_ends, strict=True)]
    make = _maker(BookUpdate, (*(f.attr for f in fields), "asks", "bids"))
    return list(map(make, *columns, asks, bids)), heads


def _books_by_row(table: pa.Table, present: Sequence[_Field]) -> list[Record]:
    n = table.num_rows
    cols = {f.name: _py_column(table, f.name, f.col) for f in present}
    empties = table.column(EMPTY_COLUMN).to_pylist() if EMPTY_COLUMN in table.column_names else [None] * n
    topics = table.column("_topic").to_pylist()
    partitions = table.column("_partition").to_pylist()
    offsets = table.column("_offset").to_pylist()
    return list(_books_from_rows(table, present, cols, empties, topics, partitions, offsets))


def _kwargs(present: Iterable[_Field], cols: Mapping[str, list[Any]], i: int, empty: list[str] | None
            ) -> dict[str, Any]:
    kwargs: dict[str, Any] = {}
    for f in present:
        v = cols[f.name][i]
        if v is None:
            if empty is not None and f.name in empty:
                kwargs[f.attr] = ""
                continue
            if not f.nullable:
                continue  # a column older files lack is null in a unified read: the field's default applies
        elif f.enum_type is not None:
            v = f.enum_type(v)
        elif f.col is _Col.MAP:
            v = dict(v)
        elif f.col is _Col.FRAMES:
            v = tuple(RawFrameEntry(recv_seq=e["recvSeq"], recv_ts_ns=e["recvTsNs"], payload=e["payload"])
                      for e in v)
        kwargs[f.attr] = v
    return kwargs


def _books_from_rows(table: pa.Table, present: Sequence[_Field], cols: Mapping[str, list[Any]],
                     empties: list[list[str] | None], topics: list[str], partitions: list[int], offsets: list[int]
                     ) -> Iterator[Record]:
    side = table.column("side").to_pylist()
    px = _py_column(table, "px", _Col.DEC)
    sz = _py_column(table, "sz", _Col.DEC)
    liq = table.column("liqOrders").to_pylist() if "liqOrders" in table.column_names else ["0"] * table.num_rows
    num = table.column("numOrders").to_pylist()
    n = table.num_rows
    i = 0
    while i < n:
        j = i
        key = (topics[i], partitions[i], offsets[i])
        asks: list[tuple[str, str, str, str]] = []
        bids: list[tuple[str, str, str, str]] = []
        while j < n and (topics[j], partitions[j], offsets[j]) == key:
            s = side[j]
            if s is not None:
                level = (px[j], sz[j], liq[j] if liq[j] is not None else "0", str(num[j]))
                (asks if s == "ask" else bids).append(level)
            j += 1
        kwargs = _kwargs(present, cols, i, empties[i])
        kwargs["asks"] = tuple(asks)
        kwargs["bids"] = tuple(bids)
        yield BookUpdate(**kwargs)
        i = j
