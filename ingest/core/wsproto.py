"""The OKX WebSocket protocol as seen by a client, sans-I/O: frames in, decisions out.

Three pieces, none of which touches a socket or a clock:
- `classify`: what an inbound text frame is (`pong`, an event, a data push), cheaply: big pushes are
  recognised by their prefix and never parsed here.
- `LinkProtocol`: the login / subscribe / unsubscribe conversation of one physical connection, with
  request-id correlation and the error-code policy (fatal vs clock resync vs retry vs one arg refused).
- `OverlapAligner`: 64008 make-before-break bookkeeping; decides where the old and the new connection's
  frame streams line up so that a consumer keeping only the owner's frames sees each push exactly once.

Policy (which codes are fatal, which are retried) lives here, the mechanism (sockets, timers, backoff)
in `ingest.io.ws`, as in websockets' `process_exception` split.
"""

from __future__ import annotations

import enum
import re
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Generic, Protocol, TypeVar

import orjson

from ingest.core.plan import batch_args, encode_request
from ingest.okx import codes, signing
from ingest.okx.channels import SubArg

PING = "ping"
PONG = b"pong"
_PUSH_PREFIX = b'{"arg":{'


# ---------------------------------------------------------------------------------------------- frames


class FrameKind(enum.Enum):
    """What an inbound text frame is."""

    PONG = "pong"
    PUSH = "push"
    EVENT = "event"
    JUNK = "junk"


@dataclass(frozen=True, slots=True)
class OkxEvent:
    """A parsed `{"event": ...}` frame; fields absent from the frame are None."""

    event: str
    id: str | None = None
    code: str | None = None
    msg: str = ""
    arg: SubArg | None = None
    conn_id: str | None = None
    channel: str | None = None
    conn_count: str | None = None


@dataclass(frozen=True, slots=True)
class Classified:
    """The kind of a frame, and the event when it is one."""

    kind: FrameKind
    event: OkxEvent | None = None


_PONG = Classified(FrameKind.PONG)
_PUSH = Classified(FrameKind.PUSH)
_JUNK = Classified(FrameKind.JUNK)


def _opt_str(value: object) -> str | None:
    if value is None:
        return None
    return value if isinstance(value, str) else str(value)


def is_push(data: bytes) -> bool:
    """What `classify` calls a PUSH, without the rest of it (the WebSocket layer's fast lane)."""
    return data.startswith(_PUSH_PREFIX)


def classify(data: bytes) -> Classified:
    """Classify one inbound text frame.

    `pong` is checked first because it is not JSON (SPEC 4). OKX puts `arg` first in every push, so a
    prefix check recognises pushes (which can be megabytes) without parsing; anything else is small
    and parsed in full. A push with another key order is still recognised, only more slowly.
    """
    if data == PONG:
        return _PONG
    if is_push(data):
        return _PUSH
    try:
        obj = orjson.loads(data)
    except orjson.JSONDecodeError:
        return _JUNK
    if not isinstance(obj, dict):
        return _JUNK
    name = obj.get("event")
    if isinstance(name, str):
        raw_arg = obj.get("arg")
        arg: SubArg | None = None
        if isinstance(raw_arg, dict):
            try:
                arg = SubArg.from_okx(raw_arg)
            except ValueError:
                arg = None
        return Classified(
            FrameKind.EVENT,
            OkxEvent(
                event=name,
                id=_opt_str(obj.get("id")),
                code=_opt_str(obj.get("code")),
                msg=_opt_str(obj.get("msg")) or "",
                arg=arg,
                conn_id=_opt_str(obj.get("connId")),
                channel=_opt_str(obj.get("channel")),
                conn_count=_opt_str(obj.get("connCount")),
            ),
        )
    if "arg" in obj and "data" in obj:
        return _PUSH
    return _JUNK


