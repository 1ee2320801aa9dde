"""The signed REST client against the OKX simulator: signatures accepted, limits never exceeded (the
simulator's own violation counter stays 0 under a flood), faults retried, the breaker, clock correction,
environment and permission checks, and an audit log free of secrets.

Windows are scaled down on both sides (`rate_window_scale` / `LimitTable(window_scale=...)`) so a flood
of 1,000 requests takes about a second instead of minutes.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import pytest

from ingest.config import OkxSettings
from ingest.core.clock import ServerClock
from ingest.core.rest_limits import BreakerState, CircuitOpenError, LimitTable
from ingest.credentials import AuthFailureGuard, AuthPausedError, CredentialStore
from ingest.errors import CredentialError, OkxApiError
from ingest.io.rest import LimiterRegistry, OkxRestClient, QueryValue
from ingest.okx.endpoints import Environment
from ingest.services.clock import ClockService
from ingest.services.permissions import KeyPermissionError, Permission, check_key_permissions
from ingest.sim import KeyEnv, ManualWall, SimConfig, SimServer

SCALE = 0.05  # 2 s OKX windows become 100 ms, on the simulator and in the client alike
BOOKS = "/api/v5/market/books"
CONFIG = "/api/v5/account/config"
BALANCE = "/api/v5/account/balance"


#: The client's timeout where a test holds an answer past it: the held one times out whatever the machine's
#: speed, and every other answer has that long, far more than a loopback request ever needs.
HELD_TIMEOUT_S = 2.0


def wall_ms() -> int:
    return time.time_ns() // 1_000_000


def sim_config(**overrides: Any) -> SimConfig:
    base: dict[str, Any] = {"api_key": secrets.token_hex(16), "api_secret": secrets.token_hex(32),
                            "passphrase": secrets.token_hex(8), "auto_tick_s": None, "rate_window_scale": SCALE}
    base.update(overrides)
    return SimConfig(**base)


def store_for(config: SimConfig, **guard: Any) -> CredentialStore:
    env = {"OKX_API_KEY": config.api_key, "OKX_API_SECRET": config.api_secret,
           "OKX_API_PASSPHRASE": config.passphrase}
    return CredentialStore(env, auth_guard=AuthFailureGuard(**guard) if guard else None)


@asynccontextmanager
async def running(config: SimConfig | None = None) -> AsyncIterator[SimServer]:
    async with SimServer(config or sim_config(), host="127.0.0.1", port=0) as sim:
        await sim.tick(20)  # some trades and book changes to read
        yield sim


def client_for(sim: SimServer, *, credentials: CredentialStore | None = None, clock: ServerClock | None = None,
               **kwargs: Any) -> OkxRestClient:
    options: dict[str, Any] = {"max_attempts": 6, "retry_initial_s": 0.01, "retry_max_s": 0.05,
                               "breaker_failures": 5, "breaker_cooldown_s": 30.0, "timeout_s": 5.0}
    options.update(kwargs)
    options.setdefault("registry", LimiterRegistry())
    options.setdefault("limits", LimitTable(window_scale=SCALE))
    return OkxRestClient(clock=clock or ServerClock(wall_ms), credentials=credentials, base_url=sim.rest_base,
                         **options)


def codes_seen(sim: SimServer, path: str) -> list[tuple[int, str]]:
    return [(r.status, r.code) for r in sim.stats.rest_log if r.path == path]


def recording_sleep(sleeps: list[float]) -> Callable[[float], Awaitable[None]]:
    """The client's retry sleep, recorded (the delay the policy chose), then really slept."""
    async def sleep(seconds: float) -> None:
        sleeps.append(seconds)
        await asyncio.sleep(seconds)
    return sleep


# ----------------------------------------------------------------------------------------- happy paths


