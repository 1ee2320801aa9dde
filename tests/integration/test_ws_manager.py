"""The connection manager: endpoints and URLs, login where needed, OKX's limits under a reconnect storm,
recovery after a key fix, resubscribe routing, and a clean shutdown."""

from __future__ import annotations

import asyncio
import secrets
from collections import Counter

import pytest

from ingest.config import OkxSettings, Subscription
from ingest.core.events import Inbound, LinkEventKind
from ingest.credentials import CredentialStore
from ingest.errors import CredentialError
from ingest.okx.channels import Endpoint, SubArg
from ingest.okx.endpoints import Environment
from ingest.services.connections import ConnectionManager, endpoint_url
from ingest.sim import SimServer

from ._ws_support import (
    INST,
    STEP,
    WINDOW,
    FakeTimer,
    Keys,
    RecordedLimiter,
    Recorder,
    count,
    fast_ws,
    local_clock,
    log_events,
    running,
    steady_backoff,
    until,
)

SUBSCRIBED = LinkEventKind.SUBSCRIBED
DISCONNECTED = LinkEventKind.DISCONNECTED


def _subs(*items: tuple[str, str | None, str | None]) -> list[Subscription]:
    return [Subscription(channel=c, inst_id=i, inst_type=t) for c, i, t in items]


def test_default_urls_are_the_port_443_hosts_and_demo_uses_wspap() -> None:
    ws = fast_ws()
    assert endpoint_url(OkxSettings(), ws, Endpoint.PUBLIC) == "wss://ws.okx.com/ws/v5/public"
    assert endpoint_url(OkxSettings(), ws, Endpoint.PRIVATE) == "wss://ws.okx.com/ws/v5/private"
    demo = OkxSettings(environment=Environment.DEMO)
    assert endpoint_url(demo, ws, Endpoint.BUSINESS) == "wss://wspap.okx.com/ws/v5/business"
    base = OkxSettings(ws_base_url="wss://ws.okx.com:8443")
    assert endpoint_url(base, ws, Endpoint.PUBLIC) == "wss://ws.okx.com:8443/ws/v5/public"
    one = fast_ws(private_url="wss://eea.example/ws/v5/private")
    assert endpoint_url(base, one, Endpoint.PRIVATE) == "wss://eea.example/ws/v5/private"
    assert endpoint_url(base, one, Endpoint.BUSINESS) == "wss://ws.okx.com:8443/ws/v5/business"


def test_channels_that_need_a_login_without_credentials_fail_at_startup_naming_the_fix() -> None:
    okx = OkxSettings(subscriptions=_subs(("orders", None, "ANY")), channels=[])
    with pytest.raises(CredentialError, match="OKX_API_KEY"):
        ConnectionManager(okx, fast_ws(), asyncio.Queue())


async def test_each_subscription_is_carried_by_its_endpoint_with_login_only_where_needed() -> None:
    keys = Keys()
    timer = FakeTimer()  # OKX counts connects on the same fake clock
    async with SimServer(keys.sim_config(timer=timer)) as sim:
        okx = OkxSettings(ws_base_url=sim.ws_base, channels=[], subscriptions=_subs(
            ("trades", INST, None), ("candle1m", INST, None), ("trades-all", "ETH-USDT", None),
            ("books-l2-tbt", INST, None), ("account", None, None), ("orders", None, "ANY")))
        queue: asyncio.Queue[Inbound] = asyncio.Queue(10_000)
        rec = Recorder(queue)
        limiter = RecordedLimiter(timer)
        manager = ConnectionManager(okx, fast_ws(), queue, credentials=keys.store(), clock=local_clock(),
                                    timer=timer, limiter=limiter)
        assert sorted(c.name for c in manager.plan) == ["business-0", "private-0", "public-0", "public-login-0"]
        with log_events() as logs:
            async with running(rec.run(), manager.run()):
                t0 = timer.now()
                await until(lambda: len(limiter.starts) == 3 and limiter.in_flight == 0, "three handshakes")
                await timer.advance_to(t0 + WINDOW)  # the fourth connection waits for OKX's next second
                await rec.wait_for(lambda i: count(SUBSCRIBED)(i) == 6)
                await sim.wait_subscribed({"channel": "candle1m"}, endpoint="business")
                await sim.wait_subscribed({"channel": "trades-all"}, endpoint="business")
                await sim.wait_subscribed({"channel": "books-l2-tbt"}, endpoint="public")
                await sim.wait_subscribed({"channel": "orders"}, endpoint="private")
                await logs.wait_until(lambda rs: sum(1 for r in rs if r.getMessage() == "ws_state"
                                                     and getattr(r, "to", None) == "live") == 4)
                assert manager.status().live == 4
        assert limiter.starts == [t0, t0, t0, t0 + WINDOW]
        logged_in = {c.endpoint: c.logins for c in sim.stats.connections.values() if c.logins}
        assert logged_in == {Endpoint.PUBLIC: 1, Endpoint.PRIVATE: 1}
        # Shutdown balances every SUBSCRIBED with a DISCONNECTED.
        subscribed = Counter((e.conn, a) for e in rec.events(SUBSCRIBED) for a in e.args)
        disconnected = Counter((e.conn, a) for e in rec.events(DISCONNECTED) for a in e.args)
        assert subscribed == disconnected


