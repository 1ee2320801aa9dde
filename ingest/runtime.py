"""One task runtime for every service: every task owned, every stop bounded, the first failure surfaced.

Why this exists: three supervision styles (a task dict with `asyncio.wait`, done-callbacks, bare
`TaskGroup`s) each had a way to hang or lose a failure. A stop that waits for a task without a limit hangs
the process whenever that task swallows its cancellation, which aiokafka's internals and Python 3.11's
`asyncio.wait_for` both can do (the inner call finishing in the same loop step as the cancel). So:

- `stop_task(task, timeout_s)` cancels a task and waits for it at most `timeout_s`, with `asyncio.wait`
  (which never swallows a cancellation of the caller and always returns at its deadline); a task that still
  runs is abandoned with an error log line instead of hanging the caller.
- `bounded(awaitable, timeout_s)` runs one step (a close, a flush) as a task under the same rule.
- `Runtime` owns a service's long-lived tasks: `spawn` them, `wait` for the stop event or the first task
  that ends (its name and cause), `stop` them in the order the service needs, each with a deadline, and
  `close` whatever is left; it is an async context manager, so an exception anywhere still stops every task.

Exit codes live here too, so every service and the CLI agree on them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Coroutine, Iterable
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Final, TypeVar

log = logging.getLogger("ingest.runtime")

T = TypeVar("T")

EXIT_OK: Final = 0  # a clean stop
EXIT_TASK_DIED: Final = 1  # a task ended unexpectedly: restart me
EXIT_CONFIG: Final = 2  # bad configuration or credentials: fix, then restart

#: After a cancel, how long a task gets to unwind before it is abandoned (and logged).
CANCEL_GRACE_S: Final = 2.0


async def stop_task(task: asyncio.Task[Any], timeout_s: float = CANCEL_GRACE_S, *, what: str | None = None) -> bool:
    """Cancel `task` and wait at most `timeout_s` for it to end; True when it ended.

    An exception the task raised while stopping is logged, never raised: a stop must complete."""
    if not task.done():
        task.cancel()
        await asyncio.wait({task}, timeout=max(0.0, timeout_s))
    name = what or task.get_name()
    if not task.done():
        log.error("task_abandoned", extra={"task": name, "waited_s": round(timeout_s, 3),
                                           "consequence": "it ignored its cancellation; the stop goes on without it"})
        return False
    if not task.cancelled():
        exc = task.exception()
        if exc is not None:
            log.error("task_failed_during_stop", extra={"task": name, "error": repr(exc)}, exc_info=exc)
    return True


async def finish_task(task: asyncio.Task[Any], timeout_s: float, *, what: str | None = None) -> bool:
    """Let `task` end on its own for up to `timeout_s`, then stop it (`stop_task`); True when it ended by itself."""
    if not task.done():
        await asyncio.wait({task}, timeout=max(0.0, timeout_s))
    if task.done():
        await stop_task(task, 0, what=what)  # collects (and logs) its exception
        return True
    await stop_task(task, CANCEL_GRACE_S, what=what)
    return False


async def bounded(step: Awaitable[T], timeout_s: float, *, what: str) -> T | None:
    """Run one step (a close, a flush) for at most `timeout_s`; None (and a log line) when it did not finish
    or failed. Never hangs and never raises anything but the caller's own cancellation."""
    task: asyncio.Task[T] = asyncio.ensure_future(step)
    try:
        await asyncio.wait({task}, timeout=max(0.0, timeout_s))
    except asyncio.CancelledError:
        await stop_task(task, CANCEL_GRACE_S, what=what)
        raise
    if not task.done():
        log.warning("step_timed_out", extra={"step": what, "timeout_s": round(timeout_s, 3)})
        await stop_task(task, CANCEL_GRACE_S, what=what)
        return None
    if task.cancelled():
        return None
    exc = task.exception()
    if exc is not None:
        log.warning("step_failed", extra={"step": what, "error": repr(exc)})
        return None
    return task.result()