async def test_public_and_private_endpoints_answer_and_signatures_are_accepted() -> None:
    async with running() as sim:
        async with client_for(sim, credentials=store_for(sim.config)) as client:
            assert (await client.server_time_sample()).server_ms > 0
            spot = await client.get("/api/v5/public/instruments", {"instType": "SPOT"})
            assert {row["instId"] for row in spot} >= {"BTC-USDT", "ETH-USDT"}
            trades = await client.get("/api/v5/market/trades", {"instId": "BTC-USDT", "limit": 5})
            assert trades and all(row["instId"] == "BTC-USDT" for row in trades)
            (book,) = await client.get(BOOKS, {"instId": "BTC-USDT", "sz": 5})
            assert isinstance(book["asks"], list) and isinstance(book["bids"], list)
            candles = await client.get_arrays("/api/v5/market/candles", {"instId": "BTC-USDT", "bar": "1m"})
            assert all(len(row) == 9 for row in candles)
            (config,) = await client.get(CONFIG)
            assert config["perm"] == "read_only"
            assert await client.get("/api/v5/account/balance", {"ccy": "BTC,USDT"}) is not None
            await client.get("/api/v5/trade/fills", {"instType": "SPOT"})
            await client.get("/api/v5/trade/orders-history", {"instType": "SPOT"})
        assert all(code == "0" for r in sim.stats.rest_log for code in [r.code])
        assert sim.stats.violations == 0


async def test_an_okx_business_error_is_raised_with_its_code_and_not_retried() -> None:
    async with running() as sim, client_for(sim) as client:
        with pytest.raises(OkxApiError) as info:
            await client.get(BOOKS, {"instId": "NOPE-USDT"})
    assert info.value.code == "51001" and not info.value.retriable
    assert sim.stats.rest_count(BOOKS) == 1


async def test_an_unknown_path_gives_the_404_shape_as_an_error() -> None:
    async with running() as sim, client_for(sim) as client:
        with pytest.raises(OkxApiError, match="Not Found") as info:
            await client.get("/api/v5/market/does-not-exist")
    assert info.value.code == "404" and info.value.http_status == 404


# ------------------------------------------------------------------------------------------ rate limits


async def test_rate_limit_answers_in_both_forms_are_backed_off_past_the_window_and_retried() -> None:
    async with running() as sim:
        sleeps: list[float] = []
        sim.faults.rest_rate_limit(4, path=BOOKS)  # the simulator alternates HTTP 429 and 200, as OKX does
        async with client_for(sim, sleep=recording_sleep(sleeps)) as client:
            rows = await client.get(BOOKS, {"instId": "BTC-USDT"})
        assert rows
        assert codes_seen(sim, BOOKS) == [(429, "50011"), (200, "50011"), (429, "50011"), (200, "50011"), (200, "0")]
        window = 2.0 * SCALE
        assert len(sleeps) == 4 and all(s >= window for s in sleeps)
        assert client.stats().requests[(BOOKS, "50011")] == 4
        assert sim.stats.violations == 0


async def test_a_flood_of_1000_concurrent_requests_never_exceeds_any_limit_and_finishes() -> None:
    """The simulator enforces every SPEC 8.3 limit with its own sliding windows; it must count 0 violations."""
    def q(**params: QueryValue) -> dict[str, QueryValue]:
        return params

    plan: list[tuple[str, dict[str, QueryValue]]] = (
        [("/api/v5/market/trades", q(instId="BTC-USDT", limit=10))] * 240
        + [(BOOKS, q(instId="ETH-USDT", sz=5))] * 130
        + [("/api/v5/market/candles", q(instId="BTC-USDT"))] * 100
        + [("/api/v5/market/history-trades", q(instId="BTC-USDT"))] * 80
        + [("/api/v5/public/time", q())] * 60
        + [("/api/v5/public/instruments", q(instType="SPOT"))] * 60
        + [("/api/v5/public/instruments", q(instType="SWAP"))] * 60
        + [("/api/v5/trade/fills", q(instType="SPOT"))] * 120
        + [("/api/v5/account/balance", q())] * 60
        + [("/api/v5/account/positions", q())] * 50
        + [(CONFIG, q())] * 40
    )
    assert len(plan) == 1000
    async with running() as sim:
        async with client_for(sim, credentials=store_for(sim.config)) as client:
            results = await asyncio.gather(*(client.request("GET", path, params) for path, params in plan))
            stats = client.stats()
        assert len(results) == 1000
        assert sim.stats.violations == 0
        assert sum(sim.stats.rest_violations.values()) == 0
        assert sum(sim.stats.rest_requests.values()) == 1000  # no retries were needed
        for path, limit in (("/api/v5/market/trades", 100), (CONFIG, 5), ("/api/v5/public/time", 10)):
            assert sim.stats.rest_peak[path] <= limit
        assert sim.stats.rest_peak[CONFIG] == 5  # the budget was used, not just respected
        assert sum(stats.limiter_wait_s.values()) > 0
        assert stats.in_flight == 0


