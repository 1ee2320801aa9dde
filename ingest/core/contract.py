"""The record contract, generated: each record's Avro schema built from its Struct in `records.py`.

The Structs are the one source. Field order, the camelCase Avro names (`avro_field_name`), the types,
nullability and defaults come from the Struct itself; the prose (record, enum and field docs) from
`record_docs.py`; the two facts Avro needs that Python types do not carry (32-bit ints, enum defaults) from
the small tables below. `schema_files()` renders every current and legacy record as the text of its
`schemas/*.avsc` file; `ingest.io.schemas` writes them (`make schemas`) and tests/unit/test_records.py fails
when the committed files differ, so the files and the Structs cannot drift. `schemas/previous/` is history
(frozen writer schemas of earlier builds) and is never generated.

Pure: builds dicts and strings, reads and writes nothing.
"""

from __future__ import annotations

import enum
import json
import re
import types
import typing
from collections.abc import Mapping
from typing import Any

import msgspec

from ingest.core.record_docs import ENUM_DOCS, RECORD_DOCS
from ingest.core.records import (
    LEGACY_RECORD_TYPES,
    NAMESPACE,
    RECORD_TYPES,
    BookAction,
    DeadLetterReason,
    GapEvent,
    GapKind,
    Record,
)
from ingest.errors import IngestError

#: Avro JSON as json.dumps writes it.
AvroJson = dict[str, Any]

#: Struct attributes written as Avro `int` (32-bit) rather than `long`: small counters, kept so because the
#: published schemas say so (changing the width would change the schema fingerprint).
INT32_FIELDS: frozenset[tuple[type[msgspec.Struct], str]] = frozenset({
    (GapEvent, "revision"), (GapEvent, "attempts"),
})

#: Avro enum defaults: the symbol a reader with this schema uses for a symbol it does not know (one a later
#: writer added), so adding a symbol is a compatible change. Enums not listed have none.
ENUM_DEFAULTS: Mapping[type[enum.Enum], enum.Enum] = {
    BookAction: BookAction.SNAPSHOT,
    GapKind: GapKind.OTHER,
    DeadLetterReason: DeadLetterReason.OTHER,
}

_PRIMITIVES: Mapping[type, str] = {str: "string", bool: "boolean", float: "double", bytes: "bytes"}


class ContractError(IngestError):
    """A Struct the generator cannot express in Avro, or docs that do not match its fields (a code bug)."""


def _full_name(cls: type) -> str:
    avro_name = getattr(cls, "AVRO_NAME", None)
    return avro_name if isinstance(avro_name, str) else f"{NAMESPACE}.{cls.__name__}"


