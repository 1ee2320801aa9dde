"""Avro encoding and decoding of records, self-describing on the wire.

Default wire format: Avro single-object encoding (`C3 01`, the 8-byte little-endian CRC-64-AVRO fingerprint
of the schema's Parsing Canonical Form, then the Avro binary body), so a consumer holding only the .avsc files
can tell which schema wrote a message. Alternative: the Confluent wire format (`00`, 4-byte big-endian schema
id, body) when the registry client hands over full name -> id.

The body is written by an encoder generated once per schema from the .avsc file and the mirroring Struct:
straight-line code per field, about 3x faster than fastavro's generic writer on these records (see
bench/normalize_bench.py). tests/unit/test_avro.py proves it writes exactly fastavro's bytes for every schema.
Reading always goes through fastavro, the reference implementation.

This module reads no files: it parses the .avsc documents it is handed (`SchemaSet.from_documents`). The
packaged files are read by `ingest.io.schemas`, which the package root registers as the default source
(`set_default_source`), so `decode(value)` and `RecordEncoder()` still work without arguments.
"""

from __future__ import annotations

import functools
import io
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from operator import attrgetter
from typing import Any, cast

import fastavro
import msgspec
from fastavro.schema import fingerprint as _fastavro_fingerprint
from fastavro.schema import to_parsing_canonical_form
from fastavro.types import Schema as FastavroSchema

from ingest.core import schema_source
from ingest.core.encoded import EncodedRecord
from ingest.core.identity import EVENT_KEY_HEADER, event_key, event_key_function, has_event_key
from ingest.core.records import STRUCT_BY_AVRO_NAME, InstrumentRecord, OkxRecord, Record, topic_name
from ingest.errors import IngestError

SINGLE_OBJECT_MAGIC = b"\xc3\x01"
CONFLUENT_MAGIC = b"\x00"

#: An .avsc document as json.loads returns it.
AvroJson = dict[str, object]
# JSON walked by the code generator, whose shape the .avsc grammar (not the type system) guarantees.
_Json = Any


class SchemaError(IngestError):
    """The .avsc files are missing, unreadable or do not match the record Structs (a packaging or code bug)."""


class DecodeError(IngestError):
    """A message is not a record these schemas can read: wrong framing, unknown schema, or a corrupt body."""


@dataclass(frozen=True, slots=True, eq=False)
class AvroSchema:
    """One record schema: the .avsc JSON, fastavro's parsed form, and its identity on the wire (compared by
    identity: one object per loaded file)."""

    name: str
    source: AvroJson
    parsed: FastavroSchema
    canonical_form: str
    fingerprint: bytes

    @classmethod
    def from_json(cls, source: AvroJson) -> AvroSchema:
        """Parse one self-contained record schema (named types are resolved within the file only)."""
        parsed = fastavro.parse_schema(source, named_schemas={})
        canonical = to_parsing_canonical_form(source)
        fp = bytes.fromhex(_fastavro_fingerprint(canonical, "CRC-64-AVRO"))
        namespace = source.get("namespace")
        name = f"{namespace}.{source['name']}" if namespace else str(source["name"])
        return cls(name, source, parsed, canonical, fp)


@dataclass(frozen=True)
class SchemaSet:
    """Every record schema by Avro full name, and by single-object fingerprint.

    `previous`: schemas that earlier builds wrote with (the `previous/` folder beside the .avsc files), by
    fingerprint. A value written with one is read with it and resolved to the current schema of its name
    (Avro schema resolution: a field added since takes its default), so old records still decode.
    """

    by_name: Mapping[str, AvroSchema]
    previous: Mapping[bytes, AvroSchema] = field(default_factory=dict)
    by_fingerprint: Mapping[bytes, AvroSchema] = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "by_fingerprint", {s.fingerprint: s for s in self.by_name.values()})
        for old in self.previous.values():
            if old.name not in self.by_name:
                raise SchemaError(f"previous schema {old.name} has no current schema of that name; restore the "
                                  "current .avsc file or remove the previous one")

    @classmethod
    def from_documents(cls, current: Mapping[str, object], previous: Mapping[str, object] | None = None, *,
                       where: str = "the schema folder") -> SchemaSet:
        """Parse .avsc documents (origin, e.g. the file path -> its JSON), `previous` as older writer schemas.

        An error names the origin of the document at fault, so a broken file can be found and fixed.
        """
        if not current:
            raise SchemaError(f"no .avsc files in {where}; reinstall okx-ingest or point at the schemas/ folder")
        schemas = {s.name: s for s in (parse_schema(origin, doc) for origin, doc in current.items())}
        old = {s.fingerprint: s for s in (parse_schema(origin, doc) for origin, doc in (previous or {}).items())}
        fresh = {c.fingerprint for c in schemas.values()}
        return cls(schemas, {fp: s for fp, s in old.items() if fp not in fresh})

    def __getitem__(self, name: str) -> AvroSchema:
        try:
            return self.by_name[name]
        except KeyError:
            raise SchemaError(f"no schema named {name!r}; known: {', '.join(sorted(self.by_name))}") from None

    def __iter__(self) -> Iterator[AvroSchema]:
        return iter(self.by_name.values())

    def __len__(self) -> int:
        return len(self.by_name)

    def previous_of(self, name: str) -> list[AvroSchema]:
        """The older writer schemas of `name` (for values that do not name theirs by fingerprint)."""
        return [s for s in self.previous.values() if s.name == name]


