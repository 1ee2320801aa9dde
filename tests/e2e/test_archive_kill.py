"""End to end: simulator -> recorder -> Kafka -> archiver (a real `okx-ingest archive` process), with the
archiver SIGKILLed again and again while it works. Afterwards every record on the topics is in the archive
exactly once, and DuckDB's and Polars' counts and sums equal the topics'."""

from __future__ import annotations

import asyncio
import os
import random
import secrets
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from decimal import Decimal
from pathlib import Path

import duckdb
import polars as pl
import pyarrow.parquet as pq
import pytest
from aiokafka import AIOKafkaConsumer
from aiokafka.structs import TopicPartition

from ingest.core.archive_schema import table_to_records
from ingest.core.avro import decode
from ingest.core.records import Record, TopicKind, Trade, topic_name
from ingest.okx.channels import SubArg
from ingest.sim import SimConfig, SimServer
from tests.conftest import BrokerInfo
from tests.e2e.harness import daemon_settings, running

INSTS = ("BTC-USDT", "ETH-USDT")
CHANNELS = ("trades-all", "books", "tickers")
KILLS = 8
Coord = tuple[str, int, int]


async def topic_records(bootstrap: str, prefix: str) -> dict[Coord, Record]:
    """Every record on every record topic, by Kafka coordinates."""
    out: dict[Coord, Record] = {}
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False, group_id=None)
    await consumer.start()
    try:
        async with asyncio.timeout(60):
            tps = []
            for kind in TopicKind:
                parts = consumer.partitions_for_topic(topic_name(prefix, kind)) or set()
                tps += [TopicPartition(topic_name(prefix, kind), p) for p in parts]
            consumer.assign(tps)
            await consumer.seek_to_beginning(*tps)
            ends = await consumer.end_offsets(tps)
            while [tp for tp in tps if await consumer.position(tp) < ends[tp]]:
                batch = await consumer.getmany(*tps, timeout_ms=200)
                for tp, msgs in batch.items():
                    for m in msgs:
                        out[(tp.topic, tp.partition, m.offset)] = decode(m.value)
    finally:
        await consumer.stop()
    return out


def archive_records(root: Path) -> Counter[Coord]:
    """How many times each Kafka record is in the archive (data datasets; every file read back)."""
    seen: Counter[Coord] = Counter()
    for path in root.rglob("*.parquet"):
        if "_rejected" in path.parts:
            continue
        for _, topic, partition, offset in table_to_records(pq.read_table(path)):
            seen[(topic, partition, offset)] += 1
    return seen


def start_archiver(config: Path, log: Path) -> subprocess.Popen[bytes]:
    with log.open("ab") as out:
        return subprocess.Popen([sys.executable, "-m", "ingest.cli", "archive", "--config", str(config)],
                                stdout=out, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})


def tail(log: Path) -> str:
    return log.read_text()[-3000:]


async def until(predicate: Callable[[], bool], log: Path, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, f"timed out; archiver log:\n{tail(log)}"
        await asyncio.sleep(0.05)  # polling files another process writes


@pytest.mark.timeout(300)
async def test_sigkill_at_any_moment_leaves_every_record_in_the_archive_exactly_once(
        kafka_broker: BrokerInfo, topic_prefix: str, tmp_path: Path) -> None:
    root = tmp_path / "archive"
    config = tmp_path / "archive.toml"

    def write_config(max_file_bytes: int) -> None:
        # Each run cuts files elsewhere, so a redo cannot hide a duplicate behind an identical file name.
        config.write_text(f"""
[kafka]
bootstrap_servers = "{kafka_broker.bootstrap_servers}"
topic_prefix = "{topic_prefix}"
[archive]
url = "{root}"
group_id = "{topic_prefix}archive"
idle_close_s = 0.2
max_open_s = 1.0
max_file_bytes = {max_file_bytes}
metrics_port = 0
session_timeout_ms = 6000
[obs]
metrics_port = 0
log_format = "text"
""")

    log = tmp_path / "archiver.log"
    rng = random.Random(11)
    sim_config = SimConfig(instruments=INSTS, seed=3, api_key=secrets.token_hex(16), api_secret=secrets.token_hex(32),
                           passphrase=secrets.token_hex(8))
    async with SimServer(sim_config) as sim:
        settings = daemon_settings(sim, kafka_broker.bootstrap_servers, topic_prefix, tmp_path / "rec",
                                   okx={"channels": [], "subscriptions": [{"channel": c, "inst_id": i}
                                                                          for c in CHANNELS for i in INSTS]})
        async with running(settings) as daemon:
            for c in CHANNELS:
                for i in INSTS:
                    await sim.wait_subscribed(SubArg(c, i), timeout=20)
            kills = 0
            for _ in range(KILLS):  # record while the archiver is killed at random moments
                write_config(rng.randrange(2_000, 40_000))
                proc = start_archiver(config, log)
                await sim.tick(15)
                files, started = len(list(root.rglob("*.parquet"))), kills
                await until(lambda n=started: log.read_text().count("archive_started") > n, log)  # type: ignore[misc]
                await until(lambda n=files: len(list(root.rglob("*.parquet"))) > n, log)  # type: ignore[misc]
                await sim.tick(15)
                await asyncio.sleep(rng.uniform(0.0, 1.5))  # a random moment to kill at, not synchronisation
                proc.send_signal(signal.SIGKILL)
                proc.wait(10)
                kills += 1
                assert not list(root.rglob("*.parquet.*")) or all(p.name.startswith(".") for p in
                                                                 root.rglob("*.tmp"))
            assert await daemon.shutdown() == 0
    on_topics = await topic_records(kafka_broker.bootstrap_servers, topic_prefix)
    assert len(on_topics) > 200 and kills == KILLS
    # A last run catches up; then it is stopped cleanly (SIGTERM: drain, commit, exit 0).
    write_config(1_000_000)
    proc = start_archiver(config, log)
    # Its signal handlers are in place once it says it started; a SIGTERM before that would be a test race
    # (the archive may already be complete from the killed runs).
    await until(lambda: log.read_text().count("archive_started") > kills, log)
    deadline = time.monotonic() + 90
    while set(archive_records(root)) != set(on_topics):
        assert time.monotonic() < deadline, f"archive incomplete; log:\n{tail(log)}"
        await asyncio.sleep(0.5)  # polling files another process writes
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(60) == 0, tail(log)

    seen = archive_records(root)
    assert set(seen) == set(on_topics)
    assert [c for c, n in seen.items() if n != 1] == []  # each record exactly once, whatever the kills did
    assert "archive_started" in log.read_text()
    trades = [r for r in on_topics.values() if isinstance(r, Trade)]
    glob = f"{root}/trades/**/*.parquet"
    rel = duckdb.sql(f"select count(*), sum(px), sum(sz) from read_parquet('{glob}', hive_partitioning=true)")
    assert rel is not None
    assert rel.fetchall() == [(len(trades), sum(Decimal(t.px) for t in trades), sum(Decimal(t.sz) for t in trades))]
    ids = pl.scan_parquet(glob, hive_partitioning=True).select("recordId").collect()["recordId"].to_list()
    assert sorted(ids) == sorted(t.record_id for t in trades)
