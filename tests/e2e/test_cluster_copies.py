"""`cluster.copies = 2` end to end: two replicas, one per copy, each recording every shard (A/B feeds).

A cut of one copy's connections raises no gap (the other copy recorded the window) and, deduplicated by event
key, the trades topic holds every trade of the simulator exactly once; a cut of both raises the gaps of what
neither received.
"""

from __future__ import annotations

import contextlib
import secrets
from collections import Counter
from pathlib import Path

from ingest.core.records import GapEvent, TopicKind, Trade
from ingest.sim import SimConfig, SimServer
from ingest.supervisor import Daemon
from tests.conftest import BrokerInfo
from tests.e2e.harness import TopicReader, daemon_settings, running, sim_holders

INSTS = ("BTC-USDT", "ETH-USDT", "SOL-USDT", "XRP-USDT")
CHANNELS = ("trades-all", "tickers", "books")
SHARDS = 8


def _sim_config() -> SimConfig:
    return SimConfig(instruments=INSTS, seed=23, api_key=secrets.token_hex(16), api_secret=secrets.token_hex(32),
                     passphrase=secrets.token_hex(8), auto_tick_s=None)


def _cluster(prefix: str, i: int, wait_s: float) -> dict[str, object]:
    # Dynamic members (Tansu and static members, docs/CLUSTER.md "Brokers"); rec-0 is copy 0, rec-1 copy 1.
    return {"group_id": f"{prefix}rec", "shards": SHARDS, "instance_id": f"rec-{i}", "copies": 2,
            "session_timeout_ms": 6000, "heartbeat_interval_ms": 500, "static_membership": False,
            "position_interval_s": 0.5, "copy_gap_wait_s": wait_s}


def _sim_conns(sim: SimServer, daemon: Daemon) -> list[str]:
    """The simulator's ids of one replica's open connections (matched by the client's local port)."""
    manager = daemon.parts.manager
    assert manager is not None
    ports = {link.ws.local_address[1] for c in manager.connections
             if (link := c.primary) is not None and link.ws is not None}
    out = []
    for c in sim.hub.conns.values():
        transport = c.request.transport
        if not c.closing and transport is not None and transport.get_extra_info("peername")[1] in ports:
            out.append(c.conn_id)
    return out


def _published(daemon: Daemon, kind: TopicKind) -> int:
    """Records of `kind` the replica's pipeline handed to delivery."""
    assert daemon.parts.pipeline is not None
    return daemon.parts.pipeline.stats.records.get(kind.value, 0)


async def _start(sim: SimServer, stack: contextlib.AsyncExitStack, broker: BrokerInfo, prefix: str, tmp: Path,
                 wait_s: float) -> list[Daemon]:
    runs = [await stack.enter_async_context(running(daemon_settings(
        sim, broker.bootstrap_servers, prefix, tmp / f"r{i}",
        okx={"instruments": list(INSTS), "channels": list(CHANNELS)}, cluster=_cluster(prefix, i, wait_s))))
        for i in range(2)]
    wanted = {(ch, inst) for ch in CHANNELS for inst in INSTS}
    # Each copy is a group of its own: its one member owns every shard, so every stream is held twice.
    await sim.wait_until(lambda: True if set(sim_holders(sim)) == wanted and all(
        n == 2 for n in sim_holders(sim).values()) else None, timeout=120)
    daemons = [r.daemon for r in runs]
    for d in daemons:
        assert d.parts.membership is not None and d.parts.membership.current is not None
        assert d.parts.membership.current.shards == frozenset(range(SHARDS))
    assert [d.parts.membership.copy for d in daemons if d.parts.membership] == [0, 1]
    await sim.tick(5)
    for d in daemons:  # both copies' unbroken runs are on the positions topic before any cut
        positions = d.parts.positions
        assert positions is not None
        store = positions.store
        await sim.wait_until(lambda: True if store.written >= len(wanted) else None, timeout=30)  # noqa: B023
    return daemons


