"""The archive service against the real broker: local directory and moto's S3 server, read back by DuckDB and
Polars; exactly once across a redo, the dead-letter dataset, a failing store, bad settings at start."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from decimal import Decimal
from pathlib import Path
from typing import Any

import duckdb
import msgspec
import polars as pl
import pyarrow.fs as pafs
import pytest
from aiokafka import AIOKafkaProducer
from moto.server import ThreadedMotoServer

from ingest.config import Settings
from ingest.core.avro import RecordEncoder
from ingest.core.records import (
    BookAction,
    BookUpdate,
    GapEvent,
    GapKind,
    GapStatus,
    Record,
    Source,
    StreamPosition,
    Trade,
)
from ingest.io.archive_store import ArchiveStore
from ingest.services.archive import Archiver, run_archiver
from ingest.services.archive_tools import compact, verify
from tests.conftest import BrokerInfo

DAY1 = 1_796_083_200_000  # 2026-12-01T00:00:00Z
DAY2 = DAY1 + 86_400_000
INSTS = ("BTC-USDT", "ETH-USDT", "SOL-USDT")


def trade(inst: str, i: int, ts: int) -> Trade:
    return Trade(channel="trades", inst_id=inst, ts=ts, recv_ts_ns=ts * 1_000_000 + 17, source=Source.WS,
                 conn_id="public-0#1", recv_seq=i, record_id=f"public-0#1:{inst}:{i}:0", trade_id=str(1000 + i),
                 px=f"{60000 + i}.{i % 10}", sz=f"0.{i:04d}", side="buy" if i % 2 else "sell", seq_id=i)


def book(inst: str, i: int, ts: int) -> BookUpdate:
    return BookUpdate(channel="books", inst_id=inst, ts=ts, recv_ts_ns=ts * 1_000_000, source=Source.WS,
                      record_id=f"b:{inst}:{i}", action=BookAction.SNAPSHOT if i == 0 else BookAction.UPDATE,
                      asks=(("101.5", "2", "0", "1"), ("102", "3", "0", "2")), bids=(("100.25", "1", "0", "1"),),
                      seq_id=i + 1, prev_seq_id=i if i else -1, checksum=0)


def sample_records(n: int = 60) -> list[Record]:
    out: list[Record] = []
    for i in range(n):
        inst = INSTS[i % 3]
        ts = (DAY1 if i < n // 2 else DAY2) + i * 1000
        out.append(trade(inst, i, ts))
        if i % 5 == 0:
            out.append(book(inst, i, ts))
    out.append(GapEvent(gap_id="g1", kind=GapKind.TRADE_HOLE, status=GapStatus.FILLED, reason="hole",
                        channel="trades", inst_id="BTC-USDT", before=StreamPosition(ts=DAY1 + 1, trade_id=1000),
                        after=StreamPosition(ts=DAY1 + 9, trade_id=1010), detected_ts_ns=(DAY1 + 10) * 1_000_000))
    return out


async def publish(bootstrap: str, prefix: str, records: Sequence[Record], *, garbage: int = 0,
                  schema_ids: dict[str, int] | None = None) -> None:
    encoder = RecordEncoder(prefix, schema_ids=schema_ids)
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all")
    await producer.start()
    try:
        for record in records:
            e = encoder.encode(record)
            await producer.send(e.topic, e.value, key=e.key, headers=list(e.headers), timestamp_ms=e.ts_ms)
        for i in range(garbage):
            await producer.send(f"{prefix}trades", b"\x01not avro", key=b"BTC-USDT", timestamp_ms=DAY1 + i)
        await producer.flush()
    finally:
        await producer.stop()


def settings_for(broker: BrokerInfo, prefix: str, url: str, **archive: Any) -> Settings:
    return Settings.model_validate({
        "kafka": {"bootstrap_servers": broker.bootstrap_servers, "topic_prefix": prefix},
        "archive": {"url": url, "group_id": f"{prefix}archive", "idle_close_s": 0.3, "max_open_s": 5,
                    "retry_initial_s": 0.05, "retry_max_s": 0.2, "metrics_port": 0, **archive},
        "obs": {"metrics_port": 0}})


def q(sql: str) -> list[tuple[Any, ...]]:
    """A DuckDB query's rows."""
    rel = duckdb.sql(sql)
    assert rel is not None
    return rel.fetchall()


