"""`make bench`: frames in over a local WebSocket -> records acknowledged by the broker.

The OKX simulator runs in its own process (the feeder) and pushes pre-rendered `trades-all` frames; this
process runs the recorder's real parts (connection manager, pipeline, delivery with its write-ahead
journal, Kafka sink) against the embedded broker (a third process). Measured in the same run, so the
figures are ratios that survive a slower or busier machine:

* floor: a bare `websockets` client that only receives and `orjson.loads` the same frames;
* throughput: as fast as the feeder can push; msgs/s, daemon CPU per message, receive->ack p50/p99;
* paced: a fixed rate (default 5,000 msgs/s) for a while; receive->ack p50/p99;
* soak (`--soak-s`): many instruments at a fixed rate; RSS sampled, start vs end vs peak.

Receive->ack is measured per record, from the receive timestamp of its frame to the moment the broker
acknowledged the batch that carried it (delivery keeps order end to end, so the two can be matched).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import cProfile
import multiprocessing as mp
import os
import secrets
import sys
import tempfile
import time
from array import array
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection as Pipe
from pathlib import Path
from typing import Any, Protocol

import orjson
import websockets
from prometheus_client import CollectorRegistry

from ingest.config import OkxSettings, WsSettings, load_settings
from ingest.core.avro import RecordEncoder
from ingest.core.events import Inbound, InboundFrame
from ingest.core.records import TopicKind, topic_name
from ingest.io.broker import EmbeddedBroker
from ingest.io.cluster import GroupMembership
from ingest.io.delivery import Delivery
from ingest.io.handover import ControlChannel
from ingest.io.inbox import Inbox
from ingest.io.kafka import KafkaSink
from ingest.io.measured import MeasuredSink
from ingest.io.positions import PositionStore
from ingest.io.sink import EncodedRecord
from ingest.obs.metrics import AckLatency
from ingest.okx.channels import SubArg
from ingest.services.cluster import ClusterPositions, FencedOutlet, ShardConnections
from ingest.services.connections import ConnectionManager
from ingest.services.handover import Handovers
from ingest.services.pipeline import Pipeline
from ingest.supervisor import INBOX_SIZE, all_topics, wanted_args

# ---------------------------------------------------------------------------------------------- feeder process


def _feeder_main(pipe: Pipe, instruments: Sequence[str]) -> None:
    """The simulator in its own process, driven by commands over `pipe`."""
    asyncio.run(_feeder(pipe, tuple(instruments)))


async def _feeder(pipe: Pipe, instruments: tuple[str, ...]) -> None:
    from ingest.sim import SimConfig, SimServer

    config = SimConfig(instruments=instruments, seed=3, api_key=secrets.token_hex(8),
                       api_secret=secrets.token_hex(16), passphrase=secrets.token_hex(8),
                       idle_timeout_s=600.0, max_trades_history=10_000_000, max_queue_frames=10_000_000,
                       flush_timeout_s=600.0, connect_limit=1000)  # the floor opens its connections at once
    loop = asyncio.get_running_loop()
    async with SimServer(config) as sim:
        pipe.send(("ready", sim.ws_base))
        while True:
            cmd = await loop.run_in_executor(None, pipe.recv)
            if cmd[0] == "stop":
                return
            if cmd[0] == "tick":
                pipe.send(("ticked", await _ticks(sim, *cmd[1:])))
                continue
            _, insts, n, rate, subscribers = cmd
            for inst in insts:
                await sim.wait_subscribed(SubArg("trades-all", inst), count=subscribers, timeout=60)
            if rate is None:
                sent = 0
                for inst in insts:
                    sent += await sim.pump(_only_all(sim.prepare_trades(inst, n)))
            else:
                sent = await _paced(sim, insts, n, rate)
            pipe.send(("pumped", sent))


async def _ticks(sim: Any, insts: list[str], channels: list[str], seconds: float, hz: float) -> int:
    """The market in real time: `seconds` of ticks at `hz` over every instrument, each tick pushing its
    trades, book updates and tickers to the subscribers. A tick waits until its frames were written (the
    reader sets the pace when it cannot keep up). Returns the frames written to the sockets meanwhile."""
    for inst in insts:
        for channel in channels:
            await sim.wait_subscribed(SubArg(channel, inst), timeout=120)
    await sim.flush()  # the books' snapshots: not part of the run

    def written() -> int:
        return sum(c.frames_sent for c in sim.stats.connections.values())

    before = written()
    start = time.perf_counter()
    n = max(1, int(seconds * hz))
    for i in range(n):
        await sim.tick(1)
        delay = start + (i + 1) / hz - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)  # pacing the load generator
    await sim.flush()
    return written() - before


def _only_all(prepared: Any) -> Any:
    """The prepared batch without its aggregated `trades` frames (nobody here subscribes to them)."""
    return type(prepared)(prepared.inst_id, (), prepared.trades_all)


async def _paced(sim: Any, insts: tuple[str, ...], n_per_inst: int, rate: int) -> int:
    """Push `n_per_inst` frames per instrument, round-robin, at `rate` frames/s in 10 ms slices; frames are made
    slice by slice, so a long soak holds only one slice in memory."""
    per_slice = max(1, rate // 100)
    total = n_per_inst * len(insts)
    start = time.perf_counter()
    sent = 0
    turn = 0
    while sent < total:
        quota = min(per_slice, total - sent)
        for _ in range(quota):
            inst = insts[turn % len(insts)]
            turn += 1
            sent += await sim.pump(_only_all(sim.prepare_trades(inst, 1)))
        delay = start + sent / rate - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)  # pacing the load generator
    return sent


class Feeder:
    """Handle on the feeder process."""

    def __init__(self, instruments: Sequence[str]) -> None:
        ctx = mp.get_context("spawn")
        self._pipe, child = ctx.Pipe()
        self._proc = ctx.Process(target=_feeder_main, args=(child, list(instruments)), daemon=True)
        self._proc.start()
        ready = self._pipe.recv()
        self.ws_base: str = ready[1]

    async def pump(self, insts: Sequence[str], n: int, rate: int | None = None, subscribers: int = 1) -> int:
        self._pipe.send(("pump", list(insts), n, rate, subscribers))
        reply = await asyncio.get_running_loop().run_in_executor(None, self._pipe.recv)
        return int(reply[1])

    async def ticks(self, insts: Sequence[str], channels: Sequence[str], seconds: float, hz: float) -> int:
        self._pipe.send(("tick", list(insts), list(channels), seconds, hz))
        reply = await asyncio.get_running_loop().run_in_executor(None, self._pipe.recv)
        return int(reply[1])

    def stop(self) -> None:
        with contextlib.suppress(OSError):
            self._pipe.send(("stop",))
        self._proc.join(10)
        if self._proc.is_alive():
            self._proc.kill()


# ---------------------------------------------------------------------------------------------- measurement


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


#: Latency is sampled on every SAMPLE-th frame, so measuring it costs the recorder next to nothing.
SAMPLE = 16


class TimingPipeline(Pipeline):
    """The pipeline, noting the receive time of every SAMPLE-th frame of a connection by `conn:recv_seq` as
    each batch comes in: one cheap test per frame, so measuring costs the recorder next to nothing."""

    recv_ns: dict[bytes, int]
    frames: int = 0

    async def handle_many(self, items: Sequence[Inbound]) -> None:
        recv = self.recv_ns
        for item in items:
            if type(item) is InboundFrame:
                self.frames += 1
                if not item.recv_seq % SAMPLE:
                    recv[f"{item.conn}:{item.recv_seq}".encode()] = item.recv_ts_ns
        if len(recv) > _RECV_CAP:  # samples of frames that made no record (acks, heartbeats): never matched
            recv.clear()
        await super().handle_many(items)


_RECV_CAP = 50_000


class TimingSink:
    """Around the Kafka sink: counts acknowledged trades, and when a batch is acknowledged, each sampled
    trade's receive->ack latency, found by the (conn, recv_seq) its record_id header starts with."""

    name = "kafka-timed"

    def __init__(self, inner: KafkaSink, trades_topic: str) -> None:
        self.inner = inner
        self.trades_topic = trades_topic
        self.trades_acked = 0
        self.recv_ns: dict[bytes, int] = {}
        self.latencies_ns = array("q")  # 8 bytes a sample: a long soak must not grow the recorder's RSS
        self.all_topics = False  # the mixed load: measure books and tickers records too

    async def start(self) -> None:
        await self.inner.start()

    async def write(self, batch: Sequence[EncodedRecord]) -> None:
        await self.inner.write(batch)
        now = time.time_ns()
        recv = self.recv_ns
        topic = self.trades_topic
        trades = [r for r in batch if r.topic == topic]
        self.trades_acked += len(trades)
        if not recv:
            return
        for record in batch if self.all_topics else trades:
            if len(record.headers) < 2:
                continue
            record_id = record.headers[1][1]  # (schema, record_id, source): "conn:recv_seq:index"
            # pop: the first trade of a sampled frame is measured, and the map stays small over a long soak
            recv_ns = recv.pop(record_id.rpartition(b":")[0], None)
            if recv_ns is not None:
                self.latencies_ns.append(now - recv_ns)

    async def flush(self) -> None:
        await self.inner.flush()

    async def close(self) -> None:
        await self.inner.close()