def parse_schema(origin: str, document: object) -> AvroSchema:
    """One .avsc document as an AvroSchema; `origin` (its file) names it in the error."""
    try:
        if not isinstance(document, dict):
            raise ValueError("not a JSON object")
        return AvroSchema.from_json(document)
    except (ValueError, KeyError, TypeError, fastavro.schema.SchemaParseException) as exc:
        raise SchemaError(f"{origin}: not a valid Avro schema ({exc}); fix or restore the file") from exc


def set_default_source(source: Callable[[], SchemaSet] | SchemaSet) -> None:
    """Register where `default_schemas()` comes from: a loader called once on first use, or a loaded set.

    The package root registers `ingest.io.schemas.packaged_schemas` (the file reader lives at the edge);
    a tool with its own schema folder registers that instead. A new registration replaces the cached set.
    """
    if isinstance(source, SchemaSet):
        schema_source.register(None, source)
    else:
        schema_source.register(source)


def default_schemas() -> SchemaSet:
    """The registered schemas (by default the packaged ones), loaded once per process on first use."""
    found = schema_source.current()
    if found is None:
        raise SchemaError("no default schemas registered: import the ingest package (it registers the packaged "
                          "ones), call ingest.core.avro.set_default_source, or pass schemas=")
    return found


# ---------------------------------------------------------------------------------------------- encoding


_MASK14 = 0x3FFF
# 14-bit chunks as two varint bytes with the continuation bit set on both (a chunk that is not the last one).
_MID = [bytes((i & 0x7F | 0x80, i >> 7 | 0x80)) for i in range(1 << 14)]
# 14-bit values as the final one or two varint bytes.
_LAST = [bytes((i & 0x7F | 0x80, i >> 7)) if i >= 0x80 else bytes((i,)) for i in range(1 << 14)]


def _zigzag_varint(n: int) -> bytes:
    """Avro's zig-zag variable-length encoding of a long, by 14-bit table lookups (2-3x a bit loop)."""
    z = (n << 1) ^ (n >> 63)
    if z < 0x4000:
        if z < 0:
            raise OverflowError(f"{n} does not fit an Avro long (64-bit signed)")
        return _LAST[z]
    if z < 0x10000000:
        return _MID[z & _MASK14] + _LAST[z >> 14]
    if z < 0x40000000000:
        return _MID[z & _MASK14] + _MID[z >> 14 & _MASK14] + _LAST[z >> 28]
    if z < 0x100000000000000:
        return _MID[z & _MASK14] + _MID[z >> 14 & _MASK14] + _MID[z >> 28 & _MASK14] + _LAST[z >> 42]
    if z >> 64:
        raise OverflowError(f"{n} does not fit an Avro long (64-bit signed)")
    return b"".join((_MID[z & _MASK14], _MID[z >> 14 & _MASK14], _MID[z >> 28 & _MASK14], _MID[z >> 42 & _MASK14],
                     _LAST[z >> 56]))


_SHORT_LEN = 4096
#: Encoded lengths 0.._SHORT_LEN-1 (string and bytes prefixes), so most strings cost one list lookup.
_LENGTHS = [_zigzag_varint(i) for i in range(_SHORT_LEN)]

Encoder = Callable[[object, bytes], bytes]


