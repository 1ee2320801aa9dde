"""Proof for the backfill under fire: the recorder and the backfill worker run against the simulator through
a REST 5xx storm and a 429 storm while the recorder restarts. What users buy: every tradeId of the
exchange's history in the window is on the trades topic exactly once (after the recordId dedupe every
at-least-once consumer does), and no gap that REST could serve is left `unfillable` or `partial`.

The storms are real simulator faults (`sim.faults.rest_error` / `rest_rate_limit` on history-trades), the
breaker really opens (a short cooldown), and gaps really wait it out open (`gaps_deferred`).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from pathlib import Path

from ingest.core.backfill import TRADES_PATH, covered_trade_ids
from ingest.core.clock import ServerClock
from ingest.core.records import GapEvent, GapStatus, Source, TopicKind, Trade
from ingest.core.rest_limits import LimitTable
from ingest.io.rest import LimiterRegistry, OkxRestClient
from ingest.okx.channels import SubArg
from ingest.sim import SimServer
from tests.conftest import BrokerInfo
from tests.e2e.harness import TopicReader, daemon_settings, running
from tests.integration.test_backfill import SCALE, log_of, now_ms, running_worker, sim_config, worker_settings

INSTS = ("BTC-USDT", "ETH-USDT")


async def _record_a_while(sim: SimServer) -> None:
    for inst in INSTS:
        await sim.wait_subscribed(SubArg("trades-all", inst), timeout=20)
    await sim.tick(15)


def _both(sim: SimServer) -> None:
    sim.faults.rest_error(count=8, path=TRADES_PATH, status=503)
    sim.faults.rest_rate_limit(count=8, path=TRADES_PATH, status=429)


def _injected(sim: SimServer, n: int) -> Callable[[], bool]:
    """The storms have answered `n` history-trades requests with an error."""
    return lambda: sim.stats.rest_injected[TRADES_PATH] >= n


async def test_through_rest_storms_and_recorder_restarts_every_trade_is_on_the_topic_once_and_no_gap_unfillable(
    kafka_broker: BrokerInfo, topic_prefix: str, tmp_path: Path
) -> None:
    storms: tuple[Callable[[SimServer], object], ...] = (
        lambda sim: sim.faults.rest_error(count=12, path=TRADES_PATH, status=503),  # opens the breaker
        lambda sim: sim.faults.rest_rate_limit(count=12, path=TRADES_PATH, status=429),  # 50011 as HTTP 429
        _both,  # both at once: each request meets one of each
    )
    answered = (12, 12, 8)  # requests each storm answers with an error
    injected = sum(answered)
    async with SimServer(sim_config(instruments=INSTS, seed=23)) as sim:
        subs = [{"channel": "trades-all", "inst_id": i} for i in INSTS]
        recorder = daemon_settings(sim, kafka_broker.bootstrap_servers, topic_prefix, tmp_path / "recorder",
                                   okx={"channels": [], "subscriptions": subs})
        backfill = worker_settings(sim, kafka_broker, topic_prefix, tmp_path / "backfill", gap_max_attempts=2,
                                   retry_initial_s=0.02, gap_retry_max_s=0.3)
        rest = OkxRestClient(clock=ServerClock(now_ms), base_url=sim.rest_base, limits=LimitTable(window_scale=SCALE),
                             registry=LimiterRegistry(), max_attempts=2, retry_initial_s=0.01, retry_max_s=0.02,
                             timeout_s=5.0, breaker_failures=3, breaker_cooldown_s=0.2)
        async with running_worker(backfill, rest) as worker:
            for k in range(len(storms) + 1):
                async with running(recorder) as daemon:  # a start closes the gap of the time before it
                    await _record_a_while(sim)
                    if k > 0:  # ...and the worker meets the storm while it fills that gap
                        until = sum(answered[:k])
                        await sim.wait_until(_injected(sim, until), timeout=30)
                    assert await daemon.shutdown() == 0
                if k < len(storms):
                    await sim.wait_until(lambda: not sim.connections(), timeout=10)
                    await sim.tick(15)  # nobody records: the next start reports it as a gap
                    storms[k](sim)
            reader = TopicReader(kafka_broker.bootstrap_servers, topic_prefix)
            opened = [g for g in await reader.records(TopicKind.GAPS, GapEvent, at_least=len(storms) * len(INSTS))
                      if g.status is GapStatus.OPEN and g.revision == 0]
            stats = await worker.until(lambda s: s.gaps_done >= len(opened), timeout_s=45)
            opened_breaker = rest.stats().breaker_opened.get(TRADES_PATH, 0)
        history = {i: [tid for tid, _ in log_of(sim, i)] for i in INSTS}
        assert sim.stats.rest_injected[TRADES_PATH] == injected, "a storm did not happen"
        assert sim.stats.violations == 0

    assert len(opened) >= len(storms) * len(INSTS)  # one gap per stream and restart at least
    assert opened_breaker >= 1 and stats.gaps_deferred >= 1  # the breaker opened and gaps waited, open
    revisions = [g for g in await reader.records(TopicKind.GAPS, GapEvent) if g.revision > 0]
    assert [g for g in revisions if g.status in (GapStatus.UNFILLABLE, GapStatus.PARTIAL)] == []
    finished = {g.gap_id for g in revisions if g.status is GapStatus.FILLED}
    assert finished == {g.gap_id for g in opened}
    assert sum(g.records_filled or 0 for g in revisions if g.status is GapStatus.FILLED) > 0

    rows = await reader.read(TopicKind.TRADES)
    # At-least-once delivery: consumers drop repeats by recordId. The recorder runs in this process several
    # times, and connection ids (hence recordIds) are unique per process only, so the key here also holds
    # the tradeId; a REST copy of a recorded trade has another recordId and still counts twice.
    seen: set[tuple[bytes, str]] = set()
    trades: list[Trade] = []
    for _, _, record, headers in rows:
        assert isinstance(record, Trade)
        if (headers["record_id"], record.trade_id) in seen:
            continue
        seen.add((headers["record_id"], record.trade_id))
        trades.append(record)
    for inst in INSTS:
        covered: Counter[int] = Counter()
        for t in trades:
            if t.inst_id == inst:
                covered.update(covered_trade_ids(int(t.trade_id), None))
        assert history[inst], "the market did not trade; the test would prove nothing"
        assert sorted(covered) == history[inst], f"{inst}: a tradeId of REST's history is missing or foreign"
        assert set(covered.values()) == {1}, f"{inst}: a tradeId is on the topic twice"
        assert any(t.source is Source.REST for t in trades if t.inst_id == inst)
