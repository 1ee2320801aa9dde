"""The archive store failing in the middle of a run, for real: a local disk that fills up (a small tmpfs) and an
S3 server that goes away and comes back (moto's server, stopped and restarted on its port). Each time: nothing
more is committed, readiness says why, the failure metric is up, no partial file is left or visible, and once
the store is back the archiver catches up with every record exactly once."""

from __future__ import annotations

import contextlib
import errno
import os
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
from moto.server import ThreadedMotoServer

from ingest.io.archive_store import TMP_SUFFIX, ArchiveStore
from ingest.services.archive import Archiver
from ingest.services.archive_tools import verify
from tests.conftest import BrokerInfo
from tests.integration.test_archive import DAY1, INSTS, publish, q, running, settings_for, settled, trade, until


@contextlib.contextmanager
def small_disk(path: Path, size: str = "4m") -> Iterator[Path]:
    """A real filesystem of `size` bytes (tmpfs), so ENOSPC comes from the kernel, not from a stub."""
    path.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], check=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def fill(disk: Path) -> Path:
    """Take every free byte of `disk` with one file; removing it frees the disk again."""
    filler = disk / "filler"
    chunk = b"\0" * (64 * 1024)
    with filler.open("wb", buffering=0) as out:
        with contextlib.suppress(OSError):
            while True:
                out.write(chunk)
        with contextlib.suppress(OSError):  # the last partial page
            while True:
                out.write(b"\0")
    with pytest.raises(OSError) as full:
        (disk / "probe").write_bytes(b"x")
    assert full.value.errno == errno.ENOSPC
    return filler


def committed_all(archiver: Archiver, n: int) -> Callable[[], bool]:
    """The first `n` records of the topics (every partition starts at 0) archived and their offsets committed."""
    return lambda: settled(archiver, n)() and sum(archiver.stats.last_commit.values()) == n


def metric(archiver: Archiver, name: str) -> float:
    return float({m.name: m.samples[0].value for m in archiver.metrics()}[name])


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a tmpfs needs root (CI runs as root)")
async def test_a_disk_that_fills_up_mid_run_commits_nothing_leaves_no_partial_file_and_catches_up_when_freed(
        kafka_broker: BrokerInfo, topic_prefix: str, tmp_path: Path) -> None:
    with small_disk(tmp_path / "disk") as disk:
        root = disk / "archive"
        store = ArchiveStore.from_url(str(root))
        first = [trade(INSTS[i % 3], i, DAY1 + i) for i in range(12)]
        second = [trade(INSTS[i % 3], i, DAY1 + 60_000 + i) for i in range(12, 30)]
        async with running(Archiver(settings_for(kafka_broker, topic_prefix, str(root)), store)) as archiver:
            await publish(kafka_broker.bootstrap_servers, topic_prefix, first)
            await until(committed_all(archiver, len(first)), what="the first records archived and committed")
            files = sorted(root.rglob("*.parquet"))
            committed = dict(archiver.stats.last_commit)
            filler = fill(disk)

            await publish(kafka_broker.bootstrap_servers, topic_prefix, second)
            await until(lambda: archiver.stats.store_failures >= 2, what="writes failing on the full disk")
            ready = archiver.readiness()
            assert not ready.ready
            assert any("archive store failing" in r and "No space left" in r for r in ready.reasons), ready.reasons
            assert metric(archiver, "okx_ingest_archive_store_down") == 1
            assert archiver.stats.last_commit == committed, "nothing is committed while the disk is full"
            assert sorted(root.rglob("*.parquet")) == files, "no new file is visible"
            assert not list(root.rglob(f"*{TMP_SUFFIX}")), "no partial temporary holds the space"

            filler.unlink()
            await until(committed_all(archiver, len(first) + len(second)), what="the catch-up once the disk is freed")
            assert archiver.readiness().ready
            assert metric(archiver, "okx_ingest_archive_store_down") == 0
        ids = q(f"select recordId from read_parquet('{root}/trades/**/*.parquet')")
        assert sorted(r[0] for r in ids) == sorted(t.record_id for t in first + second)
        assert verify(store) == []


async def test_an_s3_store_that_goes_away_mid_run_commits_nothing_and_catches_up_when_it_is_back(
        kafka_broker: BrokerInfo, topic_prefix: str, aws_env: dict[str, str]) -> None:
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"{host}:{port}"
    try:
        pafs.S3FileSystem(endpoint_override=endpoint, scheme="http", region="us-east-1",
                          allow_bucket_creation=True).create_dir("archive-outage")
        url = "s3://archive-outage/okx"
        store = ArchiveStore.from_url(url, endpoint_override=endpoint, region="us-east-1")
        settings = settings_for(kafka_broker, topic_prefix, url, s3_endpoint_override=endpoint, s3_region="us-east-1")
        first = [trade(INSTS[i % 3], i, DAY1 + i) for i in range(12)]
        second = [trade(INSTS[i % 3], i, DAY1 + 60_000 + i) for i in range(12, 30)]
        async with running(Archiver(settings, store)) as archiver:
            await publish(kafka_broker.bootstrap_servers, topic_prefix, first)
            await until(committed_all(archiver, len(first)), what="the first records archived and committed")
            committed = dict(archiver.stats.last_commit)
            server.stop()  # moto keeps its buckets in this process: a restart on the same port brings them back

            await publish(kafka_broker.bootstrap_servers, topic_prefix, second)
            await until(lambda: archiver.stats.store_failures >= 2, what="uploads failing")
            ready = archiver.readiness()
            assert not ready.ready and any("archive store failing" in r for r in ready.reasons), ready.reasons
            assert metric(archiver, "okx_ingest_archive_store_down") == 1
            assert archiver.stats.last_commit == committed, "nothing is committed while S3 is away"

            server = ThreadedMotoServer(ip_address=host, port=port, verbose=False)
            server.start()
            await until(committed_all(archiver, len(first) + len(second)), what="the catch-up once S3 is back")
            assert archiver.readiness().ready
        assert verify(store) == []
        fs = pafs.S3FileSystem(endpoint_override=endpoint, scheme="http", region="us-east-1")
        names = [i.path for i in fs.get_file_info(pafs.FileSelector("archive-outage/okx/trades", recursive=True))
                 if i.path.endswith(".parquet")]
        ids = [r for n in names for r in pq.read_table(n, filesystem=fs, columns=["recordId"])["recordId"].to_pylist()]
        assert sorted(ids) == sorted(t.record_id for t in first + second), "every record exactly once"
    finally:
        server.stop()
