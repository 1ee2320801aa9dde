"""The recorder end to end: simulator -> daemon -> Kafka-protocol broker -> a consumer with the .avsc files.

These are the promises users buy the daemon for: every trade once and in order with OKX's exact strings,
books whose chain holds, every loss reported as a gap with the right bounds, bad frames kept as dead
letters, and nothing lost while Kafka is down.
"""

from __future__ import annotations

import asyncio
import itertools
import secrets
import socket
from collections import defaultdict
from pathlib import Path

from ingest.config import load_settings
from ingest.core.records import BookAction, BookUpdate, DeadLetter, GapEvent, RawFrames, TopicKind, Trade
from ingest.io.broker import EmbeddedBroker, free_port
from ingest.okx.channels import SubArg
from ingest.sim import SimConfig, SimServer
from ingest.sim.tradelog import TradeRow
from ingest.supervisor import Daemon
from tests.conftest import BrokerInfo
from tests.e2e.harness import TopicReader, daemon_settings, running
from tests.integration._ws_support import log_events

INSTS = ("BTC-USDT", "ETH-USDT")


def _subs(*channels: str) -> list[dict[str, str]]:
    return [{"channel": c, "inst_id": i} for c in channels for i in INSTS]


def _sim_config(**kw: object) -> SimConfig:
    return SimConfig(instruments=INSTS, seed=7, api_key=secrets.token_hex(16), api_secret=secrets.token_hex(32),
                     passphrase=secrets.token_hex(8), **kw)  # type: ignore[arg-type]


async def _all_subscribed(sim: SimServer, channels: tuple[str, ...]) -> None:
    for c in channels:
        for i in INSTS:
            await sim.wait_subscribed(SubArg(c, i), timeout=20)


def _by_inst(trades: list[Trade]) -> dict[str, list[Trade]]:
    out: dict[str, list[Trade]] = defaultdict(list)
    for t in trades:
        out[t.inst_id].append(t)
    return out


def _expected(sim: SimServer, inst: str) -> list[TradeRow]:
    return list(sim.market.trades(inst))


async def test_every_trade_once_in_order_with_exact_strings_and_intact_book_chains(
    kafka_broker: BrokerInfo, topic_prefix: str, tmp_path: Path
) -> None:
    channels = ("trades-all", "books", "tickers")
    async with SimServer(_sim_config()) as sim:
        settings = daemon_settings(sim, kafka_broker.bootstrap_servers, topic_prefix, tmp_path,
                                   okx={"channels": [], "subscriptions": _subs(*channels)})
        async with running(settings) as daemon:
            await _all_subscribed(sim, channels)
            await sim.tick(40)
            assert await daemon.shutdown() == 0
        expected = {i: _expected(sim, i) for i in INSTS}

    reader = TopicReader(kafka_broker.bootstrap_servers, topic_prefix)
    trades = _by_inst(await reader.records(TopicKind.TRADES, Trade, at_least=sum(map(len, expected.values()))))
    for inst in INSTS:
        assert expected[inst], "the simulator traded nothing; the test would prove nothing"
        got = [(t.trade_id, t.px, t.sz, t.side, t.ts) for t in trades[inst]]
        want = [(r.trade_id, r.px, r.sz, r.side, int(r.ts)) for r in expected[inst]]
        assert got == want  # every trade, once, in order, with OKX's exact decimal strings
        assert all(t.source.value == "ws" and t.channel == "trades-all" for t in trades[inst])

    books = await reader.records(TopicKind.BOOKS, BookUpdate)
    for inst in INSTS:
        chain = [b for b in books if b.inst_id == inst]
        assert chain and chain[0].action is BookAction.SNAPSHOT and chain[0].prev_seq_id == -1
        for prev, cur in itertools.pairwise(chain):
            assert cur.prev_seq_id == prev.seq_id, f"{inst}: chain broken at seqId {cur.seq_id}"
    assert await reader.records(TopicKind.GAPS, GapEvent) == []
    assert await reader.records(TopicKind.DLQ, DeadLetter) == []
    raw = await reader.records(TopicKind.RAW, RawFrames, at_least=1)
    frames = {(r.conn_id, f.recv_seq): f.payload for r in raw for f in r.frames}
    assert len(frames) == sum(len(r.frames) for r in raw)  # each frame once
    for conn in {r.conn_id for r in raw}:  # every frame of every connection, none missing
        seqs = sorted(s for c, s in frames if c == conn)
        assert seqs == list(range(1, len(seqs) + 1)), conn
    for t in (t for ts in trades.values() for t in ts):  # each trade's frame, verbatim, on okx.raw
        assert t.conn_id is not None and t.recv_seq is not None
        assert f'"tradeId":"{t.trade_id}"'.encode() in frames[(t.conn_id, t.recv_seq)]
    for b in books:  # and each book update's, up to the last frame any connection delivered
        assert b.conn_id is not None and b.recv_seq is not None
        assert f'"seqId":{b.seq_id}'.encode() in frames[(b.conn_id, b.recv_seq)]
    assert all(b"login" not in p for p in frames.values())  # login frames are outbound and never recorded


