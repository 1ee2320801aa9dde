"""Event keys end to end: two recorder runs over the same simulator window carry the same key for each event.

The simulator with a seed and virtual market time replays the same exchange history; each run is its own
daemon, connection and topic prefix, as two replicas (or a replica and its successor) would be. What a consumer
reads is compared: the `eventKey` field and `event_key` header of every record on every market topic.
"""

from __future__ import annotations

import secrets
from collections import Counter
from pathlib import Path

from ingest.core.records import OkxRecord, TopicKind
from ingest.okx.channels import SubArg
from ingest.sim import SimConfig, SimServer
from tests.conftest import BrokerInfo
from tests.e2e.harness import TopicReader, daemon_settings, running

START_MS = 1_767_225_600_000
SPOT, SWAP = "BTC-USDT", "BTC-USDT-SWAP"
SUBS = [
    *({"channel": c, "inst_id": i} for c in ("trades", "trades-all", "books", "books5", "tickers", "candle1m")
      for i in (SPOT, SWAP)),
    *({"channel": c, "inst_id": SWAP} for c in ("mark-price", "funding-rate", "open-interest")),
]
KINDS = (TopicKind.TRADES, TopicKind.BOOKS, TopicKind.TICKERS, TopicKind.CANDLES, TopicKind.MARK_PRICES,
         TopicKind.FUNDING_RATES, TopicKind.OPEN_INTEREST)


async def _record_window(broker: BrokerInfo, prefix: str, tmp_path: Path
                         ) -> tuple[dict[TopicKind, Counter[str]], set[str]]:
    """Record 60 market steps of the seeded simulator into `prefix`; the event keys read back, per topic, and
    every record id."""
    config = SimConfig(instruments=(SPOT, SWAP), seed=21, start_ms=START_MS, api_key=secrets.token_hex(16),
                       api_secret=secrets.token_hex(32), passphrase=secrets.token_hex(8))
    async with SimServer(config) as sim:
        settings = daemon_settings(sim, broker.bootstrap_servers, prefix, tmp_path,
                                   okx={"channels": [], "subscriptions": SUBS})
        async with running(settings) as daemon:
            for sub in SUBS:
                await sim.wait_subscribed(SubArg(sub["channel"], sub["inst_id"]), timeout=20)
            await sim.tick(60)
            assert await daemon.shutdown() == 0  # drains: everything received is in Kafka now
    reader = TopicReader(broker.bootstrap_servers, prefix)
    keys: dict[TopicKind, Counter[str]] = {}
    ids: set[str] = set()
    for kind in KINDS:
        counter: Counter[str] = Counter()
        for _, _, rec, headers in await reader.read(kind):
            assert isinstance(rec, OkxRecord) and rec.event_key is not None, rec
            assert headers["event_key"] == rec.event_key.encode()
            counter[rec.event_key] += 1
            ids.add(rec.record_id)
        keys[kind] = counter
    return keys, ids


async def test_two_recorder_runs_over_the_same_simulator_window_give_each_event_the_same_key(
    kafka_broker: BrokerInfo, topic_prefix: str, tmp_path: Path
) -> None:
    first, first_ids = await _record_window(kafka_broker, f"{topic_prefix}a.", tmp_path / "a")
    second, second_ids = await _record_window(kafka_broker, f"{topic_prefix}b.", tmp_path / "b")
    # The same events, but two recordings: their record ids never meet, although both ran in this one process.
    assert first_ids and not first_ids & second_ids, sorted(first_ids & second_ids)[:3]
    for kind in KINDS:
        assert first[kind], f"nothing recorded on {kind.value}: the comparison would prove nothing"
        assert first[kind] == second[kind], kind
        # Within one run every record is its own event: no key repeats (nothing published twice).
        assert max(first[kind].values()) == 1, [k for k, n in first[kind].items() if n > 1][:5]
    assert sum(len(c) for c in first.values()) > 200