class _CodeGen:
    """Writes the Python source of one record encoder: straight-line code, no per-field dispatch."""

    def __init__(self, schema: AvroSchema) -> None:
        self.schema = schema
        self.lines: list[str] = []
        self.consts: dict[str, object] = {"L": _LENGTHS, "zz": _zigzag_varint}
        self.named: dict[str, _Json] = {}
        self.counter = 0
        self.source = ""

    def var(self) -> str:
        self.counter += 1
        return f"v{self.counter}"

    def const(self, value: object) -> str:
        name = f"K{len(self.consts)}"
        self.consts[name] = value
        return name

    def emit(self, depth: int, line: str) -> None:
        self.lines.append("    " * depth + line)

    def build(self) -> Encoder:
        self.emit(1, "o = bytearray(prefix)")
        self.record(self.schema.source, "r", 1, self.schema.name)
        self.emit(1, "return bytes(o)")
        params = ", ".join(f"{k}={k}" for k in self.consts)
        source = f"def encode(r, prefix, {params}):\n" + "\n".join(self.lines) + "\n"
        self.source = source
        namespace: dict[str, object] = dict(self.consts)
        exec(compile(source, f"<avro encoder {self.schema.name}>", "exec"), namespace)
        return cast(Encoder, namespace["encode"])

    def full_name(self, name: str, namespace: str) -> str:
        return name if "." in name else f"{namespace}.{name}"

    def record(self, schema: _Json, expr: str, depth: int, full: str) -> None:
        self.named[full] = schema
        cls = STRUCT_BY_AVRO_NAME.get(full)
        if cls is None:
            raise SchemaError(f"schema {full} has no Struct in ingest.core.records; add one that mirrors it")
        attrs = {f.encode_name: f.name for f in msgspec.structs.fields(cls)}
        namespace = full.rpartition(".")[0]
        for fdef in schema["fields"]:
            attr = attrs.get(fdef["name"])
            if attr is None:
                raise SchemaError(f"{full}.{fdef['name']} has no attribute in {cls.__name__}; mirror the .avsc")
            value = self.var()
            self.emit(depth, f"{value} = {expr}.{attr}")
            self.value(fdef["type"], value, depth, namespace)

    def value(self, schema: _Json, v: str, depth: int, namespace: str) -> None:
        if isinstance(schema, list):
            self.union(schema, v, depth, namespace)
            return
        if isinstance(schema, str):
            if schema in ("string", "bytes"):
                data = v
                if schema == "string":
                    data = self.var()
                    self.emit(depth, f"{data} = {v}.encode()")
                # try/except is free in 3.11 when nothing is raised, cheaper than testing every length
                self.emit(depth, "try:")
                self.emit(depth + 1, f"o += L[len({data})]")
                self.emit(depth, "except IndexError:")
                self.emit(depth + 1, f"o += zz(len({data}))")
                self.emit(depth, f"o += {data}")
            elif schema == "long":
                self.emit(depth, f"o += zz({v})")
            elif schema == "int":
                self.emit(depth, f"if not -2147483648 <= {v} <= 2147483647: raise OverflowError('not an Avro int')")
                self.emit(depth, f"o += zz({v})")
            elif schema == "boolean":
                self.emit(depth, f"o += b'\\x01' if {v} else b'\\x00'")
            elif schema == "null":
                self.emit(depth, f"if {v} is not None: raise ValueError('null field holds a value')")
            else:
                named = self.named.get(self.full_name(schema, namespace))
                if named is None:
                    raise SchemaError(f"{self.schema.name}: unsupported or unknown type {schema!r}")
                self.named_value(named, v, depth, self.full_name(schema, namespace))
            return
        if not isinstance(schema, dict):
            raise SchemaError(f"{self.schema.name}: unsupported type {schema!r}")
        kind = schema["type"]
        if kind == "array":
            self.emit(depth, f"if {v}:")
            self.emit(depth + 1, f"o += zz(len({v}))")
            item = self.var()
            self.emit(depth + 1, f"for {item} in {v}:")
            self.value(schema["items"], item, depth + 2, namespace)
            self.emit(depth, "o += b'\\x00'")
        elif kind == "map":
            self.emit(depth, f"if {v}:")
            self.emit(depth + 1, f"o += zz(len({v}))")
            key, item = self.var(), self.var()
            self.emit(depth + 1, f"for {key}, {item} in {v}.items():")
            self.value("string", key, depth + 2, namespace)
            self.value(schema["values"], item, depth + 2, namespace)
            self.emit(depth, "o += b'\\x00'")
        elif kind in ("record", "enum"):
            full = self.full_name(str(schema["name"]), str(schema.get("namespace", namespace)))
            self.named[full] = schema
            self.named_value(schema, v, depth, full)
        else:
            self.value(kind, v, depth, namespace)

    def named_value(self, schema: _Json, v: str, depth: int, full: str) -> None:
        if schema["type"] == "enum":
            table = self.const({s: _zigzag_varint(i) for i, s in enumerate(schema["symbols"])})
            self.emit(depth, f"o += {table}[{v}]")
        else:
            self.record(schema, v, depth, full)

    def union(self, branches: list[_Json], v: str, depth: int, namespace: str) -> None:
        if len(branches) != 2 or "null" not in branches:
            raise SchemaError(f"{self.schema.name}: only [null, T] unions are supported, not {branches!r}")
        null_index = branches.index("null")
        other = branches[1 - null_index]
        self.emit(depth, f"if {v} is None:")
        self.emit(depth + 1, f"o += {_zigzag_varint(null_index)!r}")
        self.emit(depth, "else:")
        self.emit(depth + 1, f"o += {_zigzag_varint(1 - null_index)!r}")
        self.value(other, v, depth + 1, namespace)


