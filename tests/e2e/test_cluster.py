"""Cluster mode end to end: recorder replicas in one consumer group against the simulator and the real broker."""

from __future__ import annotations

import contextlib
import secrets
from collections import Counter
from pathlib import Path

from ingest.core.cluster import shard_of
from ingest.core.records import GapEvent, TopicKind, Trade
from ingest.sim import SimConfig, SimServer
from ingest.supervisor import Daemon
from tests.conftest import BrokerInfo
from tests.e2e.harness import TopicReader, daemon_settings, running, sim_holders

INSTS = ("BTC-USDT", "ETH-USDT", "SOL-USDT", "XRP-USDT", "DOGE-USDT", "LTC-USDT")
CHANNELS = ("trades-all", "tickers")
SHARDS = 8


def _sim_config() -> SimConfig:
    return SimConfig(instruments=INSTS, seed=11, api_key=secrets.token_hex(16), api_secret=secrets.token_hex(32),
                     passphrase=secrets.token_hex(8), auto_tick_s=None)


def _owned(daemon: Daemon) -> frozenset[int]:
    m = daemon.parts.membership
    return m.current.shards if m is not None and m.current is not None else frozenset()


async def test_three_replicas_record_every_subscription_exactly_once(
    kafka_broker: BrokerInfo, topic_prefix: str, tmp_path: Path
) -> None:
    async with SimServer(_sim_config(), host="127.0.0.1", port=0) as sim, contextlib.AsyncExitStack() as stack:
        runs = []
        for i in range(3):
            settings = daemon_settings(
                sim, kafka_broker.bootstrap_servers, topic_prefix, tmp_path / f"r{i}",
                okx={"instruments": list(INSTS), "channels": list(CHANNELS)},
                # Dynamic members: Tansu restarts the rebalance for ever when a static member joins a formed
                # group (docs/CLUSTER.md, "Brokers"), and the fence then holds records back while rounds go on.
                cluster={"group_id": f"{topic_prefix}rec", "shards": SHARDS, "instance_id": f"rec-{i}",
                         "session_timeout_ms": 6000, "heartbeat_interval_ms": 500, "static_membership": False})
            runs.append(await stack.enter_async_context(running(settings)))
        wanted = {(ch, inst) for ch in CHANNELS for inst in INSTS}

        def split() -> bool:
            owned = [_owned(r.daemon) for r in runs]
            return (sorted(s for o in owned for s in o) == list(range(SHARDS)) and all(owned)
                    and set(sim_holders(sim)) == wanted)

        # Connections follow assignments, so the simulator sees the last change of every rebalance.
        await sim.wait_until(lambda: True if split() else None, timeout=120)
        holders = sim_holders(sim)
        assert all(n == 1 for n in holders.values()), holders
        # Each replica holds exactly the instruments of its shards (all channels of one instId together).
        for r in runs:
            shards = _owned(r.daemon)
            held = {a.inst_id for c in r.daemon.parts.manager.connections for a in c.args}  # type: ignore[union-attr]
            assert held == {i for i in INSTS if shard_of(i, SHARDS) in shards}
        await sim.tick(20)
        traded = {inst: [t.trade_id for t in sim.market.trades(inst)] for inst in INSTS}
        total = sum(len(v) for v in traded.values())
        trades = await TopicReader(kafka_broker.bootstrap_servers, topic_prefix).records(
            TopicKind.TRADES, Trade, at_least=total)
        seen = Counter((t.inst_id, t.trade_id) for t in trades)
        assert all(n == 1 for n in seen.values()), "no trade recorded by two replicas"
        assert set(seen) == {(inst, tid) for inst, ids in traded.items() for tid in ids}
        owners = {r.daemon.parts.membership.member: _owned(r.daemon) for r in runs}  # type: ignore[union-attr]
        for _, _, rec, headers in await TopicReader(kafka_broker.bootstrap_servers, topic_prefix).read(
                TopicKind.TRADES, at_least=total):
            assert isinstance(rec, Trade)
            shard = shard_of(rec.inst_id, SHARDS)
            assert int(headers["shard"]) == shard and int(headers["generation"]) >= 0
            assert shard in owners[headers["owner"].decode()], "stamped by the replica that owns its shard"


