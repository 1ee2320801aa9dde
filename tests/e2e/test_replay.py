"""Replay end to end: a simulator recording (a disconnect and a book break, backfilled) replayed from Kafka and
from an archive of it, checked against the simulator's own history and an independently rebuilt book."""

from __future__ import annotations

import asyncio
import os
import secrets
import sys
from collections import defaultdict
from collections.abc import AsyncIterator
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path

import msgspec
import numpy as np
import pyarrow as pa
import pytest
import pytest_asyncio

from ingest.config import Settings, load_settings
from ingest.core.records import BookUpdate, GapEvent, GapStatus, OkxRecord, Source, TopicKind, Trade
from ingest.core.replay import BookSnapshot, latest_gaps
from ingest.io.archive_store import ArchiveStore
from ingest.okx.channels import SubArg
from ingest.replay import replay
from ingest.replay.formats import FLAT_SCHEMA, arrow_batches, jsonl_lines
from ingest.replay.serve import ReplayServer, _served
from ingest.services.archive import Archiver
from ingest.sim import SimConfig, SimServer
from tests.conftest import BrokerInfo
from tests.e2e.harness import daemon_settings, running
from tests.e2e.replay_support import Located, read_located
from tests.integration.test_backfill import rest_for, running_worker, worker_settings

pytestmark = [pytest.mark.broker, pytest.mark.asyncio(loop_scope="module")]

INSTS = ("BTC-USDT", "ETH-USDT")
CHANNELS = ("trades-all", "books")


@dataclass
class Recording:
    bootstrap: str
    prefix: str
    expected: dict[str, list[tuple[str, str, str, str, int]]]  # the simulator's trade log per instId
    located: dict[TopicKind, list[Located]]
    archive: Path
    start: int
    end: int


async def _subscribed(sim: SimServer) -> None:
    for c in CHANNELS:
        for i in INSTS:
            await sim.wait_subscribed(SubArg(c, i), timeout=20)


async def _archive(bootstrap: str, prefix: str, root: Path, total: int) -> None:
    """`okx-ingest archive` (the service itself) over the recording's topics, until every record is in a file."""
    settings = Settings.model_validate({
        "kafka": {"bootstrap_servers": bootstrap, "topic_prefix": prefix},
        "archive": {"url": str(root), "group_id": f"{prefix}archive", "idle_close_s": 0.3, "max_open_s": 5,
                    "metrics_port": 0},
        "obs": {"metrics_port": 0}})
    archiver = Archiver(settings, ArchiveStore.from_url(str(root)))
    stop = asyncio.Event()
    task = asyncio.create_task(archiver.run(stop))
    s = archiver.stats
    try:
        async with asyncio.timeout(90):
            while not (s.records_in >= total and s.open_files == 0 and s.last_commit):
                if task.done():
                    raise AssertionError(f"the archiver stopped: {task.exception()!r}")
                await asyncio.sleep(0.05)  # polling the archiver's progress counters, with a deadline
    finally:
        stop.set()
        async with asyncio.timeout(60):
            await task