# Latin-1 text of encoded lengths and varints: the fast encoders build the body as one str whose latin-1
# encoding is the Avro bytes (ASCII text maps to itself, any UTF-8 byte sequence decodes 1:1 to latin-1).
_LENGTHS_TEXT = [b.decode("latin-1") for b in _LENGTHS]
_MID_TEXT = [b.decode("latin-1") for b in _MID]
_LAST_TEXT = [b.decode("latin-1") for b in _LAST]


def _zigzag_text(n: int) -> str:
    """_zigzag_varint as latin-1 text."""
    z = (n << 1) ^ (n >> 63)
    if z < 0x4000:
        if z < 0:
            raise OverflowError(f"{n} does not fit an Avro long (64-bit signed)")
        return _LAST_TEXT[z]
    if z < 0x10000000:
        return _MID_TEXT[z & _MASK14] + _LAST_TEXT[z >> 14]
    if z < 0x40000000000:
        return _MID_TEXT[z & _MASK14] + _MID_TEXT[z >> 14 & _MASK14] + _LAST_TEXT[z >> 28]
    if z < 0x100000000000000:
        return (_MID_TEXT[z & _MASK14] + _MID_TEXT[z >> 14 & _MASK14] + _MID_TEXT[z >> 28 & _MASK14]
                + _LAST_TEXT[z >> 42])
    if z >> 64:
        raise OverflowError(f"{n} does not fit an Avro long (64-bit signed)")
    return (_MID_TEXT[z & _MASK14] + _MID_TEXT[z >> 14 & _MASK14] + _MID_TEXT[z >> 28 & _MASK14]
            + _MID_TEXT[z >> 42 & _MASK14] + _LAST_TEXT[z >> 56])


def _string_text(value: str) -> str:
    """An Avro string (length + UTF-8) as latin-1 text; IndexError past _SHORT_LEN sends the record to the
    exact encoder."""
    if value.isascii():
        return _LENGTHS_TEXT[len(value)] + value
    data = value.encode()
    return _LENGTHS_TEXT[len(data)] + data.decode("latin-1")


class _Unsupported(Exception):
    """The fast generator does not handle this schema shape; the exact encoder alone is used."""


