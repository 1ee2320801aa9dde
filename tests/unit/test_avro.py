"""Records on the wire: single-object and Confluent framing, exact Avro bytes, decoding with the .avsc files alone."""

from __future__ import annotations

import functools
import io
import json
from pathlib import Path
from typing import Any

import fastavro
import msgspec
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from ingest.core.avro import (
    DecodeError,
    Decoder,
    Encoder,
    RecordEncoder,
    SchemaError,
    avro_body,
    compile_encoder,
    decode,
    decode_fields,
    default_schemas,
    read_framing,
)
from ingest.core.identity import event_key
from ingest.core.records import (
    LEGACY_RECORD_TYPES,
    RECORD_TYPES,
    BookAction,
    BookUpdate,
    DeadLetter,
    DeadLetterReason,
    GapEvent,
    GapKind,
    GapStatus,
    RawFrameEntry,
    RawFrames,
    Record,
    Source,
    StreamPosition,
    Trade,
)
from tests.unit.test_records import any_record

SCHEMAS_DIR = Path(__file__).resolve().parents[2] / "schemas"


def a_trade(**changes: Any) -> Trade:
    fields: dict[str, Any] = dict(
        channel="trades", inst_id="BTC-USDT-SWAP", ts=1786540435948, recv_ts_ns=1786540436001234567,
        source=Source.WS, conn_id="public-0#3", recv_seq=12, record_id="public-0#3:12:0", trade_id="2832749635",
        px="63913.5", sz="1", side="buy", count="1", seq_id=333793117432, okx_source="0",
    )
    fields.update(changes)
    return Trade(**fields)


ENCODER = RecordEncoder()


@functools.cache
def encoder_of(name: str, fast: bool) -> Encoder:
    return compile_encoder(default_schemas()[name], fast=fast)


def plain(value: Any) -> Any:
    """Builtins as fastavro reads them: lists, not tuples."""
    if isinstance(value, tuple | list):
        return [plain(v) for v in value]
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    return value


def fastavro_body(record: Record) -> bytes:
    buffer = io.BytesIO()
    fastavro.schemaless_writer(buffer, default_schemas()[record.AVRO_NAME].parsed,
                               msgspec.to_builtins(record, builtin_types=(bytes,)))
    return buffer.getvalue()


# The Avro specification's 64-bit Rabin fingerprint, written out here so the framing is checked against the
# spec and not only against the library the encoder itself uses.
_EMPTY = 0xC15D213AA4D7A795
_TABLE = []
for _i in range(256):
    _fp = _i
    for _ in range(8):
        _fp = (_fp >> 1) ^ (_EMPTY & -(_fp & 1))
    _TABLE.append(_fp)


def rabin64(data: bytes) -> int:
    fp = _EMPTY
    for byte in data:
        fp = (fp >> 8) ^ _TABLE[(fp ^ byte) & 0xFF]
    return fp


def test_reference_fingerprint_reproduces_the_avro_test_vectors() -> None:
    # Avro's share/test/data/schema-tests.txt, as signed 64-bit integers
    vectors = {'"null"': 7195948357588979594, '"boolean"': -6970731678124411036, '"int"': 8247732601305521295,
               '"long"': -3434872931120570953}
    for canonical, expected in vectors.items():
        assert int.from_bytes(rabin64(canonical.encode()).to_bytes(8, "little"), "little", signed=True) == expected


def test_single_object_value_is_magic_then_little_endian_fingerprint_of_canonical_form_then_body() -> None:
    trade = a_trade()
    value = RecordEncoder().value(trade)
    schema = default_schemas()["okx.ingest.v1.Trade"]
    canonical = fastavro.schema.to_parsing_canonical_form(json.loads((SCHEMAS_DIR / "trade.avsc").read_text()))
    assert value[:2] == b"\xc3\x01"
    assert value[2:10] == rabin64(canonical.encode()).to_bytes(8, "little")
    assert value[10:] == fastavro_body(trade)
    assert schema.canonical_form == canonical


