"""The recorder into a mutual-TLS Kafka (the embedded broker behind stunnel), read back with `tail` over TLS."""

from __future__ import annotations

import io
import json
import secrets
from pathlib import Path

import pytest

from ingest.okx.channels import SubArg
from ingest.sim import SimConfig, SimServer
from ingest.tail import tail
from tests.e2e.harness import daemon_settings, running
from tests.integration.tls_support import tls_kafka

pytestmark = pytest.mark.broker


async def test_the_recorder_writes_every_trade_over_mutual_tls_and_tail_reads_them_back(tmp_path: Path) -> None:
    config = SimConfig(instruments=("BTC-USDT",), seed=3, api_key=secrets.token_hex(16),
                       api_secret=secrets.token_hex(32), passphrase=secrets.token_hex(8))
    async with tls_kafka(tmp_path, mutual=True) as endpoint, SimServer(config) as sim:
        pki = endpoint.pki
        security = {"security_protocol": "SSL", "ssl_cafile": str(pki.ca), "ssl_certfile": str(pki.client_cert),
                    "ssl_keyfile": str(pki.client_key)}
        settings = daemon_settings(sim, endpoint.bootstrap_servers, "okx.", tmp_path / "journal", kafka=security,
                                   okx={"channels": [], "subscriptions": [{"channel": "trades-all",
                                                                           "inst_id": "BTC-USDT"}]})
        async with running(settings) as daemon:
            await sim.wait_subscribed(SubArg("trades-all", "BTC-USDT"), timeout=20)
            await sim.tick(20)
            assert await daemon.shutdown() == 0
        expected = [(r.trade_id, r.px, r.sz) for r in sim.market.trades("BTC-USDT")]
        assert expected, "the simulator traded nothing; the test would prove nothing"
        out = io.StringIO()
        await tail(settings, ["trades"], out=out, fmt="json", inst="BTC-USDT", timeout_s=20)
    got = [json.loads(line)["value"] for line in out.getvalue().splitlines()]
    assert [(g["tradeId"], g["px"], g["sz"]) for g in got] == expected