def _subscribes(sim: SimServer) -> int:
    return sum(c.subscribes for c in sim.stats.connections.values())


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def recording(kafka_broker: BrokerInfo, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Recording]:
    tmp = tmp_path_factory.mktemp("replay")
    prefix = f"replay{secrets.token_hex(3)}."
    config = SimConfig(instruments=INSTS, seed=11, api_key=secrets.token_hex(16), api_secret=secrets.token_hex(32),
                       passphrase=secrets.token_hex(8), auto_tick_s=None, rate_window_scale=0.05)
    async with SimServer(config) as sim:
        subs = [{"channel": c, "inst_id": i} for c in CHANNELS for i in INSTS]
        settings = daemon_settings(sim, kafka_broker.bootstrap_servers, prefix, tmp / "daemon",
                                   okx={"channels": [], "subscriptions": subs})
        async with running(settings) as daemon:
            await _subscribed(sim)
            await sim.tick(30)
            sim.faults.reject_connects(count=1_000_000)  # nobody records while the market moves on
            sim.faults.drop(kind="abort")
            await sim.wait_until(lambda: not sim.connections(), timeout=10)
            await sim.tick(20)
            sim.faults.clear()
            await _subscribed(sim)
            await sim.tick(30)
            subscribes = _subscribes(sim)
            sim.faults.skip_sequence(inst_id=INSTS[0], channel="books")  # a book break: seq_break gap, resync
            await sim.tick(3)
            await sim.wait_until(lambda: _subscribes(sim) > subscribes or None, timeout=20)
            await _subscribed(sim)
            await sim.tick(30)
            assert await daemon.shutdown() == 0
        located = {k: await read_located(kafka_broker.bootstrap_servers, prefix, k)
                   for k in (TopicKind.GAPS, TopicKind.TRADES, TopicKind.BOOKS)}
        opened = [g for g, _ in located[TopicKind.GAPS] if isinstance(g, GapEvent)]
        assert {g.kind.value for g in opened} >= {"disconnect", "seq_break"}
        trade_gaps = [g for g in opened if g.channel == "trades-all"]
        async with running_worker(worker_settings(sim, kafka_broker, prefix, tmp / "w"), rest_for(sim)) as w:
            await w.until(lambda s: s.gaps_done >= len(opened))
        expected = {i: [(r.trade_id, r.px, r.sz, r.side, int(r.ts)) for r in sim.market.trades(i)] for i in INSTS}
    assert trade_gaps, "the disconnect must have opened trade gaps for the backfill to fill"
    located = {k: await read_located(kafka_broker.bootstrap_servers, prefix, k)
               for k in (TopicKind.GAPS, TopicKind.TRADES, TopicKind.BOOKS)}
    archive = tmp / "archive"
    total = 0
    for kind in TopicKind:  # the archiver takes every topic; it has settled once it consumed all of them
        total += len(await read_located(kafka_broker.bootstrap_servers, prefix, kind))
    await _archive(kafka_broker.bootstrap_servers, prefix, archive, total)
    ts = [r.ts for r, _ in located[TopicKind.TRADES] + located[TopicKind.BOOKS] if isinstance(r, Trade | BookUpdate)]
    yield Recording(kafka_broker.bootstrap_servers, prefix, expected, located, archive, min(ts), max(ts) + 1)


def _inside_trade_gap(rec: Recording) -> int:
    """A time just after the first trade gap opened: the backfilled trades follow it."""
    befores = [g.before.ts for g, _ in rec.located[TopicKind.GAPS]
               if isinstance(g, GapEvent) and g.channel == "trades-all" and g.before and g.before.ts]
    return min(befores) + 1


def _mid(rec: Recording) -> int:
    return rec.start + (rec.end - rec.start) // 2


def _kafka(rec: Recording) -> str:
    return f"kafka://{rec.bootstrap}"


def _settings(rec: Recording) -> Settings:
    return load_settings(None, kafka={"topic_prefix": rec.prefix})


async def test_repaired_trades_equal_the_simulators_history_and_recorded_ones_miss_the_disconnect(
    recording: Recording,
) -> None:
    rec = recording
    settings = _settings(rec)
    mid = _inside_trade_gap(rec)  # a window that starts mid-recording, inside the disconnect
    items = await asyncio.to_thread(lambda: list(replay(_kafka(rec), mid, rec.end, channels=["trades-all"],
                                                        settings=settings)))
    trades = [i for i in items if isinstance(i, Trade)]
    assert any(t.source is Source.REST for t in trades), "the backfilled trades must be merged in"
    for inst in INSTS:
        got = [(t.trade_id, t.px, t.sz, t.side, t.ts) for t in trades if t.inst_id == inst]
        want = [row for row in rec.expected[inst] if mid <= row[4] < rec.end]
        assert got == want
    assert not [i for i in items if isinstance(i, GapEvent)], "filled gaps no longer interrupt the repaired view"
    recorded = await asyncio.to_thread(lambda: list(replay(_kafka(rec), rec.start, rec.end, channels=["trades-all"],
                                                           view="recorded", settings=settings)))
    rtrades = [i for i in recorded if isinstance(i, Trade)]
    assert rtrades and all(t.source is Source.WS for t in rtrades)
    gaps = [i for i in recorded if isinstance(i, GapEvent)]
    assert {(g.inst_id, g.status) for g in gaps} == {(i, GapStatus.FILLED) for i in INSTS}
    for g in gaps:  # the gap sits right after its last good trade, and the next trade of its stream is after it
        assert g.before is not None and g.after is not None
        stream = [x for x in recorded if x.inst_id == g.inst_id and (isinstance(x, Trade) or x is g)]
        at = stream.index(g)
        last, first = stream[at - 1], stream[at + 1]
        assert isinstance(last, Trade) and last.trade_id == str(g.before.trade_id)
        assert isinstance(first, Trade) and first.trade_id == str(g.after.trade_id)


