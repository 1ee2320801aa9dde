"""The simulator's clocks: the wall clock (injectable, skewable by a fault) and the timer of its rules.

OKX judges every login and REST signature against its own clock and stamps every push with it, so
one clock serves all three here. Tests inject `wall_ms` for deterministic timestamps; the clock-offset
fault moves `offset_ms` so a client that never corrects from `/api/v5/public/time` falls outside the
30 s window.

The timed rules (the idle close, stalls, notices, request and connect windows, REST rate windows and
delays, the tick loop, scenario times) read and sleep on one `SimTimer` instead, the event loop's by
default. A test injects its own (`SimConfig(timer=...)`), shared with the client under test, to run
OKX's 30 s idle close and the client's keepalive on the same fake time.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Protocol


def system_wall_ms() -> int:
    return time.time_ns() // 1_000_000


class SimClock:
    """Epoch milliseconds as the simulated OKX sees them: `wall_ms() + offset_ms`."""

    __slots__ = ("_wall_ms", "offset_ms")

    def __init__(self, wall_ms: Callable[[], int] | None = None, offset_ms: int = 0) -> None:
        self._wall_ms = wall_ms or system_wall_ms
        self.offset_ms = offset_ms

    def now_ms(self) -> int:
        return self._wall_ms() + self.offset_ms


class ManualWall:
    """A wall clock that only moves when told to: `SimConfig(wall_ms=ManualWall(start))` for exact replays."""

    __slots__ = ("ms",)

    def __init__(self, start_ms: int) -> None:
        self.ms = start_ms

    def __call__(self) -> int:
        return self.ms

    def advance(self, ms: int) -> None:
        self.ms += ms


class SimTimer(Protocol):
    """Monotonic seconds, and a sleep measured on the same clock (the shape of `ingest.io.timer.Timer`)."""

    def now(self) -> float: ...

    async def sleep(self, delay: float) -> None: ...


class LoopTimer:
    """The running event loop's clock and `asyncio.sleep`: the simulator's default timer."""

    __slots__ = ()

    def now(self) -> float:
        return asyncio.get_running_loop().time()

    async def sleep(self, delay: float) -> None:
        await asyncio.sleep(max(0.0, delay))