class Connections(Protocol):
    """What the recorder needs of its WebSocket side: run until cancelled, resubscribe an arg on request."""

    async def run(self) -> None: ...

    def request_resubscribe(self, arg: SubArg, reason: str) -> None: ...


#: Builds the WebSocket side in front of the inbox; `ConnectionManager` (websockets) unless a bench swaps it.
ConnectionsFactory = Callable[[OkxSettings, WsSettings, Inbox], Connections]


@dataclass
class Recorder:
    """The recorder's real parts, wired as the supervisor wires them (minus REST, health, credentials)."""

    manager: ConnectionManager | ShardConnections | Connections
    pipeline: Pipeline
    delivery: Delivery
    sink: TimingSink
    tasks: list[asyncio.Task[None]]
    #: Cluster mode only (`start_recorder(cluster_group=...)`): the group membership and the positions' store.
    membership: GroupMembership | None = None
    positions: PositionStore | None = None

    async def close(self) -> None:
        for t in self.tasks:
            t.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await t
        await self.delivery.close()
        if self.positions is not None:
            await self.positions.close()
        if isinstance(self.manager, ShardConnections) and self.manager.handovers is not None:
            await self.manager.handovers.channel.close()


async def start_recorder(ws_base: str, bootstrap: str, insts: Sequence[str], journal: Path,
                         publish_raw: bool, compression: bool, journal_extra: dict[str, Any] | None = None,
                         channels: Sequence[str] = ("trades-all",), cluster_group: str | None = None,
                         connections: ConnectionsFactory | None = None) -> Recorder:
    """The recorder's parts; with `cluster_group`, wired as the supervisor wires cluster mode (shard connections,
    group membership on the broker, the fence in front of delivery, positions written every interval), as the
    group's only member: it owns every shard, so it records the same subscriptions as single mode. `connections`
    swaps the WebSocket side in single mode (`bench.picows_bench`: the same pipeline behind another reader)."""
    subs = [{"channel": c, "inst_id": i} for i in insts for c in channels]
    cluster: dict[str, Any] = {} if cluster_group is None else {"group_id": cluster_group, "static_membership": False}
    settings = load_settings(None, okx={"ws_base_url": ws_base, "channels": [], "subscriptions": subs},
                             ws={"compression": compression},
                             kafka={"bootstrap_servers": bootstrap, "enable_idempotence": False,
                                    "topic_prefix": f"bench{secrets.token_hex(3)}.", "publish_raw": publish_raw},
                             journal={"dir": str(journal), **(journal_extra or {})}, cluster=cluster)
    prefix = settings.kafka.topic_prefix
    sink = TimingSink(KafkaSink(settings.kafka, bootstrap_servers=bootstrap, topics=all_topics(prefix)),
                      topic_name(prefix, TopicKind.TRADES))
    latency = AckLatency(CollectorRegistry())  # the receive -> ack histogram, as the supervisor wires it
    delivery = Delivery.from_settings(MeasuredSink(sink, latency), settings.journal, settings.kafka)
    await delivery.start()
    inbox = Inbox(INBOX_SIZE)
    if cluster_group is None:
        manager: ConnectionManager | ShardConnections | Connections = (connections or ConnectionManager)(
            settings.okx, settings.ws, inbox)
        outlet: Delivery | FencedOutlet = delivery
        membership = None
    else:
        member = f"bench-{secrets.token_hex(3)}"
        args = wanted_args(settings)
        manager = ShardConnections(settings.okx, settings.ws, inbox, args, settings.cluster.shards, member=member)
        membership = GroupMembership(settings.cluster, settings.kafka, member, manager.apply,
                                     bootstrap_servers=bootstrap)
        await membership.ensure_topic()
        outlet = FencedOutlet(delivery, manager, membership.lease, topic_name(prefix, TopicKind.GAPS))
        # The hand-overs of planned moves, as the supervisor wires them (on by default: cluster.handover_timeout_s).
        channel = ControlChannel(settings.kafka, bootstrap_servers=bootstrap)
        await channel.start()
        handovers = Handovers(channel, manager.member, manager.by_shard, settings.cluster.handover_timeout_s,
                              topic_name(prefix, TopicKind.GAPS))
        handovers.deliver = outlet.deliver
        handovers.on_released = manager.wake
        handovers.is_live = manager.shard_live
        manager.handovers = handovers
    pipeline = TimingPipeline(inbox, outlet, RecordEncoder(prefix), resubscriber=manager,
                              publish_raw=publish_raw, latency=latency)
    pipeline.recv_ns = sink.recv_ns
    tasks = [asyncio.create_task(pipeline.run()), asyncio.create_task(manager.run())]
    store = None
    if membership is not None and isinstance(manager, ShardConnections):
        store = PositionStore(settings.kafka, bootstrap_servers=bootstrap)
        await store.start()
        positions = ClusterPositions(pipeline, delivery, store, manager, membership.member,
                                     settings.cluster.position_interval_s, membership.lease,
                                     fence=outlet if isinstance(outlet, FencedOutlet) else None)
        tasks += [asyncio.create_task(membership.run()), asyncio.create_task(positions.run())]
        if manager.handovers is not None:
            tasks.append(asyncio.create_task(manager.handovers.run()))
        async with asyncio.timeout(120):  # Tansu: a join takes about 3 s
            await membership.assigned.wait()
    return Recorder(manager, pipeline, delivery, sink, tasks, membership, store)


