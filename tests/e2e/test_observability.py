"""What an operator's Prometheus and Grafana see: the real recorder and backfill worker, scraped over HTTP.

The recorder runs against the simulator and the test broker; the backfill worker runs as `okx-ingest backfill`
in its own process. Every metric the Grafana dashboard and the alert rules query must be in their /metrics,
with its labelled series present from the start, so a panel or an alert never silently shows "no data".
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from ingest import __version__
from ingest.core.records import DeadLetterReason, GapKind, TopicKind
from ingest.io.broker import free_port
from ingest.okx.channels import SubArg
from ingest.sim import SimServer
from tests.conftest import BrokerInfo
from tests.e2e.harness import daemon_settings, running
from tests.promql import queried_metrics

SUBS = [{"channel": "trades", "inst_id": "BTC-USDT"}, {"channel": "books", "inst_id": "BTC-USDT"},
        {"channel": "tickers", "inst_id": "ETH-USDT"}]


async def _scrape(port: int) -> list[Sample]:
    async with httpx.AsyncClient(timeout=5) as client:
        resp = await client.get(f"http://127.0.0.1:{port}/metrics")
    resp.raise_for_status()
    return [s for fam in text_string_to_metric_families(resp.text) for s in fam.samples]


async def _scrape_until(port: int, ready: str, timeout_s: float = 60) -> list[Sample]:
    """Scrape until a sample named `ready` with a value > 0 is there (a condition, polled with a deadline)."""
    async with asyncio.timeout(timeout_s):
        while True:
            try:
                samples = await _scrape(port)
            except httpx.TransportError:  # the process is still starting
                samples = []
            if any(s.name == ready and s.value > 0 for s in samples):
                return samples
            await asyncio.sleep(0.2)  # polling another process's HTTP endpoint


@asynccontextmanager
async def _cli_child(subcommand: str, settings: dict[str, str]) -> AsyncIterator[None]:
    """`okx-ingest <subcommand>` as users run it, configured only from the environment: `settings` over ours
    minus any OKX_INGEST/OKX_API variable. Stopped as a service manager would (SIGTERM, killed after 30 s)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OKX_INGEST", "OKX_API"))}
    env.update(settings)
    proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "ingest.cli", subcommand, env=env,
                                                stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL)
    try:
        yield
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
            try:
                async with asyncio.timeout(30):
                    await proc.wait()
            except TimeoutError:
                proc.kill()
                await proc.wait()


@asynccontextmanager
async def _backfill_worker(sim: SimServer, bootstrap: str, prefix: str, journal: Path) -> AsyncIterator[int]:
    """`okx-ingest backfill` against the simulator; yields its metrics port."""
    port = free_port()
    async with _cli_child("backfill", {
        "OKX_INGEST__OKX__REST_BASE_URL": sim.rest_base, "OKX_INGEST__OKX__WS_BASE_URL": sim.ws_base,
        "OKX_INGEST__KAFKA__BOOTSTRAP_SERVERS": bootstrap, "OKX_INGEST__KAFKA__TOPIC_PREFIX": prefix,
        "OKX_INGEST__KAFKA__ENABLE_IDEMPOTENCE": "false", "OKX_INGEST__KAFKA__PARTITIONS": "3",
        "OKX_INGEST__JOURNAL__DIR": str(journal), "OKX_INGEST__BACKFILL__METRICS_PORT": str(port),
        "OKX_INGEST__OBS__LOG_FORMAT": "text", "OKX_INGEST__BACKFILL__GROUP_ID": f"{prefix}backfill",
    }):
        yield port


@asynccontextmanager
async def _archive_member(bootstrap: str, prefix: str, root: Path) -> AsyncIterator[int]:
    """`okx-ingest archive` writing to a local archive root; yields its metrics port."""
    port = free_port()
    async with _cli_child("archive", {
        "OKX_INGEST__KAFKA__BOOTSTRAP_SERVERS": bootstrap, "OKX_INGEST__KAFKA__TOPIC_PREFIX": prefix,
        "OKX_INGEST__ARCHIVE__URL": str(root), "OKX_INGEST__ARCHIVE__METRICS_PORT": str(port),
        "OKX_INGEST__ARCHIVE__GROUP_ID": f"{prefix}archive", "OKX_INGEST__OBS__LOG_FORMAT": "text",
    }):
        yield port


