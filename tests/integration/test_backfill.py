"""The backfill worker against the OKX simulator and a real Kafka-protocol broker.

What users buy: after the recorder loses a stretch of a stream, the topic ends up with every tradeId the
exchange produced, each exactly once; a flood of gaps never breaks an OKX rate limit (the simulator counts
every violation); workers share the gaps through a consumer group; a worker killed mid-gap loses nothing and
its successor publishes nothing twice; what cannot be filled is said so, once, and never retried.

Timings: REST windows are scaled down on both sides (`rate_window_scale` / `LimitTable(window_scale=...)`)
where a test needs many requests; group timings are short (a dead member is noticed after 3 s).
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import os
import random
import secrets
import signal
import socket
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

from aiokafka import AIOKafkaProducer
from aiokafka.partitioner import murmur2

from ingest.config import JournalSettings, Settings, load_settings
from ingest.core.avro import RecordEncoder
from ingest.core.backfill import FILLS_PATH, TRADES_PATH, covered_trade_ids
from ingest.core.clock import ServerClock
from ingest.core.records import (
    BookUpdate,
    Candle,
    Fill,
    FundingRate,
    GapEvent,
    GapKind,
    GapStatus,
    Order,
    Record,
    Source,
    StreamPosition,
    TopicKind,
    Trade,
)
from ingest.core.rest_limits import LimitTable
from ingest.credentials import CredentialStore
from ingest.io.broker import EmbeddedBroker
from ingest.io.journal import Journal
from ingest.io.rest import LimiterRegistry, OkxRestClient
from ingest.io.sink import EncodedRecord
from ingest.okx.channels import SubArg
from ingest.services.backfill import BackfillStats, BackfillWorker, backfill_range, discard_backlog
from ingest.sim import SimConfig, SimServer
from tests.conftest import BrokerInfo
from tests.e2e.harness import TopicReader, daemon_settings, running

SCALE = 0.05  # OKX's 2 s windows become 100 ms, in the simulator and in the client alike
WAIT_S = 60.0  # upper bound for any awaited condition: a hang fails the test instead of blocking the run
GROUP = {"session_timeout_ms": 3000, "heartbeat_interval_ms": 300, "poll_timeout_ms": 200}
MAIN = Path(__file__).resolve().parents[2]
T = TypeVar("T")
PAUSED_REST_TIMEOUT_S = 5 * WAIT_S  # a paused worker's REST timeout: longer than all of the test's waits together


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def sim_config(**overrides: Any) -> SimConfig:
    base: dict[str, Any] = {"api_key": secrets.token_hex(16), "api_secret": secrets.token_hex(32),
                            "passphrase": secrets.token_hex(8), "auto_tick_s": None, "rate_window_scale": SCALE}
    base.update(overrides)
    return SimConfig(**base)


def worker_settings(sim: SimServer, broker: BrokerInfo, prefix: str, journal: Path, **backfill: Any) -> Settings:
    return load_settings(
        None,
        okx={"rest_base_url": sim.rest_base},
        kafka={"bootstrap_servers": broker.bootstrap_servers, "topic_prefix": prefix, "partitions": 4,
               "enable_idempotence": False, "request_timeout_ms": 5000, "delivery_timeout_ms": 15000},
        journal={"dir": str(journal)},
        backfill={"group_id": f"{prefix}backfill", **GROUP, **backfill},
        obs={"metrics_port": 0, "log_format": "text"},
    )


def rest_for(sim: SimServer, *, credentials: bool = False, scale: float = SCALE) -> OkxRestClient:
    store = None
    if credentials:
        c = sim.config
        store = CredentialStore({"OKX_API_KEY": c.api_key, "OKX_API_SECRET": c.api_secret,
                                 "OKX_API_PASSPHRASE": c.passphrase})
    return OkxRestClient(clock=ServerClock(now_ms), credentials=store, base_url=sim.rest_base,
                         limits=LimitTable(window_scale=scale), registry=LimiterRegistry(), max_attempts=4,
                         retry_initial_s=0.01, retry_max_s=0.05, timeout_s=5.0)


@dataclass
class RunningWorker:
    worker: BackfillWorker
    task: asyncio.Task[None]
    stop: asyncio.Event

    async def until(self, predicate: Callable[[BackfillStats], bool], timeout_s: float = WAIT_S) -> BackfillStats:
        """Wait for `predicate(stats)`, failing at once if the worker died."""
        waiter = asyncio.create_task(self.worker.wait_for(predicate, timeout_s))
        await asyncio.wait({waiter, self.task}, return_when=asyncio.FIRST_COMPLETED)
        if not waiter.done():
            waiter.cancel()
            raise AssertionError(f"the worker stopped: {self.task.exception()!r}")
        waiter.result()
        return self.worker.stats()


async def until_both(a: RunningWorker, b: RunningWorker,
                     predicate: Callable[[BackfillStats, BackfillStats], bool]) -> None:
    """Wait for a condition on two workers, re-checked whenever either of them changes state."""
    def holds(_: BackfillStats) -> bool:
        return predicate(a.worker.stats(), b.worker.stats())

    waiters = {asyncio.create_task(w.worker.wait_for(holds, WAIT_S)) for w in (a, b)}
    done, _ = await asyncio.wait({*waiters, a.task, b.task}, return_when=asyncio.FIRST_COMPLETED)
    for waiter in waiters:
        waiter.cancel()
    if a.task in done or b.task in done:
        raise AssertionError("a worker stopped")
    for waiter in done:
        waiter.result()


class ChildLog:
    """A child process's output, read as it comes: a test waits for a line instead of polling a file."""

    def __init__(self, stream: asyncio.StreamReader) -> None:
        self._lines: list[bytes] = []
        self._changed = asyncio.Condition()
        self._eof = False
        self._reader = asyncio.create_task(self._read(stream), name="child-log")

    async def _read(self, stream: asyncio.StreamReader) -> None:
        while line := await stream.readline():
            async with self._changed:
                self._lines.append(line)
                self._changed.notify_all()
        async with self._changed:
            self._eof = True
            self._changed.notify_all()

    def text(self) -> bytes:
        return b"".join(self._lines)

    def tail(self) -> str:
        return self.text()[-3000:].decode(errors="replace")

    async def wait_for(self, marker: bytes, timeout_s: float) -> None:
        """Return once a line contains `marker`; fail if the child's output ends first or after `timeout_s`."""
        try:
            async with asyncio.timeout(timeout_s), self._changed:
                await self._changed.wait_for(lambda: self._eof or marker in self.text())
        except TimeoutError:
            raise AssertionError(f"no {marker!r} after {timeout_s} s:\n{self.tail()}") from None
        assert marker in self.text(), f"the child stopped before {marker!r}:\n{self.tail()}"

    async def unless_it_ends(self, awaitable: Awaitable[T]) -> T:
        """`awaitable`'s result; fails at once, with the child's output, if the child's output ends first (the
        child died: waiting on for what it would have done only hides why)."""
        task = asyncio.ensure_future(awaitable)
        await asyncio.wait({task, self._reader}, return_when=asyncio.FIRST_COMPLETED)
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            raise AssertionError(f"the child ended:\n{self.tail()}")
        return task.result()

    async def close(self) -> None:
        async with asyncio.timeout(WAIT_S):
            await self._reader


