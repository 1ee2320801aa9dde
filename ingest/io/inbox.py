"""The shard's inbound queue (WebSocket connections -> pipeline), bounded by flow control.

A plain bounded `asyncio.Queue` makes a producer await `put` when it is full, which the WebSocket fast lane
cannot do: it hands frames over from inside the socket's `data_received`, where nothing may wait. So this
queue never refuses an item; instead a producer that finds it at `limit` pauses its socket (`pause_until_room`)
and is resumed when the consumer has brought it down to half. Memory stays bounded by `limit` plus what one
socket read holds per connection, and the kernel's socket buffer, then TCP, pushes back on OKX, as with any
back-pressure.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable, Hashable
from typing import TypeVar

from ingest.core.events import Inbound

log = logging.getLogger(__name__)

T = TypeVar("T")


def oldest(queue: asyncio.Queue[T]) -> T | None:
    """The item `queue.get()` would return next, left in place (None when empty): for the pipeline's lag,
    read at scrape time, never on the hot path. asyncio.Queue keeps its FIFO in the deque `_queue` (every
    CPython since 3.4; tests/unit/test_inbox.py checks it), which has no public peek."""
    items: deque[T] | None = getattr(queue, "_queue", None)
    return items[0] if items else None


class Inbox(asyncio.Queue[Inbound]):
    """An unbounded asyncio.Queue with a soft `limit` enforced by pausing producers (module docstring)."""

    def __init__(self, limit: int) -> None:
        if limit < 2:
            raise ValueError("an inbox limit must be at least 2")
        super().__init__()
        self.limit = limit
        self._low = limit // 2
        self._paused: dict[Hashable, Callable[[], None]] = {}
        self._room = asyncio.Event()
        self._room.set()
        #: Times a producer was paused (a busy pipeline, for metrics and tests).
        self.pauses = 0

    def over(self) -> bool:
        """At or above the limit: the producer should stop reading (or await `room`)."""
        return self.qsize() >= self.limit

    def pause_until_room(self, key: Hashable, resume: Callable[[], None]) -> None:
        """Call `resume` once the queue is down to half; one pending call per `key` (e.g. a socket)."""
        if key not in self._paused:
            self.pauses += 1
        self._paused[key] = resume
        self._room.clear()

    def forget(self, key: Hashable) -> None:
        """Drop a pending resume (its socket is gone)."""
        self._paused.pop(key, None)

    async def room(self) -> None:
        """Wait until the queue is below its limit (for producers that can wait)."""
        while self.over():
            self._room.clear()
            await self._room.wait()

    async def put(self, item: Inbound) -> None:
        """For producers that can wait (events, REST answers): wait for room, then put."""
        await self.room()
        self.put_nowait(item)

    def get_nowait(self) -> Inbound:
        item = super().get_nowait()  # Queue.get() ends here too
        if self.qsize() <= self._low and not self._room.is_set():
            self._room.set()
            paused, self._paused = self._paused, {}
            for resume in paused.values():
                try:
                    resume()
                except Exception:  # one producer's failure must not cost the item or the others' resume
                    log.exception("inbox_resume_failed")
        return item
