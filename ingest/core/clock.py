"""The offset between the local clock and OKX server time (SPEC section 9), pure.

OKX rejects a login or signed request more than 30 s away from its own clock (60006, 50102), so every
signature uses `local + offset`. The estimate is `server - (t_send + t_recv) / 2`; of several samples
the one with the shortest round trip is the least uncertain.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class OffsetSample:
    """One server-time probe: local send/receive times and the server's ts, all epoch ms."""

    sent_ms: int
    recv_ms: int
    server_ms: int

    @property
    def rtt_ms(self) -> int:
        return max(0, self.recv_ms - self.sent_ms)

    @property
    def offset_ms(self) -> int:
        """Server minus local, at the midpoint of the round trip."""
        return self.server_ms - (self.sent_ms + self.recv_ms) // 2


def best_offset(samples: list[OffsetSample]) -> OffsetSample:
    """The sample with the shortest round trip (ties: the latest)."""
    if not samples:
        raise ValueError("no clock samples")
    return min(reversed(samples), key=lambda s: s.rtt_ms)


class ServerClock:
    """OKX time as the local wall clock corrected by the last measured offset.

    `wall_ms` is injected (e.g. `lambda: time.time_ns() // 1_000_000`) so tests and the simulator can
    skew it. `measured` stays False until the first sample, so callers can tell "in sync" from "never
    checked".
    """

    def __init__(self, wall_ms: Callable[[], int]) -> None:
        self._wall_ms = wall_ms
        self.offset_ms = 0
        self.rtt_ms: int | None = None
        self.measured = False

    def local_ms(self) -> int:
        return self._wall_ms()

    def now_ms(self) -> int:
        """Best estimate of OKX server time, epoch ms."""
        return self.local_ms() + self.offset_ms

    def update(self, sample: OffsetSample) -> None:
        self.offset_ms = sample.offset_ms
        self.rtt_ms = sample.rtt_ms
        self.measured = True
