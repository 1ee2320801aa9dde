"""`okx-ingest check` against the simulator and the test broker: read-only, and it catches what OKX would refuse."""

from __future__ import annotations

import io
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from aiokafka.admin import AIOKafkaAdminClient

from ingest.check import check
from ingest.config import Settings
from ingest.sim import SimConfig, SimServer
from tests.conftest import BrokerInfo
from tests.e2e.harness import daemon_settings


@pytest.fixture(autouse=True)
def _keep_root_logging() -> Iterator[None]:
    """`check` sets up its own logging, as the command does; give the other tests theirs back."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def _settings(sim: SimServer, kafka: BrokerInfo, prefix: str, tmp_path: Path, **okx: Any) -> Settings:
    return daemon_settings(sim, kafka.bootstrap_servers, prefix, tmp_path, okx=okx)


async def _topics(kafka: BrokerInfo, prefix: str) -> list[str]:
    admin = AIOKafkaAdminClient(bootstrap_servers=kafka.bootstrap_servers)
    await admin.start()
    try:
        return [t for t in await admin.list_topics() if t.startswith(prefix)]
    finally:
        await admin.close()


async def test_check_passes_a_good_config_and_creates_no_topic(
        kafka_broker: BrokerInfo, topic_prefix: str, tmp_path: Path) -> None:
    async with SimServer(SimConfig()) as sim:
        settings = _settings(sim, kafka_broker, topic_prefix, tmp_path,
                             subscriptions=[{"channel": "funding-rate", "inst_id": "BTC-USDT-SWAP"}])
        out = io.StringIO()
        assert await check(settings, out) == 0, out.getvalue()
    text = out.getvalue()
    assert "instruments: 3 known to OKX" in text
    assert "topics missing, `okx-ingest run` creates them" in text
    assert await _topics(kafka_broker, topic_prefix) == []  # a check changes nothing on the broker it checks


async def test_check_fails_an_unknown_instrument_and_a_channel_okx_refuses_for_its_type(
        kafka_broker: BrokerInfo, topic_prefix: str, tmp_path: Path) -> None:
    async with SimServer(SimConfig()) as sim:
        settings = _settings(sim, kafka_broker, topic_prefix, tmp_path, instruments=["BTC-USDT", "BTC-USDTT"],
                             channels=["trades"],
                             subscriptions=[{"channel": "funding-rate", "inst_id": "BTC-USDT"},
                                            {"channel": "liquidation-orders", "inst_type": "SPOT"}])
        out = io.StringIO()
        assert await check(settings, out) == 2
    failed = [line for line in out.getvalue().splitlines() if line.startswith("FAIL")]
    assert len(failed) == 3, out.getvalue()
    assert any("BTC-USDTT: OKX has no SPOT instrument" in line for line in failed)
    assert any("funding-rate for BTC-USDT: OKX serves funding-rate for SWAP only" in line for line in failed)
    assert any("liquidation-orders with instType SPOT" in line for line in failed)


async def test_check_of_public_only_settings_ignores_credential_files_it_does_not_need(
        kafka_broker: BrokerInfo, topic_prefix: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("OKX_API_KEY", "OKX_API_SECRET", "OKX_API_PASSPHRASE"):
        monkeypatch.setenv(f"{name}_FILE", str(tmp_path / "not-mounted" / name.lower()))
    async with SimServer(SimConfig()) as sim:
        out = io.StringIO()
        assert await check(_settings(sim, kafka_broker, topic_prefix, tmp_path), out) == 0, out.getvalue()
    assert "credentials: not needed by these settings" in out.getvalue()