def pct(values: Sequence[int], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] / 1e6


@dataclass(frozen=True)
class Floor:
    msgs_s: float
    cpu_us_per_msg: float


async def floor_run(feeder: Feeder, inst: str, n: int, compression: bool) -> Floor:
    """A bare client that only receives and parses the frames (same compression as the recorder)."""
    async with websockets.connect(f"{feeder.ws_base}/ws/v5/business", max_size=None,
                                  compression="deflate" if compression else None) as ws:
        await ws.send(orjson.dumps({"op": "subscribe", "args": [{"channel": "trades-all", "instId": inst}]}).decode())
        await ws.recv()  # the subscribe ack
        pump = asyncio.create_task(feeder.pump([inst], n))
        got = 0
        start, cpu = time.perf_counter(), time.process_time()
        while got < n:
            msg = await ws.recv()
            orjson.loads(msg)
            got += 1
        elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu
        await pump
    return Floor(n / elapsed, cpu / n * 1e6)


async def throughput_run(rec: Recorder, feeder: Feeder, inst: str, n: int) -> dict[str, float]:
    start_out = rec.sink.trades_acked
    del rec.sink.latencies_ns[:]
    t0, c0 = time.perf_counter(), time.process_time()
    await feeder.pump([inst], n)
    # trades are acknowledged after the okx.raw records of their frames (delivery keeps order)
    await rec.delivery.wait_for(lambda s: rec.sink.trades_acked - start_out >= n, 600)
    t1, c1 = time.perf_counter(), time.process_time()
    lat = rec.sink.latencies_ns
    return {"msgs_s": n / (t1 - t0), "cpu_us_per_msg": (c1 - c0) / n * 1e6, "p50_ms": pct(lat, 0.5),
            "p99_ms": pct(lat, 0.99)}


