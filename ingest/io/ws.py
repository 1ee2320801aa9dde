"""One logical OKX WebSocket connection: connect, log in, subscribe, keep alive, reconnect, hand over.

What a frame means and which error code calls for what comes from the sans-I/O core
(`ingest.core.wsproto`, `ingest.core.session`); this module is the driver that owns the sockets and the
tasks. A logical connection (`Connection`, named e.g. "public-0") lives as long as the daemon and is carried
by one physical connection (`ws_link.Link`, id `conn`) at a time, two during a 64008 make-before-break.
Its collaborators, one module each: `ws_pump.Pump` (the pipeline side: order, the fast lane, the overlap
hold), `ws_driver.SessionDriver` (carries out each link's session: login, subscribe, keepalive, budget),
`ws_handover.Replacer` (64008), `ws_limiter.ConnectLimiter` (OKX's connect rate, process-wide), and
`ws_tap` (the fast lane's socket).

Guarantees to the pipeline (`ingest.core.events`), per physical connection `conn`:
- every text frame except `pong` is put into the queue (`recv_seq` from 1), in arrival order; pushes go
  straight from the socket's `data_received` (`TapConnection`), everything else through `recv()`, and a
  full `Inbox` pauses the socket rather than making anyone wait (back-pressure); during a 64008 overlap
  the replacement's pushes are held until they are known not to repeat the old connection's, so its order
  is kept per stream (arg), not across streams;
- `SUBSCRIBED(conn, arg)` directly after the ack frame, so before any push of that arg on `conn`;
- every SUBSCRIBED is balanced by exactly one later DISCONNECTED(conn, ...), CUTOVER(conn, ...) or
  SUBSCRIBE_FAILED(conn, ...) naming that arg, after the last frame of `conn` that could carry it;
- `SUBSCRIBE_FAILED` when OKX refused an arg for good (60018, 64003: never retried), when OKX ended it with
  `channel-conn-count-error` (retried from 60 s on, doubling to 30 min), or for every arg when the
  connection stops (a refused key). Transient refusals (64007, 60014, 63999, no answer) emit nothing: after
  their quick retries the arg is retried the same slow way while its stream's gap stays open;
- 64008: NOTICE(old, replacement=new), then the replacement's SUBSCRIBEDs (some may come after CUTOVER if
  OKX closed the old connection first), then the old connection's last frames, then DISCONNECTED(old,
  args not proven handed over) if any, then CUTOVER(old, proven args, replacement=new), then the
  replacement's held pushes. An owner-only consumer sees each push once.
- on shutdown, every frame already received is handed over before the socket is released.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import replace

from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidURI

from ingest.config import WsSettings
from ingest.core.backoff import full_jitter
from ingest.core.clock import ServerClock
from ingest.core.events import Inbound, InboundFrame, LinkEventKind
from ingest.core.plan import PlannedConnection
from ingest.core.subscriptions import SubscriptionScheduler
from ingest.core.wsproto import FrameKind, OverlapAligner, classify
from ingest.credentials import CredentialStore
from ingest.errors import CredentialError
from ingest.io.timer import SystemTimer, Timer
from ingest.io.tls import find_pin_error
from ingest.io.ws_driver import SessionDriver
from ingest.io.ws_handover import Replacer
from ingest.io.ws_limiter import ConnectLimiter
from ingest.io.ws_link import (
    ConnectionCounters,
    ConnectionStatus,
    ConnState,
    Link,
    connection_token,
    first_error,
)
from ingest.io.ws_pump import Pump
from ingest.io.ws_tap import TapConnection, open_tapped
from ingest.okx.channels import SubArg

log = logging.getLogger(__name__)


class Connection:
    """One logical OKX WebSocket connection that never gives up.

    `run()` connects (through the process-wide `ConnectLimiter`), logs in when the spec says so (a fresh
    timestamp each time, subscribing only after the `login` ack), subscribes in batches within the
    480 requests/hour budget of each physical connection, keeps the socket alive with text pings, and
    reconnects with capped full-jitter backoff that resets only after a connection stayed live for
    `healthy_after_s`. It ends only when cancelled, or with `LoginRejected` (or a TLS pin failure),
    which retrying cannot fix.
    """

    def __init__(
        self,
        spec: PlannedConnection,
        url: str,
        settings: WsSettings,
        queue: asyncio.Queue[Inbound],
        *,
        limiter: ConnectLimiter,
        credentials: CredentialStore | None = None,
        clock: ServerClock | None = None,
        resync_clock: Callable[[], Awaitable[None]] | None = None,
        backoff: Callable[[], Iterator[float]] | None = None,
        monotonic: Callable[[], float] = time.monotonic,
        ssl_context: ssl.SSLContext | None = None,
        token: str | None = None,
        proxy: str | None = None,
        timer: Timer | None = None,
    ) -> None:
        if spec.login and credentials is None:
            raise CredentialError(
                f"{spec.name} carries {', '.join(map(str, spec.args[:3]))}, which need a login; set OKX_API_KEY, "
                "OKX_API_SECRET and OKX_API_PASSPHRASE (or their *_FILE)"
            )
        self.name = spec.name
        self.endpoint = spec.endpoint
        self.login = spec.login
        self.url = url
        self.args: tuple[SubArg, ...] = spec.args
        self.settings = settings
        self.counters = ConnectionCounters()
        self._limiter = limiter
        self._backoff_factory = backoff or (lambda: full_jitter(settings.backoff_min_s, settings.backoff_max_s))
        #: The one clock every timing decision reads and sleeps on (`monotonic` is its `now` by default).
        self._timer: Timer = timer if timer is not None else SystemTimer(monotonic)
        self._monotonic = self._timer.now
        self._ssl = ssl_context if url.startswith("wss://") else None
        #: The HTTP(S) proxy to tunnel through (io/proxy.py decides); None connects directly, never by websockets'
        #: own reading of the environment.
        self._proxy = proxy
        self._token = token if token is not None else connection_token()
        self._generation = 0
        self._tg: asyncio.TaskGroup | None = None
        #: The physical connection that carries the streams now (the old one until a 64008 CUTOVER).
        self.primary: Link | None = None
        self._backing_off = False
        self._stopped = False
        self._shutting_down = False
        self.last_error: str | None = None
        #: When to (re)subscribe which arg: retries, parking, resubscribes (outlives physical connections).
        self.schedule = SubscriptionScheduler(spec.args, retries=settings.subscribe_retries,
                                              backoff_min_s=settings.backoff_min_s,
                                              backoff_max_s=settings.backoff_max_s,
                                              resubscribe_min_interval_s=settings.resubscribe_min_interval_s)
        #: The pipeline side (queue, order, fast lane, the 64008 overlap), the session side of each link, and
        #: the make-before-break: the three collaborators this driver sequences.
        self._pump = Pump(self.name, self.endpoint, queue, self.counters, self._timer, settings.shutdown_timeout_s)
        self._driver = SessionDriver(self, self._pump, self._timer, credentials=credentials,
                                     clock=clock or ServerClock(lambda: time.time_ns() // 1_000_000),
                                     resync_clock=resync_clock)
        self._replacer = Replacer(self, self._pump, self._timer, settings, self._backoff_factory)

    # ------------------------------------------------------------------------------------------ public

    @property
    def state(self) -> ConnState:
        if self._stopped:
            return ConnState.STOPPED
        if self._backing_off:
            return ConnState.BACKING_OFF
        return self.primary.state if self.primary is not None else ConnState.IDLE

    async def run(self) -> None:
        """Keep the connection up until cancelled; on cancellation, close and hand over every received frame."""
        self._stopped = False
        self._shutting_down = False
        try:
            async with asyncio.TaskGroup() as tg:
                self._tg = tg
                replacer = tg.create_task(self._replacer.run(), name=f"{self.name}-replacer")
                try:
                    await self._supervise()
                finally:
                    replacer.cancel()
        except BaseExceptionGroup as group:
            raise first_error(group) from None
        finally:
            self._tg = None

    @property
    def failed(self) -> dict[SubArg, str]:
        """Args OKX refused for good, with the code (or reason) it gave."""
        return self.schedule.failed

    def request_resubscribe(self, arg: SubArg, reason: str) -> bool:
        """Unsubscribe and subscribe `arg` again (a fresh book snapshot); coalesced, rate-limited, non-blocking.

        Returns False when this connection does not carry `arg` or OKX refused it for good.
        """
        added = self.schedule.request_resubscribe(arg, reason)
        if added is None:
            return False
        if added:
            log.info("ws_resubscribe_requested", extra={"ws_name": self.name, "arg": str(arg), "reason": reason})
        if self.primary is not None:
            self.primary.work.set()
        return True

    def on_credentials_changed(self, version: int) -> bool:
        """Replace the connection (make-before-break) if it logged in with credentials older than `version`."""
        link = self.primary
        if link is None or link.creds_version is None or link.creds_version >= version:
            return False
        self.request_replace("credentials rotated")
        return True

    def request_replace(self, reason: str, code: str | None = None) -> None:
        """Open a replacement connection, move every stream to it without a gap, then close this one."""
        self._replacer.request(reason, code)

    def status(self) -> ConnectionStatus:
        link = self.primary
        now = self._monotonic()
        return ConnectionStatus(
            name=self.name,
            endpoint=self.endpoint,
            url=self.url,
            login=self.login,
            state=self.state,
            conn=link.conn if link is not None else None,
            okx_conn_id=link.proto.conn_id if link is not None else None,
            args=len(self.args),
            subscribed=len(link.owned) if link is not None else 0,
            failed={**{str(a): c for a, c in self.failed.items()},
                    **{str(a): f"{c} (retrying)" for a, (_, c) in self.schedule.parked.items()}},
            pending_resubscribe=self.schedule.pending_resubscribes(),
            budget_remaining=link.budget.remaining(now) if link is not None else None,
            live_for_s=(now - link.live_since) if link is not None and link.live_since is not None
            and link.ended_at is None else None,
            last_error=self.last_error,
            counters=replace(self.counters),
        )

    # ------------------------------------------------------------------------------------------ supervision

    async def _supervise(self) -> None:
        """Physical connections one after another, with backoff that resets only after a healthy one."""
        backoff = self._backoff_factory()
        while True:
            link = self.new_link(replacement=False)
            self.primary = link
            self.spawn(link)
            current = link
            while True:
                await current.finished.wait()
                if self.primary is current:
                    break
                current = self.primary  # handed over to a replacement: follow it
            if current.fatal is not None:
                self._stopped = True
                self.last_error = str(current.fatal)
                self._log_state(current, current.state, ConnState.STOPPED, current.end_reason)
                # No data will come for these until an operator fixes the cause: say so, per arg.
                await self._pump.emit(LinkEventKind.SUBSCRIBE_FAILED, current,
                                      tuple(self.schedule.wanted()),
                                      code=getattr(current.fatal, "code", None), reason=str(current.fatal))
                raise current.fatal
            ended = current.ended_at or self._monotonic()
            if current.live_since is not None and ended - current.live_since >= self.settings.healthy_after_s:
                backoff = self._backoff_factory()
            delay = next(backoff)
            self._backing_off = True
            self._log_state(current, current.state, ConnState.BACKING_OFF, current.end_reason, delay_s=delay)
            try:
                await self._timer.sleep(delay)
            finally:
                self._backing_off = False

    def new_link(self, replacement: bool) -> Link:
        self._generation += 1
        return Link(f"{self.name}#{self._generation}-{self._token}", self._generation, replacement, self.settings,
                     self.args, self.schedule)

    def spawn(self, link: Link) -> None:
        assert self._tg is not None
        self._tg.create_task(self._run_link(link), name=link.conn)

    async def _run_link(self, link: Link) -> None:
        try:
            await self._connect_and_serve(link)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # one link's bug must not take the logical connection down
            link.end_reason = link.end_reason or f"unexpected {type(exc).__name__}: {exc}"
            log.exception("ws_link_error", extra={"conn": link.conn, "ws_name": self.name})
        finally:
            link.ended_at = self._monotonic()
            link.finished.set()
            if link.end_reason:
                self.last_error = link.end_reason

    def set_link_state(self, link: Link, state: ConnState, reason: str = "") -> None:
        if link.state is not state:
            self._log_state(link, link.state, state, reason)
            link.state = state

    def _log_state(self, link: Link, old: ConnState, new: ConnState, reason: str = "", **fields: object) -> None:
        log.info("ws_state", extra={"conn": link.conn, "ws_name": self.name, "endpoint": self.endpoint.value,
                                    "role": link.role, "from": old.value, "to": new.value, "reason": reason,
                                    **fields})

    # ------------------------------------------------------------------------------------------ one link

    async def _connect_and_serve(self, link: Link) -> None:
        if self.login:
            await self._driver.wait_auth_pause(link)
        self.set_link_state(link, ConnState.CONNECTING)
        await self._limiter.acquire()
        try:
            try:
                link.ws = await open_tapped(self.url, open_timeout=self.settings.connect_timeout_s,
                                            close_timeout=self.settings.close_timeout_s,
                                            max_size=self.settings.max_message_bytes,
                                            compression=self.settings.compression, ssl_context=self._ssl,
                                            proxy=self._proxy)
            finally:
                self._limiter.release()  # OKX counted the attempt by now, whatever its outcome
        except (OSError, TimeoutError, InvalidHandshake, InvalidURI) as exc:
            self.counters.connect_failures += 1
            pin = find_pin_error(exc)
            if pin is not None:
                link.fatal = pin
            link.end_reason = f"connect to {self.url} failed: {type(exc).__name__}: {exc}"
            log.warning("ws_connect_failed", extra={"conn": link.conn, "ws_name": self.name, "url": self.url,
                                                    "error": f"{type(exc).__name__}: {exc}"})
            self.set_link_state(link, ConnState.CLOSED, link.end_reason)
            return
        self.counters.connects += 1
        ov = self._pump.overlap
        if ov is not None and ov.new is link:
            # From here on, the old connection's frames may also be due on this one (causality).
            ov.aligner = OverlapAligner()
        link.opened.set()
        driver = asyncio.create_task(self._driver.drive(link), name=f"{link.conn}-driver")
        try:
            await self._read(link)
        finally:
            driver.cancel()
            await asyncio.gather(driver, return_exceptions=True)
            await self._teardown(link)

    async def _read(self, link: Link) -> None:
        """Read until the socket closes. The read loop only stamps `last_rx` (no timer per message on the hot
        path); the driver's keepalive decides from it."""
        ws = link.ws
        assert ws is not None
        now = self._monotonic
        if ws.fast_lane:
            fast_push = self._pump.fast_push
            ws.tap = lambda data: fast_push(link, data)
        try:
            while True:
                data = await ws.recv(decode=False)
                link.keepalive.last_rx = now()
                await self._on_slow_message(link, ws, data)
        except ConnectionClosed as exc:
            link.close_code = exc.rcvd.code if exc.rcvd is not None else None
            if exc.rcvd is None:
                link.abnormal = True
            link.closed_by_us = (exc.sent is not None and exc.rcvd is not None and exc.rcvd_then_sent is False
                                 and exc.rcvd.code == exc.sent.code)
            if not link.end_reason:
                link.end_reason = (f"closed by OKX: {exc.rcvd.code} {exc.rcvd.reason}".strip()
                                   if exc.rcvd is not None else "connection lost (no close frame)")
        except asyncio.CancelledError:
            self._shutting_down = True
            link.end_reason = "shutdown"
            try:
                async with asyncio.timeout(self.settings.shutdown_timeout_s):
                    await self._drain(link)
            except TimeoutError:
                log.error("ws_shutdown_drain_incomplete", extra={"conn": link.conn, "ws_name": self.name})
            raise
        finally:
            ws.tap = None  # nothing of this link reaches the pipeline after its reader ends
            self._pump.forget(link)

    async def _drain(self, link: Link) -> None:
        """Close the socket and hand every frame already received to the pipeline."""
        ws = link.ws
        assert ws is not None
        self._read_to_the_end(link)  # the close handshake and the last frames must be read
        closer = asyncio.create_task(ws.close(1000, "shutdown"))
        try:
            while True:
                await self._on_slow_message(link, ws, await ws.recv(decode=False))
        except ConnectionClosed:
            pass
        finally:
            await asyncio.gather(closer, return_exceptions=True)

    def _read_to_the_end(self, link: Link) -> None:
        """A closing link reads whatever the inbox holds: its close handshake must get through."""
        link.draining = True
        self._pump.forget(link)
        link.resume_reading()

    def request_close(self, link: Link, reason: str, code: int = 1000) -> None:
        """Start a graceful close without waiting for it (safe from the reader itself)."""
        if not link.end_reason:
            link.end_reason = reason
        self._read_to_the_end(link)
        if link.closer is None and link.ws is not None:
            link.closer = asyncio.create_task(link.ws.close(code, reason[:120]), name=f"{link.conn}-close")

    async def _teardown(self, link: Link) -> None:
        """After the last frame of `link`: hand over (64008) or balance its SUBSCRIBEDs with DISCONNECTED.

        Runs to the end even when shutdown interrupts a hand-over, bounded by `shutdown_timeout_s`.
        """
        cancelled = False
        try:
            if link.closer is not None:
                await asyncio.gather(link.closer, return_exceptions=True)
            ov = self._pump.overlap
            if ov is not None and link is ov.old and not self._shutting_down:
                await self._replacer.hand_over(ov)
        except asyncio.CancelledError:
            self._shutting_down = cancelled = True
        try:
            async with asyncio.timeout(self.settings.shutdown_timeout_s if self._shutting_down else None):
                await self._release(link)
        except TimeoutError:
            log.error("ws_shutdown_incomplete", extra={"conn": link.conn, "ws_name": self.name,
                                                       "owned": len(link.owned)})
        if cancelled:
            raise asyncio.CancelledError

    async def _release(self, link: Link) -> None:
        ov = self._pump.overlap
        if ov is not None and (link is ov.new or link is ov.old):
            async with self._pump.emitting():
                if self._pump.overlap is ov:
                    # No hand-over (the replacement failed, or shutdown): held frames still reach the pipeline.
                    held, _ = ov.aligner.finish() if ov.aligner is not None else ([], set())
                    for frame in held:
                        await self._pump.put(frame)
                    ov.aligner = None
                    if link is ov.new:
                        self._pump.overlap = None
        if link.owned:
            await self._pump.emit(LinkEventKind.DISCONNECTED, link, tuple(sorted(link.owned)),
                                  code=str(link.close_code) if link.close_code is not None else None,
                                  reason=link.end_reason)
            link.owned.clear()
        if link.opened.is_set():
            self.counters.disconnects += 1
            log.info("ws_disconnected", extra={"conn": link.conn, "ws_name": self.name, "role": link.role,
                                               "reason": link.end_reason, "close_code": link.close_code,
                                               "abnormal": link.abnormal, "frames": link.recv_seq})
        self.set_link_state(link, ConnState.CLOSED, link.end_reason)

    async def _on_slow_message(self, link: Link, ws: TapConnection, data: str | bytes) -> None:
        """A message read with recv() (the usual path): handled, then no longer pending, so the fast lane
        may take the frames behind it (the only place `slow_pending` goes down)."""
        try:
            await self._on_frame(link, data if isinstance(data, bytes) else data.encode())
        finally:
            ws.message_handled()

    async def _on_frame(self, link: Link, data: bytes) -> None:
        recv_ts_ns = time.time_ns()
        self.counters.frames += 1
        self.counters.bytes += len(data)
        c = classify(data)
        if c.kind is FrameKind.PONG:
            self.counters.pongs += 1
            return
        link.recv_seq += 1
        ev = c.event
        frame = InboundFrame(
            conn=link.conn, name=self.name, endpoint=self.endpoint, recv_seq=link.recv_seq, recv_ts_ns=recv_ts_ns,
            data=data, okx_conn_id=(ev.conn_id if ev is not None and ev.conn_id else None) or link.proto.conn_id,
        )
        if c.kind is FrameKind.PUSH:
            await self._pump.emit_push(link, frame)
            return
        await self._pump.emit_item(frame)  # events and junk reach the pipeline too (dead letters, audit)
        if ev is None:
            return
        try:
            await self._driver.on_event(link, ev)
        except asyncio.CancelledError:
            raise
        except Exception:  # a frame we cannot handle is logged, never fatal
            self.counters.frame_errors += 1
            log.exception("ws_event_error", extra={"conn": link.conn, "ws_name": self.name, "event": ev.event})

