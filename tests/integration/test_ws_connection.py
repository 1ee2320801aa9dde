"""One OKX connection against the simulator: reconnects, keepalive, login, refusals, budget, shutdown.

Every scenario waits on events (queue contents, simulator state, log events), never on the clock.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterator

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st
from websockets.asyncio.client import connect
from websockets.asyncio.server import ServerConnection, serve

from ingest.config import WsSettings
from ingest.core.backoff import full_jitter
from ingest.core.clock import ServerClock
from ingest.core.events import Inbound, InboundFrame, LinkEvent, LinkEventKind
from ingest.core.plan import PlannedConnection
from ingest.io.inbox import Inbox
from ingest.io.rest import LimiterRegistry, OkxRestClient
from ingest.io.ws import Connection
from ingest.io.ws_limiter import ConnectLimiter
from ingest.io.ws_link import LoginRejected
from ingest.okx.channels import Endpoint, SubArg
from ingest.services.clock import ClockService
from ingest.sim import SimServer

from ._ws_support import (
    INST,
    STEP,
    TRADES,
    WINDOW,
    FakeTimer,
    Keys,
    RecordedLimiter,
    Recorder,
    count,
    fast_ws,
    is_push,
    local_clock,
    log_events,
    rest_resync,
    running,
    steady_backoff,
    trade_ids,
    until,
)

SUBSCRIBED = LinkEventKind.SUBSCRIBED
DISCONNECTED = LinkEventKind.DISCONNECTED
FAILED = LinkEventKind.SUBSCRIBE_FAILED
BOOKS = SubArg("books", inst_id=INST)
ACCOUNT = SubArg("account")


def _public(sim: SimServer, queue: asyncio.Queue[Inbound], args: tuple[SubArg, ...] = (TRADES,),
            ws: WsSettings | None = None, *, timer: FakeTimer | None = None, limiter: ConnectLimiter | None = None,
            **kw: object) -> Connection:
    """A public connection; with a `timer`, its connect limiter and every backoff run on that fake clock."""
    spec = PlannedConnection("public-0", Endpoint.PUBLIC, False, args)
    return Connection(spec, sim.ws_url(Endpoint.PUBLIC), ws or fast_ws(), queue,
                      limiter=limiter or ConnectLimiter(3, timer), timer=timer, **kw)  # type: ignore[arg-type]


def _private(sim: SimServer, queue: asyncio.Queue[Inbound], keys: Keys, args: tuple[SubArg, ...] = (ACCOUNT,),
             ws: WsSettings | None = None, *, timer: FakeTimer | None = None,
             limiter: ConnectLimiter | None = None, **kw: object) -> Connection:
    spec = PlannedConnection("private-0", Endpoint.PRIVATE, True, args)
    kw.setdefault("credentials", keys.store())
    return Connection(spec, sim.ws_url(Endpoint.PRIVATE), ws or fast_ws(), queue,
                      limiter=limiter or ConnectLimiter(3, timer), timer=timer, **kw)  # type: ignore[arg-type]


def _sim_trade_ids(sim: SimServer) -> list[int]:
    return [int(t.trade_id) for t in sim.market.trades(INST)]


def _seen_ids(rec: Recorder, conn: str | None = None) -> list[int]:
    return [i for f in rec.frames() if conn is None or f.conn == conn for i in trade_ids(f)]


# ---------------------------------------------------------------------------------------------- reconnect


@pytest.mark.parametrize(
    ("kind", "close_code"),
    [("clean", "1000"), ("abort", None), ("idle", "4004"), ("stall", None)],
)
async def test_every_kind_of_drop_is_followed_by_resubscription_and_a_gap_that_brackets_the_missed_trades(
    kind: str, close_code: str | None
) -> None:
    timer = FakeTimer()
    async with SimServer(Keys().sim_config()) as sim:
        queue: asyncio.Queue[Inbound] = asyncio.Queue(10_000)
        rec = Recorder(queue)
        limiter = RecordedLimiter(timer)
        conn = _public(sim, queue, ws=fast_ws(keepalive_s=0.25, pong_timeout_s=0.5), timer=timer, limiter=limiter,
                       backoff=steady_backoff())
        async with running(rec.run(), conn.run()):
            await rec.wait_for(lambda i: count(SUBSCRIBED)(i) == 1)
            await sim.tick(30)
            before_drop = max(_sim_trade_ids(sim))
            await rec.wait_for(lambda i: before_drop in _seen_ids(rec))
            t0 = timer.now()
            if kind == "stall":
                sim.faults.stall(endpoint="public")  # silent: only our pong timeout can tell
            else:
                sim.faults.drop(kind, endpoint="public")
            await sim.tick(30)  # trades nobody receives: the old socket is gone or silent
            dropped = t0
            if kind == "stall":  # a ping after keepalive_s of silence; no pong within pong_timeout_s: aborted
                await timer.advance_to(t0 + 0.25)
                dropped = t0 + 0.25 + 0.5
                await timer.advance_to(dropped)
            await timer.advance_to(dropped + STEP)  # the reconnect, one backoff step after the drop
            await rec.wait_for(lambda i: count(SUBSCRIBED)(i) == 2)
            await sim.tick(30)
            after = max(_sim_trade_ids(sim))
            await rec.wait_for(lambda i: after in _seen_ids(rec))

    first, second = (e.conn for e in rec.events(SUBSCRIBED))
    assert first != second
    items = rec.items
    disc = next(i for i, x in enumerate(items) if isinstance(x, LinkEvent) and x.kind is DISCONNECTED)
    resub = next(i for i, x in enumerate(items) if isinstance(x, LinkEvent) and x.kind is SUBSCRIBED
                 and x.conn == second)
    event = items[disc]
    assert isinstance(event, LinkEvent)
    assert (event.conn, event.args, event.code) == (first, (TRADES,), close_code)
    assert disc < resub
    assert all(f.conn == first for f in items[:disc] if isinstance(f, InboundFrame))
    assert not any(isinstance(f, InboundFrame) and is_push(f) for f in items[disc:resub])
    assert all(f.conn == second for f in items[disc:] if isinstance(f, InboundFrame))

    last_good = max(_seen_ids(rec, first))
    first_good = min(_seen_ids(rec, second))
    missed = [t for t in _sim_trade_ids(sim) if last_good < t < first_good]
    assert missed, "the drop window should have lost trades"
    # Nothing was lost silently: every trade not received lies strictly inside the reported window.
    received = set(_seen_ids(rec))
    assert {t for t in _sim_trade_ids(sim) if t not in received} == set(missed)
    assert limiter.starts == [t0, dropped + STEP]
    assert conn.counters.pong_timeouts == (1 if kind == "stall" else 0)
    assert conn.counters.pings == (1 if kind == "stall" else 0)


async def test_on_fake_time_silence_brings_a_ping_and_a_missing_pong_a_reconnect() -> None:
    async with SimServer(Keys().sim_config()) as sim:
        queue: asyncio.Queue[Inbound] = asyncio.Queue(10_000)
        rec = Recorder(queue)
        timer = FakeTimer()
        # Binary fractions, so that fake time adds up exactly.
        conn = _public(sim, queue, ws=fast_ws(keepalive_s=0.25, pong_timeout_s=0.5), timer=timer)
        with log_events() as logs:
            async with running(rec.run(), conn.run()):
                await rec.wait_for(lambda i: count(SUBSCRIBED)(i) == 1)
                [cid] = list(sim.stats.connections)
                await timer.advance(0.125)
                assert conn.counters.pings == 0  # not silent for keepalive_s yet
                await timer.advance(0.125)
                await sim.wait_until(lambda: sim.stats.connections[cid].pings == 1)
                await sim.tick(1)  # a trade behind OKX's pong: once it is here, so is the pong
                last = _sim_trade_ids(sim)[-1]
                await rec.wait_for(lambda _: last in _seen_ids(rec))
                sim.faults.stall(endpoint="public")  # silent from now on: only the pong timeout can tell
                await timer.advance(0.5)  # the watchdog wakes at the pong deadline, sees the pong, pings again
                await sim.wait_until(lambda: sim.stats.connections[cid].pings == 2)
                await timer.advance(0.375)
                assert conn.counters.pong_timeouts == 0  # 0.375 s without an answer: not pong_timeout_s yet
                await timer.advance(0.125)
                await logs.wait("ws_pong_timeout")
                await logs.wait_until(lambda rs: any(getattr(r, "to", None) == "backing-off" for r in rs))
                await timer.advance(0.0625)  # past backoff_max_s: the backoff sleeps on the same fake clock
                await rec.wait_for(lambda i: count(SUBSCRIBED)(i) == 2)
    assert sim.stats.ws_connects == 2 and conn.counters.pings == 2 and conn.counters.pongs == 1
    assert conn.counters.pong_timeouts == 1
    first, second = (e.conn for e in rec.events(SUBSCRIBED))
    assert rec.events(DISCONNECTED)[0].conn == first != second


async def _answered(sim: SimServer, cid: str, conn: Connection, pings: int) -> None:
    """OKX got ping number `pings` and the connection has its pong."""
    await sim.wait_until(lambda: sim.stats.connections[cid].pings == pings)
    await until(lambda: conn.counters.pongs == pings, f"pong {pings}")


async def test_keepalive_keeps_an_idle_private_connection_alive_past_okx_idle_timeout() -> None:
    # OKX's own numbers on fake time, shared by the simulator and the connection: OKX closes a connection it
    # sent nothing on for 30 s; the shipped keepalive pings after 20 s of silence and wants the pong within 10 s.
    # The account channel pushes nothing here, so only the pings' pongs can keep the connection open.
    keys = Keys()
    timer = FakeTimer()
    async with SimServer(keys.sim_config(idle_timeout_s=30.0, timer=timer)) as sim:
        queue: asyncio.Queue[Inbound] = asyncio.Queue(10_000)
        rec = Recorder(queue)
        conn = _private(sim, queue, keys, ws=fast_ws(keepalive_s=20.0, pong_timeout_s=10.0), timer=timer)
        async with running(rec.run(), conn.run()):
            [cid] = await sim.wait_logged_in(endpoint="private")
            await rec.wait_for(lambda i: count(SUBSCRIBED)(i) == 1)
            # A client that never pings, connected at the same fake instant: OKX's idle timer is live on this clock.
            async with connect(sim.ws_url(Endpoint.PUBLIC), ping_interval=None) as silent:
                [silent_id] = await sim.wait_connections(endpoint="public")
                pings = 0
                for elapsed in range(10, 100, 10):  # 90 s of fake time, three idle timeouts
                    await timer.advance(10.0)
                    if elapsed == 30:  # the silent client is dropped at OKX's idle timeout, and only it
                        assert await sim.wait_closed(silent_id) == 4004
                    if elapsed % 20 == 0:  # 20 s of silence: a ping; its pong must arrive before the next step
                        pings += 1
                        await _answered(sim, cid, conn, pings)
                    assert sim.hub.select(Endpoint.PRIVATE, cid), f"OKX closed the pinging connection at {elapsed} s"
                assert silent.close_code == 4004
    assert (pings, conn.counters.pongs, conn.counters.pong_timeouts) == (4, 4, 0)
    assert conn.counters.connects == 1 and len(sim.connections("private", include_closed=True)) == 1
    assert [e.reason for e in rec.events(DISCONNECTED)] == ["shutdown"]


async def test_without_keepalive_okx_drops_the_idle_connection_with_4004_and_it_reconnects() -> None:
    keys = Keys()
    timer = FakeTimer()
    async with SimServer(keys.sim_config(idle_timeout_s=1.0, timer=timer)) as sim:
        queue: asyncio.Queue[Inbound] = asyncio.Queue(10_000)
        rec = Recorder(queue)
        conn = _private(sim, queue, keys, ws=fast_ws(keepalive_s=5.0), timer=timer)
        with log_events() as logs:
            async with running(rec.run(), conn.run()):
                [cid] = await sim.wait_logged_in(endpoint="private")
                await rec.wait_for(lambda i: count(SUBSCRIBED)(i) == 1)
                await timer.advance(1.0)
                assert await sim.wait_closed(cid) == 4004
                await logs.wait_until(lambda rs: any(getattr(r, "to", None) == "backing-off" for r in rs))
                await timer.advance(0.0625)  # past backoff_max_s: the backoff sleeps on the same fake clock
                await rec.wait_for(lambda i: count(SUBSCRIBED)(i) == 2)
    assert rec.events(DISCONNECTED)[0].code == "4004"
    assert conn.counters.pings == 0 and conn.counters.connects == 2


async def test_a_connection_that_stays_down_is_retried_forever_within_the_connect_rate() -> None:
    timer = FakeTimer()  # OKX counts connects on the same fake clock
    async with SimServer(Keys().sim_config(timer=timer)) as sim:
        sim.faults.reject_connects(count=7, status=503)
        queue: asyncio.Queue[Inbound] = asyncio.Queue(10_000)
        rec = Recorder(queue)
        limiter = RecordedLimiter(timer)
        conn = _public(sim, queue, timer=timer, limiter=limiter, backoff=steady_backoff())
        async with running(rec.run(), conn.run()):
            t0 = timer.now()
            # Each refusal is followed by one backoff step; a fourth attempt inside the window of the three before
            # it waits (a second sleep) until the oldest of them left the window.
            for at in (STEP, 2 * STEP, 3 * STEP, WINDOW, WINDOW + STEP, WINDOW + 2 * STEP, WINDOW + 3 * STEP,
                       2 * WINDOW, 2 * WINDOW + STEP):
                await timer.advance_to(t0 + at)
            await rec.wait_for(lambda i: count(SUBSCRIBED)(i) == 1)
    assert limiter.starts == [t0 + at for at in (0, STEP, 2 * STEP, WINDOW, WINDOW + STEP, WINDOW + 2 * STEP,
                                                 2 * WINDOW, 2 * WINDOW + STEP)]
    assert conn.counters.connect_failures == 7
    assert sim.stats.ws_connects_refused_by_fault == 7
    assert sim.stats.violations == 0


# ---------------------------------------------------------------------------------------------- backoff


@given(st.floats(0.001, 5), st.floats(0, 100), st.floats(1, 4), st.lists(st.floats(0, 1), min_size=1, max_size=60))
def test_backoff_delays_stay_within_zero_and_the_cap_and_never_run_out(
    initial: float, extra: float, factor: float, rands: list[float]
) -> None:
    cap = initial + extra
    draws = iter(rands * 5)
    delays = full_jitter(initial, cap, factor, rand=lambda: next(draws))
    for _ in range(len(rands) * 5):
        assert 0 <= next(delays) <= cap


def _recording_backoff() -> tuple[list[list[float]], object]:
    made: list[list[float]] = []

    def factory() -> Iterator[float]:
        drawn: list[float] = []
        made.append(drawn)
        while True:
            drawn.append(STEP)
            yield STEP

    return made, factory


@pytest.mark.parametrize(("healthy_after_s", "generators"), [(3600.0, 1), (0.0, 2)])
async def test_backoff_resets_only_after_the_connection_stayed_healthy(
    healthy_after_s: float, generators: int
) -> None:
    timer = FakeTimer()
    async with SimServer(Keys().sim_config(timer=timer)) as sim:
        sim.faults.reject_connects(count=3)
        queue: asyncio.Queue[Inbound] = asyncio.Queue(10_000)
        rec = Recorder(queue)
        made, factory = _recording_backoff()
        limiter = RecordedLimiter(timer)
        conn = _public(sim, queue, ws=fast_ws(healthy_after_s=healthy_after_s), backoff=factory, timer=timer,
                       limiter=limiter)
        async with running(rec.run(), conn.run()):
            t0 = timer.now()
            for at in (STEP, 2 * STEP, 3 * STEP, WINDOW):  # three refusals; the fourth attempt waits for a place
                await timer.advance_to(t0 + at)
            await rec.wait_for(lambda i: count(SUBSCRIBED)(i) == 1)
            sim.faults.drop("abort")
            await timer.advance_to(t0 + WINDOW + STEP)
            await rec.wait_for(lambda i: count(SUBSCRIBED)(i) == 2)
    # Three refused connects and one drop: four delays, from one generator unless the link was healthy.
    assert len(made) == generators
    assert sum(len(m) for m in made) == 4
    assert limiter.starts == [t0 + at for at in (0, STEP, 2 * STEP, WINDOW, WINDOW + STEP)]


# ---------------------------------------------------------------------------------------------- login


async def test_a_private_connection_subscribes_only_after_the_login_ack() -> None:
    keys = Keys()
    async with SimServer(keys.sim_config()) as sim:
        queue: asyncio.Queue[Inbound] = asyncio.Queue(10_000)
        rec = Recorder(queue)
        conn = _private(sim, queue, keys, args=(ACCOUNT, SubArg("orders", inst_type="ANY")))
        async with running(rec.run(), conn.run()):
            await rec.wait_for(lambda i: count(SUBSCRIBED)(i) == 2)
    events = [orjson.loads(f.data) for f in rec.frames() if not is_push(f)]
    kinds = [e["event"] for e in events]
    assert kinds.index("login") < kinds.index("subscribe")
    assert "error" not in kinds
    [stats] = sim.stats.connections.values()
    assert (stats.logins, stats.subscribes, stats.requests) == (1, 1, 2)


async def test_every_reconnect_logs_in_with_a_fresh_timestamp() -> None:
    keys = Keys()
    wall = [0]
    async with SimServer(keys.sim_config()) as sim:
        clock = ServerClock(lambda: time.time_ns() // 1_000_000 + wall[0])  # `wall`: time passing
        queue: asyncio.Queue[Inbound] = asyncio.Queue(10_000)
        rec = Recorder(queue)
        timer = FakeTimer()
        limiter = RecordedLimiter(timer)
        conn = _private(sim, queue, keys, clock=clock, timer=timer, limiter=limiter, backoff=steady_backoff())
        async with running(rec.run(), conn.run()):
            await rec.wait_for(lambda i: count(SUBSCRIBED)(i) == 1)
            # Ten minutes pass on both clocks; a cached login timestamp would now be 60006 "expired".
            wall[0] = 600_000
            sim.faults.clock_offset(600_000)
            t0 = timer.now()
            sim.faults.drop("abort", endpoint="private")
            await timer.advance_to(t0 + STEP)  # one backoff step after the drop
            await rec.wait_for(lambda i: count(SUBSCRIBED)(i) == 2)
    assert limiter.starts == [t0, t0 + STEP]
    assert conn.counters.login_failures == 0
    assert [c.logins for c in sim.stats.connections.values()] == [1, 1]


async def test_a_login_refused_for_clock_skew_resyncs_from_server_time_and_succeeds() -> None:
    keys = Keys()
    async with SimServer(keys.sim_config()) as sim:
        sim.faults.clock_offset(120_000)  # OKX's clock is two minutes ahead of ours
        clock = local_clock()
        resync = rest_resync(sim.rest_base, clock)
        calls = 0

        async def counted_resync() -> None:
            nonlocal calls
            calls += 1
            await resync()

        queue: asyncio.Queue[Inbound] = asyncio.Queue(10_000)
        rec = Recorder(queue)
        timer = FakeTimer()
        limiter = RecordedLimiter(timer)
        conn = _private(sim, queue, keys, clock=clock, resync_clock=counted_resync, timer=timer, limiter=limiter,
                        backoff=steady_backoff())
        async with running(rec.run(), conn.run()):
            await timer.advance_to(timer.now() + STEP)  # the refused login ended the link: one backoff step
            await rec.wait_for(lambda i: count(SUBSCRIBED)(i) == 1)
    assert limiter.starts == [limiter.starts[0], limiter.starts[0] + STEP]
    assert calls == 1
    assert abs(clock.offset_ms - 120_000) < 2_000
    assert conn.counters.login_failures == 1
    errors = [orjson.loads(f.data) for f in rec.frames() if b'"error"' in f.data]
    assert [e["code"] for e in errors] == ["60006"]


async def test_a_host_clock_jump_right_after_a_measurement_resyncs_at_once_and_is_no_key_failure(
        caplog: pytest.LogCaptureFixture) -> None:
    """It used to wait out 2 s of suppressed resyncs while each 60006 counted against the key: three of them
    paused signed traffic with a "check the key" alert although the key was fine."""
    keys = Keys()
    async with SimServer(keys.sim_config()) as sim:
        jump = [0]
        clock = ServerClock(lambda: time.time_ns() // 1_000_000 + jump[0])
        store = keys.store()
        async with OkxRestClient(clock=clock, base_url=sim.rest_base, registry=LimiterRegistry()) as rest:
            service = ClockService(rest, clock, samples=1)
            await service.measure()
            jump[0] = -120_000  # the host clock steps back two minutes (NTP) just after the measurement
            queue: asyncio.Queue[Inbound] = asyncio.Queue(10_000)
            rec = Recorder(queue)
            timer = FakeTimer()
            conn = _private(sim, queue, keys, clock=clock, resync_clock=service.resync, credentials=store,
                            timer=timer, backoff=steady_backoff())
            with caplog.at_level(logging.WARNING):
                async with running(rec.run(), conn.run()):
                    await timer.advance_to(timer.now() + STEP)  # no auth pause: the next login one step later
                    await rec.wait_for(lambda i: count(SUBSCRIBED)(i) == 1)
    assert conn.counters.login_failures == 1  # the first login, signed before anyone knew; the next one passed
    assert abs(clock.offset_ms - 120_000) < 2_000
    assert store.auth.failures_total == 0
    assert not [r for r in caplog.records if r.getMessage() in ("okx_auth_failed", "okx_auth_paused")]


@pytest.mark.parametrize("code", ["60005", "60007", "60024", "60032"])
async def test_a_login_refused_for_a_wrong_key_stops_the_connection_without_retrying(
    code: str, caplog: pytest.LogCaptureFixture
) -> None:
    keys = Keys()
    client_keys = {
        "60005": Keys(secret=keys.secret, passphrase=keys.passphrase),
        "60007": Keys(api_key=keys.api_key, passphrase=keys.passphrase),
        "60024": Keys(api_key=keys.api_key, secret=keys.secret),
        "60032": keys,
    }[code]
    async with SimServer(keys.sim_config()) as sim:
        if code == "60032":
            sim.faults.reject_logins(code="60032", count=None)
        queue: asyncio.Queue[Inbound] = asyncio.Queue(10_000)
        rec = Recorder(queue)
        conn = _private(sim, queue, client_keys, credentials=client_keys.store())
        async with running(rec.run()):
            with pytest.raises(LoginRejected) as err:
                await asyncio.wait_for(conn.run(), timeout=10)
            await rec.wait_for(lambda i: count(FAILED)(i) == 1)
    assert err.value.code == code
    assert "OKX_API_KEY" in str(err.value) and code in str(err.value)
    assert sim.stats.ws_connects == 1
    assert [c.logins for c in sim.stats.connections.values()] == [1]
    failed = rec.events(FAILED)[0]
    assert (failed.args, failed.code) == ((ACCOUNT,), code)
    assert conn.status().state.value == "stopped"
    for secret in (client_keys.api_key, client_keys.secret, client_keys.passphrase):
        assert secret not in caplog.text and secret not in str(err.value) and secret not in failed.reason


async def test_a_login_that_gets_no_answer_times_out_and_is_retried() -> None:
    # The simulator always answers a login; a server that never does stands in for a stuck OKX gateway.
    logins: list[asyncio.Event] = [asyncio.Event(), asyncio.Event()]
    connections = 0

    async def silent(ws: ServerConnection) -> None:
        nonlocal connections
        connections += 1
        async for msg in ws:
            if b'"op":"login"' in (msg.encode() if isinstance(msg, str) else msg):
                logins[min(connections, 2) - 1].set()

    timer = FakeTimer()
    async with serve(silent, "127.0.0.1", 0) as server:
        port = server.sockets[0].getsockname()[1]
        spec = PlannedConnection("private-0", Endpoint.PRIVATE, True, (ACCOUNT,))
        queue: asyncio.Queue[Inbound] = asyncio.Queue(10)
        # Keepalive after the login timeout: what ends the silent link is the login deadline, not a missing pong.
        ws = fast_ws(login_timeout_s=2.0, keepalive_s=20.0)
        conn = Connection(spec, f"ws://127.0.0.1:{port}/ws/v5/private", ws, queue, limiter=ConnectLimiter(3, timer),
                          credentials=Keys().store(), timer=timer, backoff=steady_backoff())
        t0 = timer.now()
        async with running(conn.run()):
            await asyncio.wait_for(logins[0].wait(), timeout=5)
            await timer.advance_to(t0 + 2.0)  # login_timeout_s without an answer
            await timer.advance_to(t0 + 2.0 + STEP)  # the reconnect, one backoff step later
            assert conn.counters.login_failures == 1
            await asyncio.wait_for(logins[1].wait(), timeout=5)
    assert connections == 2 and conn.counters.login_failures == 1
    assert queue.empty()  # never subscribed, so nothing to report as disconnected


def _logged(name: str, n: int) -> Callable[[list[logging.LogRecord]], bool]:
    return lambda records: sum(1 for r in records if r.getMessage() == name) == n


async def test_transient_subscribe_refusals_never_fail_an_arg_for_good() -> None:
    """A minute of OKX internal errors (64007) must not end a stream for the life of the process."""
    attempts: list[int] = []

    async def hiccup(ws: ServerConnection) -> None:
        conn = len(attempts)
        attempts.append(0)
        async for msg in ws:
            if msg == "ping":
                await ws.send("pong")
                continue
            req = orjson.loads(msg)
            attempts[conn] += 1
            if conn == 0:  # every try on the first connection fails, then OKX recycles the connection
                await ws.send(orjson.dumps({"event": "error", "code": "64007", "msg": "Internal error",
                                            "id": req.get("id")}).decode())
                if attempts[0] == 4:
                    await ws.close()
                continue
            for a in req["args"]:
                await ws.send(orjson.dumps({"event": "subscribe", "arg": a, "id": req.get("id")}).decode())

    async with serve(hiccup, "127.0.0.1", 0) as server:
        port = server.sockets[0].getsockname()[1]
        spec = PlannedConnection("public-0", Endpoint.PUBLIC, False, (TRADES,))
        queue: asyncio.Queue[Inbound] = asyncio.Queue()
        timer = FakeTimer()
        # Quick retries of one step each (min(backoff_max_s, 10 * backoff_min_s * 2**n)), reconnects one step too.
        ws = fast_ws(subscribe_retries=3, backoff_min_s=STEP, backoff_max_s=STEP)
        conn = Connection(spec, f"ws://127.0.0.1:{port}/ws/v5/public", ws, queue, limiter=ConnectLimiter(3, timer),
                          timer=timer, backoff=steady_backoff())
        events: list[LinkEvent] = []
        t0 = timer.now()
        with log_events() as logs:
            async with running(conn.run()):
                for n in (1, 2, 3):  # each refusal brings a quick retry, one step after it on the fake clock
                    await timer.advance_to(t0 + n * STEP)
                await logs.wait_until(_logged("ws_subscribe_parked", 1))
                await timer.advance_to(t0 + 4 * STEP)  # OKX closed the connection: the reconnect's backoff
                while not any(e.kind is SUBSCRIBED for e in events):
                    item = await asyncio.wait_for(queue.get(), timeout=10)
                    if isinstance(item, LinkEvent):
                        events.append(item)
    assert attempts == [4, 1]  # quick retries spent, then the next connection tried again at once
    assert _logged("ws_subscribe_retry", 3)(logs.seen)
    assert [e.kind for e in events] == [SUBSCRIBED]  # never reported as failed for good
    assert conn.failed == {}


async def test_a_transient_login_failure_is_retried_with_backoff() -> None:
    keys = Keys()
    async with SimServer(keys.sim_config()) as sim:
        sim.faults.reject_logins(code="60009", count=2)
        queue: asyncio.Queue[Inbound] = asyncio.Queue(10_000)
        rec = Recorder(queue)
        timer = FakeTimer()
        limiter = RecordedLimiter(timer)
        conn = _private(sim, queue, keys, timer=timer, limiter=limiter, backoff=steady_backoff())
        async with running(rec.run(), conn.run()):
            t0 = timer.now()
            await timer.advance_to(t0 + STEP)  # each refused login ends its link: one backoff step each
            await timer.advance_to(t0 + 2 * STEP)
            await rec.wait_for(lambda i: count(SUBSCRIBED)(i) == 1)
    assert limiter.starts == [t0, t0 + STEP, t0 + 2 * STEP]
    assert conn.counters.login_failures == 2
    assert sim.stats.ws_connects == 3
    assert rec.events(FAILED) == []


# ---------------------------------------------------------------------------------------------- refusals


async def test_a_refused_arg_is_reported_once_and_never_retried_while_the_others_stream() -> None:
    bad = SubArg("trades", inst_id="NOPE-USDT")
    eth = SubArg("books", inst_id="ETH-USDT")
    async with SimServer(Keys().sim_config()) as sim:
        queue: asyncio.Queue[Inbound] = asyncio.Queue(10_000)
        rec = Recorder(queue)
        timer = FakeTimer()
        conn = _public(sim, queue, args=(TRADES, bad, eth), timer=timer, backoff=steady_backoff())
        async with running(rec.run(), conn.run()):
            await rec.wait_for(lambda i: count(SUBSCRIBED)(i) == 2 and count(FAILED)(i) == 1)
            sim.faults.drop("abort")
            await timer.advance_to(timer.now() + STEP)  # the reconnect, one backoff step after the drop
            await rec.wait_for(lambda i: count(SUBSCRIBED)(i) == 4)
            await sim.tick(20)
            last = max(_sim_trade_ids(sim))
            await rec.wait_for(lambda i: last in _seen_ids(rec))
    [failed] = rec.events(FAILED)
    assert (failed.args, failed.code) == ((bad,), "60018")
    assert conn.status().failed == {"trades:NOPE-USDT": "60018"}
    second = rec.events(SUBSCRIBED)[-1].conn
    stats = [c for c in sim.stats.connections.values() if c.close_code is None or c.requests]
    assert stats[-1].requests == 1  # the reconnect asked only for the two good args, in one request
    assert {a for e in rec.events(SUBSCRIBED) if e.conn == second for a in e.args} == {TRADES, eth}


async def test_an_error_naming_no_arg_is_narrowed_down_without_hurting_the_others() -> None:
    invalid = SubArg("trades")  # no instId: OKX answers 60013 "Invalid args", naming nothing
    eth = SubArg("books", inst_id="ETH-USDT")
    async with SimServer(Keys().sim_config()) as sim:
        queue: asyncio.Queue[Inbound] = asyncio.Queue(10_000)
        rec = Recorder(queue)
        conn = _public(sim, queue, args=(TRADES, invalid, eth))
        async with running(rec.run(), conn.run()):
            await rec.wait_for(lambda i: count(SUBSCRIBED)(i) == 2 and count(FAILED)(i) == 1)
    [failed] = rec.events(FAILED)
    assert (failed.args, failed.code) == ((invalid,), "60013")
    assert sorted(a for e in rec.events(SUBSCRIBED) for a in e.args) == sorted([TRADES, eth])
    [stats] = sim.stats.connections.values()
    assert stats.requests <= 3


async def test_a_channel_over_okx_connection_cap_is_reported_failed() -> None:
    keys = Keys()
    orders = SubArg("orders", inst_type="ANY")
    async with SimServer(keys.sim_config(conn_cap_per_channel=0)) as sim:
        queue: asyncio.Queue[Inbound] = asyncio.Queue(10_000)
        rec = Recorder(queue)
        conn = _private(sim, queue, keys, args=(ACCOUNT, orders))
        async with running(rec.run(), conn.run()):
            await rec.wait_for(lambda i: count(FAILED)(i) >= 1 and count(DISCONNECTED)(i) == 0
                               and count(SUBSCRIBED)(i) == 2)
    failed = rec.events(FAILED)
    assert {a for e in failed for a in e.args} == {ACCOUNT, orders}
    assert all("channel-conn-count-error" in e.reason for e in failed)


# ---------------------------------------------------------------------------------------------- resilience


async def test_malformed_unknown_and_stray_frames_never_kill_the_connection() -> None:
    async with SimServer(Keys().sim_config()) as sim:
        queue: asyncio.Queue[Inbound] = asyncio.Queue(10_000)
        rec = Recorder(queue)
        conn = _public(sim, queue)
        async with running(rec.run(), conn.run()):
            await rec.wait_for(lambda i: count(SUBSCRIBED)(i) == 1)
            for raw in ("{not json", '{"event":"weird"}', "pong", '{"event":"error","code":"60012","msg":"x"}',
                        '{"event":"subscribe","arg":{"channel":7}}', "[1,2,3]",
                        '{"event":"subscribe","arg":{"channel":"tickers","instId":"X"}}'):
                sim.faults.send_raw(raw)
            sim.faults.push_unknown_channel()
            sim.faults.corrupt("malformed", channel="trades")
            await sim.tick(30)
            last = max(_sim_trade_ids(sim))
            await rec.wait_for(lambda i: any(b"sim-unknown-channel" in f.data for f in rec.frames())
                               and last in _seen_ids(rec))
    assert sim.stats.ws_connects == 1
    assert rec.events(DISCONNECTED)[0].reason == "shutdown"
    texts = [f.data for f in rec.frames()]
    assert b"{not json" in texts and b"[1,2,3]" in texts  # junk reaches the pipeline as a dead letter
    assert b"pong" not in texts


# ---------------------------------------------------------------------------------------------- resubscribe


async def test_resubscribe_requests_are_coalesced_and_bring_a_fresh_snapshot() -> None:
    async with SimServer(Keys().sim_config()) as sim:
        queue: asyncio.Queue[Inbound] = asyncio.Queue(10_000)
        rec = Recorder(queue)
        conn = _public(sim, queue, args=(BOOKS,), ws=fast_ws(resubscribe_min_interval_s=3600))
        async with running(rec.run(), conn.run()):
            await rec.wait_for(lambda i: count(SUBSCRIBED)(i) == 1)
            for _ in range(5):
                assert conn.request_resubscribe(BOOKS, "seqId break")
            await rec.wait_for(lambda i: count(SUBSCRIBED)(i) == 2)
            assert conn.request_resubscribe(BOOKS, "another break")  # within the minimum interval: deferred
            await sim.tick(5)  # a round trip after the request: the connection had every chance to act
            await rec.wait_for(lambda i: sum(1 for f in rec.frames() if is_push(f)) >= 3)
            assert conn.status().pending_resubscribe == 1
    [stats] = sim.stats.connections.values()
    assert (stats.subscribes, stats.unsubscribes) == (2, 1)
    items = rec.items
    disc = next(i for i, x in enumerate(items) if isinstance(x, LinkEvent) and x.kind is DISCONNECTED)
    resub = [i for i, x in enumerate(items) if isinstance(x, LinkEvent) and x.kind is SUBSCRIBED][1]
    assert disc < resub and items[disc].reason == "resubscribe"  # type: ignore[union-attr]
    after = next(x for x in items[resub:] if isinstance(x, InboundFrame) and is_push(x))
    assert orjson.loads(after.data)["action"] == "snapshot"


async def test_the_hourly_request_budget_is_never_exceeded() -> None:
    async with SimServer(Keys().sim_config()) as sim:
        queue: asyncio.Queue[Inbound] = asyncio.Queue(10_000)
        rec = Recorder(queue)
        # Three requests per hour: one subscribe and one resubscribe (unsubscribe + subscribe) use them up.
        conn = _public(sim, queue, args=(BOOKS,), ws=fast_ws(requests_per_hour=3, resubscribe_min_interval_s=0))
        with log_events() as logs:
            async with running(rec.run(), conn.run()):
                await rec.wait_for(lambda i: count(SUBSCRIBED)(i) == 1)
                conn.request_resubscribe(BOOKS, "break 1")
                await rec.wait_for(lambda i: count(SUBSCRIBED)(i) == 2)
                conn.request_resubscribe(BOOKS, "break 2")
                wait = await logs.wait("ws_budget_wait")
                assert conn.status().budget_remaining == 0
    assert wait.delay_s > 3000  # type: ignore[attr-defined]
    [stats] = sim.stats.connections.values()
    assert stats.requests == 3 and stats.budget_violations == 0


# ---------------------------------------------------------------------------------------------- shutdown


async def test_shutdown_hands_every_received_frame_to_the_pipeline_before_closing() -> None:
    async with SimServer(Keys().sim_config()) as sim:
        queue: asyncio.Queue[Inbound] = asyncio.Queue(16)  # small: the reader is throttled by the pipeline
        rec = Recorder(queue)
        conn = _public(sim, queue)
        async with running(rec.run()) as _:
            task = asyncio.create_task(conn.run())
            await rec.wait_for(lambda i: count(SUBSCRIBED)(i) == 1)
            await sim.pump_trades(INST, 3000)  # returns once every frame was written to our socket
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            assert task.cancelled()
    assert sorted(_seen_ids(rec)) == _sim_trade_ids(sim)
    last = rec.items[-1]
    assert isinstance(last, LinkEvent) and last.kind is DISCONNECTED and last.reason == "shutdown"
    assert [c.close_code for c in sim.stats.connections.values()] == [1000]


# ---------------------------------------------------------------------------------------------- back-pressure


class _WatchedInbox(Inbox):
    """The daemon's inbox, noting its largest size and when it first paused a socket."""

    def __init__(self, limit: int) -> None:
        super().__init__(limit)
        self.largest = 0
        self.paused = asyncio.Event()

    def put_nowait(self, item: Inbound) -> None:
        super().put_nowait(item)
        self.largest = max(self.largest, self.qsize())

    def pause_until_room(self, key: object, resume: Callable[[], None]) -> None:
        super().pause_until_room(key, resume)
        self.paused.set()


