"""The REST client's rate budgets without a network: one bucket per budget, FIFO, answers stamped on arrival."""

from __future__ import annotations

import asyncio
import random
import time

import pytest

from ingest.core.rest_limits import EndpointLimit, Scope
from ingest.io.rest import BucketKey, LimiterRegistry, realm_of


class FakeMonotonic:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


KEY = BucketKey(Scope.IP, "test", "/api/v5/market/books")


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
