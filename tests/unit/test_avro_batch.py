"""The archiver's bulk path: many values decoded at once give exactly the table the record path gives, and
anything it cannot vouch for goes back to the record path."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ingest.core.archive_schema import RECORD_TYPE_BY_KIND, Coordinates, columnar, convert, convert_columns
from ingest.core.avro import Decoder, RecordEncoder, default_schemas
from ingest.core.avro_batch import BatchDecoder
from ingest.core.records import Source, TopicKind, Trade
from tests.unit.test_archive_schema import real_records

ENCODER = RecordEncoder("okx.")
DECODER = Decoder()
BATCH = BatchDecoder.of(default_schemas()["okx.ingest.v1.Trade"])
TEXT = st.text(st.characters(codec="utf-8"), max_size=12)
DEC = st.sampled_from(["", "0", "1.5", "0.00000001", "43000.1", "-2", "1e-3", "12345678901234567890.5", "abc",
                       "1" * 25, "0." + "1" * 20])
LONG = st.integers(-(1 << 63), (1 << 63) - 1)


def _coords(n: int) -> list[Coordinates]:
    return [Coordinates("okx.trades", 2, 1_000 + i, 1_700_000_000_000 + i) for i in range(n)]


def _same(values: list[bytes]) -> tuple[object, object]:
    """(the record path's table, or its rejections; the bulk path's table or None)."""
    records = [DECODER.decode(v) for v in values]
    slow = convert(TopicKind.TRADES, records, _coords(len(values)))
    assert BATCH is not None
    decoded = BATCH.decode(values)
    fast = None if decoded is None else convert_columns(TopicKind.TRADES, decoded, _coords(len(values)))
    return slow, fast


trades = st.builds(
    Trade, channel=st.sampled_from(["trades", "trades-all"]), inst_id=TEXT, inst_type=st.none() | TEXT, ts=LONG,
    recv_ts_ns=LONG, source=st.sampled_from(list(Source)), conn_id=st.none() | TEXT, recv_seq=st.none() | LONG,
    record_id=st.text(st.characters(codec="utf-8"), max_size=300),
    trade_id=TEXT, px=DEC, sz=DEC, side=TEXT, count=st.none() | TEXT, seq_id=st.none() | LONG,
    okx_source=st.none() | TEXT, extra=st.dictionaries(TEXT, TEXT, max_size=3),
    event_key=st.none() | st.text(st.characters(codec="utf-8"), min_size=60, max_size=70))  # lengths of 1-2 bytes


@settings(max_examples=150, deadline=None)
@given(st.lists(trades, min_size=1, max_size=40))
def test_the_bulk_path_gives_the_record_paths_table_or_leaves_the_batch_to_it(batch: list[Trade]) -> None:
    slow, fast = _same([ENCODER.encode(t).value for t in batch])
    if fast is None:  # allowed only where the record path has something to decide
        assert slow.rejected, "the bulk path gave up on a batch the record path took whole"  # type: ignore[attr-defined]
    else:
        assert not slow.rejected  # type: ignore[attr-defined]
        assert fast.equals(slow.table, check_metadata=True)  # type: ignore[attr-defined]


def test_every_real_trade_frame_gives_the_same_table(shared_okx: Path) -> None:
    values = [ENCODER.encode(r).value for _, r in real_records(shared_okx) if isinstance(r, Trade)]
    assert len(values) > 50
    slow, fast = _same(values)
    assert fast is not None and fast.equals(slow.table, check_metadata=True)  # type: ignore[attr-defined]


@pytest.mark.parametrize("damage", ["trailing byte", "cut short", "invalid utf-8", "another schema"])
def test_a_value_it_cannot_vouch_for_sends_the_batch_back_to_the_record_path(damage: str, shared_okx: Path) -> None:
    values = [ENCODER.encode(r).value for _, r in real_records(shared_okx) if isinstance(r, Trade)][:50]
    v = values[20]
    if damage == "trailing byte":
        values[20] = v + b"\x02"
    elif damage == "cut short":
        values[20] = v[:-3]
    elif damage == "invalid utf-8":
        values[20] = v.replace(b"USDT", b"\xff\xfeDT", 1)
    else:
        values[20] = values[20][:2] + bytes(8) + values[20][10:]  # a fingerprint of no schema
    assert BATCH is not None and BATCH.decode(values) is None


def test_flat_datasets_take_the_bulk_path_and_books_and_raw_frames_do_not() -> None:
    assert columnar(TopicKind.TRADES) and columnar(TopicKind.TICKERS)
    assert not columnar(TopicKind.BOOKS) and not columnar(TopicKind.RAW)
    assert RECORD_TYPE_BY_KIND[TopicKind.TRADES] is Trade


@settings(max_examples=60, deadline=None)
@given(st.lists(trades, min_size=1, max_size=20))
def test_a_bulk_files_manifest_entry_is_the_record_paths(batch: list[Trade]) -> None:
    from ingest.services.archive import _stats_of, _table_stats

    fitting = [t for t in batch if not convert(TopicKind.TRADES, [t], _coords(1)).rejected]
    if fitting:
        table = convert(TopicKind.TRADES, fitting, _coords(len(fitting))).table
        assert _table_stats(TopicKind.TRADES, table) == _stats_of(list(fitting))


def test_a_bulk_value_the_record_path_refuses_is_rejected_and_the_file_keeps_the_rest(
        tmp_path: Path, shared_okx: Path) -> None:
    from ingest.config import Settings
    from ingest.io.archive_store import ArchiveStore
    from ingest.services.archive import Archiver, _Bulk

    settings = Settings.model_validate({"kafka": {"bootstrap_servers": "127.0.0.1:1"},
                                        "archive": {"url": str(tmp_path)}})
    archiver = Archiver(settings, ArchiveStore.from_url(str(tmp_path)))
    good = next(r for _, r in real_records(shared_okx) if isinstance(r, Trade))
    value = ENCODER.encode(good).value
    bad = _Bulk(TopicKind.TRADES, value[:10] + b"\xff" * 5, 1, "BTC-USDT", None, None, "1")
    ok = _Bulk(TopicKind.TRADES, value, good.ts, good.inst_id, good.recv_ts_ns, good.seq_id, good.trade_id)
    converted, bulk = archiver._convert(TopicKind.TRADES, [bad, ok], _coords(2))
    assert not bulk and converted.table.num_rows == 1
    assert [(r.index, r.field) for r in converted.rejected] == [(0, "value")]
    assert converted.table.column("_offset").to_pylist() == [1_001]


def test_every_real_frame_of_every_flat_dataset_gives_the_record_paths_table(shared_okx: Path) -> None:
    from ingest.services.archive import _bulk_decoders

    decoders = {kind: batch for batch, kind in _bulk_decoders().values()}
    assert TopicKind.TRADES in decoders and TopicKind.TICKERS in decoders
    by_kind: dict[TopicKind, list[bytes]] = {}
    for _, rec in real_records(shared_okx):
        if rec.TOPIC in decoders:
            by_kind.setdefault(rec.TOPIC, []).append(ENCODER.encode(rec).value)
    assert len(by_kind) >= 4, sorted(by_kind)
    for kind, values in by_kind.items():
        slow = convert(kind, [DECODER.decode(v) for v in values], _coords(len(values)))
        decoded = decoders[kind].decode(values)
        assert decoded is not None, kind
        fast = convert_columns(kind, decoded, _coords(len(values)))
        if slow.rejected:
            assert fast is None, kind
        else:
            assert fast is not None and fast.equals(slow.table, check_metadata=True), kind