async def test_a_busy_pipeline_pauses_the_socket_and_every_frame_still_arrives_once_in_order() -> None:
    total, limit = 20_000, 100
    async with SimServer(Keys().sim_config()) as sim:
        inbox = _WatchedInbox(limit)
        rec = Recorder(inbox)
        # Keepalive 0.2 s on fake time: a paused socket must not pass for a dead one. No deflate, so that one
        # socket read holds about a thousand frames rather than ten thousand and the bound below says something.
        timer = FakeTimer()
        conn = _public(sim, inbox, ws=fast_ws(compression=False), timer=timer)
        async with running(conn.run()):
            while count(SUBSCRIBED)(rec.items) == 0:  # the ack, then SUBSCRIBED; then the pipeline stalls
                rec.items.append(await inbox.get())
            pump = asyncio.create_task(sim.pump_trades(INST, total))
            await asyncio.wait_for(inbox.paused.wait(), 30)  # the socket is paused, not the inbox overrun
            # The stall outlasts keepalive_s + pong_timeout_s (1.2 s) twice over: what is under test is that time
            # passing while we hold the socket does not make the watchdog take the connection for dead.
            for _ in range(24):
                await timer.advance(0.1)
            async with running(rec.run()):
                await pump
                last = _sim_trade_ids(sim)[-1]
                await rec.wait_for(lambda _: last in _seen_ids(rec), timeout=60)
    assert _seen_ids(rec) == _sim_trade_ids(sim)  # every trade once, in the order OKX sent them
    assert [f.recv_seq for f in rec.frames()] == list(range(1, len(rec.frames()) + 1))
    assert inbox.pauses >= 1
    # Bounded by the limit plus one socket read, not by what OKX sends while the pipeline is stalled.
    assert inbox.largest < total // 4
    assert sim.stats.ws_connects == 1 and conn.counters.pong_timeouts == 0  # the stall cost no reconnect
    assert conn.counters.pings == 0  # our own silence never looked like OKX's