class _RefBook:
    """An independent book: resets on a ws snapshot, applies updates, invalid from a gap to the next snapshot."""

    def __init__(self) -> None:
        self.bids: dict[Decimal, str] = {}
        self.asks: dict[Decimal, str] = {}
        self.valid = False
        self.seq: int | None = None

    def apply(self, r: BookUpdate) -> None:
        if r.source is not Source.WS:
            return
        if r.action.value == "snapshot":
            self.bids, self.asks, self.valid = {}, {}, True
        elif not self.valid or r.prev_seq_id != self.seq:
            self.valid = False
            return
        for side, levels in ((self.bids, r.bids), (self.asks, r.asks)):
            for px, sz, *_ in levels:
                if Decimal(sz) == 0:
                    side.pop(Decimal(px), None)
                else:
                    side[Decimal(px)] = sz
        self.seq = r.seq_id

    def top(self, n: int) -> tuple[tuple[tuple[str, str], ...], tuple[tuple[str, str], ...]]:
        def text(p: Decimal) -> str:
            s = format(p, "f")
            return s.rstrip("0").rstrip(".") if "." in s else s

        return (tuple((text(p), self.bids[p]) for p in sorted(self.bids, reverse=True)[:n]),
                tuple((text(p), self.asks[p]) for p in sorted(self.asks)[:n]))