async def until(predicate: Callable[[], bool], timeout_s: float = 60.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


@contextlib.asynccontextmanager
async def running(archiver: Archiver) -> AsyncIterator[Archiver]:
    stop = asyncio.Event()
    task = asyncio.create_task(archiver.run(stop))
    try:
        yield archiver
    finally:
        stop.set()
        async with asyncio.timeout(60):
            await task


def settled(archiver: Archiver, n: int) -> Callable[[], bool]:
    """Every one of `n` records consumed, nothing left open, and the offsets committed."""
    s = archiver.stats
    return lambda: s.records_in >= n and s.open_files == 0 and bool(s.last_commit)


def trades_of(records: list[Record]) -> list[Trade]:
    return [r for r in records if isinstance(r, Trade)]


async def test_records_land_once_in_hive_partitions_that_duckdb_and_polars_prune(
        kafka_broker: BrokerInfo, topic_prefix: str, tmp_path: Path) -> None:
    records = sample_records()
    unfit = msgspec.structs.replace(trade("BTC-USDT", 999, DAY1 + 999), sz="0.0000000000000000001")
    await publish(kafka_broker.bootstrap_servers, topic_prefix, [*records, unfit], garbage=2)
    root = tmp_path / "archive"
    settings = settings_for(kafka_broker, topic_prefix, str(root))
    store = ArchiveStore.from_url(str(root))
    total = len(records) + 3
    async with running(Archiver(settings, store)) as archiver:
        await until(settled(archiver, total), what="the archive to settle")
    trades = trades_of(records)
    assert (root / "trades" / "date=2026-12-01" / "instId=BTC-USDT").is_dir()
    glob = f"{root}/trades/**/*.parquet"
    rows = q(f"select instId, count(*), sum(px), sum(sz) from read_parquet('{glob}', "
                      "hive_partitioning=true) group by instId order by instId")
    expected = sorted((inst, len(ts), sum(Decimal(t.px) for t in ts), sum(Decimal(t.sz) for t in ts))
                      for inst in INSTS if (ts := [t for t in trades if t.inst_id == inst]))
    assert rows == expected  # counts and exact decimal sums equal what was on the topic
    # Pruning, proved by behaviour: a corrupt file in another partition breaks a full scan, not a pruned one.
    junk = root / "trades" / "date=2026-12-01" / "instId=JUNK-USDT" / "junk.parquet"
    junk.parent.mkdir()
    junk.write_bytes(b"PAR1 not parquet at all")
    with pytest.raises(duckdb.Error):
        q(f"select count(*) from read_parquet('{glob}', hive_partitioning=true)")
    day2_eth = [t for t in trades if t.inst_id == "ETH-USDT" and t.ts >= DAY2]
    assert q(f"select count(*) from read_parquet('{glob}', hive_partitioning=true) where instId = "
                      "'ETH-USDT' and date = '2026-12-02'") == [(len(day2_eth),)]
    frame = (pl.scan_parquet(glob, hive_partitioning=True).filter(pl.col("instId") == "SOL-USDT")
             .select(pl.len()).collect())
    assert frame.item() == len([t for t in trades if t.inst_id == "SOL-USDT"])
    shutil.rmtree(junk.parent)
    ids = q(f"select recordId from read_parquet('{glob}')")
    assert sorted(r[0] for r in ids) == sorted(t.record_id for t in trades)
    books = q("select count(*), count(distinct (_partition, _offset)) from "
              f"read_parquet('{root}/books/**/*.parquet')")[0]
    n_books = len([r for r in records if isinstance(r, BookUpdate)])
    assert books == (n_books * 3, n_books)  # one row per level, three levels per update
    rejected = q(f"select reason, _topic, _offset from read_parquet('{root}/_rejected/**/*.parquet') "
                          "order by _offset")
    assert [r[1] for r in rejected] == [f"{topic_prefix}trades"] * 3  # with the Kafka coordinates of each
    assert sorted(r[0].split(":")[0] for r in rejected) == ["does not fit", "undecodable", "undecodable"]
    assert any("sz" in r[0] or "18 digits" in r[0] for r in rejected)
    assert verify(store) == []
    manifest = (root / "trades" / "date=2026-12-01" / "instId=BTC-USDT" / "_manifest.json").read_text()
    assert '"gapId": "g1"' in manifest and '"status": "filled"' in manifest


async def test_files_built_in_bulk_hold_exactly_what_the_record_path_writes(
        kafka_broker: BrokerInfo, topic_prefix: str, tmp_path: Path) -> None:
    """Trades are decoded a batch at a time (core/avro_batch.py): the archive must not differ by a byte of data."""
    records: list[Record] = [trade(INSTS[i % 3], i, DAY1 + i * 10) for i in range(600)]
    records += [msgspec.structs.replace(trade("BTC-USDT", 700, DAY1 + 7_000), px="", extra={"new": "1"}),
                book("BTC-USDT", 0, DAY1 + 10)]
    await publish(kafka_broker.bootstrap_servers, topic_prefix, records, garbage=1)
    tables = {}
    for mode in ("bulk", "records"):
        root = tmp_path / mode
        settings = settings_for(kafka_broker, topic_prefix, str(root), group_id=f"{topic_prefix}{mode}")
        archiver = Archiver(settings, ArchiveStore.from_url(str(root)))
        if mode == "records":
            archiver._bulk_decoders = {}
        async with running(archiver):
            await until(settled(archiver, len(records) + 1), what="the archive to settle")
        assert (archiver.stats.records_bulk > 500) is (mode == "bulk")
        tables[mode] = pl.read_parquet(f"{root}/trades/**/*.parquet", hive_partitioning=True).sort(
            "_partition", "_offset")
        assert verify(ArchiveStore.from_url(str(root))) == []
    assert tables["bulk"].equals(tables["records"]) and tables["bulk"].height == 601


async def test_a_redo_from_the_start_adds_nothing_and_new_records_are_added_once(
        kafka_broker: BrokerInfo, topic_prefix: str, tmp_path: Path) -> None:
    records = sample_records(30)
    await publish(kafka_broker.bootstrap_servers, topic_prefix, records)
    root = tmp_path / "archive"
    store = ArchiveStore.from_url(str(root))
    settings = settings_for(kafka_broker, topic_prefix, str(root))
    async with running(Archiver(settings, store)) as first:
        await until(settled(first, len(records)))
    files = sorted(p.relative_to(root) for p in root.rglob("*.parquet"))
    # A member of a new group starts from offset 0, as after a crash before any commit: it must skip it all.
    fresh = settings_for(kafka_broker, topic_prefix, str(root), group_id=f"{topic_prefix}other",
                         max_file_bytes=400)  # and its file boundaries would fall elsewhere
    more = [trade("BTC-USDT", 500 + i, DAY1 + 50_000 + i) for i in range(5)]
    await publish(kafka_broker.bootstrap_servers, topic_prefix, more)
    async with running(Archiver(fresh, store)) as redo:
        await until(settled(redo, len(records) + len(more)))
        assert redo.stats.records_skipped == len(records)
    ids = q(f"select recordId from read_parquet('{root}/trades/**/*.parquet')")
    assert sorted(r[0] for r in ids) == sorted(t.record_id for t in trades_of(records) + more)
    assert set(files) <= {p.relative_to(root) for p in root.rglob("*.parquet")}
    assert verify(store) == []


async def test_confluent_framing_is_decoded_too(kafka_broker: BrokerInfo, topic_prefix: str, tmp_path: Path) -> None:
    records = [trade("BTC-USDT", i, DAY1 + i) for i in range(4)]
    await publish(kafka_broker.bootstrap_servers, topic_prefix, records, schema_ids={"okx.ingest.v1.Trade": 7})
    root = tmp_path / "archive"
    async with running(Archiver(settings_for(kafka_broker, topic_prefix, str(root)),
                                ArchiveStore.from_url(str(root)))) as archiver:
        await until(settled(archiver, 4))
    assert q(f"select count(*) from read_parquet('{root}/trades/**/*.parquet')") == [(4,)]


async def test_a_failing_store_commits_nothing_turns_unready_and_catches_up(
        kafka_broker: BrokerInfo, topic_prefix: str, tmp_path: Path) -> None:
    root = tmp_path / "archive"
    root.mkdir()
    (root / "trades").write_text("in the way")  # makes every trades directory impossible (even for root)
    records = [trade(INSTS[i % 3], i, DAY1 + i) for i in range(12)]
    await publish(kafka_broker.bootstrap_servers, topic_prefix, records)
    store = ArchiveStore.from_url(str(root))
    async with running(Archiver(settings_for(kafka_broker, topic_prefix, str(root)), store)) as archiver:
        await until(lambda: archiver.stats.store_failures >= 2, what="store failures")
        ready = archiver.readiness()
        assert not ready.ready and any("archive store failing" in r for r in ready.reasons)
        assert archiver.stats.last_commit == {} or all(v == 0 for v in archiver.stats.last_commit.values())
        assert not list(root.rglob("*.parquet"))
        failures = {m.name: m.samples[0].value for m in archiver.metrics()}
        assert failures["okx_ingest_archive_store_down"] == 1
        os.remove(root / "trades")
        await until(settled(archiver, len(records)), what="catch-up")
        assert archiver.readiness().ready
    ids = q(f"select recordId from read_parquet('{root}/trades/**/*.parquet')")
    assert sorted(r[0] for r in ids) == sorted(t.record_id for t in records)


@pytest.fixture
def moto_s3(aws_env: dict[str, str]) -> Iterator[str]:
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield f"{host}:{port}"
    finally:
        server.stop()


async def test_s3_archive_through_moto_is_read_back_by_polars(
        kafka_broker: BrokerInfo, topic_prefix: str, moto_s3: str) -> None:
    fs = pafs.S3FileSystem(endpoint_override=moto_s3, scheme="http", region="us-east-1", allow_bucket_creation=True)
    fs.create_dir("archive-bucket")
    records = sample_records(30)
    await publish(kafka_broker.bootstrap_servers, topic_prefix, records)
    settings = settings_for(kafka_broker, topic_prefix, "s3://archive-bucket/okx", s3_endpoint_override=moto_s3,
                            s3_region="us-east-1")
    store = ArchiveStore.from_url("s3://archive-bucket/okx", endpoint_override=moto_s3, region="us-east-1")
    store.check_writable()
    async with running(Archiver(settings, store)) as archiver:
        await until(settled(archiver, len(records)))
    storage = {"aws_endpoint_url": f"http://{moto_s3}", "aws_region": "us-east-1", "aws_allow_http": "true",
               "aws_access_key_id": os.environ["AWS_ACCESS_KEY_ID"],
               "aws_secret_access_key": os.environ["AWS_SECRET_ACCESS_KEY"]}
    frame = pl.scan_parquet("s3://archive-bucket/okx/trades/**/*.parquet", storage_options=storage,
                            hive_partitioning=True).select("recordId", "instId").collect()
    trades = trades_of(records)
    assert sorted(frame["recordId"].to_list()) == sorted(t.record_id for t in trades)
    assert set(frame["instId"].to_list()) == set(INSTS)
    assert verify(store) == []


async def test_a_missing_bucket_at_start_is_a_clear_error_and_exit_2(
        kafka_broker: BrokerInfo, topic_prefix: str, moto_s3: str, capsys: pytest.CaptureFixture[str]) -> None:
    settings = settings_for(kafka_broker, topic_prefix, "s3://no-such-bucket/x", s3_endpoint_override=moto_s3,
                            s3_region="us-east-1")
    assert await run_archiver(settings) == 2
    out = capsys.readouterr().out
    assert "archive.url" in out and "no-such-bucket" in out and "Traceback" not in out


async def test_the_archive_service_runs_until_asked_to_stop_then_exits_0_with_every_trade_archived_once(
        kafka_broker: BrokerInfo, topic_prefix: str, tmp_path: Path) -> None:
    records = sample_records()
    await publish(kafka_broker.bootstrap_servers, topic_prefix, records)
    root = tmp_path / "archive"
    trades = trades_of(records)
    stop = asyncio.Event()
    service = asyncio.create_task(run_archiver(settings_for(kafka_broker, topic_prefix, str(root)), stop=stop))

    def archived() -> int:
        files = list(root.glob("trades/**/*.parquet"))  # renamed into place only once complete
        return q(f"select count(*) from read_parquet({[str(f) for f in files]})")[0][0] if files else 0

    await until(lambda: service.done() or archived() == len(trades), what="every trade archived")
    assert not service.done()  # the service keeps running until it is asked to stop
    stop.set()
    async with asyncio.timeout(60):
        assert await service == 0
    assert q(f"select count(*), count(distinct tradeId) from read_parquet('{root}/trades/**/*.parquet')") \
        == [(len(trades), len(trades))]


async def test_compact_merges_small_files_once_and_keeps_every_record(
        kafka_broker: BrokerInfo, topic_prefix: str, tmp_path: Path) -> None:
    root = tmp_path / "archive"
    store = ArchiveStore.from_url(str(root))
    settings = settings_for(kafka_broker, topic_prefix, str(root), max_file_bytes=300)  # tiny files
    records = [trade("BTC-USDT", i, DAY1 + i) for i in range(20)]
    await publish(kafka_broker.bootstrap_servers, topic_prefix, records)
    async with running(Archiver(settings, store)) as archiver:
        await until(settled(archiver, len(records)))
    part = root / "trades" / "date=2026-12-01" / "instId=BTC-USDT"
    before = sorted(p.name for p in part.glob("*.parquet"))
    assert len(before) > 3
    report = compact(store, date="2026-12-01", min_bytes=1 << 20, target_bytes=1 << 30)
    after = sorted(p.name for p in part.glob("*.parquet"))
    assert len(after) == 1 and report["merged_files"] == len(before)
    assert compact(store, date="2026-12-01", min_bytes=1 << 20, target_bytes=1 << 30)["merged_files"] == 0
    ids = q(f"select recordId from read_parquet('{root}/trades/**/*.parquet')")
    assert sorted(r[0] for r in ids) == sorted(t.record_id for t in records)
    assert verify(store) == []
    # An interrupted compaction (merged file written, inputs still there) is caught by verify and finished by
    # the next run.
    shutil.copy(part / after[0], tmp_path / "merged")
    async with running(Archiver(settings_for(kafka_broker, topic_prefix, str(tmp_path / "b"), max_file_bytes=300,
                                             group_id=f"{topic_prefix}b"),
                                ArchiveStore.from_url(str(tmp_path / "b")))) as again:
        await until(settled(again, len(records)))
    other = tmp_path / "b" / "trades" / "date=2026-12-01" / "instId=BTC-USDT"
    shutil.copy(tmp_path / "merged", other / after[0])
    store_b = ArchiveStore.from_url(str(tmp_path / "b"))
    assert any("overlap" in p for p in verify(store_b))
    compact(store_b, date="2026-12-01", min_bytes=1 << 20, target_bytes=1 << 30)
    assert sorted(p.name for p in other.glob("*.parquet")) == after
    assert any("not in the manifest" in p for p in verify(store_b)) or verify(store_b) == []


async def test_memory_is_bounded_by_the_shared_budget_whatever_the_number_of_instruments(
        kafka_broker: BrokerInfo, topic_prefix: str, tmp_path: Path) -> None:
    records = [trade(f"I{i:04d}-USDT", j, DAY1 + j) for j in range(2) for i in range(1000)]
    await publish(kafka_broker.bootstrap_servers, topic_prefix, records)
    root = tmp_path / "archive"
    budget = 300_000  # about 140 buffered trades (by their estimated memory) for 1,000 open instruments
    settings = settings_for(kafka_broker, topic_prefix, str(root), max_buffer_bytes=budget, idle_close_s=1.0,
                            max_open_s=60)
    async with running(Archiver(settings, ArchiveStore.from_url(str(root)))) as archiver:
        await until(settled(archiver, len(records)), timeout_s=110)
    assert archiver.stats.peak_buffered_bytes <= budget + 3_000  # never more than one record over the budget
    assert q(f"select count(distinct instId), count(*) from read_parquet('{root}/trades/**/*.parquet')") == [
        (1000, len(records))]