async def test_the_simulator_catches_a_client_that_overruns_and_the_client_still_finishes_by_backing_off() -> None:
    """The control for the flood test: a client that believes the windows are 10x shorter than they are
    overruns, OKX (the simulator) answers 50011, and the 50011 back-off still gets every request through."""
    async with running() as sim:
        naive = LimitTable(window_scale=SCALE / 10)
        async with client_for(sim, limits=naive, max_attempts=30) as client:
            await asyncio.gather(*(client.get("/api/v5/public/time") for _ in range(60)))
            retried = client.stats().requests[("/api/v5/public/time", "50011")]
        assert sim.stats.rest_violations["/api/v5/public/time"] == retried > 0
        assert [code for _, code in codes_seen(sim, "/api/v5/public/time")].count("0") == 60


async def test_two_clients_in_one_process_share_the_budget() -> None:
    async with running() as sim:
        registry = LimiterRegistry()
        async with client_for(sim, registry=registry) as a, client_for(sim, registry=registry) as b:
            await asyncio.gather(*(c.get("/api/v5/public/time") for c in (a, b) for _ in range(40)))
        assert sim.stats.violations == 0 and sim.stats.rest_peak["/api/v5/public/time"] <= 10


# --------------------------------------------------------------------------------------- server faults


async def test_server_errors_and_slow_answers_are_retried() -> None:
    async with running() as sim:
        async with client_for(sim, timeout_s=HELD_TIMEOUT_S) as client:
            # The simulator applies every pending rule to one request, so the faults go one at a time.
            sim.faults.rest_error(1, path=BOOKS, status=502, body="<html><body>502 Bad Gateway</body></html>")
            assert await client.get(BOOKS, {"instId": "BTC-USDT"})
            sim.faults.rest_error(1, path=BOOKS, status=503)
            assert await client.get(BOOKS, {"instId": "BTC-USDT"})
            sim.faults.rest_hold(count=1, path=BOOKS)  # answered only after the client gave up on it
            assert await client.get(BOOKS, {"instId": "BTC-USDT"})
            assert sim.faults.rest_release(path=BOOKS) == 1
            requests = client.stats().requests
        assert requests == {(BOOKS, "http-502"): 1, (BOOKS, "50001"): 1, (BOOKS, "timeout"): 1, (BOOKS, "0"): 3}
        assert codes_seen(sim, BOOKS)[:4] == [(502, ""), (200, "0"), (503, "50001"), (200, "0")]


async def test_breaker_opens_after_consecutive_failures_and_recovers_after_the_cooldown() -> None:
    mono = [0.0]
    async with running() as sim:
        sim.faults.rest_error(1000, path=BOOKS, status=503)
        async with client_for(sim, breaker_failures=3, breaker_cooldown_s=5.0, monotonic=lambda: mono[0]) as client:
            with pytest.raises(CircuitOpenError, match=BOOKS):
                await client.get(BOOKS, {"instId": "BTC-USDT"})
            assert sim.stats.rest_count(BOOKS) == 3
            assert client.stats().breakers[BOOKS] is BreakerState.OPEN
            with pytest.raises(CircuitOpenError):
                await client.get(BOOKS, {"instId": "BTC-USDT"})
            assert sim.stats.rest_count(BOOKS) == 3  # nothing reached OKX while open
            assert await client.get("/api/v5/market/trades", {"instId": "BTC-USDT"})  # other endpoints go on
            sim.faults.clear()
            mono[0] += 5.0
            assert client.breaker_state(BOOKS) is BreakerState.HALF_OPEN
            assert await client.get(BOOKS, {"instId": "BTC-USDT"})
            assert client.breaker_state(BOOKS) is BreakerState.CLOSED
            assert client.stats().breaker_opened[BOOKS] == 1