class _TextGen(_CodeGen):
    """The fast encoder: the body as one f-string of latin-1 text, then one `encode("latin-1")`.

    Strings that are not ASCII are re-expressed as their UTF-8 bytes decoded as latin-1, so the text still
    maps byte for byte. Lengths beyond the table (IndexError) and book levels that are not 4 ASCII strings
    shorter than 64 characters (ValueError) fall back to the exact encoder for that record.
    """

    def __init__(self, schema: AvroSchema) -> None:
        super().__init__(schema)
        self.consts = {"C": _LENGTHS_TEXT, "zs": _zigzag_text, "A": _string_text, "N0": "\x00", "N1": "\x01",
                       "N2": "\x02", "N8": "\x08", "CS": [chr(2 * n) for n in range(64)]}

    def build_fast(self, exact: Encoder) -> Encoder:
        self.consts["exact"] = exact
        fragment = self.text_record(self.schema.source, "r", 2, self.schema.name)
        params = ", ".join(f"{k}={k}" for k in self.consts)
        source = (f"def encode(r, prefix, {params}):\n    try:\n" + "\n".join(self.lines)
                  + f'\n        return prefix + f"{fragment}".encode("latin-1")\n'
                  + "    except (IndexError, ValueError):\n        return exact(r, prefix)\n")
        self.source = source
        namespace: dict[str, object] = dict(self.consts)
        exec(compile(source, f"<avro fast encoder {self.schema.name}>", "exec"), namespace)
        return cast(Encoder, namespace["encode"])

    def text_record(self, schema: _Json, expr: str, depth: int, full: str) -> str:
        self.named[full] = schema
        cls = STRUCT_BY_AVRO_NAME[full]
        attrs = {f.encode_name: f.name for f in msgspec.structs.fields(cls)}
        namespace = full.rpartition(".")[0]
        parts = []
        for fdef in schema["fields"]:
            value = self.var()
            self.emit(depth, f"{value} = {expr}.{attrs[fdef['name']]}")
            parts.append(self.text(fdef["type"], value, depth, namespace))
        return "".join(parts)

    def text(self, schema: _Json, v: str, depth: int, namespace: str) -> str:
        """Emit statements for value `v`; return its f-string fragment."""
        if isinstance(schema, list):
            if len(schema) != 2 or "null" not in schema:
                raise _Unsupported(schema)
            null_index = schema.index("null")
            piece = self.var()
            self.emit(depth, f"if {v} is None:")
            self.emit(depth + 1, f"{piece} = {'N0' if null_index == 0 else 'N2'}")
            self.emit(depth, "else:")
            inner = self.text(schema[1 - null_index], v, depth + 1, namespace)
            self.emit(depth + 1, f'{piece} = f"{{{"N2" if null_index == 0 else "N0"}}}{inner}"')
            return f"{{{piece}}}"
        if isinstance(schema, str):
            if schema == "string":
                self.emit(depth, f"if not {v}.isascii(): {v} = {v}.encode().decode('latin-1')")
                return f"{{C[len({v})]}}{{{v}}}"
            if schema == "bytes":
                self.emit(depth, f"{v} = {v}.decode('latin-1')")
                return f"{{C[len({v})]}}{{{v}}}"
            if schema == "long":
                return f"{{zs({v})}}"
            if schema == "int":
                self.emit(depth, f"if not -2147483648 <= {v} <= 2147483647: raise OverflowError('not an Avro int')")
                return f"{{zs({v})}}"
            if schema == "boolean":
                return f"{{N1 if {v} else N0}}"
            named = self.named.get(self.full_name(schema, namespace))
            if named is None:
                raise _Unsupported(schema)
            return self.text_named(named, v, depth, self.full_name(schema, namespace))
        kind = schema["type"]
        if kind in ("record", "enum"):
            full = self.full_name(str(schema["name"]), str(schema.get("namespace", namespace)))
            self.named[full] = schema
            return self.text_named(schema, v, depth, full)
        piece = self.var()
        if kind == "map" and schema["values"] == "string":
            self.emit(depth, f'{piece} = zs(len({v})) + "".join([A(k) + A(x) for k, x in {v}.items()]) + N0 '
                             f"if {v} else N0")
            return f"{{{piece}}}"
        if kind == "array" and schema["items"] == "string":
            self.emit(depth, f'{piece} = zs(len({v})) + "".join([A(x) for x in {v}]) + N0 if {v} else N0')
            return f"{{{piece}}}"
        if kind == "array" and schema["items"] == {"type": "array", "items": "string"}:
            # Book levels: four short ASCII strings each, one f-string per level; anything else -> exact.
            self.emit(depth, f"if {v}:")
            self.emit(depth + 1, f'{piece} = "".join([f"{{N8}}{{CS[len(a)]}}{{a}}{{CS[len(b)]}}{{b}}'
                                 f'{{CS[len(c)]}}{{c}}{{CS[len(d)]}}{{d}}{{N0}}" for a, b, c, d in {v}])')
            self.emit(depth + 1, f"if not {piece}.isascii(): raise ValueError('not ASCII')")
            self.emit(depth + 1, f"{piece} = zs(len({v})) + {piece} + N0")
            self.emit(depth, "else:")
            self.emit(depth + 1, f"{piece} = N0")
            return f"{{{piece}}}"
        if kind == "array":
            # Records of longs and bytes (okx.raw's frames): one f-string per item, joined like strings above.
            items = schema["items"]
            full = self.full_name(str(items["name"]), str(items.get("namespace", namespace))) \
                if isinstance(items, dict) and items.get("type") == "record" else \
                self.full_name(items, namespace) if isinstance(items, str) else ""
            item_schema = items if isinstance(items, dict) else self.named.get(full)
            if item_schema is None or item_schema.get("type") != "record":
                raise _Unsupported(schema)
            self.named[full] = item_schema
            inline = _inline_item(item_schema, full)
            if inline is None:
                raise _Unsupported(schema)
            self.emit(depth, f'{piece} = zs(len({v})) + "".join([f"{inline}" for x in {v}]) + N0 if {v} else N0')
            return f"{{{piece}}}"
        raise _Unsupported(schema)

    def text_named(self, schema: _Json, v: str, depth: int, full: str) -> str:
        if schema["type"] == "enum":
            table = self.const({s: _zigzag_varint(i).decode("latin-1") for i, s in enumerate(schema["symbols"])})
            return f"{{{table}[{v}]}}"
        return self.text_record(schema, v, depth, full)


def _inline_item(schema: _Json, full: str) -> str | None:
    """The f-string text of a nested record `x` whose fields are all longs or bytes (okx.raw's frames),
    or None when a field needs a statement (a check, a conversion) and the item function is used instead."""
    cls = STRUCT_BY_AVRO_NAME[full]
    attrs = {f.encode_name: f.name for f in msgspec.structs.fields(cls)}
    parts = []
    for fdef in schema["fields"]:
        value = f"x.{attrs[fdef['name']]}"
        if fdef["type"] == "long":
            parts.append(f"{{zs({value})}}")
        elif fdef["type"] == "bytes":
            parts.append(f"{{C[len({value})]}}{{{value}.decode('latin-1')}}")
        else:
            return None
    return "".join(parts)


