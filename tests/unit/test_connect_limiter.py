"""The process-wide WebSocket connect limiter against OKX's count of 3 connection requests per second per IP.

OKX counts an attempt when it arrives, which may be anywhere between our start and the end of the handshake;
on fake time, attempts whose handshakes take long must still never put four arrivals in one second.
"""

from __future__ import annotations

import asyncio

from hypothesis import example, given, settings
from hypothesis import strategies as st

from ingest.io.ws_limiter import ConnectLimiter


class VirtualClock:
    """Monotonic time that moves only when someone sleeps on it (or the test moves it): an `io.timer.Timer`."""

    def __init__(self) -> None:
        self.t = 0.0

    def now(self) -> float:
        return self.t

    async def sleep(self, delay: float) -> None:
        self.t += max(0.0, delay)
        await asyncio.sleep(0)


async def settle() -> None:
    """Let every ready task run until it waits again (no timer involved: the clock is virtual)."""
    for _ in range(20):
        await asyncio.sleep(0)


async def test_an_attempt_holds_its_place_until_a_window_after_its_handshake_ended() -> None:
    clock = VirtualClock()
    limiter = ConnectLimiter(3, clock)
    for _ in range(3):
        await limiter.acquire()
    fourth = asyncio.create_task(limiter.acquire())
    await settle()
    assert not fourth.done()  # three handshakes still running: OKX may not even have counted them yet
    clock.t = 0.8
    limiter.release()  # the first ends at 0.8 s: OKX may have counted it as late as that
    await fourth
    assert clock.t >= 0.8 + 1.0  # admitting it at 1.05 s could put four arrivals in one second


#: Arrivals exactly a second apart are allowed; float sums land a hair either side of the boundary.
EPS = 1e-9


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.floats(0, 2), st.floats(0, 1)), min_size=1, max_size=25))
@example([(1.077366563754546, 0.0), (0.0, 0.0), (0.0, 0.0), (0.0, 0.0), (0.0, 0.0)])  # 2.0773.. - 1.0773.. < 1.0
def test_no_second_ever_holds_more_than_three_arrivals_whatever_the_handshakes_take(
    attempts: list[tuple[float, float]]
) -> None:
    """Attempts one after another (a reconnect loop): each takes `duration` and OKX counts it at any point of
    it (`where`, a fraction); the arrivals OKX counts never exceed 3 in any second."""

    async def run() -> list[float]:
        clock = VirtualClock()
        limiter = ConnectLimiter(3, clock, margin_s=0.0)
        arrivals = []
        for duration, where in attempts:
            await limiter.acquire()
            start = clock.t
            clock.t += duration
            arrivals.append(start + where * duration)
            limiter.release()
        return arrivals

    arrivals = sorted(asyncio.run(run()))
    assert all(later - earlier >= 1.0 - EPS for earlier, later in zip(arrivals, arrivals[3:], strict=False))