async def test_disconnect_window_is_reported_as_a_gap_that_bounds_exactly_the_missed_trades(
    kafka_broker: BrokerInfo, topic_prefix: str, tmp_path: Path
) -> None:
    channels = ("trades-all",)
    async with SimServer(_sim_config()) as sim:
        settings = daemon_settings(sim, kafka_broker.bootstrap_servers, topic_prefix, tmp_path,
                                   okx={"channels": [], "subscriptions": _subs(*channels)})
        async with running(settings) as daemon:
            await _all_subscribed(sim, channels)
            await sim.tick(15)
            sim.faults.reject_connects(count=1_000_000)  # keep the daemon out while the market moves on
            sim.faults.drop(kind="abort")
            await sim.wait_until(lambda: not sim.connections(), timeout=10)
            await sim.tick(15)
            sim.faults.clear()
            await _all_subscribed(sim, channels)
            await sim.tick(15)
            assert await daemon.shutdown() == 0
        expected = {i: [r.trade_id for r in _expected(sim, i)] for i in INSTS}

    await _assert_one_disconnect_gap_bounds_exactly_the_missed_trades(
        TopicReader(kafka_broker.bootstrap_servers, topic_prefix), expected)


async def _assert_one_disconnect_gap_bounds_exactly_the_missed_trades(
        reader: TopicReader, expected: dict[str, list[str]]) -> None:
    trades = _by_inst(await reader.records(TopicKind.TRADES, Trade, at_least=1))
    gaps = await reader.records(TopicKind.GAPS, GapEvent, at_least=len(INSTS))
    for inst in INSTS:
        got = [t.trade_id for t in trades[inst]]
        assert len(got) == len(set(got)), "a trade was recorded twice"
        inst_gaps = [g for g in gaps if g.inst_id == inst]
        assert [g.kind.value for g in inst_gaps] == ["disconnect"]
        gap = inst_gaps[0]
        assert gap.before is not None and gap.after is not None
        assert gap.before.trade_id is not None and gap.after.trade_id is not None
        inside = [t for t in expected[inst] if gap.before.trade_id < int(t) < gap.after.trade_id]
        assert inside, "the market moved while nobody recorded it, so the gap must contain trades"
        # Everything the simulator traded is either recorded or strictly inside the reported gap; nothing else.
        assert sorted(set(got) | set(inside), key=int) == expected[inst]
        assert not set(got) & set(inside)


async def test_bad_frames_go_to_the_dead_letter_topic_and_the_lost_trade_becomes_a_gap(
    kafka_broker: BrokerInfo, topic_prefix: str, tmp_path: Path
) -> None:
    async with SimServer(_sim_config()) as sim:
        settings = daemon_settings(sim, kafka_broker.bootstrap_servers, topic_prefix, tmp_path,
                                   okx={"channels": [], "subscriptions": [{"channel": "trades-all",
                                                                           "inst_id": "BTC-USDT"}]})
        async with running(settings) as daemon:
            await sim.wait_subscribed(SubArg("trades-all", "BTC-USDT"), timeout=20)
            await sim.tick(5)
            sim.faults.corrupt("wrong_type", channel="trades-all", inst_id="BTC-USDT", count=1, field="px")
            await sim.tick(10)
            assert await daemon.shutdown() == 0
        assert daemon.daemon.parts.pipeline is not None
        assert daemon.daemon.parts.pipeline.stats.dead_letters["wrong_type"] == 1

    reader = TopicReader(kafka_broker.bootstrap_servers, topic_prefix)
    dead = await reader.records(TopicKind.DLQ, DeadLetter, at_least=1)
    assert len(dead) == 1 and dead[0].reason_code.value == "wrong_type" and b'"px":' in dead[0].raw
    gaps = await reader.records(TopicKind.GAPS, GapEvent, at_least=1)
    assert [g.kind.value for g in gaps] == ["trade_hole"]


