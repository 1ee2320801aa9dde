"""Replay streams: memory does not grow with the window, and a mid-window start seeks back to a checkpoint.

Sources are real: Parquet files laid out and written as the archiver writes them (several files, small row
groups, so a window spans many), and the embedded Kafka-protocol broker. Memory is tracemalloc's peak while a
replay is iterated (items counted, not kept): a window ten times longer must not need twice the memory.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import tracemalloc
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path

import msgspec
import orjson
import pyarrow.parquet as pq
import pytest

from ingest.config import Settings, load_settings
from ingest.core.archive_schema import Coordinates, file_name, partition_key, records_to_table
from ingest.core.records import (
    BookAction,
    BookLevel,
    BookUpdate,
    GapEvent,
    GapStatus,
    RawFrameEntry,
    RawFrames,
    Record,
    Source,
    TopicKind,
    Trade,
)
from ingest.core.replay import BookSnapshot
from ingest.replay import _arrow as fast_path
from ingest.replay import replay
from ingest.replay.formats import item_object, jsonl_lines
from tests.conftest import BrokerInfo
from tests.integration.test_backfill import publish, trade_gap

T0 = 1_796_000_000_000  # a UTC midnight is far: every record sits in one date directory
INST = "BTC-USDT"
#: Rows per archive file and per row group (the archiver rotates files and writes row groups the same way).
FILE_ROWS, GROUP_ROWS = 4_000, 500


def _trades(n: int, step_ms: int) -> list[Trade]:
    return [Trade(channel="trades-all", inst_id=INST, ts=T0 + i * step_ms,
                  recv_ts_ns=(T0 + i * step_ms) * 1_000_000 + 3, source=Source.WS, record_id=f"ws:c:{i}",
                  trade_id=str(10_000 + i), px=f"{30000 + i % 97}.5", sz="0.01", side="buy" if i % 3 else "sell")
            for i in range(n)]


def _lv(px: int, sz: int) -> BookLevel:
    return (str(px), str(sz), "0", "1")


def _books(n: int, step_ms: int, checkpoint_every: int) -> list[BookUpdate]:
    """A chained book: a snapshot, updates, and a full-book checkpoint (the recorder's) every so many updates."""
    bids = {29_990 - k: 1 for k in range(20)}
    asks = {30_010 + k: 1 for k in range(20)}
    out = [BookUpdate(channel="books", inst_id=INST, ts=T0, recv_ts_ns=T0 * 1_000_000, source=Source.WS,
                      record_id="ws:b:0", action=BookAction.SNAPSHOT, seq_id=1, prev_seq_id=-1,
                      bids=tuple(_lv(p, s) for p, s in sorted(bids.items(), reverse=True)),
                      asks=tuple(_lv(p, s) for p, s in sorted(asks.items())))]
    seq = 1
    for i in range(1, n):
        ts = T0 + i * step_ms
        if i % checkpoint_every == 0:  # the full book as it stands, at the last seqId (the chain goes on)
            out.append(BookUpdate(channel="books", inst_id=INST, ts=ts, recv_ts_ns=ts * 1_000_000, source=Source.WS,
                                  record_id=f"ws:b:{i}", action=BookAction.CHECKPOINT, seq_id=seq, prev_seq_id=None,
                                  bids=tuple(_lv(p, s) for p, s in sorted(bids.items(), reverse=True)),
                                  asks=tuple(_lv(p, s) for p, s in sorted(asks.items()))))
            continue
        bid, ask = 29_990 - i % 20, 30_010 + (i * 7) % 20
        bids[bid] = 1 + i % 5
        asks[ask] = 1 + i % 3
        out.append(BookUpdate(channel="books", inst_id=INST, ts=ts, recv_ts_ns=ts * 1_000_000, source=Source.WS,
                              record_id=f"ws:b:{i}", action=BookAction.UPDATE, seq_id=seq + 1, prev_seq_id=seq,
                              bids=(_lv(bid, bids[bid]),), asks=(_lv(ask, asks[ask]),)))
        seq += 1
    return out


def _write(root: Path, kind: TopicKind, records: list[Record]) -> None:
    """Archive files of one partition, rotated every FILE_ROWS records, with GROUP_ROWS-row row groups."""
    topic = f"okx.{kind.value}"
    for first in range(0, len(records), FILE_ROWS):
        chunk = records[first:first + FILE_ROWS]
        coords = [Coordinates(topic, 0, first + i, r.kafka_ts_ms()) for i, r in enumerate(chunk)]
        table = records_to_table(kind, chunk, coords)
        target = root / partition_key(chunk[0], coords[0].kafka_ts_ms).path() / file_name(
            topic, 0, coords[0].offset, coords[-1].offset)
        target.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(table, target, row_group_size=GROUP_ROWS)


def _peak(run: Callable[[], int]) -> tuple[int, int]:
    """(tracemalloc peak in bytes, what `run` counted) of one call."""
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        n = run()
        return tracemalloc.get_traced_memory()[1], n
    finally:
        tracemalloc.stop()


def _count(items: Iterator[object]) -> int:
    return sum(1 for _ in items)


@pytest.fixture(scope="module")
def trade_archive(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("archive")
    _write(root, TopicKind.TRADES, list(_trades(44_000, 10)))
    return root


def test_archive_items_and_batches_need_no_more_memory_for_a_ten_times_longer_window(
    trade_archive: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    short, long = (T0, T0 + 4_000 * 10), (T0, T0 + 40_000 * 10)
    peak_short, n_short = _peak(lambda: _count(iter(replay(str(trade_archive), *short))))
    peak_long, n_long = _peak(lambda: _count(iter(replay(str(trade_archive), *long))))
    assert (n_short, n_long) == (4_000, 40_000)
    assert peak_long < 2 * peak_short, (peak_short, peak_long)

    monkeypatch.setattr(fast_path, "SLICE_TARGET_ROWS", 4_000)  # slices as the window's rows / 4,000

    def rows(window: tuple[int, int]) -> int:
        return sum(b.num_rows for b in replay(str(trade_archive), *window).batches(batch_size=1_000))

    peak_short, n_short = _peak(lambda: rows(short))
    peak_long, n_long = _peak(lambda: rows(long))
    assert (n_short, n_long) == (4_000, 40_000)
    assert peak_long < 2 * peak_short, (peak_short, peak_long)


def test_batches_in_slices_equal_one_slice_and_the_items(trade_archive: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    window = (T0 + 12_345, T0 + 30_000 * 10)
    whole = [b.to_pylist() for b in replay(str(trade_archive), *window).batches()]
    monkeypatch.setattr(fast_path, "SLICE_TARGET_ROWS", 3_000)
    sliced = [b.to_pylist() for b in replay(str(trade_archive), *window).batches()]
    flat_whole = [r for b in whole for r in b]
    assert [r for b in sliced for r in b] == flat_whole
    assert [int(r["id"]) for r in flat_whole] == list(range(10_000 + 1_235, 10_000 + 30_000))


def test_the_raw_frames_serve_reads_need_no_more_memory_for_a_ten_times_longer_window(tmp_path: Path) -> None:
    """`replay serve` reads okx.raw as it plays (`raw_stream`): a longer window costs no more memory to stream."""
    pad = b"x" * 64
    raws: list[Record] = [RawFrames(conn_id="c1", name="public-0", endpoint="/ws/v5/public", frames=(
        RawFrameEntry(recv_seq=n, recv_ts_ns=(T0 + n * 100) * 1_000_000, payload=b'{"n":%d,"pad":"%s"}' % (n, pad)),
    )) for n in range(44_000)]
    _write(tmp_path, TopicKind.RAW, raws)
    short, long = (T0 + 60_000, T0 + 60_000 + 400_000), (T0 + 60_000, T0 + 60_000 + 4_000_000)
    peak_short, n_short = _peak(lambda: _count(replay(str(tmp_path), *short).raw_stream()))
    peak_long, n_long = _peak(lambda: _count(replay(str(tmp_path), *long).raw_stream()))
    assert (n_short, n_long) == (4_000 + 1_200, 40_000 + 1_200)  # with the 60 s margin on both sides
    assert peak_long < 2 * peak_short, (peak_short, peak_long)


async def test_kafka_replay_needs_no_more_memory_for_a_four_times_longer_window(
    kafka_broker: BrokerInfo, topic_prefix: str,
) -> None:
    # One trade a second: the reorder heap (REORDER_MARGIN_MS of records) stays small next to the window. The
    # shorter window already fills the client's fetch buffers (a 1 MiB response): one of 3,000 trades (~0.5 MB)
    # sometimes never did, and its peak then left out a cost that does not grow with the window (flaky 2.04x).
    records = _trades(33_000, 1_000)
    await publish(kafka_broker.bootstrap_servers, topic_prefix, records)
    settings = _settings(kafka_broker, topic_prefix)
    source = f"kafka://{kafka_broker.bootstrap_servers}"

    def run(n: int) -> int:
        return _count(iter(replay(source, T0, T0 + n * 1_000, settings=settings, channels=["trades-all"])))

    peak_short, n_short = await asyncio.to_thread(_peak, lambda: run(8_000))
    peak_long, n_long = await asyncio.to_thread(_peak, lambda: run(32_000))
    assert (n_short, n_long) == (8_000, 32_000)
    assert peak_long < 2 * peak_short, (peak_short, peak_long)


def _settings(broker: BrokerInfo, prefix: str) -> Settings:
    return load_settings(None, kafka={"bootstrap_servers": broker.bootstrap_servers, "topic_prefix": prefix,
                                      "partitions": 1})


async def test_a_mid_window_start_seeks_to_the_last_checkpoint_with_identical_books_from_kafka_and_the_archive(
    kafka_broker: BrokerInfo, topic_prefix: str, tmp_path: Path,
) -> None:
    # 100 ms updates, a checkpoint every 60 s; the window starts 10.5 minutes in.
    records = _books(9_000, 100, 600)
    await publish(kafka_broker.bootstrap_servers, topic_prefix, records)
    _write(tmp_path, TopicKind.BOOKS, list(records))
    settings = _settings(kafka_broker, topic_prefix)
    start, end = T0 + 630_000, T0 + 700_000
    last_checkpoint = max(r.ts for r in records if r.action is BookAction.CHECKPOINT and r.ts < start)
    assert last_checkpoint == T0 + 600_000

    def lines(source: str, lo: int) -> tuple[list[bytes], int | None]:
        rp = replay(source, lo, end, settings=settings, channels=["books"], book_snapshots=(5, 1_000))
        return list(jsonl_lines(rp)), rp.book_seek_ts

    from_archive, archive_seek = lines(str(tmp_path), start)
    from_kafka, kafka_seek = await asyncio.to_thread(lines, f"kafka://{kafka_broker.bootstrap_servers}", start)
    assert archive_seek == kafka_seek == last_checkpoint  # not back to the snapshot at T0: no whole history
    assert from_archive == from_kafka

    # The books equal the ones rebuilt from the very first snapshot, from the first boundary of the window on.
    full = [item_object(i) for i in replay(str(tmp_path), T0, end, channels=["books"], book_snapshots=(5, 1_000))
            if isinstance(i, BookSnapshot) and i.ts >= start]
    window = [item_object(i) for i in replay(str(tmp_path), start, end, channels=["books"],
                                             book_snapshots=(5, 1_000)) if isinstance(i, BookSnapshot)]
    assert len(window) == (end - start) // 1_000 and window[0]["ts"] == start
    assert window == full


async def test_kafka_streams_reorder_within_the_margin_and_merge_backfilled_records_in_place(
    kafka_broker: BrokerInfo, topic_prefix: str, caplog: pytest.LogCaptureFixture,
) -> None:
    live = _trades(400, 1_000)
    hole = {100, 101, 102}  # missed live, filled later by the backfill
    late = live[250]  # reached the partition 5 s late (within the 60 s margin): still in its place
    very_late = live[300]  # 120 s late: more out of order than the margin allows
    published: list[Record] = [t for i, t in enumerate(live) if i not in hole | {250, 300}]
    published.insert(255, late)
    published.insert(420 - len(hole) - 2, very_late)
    gap = msgspec.structs.replace(trade_gap("g1", INST, (10099, live[99].ts), (10103, live[103].ts)),
                                  status=GapStatus.FILLED, revision=1, updated_ts_ns=(T0 + 500_000) * 1_000_000)
    backfill = [msgspec.structs.replace(live[i], source=Source.REST, record_id=f"rest:trades-all:{i}") for i in hole]
    await publish(kafka_broker.bootstrap_servers, topic_prefix, [*published, *backfill, gap])
    settings = _settings(kafka_broker, topic_prefix)
    source = f"kafka://{kafka_broker.bootstrap_servers}"

    def ids(view: str) -> list[str | int]:
        return [i.trade_id if isinstance(i, Trade) else i.gap_id for i in
                replay(source, T0, T0 + 400_000, settings=settings, view=view)  # type: ignore[arg-type]
                if isinstance(i, Trade | GapEvent)]

    with caplog.at_level(logging.WARNING, logger="ingest.replay._kafka"):
        repaired = await asyncio.to_thread(ids, "repaired")
        recorded = await asyncio.to_thread(ids, "recorded")
    everything = [str(10_000 + i) for i in range(400)]
    assert repaired == [t for t in everything if t != "10300"]  # the hole filled in place, the late one placed
    gap_at = recorded.index("g1")
    assert recorded[:gap_at] + recorded[gap_at + 1:] == [t for i, t in enumerate(everything) if i not in hole | {300}]
    assert recorded[gap_at - 1] == "10099"
    assert "out of exchange-time order" in caplog.text  # the one it could not place is said, not silent


def _arrival_order(records: list[Trade], late_by_ms: dict[int, int]) -> list[Trade]:
    """The order records reach their partition when record i arrives `late_by_ms[i]` after its exchange ts."""
    order = sorted(range(len(records)), key=lambda i: (records[i].ts + late_by_ms.get(i, 0), i))
    return [records[i] for i in order]


def _iso(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, tz=UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


async def test_late_kafka_records_are_counted_in_the_api_and_the_cli_summary_never_silently_dropped(
    kafka_broker: BrokerInfo, topic_prefix: str,
) -> None:
    """Two trades reach the partition 120 s late (a replica's clock jump): they cannot be placed, and both the
    API (`stats.late`) and `okx-ingest replay`'s summary line say how many were left out."""
    live = _trades(300, 1_000)
    late = {100: 120_000, 150: 120_000}
    await publish(kafka_broker.bootstrap_servers, topic_prefix, _arrival_order(live, late))
    source = f"kafka://{kafka_broker.bootstrap_servers}"
    kept = [t.trade_id for i, t in enumerate(live) if i not in late]

    rp = replay(source, T0, T0 + 300_000, settings=_settings(kafka_broker, topic_prefix), channels=["trades-all"])
    ids = await asyncio.to_thread(lambda: [i.trade_id for i in rp if isinstance(i, Trade)])
    assert ids == kept
    assert rp.stats.late == 2

    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "ingest.cli", "replay", "--from", _iso(T0), "--to", _iso(T0 + 300_000),
        "--source", source, "--channel", "trades-all", stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE, env={**os.environ, "OKX_INGEST__KAFKA__TOPIC_PREFIX": topic_prefix})
    out, err = await proc.communicate()
    assert proc.returncode == 0, err.decode()
    assert [orjson.loads(line)["tradeId"] for line in out.splitlines()] == kept
    summary = err.decode().strip().splitlines()[-1]
    assert summary.startswith("replayed 298 items (0 gaps, 0 book snapshots)")
    assert summary.endswith("; 2 late records left out (over 60 s out of exchange-time order)")


async def test_late_records_around_a_book_lookback_are_counted_once_and_never_applied(
    kafka_broker: BrokerInfo, topic_prefix: str, tmp_path: Path,
) -> None:
    """A window starting mid-day seeks back to the last checkpoint and reads the books from there. Three book
    updates reach the partition late: B (70 s late) and A (120 s late) before `start`, C (90 s late) inside the
    window. Each is left out of the books and counted exactly once: C as a window record left out, A and B as
    lookback records the books could not take; none is applied, so the books equal the archive's without them."""
    records = _books(9_000, 100, 600)  # a checkpoint every 60 s
    start, end = T0 + 630_000, T0 + 720_000
    at = {r.ts: i for i, r in enumerate(records)}
    a, b, c = at[T0 + 610_000], at[T0 + 605_000], at[T0 + 670_000]
    assert all(records[i].action is BookAction.UPDATE for i in (a, b, c))
    delays = {b: 70_000, a: 120_000, c: 90_000}
    order = sorted(range(len(records)), key=lambda i: (records[i].ts + delays.get(i, 0), i))
    await publish(kafka_broker.bootstrap_servers, topic_prefix, [records[i] for i in order])
    _write(tmp_path, TopicKind.BOOKS, [r for i, r in enumerate(records) if i not in delays])
    settings = _settings(kafka_broker, topic_prefix)

    rp = replay(f"kafka://{kafka_broker.bootstrap_servers}", start, end, settings=settings, channels=["books"],
                book_snapshots=(5, 1_000))
    from_kafka = await asyncio.to_thread(lambda: list(jsonl_lines(rp)))
    assert rp.book_seek_ts == T0 + 600_000
    assert (rp.stats.late, rp.stats.late_lookback) == (1, 2)

    archive = replay(str(tmp_path), start, end, channels=["books"], book_snapshots=(5, 1_000))
    assert from_kafka == list(jsonl_lines(archive))
    snapshot_ts = [orjson.loads(line)["ts"] for line in from_kafka if b'"book_snapshot"' in line]
    # B broke the chain at 605 s: no book until the checkpoint at 660 s (first in the 661 s snapshot); C broke
    # it again at 670 s (the 670 s snapshot reflects what came before it).
    assert snapshot_ts == list(range(T0 + 661_000, T0 + 671_000, 1_000))

    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "ingest.cli", "replay", "--from", _iso(start), "--to", _iso(end), "--source",
        f"kafka://{kafka_broker.bootstrap_servers}", "--channel", "books", "--book-snapshots", "5:1000",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "OKX_INGEST__KAFKA__TOPIC_PREFIX": topic_prefix})
    out, err = await proc.communicate()
    assert proc.returncode == 0, err.decode()
    assert out.splitlines(keepends=True) == from_kafka
    assert err.decode().strip().splitlines()[-1].endswith(
        "; 1 late records left out (over 60 s out of exchange-time order), 2 more before --from left out of the books")
