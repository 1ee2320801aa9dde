"""Helpers for the WebSocket-layer scenarios: read the pipeline queue like a consumer, without sleeping."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import orjson

from ingest.config import WsSettings
from ingest.core.clock import OffsetSample, ServerClock
from ingest.core.events import Inbound, InboundFrame, LinkEvent, LinkEventKind
from ingest.credentials import CredentialStore
from ingest.io.ws_limiter import ConnectLimiter
from ingest.okx.channels import SubArg
from ingest.sim import SimConfig

INST = "BTC-USDT"
TRADES = SubArg("trades", inst_id=INST)


def fast_ws(**overrides: object) -> WsSettings:
    """Short intervals so scenarios run in well under a second each (never used to synchronise)."""
    base: dict[str, object] = {
        "keepalive_s": 0.2, "pong_timeout_s": 1.0, "backoff_min_s": 0.01, "backoff_max_s": 0.05,
        "healthy_after_s": 0.0, "login_timeout_s": 2.0, "subscribe_timeout_s": 2.0, "notice_cutover_timeout_s": 5.0,
        "cutover_catchup_s": 2.0, "shutdown_timeout_s": 5.0, "close_timeout_s": 1.0,
    }
    base.update(overrides)
    return WsSettings.model_validate(base)


@dataclass(frozen=True)
class Keys:
    """Throw-away credentials shared by the simulator and the client."""

    api_key: str = field(default_factory=lambda: secrets.token_hex(16))
    secret: str = field(default_factory=lambda: secrets.token_hex(32))
    passphrase: str = field(default_factory=lambda: secrets.token_hex(8))

    def sim_config(self, **kw: object) -> SimConfig:
        base: dict[str, object] = {"instruments": (INST, "ETH-USDT"), "seed": 1, "auto_tick_s": None}
        base.update(kw)
        return SimConfig(api_key=self.api_key, api_secret=self.secret, passphrase=self.passphrase,
                         **base)  # type: ignore[arg-type]

    def store(self) -> CredentialStore:
        return CredentialStore({"OKX_API_KEY": self.api_key, "OKX_API_SECRET": self.secret,
                                "OKX_API_PASSPHRASE": self.passphrase})


class FakeTimer:
    """Monotonic time that moves only when the test says so (`ingest.io.timer.Timer`, `ingest.sim.SimTimer`)."""

    def __init__(self, start: float = 1_000.0) -> None:
        self._now = start
        self._sleepers: dict[asyncio.Future[None], float] = {}
        self._started: set[asyncio.Future[None]] = set()
        self._woken: set[asyncio.Future[None]] = set()
        self._all_resumed = asyncio.Event()
        self._slept = asyncio.Event()

    def now(self) -> float:
        return self._now

    def sleep(self, delay: float) -> Coroutine[Any, Any, None]:
        """Not `async` on purpose: the wake-up time is fixed when called, i.e. on the `now()` the caller computed
        `delay` from, not when the task that awaits it first runs (the test may move time in between)."""
        if delay <= 0:
            return asyncio.sleep(0)
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._sleepers[fut] = self._now + delay
        self._slept.set()
        return self._wait(fut)

    async def _wait(self, fut: asyncio.Future[None]) -> None:
        self._started.add(fut)
        try:
            await fut
        finally:
            self._sleepers.pop(fut, None)
            self._started.discard(fut)
            if fut in self._woken:
                self._woken.discard(fut)
                if not self._woken:
                    self._all_resumed.set()

    def wakeups(self) -> list[float]:
        """When the pending sleepers wake, earliest first."""
        return sorted(at for f, at in self._sleepers.items() if not f.done())

    async def wakes_at(self, at: float, sleepers: int = 1, timeout: float = 5.0) -> None:  # noqa: ASYNC109
        """Wait until `sleepers` sleeps end at exactly `at`: the schedule under test, not a guess at how long the
        code needs (it fails naming what is scheduled instead)."""
        try:
            async with asyncio.timeout(timeout):
                while self.wakeups().count(at) < sleepers:
                    self._slept.clear()
                    await self._slept.wait()
        except TimeoutError:
            raise AssertionError(f"expected {sleepers} sleeper(s) due at {at}, scheduled: {self.wakeups()}") from None

    async def advance_to(self, at: float, sleepers: int = 1) -> None:
        """Once `sleepers` sleeps end at exactly `at`, move time there (see `advance`)."""
        await self.wakes_at(at, sleepers)
        await self._move_to(at)

    async def advance(self, dt: float) -> None:
        """Move time on by `dt` and wait until every sleeper that wakes has resumed (one whose task has not
        started yet finds its wake-up already due when it does)."""
        await self._move_to(self._now + dt)

    async def _move_to(self, at: float) -> None:
        self._now = at
        due = [f for f, when in self._sleepers.items() if when <= at]
        self._woken = {f for f in due if f in self._started and not f.done()}
        for f in due:
            del self._sleepers[f]
            if not f.done():
                f.set_result(None)
        if not self._woken:
            return
        self._all_resumed.clear()
        async with asyncio.timeout(5):
            await self._all_resumed.wait()


#: One step of fake time. Binary fractions add up exactly, so a scheduled time can be compared with `==`.
STEP = 0.0625
#: The connect window of `RecordedLimiter`: OKX's second plus one step of margin.
WINDOW = 1.0 + STEP


def steady_backoff(delay: float = STEP) -> Callable[[], Iterator[float]]:
    """A reconnect backoff without jitter, so that a test can name every time it schedules."""
    return lambda: itertools.repeat(delay)


class RecordedLimiter(ConnectLimiter):
    """OKX's 3 connects per second on the test's fake clock (window `WINDOW`), noting when it let each attempt
    start."""

    def __init__(self, timer: FakeTimer, per_second: float = 3) -> None:
        super().__init__(per_second, timer, margin_s=STEP)
        self._fake = timer
        self.starts: list[float] = []

    async def acquire(self) -> None:
        await super().acquire()
        self.starts.append(self._fake.now())


async def until(predicate: Callable[[], bool], what: str, timeout_s: float = 5.0) -> None:
    """Wait for a condition on a connection's own state (its counters change without notifying anyone)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not predicate():
        if loop.time() > deadline:
            raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")
        await asyncio.sleep(0.001)  # polling a condition, not a fixed delay


