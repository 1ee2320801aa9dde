"""`make bench-cluster`: cluster mode's timings and its CPU cost (docs/PERFORMANCE.md, "Cluster").

Real `okx-ingest run` processes (dynamic members, docs/CLUSTER.md "Brokers") against the simulator (in this
process, trading all along) and the embedded broker:

* takeover: three replicas split the shards, one is SIGKILLed; from the kill to the survivors being assigned,
  and to the first record of each of the dead replica's streams received by its new owner and seen on the
  trades topic. Once per session timeout given (`--sessions-ms`), `--runs` times each;
* planned move: one replica owns every shard, a second joins; per moved shard, from the start of the rebalance
  (the first replica's revocation) to the first record of the shard's streams published by the new owner (seen
  on the topic; with a make-before-break hand-over, records held back until the cut are published later than
  received, so "seen" stays the figure that counts). Also the overlap with the old owner: its last record
  received minus the new owner's first (> 0: both recorded for that long, duplicates by event key; < 0: a
  window nobody recorded, filled by the backfill);
* CPU: the recorder's parts in this process (bench/pipeline.py), trades flat out, single mode against cluster
  mode as the group's only member (every shard owned), alternating A/B rounds; the ratio of the medians.

Records are timed by a tail of the trades topic in this process (decoded with the schemas, like any consumer):
`received` is the record's own receive timestamp, `seen` when the tail fetched it (an upper bound: fetch wait).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import secrets
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import orjson
from aiokafka import AIOKafkaConsumer, TopicPartition

from bench.pipeline import Feeder, start_recorder, throughput_run
from ingest.core.avro import decode
from ingest.core.cluster import shard_of
from ingest.core.records import TopicKind, Trade, topic_name
from ingest.io.broker import EmbeddedBroker
from ingest.sim import SimConfig, SimServer

INSTS = ("BTC-USDT", "ETH-USDT", "SOL-USDT", "XRP-USDT", "DOGE-USDT", "LTC-USDT", "ADA-USDT", "DOT-USDT",
         "BNB-USDT", "TRX-USDT")
SHARDS = 8
#: Issue 13's targets.
TAKEOVER_TARGET_S = 30.0
MOVE_TARGET_S = 5.0
CPU_TARGET = 1.05

# ---------------------------------------------------------------------------------------------- pure parts


def log_events(lines: Iterable[bytes], name: str) -> list[dict[str, Any]]:
    """The JSON log events called `name` (other lines, partial last lines included, are skipped)."""
    out = []
    for line in lines:
        if line.startswith(b"{"):
            with contextlib.suppress(orjson.JSONDecodeError):
                event = orjson.loads(line)
                if isinstance(event, dict) and event.get("event") == name:
                    out.append(event)
    return out


def event_ns(event: Mapping[str, Any]) -> int:
    """The wall time of a log event from its `ts` (ISO 8601, milliseconds, `Z`), in ns since the epoch."""
    ts = str(event["ts"])
    return int(datetime.fromisoformat(ts.replace("Z", "+00:00")).timestamp() * 1000) * 1_000_000


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


@dataclass(frozen=True, slots=True)
class Seen:
    """One trade record on the topic: its stream, who published it, when it was received and seen."""

    inst: str
    owner: str
    recv_ns: int
    seen_ns: int


def first_by(rows: Iterable[Seen], key: Callable[[Seen], Any | None], since_ns: int) -> dict[Any, Seen]:
    """Per key (None: not counted), the first record received at or after `since_ns` (the earliest `seen` among
    those received first: a topic has several partitions)."""
    out: dict[Any, Seen] = {}
    for r in rows:
        k = key(r)
        if k is None or r.recv_ns < since_ns:
            continue
        best = out.get(k)
        if best is None or (r.recv_ns, r.seen_ns) < (best.recv_ns, best.seen_ns):
            out[k] = r
    return out


def last_by(rows: Iterable[Seen], key: Callable[[Seen], Any | None]) -> dict[Any, Seen]:
    out: dict[Any, Seen] = {}
    for r in rows:
        k = key(r)
        if k is not None and (k not in out or r.recv_ns > out[k].recv_ns):
            out[k] = r
    return out


@dataclass
class Takeover:
    session_ms: int
    assigned_s: float
    #: Per stream of the dead replica: from the kill to its first record received / seen from a survivor.
    received_s: dict[str, float]
    seen_s: dict[str, float]


@dataclass
class Move:
    #: Per moved shard: from the rebalance start to the new owner's first record received / seen.
    received_s: dict[int, float]
    seen_s: dict[int, float]
    #: Per moved shard: the old owner's last record received minus the new owner's first (s).
    overlap_s: dict[int, float]
    join_to_rebalance_s: float
    settled_s: float
    #: Per moved shard: the new owner's hand-over, from its hold starting to `handover_completed` (s).
    handover_s: dict[int, float] = field(default_factory=dict)
    #: Hand-overs that fell back (a gap, backfilled) instead of completing.
    fallbacks: int = 0


def takeover_times(rows: Iterable[Seen], lost: Iterable[str], survivors: Iterable[str], kill_ns: int,
                   ) -> tuple[dict[str, float], dict[str, float]]:
    """Per stream of `lost`: seconds from the kill to its first record from a survivor, received and seen."""
    lost_set, owners = set(lost), set(survivors)
    first = first_by(rows, lambda r: r.inst if r.inst in lost_set and r.owner in owners else None, kill_ns)
    return ({i: (r.recv_ns - kill_ns) / 1e9 for i, r in first.items()},
            {i: (r.seen_ns - kill_ns) / 1e9 for i, r in first.items()})


def move_times(rows: Sequence[Seen], moved: Iterable[int], new: str, old: str, start_ns: int, shards: int,
               ) -> tuple[dict[int, float], dict[int, float], dict[int, float]]:
    """Per moved shard: seconds from `start_ns` to the new owner's first record (received, seen), and the
    overlap (the old owner's last record received minus the new owner's first)."""
    moved_set = set(moved)

    def shard_if(owner: str) -> Callable[[Seen], int | None]:
        def key(r: Seen) -> int | None:
            s = shard_of(r.inst, shards)
            return s if r.owner == owner and s in moved_set else None
        return key

    first = first_by(rows, shard_if(new), start_ns)
    last = last_by(rows, shard_if(old))
    return ({s: (r.recv_ns - start_ns) / 1e9 for s, r in first.items()},
            {s: (r.seen_ns - start_ns) / 1e9 for s, r in first.items()},
            {s: (last[s].recv_ns - r.recv_ns) / 1e9 for s, r in first.items() if s in last})


def cpu_ratio(single: Sequence[float], cluster: Sequence[float]) -> float:
    """Cluster over single CPU per message, as the ratio of the medians of the A/B rounds."""
    return median(cluster) / median(single)


def parse_ms_list(text: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected session timeouts in ms like 6000,10000; got {text!r}") from None
    if any(v < 1000 for v in values):
        raise argparse.ArgumentTypeError(f"session timeouts are at least 1000 ms (cluster.session_timeout_ms); "
                                         f"got {text!r}")
    return values


# ---------------------------------------------------------------------------------------------- replicas


def _config(path: Path, sim: SimServer, bootstrap: str, prefix: str, session_ms: int) -> Path:
    path.write_text(f"""
