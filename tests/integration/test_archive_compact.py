"""`archive compact` and `archive verify` over archives the real archiver wrote from the real broker: each
directory swapped whole under the date's lock, manifests re-read, today's date refused, every record once and
verify's counts equal before and after."""

from __future__ import annotations

import asyncio
import datetime as dt
import os
import threading
from pathlib import Path

import polars as pl
import pyarrow.fs as pafs
import pytest

from ingest.core.archive_schema import parse_file_name
from ingest.core.records import Record, Trade
from ingest.io.archive_store import LOCKS, ArchiveStore
from ingest.services.archive import Archiver
from ingest.services.archive_tools import STAGING, LiveDateError, compact, verify, verify_report
from tests.conftest import BrokerInfo
from tests.integration.test_archive import (
    DAY1,
    DAY2,
    INSTS,
    book,
    moto_s3,  # noqa: F401 (the S3 server fixture)
    publish,
    q,
    running,
    settings_for,
    trade,
    until,
)

AFTER_DAY2 = dt.datetime(2026, 12, 3, 0, 0, 1, tzinfo=dt.UTC)  # both sample days are over
DURING_DAY2 = dt.datetime(2026, 12, 2, 12, 0, tzinfo=dt.UTC)


def records_over_two_days() -> list[Record]:
    out: list[Record] = []
    for i in range(48):
        ts = (DAY1 if i < 36 else DAY2) + i * 1000
        out.append(trade(INSTS[i % 3], i, ts))
        if i % 4 == 0:
            out.append(book(INSTS[i % 3], i, ts))
    return out


def parquet_names(root: Path) -> dict[Path, frozenset[str]]:
    return {d: frozenset(p.name for p in d.glob("*.parquet")) for d in sorted(root.glob("*/date=*/instId=*"))}


def lock_waiters(path: Path) -> int:
    """How many processes or threads wait for the flock of `path` (the kernel's /proc/locks)."""
    ino = os.stat(path).st_ino
    return sum(1 for line in Path("/proc/locks").read_text().splitlines()
               if "->" in line and line.split()[-3].endswith(f":{ino}"))


async def test_compact_swaps_each_directory_whole_keeps_every_record_once_and_verify_counts_agree(
        kafka_broker: BrokerInfo, topic_prefix: str, tmp_path: Path) -> None:
    records = records_over_two_days()
    await publish(kafka_broker.bootstrap_servers, topic_prefix, records)
    root = tmp_path / "archive"
    store = ArchiveStore.from_url(str(root))
    settings = settings_for(kafka_broker, topic_prefix, str(root), max_file_bytes=300)  # many small files
    async with running(Archiver(settings, store)) as archiver:
        await until(lambda: archiver.stats.records_in >= len(records) and archiver.stats.open_files == 0)
    before = verify_report(store, "2026-12-01")
    assert before.problems == [] and before.files > 2 * len(INSTS)
    day2_before = {d: n for d, n in parquet_names(root).items() if "date=2026-12-02" in str(d)}
    old_dirs = {d: n for d, n in parquet_names(root).items() if "date=2026-12-01" in str(d)}
    assert len(old_dirs) == 2 * len(INSTS)

    # A reader listing the directories meanwhile sees each one's old files or its new ones, nothing between.
    seen: list[dict[Path, frozenset[str]]] = []
    done = threading.Event()

    def reader() -> None:
        while not done.is_set():
            seen.append({d: frozenset(p.name for p in d.glob("*.parquet")) for d in old_dirs})
        seen.append({d: frozenset(p.name for p in d.glob("*.parquet")) for d in old_dirs})

    thread = threading.Thread(target=reader)
    thread.start()
    try:
        report = await asyncio.to_thread(compact, store, date="2026-12-01", min_bytes=1 << 20, target_bytes=1 << 30,
                                         now=AFTER_DAY2)
    finally:
        done.set()
        thread.join()
    new_dirs = {d: frozenset(p.name for p in d.glob("*.parquet")) for d in old_dirs}
    assert all(len(names) == 1 for names in new_dirs.values())  # one Kafka partition: one file per directory
    assert report["merged_files"] == sum(len(n) for n in old_dirs.values() if len(n) > 1)  # a lone file stays
    for listing in seen:
        for d, names in listing.items():
            assert names in (old_dirs[d], new_dirs[d]), f"{d}: a reader saw {sorted(names)}"

    after = verify_report(store, "2026-12-01")
    assert after.problems == []
    assert (after.rows, after.records) == (before.rows, before.records) and after.files == len(old_dirs)
    trades = [r for r in records if isinstance(r, Trade)]
    ids = q(f"select recordId from read_parquet('{root}/trades/**/*.parquet')")
    assert sorted(r[0] for r in ids) == sorted(t.record_id for t in trades)  # every record exactly once
    assert not (root / STAGING).exists()  # a compact leaves no staging behind, not even empty directories
    again = compact(store, date="2026-12-01", min_bytes=1 << 20, target_bytes=1 << 30, now=AFTER_DAY2)
    assert again["merged_files"] == 0 and verify_report(store, "2026-12-01").records == before.records

    # Today's date is still being written: refused, untouched.
    with pytest.raises(LiveDateError, match="2026-12-02"):
        compact(store, date="2026-12-02", min_bytes=1 << 20, target_bytes=1 << 30, now=DURING_DAY2)
    day2_after = {d: n for d, n in parquet_names(root).items() if "date=2026-12-02" in str(d)}
    assert day2_before and day2_after == day2_before and verify(store, "2026-12-02") == []