def push_arg_key(data: bytes) -> bytes | None:
    """The raw `arg` object of a push, as bytes: identical on every connection for the same stream.

    Used only while two connections overlap, to line their streams up without parsing the data.
    """
    if data.startswith(_PUSH_PREFIX):
        end = data.find(b"}", len(_PUSH_PREFIX))
        return data[len(_PUSH_PREFIX) - 1 : end + 1] if end >= 0 else None
    try:
        obj = orjson.loads(data)
    except orjson.JSONDecodeError:
        return None
    arg = obj.get("arg") if isinstance(obj, dict) else None
    return orjson.dumps(arg, option=orjson.OPT_SORT_KEYS) if isinstance(arg, dict) else None


def arg_from_key(key: bytes) -> SubArg | None:
    """The SubArg of a `push_arg_key` (None when it is not a valid arg)."""
    try:
        obj = orjson.loads(key)
        return SubArg.from_okx(obj) if isinstance(obj, dict) else None
    except (orjson.JSONDecodeError, ValueError):
        return None


# ---------------------------------------------------------------------------------------------- policy


class LoginAction(enum.StrEnum):
    """What to do after OKX refused a login."""

    #: Wrong key, signature or passphrase: no retry can fix it, and retrying looks like an attack.
    FATAL = "fatal"
    #: Timestamp outside OKX's 30 s window: measure the server-time offset again, then retry.
    RESYNC_CLOCK = "resync_clock"
    #: Anything else (60009 generic, 63999 internal, 60023 too frequent, no answer): retry with backoff.
    RETRY = "retry"


class ArgAction(enum.StrEnum):
    """What to do after OKX refused a subscribe arg."""

    #: Refused for good (unknown instrument, fee tier, wrong endpoint, bad args): report, never retry here.
    FAIL = "fail"
    #: OKX-side hiccup: retry this arg later, a bounded number of times.
    RETRY = "retry"
    #: The connection itself is in a wrong state (e.g. 60011 "Please log in"): reconnect.
    RECONNECT = "reconnect"


_CLOCK_LOGIN_CODES = frozenset({codes.TIMESTAMP_EXPIRED, codes.INVALID_TIMESTAMP})
#: 64007 internal error, 60014 requests too frequent, 63999 internal error.
TRANSIENT_ARG_CODES: frozenset[str] = frozenset({"64007", "60014", codes.LOGIN_INTERNAL})
RECONNECT_ARG_CODES: frozenset[str] = frozenset({codes.PLEASE_LOG_IN})


def login_action(code: str | None) -> LoginAction:
    """The error-code policy for a refused login (SPEC 3)."""
    if code in codes.FATAL_LOGIN_CODES:
        return LoginAction.FATAL
    if code in _CLOCK_LOGIN_CODES:
        return LoginAction.RESYNC_CLOCK
    return LoginAction.RETRY


#: Login refusals that say nothing about the key: too frequent (60023), repeated login (60031), OKX internal (63999).
NOT_KEY_LOGIN_CODES: frozenset[str] = frozenset({"60023", "60031", codes.LOGIN_INTERNAL})


def counts_against_key(code: str | None) -> bool:
    """Whether a refused login counts toward pausing signed traffic (`credentials.AuthFailureGuard`): every
    refusal does, except those that say nothing about the key, and timestamp refusals (the clock's fault:
    the link resyncs the clock instead)."""
    return code not in NOT_KEY_LOGIN_CODES and login_action(code) is not LoginAction.RESYNC_CLOCK


def arg_action(code: str | None) -> ArgAction:
    """The error-code policy for a refused subscribe arg.

    Unknown codes count as refusals: a visible SUBSCRIBE_FAILED beats an endless, budget-eating retry.
    """
    if code in TRANSIENT_ARG_CODES:
        return ArgAction.RETRY
    if code in RECONNECT_ARG_CODES:
        return ArgAction.RECONNECT
    return ArgAction.FAIL


# "Wrong URL or channel:candle1s,instId:BTC-USDT-SWAP doesn't exist." names the arg OKX refused.
_MSG_ARG = re.compile(r"channel:(?P<channel>[A-Za-z0-9_-]+)(?:,\s*instId:(?P<inst>[A-Za-z0-9_-]+))?")


