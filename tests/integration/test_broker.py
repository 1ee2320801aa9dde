"""The test broker is a real Kafka-protocol broker: what the data path relies on works against it."""

from __future__ import annotations

import asyncio
import secrets
import socket
from pathlib import Path

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.structs import ConsumerRecord, TopicPartition

from ingest.io.broker import EmbeddedBroker
from tests.conftest import BrokerInfo, docker_engine_reachable


@pytest.mark.parametrize("codec", [None, "gzip", "snappy", "lz4", "zstd"])
async def test_records_round_trip_with_key_headers_and_each_codec(
    kafka_broker: BrokerInfo, topic_prefix: str, codec: str | None
) -> None:
    topic = f"{topic_prefix}codec"
    producer = AIOKafkaProducer(bootstrap_servers=kafka_broker.bootstrap_servers, acks="all",
                                compression_type=codec)
    await producer.start()
    try:
        sent = [(f"k{i % 3}".encode(), f"value-{i}".encode()) for i in range(20)]
        for key, value in sent:
            await producer.send(topic, value, key=key, headers=[("schema", b"okx.ingest.v1.Trade")])
        await producer.flush()
    finally:
        await producer.stop()
    consumer = AIOKafkaConsumer(topic, bootstrap_servers=kafka_broker.bootstrap_servers,
                                auto_offset_reset="earliest", enable_auto_commit=False)
    await consumer.start()
    try:
        got: list[ConsumerRecord[bytes, bytes]] = []
        while len(got) < len(sent):
            batch = await consumer.getmany(timeout_ms=5000)
            assert batch, "broker returned nothing within 5 s"
            for msgs in batch.values():
                got.extend(msgs)
    finally:
        await consumer.stop()
    assert [(m.key, m.value) for m in got] == sent
    assert all(dict(m.headers)["schema"] == b"okx.ingest.v1.Trade" for m in got)


async def test_admin_creates_topic_with_partitions_and_keys_stay_in_one_partition(
    kafka_broker: BrokerInfo, topic_prefix: str
) -> None:
    topic = f"{topic_prefix}parts"
    admin = AIOKafkaAdminClient(bootstrap_servers=kafka_broker.bootstrap_servers)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(topic, num_partitions=3, replication_factor=1)])
        assert topic in await admin.list_topics()
    finally:
        await admin.close()
    producer = AIOKafkaProducer(bootstrap_servers=kafka_broker.bootstrap_servers, acks="all")
    await producer.start()
    try:
        parts = {(await producer.send_and_wait(topic, b"x", key=b"BTC-USDT")).partition for _ in range(10)}
    finally:
        await producer.stop()
    assert len(parts) == 1


async def test_consumer_group_commits_and_a_second_member_resumes(
    kafka_broker: BrokerInfo, topic_prefix: str
) -> None:
    topic = f"{topic_prefix}group"
    group = f"{topic_prefix}g"
    producer = AIOKafkaProducer(bootstrap_servers=kafka_broker.bootstrap_servers, acks="all")
    await producer.start()
    try:
        for i in range(10):
            await producer.send(topic, str(i).encode())
        await producer.flush()
    finally:
        await producer.stop()

    async def consume(n: int) -> list[bytes]:
        c = AIOKafkaConsumer(topic, bootstrap_servers=kafka_broker.bootstrap_servers, group_id=group,
                             auto_offset_reset="earliest", enable_auto_commit=False)
        await c.start()
        try:
            out: list[bytes] = []
            while len(out) < n:
                msg = await asyncio.wait_for(c.getone(), 15)
                out.append(msg.value)
                await c.commit({TopicPartition(msg.topic, msg.partition): msg.offset + 1})
            return out
        finally:
            await c.stop()

    first = await consume(4)
    second = await consume(6)
    # Unkeyed records spread over partitions, so only the set is defined: nothing lost, nothing redelivered.
    assert sorted(first + second) == [str(i).encode() for i in range(10)]
    assert len(set(first) & set(second)) == 0


async def test_idempotent_producer_is_rejected_by_the_embedded_broker(kafka_broker: BrokerInfo) -> None:
    """Why idempotence is a setting: the embedded broker refuses it, real Kafka wants it on."""
    if kafka_broker.kind != "embedded":
        pytest.fail("this test documents the embedded broker; run it with the embedded broker")
    producer = AIOKafkaProducer(bootstrap_servers=kafka_broker.bootstrap_servers, enable_idempotence=True)
    with pytest.raises(Exception):  # noqa: B017 - the exact error class differs between aiokafka versions
        await producer.start()
        try:
            await producer.send_and_wait("idem-probe", b"x")
        finally:
            await producer.stop()


async def test_embedded_broker_stops_and_restarts_empty() -> None:
    broker = EmbeddedBroker()
    await broker.start()
    first = broker.bootstrap_servers
    await broker.stop()
    assert not broker.running
    await broker.start()
    try:
        assert broker.bootstrap_servers == first
        assert broker.running
    finally:
        await broker.stop()


def test_docker_detection_answers_from_the_socket_alone(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No Docker client is asked (a naive client probe hangs for minutes without an engine): a missing socket,
    a refused port and a listening socket give the answer at once, whatever the machine's speed."""
    monkeypatch.setenv("DOCKER_HOST", f"unix://{tmp_path / 'absent.sock'}")
    assert docker_engine_reachable() is False
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))  # bound, never listening: connecting is refused
        monkeypatch.setenv("DOCKER_HOST", f"tcp://127.0.0.1:{closed.getsockname()[1]}")
        assert docker_engine_reachable() is False
    path = tmp_path / "engine.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as engine:
        engine.bind(str(path))
        engine.listen()
        monkeypatch.setenv("DOCKER_HOST", f"unix://{path}")
        assert docker_engine_reachable() is True


async def test_the_embedded_broker_child_gets_no_secret_in_its_environment(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """A child needs none of the daemon's secrets; `/proc/<pid>/environ` would show them to anyone as its user."""
    secret_values = {name: secrets.token_hex(12) for name in
                     ("OKX_API_KEY", "OKX_API_SECRET", "OKX_API_PASSPHRASE", "OKX_INGEST__OBS__SENTRY_DSN",
                      "KAFKA_SASL_PASSWORD", "SOME_TOKEN")}
    for name, value in secret_values.items():
        monkeypatch.setenv(name, value)
    key_file = tmp_path / "okx_api_key"
    monkeypatch.setenv("OKX_API_KEY_FILE", str(key_file))
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(tmp_path))
    monkeypatch.setenv("OKX_TEST_HARMLESS", "kept")
    broker = EmbeddedBroker()
    await broker.start()
    try:
        assert broker.pid is not None
        environ = (await asyncio.to_thread(Path(f"/proc/{broker.pid}/environ").read_bytes)).decode()
    finally:
        await broker.stop()
    names = {entry.split("=", 1)[0] for entry in environ.split("\0") if entry}
    assert "OKX_TEST_HARMLESS" in names and "PATH" in names  # the rest of the environment is passed on
    assert not names & {*secret_values, "OKX_API_KEY_FILE", "CREDENTIALS_DIRECTORY"}
    assert not [v for v in (*secret_values.values(), str(key_file)) if v in environ]
