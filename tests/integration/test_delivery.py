"""Delivery against a real Kafka-protocol broker: order, outages, shutdown, a full journal, topic management.

Outage scenarios use a private broker (`own_broker`) that is SIGKILLed and restarted. It is memory-only, so
it comes back empty: what it had acknowledged before the kill is gone with it, and the tests wait until
everything sent before the kill was acknowledged, then expect exactly the later records after the restart.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import textwrap
from collections import defaultdict
from collections.abc import AsyncIterator, Iterable
from pathlib import Path
from typing import Any

import pytest
from aiokafka import AIOKafkaConsumer
from aiokafka.admin import AIOKafkaAdminClient

from ingest.config import Compression, KafkaSettings
from ingest.core.backoff import full_jitter
from ingest.errors import DeliveryError
from ingest.io.broker import EmbeddedBroker
from ingest.io.delivery import Delivery
from ingest.io.journal import Journal
from ingest.io.kafka import KafkaSink, MissingTopicsError
from ingest.io.sink import EncodedRecord
from tests.conftest import BrokerInfo

KEYS = [f"{c}-USDT".encode() for c in ("BTC", "ETH", "SOL", "XRP", "DOGE")]
FAST: dict[str, Any] = {"request_timeout_ms": 1000, "delivery_timeout_ms": 2500, "partitions": 3}
REPO_ROOT = Path(__file__).resolve().parents[2]
WAIT_S = 30.0  # upper bound for any awaited condition; a hang fails the test instead of blocking the run


def record(topic: str, i: int, *, size: int = 60) -> EncodedRecord:
    return EncodedRecord(
        topic=topic,
        key=KEYS[i % len(KEYS)],
        value=i.to_bytes(8, "big") + b"." * (size - 8),
        headers=(("schema", b"okx.ingest.v1.Trade"), ("record_id", f"c1:{i}:0".encode()), ("source", b"ws")),
        ts_ms=1_700_000_000_000 + i,
    )


def kafka_settings(**overrides: Any) -> KafkaSettings:
    """Test settings: short timeouts, so a dead broker fails a write within about a second."""
    return KafkaSettings(**{**FAST, **overrides})


def sink_for(bootstrap: str, **kafka: Any) -> KafkaSink:
    # bootstrap_servers "embedded" in settings (idempotence off), the actual address passed in: as the daemon does.
    return KafkaSink(kafka_settings(**kafka), bootstrap_servers=bootstrap)


def delivery_for(sink: KafkaSink, directory: Path, *, queue_size: int = 200, max_bytes: int = 64 * 1024**2,
                 segment_bytes: int = 64 * 1024, cache_bytes: int = 16 * 1024) -> Delivery:
    journal = Journal(directory, max_bytes=max_bytes, segment_bytes=segment_bytes, fsync="batch",
                      cache_bytes=cache_bytes)
    return Delivery(sink, journal, queue_size=queue_size, drain_batch_bytes=32 * 1024, close_timeout_s=5.0,
                    backoff=lambda: full_jitter(0.02, 0.2))


@pytest.fixture
async def delivery_cleanup() -> AsyncIterator[list[Delivery]]:
    """Deliveries a test registers here are closed even when it fails."""
    opened: list[Delivery] = []
    yield opened
    for d in opened:
        await d.close(timeout_s=0)


async def consume(bootstrap: str, topics: Iterable[str], at_least: int) -> list[EncodedRecord]:
    """Everything in `topics` (all partitions): waits for `at_least` records, then reads until quiet."""
    consumer = AIOKafkaConsumer(*topics, bootstrap_servers=bootstrap, auto_offset_reset="earliest",
                                enable_auto_commit=False)
    await consumer.start()
    got: list[EncodedRecord] = []
    try:
        async with asyncio.timeout(WAIT_S):
            while True:
                batch = await consumer.getmany(timeout_ms=1000)
                for msgs in batch.values():
                    got.extend(EncodedRecord(m.topic, m.key, m.value, tuple(m.headers), m.timestamp) for m in msgs)
                if not batch and len(got) >= at_least:
                    return got
    finally:
        await consumer.stop()


def record_ids(records: Iterable[EncodedRecord]) -> list[bytes]:
    return [dict(r.headers)["record_id"] for r in records]


def per_key_first_seen(records: list[EncodedRecord]) -> dict[tuple[str, bytes | None], list[bytes]]:
    """Per (topic, key): record ids in arrival order, duplicates dropped keeping the first (what consumers do)."""
    seen: set[bytes] = set()
    out: dict[tuple[str, bytes | None], list[bytes]] = defaultdict(list)
    for r in records:
        rid = dict(r.headers)["record_id"]
        if rid not in seen:
            seen.add(rid)
            out[(r.topic, r.key)].append(rid)
    return out


def assert_exactly_in_order(got: list[EncodedRecord], sent: list[EncodedRecord], *, max_duplicates: int) -> None:
    assert per_key_first_seen(got) == per_key_first_seen(sent)  # none missing, none foreign, order per key
    assert len(got) - len(set(record_ids(got))) <= max_duplicates


async def test_records_arrive_in_order_per_key_with_headers_and_timestamps(
    kafka_broker: BrokerInfo, topic_prefix: str, tmp_path: Path, delivery_cleanup: list[Delivery]
) -> None:
    topics = [f"{topic_prefix}trades", f"{topic_prefix}books"]
    delivery = delivery_for(sink_for(kafka_broker.bootstrap_servers), tmp_path)
    delivery_cleanup.append(delivery)
    await delivery.start()
    sent = [record(topics[i % 2], i) for i in range(3000)]
    for r in sent:
        await delivery.put(r)
    await delivery.flush(WAIT_S)

    got = await consume(kafka_broker.bootstrap_servers, topics, len(sent))
    assert_exactly_in_order(got, sent, max_duplicates=0)
    by_id = {dict(r.headers)["record_id"]: r for r in got}
    assert all(by_id[dict(r.headers)["record_id"]] == r for r in sent)  # value, key, headers, timestamp intact
    stats = delivery.stats
    assert (stats.records_in, stats.records_out, stats.journal_entries, stats.queued) == (3000, 3000, 0, 0)
    assert stats.broker_up and stats.delivery_errors == 0


@pytest.mark.parametrize("codec", list(Compression))
async def test_every_compression_codec_delivers(
    kafka_broker: BrokerInfo, topic_prefix: str, codec: Compression
) -> None:
    topic = f"{topic_prefix}codec"
    # One bare write, no Delivery to retry it: patient timeouts (the fast ones are for outage tests; a loaded
    # machine's first produce to a new topic has been seen to take longer than 2.5 s).
    sink = sink_for(kafka_broker.bootstrap_servers, compression=codec, request_timeout_ms=10_000,
                    delivery_timeout_ms=30_000)
    await sink.start()
    try:
        sent = [record(topic, i) for i in range(50)]
        await sink.write(sent)
    finally:
        await sink.close()
    assert_exactly_in_order(await consume(kafka_broker.bootstrap_servers, [topic], 50), sent, max_duplicates=0)


async def test_broker_outage_spills_to_the_journal_with_flat_memory_and_drains_in_order_after_restart(
    own_broker: EmbeddedBroker, topic_prefix: str, tmp_path: Path, delivery_cleanup: list[Delivery]
) -> None:
    topic = f"{topic_prefix}outage"
    delivery = delivery_for(sink_for(own_broker.bootstrap_servers), tmp_path, queue_size=200, cache_bytes=16 * 1024)
    delivery_cleanup.append(delivery)
    await delivery.start()
    for i in range(500):
        await delivery.put(record(topic, i))
    await delivery.flush(WAIT_S)  # everything before the kill is acknowledged (and dies with the broker)

    own_broker.kill()
    during = [record(topic, i) for i in range(500, 6500)]
    for r in during:
        await delivery.put(r)
    await delivery.wait_for(lambda s: not s.broker_up and s.journal_records >= 5500, WAIT_S)
    stats = delivery.stats
    assert stats.queued_max <= stats.queue_size == 200  # memory stayed bounded ...
    assert stats.journal_cache_bytes <= 16 * 1024
    assert stats.journal_records >= 5500  # ... the journal grew instead
    assert stats.delivery_errors >= 1 and stats.last_error

    await own_broker.start()
    await delivery.flush(WAIT_S)
    assert delivery.stats.broker_up

    got = await consume(own_broker.bootstrap_servers, [topic], len(during))
    assert_exactly_in_order(got, during, max_duplicates=0)  # nothing was half-sent to the dead broker
    assert delivery.stats.queued_max <= 200


async def test_broker_killed_mid_stream_loses_nothing_and_duplicates_at_most_one_write(
    own_broker: EmbeddedBroker, topic_prefix: str, tmp_path: Path, delivery_cleanup: list[Delivery]
) -> None:
    topic = f"{topic_prefix}midstream"
    delivery = delivery_for(sink_for(own_broker.bootstrap_servers), tmp_path)
    delivery_cleanup.append(delivery)
    await delivery.start()
    sent = [record(topic, i) for i in range(4000)]
    for r in sent[:2000]:
        await delivery.put(r)
    own_broker.kill()  # while the sender is busy: some writes acknowledged, one in flight, the rest queued
    for r in sent[2000:]:
        await delivery.put(r)
    await delivery.wait_for(lambda s: not s.broker_up, WAIT_S)
    # Counted once the failure was seen: an acknowledgement already on its way when the broker died still counts.
    acknowledged = delivery.stats.records_out
    await own_broker.start()
    await delivery.flush(WAIT_S)

    # What the old broker acknowledged died with it; every later record must be in the new one, in order.
    expected = sent[acknowledged:]
    got = await consume(own_broker.bootstrap_servers, [topic], len(expected))
    assert_exactly_in_order(got, expected, max_duplicates=32 * 1024 // 60)  # at most one drain batch resent


async def test_close_with_the_broker_down_keeps_records_journaled_and_the_next_start_sends_them_first(
    own_broker: EmbeddedBroker, topic_prefix: str, tmp_path: Path, caplog: pytest.LogCaptureFixture,
    delivery_cleanup: list[Delivery]
) -> None:
    topic = f"{topic_prefix}restart"
    own_broker.kill()
    first = delivery_for(sink_for(own_broker.bootstrap_servers), tmp_path)
    delivery_cleanup.append(first)
    await first.start()  # an unreachable broker is not a startup error: records are journaled meanwhile
    assert not first.stats.broker_up
    backlog = [record(topic, i) for i in range(1000)]
    for r in backlog:
        await first.put(r)
    with caplog.at_level(logging.INFO, logger="ingest.io.delivery"):
        await first.close(timeout_s=0.3)
    assert first.stats.journal_records == 1000
    closing = [r for r in caplog.records if r.getMessage() == "delivery_closed_with_backlog"]
    assert len(closing) == 1 and closing[0].records == 1000  # type: ignore[attr-defined]
    with pytest.raises(DeliveryError, match="closed"):
        await first.put(record(topic, 0))

    await own_broker.start()
    second = delivery_for(sink_for(own_broker.bootstrap_servers), tmp_path)
    delivery_cleanup.append(second)
    await second.start()
    fresh = [record(topic, i) for i in range(1000, 1200)]
    for r in fresh:
        await second.put(r)
    await second.flush(WAIT_S)
    got = await consume(own_broker.bootstrap_servers, [topic], 1200)
    assert_exactly_in_order(got, backlog + fresh, max_duplicates=0)


SIGKILLED_CHILD = textwrap.dedent("""
    import asyncio, sys
    from pathlib import Path
    from tests.integration.test_delivery import delivery_for, record, sink_for

    async def main(bootstrap: str, directory: str, topic: str, n: int) -> None:
        delivery = delivery_for(sink_for(bootstrap), Path(directory))
        await delivery.start()
        for i in range(n):
            await delivery.put(record(topic, i))
        await delivery.wait_for(lambda s: s.queued == 0 and s.journal_records == n)
        print("journaled", flush=True)
        await asyncio.Event().wait()  # until SIGKILL

    asyncio.run(main(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])))