def arg_named_in(msg: str, candidates: Iterable[SubArg]) -> SubArg | None:
    """The one candidate an error message names, if it names exactly one."""
    m = _MSG_ARG.search(msg)
    if m is None:
        return None
    hits = [a for a in candidates if a.channel == m["channel"] and (m["inst"] is None or a.inst_id == m["inst"])]
    return hits[0] if len(hits) == 1 else None


# ---------------------------------------------------------------------------------------------- link


class _Revealable(Protocol):
    def reveal(self) -> str: ...


class LoginCredentials(Protocol):
    """What a login needs (`ingest.credentials.Credentials` fits); values are revealed only to sign."""

    @property
    def api_key(self) -> _Revealable: ...
    @property
    def secret(self) -> _Revealable: ...
    @property
    def passphrase(self) -> _Revealable: ...


class Phase(enum.StrEnum):
    """Where the login conversation stands."""

    NEW = "new"
    LOGGING_IN = "logging-in"
    LOGGED_IN = "logged-in"
    REFUSED = "refused"


@dataclass(frozen=True, slots=True)
class Request:
    """One request as sent: its id, op, the args it carries and the exact bytes."""

    id: str
    op: str
    args: tuple[SubArg, ...]
    payload: bytes


@dataclass(frozen=True, slots=True)
class LoggedIn:
    conn_id: str | None


@dataclass(frozen=True, slots=True)
class LoginRefused:
    code: str | None
    msg: str
    action: LoginAction


@dataclass(frozen=True, slots=True)
class Subscribed:
    arg: SubArg
    conn_id: str | None


@dataclass(frozen=True, slots=True)
class Unsubscribed:
    arg: SubArg


@dataclass(frozen=True, slots=True)
class ArgRefused:
    arg: SubArg
    code: str | None
    msg: str
    action: ArgAction


@dataclass(frozen=True, slots=True)
class Resend:
    """An error OKX did not attribute to one arg left several in doubt: send them again, split in halves."""

    request: Request
    code: str | None


@dataclass(frozen=True, slots=True)
class Notice:
    code: str | None
    msg: str


@dataclass(frozen=True, slots=True)
class ConnCount:
    channel: str | None
    count: str | None
    exceeded: bool


@dataclass(frozen=True, slots=True)
class Unexpected:
    """An event this state machine cannot place (logged, never fatal)."""

    event: OkxEvent
    why: str


Outcome = LoggedIn | LoginRefused | Subscribed | Unsubscribed | ArgRefused | Resend | Notice | ConnCount | Unexpected


@dataclass(slots=True)
class _Pending:
    request: Request
    outstanding: set[SubArg] = field(default_factory=set)


