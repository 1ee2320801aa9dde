"""Clock discipline: the offset to OKX time comes from the probe with the shortest round trip, large offsets
are reported with what to do, and a burst of resync requests costs one measurement."""

from __future__ import annotations

import asyncio
import logging

import httpx
import pytest

from ingest.config import ObsSettings
from ingest.core.clock import ServerClock
from ingest.io.rest import LimiterRegistry, OkxRestClient
from ingest.services.clock import ClockHealth, ClockService


class Wall:
    def __init__(self) -> None:
        self.ms = 1_700_000_000_000

    def __call__(self) -> int:
        return self.ms


class TimeServer:
    """OKX's /public/time `ahead_ms` ahead of the local wall, with scripted (out, back) latencies."""

    def __init__(self, wall: Wall, ahead_ms: int, latencies: list[tuple[int, int]]) -> None:
        self.wall = wall
        self.ahead_ms = ahead_ms
        self.latencies = latencies
        self.calls = 0
        self.fail_first = 0

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.calls += 1
        if self.fail_first:
            self.fail_first -= 1
            return httpx.Response(503, text="down")
        out, back = self.latencies[(self.calls - 1) % len(self.latencies)]
        self.wall.ms += out
        ts = self.wall.ms + self.ahead_ms
        self.wall.ms += back
        return httpx.Response(200, json={"code": "0", "msg": "", "data": [{"ts": str(ts)}]})


def _service(server: TimeServer, clock: ServerClock, **kwargs: object) -> tuple[OkxRestClient, ClockService]:
    client = OkxRestClient(clock=clock, base_url="https://openapi.okx.com", registry=LimiterRegistry(),
                           transport=httpx.MockTransport(server), max_attempts=1)
    return client, ClockService(client, clock, **kwargs)  # type: ignore[arg-type]


async def test_offset_comes_from_the_probe_with_the_shortest_round_trip() -> None:
    wall = Wall()
    clock = ServerClock(wall)
    server = TimeServer(wall, 40_000, [(300, 10), (5, 5), (100, 0), (50, 50)])
    client, service = _service(server, clock, samples=4)
    async with client:
        best = await service.measure()
    assert (best.offset_ms, best.rtt_ms) == (40_000, 10)
    assert clock.offset_ms == 40_000 and clock.measured
    assert clock.now_ms() == wall.ms + 40_000
    assert server.calls == 4


async def test_an_offset_beyond_the_fail_threshold_logs_an_error_that_says_why_and_what_to_do(
        caplog: pytest.LogCaptureFixture) -> None:
    wall = Wall()
    clock = ServerClock(wall)
    client, service = _service(TimeServer(wall, -31_000, [(2, 2)]), clock, samples=2, fail_ms=25_000)
    with caplog.at_level(logging.INFO, logger="ingest.services.clock"):
        async with client:
            await service.measure()
    (record,) = [r for r in caplog.records if r.getMessage() == "clock_offset_critical"]
    assert record.levelno == logging.ERROR
    fix = record.__dict__["fix"]
    assert "-31.0 s" in fix and "60006" in fix and "50102" in fix and "30 s" in fix and "NTP" in fix
    assert service.health() is ClockHealth.FAIL
    assert service.status().offset_ms == -31_000


async def test_a_moderate_offset_warns_and_a_small_one_is_ok(caplog: pytest.LogCaptureFixture) -> None:
    wall = Wall()
    clock = ServerClock(wall)
    server = TimeServer(wall, 3_000, [(2, 2)])
    client, service = _service(server, clock, samples=1, warn_ms=2_000)
    async with client:
        assert service.health() is ClockHealth.UNKNOWN
        with caplog.at_level(logging.INFO, logger="ingest.services.clock"):
            await service.measure()
            assert service.health() is ClockHealth.WARN
            server.ahead_ms = 20
            await service.measure()
    assert service.health() is ClockHealth.OK
    assert [r.getMessage() for r in caplog.records if r.name == "ingest.services.clock"] == [
        "clock_offset_high", "clock_offset"]


async def test_a_burst_of_resyncs_shares_one_measurement() -> None:
    wall = Wall()
    clock = ServerClock(wall)
    server = TimeServer(wall, 1_000, [(3, 3)])
    mono = [50.0]
    client, service = _service(server, clock, samples=3, resync_min_interval_s=2.0, monotonic=lambda: mono[0])
    async with client:
        await asyncio.gather(*(service.resync() for _ in range(5)))
        assert server.calls == 3
        mono[0] += 2.0
        await service.resync()
    assert server.calls == 6
    assert service.status().checks_total == 2


async def test_a_resync_right_after_a_measurement_measures_again_when_the_host_clock_jumped() -> None:
    """It used to be skipped for 2 s after any measurement: a host clock stepped (NTP) just after one kept every
    login failing with 60006 until then, and those counted as key failures."""
    wall = Wall()
    clock = ServerClock(wall)
    server = TimeServer(wall, 1_000, [(3, 3)])
    mono = [50.0]
    client, service = _service(server, clock, samples=1, resync_min_interval_s=2.0, monotonic=lambda: mono[0])
    async with client:
        await service.measure()
        assert abs(clock.offset_ms - 1_000) <= 3
        mono[0] += 0.5
        wall.ms += 500 - 45_000  # half a second later the host clock has stepped back 45 s; OKX's has not
        server.ahead_ms += 45_000
        await service.resync()  # a login was just refused with 60006
    assert server.calls == 2 and abs(clock.offset_ms - 46_000) <= 3


async def test_run_measures_at_once_retries_failures_and_then_checks_on_its_interval(
        caplog: pytest.LogCaptureFixture) -> None:
    wall = Wall()
    clock = ServerClock(wall)
    server = TimeServer(wall, 5_000, [(1, 1)])
    server.fail_first = 1
    sleeps: list[float] = []
    parked = asyncio.Event()

    async def fake_sleep(seconds: float) -> None:
        sleeps.append(seconds)
        if len(sleeps) == 3:
            parked.set()
            await asyncio.Event().wait()  # park until cancelled

    client, service = _service(server, clock, samples=1, interval_s=300.0, sleep=fake_sleep)
    async with client:
        with caplog.at_level(logging.WARNING, logger="ingest.services.clock"):
            task = asyncio.create_task(service.run())
            await parked.wait()
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
    assert sleeps[1:] == [300.0, 300.0] and 0 <= sleeps[0] <= 1.0  # one backoff, then the interval
    assert clock.offset_ms == 5_000
    assert service.status().failures_total == 1
    assert any(r.getMessage() == "clock_check_failed" for r in caplog.records)


def test_settings_drive_the_service() -> None:
    obs = ObsSettings(clock_samples=6, clock_check_interval_s=60, clock_warn_ms=100, clock_fail_ms=1000)
    wall = Wall()
    client, _ = _service(TimeServer(wall, 0, [(1, 1)]), ServerClock(wall))
    service = ClockService.from_settings(client, ServerClock(wall), obs)
    assert service.status().health is ClockHealth.UNKNOWN