# --------------------------------------------------------------------------------------------- clock


async def test_an_injected_clock_offset_is_measured_and_corrected_so_signed_requests_succeed() -> None:
    async with running() as sim:
        sim.faults.clock_offset(-40_000)
        clock = ServerClock(wall_ms)
        async with client_for(sim, credentials=store_for(sim.config), clock=clock) as client:
            service = ClockService(client, clock, samples=4)
            best = await service.measure()
            assert abs(clock.offset_ms + 40_000) <= max(best.rtt_ms, 1) + 1
            assert (await client.get(CONFIG))[0]["perm"] == "read_only"
        assert codes_seen(sim, CONFIG) == [(200, "0")]  # right the first time


async def test_timestamp_expired_triggers_one_clock_resync_then_the_request_succeeds(
        caplog: pytest.LogCaptureFixture) -> None:
    async with running() as sim:
        sim.faults.clock_offset(45_000)  # OKX is 45 s ahead and the client never measured
        clock = ServerClock(wall_ms)
        async with client_for(sim, credentials=store_for(sim.config), clock=clock) as client:
            service = ClockService(client, clock, samples=2)
            client.on_clock_expired = service.resync
            with caplog.at_level(logging.WARNING):
                rows = await client.get(CONFIG)
        assert rows and abs(clock.offset_ms - 45_000) < 1_000
        assert codes_seen(sim, CONFIG) == [(401, "50102"), (200, "0")]
        assert any(r.getMessage() == "clock_offset_critical" for r in caplog.records)
        assert client.credentials is not None and client.credentials.auth.failures_total == 0


async def test_timestamp_expired_without_a_fixable_clock_is_an_error_that_says_ntp() -> None:
    async with running() as sim:
        sim.faults.clock_offset(45_000)
        async with client_for(sim, credentials=store_for(sim.config)) as client:
            with pytest.raises(OkxApiError, match="NTP") as info:
                await client.get(CONFIG)
    assert info.value.code == "50102" and not info.value.retriable


# -------------------------------------------------------------------------------------- environment


async def test_demo_mode_sends_the_demo_header_and_a_demo_key_works() -> None:
    async with running(sim_config(key_env=KeyEnv.DEMO)) as sim:
        async with client_for(sim, credentials=store_for(sim.config), environment=Environment.DEMO) as client:
            assert await client.get(CONFIG)
        assert codes_seen(sim, CONFIG) == [(200, "0")]


async def test_a_key_from_the_other_environment_gets_a_clear_message() -> None:
    async with running(sim_config(key_env=KeyEnv.DEMO)) as sim:
        async with client_for(sim, credentials=store_for(sim.config)) as client:  # live mode, demo key
            with pytest.raises(CredentialError, match=r"other environment \(demo vs live\)") as info:
                await client.get(CONFIG)
        assert "runs in live mode" in str(info.value) and "50101" in str(info.value)
        assert codes_seen(sim, CONFIG) == [(401, "50101")]


async def test_a_wrong_secret_is_not_hammered(caplog: pytest.LogCaptureFixture) -> None:
    async with running() as sim:
        wrong = sim_config(api_key=sim.config.api_key, passphrase=sim.config.passphrase)  # another secret
        store = store_for(wrong, threshold=2, initial_pause_s=60.0)
        async with client_for(sim, credentials=store) as client:
            for _ in range(2):
                with pytest.raises(OkxApiError, match="OKX_API_SECRET"):
                    await client.get(CONFIG)
            with pytest.raises(AuthPausedError):
                await client.get(CONFIG)
        assert codes_seen(sim, CONFIG) == [(401, "50113"), (401, "50113")]
        assert any(r.getMessage() == "okx_auth_paused" and r.levelno == logging.CRITICAL for r in caplog.records)