class LinkProtocol:
    """The request/answer conversation of one physical connection.

    Every request gets an id (OKX echoes it since 2025-05-29); acks are matched by arg (older servers send
    no id), errors by id. OKX's error frames carry no arg, so an error on a multi-arg request is
    attributed by the arg its message names, else the args still unanswered are resent in halves until
    each refusal lands on a single arg: a bad arg costs O(log n) requests and never takes the others down.
    """

    def __init__(self, max_request_bytes: int) -> None:
        self.max_request_bytes = max_request_bytes
        self.phase = Phase.NEW
        self.conn_id: str | None = None
        self.held: set[SubArg] = set()
        self._next_id = 0
        self._login_id: str | None = None
        self._pending: dict[str, _Pending] = {}
        self._arg_req: dict[SubArg, str] = {}
        #: Subscribe args given up on (timeout): a late ack still means the server holds them.
        self._abandoned: set[SubArg] = set()

    # -- requests

    def _new_id(self, prefix: str) -> str:
        self._next_id += 1
        return f"{prefix}{self._next_id}"

    def _register(self, op: str, args: tuple[SubArg, ...]) -> Request:
        req_id = self._new_id("s" if op == "subscribe" else "u")
        req = Request(req_id, op, args, encode_request(op, args, req_id))
        self._pending[req_id] = _Pending(req, set(args))
        for a in args:
            self._arg_req[a] = req_id
        return req

    def login(self, creds: LoginCredentials, server_ms: int) -> Request:
        """The login request, signed with a fresh timestamp from OKX time (`server_ms`)."""
        ts = signing.ws_login_timestamp(server_ms)
        sign = signing.ws_login_sign(creds.secret.reveal(), ts)
        self._login_id = self._new_id("l")
        self.phase = Phase.LOGGING_IN
        body = {
            "id": self._login_id,
            "op": "login",
            "args": [
                {"apiKey": creds.api_key.reveal(), "passphrase": creds.passphrase.reveal(), "timestamp": ts,
                 "sign": sign}
            ],
        }
        return Request(self._login_id, "login", (), orjson.dumps(body))

    def subscribe(self, args: Sequence[SubArg]) -> list[Request]:
        """Requests (each under the size limit) for the args not already held or in flight."""
        todo = [a for a in dict.fromkeys(args) if a not in self.held and a not in self._arg_req]
        self._abandoned.difference_update(todo)
        return [self._register("subscribe", b) for b in batch_args("subscribe", todo, self.max_request_bytes)]

    def unsubscribe(self, args: Sequence[SubArg]) -> list[Request]:
        todo = [a for a in dict.fromkeys(args) if a not in self._arg_req]
        return [self._register("unsubscribe", b) for b in batch_args("unsubscribe", todo, self.max_request_bytes)]

    def in_flight(self, op: str | None = None) -> set[SubArg]:
        """Args of requests still waiting for an answer (optionally only of one op)."""
        return {a for p in self._pending.values() if op is None or p.request.op == op for a in p.outstanding}

    def abandon(self) -> set[SubArg]:
        """Stop waiting for every outstanding answer; returns the subscribe args left unanswered.

        A late ack for one of them is still reported as `Subscribed`: the server holds it then.
        """
        left = self.in_flight("subscribe")
        self._abandoned |= left
        self._pending.clear()
        self._arg_req.clear()
        return left

    def forget(self, args: Iterable[SubArg]) -> None:
        """The server dropped these args (e.g. channel-conn-count-error)."""
        self.held.difference_update(args)

    # -- answers

    def _settle(self, arg: SubArg, op: str) -> bool:
        owner = self._arg_req.get(arg)
        pending = self._pending.get(owner) if owner is not None else None
        if pending is None or pending.request.op != op or arg not in pending.outstanding:
            # A late ack from a request already split by a Resend is still an answer for this arg.
            pending = next((p for p in self._pending.values() if arg in p.outstanding and p.request.op == op), None)
        if pending is None:
            return False
        pending.outstanding.discard(arg)
        if self._arg_req.get(arg) == pending.request.id:
            del self._arg_req[arg]
        if not pending.outstanding:
            del self._pending[pending.request.id]
        return True

    def _by_id_single(self, req_id: str | None, op: str) -> SubArg | None:
        p = self._pending.get(req_id) if req_id is not None else None
        if p is not None and p.request.op == op and len(p.outstanding) == 1:
            return next(iter(p.outstanding))
        return None

    def receive(self, ev: OkxEvent) -> list[Outcome]:
        """Feed one event frame; returns what it means for this connection."""
        if ev.conn_id is not None:
            self.conn_id = ev.conn_id
        if ev.event == "login":
            if self.phase is not Phase.LOGGING_IN:
                return [Unexpected(ev, "login answer without a login request")]
            if ev.code in (None, "0"):
                self.phase = Phase.LOGGED_IN
                return [LoggedIn(ev.conn_id)]
            self.phase = Phase.REFUSED
            return [LoginRefused(ev.code, ev.msg, login_action(ev.code))]
        if ev.event in ("subscribe", "unsubscribe"):
            arg = ev.arg
            if arg is not None and ev.event == "subscribe" and arg in self._abandoned:
                self._abandoned.discard(arg)
            elif arg is None or not self._settle(arg, ev.event):
                if ev.event == "subscribe" and arg is not None and arg in self.held:
                    return []  # a repeated ack for an arg already held
                # The echoed arg did not match (or was missing): the request id may still say which arg.
                single = self._by_id_single(ev.id, ev.event)
                if single is None:
                    return [Unexpected(ev, "ack for an arg that was not requested")]
                self._settle(single, ev.event)
                arg = single
            if ev.event == "subscribe":
                self.held.add(arg)
                return [Subscribed(arg, ev.conn_id)]
            self.held.discard(arg)
            return [Unsubscribed(arg)]
        if ev.event == "error":
            return self._error(ev)
        if ev.event == "notice":
            return [Notice(ev.code, ev.msg)]
        if ev.event in ("channel-conn-count", "channel-conn-count-error"):
            return [ConnCount(ev.channel, ev.conn_count, exceeded=ev.event.endswith("error"))]
        return [Unexpected(ev, "unknown event")]

    def _error(self, ev: OkxEvent) -> list[Outcome]:
        if self.phase is Phase.LOGGING_IN and (ev.id is None or ev.id == self._login_id):
            self.phase = Phase.REFUSED
            return [LoginRefused(ev.code, ev.msg, login_action(ev.code))]
        targets: list[str]
        if ev.id is not None and ev.id in self._pending:
            targets = [ev.id]
        elif ev.id is None and self._pending:
            # Older servers send no id: the message may name the arg, else every request in flight is in doubt.
            named = arg_named_in(ev.msg, self.in_flight())
            targets = [self._arg_req[named]] if named is not None else list(self._pending)
        else:
            return [Unexpected(ev, "error for no request in flight")]
        out: list[Outcome] = []
        for req_id in targets:
            out.extend(self._refuse(self._pending[req_id], ev))
        return out

    def _refuse(self, pending: _Pending, ev: OkxEvent) -> list[Outcome]:
        req = pending.request
        left = sorted(pending.outstanding)
        named = arg_named_in(ev.msg, left)
        if req.op == "unsubscribe":
            # Refusing to unsubscribe means "not subscribed": the arg is not held any more either way.
            for a in left:
                self._settle(a, "unsubscribe")
                self.held.discard(a)
            return [Unsubscribed(a) for a in left]
        action = arg_action(ev.code)
        if named is not None or len(left) == 1 or action is ArgAction.RECONNECT:
            culprits = [named] if named is not None else left
            for a in culprits:
                self._settle(a, "subscribe")
            return [ArgRefused(a, ev.code, ev.msg, action) for a in culprits]
        # Several args, no culprit named: resend them in halves so the refusal narrows to one arg.
        del self._pending[req.id]
        for a in left:
            self._arg_req.pop(a, None)
        half = len(left) // 2
        return [Resend(self._register("subscribe", tuple(part)), ev.code) for part in (left[:half], left[half:])]