async def test_book_snapshots_are_sorted_uncrossed_and_equal_an_independently_rebuilt_book(
    recording: Recording,
) -> None:
    rec = recording
    depth, interval = 5, 50
    mid = rec.start + (rec.end - rec.start) // 2
    items = await asyncio.to_thread(lambda: list(replay(_kafka(rec), mid, rec.end, channels=["books"],
                                                        book_snapshots=(depth, interval),
                                                        settings=_settings(rec))))
    snaps = [i for i in items if isinstance(i, BookSnapshot)]
    assert snaps
    first_boundary = -(-mid // interval) * interval
    for inst in INSTS:  # valid from the first boundary: the seek went back to the last snapshot before `mid`
        assert any(s.inst_id == inst and s.ts == first_boundary for s in snaps)
    books = sorted((r for r, _ in rec.located[TopicKind.BOOKS] if isinstance(r, BookUpdate)),
                   key=lambda r: (r.ts, r.recv_ts_ns))
    gaps = [g for g, *_ in latest_gaps((g, c.topic, c.partition, c.offset) for g, c in rec.located[TopicKind.GAPS]
                                       if isinstance(g, GapEvent))]
    ref: dict[str, _RefBook] = defaultdict(_RefBook)
    pending = sorted(((g.before.ts if g.before and g.before.ts else 0), g.inst_id or "") for g in gaps
                     if g.channel == "books" and g.status is not GapStatus.FILLED)
    k = 0
    for s in snaps:
        while k < len(books) and books[k].ts < s.ts:
            while pending and pending[0][0] <= books[k].ts:
                ref[pending.pop(0)[1]].valid = False
            ref[books[k].inst_id].apply(books[k])
            k += 1
        bids, asks = s.bids, s.asks
        assert [Decimal(p) for p, _ in bids] == sorted((Decimal(p) for p, _ in bids), reverse=True)
        assert [Decimal(p) for p, _ in asks] == sorted(Decimal(p) for p, _ in asks)
        assert not bids or not asks or Decimal(bids[0][0]) < Decimal(asks[0][0]), "a crossed book"
        book = ref[s.inst_id]
        assert book.valid and (bids, asks) == book.top(depth) and s.seq_id == book.seq
    broken = [g for g in gaps if g.channel == "books" and g.kind.value == "seq_break"]
    assert broken
    for g in broken:  # no snapshot of the broken book between its last good update and the resync snapshot
        assert g.before is not None and g.after is not None and g.before.ts is not None and g.after.ts is not None
        lo, hi = g.before.ts, g.after.ts
        assert not [s for s in snaps if s.inst_id == g.inst_id and lo < s.ts <= hi]


async def test_gap_items_appear_exactly_where_the_gap_events_were(recording: Recording) -> None:
    rec = recording
    items = await asyncio.to_thread(lambda: list(replay(_kafka(rec), rec.start, rec.end, view="recorded",
                                                        settings=_settings(rec))))
    got = {(g.gap_id, g.revision, g.status) for g in items if isinstance(g, GapEvent)}
    latest = latest_gaps((g, c.topic, c.partition, c.offset) for g, c in rec.located[TopicKind.GAPS]
                         if isinstance(g, GapEvent))
    assert got == {(g.gap_id, g.revision, g.status) for g, *_ in latest}
    for g in (i for i in items if isinstance(i, GapEvent)):
        at = items.index(g)
        assert g.before is not None and g.before.ts is not None
        same = [x for x in items if not isinstance(x, GapEvent | BookSnapshot) and x.inst_id == g.inst_id
                and x.channel == g.channel]
        before = [x for x in same if items.index(x) < at]
        after = [x for x in same if items.index(x) > at]
        assert before and max(x.ts for x in before) <= g.before.ts
        assert after and min(x.ts for x in after) >= g.before.ts


async def test_kafka_and_archive_sources_give_byte_identical_output(recording: Recording) -> None:
    rec = recording

    def jsonl(source: str) -> bytes:
        return b"".join(jsonl_lines(replay(source, rec.start, rec.end, book_snapshots=(3, 1000),
                                           settings=_settings(rec))))

    from_kafka = await asyncio.to_thread(jsonl, _kafka(rec))
    from_archive = await asyncio.to_thread(jsonl, str(rec.archive))
    assert from_kafka.count(b"\n") > 100
    assert from_kafka == from_archive

    def rows(source: str, columns: bool) -> pa.Table:
        rp = replay(source, rec.start, rec.end, settings=_settings(rec))
        batches = rp.batches() if columns else arrow_batches(iter(rp))
        return pa.Table.from_batches(list(batches), schema=FLAT_SCHEMA)

    from_columns = await asyncio.to_thread(rows, str(rec.archive), True)
    assert from_columns.num_rows > 100
    assert from_columns.equals(await asyncio.to_thread(rows, _kafka(rec), False))


def _iso(ms: int) -> str:
    from datetime import UTC, datetime

    return datetime.fromtimestamp(ms / 1000, tz=UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


async def test_two_cli_runs_are_byte_identical_and_end_with_a_summary(recording: Recording, tmp_path: Path) -> None:
    rec = recording
    outs = []
    for n in (1, 2):
        out = tmp_path / f"run{n}.jsonl"
        cmd = [sys.executable, "-m", "ingest.cli", "replay", "--from", _iso(rec.start), "--to", _iso(rec.end),
               "--source", _kafka(rec), "--book-snapshots", "5:1000", "--out", str(out)]
        proc = await asyncio.create_subprocess_exec(*cmd, stderr=asyncio.subprocess.PIPE,
                                                    env={**os.environ, "OKX_INGEST__KAFKA__TOPIC_PREFIX": rec.prefix})
        _, err = await proc.communicate()
        assert proc.returncode == 0, err.decode()
        assert b"replayed " in err and b"gaps" in err
        assert b"; 0 late records left out" in err  # the recorder published every partition in order
        outs.append(out.read_bytes())
    assert outs[0] and outs[0] == outs[1]


async def test_hftbacktest_loads_the_export_and_runs_a_backtest_over_it(recording: Recording, tmp_path: Path) -> None:
    from hftbacktest import BacktestAsset, HashMapMarketDepthBacktest

    rec = recording
    out = tmp_path / "btc.npz"
    cmd = [sys.executable, "-m", "ingest.cli", "replay", "--from", _iso(_mid(rec)), "--to", _iso(rec.end),
           "--source", str(rec.archive), "--inst", INSTS[0], "--format", "hftbacktest", "--out", str(out)]
    proc = await asyncio.create_subprocess_exec(*cmd, stderr=asyncio.subprocess.PIPE)
    _, err = await proc.communicate()
    assert proc.returncode == 0, err.decode()
    data = np.load(out)["data"]
    assert len(data) > 100
    asset = (BacktestAsset().data([str(out)]).linear_asset(1.0).constant_order_latency(0, 0)
             .risk_adverse_queue_model().no_partial_fill_exchange().trading_value_fee_model(0.0, 0.0)
             .tick_size(0.1).lot_size(0.00000001))
    hbt = HashMapMarketDepthBacktest([asset])
    mids = []
    while hbt.elapse(1_000_000_000) == 0:
        depth = hbt.depth(0)
        if depth.best_bid_tick > -(1 << 31) and depth.best_ask_tick < (1 << 31) - 1:
            mids.append((depth.best_bid + depth.best_ask) / 2)
            assert depth.best_bid < depth.best_ask
    hbt.close()
    assert mids, "the backtest never saw a two-sided book"
    kinds = data["ev"] & 0xFF
    trades = [row for row in rec.expected[INSTS[0]] if _mid(rec) <= row[4] < rec.end]
    assert int(np.count_nonzero(kinds == 2)) == len(trades)  # every trade of the window, once
    assert bool(np.all(np.diff(data["exch_ts"]) >= 0)), "events must be in exchange-time order"


_RECEIVE_FIELDS = ("recv_ts_ns", "conn_id", "recv_seq", "record_id")


def _facts(records: list[Located]) -> list[tuple[object, ...]]:
    out = []
    for r, _ in records:
        if isinstance(r, Trade | BookUpdate) and r.source is Source.WS:
            values = msgspec.structs.asdict(r)
            out.append(tuple(sorted((k, repr(v)) for k, v in values.items() if k not in _RECEIVE_FIELDS)))
    return sorted(out)


async def test_replay_serve_round_trip_records_the_same_records_again_and_replays_the_disconnect(
    recording: Recording, tmp_path: Path,
) -> None:
    rec = recording
    items = replay(_kafka(rec), rec.start, rec.end, view="recorded", exact_decimals=True, settings=_settings(rec))
    prefix = f"again{secrets.token_hex(3)}."
    frames = await asyncio.to_thread(items.raw_frames)  # the recorder's okx.raw: served verbatim
    assert frames, "the recording publishes raw frames (kafka.publish_raw is on by default)"
    carried = await asyncio.to_thread(lambda: {(i.conn_id, i.recv_seq) for i in items if _served(i)
                                               and isinstance(i, OkxRecord)} & frames.keys())
    # Served as `replay serve` does: the frames read as the timeline plays, not held whole.
    async with ReplayServer(iter(items), settle_s=2.0, frames=items.raw_stream()) as server, \
            SimServer(SimConfig(instruments=INSTS, api_key=secrets.token_hex(16), api_secret=secrets.token_hex(32),
                                passphrase=secrets.token_hex(8), auto_tick_s=None)) as rest:
        subs = [{"channel": c, "inst_id": i} for c in CHANNELS for i in INSTS]
        settings = daemon_settings(rest, rec.bootstrap, prefix, tmp_path / "daemon",
                                   okx={"channels": [], "subscriptions": subs, "ws_base_url": server.ws_base})
        async with running(settings) as daemon:
            async with asyncio.timeout(90):
                await server.finished.wait()
            assert await daemon.shutdown() == 0
    assert server.disconnects >= 1, "the recorded disconnect must be served as one"
    assert server.verbatim == len(carried) > 0, "every recorded frame goes out byte for byte, read as played"
    again = {k: await read_located(rec.bootstrap, prefix, k) for k in (TopicKind.TRADES, TopicKind.BOOKS,
                                                                          TopicKind.GAPS)}
    for kind in (TopicKind.TRADES, TopicKind.BOOKS):
        original = [x for x in rec.located[kind] if x[0].source_header() == "ws"]
        assert _facts(again[kind]) == _facts(original), kind
    kinds = {(g.kind.value, g.channel, g.inst_id) for g, _ in again[TopicKind.GAPS] if isinstance(g, GapEvent)}
    assert {("disconnect", c, i) for c in CHANNELS for i in INSTS} <= kinds