@contextlib.asynccontextmanager
async def running_worker(settings: Settings, rest: OkxRestClient, name: str = "w") -> AsyncIterator[RunningWorker]:
    worker = BackfillWorker(settings, rest, name=name)
    stop = asyncio.Event()
    run = RunningWorker(worker, asyncio.create_task(worker.run(stop), name=name), stop)
    try:
        yield run
    finally:
        stop.set()
        await asyncio.wait_for(run.task, 30)
        await rest.aclose()


async def publish(bootstrap: str, prefix: str, records: Iterable[Record]) -> None:
    """Produce records exactly as the recorder would (same encoding, key, headers, timestamp)."""
    encoder = RecordEncoder(prefix)
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all")
    await producer.start()
    try:
        for record in records:
            e = encoder.encode(record)
            await producer.send(e.topic, e.value, key=e.key, headers=list(e.headers), timestamp_ms=e.ts_ms)
        await producer.flush()
    finally:
        await producer.stop()


def trade_gap(gap_id: str, inst: str, lo: tuple[int, int], hi: tuple[int, int], channel: str = "trades-all",
              **kw: Any) -> GapEvent:
    """A gap as the recorder's tracker makes it: last good (tradeId, ts) before, first good after."""
    t = now_ms() * 1_000_000
    return GapEvent(gap_id=gap_id, kind=GapKind.TRADE_HOLE, status=GapStatus.OPEN, reason="test", channel=channel,
                    inst_id=inst, before=StreamPosition(ts=lo[1], trade_id=lo[0]),
                    after=StreamPosition(ts=hi[1], trade_id=hi[0]), opened_ts_ns=t, detected_ts_ns=t, **kw)


def time_gap(gap_id: str, channel: str, *, inst: str | None = None, inst_type: str | None = None,
             lo_ms: int, hi_ms: int) -> GapEvent:
    t = now_ms() * 1_000_000
    return GapEvent(gap_id=gap_id, kind=GapKind.DISCONNECT, status=GapStatus.OPEN, reason="test", channel=channel,
                    inst_id=inst, inst_type=inst_type, before=StreamPosition(ts=lo_ms), after=StreamPosition(ts=hi_ms),
                    opened_ts_ns=t, detected_ts_ns=t)


def log_of(sim: SimServer, inst: str) -> list[tuple[int, int]]:
    return [(int(r.trade_id), int(r.ts)) for r in sim.market.trades(inst)]


def coverage(trades: Iterable[Trade]) -> Counter[int]:
    """How often each tradeId is covered (an aggregated `trades` record covers count ids)."""
    out: Counter[int] = Counter()
    for t in trades:
        out.update(covered_trade_ids(int(t.trade_id), int(t.count) if t.count else None))
    return out


def updates_by_gap(gaps: Sequence[GapEvent]) -> dict[str, list[GapEvent]]:
    out: dict[str, list[GapEvent]] = {}
    for g in gaps:
        if g.status is not GapStatus.OPEN:
            out.setdefault(g.gap_id, []).append(g)
    return out


# ------------------------------------------------------------------------------------------ end to end


async def test_a_dropped_connection_is_backfilled_so_the_topic_holds_every_trade_id_exactly_once(
    kafka_broker: BrokerInfo, topic_prefix: str, tmp_path: Path
) -> None:
    insts = ("BTC-USDT", "ETH-USDT")
    channels = ("trades-all", "trades")  # one id per record, and aggregated records covering `count` ids
    async with SimServer(sim_config(instruments=insts, seed=7)) as sim:
        subs = [{"channel": c, "inst_id": i} for c in channels for i in insts]
        settings = daemon_settings(sim, kafka_broker.bootstrap_servers, topic_prefix, tmp_path / "daemon",
                                   okx={"channels": [], "subscriptions": subs})
        async with running(settings) as daemon:
            for c in channels:
                for i in insts:
                    await sim.wait_subscribed(SubArg(c, i), timeout=20)
            await sim.tick(15)
            sim.faults.reject_connects(count=1_000_000)  # keep the daemon out while the market moves on
            sim.faults.drop(kind="abort")
            await sim.wait_until(lambda: not sim.connections(), timeout=10)
            await sim.tick(30)
            sim.faults.clear()
            for c in channels:
                for i in insts:
                    await sim.wait_subscribed(SubArg(c, i), timeout=20)
            await sim.tick(15)
            assert await daemon.shutdown() == 0
        expected = {i: [tid for tid, _ in log_of(sim, i)] for i in insts}

        reader = TopicReader(kafka_broker.bootstrap_servers, topic_prefix)
        opened = [g for g in await reader.records(TopicKind.GAPS, GapEvent, at_least=4) if g.status is GapStatus.OPEN]
        assert {(g.channel, g.inst_id) for g in opened} == {(c, i) for c in channels for i in insts}
        async with running_worker(worker_settings(sim, kafka_broker, topic_prefix, tmp_path / "w"),
                                  rest_for(sim)) as w:
            stats = await w.until(lambda s: s.gaps_done >= len(opened))
        assert sim.stats.violations == 0

    assert stats.gaps_filled == len(opened) and stats.records_total > 0
    trades = await reader.records(TopicKind.TRADES, Trade)
    for channel in channels:
        for inst in insts:
            stream = [t for t in trades if t.channel == channel and t.inst_id == inst]
            covered = coverage(stream)
            assert sorted(covered) == expected[inst], f"{channel} {inst}: a tradeId is missing or foreign"
            assert set(covered.values()) == {1}, f"{channel} {inst}: a tradeId is in the topic twice"
            rest = [t for t in stream if t.source is Source.REST]
            assert rest and all(t.record_id == f"rest:{channel}:{inst}:{t.trade_id}" for t in rest)
    updates = updates_by_gap(await reader.records(TopicKind.GAPS, GapEvent))
    for g in opened:
        (update,) = updates[g.gap_id]
        assert (update.status, update.revision, update.attempts) == (GapStatus.FILLED, 1, 1)
        assert g.before is not None and g.after is not None and g.before.trade_id and g.after.trade_id
        inside = sum(1 for tid in expected[g.inst_id or ""] if g.before.trade_id < tid < g.after.trade_id)
        assert update.records_filled == inside > 0