def test_compact_removes_what_an_interrupted_run_staged_for_its_date_and_keeps_other_dates(tmp_path: Path) -> None:
    """A run killed mid-swap leaves `_compact/<dataset>/date=D/...`; the next compact of D removes it (and the
    then empty `_compact/`), while another date's staging, which its own compact may be using, stays."""
    root = tmp_path / "archive"
    store = ArchiveStore.from_url(str(root))
    leftovers = [root / STAGING / "trades" / "date=2026-12-01" / "instId=BTC-USDT" / "old.parquet",
                 root / STAGING / "books" / "date=2026-12-01" / "instId=ETH-USDT" / "_manifest.json"]
    other = root / STAGING / "trades" / "date=2026-11-30" / "instId=BTC-USDT" / "staged.parquet"
    for path in [*leftovers, other]:
        path.parent.mkdir(parents=True)
        path.write_bytes(b"x")
    compact(store, date="2026-12-01", min_bytes=1 << 20, target_bytes=1 << 30, now=AFTER_DAY2)
    assert sorted(p.relative_to(root) for p in (root / STAGING).rglob("*") if p.is_file()) == [
        other.relative_to(root)]
    assert not (root / STAGING / "books").exists()
    compact(store, date="2026-11-30", min_bytes=1 << 20, target_bytes=1 << 30, now=AFTER_DAY2)
    assert not (root / STAGING).exists()


async def test_an_archiver_waits_for_compact_and_rereads_the_manifest_it_rewrote(
        kafka_broker: BrokerInfo, topic_prefix: str, tmp_path: Path) -> None:
    root = tmp_path / "archive"
    store = ArchiveStore.from_url(str(root))
    first = [trade("BTC-USDT", i, DAY1 + i) for i in range(12)]
    await publish(kafka_broker.bootstrap_servers, topic_prefix, first)
    part = root / "trades" / "date=2026-12-01" / "instId=BTC-USDT"
    async with running(Archiver(settings_for(kafka_broker, topic_prefix, str(root), max_file_bytes=300),
                                store)) as archiver:
        s = archiver.stats
        await until(lambda: s.records_in >= len(first) and s.open_files == 0)
        assert len(list(part.glob("*.parquet"))) > 2
        # Compact the day while this archiver runs; a late record of that day then lands next to the merged
        # file, and the manifest the archiver writes lists both (it re-read the one compact wrote).
        compact(store, date="2026-12-01", min_bytes=1 << 20, target_bytes=1 << 30, now=AFTER_DAY2)
        assert len(list(part.glob("*.parquet"))) == 1
        late = [trade("BTC-USDT", 100, DAY1 + 100)]
        await publish(kafka_broker.bootstrap_servers, topic_prefix, late)
        await until(lambda: s.records_in >= len(first) + 1 and s.open_files == 0)
        assert verify(store) == []
        assert len(list(part.glob("*.parquet"))) == 2

        # While a compaction holds the day, the archiver's next file of that day waits for it.
        files_before = frozenset(part.glob("*.parquet"))
        with store.date_lock("2026-12-01", exclusive=True):
            await publish(kafka_broker.bootstrap_servers, topic_prefix, [trade("BTC-USDT", 101, DAY1 + 101)])
            lock = root / LOCKS / "date=2026-12-01.lock"
            await until(lambda: lock_waiters(lock) >= 1, what="the archiver to wait for the lock")
            assert frozenset(part.glob("*.parquet")) == files_before
        await until(lambda: s.records_in >= len(first) + 2 and s.open_files == 0)
    assert verify(store) == []
    offsets = sorted(fc.first_offset for p in part.glob("*.parquet") if (fc := parse_file_name(p.name)))
    assert len(offsets) == 3
    ids = q(f"select recordId from read_parquet('{part}/*.parquet')")
    assert len(ids) == len({r[0] for r in ids}) == len(first) + 2


async def test_compact_on_s3_keeps_every_record_once_and_verify_counts_agree(
        kafka_broker: BrokerInfo, topic_prefix: str, moto_s3: str) -> None:  # noqa: F811 (the fixture)
    fs = pafs.S3FileSystem(endpoint_override=moto_s3, scheme="http", region="us-east-1", allow_bucket_creation=True)
    fs.create_dir("compact-bucket")
    records = [trade(INSTS[i % 2], i, DAY1 + i * 1000) for i in range(24)]
    await publish(kafka_broker.bootstrap_servers, topic_prefix, records)
    url = "s3://compact-bucket/okx"
    store = ArchiveStore.from_url(url, endpoint_override=moto_s3, region="us-east-1")
    settings = settings_for(kafka_broker, topic_prefix, url, s3_endpoint_override=moto_s3, s3_region="us-east-1",
                            max_file_bytes=300)
    async with running(Archiver(settings, store)) as archiver:
        s = archiver.stats
        await until(lambda: s.records_in >= len(records) and s.open_files == 0)
    before = verify_report(store, "2026-12-01")
    assert before.problems == [] and before.files > 4 and before.records == len(records)
    report = compact(store, date="2026-12-01", min_bytes=1 << 20, target_bytes=1 << 30, now=AFTER_DAY2)
    assert report["merged_files"] == before.files
    after = verify_report(store, "2026-12-01")
    assert after.problems == [] and after.files == 2 and (after.rows, after.records) == (before.rows, before.records)
    storage = {"aws_endpoint_url": f"http://{moto_s3}", "aws_region": "us-east-1", "aws_allow_http": "true",
               "aws_access_key_id": os.environ["AWS_ACCESS_KEY_ID"],
               "aws_secret_access_key": os.environ["AWS_SECRET_ACCESS_KEY"]}
    ids = pl.scan_parquet(f"{url}/trades/**/*.parquet", storage_options=storage).select("recordId").collect()
    assert sorted(ids["recordId"].to_list()) == sorted(t.record_id for t in records)