# ---------------------------------------------------------------------------------------------- overlap

T = TypeVar("T")


@dataclass(slots=True)
class _KeyState(Generic[T]):
    #: Old-connection frames the new one has not matched yet.
    old_tail: deque[bytes] = field(default_factory=deque)
    #: New-connection frames not yet known to duplicate the old one's, with their arrival order.
    new_held: deque[tuple[bytes, int, T]] = field(default_factory=deque)
    aligned: bool = False

    def settled(self) -> bool:
        """Caught up: nothing the old connection delivered is still due on the new one.

        Held new frames do not matter: they are emitted after CUTOVER and cannot repeat anything the old
        connection delivered (that would have matched). An old tail that never lines up is old-only
        history once the new stream has moved past it (two unmatched frames; a book snapshot alone is one).
        """
        return not self.old_tail or (not self.aligned and len(self.new_held) >= 2)


class OverlapAligner(Generic[T]):
    """Where the old and new connection's streams line up during a 64008 make-before-break.

    Both connections receive byte-identical pushes for the same stream (same arg, same data), the new
    one from its subscription on; either may run ahead. The old connection owns every stream until
    CUTOVER and its frames are emitted as they come. A frame of the new connection is emitted before
    CUTOVER (where an owner-only consumer drops it) only once the old one delivered the same bytes;
    every other one is held and emitted after CUTOVER, in arrival order. Nothing is ever dropped, so a
    consumer that rebuilds a book from the new connection's snapshot gets an unbroken chain.

    Create the aligner when the new connection's socket opens: whatever the old one received before
    that was sent before the new subscription existed (causality), whatever it receives later may also
    be due on the new connection, even ahead of the new subscription's ack.

    The caller closes the old connection gracefully once `ready` (the new one has caught up on every
    stream), emits its last frames, waits until `ready` again (bounded) and only then emits CUTOVER:
    every push from before the new subscription came on the old stream, every later one on the new, so
    an owner-only consumer sees each push exactly once, in order. A book stream lines up at the first
    update both deliver (the new connection's snapshot never matches).

    `item` is whatever the caller emits for a new-connection frame (an `InboundFrame`).
    """

    def __init__(self, tail_limit: int = 20_000) -> None:
        self._keys: dict[bytes, _KeyState[T]] = {}
        self._tail_limit = tail_limit
        self._marked = False
        self._arrival = 0

    def _state(self, key: bytes) -> _KeyState[T]:
        st = self._keys.get(key)
        if st is None:
            st = self._keys[key] = _KeyState()
        return st

    def mark_subscribed(self) -> None:
        """The new connection holds all its args now (acks received)."""
        self._marked = True

    def old_frame(self, key: bytes, data: bytes) -> list[T]:
        """An old-connection frame was emitted; returns new-connection items now safe to emit before CUTOVER."""
        st = self._state(key)
        held = st.new_held
        # Scans from the head, where the match almost always is once the streams are aligned.
        idx = next((i for i, (d, _, _) in enumerate(held) if d == data), -1)
        if idx < 0:
            st.old_tail.append(data)
            if len(st.old_tail) > self._tail_limit:
                st.old_tail.popleft()
            return []
        if not st.aligned:
            st.aligned = True
            st.old_tail.clear()  # old-only frames from before the new subscription started
        return [held.popleft()[2] for _ in range(idx + 1)]

    def new_frame(self, key: bytes, data: bytes, item: T) -> list[T]:
        """A new-connection frame arrived; returns the items to emit now (before CUTOVER), maybe none."""
        st = self._state(key)
        tail = st.old_tail
        idx = next((i for i, d in enumerate(tail) if d == data), -1)
        self._arrival += 1
        if idx < 0:
            st.new_held.append((data, self._arrival, item))
            return []
        for _ in range(idx + 1):
            tail.popleft()
        st.aligned = True
        out = [entry[2] for entry in st.new_held]
        st.new_held.clear()
        out.append(item)
        return out

    def ready(self) -> bool:
        """True once the new connection is subscribed and has caught up on every stream seen so far."""
        return self._marked and all(st.settled() for st in self._keys.values())

    def finish(self) -> tuple[list[T], set[bytes]]:
        """Cut over: the held new-connection items (arrival order) and the streams that lined up.

        A stream that never lined up may have lost pushes in flight if the old connection died
        abnormally; the caller reports those as a possible gap.
        """
        held = sorted((e for st in self._keys.values() for e in st.new_held), key=lambda e: e[1])
        aligned = {k for k, st in self._keys.items() if st.aligned}
        self._keys = {}
        return [e[2] for e in held], aligned


def handover_args(old_owned: frozenset[SubArg], new_owned: frozenset[SubArg], aligned: frozenset[SubArg],
                  held_at_close: frozenset[SubArg] | None, closed_by_us: bool) -> tuple[frozenset[SubArg],
                                                                                       frozenset[SubArg]]:
    """At CUTOVER: which of the old connection's streams are proven handed over, and which are not.

    `held_at_close`: what the replacement held when we started closing the old connection gracefully
    (None: we did not close it); `closed_by_us`: OKX echoed our close, so it sent everything before it.
    Then every push from before the replacement's acks came on the old stream and every later one comes
    on the new: a stream the replacement held by then, or one seen on both, is continuous. Otherwise (OKX
    closed first, or the old socket died) only streams seen on both sockets are. The rest are reported
    DISCONNECTED: a possible gap the pipeline fills.
    """
    if held_at_close is not None and closed_by_us:
        proven = old_owned & (held_at_close | aligned)
    else:
        proven = old_owned & new_owned & aligned
    return proven, old_owned - proven

