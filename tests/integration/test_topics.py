"""Topics are created with their settings (partitions, replication, retention/compaction per kind) and an
existing topic is checked against them, never changed: on the real test broker, read back over the Kafka
admin API (the embedded broker stores and describes topic configs as Kafka does)."""

from __future__ import annotations

import io
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType

from ingest.check import check
from ingest.config import DEFAULT_TOPIC_CONFIGS, KafkaSettings, load_settings
from ingest.errors import ConfigError
from ingest.io.kafka import KafkaSink
from ingest.sim import SimServer
from tests.conftest import BrokerInfo


@pytest.fixture
async def admin(kafka_broker: BrokerInfo) -> AsyncIterator[AIOKafkaAdminClient]:
    client = AIOKafkaAdminClient(bootstrap_servers=kafka_broker.bootstrap_servers)
    await client.start()
    try:
        yield client
    finally:
        await client.close()


async def _topic(admin: AIOKafkaAdminClient, name: str) -> tuple[int, dict[str, str]]:
    """(partitions, topic configs) as the broker reports them."""
    [meta] = [t for t in await admin.describe_topics() if t["topic"] == name]
    [response] = await admin.describe_configs([ConfigResource(ConfigResourceType.TOPIC, name)])
    [resource] = response.resources
    return len(meta["partitions"]), {e[0]: e[1] for e in resource[4]}


def _settings(prefix: str, **kafka: Any) -> KafkaSettings:
    return KafkaSettings(topic_prefix=prefix, partitions=3, enable_idempotence=False, **kafka)


async def test_topics_are_created_with_their_partitions_retention_and_compaction(
        kafka_broker: BrokerInfo, admin: AIOKafkaAdminClient, topic_prefix: str) -> None:
    settings = _settings(topic_prefix, topics={"raw": {"partitions": 2, "config": {"retention.ms": "3600000"}},
                                               "trades": {"config": {"max.message.bytes": "2000000"}}})
    sink = KafkaSink(settings, bootstrap_servers=kafka_broker.bootstrap_servers,
                     topics=[f"{topic_prefix}{k}" for k in ("raw", "gaps", "trades", "books")])
    try:
        await sink.start()
    finally:
        await sink.close()
    partitions, config = await _topic(admin, f"{topic_prefix}raw")
    assert partitions == 2 and config["retention.ms"] == "3600000"  # its own retention, overriding the default
    partitions, config = await _topic(admin, f"{topic_prefix}gaps")
    assert partitions == 3
    assert config["cleanup.policy"] == "compact"
    assert config["min.compaction.lag.ms"] == DEFAULT_TOPIC_CONFIGS["gaps"]["min.compaction.lag.ms"]
    partitions, config = await _topic(admin, f"{topic_prefix}trades")
    assert partitions == 3 and config.get("max.message.bytes") == "2000000"
    assert config.get("cleanup.policy", "delete") == "delete"  # data topics keep the broker's defaults
    assert (await _topic(admin, f"{topic_prefix}books"))[1].get("cleanup.policy", "delete") == "delete"
    assert all(not drift for drift in sink.topic_drift.values())


async def test_an_existing_topic_is_checked_and_its_differences_reported_but_never_changed(
        kafka_broker: BrokerInfo, admin: AIOKafkaAdminClient, topic_prefix: str) -> None:
    gaps, raw = f"{topic_prefix}gaps", f"{topic_prefix}raw"
    await admin.create_topics([NewTopic(gaps, 1, 1, topic_configs={"cleanup.policy": "delete"}),
                               NewTopic(raw, 3, 1, topic_configs={"retention.ms": "3600000"})])
    settings = _settings(topic_prefix, topics={"raw": {"config": {"retention.ms": "3600000"}}})
    sink = KafkaSink(settings, bootstrap_servers=kafka_broker.bootstrap_servers, topics=[gaps, raw])
    try:
        await sink.start()
    finally:
        await sink.close()
    assert sink.topic_drift[raw] == ()  # matches its settings
    drift = sink.topic_drift[gaps]
    assert "partitions 1 (settings: 3)" in drift
    assert "cleanup.policy=delete (settings: compact)" in drift
    lag = DEFAULT_TOPIC_CONFIGS["gaps"]["min.compaction.lag.ms"]
    assert any(d.startswith("min.compaction.lag.ms=") and d.endswith(f"(settings: {lag})") for d in drift)
    partitions, config = await _topic(admin, gaps)
    assert partitions == 1 and config["cleanup.policy"] == "delete"  # left as the operator made it


def test_topic_settings_name_an_unknown_kind_and_the_valid_ones() -> None:
    with pytest.raises(ConfigError) as err:
        load_settings(kafka={"bootstrap_servers": "k:9092", "topics": {"trade": {"partitions": 3}}})
    assert "kafka.topics" in str(err.value) and "'trade'" in str(err.value) and "trades" in str(err.value)


async def test_check_warns_about_a_topic_that_differs_and_still_passes(
        kafka_broker: BrokerInfo, admin: AIOKafkaAdminClient, sim: SimServer, topic_prefix: str) -> None:
    await admin.create_topics([NewTopic(f"{topic_prefix}gaps", 3, 1, topic_configs={"cleanup.policy": "delete"})])
    settings = load_settings(okx={"rest_base_url": sim.rest_base, "ws_base_url": sim.ws_base},
                             kafka={"bootstrap_servers": kafka_broker.bootstrap_servers, "topic_prefix": topic_prefix,
                                    "partitions": 3, "enable_idempotence": False})
    out = io.StringIO()
    assert await check(settings, out) == 0
    lines = out.getvalue().splitlines()
    assert f"warn kafka: topic {topic_prefix}gaps differs from its settings: cleanup.policy=delete (settings: " \
           "compact)" in "\n".join(lines)
    assert not [line for line in lines if line.startswith("FAIL")]