async def test_kafka_outage_mid_stream_loses_nothing_once_the_daemon_drains(
    own_broker: EmbeddedBroker, topic_prefix: str, tmp_path: Path
) -> None:
    channels = ("trades-all",)
    async with SimServer(_sim_config()) as sim:
        settings = daemon_settings(sim, own_broker.bootstrap_servers, topic_prefix, tmp_path,
                                   okx={"channels": [], "subscriptions": _subs(*channels)},
                                   kafka={"request_timeout_ms": 3000, "delivery_timeout_ms": 6000,
                                          "reconnect_backoff_max_ms": 500})
        async with running(settings) as daemon:
            delivery = daemon.daemon.parts.delivery
            assert delivery is not None
            await _all_subscribed(sim, channels)
            await sim.tick(10)
            await delivery.flush(30)
            at_kill = {i: len(_expected(sim, i)) for i in INSTS}
            own_broker.kill()  # memory-only: what it held is gone; what it had not acknowledged is journaled
            await sim.tick(30)
            # A write failed and the records wait in the journal: the outage is real, not just a blip.
            await delivery.wait_for(lambda s: s.delivery_errors > 0 and s.journal_records > 0, 30)
            await own_broker.start()
            await sim.tick(10)
            await delivery.wait_for(lambda s: s.journal_records == 0 and s.broker_up, 60)  # drained
            assert await daemon.shutdown() == 0
        expected = {i: [r.trade_id for r in _expected(sim, i)[at_kill[i]:]] for i in INSTS}

    reader = TopicReader(own_broker.bootstrap_servers, topic_prefix)
    rows = await reader.read(TopicKind.TRADES, at_least=sum(map(len, expected.values())))
    seen: set[bytes] = set()
    trades: list[Trade] = []
    for _, _, rec, headers in rows:
        if headers["record_id"] in seen:  # at-least-once: consumers drop repeats by record_id
            continue
        seen.add(headers["record_id"])
        assert isinstance(rec, Trade)
        trades.append(rec)
    for inst, want in expected.items():
        assert want, "the market moved during the outage; the test would prove nothing otherwise"
        got = [t.trade_id for t in trades if t.inst_id == inst]
        assert got[-len(want):] == want  # every trade since the outage began, once, in order


async def test_a_restart_reports_the_time_nobody_recorded_as_a_gap_with_exact_bounds(
    kafka_broker: BrokerInfo, topic_prefix: str, tmp_path: Path
) -> None:
    channels = ("trades-all",)
    async with SimServer(_sim_config()) as sim:
        settings = daemon_settings(sim, kafka_broker.bootstrap_servers, topic_prefix, tmp_path,
                                   okx={"channels": [], "subscriptions": _subs(*channels)})
        async with running(settings) as first:
            await _all_subscribed(sim, channels)
            await sim.tick(10)
            assert await first.shutdown() == 0
        await sim.wait_until(lambda: not sim.connections(), timeout=10)
        await sim.tick(10)  # trades nobody records: the recorder is not running
        async with running(settings) as second:  # same shard, same journal directory
            await _all_subscribed(sim, channels)
            await sim.tick(10)
            assert await second.shutdown() == 0
        expected = {i: [r.trade_id for r in _expected(sim, i)] for i in INSTS}

    await _assert_one_disconnect_gap_bounds_exactly_the_missed_trades(
        TopicReader(kafka_broker.bootstrap_servers, topic_prefix), expected)


