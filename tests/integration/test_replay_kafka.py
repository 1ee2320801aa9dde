"""Replay's Kafka source on the embedded broker, whose time index answers every lookup with offset 0."""

from __future__ import annotations

from aiokafka import AIOKafkaConsumer
from aiokafka.structs import TopicPartition

from ingest.config import load_settings
from ingest.core.records import Record, Source, TopicKind, Trade, topic_name
from ingest.replay._kafka import REORDER_MARGIN_MS, KafkaReader
from tests.conftest import BrokerInfo
from tests.integration.test_backfill import publish

T0 = 1_796_000_000_000
N = 300


def _trade(n: int) -> Trade:
    return Trade(channel="trades", inst_id="BTC-USDT", ts=T0 + n * 1000, recv_ts_ns=(T0 + n * 1000) * 1_000_000,
                 source=Source.WS, record_id=f"ws:c:{n}", trade_id=str(n), px="1", sz="1", side="buy")


async def test_seeking_by_time_finds_the_first_record_at_or_after_it_where_the_broker_index_answers_0(
    kafka_broker: BrokerInfo, topic_prefix: str,
) -> None:
    settings = load_settings(None, kafka={"bootstrap_servers": kafka_broker.bootstrap_servers,
                                          "topic_prefix": topic_prefix, "partitions": 1})
    await publish(kafka_broker.bootstrap_servers, topic_prefix, [_trade(n) for n in range(N)])
    topic = topic_name(topic_prefix, TopicKind.TRADES)
    consumer = AIOKafkaConsumer(bootstrap_servers=kafka_broker.bootstrap_servers, group_id=None)
    await consumer.start()
    try:
        tps = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic) or ())]
        ends = await consumer.end_offsets(tps)
        (tp,) = [t for t in tps if ends[t] > 0]  # one key: one partition holds every record
        target = T0 + 200 * 1000
        answer = await consumer.offsets_for_times({tp: target})
        broker_says = answer[tp].offset if answer.get(tp) is not None else None
        begin = (await consumer.beginning_offsets([tp]))[tp]
        end = (await consumer.end_offsets([tp]))[tp]
        reader = KafkaReader(settings.kafka, None)
        consumer.assign([tp])
        found = {n: await reader._seek_time(consumer, tp, T0 + n * 1000, begin, end) for n in (0, 1, 137, 200, 299)}
        past_end = await reader._seek_time(consumer, tp, T0 + N * 1000, begin, end)
    finally:
        await consumer.stop()
    assert broker_says != begin + 200, "this broker's time index is right: the test would not cover the fallback"
    assert found == {n: begin + n for n in (0, 1, 137, 200, 299)}
    assert past_end == begin + N  # nothing at or after it: past the last record, beyond the reported end

    def keep(record: Record) -> bool:
        return True

    lo, hi = T0 + 100 * 1000, T0 + 130 * 1000  # the read starts REORDER_MARGIN_MS earlier, still not at 0
    assert lo - REORDER_MARGIN_MS > T0
    streams, at_begin = await reader.read(TopicKind.TRADES, lo, hi, hi, keep)
    got = [r.trade_id for s in streams for _, r in s if isinstance(r, Trade)]
    assert got == [str(n) for n in range(100, 130)]
    assert not at_begin