""")


async def test_a_sigkilled_process_loses_nothing_it_had_journaled_and_the_next_start_resends_it(
    own_broker: EmbeddedBroker, topic_prefix: str, tmp_path: Path, delivery_cleanup: list[Delivery]
) -> None:
    topic = f"{topic_prefix}sigkill"
    own_broker.kill()
    child = await asyncio.create_subprocess_exec(
        sys.executable, "-c", SIGKILLED_CHILD, own_broker.bootstrap_servers, str(tmp_path), topic, "1500",
        cwd=REPO_ROOT, stdout=asyncio.subprocess.PIPE)
    try:
        assert child.stdout is not None
        assert await asyncio.wait_for(child.stdout.readline(), WAIT_S) == b"journaled\n"
    finally:
        child.kill()  # SIGKILL: no close(), no flush, no cursor update
        await child.wait()

    await own_broker.start()
    delivery = delivery_for(sink_for(own_broker.bootstrap_servers), tmp_path)
    delivery_cleanup.append(delivery)
    await delivery.start()
    assert delivery.stats.journal_records == 1500
    await delivery.flush(WAIT_S)
    sent = [record(topic, i) for i in range(1500)]
    assert_exactly_in_order(await consume(own_broker.bootstrap_servers, [topic], 1500), sent, max_duplicates=0)


async def test_close_with_the_broker_up_flushes_queue_and_journal(
    kafka_broker: BrokerInfo, topic_prefix: str, tmp_path: Path
) -> None:
    topic = f"{topic_prefix}closeflush"
    delivery = delivery_for(sink_for(kafka_broker.bootstrap_servers), tmp_path)
    await delivery.start()
    sent = [record(topic, i) for i in range(1500)]
    for r in sent:
        await delivery.put(r)
    await delivery.close()
    assert (delivery.stats.queued, delivery.stats.journal_records, delivery.stats.records_out) == (0, 0, 1500)
    assert_exactly_in_order(await consume(kafka_broker.bootstrap_servers, [topic], 1500), sent, max_duplicates=0)


async def test_full_journal_applies_back_pressure_and_raises_an_alarm_instead_of_crashing(
    own_broker: EmbeddedBroker, topic_prefix: str, tmp_path: Path, caplog: pytest.LogCaptureFixture,
    delivery_cleanup: list[Delivery]
) -> None:
    topic = f"{topic_prefix}full"
    own_broker.kill()
    delivery = delivery_for(sink_for(own_broker.bootstrap_servers), tmp_path, queue_size=50,
                            segment_bytes=8 * 1024, max_bytes=32 * 1024)
    delivery_cleanup.append(delivery)
    await delivery.start()
    sent = [record(topic, i, size=100) for i in range(2000)]  # ~10x what the journal may hold

    async def produce() -> None:
        for r in sent:
            await delivery.put(r)

    with caplog.at_level(logging.WARNING, logger="ingest.io.delivery"):
        producer = asyncio.create_task(produce())
        try:
            await delivery.wait_for(lambda s: s.journal_full and s.queued == s.queue_size, WAIT_S)
            assert not producer.done()  # put() waits: back-pressure, not an exception, not unbounded memory
            assert delivery.stats.journal_bytes <= 32 * 1024
            assert delivery.failure is None
            assert [r.getMessage() for r in caplog.records].count("journal_full") == 1

            await own_broker.start()
            await asyncio.wait_for(producer, WAIT_S)
        finally:
            if not producer.done():
                producer.cancel()
            await asyncio.gather(producer, return_exceptions=True)
    await delivery.flush(WAIT_S)
    assert not delivery.stats.journal_full
    assert delivery.stats.queued_max <= 50
    assert_exactly_in_order(await consume(own_broker.bootstrap_servers, [topic], 2000), sent, max_duplicates=0)


async def test_a_permanent_delivery_error_is_surfaced_on_put_and_the_records_stay_journaled(
    kafka_broker: BrokerInfo, topic_prefix: str, tmp_path: Path, delivery_cleanup: list[Delivery]
) -> None:
    delivery = delivery_for(sink_for(kafka_broker.bootstrap_servers, create_topics=False), tmp_path)
    delivery_cleanup.append(delivery)
    await delivery.start()
    await delivery.put(record(f"{topic_prefix}never-created", 1))
    await delivery.wait_for(lambda s: s.failed, WAIT_S)
    with pytest.raises(MissingTopicsError) as err:
        await delivery.put(record(f"{topic_prefix}never-created", 2))
    assert not err.value.retriable
    assert delivery.stats.journal_records == 1


async def test_missing_topics_fail_startup_with_their_names_and_the_fix_when_creation_is_off(
    kafka_broker: BrokerInfo, topic_prefix: str, tmp_path: Path
) -> None:
    missing = [f"{topic_prefix}a", f"{topic_prefix}b"]
    sink = KafkaSink(kafka_settings(create_topics=False), bootstrap_servers=kafka_broker.bootstrap_servers,
                     topics=missing)
    with pytest.raises(MissingTopicsError) as err:
        await Delivery(sink, Journal(tmp_path)).start()
    assert err.value.topics == tuple(missing)
    assert all(t in str(err.value) for t in missing) and "create_topics = true" in str(err.value)
    assert not Journal(tmp_path).is_open  # the failed start released the journal
    j = Journal(tmp_path)
    j.open()
    j.close_sync()


async def test_topics_are_created_with_the_configured_partitions_and_recreated_after_a_broker_restart(
    own_broker: EmbeddedBroker, topic_prefix: str
) -> None:
    topic = f"{topic_prefix}created"
    sink = KafkaSink(kafka_settings(partitions=5), bootstrap_servers=own_broker.bootstrap_servers, topics=[topic])

    async def partitions() -> int:
        admin = AIOKafkaAdminClient(bootstrap_servers=own_broker.bootstrap_servers)
        await admin.start()
        try:
            [described] = await admin.describe_topics([topic])
            return len(described["partitions"])
        finally:
            await admin.close()

    await sink.start()
    try:
        assert await partitions() == 5
        own_broker.kill()
        with pytest.raises(DeliveryError) as err:
            await sink.write([record(topic, 1)])
        assert err.value.retriable
        await own_broker.start()  # empty again
        await sink.write([record(topic, 2)])
        assert await partitions() == 5  # ours, not the broker's auto-create default
    finally:
        await sink.close()


async def test_idempotence_is_on_for_real_kafka_settings_and_off_for_the_embedded_broker(
    kafka_broker: BrokerInfo, topic_prefix: str
) -> None:
    real = KafkaSink(KafkaSettings(bootstrap_servers="kafka-1:9092,kafka-2:9092"))
    assert real.options.idempotence and real.options.acks == "all"
    embedded = sink_for(kafka_broker.bootstrap_servers)
    assert not embedded.options.idempotence and embedded.options.compression == "zstd"

    # Against the embedded broker, real-Kafka settings fail at once with the fix, not after retries.
    wrong = KafkaSink(kafka_settings(bootstrap_servers=kafka_broker.bootstrap_servers))
    assert wrong.options.idempotence
    with pytest.raises(DeliveryError) as err:
        await wrong.start()
    assert not err.value.retriable and "enable_idempotence = false" in str(err.value)
    await wrong.close()


SIGKILLED_STREAMING_CHILD = textwrap.dedent("""
    import asyncio, sys
    from pathlib import Path
    from ingest.core.backoff import full_jitter
    from ingest.io.delivery import Delivery
    from ingest.io.journal import Journal
    from tests.integration.test_delivery import record, sink_for

    async def main(bootstrap: str, directory: str, topic: str, n: int) -> None:
        # Only the first acknowledgement reaches the cursor file: the interval outlasts the test.
        journal = Journal(Path(directory), fsync="batch", sync_interval_s=0.01, cursor_interval_s=3600,
                          segment_bytes=64 * 1024, max_bytes=64 * 1024**2, cache_bytes=16 * 1024)
        delivery = Delivery(sink_for(bootstrap), journal, queue_size=200, drain_batch_bytes=32 * 1024,
                            backoff=lambda: full_jitter(0.02, 0.2))
        await delivery.start()
        told = False
        for i in range(n):
            await delivery.put(record(topic, i))
            s = delivery.stats
            if s.records_in - s.records_out > 2000:
                # Paced to the acknowledgements: on a slow broker the journal would otherwise take every record
                # before a quarter is acknowledged, and the line below would never be printed mid-stream.
                await delivery.wait_for(lambda st: st.records_in - st.records_out <= 1000)
            if not told and s.records_out >= n // 4:
                print("acked", s.records_out, "journaled", s.records_in - s.queued, flush=True)
                told = True
        await asyncio.Event().wait()  # until SIGKILL

    asyncio.run(main(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])))