async def test_the_embedded_broker_is_restarted_when_it_dies(topic_prefix: str, tmp_path: Path) -> None:
    channels = ("trades-all",)
    async with SimServer(_sim_config()) as sim:
        settings = daemon_settings(sim, "embedded", topic_prefix, tmp_path,
                                   okx={"channels": [], "subscriptions": _subs(*channels)},
                                   kafka={"embedded_port": free_port(), "request_timeout_ms": 3000,
                                          "delivery_timeout_ms": 6000, "reconnect_backoff_max_ms": 500})
        async with running(settings) as daemon:
            broker, delivery = daemon.daemon.parts.broker, daemon.daemon.parts.delivery
            assert broker is not None and delivery is not None
            await _all_subscribed(sim, channels)
            first_pid = broker.pid
            broker.kill()
            at_kill = {i: len(_expected(sim, i)) for i in INSTS}
            await sim.tick(10)
            await delivery.wait_for(lambda s: s.journal_records == 0 and s.broker_up, 60)  # drained again
            assert broker.running and broker.pid != first_pid  # a new broker process, supervised
            want = [r.trade_id for i in INSTS for r in _expected(sim, i)[at_kill[i]:]]
            assert want
            reader = TopicReader(broker.bootstrap_servers, topic_prefix)
            got = {t.trade_id for t in await reader.records(TopicKind.TRADES, Trade, at_least=len(want))}
            assert set(want) <= got  # everything since the broker died reached its successor
            assert await daemon.shutdown() == 0


async def test_a_failed_start_leaves_no_embedded_broker_behind(topic_prefix: str, tmp_path: Path) -> None:
    """A start that fails late (the metrics port is taken: a configuration error, exit 2) must not orphan the
    broker it already started."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        async with SimServer(_sim_config()) as sim:
            settings = daemon_settings(sim, "embedded", topic_prefix, tmp_path,
                                       okx={"channels": [], "subscriptions": _subs("trades-all")},
                                       kafka={"embedded_port": free_port()},
                                       obs={"metrics_port": taken.getsockname()[1]})
            daemon = Daemon(settings)
            with log_events() as logs:
                assert await daemon.run(asyncio.Event()) == 2
            [failed] = [r for r in logs.seen if r.getMessage() == "startup_failed"]
            assert "obs.metrics_port" in str(failed.__dict__["error"])
    assert daemon.parts.broker is not None and not daemon.parts.broker.running


async def test_a_recorder_with_nothing_to_subscribe_refuses_to_start_with_exit_2(tmp_path: Path) -> None:
    """No instruments, no subscriptions, private off: a configuration error up front, not a task that ends."""
    settings = load_settings(None, okx={"instruments": []}, journal={"dir": str(tmp_path)}, obs={"metrics_port": 0})
    with log_events() as logs:
        assert await Daemon(settings).run(asyncio.Event()) == 2
    [failed] = [r for r in logs.seen if r.getMessage() == "startup_failed"]
    error = str(failed.__dict__["error"])
    assert "okx.instruments" in error and "nothing to subscribe" in error
    assert "task_died" not in logs.names()


async def test_readiness_names_a_subscription_okx_refused_while_the_others_record(
    kafka_broker: BrokerInfo, topic_prefix: str, tmp_path: Path
) -> None:
    subs = [*_subs("trades-all"), {"channel": "trades-all", "inst_id": "NOPE-USDT"}]  # an instrument OKX lacks
    async with SimServer(_sim_config()) as sim:
        settings = daemon_settings(sim, kafka_broker.bootstrap_servers, topic_prefix, tmp_path,
                                   okx={"channels": [], "subscriptions": subs})
        with log_events() as logs:
            async with running(settings) as daemon:
                await logs.wait("ws_subscribe_failed", timeout=20)
                await _all_subscribed(sim, ("trades-all",))
                ready = daemon.daemon.readiness()
                assert not ready.ready
                assert ready.details["subscriptions_refused"] == {"trades-all:NOPE-USDT": "60018"}
                assert any("1 subscriptions refused" in r for r in ready.reasons)
                await sim.tick(5)
                assert await daemon.shutdown() == 0
    trades = await TopicReader(kafka_broker.bootstrap_servers, topic_prefix).records(TopicKind.TRADES, Trade,
                                                                                     at_least=1)
    assert {t.inst_id for t in trades} == set(INSTS)  # the refusal hurt no other stream
