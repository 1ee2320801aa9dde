"""One logical OKX WebSocket connection: connect, log in, subscribe, keep alive, reconnect, hand over.

What a frame means and which error code calls for what comes from the sans-I/O core
(`ingest.core.wsproto`); this module owns the sockets, the timers and the queue. A logical connection
(`Connection`, named e.g. "public-0") lives as long as the daemon and is carried by one physical
connection (`_Link`, id `conn`) at a time, two during a 64008 make-before-break.

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
import contextlib
import enum
import logging
import secrets
import ssl
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterator
from dataclasses import dataclass, field, replace
from typing import Any

from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidURI

from ingest.config import WsSettings
from ingest.core.backoff import full_jitter
from ingest.core.clock import ServerClock
from ingest.core.events import Inbound, InboundFrame, LinkEvent, LinkEventKind
from ingest.core.plan import PlannedConnection
from ingest.core.session import (
    AbortLink,
    ChannelCount,
    CloseLink,
    ConnCountExceeded,
    Decision,
    Emit,
    Entered,
    FailedArg,
    LinkFailed,
    LinkPhase,
    LinkSession,
    LoginAnswered,
    NoticeSeen,
    ParkedArg,
    Recovered,
    Resubscribing,
    Retrying,
    SendPing,
    Split,
    UnexpectedSeen,
)
from ingest.core.subscriptions import SubscriptionScheduler
from ingest.core.wsproto import (
    PING,
    FrameKind,
    LoggedIn,
    LoginAction,
    LoginRefused,
    OkxEvent,
    OverlapAligner,
    arg_from_key,
    classify,
    counts_against_key,
    handover_args,
    is_push,
    push_arg_key,
)
from ingest.credentials import CredentialStore
from ingest.errors import CredentialError, IngestError
from ingest.io.inbox import Inbox
from ingest.io.timer import SystemTimer, Timer
from ingest.io.tls import find_pin_error
from ingest.io.ws_tap import INBOX, TapConnection, open_tapped
from ingest.okx import codes
from ingest.okx.channels import Endpoint, SubArg

log = logging.getLogger(__name__)

def connection_token() -> str:
    """Part of every physical connection id, drawn per `Connection` object: an id is never reused, not across
    restarts and not across two recorders run one after the other in one process (tests, embedded restarts)."""
    return f"{int(time.time()):x}{secrets.token_hex(3)}"


class ConnState(enum.StrEnum):
    """Where a connection stands; every transition is logged as `ws_state`."""

    IDLE = "idle"
    CONNECTING = "connecting"
    LOGGING_IN = "logging-in"
    SUBSCRIBING = "subscribing"
    LIVE = "live"
    BACKING_OFF = "backing-off"
    STOPPED = "stopped"
    CLOSED = "closed"


class LoginRejected(CredentialError):
    """OKX refused the API key for good (60005/60007/60024/60032); the connection stopped instead of retrying."""

    def __init__(self, name: str, url: str, code: str | None, msg: str, key_hint: str) -> None:
        self.code = code
        super().__init__(
            f"{name}: OKX refused the login at {url} with {code} ({msg}) for API key {key_hint}. Retrying a "
            "wrong key is pointless and looks like an attack, so this connection stopped. Fix OKX_API_KEY, "
            "OKX_API_SECRET and OKX_API_PASSPHRASE (or their *_FILE); it restarts on the next credential change."
        )


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


@dataclass(slots=True)
class ConnectionCounters:
    """Monotonic counters of one logical connection (all its physical connections)."""

    connects: int = 0
    connect_failures: int = 0
    disconnects: int = 0
    frames: int = 0
    #: Frames handed over by the fast lane (the rest went through websockets' recv()).
    fast_lane: int = 0
    bytes: int = 0
    pings: int = 0
    pongs: int = 0
    pong_timeouts: int = 0
    requests: int = 0
    login_failures: int = 0
    subscribe_failures: int = 0
    resubscribes: int = 0
    notices: int = 0
    cutovers: int = 0
    frame_errors: int = 0
    lost_at_shutdown: int = 0


@dataclass(frozen=True, slots=True)
class ConnectionStatus:
    """A snapshot for health checks and metrics."""

    name: str
    endpoint: Endpoint
    url: str
    login: bool
    state: ConnState
    conn: str | None
    okx_conn_id: str | None
    args: int
    subscribed: int
    failed: dict[str, str]
    pending_resubscribe: int
    budget_remaining: int | None
    live_for_s: float | None
    last_error: str | None
    counters: ConnectionCounters


class _LinkFailure(Exception):
    """Ends one physical connection; `fatal` stops the logical connection too."""

    def __init__(self, reason: str, fatal: IngestError | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.fatal = fatal


class _Link:
    """One physical connection and everything that dies with it."""

    def __init__(self, conn: str, generation: int, replacement: bool, settings: WsSettings,
                 args: tuple[SubArg, ...], schedule: SubscriptionScheduler) -> None:
        self.conn = conn
        self.generation = generation
        self.replacement = replacement
        #: The decisions (protocol, budget, keepalive, owned args); the attributes below are its parts.
        self.session = LinkSession(args, schedule, max_request_bytes=settings.subscribe_max_bytes,
                                   requests_per_hour=settings.requests_per_hour, keepalive_s=settings.keepalive_s,
                                   pong_timeout_s=settings.pong_timeout_s, login_timeout_s=settings.login_timeout_s,
                                   subscribe_timeout_s=settings.subscribe_timeout_s)
        self.proto = self.session.proto
        self.budget = self.session.budget
        self.keepalive = self.session.keepalive
        #: Args this link announced SUBSCRIBED for and has not yet balanced with DISCONNECTED/CUTOVER.
        self.owned = self.session.owned
        self.outbox = self.session.outbox
        self.ws: TapConnection | None = None
        self.state = ConnState.IDLE
        self.recv_seq = 0
        self.live_since: float | None = None
        self.ended_at: float | None = None
        #: Set when the driver must look at the session again (an answer came, a resubscribe was asked for).
        self.work = asyncio.Event()
        self.opened = asyncio.Event()
        self.live = asyncio.Event()
        self.finished = asyncio.Event()
        self.closer: asyncio.Task[None] | None = None
        self.end_reason = ""
        self.close_code: int | None = None
        self.fatal: IngestError | None = None
        #: No close frame from the server: frames in flight may have been lost.
        self.abnormal = False
        #: Our close frame went first and OKX echoed it: it sent everything it had before closing.
        self.closed_by_us = False
        #: The `CredentialStore.version` this link logged in with (None: not logged in yet), and its key's hint.
        self.creds_version: int | None = None
        self.key_hint = ""
        #: Closing or shutting down: read to the end, never pause for the inbox.
        self.draining = False

    @property
    def noticed(self) -> bool:
        return self.session.noticed

    @property
    def role(self) -> str:
        return "replacement" if self.replacement else "primary"

    def pause_reading(self) -> None:
        """Stop reading the socket while the inbox is over its limit (see ingest.io.inbox)."""
        if self.ws is not None:
            self.ws.hold(INBOX)

    def resume_reading(self) -> None:
        """Read the socket again after the inbox paused it (a no-op once it is closing)."""
        if self.ws is not None:
            self.ws.release(INBOX)

    @property
    def backlogged(self) -> bool:
        """Frames wait on our side (socket paused, or a message not yet handed over): silence is ours."""
        return self.ws is not None and self.ws.backlogged


@dataclass(eq=False)
class _Overlap:
    """A make-before-break in progress: `old` still owns every stream, `new` is being brought up."""

    old: _Link
    new: _Link
    reason: str
    code: str | None
    aligner: OverlapAligner[InboundFrame] | None = None
    ready: asyncio.Event = field(default_factory=asyncio.Event)
    #: What the replacement held when we started closing the old connection (None: we did not close it).
    held_at_close: frozenset[SubArg] | None = None

    def update(self) -> None:
        if self.aligner is not None and self.aligner.ready():
            self.ready.set()
        else:
            self.ready.clear()


async def _first_of(aws: list[Coroutine[Any, Any, Any]]) -> None:
    """Wait until the first of `aws` completes, then cancel and reap the others."""
    tasks = [asyncio.ensure_future(a) for a in aws]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def _cancel_current_task() -> None:
    task = asyncio.current_task()
    if task is not None:
        task.cancel()


def _first_error(group: BaseExceptionGroup[BaseException]) -> BaseException:
    for exc in group.exceptions:
        if isinstance(exc, BaseExceptionGroup):
            return _first_error(exc)
        if not isinstance(exc, asyncio.CancelledError):
            return exc
    return group.exceptions[0]


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
        self._queue = queue
        #: The inbox when it is one (fast lane pauses sockets instead of waiting); a plain queue otherwise.
        self._inbox = queue if isinstance(queue, Inbox) else None
        self._limiter = limiter
        self._credentials = credentials
        self._clock = clock or ServerClock(lambda: time.time_ns() // 1_000_000)
        self._resync_clock = resync_clock
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
        self._emit_lock = asyncio.Lock()
        self._tg: asyncio.TaskGroup | None = None
        self._primary: _Link | None = None
        self._overlap: _Overlap | None = None
        self._backing_off = False
        self._stopped = False
        self._shutting_down = False
        self._last_error: str | None = None
        #: When to (re)subscribe which arg: retries, parking, resubscribes (outlives physical connections).
        self.schedule = SubscriptionScheduler(spec.args, retries=settings.subscribe_retries,
                                              backoff_min_s=settings.backoff_min_s,
                                              backoff_max_s=settings.backoff_max_s,
                                              resubscribe_min_interval_s=settings.resubscribe_min_interval_s)
        self._replace_wanted = asyncio.Event()
        self._replace_reason: tuple[str, str | None] = ("", None)

    # ------------------------------------------------------------------------------------------ public

    @property
    def state(self) -> ConnState:
        if self._stopped:
            return ConnState.STOPPED
        if self._backing_off:
            return ConnState.BACKING_OFF
        return self._primary.state if self._primary is not None else ConnState.IDLE

    async def run(self) -> None:
        """Keep the connection up until cancelled; on cancellation, close and hand over every received frame."""
        self._stopped = False
        self._shutting_down = False
        try:
            async with asyncio.TaskGroup() as tg:
                self._tg = tg
                replacer = tg.create_task(self._replacer(), name=f"{self.name}-replacer")
                try:
                    await self._supervise()
                finally:
                    replacer.cancel()
        except BaseExceptionGroup as group:
            raise _first_error(group) from None
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
        if self._primary is not None:
            self._primary.work.set()
        return True

    def on_credentials_changed(self, version: int) -> bool:
        """Replace the connection (make-before-break) if it logged in with credentials older than `version`."""
        link = self._primary
        if link is None or link.creds_version is None or link.creds_version >= version:
            return False
        self.request_replace("credentials rotated")
        return True

    def request_replace(self, reason: str, code: str | None = None) -> None:
        """Open a replacement connection, move every stream to it without a gap, then close this one."""
        self._replace_reason = (reason, code)
        self._replace_wanted.set()

    def status(self) -> ConnectionStatus:
        link = self._primary
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
            last_error=self._last_error,
            counters=replace(self.counters),
        )

    # ------------------------------------------------------------------------------------------ supervision

    async def _supervise(self) -> None:
        """Physical connections one after another, with backoff that resets only after a healthy one."""
        backoff = self._backoff_factory()
        while True:
            link = self._new_link(replacement=False)
            self._primary = link
            self._spawn(link)
            current = link
            while True:
                await current.finished.wait()
                if self._primary is current:
                    break
                current = self._primary  # handed over to a replacement: follow it
            if current.fatal is not None:
                self._stopped = True
                self._last_error = str(current.fatal)
                self._log_state(current, current.state, ConnState.STOPPED, current.end_reason)
                # No data will come for these until an operator fixes the cause: say so, per arg.
                await self._emit(LinkEventKind.SUBSCRIBE_FAILED, current,
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

    def _new_link(self, replacement: bool) -> _Link:
        self._generation += 1
        return _Link(f"{self.name}#{self._generation}-{self._token}", self._generation, replacement, self.settings,
                     self.args, self.schedule)

    def _spawn(self, link: _Link) -> None:
        assert self._tg is not None
        self._tg.create_task(self._run_link(link), name=link.conn)

    async def _run_link(self, link: _Link) -> None:
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
                self._last_error = link.end_reason

    def _set_link_state(self, link: _Link, state: ConnState, reason: str = "") -> None:
        if link.state is not state:
            self._log_state(link, link.state, state, reason)
            link.state = state

    def _log_state(self, link: _Link, old: ConnState, new: ConnState, reason: str = "", **fields: object) -> None:
        log.info("ws_state", extra={"conn": link.conn, "ws_name": self.name, "endpoint": self.endpoint.value,
                                    "role": link.role, "from": old.value, "to": new.value, "reason": reason,
                                    **fields})

    # ------------------------------------------------------------------------------------------ one link

    async def _connect_and_serve(self, link: _Link) -> None:
        if self.login:
            await self._wait_auth_pause(link)
        self._set_link_state(link, ConnState.CONNECTING)
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
            self._set_link_state(link, ConnState.CLOSED, link.end_reason)
            return
        self.counters.connects += 1
        ov = self._overlap
        if ov is not None and ov.new is link:
            # From here on, the old connection's frames may also be due on this one (causality).
            ov.aligner = OverlapAligner()
        link.opened.set()
        driver = asyncio.create_task(self._drive(link), name=f"{link.conn}-driver")
        try:
            await self._read(link)
        finally:
            driver.cancel()
            await asyncio.gather(driver, return_exceptions=True)
            await self._teardown(link)

    async def _read(self, link: _Link) -> None:
        """Read until the socket closes. The read loop only stamps `last_rx` (no timer per message on the hot
        path); the driver's keepalive decides from it."""
        ws = link.ws
        assert ws is not None
        now = self._monotonic
        if ws.fast_lane:
            ws.tap = lambda data: self._fast_push(link, data)
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
            if self._inbox is not None:
                self._inbox.forget(link)

    async def _drain(self, link: _Link) -> None:
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

    def _read_to_the_end(self, link: _Link) -> None:
        """A closing link reads whatever the inbox holds: its close handshake must get through."""
        link.draining = True
        if self._inbox is not None:
            self._inbox.forget(link)
        link.resume_reading()

    def _request_close(self, link: _Link, reason: str, code: int = 1000) -> None:
        """Start a graceful close without waiting for it (safe from the reader itself)."""
        if not link.end_reason:
            link.end_reason = reason
        self._read_to_the_end(link)
        if link.closer is None and link.ws is not None:
            link.closer = asyncio.create_task(link.ws.close(code, reason[:120]), name=f"{link.conn}-close")

    async def _teardown(self, link: _Link) -> None:
        """After the last frame of `link`: hand over (64008) or balance its SUBSCRIBEDs with DISCONNECTED.

        Runs to the end even when shutdown interrupts a hand-over, bounded by `shutdown_timeout_s`.
        """
        cancelled = False
        try:
            if link.closer is not None:
                await asyncio.gather(link.closer, return_exceptions=True)
            ov = self._overlap
            if ov is not None and link is ov.old and not self._shutting_down:
                await self._handover(ov)
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

    async def _release(self, link: _Link) -> None:
        ov = self._overlap
        if ov is not None and (link is ov.new or link is ov.old):
            async with self._emitting():
                if self._overlap is ov:
                    # No hand-over (the replacement failed, or shutdown): held frames still reach the pipeline.
                    held, _ = ov.aligner.finish() if ov.aligner is not None else ([], set())
                    for frame in held:
                        await self._put(frame)
                    ov.aligner = None
                    if link is ov.new:
                        self._overlap = None
        if link.owned:
            await self._emit(LinkEventKind.DISCONNECTED, link, tuple(sorted(link.owned)),
                             code=str(link.close_code) if link.close_code is not None else None,
                             reason=link.end_reason)
            link.owned.clear()
        if link.opened.is_set():
            self.counters.disconnects += 1
            log.info("ws_disconnected", extra={"conn": link.conn, "ws_name": self.name, "role": link.role,
                                               "reason": link.end_reason, "close_code": link.close_code,
                                               "abnormal": link.abnormal, "frames": link.recv_seq})
        self._set_link_state(link, ConnState.CLOSED, link.end_reason)

    # ------------------------------------------------------------------------------------------ inbound

    def _fast_push(self, link: _Link, data: bytes) -> bool:
        """The fast lane (`TapConnection.tap`, called from the socket's data_received): a push is handed
        to the pipeline at once when nothing needs it to wait; False sends the frame the usual way."""
        queue = self._queue
        if not is_push(data) or self._overlap is not None or self._emit_lock.locked() or queue.full():
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

    async def _on_slow_message(self, link: _Link, ws: TapConnection, data: str | bytes) -> None:
        """A message read with recv() (the usual path): handled, then no longer pending, so the fast lane
        may take the frames behind it (the only place `slow_pending` goes down)."""
        try:
            await self._on_frame(link, data if isinstance(data, bytes) else data.encode())
        finally:
            ws.message_handled()

    async def _on_frame(self, link: _Link, data: bytes) -> None:
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
            await self._emit_push(link, frame)
            return
        await self._emit_item(frame)  # events and junk reach the pipeline too (dead letters, audit)
        if ev is None:
            return
        try:
            await self._on_event(link, ev)
        except asyncio.CancelledError:
            raise
        except Exception:  # a frame we cannot handle is logged, never fatal
            self.counters.frame_errors += 1
            log.exception("ws_event_error", extra={"conn": link.conn, "ws_name": self.name, "event": ev.event})

    @contextlib.asynccontextmanager
    async def _emitting(self) -> AsyncIterator[None]:
        """Hold the emit lock (sequences of puts stay together); a cancellation while waiting for it is
        deferred until the emission is done, so shutdown never tears a frame's hand-over apart."""
        deferred = False
        while True:
            try:
                await self._emit_lock.acquire()
                break
            except asyncio.CancelledError:
                deferred = True
        try:
            yield
        finally:
            self._emit_lock.release()
            if deferred:
                _cancel_current_task()

    async def _put(self, item: Inbound) -> None:
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
            async with asyncio.timeout(self.settings.shutdown_timeout_s):
                await self._queue.put(item)
        except TimeoutError:
            self.counters.lost_at_shutdown += 1
            log.error("ws_lost_at_shutdown", extra={"ws_name": self.name, "item": type(item).__name__})
        finally:
            _cancel_current_task()

    async def _emit_push(self, link: _Link, frame: InboundFrame) -> None:
        if self._overlap is None and not self._emit_lock.locked():
            # Fast path, no hand-over in progress: nothing needs this put to stay next to another.
            await self._put(frame)
            return
        async with self._emitting():
            ov = self._overlap
            aligner = ov.aligner if ov is not None else None
            key = push_arg_key(frame.data) if aligner is not None else None
            if ov is None or aligner is None or key is None or (link is not ov.old and link is not ov.new):
                await self._put(frame)
                return
            if link is ov.old:
                await self._put(frame)
                released = aligner.old_frame(key, frame.data)
            else:
                released = aligner.new_frame(key, frame.data, frame)
            for item in released:
                await self._put(item)
            ov.update()

    async def _emit_item(self, item: Inbound) -> None:
        async with self._emitting():
            await self._put(item)

    async def _emit(self, kind: LinkEventKind, link: _Link, args: tuple[SubArg, ...], *, code: str | None = None,
                    reason: str = "", replacement: str | None = None) -> None:
        event = LinkEvent(kind=kind, conn=link.conn, name=self.name, ts_ns=time.time_ns(), args=args, code=code,
                          reason=reason, replacement=replacement)
        await self._emit_item(event)
        log.info("ws_link_event", extra={"conn": link.conn, "ws_name": self.name, "kind": kind.value,
                                         "arg_count": len(args), "first_arg": str(args[0]) if args else None,
                                         "code": code, "reason": reason, "replacement": replacement})

    async def _on_event(self, link: _Link, ev: OkxEvent) -> None:
        for decision in link.session.receive(ev, self._monotonic()):
            await self._carry_out(link, decision)

    async def _carry_out(self, link: _Link, decision: Decision) -> None:
        """Do what the session decided for one outcome: wake waiters, log, emit, in the session's order."""
        if decision.progress or decision.work:
            link.work.set()
        base = {"conn": link.conn, "ws_name": self.name}
        for act in decision.actions:
            if isinstance(act, Emit):
                await self._emit(act.kind, link, act.args, code=act.code, reason=act.reason)
            elif isinstance(act, LoginAnswered):
                await self._logged_in(link, act.result)
            elif isinstance(act, Entered):
                self._entered(link, act.phase)
            elif isinstance(act, SendPing):
                assert link.ws is not None
                await link.ws.send(PING)
                self.counters.pings += 1
            elif isinstance(act, AbortLink):
                self.counters.pong_timeouts += 1
                link.end_reason = link.end_reason or act.reason
                link.abnormal = True
                log.warning("ws_pong_timeout", extra=base)
                if link.ws is not None:
                    link.ws.abort()
            elif isinstance(act, LinkFailed):
                if act.login:
                    self.counters.login_failures += 1
                raise _LinkFailure(act.reason)
            elif isinstance(act, Resubscribing):
                self.counters.resubscribes += len(act.args)
                log.info("ws_resubscribe", extra={**base, "arg_count": len(act.args), "first_arg": str(act.args[0]),
                                                  "reason": "; ".join(sorted(act.reasons))[:200]})
            elif isinstance(act, Recovered):
                log.info("ws_subscribe_recovered", extra={**base, "arg": str(act.arg)})
            elif isinstance(act, Retrying):
                log.warning("ws_subscribe_retry", extra={**base, "arg": str(act.arg), "code": act.code,
                                                         "attempt": act.retry.attempt, "delay_s": act.retry.delay_s})
            elif isinstance(act, ParkedArg):
                self.counters.subscribe_failures += 1
                log.error("ws_subscribe_parked", extra={**base, "arg": str(act.arg), "code": act.why,
                                                        "retry_in_s": act.parked.delay_s, "times": act.parked.times})
            elif isinstance(act, FailedArg):
                self.counters.subscribe_failures += 1
                log.error("ws_subscribe_failed", extra={**base, "arg": str(act.arg), "code": act.code,
                                                        "okx_msg": act.msg})
            elif isinstance(act, CloseLink):
                log.warning("ws_subscribe_needs_reconnect", extra={**base, "arg": str(act.arg), "code": act.code})
                self._request_close(link, act.reason)
            elif isinstance(act, Split):
                log.info("ws_subscribe_split", extra={**base, "code": act.code,
                                                      "arg_count": len(act.request.args)})
            elif isinstance(act, NoticeSeen):
                self.counters.notices += 1
                log.warning("ws_notice", extra={**base, "code": act.code, "okx_msg": act.msg})
                if link is self._primary and (self._overlap is None or self._overlap.old is not link):
                    self.request_replace(f"{act.code} notice: {act.msg}", act.code)
            elif isinstance(act, ChannelCount):
                log.info("ws_channel_conn_count", extra={**base, "channel": act.channel, "count": act.count})
            elif isinstance(act, ConnCountExceeded):
                log.error("ws_subscribe_failed", extra={**base, "channel": act.channel,
                                                        "arg_count": len(act.dropped), "okx_msg": act.reason})
            elif isinstance(act, UnexpectedSeen):
                log.warning("ws_unexpected_event", extra={**base, "event": act.event.event, "code": act.event.code,
                                                          "why": act.why})

    # ------------------------------------------------------------------------------------------ outbound

    async def _drive(self, link: _Link) -> None:
        """The one outbound loop of a link: tick the session, carry out its decisions, send what the budget
        allows, sleep until its next deadline (or until the reader brings work); a failure closes the socket."""
        session = link.session
        try:
            login = None
            if self.login:
                assert self._credentials is not None
                self._set_link_state(link, ConnState.LOGGING_IN)
                creds = self._credentials.current()
                link.creds_version, link.key_hint = self._credentials.version, creds.key_hint
                login = link.proto.login(creds, self._clock.now_ms())
            else:
                self._set_link_state(link, ConnState.SUBSCRIBING)
            session.start(login, self._monotonic())
            while session.phase is not LinkPhase.ENDED:
                link.work.clear()
                session.tick(self._monotonic(), backlogged=link.backlogged,
                             may_resubscribe=link is self._primary and self._overlap is None)
                for decision in session.events():
                    await self._carry_out(link, decision)
                await self._send_due(link)
                await _first_of([link.work.wait(), self._timer.sleep(session.next_deadline() - self._monotonic())])
        except _LinkFailure as failure:
            link.fatal = failure.fatal
            log.warning("ws_link_failed", extra={"conn": link.conn, "ws_name": self.name, "reason": failure.reason,
                                                 "fatal": failure.fatal is not None})
            self._request_close(link, failure.reason)
        except (ConnectionClosed, asyncio.CancelledError):
            raise
        except Exception as exc:
            log.exception("ws_driver_error", extra={"conn": link.conn, "ws_name": self.name})
            self._request_close(link, f"unexpected {type(exc).__name__}: {exc}")

    async def _send_due(self, link: _Link) -> None:
        """Send the requests the session's hourly budget admits now; the rest wait for its next deadline."""
        ws = link.ws
        assert ws is not None
        session = link.session
        was_waiting = session.budget_at is not None
        for req in session.requests_to_send(self._monotonic()):
            await ws.send(req.payload.decode())
            self.counters.requests += 1
            log.debug("ws_request", extra={"conn": link.conn, "ws_name": self.name, "op": req.op, "id": req.id,
                                           "arg_count": len(req.args)})
        if session.budget_at is not None and not was_waiting:  # one line per wait, not per wake-up
            log.warning("ws_budget_wait", extra={"conn": link.conn, "ws_name": self.name, "op": session.outbox[0].op,
                                                 "delay_s": round(session.budget_at - self._monotonic(), 3),
                                                 "limit": link.budget.limit})

    def _entered(self, link: _Link, phase: LinkPhase) -> None:
        if phase is LinkPhase.SUBSCRIBING:
            self._set_link_state(link, ConnState.SUBSCRIBING)
            return
        link.live_since = self._monotonic()
        self._set_link_state(link, ConnState.LIVE)
        link.live.set()
        ov = self._overlap
        if ov is not None and ov.new is link and ov.aligner is not None:
            ov.aligner.mark_subscribed()
            ov.update()

    async def _wait_auth_pause(self, link: _Link) -> None:
        """Wait out a pause of signed traffic (repeated authentication failures, REST or WebSocket:
        `credentials.AuthFailureGuard`) before connecting, so a bad key is not retried in a loop; a credential
        rotation ends the pause at once."""
        store = self._credentials
        assert store is not None
        remaining = store.auth.pause_remaining()
        if remaining <= 0:
            return
        self._set_link_state(link, ConnState.BACKING_OFF, "authentication paused")
        log.warning("ws_login_paused", extra={"conn": link.conn, "ws_name": self.name, "pause_s": round(remaining, 3),
                                              "key": store.current().key_hint})
        await _first_of([self._timer.sleep(remaining), store.wait_changed(store.version)])

    async def _logged_in(self, link: _Link, result: LoggedIn | LoginRefused) -> None:
        """What OKX's login answer means for the key and the clock; a refusal ends the link."""
        assert self._credentials is not None
        if isinstance(result, LoggedIn):
            log.info("ws_logged_in", extra={"conn": link.conn, "ws_name": self.name, "key": link.key_hint,
                                            "okx_conn_id": result.conn_id})
            self._credentials.record_auth_success()
            return
        self.counters.login_failures += 1
        if counts_against_key(result.code):
            # One count with REST's: past the threshold signed traffic pauses and an alert is logged. A timestamp
            # refusal (60006) is the clock's fault, not the key's: it resyncs below and is never counted.
            self._credentials.record_auth_failure(result.code or "?")
        what = f"login refused with {result.code} ({result.msg})"
        log.error("ws_login_refused", extra={"conn": link.conn, "ws_name": self.name, "code": result.code,
                                             "okx_msg": result.msg, "action": result.action.value,
                                             "key": link.key_hint})
        if result.action is LoginAction.FATAL:
            raise _LinkFailure(what, LoginRejected(self.name, self.url, result.code, result.msg, link.key_hint))
        if result.action is LoginAction.RESYNC_CLOCK and self._resync_clock is not None:
            try:
                await self._resync_clock()
                log.info("ws_clock_resynced", extra={"conn": link.conn, "ws_name": self.name,
                                                     "offset_ms": self._clock.offset_ms})
            except Exception as exc:  # the retry will tell whether the clock is still off
                log.warning("ws_clock_resync_failed", extra={"conn": link.conn, "ws_name": self.name,
                                                             "error": f"{type(exc).__name__}: {exc}"})
        raise _LinkFailure(what)

    # ------------------------------------------------------------------------------------------ 64008

    async def _replacer(self) -> None:
        while True:
            await self._replace_wanted.wait()
            self._replace_wanted.clear()
            reason, code = self._replace_reason
            try:
                await self._make_before_break(reason, code)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("ws_replace_error", extra={"ws_name": self.name})

    async def _make_before_break(self, reason: str, code: str | None) -> None:
        """Bring up a replacement while the old connection keeps delivering, then move every stream over."""
        old = self._primary
        if old is not None and not old.live.is_set():
            # Still connecting or subscribing: replace it once it is live; if it fails instead, the
            # reconnect logs in afresh anyway.
            await _first_of([old.live.wait(), old.finished.wait()])
        if old is None or old is not self._primary or old.finished.is_set():
            log.info("ws_replace_skipped", extra={"ws_name": self.name, "reason": reason,
                                                  "state": old.state.value if old is not None else None})
            return
        backoff = self._backoff_factory()
        deadline = self._monotonic() + self.settings.notice_cutover_timeout_s
        while not old.finished.is_set():
            new = self._new_link(replacement=True)
            ov = _Overlap(old, new, reason, code)
            self._overlap = ov
            # Queued before the replacement can emit anything.
            await self._emit(LinkEventKind.NOTICE, old, tuple(sorted(old.owned)), code=code, reason=reason,
                             replacement=new.conn)
            self._spawn(new)
            await _first_of([ov.ready.wait(), new.finished.wait(), old.finished.wait(),
                             self._timer.sleep(deadline - self._monotonic())])
            if old.finished.is_set():
                return  # the old connection ended first; its teardown handed over
            if new.finished.is_set() and new.fatal is not None:
                # A refused key (e.g. a bad rotation): the old connection keeps serving; retrying would not help.
                self._last_error = str(new.fatal)
                log.error("ws_replacement_refused", extra={"ws_name": self.name, "conn": new.conn,
                                                           "error": str(new.fatal)})
                return
            if new.finished.is_set():
                delay = next(backoff)
                log.warning("ws_replacement_failed", extra={"ws_name": self.name, "conn": new.conn,
                                                            "reason": new.end_reason, "delay_s": delay})
                await _first_of([old.finished.wait(), self._timer.sleep(delay)])
                continue
            log.info("ws_cutover_start", extra={"ws_name": self.name, "conn": old.conn, "replacement": new.conn,
                                                "ready": ov.ready.is_set()})
            ov.held_at_close = frozenset(new.owned)
            self._request_close(old, "replaced by " + new.conn)
            await old.finished.wait()
            return

    async def _handover(self, ov: _Overlap) -> None:
        """The old connection delivered its last frame: emit CUTOVER once the replacement caught up."""
        old, new = ov.old, ov.new
        if new.finished.is_set() or not new.opened.is_set():
            async with self._emitting():
                self._overlap = None
            if not new.finished.is_set():
                self._primary = new  # still connecting: it carries on as the primary
            return
        ov.update()
        if not ov.ready.is_set():
            await _first_of([ov.ready.wait(), new.finished.wait(),
                             self._timer.sleep(self.settings.cutover_catchup_s)])
        async with self._emitting():
            held, aligned_keys = ov.aligner.finish() if ov.aligner is not None else ([], set())
            aligned = frozenset(a for a in map(arg_from_key, aligned_keys) if a is not None)
            proven, gone = handover_args(frozenset(old.owned), frozenset(new.owned), aligned, ov.held_at_close,
                                         old.closed_by_us)
            now_ns = time.time_ns()
            if gone:
                await self._put(LinkEvent(LinkEventKind.DISCONNECTED, old.conn, self.name, now_ns,
                                          tuple(sorted(gone)), code=str(old.close_code) if old.close_code else None,
                                          reason=f"{ov.reason}: {old.end_reason}; not proven handed over"))
            await self._put(LinkEvent(LinkEventKind.CUTOVER, old.conn, self.name, now_ns, tuple(sorted(proven)),
                                      code=ov.code, reason=ov.reason, replacement=new.conn))
            for frame in held:
                await self._put(frame)
            old.owned.clear()
            self._overlap = None
            self._primary = new
        self.counters.cutovers += 1
        log.info("ws_cutover", extra={"ws_name": self.name, "conn": old.conn, "replacement": new.conn,
                                      "carried": len(proven), "not_handed_over": len(gone),
                                      "held_frames": len(held), "closed_by_us": old.closed_by_us})
        new.work.set()
        if new.noticed:
            self.request_replace("64008 notice received on the replacement", codes.SERVICE_UPGRADE_NOTICE)