async def test_a_storm_of_1000_gaps_never_exceeds_a_rate_limit_and_every_gap_is_finished_once(
    kafka_broker: BrokerInfo, topic_prefix: str, tmp_path: Path
) -> None:
    insts = ("BTC-USDT", "ETH-USDT", "BTC-USDT-SWAP")
    start = now_ms() - 4 * 3_600_000
    async with SimServer(sim_config(instruments=insts, start_ms=start, tick_ms=60_000)) as sim:
        await sim.tick(200)  # 200 one-minute bars of market history
        for inst in insts:
            await sim.pump_trades(inst, 2000)
        logs = {i: log_of(sim, i) for i in insts}
        rng = random.Random(11)
        gaps: list[GapEvent] = []
        windows: dict[str, list[tuple[int, int]]] = {i: [] for i in insts}
        candle_windows: dict[str, list[tuple[int, int]]] = {i: [] for i in insts}
        for n in range(1000):
            inst = rng.choice(insts)
            if n % 20 == 0:
                gaps.append(time_gap(f"storm-{n}", rng.choice(["books", "books5"]), inst=inst, lo_ms=start,
                                     hi_ms=start + 60_000))
            elif n % 20 == 1:  # candle positions are bar open times
                lo = (start // 60_000 + rng.randrange(10, 150)) * 60_000
                hi = lo + 60_000 * rng.randrange(1, 40)
                candle_windows[inst].append((lo, hi))
                gaps.append(time_gap(f"storm-{n}", "candle1m", inst=inst, lo_ms=lo, hi_ms=hi))
            else:
                log = logs[inst]
                a = rng.randrange(len(log) - 3)
                b = min(len(log) - 1, a + rng.randrange(2, 60))
                windows[inst].append((log[a][0], log[b][0]))
                gaps.append(trade_gap(f"storm-{n}", inst, log[a], log[b]))
        duplicates = rng.sample(gaps, 20)  # at-least-once delivery of gap events
        await publish(kafka_broker.bootstrap_servers, topic_prefix, [*gaps, *duplicates])

        settings = worker_settings(sim, kafka_broker, topic_prefix, tmp_path, batch_max_gaps=250, concurrency=6)
        async with running_worker(settings, rest_for(sim)) as w:
            stats = await w.until(lambda s: s.gaps_done >= 1000)
        assert sim.stats.violations == 0, f"rate limits exceeded: {dict(sim.stats.rest_violations)}"

    assert stats.gaps_done == 1000 and stats.gaps_duplicate == 20 and stats.gaps_failed == 0
    assert stats.requests[(TRADES_PATH, "0")] < 300  # 900 trade gaps, coalesced into a few walks
    reader = TopicReader(kafka_broker.bootstrap_servers, topic_prefix)
    updates = updates_by_gap(await reader.records(TopicKind.GAPS, GapEvent, at_least=2020))
    assert sorted(updates) == sorted(g.gap_id for g in gaps)
    assert all(len(u) == 1 and u[0].revision == 1 for u in updates.values())
    trades = await reader.records(TopicKind.TRADES, Trade)
    for inst in insts:
        covered = coverage(t for t in trades if t.inst_id == inst)
        wanted = {tid for tid, _ in logs[inst] if any(lo < tid < hi for lo, hi in windows[inst])}
        assert set(covered) == wanted and set(covered.values()) == {1}
    candles = [c for c in await reader.records(TopicKind.CANDLES, Candle) if c.channel == "candle1m"]
    for inst in insts:
        opens = Counter(c.ts for c in candles if c.inst_id == inst)
        assert set(opens.values()) <= {1} and all(c.confirm for c in candles)
        wanted_opens = {t for lo, hi in candle_windows[inst] for t in range(lo, hi, 60_000)}
        assert set(opens) == wanted_opens
    books = [g for g in gaps if g.channel.startswith("books")]
    assert all(updates[g.gap_id][0].status is GapStatus.PARTIAL for g in books)
    assert await reader.records(TopicKind.BOOKS, BookUpdate, at_least=1)


# ------------------------------------------------------------------------------------------- the group


async def test_two_workers_in_one_group_split_the_gaps_and_each_gap_is_processed_once(
    kafka_broker: BrokerInfo, topic_prefix: str, tmp_path: Path
) -> None:
    insts = ("BTC-USDT", "ETH-USDT", "BTC-USDT-SWAP")
    keys = [f"{c}:{i}" for c in ("trades-all", "trades") for i in insts]
    assert {murmur2(k.encode()) & 0x7FFFFFFF for k in keys}, "precondition"
    assert len({(murmur2(k.encode()) & 0x7FFFFFFF) % 4 for k in keys}) == 4, "keys must cover all 4 partitions"
    async with SimServer(sim_config(instruments=insts)) as sim:
        for inst in insts:
            await sim.pump_trades(inst, 1000)
        logs = {i: log_of(sim, i) for i in insts}
        settings_a = worker_settings(sim, kafka_broker, topic_prefix, tmp_path / "a")
        settings_b = worker_settings(sim, kafka_broker, topic_prefix, tmp_path / "b")
        async with running_worker(settings_a, rest_for(sim), "a") as a, \
                running_worker(settings_b, rest_for(sim), "b") as b:
            await until_both(a, b, lambda sa, sb: sa.partitions > 0 and sb.partitions > 0
                             and sa.partitions + sb.partitions == 4)
            gaps = []
            for n in range(60):
                channel = ("trades-all", "trades")[n % 2]
                inst = insts[n % 3]
                lo = 30 * (n // 6)
                gaps.append(trade_gap(f"g{n}", inst, logs[inst][lo], logs[inst][lo + 20], channel=channel))
            await publish(kafka_broker.bootstrap_servers, topic_prefix, gaps)
            await until_both(a, b, lambda sa, sb: sa.gaps_done + sb.gaps_done >= 60)
            done_a, done_b = a.worker.stats().gaps_done, b.worker.stats().gaps_done
        assert sim.stats.violations == 0

    assert done_a > 0 and done_b > 0 and done_a + done_b == 60
    reader = TopicReader(kafka_broker.bootstrap_servers, topic_prefix)
    updates = updates_by_gap(await reader.records(TopicKind.GAPS, GapEvent, at_least=120))
    assert sorted(updates) == sorted(g.gap_id for g in gaps)
    assert all(len(u) == 1 and u[0].status is GapStatus.FILLED and u[0].records_filled == 19 for u in updates.values())
    trades = await reader.records(TopicKind.TRADES, Trade)
    for channel in ("trades-all", "trades"):
        assert set(coverage(t for t in trades if t.channel == channel).values()) == {1}


async def test_a_worker_killed_mid_gap_loses_nothing_and_its_successor_publishes_nothing_twice(
    kafka_broker: BrokerInfo, topic_prefix: str, tmp_path: Path
) -> None:
    async with SimServer(sim_config(rate_window_scale=1.0)) as sim:
        await sim.pump_trades("BTC-USDT", 3000)
        log = log_of(sim, "BTC-USDT")
        gap = trade_gap("long", "BTC-USDT", log[4], log[-5])
        inside = [tid for tid, _ in log[5:-5]]
        await publish(kafka_broker.bootstrap_servers, topic_prefix, [gap])
        sim.faults.rest_slow(0.05, count=1_000_000, path=TRADES_PATH)  # so the kill lands mid-gap

        env = {k: v for k, v in os.environ.items() if not k.startswith(("OKX_API", "OKX_INGEST"))}
        env.update({
            "OKX_INGEST__OKX__REST_BASE_URL": sim.rest_base,
            "OKX_INGEST__KAFKA__BOOTSTRAP_SERVERS": kafka_broker.bootstrap_servers,
            "OKX_INGEST__KAFKA__TOPIC_PREFIX": topic_prefix,
            "OKX_INGEST__KAFKA__PARTITIONS": "4",
            "OKX_INGEST__KAFKA__ENABLE_IDEMPOTENCE": "false",
            "OKX_INGEST__JOURNAL__DIR": str(tmp_path),
            "OKX_INGEST__BACKFILL__GROUP_ID": f"{topic_prefix}backfill",
            "OKX_INGEST__BACKFILL__SESSION_TIMEOUT_MS": str(GROUP["session_timeout_ms"]),
            "OKX_INGEST__BACKFILL__HEARTBEAT_INTERVAL_MS": str(GROUP["heartbeat_interval_ms"]),
            "OKX_INGEST__BACKFILL__POLL_TIMEOUT_MS": str(GROUP["poll_timeout_ms"]),
            "OKX_INGEST__BACKFILL__METRICS_PORT": "0",  # its default port may be taken by another worker
            "OKX_INGEST__OBS__METRICS_PORT": "0",
            "OKX_INGEST__OBS__LOG_FORMAT": "text",
        })
        log_path = tmp_path / "killed-worker.log"
        with log_path.open("wb") as out:
            child = await asyncio.create_subprocess_exec(sys.executable, "-m", "ingest.cli", "backfill", env=env,
                                                         cwd=MAIN, stdout=out, stderr=out)
        try:
            reader = TopicReader(kafka_broker.bootstrap_servers, topic_prefix)
            published = await reader.records(TopicKind.TRADES, Trade, at_least=300)  # some pages acknowledged
        finally:
            if child.returncode is None:
                child.send_signal(signal.SIGKILL)  # no graceful close: no leave-group, no flush, no commit
            await child.wait()
        assert child.returncode == -signal.SIGKILL, log_path.read_text()[-3000:]
        assert len(published) < len(inside), "the first worker finished before it was killed"
        sim.faults.clear()

        # The successor uses the same journal directory: whatever the killed worker left there is discarded.
        settings = worker_settings(sim, kafka_broker, topic_prefix, tmp_path)
        async with running_worker(settings, rest_for(sim, scale=1.0)) as w:
            stats = await w.until(lambda s: s.gaps_done >= 1)
        assert sim.stats.violations == 0

    assert stats.gaps_filled == 1 and stats.records_already_present >= 300
    trades = await TopicReader(kafka_broker.bootstrap_servers, topic_prefix).records(TopicKind.TRADES, Trade)
    covered = coverage(trades)
    assert sorted(covered) == inside, "a trade of the gap is missing"
    assert set(covered.values()) == {1}, "a trade was published twice"
    (update,) = updates_by_gap(await reader.records(TopicKind.GAPS, GapEvent, at_least=2))["long"]
    assert update.status is GapStatus.FILLED and update.records_filled == len(inside) - stats.records_already_present


async def test_a_restarted_worker_drops_what_its_journal_kept_of_an_uncommitted_batch(tmp_path: Path) -> None:
    """Replaying it could only duplicate: the batch was not committed, so its partition's owner redoes it."""
    settings = JournalSettings(dir=tmp_path, max_bytes=1024 * 1024, segment_bytes=64 * 1024)
    journal = Journal.from_settings(settings)
    await journal.start()
    journal.append([EncodedRecord("t.trades", b"BTC-USDT", b"v%d" % i) for i in range(3)])
    await journal.sync()
    await journal.close()  # as a SIGKILL leaves it: journaled, never acknowledged
    assert discard_backlog(tmp_path, settings) == 3
    assert discard_backlog(tmp_path, settings) == 0


# ------------------------------------------------------------------------------------------ unfillable


async def test_gaps_that_cannot_be_filled_are_marked_unfillable_with_the_reason_once_and_never_retried(
    kafka_broker: BrokerInfo, topic_prefix: str, tmp_path: Path
) -> None:
    async with SimServer(sim_config(max_trades_history=300)) as sim:
        first = sim.market.get("BTC-USDT").next_trade_id + 1
        await sim.pump_trades("BTC-USDT", 1000)  # OKX (here: the simulator) keeps only the newest trades
        await sim.pump_trades("ETH-USDT", 100)
        kept = log_of(sim, "BTC-USDT")
        t = now_ms()
        gaps = [
            trade_gap("trimmed", "BTC-USDT", (first + 5, t), (first + 50, t)),
            trade_gap("half", "BTC-USDT", (first + 5, t), kept[50]),
            trade_gap("ancient", "BTC-USDT", (first + 5, t - 100 * 86_400_000), (first + 50, t - 100 * 86_400_000)),
            time_gap("ticker", "tickers", inst="BTC-USDT", lo_ms=t - 5000, hi_ms=t),
            time_gap("no-perm", "fills", inst_type="SPOT", lo_ms=t - 5000, hi_ms=t),
        ]
        sim.faults.rest_error(count=1, path=FILLS_PATH, status=200, code="50030",
                              msg="No permission to use this API.")
        await publish(kafka_broker.bootstrap_servers, topic_prefix, gaps)
        settings = worker_settings(sim, kafka_broker, topic_prefix, tmp_path)
        async with running_worker(settings, rest_for(sim, credentials=True)) as w:
            stats = await w.until(lambda s: s.gaps_done >= len(gaps))
            btc_requests = sum(1 for r in sim.stats.rest_log if "BTC-USDT" in r.query)
            fills_requests = sim.stats.rest_count(FILLS_PATH)
            eth = log_of(sim, "ETH-USDT")
            later = trade_gap("later", "ETH-USDT", eth[0], eth[9])
            await publish(kafka_broker.bootstrap_servers, topic_prefix, [later])
            stats = await w.until(lambda s: s.gaps_done >= len(gaps) + 1 and s.gaps_ignored >= len(gaps))
            assert sum(1 for r in sim.stats.rest_log if "BTC-USDT" in r.query) == btc_requests
            assert sim.stats.rest_count(FILLS_PATH) == fills_requests == 1

    updates = updates_by_gap(await TopicReader(kafka_broker.bootstrap_servers, topic_prefix).records(
        TopicKind.GAPS, GapEvent, at_least=2 * len(gaps) + 2))
    assert all(len(u) == 1 for u in updates.values())  # decided once, never again
    status = {gid: (u[0].status, u[0].note or "") for gid, u in updates.items()}
    assert status["trimmed"][0] is GapStatus.UNFILLABLE and "no longer kept" in status["trimmed"][1]
    assert status["half"][0] is GapStatus.PARTIAL and "no longer kept" in status["half"][1]
    assert updates["half"][0].records_filled == 50
    assert status["ancient"][0] is GapStatus.UNFILLABLE and "older than OKX keeps" in status["ancient"][1]
    assert status["ticker"][0] is GapStatus.UNFILLABLE and "no history" in status["ticker"][1]
    assert status["no-perm"][0] is GapStatus.UNFILLABLE and "50030" in status["no-perm"][1]
    assert status["later"][0] is GapStatus.FILLED
    assert stats.gaps_unfillable == 4 and stats.gaps_partial == 1 and stats.gaps_failed == 0


# ------------------------------------------------------------------------------------- private streams


async def test_private_fills_and_orders_are_backfilled_once_next_to_what_the_stream_recorded(
    kafka_broker: BrokerInfo, topic_prefix: str, tmp_path: Path
) -> None:
    async with SimServer(sim_config()) as sim:
        await sim.tick(5)
        t0 = sim.market.now_ms()
        ord_ids = []
        for n in range(6):
            ord_id = await sim.account.place_order("BTC-USDT", "buy", "0.01", px=str(50_000 + n))
            await sim.account.fill(ord_id, sz="0.005")
            await sim.account.fill(ord_id)
            ord_ids.append(ord_id)
        fills = list(sim.account.fills)
        t1 = max(f.ts for f in fills)  # account events run on the market clock, each 1 ms after the last
        # The recorder got the first fill over the stream before the connection dropped.
        first = fills[0]
        recorded = Fill(channel="fills", inst_id="BTC-USDT", ts=first.ts, recv_ts_ns=time.time_ns(),
                        source=Source.WS, conn_id="c1", recv_seq=1, record_id="c1:1:0", trade_id=first.trade_id,
                        ord_id=first.ord_id, fill_px="1", fill_sz="1", side="buy")
        gaps = [time_gap("fills", "fills", inst_type="SPOT", lo_ms=t0 - 1, hi_ms=t1 + 1),
                time_gap("orders", "orders", inst_type="ANY", lo_ms=t0 - 1, hi_ms=t1 + 1)]
        await publish(kafka_broker.bootstrap_servers, topic_prefix, [recorded, *gaps])
        settings = worker_settings(sim, kafka_broker, topic_prefix, tmp_path)
        async with running_worker(settings, rest_for(sim, credentials=True)) as w:
            stats = await w.until(lambda s: s.gaps_done >= 2)
        assert sim.stats.violations == 0

    assert stats.gaps_filled == 2
    reader = TopicReader(kafka_broker.bootstrap_servers, topic_prefix)
    got_fills = await reader.records(TopicKind.FILLS, Fill, at_least=len(fills))
    assert Counter((f.ord_id, f.trade_id) for f in got_fills) == Counter((f.ord_id, f.trade_id) for f in fills)
    assert {f.bill_id for f in got_fills if f.source is Source.REST} == {f.bill_id for f in fills[1:]}
    orders = await reader.records(TopicKind.ORDERS, Order, at_least=len(ord_ids))
    assert sorted((o.ord_id, o.state) for o in orders) == sorted((o, "filled") for o in ord_ids)


# -------------------------------------------------------------------------------------- range backfill


def _iso(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, tz=UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


async def test_range_backfill_prints_progress_lines_without_a_terminal_and_publishes_each_trade_once(
    kafka_broker: BrokerInfo, topic_prefix: str, tmp_path: Path
) -> None:
    start = now_ms() - 3_600_000
    async with SimServer(sim_config(instruments=("BTC-USDT",), start_ms=start, tick_ms=1000)) as sim:
        await sim.tick(900)
        since, until = start + 100_000, start + 800_000
        wanted = [tid for tid, ts in log_of(sim, "BTC-USDT") if since <= ts < until]
        env = {k: v for k, v in os.environ.items() if not k.startswith(("OKX_API", "OKX_INGEST"))}
        env.update({
            "OKX_INGEST__OKX__REST_BASE_URL": sim.rest_base,
            "OKX_INGEST__KAFKA__BOOTSTRAP_SERVERS": kafka_broker.bootstrap_servers,
            "OKX_INGEST__KAFKA__TOPIC_PREFIX": topic_prefix,
            "OKX_INGEST__KAFKA__ENABLE_IDEMPOTENCE": "false",
            "OKX_INGEST__BACKFILL__PROGRESS_INTERVAL_S": "0.001",
        })
        argv = [sys.executable, "-m", "ingest.cli", "backfill", "--channel", "trades", "--inst", "BTC-USDT",
                "--since", _iso(since), "--until", _iso(until)]
        cli = await asyncio.create_subprocess_exec(*argv, env=env, cwd=MAIN, stdout=asyncio.subprocess.PIPE,
                                                   stderr=asyncio.subprocess.PIPE)
        _, err = await asyncio.wait_for(cli.communicate(), WAIT_S)
        text = err.decode()
        assert cli.returncode == 0, text
        lines = [ln for ln in text.splitlines() if ln.startswith("backfill trades BTC-USDT: ")]
        assert len(wanted) > 100 and len(lines) >= 2, text  # progress while walking, then the summary
        assert "%" in lines[0] and lines[-1] == f"backfill trades BTC-USDT: filled, {len(wanted)} records " \
                                                f"published, {sim.stats.rest_count(TRADES_PATH)} requests"

        # Again, in-process and on a terminal: the topic has it all, so nothing is published twice.
        again = worker_settings(sim, kafka_broker, topic_prefix, tmp_path)
        out = io.StringIO()
        rest = rest_for(sim)
        try:
            result = await backfill_range(again, "trades", "BTC-USDT", since, until, True, out=out, rest=rest)
        finally:
            await rest.aclose()
        assert (result.status, result.records, result.exit_code) == (GapStatus.FILLED, 0, 0)
        assert "backfill trades BTC-USDT" in out.getvalue() and "100%" in out.getvalue()
        assert sim.stats.violations == 0

    trades = await TopicReader(kafka_broker.bootstrap_servers, topic_prefix).records(TopicKind.TRADES, Trade)
    assert sorted(int(t.trade_id) for t in trades) == wanted
    assert all(t.source is Source.REST and t.channel == "trades" for t in trades)


# ------------------------------------------------------------------------------ transient failures


async def test_a_5xx_storm_that_opens_the_breaker_finalizes_no_gap_and_every_gap_is_filled_once_it_passes(
    kafka_broker: BrokerInfo, topic_prefix: str, tmp_path: Path
) -> None:
    """The reported loss: gaps waiting on an open breaker were committed `unfillable` within milliseconds."""
    async with SimServer(sim_config(instruments=("BTC-USDT", "ETH-USDT"))) as sim:
        for inst in ("BTC-USDT", "ETH-USDT"):
            await sim.pump_trades(inst, 600)
        logs = {i: log_of(sim, i) for i in ("BTC-USDT", "ETH-USDT")}
        gaps = [trade_gap(f"s{n}-{inst}", inst, logs[inst][40 * n], logs[inst][40 * n + 30])
                for n in range(12) for inst in ("BTC-USDT", "ETH-USDT")]
        sim.faults.rest_error(count=25, path=TRADES_PATH, status=503)  # opens the breaker, then its probes fail
        await publish(kafka_broker.bootstrap_servers, topic_prefix, gaps)
        settings = worker_settings(sim, kafka_broker, topic_prefix, tmp_path, gap_max_attempts=2,
                                   retry_initial_s=0.02, gap_retry_max_s=0.4, concurrency=4)
        rest = OkxRestClient(clock=ServerClock(now_ms), base_url=sim.rest_base, limits=LimitTable(window_scale=SCALE),
                             registry=LimiterRegistry(), max_attempts=2, retry_initial_s=0.01, retry_max_s=0.02,
                             timeout_s=5.0, breaker_failures=3, breaker_cooldown_s=0.2)
        async with running_worker(settings, rest) as w:
            stats = await w.until(lambda s: s.gaps_done >= len(gaps))
            opened = rest.stats().breaker_opened.get(TRADES_PATH, 0)
        assert sim.stats.rest_injected[TRADES_PATH] == 25, "the storm did not happen"
        assert sim.stats.violations == 0

    assert opened >= 1 and stats.gaps_deferred > 0  # the breaker opened and gaps waited it out, open
    assert (stats.gaps_filled, stats.gaps_partial, stats.gaps_unfillable) == (len(gaps), 0, 0)
    reader = TopicReader(kafka_broker.bootstrap_servers, topic_prefix)
    revisions = [g for g in await reader.records(TopicKind.GAPS, GapEvent, at_least=2 * len(gaps))
                 if g.revision > 0]
    assert not [g for g in revisions if g.status in (GapStatus.UNFILLABLE, GapStatus.PARTIAL)]
    final = {g.gap_id: g for g in revisions if g.status is GapStatus.FILLED}
    assert sorted(final) == sorted(g.gap_id for g in gaps)
    deferred = [g for g in revisions if g.status is GapStatus.OPEN]
    assert deferred and all("retried later" in (g.note or "") for g in deferred)
    trades = await reader.records(TopicKind.TRADES, Trade)
    for inst in ("BTC-USDT", "ETH-USDT"):
        covered = coverage(t for t in trades if t.inst_id == inst)
        wanted = {tid for n in range(12) for tid, _ in logs[inst][40 * n + 1:40 * n + 30]}
        assert set(covered) == wanted and set(covered.values()) == {1}


def cli_env(sim: SimServer, bootstrap: str, prefix: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OKX_API", "OKX_INGEST"))}
    env.update({"OKX_INGEST__OKX__REST_BASE_URL": sim.rest_base, "OKX_INGEST__KAFKA__BOOTSTRAP_SERVERS": bootstrap,
                "OKX_INGEST__KAFKA__TOPIC_PREFIX": prefix, "OKX_INGEST__KAFKA__ENABLE_IDEMPOTENCE": "false",
                "OKX_INGEST__KAFKA__REQUEST_TIMEOUT_MS": "3000"})
    return env


async def run_cli(env: dict[str, str], *args: str) -> tuple[int, str]:
    cli = await asyncio.create_subprocess_exec(sys.executable, "-m", "ingest.cli", "backfill", *args, env=env,
                                               cwd=MAIN, stdout=asyncio.subprocess.PIPE,
                                               stderr=asyncio.subprocess.PIPE)
    _, err = await asyncio.wait_for(cli.communicate(), WAIT_S)
    assert cli.returncode is not None
    return cli.returncode, err.decode()


async def test_range_backfill_exits_non_zero_on_partial_unfillable_and_unreachable_kafka_and_says_so(
    kafka_broker: BrokerInfo, topic_prefix: str
) -> None:
    """A supervisor (cron, CI) must be able to tell a range that was not filled from one that was."""
    start = now_ms() - 3_600_000
    async with SimServer(sim_config(instruments=("BTC-USDT",), start_ms=start, tick_ms=1000,
                                    max_trades_history=400)) as sim:
        await sim.tick(900)  # the simulator keeps only the newest trades, as OKX keeps only 3 months
        kept_from = log_of(sim, "BTC-USDT")[0][1]
        env = cli_env(sim, kafka_broker.bootstrap_servers, topic_prefix)
        label = "backfill trades BTC-USDT: "

        code, text = await run_cli(env, "--channel", "trades", "--inst", "BTC-USDT", "--since", _iso(start),
                                   "--until", _iso(now_ms() + 1000))
        last = text.splitlines()[-1]
        assert code == 3 and last.startswith(f"{label}partial, ") and "no longer kept" in last, text

        code, text = await run_cli(env, "--channel", "trades", "--inst", "BTC-USDT", "--since", _iso(start),
                                   "--until", _iso(kept_from - 1000))
        last = text.splitlines()[-1]
        assert code == 4 and last.startswith(f"{label}unfillable, 0 records published"), text

        with socket.socket() as free:
            free.bind(("127.0.0.1", 0))
            nobody = f"127.0.0.1:{free.getsockname()[1]}"
        code, text = await run_cli(cli_env(sim, nobody, topic_prefix), "--channel", "trades", "--inst", "BTC-USDT",
                                   "--since", _iso(start), "--until", _iso(now_ms()))
        last = text.splitlines()[-1]
        assert code == 1 and last.startswith(f"{label}not finished, 0 records published") and nobody in last, text
        assert "Traceback" not in text


async def test_range_backfill_without_inst_is_a_clear_usage_error(sim: SimServer) -> None:
    code, text = await run_cli(cli_env(sim, "127.0.0.1:9", "t."), "--channel", "trades")
    assert code == 2 and "Traceback" not in text
    assert text.strip() == ("okx-ingest: backfill --channel needs --inst, --since, --until (e.g. --channel trades "
                            "--inst BTC-USDT --since 2026-11-24T10:00:00Z --until 2026-11-24T11:00:00Z)")


# ---------------------------------------------------------------------------------------------- stops


async def test_cancelling_the_worker_mid_batch_while_kafka_is_down_returns_and_leaves_no_batch_behind(
    own_broker: EmbeddedBroker, topic_prefix: str, tmp_path: Path
) -> None:
    """A SIGTERM during a Kafka outage must not hang, and the batch must not live on after the worker."""
    async with SimServer(sim_config(rate_window_scale=1.0)) as sim:
        await sim.pump_trades("BTC-USDT", 3000)
        log = log_of(sim, "BTC-USDT")
        broker = BrokerInfo(own_broker.bootstrap_servers, "embedded")
        await publish(broker.bootstrap_servers, topic_prefix, [trade_gap("long", "BTC-USDT", log[4], log[-5])])
        sim.faults.rest_slow(0.05, count=1_000_000, path=TRADES_PATH)  # the batch is still walking when cancelled
        settings = worker_settings(sim, broker, topic_prefix, tmp_path, stop_timeout_s=2.0)
        settings = settings.model_copy(update={"journal": settings.journal.model_copy(update={"close_timeout_s": 1.0})})
        rest = rest_for(sim, scale=1.0)
        worker = BackfillWorker(settings, rest, name="w")
        task = asyncio.create_task(worker.run(asyncio.Event()))
        try:
            await sim.wait_until(lambda: sim.stats.rest_count(TRADES_PATH) >= 3, timeout=WAIT_S)  # mid-walk
            assert worker.stats().gaps_pending == 1
            own_broker.kill()
            pages = sim.stats.rest_count(TRADES_PATH)
            await sim.wait_until(lambda: sim.stats.rest_count(TRADES_PATH) >= pages + 2, timeout=WAIT_S)  # puts
            task.cancel()
            async with asyncio.timeout(WAIT_S):  # a hang guard, not a timing assertion
                await asyncio.wait({task})
        finally:
            await rest.aclose()
        leftovers = [t for t in asyncio.all_tasks() if t.get_name().startswith("backfill-") and not t.done()]

    assert task.cancelled()
    assert leftovers == [], f"tasks outlived the worker: {leftovers}"
    stats = worker.stats()
    assert stats.commits == 0 and stats.gaps_done == 0  # nothing committed, nothing reported done


# -------------------------------------------------------------------------------------------- fencing


async def test_a_worker_paused_past_its_session_is_fenced_and_publishes_nothing_for_partitions_it_lost(
    kafka_broker: BrokerInfo, topic_prefix: str, tmp_path: Path
) -> None:
    """Worker A is paused (SIGSTOP: a stalled VM, a long GC) mid-gap; the group gives its partitions to B,
    which fills the gap. When A resumes with a page in hand, it must publish nothing more for that gap and
    commit nothing.

    The simulator holds every page A asks for until the test releases it, so when A has what and for how long
    it is paused are decided here, not by the machine's speed; A's REST timeout is far above anything the test
    waits for, so the pause cannot turn its held page into a timeout and a retry."""
    async with SimServer(sim_config(rate_window_scale=1.0)) as sim:
        await sim.pump_trades("BTC-USDT", 3000)
        log = log_of(sim, "BTC-USDT")
        gap = trade_gap("long", "BTC-USDT", log[4], log[-5])
        inside = [tid for tid, _ in log[5:-5]]
        await publish(kafka_broker.bootstrap_servers, topic_prefix, [gap])
        sim.faults.rest_hold(path=TRADES_PATH)  # every page is answered only when the test says so

        def answered() -> int:  # the simulator logs a request once it has answered it
            return sum(1 for r in sim.stats.rest_log if r.path == TRADES_PATH)

        def held() -> int:
            return sim.faults.rest_held(TRADES_PATH)

        env = {k: v for k, v in os.environ.items() if not k.startswith(("OKX_API", "OKX_INGEST"))}
        env.update({
            "OKX_INGEST__OKX__REST_BASE_URL": sim.rest_base,
            "OKX_INGEST__KAFKA__BOOTSTRAP_SERVERS": kafka_broker.bootstrap_servers,
            "OKX_INGEST__KAFKA__TOPIC_PREFIX": topic_prefix, "OKX_INGEST__KAFKA__PARTITIONS": "4",
            "OKX_INGEST__KAFKA__ENABLE_IDEMPOTENCE": "false", "OKX_INGEST__JOURNAL__DIR": str(tmp_path / "a"),
            "OKX_INGEST__BACKFILL__GROUP_ID": f"{topic_prefix}backfill",
            "OKX_INGEST__BACKFILL__SESSION_TIMEOUT_MS": str(GROUP["session_timeout_ms"]),
            "OKX_INGEST__BACKFILL__HEARTBEAT_INTERVAL_MS": str(GROUP["heartbeat_interval_ms"]),
            "OKX_INGEST__BACKFILL__POLL_TIMEOUT_MS": str(GROUP["poll_timeout_ms"]),
            "OKX_INGEST__BACKFILL__REQUEST_TIMEOUT_S": str(PAUSED_REST_TIMEOUT_S),
            "OKX_INGEST__BACKFILL__METRICS_PORT": "0",  # its default port may be taken by another worker
            "OKX_INGEST__OBS__METRICS_PORT": "0", "OKX_INGEST__OBS__LOG_FORMAT": "text",
        })
        a = await asyncio.create_subprocess_exec(sys.executable, "-m", "ingest.cli", "backfill", env=env, cwd=MAIN,
                                                 stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
        assert a.stdout is not None
        a_log = ChildLog(a.stdout)
        reader = TopicReader(kafka_broker.bootstrap_servers, topic_prefix)
        try:
            for page in range(3):  # A gets pages 1-3, one at a time, and asks for its 4th, which stays held
                await a_log.unless_it_ends(sim.wait_until(lambda: held() == 1, timeout=WAIT_S))
                assert (answered(), sim.faults.rest_release(count=1, path=TRADES_PATH)) == (page, 1)
            await a_log.unless_it_ends(sim.wait_until(lambda: held() == 1, timeout=WAIT_S))
            before_pause = await a_log.unless_it_ends(  # pages 1-3: all it put
                reader.records(TopicKind.TRADES, Trade, at_least=300))
            a.send_signal(signal.SIGSTOP)
            assert (len(before_pause), answered()) == (300, 3)
            sim.faults.clear()  # B's pages are answered at once; A's 4th stays held
            async with running_worker(worker_settings(sim, kafka_broker, topic_prefix, tmp_path / "b"),
                                      rest_for(sim, scale=1.0), "b") as b:
                stats_b = await b.until(lambda s: s.gaps_done >= 1)  # after A's session expired
                before = answered()
                assert sim.faults.rest_release(path=TRADES_PATH) == 1
                await sim.wait_until(lambda: answered() > before, timeout=WAIT_S)  # A's 4th page, in its socket
                a.send_signal(signal.SIGCONT)  # A reads its 4th page at once, long after losing the partition
                # Either its lease check refuses the page (backfill_fenced), or the group's revocation cancels
                # the batch before the page reaches it; both come before the partitions are logged revoked.
                await a_log.wait_for(b"backfill_partitions_revoked", WAIT_S)
                a.send_signal(signal.SIGTERM)
                async with asyncio.timeout(WAIT_S):
                    assert await a.wait() == 0, a_log.tail()
        finally:
            sim.faults.rest_release()
            if a.returncode is None:
                a.send_signal(signal.SIGCONT)
                a.kill()
                await a.wait()
            await a_log.close()

    assert b"backfill_fenced" in a_log.text() or b"backfill_batch_abandoned" in a_log.text(), a_log.tail()
    assert stats_b.gaps_filled == 1 and stats_b.records_already_present == 300
    trades = await reader.records(TopicKind.TRADES, Trade)
    covered = coverage(trades)
    assert sorted(covered) == inside, "a trade of the gap is missing"
    assert set(covered.values()) == {1}, "the fenced worker published a page after losing its partition"
    updates = updates_by_gap(await reader.records(TopicKind.GAPS, GapEvent, at_least=2))["long"]
    assert [(u.status, u.revision) for u in updates] == [(GapStatus.FILLED, 1)]  # B's, once; none from A


# ------------------------------------------------------------------------------------------ funding rates


async def test_funding_rate_gaps_are_filled_with_the_settlements_okx_keeps_each_once(
    kafka_broker: BrokerInfo, topic_prefix: str, tmp_path: Path
) -> None:
    """OKX serves funding-rate history over REST (/public/funding-rate-history): a gap on `funding-rate`
    gets every settlement that fell inside it, once, and is `filled`; it used to be `unfillable`."""
    hour = 3_600_000
    start = (now_ms() - 20 * hour) // hour * hour
    async with SimServer(sim_config(instruments=("BTC-USDT-SWAP",), start_ms=start, tick_ms=60_000,
                                    funding_interval_ms=hour)) as sim:
        await sim.tick(12 * 60 + 1)
        settlements = sim.market.get("BTC-USDT-SWAP").settlements
        assert len(settlements) == 12
        lo, hi = start + 2 * hour + 30_000, start + 9 * hour + 30_000  # seven settlements inside
        wanted = {s.funding_time: s for s in settlements if lo <= s.funding_time <= hi}
        gaps = [time_gap("fr", "funding-rate", inst="BTC-USDT-SWAP", lo_ms=lo, hi_ms=hi),
                time_gap("fr-overlap", "funding-rate", inst="BTC-USDT-SWAP", lo_ms=lo + 3 * hour, hi_ms=hi + hour)]
        await publish(kafka_broker.bootstrap_servers, topic_prefix, gaps[:1])
        settings = worker_settings(sim, kafka_broker, topic_prefix, tmp_path)
        async with running_worker(settings, rest_for(sim)) as w:
            await w.until(lambda s: s.gaps_done >= 1)
            await publish(kafka_broker.bootstrap_servers, topic_prefix, gaps[1:])  # overlaps the first
            stats = await w.until(lambda s: s.gaps_done >= 2)
        assert sim.stats.violations == 0

    assert stats.gaps_filled == 2 and stats.records_already_present == 4  # the overlap's 4 were already there
    reader = TopicReader(kafka_broker.bootstrap_servers, topic_prefix)
    rates = await reader.records(TopicKind.FUNDING_RATES, FundingRate, at_least=8)
    assert Counter(int(r.funding_time or 0) for r in rates) == Counter(
        [*wanted, start + 10 * hour])  # each settlement once, the overlap's new one too
    for r in rates:
        s = next(x for x in settlements if x.funding_time == int(r.funding_time or 0))
        assert (r.source, r.inst_id, r.ts, r.sett_funding_rate, r.funding_rate, r.sett_state) == (
            Source.REST, "BTC-USDT-SWAP", s.funding_time, s.realized_rate, s.funding_rate, "settled")
    updates = updates_by_gap(await reader.records(TopicKind.GAPS, GapEvent, at_least=4))
    assert [(u.status, u.records_filled) for u in updates["fr"]] == [(GapStatus.FILLED, 7)]
    assert [(u.status, u.records_filled) for u in updates["fr-overlap"]] == [(GapStatus.FILLED, 1)]


# ------------------------------------------------------------------------------------ liquidation fills


async def test_liquidation_fills_with_negative_trade_ids_inside_an_id_bounded_gap_are_backfilled_once(
    kafka_broker: BrokerInfo, topic_prefix: str, tmp_path: Path
) -> None:
    """Liquidation and ADL fills have negative tradeIds (SPEC 4): outside the id sequence, but inside the gap
    in time. They used to be dropped by the id window."""
    async with SimServer(sim_config(instruments=("BTC-USDT-SWAP",))) as sim:
        inst = "BTC-USDT-SWAP"
        await sim.pump_trades(inst, 150)
        first_fill = await sim.liquidation_fill(inst)  # before the gap: recorded, not to be published again
        await sim.pump_trades(inst, 50)
        inside_fills = [await sim.liquidation_fill(inst, buy=n % 2 == 0) for n in range(3)]
        await sim.pump_trades(inst, 250)  # pages of 100: the fills sit in the middle of the walk
        inside_fills.append(await sim.liquidation_fill(inst))
        await sim.pump_trades(inst, 40)
        after_fill = await sim.liquidation_fill(inst)  # after the gap
        await sim.pump_trades(inst, 20)
        rows = sim.market.trades(inst)
        ordinary = [r for r in rows if int(r.trade_id) > 0]
        lo, hi = ordinary[100], ordinary[-25]  # the last good trade before, the first after
        recorded = Trade(channel="trades-all", inst_id=inst, ts=int(rows[150].ts), recv_ts_ns=time.time_ns(),
                         source=Source.WS, conn_id="c1", recv_seq=1, record_id="c1:1:0", trade_id=first_fill,
                         px="1", sz="1", side="sell")
        assert rows[150].trade_id == first_fill and int(rows[150].ts) >= int(lo.ts)  # inside the gap's time
        gap = trade_gap("liq", inst, (int(lo.trade_id), int(lo.ts)), (int(hi.trade_id), int(hi.ts)))
        await publish(kafka_broker.bootstrap_servers, topic_prefix, [recorded, gap])
        async with running_worker(worker_settings(sim, kafka_broker, topic_prefix, tmp_path), rest_for(sim)) as w:
            stats = await w.until(lambda s: s.gaps_done >= 1)
        assert sim.stats.violations == 0

    assert stats.gaps_filled == 1 and stats.records_already_present == 1  # the recorded fill
    trades = await TopicReader(kafka_broker.bootstrap_servers, topic_prefix).records(TopicKind.TRADES, Trade)
    got = Counter(t.trade_id for t in trades if t.source is Source.REST)
    wanted = [r.trade_id for r in ordinary if int(lo.trade_id) < int(r.trade_id) < int(hi.trade_id)]
    assert sorted(got, key=int) == sorted([*wanted, *inside_fills], key=int) and set(got.values()) == {1}
    assert after_fill not in got and first_fill not in got
    (update,) = updates_by_gap(await TopicReader(kafka_broker.bootstrap_servers, topic_prefix).records(
        TopicKind.GAPS, GapEvent, at_least=2))["liq"]
    assert update.status is GapStatus.FILLED and update.records_filled == len(wanted) + len(inside_fills)