class _Builder:
    """One schema file's worth of building: a named type is defined at its first use, referenced after."""

    def __init__(self) -> None:
        self.defined: set[str] = set()

    def record(self, cls: type[msgspec.Struct], *, top_level: bool) -> AvroJson:
        full = _full_name(cls)
        namespace, _, name = full.rpartition(".")
        docs = RECORD_DOCS.get(cls)
        if docs is None:
            raise ContractError(f"{cls.__name__} has no entry in record_docs.RECORD_DOCS")
        struct_fields = msgspec.structs.fields(cls)
        stale = set(docs.fields) - {f.name for f in struct_fields}
        if stale:
            raise ContractError(f"record_docs: {cls.__name__} documents fields it does not have: {sorted(stale)}")
        self.defined.add(full)
        schema: AvroJson = {"type": "record", "name": name}
        if top_level:
            schema["namespace"] = namespace
        schema["doc"] = docs.doc
        schema["fields"] = [self.field(cls, f, docs.fields) for f in struct_fields]
        return schema

    def field(self, cls: type[msgspec.Struct], f: msgspec.structs.FieldInfo, docs: Mapping[str, str]) -> AvroJson:
        where = f"{cls.__name__}.{f.name}"
        doc = docs.get(f.name)
        if not doc:
            raise ContractError(f"{where} has no doc in record_docs.RECORD_DOCS")
        int32 = (cls, f.name) in INT32_FIELDS
        out: AvroJson = {"name": f.encode_name, "type": self.avro_type(f.type, where, int32=int32), "doc": doc}
        if not f.required:
            default = f.default if f.default_factory is msgspec.NODEFAULT else f.default_factory()
            if isinstance(out["type"], list) and default is not None:
                raise ContractError(f"{where}: a nullable field's default must be None (Avro: the first branch)")
            out["default"] = _json_default(default, where)
        return out

    def avro_type(self, tp: Any, where: str, *, int32: bool = False) -> Any:
        origin, args = typing.get_origin(tp), typing.get_args(tp)
        if origin in (typing.Union, types.UnionType):
            rest = [a for a in args if a is not type(None)]
            if len(args) != 2 or len(rest) != 1:
                raise ContractError(f"{where}: only `T | None` unions have an Avro form here, not {tp!r}")
            return ["null", self.avro_type(rest[0], where, int32=int32)]
        if tp is int:
            return "int" if int32 else "long"
        if isinstance(tp, type) and tp in _PRIMITIVES:
            return _PRIMITIVES[tp]
        if isinstance(tp, type) and issubclass(tp, enum.Enum):
            return self.enum(tp, where)
        if isinstance(tp, type) and issubclass(tp, msgspec.Struct):
            full = _full_name(tp)
            return full if full in self.defined else self.record(tp, top_level=False)
        if origin is dict and args and args[0] is str:
            return {"type": "map", "values": self.avro_type(args[1], where)}
        if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
            return {"type": "array", "items": self.avro_type(args[0], where)}
        if origin is tuple and args and len(set(args)) == 1:  # a fixed-size tuple of one type: an array of it
            return {"type": "array", "items": self.avro_type(args[0], where)}
        if origin is list and args:
            return {"type": "array", "items": self.avro_type(args[0], where)}
        raise ContractError(f"{where}: no Avro type for {tp!r}; extend ingest/core/contract.py")

    def enum(self, cls: type[enum.Enum], where: str) -> Any:
        full = _full_name(cls)
        if full in self.defined:
            return full
        doc = ENUM_DOCS.get(cls)
        if not doc:
            raise ContractError(f"{where}: enum {cls.__name__} has no doc in record_docs.ENUM_DOCS")
        self.defined.add(full)
        schema: AvroJson = {"type": "enum", "name": cls.__name__, "doc": doc,
                            "symbols": [str(m.value) for m in cls]}
        default = ENUM_DEFAULTS.get(cls)
        if default is not None:
            schema["default"] = str(default.value)
        return schema


def _json_default(value: object, where: str) -> object:
    """A Struct default as Avro JSON: enums by symbol, tuples as arrays, containers element by element."""
    if isinstance(value, enum.Enum):  # before str: a StrEnum member is a str too
        return value.value
    if value is None or isinstance(value, str | bool | int | float):
        return value
    if isinstance(value, dict):
        return {str(k): _json_default(v, where) for k, v in value.items()}
    if isinstance(value, tuple | list):
        return [_json_default(v, where) for v in value]
    raise ContractError(f"{where}: default {value!r} has no Avro JSON form")


def avro_schema(cls: type[Record]) -> AvroJson:
    """The self-contained Avro schema of one top-level record (its nested types defined inline)."""
    return _Builder().record(cls, top_level=True)


def schema_file_name(cls: type[Record]) -> str:
    """The .avsc file of a record: its Avro name in snake_case (`BookUpdate` -> `book_update.avsc`)."""
    name = _full_name(cls).rpartition(".")[2]
    return re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower() + ".avsc"


def render(schema: AvroJson) -> str:
    """The text of an .avsc file: the formatting every committed file has (2-space indent, ASCII, newline)."""
    return json.dumps(schema, indent=2, ensure_ascii=True) + "\n"


def schema_files() -> dict[str, str]:
    """Every current and legacy record's .avsc file: file name -> text, in docs/RECORDS.md order."""
    return {schema_file_name(cls): render(avro_schema(cls)) for cls in RECORD_TYPES + LEGACY_RECORD_TYPES}
