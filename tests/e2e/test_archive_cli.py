"""`okx-ingest archive verify` and `okx-ingest archive compact` as a user runs them: the installed command in a
subprocess, over an archive the real archiver wrote from the real broker; exit codes and what they print."""

from __future__ import annotations

import datetime as dt
import os
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from ingest.core.records import Record
from ingest.io.archive_store import ArchiveStore
from ingest.services.archive import Archiver
from ingest.services.archive_tools import STAGING
from tests.conftest import BrokerInfo
from tests.integration.test_archive import book, publish, q, running, settings_for, trade, until

OKX_INGEST = str(Path(sys.executable).with_name("okx-ingest"))
DAY = 1_748_736_000_000  # 2025-06-01T00:00:00Z: a day that is over whenever this runs
DATE = "2025-06-01"
INSTS = ("BTC-USDT", "ETH-USDT")


def okx_ingest(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OKX_INGEST", "OKX_API"))}
    return subprocess.run([OKX_INGEST, *args], capture_output=True, text=True, timeout=120, cwd=cwd, env=env)


@pytest.fixture
async def archive(kafka_broker: BrokerInfo, topic_prefix: str, tmp_path: Path) -> Path:
    """A config file whose `archive.url` holds many small files of DATE (and a few of the next day)."""
    records: list[Record] = []
    for i in range(30):
        records.append(trade(INSTS[i % 2], i, DAY + i * 1000))
        if i % 6 == 0:
            records.append(book(INSTS[i % 2], i, DAY + i * 1000))
    records += [trade("BTC-USDT", 100 + i, DAY + 86_400_000 + i) for i in range(3)]
    await publish(kafka_broker.bootstrap_servers, topic_prefix, records)
    root = tmp_path / "archive"
    settings = settings_for(kafka_broker, topic_prefix, str(root), max_file_bytes=300)
    async with running(Archiver(settings, ArchiveStore.from_url(str(root)))) as archiver:
        s = archiver.stats
        await until(lambda: s.records_in >= len(records) and s.open_files == 0)
    config = tmp_path / "okx-ingest.toml"
    config.write_text(f'[archive]\nurl = "{root}"\n')
    return config


def summary(stderr: str) -> str:
    return next(line for line in stderr.splitlines() if line.startswith("archive verify:"))


async def test_verify_then_compact_then_verify_through_the_command(archive: Path) -> None:
    cwd = archive.parent
    root = cwd / "archive"
    first = okx_ingest("archive", "verify", "--config", str(archive), "--date", DATE, cwd=cwd)
    assert first.returncode == 0, first.stderr
    before = summary(first.stderr)
    assert "0 problem(s)" in before and DATE in before
    files_before = len(list(root.glob(f"*/date={DATE}/*/*.parquet")))
    assert f"{files_before} file(s)" in before and files_before > 4

    done = okx_ingest("archive", "compact", "--config", str(archive), "--date", DATE, cwd=cwd)
    assert done.returncode == 0, done.stderr
    assert f"{files_before} merged files" in done.stderr and "Traceback" not in done.stderr
    files_after = len(list(root.glob(f"*/date={DATE}/*/*.parquet")))
    assert files_after < files_before

    again = okx_ingest("archive", "verify", "--config", str(archive), "--date", DATE, cwd=cwd)
    assert again.returncode == 0, again.stderr
    after = summary(again.stderr)
    # The same rows and records, in fewer files.
    assert after.split(", ", 1)[1] == before.split(", ", 1)[1] and f"{files_after} file(s)" in after
    assert q(f"select count(*), count(distinct recordId) from read_parquet('{root}/trades/date={DATE}/*/*.parquet')"
             ) == [(30, 30)]
    whole = okx_ingest("archive", "verify", "--config", str(archive), cwd=cwd)  # every date
    assert whole.returncode == 0 and "0 problem(s)" in whole.stderr


async def test_verify_and_compact_leave_no_probe_in_the_archive(archive: Path) -> None:
    """verify only reads (it writes no probe), compact deletes its start-up probe: no `_probe` is left."""
    cwd = archive.parent
    root = cwd / "archive"

    def tree() -> list[Path]:
        return sorted(p.relative_to(root) for p in root.rglob("*"))

    before = tree()
    out = okx_ingest("archive", "verify", "--config", str(archive), cwd=cwd)
    assert out.returncode == 0, out.stderr
    assert tree() == before
    out = okx_ingest("archive", "compact", "--config", str(archive), "--date", DATE, cwd=cwd)
    assert out.returncode == 0, out.stderr
    assert [p for p in tree() if "_probe" in str(p)] == []
    assert not (root / STAGING).exists()  # nor compact's staging


async def test_verify_exits_1_naming_a_corrupt_and_a_missing_file(archive: Path) -> None:
    cwd = archive.parent
    files = sorted((cwd / "archive" / "trades" / f"date={DATE}" / "instId=BTC-USDT").glob("*.parquet"))
    corrupt, missing = files[0], files[1]
    data = bytearray(corrupt.read_bytes())
    data[len(data) // 2] ^= 0xFF
    corrupt.write_bytes(bytes(data))
    missing.unlink()
    out = okx_ingest("archive", "verify", "--config", str(archive), "--date", DATE, cwd=cwd)
    assert out.returncode == 1
    assert f"{corrupt.name}: corrupt" in out.stderr and f"{missing.name}: missing" in out.stderr
    assert "2 problem(s)" in summary(out.stderr) and "Traceback" not in out.stderr
    other_day = (dt.date.fromisoformat(DATE) + dt.timedelta(days=1)).isoformat()
    assert okx_ingest("archive", "verify", "--config", str(archive), "--date", other_day, cwd=cwd).returncode == 0
    assert pq.read_table(files[2]).num_rows > 0  # the others are untouched


def test_verify_of_an_archive_that_does_not_exist_is_exit_2_naming_the_setting(tmp_path: Path) -> None:
    """A mistyped path must not pass as an empty archive with "0 problem(s)"."""
    config = tmp_path / "okx-ingest.toml"
    config.write_text(f'[archive]\nurl = "{tmp_path / "archvie"}"\n')
    out = okx_ingest("archive", "verify", "--config", str(config), cwd=tmp_path)
    assert out.returncode == 2, out.stderr
    assert "archive.url" in out.stderr and "does not exist" in out.stderr and "Traceback" not in out.stderr
    assert not (tmp_path / "archvie").exists()  # verify writes nothing, not even the directory


@pytest.mark.parametrize("command", ["verify", "compact"])
@pytest.mark.parametrize("date", ["2025-13-01", "01.06.2025", "2025-6-1", "yesterday"])
def test_a_bad_date_is_exit_2_with_what_is_expected(tmp_path: Path, command: str, date: str) -> None:
    config = tmp_path / "okx-ingest.toml"
    config.write_text(f'[archive]\nurl = "{tmp_path / "archive"}"\n')
    out = okx_ingest("archive", command, "--config", str(config), "--date", date, cwd=tmp_path)
    assert out.returncode == 2
    assert f"--date: not a date: '{date}' (use YYYY-MM-DD" in out.stderr and "Traceback" not in out.stderr
    assert not (tmp_path / "archive").exists()  # refused before touching anything


async def test_compact_of_today_is_refused_with_exit_2_and_changes_nothing(archive: Path) -> None:
    cwd = archive.parent
    root = cwd / "archive"
    today = dt.datetime.now(dt.UTC).date().isoformat()
    (root / "trades" / f"date={today}").mkdir(parents=True)
    def tree() -> list[Path]:
        return sorted(p.relative_to(root) for p in root.rglob("*"))

    before = tree()
    out = okx_ingest("archive", "compact", "--config", str(archive), "--date", today, cwd=cwd)
    assert out.returncode == 2
    assert f"--date {today} is not over yet in UTC" in out.stderr and "still writing it" in out.stderr
    assert "Traceback" not in out.stderr
    assert tree() == before