""")


async def test_a_process_sigkilled_mid_stream_loses_nothing_acknowledged_or_journaled_and_resends_only_acked(
    kafka_broker: BrokerInfo, topic_prefix: str, tmp_path: Path, delivery_cleanup: list[Delivery]
) -> None:
    """Kafka up, records flowing, grouped fsyncs and a cursor saved only once: after the SIGKILL the restart
    delivers every record reported acknowledged or journaled, and resends nothing Kafka had not acknowledged
    already (the duplicates are bounded by what the broker held at the kill)."""
    topic = f"{topic_prefix}sigkillstream"
    n = 20_000
    child = await asyncio.create_subprocess_exec(
        sys.executable, "-c", SIGKILLED_STREAMING_CHILD, kafka_broker.bootstrap_servers, str(tmp_path), topic,
        str(n), cwd=REPO_ROOT, stdout=asyncio.subprocess.PIPE)
    try:
        assert child.stdout is not None
        line = (await asyncio.wait_for(child.stdout.readline(), WAIT_S)).split()
    finally:
        child.kill()  # SIGKILL mid-stream: records acknowledged, in flight, journaled and queued
        await child.wait()
    assert line[0] == b"acked" and line[2] == b"journaled"
    acked, journaled = int(line[1]), int(line[3])
    assert 0 < acked <= journaled < n

    before = await consume(kafka_broker.bootstrap_servers, [topic], acked)  # what Kafka acknowledged
    delivery = delivery_for(sink_for(kafka_broker.bootstrap_servers), tmp_path)
    delivery_cleanup.append(delivery)
    await delivery.start()
    resent = delivery.stats.journal_records
    await delivery.flush(WAIT_S)
    got = await consume(kafka_broker.bootstrap_servers, [topic], len(before) + resent)

    delivered = {int.from_bytes(r.value[:8], "big") for r in got}
    upto = max(delivered) + 1
    assert upto >= journaled  # everything reported journaled (and so everything acknowledged) is there
    assert_exactly_in_order(got, [record(topic, i) for i in range(upto)], max_duplicates=len(before))
    # Whether the stale cursor cost any resend depends on when the kill lands (after the last ack, nothing
    # is resent): the bound above is the guarantee; the interval logic itself is tested on fake time.
