"""The one clock a WebSocket connection reads and sleeps on, injected so that tests can run it on fake time.

Every policy decision of `ingest.io.ws` (keepalive, backoff, request budget, retry and resubscribe times,
timeouts) reads `now()` and waits with `sleep()`; nothing there reads `loop.time()` or calls `asyncio.sleep`.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Protocol


class Timer(Protocol):
    """Monotonic seconds, and a sleep measured on the same clock."""

    def now(self) -> float: ...

    async def sleep(self, delay: float) -> None: ...


class SystemTimer:
    """`time.monotonic` (or the given function) and `asyncio.sleep`."""

    def __init__(self, monotonic: Callable[[], float] = time.monotonic) -> None:
        self.now = monotonic

    async def sleep(self, delay: float) -> None:
        await asyncio.sleep(max(0.0, delay))
