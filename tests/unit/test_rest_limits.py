"""Rate budgets, the circuit breaker and the envelope parser of the REST client, without a network."""

from __future__ import annotations

import asyncio
import random
import time

import pytest

from ingest.core.rest_policy import CODE_MALFORMED, parse_envelope
from ingest.io.rest import (
    OKX_LIMITS,
    BreakerState,
    BucketKey,
    CircuitBreaker,
    CircuitOpenError,
    EndpointLimit,
    LimiterRegistry,
    LimitTable,
    Scope,
    realm_of,
)


def state_of(breaker: CircuitBreaker) -> BreakerState:
    return breaker.state


class FakeMonotonic:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


KEY = BucketKey(Scope.IP, "test", "/api/v5/market/books")


# ------------------------------------------------------------------------------------------- the table


def test_limit_table_has_okx_documented_limits_and_scopes() -> None:
    table = LimitTable()
    assert table.lookup("/api/v5/public/time") == EndpointLimit(10, 2.0, Scope.IP)
    assert table.lookup("/api/v5/public/instruments").scope is Scope.IP_INST_TYPE
    assert table.lookup("/api/v5/market/history-trades") == EndpointLimit(20, 2.0, Scope.IP)
    assert table.lookup("/api/v5/trade/fills") == EndpointLimit(60, 2.0, Scope.USER)
    assert table.lookup("/api/v5/account/config") == EndpointLimit(5, 2.0, Scope.USER)
    assert all(lim.window_s == 2.0 for lim in OKX_LIMITS.values())


def test_unknown_endpoints_get_the_smallest_limit_scoped_by_prefix() -> None:
    table = LimitTable()
    assert table.lookup("/api/v5/market/new-thing") == EndpointLimit(5, 2.0, Scope.IP)
    assert table.lookup("/api/v5/asset/balances") == EndpointLimit(5, 2.0, Scope.USER)
    assert not table.known("/api/v5/asset/balances")


def test_share_and_window_scale_adjust_every_limit() -> None:
    half = LimitTable(share=0.5)
    assert half.lookup("/api/v5/market/trades").limit == 50
    assert half.lookup("/api/v5/account/config").limit == 2
    assert LimitTable(share=0.01).lookup("/api/v5/account/config").limit == 1
    assert LimitTable(window_scale=0.05).lookup("/api/v5/public/time").window_s == pytest.approx(0.1)
    with pytest.raises(ValueError, match="share"):
        LimitTable(share=1.5)


def test_global_okx_hosts_share_one_budget_realm() -> None:
    assert realm_of("https://openapi.okx.com") == realm_of("https://www.okx.com/") == "okx.com"
    assert realm_of("https://us.okx.com") == "us.okx.com"
    assert realm_of("http://127.0.0.1:8765") == "127.0.0.1:8765"


def test_registry_hands_out_one_bucket_per_key() -> None:
    registry = LimiterRegistry()
    a = registry.bucket(KEY, EndpointLimit(5, 2.0, Scope.IP))
    assert registry.bucket(KEY, EndpointLimit(5, 2.0, Scope.IP)) is a
    other = BucketKey(Scope.USER, "test", "/api/v5/trade/fills", "key-1")
    assert registry.bucket(other, EndpointLimit(60, 2.0, Scope.USER)) is not a
    assert LimiterRegistry.default() is LimiterRegistry.default()


# ------------------------------------------------------------------------------------------ the bucket


async def test_bucket_never_lets_more_than_the_limit_arrive_in_any_window_whatever_the_latency() -> None:
    """Slots are stamped when the answer arrives, so a request that reached the server late still counts."""
    limit, window = 5, 0.05
    bucket = LimiterRegistry().bucket(KEY, EndpointLimit(limit, window, Scope.IP))
    rng = random.Random(7)
    arrivals: list[float] = []

    async def one() -> None:
        await bucket.acquire()
        try:
            await asyncio.sleep(rng.uniform(0, 0.02))  # simulated network latency to the server
            arrivals.append(time.monotonic())
            await asyncio.sleep(rng.uniform(0, 0.02))  # and back
        finally:
            bucket.release()

    await asyncio.gather(*(one() for _ in range(120)))
    arrivals.sort()
    assert len(arrivals) == 120
    assert all(arrivals[i + limit] - arrivals[i] >= window for i in range(len(arrivals) - limit))
    stats = bucket.stats()
    assert stats.admitted_total == 120 and stats.in_flight == 0


async def test_bucket_admits_waiters_in_arrival_order() -> None:
    bucket = LimiterRegistry().bucket(KEY, EndpointLimit(2, 0.02, Scope.IP))
    order: list[int] = []

    async def one(i: int) -> None:
        await bucket.acquire()
        order.append(i)
        bucket.release()

    await asyncio.gather(*(one(i) for i in range(30)))
    assert order == list(range(30))