async def test_a_reconnect_storm_of_many_connections_stays_within_okx_connect_rate_and_budget() -> None:
    timer = FakeTimer()  # OKX counts connects on the same fake clock
    async with SimServer(Keys().sim_config(timer=timer)) as sim:
        channels = ["trades", "tickers", "books5", "bbo-tbt"]
        okx = OkxSettings(ws_base_url=sim.ws_base, instruments=[INST, "ETH-USDT"], channels=channels)
        queue: asyncio.Queue[Inbound] = asyncio.Queue(10_000)
        rec = Recorder(queue)
        limiter = RecordedLimiter(timer)
        # Timeouts beyond the storm's few seconds of fake time: only the limiter and the backoff are under test.
        ws = fast_ws(args_per_connection=1, requests_per_hour=2, keepalive_s=20.0, pong_timeout_s=10.0,
                     subscribe_timeout_s=10.0)
        manager = ConnectionManager(okx, ws, queue, timer=timer, limiter=limiter, backoff=steady_backoff())
        assert len(manager.connections) == 8

        async def advance_to(at: float, sleepers: int = 1) -> None:
            # An attempt ends on the fake clock when its handshake ends: let them all end before time moves.
            await until(lambda: limiter.in_flight == 0, "the handshakes under way")
            await timer.advance_to(at, sleepers)

        async with running(rec.run(), manager.run()):
            t0 = timer.now()
            for at in (WINDOW, 2 * WINDOW):  # three places per window
                await advance_to(t0 + at)
            await rec.wait_for(lambda i: count(SUBSCRIBED)(i) == 8, timeout=10)
            sim.faults.drop("abort")  # all eight at once
            await advance_to(t0 + 2 * WINDOW + STEP, sleepers=8)  # eight backoffs of one step
            # The window still holds the two connects of 2 * WINDOW: one place now, then as the window moves on.
            for at in (3 * WINDOW, 3 * WINDOW + STEP, 4 * WINDOW, 4 * WINDOW + STEP, 5 * WINDOW):
                await advance_to(t0 + at)
            await rec.wait_for(lambda i: count(SUBSCRIBED)(i) == 16, timeout=10)
    w, s = WINDOW, STEP
    assert limiter.starts == [t0 + at for at in (0, 0, 0, w, w, w, 2 * w, 2 * w,
                                                 2 * w + s, 3 * w, 3 * w, 3 * w + s, 4 * w, 4 * w, 4 * w + s, 5 * w)]
    assert all(later - earlier >= WINDOW for earlier, later in zip(limiter.starts, limiter.starts[3:], strict=False))
    assert sim.stats.ws_connects == 16
    assert sim.stats.ws_connects_rejected == 0  # never more than 3 connects in any second
    assert sim.stats.violations == 0
    assert max(c.requests for c in sim.stats.connections.values()) == 1
    assert manager.status().connects_admitted == 16