def compile_encoder(schema: AvroSchema, *, fast: bool = True) -> Encoder:
    """The body encoder of one schema: `encode(record, prefix) -> prefix + Avro binary of record`.

    `fast=False` gives the exact (bytearray) encoder alone; the fast one falls back to it per record.
    """
    exact = _CodeGen(schema).build()
    if not fast:
        return exact
    try:
        return _TextGen(schema).build_fast(exact)
    except _Unsupported:
        return exact


@dataclass(frozen=True, slots=True)
class _Plan:
    """Everything per record type that does not change between records, prepared once."""

    encode: Encoder
    prefix: bytes
    topic: str
    schema_header: tuple[str, bytes]
    record_id: Callable[[Record], str]
    ts_ms: Callable[[Record], int]
    keyed: bool
    #: The whole EncodedRecord of one record in one call (see `_full_encoder`).
    full: Callable[[Record], EncodedRecord]


_SOURCE_HEADERS = {s: ("source", s.encode()) for s in ("ws", "rest", "ingest")}


def _full_encoder(cls: type[Record], body: Encoder, prefix: bytes, topic: str, schema_header: tuple[str, bytes],
                  record_id: Callable[[Record], str], ts_ms: Callable[[Record], int],
                  keyed: bool) -> Callable[[Record], EncodedRecord]:
    """One function per record type that builds its EncodedRecord: key, headers, body and timestamp.

    Every record passes here once, so what `RecordEncoder.encode` used to look up or call per record (the plan,
    `source_header()`, `kafka_key()`, `emission_id()`, `kafka_ts_ms()`, the event key's helper) is resolved
    once per type: for the OKX records (most of the traffic) the fields are read directly, which is what
    those methods return. Same order as before: the event key is stored before the body is written (the
    body holds it). tests/unit/test_avro.py checks the result against the methods for every record type.
    """
    src = _SOURCE_HEADERS
    ek_header = EVENT_KEY_HEADER
    force = msgspec.structs.force_setattr
    rid = "record_id"
    if keyed and issubclass(cls, OkxRecord) and cls.source_header is OkxRecord.source_header \
            and cls.emission_id is OkxRecord.emission_id and cls.kafka_ts_ms is OkxRecord.kafka_ts_ms:
        key_of = event_key_function(cls)
        if cls.kafka_key is InstrumentRecord.kafka_key:
            def okx_instrument(r: Any) -> EncodedRecord:
                key = r.event_key
                if key is None:
                    key = key_of(r)
                    force(r, "event_key", key)
                source = r.source
                return EncodedRecord(topic, r.inst_id.encode(), body(r, prefix),
                                     (schema_header, (rid, r.record_id.encode()),
                                      src.get(source) or ("source", source.encode()), (ek_header, key.encode())),
                                     r.ts)
            return okx_instrument
        kafka_key = cls.kafka_key

        def okx_record(r: Any) -> EncodedRecord:
            key = r.event_key
            if key is None:
                key = key_of(r)
                force(r, "event_key", key)
            source = r.source
            return EncodedRecord(topic, kafka_key(r), body(r, prefix),
                                 (schema_header, (rid, r.record_id.encode()),
                                  src.get(source) or ("source", source.encode()), (ek_header, key.encode())),
                                 r.ts)
        return okx_record

    def generic(r: Record) -> EncodedRecord:
        source = r.source_header()
        if keyed:
            headers: tuple[tuple[str, bytes], ...] = (
                schema_header, (rid, record_id(r).encode()), src.get(source) or ("source", source.encode()),
                (ek_header, _finalise_event_key(r).encode()))
        else:
            headers = (schema_header, (rid, record_id(r).encode()), src.get(source) or ("source", source.encode()))
        return EncodedRecord(topic, r.kafka_key(), body(r, prefix), headers, ts_ms(r))
    return generic


