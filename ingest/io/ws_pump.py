"""The pipeline side of one logical OKX WebSocket connection: every frame and link event goes into the
pipeline's queue through `Pump`, in order.

Pushes take the fast lane (`fast_push`, from the socket's `data_received`) when nothing needs them to wait;
otherwise they are put under the emit lock, which keeps a sequence of puts together (a link event and the
frames it must precede or follow) and, during a 64008 overlap (`overlap`), holds the replacement's pushes in
its `OverlapAligner` until they are known not to repeat the old connection's. A frame already received is
handed over even when shutdown cancels the put (bounded by `shutdown_timeout_s`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator

from ingest.core.events import Inbound, InboundFrame, LinkEvent, LinkEventKind
from ingest.core.wsproto import is_push, push_arg_key
from ingest.io.inbox import Inbox
from ingest.io.timer import Timer
from ingest.io.ws_link import ConnectionCounters, Link, Overlap, cancel_current_task
from ingest.okx.channels import Endpoint, SubArg

#: The logger of `ingest.io.ws`: the WebSocket layer's events keep one logger whichever module logs them.
log = logging.getLogger("ingest.io.ws")


class Pump:
    """Puts one logical connection's frames and link events into the pipeline's queue (back-pressure intended)."""

    def __init__(self, name: str, endpoint: Endpoint, queue: asyncio.Queue[Inbound], counters: ConnectionCounters,
                 timer: Timer, shutdown_timeout_s: float) -> None:
        self.name = name
        self.endpoint = endpoint
        self.counters = counters
        self._queue = queue
        #: The inbox when it is one (fast lane pauses sockets instead of waiting); a plain queue otherwise.
        self._inbox = queue if isinstance(queue, Inbox) else None
        self._monotonic = timer.now
        self._shutdown_timeout_s = shutdown_timeout_s
        #: Held by a sequence of puts that must stay together; the fast lane steps aside while it is held.
        self.emit_lock = asyncio.Lock()
        #: The 64008 make-before-break in progress, if any (set by the connection and its hand-over).
        self.overlap: Overlap | None = None

    def forget(self, link: Link) -> None:
        """`link` no longer reads: the inbox must not resume it."""
        if self._inbox is not None:
            self._inbox.forget(link)

    def fast_push(self, link: Link, data: bytes) -> bool:
        """The fast lane (`TapConnection.tap`, called from the socket's data_received): a push is handed
        to the pipeline at once when nothing needs it to wait; False sends the frame the usual way."""
        queue = self._queue
        if not is_push(data) or self.overlap is not None or self.emit_lock.locked() or queue.full():
            return False
        recv_ts_ns = time.time_ns()
        link.keepalive.last_rx = self._monotonic()
        counters = self.counters
        counters.frames += 1
        counters.fast_lane += 1
        counters.bytes += len(data)
        link.recv_seq += 1
        queue.put_nowait(InboundFrame(conn=link.conn, name=self.name, endpoint=self.endpoint, recv_seq=link.recv_seq,
                                      recv_ts_ns=recv_ts_ns, data=data, okx_conn_id=link.proto.conn_id))
        inbox = self._inbox
        if inbox is not None and inbox.over() and not link.draining:
            # Back-pressure without waiting: stop reading this socket until the pipeline has caught up.
            link.pause_reading()
            inbox.pause_until_room(link, link.resume_reading)
        return True

    @contextlib.asynccontextmanager
    async def emitting(self) -> AsyncIterator[None]:
        """Hold the emit lock (sequences of puts stay together); a cancellation while waiting for it is
        deferred until the emission is done, so shutdown never tears a frame's hand-over apart."""
        deferred = False
        while True:
            try:
                await self.emit_lock.acquire()
                break
            except asyncio.CancelledError:
                deferred = True
        try:
            yield
        finally:
            self.emit_lock.release()
            if deferred:
                cancel_current_task()

    async def put(self, item: Inbound) -> None:
        """Put one item into the pipeline's queue (back-pressure intended).

        A frame we received is handed over even when shutdown cancels us while the queue is full: the put
        is completed (bounded by `shutdown_timeout_s`) and the cancellation delivered again afterwards.
        """
        try:
            await self._queue.put(item)
            return
        except asyncio.CancelledError:
            pass
        try:
            async with asyncio.timeout(self._shutdown_timeout_s):
                await self._queue.put(item)
        except TimeoutError:
            self.counters.lost_at_shutdown += 1
            log.error("ws_lost_at_shutdown", extra={"ws_name": self.name, "item": type(item).__name__})
        finally:
            cancel_current_task()

    async def emit_push(self, link: Link, frame: InboundFrame) -> None:
        """Put a push read the usual way; during an overlap the aligner decides what is released now."""
        if self.overlap is None and not self.emit_lock.locked():
            # Fast path, no hand-over in progress: nothing needs this put to stay next to another.
            await self.put(frame)
            return
        async with self.emitting():
            ov = self.overlap
            aligner = ov.aligner if ov is not None else None
            key = push_arg_key(frame.data) if aligner is not None else None
            if ov is None or aligner is None or key is None or (link is not ov.old and link is not ov.new):
                await self.put(frame)
                return
            if link is ov.old:
                await self.put(frame)
                released = aligner.old_frame(key, frame.data)
            else:
                released = aligner.new_frame(key, frame.data, frame)
            for item in released:
                await self.put(item)
            ov.update()

    async def emit_item(self, item: Inbound) -> None:
        """Put one item under the emit lock (never between the puts of a sequence)."""
        async with self.emitting():
            await self.put(item)

    async def emit(self, kind: LinkEventKind, link: Link, args: tuple[SubArg, ...], *, code: str | None = None,
                   reason: str = "", replacement: str | None = None) -> None:
        """Put a link event (SUBSCRIBED, DISCONNECTED, ...) of `link` into the queue and log it."""
        event = LinkEvent(kind=kind, conn=link.conn, name=self.name, ts_ns=time.time_ns(), args=args, code=code,
                          reason=reason, replacement=replacement)
        await self.emit_item(event)
        log.info("ws_link_event", extra={"conn": link.conn, "ws_name": self.name, "kind": kind.value,
                                         "arg_count": len(args), "first_arg": str(args[0]) if args else None,
                                         "code": code, "reason": reason, "replacement": replacement})