def local_clock() -> ServerClock:
    return ServerClock(lambda: time.time_ns() // 1_000_000)


def rest_resync(rest_base: str, clock: ServerClock) -> Callable[[], Awaitable[None]]:
    """What the supervisor injects: measure the offset to the server's /api/v5/public/time."""

    async def resync() -> None:
        async with httpx.AsyncClient(base_url=rest_base) as client:
            sent = clock.local_ms()
            body = (await client.get("/api/v5/public/time")).json()
            clock.update(OffsetSample(sent, clock.local_ms(), int(body["data"][0]["ts"])))

    return resync


class Recorder:
    """Drains the connection layer's queue into a list, like the pipeline would, and wakes waiters."""

    def __init__(self, queue: asyncio.Queue[Inbound]) -> None:
        self.queue = queue
        self.items: list[Inbound] = []
        self._changed = asyncio.Condition()

    async def run(self) -> None:
        while True:
            item = await self.queue.get()
            async with self._changed:
                self.items.append(item)
                self._changed.notify_all()

    async def wait_for(self, predicate: Callable[[list[Inbound]], bool], timeout: float = 5.0) -> None:  # noqa: ASYNC109
        async with asyncio.timeout(timeout), self._changed:
            await self._changed.wait_for(lambda: predicate(self.items))

    def events(self, kind: LinkEventKind | None = None) -> list[LinkEvent]:
        return [i for i in self.items if isinstance(i, LinkEvent) and (kind is None or i.kind is kind)]

    def frames(self) -> list[InboundFrame]:
        return [i for i in self.items if isinstance(i, InboundFrame)]


def count(kind: LinkEventKind, arg: SubArg | None = None) -> Callable[[list[Inbound]], int]:
    def n(items: list[Inbound]) -> int:
        return sum(1 for i in items if isinstance(i, LinkEvent) and i.kind is kind and (arg is None or arg in i.args))
    return n


def trade_ids(frame: InboundFrame) -> Iterator[int]:
    """Every individual trade id a `trades` push covers (an aggregate with count n ends at tradeId)."""
    try:
        msg = orjson.loads(frame.data)
    except orjson.JSONDecodeError:
        return  # junk (the tests inject some); the pipeline turns it into a dead letter
    if not isinstance(msg, dict) or "data" not in msg or msg.get("arg", {}).get("channel") != "trades":
        return
    for row in msg["data"]:
        last = int(row["tradeId"])
        yield from range(last - int(row.get("count", "1")) + 1, last + 1)


def is_push(frame: InboundFrame) -> bool:
    return frame.data.startswith(b'{"arg"')


@contextlib.asynccontextmanager
async def running(*coros: Coroutine[Any, Any, None]) -> AsyncIterator[list[asyncio.Task[None]]]:
    """Run `coros` as tasks; on exit cancel them in reverse order (connections first, the recorder last)."""
    tasks = [asyncio.create_task(c) for c in coros]
    try:
        yield tasks
    finally:
        for task in reversed(tasks):
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)


class LogEvents(logging.Handler):
    """Counts structured log events by name and lets a test await one (event-based, no polling)."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.seen: list[logging.LogRecord] = []
        self._waiters: list[tuple[str, asyncio.Future[logging.LogRecord]]] = []
        self._changed = asyncio.Event()

    def emit(self, record: logging.LogRecord) -> None:
        self.seen.append(record)
        for name, fut in list(self._waiters):
            if record.getMessage() == name and not fut.done():
                fut.set_result(record)
        self._changed.set()

    async def wait_until(self, predicate: Callable[[list[logging.LogRecord]], bool],
                         timeout: float = 5.0) -> None:  # noqa: ASYNC109
        """Re-check `predicate(records)` at every new log record."""
        async with asyncio.timeout(timeout):
            while not predicate(self.seen):
                self._changed.clear()
                await self._changed.wait()

    def names(self) -> list[str]:
        return [r.getMessage() for r in self.seen]

    async def wait(self, name: str, timeout: float = 5.0) -> logging.LogRecord:  # noqa: ASYNC109
        for record in self.seen:
            if record.getMessage() == name:
                return record
        fut: asyncio.Future[logging.LogRecord] = asyncio.get_running_loop().create_future()
        self._waiters.append((name, fut))
        async with asyncio.timeout(timeout):
            return await fut


@contextlib.contextmanager
def log_events() -> Iterator[LogEvents]:
    handler = LogEvents()
    logger = logging.getLogger("ingest")
    old_level = logger.level
    logger.setLevel(logging.DEBUG)
    logger.addHandler(handler)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)
