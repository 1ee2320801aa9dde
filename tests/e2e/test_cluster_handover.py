"""Planned moves with real `okx-ingest run` processes: a rolling restart of three replicas and a scale 1 -> 3 -> 1
hand every moving shard over make-before-break (docs/CLUSTER.md, "Planned moves"): no gap event, no duplicate by
event key, every trade of the simulator's history in the window on the topic exactly once."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from pathlib import Path

import pytest

from ingest.core.identity import EVENT_KEY_HEADER
from ingest.core.records import GapEvent, TopicKind, Trade
from ingest.sim import SimServer
from tests.conftest import BrokerInfo
from tests.e2e.harness import TopicReader
from tests.e2e.test_cluster_kill import INSTS, SHARDS, _config, _holders, _Replica, _sim, _split, _trading, _until


def _handover_config(tmp_path: Path, sim: SimServer, broker: BrokerInfo, prefix: str) -> Path:
    path = _config(tmp_path / "okx-ingest.toml", sim, broker, prefix, static=False)
    path.write_text(path.read_text() + "handover_timeout_s = 25\n")
    return path


async def _stop(rep: _Replica) -> None:
    """SIGTERM and wait for the exit off the event loop: the simulator (OKX) runs in this loop and keeps serving,
    as the real one does, while a replica hands its shards over (a blocking wait froze it, so the new owners could
    not connect before the old one had given up)."""
    rep.proc.terminate()
    assert await asyncio.to_thread(rep.proc.wait, 60) == 0, rep.tail()


async def _settled(reps: list[_Replica], sim: SimServer, what: str) -> None:
    await _until(lambda: _split(reps, sim) and not any(r.events("handover_preparing")[len(
        r.events("handover_completed")) + len(r.events("handover_fallback")):] for r in reps), reps, 120, what)


async def _assert_seamless(reader: TopicReader, sim: SimServer, start_ns: int, first: dict[str, int],
                           last: dict[str, int], reps: list[_Replica]) -> None:
    """Between `first` and `last` trades of each instrument: each on the topic once, and no gap event."""
    window = {i: [int(t.trade_id) for t in list(sim.market.trades(i))[first[i]:last[i]]] for i in INSTS}
    ids = {i: set(v) for i, v in window.items()}
    deadline = time.monotonic() + 30
    while True:  # the last acknowledged records may take a moment to be readable
        rows = await reader.read(TopicKind.TRADES)
        seen = {(rec.inst_id, int(rec.trade_id)) for _, _, rec, _ in rows if isinstance(rec, Trade)}
        if all((i, t) in seen for i in INSTS for t in ids[i]) or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.5)  # polling the broker
    keys = Counter(h[EVENT_KEY_HEADER] for _, _, rec, h in rows
                   if isinstance(rec, Trade) and int(rec.trade_id) in ids[rec.inst_id])
    dups = [k for k, n in keys.items() if n > 1]
    assert not dups, f"duplicates by event key: {dups[:5]}"
    got: dict[str, set[int]] = {i: set() for i in INSTS}
    for _, _, rec, _ in rows:
        if isinstance(rec, Trade) and int(rec.trade_id) in ids[rec.inst_id]:
            got[rec.inst_id].add(int(rec.trade_id))
    for inst in INSTS:
        assert got[inst] == ids[inst], (f"{inst}: missing {len(ids[inst] - got[inst])} of {len(ids[inst])}: "
                                        f"{sorted(ids[inst] - got[inst])[:10]}\n" + "\n".join(r.tail() for r in reps))
    gaps = [g for g in await reader.records(TopicKind.GAPS, GapEvent) if g.detected_ts_ns >= start_ns
            and g.after is not None and g.inst_id in INSTS]
    assert gaps == [], [(g.inst_id, g.kind, g.reason) for g in gaps][:5]
    done = [e for r in reps for e in r.events("handover_completed")]
    assert done, "hand-overs were completed"


def _counts(sim: SimServer) -> dict[str, int]:
    return {i: len(list(sim.market.trades(i))) for i in INSTS}


@pytest.mark.timeout(420)
async def test_a_rolling_restart_of_three_replicas_hands_every_shard_over_without_gap_or_duplicate(
    kafka_broker: BrokerInfo, topic_prefix: str, tmp_path: Path
) -> None:
    reader = TopicReader(kafka_broker.bootstrap_servers, topic_prefix)
    async with _sim() as sim:
        config = _handover_config(tmp_path, sim, kafka_broker, topic_prefix)
        names = ["rec-0", "rec-1", "rec-2"]
        reps = [_Replica(n, config, tmp_path / f"{n}.log") for n in names]
        try:
            await _settled(reps, sim, "three replicas splitting the shards")
            start_ns, first = time.time_ns(), _counts(sim)
            async with _trading(sim):
                for i, name in enumerate(names):
                    await _stop(reps[i])
                    others = [r for j, r in enumerate(reps) if j != i]
                    await _until(lambda o=others: sum(len(r.shards()) for r in o) == SHARDS  # type: ignore[misc]
                                 and _holders(sim) == Counter(dict.fromkeys(INSTS, 1)), others, 120,
                                 f"the others to record {name}'s shards")
                    reps[i] = _Replica(name, config, tmp_path / f"{name}.log")
                    await _settled(reps, sim, f"{name} back")
                last = _counts(sim)
            for r in reps:
                await _stop(r)
        finally:
            for r in reps:
                if r.proc.poll() is None:
                    r.proc.kill()
                    r.proc.wait(10)
        await _assert_seamless(reader, sim, start_ns, first, last, reps)
        durations = [e["seconds"] for r in reps for e in r.events("handover_completed")]
        print(f"hand-over seconds per shard: n={len(durations)} max={max(durations)} "
              f"mean={sum(durations) / len(durations):.2f}")


@pytest.mark.timeout(420)
async def test_scale_one_to_three_and_back_hands_every_shard_over_without_gap_or_duplicate(
    kafka_broker: BrokerInfo, topic_prefix: str, tmp_path: Path
) -> None:
    reader = TopicReader(kafka_broker.bootstrap_servers, topic_prefix)
    async with _sim() as sim:
        config = _handover_config(tmp_path, sim, kafka_broker, topic_prefix)
        reps = [_Replica("rec-0", config, tmp_path / "rec-0.log")]
        try:
            await _settled(reps, sim, "one replica owning every shard")
            start_ns, first = time.time_ns(), _counts(sim)
            async with _trading(sim):
                reps += [_Replica(n, config, tmp_path / f"{n}.log") for n in ("rec-1", "rec-2")]
                await _settled(reps, sim, "three replicas splitting the shards")
                for rep in reps[:0:-1]:
                    await _stop(rep)
                    reps.remove(rep)
                    await _settled(reps, sim, f"{rep.name}'s shards moved")
                last = _counts(sim)
            await _stop(reps[0])
        finally:
            for r in reps:
                if r.proc.poll() is None:
                    r.proc.kill()
                    r.proc.wait(10)
        await _assert_seamless(reader, sim, start_ns, first, last, reps)