def test_fingerprints_match_fastavro_for_every_schema_and_are_distinct() -> None:
    seen = set()
    for schema in default_schemas():
        expected = fastavro.schema.fingerprint(fastavro.schema.to_parsing_canonical_form(schema.source),
                                               "CRC-64-AVRO")
        assert schema.fingerprint == bytes.fromhex(expected)
        seen.add(schema.fingerprint)
    assert len(seen) == len(RECORD_TYPES) + len(LEGACY_RECORD_TYPES)


def consumer_decode(value: bytes) -> dict[str, Any]:
    """What a consumer does with fastavro and the .avsc files, none of this package's code (docs/RECORDS.md)."""
    by_fingerprint = {}
    for path in SCHEMAS_DIR.glob("*.avsc"):
        source = json.loads(path.read_text())
        canonical = fastavro.schema.to_parsing_canonical_form(source)
        fingerprint = bytes.fromhex(fastavro.schema.fingerprint(canonical, "CRC-64-AVRO"))
        by_fingerprint[fingerprint] = fastavro.parse_schema(source, named_schemas={})
    assert value[:2] == b"\xc3\x01"
    result = fastavro.schemaless_reader(io.BytesIO(value[10:]), by_fingerprint[value[2:10]], None)
    assert isinstance(result, dict)
    return result


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(any_record)
def test_every_record_decodes_back_with_fastavro_and_the_avsc_files_alone(record: Record) -> None:
    value = ENCODER.value(record)
    assert consumer_decode(value) == plain(msgspec.to_builtins(record, builtin_types=(bytes,)))
    assert decode(value) == record
    assert DECODER.decode(value) == record


DECODER = Decoder()


@pytest.mark.parametrize("value", [
    b"", b"\x7b\x22a\x22", b"\xc3\x01" + b"\x00" * 8 + b"\x00", b"\x00\x00\x00\x00\x07\x00",
    RecordEncoder().value(a_trade())[:-6], RecordEncoder().value(a_trade()) + b"\x00",
    RecordEncoder().value(a_trade())[:12] + b"\xff" * 40,
])
def test_the_batch_decoder_fails_exactly_like_decode_on_values_that_are_not_records(value: bytes) -> None:
    with pytest.raises(DecodeError) as expected:
        decode(value)
    with pytest.raises(DecodeError) as got:
        DECODER.decode(value)
    assert str(got.value) == str(expected.value)


def test_the_batch_decoder_reads_confluent_values_by_their_schema_header() -> None:
    trade = a_trade()
    value = b"\x00\x00\x00\x00\x07" + avro_body(trade)
    assert DECODER.decode(value, schema_name=trade.AVRO_NAME) == trade == decode(value, schema_name=trade.AVRO_NAME)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(any_record)
def test_generated_encoders_write_exactly_the_bytes_fastavro_writes(record: Record) -> None:
    expected = fastavro_body(record)
    assert encoder_of(record.AVRO_NAME, True)(record, b"") == expected
    assert encoder_of(record.AVRO_NAME, False)(record, b"") == expected
    assert avro_body(record) == expected


@pytest.mark.parametrize("text", ["", "é", "BTC-€", "日本語", "\U0001f600", "x" * 63, "x" * 64, "x" * 5000,
                                  "é" * 3000])
def test_strings_of_any_length_and_script_are_encoded_exactly(text: str) -> None:
    trade = a_trade(px=text, okx_source=text, extra={text: text})
    book = BookUpdate(channel="books", inst_id=text, ts=1, recv_ts_ns=2, source=Source.WS, record_id="r",
                      action=BookAction.SNAPSHOT, asks=((text, "1", "0", "1"),), bids=(("1", text, "0", text),))
    for record in (trade, book):
        expected = fastavro_body(record)
        assert avro_body(record) == expected
        assert encoder_of(record.AVRO_NAME, False)(record, b"") == expected


def test_book_levels_that_are_not_four_strings_are_still_encoded_exactly() -> None:
    odd = BookUpdate(channel="books", inst_id="BTC-USDT", ts=1, recv_ts_ns=2, source=Source.WS, record_id="r",
                     action=BookAction.UPDATE, asks=(("1", "2", "0"),), bids=(("1", "2", "0", "4", "5"),))  # type: ignore[arg-type]
    assert avro_body(odd) == fastavro_body(odd)