def _interior(g: GapEvent) -> set[int]:
    """The tradeIds a trades gap says are missing: strictly between its bounds."""
    assert g.before is not None and g.after is not None
    assert g.before.trade_id is not None and g.after.trade_id is not None
    return set(range(g.before.trade_id + 1, g.after.trade_id))


def _cluster(prefix: str, i: int) -> dict[str, object]:
    return {"group_id": f"{prefix}rec", "shards": SHARDS, "instance_id": f"rec-{i}", "session_timeout_ms": 6000,
            "heartbeat_interval_ms": 500, "position_interval_s": 0.5}


async def test_a_stopped_replicas_streams_are_taken_over_and_the_window_nobody_recorded_is_a_gap(
    kafka_broker: BrokerInfo, topic_prefix: str, tmp_path: Path
) -> None:
    reader = TopicReader(kafka_broker.bootstrap_servers, topic_prefix)
    wanted = {("trades-all", inst) for inst in INSTS}
    async with SimServer(_sim_config(), host="127.0.0.1", port=0) as sim, contextlib.AsyncExitStack() as stack:
        runs = [await stack.enter_async_context(running(daemon_settings(
            sim, kafka_broker.bootstrap_servers, topic_prefix, tmp_path / f"r{i}",
            okx={"instruments": list(INSTS), "channels": ["trades-all"]}, cluster=_cluster(topic_prefix, i))))
            for i in range(2)]
        await sim.wait_until(lambda: True if set(sim_holders(sim)) == wanted and all(
            _owned(r.daemon) for r in runs) else None, timeout=120)
        gone = {i for i in INSTS if shard_of(i, SHARDS) in _owned(runs[1].daemon)}
        assert gone
        await sim.tick(10)
        before = sum(len(list(sim.market.trades(i))) for i in INSTS)
        await reader.records(TopicKind.TRADES, Trade, at_least=before)
        # Its positions are on the positions topic once acknowledged; then it stops without leaving the group
        # (a static member), and nobody records its instruments until the session times out.
        positions = runs[1].daemon.parts.positions
        assert positions is not None
        await sim.wait_until(lambda: True if positions.store.written else None, timeout=30)
        await runs[1].shutdown()
        await sim.tick(10)  # traded while nobody records `gone`
        await sim.wait_until(lambda: True if set(sim_holders(sim)) == wanted else None, timeout=60)
        assert _owned(runs[0].daemon) == frozenset(range(SHARDS))
        await sim.tick(10)
        gaps = [g for g in await reader.records(TopicKind.GAPS, GapEvent, at_least=1)
                if g.inst_id in gone and g.after is not None]
        interior = sum(len(_interior(g)) for g in gaps)
        total = sum(len(list(sim.market.trades(i))) for i in INSTS)
        trades = await reader.records(TopicKind.TRADES, Trade, at_least=total - interior)
    recorded = {(t.inst_id, int(t.trade_id)) for t in trades}
    assert {g.inst_id for g in gaps} == gone
    for g in gaps:
        inside = _interior(g)
        assert not inside & {tid for inst, tid in recorded if inst == g.inst_id}, "a gap holds only what is missing"
    for inst in gone:
        ids = {int(t.trade_id) for t in sim.market.trades(inst)}
        missing = ids - {tid for i, tid in recorded if i == inst}
        covered = {tid for g in gaps if g.inst_id == inst for tid in _interior(g)}
        # The stop was clean (its last positions written once acknowledged): the bounds are exact.
        assert missing and missing == covered, f"{inst}: the gaps hold exactly the trades nobody recorded"