[okx]
ws_base_url = "{sim.ws_base}"
rest_base_url = "{sim.rest_base}"
instruments = {orjson.dumps(list(INSTS)).decode()}
channels = ["trades-all"]
[ws]
backoff_min_s = 0.01
backoff_max_s = 0.2
healthy_after_s = 0.5
[kafka]
bootstrap_servers = "{bootstrap}"
topic_prefix = "{prefix}"
partitions = 3
enable_idempotence = false
[journal]
dir = "{path.parent / 'journal'}"
[obs]
metrics_port = 0
log_format = "json"
[cluster]
group_id = "{prefix}rec"
shards = {SHARDS}
session_timeout_ms = {session_ms}
heartbeat_interval_ms = {max(100, session_ms // 10)}
static_membership = false
""")
    return path


class Replica:
    """One `okx-ingest run` process in cluster mode, its JSON log in a file."""

    def __init__(self, name: str, config: Path, log: Path) -> None:
        self.name, self.log = name, log
        with log.open("ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "ingest.cli", "run", "--config", str(config)], stdout=out,
                stderr=subprocess.STDOUT,
                env={**os.environ, "PYTHONUNBUFFERED": "1", "OKX_INGEST__CLUSTER__INSTANCE_ID": name})

    def events(self, name: str) -> list[dict[str, Any]]:
        return log_events(self.log.read_bytes().splitlines(), name)

    def assignment(self) -> tuple[int, frozenset[int]]:
        assigned = self.events("cluster_assigned")
        return (int(assigned[-1]["generation"]), frozenset(assigned[-1]["shards"])) if assigned else (-1, frozenset())

    def rebalancing(self) -> bool:
        for line in reversed(self.log.read_bytes().splitlines()):
            if b'"cluster_assigned"' in line:
                return False
            if b'"cluster_rebalance"' in line:
                return True
        return False

    def tail(self) -> str:
        return f"--- {self.name}\n" + self.log.read_text(errors="replace")[-2500:]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)


@contextlib.contextmanager
def replicas() -> Iterator[list[Replica]]:
    """The replicas started inside, stopped at the end whatever happened."""
    reps: list[Replica] = []
    try:
        yield reps
    finally:
        for r in reps:
            if r.proc.poll() is None:
                r.proc.terminate()
        for r in reps:
            r.stop()


class BenchTimeout(Exception):
    pass


async def until(predicate: Callable[[], bool], reps: Sequence[Replica], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise BenchTimeout(f"timed out waiting for {what}\n" + "\n".join(r.tail() for r in reps))
        await asyncio.sleep(0.05)  # polling other processes (their logs) and the simulator


def holders(sim: SimServer) -> Counter[str]:
    out: Counter[str] = Counter()
    for c in sim.hub.conns.values():
        if not c.closing:
            for s in c.subs:
                if s.channel == "trades-all" and s.inst_id:
                    out[s.inst_id] += 1
    return out


def settled(reps: Sequence[Replica], sim: SimServer) -> bool:
    """One generation, every shard owned once, nobody rebalancing, every stream subscribed once."""
    owned = [r.assignment() for r in reps]
    return (all(s for _, s in owned) and sorted(x for _, s in owned for x in s) == list(range(SHARDS))
            and len({g for g, _ in owned}) == 1 and not any(r.rebalancing() for r in reps)
            and holders(sim) == Counter(dict.fromkeys(INSTS, 1)))


@contextlib.asynccontextmanager
async def trading(sim: SimServer) -> AsyncIterator[None]:
    """The market trades all along (a paced loop of ticks)."""
    async def loop() -> None:
        while True:
            await sim.tick(1)
            await asyncio.sleep(0.05)  # pacing the market

    task = asyncio.create_task(loop())
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


class TradesTail:
    """Every trade record of the topic as it arrives: stream, `owner` header, receive time, time seen here."""

    def __init__(self, bootstrap: str, prefix: str) -> None:
        self.topic = topic_name(prefix, TopicKind.TRADES)
        self.bootstrap = bootstrap
        self.rows: list[Seen] = []
        self._task: asyncio.Task[None] | None = None
        self._ready = asyncio.Event()

    async def __aenter__(self) -> TradesTail:
        self._task = asyncio.create_task(self._run())
        ready = asyncio.create_task(self._ready.wait())
        await asyncio.wait({ready, self._task}, timeout=60, return_when=asyncio.FIRST_COMPLETED)
        if not ready.done():
            ready.cancel()
            if self._task.done():
                self._task.result()
            raise BenchTimeout(f"the tail of {self.topic} did not start")
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _run(self) -> None:
        consumer = AIOKafkaConsumer(bootstrap_servers=self.bootstrap, enable_auto_commit=False, group_id=None,
                                    fetch_max_wait_ms=20)
        await consumer.start()
        try:
            partitions = consumer.partitions_for_topic(self.topic)
            while not partitions:
                await consumer._client.force_metadata_update()  # created by the replicas at their start
                partitions = consumer.partitions_for_topic(self.topic)
                await asyncio.sleep(0.1)  # polling the broker's metadata
            tps = [TopicPartition(self.topic, p) for p in sorted(partitions)]
            consumer.assign(tps)
            await consumer.seek_to_beginning(*tps)
            self._ready.set()
            while True:
                batch = await consumer.getmany(*tps, timeout_ms=100)
                now = time.time_ns()
                for msgs in batch.values():
                    for m in msgs:
                        rec = decode(m.value)
                        if isinstance(rec, Trade):
                            owner = dict(m.headers).get("owner", b"").decode()
                            self.rows.append(Seen(rec.inst_id, owner, rec.recv_ts_ns, now))
        finally:
            await consumer.stop()


def _sim() -> SimServer:
    return SimServer(SimConfig(instruments=INSTS, seed=5, api_key=secrets.token_hex(16),
                               api_secret=secrets.token_hex(32), passphrase=secrets.token_hex(8), auto_tick_s=None),
                     host="127.0.0.1", port=0)


# ---------------------------------------------------------------------------------------------- scenarios


async def takeover_run(bootstrap: str, session_ms: int, tmp: Path) -> Takeover:
    prefix = f"cb{secrets.token_hex(3)}."
    async with _sim() as sim:
        config = _config(tmp / "okx-ingest.toml", sim, bootstrap, prefix, session_ms)
        with replicas() as reps:
            reps += [Replica(f"rec-{i}", config, tmp / f"rec-{i}.log") for i in range(3)]
            await until(lambda: settled(reps, sim), reps, 240, "three replicas splitting the shards")
            async with trading(sim), TradesTail(bootstrap, prefix) as tail:
                victim = max(reps, key=lambda r: len(r.assignment()[1]))
                lost = [i for i in INSTS if shard_of(i, SHARDS) in victim.assignment()[1]]
                survivors = [r for r in reps if r is not victim]
                await until(lambda: {r.inst for r in tail.rows if r.owner == victim.name} >= set(lost), reps, 60,
                            "the victim's streams on the topic")
                kill_ns = time.time_ns()
                victim.proc.send_signal(signal.SIGKILL)
                victim.proc.wait(10)
                await until(lambda: sum(len(r.assignment()[1]) for r in survivors) == SHARDS
                            and len({r.assignment()[0] for r in survivors}) == 1, survivors, 120,
                            "the survivors to be assigned every shard")
                assigned_ns = max(event_ns(r.events("cluster_assigned")[-1]) for r in survivors)
                names = [r.name for r in survivors]
                await until(lambda: len(takeover_times(tail.rows, lost, names, kill_ns)[1]) == len(lost),
                            survivors, 120, "the dead replica's streams recorded again")
                received, seen = takeover_times(tail.rows, lost, names, kill_ns)
    return Takeover(session_ms, (assigned_ns - kill_ns) / 1e9, received, seen)


async def move_run(bootstrap: str, session_ms: int, tmp: Path) -> Move:
    prefix = f"cb{secrets.token_hex(3)}."
    with_streams = {shard_of(i, SHARDS) for i in INSTS}
    async with _sim() as sim:
        config = _config(tmp / "okx-ingest.toml", sim, bootstrap, prefix, session_ms)
        with replicas() as reps:
            reps.append(Replica("rec-0", config, tmp / "rec-0.log"))
            await until(lambda: settled(reps, sim), reps, 240, "one replica owning every shard")
            async with trading(sim), TradesTail(bootstrap, prefix) as tail:
                old = reps[0]
                await until(lambda: {r.inst for r in tail.rows if r.owner == old.name} == set(INSTS), reps, 60,
                            "every stream on the topic")
                rebalances = len(old.events("cluster_rebalance"))
                join_ns = time.time_ns()
                new = Replica("rec-1", config, tmp / "rec-1.log")
                reps.append(new)
                await until(lambda: settled(reps, sim), reps, 240, "two replicas splitting the shards")
                settled_ns = time.time_ns()
                start_ns = event_ns(old.events("cluster_rebalance")[rebalances])
                moved = sorted(new.assignment()[1] & with_streams)
                await until(lambda: len(move_times(tail.rows, moved, new.name, old.name, start_ns, SHARDS)[1])
                            == len(moved), reps, 120, "the moved shards recorded by the new owner")
                received, seen, overlap = move_times(tail.rows, moved, new.name, old.name, start_ns, SHARDS)

                def ended() -> list[dict[str, Any]]:
                    return [e for e in new.events("handover_completed") + new.events("handover_fallback")
                            if e.get("shard") in moved]

                await until(lambda: len(ended()) >= len(moved), reps, 60, "the moved shards' hand-overs ended")
                handover = {int(e["shard"]): float(e["seconds"]) for e in new.events("handover_completed")
                            if e.get("shard") in moved}
                fallbacks = sum(1 for e in new.events("handover_fallback") if e.get("shard") in moved)
    return Move(received, seen, overlap, (start_ns - join_ns) / 1e9, (settled_ns - start_ns) / 1e9, handover,
                fallbacks)


@dataclass
class CpuAB:
    single_us: list[float] = field(default_factory=list)
    cluster_us: list[float] = field(default_factory=list)


async def cpu_ab(bootstrap: str, rounds: int, messages: int) -> CpuAB:
    """Alternating A/B rounds (single, cluster; then cluster, single; ...), a fresh recorder each time on its own
    instrument, so neither is warmer than the other and nothing idle runs beside the measured one."""
    insts = [f"CB{i}-USDT" for i in range(2 * rounds)]
    feeder = Feeder(insts)
    out = CpuAB()
    try:
        with tempfile.TemporaryDirectory(prefix="okx-cluster-bench-") as tmp:
            turn = 0
            for r in range(rounds):
                for cluster in ((False, True) if r % 2 == 0 else (True, False)):
                    inst = insts[turn]
                    group = f"cbcpu{secrets.token_hex(3)}" if cluster else None
                    rec = await start_recorder(feeder.ws_base, bootstrap, [inst], Path(tmp) / str(turn), True, True,
                                               cluster_group=group)
                    turn += 1
                    try:
                        await throughput_run(rec, feeder, inst, min(5_000, messages))  # warm-up
                        thr = await throughput_run(rec, feeder, inst, messages)
                    finally:
                        await rec.close()
                    (out.cluster_us if cluster else out.single_us).append(thr["cpu_us_per_msg"])
                    print(f"  cpu round {r + 1}: {'cluster' if cluster else 'single '} "
                          f"{thr['cpu_us_per_msg']:.1f} us/msg, {thr['msgs_s']:,.0f} msgs/s", flush=True)
    finally:
        feeder.stop()
    return out


# ---------------------------------------------------------------------------------------------- report


def load_avg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "?"


def report(args: argparse.Namespace, takeovers: Sequence[Takeover], moves: Sequence[Move], cpu: CpuAB | None,
           load_start: str) -> dict[str, Any]:
    print(f"\nokx-ingest cluster benchmark ({os.cpu_count()} cores, load {load_start} -> {load_avg()}, "
          f"{SHARDS} shards, {len(INSTS)} instruments trades-all, embedded broker, Python {sys.version.split()[0]})")
    summary: dict[str, Any] = {}
    for session_ms in sorted({t.session_ms for t in takeovers}):
        runs = [t for t in takeovers if t.session_ms == session_ms]
        assigned = [t.assigned_s for t in runs]
        received = [max(t.received_s.values()) for t in runs]
        seen = [max(t.seen_s.values()) for t in runs]
        verdict = "meets" if median(seen) <= TAKEOVER_TARGET_S else "misses"
        print(f"\ntakeover after SIGKILL, session {session_ms / 1000:.0f} s, median of {len(runs)} "
              f"(every run: {', '.join(f'{s:.1f}' for s in seen)} s):")
        print(f"  kill -> survivors assigned                      {median(assigned):6.1f} s")
        print(f"  kill -> last moved stream received by new owner {median(received):6.1f} s")
        print(f"  kill -> last moved stream seen on the topic     {median(seen):6.1f} s   "
              f"({verdict} the {TAKEOVER_TARGET_S:.0f} s target)")
        summary[f"takeover_{session_ms}"] = {"assigned_s": median(assigned), "received_s": median(received),
                                             "seen_s": median(seen), "runs": [t.__dict__ for t in runs]}
    if moves:
        per_shard_seen = [v for m in moves for v in m.seen_s.values()]
        per_shard_recv = [v for m in moves for v in m.received_s.values()]
        overlap = [v for m in moves for v in m.overlap_s.values()]
        worst = [max(m.seen_s.values()) for m in moves]
        handovers = [v for m in moves for v in m.handover_s.values()]
        fallbacks = sum(m.fallbacks for m in moves)
        verdict = "meets" if handovers and max(handovers) <= MOVE_TARGET_S and not fallbacks else "misses"
        print(f"\nplanned move, scale 1 -> 2 (session {args.move_session_ms / 1000:.0f} s), {len(moves)} runs, "
              f"{len(per_shard_seen)} moved shards:")
        join = median([m.join_to_rebalance_s for m in moves])
        print(f"  join -> rebalance start (old owner revoked)     {join:6.1f} s")
        print(f"  rebalance -> settled (one generation, streams)  {median([m.settled_s for m in moves]):6.1f} s")
        print(f"  hand-over per shard (new owner's hold -> completed): median {median(handovers):.2f} s, max "
              f"{max(handovers, default=float('nan')):.2f} s, {fallbacks} fallback(s) "
              f"({verdict} the {MOVE_TARGET_S:.0f} s per shard target)")
        print(f"  rebalance -> new owner's first record, per shard: received median {median(per_shard_recv):.1f} s, "
              f"seen median {median(per_shard_seen):.1f} s, max {max(per_shard_seen):.1f} s "
              f"(includes the broker's join rounds)")
        print(f"  worst shard per run (seen): {', '.join(f'{w:.1f}' for w in worst)} s")
        print(f"  old owner's last record - new owner's first (overlap), per shard: median {median(overlap):+.2f} s, "
              f"min {min(overlap, default=float('nan')):+.2f}, max {max(overlap, default=float('nan')):+.2f}")
        summary["move"] = {"handover_s": median(handovers), "handover_max_s": max(handovers, default=None),
                           "fallbacks": fallbacks, "received_s": median(per_shard_recv),
                           "seen_s": median(per_shard_seen),
                           "seen_max_s": max(per_shard_seen), "overlap_s": median(overlap),
                           "runs": [m.__dict__ for m in moves]}
    if cpu is not None:
        ratio = cpu_ratio(cpu.single_us, cpu.cluster_us)
        pairs = [c / s for s, c in zip(cpu.single_us, cpu.cluster_us, strict=True)]
        verdict = "meets" if ratio <= CPU_TARGET else "misses"
        print(f"\nrecorder CPU per message, trades-all flat out ({args.messages:,} per run), "
              f"{len(cpu.single_us)} A/B rounds:")
        print(f"  single mode                                     {median(cpu.single_us):6.1f} us "
              f"({', '.join(f'{v:.1f}' for v in cpu.single_us)})")
        print(f"  cluster mode, one replica owning every shard    {median(cpu.cluster_us):6.1f} us "
              f"({', '.join(f'{v:.1f}' for v in cpu.cluster_us)})")
        print(f"  cluster / single                                {ratio:6.3f}    (rounds: "
              f"{', '.join(f'{p:.3f}' for p in pairs)}; {verdict} the {CPU_TARGET:.2f} target)")
        summary["cpu"] = {"single_us": cpu.single_us, "cluster_us": cpu.cluster_us, "ratio": ratio}
    return summary


async def main_async(args: argparse.Namespace) -> int:
    load_start = load_avg()
    broker = EmbeddedBroker()
    await broker.start()
    takeovers: list[Takeover] = []
    moves: list[Move] = []
    cpu = None
    try:
        if "cpu" not in args.skip:
            cpu = await cpu_ab(broker.bootstrap_servers, args.cpu_rounds, args.messages)
        if "move" not in args.skip:
            for i in range(args.runs):
                with tempfile.TemporaryDirectory(prefix="okx-cluster-bench-") as tmp:
                    moves.append(m := await move_run(broker.bootstrap_servers, args.move_session_ms, Path(tmp)))
                print(f"  move {i + 1}: per shard seen {', '.join(f'{s}:{v:.1f}' for s, v in sorted(m.seen_s.items()))}"
                      f" s", flush=True)
        if "takeover" not in args.skip:
            for session_ms in args.sessions_ms:
                for i in range(args.runs):
                    with tempfile.TemporaryDirectory(prefix="okx-cluster-bench-") as tmp:
                        takeovers.append(t := await takeover_run(broker.bootstrap_servers, session_ms, Path(tmp)))
                    print(f"  takeover {session_ms} ms, run {i + 1}: assigned {t.assigned_s:.1f} s, last stream "
                          f"seen {max(t.seen_s.values()):.1f} s", flush=True)
    finally:
        await broker.stop()
    summary = report(args, takeovers, moves, cpu, load_start)
    if args.json:
        print("JSON " + orjson.dumps(summary).decode())
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="make bench-cluster", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=int, default=3, help="runs of each takeover and of the planned move (median)")
    p.add_argument("--sessions-ms", type=parse_ms_list, default=[6000, 10000],
                   help="cluster.session_timeout_ms of the takeover runs (comma-separated)")
    p.add_argument("--move-session-ms", type=int, default=10000, help="cluster.session_timeout_ms of the move")
    p.add_argument("--cpu-rounds", type=int, default=3, help="A/B rounds of the CPU comparison")
    p.add_argument("--messages", type=int, default=50_000, help="trades-all frames per CPU run")
    p.add_argument("--skip", default="", help="comma-separated parts to leave out: cpu, move, takeover")
    p.add_argument("--json", action="store_true", help="also print the figures as one JSON line")
    args = p.parse_args(argv)
    args.skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    unknown = args.skip - {"cpu", "move", "takeover"}
    if unknown:
        p.error(f"--skip: unknown part(s) {sorted(unknown)}; use cpu, move, takeover")
    if args.runs < 1 or args.cpu_rounds < 1:
        p.error("--runs and --cpu-rounds must be at least 1")
    try:
        try:
            import uvloop
        except ImportError:  # pragma: no cover
            return asyncio.run(main_async(args))
        return uvloop.run(main_async(args))
    except BenchTimeout as exc:
        print(f"cluster bench: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
