"""The recorder when its core cannot keep up: it says how far behind it is, and OKX's slow-consumer close is a gap.

The daemon's pipeline is held the way a saturated core holds it (the batch it took is not processed until the
test lets go): the inbox fills, the sockets pause, TCP pushes back on the simulator. What a user sees is then
asserted: `/readyz` and `/metrics` report the lag and readiness turns false; when the simulator's buffer for
the unread connection overflows it closes it with 4005, as OKX does, and that window is reported on
`okx.gaps` with bounds that hold exactly the trades nobody recorded.
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Callable, Sequence
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from ingest.core.events import Inbound
from ingest.core.records import GapEvent, TopicKind, Trade
from ingest.okx.channels import SubArg
from ingest.services.pipeline import Pipeline
from ingest.sim import SimConfig, SimServer
from tests.conftest import BrokerInfo
from tests.e2e.harness import RunningDaemon, TopicReader, daemon_settings, running

INST = "BTC-USDT"
ARG = SubArg("trades-all", INST)
SUBS = [{"channel": "trades-all", "inst_id": INST}]
#: Small, so the test need not wait seconds for the lag to pass it (the default is 5 s).
MAX_LAG_S = 0.2


class HeldPipeline:
    """Holds every batch of `pipeline` before it is processed until `release()`: a core that does not keep up."""

    def __init__(self, pipeline: Pipeline, monkeypatch: pytest.MonkeyPatch) -> None:
        self.holding = asyncio.Event()
        self._gate = asyncio.Event()
        handle_many = pipeline.handle_many

        async def held(items: Sequence[Inbound]) -> None:
            self.holding.set()
            await self._gate.wait()
            await handle_many(items)

        monkeypatch.setattr(pipeline, "handle_many", held)

    def release(self) -> None:
        self._gate.set()


def _pipeline(run: RunningDaemon) -> Pipeline:
    pipeline = run.daemon.parts.pipeline
    assert pipeline is not None
    return pipeline


def _port(run: RunningDaemon) -> int:
    health = run.daemon.parts.health
    assert health is not None and health.port is not None
    return health.port


async def _probe_until(port: int, done: Callable[[httpx.Response], bool], timeout_s: float = 30) -> httpx.Response:
    """GET /readyz until `done` holds (a condition, polled with a deadline as a kubelet's probe would)."""
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=5) as client:
        async with asyncio.timeout(timeout_s):
            while True:
                resp = await client.get("/readyz")
                if done(resp):
                    return resp
                await asyncio.sleep(0.05)  # the probe's period


async def _lag_metric(port: int) -> float:
    async with httpx.AsyncClient(timeout=5) as client:
        text = (await client.get(f"http://127.0.0.1:{port}/metrics")).text
    [value] = [s.value for fam in text_string_to_metric_families(text) for s in fam.samples
               if s.name == "okx_ingest_pipeline_lag_seconds"]
    return value


def _lag_reasons(resp: httpx.Response) -> list[str]:
    return [r for r in resp.json()["reasons"] if "pipeline lag" in r]


async def test_a_pipeline_that_falls_behind_reports_its_lag_and_is_not_ready_until_it_caught_up(
        kafka_broker: BrokerInfo, sim: SimServer, topic_prefix: str, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    settings = daemon_settings(sim, kafka_broker.bootstrap_servers, topic_prefix, tmp_path,
                               okx={"channels": [], "subscriptions": SUBS}, obs={"max_pipeline_lag_s": MAX_LAG_S})
    async with running(settings) as run:
        port, pipeline = _port(run), _pipeline(run)
        await sim.wait_subscribed(ARG, timeout=20)
        ready = await _probe_until(port, lambda r: r.status_code == 200)
        assert ready.json()["pipeline_lag_s"] <= MAX_LAG_S and not _lag_reasons(ready)

        held = HeldPipeline(pipeline, monkeypatch)
        await sim.tick(10)  # trades arrive; the pipeline takes the first batch and processes nothing
        await asyncio.wait_for(held.holding.wait(), 30)
        behind = await _probe_until(port, lambda r: bool(_lag_reasons(r)))
        [reason] = _lag_reasons(behind)
        assert behind.status_code == 503 and behind.json()["ready"] is False
        assert "obs.max_pipeline_lag_s" in reason and behind.json()["pipeline_lag_s"] > MAX_LAG_S
        assert await _lag_metric(port) > MAX_LAG_S

        held.release()
        await asyncio.wait_for(pipeline.inbox.join(), 30)  # everything received is processed
        caught_up = await _probe_until(port, lambda r: r.status_code == 200)
        assert caught_up.json()["pipeline_lag_s"] == 0 and not _lag_reasons(caught_up)
        assert await _lag_metric(port) == 0
        assert pipeline.stats.records["trades"] > 0


async def test_okx_closing_the_connection_a_held_pipeline_could_not_read_is_a_gap_with_exact_bounds(
        kafka_broker: BrokerInfo, topic_prefix: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A buffer of 2,000 frames stands for OKX's; no compression, so the sockets' buffers fill in a few MB.
    config = SimConfig(instruments=(INST,), seed=11, api_key=secrets.token_hex(16), api_secret=secrets.token_hex(32),
                       passphrase=secrets.token_hex(8), max_queue_frames=2_000, flush_timeout_s=0.05, compress=False)
    async with SimServer(config) as sim:
        settings = daemon_settings(sim, kafka_broker.bootstrap_servers, topic_prefix, tmp_path,
                                   okx={"channels": [], "subscriptions": SUBS}, ws={"compression": False})
        async with running(settings) as run:
            [first] = await sim.wait_subscribed(ARG, timeout=20)
            await sim.tick(10)  # recorded before the overload: the gap's lower bound
            held = HeldPipeline(_pipeline(run), monkeypatch)
            stats = sim.stats.connections[first]
            async with asyncio.timeout(120):
                while not stats.frames_overflowed:  # OKX keeps sending; the recorder reads ever less, then nothing
                    await sim.pump(sim.prepare_trades(INST, 500), batch=250)
            held.release()
            assert await sim.wait_closed(first, timeout=30) == 4005
            await sim.wait_until(lambda: _resubscribed(sim, first), timeout=30)
            await sim.tick(10)  # recorded after: the upper bound
            assert await run.shutdown() == 0
        sent = [r.trade_id for r in sim.market.trades(INST)]

    reader = TopicReader(kafka_broker.bootstrap_servers, topic_prefix)
    got = [t.trade_id for t in await reader.records(TopicKind.TRADES, Trade, at_least=1) if t.inst_id == INST]
    [gap] = [g for g in await reader.records(TopicKind.GAPS, GapEvent, at_least=1) if g.inst_id == INST]
    assert gap.kind.value == "disconnect" and "4005" in gap.reason and gap.conn_id is not None
    assert gap.before is not None and gap.after is not None
    assert gap.before.trade_id is not None and gap.after.trade_id is not None
    inside = [t for t in sent if int(gap.before.trade_id) < int(t) < int(gap.after.trade_id)]
    # What overflowed OKX's buffer (and what it did not send once closing) is inside the gap; every other
    # trade was recorded, once, in order: overload cost a reported window, nothing silently.
    assert len(inside) >= stats.frames_overflowed > 0
    lost = set(inside)
    assert got == [t for t in sent if t not in lost]


def _resubscribed(sim: SimServer, old: str) -> bool:
    """A connection other than `old` holds the arg again (the recorder reconnected after the 4005)."""
    return any(c.conn_id != old and ARG in c.subscriptions for c in sim.connections())
