"""Clock discipline: keep the shared ServerClock's offset to OKX time measured (SPEC 9).

OKX rejects a REST signature (50102) or a WebSocket login (60006) whose timestamp is more than 30 s away
from its own clock. Every signature uses `ServerClock.now_ms()` (local + offset), so the daemon keeps
working on a skewed host; but a large offset means the host clock is wrong, and the operator should fix NTP.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from ingest.config import ObsSettings
from ingest.core.backoff import full_jitter
from ingest.core.clock import OffsetSample, ServerClock, best_offset
from ingest.errors import IngestError
from ingest.io.rest import OkxRestClient

log = logging.getLogger(__name__)

#: OKX's window for REST and login timestamps (SPEC 3, 8.1).
OKX_TIMESTAMP_WINDOW_MS = 30_000
#: A wall-clock move against the monotonic clock beyond this is a jump (slewing moves it by ~1 ms in 2 s).
CLOCK_JUMP_MS = 500


class ClockHealth(enum.StrEnum):
    UNKNOWN = "unknown"
    OK = "ok"
    WARN = "warn"
    FAIL = "fail"


@dataclass(frozen=True, slots=True)
class ClockStatus:
    """The last measurement, for health and metrics."""

    health: ClockHealth
    offset_ms: int
    rtt_ms: int | None
    checked_at_ms: int | None
    checks_total: int
    failures_total: int
    last_error: str | None


class ClockService:
    """Measures the offset at startup and every `interval_s`, and on demand (`resync`, e.g. after 60006).

    A measurement takes `samples` probes of `/api/v5/public/time` and keeps the one with the shortest round
    trip (its midpoint estimate is the least uncertain).
    """

    def __init__(
        self,
        client: OkxRestClient,
        clock: ServerClock,
        *,
        samples: int = 4,
        interval_s: float = 300.0,
        warn_ms: int = 2_000,
        fail_ms: int = 25_000,
        resync_min_interval_s: float = 2.0,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        if samples <= 0:
            raise ValueError("samples must be > 0")
        self._client = client
        self._clock = clock
        self._samples = samples
        self._interval = interval_s
        self._warn_ms = warn_ms
        self._fail_ms = fail_ms
        self._resync_min_interval = resync_min_interval_s
        self._sleep = sleep
        self._monotonic = monotonic
        self._measured_at: float | None = None
        #: Local wall time minus monotonic time (ms) at the last measurement: if it moved, the host clock jumped.
        self._wall_minus_mono_ms = 0.0
        self._lock = asyncio.Lock()
        self._generation = 0
        self._checked_at_ms: int | None = None
        self._checks = 0
        self._failures = 0
        self._last_error: str | None = None

    @classmethod
    def from_settings(cls, client: OkxRestClient, clock: ServerClock, obs: ObsSettings) -> ClockService:
        return cls(client, clock, samples=obs.clock_samples, interval_s=obs.clock_check_interval_s,
                   warn_ms=obs.clock_warn_ms, fail_ms=obs.clock_fail_ms)

    async def measure(self) -> OffsetSample:
        """Probe OKX now, update the shared clock and log the result; raises if OKX cannot be reached."""
        try:
            probes = [await self._client.server_time_sample() for _ in range(self._samples)]
        except IngestError as exc:
            self._failures += 1
            self._last_error = str(exc)
            raise
        best = best_offset(probes)
        self._clock.update(best)
        self._generation += 1
        self._measured_at = self._monotonic()
        self._wall_minus_mono_ms = self._clock.local_ms() - self._measured_at * 1000
        self._checks += 1
        self._checked_at_ms = self._clock.local_ms()
        self._last_error = None
        self._report(best)
        return best

    async def resync(self) -> None:
        """Measure again now, for a 50102/60006. A burst of callers shares one measurement: those that
        arrive while one runs wait for it, and one that finished less than `resync_min_interval_s` ago
        is fresh enough (its offset is what the failed request lacked) unless the host clock jumped since:
        then that offset is stale however recent, and waiting would only fail more logins."""
        seen = self._generation
        async with self._lock:
            if self._generation != seen:
                return
            if self._measured_at is not None and self._monotonic() - self._measured_at < self._resync_min_interval \
                    and not self._clock_jumped():
                return
            await self.measure()

    def _clock_jumped(self) -> bool:
        """True when the local wall clock moved against the monotonic one since the last measurement (an NTP
        step, a suspended VM, an operator's `date -s`): the measured offset no longer holds."""
        drift = self._clock.local_ms() - self._monotonic() * 1000 - self._wall_minus_mono_ms
        return abs(drift) > CLOCK_JUMP_MS

    async def run(self) -> None:
        """Measure at once, then every `interval_s`; failures are logged and retried with backoff, never raised."""
        delays = full_jitter(1.0, max(1.0, self._interval))
        while True:
            try:
                async with self._lock:
                    await self.measure()
            except IngestError as exc:
                wait = next(delays)
                log.warning("clock_check_failed", extra={"error": str(exc), "retry_in_s": round(wait, 3),
                                                         "offset_ms": self._clock.offset_ms})
                await self._sleep(wait)
                continue
            delays = full_jitter(1.0, max(1.0, self._interval))
            await self._sleep(self._interval)

    def health(self) -> ClockHealth:
        if not self._clock.measured:
            return ClockHealth.UNKNOWN
        off = abs(self._clock.offset_ms)
        if off > self._fail_ms:
            return ClockHealth.FAIL
        if off > self._warn_ms:
            return ClockHealth.WARN
        return ClockHealth.OK

    def status(self) -> ClockStatus:
        return ClockStatus(self.health(), self._clock.offset_ms, self._clock.rtt_ms, self._checked_at_ms,
                           self._checks, self._failures, self._last_error)

    def _report(self, best: OffsetSample) -> None:
        fields: dict[str, object] = {"offset_ms": best.offset_ms, "rtt_ms": best.rtt_ms, "samples": self._samples}
        off = abs(best.offset_ms)
        if off > self._fail_ms:
            log.error(
                "clock_offset_critical",
                extra={**fields, "fix": (
                    f"the host clock is {best.offset_ms / 1000:+.1f} s off OKX server time. OKX rejects logins "
                    f"(60006) and signed requests (50102) whose timestamp is more than "
                    f"{OKX_TIMESTAMP_WINDOW_MS // 1000} s from its clock, so they will fail whenever this "
                    "correction is stale (the clock jumps, or a resync cannot reach OKX). The daemon now signs "
                    "with the corrected time; fix the host clock: enable NTP (timedatectl set-ntp true; "
                    "chronyc tracking)")},
            )
        elif off > self._warn_ms:
            log.warning("clock_offset_high", extra={**fields, "fix": "the host clock drifts from OKX time; "
                                                    "signatures use the corrected time, but check NTP"})
        else:
            log.info("clock_offset", extra=fields)
