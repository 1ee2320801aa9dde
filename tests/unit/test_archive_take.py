"""The archiver's per-record path without a broker: fetched records handed to it as aiokafka gives them."""

from __future__ import annotations

import asyncio
from pathlib import Path

import msgspec
import pyarrow.parquet as pq
from aiokafka.structs import ConsumerRecord, TopicPartition

from ingest.config import Settings
from ingest.core.avro import RecordEncoder
from ingest.core.records import Record, Source, Trade
from ingest.io.archive_store import ArchiveStore
from ingest.services.archive import Archiver

DAY1 = 1_796_083_200_000  # 2026-12-01T00:00:00Z
KAFKA_TS = DAY1 + 86_400_000 + 7  # the next day, so the date shows which time was used


def a_trade(i: int) -> Trade:
    return Trade(channel="trades", inst_id="BTC-USDT", ts=DAY1 + i, recv_ts_ns=(DAY1 + i) * 1_000_000,
                 source=Source.WS, conn_id="public-0#1", recv_seq=i, record_id=f"r{i}", trade_id=str(100 + i),
                 px="60000.5", sz="0.01", side="buy")


class HandBuilt:
    """A decoder handing out given records: a record built in-process can lack its exchange time
    (`ts=None`), which the wire cannot carry, and the archiver must not die on it."""

    def __init__(self, records: list[Record]) -> None:
        self._records = iter(records)

    def decode(self, value: bytes, *, schema_name: str | None = None) -> Record:
        return next(self._records)


def archiver_at(root: Path) -> Archiver:
    settings = Settings.model_validate({"kafka": {"bootstrap_servers": "127.0.0.1:9", "topic_prefix": "t."},
                                        "archive": {"url": str(root), "metrics_port": 0},
                                        "obs": {"metrics_port": 0}})
    return Archiver(settings, ArchiveStore.from_url(str(root)), bootstrap_servers="127.0.0.1:9")


def fetched(records: list[Record]) -> list[ConsumerRecord]:
    enc = RecordEncoder("t.")
    out = []
    for offset, r in enumerate(records):
        e = enc.encode(r)
        out.append(ConsumerRecord(topic=e.topic, partition=0, offset=offset, timestamp=KAFKA_TS, timestamp_type=0,
                                  key=e.key, value=e.value, checksum=None, serialized_key_size=len(e.key or b""),
                                  serialized_value_size=len(e.value), headers=list(e.headers)))
    return out


def test_a_record_without_an_exchange_time_goes_to_rejected_by_its_kafka_date_and_the_rest_is_archived(
        tmp_path: Path) -> None:
    good = [a_trade(i) for i in range(3)]
    timeless = msgspec.structs.replace(a_trade(9), ts=None)
    archiver = archiver_at(tmp_path)
    archiver._decoder = HandBuilt([good[0], timeless, good[1], good[2]])  # type: ignore[assignment]

    async def take_and_write() -> None:
        await archiver._take(TopicPartition("t.trades", 0), fetched([*good[:1], a_trade(9), *good[1:]]))
        await archiver._flush_due(final=True)

    asyncio.run(take_and_write())
    assert archiver.stats.records_rejected == 1 and archiver.stats.records_written == 3
    kept = pq.read_table(tmp_path / "trades/date=2026-12-01/instId=BTC-USDT")
    assert sorted(kept.column("recordId").to_pylist()) == ["r0", "r1", "r2"]
    rejected = pq.read_table(next((tmp_path / "_rejected/date=2026-12-02/instId=_none_").glob("*.parquet")))
    assert rejected.column("_offset").to_pylist() == [1]
    assert rejected.column("field").to_pylist() == ["ts"]
    assert "requires" in rejected.column("reason")[0].as_py()
