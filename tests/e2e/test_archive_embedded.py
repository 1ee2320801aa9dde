"""The two-command default: with the embedded broker the recorder archives in-process, so a run leaves every
trade it recorded in queryable Parquet files although the broker keeps nothing."""

from __future__ import annotations

import secrets
from pathlib import Path

import duckdb

from ingest.io.broker import free_port
from ingest.okx.channels import SubArg
from ingest.sim import SimConfig, SimServer
from tests.e2e.harness import daemon_settings, running
from tests.integration._ws_support import log_events

INSTS = ("BTC-USDT", "ETH-USDT")


async def test_the_embedded_default_leaves_every_recorded_trade_in_the_archive(
        topic_prefix: str, tmp_path: Path) -> None:
    config = SimConfig(instruments=INSTS, seed=5, api_key=secrets.token_hex(16), api_secret=secrets.token_hex(32),
                       passphrase=secrets.token_hex(8))
    root = tmp_path / "archive"
    with log_events() as events:
        async with SimServer(config) as sim:
            settings = daemon_settings(sim, "embedded", topic_prefix, tmp_path,
                                       okx={"channels": [], "subscriptions": [{"channel": "trades-all", "inst_id": i}
                                                                              for i in INSTS]},
                                       kafka={"embedded_port": free_port()}, archive={"url": str(root)})
            async with running(settings) as daemon:
                for i in INSTS:
                    await sim.wait_subscribed(SubArg("trades-all", i), timeout=20)
                await sim.tick(30)
                assert await daemon.shutdown() == 0
            expected = sorted(r.trade_id for i in INSTS for r in sim.market.trades(i))
    assert expected
    rel = duckdb.sql(f"select tradeId from read_parquet('{root}/trades/**/*.parquet', hive_partitioning=true)")
    assert rel is not None
    assert sorted(r[0] for r in rel.fetchall()) == expected  # the broker is gone; the files have every trade
    where = [e for e in events.seen if e.getMessage() == "archive_in_process"]
    assert where and str(root) in str(where[0].__dict__["where"]) and "read_parquet" in where[0].__dict__["query"]
