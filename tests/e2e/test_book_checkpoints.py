"""Book checkpoints through the whole daemon: on okx.books, each the book a consumer rebuilds from the records
before it, and the next update chains onto it (what the archive and replay start from)."""

from __future__ import annotations

import asyncio
import itertools
import secrets
from pathlib import Path

from ingest.core.records import BookAction, BookUpdate, TopicKind
from ingest.okx.channels import SubArg
from ingest.sim import SimConfig, SimServer
from tests.conftest import BrokerInfo
from tests.e2e.harness import TopicReader, daemon_settings, running
from tests.unit.test_book_checkpoints import Rebuilt

INSTS = ("BTC-USDT", "ETH-USDT")


async def test_checkpoints_on_the_books_topic_are_the_rebuilt_book_and_the_chain_goes_through_them(
        kafka_broker: BrokerInfo, topic_prefix: str, tmp_path: Path) -> None:
    config = SimConfig(instruments=INSTS, seed=5, api_key=secrets.token_hex(16), api_secret=secrets.token_hex(32),
                       passphrase=secrets.token_hex(8))
    async with SimServer(config) as sim:
        settings = daemon_settings(sim, kafka_broker.bootstrap_servers, topic_prefix, tmp_path, okx={
            "channels": [], "book_checkpoint_s": 0.05,
            "subscriptions": [{"channel": "books", "inst_id": i} for i in INSTS]})
        async with running(settings) as daemon:
            for inst in INSTS:
                await sim.wait_subscribed(SubArg("books", inst), timeout=20)
            pipeline = daemon.daemon.parts.pipeline
            assert pipeline is not None
            async with asyncio.timeout(30):  # receive time must pass: tick until both books checkpointed twice
                while pipeline.stats.book_checkpoints < 4 * len(INSTS):
                    await sim.tick(5)
            await sim.tick(5)
            assert await daemon.shutdown() == 0

    books = await TopicReader(kafka_broker.bootstrap_servers, topic_prefix).records(TopicKind.BOOKS, BookUpdate)
    for inst in INSTS:
        chain = [b for b in books if b.inst_id == inst]
        assert chain[0].action is BookAction.SNAPSHOT
        rebuilt, checkpoints = Rebuilt(), 0
        for prev, cur in itertools.pairwise(chain):
            rebuilt.apply(prev)
            if cur.action is BookAction.CHECKPOINT:
                checkpoints += 1
                assert (list(cur.asks), list(cur.bids)) == rebuilt.image()
                assert cur.seq_id == prev.seq_id and cur.record_id == f"ckpt:books:{inst}:{cur.seq_id}"
            else:
                assert cur.prev_seq_id == prev.seq_id  # also right after a checkpoint: the chain goes through it
        assert checkpoints >= 2
