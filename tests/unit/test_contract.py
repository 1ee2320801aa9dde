"""The generator of the record contract: Structs (core/records.py, core/record_docs.py) -> schemas/*.avsc.

That the committed files are what it generates is tests/unit/test_records.py's; here: what it generates from
a Struct, that it refuses what it cannot express, and the writer behind `make schemas`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, ClassVar

import msgspec
import pytest

from ingest.core import contract
from ingest.core.contract import ContractError, avro_schema, render, schema_file_name, schema_files
from ingest.core.record_docs import RECORD_DOCS, RecordDoc
from ingest.core.records import (
    LEGACY_RECORD_TYPES,
    RECORD_TYPES,
    STRUCT_BY_AVRO_NAME,
    BookUpdate,
    GapEvent,
    RawFrames,
    Record,
    Source,
    TopicKind,
    Trade,
)
from ingest.io.schemas import main, outdated_schema_files, stale_schema_files, write_schemas


class Probe(Record, frozen=True, kw_only=True):
    """A record for the generator only (never registered)."""

    AVRO_NAME: ClassVar[str] = "okx.ingest.v1.Probe"
    TOPIC: ClassVar[TopicKind] = TopicKind.RAW

    seen_at: int
    source: Source = Source.WS
    note: str | None = None
    tags: tuple[str, ...] = ()


def docs_with(cls: type[Record], docs: RecordDoc) -> dict[type[msgspec.Struct], RecordDoc]:
    """The real docs table plus one for a test-only record."""
    table: dict[type[msgspec.Struct], RecordDoc] = dict(RECORD_DOCS)
    table[cls] = docs
    return table


PROBE_DOCS = RecordDoc("A probe.", {"seen_at": "When.", "source": "From where.", "note": "Why.", "tags": "Tags."})


def named_records(schema: Any) -> list[dict[str, Any]]:
    """Every record schema defined inside `schema`, itself included."""
    if isinstance(schema, list):
        return [r for branch in schema for r in named_records(branch)]
    if not isinstance(schema, dict):
        return []
    if schema["type"] == "record":
        return [schema, *(r for f in schema["fields"] for r in named_records(f["type"]))]
    return named_records(schema.get("items", schema.get("values")))


def test_a_struct_becomes_its_avro_schema_in_field_order_with_camel_case_names_types_and_defaults(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(contract, "RECORD_DOCS", docs_with(Probe, PROBE_DOCS))
    assert avro_schema(Probe) == {
        "type": "record", "name": "Probe", "namespace": "okx.ingest.v1", "doc": "A probe.",
        "fields": [
            {"name": "seenAt", "type": "long", "doc": "When."},
            {"name": "source", "type": {"type": "enum", "name": "Source", "doc": "Where a record came from.",
                                        "symbols": ["ws", "rest"]}, "doc": "From where.", "default": "ws"},
            {"name": "note", "type": ["null", "string"], "doc": "Why.", "default": None},
            {"name": "tags", "type": {"type": "array", "items": "string"}, "doc": "Tags.", "default": []},
        ],
    }
    assert schema_file_name(Probe) == "probe.avsc" and schema_file_name(BookUpdate) == "book_update.avsc"


def test_a_named_type_is_defined_at_its_first_use_and_referenced_by_full_name_after() -> None:
    fields = {f["name"]: f["type"] for f in avro_schema(GapEvent)["fields"]}
    assert fields["before"][1]["name"] == "StreamPosition" and "namespace" not in fields["before"][1]
    assert fields["after"] == ["null", "okx.ingest.v1.StreamPosition"]


def test_32_bit_counters_and_enum_defaults_come_from_the_contract_tables() -> None:
    fields = {f["name"]: f["type"] for f in avro_schema(GapEvent)["fields"]}
    assert fields["revision"] == "int" and fields["attempts"] == "int" and fields["detectedTsNs"] == "long"
    assert fields["kind"]["default"] == "other" and "default" not in fields["status"]
    book = {f["name"]: f["type"] for f in avro_schema(BookUpdate)["fields"]}
    assert book["action"]["default"] == "snapshot"
    assert book["asks"] == {"type": "array", "items": {"type": "array", "items": "string"}}


def test_every_record_defined_in_a_generated_schema_has_its_struct_under_its_avro_name() -> None:
    # The encoder and decoder find a record's Struct by the Avro full name (nested ones included).
    for cls in RECORD_TYPES + LEGACY_RECORD_TYPES:
        schema = avro_schema(cls)
        for record in named_records(schema):
            full = f"{schema['namespace']}.{record['name']}"
            assert getattr(STRUCT_BY_AVRO_NAME[full], "AVRO_NAME", None) == full
    assert {r["name"] for r in named_records(avro_schema(RawFrames))} == {"RawFrames", "RawFrameEntry"}


def test_a_field_without_a_doc_or_a_doc_without_a_field_fails_the_generator_naming_it(
        monkeypatch: pytest.MonkeyPatch) -> None:
    missing = RecordDoc("A probe.", {k: v for k, v in PROBE_DOCS.fields.items() if k != "note"})
    monkeypatch.setattr(contract, "RECORD_DOCS", docs_with(Probe, missing))
    with pytest.raises(ContractError, match=r"Probe\.note has no doc"):
        avro_schema(Probe)
    stale = RecordDoc("A probe.", {**PROBE_DOCS.fields, "gone": "A field since removed."})
    monkeypatch.setattr(contract, "RECORD_DOCS", docs_with(Probe, stale))
    with pytest.raises(ContractError, match=r"Probe documents fields it does not have: \['gone'\]"):
        avro_schema(Probe)
    monkeypatch.setattr(contract, "RECORD_DOCS", RECORD_DOCS)
    with pytest.raises(ContractError, match="Probe has no entry"):
        avro_schema(Probe)


def test_a_type_avro_cannot_express_here_fails_the_generator_naming_the_field(
        monkeypatch: pytest.MonkeyPatch) -> None:
    class Odd(Record, frozen=True, kw_only=True):
        AVRO_NAME: ClassVar[str] = "okx.ingest.v1.Odd"
        TOPIC: ClassVar[TopicKind] = TopicKind.RAW

        pair: int | str

    monkeypatch.setattr(contract, "RECORD_DOCS", docs_with(Odd, RecordDoc("Odd.", {"pair": "Either."})))
    with pytest.raises(ContractError, match=r"Odd\.pair: only `T \| None` unions"):
        avro_schema(Odd)


def test_the_rendering_is_the_committed_files_formatting() -> None:
    text = schema_files()["trade.avsc"]
    assert text == render(avro_schema(Trade))
    assert text.startswith('{\n  "type": "record",\n  "name": "Trade",\n') and text.endswith("]\n}\n")
    assert text.isascii() and json.loads(text) == avro_schema(Trade)


# ------------------------------------------------------------------------------------------------ the writer


def test_write_schemas_writes_every_file_once_and_then_nothing(tmp_path: Path) -> None:
    assert write_schemas(tmp_path) == list(schema_files())
    assert {p.name: p.read_bytes() for p in tmp_path.glob("*.avsc")} == \
        {name: text.encode() for name, text in schema_files().items()}
    assert write_schemas(tmp_path) == [] and outdated_schema_files(tmp_path) == []


def test_check_names_an_edited_file_and_the_fix_and_write_restores_it(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write_schemas(tmp_path)
    edited = tmp_path / "trade.avsc"
    edited.write_text(edited.read_text().replace("Trade price", "Price"))
    assert main(["--check", str(tmp_path)]) == 1
    assert "trade.avsc: not what ingest/core/records.py generates; run `make schemas`" in capsys.readouterr().err
    assert main(["--write", str(tmp_path)]) == 0
    assert capsys.readouterr().out == f"wrote {edited}\n"
    assert main(["--check", str(tmp_path)]) == 0


def test_a_schema_file_no_record_generates_is_reported_not_deleted(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write_schemas(tmp_path)
    (tmp_path / "previous").mkdir()
    (tmp_path / "previous" / "trade.0011223344556677.avsc").write_text("{}")  # history: never looked at
    (tmp_path / "retired.avsc").write_text("{}")
    assert stale_schema_files(tmp_path) == ["retired.avsc"]
    assert main(["--check", str(tmp_path)]) == 1
    assert "retired.avsc belong to no record" in capsys.readouterr().err
    assert main(["--write", str(tmp_path)]) == 1
    assert (tmp_path / "retired.avsc").exists()
    assert main(["--check", str(tmp_path / "missing")]) == 2
