"""The record contract: the Structs of ingest/core/records.py, and the schemas/*.avsc files generated from them."""

from __future__ import annotations

import io
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import fastavro
import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ingest.core.avro import RecordEncoder, decode, default_schemas
from ingest.core.contract import schema_files
from ingest.core.records import (
    LEGACY_RECORD_TYPES,
    NAMESPACE,
    RECORD_TYPES,
    AlgoOrder,
    Balance,
    BookAction,
    BookUpdate,
    DeadLetter,
    DeadLetterReason,
    Fill,
    GapEvent,
    GapKind,
    GapStatus,
    Order,
    Position,
    RawFrame,
    RawFrameEntry,
    RawFrames,
    Record,
    Source,
    TopicKind,
    Trade,
    avro_field_name,
    topic_name,
)
from ingest.io.schemas import load_schemas, packaged_schemas, schema_directory

REPO = Path(__file__).resolve().parents[2]
SCHEMA_FILES = sorted((REPO / "schemas").glob("*.avsc"))


def load(path: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(path.read_text())
    return data


def full_name(schema: Mapping[str, Any]) -> str:
    return f"{schema['namespace']}.{schema['name']}"


# ------------------------------------------------------------------------------------------------ strategies


def avro_values(schema: Any, named: dict[str, Any], namespace: str) -> st.SearchStrategy[Any]:
    """Values fastavro accepts for `schema`, shaped so msgspec.convert turns records into our Structs."""
    if isinstance(schema, list):
        return st.one_of(*(avro_values(branch, named, namespace) for branch in schema))
    if isinstance(schema, str):
        primitive: dict[str, st.SearchStrategy[Any]] = {
            "null": st.none(),
            "string": st.text(max_size=40),
            "bytes": st.binary(max_size=60),
            "long": st.integers(-(2**63), 2**63 - 1),
            "int": st.integers(-(2**31), 2**31 - 1),
            "boolean": st.booleans(),
        }
        if schema in primitive:
            return primitive[schema]
        return avro_values(named[schema if "." in schema else f"{namespace}.{schema}"], named, namespace)
    kind = schema["type"]
    if kind == "enum":
        named[f"{schema.get('namespace', namespace)}.{schema['name']}"] = schema
        return st.sampled_from(schema["symbols"])
    if kind == "record":
        named[f"{schema.get('namespace', namespace)}.{schema['name']}"] = schema
        fields: dict[str, st.SearchStrategy[Any]] = {}
        for field in schema["fields"]:  # in order, so named types are defined before they are referenced
            fields[field["name"]] = avro_values(field["type"], named, namespace)
        return st.fixed_dictionaries(fields)
    if kind == "map":
        return st.dictionaries(st.text(max_size=12), avro_values(schema["values"], named, namespace), max_size=3)
    if kind == "array":
        if schema["items"] == {"type": "array", "items": "string"}:  # book levels: four strings each
            return st.lists(st.tuples(*[st.text(max_size=12)] * 4), max_size=4)
        return st.lists(avro_values(schema["items"], named, namespace), max_size=4)
    return avro_values(kind, named, namespace)


def records_of(cls: type[Record]) -> st.SearchStrategy[Record]:
    """Arbitrary valid instances of one record Struct, built from its .avsc file."""
    schema = default_schemas()[cls.AVRO_NAME].source
    return avro_values(schema, {}, NAMESPACE).map(lambda fields: msgspec.convert(fields, cls))


any_record = st.sampled_from(RECORD_TYPES + LEGACY_RECORD_TYPES).flatmap(records_of)

# ------------------------------------------------------------------------------------------------ contract


def test_there_is_one_schema_file_per_record_type_and_no_other() -> None:
    names = {full_name(load(p)) for p in SCHEMA_FILES}
    assert names == {cls.AVRO_NAME for cls in RECORD_TYPES + LEGACY_RECORD_TYPES}
    assert len(SCHEMA_FILES) == len(RECORD_TYPES) + len(LEGACY_RECORD_TYPES)


def test_every_schema_is_in_the_okx_ingest_v1_namespace_and_parses_alone() -> None:
    for path in SCHEMA_FILES:
        schema = load(path)
        assert schema["namespace"] == "okx.ingest.v1", path.name
        fastavro.parse_schema(schema, named_schemas={})


def walk_docs(schema: Any, where: str) -> list[str]:
    """Places of `schema` (records, enums, fields) that lack a non-empty doc."""
    missing: list[str] = []
    if isinstance(schema, list):
        for branch in schema:
            missing += walk_docs(branch, where)
    elif isinstance(schema, dict):
        kind = schema.get("type")
        if kind in ("record", "enum") and not str(schema.get("doc", "")).strip():
            missing.append(f"{where}:{schema['name']}")
        if kind == "record":
            for field in schema["fields"]:
                if not str(field.get("doc", "")).strip():
                    missing.append(f"{where}.{field['name']}")
                missing += walk_docs(field["type"], f"{where}.{field['name']}")
        elif kind in ("array", "map"):
            missing += walk_docs(schema.get("items", schema.get("values")), where)
    return missing


def test_every_record_enum_and_field_has_a_doc() -> None:
    missing = [m for p in SCHEMA_FILES for m in walk_docs(load(p), p.stem)]
    assert missing == []


def test_decimal_rationale_is_in_the_docs_of_every_okx_record() -> None:
    for path in SCHEMA_FILES:
        schema = load(path)
        if schema["name"] not in ("GapEvent", "DeadLetter", "RawFrames", "RawFrame"):
            assert "exact strings OKX sent" in schema["doc"] and "decimal.Decimal" in schema["doc"], path.name


COMMON = ["exchange", "channel", "instId", "instType", "ts", "recvTsNs", "source", "connId", "recvSeq", "recordId"]


def test_every_market_and_private_record_starts_with_the_common_fields_and_ends_with_extra_and_event_key() -> None:
    for path in SCHEMA_FILES:
        schema = load(path)
        if schema["name"] in ("GapEvent", "DeadLetter", "RawFrames", "RawFrame"):
            continue
        names = [f["name"] for f in schema["fields"]]
        assert names[: len(COMMON)] == COMMON, path.name
        assert names[-2:] == ["extra", "eventKey"], path.name
        types_ = {f["name"]: f["type"] for f in schema["fields"]}
        assert types_["ts"] == "long" and types_["recvTsNs"] == "long"
        assert types_["instType"] == ["null", "string"] and types_["connId"] == ["null", "string"]
        assert types_["recvSeq"] == ["null", "long"] and types_["extra"] == {"type": "map", "values": "string"}
        assert types_["eventKey"] == ["null", "string"]
        assert types_["instId"] == (["null", "string"] if schema["name"] == "Balance" else "string")


def test_the_committed_schema_files_are_exactly_what_the_structs_generate() -> None:
    # The Structs (core/records.py, core/record_docs.py) are the contract's one source; schemas/ is generated.
    generated = schema_files()
    assert sorted(generated) == [p.name for p in SCHEMA_FILES]
    outdated = [name for name, text in generated.items() if (REPO / "schemas" / name).read_text() != text]
    assert outdated == [], "schemas/*.avsc differ from ingest/core/records.py: run `make schemas`"


def test_struct_attribute_names_map_to_okx_names_including_irregular_capitals() -> None:
    assert avro_field_name("inst_id") == "instId"
    assert avro_field_name("vol_ccy24h") == "volCcy24h"
    assert avro_field_name("delta_bs") == "deltaBS"
    assert avro_field_name("notional_usd_for_borrow") == "notionalUsdForBorrow"


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(any_record)
def test_every_record_round_trips_through_fastavro(record: Record) -> None:
    parsed = default_schemas()[record.AVRO_NAME].parsed
    buffer = io.BytesIO()
    fastavro.schemaless_writer(buffer, parsed, msgspec.to_builtins(record, builtin_types=(bytes,)))
    buffer.seek(0)
    back = msgspec.convert(fastavro.schemaless_reader(buffer, parsed, None), type(record))
    assert back == record


# ------------------------------------------------------------------------------------------------ topics, keys


def test_default_topic_names_are_the_documented_ones() -> None:
    names = {topic_name("okx.", kind) for kind in TopicKind}
    assert names == {
        "okx.trades", "okx.books", "okx.tickers", "okx.candles", "okx.mark_prices", "okx.index_tickers",
        "okx.funding_rates", "okx.open_interest", "okx.liquidations", "okx.price_limits", "okx.instruments",
        "okx.orders", "okx.fills", "okx.positions", "okx.balances", "okx.algo_orders", "okx.gaps", "okx.dlq",
        "okx.raw",
    }
    assert topic_name("prod.okx.", TopicKind.TRADES) == "prod.okx.trades"


def test_every_topic_kind_has_exactly_one_record_type() -> None:
    assert sorted(cls.TOPIC for cls in RECORD_TYPES) == sorted(TopicKind)


def test_okx_raw_written_by_older_builds_still_decodes() -> None:
    old = RawFrame(conn_id="public-0#2", name="public-0", endpoint="/ws/v5/public", recv_seq=4,
                   recv_ts_ns=3_000_000, payload=b"{}")
    assert decode(RecordEncoder().value(old)) == old
    assert RawFrame.TOPIC is RawFrames.TOPIC and RawFrame not in RECORD_TYPES  # read, never produced


COMMON_VALUES: dict[str, Any] = {"channel": "x", "ts": 1, "recv_ts_ns": 2, "source": Source.WS, "record_id": "c:1:0"}


def test_kafka_keys_keep_what_must_stay_ordered_in_one_partition() -> None:
    trade = Trade(**COMMON_VALUES, inst_id="BTC-USDT", trade_id="1", px="1", sz="1", side="buy")
    assert trade.kafka_key() == b"BTC-USDT"
    assert BookUpdate(**COMMON_VALUES, inst_id="BTC-USDT", action=BookAction.SNAPSHOT, asks=(), bids=()).kafka_key() \
        == b"BTC-USDT"
    assert Order(**COMMON_VALUES, inst_id="BTC-USDT", ord_id="42", u_time="1").kafka_key() == b"42"
    assert Fill(**COMMON_VALUES, inst_id="BTC-USDT", trade_id="7", ord_id="42", fill_px="1", fill_sz="1",
                side="buy").kafka_key() == b"42"
    assert Position(**COMMON_VALUES, inst_id="BTC-USDT-SWAP", u_time="1").kafka_key() == b"BTC-USDT-SWAP"
    assert Balance(**COMMON_VALUES, ccy="USDT", u_time="1").kafka_key() == b"USDT"
    assert Balance(**COMMON_VALUES, u_time="1").kafka_key() == b"account"
    assert AlgoOrder(**COMMON_VALUES, inst_id="BTC-USDT", algo_id="9", u_time="1").kafka_key() == b"9"
    gap = GapEvent(gap_id="g", kind=GapKind.TRADE_HOLE, status=GapStatus.OPEN, reason="r", channel="trades",
                   inst_id="BTC-USDT", detected_ts_ns=5_000_000)
    assert gap.kafka_key() == b"trades:BTC-USDT"
    assert GapEvent(gap_id="g", kind=GapKind.DISCONNECT, status=GapStatus.OPEN, reason="r",
                    channel="liquidation-orders", inst_type="SWAP", detected_ts_ns=1).kafka_key() \
        == b"liquidation-orders:SWAP"
    dead = DeadLetter(reason_code=DeadLetterReason.BAD_JSON, reason="r", raw=b"{", source=Source.WS,
                      conn_id="public-0#2", recv_ts_ns=3_000_000, record_id="public-0#2:1:dlq")
    assert dead.kafka_key() == b"public-0#2"
    raw = RawFrames(conn_id="public-0#2", name="public-0", endpoint="/ws/v5/public",
                    frames=(RawFrameEntry(recv_seq=4, recv_ts_ns=3_000_000, payload=b"{}"),))
    assert raw.kafka_key() == b"public-0#2"


def test_record_id_header_values_identify_one_emission() -> None:
    gap = GapEvent(gap_id="g1", revision=2, kind=GapKind.TRADE_HOLE, status=GapStatus.PARTIAL, reason="r",
                   channel="trades", detected_ts_ns=7_000_000, updated_ts_ns=9_000_000)
    assert gap.emission_id() == "gap:g1:2"
    assert gap.kafka_ts_ms() == 9
    raw = RawFrames(conn_id="c", name="n", endpoint="/ws/v5/public",
                    frames=(RawFrameEntry(recv_seq=4, recv_ts_ns=3_000_000, payload=b""),
                            RawFrameEntry(recv_seq=5, recv_ts_ns=4_000_000, payload=b"{}")))
    assert raw.emission_id() == "c:4-5" and raw.kafka_ts_ms() == 4
    trade = Trade(**COMMON_VALUES, inst_id="BTC-USDT", trade_id="1", px="1", sz="1", side="buy")
    assert trade.emission_id() == "c:1:0" and trade.kafka_ts_ms() == 1 and trade.source_header() == "ws"


# ------------------------------------------------------------------------------------------------ packaging


def test_installed_package_reads_the_same_schema_files_as_the_repository() -> None:
    packaged = schema_directory()
    assert packaged.resolve() == (REPO / "schemas").resolve()
    assert sorted(p.name for p in packaged.glob("*.avsc")) == [p.name for p in SCHEMA_FILES]
    assert len(default_schemas()) == len(SCHEMA_FILES)
    # Core reads no files: its default is the set the package root registered, read by io.schemas.
    assert default_schemas() is packaged_schemas()


def test_schema_loading_fails_loudly_on_a_broken_file(tmp_path: Path) -> None:
    from ingest.core.avro import SchemaError

    (tmp_path / "bad.avsc").write_text('{"type": "record", "name": "X", "fields": [{"name": "a"}]}')
    with pytest.raises(SchemaError, match=r"bad\.avsc"):
        load_schemas(tmp_path)
    (tmp_path / "bad.avsc").write_text('{"type": "record", ')
    with pytest.raises(SchemaError, match=r"bad\.avsc"):
        load_schemas(tmp_path)
    with pytest.raises(SchemaError, match=r"no \.avsc files"):
        load_schemas(tmp_path / "missing")


def test_a_registered_schema_set_replaces_the_packaged_default(tmp_path: Path) -> None:
    from ingest.core import avro

    (tmp_path / "trade.avsc").write_bytes((schema_directory() / "trade.avsc").read_bytes())
    mine = load_schemas(tmp_path)
    try:
        avro.set_default_source(mine)
        assert avro.default_schemas() is mine and RecordEncoder().schemas is mine
        assert [s.name for s in mine] == ["okx.ingest.v1.Trade"]
        with pytest.raises(avro.SchemaError, match="no schema named"):
            RecordEncoder().schemas["okx.ingest.v1.Ticker"]
    finally:
        avro.set_default_source(packaged_schemas)
    assert avro.default_schemas() is packaged_schemas()
