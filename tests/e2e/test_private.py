"""The private record end to end: simulator account -> daemon -> Kafka-protocol broker -> a consumer.

A user points okx-ingest at their account to keep an audit-grade record of orders, fills, positions and
balances. These tests trade on the simulator's scripted account and read the topics back with the .avsc files
alone: every state change once and in order per order, nothing missing after a reconnect (the REST
reconciliation fills the hole, marked `source = rest`), a refused subscription visible (channel-conn-count),
credentials rotated without a restart, refused logins paused instead of hammered, an over-privileged key
refused, a skewed clock corrected, and demo trading marked as such on every request.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import signal
from decimal import Decimal
from pathlib import Path

import pytest

from ingest.config import OkxSettings, WsSettings
from ingest.core.records import AlgoOrder, Balance, DeadLetter, Fill, GapEvent, Order, Position, Record, TopicKind
from ingest.okx.channels import Endpoint
from ingest.okx.endpoints import Environment
from ingest.services.connections import endpoint_url
from ingest.sim import KeyEnv, SimServer
from ingest.supervisor import Daemon
from tests.conftest import BrokerInfo
from tests.e2e.harness import TopicReader, running
from tests.e2e.private_support import (
    Keys,
    by_key,
    metric,
    private_settings,
    private_up,
    reconciled,
    scrape,
    until,
)
from tests.sim.wsclient import Client


def _states(records: list[tuple[int, Record]]) -> list[tuple[str | None, Decimal]]:
    out = []
    for _, r in records:
        assert isinstance(r, Order)
        out.append((r.state, Decimal(r.acc_fill_sz or "0")))
    return out


def _one_partition(rows: list[tuple[int, Record]]) -> bool:
    return len({p for p, _ in rows}) == 1


def _log_text(caplog: pytest.LogCaptureFixture, event: str) -> str:
    return "\n".join(f"{r.getMessage()} {r.__dict__}" for r in caplog.records if r.getMessage() == event)


# ------------------------------------------------------------------------------------------- the record


async def test_private_records_arrive_complete_once_in_order_and_keyed_by_order(
    kafka_broker: BrokerInfo, topic_prefix: str, tmp_path: Path
) -> None:
    keys = Keys.new()
    # OKX may push an order update more than once (SPEC 6): the simulator repeats every order push once.
    async with SimServer(keys.sim(repeat_order_pushes=1)) as sim:
        settings = private_settings(sim, kafka_broker.bootstrap_servers, topic_prefix, tmp_path,
                                    okx={"subscriptions": [{"channel": "fills"}]})
        async with running(settings, env=keys.env()) as run:
            await private_up(sim, ("orders", "fills", "positions", "account", "balance_and_position", "orders-algo"))
            await reconciled(run, 1)  # the start-up read: an empty account adds nothing
            acct = sim.account
            spot = await acct.place_order("BTC-USDT", "buy", "0.02", "50000.1", cl_ord_id="7001")
            await acct.fill(spot, "0.005")
            await acct.repeat_order_push(spot, times=2)  # again, with a new uTime each time
            await acct.fill(spot, "0.015")
            swap = await acct.place_order("BTC-USDT-SWAP", "sell", "3", "60000.5")
            await acct.fill(swap, "1")
            await acct.cancel(swap)
            await acct.repeat_order_push(swap, times=1, new_utime=False)
            market = await acct.place_order("BTC-USDT-SWAP", "buy", "1", ord_type="market")
            await acct.fill(market)
            algo = await acct.place_algo("BTC-USDT", "buy", "0.01", "40000")
            algo_cancel = await acct.place_algo("BTC-USDT-SWAP", "sell", "1", "90000")
            algo_order = await acct.trigger_algo(algo)
            await acct.cancel_algo(algo_cancel)
            await acct.transfer("USDT", "123.45")
            await acct.transfer("BTC", "-0.1")
            assert await run.shutdown() == 0
            pipeline = run.daemon.parts.pipeline
            assert pipeline is not None and pipeline.stats.private_repeats_dropped >= 12
            sim_orders = {o: acct.order_values(acct.orders[o]) for o in (spot, swap, market, algo_order)}
            sim_fills = [acct.fill_ws_row(f) for f in acct.fills]
            sim_position = acct.position_values(acct.positions["BTC-USDT-SWAP"])
            sim_balances = {ccy: acct.detail_values(ccy)["cashBal"] for ccy in acct.balances}

    reader = TopicReader(kafka_broker.bootstrap_servers, topic_prefix)
    orders = by_key(await reader.read(TopicKind.ORDERS, at_least=9))
    assert set(orders) == {o.encode() for o in sim_orders}, "every order, keyed by ordId"
    assert all(_one_partition(rows) for rows in orders.values()), "all updates of one order in one partition"
    expected = {
        spot: [("live", Decimal(0)), ("partially_filled", Decimal("0.005")), ("filled", Decimal("0.02"))],
        swap: [("live", Decimal(0)), ("partially_filled", Decimal(1)), ("canceled", Decimal(1))],
        market: [("live", Decimal(0)), ("filled", Decimal(1))],
        algo_order: [("live", Decimal(0))],
    }
    for ord_id, states in expected.items():
        assert _states(orders[ord_id.encode()]) == states, f"{ord_id}: each state change once, in order"
        last = orders[ord_id.encode()][-1][1]
        assert isinstance(last, Order)
        values = sim_orders[ord_id]
        # OKX's exact decimal strings, and every field it sent (nothing left over in `extra`).
        assert (last.px, last.sz, last.avg_px, last.fee, last.acc_fill_sz) == (
            values["px"], values["sz"], values["avgPx"], values["fee"], values["accFillSz"])
        assert all(isinstance(r, Order) and r.extra == {} and r.source.value == "ws" for _, r in
                   orders[ord_id.encode()])
    spot_last = orders[spot.encode()][-1][1]
    assert isinstance(spot_last, Order) and spot_last.cl_ord_id == "7001" and spot_last.px == "50000.1"

    fills = await reader.read(TopicKind.FILLS, at_least=len(sim_fills))
    got_fills = [(r.inst_id, r.trade_id, r.ord_id, r.fill_px, r.fill_sz, r.side, r.exec_type)
                 for _, _, r, _ in fills if isinstance(r, Fill)]
    want_fills = [(f["instId"], f["tradeId"], f["ordId"], f["fillPx"], f["fillSz"], f["side"], f["execType"])
                  for f in sim_fills]
    assert sorted(got_fills) == sorted(want_fills), "every fill once, with OKX's strings"
    assert all(key == r.ord_id.encode() for _, key, r, _ in fills if isinstance(r, Fill))

    positions = [r for _, _, r, _ in await reader.read(TopicKind.POSITIONS, at_least=1) if isinstance(r, Position)]
    last_position = [p for p in positions if p.channel == "positions"][-1]
    assert (last_position.inst_id, last_position.pos, last_position.avg_px) == (
        "BTC-USDT-SWAP", sim_position["pos"], sim_position["avgPx"])

    balances = by_key(await reader.read(TopicKind.BALANCES, at_least=1))
    for ccy, cash in sim_balances.items():
        last_balance = [b for _, b in balances[ccy.encode()] if isinstance(b, Balance) and b.channel == "account"][-1]
        assert isinstance(last_balance, Balance) and last_balance.cash_bal == cash, ccy

    algos = by_key(await reader.read(TopicKind.ALGO_ORDERS, at_least=4))
    assert [(r.state, r.ord_id) for _, r in algos[algo.encode()] if isinstance(r, AlgoOrder)] == [
        ("live", ""), ("effective", algo_order)]
    assert [r.state for _, r in algos[algo_cancel.encode()] if isinstance(r, AlgoOrder)] == ["live", "canceled"]
    assert await reader.records(TopicKind.GAPS, GapEvent) == []
    assert await reader.records(TopicKind.DLQ, DeadLetter) == []


# ------------------------------------------------------------------------------------------- reconnect


async def test_reconnect_is_reconciled_from_rest_and_nothing_is_missing(
    kafka_broker: BrokerInfo, topic_prefix: str, tmp_path: Path
) -> None:
    keys = Keys.new()
    async with SimServer(keys.sim()) as sim:
        acct = sim.account
        before_start = await acct.place_order("BTC-USDT", "sell", "0.01", "70000")  # placed while no daemon ran
        settings = private_settings(sim, kafka_broker.bootstrap_servers, topic_prefix, tmp_path)
        async with running(settings, env=keys.env()) as run:
            pipeline = run.daemon.parts.pipeline
            assert pipeline is not None
            await private_up(sim)
            await reconciled(run, 1)
            resting = await acct.place_order("BTC-USDT", "buy", "0.01", "50000")  # untouched by the outage
            to_fill = await acct.place_order("BTC-USDT", "buy", "0.01", "50000")
            to_cancel = await acct.place_order("BTC-USDT", "buy", "0.02", "50000")
            await acct.fill(to_cancel, "0.01")

            sim.faults.reject_connects(count=1_000_000)  # keep the private connection down while trading goes on
            sim.faults.drop(kind="abort", endpoint="private")
            await sim.wait_until(lambda: not sim.connections("private"), timeout=10)
            await acct.fill(to_fill)
            await acct.cancel(to_cancel)
            new_partial = await acct.place_order("BTC-USDT", "buy", "0.03", "50000")
            await acct.fill(new_partial, "0.01")
            new_live = await acct.place_order("BTC-USDT", "sell", "0.01", "80000")
            swap = await acct.place_order("BTC-USDT-SWAP", "buy", "2", "60000")
            await acct.fill(swap)
            await acct.transfer("USDT", "7")
            outage_fills = {f.trade_id for f in acct.fills[-3:]}
            reads = pipeline.stats.reconciliations
            sim.faults.clear()

            await private_up(sim)
            await reconciled(run, reads + 1)
            after = await acct.place_order("BTC-USDT", "buy", "0.01", "50000")
            await acct.fill(after)
            assert await run.shutdown() == 0
            final = {o.ord_id: (o.state, o.acc_fill_sz) for o in acct.orders.values()}
            sim_fills = {f.trade_id: acct.fill_values(f) for f in acct.fills}
        assert sim.stats.violations == 0, "the reconciliation stayed within OKX's REST limits"

    reader = TopicReader(kafka_broker.bootstrap_servers, topic_prefix)
    orders = by_key(await reader.read(TopicKind.ORDERS, at_least=len(final)))
    assert set(orders) == {o.encode() for o in final}, "every order is on record"
    for ord_id, (state, acc) in final.items():
        states = _states(orders[ord_id.encode()])
        assert states[-1] == (state, acc), f"{ord_id}: the record ends in the order's real state"
        assert len(states) == len(set(states)), f"{ord_id}: a state recorded twice"

    def sources(ord_id: str) -> list[str]:
        return [r.source.value for _, r in orders[ord_id.encode()] if isinstance(r, Order)]

    assert sources(before_start) == ["rest"], "an order placed before start-up is put on record from REST"
    assert sources(resting) == ["ws"], "an order the outage did not touch is not published again"
    assert sources(to_fill) == ["ws", "rest"] and sources(to_cancel) == ["ws", "ws", "rest"]
    assert sources(new_partial) == ["rest"] and sources(new_live) == ["rest"] and sources(swap) == ["rest"]
    assert sources(after) == ["ws", "ws"], "the stream carries on after the reconciliation"

    # Every fill is on record exactly once: as an orders push with its tradeId, or (missed) on okx.fills.
    pushed = {r.trade_id for rows in orders.values() for _, r in rows
              if isinstance(r, Order) and r.source.value == "ws" and r.trade_id}
    fills = [r for _, _, r, _ in await reader.read(TopicKind.FILLS, at_least=len(outage_fills))
             if isinstance(r, Fill)]
    assert {f.trade_id for f in fills} == outage_fills and len(fills) == len(outage_fills)
    assert all(f.source.value == "rest" and f.record_id.startswith("rest:fills:") for f in fills)
    assert pushed | outage_fills == set(sim_fills) and not pushed & outage_fills
    for f in fills:
        row = sim_fills[f.trade_id]
        assert (f.fill_px, f.fill_sz, f.fee, f.bill_id) == (row["fillPx"], row["fillSz"], row["fee"], row["billId"])

    gaps = [g for g in await reader.records(TopicKind.GAPS, GapEvent, at_least=1) if g.channel == "orders"]
    assert [(g.kind.value, g.status.value) for g in gaps] == [("disconnect", "filled")]
    assert gaps[0].records_filled == 5 + 3 and gaps[0].note and "source=rest" in gaps[0].note


# ------------------------------------------------------------------------------------------- channel-conn-count


async def test_channel_conn_count_error_is_a_visible_gap_and_the_state_is_still_recorded(
    kafka_broker: BrokerInfo, topic_prefix: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    keys = Keys.new()
    caplog.set_level(logging.INFO)
    # OKX allows N connections per private channel per sub-account; another app already holds `account`.
    async with SimServer(keys.sim(conn_cap_per_channel=1)) as sim, \
            await Client.connect(sim.ws_url("private")) as other:
        assert (await other.login(*keys.values()))["event"] == "login"
        await other.subscribe({"channel": "account"})
        settings = private_settings(sim, kafka_broker.bootstrap_servers, topic_prefix, tmp_path)
        async with running(settings, env=keys.env()) as run:
            pipeline = run.daemon.parts.pipeline
            assert pipeline is not None
            await private_up(sim, ("orders", "positions", "balance_and_position"))
            await until(lambda: pipeline.stats.gaps["subscribe_failed"] == 1, "the subscribe_failed gap")
            await reconciled(run, 1)
            order = await sim.account.place_order("BTC-USDT", "buy", "0.01", "50000")
            await sim.account.fill(order)
            await reconciled(run, 1)
            metrics = await scrape(run)
            assert await run.shutdown() == 0
        cash = {ccy: sim.account.detail_values(ccy)["cashBal"] for ccy in ("USDT", "BTC")}
        initial_cash = {"USDT": "10000", "BTC": "0.5"}

    assert metric(metrics, "okx_ingest_ws_subscribe_failures_total", conn="private-0") == 1
    assert metric(metrics, "okx_ingest_okx_events_total", event="channel-conn-count-error") == 1
    assert (metric(metrics, "okx_ingest_okx_events_total", event="channel-conn-count") or 0) >= 3
    assert metric(metrics, "okx_ingest_gaps_total", kind="subscribe_failed") == 1
    assert "channel-conn-count-error" in _log_text(caplog, "ws_subscribe_failed")

    reader = TopicReader(kafka_broker.bootstrap_servers, topic_prefix)
    gaps = await reader.records(TopicKind.GAPS, GapEvent, at_least=1)
    assert [(g.channel, g.kind.value, g.status.value) for g in gaps] == [("account", "subscribe_failed", "open")]
    assert "channel-conn-count-error" in gaps[0].reason
    balances = await reader.records(TopicKind.BALANCES, Balance, at_least=1)
    # The refused channel's state is still on record: read over REST when OKX terminated the subscription.
    rest = {b.ccy: b.cash_bal for b in balances if b.source.value == "rest" and b.ccy}
    assert rest == initial_cash
    # ... and its later changes arrive on balance_and_position, which was not refused.
    last = {b.ccy: b.cash_bal for b in balances if b.channel == "balance_and_position" and b.ccy}
    assert last == cash
    assert [r.state for r in await reader.records(TopicKind.ORDERS, Order, at_least=2)] == ["live", "filled"]


# ------------------------------------------------------------------------------------------- credentials


@pytest.mark.parametrize("trigger", ["file-change", "sighup"])
async def test_rotated_credentials_log_in_again_without_a_restart_and_records_keep_flowing(
    trigger: str, kafka_broker: BrokerInfo, topic_prefix: str, tmp_path: Path
) -> None:
    old, new = Keys.new(), Keys.new()
    secret_dir = tmp_path / "secrets"
    env = old.write_files(secret_dir)  # Kubernetes secret volume / systemd LoadCredential style
    poll_s = 0.05 if trigger == "file-change" else 3600.0  # the SIGHUP run must not be rescued by the watcher
    async with SimServer(old.sim()) as sim:
        settings = private_settings(sim, kafka_broker.bootstrap_servers, topic_prefix, tmp_path,
                                    okx={"credential_poll_s": poll_s})
        async with running(settings, env=env) as run:
            store = run.daemon.parts.store
            assert store is not None
            await private_up(sim)
            before = {c.conn_id for c in sim.connections()}
            first = await sim.account.place_order("BTC-USDT", "buy", "0.01", "50000")

            sim.set_credentials(*new.values())  # the new key is live at OKX; the old one no longer logs in
            new.write_files(secret_dir)
            if trigger == "sighup":
                os.kill(os.getpid(), signal.SIGHUP)
            await sim.wait_until(lambda: not any(c.conn_id in before for c in sim.connections())
                                 and len([c for c in sim.connections() if c.logged_in]) == 2, timeout=20)
            await private_up(sim)
            assert store.version == 2 and store.current().key_hint == "…" + new.api_key[-4:]
            # Signed REST follows the rotation too: a reconnect's reconciliation reads with the new key.
            pipeline = run.daemon.parts.pipeline
            assert pipeline is not None
            rotated_at, reads = len(sim.stats.rest_log), pipeline.stats.reconciliations
            sim.faults.drop(kind="abort", endpoint="private")
            await reconciled(run, reads + 1)
            second = await sim.account.place_order("BTC-USDT", "buy", "0.01", "50000")
            await sim.account.fill(second)
            assert await run.shutdown() == 0
        assert run.exit_code == 0
        logins = [s for s in sim.stats.connections.values() if s.logins]
        assert len(logins) == 5, "2 logins with the old key; their replacements and a reconnect with the new"
        signed = [r for r in list(sim.stats.rest_log)[rotated_at:] if r.key]
        assert signed and all(r.key == new.api_key and r.code == "0" for r in signed)

    reader = TopicReader(kafka_broker.bootstrap_servers, topic_prefix)
    orders = by_key(await reader.read(TopicKind.ORDERS, at_least=3))
    assert _states(orders[first.encode()]) == [("live", Decimal(0))]
    assert _states(orders[second.encode()]) == [("live", Decimal(0)), ("filled", Decimal("0.01"))]
    gaps = await reader.records(TopicKind.GAPS, GapEvent, at_least=1)
    # The rotation left no hole (the new login took over before the old connection closed): the only gaps are
    # the deliberate drop of its replacement (private-0#2) afterwards, and the orders one is filled from REST.
    assert all(g.kind.value == "disconnect" and (g.conn_id or "").startswith("private-0#2-") for g in gaps)
    assert [g.status.value for g in gaps if g.channel == "orders"] == ["filled"]


async def test_refused_logins_are_counted_alert_and_pause_until_the_key_changes(
    kafka_broker: BrokerInfo, topic_prefix: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    old, new = Keys.new(), Keys.new()
    caplog.set_level(logging.INFO)
    secret_dir = tmp_path / "secrets"
    env = old.write_files(secret_dir)
    async with SimServer(old.sim()) as sim:
        sim.faults.reject_logins(code="60009", count=None)  # OKX refuses every login with this key
        settings = private_settings(sim, kafka_broker.bootstrap_servers, topic_prefix, tmp_path, okx={
            "credential_poll_s": 0.05, "auth_failure_threshold": 3, "auth_pause_initial_s": 3600.0,
            "auth_pause_max_s": 3600.0})
        async with running(settings, env=env) as run:
            def paused() -> int:
                return len([r for r in caplog.records if r.getMessage() == "ws_login_paused"])

            await until(lambda: paused() == 2, "both logged-in connections waiting out the pause")
            attempts = sum(c.logins for c in sim.stats.connections.values())
            metrics = await scrape(run)
            # The operator fixes the key (the alert says how): the pause ends at once, one login each.
            sim.faults.clear()
            sim.set_credentials(*new.values())
            new.write_files(secret_dir)
            await private_up(sim)
            assert sum(c.logins for c in sim.stats.connections.values()) == attempts + 2, "no login during the pause"
            assert await run.shutdown() == 0

    assert 3 <= attempts <= 4  # the threshold, plus at most the other connection's login already in flight
    assert metric(metrics, "okx_ingest_auth_failures_total") == attempts
    alerts = [r for r in caplog.records if r.getMessage() == "okx_auth_paused"]
    assert alerts and alerts[0].levelno == logging.CRITICAL and alerts[0].__dict__["alert"] is True
    assert "rotate the credential files or send SIGHUP" in alerts[0].__dict__["fix"]


async def test_a_key_that_can_withdraw_is_refused_before_anything_private_connects(
    kafka_broker: BrokerInfo, topic_prefix: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    keys = Keys.new()
    async with SimServer(keys.sim(perm="read_only,withdraw,trade")) as sim:
        settings = private_settings(sim, kafka_broker.bootstrap_servers, topic_prefix, tmp_path)
        code = await asyncio.wait_for(Daemon(settings, env=keys.env()).run(asyncio.Event()), 30)
        assert code == 2
        assert sim.stats.ws_connect_attempts == 0, "no WebSocket was opened with that key"
        assert [r.path for r in sim.stats.rest_log if r.key] == ["/api/v5/account/config"]
    error = _log_text(caplog, "startup_failed")
    assert "can withdraw funds" in error and "read-only key" in error
    assert "allow_withdraw_permission" in error  # the explicit opt-in, named


async def test_a_key_that_can_trade_is_accepted_with_a_warning_and_its_permissions_reported_once(
    kafka_broker: BrokerInfo, topic_prefix: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    keys = Keys.new()
    caplog.set_level(logging.INFO)
    async with SimServer(keys.sim(perm="read_only,trade")) as sim:
        settings = private_settings(sim, kafka_broker.bootstrap_servers, topic_prefix, tmp_path)
        async with running(settings, env=keys.env()) as run:
            await private_up(sim)
            assert await run.shutdown() == 0
    reports = [r for r in caplog.records if r.getMessage() == "okx_key_permissions"]
    assert len(reports) == 1 and reports[0].__dict__["perms"] == ["read_only", "trade"]
    assert len([r for r in caplog.records if r.getMessage() == "okx_key_can_trade"]) == 1


# ------------------------------------------------------------------------------------------- clock


@pytest.mark.parametrize("skew_ms", [40_000, -40_000])
async def test_a_skewed_clock_is_measured_and_corrected_for_logins_and_signed_requests(
    skew_ms: int, kafka_broker: BrokerInfo, topic_prefix: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    keys = Keys.new()
    async with SimServer(keys.sim()) as sim:
        sim.faults.clock_offset(skew_ms)  # OKX's clock is 40 s away from ours: beyond its 30 s window
        settings = private_settings(sim, kafka_broker.bootstrap_servers, topic_prefix, tmp_path)
        async with running(settings, env=keys.env()) as run:
            await private_up(sim)  # logged in: the login timestamps were corrected
            await reconciled(run, 1)  # signed REST reads succeeded
            order = await sim.account.place_order("BTC-USDT", "buy", "0.01", "50000")
            metrics = await scrape(run)
            assert await run.shutdown() == 0
        signed = [r for r in sim.stats.rest_log if r.key]
        assert signed and all(r.code == "0" for r in signed), "no signed request was rejected (50102)"
        assert not [s for s in sim.stats.connections.values() if s.logins > 1], "every login succeeded at once"

    offset = metric(metrics, "okx_ingest_clock_offset_seconds")
    assert offset is not None and abs(offset - skew_ms / 1000) < 1.0
    critical = _log_text(caplog, "clock_offset_critical")
    assert "NTP" in critical and "30 s" in critical and "will fail" in critical
    reader = TopicReader(kafka_broker.bootstrap_servers, topic_prefix)
    assert [o.ord_id for o in await reader.records(TopicKind.ORDERS, Order, at_least=1)] == [order]


# ------------------------------------------------------------------------------------------- demo trading


async def test_demo_mode_marks_every_request_as_simulated_trading_and_uses_the_demo_hosts(
    kafka_broker: BrokerInfo, topic_prefix: str, tmp_path: Path
) -> None:
    keys = Keys.new()
    async with SimServer(keys.sim(key_env=KeyEnv.DEMO)) as sim:
        settings = private_settings(sim, kafka_broker.bootstrap_servers, topic_prefix, tmp_path,
                                    okx={"environment": "demo"})
        async with running(settings, env=keys.env()) as run:
            await private_up(sim)
            await reconciled(run, 1)
            order = await sim.account.place_order("BTC-USDT", "buy", "0.01", "50000")
            await sim.account.fill(order)
            assert await run.shutdown() == 0
        signed = [r for r in sim.stats.rest_log if r.key]
        assert len(signed) >= 3 and all(r.code == "0" for r in signed)
        assert all(r.demo for r in sim.stats.rest_log), "every request carried x-simulated-trading: 1"

    reader = TopicReader(kafka_broker.bootstrap_servers, topic_prefix)
    assert [o.state for o in await reader.records(TopicKind.ORDERS, Order, at_least=2)] == ["live", "filled"]
    # Without the test's URL overrides, demo mode connects to OKX's demo hosts.
    demo = OkxSettings(environment=Environment.DEMO)
    assert [endpoint_url(demo, WsSettings(), e) for e in Endpoint] == [
        "wss://wspap.okx.com/ws/v5/public", "wss://wspap.okx.com/ws/v5/business", "wss://wspap.okx.com/ws/v5/private"]


async def test_a_live_key_in_demo_mode_is_refused_with_an_error_that_says_so(
    kafka_broker: BrokerInfo, topic_prefix: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    keys = Keys.new()
    async with SimServer(keys.sim(key_env=KeyEnv.LIVE)) as sim:
        settings = private_settings(sim, kafka_broker.bootstrap_servers, topic_prefix, tmp_path,
                                    okx={"environment": "demo"})
        code = await asyncio.wait_for(Daemon(settings, env=keys.env()).run(asyncio.Event()), 30)
        assert code == 2
        assert [(r.code, r.demo) for r in sim.stats.rest_log if r.key] == [("50101", True)]
    error = _log_text(caplog, "startup_failed")
    assert "50101" in error and "runs in demo mode" in error and "created for live trading" in error


async def test_a_rotation_to_a_key_that_can_withdraw_is_never_used_and_stops_the_recorder_with_exit_2(
    kafka_broker: BrokerInfo, topic_prefix: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Least privilege holds after a rotation too, fail closed: the new key's permissions are read (one signed
    request of its own) before anything logs in with it; refused, the recorder stops with exit 2 as at start-up."""
    old, new = Keys.new(), Keys.new()
    secret_dir = tmp_path / "secrets"
    env = old.write_files(secret_dir)
    async with SimServer(old.sim()) as sim:
        settings = private_settings(sim, kafka_broker.bootstrap_servers, topic_prefix, tmp_path,
                                    okx={"credential_poll_s": 0.05})
        async with running(settings, env=env) as run:
            await private_up(sim)
            sim.set_credentials(*new.values())
            sim.config = sim.rest.config = dataclasses.replace(sim.config, perm="read_only,withdraw,trade")
            new.write_files(secret_dir)
            code = await asyncio.wait_for(run.task, 30)
        assert code == 2
        assert new.api_key not in sim.stats.ws_login_keys, "no WebSocket login with the refused key"
        assert [r.path for r in sim.stats.rest_log if r.key == new.api_key] == ["/api/v5/account/config"]
    refusal = _log_text(caplog, "credentials_rotation_refused")
    assert "can withdraw funds" in refusal


