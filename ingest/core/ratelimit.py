"""Rate-limit arithmetic: a sliding-window log that never admits more than `limit` events in any window.

OKX counts limits such as "20 requests per 2 s" and "480 requests per hour per connection" over a
window; a token or leaky bucket admits up to twice the limit across a window boundary, so the daemon
keeps the exact timestamps of the last `limit` admissions instead. Pure: the caller passes `now`.
"""

from __future__ import annotations

from collections import deque


class SlidingWindow:
    """At most `limit` admissions in any half-open interval of `window_s` seconds."""

    __slots__ = ("_times", "limit", "window_s")

    def __init__(self, limit: int, window_s: float) -> None:
        if limit <= 0 or window_s <= 0:
            raise ValueError(f"a rate limit needs limit > 0 and window_s > 0, got {limit} per {window_s}s")
        self.limit = limit
        self.window_s = window_s
        self._times: deque[float] = deque()

    def _expire(self, now: float) -> None:
        while self._times and self._times[0] <= now - self.window_s:
            self._times.popleft()

    def delay(self, now: float) -> float:
        """Seconds to wait from `now` until one more admission is allowed (0.0 when allowed now)."""
        self._expire(now)
        if len(self._times) < self.limit:
            return 0.0
        return self._times[0] + self.window_s - now

    def try_acquire(self, now: float) -> bool:
        """Admit one event at `now` if the window allows it; False (and nothing recorded) otherwise."""
        if self.delay(now) > 0.0:
            return False
        self._times.append(now)
        return True

    def used(self, now: float) -> int:
        """Admissions inside the window ending at `now`."""
        self._expire(now)
        return len(self._times)

    def remaining(self, now: float) -> int:
        """Admissions still allowed in the window ending at `now`."""
        return self.limit - self.used(now)