async def _cut(sim: SimServer, daemons: list[Daemon]) -> None:
    """Drop the connections of `daemons` (no close frame), trade meanwhile, and wait until they are back."""
    for d in daemons:
        for conn_id in _sim_conns(sim, d):
            sim.faults.drop(kind="abort", conn_id=conn_id)
    await sim.tick(5)  # partly or wholly before they are subscribed again
    await sim.wait_until(lambda: True if len(sim_holders(sim)) == len(INSTS) * len(CHANNELS) and all(
        n == 2 for n in sim_holders(sim).values()) else None, timeout=60)
    await sim.tick(5)  # closes every gap (books with their snapshot on subscribe)


async def test_a_cut_of_one_copy_raises_no_gap_and_the_topics_hold_every_trade_once_by_event_key(
    kafka_broker: BrokerInfo, topic_prefix: str, tmp_path: Path
) -> None:
    reader = TopicReader(kafka_broker.bootstrap_servers, topic_prefix)
    async with SimServer(_sim_config(), host="127.0.0.1", port=0) as sim, contextlib.AsyncExitStack() as stack:
        a, b = await _start(sim, stack, kafka_broker, topic_prefix, tmp_path, wait_s=60.0)
        assert a.parts.arbiter is not None and b.parts.arbiter is not None and b.parts.pipeline is not None
        arbiter = b.parts.arbiter
        await _cut(sim, [b])
        streams = len(INSTS) * len(CHANNELS)
        # Every stream of the cut copy had a gap, and copy 0's positions prove each one recorded.
        await sim.wait_until(lambda: True if arbiter.covered >= streams and not arbiter.held else None, timeout=60)
        detected = sum(b.parts.pipeline.stats.gaps.values())
        assert detected >= streams and arbiter.covered == detected and arbiter.raised == 0
        assert _published(a, TopicKind.GAPS) == _published(b, TopicKind.GAPS) == 0, "no gap event raised"
        traded = {(inst, t.trade_id) for inst in INSTS for t in sim.market.trades(inst)}
        published = sum(_published(d, TopicKind.TRADES) for d in (a, b))
        rows = await reader.read(TopicKind.TRADES, at_least=published)
    by_key: dict[str, set[tuple[str, str]]] = {}
    copies: Counter[bytes] = Counter()
    for _, _, rec, headers in rows:
        assert isinstance(rec, Trade) and rec.event_key is not None
        assert headers["event_key"].decode() == rec.event_key
        by_key.setdefault(rec.event_key, set()).add((rec.inst_id, rec.trade_id))
        copies[headers["copy"]] += 1
    assert all(len(v) == 1 for v in by_key.values()), "one event key is one exchange trade"
    assert {next(iter(v)) for v in by_key.values()} == traded, "every trade once after event-key dedupe"
    assert copies[b"0"] == len(traded) > copies[b"1"] > 0, "copy 0 has all; copy 1 lacks the cut window"


async def test_a_cut_of_both_copies_raises_the_gaps_of_what_neither_received(
    kafka_broker: BrokerInfo, topic_prefix: str, tmp_path: Path
) -> None:
    reader = TopicReader(kafka_broker.bootstrap_servers, topic_prefix)
    async with SimServer(_sim_config(), host="127.0.0.1", port=0) as sim, contextlib.AsyncExitStack() as stack:
        daemons = await _start(sim, stack, kafka_broker, topic_prefix, tmp_path, wait_s=2.0)
        await _cut(sim, daemons)
        arbiters = [d.parts.arbiter for d in daemons]
        assert all(arbiters)
        await sim.wait_until(lambda: True if all(
            x is not None and x.raised and not x.held for x in arbiters) else None, timeout=60)
        traded = {(inst, t.trade_id) for inst in INSTS for t in sim.market.trades(inst)}
        trades = await reader.records(TopicKind.TRADES, Trade,
                                      at_least=sum(_published(d, TopicKind.TRADES) for d in daemons))
        gaps = await reader.records(TopicKind.GAPS, GapEvent,
                                    at_least=sum(_published(d, TopicKind.GAPS) for d in daemons))
    missing = traded - {(t.inst_id, t.trade_id) for t in trades}
    assert missing, "the cut of both lost trades"
    inside = {(g.inst_id, str(tid)) for g in gaps if g.channel == "trades-all" and g.before and g.after
              and g.before.trade_id is not None and g.after.trade_id is not None
              for tid in range(int(g.before.trade_id) + 1, int(g.after.trade_id))}
    assert missing <= inside, "every trade neither copy received lies in a raised gap"
