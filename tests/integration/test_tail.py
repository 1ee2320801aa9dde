"""`okx-ingest tail` against the real test broker: decoded, exact, complete at the end, searchable by time."""

from __future__ import annotations

import asyncio
import io
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from ingest.cli import main
from ingest.config import Settings, load_settings
from ingest.core.avro import RecordEncoder
from ingest.core.records import (
    DeadLetter,
    DeadLetterReason,
    GapEvent,
    GapKind,
    GapStatus,
    Record,
    Source,
    StreamPosition,
    Trade,
)
from ingest.io.kafka import KafkaSink
from ingest.io.sink import EncodedRecord
from ingest.tail import tail
from tests.conftest import BrokerInfo

pytestmark = pytest.mark.broker

T0 = 1_764_000_000_000  # 2025-11-24T16:00:00Z


def trade(i: int, inst: str = "BTC-USDT", px: str = "97000.10") -> Trade:
    return Trade(channel="trades", inst_id=inst, ts=T0 + i * 1000, recv_ts_ns=(T0 + i * 1000) * 10**6 + 5,
                 source=Source.WS, conn_id="c1", recv_seq=i + 1, record_id=f"c1:{i + 1}:0", trade_id=str(1000 + i),
                 px=px, sz="0.00001000", side="buy" if i % 2 else "sell")


def settings_for(broker: BrokerInfo, prefix: str) -> Settings:
    return load_settings(None, kafka={"bootstrap_servers": broker.bootstrap_servers, "topic_prefix": prefix,
                                      "enable_idempotence": False, "partitions": 3})


async def publish(settings: Settings, batches: Sequence[Sequence[Record]],
                  encoder: RecordEncoder | None = None) -> None:
    """Each batch is its own write (its own broker batch per partition), as the recorder sends them."""
    enc = encoder or RecordEncoder(settings.kafka.topic_prefix)
    topics = [f"{settings.kafka.topic_prefix}{k}" for k in ("trades", "gaps", "dlq")]
    sink = KafkaSink(settings.kafka, topics=topics)
    try:
        await sink.start()
        for batch in batches:
            await sink.write([enc.encode(r) for r in batch])
    finally:
        await sink.close()


async def run_tail(settings: Settings, topics: Sequence[str], **kw: Any) -> list[str]:
    out = io.StringIO()
    await tail(settings, topics, out=out, timeout_s=20, **kw)
    return out.getvalue().splitlines()


async def test_last_n_returns_exactly_the_newest_records_although_the_broker_end_lags(
        kafka_broker: BrokerInfo, topic_prefix: str) -> None:
    s = settings_for(kafka_broker, topic_prefix)
    await publish(s, [[trade(i) for i in range(b * 10, b * 10 + 10)] for b in range(3)])  # one key: one partition
    lines = await run_tail(s, ["trades"], last=4, fmt="json")
    got = [json.loads(line) for line in lines]
    assert [g["value"]["tradeId"] for g in got] == ["1026", "1027", "1028", "1029"]


async def test_from_iso_starts_at_the_first_record_at_or_after_that_time(
        kafka_broker: BrokerInfo, topic_prefix: str) -> None:
    s = settings_for(kafka_broker, topic_prefix)
    await publish(s, [[trade(i, inst) for i in range(b * 8, b * 8 + 8)] for b in range(4)
                      for inst in ("BTC-USDT", "ETH-USDT")])
    lines = await run_tail(s, ["trades"], from_ms=T0 + 21 * 1000, fmt="json", inst="ETH-USDT")
    ids = [json.loads(line)["value"]["tradeId"] for line in lines]
    assert ids == [str(1000 + i) for i in range(21, 32)]


