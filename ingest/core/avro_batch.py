"""Many Avro values of one schema decoded at once into an Arrow table, for the archiver's bulk records.

Record by record, fastavro and the Struct conversion cost about 9 us a value; polars' Avro reader (Rust) reads a
whole batch in about 1 us a value. It reads Avro object container files, so the values' bodies (framing removed)
are wrapped as one block behind a header carrying the writer schema. What it cannot read is
adapted on the way in: a map is written exactly as an array of {key, value} records (the same bytes), and field
defaults and docs are left out (it refuses them).

The batch is checked, never trusted: each value's length is recomputed from what was decoded and compared with
its length on the wire. Equal lengths row by row mean every row was read from exactly its own value's bytes
(the first row ends where the second value begins, and so on); a value with bytes past its record, or one cut
short, makes the rows after it disagree. Any difference,
any error of the reader (including its panics) and any schema this module does not know gives None: the caller
decodes those values one by one, exactly as before, with the same results and the same rejections.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from typing import Any

import numpy as np
import orjson
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc

from ingest.core.avro import SINGLE_OBJECT_MAGIC, AvroSchema

__all__ = ["BatchDecoder"]

_SYNC = b"okx-ingest-batch"  # 16 bytes: any marker will do, the same in the header and after every block
_PREFIX = 10  # single-object framing: C3 01 + 8-byte fingerprint


def _zz(n: int) -> bytes:
    """Avro's zig-zag varint of one long."""
    z = (n << 1) ^ (n >> 63)
    out = bytearray()
    while z & ~0x7F:
        out.append((z & 0x7F) | 0x80)
        z >>= 7
    out.append(z)
    return bytes(out)


def _reader_form(node: Any) -> Any:
    """The schema as polars reads it: maps as arrays of {key, value}, no defaults or docs."""
    if isinstance(node, list):
        return [_reader_form(n) for n in node]
    if isinstance(node, dict):
        if node.get("type") == "map":
            return {"type": "array", "items": {"type": "record", "name": "MapEntry", "fields": [
                {"name": "key", "type": "string"}, {"name": "value", "type": _reader_form(node["values"])}]}}
        return {k: _reader_form(v) for k, v in node.items() if k not in ("doc", "default", "aliases")}
    return node


def _varint_len(z: np.ndarray[Any, np.dtype[np.uint64]]) -> np.ndarray[Any, np.dtype[np.int64]]:
    """Bytes of the varints of non-negative values."""
    out = np.ones(len(z), np.int64)
    for k in range(1, 10):
        out += z >= np.uint64(1 << (7 * k))
    return out


def _long_len(col: pa.ChunkedArray | pa.Array) -> np.ndarray[Any, np.dtype[np.int64]]:
    v = np.asarray(pc.fill_null(col, 0).to_numpy(zero_copy_only=False), np.int64)
    z = ((v << 1) ^ (v >> 63)).view(np.uint64)
    return _varint_len(z)


def _string_len(col: pa.ChunkedArray | pa.Array) -> np.ndarray[Any, np.dtype[np.int64]]:
    """Bytes of strings: the length (a zig-zag long) and the UTF-8 bytes."""
    n = np.asarray(pc.fill_null(pc.binary_length(col), 0).to_numpy(zero_copy_only=False), np.int64)
    return _varint_len((n << 1).view(np.uint64)) + n


class _Unsupported(Exception):
    """A schema shape the length check does not know (the batch path is then not used for it)."""


def _type_name(t: Any) -> str:
    return t if isinstance(t, str) else str(t.get("type"))