@pytest.mark.parametrize("value", [-(2**63), -(2**63) + 1, -1, 0, 1, 63, 64, 8191, 8192, 2**31, 2**62, 2**63 - 1])
def test_longs_at_every_varint_boundary_are_encoded_exactly(value: int) -> None:
    trade = a_trade(ts=value, recv_ts_ns=value, recv_seq=value, seq_id=value)
    assert avro_body(trade) == fastavro_body(trade)


@pytest.mark.parametrize("value", [2**63, -(2**63) - 1, 2**70])
def test_a_long_out_of_range_is_an_error_not_a_corrupt_record(value: int) -> None:
    with pytest.raises(OverflowError):
        avro_body(a_trade(ts=value))
    with pytest.raises(OverflowError):
        encoder_of("okx.ingest.v1.Trade", False)(a_trade(seq_id=value), b"")


def test_an_int_field_out_of_range_is_an_error() -> None:
    gap = GapEvent(gap_id="g", revision=2**31, kind=GapKind.OTHER, status=GapStatus.OPEN, reason="r", channel="c",
                   detected_ts_ns=1)
    with pytest.raises(OverflowError):
        avro_body(gap)


_ANY_INT = st.integers() | st.integers(min_value=-(2**70), max_value=2**70) | st.sampled_from(
    [2**31 - 1, 2**31, -(2**31), -(2**31) - 1, 2**63 - 1, 2**63, -(2**63), -(2**63) - 1, 2**64 - 1, 2**64])


@settings(max_examples=300, deadline=None)
@given(long=_ANY_INT, int32=_ANY_INT)
def test_any_integer_either_encodes_exactly_or_is_an_overflow_error_in_both_encoders(long: int, int32: int) -> None:
    """No integer of any size can make a generated encoder write bytes fastavro would not (a corrupt record)."""
    gap = GapEvent(gap_id="g", revision=int32, kind=GapKind.TRADE_HOLE, status=GapStatus.OPEN, reason="r",
                   channel="trades", before=StreamPosition(ts=1, trade_id=long), detected_ts_ns=long)
    fits = -(2**63) <= long < 2**63 and -(2**31) <= int32 < 2**31
    for encode in (encoder_of(gap.AVRO_NAME, True), encoder_of(gap.AVRO_NAME, False)):
        if fits:
            assert encode(gap, b"") == fastavro_body(gap)
        else:
            with pytest.raises(OverflowError):
                encode(gap, b"")


def test_encoded_record_has_topic_key_headers_and_timestamp() -> None:
    encoded = RecordEncoder("prod.okx.").encode(a_trade())
    assert encoded.topic == "prod.okx.trades"
    assert encoded.key == b"BTC-USDT-SWAP"
    assert dict(encoded.headers) == {"schema": b"okx.ingest.v1.Trade", "record_id": b"public-0#3:12:0",
                                     "source": b"ws", "event_key": b"trades:BTC-USDT-SWAP:2832749635"}
    assert encoded.ts_ms == 1786540435948
    gap = GapEvent(gap_id="g7", revision=1, kind=GapKind.TRADE_HOLE, status=GapStatus.FILLED, reason="r",
                   channel="trades", inst_id="BTC-USDT", before=StreamPosition(ts=1, trade_id=10),
                   after=StreamPosition(ts=2, trade_id=20), detected_ts_ns=3_000_000_000, updated_ts_ns=4_000_000_000)
    encoded = RecordEncoder().encode(gap)
    assert (encoded.topic, encoded.key, encoded.ts_ms) == ("okx.gaps", b"trades:BTC-USDT", 4000)
    assert dict(encoded.headers) == {"schema": b"okx.ingest.v1.GapEvent", "record_id": b"gap:g7:1",
                                     "source": b"ingest", "event_key": b"gaps:g7:1"}


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(any_record)
def test_the_encoded_record_of_any_record_is_what_its_own_methods_say(record: Record) -> None:
    # The encoder builds key, headers and timestamp per type without calling these methods: same answers.
    assume(not isinstance(record, RawFrames) or record.frames)  # no frames: no timestamp, never published
    given_key = getattr(record, "event_key", None)
    key = given_key if given_key is not None else event_key(record)
    encoded = RecordEncoder("p.").encode(record)
    assert getattr(record, "event_key", None) == key  # stored in the record, so its body holds it
    assert encoded == (f"p.{record.TOPIC.value}", record.kafka_key(), RecordEncoder("p.").value(record),
                       (("schema", record.AVRO_NAME.encode()), ("record_id", record.emission_id().encode()),
                        ("source", record.source_header().encode()),
                        *((("event_key", key.encode()),) if key is not None else ())),
                       record.kafka_ts_ms())


