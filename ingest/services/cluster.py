"""The connections of the shards this replica owns in cluster mode (docs/CLUSTER.md).

One `ConnectionManager` per owned shard that has subscriptions, all under one connect limiter (OKX counts
connects per IP). A new assignment starts the managers of the shards gained and stops those of the shards
lost; stopping a manager closes its sockets only after every frame they received is in the inbox, so the
pipeline publishes everything the replica received before it let go. Shards kept are not touched.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence

from ingest.config import OkxSettings, WsSettings
from ingest.core.clock import ServerClock
from ingest.core.cluster import shard_of_arg, shards_of_args
from ingest.core.events import Inbound
from ingest.credentials import CredentialStore
from ingest.io.cluster import Assignment
from ingest.io.ws import Connection, ConnectLimiter
from ingest.okx.channels import SubArg
from ingest.runtime import CANCEL_GRACE_S
from ingest.services.connections import ConnectionManager, ManagerStatus

log = logging.getLogger(__name__)

#: Called with a shard and its args before its connections start (restore positions) or after they stopped.
ShardHook = Callable[[int, Sequence[SubArg]], Awaitable[None]]


async def _no_hook(shard: int, args: Sequence[SubArg]) -> None:
    return None


class ShardConnections:
    """Every connection of the owned shards; a `Resubscriber` and a status like one `ConnectionManager`'s."""

    def __init__(self, okx: OkxSettings, ws: WsSettings, queue: asyncio.Queue[Inbound], args: Sequence[SubArg],
                 shards: int, *, credentials: CredentialStore | None = None, clock: ServerClock | None = None,
                 resync_clock: Callable[[], Awaitable[None]] | None = None,
                 before_start: ShardHook = _no_hook, after_stop: ShardHook = _no_hook) -> None:
        self._okx, self._ws, self._queue = okx, ws, queue
        self._credentials, self._clock, self._resync = credentials, clock, resync_clock
        self.shards = shards
        self.by_shard: Mapping[int, list[SubArg]] = shards_of_args(args, shards)
        self.limiter = ConnectLimiter(ws.connects_per_s)
        self._before_start, self._after_stop = before_start, after_stop
        self._managers: dict[int, ConnectionManager] = {}
        self._tasks: dict[int, asyncio.Task[None]] = {}
        self._group: asyncio.TaskGroup | None = None
        self._running = asyncio.Event()
        self._lock = asyncio.Lock()
        self.owned: frozenset[int] = frozenset()
        self.generation = -1

    @property
    def connections(self) -> tuple[Connection, ...]:
        return tuple(c for m in self._managers.values() for c in m.connections)

    def args_owned(self) -> list[SubArg]:
        return [a for s in sorted(self.owned) for a in self.by_shard.get(s, ())]

    async def run(self) -> None:
        """Own the managers' tasks until cancelled; then every manager closes its sockets after its last frame."""
        async with asyncio.TaskGroup() as group:
            self._group = group
            self._running.set()
            try:
                await asyncio.Event().wait()
            finally:
                self._group = None
                self._running.clear()

    async def apply(self, assignment: Assignment) -> None:
        """Record exactly `assignment.shards` from now on: stop the shards lost (drained), start the ones gained."""
        await self._running.wait()
        async with self._lock:
            lost = sorted(self.owned - assignment.shards)
            gained = sorted(assignment.shards - self.owned)
            for shard in lost:
                await self._stop(shard)
            self.owned, self.generation = assignment.shards, assignment.generation
            for shard in gained:
                await self._start(shard)
            log.info("cluster_shards_applied", extra={
                "generation": assignment.generation, "owned": len(self.owned), "gained": gained, "lost": lost,
                "subscriptions": sum(len(self.by_shard.get(s, ())) for s in self.owned)})

    async def _start(self, shard: int) -> None:
        args = self.by_shard.get(shard)
        if not args or self._group is None:
            return
        await self._before_start(shard, args)
        manager = ConnectionManager(self._okx, self._ws, self._queue, credentials=self._credentials,
                                    clock=self._clock, resync_clock=self._resync, args=list(args),
                                    limiter=self.limiter, name_prefix=f"s{shard}-")
        self._managers[shard] = manager
        self._tasks[shard] = self._group.create_task(manager.run(), name=f"shard-{shard}")

    async def _stop(self, shard: int) -> None:
        task = self._tasks.pop(shard, None)
        self._managers.pop(shard, None)
        if task is None:
            return
        task.cancel()
        # Its sockets close after their last frame is queued (bounded by ws.shutdown_timeout_s in each).
        await asyncio.wait({task}, timeout=self._ws.shutdown_timeout_s + CANCEL_GRACE_S)
        await self._after_stop(shard, self.by_shard.get(shard, ()))

    def request_resubscribe(self, arg: SubArg, reason: str) -> None:
        manager = self._managers.get(shard_of_arg(arg, self.shards))
        if manager is None:
            log.warning("ws_resubscribe_ignored", extra={"arg": str(arg), "reason": reason,
                                                         "why": "its shard is not owned here"})
            return
        manager.request_resubscribe(arg, reason)

    def status(self) -> ManagerStatus:
        parts = [m.status() for m in self._managers.values()]
        stopped: dict[str, str] = {}
        for p in parts:
            stopped.update(p.stopped)
        return ManagerStatus(tuple(c for p in parts for c in p.connections), self.limiter.admitted, stopped)