async def paced_run(rec: Recorder, feeder: Feeder, insts: Sequence[str], rate: int, seconds: float,
                    ) -> dict[str, float]:
    n_per_inst = max(1, int(rate * seconds / len(insts)))
    start_out = rec.sink.trades_acked
    del rec.sink.latencies_ns[:]
    rss: list[float] = [rss_mb()]
    sampling = True

    async def sample() -> None:
        while sampling:
            rss.append(rss_mb())
            await asyncio.sleep(1.0)  # sampling interval

    sampler = asyncio.create_task(sample())
    c0 = time.process_time()
    sent = await feeder.pump(insts, n_per_inst, rate=rate)
    await rec.delivery.wait_for(lambda s: rec.sink.trades_acked - start_out >= sent, 600)
    cpu = time.process_time() - c0
    sampling = False
    await sampler
    rss.append(rss_mb())
    lat = rec.sink.latencies_ns
    return {"rate": rate, "msgs": sent, "cpu_us_per_msg": cpu / max(1, sent) * 1e6, "p50_ms": pct(lat, 0.5),
            "p99_ms": pct(lat, 0.99),
            "rss_start_mb": rss[0], "rss_1min_mb": rss[min(60, len(rss) - 1)], "rss_end_mb": rss[-1],
            "rss_peak_mb": max(rss)}


