"""One physical OKX WebSocket connection (`Link`) and the plain types around it, shared by `ingest.io.ws`
(the logical connection that drives links), `ws_driver` (a link's session), `ws_pump` (the pipeline side) and
`ws_handover` (64008): states, counters, the status snapshot, the errors that end a link, the overlap of a
make-before-break, and the few task helpers they all use.
"""

from __future__ import annotations

import asyncio
import enum
import secrets
import time
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import Any

from ingest.config import WsSettings
from ingest.core.events import InboundFrame
from ingest.core.session import LinkSession
from ingest.core.subscriptions import SubscriptionScheduler
from ingest.core.wsproto import OverlapAligner
from ingest.errors import CredentialError, IngestError
from ingest.io.ws_tap import INBOX, TapConnection
from ingest.okx.channels import Endpoint, SubArg


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


class LinkFailure(Exception):
    """Ends one physical connection; `fatal` stops the logical connection too."""

    def __init__(self, reason: str, fatal: IngestError | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.fatal = fatal


class Link:
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
class Overlap:
    """A make-before-break in progress: `old` still owns every stream, `new` is being brought up."""

    old: Link
    new: Link
    reason: str
    code: str | None
    aligner: OverlapAligner[InboundFrame] | None = None
    ready: asyncio.Event = field(default_factory=asyncio.Event)
    #: What the replacement held when we started closing the old connection (None: we did not close it).
    held_at_close: frozenset[SubArg] | None = None

    def update(self) -> None:
        """`ready` follows the aligner: set once the replacement caught up on every stream."""
        if self.aligner is not None and self.aligner.ready():
            self.ready.set()
        else:
            self.ready.clear()


async def first_of(aws: list[Coroutine[Any, Any, Any]]) -> None:
    """Wait until the first of `aws` completes, then cancel and reap the others."""
    tasks = [asyncio.ensure_future(a) for a in aws]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def cancel_current_task() -> None:
    """Deliver a cancellation that was deferred (a hand-over to the pipeline is finished first)."""
    task = asyncio.current_task()
    if task is not None:
        task.cancel()


def first_error(group: BaseExceptionGroup[BaseException]) -> BaseException:
    """The error that ended a TaskGroup (not a cancellation it caused), so callers see it unwrapped."""
    for exc in group.exceptions:
        if isinstance(exc, BaseExceptionGroup):
            return first_error(exc)
        if not isinstance(exc, asyncio.CancelledError):
            return exc
    return group.exceptions[0]

