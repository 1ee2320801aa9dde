"""Hostile frames against the whole daemon: no frame stops the recorder, every one ends on a topic, and the
shutdown after them saves the stream state and exits 0.
"""

from __future__ import annotations

import asyncio
import secrets
from pathlib import Path

import orjson

from ingest.core.records import DeadLetter, DeadLetterReason, TopicKind, Trade
from ingest.io.state import StreamStateFile
from ingest.okx.channels import SubArg
from ingest.sim import SimConfig, SimServer
from tests.conftest import BrokerInfo
from tests.e2e.harness import TopicReader, daemon_settings, running
from tests.e2e.private_support import metric, scrape

INST = "BTC-USDT"


def _frame(channel: str, inst: str, trade_id: str) -> str:
    return orjson.dumps({"arg": {"channel": channel, "instId": inst}, "data": [{
        "instId": inst, "tradeId": trade_id, "px": "1", "sz": "1", "side": "buy", "ts": "1786540435948",
        "count": "1"}]}).decode()


async def test_a_trade_id_beyond_64_bits_and_a_push_nobody_subscribed_cost_one_dead_letter_each(
        kafka_broker: BrokerInfo, topic_prefix: str, tmp_path: Path) -> None:
    """The huge tradeId used to kill the pipeline (exit 1, the frames not yet journaled lost) and break every
    later state save, the shutdown's too."""
    config = SimConfig(instruments=(INST,), seed=3, api_key=secrets.token_hex(16), api_secret=secrets.token_hex(32),
                       passphrase=secrets.token_hex(8))
    async with SimServer(config) as sim:
        settings = daemon_settings(sim, kafka_broker.bootstrap_servers, topic_prefix, tmp_path,
                                   okx={"channels": [], "subscriptions": [{"channel": "trades", "inst_id": INST}]})
        async with running(settings) as daemon:
            await sim.wait_subscribed(SubArg("trades", INST), timeout=20)
            await sim.tick(10)
            before = max(int(r.trade_id) for r in sim.market.trades(INST))
            assert sim.faults.send_raw(_frame("trades", INST, str(2**64 + 5)), "public")
            assert sim.faults.send_raw(_frame("trades", "ETH-USDT", "7"), "public")  # never subscribed
            await sim.tick(10)
            pipeline = daemon.daemon.parts.pipeline
            assert pipeline is not None
            async with asyncio.timeout(20):  # until the pipeline has taken both frames
                while sum(pipeline.stats.dead_letters.values()) < 2:
                    await sim.tick(1)
            metrics = await scrape(daemon)
            assert await daemon.shutdown() == 0
        last = max(int(r.trade_id) for r in sim.market.trades(INST))

    reader = TopicReader(kafka_broker.bootstrap_servers, topic_prefix)
    trades = await reader.records(TopicKind.TRADES, Trade, at_least=1)
    assert last > before and max(int(t.trade_id) for t in trades) == last  # recording went on after the frame
    assert all(t.trade_id != str(2**64 + 5) and t.inst_id == INST for t in trades)
    dead = await reader.records(TopicKind.DLQ, DeadLetter, at_least=2)
    assert sorted(d.reason_code for d in dead) == [DeadLetterReason.BAD_NUMBER, DeadLetterReason.UNSUBSCRIBED]
    assert metric(metrics, "okx_ingest_dead_letters_total", reason="unsubscribed") == 1
    assert metric(metrics, "okx_ingest_pipeline_state_entries", map="subscribed") == 1
    assert metric(metrics, "okx_ingest_pipeline_state_entries", map="gap_streams") == 1  # nothing for ETH-USDT
    assert metric(metrics, "okx_ingest_pipeline_failures_total", stage="item") == 0
    state = StreamStateFile(tmp_path / f"{settings.shard}.streams.json").load()
    assert state is not None and [c.arg for c in state.streams] == [SubArg("trades", INST)]
