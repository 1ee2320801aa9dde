"""The process-wide limit on WebSocket connection attempts (OKX: 3 per second per IP), on an injected clock."""

from __future__ import annotations

import asyncio
from collections import deque

from ingest.io.timer import SystemTimer, Timer


class ConnectLimiter:
    """At most `per_second` connection attempts per second for the whole process (OKX: 3 per second per IP).

    OKX counts an attempt when it arrives, somewhere between our start and the end of the handshake, and how
    long that takes varies (a TLS handshake, a busy event loop). So an attempt holds its place in the window
    from its start (`acquire`) until `window` after its end (`release`): the next attempt that the window
    admits starts after every earlier one OKX counted, whatever the delays in between. A small margin on the
    window absorbs the difference between our clock and OKX's. Waiters are served in turn, so a reconnect
    storm of many connections spreads out evenly.
    """

    def __init__(self, per_second: float, timer: Timer | None = None, *, margin_s: float = 0.05) -> None:
        if per_second <= 0:
            raise ValueError(f"connects per second must be > 0, got {per_second}")
        limit, window = (int(per_second), 1.0) if per_second >= 1 else (1, 1.0 / per_second)
        self.limit = limit
        self.window_s = window + margin_s
        self._ends: deque[float] = deque()  # when the finished attempts still inside the window ended
        self.in_flight = 0
        #: The clock the window is measured and waited on: the connections' own (`Connection`'s timer), so a
        #: reconnect's backoff and its wait for a place add up on one clock, fake in tests.
        self._timer: Timer = timer if timer is not None else SystemTimer()
        self._lock = asyncio.Lock()
        self._ended = asyncio.Event()
        self.admitted = 0

    async def acquire(self) -> None:
        """Wait for a place in the window; the caller must `release` it once the attempt ended (any way)."""
        async with self._lock:
            while True:
                now = self._timer.now()
                # The very sum the sleep below waits for: woken there, the place is free (no rounding spin).
                while self._ends and self._ends[0] + self.window_s <= now:
                    self._ends.popleft()
                if len(self._ends) + self.in_flight < self.limit:
                    self.in_flight += 1
                    self.admitted += 1
                    return
                if self._ends:  # the oldest finished attempt leaves the window first
                    await self._timer.sleep(self._ends[0] + self.window_s - now)
                else:  # every place is held by an attempt still running: wait for one to end
                    self._ended.clear()
                    await self._ended.wait()

    def release(self) -> None:
        """The attempt `acquire` admitted ended now (connected, refused, failed or cancelled)."""
        self.in_flight -= 1
        self._ends.append(self._timer.now())
        self._ended.set()