# --------------------------------------------------------------------------------------- permissions


async def test_a_key_that_can_withdraw_is_refused() -> None:
    async with running(sim_config(perm="read_only,withdraw,trade")) as sim, \
            client_for(sim, credentials=store_for(sim.config)) as client:
        with pytest.raises(KeyPermissionError, match="can withdraw"):
            await check_key_permissions(client, OkxSettings())


async def test_a_key_that_can_trade_is_accepted_with_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    async with running(sim_config(perm="read_only,trade")) as sim, \
            client_for(sim, credentials=store_for(sim.config)) as client:
        with caplog.at_level(logging.INFO, logger="ingest.services.permissions"):
            info = await check_key_permissions(client, OkxSettings())
    assert info.perms == {Permission.READ_ONLY, Permission.TRADE} and info.uid == sim.config.uid
    assert not info.sub_account
    assert "okx_key_can_trade" in {r.getMessage() for r in caplog.records if r.levelno == logging.WARNING}


# ---------------------------------------------------------------------------------------------- audit


async def test_every_request_is_in_the_audit_log_once_and_no_secret_is_anywhere(
        caplog: pytest.LogCaptureFixture) -> None:
    async with running() as sim:
        sim.faults.rest_rate_limit(1, path=CONFIG)
        store = store_for(sim.config)
        with caplog.at_level(logging.DEBUG):
            async with client_for(sim, credentials=store) as client:
                await client.get(CONFIG)
                await client.get("/api/v5/trade/fills", {"instType": "SPOT", "limit": 5})
                await client.get(BOOKS, {"instId": "BTC-USDT"})
    audit = [r.__dict__ for r in caplog.records if r.getMessage() == "rest_request"]
    assert [(a["path"], a["okx_code"]) for a in audit] == [
        (CONFIG, "50011"), (CONFIG, "0"), ("/api/v5/trade/fills", "0"), (BOOKS, "0")]
    assert len(audit) == sim.stats.rest_count(CONFIG) + sim.stats.rest_count("/api/v5/trade/fills") + \
        sim.stats.rest_count(BOOKS)
    fills = audit[2]
    assert fills["params"] == {"instType": "SPOT", "limit": 5} and fills["method"] == "GET"
    assert fills["key_hint"] == store.current().key_hint and fills["okx_ts"].endswith("Z")
    assert isinstance(fills["duration_ms"], int) and fills["http_status"] == 200
    assert "key_hint" not in audit[3]  # public: no key involved at all
    everything = caplog.text + " ".join(str(r.__dict__) for r in caplog.records)
    for value in (sim.config.api_key, sim.config.api_secret, sim.config.passphrase):
        assert value not in everything


async def test_signed_requests_never_wait_for_a_connection_after_signing() -> None:
    """More signed requests than connections, behind held answers: each is signed only once a connection is
    free, so none outlives OKX's timestamp window while queued (50102 "Timestamp request expired").

    Time is the test's: both sides read one manual clock, and each request is held while the clock moves on by
    two thirds of the window, so a request signed when queued would be three windows old by the last answer."""
    wall = ManualWall(wall_ms())
    config = sim_config(wall_ms=wall, auth_window_s=30.0)
    step_ms = 20_000
    async with running(config) as sim:
        sim.faults.rest_hold(count=8, path=BALANCE)
        async with client_for(sim, credentials=store_for(sim.config), clock=ServerClock(wall), max_connections=1,
                              max_attempts=1, limits=LimitTable(window_scale=SCALE)) as client:
            calls = asyncio.gather(*(client.get(BALANCE) for _ in range(8)))
            for answered in range(8):
                await sim.wait_until(lambda: sim.faults.rest_held(BALANCE) == 1)  # one connection: one at a time
                assert len(codes_seen(sim, BALANCE)) == answered
                wall.ms += step_ms  # while the request waits for its answer; the rest wait for the connection
                assert sim.faults.rest_release(path=BALANCE) == 1
            results = await calls
        assert len(results) == 8
        assert [code for _, code in codes_seen(sim, BALANCE)] == ["0"] * 8