async def test_json_keeps_decimals_exact_and_table_makes_gaps_and_dead_letters_readable(
        kafka_broker: BrokerInfo, topic_prefix: str) -> None:
    s = settings_for(kafka_broker, topic_prefix)
    gap = GapEvent(gap_id="g-1", kind=GapKind.DISCONNECT, status=GapStatus.OPEN, reason="connection lost",
                   channel="trades", inst_id="BTC-USDT", before=StreamPosition(ts=T0, trade_id=1000),
                   after=StreamPosition(ts=T0 + 5000, trade_id=1009), detected_ts_ns=(T0 + 6000) * 10**6)
    dead = DeadLetter(reason_code=DeadLetterReason.BAD_NUMBER, reason="px is not a decimal", path="data[0].px",
                      raw=b'{"arg":{"channel":"trades"},"data":[{"px":"9x7"}]}', source=Source.WS, conn_id="c1",
                      recv_seq=7, recv_ts_ns=(T0 + 7000) * 10**6, channel="trades", inst_id="BTC-USDT",
                      record_id="c1:7:dlq")
    await publish(s, [[trade(0, px="97000.1000000000000001")], [gap, dead]])
    js = await run_tail(s, ["trades"], fmt="json")
    assert json.loads(js[0])["value"]["px"] == "97000.1000000000000001"
    assert json.loads(js[0])["value"]["sz"] == "0.00001000"
    table = await run_tail(s, ["gaps", "dlq"])
    assert len(table) == 2
    gap_line = next(line for line in table if "GAP" in line)
    assert "GAP open disconnect trades BTC-USDT" in gap_line and "tradeId=1000" in gap_line
    assert "tradeId=1009" in gap_line and "'connection lost'" in gap_line
    dead_line = next(line for line in table if "DEAD LETTER" in line)
    assert "bad_number: px is not a decimal at data[0].px" in dead_line and '"px":"9x7"' in dead_line


async def test_confluent_framed_values_are_decoded_by_their_schema_header(
        kafka_broker: BrokerInfo, topic_prefix: str) -> None:
    s = settings_for(kafka_broker, topic_prefix)
    confluent = RecordEncoder(topic_prefix, schema_ids={Trade.AVRO_NAME: 7})
    assert confluent.encode(trade(0)).value[:1] == b"\x00"
    await publish(s, [[trade(0), trade(1)]], encoder=confluent)
    got = [json.loads(line) for line in await run_tail(s, ["trades"], fmt="json")]
    assert [g["value"]["px"] for g in got] == ["97000.10", "97000.10"]
    assert {g["schema"] for g in got} == {"okx.ingest.v1.Trade"}


async def test_an_undecodable_value_is_shown_with_the_reason(kafka_broker: BrokerInfo, topic_prefix: str) -> None:
    s = settings_for(kafka_broker, topic_prefix)
    sink = KafkaSink(s.kafka, topics=[f"{topic_prefix}trades"])
    try:
        await sink.start()
        await sink.write([EncodedRecord(f"{topic_prefix}trades", b"BTC-USDT", b"not avro at all", (), T0)])
    finally:
        await sink.close()
    lines = await run_tail(s, ["trades"])
    assert len(lines) == 1 and "UNDECODABLE: value starts with 6e6f" in lines[0]


class Signalling(io.StringIO):
    """An output that wakes a waiter whenever a line is written."""

    def __init__(self) -> None:
        super().__init__()
        self.wrote = asyncio.Event()

    def write(self, s: str) -> int:
        n = super().write(s)
        self.wrote.set()
        return n


async def test_follow_prints_records_written_after_it_started(kafka_broker: BrokerInfo, topic_prefix: str) -> None:
    s = settings_for(kafka_broker, topic_prefix)
    await publish(s, [[trade(0)]])
    out, stop = Signalling(), asyncio.Event()
    task = asyncio.create_task(tail(s, ["trades"], out=out, follow=True, stop=stop, fmt="json", timeout_s=20))
    try:
        async with asyncio.timeout(20):
            while "1000" not in out.getvalue():
                out.wrote.clear()
                await out.wrote.wait()
            await publish(s, [[trade(1)], [trade(2)]])
            while "1002" not in out.getvalue():
                out.wrote.clear()
                await out.wrote.wait()
    finally:
        stop.set()
        async with asyncio.timeout(10):
            printed = await task
    assert printed == 3


def test_cli_tail_prints_and_exits_zero_and_a_missing_topic_is_a_clear_error(
        kafka_broker: BrokerInfo, topic_prefix: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    s = settings_for(kafka_broker, topic_prefix)
    asyncio.run(publish(s, [[trade(0), trade(1)]]))
    config = tmp_path / "c.toml"
    config.write_text(f'[kafka]\ntopic_prefix = "{topic_prefix}"\n')
    rc = main(["tail", "trades", "--config", str(config), "--bootstrap", kafka_broker.bootstrap_servers,
               "--last", "1"])
    captured = capsys.readouterr()
    assert rc == 0
    assert captured.out.count("\n") == 1 and "tradeId=1001" in captured.out and "px=97000.10" in captured.out
    rc = main(["tail", "nope", "--config", str(config), "--bootstrap", kafka_broker.bootstrap_servers])
    captured = capsys.readouterr()
    assert rc == 2 and "topic nope does not exist" in captured.err