class RecordEncoder:
    """Turns record Structs into `EncodedRecord`s: full topic, key, framed Avro value, headers, timestamp.

    `schema_ids` (Avro full name -> Schema Registry id) switches to the Confluent wire format; without it
    the value uses Avro single-object encoding.
    """

    def __init__(self, topic_prefix: str = "okx.", *, schemas: SchemaSet | None = None,
                 schema_ids: Mapping[str, int] | None = None) -> None:
        self.topic_prefix = topic_prefix
        self.schemas = schemas if schemas is not None else default_schemas()
        self.schema_ids = dict(schema_ids) if schema_ids is not None else None
        self._plans: dict[type[Record], _Plan] = {}
        #: Record type -> its `_full_encoder`, filled as types are first seen (read it, do not write it).
        self.encoders: dict[type[Record], Callable[[Record], EncodedRecord]] = {}

    def _plan(self, cls: type[Record]) -> _Plan:
        plan = self._plans.get(cls)
        if plan is None:
            schema = self.schemas[cls.AVRO_NAME]
            if self.schema_ids is None:
                prefix = SINGLE_OBJECT_MAGIC + schema.fingerprint
            else:
                schema_id = self.schema_ids.get(schema.name)
                if schema_id is None:
                    raise SchemaError(f"no schema registry id for {schema.name}; register it before producing")
                prefix = CONFLUENT_MAGIC + schema_id.to_bytes(4, "big")
            # OKX records carry record_id and ts as fields: read them directly instead of calling methods
            okx = issubclass(cls, OkxRecord)
            body = compile_encoder(schema)
            topic = topic_name(self.topic_prefix, cls.TOPIC)
            header = ("schema", schema.name.encode())
            record_id: Callable[[Record], str] = attrgetter("record_id") if okx else cls.emission_id
            ts_ms: Callable[[Record], int] = attrgetter("ts") if okx else cls.kafka_ts_ms
            keyed = has_event_key(cls)
            plan = _Plan(body, prefix, topic, header, record_id, ts_ms, keyed,
                         _full_encoder(cls, body, prefix, topic, header, record_id, ts_ms, keyed))
            self._plans[cls] = plan
            self.encoders[cls] = plan.full
        return plan

    def encoder_for(self, cls: type[Record]) -> Callable[[Record], EncodedRecord]:
        """`encode` for records of `cls` alone: a hot loop looks it up in `encoders` and calls it directly."""
        full = self.encoders.get(cls)
        return full if full is not None else self._plan(cls).full

    def value(self, record: Record) -> bytes:
        """The framed Avro value alone."""
        plan = self._plan(type(record))
        if plan.keyed:
            _finalise_event_key(record)
        return plan.encode(record, plan.prefix)

    def encode(self, record: Record) -> EncodedRecord:
        """The record as Kafka will store it: the event key is computed here, where every record passes once."""
        full = self.encoders.get(type(record))
        return (full if full is not None else self._plan(type(record)).full)(record)


def _finalise_event_key(record: Record) -> str:
    """The record's event key, computed and stored in it when it has none yet.

    Filled in place (msgspec's force_setattr) rather than copied: a copy of a frozen record costs a full
    replace per record on the hot path, and the key is a pure function of the fields, so setting it once
    changes no value the record already showed. Records are made by the normalizer and published once.
    """
    key: str | None = record.event_key  # type: ignore[attr-defined]
    if key is None:
        key = event_key(record)
        assert key is not None  # plan.keyed: the type has a key function
        msgspec.structs.force_setattr(record, "event_key", key)
    return key


def avro_body(record: Record, schemas: SchemaSet | None = None) -> bytes:
    """The bare Avro binary of `record` (no framing): what fastavro's schemaless_writer writes."""
    schema = (schemas or default_schemas())[record.AVRO_NAME]
    return _cached_encoder(schema)(record, b"")


@functools.cache
def _cached_encoder(schema: AvroSchema) -> Encoder:
    return compile_encoder(schema)


# ---------------------------------------------------------------------------------------------- decoding


@dataclass(frozen=True, slots=True)
class Framing:
    """What the first bytes of a value say: the wire format and which schema wrote the body."""

    wire_format: str  # "single-object" or "confluent"
    fingerprint: bytes | None
    schema_id: int | None
    body_offset: int


def read_framing(value: bytes) -> Framing:
    """Recognise single-object (`C3 01` + fingerprint) or Confluent (`00` + id) framing."""
    if value[:2] == SINGLE_OBJECT_MAGIC and len(value) >= 10:
        return Framing("single-object", bytes(value[2:10]), None, 10)
    if value[:1] == CONFLUENT_MAGIC and len(value) >= 5:
        return Framing("confluent", None, int.from_bytes(value[1:5], "big"), 5)
    raise DecodeError(f"value starts with {bytes(value[:2]).hex() or 'nothing'}: neither Avro single-object "
                      "(c301) nor Confluent (00) framing")