async def test_frames_keep_their_order_when_a_full_plain_queue_sends_some_the_slow_way() -> None:
    async with SimServer(Keys().sim_config()) as sim:
        queue: asyncio.Queue[Inbound] = asyncio.Queue(8)  # full most of the time: the fast lane declines
        rec = Recorder(queue)
        conn = _public(sim, queue)
        async with running(rec.run(), conn.run()):
            await rec.wait_for(lambda i: count(SUBSCRIBED)(i) == 1)
            await sim.pump_trades(INST, 3_000)
            last = _sim_trade_ids(sim)[-1]
            await rec.wait_for(lambda _: last in _seen_ids(rec), timeout=30)
    assert _seen_ids(rec) == _sim_trade_ids(sim)
    pushes = sum(1 for f in rec.frames() if is_push(f))
    assert 0 < conn.counters.fast_lane < pushes  # both lanes carried pushes, and their order still holds


async def test_shutdown_while_the_inbox_holds_the_socket_still_hands_over_every_received_frame() -> None:
    async with SimServer(Keys().sim_config()) as sim:
        inbox = _WatchedInbox(16)
        rec = Recorder(inbox)
        conn = _public(sim, inbox, ws=fast_ws(compression=False))
        task = asyncio.create_task(conn.run())
        while count(SUBSCRIBED)(rec.items) == 0:  # then the pipeline stalls
            rec.items.append(await inbox.get())
        await sim.pump_trades(INST, 3_000)  # returns once every frame was written to our socket
        await asyncio.wait_for(inbox.paused.wait(), 30)
        task.cancel()  # shutdown while the socket is paused: it must read to the end anyway
        # The pipeline stays stalled until OKX saw the connection end: what is under test is that the socket
        # is read to the end anyway; a paused one would never see OKX's close frame, be aborted when
        # close_timeout_s (1 s) ran out (OKX would see 1006, not 1000), and lose the frames in its buffer.
        await sim.wait_until(lambda: all(c.close_code is not None for c in sim.stats.connections.values()),
                             timeout=30)
        async with running(rec.run()):
            await asyncio.gather(task, return_exceptions=True)
            await rec.wait_for(lambda i: bool(rec.events(DISCONNECTED)))
    assert task.cancelled()
    assert _seen_ids(rec) == _sim_trade_ids(sim)
    last = rec.items[-1]
    assert isinstance(last, LinkEvent) and last.kind is DISCONNECTED and last.reason == "shutdown"
    assert [c.close_code for c in sim.stats.connections.values()] == [1000] and conn.counters.lost_at_shutdown == 0