async def test_a_connection_stopped_by_a_wrong_passphrase_recovers_when_the_secret_is_fixed() -> None:
    keys = Keys()
    env = {"OKX_API_KEY": keys.api_key, "OKX_API_SECRET": keys.secret, "OKX_API_PASSPHRASE": secrets.token_hex(8)}
    store = CredentialStore(env)
    async with SimServer(keys.sim_config()) as sim:
        okx = OkxSettings(ws_base_url=sim.ws_base, channels=[], subscriptions=_subs(("account", None, None)))
        queue: asyncio.Queue[Inbound] = asyncio.Queue(10_000)
        rec = Recorder(queue)
        manager = ConnectionManager(okx, fast_ws(), queue, credentials=store, clock=local_clock())
        with log_events() as logs:
            async with running(rec.run(), manager.run()):
                await logs.wait("ws_connection_stopped")
                status = manager.status()
                assert "60024" in status.stopped["private-0"]
                assert status.connections[0].state.value == "stopped"
                env["OKX_API_PASSPHRASE"] = keys.passphrase  # the operator fixes the secret file
                assert await store.reload()
                await rec.wait_for(lambda i: count(SUBSCRIBED)(i) == 1)
                assert manager.status().stopped == {}
    assert [c.logins for c in sim.stats.connections.values()] == [1, 1]  # no retry with the wrong key
    assert rec.events(LinkEventKind.SUBSCRIBE_FAILED)[0].code == "60024"


async def test_resubscribe_requests_reach_the_connection_that_carries_the_arg() -> None:
    async with SimServer(Keys().sim_config()) as sim:
        okx = OkxSettings(ws_base_url=sim.ws_base, instruments=[INST], channels=["books", "trades"])
        queue: asyncio.Queue[Inbound] = asyncio.Queue(10_000)
        rec = Recorder(queue)
        manager = ConnectionManager(okx, fast_ws(args_per_connection=1), queue)
        books = SubArg("books", inst_id=INST)
        with log_events() as logs:
            async with running(rec.run(), manager.run()):
                await rec.wait_for(lambda i: count(SUBSCRIBED)(i) == 2)
                manager.request_resubscribe(books, "seqId break")
                manager.request_resubscribe(SubArg("books", inst_id="NOT-CARRIED"), "bogus")
                await rec.wait_for(lambda i: count(SUBSCRIBED)(i) == 3)
                await logs.wait("ws_resubscribe_ignored")
    unsubscribed = [c for c in sim.stats.connections.values() if c.unsubscribes]
    assert len(unsubscribed) == 1
    [resub] = [e for e in rec.events(DISCONNECTED) if e.reason == "resubscribe"]
    assert resub.args == (books,)


async def test_a_rotation_to_a_key_okx_refuses_keeps_the_working_connection_and_says_why() -> None:
    keys = Keys()
    env = {"OKX_API_KEY": keys.api_key, "OKX_API_SECRET": keys.secret, "OKX_API_PASSPHRASE": keys.passphrase}
    store = CredentialStore(env)
    async with SimServer(keys.sim_config()) as sim:
        okx = OkxSettings(ws_base_url=sim.ws_base, channels=[], subscriptions=_subs(("account", None, None)))
        queue: asyncio.Queue[Inbound] = asyncio.Queue(10_000)
        rec = Recorder(queue)
        manager = ConnectionManager(okx, fast_ws(), queue, credentials=store, clock=local_clock())
        with log_events() as logs:
            async with running(rec.run(), manager.run()):
                await rec.wait_for(lambda i: count(SUBSCRIBED)(i) == 1)
                env["OKX_API_PASSPHRASE"] = secrets.token_hex(8)  # a botched rotation
                assert await store.reload()
                await logs.wait("ws_replacement_refused")
                await sim.wait_until(lambda: len(sim.connections("private")) == 1)
                status = manager.status().connections[0]
                assert status.state.value == "live" and "60024" in (status.last_error or "")
    assert [c.logins for c in sim.stats.connections.values()] == [1, 1]  # one try with the new key, no retries
    assert rec.events(LinkEventKind.SUBSCRIBE_FAILED) == []  # the old connection kept every stream
    [notice] = rec.events(LinkEventKind.NOTICE)
    assert notice.reason == "credentials rotated"