#: The mixed load: what a book-heavy deployment subscribes per instrument (the configuration's default channels).
MIXED_CHANNELS = ("trades", "books", "tickers")
#: Market ticks per second: OKX's own pace (100 ms per step).
MIXED_HZ = 10.0
#: Books per connection, as the recorder's `ws.depth_channels_per_connection` default packs them.
_BOOKS_PER_CONN = 29


async def mixed_floor(feeder: Feeder, insts: Sequence[str], seconds: float, compression: bool) -> Floor:
    """The bare client on the mixed load: the same subscriptions over as many connections as the recorder
    opens, every frame received and `orjson.loads`ed, nothing else."""
    got = 0
    target = float("inf")
    reached = asyncio.Event()
    stop = asyncio.Event()

    async def one(chunk: Sequence[str]) -> None:
        nonlocal got
        args = [{"channel": c, "instId": i} for i in chunk for c in MIXED_CHANNELS]
        async with websockets.connect(f"{feeder.ws_base}/ws/v5/public", max_size=None,
                                      compression="deflate" if compression else None) as ws:
            await ws.send(orjson.dumps({"op": "subscribe", "args": args}).decode())
            while not stop.is_set():
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(0.2):  # to notice `stop` when the feeder is quiet
                        orjson.loads(await ws.recv())
                        got += 1
                        if got >= target:
                            reached.set()

    chunks = [insts[i:i + _BOOKS_PER_CONN] for i in range(0, len(insts), _BOOKS_PER_CONN)]
    readers = [asyncio.create_task(one(c)) for c in chunks]
    try:
        await feeder.ticks(insts, MIXED_CHANNELS, 1.0, MIXED_HZ)  # warm-up: snapshots, first updates
        start_got, t0, c0 = got, time.perf_counter(), time.process_time()
        sent = await feeder.ticks(insts, MIXED_CHANNELS, seconds, MIXED_HZ)
        target = start_got + sent
        if got < target:
            async with asyncio.timeout(120):
                await reached.wait()
        t1, c1 = time.perf_counter(), time.process_time()
    finally:
        stop.set()
        await asyncio.gather(*readers, return_exceptions=True)
    return Floor(sent / (t1 - t0), (c1 - c0) / max(1, sent) * 1e6)