class BatchDecoder:
    """Decode many values framed with one schema's single-object header (`decode`; None: decode them one by one)."""

    #: Below this many values the fixed cost of a batch is not worth it.
    MIN_BATCH = 16

    def __init__(self, schema: AvroSchema) -> None:
        self.schema = schema
        self.prefix = SINGLE_OBJECT_MAGIC + schema.fingerprint
        source = schema.source
        fields = source.get("fields")
        if not isinstance(fields, list):
            raise _Unsupported(schema.name)
        self._fields: list[tuple[str, Any]] = [(str(f["name"]), f["type"]) for f in fields]
        for _name, t in self._fields:
            self._check(t)
        text = orjson.dumps(_reader_form(source))
        meta = (_zz(2) + _zz(11) + b"avro.schema" + _zz(len(text)) + text + _zz(10) + b"avro.codec" + _zz(4)
                + b"null" + _zz(0))
        self._header = b"Obj\x01" + meta + _SYNC

    @classmethod
    def of(cls, schema: AvroSchema) -> BatchDecoder | None:
        """A decoder for `schema`, or None when its shape is not one this module checks."""
        try:
            return cls(schema)
        except _Unsupported:
            return None

    def _check(self, t: Any) -> None:
        if isinstance(t, list):  # only [null, primitive]
            if len(t) != 2 or t[0] != "null" or _type_name(t[1]) not in ("string", "long"):
                raise _Unsupported(str(t))
            return
        name = _type_name(t)
        if name in ("string", "long"):
            return
        if name == "enum" and len(t["symbols"]) <= 64:  # an index of one byte
            return
        if name == "map" and t.get("values") == "string":
            return
        raise _Unsupported(name)

    def decode(self, values: Sequence[bytes]) -> pa.Table | None:
        """The values as one table with the schema's field names; None when the batch path cannot vouch for
        every value (one not framed with this schema included)."""
        if not values:
            return None
        prefix = self.prefix
        if not all(v[:_PREFIX] == prefix for v in values):
            return None  # framed otherwise (another schema, Confluent framing): the record path decides
        body = b"".join([v[_PREFIX:] for v in values])
        data = b"".join((self._header, _zz(len(values)), _zz(len(body)), body, _SYNC))
        try:
            table = pl.read_avro(io.BytesIO(data)).to_arrow()
        except (Exception, pl.exceptions.PanicException):  # a value it cannot read: one by one instead
            return None
        if table.num_rows != len(values) or table.column_names != [n for n, _ in self._fields]:
            return None
        try:
            expected = self._lengths(table)
        except (pa.ArrowException, ValueError, TypeError):
            return None
        actual = np.fromiter((len(v) - _PREFIX for v in values), np.int64, len(values))
        if not np.array_equal(expected, actual):
            return None  # a value with bytes past its record (or read differently): one by one instead
        return table

    def _lengths(self, table: pa.Table) -> np.ndarray[Any, np.dtype[np.int64]]:
        """The encoded length of each row, as this project's encoder writes it."""
        total = np.zeros(table.num_rows, np.int64)
        for name, t in self._fields:
            col = table.column(name)
            if isinstance(t, list):
                inner = _type_name(t[1])
                size = _string_len(col) if inner == "string" else _long_len(col)
                valid = np.asarray(col.is_valid().to_numpy(zero_copy_only=False), bool)
                total += 1 + np.where(valid, size, 0)
                continue
            kind = _type_name(t)
            if kind == "string":
                total += _string_len(col)
            elif kind == "long":
                total += _long_len(col)
            elif kind == "enum":
                total += 1
            else:  # map of strings, read as a list of {key, value}: count, entries, a 0 (or a lone 0 if empty)
                lists = pa.chunked_array(col.chunks).combine_chunks() if isinstance(col, pa.ChunkedArray) else col
                counts = np.asarray(pc.fill_null(pc.list_value_length(lists), 0).to_numpy(zero_copy_only=False),
                                    np.int64)
                flat = pc.list_flatten(lists)
                entry = _string_len(pc.struct_field(flat, [0])) + _string_len(pc.struct_field(flat, [1]))
                owner = np.asarray(pc.list_parent_indices(lists).to_numpy(zero_copy_only=False), np.int64)
                per_row = np.bincount(owner, weights=entry, minlength=table.num_rows).astype(np.int64)
                total += np.where(counts > 0, _long_len(pa.array(counts)) + per_row + 1, 1)
        return total