async def test_every_metric_the_dashboard_and_alerts_query_is_exported_with_its_series_from_the_start(
        kafka_broker: BrokerInfo, sim: SimServer, topic_prefix: str, tmp_path: Path) -> None:
    settings = daemon_settings(sim, kafka_broker.bootstrap_servers, topic_prefix, tmp_path / "recorder",
                               okx={"channels": [], "subscriptions": SUBS})
    async with running(settings) as run:
        health = run.daemon.parts.health
        assert health is not None and health.port is not None
        # Before any data: every labelled series the alerts and panels group by is already there, at zero.
        first = await _scrape(health.port)
        values = {(s.name, tuple(sorted(s.labels.items()))): s.value for s in first}
        for topic in TopicKind:
            assert values[("okx_ingest_records_total", (("topic", topic.value),))] >= 0
        for reason in DeadLetterReason:
            assert values[("okx_ingest_dead_letters_total", (("reason", reason.value),))] == 0
        for kind in GapKind:
            assert values[("okx_ingest_gaps_total", (("kind", kind.value),))] == 0
        assert values[("okx_ingest_auth_failures_total", ())] == 0

        for arg in (SubArg("trades", "BTC-USDT"), SubArg("books", "BTC-USDT"), SubArg("tickers", "ETH-USDT")):
            await sim.wait_subscribed(arg, timeout=20)
        await sim.tick(20)
        recorder = await _scrape_until(health.port, "okx_ingest_receive_to_ack_seconds_count")

        async with _backfill_worker(sim, kafka_broker.bootstrap_servers, topic_prefix, tmp_path / "bf") as port:
            backfill = await _scrape_until(port, "okx_ingest_build_info")
            async with asyncio.timeout(60):  # the backlog is known once the worker fetched its partitions
                while not any(s.name == "okx_ingest_backfill_backlog_gaps" for s in backfill):
                    await asyncio.sleep(0.2)  # polling the worker's endpoint
                    backfill = await _scrape(port)

        async with _archive_member(kafka_broker.bootstrap_servers, topic_prefix, tmp_path / "archive") as port:
            archive = await _scrape_until(port, "okx_ingest_build_info")

    exported = {s.name for s in recorder} | {s.name for s in backfill} | {s.name for s in archive}
    missing = {name: where for name, where in queried_metrics().items() if name not in exported}
    assert not missing, f"queried but not exported: {missing}"

    by_name = {s.name: s for s in recorder}
    assert by_name["okx_ingest_receive_to_ack_seconds_count"].value > 0  # trades were received and acknowledged
    assert by_name["okx_ingest_build_info"].labels["version"] == __version__
    assert by_name["okx_ingest_build_info"].labels["component"] == "recorder"
    assert by_name["okx_ingest_kafka_embedded"].value == 0
    assert by_name["process_resident_memory_bytes"].value > 0
    # Staleness per configured stream only (a bounded label set), young for the ones that just pushed.
    ages = {(s.labels["channel"], s.labels["inst"]): s.value for s in recorder
            if s.name == "okx_ingest_stream_last_message_age_seconds"}
    assert set(ages) == {("trades", "BTC-USDT"), ("books", "BTC-USDT"), ("tickers", "ETH-USDT")}
    assert ages[("books", "BTC-USDT")] < 30
    states = [s for s in recorder if s.name == "okx_ingest_ws_connection_state"]
    assert {s.labels["state"] for s in states} >= {"live", "connecting", "backing-off"}
    assert sum(s.value for s in states if s.labels["state"] == "live") == len({s.labels["conn"] for s in states})
    bf = {(s.name, tuple(sorted(s.labels.items()))): s.value for s in backfill}
    assert bf[("okx_ingest_build_info", (("component", "backfill"), ("python", sys.version.split()[0]),
                                         ("version", __version__)))] == 1
    for status in ("filled", "partial", "unfillable"):
        assert bf[("okx_ingest_backfill_gaps_total", (("status", status),))] == 0
    assert bf[("okx_ingest_backfill_backlog_gaps", ())] == 0  # no gaps: nothing behind
    ar = {(s.name, tuple(sorted(s.labels.items()))): s.value for s in archive}
    assert ar[("okx_ingest_build_info", (("component", "archive"), ("python", sys.version.split()[0]),
                                         ("version", __version__)))] == 1
    assert ar[("okx_ingest_archive_store_down", ())] == 0
    assert ar[("okx_ingest_archive_lag_seconds", ())] >= 0


async def test_readiness_and_metrics_say_when_the_memory_only_broker_is_in_use(
        sim: SimServer, topic_prefix: str, tmp_path: Path) -> None:
    settings = daemon_settings(sim, "embedded", topic_prefix, tmp_path,
                               okx={"channels": [], "subscriptions": SUBS[:1]})
    async with running(settings) as run:
        health = run.daemon.parts.health
        assert health is not None and health.port is not None
        async with httpx.AsyncClient(timeout=5) as client:
            ready = (await client.get(f"http://127.0.0.1:{health.port}/readyz")).json()
        samples = {s.name: s.value for s in await _scrape(health.port)}
    assert "memory only" in ready["kafka"]
    assert samples["okx_ingest_kafka_embedded"] == 1