async def mixed_run(args: argparse.Namespace, n: int, bootstrap: str, journal_extra: dict[str, Any],
                    ) -> dict[str, float]:
    """The mixed load at `n` instruments: floor, then the recorder, on a feeder simulating exactly those."""
    insts = [f"MIX{i}-USDT" for i in range(n)]
    feeder = Feeder(insts)
    try:
        floor = await mixed_floor(feeder, insts, args.mixed_floor_s or args.mixed_s, not args.no_compression)
        out = await mixed_recorder(args, feeder, insts, bootstrap, journal_extra)
    finally:
        feeder.stop()
    return {**out, "floor_cpu_us": floor.cpu_us_per_msg, "floor_frames_s": floor.msgs_s}


async def mixed_recorder(args: argparse.Namespace, feeder: Feeder, insts: Sequence[str], bootstrap: str,
                         journal_extra: dict[str, Any], connections: ConnectionsFactory | None = None,
                         ) -> dict[str, float]:
    """The recorder on the mixed load of `insts` (`connections`: its WebSocket side, websockets by default):
    `args.mixed_s` seconds of market ticks after a second of warm-up; CPU per frame, latency, RSS."""
    n = len(insts)
    with tempfile.TemporaryDirectory(prefix="okx-bench-") as tmp:
        rec = await start_recorder(feeder.ws_base, bootstrap, insts, Path(tmp), not args.no_raw,
                                   not args.no_compression, journal_extra, MIXED_CHANNELS, connections=connections)
        rec.sink.all_topics = True
        try:
            await feeder.ticks(insts, MIXED_CHANNELS, 1.0, MIXED_HZ)  # warm-up: snapshots, first updates
            await rec.delivery.wait_for(lambda s: s.queued == 0 and s.journal_entries == 0, 120)
            del rec.sink.latencies_ns[:]
            rss = [rss_mb()]
            sampling = True

            async def sample() -> None:
                while sampling:
                    rss.append(rss_mb())
                    await asyncio.sleep(1.0)  # sampling interval

            sampler = asyncio.create_task(sample())
            assert isinstance(rec.pipeline, TimingPipeline)
            # CPU time of this thread, not wall time: the VM is shared
            profiler = cProfile.Profile(time.thread_time) if args.profile else None
            if profiler is not None:
                profiler.enable()
            frames0, t0, c0 = rec.pipeline.frames, time.perf_counter(), time.process_time()
            sent = await feeder.ticks(insts, MIXED_CHANNELS, args.mixed_s, MIXED_HZ)
            timing = rec.pipeline
            assert isinstance(timing, TimingPipeline)
            counted: TimingPipeline = timing
            await rec.delivery.wait_for(lambda s: counted.frames - frames0 >= sent and s.queued == 0
                                        and s.journal_entries == 0, 120)
            t1, c1 = time.perf_counter(), time.process_time()
            if profiler is not None:
                profiler.disable()
                profiler.dump_stats(f"{args.profile}.{n}")
            sampling = False
            await sampler
            rss.append(rss_mb())
        finally:
            await rec.close()
    lat = rec.sink.latencies_ns
    frames = max(1, sent)
    return {"instruments": n, "frames": sent, "frames_s": frames / (t1 - t0),
            "cpu_us_per_msg": (c1 - c0) / frames * 1e6, "core_share": (c1 - c0) / (t1 - t0),
            "p50_ms": pct(lat, 0.5), "p99_ms": pct(lat, 0.99), "rss_start_mb": rss[0], "rss_end_mb": rss[-1],
            "rss_1min_mb": rss[min(60, len(rss) - 1)], "rss_peak_mb": max(rss)}