@dataclass(frozen=True)
class Ended:
    """Why `Runtime.wait` returned: the stop event (`task is None`) or a task that ended, with its error."""

    task: str | None
    error: BaseException | None = None
    essential: bool = False

    @property
    def exit_code(self) -> int:
        """What this end means for the process: a stop or a non-essential task finishing cleanly is 0."""
        if self.task is None:
            return EXIT_OK
        return EXIT_TASK_DIED if (self.error is not None or self.essential) else EXIT_OK


class Runtime:
    """The owner of one service's long-lived tasks (structured: leaving the context stops them all)."""

    def __init__(self, name: str, *, stop_timeout_s: float = 10.0) -> None:
        self.name = name
        self.stop_timeout_s = stop_timeout_s
        self._tasks: dict[str, asyncio.Task[Any]] = {}
        self._essential: set[str] = set()

    async def __aenter__(self) -> Runtime:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.close(self.stop_timeout_s)

    def spawn(self, name: str, coro: Coroutine[Any, Any, Any], *, essential: bool = False) -> asyncio.Task[Any]:
        """Start a task this runtime owns; `essential` tasks end the service even when they return cleanly."""
        if name in self._tasks:
            coro.close()
            raise ValueError(f"task {name!r} already runs in {self.name}")
        task = asyncio.create_task(coro, name=f"{self.name}:{name}")
        self._tasks[name] = task
        if essential:
            self._essential.add(name)
        return task

    def __contains__(self, name: str) -> bool:
        return name in self._tasks

    @property
    def names(self) -> list[str]:
        return list(self._tasks)

    async def wait(self, stop: asyncio.Event) -> Ended:
        """Block until `stop` is set or a task ends; a non-essential task that returns cleanly is logged and
        waited past. Returns the first reason to stop, with the failing task's cause."""
        stopper = asyncio.create_task(stop.wait(), name=f"{self.name}:stop")
        try:
            while True:
                watched = {t for t in self._tasks.values() if not t.done()} | {stopper}
                ended_now = [n for n, t in self._tasks.items() if t.done()]
                if not ended_now:
                    await asyncio.wait(watched, return_when=asyncio.FIRST_COMPLETED)
                    ended_now = [n for n, t in self._tasks.items() if t.done()]
                if stopper.done() and not ended_now:
                    return Ended(None)
                for name in ended_now:
                    task = self._tasks.pop(name)
                    error = None if task.cancelled() else task.exception()
                    essential = name in self._essential
                    if error is not None or essential or task.cancelled():
                        log.error("task_died", extra={"service": self.name, "task": name, "error": repr(error),
                                                      "cancelled": task.cancelled()}, exc_info=error)
                        return Ended(name, error, essential or task.cancelled())
                    log.info("task_finished", extra={"service": self.name, "task": name})
                if stopper.done():
                    return Ended(None)
        finally:
            stopper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await stopper

    async def stop(self, name: str, timeout_s: float | None = None) -> bool:
        """Stop one task (cancel, bounded wait); True when it ended."""
        task = self._tasks.pop(name, None)
        if task is None:
            return True
        return await stop_task(task, CANCEL_GRACE_S if timeout_s is None else timeout_s, what=name)

    def pop(self, name: str) -> asyncio.Task[Any] | None:
        """Take a task out of the runtime's care (the caller now owns its stop)."""
        self._essential.discard(name)
        return self._tasks.pop(name, None)

    async def close(self, timeout_s: float | None = None, *, order: Iterable[str] = ()) -> None:
        """Stop every task still owned: those named in `order` first, one by one, then the rest together;
        the whole within `timeout_s` (each task at least a short grace)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + (self.stop_timeout_s if timeout_s is None else timeout_s)
        for name in order:
            if name in self._tasks:
                await self.stop(name, max(0.1, deadline - loop.time()))
        rest = list(self._tasks.items())
        self._tasks.clear()
        for _, task in rest:
            if not task.done():
                task.cancel()
        if rest:
            await asyncio.wait([t for _, t in rest], timeout=max(0.1, deadline - loop.time()))
        for name, task in rest:
            await stop_task(task, 0, what=name)