def decode_fields(value: bytes, schemas: SchemaSet | None = None, *, schema_name: str | None = None,
                  schema_ids: Mapping[int, str] | None = None) -> tuple[str, dict[str, object]]:
    """The Avro full name and field values (as fastavro reads them) of one framed value.

    Single-object values name their schema by fingerprint. Confluent values carry a registry id: pass the
    registry's `schema_ids` (id -> full name), or the Kafka `schema` header as `schema_name`.
    """
    schemas = schemas if schemas is not None else default_schemas()
    framing = read_framing(value)
    if framing.fingerprint is not None:
        schema = schemas.by_fingerprint.get(framing.fingerprint)
        if schema is not None:
            return schema.name, _read_body(value, framing.body_offset, schema, None)
        writer = schemas.previous.get(framing.fingerprint)
        if writer is None:
            raise DecodeError(f"unknown schema fingerprint {framing.fingerprint.hex()}: written with a schema "
                              "these .avsc files do not have")
        return writer.name, _read_body(value, framing.body_offset, schemas[writer.name], writer)
    name = schema_ids.get(framing.schema_id) if schema_ids is not None and framing.schema_id is not None \
        else None
    name = name or schema_name
    if name is None:
        raise DecodeError(f"Confluent schema id {framing.schema_id} and no way to resolve it: pass schema_ids "
                          "or the Kafka `schema` header as schema_name")
    try:
        schema = schemas[name]
    except SchemaError as exc:
        raise DecodeError(str(exc)) from None
    try:
        return schema.name, _read_body(value, framing.body_offset, schema, None)
    except DecodeError:
        # A registry id does not say which version wrote the body: try the older schemas of that name.
        for writer in schemas.previous_of(schema.name):
            try:
                return schema.name, _read_body(value, framing.body_offset, schema, writer)
            except DecodeError:
                continue
        raise


def _read_body(value: bytes, offset: int, schema: AvroSchema, writer: AvroSchema | None) -> dict[str, object]:
    """The field values of the body at `offset`, written with `writer` (default: `schema`) and read as `schema`."""
    body = io.BytesIO(value[offset:])
    try:
        if writer is None:
            fields = fastavro.schemaless_reader(body, schema.parsed, None)
        else:
            fields = fastavro.schemaless_reader(body, writer.parsed, schema.parsed)
    except (EOFError, ValueError, IndexError, UnicodeDecodeError, StopIteration) as exc:
        raise DecodeError(f"corrupt {schema.name} body: {type(exc).__name__}: {exc}") from None
    if body.tell() != len(value) - offset:
        raise DecodeError(f"{len(value) - offset - body.tell()} trailing bytes after a {schema.name}")
    if not isinstance(fields, dict):
        raise DecodeError(f"{schema.name} did not decode to a record")
    return fields


def decode(value: bytes, schemas: SchemaSet | None = None, *, schema_name: str | None = None,
           schema_ids: Mapping[int, str] | None = None) -> Record:
    """The record Struct of one framed value (replay, tests, Python consumers)."""
    name, fields = decode_fields(value, schemas, schema_name=schema_name, schema_ids=schema_ids)
    cls = STRUCT_BY_AVRO_NAME.get(name)
    if cls is None or not issubclass(cls, Record):
        raise DecodeError(f"{name} is not a top-level record of this package")
    try:
        return msgspec.convert(fields, cls)
    except msgspec.ValidationError as exc:
        raise DecodeError(f"{name} does not fit {cls.__name__}: {exc}") from None


class Decoder:
    """`decode` for a consumer of many values (the archiver): the same records and the same errors, minus the
    per-value lookups.

    Values framed with a current schema's fingerprint are read straight into that schema's Struct (schema
    and class looked up once per fingerprint, no framing object, no copy of the body); anything else
    (Confluent framing, an older writer schema, a value that fails) goes through `decode`, so behaviour
    and error messages are exactly `decode`'s.
    """

    __slots__ = ("_plans", "_schemas")

    def __init__(self, schemas: SchemaSet | None = None) -> None:
        self._schemas = schemas
        self._plans: dict[bytes, tuple[FastavroSchema, type[Record], str]] = {}

    def _plan(self, fingerprint: bytes) -> tuple[FastavroSchema, type[Record], str] | None:
        schemas = self._schemas if self._schemas is not None else default_schemas()
        schema = schemas.by_fingerprint.get(fingerprint)
        if schema is None:
            return None
        cls = STRUCT_BY_AVRO_NAME.get(schema.name)
        if cls is None or not issubclass(cls, Record):
            return None
        plan = self._plans[fingerprint] = (schema.parsed, cls, schema.name)
        return plan

    def decode(self, value: bytes, *, schema_name: str | None = None) -> Record:
        """The record Struct of one framed value; `schema_name` as for `decode` (Confluent framing only)."""
        if value[:2] == SINGLE_OBJECT_MAGIC and len(value) >= 10:
            fp = value[2:10]
            plan = self._plans.get(fp) or self._plan(fp)
            if plan is not None:
                body = io.BytesIO(value)
                body.seek(10)
                try:
                    fields = fastavro.schemaless_reader(body, plan[0], None)
                    if body.tell() == len(value) and isinstance(fields, dict):
                        return msgspec.convert(fields, plan[1])
                except (EOFError, ValueError, IndexError, UnicodeDecodeError, StopIteration,
                        msgspec.ValidationError):
                    pass
        return decode(value, self._schemas, schema_name=schema_name)