def journal_extra(args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if args.sync_interval_ms is not None:
        out["sync_interval_ms"] = args.sync_interval_ms
    if args.cursor_interval_ms is not None:
        out["cursor_interval_ms"] = args.cursor_interval_ms
    return out


async def main_async(args: argparse.Namespace) -> int:
    insts = [f"BENCH{i}-USDT" for i in range(max(1, args.instruments))]
    extra = journal_extra(args)
    broker = EmbeddedBroker()
    await broker.start()
    soak = None
    mixed: list[dict[str, float]] = []
    try:
        feeder = Feeder(insts)
        try:
            with tempfile.TemporaryDirectory(prefix="okx-bench-") as tmp:
                floor = await floor_run(feeder, insts[0], args.messages, not args.no_compression)
                rec = await start_recorder(feeder.ws_base, broker.bootstrap_servers, insts, Path(tmp),
                                           not args.no_raw, not args.no_compression, extra)
                await throughput_run(rec, feeder, insts[0], min(5_000, args.messages))  # warm-up
                thr = await throughput_run(rec, feeder, insts[0], args.messages)
                # "Half the saturation rate": half of what this run just sustained flat out, unless given.
                rate = args.rate or max(100, int(thr["msgs_s"] / 2))
                paced = await paced_run(rec, feeder, insts[:1], rate, args.paced_s)
                if args.soak_s > 0:
                    soak = await paced_run(rec, feeder, insts, args.soak_rate, args.soak_s)
                await rec.close()
        finally:
            feeder.stop()
        for n in args.mixed:
            mixed.append(await mixed_run(args, n, broker.bootstrap_servers, extra))
    finally:
        await broker.stop()
    report(args, floor, thr, paced, soak, mixed)
    return 0


#: The issue's target: trade messages per second that one core sustains.
TARGET_PER_CORE = 30_000


def report(args: argparse.Namespace, floor: Floor, thr: dict[str, float], paced: dict[str, float],
           soak: dict[str, float] | None, mixed: Sequence[dict[str, float]] = ()) -> None:
    cores = os.cpu_count()
    per_core = 1e6 / thr["cpu_us_per_msg"]
    extra = journal_extra(args)
    print(f"\nokx-ingest pipeline benchmark ({args.messages:,} trades-all frames, {cores} cores, "
          f"raw topic {'off' if args.no_raw else 'on'}, permessage-deflate {'off' if args.no_compression else 'on'}, "
          f"journal {extra or 'defaults'}, Python {sys.version.split()[0]})\n")
    print(f"{'measure':<44}{'value':>14}{'vs floor':>10}")
    print(f"{'floor: bare client, receive + orjson.loads':<44}{floor.msgs_s:>10,.0f}/s {1.0:>9.2f}")
    print(f"{'floor CPU per message':<44}{floor.cpu_us_per_msg:>11.1f} us {1.0:>9.2f}")
    print(f"{'recorder: receive -> broker ack':<44}{thr['msgs_s']:>10,.0f}/s {thr['msgs_s'] / floor.msgs_s:>9.2f}")
    print(f"{'recorder CPU per message (flat out)':<44}{thr['cpu_us_per_msg']:>11.1f} us "
          f"{thr['cpu_us_per_msg'] / floor.cpu_us_per_msg:>9.2f}")
    verdict = "meets" if per_core >= TARGET_PER_CORE else "misses"
    print(f"{'recorder messages per core-second':<44}{per_core:>10,.0f}/s   ({verdict} the {TARGET_PER_CORE:,} target)")
    print(f"{'receive -> ack p50 / p99 (flat out)':<44}{thr['p50_ms']:>6.1f} / {thr['p99_ms']:.1f} ms")
    label = f"paced at {int(paced['rate']):,} msgs/s: CPU per message"
    print(f"{label:<44}{paced['cpu_us_per_msg']:>11.1f} us {paced['cpu_us_per_msg'] / floor.cpu_us_per_msg:>9.2f}")
    label = f"receive -> ack p50 / p99 at {int(paced['rate']):,} msgs/s"
    print(f"{label:<44}{paced['p50_ms']:>6.1f} / {paced['p99_ms']:.1f} ms")
    print(f"{'RSS start / end / peak (paced)':<44}{paced['rss_start_mb']:>6.0f} / {paced['rss_end_mb']:.0f}"
          f" / {paced['rss_peak_mb']:.0f} MB")
    if soak is not None:
        label = f"soak: {args.instruments} instruments, {int(soak['rate']):,}/s, {int(args.soak_s)} s"
        print(f"{label:<44}p99 {soak['p99_ms']:.1f} ms, RSS {soak['rss_start_mb']:.0f} -> "
              f"{soak['rss_1min_mb']:.0f} after 1 min -> {soak['rss_end_mb']:.0f} MB (peak {soak['rss_peak_mb']:.0f})")
    if mixed:
        print(f"\nmixed load: instruments x ({', '.join(MIXED_CHANNELS)}), market ticks at {MIXED_HZ:.0f}/s for "
              f"{args.mixed_s:.0f} s; floor = the bare client on the same subscriptions, same run")
        print(f"{'instruments':>11}{'frames/s':>10}{'CPU/frame':>11}{'floor':>9}{'vs floor':>9}{'core':>7}"
              f"{'p50 / p99 ms':>16}{'RSS start/end/peak MB':>24}")
        for m in mixed:
            print(f"{int(m['instruments']):>11}{m['frames_s']:>10,.0f}{m['cpu_us_per_msg']:>8.1f} us"
                  f"{m['floor_cpu_us']:>6.1f} us{m['cpu_us_per_msg'] / m['floor_cpu_us']:>8.2f}x"
                  f"{m['core_share']:>7.2f}{m['p50_ms']:>7.1f} / {m['p99_ms']:<6.1f}"
                  f"{m['rss_start_mb']:>10.0f} / {m['rss_end_mb']:.0f} / {m['rss_peak_mb']:.0f}")
    if args.json:
        print("JSON " + orjson.dumps({"floor": floor.__dict__, "flat": thr, "paced": paced, "soak": soak,
                                      "mixed": list(mixed), "journal": extra}).decode())


def int_list(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected instrument counts like 10,100,300; got {text!r}") from None


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="make bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--messages", type=int, default=100_000)
    p.add_argument("--rate", type=int, default=0, help="paced run: msgs/s (default: half the flat-out rate)")
    p.add_argument("--paced-s", type=float, default=10.0)
    p.add_argument("--instruments", type=int, default=1, help="instruments in the soak run")
    p.add_argument("--soak-s", type=float, default=0.0, help="soak run length (e.g. 600 with --instruments 100)")
    p.add_argument("--soak-rate", type=int, default=5_000)
    p.add_argument("--mixed", type=int_list, default=[10, 100, 300],
                   help="instrument counts of the mixed load (comma-separated; empty string: skip it)")
    p.add_argument("--mixed-s", type=float, default=5.0, help="mixed load: seconds of market ticks per size")
    p.add_argument("--mixed-floor-s", type=float, default=0.0,
                   help="seconds of the bare client's run on the mixed load (default: --mixed-s); e.g. a 600 s soak "
                        "of the mixed load against a 10 s floor")
    p.add_argument("--sync-interval-ms", type=int, default=None, help="journal.sync_interval_ms (0: every batch)")
    p.add_argument("--cursor-interval-ms", type=int, default=None,
                   help="journal.cursor_interval_ms (0: every acknowledgement)")
    p.add_argument("--profile", metavar="PATH", default=None,
                   help="cProfile the recorder's process during each mixed run into PATH.<instruments> (pstats)")
    p.add_argument("--json", action="store_true", help="also print the figures as one JSON line")
    p.add_argument("--no-raw", action="store_true", help="do not publish okx.raw")
    p.add_argument("--no-compression", action="store_true", help="no permessage-deflate (ws.compression = false)")
    args = p.parse_args(argv)
    try:
        import uvloop

        return uvloop.run(main_async(args))
    except ImportError:  # pragma: no cover
        return asyncio.run(main_async(args))


if __name__ == "__main__":
    sys.exit(main())