async def test_a_rotation_to_a_wrong_passphrase_keeps_the_old_key_recording_and_alerts(
    kafka_broker: BrokerInfo, topic_prefix: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A typo in a rotated secret file must not take a running recorder down: the old key keeps working, the
    refusal is an alert (log line and metric), and a corrected rotation is then taken as usual."""
    old, new = Keys.new(), Keys.new()
    secret_dir = tmp_path / "secrets"
    env = old.write_files(secret_dir)
    async with SimServer(old.sim()) as sim:
        settings = private_settings(sim, kafka_broker.bootstrap_servers, topic_prefix, tmp_path,
                                    okx={"credential_poll_s": 0.05})
        async with running(settings, env=env) as run:
            store = run.daemon.parts.store
            assert store is not None
            await private_up(sim)
            logins_before = len(sim.stats.ws_login_keys)
            dataclasses.replace(old, passphrase=old.passphrase + "x").write_files(secret_dir)
            await until(lambda: store.rotations_refused_total == 1, "the rotation refused")
            assert store.version == 1 and store.current().key_hint == "…" + old.api_key[-4:]
            assert len(sim.stats.ws_login_keys) == logins_before, "nothing logged in with the wrong passphrase"
            assert metric(await scrape(run), "okx_ingest_credential_rotations_refused_total") == 1
            order = await sim.account.place_order("BTC-USDT", "buy", "0.01", "50000")  # still recording

            sim.set_credentials(*new.values())  # the operator fixes it with a proper new key
            new.write_files(secret_dir)
            await sim.wait_until(lambda: sim.stats.ws_login_keys.count(new.api_key) == 2, timeout=20)
            assert store.version == 2
            assert await run.shutdown() == 0
        assert run.exit_code == 0
        assert set(sim.stats.ws_login_keys[logins_before:]) == {new.api_key}
    refusal = [r for r in caplog.records if r.getMessage() == "credentials_rotation_refused"]
    assert len(refusal) == 1 and refusal[0].levelno == logging.CRITICAL and refusal[0].__dict__["alert"] is True
    assert "50105" in refusal[0].__dict__["error"]
    reader = TopicReader(kafka_broker.bootstrap_servers, topic_prefix)
    assert order in {o.ord_id for o in await reader.records(TopicKind.ORDERS, Order, at_least=1)}
