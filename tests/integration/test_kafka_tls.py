"""Kafka over TLS and mutual TLS: the embedded broker behind stunnel, certificates generated per test."""

from __future__ import annotations

import asyncio
import io
from pathlib import Path
from typing import Any

import pytest
from aiokafka import AIOKafkaConsumer

from ingest.config import KafkaSettings, Settings
from ingest.errors import ConfigError, DeliveryError
from ingest.io.kafka import KafkaSink
from ingest.io.kafka_security import kafka_client_kwargs
from ingest.io.sink import EncodedRecord
from ingest.tail import TailError, tail
from tests.integration.tls_support import TlsKafka, make_pki, tls_kafka

pytestmark = pytest.mark.broker

TOPIC = "okx.trades"


def settings(endpoint: TlsKafka, **overrides: Any) -> KafkaSettings:
    base: dict[str, Any] = {"bootstrap_servers": endpoint.bootstrap_servers, "security_protocol": "SSL",
                            "ssl_cafile": endpoint.pki.ca, "enable_idempotence": False,
                            "request_timeout_ms": 3000, "delivery_timeout_ms": 6000, "retry_backoff_ms": 50}
    return KafkaSettings(**{**base, **overrides})


def records(n: int) -> list[EncodedRecord]:
    return [EncodedRecord(TOPIC, b"BTC-USDT", f'{{"px":"9{i}.10"}}'.encode(), (("record_id", f"c:{i}:0".encode()),),
                          1_700_000_000_000 + i) for i in range(n)]


async def read_back(kafka: KafkaSettings, n: int, env: dict[str, str] | None = None) -> list[bytes]:
    consumer = AIOKafkaConsumer(TOPIC, **kafka_client_kwargs(kafka, env=env), auto_offset_reset="earliest",
                                enable_auto_commit=False, group_id=None)
    await consumer.start()
    got: list[bytes] = []
    try:
        async with asyncio.timeout(20):
            while len(got) < n:
                for msgs in (await consumer.getmany(timeout_ms=500)).values():
                    got.extend(m.value for m in msgs if m.value is not None)
    finally:
        await consumer.stop()
    return got


async def write(kafka: KafkaSettings, batch: list[EncodedRecord], env: dict[str, str] | None = None) -> None:
    sink = KafkaSink(kafka, topics=[TOPIC], env=env)
    try:
        await sink.start()
        await sink.write(batch)
    finally:
        await sink.close()


async def test_recorder_producer_writes_and_a_consumer_reads_over_tls(tmp_path: Path) -> None:
    async with tls_kafka(tmp_path, mutual=False) as endpoint:
        kafka = settings(endpoint)
        await write(kafka, records(5))
        assert sorted(await read_back(kafka, 5)) == sorted(r.value for r in records(5))


async def test_mutual_tls_with_an_encrypted_client_key_and_its_password_from_the_environment(tmp_path: Path) -> None:
    async with tls_kafka(tmp_path, mutual=True) as endpoint:
        pki = endpoint.pki
        kafka = settings(endpoint, ssl_certfile=pki.client_cert, ssl_keyfile=pki.client_key_encrypted)
        pw_file = tmp_path / "key-password"
        pw_file.write_text(pki.client_key_password + "\n")
        env = {"KAFKA_SSL_KEY_PASSWORD_FILE": str(pw_file)}
        await write(kafka, records(3), env)
        assert len(await read_back(kafka, 3, env)) == 3


async def test_mutual_tls_refuses_a_client_without_a_certificate_with_a_clear_error(tmp_path: Path) -> None:
    async with tls_kafka(tmp_path, mutual=True) as endpoint:
        with pytest.raises(DeliveryError) as err:
            await write(settings(endpoint), records(1))
        assert "requires a client certificate (mutual TLS)" in str(err.value)
        assert "kafka.ssl_certfile" in str(err.value)
        assert err.value.retriable is False


async def test_hostname_checking_refuses_a_name_the_certificate_does_not_carry(tmp_path: Path) -> None:
    async with tls_kafka(tmp_path, mutual=False) as endpoint:
        wrong = f"127.0.0.1:{endpoint.port}"  # the certificate names localhost only
        with pytest.raises(DeliveryError) as err:
            await write(settings(endpoint, bootstrap_servers=wrong), records(1))
        assert "does not name '127.0.0.1'" in str(err.value)
        assert "kafka.ssl_check_hostname" in str(err.value)
        # Turning the check off (test setups only) is what lets it through: the refusal was the name alone.
        await write(settings(endpoint, bootstrap_servers=wrong, ssl_check_hostname=False), records(1))


async def test_a_broker_certificate_from_another_ca_is_refused_naming_ssl_cafile(tmp_path: Path) -> None:
    async with tls_kafka(tmp_path, mutual=False) as endpoint:
        with pytest.raises(DeliveryError) as err:
            await write(settings(endpoint, ssl_cafile=endpoint.pki.other_ca), records(1))
        assert "not trusted" in str(err.value) and "kafka.ssl_cafile" in str(err.value)


def test_an_encrypted_client_key_without_its_password_is_a_config_error(tmp_path: Path) -> None:
    pki = make_pki(tmp_path)
    kafka = KafkaSettings(bootstrap_servers="localhost:9093", security_protocol="SSL", ssl_cafile=pki.ca,
                          ssl_certfile=pki.client_cert, ssl_keyfile=pki.client_key_encrypted)
    with pytest.raises(ConfigError) as err:
        kafka_client_kwargs(kafka, env={})
    assert err.value.key == "kafka.ssl_keyfile" and "KAFKA_SSL_KEY_PASSWORD" in str(err.value)
    with pytest.raises(ConfigError, match="password is wrong"):
        kafka_client_kwargs(kafka, env={"KAFKA_SSL_KEY_PASSWORD": "not-the-password"})
    assert "ssl_context" in kafka_client_kwargs(kafka, env={"KAFKA_SSL_KEY_PASSWORD": pki.client_key_password})


async def test_tail_reads_over_tls_and_names_the_missing_client_certificate(tmp_path: Path) -> None:
    async with tls_kafka(tmp_path, mutual=True) as endpoint:
        pki = endpoint.pki
        kafka = settings(endpoint, ssl_certfile=pki.client_cert, ssl_keyfile=pki.client_key)
        await write(kafka, records(2))
        with_cert = Settings(kafka=kafka)
        out = io.StringIO()
        assert await tail(with_cert, [TOPIC], out=out, timeout_s=20) == 2
        assert "UNDECODABLE" in out.getvalue()  # these test values are not Avro: shown, not fatal
        with pytest.raises(TailError, match="requires a client certificate"):
            await tail(Settings(kafka=settings(endpoint)), [TOPIC], out=io.StringIO(), timeout_s=20)