def test_confluent_value_is_zero_then_big_endian_schema_id_then_body() -> None:
    ids = {cls.AVRO_NAME: 1000 + i for i, cls in enumerate(RECORD_TYPES)}
    trade = a_trade()
    value = RecordEncoder(schema_ids=ids).value(trade)
    assert value[:1] == b"\x00"
    assert int.from_bytes(value[1:5], "big") == ids["okx.ingest.v1.Trade"]
    assert value[5:] == fastavro_body(trade)
    assert decode(value, schema_ids={v: k for k, v in ids.items()}) == trade
    assert decode(value, schema_name="okx.ingest.v1.Trade") == trade
    framing = read_framing(value)
    assert (framing.wire_format, framing.schema_id, framing.body_offset) == ("confluent", ids[trade.AVRO_NAME], 5)


def test_confluent_encoding_without_an_id_for_the_schema_fails_at_once() -> None:
    with pytest.raises(SchemaError, match="registry id"):
        RecordEncoder(schema_ids={"okx.ingest.v1.BookUpdate": 1}).encode(a_trade())


def test_bytes_fields_survive_the_round_trip() -> None:
    dead = DeadLetter(reason_code=DeadLetterReason.NOT_UTF8, reason="r", raw=b"\xff\x00\xc3\x01", source=Source.WS,
                      conn_id="c", recv_ts_ns=1, record_id="c:1:dlq")
    assert decode(RecordEncoder().value(dead)) == dead


@pytest.mark.parametrize("sizes", [[0], [1, 4095], [4096], [70_000, 3], [200] * 256])
def test_raw_frames_of_any_payload_size_are_encoded_exactly(sizes: list[int]) -> None:
    frames = tuple(RawFrameEntry(recv_seq=i + 1, recv_ts_ns=1786540436001234567 + i, payload=bytes([i % 256]) * n)
                   for i, n in enumerate(sizes))
    record = RawFrames(conn_id="public-0#1", name="public-0", endpoint="/ws/v5/public", okx_conn_id="é1",
                       frames=frames)
    assert encoder_of(record.AVRO_NAME, True)(record, b"") == fastavro_body(record)
    assert decode(RecordEncoder().value(record)) == record


def test_decode_fields_names_the_schema() -> None:
    name, fields = decode_fields(RecordEncoder().value(a_trade()))
    assert name == "okx.ingest.v1.Trade"
    assert fields["px"] == "63913.5" and fields["source"] == "ws"


@pytest.mark.parametrize(("value", "message"), [
    (b"", "neither"),
    (b"\x7b\x22a\x22", "neither"),
    (b"\xc3\x01" + b"\x00" * 8 + b"\x00", "unknown schema fingerprint"),
    (b"\x00\x00\x00\x00\x07\x00", "no way to resolve"),
])
def test_values_that_are_not_our_records_are_decode_errors(value: bytes, message: str) -> None:
    with pytest.raises(DecodeError, match=message):
        decode(value)


def test_truncated_and_padded_bodies_are_decode_errors() -> None:
    value = RecordEncoder().value(a_trade())
    with pytest.raises(DecodeError, match="corrupt"):
        decode(value[:-6])
    with pytest.raises(DecodeError, match="trailing"):
        decode(value + b"\x00")


def test_every_schema_gets_a_fast_encoder() -> None:
    for schema in default_schemas():
        encoder = compile_encoder(schema)
        assert "<avro fast encoder" in encoder.__code__.co_filename, schema.name


@given(st.integers(min_value=-(2**63), max_value=2**63 - 1))
def test_any_long_is_encoded_like_fastavro(value: int) -> None:
    trade = a_trade(seq_id=value, ts=value)
    assert avro_body(trade) == fastavro_body(trade)
