"""Every stop is bounded: a close during a Kafka outage returns within its deadline whatever the sink does.

The sinks here misbehave on purpose, the way aiokafka's internals and Python 3.11's `asyncio.wait_for` can: a
write that swallows its cancellation and keeps retrying, a close that ignores cancellation. A real broker
cannot be made to do this on demand, which is why the delivery close hang was intermittent on main.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Sequence
from pathlib import Path

from ingest.core.backoff import full_jitter
from ingest.errors import DeliveryError
from ingest.io.delivery import Delivery
from ingest.io.journal import Journal
from ingest.io.sink import EncodedRecord
from ingest.runtime import EXIT_OK, EXIT_TASK_DIED, Runtime, bounded, stop_task

#: Generous bound for "returned": a hang fails the test by exceeding it, no timing is asserted otherwise.
HANG_S = 20.0


class StubbornSink:
    """A sink whose broker is down; its write swallows cancellation once, and its close ignores it."""

    name = "stubborn"

    def __init__(self) -> None:
        self.writes = 0
        self.swallowed = 0
        self.closing = asyncio.Event()
        self.retrying = asyncio.Event()  # set once the write has failed a few times
        self.released = asyncio.Event()

    async def start(self) -> None:
        return None

    async def write(self, batch: Sequence[EncodedRecord]) -> None:
        self.writes += 1
        if self.writes >= 3:
            self.retrying.set()
        try:
            await asyncio.sleep(0.01)  # a request to a broker that is not there
        except asyncio.CancelledError:
            self.swallowed += 1  # what wait_for on 3.11 can do: the cancel is lost, the call goes on
        raise DeliveryError("broker down")  # retriable by default

    async def flush(self) -> None:
        return None

    async def close(self) -> None:
        self.closing.set()
        while not self.released.is_set():  # deaf to cancellation until the test lets it go
            with contextlib.suppress(asyncio.CancelledError):
                await self.released.wait()


def record(i: int) -> EncodedRecord:
    return EncodedRecord(topic="t", key=b"k", value=i.to_bytes(8, "big"), headers=(), ts_ms=i)


async def test_close_returns_within_its_deadline_when_the_sink_swallows_cancellation(tmp_path: Path) -> None:
    sink = StubbornSink()
    journal = Journal(tmp_path, max_bytes=1 << 24, segment_bytes=1 << 16, fsync="batch", cache_bytes=1 << 16)
    delivery = Delivery(sink, journal, queue_size=100, drain_batch_bytes=4096, close_timeout_s=0.3,
                        backoff=lambda: full_jitter(0.001, 0.01))
    await delivery.start()
    for i in range(50):
        await delivery.put(record(i))
    async with asyncio.timeout(HANG_S):
        await sink.retrying.wait()
    async with asyncio.timeout(HANG_S):
        await delivery.close()
    assert sink.closing.is_set()
    sink.released.set()
    assert delivery.stats.journal_records == 50  # nothing acknowledged, nothing lost: all still journaled
    reopened = Journal(tmp_path, max_bytes=1 << 24, segment_bytes=1 << 16, fsync="batch", cache_bytes=1 << 16)
    await reopened.start()
    assert reopened.pending_records == 50
    await reopened.close()


async def test_stop_task_abandons_a_task_that_ignores_cancellation() -> None:
    release = asyncio.Event()

    async def deaf() -> None:
        while not release.is_set():
            with contextlib.suppress(asyncio.CancelledError):
                await release.wait()

    task = asyncio.create_task(deaf())
    await asyncio.sleep(0)
    async with asyncio.timeout(HANG_S):
        assert await stop_task(task, 0.05) is False
    assert not task.done()
    release.set()
    await task


async def test_bounded_step_returns_none_on_timeout_and_on_failure() -> None:
    async def never() -> int:
        await asyncio.Event().wait()
        return 1

    async def fails() -> int:
        raise RuntimeError("boom")

    async def works() -> int:
        return 7

    assert await bounded(never(), 0.01, what="never") is None
    assert await bounded(fails(), 1, what="fails") is None
    assert await bounded(works(), 1, what="works") == 7


async def test_runtime_reports_the_first_failure_with_its_cause_and_stops_the_rest() -> None:
    stopped: list[str] = []

    async def forever(name: str) -> None:
        try:
            await asyncio.Event().wait()
        finally:
            stopped.append(name)

    async def dies() -> None:
        await asyncio.sleep(0)
        raise ValueError("the cause")

    async with Runtime("svc", stop_timeout_s=1) as rt:
        rt.spawn("a", forever("a"))
        rt.spawn("b", forever("b"))
        rt.spawn("dies", dies())
        ended = await rt.wait(asyncio.Event())
    assert ended.task == "dies" and isinstance(ended.error, ValueError) and str(ended.error) == "the cause"
    assert ended.exit_code == EXIT_TASK_DIED
    assert sorted(stopped) == ["a", "b"]


async def test_runtime_stop_event_is_a_clean_exit_and_an_essential_task_that_returns_is_not() -> None:
    stop = asyncio.Event()
    async with Runtime("svc") as rt:
        rt.spawn("idle", asyncio.Event().wait())
        stop.set()
        assert (await rt.wait(stop)).exit_code == EXIT_OK

    async def returns() -> None:
        return None

    async with Runtime("svc") as rt:
        rt.spawn("optional", returns())
        rt.spawn("core", returns(), essential=True)
        ended = await rt.wait(asyncio.Event())
    assert ended.task == "core" and ended.exit_code == EXIT_TASK_DIED


async def test_runtime_close_is_bounded_even_with_a_deaf_task() -> None:
    release = asyncio.Event()

    async def deaf() -> None:
        while not release.is_set():
            with contextlib.suppress(asyncio.CancelledError):
                await release.wait()

    rt = Runtime("svc")
    rt.spawn("deaf", deaf())
    await asyncio.sleep(0)
    async with asyncio.timeout(HANG_S):
        await rt.close(0.05)
    release.set()
