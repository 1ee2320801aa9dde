"""The simulator's wall clock: injectable, and skewable by a fault.

OKX judges every login and REST signature against its own clock and stamps every push with it, so
one clock serves all three here. Tests inject `wall_ms` for deterministic timestamps; the clock-offset
fault moves `offset_ms` so a client that never corrects from `/api/v5/public/time` falls outside the
30 s window.
"""

from __future__ import annotations

import time
from collections.abc import Callable


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