async def test_bucket_counts_requests_in_flight_against_the_limit() -> None:
    clock = FakeMonotonic()
    sleeps: list[float] = []

    async def fake_sleep(seconds: float) -> None:
        sleeps.append(seconds)
        clock.now += seconds

    bucket = LimiterRegistry(clock, fake_sleep).bucket(KEY, EndpointLimit(2, 2.0, Scope.IP))
    await bucket.acquire()
    await bucket.acquire()
    waiter = asyncio.create_task(bucket.acquire())

    def answer() -> None:  # runs after the waiter has queued: both slots in flight, nothing can expire
        assert not waiter.done()
        clock.now += 0.5
        bucket.release()  # answered at 100.5: this slot frees at 102.5

    asyncio.get_running_loop().call_soon(answer)
    assert await waiter == pytest.approx(2.5)
    assert sleeps == [pytest.approx(2.0)]


async def test_hold_pauses_the_whole_budget() -> None:
    clock = FakeMonotonic()

    async def fake_sleep(seconds: float) -> None:
        clock.now += seconds

    bucket = LimiterRegistry(clock, fake_sleep).bucket(KEY, EndpointLimit(10, 2.0, Scope.IP))
    bucket.hold(2.0)
    assert await bucket.acquire() == pytest.approx(2.0)
    bucket.release()


# ----------------------------------------------------------------------------------------- the breaker


def test_breaker_opens_after_consecutive_failures_and_probes_after_the_cooldown() -> None:
    clock = FakeMonotonic()
    breaker = CircuitBreaker("/api/v5/market/books", failures=3, cooldown_s=30.0, monotonic=clock)
    for _ in range(2):
        assert breaker.before_call() is False
        breaker.on_failure()
    breaker.before_call()
    breaker.on_success()  # a success in between resets the count
    for _ in range(3):
        breaker.before_call()
        breaker.on_failure()
    assert breaker.state is BreakerState.OPEN
    with pytest.raises(CircuitOpenError, match=r"paused after 3 consecutive failures.*30\.0 s") as info:
        breaker.before_call()
    assert info.value.retriable and info.value.retry_after_s == 30.0
    clock.now += 30.0
    assert state_of(breaker) is BreakerState.HALF_OPEN
    assert breaker.before_call() is True  # the probe
    with pytest.raises(CircuitOpenError):
        breaker.before_call()  # only one probe at a time
    breaker.on_success()
    assert state_of(breaker) is BreakerState.CLOSED and breaker.opened_total == 1


def test_a_failed_probe_reopens_and_an_inconclusive_one_frees_the_probe_slot() -> None:
    clock = FakeMonotonic()
    breaker = CircuitBreaker("/x", failures=1, cooldown_s=5.0, monotonic=clock)
    breaker.before_call()
    breaker.on_failure()
    clock.now += 5.0
    assert breaker.before_call() is True
    breaker.on_neutral(True)  # e.g. rate-limited: proves nothing
    assert breaker.before_call() is True
    breaker.on_failure()
    assert breaker.state is BreakerState.OPEN and breaker.opened_total == 2
    clock.now += 5.0
    assert state_of(breaker) is BreakerState.HALF_OPEN


# ---------------------------------------------------------------------------------------- the envelope


def test_success_envelope_gives_the_rows() -> None:
    env = parse_envelope(200, b'{"code":"0","msg":"","data":[{"ts":"1597026383085"}]}')
    assert (env.code, env.data) == ("0", [{"ts": "1597026383085"}])


def test_auth_failure_without_data_is_read() -> None:
    env = parse_envelope(401, b'{"msg":"Invalid OK-ACCESS-KEY","code":"50111"}')
    assert (env.code, env.msg, env.data) == ("50111", "Invalid OK-ACCESS-KEY", None)


def test_unknown_path_404_with_numeric_code_is_read() -> None:
    body = b'{"code":404,"data":{},"detailMsg":"","error_code":"404","error_message":"Not Found","msg":"Not Found"}'
    env = parse_envelope(404, body)
    assert (env.code, env.msg, env.data) == ("404", "Not Found", None)


def test_rate_limit_comes_as_200_and_as_429() -> None:
    assert parse_envelope(200, b'{"msg":"Rate limit reached. Please refer to API documentation and throttle '
                               b'requests accordingly","code":"50011","data":[]}').code == "50011"
    assert parse_envelope(429, b'{"msg":"Too Many Requests","code":"50011"}').code == "50011"


def test_non_json_and_odd_bodies_never_raise() -> None:
    env = parse_envelope(502, b"<html><body>502 Bad Gateway</body></html>")
    assert env.code == "http-502" and "Bad Gateway" in env.msg and env.data is None
    assert parse_envelope(200, b"[1,2]").code == "http-200"
    assert parse_envelope(200, b"").code == "http-200"
    assert parse_envelope(200, b'{"code":"0","msg":""}').code == CODE_MALFORMED
    assert parse_envelope(200, b'{"code":true,"data":[]}').code == CODE_MALFORMED
    assert parse_envelope(503, b'{"msg":"x"}').code == "http-503"
