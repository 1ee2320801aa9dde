"""One physical OKX WebSocket connection's decisions, sans-I/O: event frames and the time in, actions out.

`LinkSession` holds what dies with a socket: the login/subscribe conversation (`wsproto.LinkProtocol`),
the hourly request budget, the keepalive watchdog and the args this connection announced SUBSCRIBED for
(`owned`). It shares the logical connection's `SubscriptionScheduler`, which outlives sockets.

The session is driven like python-websockets' `Protocol`, by one outbound loop in `ingest.io.ws`:

- `start(login, now)` queues the login request (or the subscribes when the connection needs no login);
- `receive(event, now)` yields one `Decision` per protocol outcome, lazily: the reader carries out each one
  (puts link events into the pipeline, logs, closes the socket) before the next is computed, so link events
  keep frame order and nobody sees state ahead of what was emitted;
- `tick(now, ...)` decides what time alone decides (keepalive ping or abort, login and subscribe timeouts,
  the step from login to subscribing to live, due retries, coalesced resubscribes); `events()` hands over
  those decisions, `requests_to_send(now)` the requests the hourly budget allows now, and `next_deadline()`
  says when `tick` may decide something new if no frame arrives before.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

from ingest.core.events import LinkEventKind
from ingest.core.keepalive import Keepalive, KeepaliveAction
from ingest.core.ratelimit import SlidingWindow
from ingest.core.subscriptions import Parked, Retry, SubscriptionScheduler
from ingest.core.wsproto import (
    ArgAction,
    ArgRefused,
    ConnCount,
    LinkProtocol,
    LoggedIn,
    LoginRefused,
    Notice,
    OkxEvent,
    Outcome,
    Request,
    Resend,
    Subscribed,
    Unexpected,
    Unsubscribed,
)
from ingest.okx.channels import SubArg

HOUR_S = 3600.0


class LinkPhase(enum.StrEnum):
    """Where one physical connection's conversation stands; it only moves forward."""

    NEW = "new"
    LOGGING_IN = "logging-in"
    SUBSCRIBING = "subscribing"
    LIVE = "live"
    ENDED = "ended"


@dataclass(frozen=True, slots=True)
class Emit:
    """Put a link event for this connection into the pipeline."""

    kind: LinkEventKind
    args: tuple[SubArg, ...]
    code: str | None = None
    reason: str = ""


@dataclass(frozen=True, slots=True)
class LoginAnswered:
    """OKX answered the login; a refusal ends the session (the driver decides about the key and the clock)."""

    result: LoggedIn | LoginRefused


@dataclass(frozen=True, slots=True)
class Entered:
    """The conversation reached `phase` (SUBSCRIBING after the login ack, LIVE once every subscribe answered)."""

    phase: LinkPhase


@dataclass(frozen=True, slots=True)
class SendPing:
    """Send OKX's text `ping`: the connection was silent for `keepalive_s` (sent outside the request budget)."""


@dataclass(frozen=True, slots=True)
class AbortLink:
    """Nothing answered the ping within `pong_timeout_s`: the socket is dead, abort it without a close."""

    reason: str


@dataclass(frozen=True, slots=True)
class LinkFailed:
    """Only a new connection helps (no login answer, no subscribe answered while nothing is held)."""

    reason: str
    #: The login went unanswered (counted as a login failure).
    login: bool = False


@dataclass(frozen=True, slots=True)
class Resubscribing:
    """Coalesced resubscribes go out now (unsubscribe, then subscribe once OKX answered)."""

    args: tuple[SubArg, ...]
    reasons: frozenset[str]


@dataclass(frozen=True, slots=True)
class CloseLink:
    """The connection is in a state only a reconnect fixes (e.g. 60011 "Please log in")."""

    reason: str
    arg: SubArg
    code: str | None


@dataclass(frozen=True, slots=True)
class Retrying:
    arg: SubArg
    code: str | None
    retry: Retry


@dataclass(frozen=True, slots=True)
class ParkedArg:
    arg: SubArg
    why: str
    parked: Parked


@dataclass(frozen=True, slots=True)
class FailedArg:
    """Refused for good; an `Emit(SUBSCRIBE_FAILED)` follows."""

    arg: SubArg
    code: str | None
    msg: str


@dataclass(frozen=True, slots=True)
class Recovered:
    """A parked arg is held again."""

    arg: SubArg


@dataclass(frozen=True, slots=True)
class Split:
    """A refusal OKX did not attribute: `request` resends half of the args in doubt."""

    code: str | None
    request: Request


@dataclass(frozen=True, slots=True)
class NoticeSeen:
    """64008 (service upgrade): the driver decides whether to bring up a replacement."""

    code: str | None
    msg: str


@dataclass(frozen=True, slots=True)
class ChannelCount:
    channel: str | None
    count: str | None


@dataclass(frozen=True, slots=True)
class ConnCountExceeded:
    """OKX dropped every arg of `channel` on this connection; they are parked (`ParkedArg` each)."""

    channel: str | None
    dropped: tuple[SubArg, ...]
    reason: str


@dataclass(frozen=True, slots=True)
class UnexpectedSeen:
    event: OkxEvent
    why: str


Action = (Emit | LoginAnswered | CloseLink | Retrying | ParkedArg | FailedArg | Recovered | Split | NoticeSeen
          | ChannelCount | ConnCountExceeded | UnexpectedSeen | Entered | SendPing | AbortLink | LinkFailed
          | Resubscribing)


@dataclass(slots=True)
class Decision:
    """What one protocol outcome means: actions in order, and whether waiters must look again.

    `progress`: a request got (part of) its answer (a subscribe wait restarts its timeout);
    `work`: something new may be due (retries, resends).
    """

    actions: list[Action] = field(default_factory=list)
    progress: bool = False
    work: bool = False


class LinkSession:
    """The decisions of one physical connection (see the module doc)."""

    def __init__(self, args: Iterable[SubArg], schedule: SubscriptionScheduler, *, max_request_bytes: int,
                 requests_per_hour: int, keepalive_s: float, pong_timeout_s: float, login_timeout_s: float,
                 subscribe_timeout_s: float) -> None:
        self.proto = LinkProtocol(max_request_bytes)
        self.budget = SlidingWindow(requests_per_hour, HOUR_S)
        #: The reader stamps `keepalive.last_rx` for every inbound frame (pong included).
        self.keepalive = Keepalive(keepalive_s, pong_timeout_s, 0.0)
        self.schedule = schedule
        self._carried = frozenset(args)
        #: Args this connection announced SUBSCRIBED for and has not yet balanced with DISCONNECTED/CUTOVER.
        self.owned: set[SubArg] = set()
        #: Requests decided and not yet sent.
        self.outbox: list[Request] = []
        #: A 64008 notice arrived on this connection.
        self.noticed = False
        #: Subscribing finished: a SUBSCRIBED from now on brings no fresh snapshot for a pending resubscribe.
        self.live = False
        self.phase = LinkPhase.NEW
        self.login_timeout_s = login_timeout_s
        self.subscribe_timeout_s = subscribe_timeout_s
        self._login_answer: LoggedIn | LoginRefused | None = None
        self._login_deadline: float | None = None
        #: When the last request went out or the last answer came in: unanswered requests time out from here.
        self._quiet_since = 0.0
        #: Args unsubscribed for a resubscribe, subscribed again once no unsubscribe is outstanding.
        self._resubscribing: list[SubArg] | None = None
        self._next_resubscribe: float | None = None
        #: When the budget admits the next queued request (None: nothing waits for it).
        self.budget_at: float | None = None
        self._events: list[Decision] = []

    # -- the driver's loop

    def start(self, login: Request | None, now: float) -> None:
        """Begin the conversation: log in first when `login` is given, else subscribe every wanted arg."""
        self.keepalive.last_rx = now
        self._quiet_since = now
        if login is not None:
            self.phase = LinkPhase.LOGGING_IN
            self.outbox.append(login)
        else:
            self._enter_subscribing(now)

    def _enter_subscribing(self, now: float) -> None:
        self.phase = LinkPhase.SUBSCRIBING
        self._quiet_since = now
        self.subscribe()

    def tick(self, now: float, *, backlogged: bool = False, may_resubscribe: bool = True) -> None:
        """Decide what the time alone decides at `now`; the decisions wait in `events()`.

        `backlogged`: frames wait on our side, so silence is ours (no ping); `may_resubscribe`: this
        connection is the one serving (no 64008 hand-over in progress), so resubscribes may go out.
        """
        if self.phase is LinkPhase.ENDED:
            return
        action = self.keepalive.tick(now, backlogged)
        if action is KeepaliveAction.ABORT:
            self._end(AbortLink(f"no pong within {self.keepalive.pong_timeout_s}s"))
            return
        if action is KeepaliveAction.PING:
            self.keepalive.pinged(now)
            self._events.append(Decision([SendPing()]))
        if self.phase is LinkPhase.LOGGING_IN and not self._logging_in(now):
            return
        if self.phase in (LinkPhase.SUBSCRIBING, LinkPhase.LIVE) and not self._unanswered(now):
            return
        if self.phase is LinkPhase.SUBSCRIBING and not self.outbox and not self.proto.in_flight("subscribe"):
            self.phase = LinkPhase.LIVE
            self.live = True
            self._events.append(Decision([Entered(LinkPhase.LIVE)]))
        if self.phase is LinkPhase.LIVE:
            self._serve(now, may_resubscribe)

    def _end(self, action: Action) -> None:
        self.phase = LinkPhase.ENDED
        self._events.append(Decision([action]))

    def _logging_in(self, now: float) -> bool:
        """The login step; False while it is not over (or it failed)."""
        answer = self._login_answer
        if isinstance(answer, LoggedIn):
            self._events.append(Decision([LoginAnswered(answer), Entered(LinkPhase.SUBSCRIBING)]))
            self._enter_subscribing(now)
            return True
        if isinstance(answer, LoginRefused):
            self._end(LoginAnswered(answer))
        elif self._login_deadline is not None and now >= self._login_deadline:
            self._end(LinkFailed(f"no login answer within {self.login_timeout_s}s", login=True))
        return False

    def _unanswered(self, now: float) -> bool:
        """Requests unanswered for `subscribe_timeout_s` are given up on; False when that ends the session."""
        if self.outbox or not self.proto.in_flight() or now < self._quiet_since + self.subscribe_timeout_s:
            return True
        left = self.proto.abandon()
        self._quiet_since = now
        if left and not self.owned:
            self._end(LinkFailed(f"no answer to subscribe within {self.subscribe_timeout_s}s"))
            return False
        for arg in sorted(left):
            self._events.append(self.no_answer(arg, self.subscribe_timeout_s, now))
        return True

    def _serve(self, now: float, may_resubscribe: bool) -> None:
        """While live: due retries, then the second half of a resubscribe, then new resubscribes."""
        proto = self.proto
        due = self.schedule.due_retries(now, proto.held)
        if due:
            self.subscribe(due)
        if self._resubscribing is not None and not proto.in_flight("unsubscribe") \
                and not any(r.op == "unsubscribe" for r in self.outbox):
            self.subscribe(self._resubscribing)
            self._resubscribing = None
        self._next_resubscribe = None
        if not may_resubscribe or self._resubscribing is not None or self.outbox or proto.in_flight():
            return
        args, self._next_resubscribe = self.schedule.due_resubscribes(now, proto.held, proto.in_flight())
        if args:
            reasons = self.schedule.start_resubscribe(args, now)
            self.outbox.extend(proto.unsubscribe(args))
            self._resubscribing = args
            self._events.append(Decision([Resubscribing(tuple(args), frozenset(reasons))]))

    def events(self) -> list[Decision]:
        """The decisions `tick` took since the last call, in order."""
        out, self._events = self._events, []
        return out

    def requests_to_send(self, now: float) -> list[Request]:
        """The queued requests the hourly budget admits now (each one counted); the rest wait for `budget_at`."""
        out: list[Request] = []
        self.budget_at = None
        while self.outbox:
            if not self.budget.try_acquire(now):
                self.budget_at = now + self.budget.delay(now)
                break
            req = self.outbox.pop(0)
            if req.op == "login":
                self._login_deadline = now + self.login_timeout_s
            else:
                self._quiet_since = now
            out.append(req)
        return out

    def next_deadline(self) -> float:
        """When `tick` may decide differently if no frame arrives before (the keepalive always has one)."""
        times = [self.keepalive.next_deadline()]
        if self.phase is LinkPhase.ENDED:
            return times[0]
        if self.outbox and self.budget_at is not None:
            times.append(self.budget_at)
        if self.phase is LinkPhase.LOGGING_IN and self._login_deadline is not None:
            times.append(self._login_deadline)
        if not self.outbox and self.proto.in_flight():
            times.append(self._quiet_since + self.subscribe_timeout_s)
        if self.phase is LinkPhase.LIVE:
            held = self.proto.held
            times.extend(st.retry_at for a, st in self.schedule.states.items()
                         if st.retry_at is not None and a not in held)
            if self._next_resubscribe is not None:
                times.append(self._next_resubscribe)
        return min(times)

    # -- outbound

    def subscribe(self, args: Iterable[SubArg] | None = None) -> None:
        """Queue subscribe requests for `args` (default: every arg) not refused for good."""
        self.outbox.extend(self.proto.subscribe(self.schedule.wanted(args)))

    # -- inbound

    def receive(self, ev: OkxEvent, now: float) -> Iterator[Decision]:
        """One event frame: a decision per outcome, each computed once the previous one was carried out."""
        for out in self.proto.receive(ev):
            d = self._decide(out, now)
            if d.progress:
                self._quiet_since = now
            yield d

    def _decide(self, out: Outcome, now: float) -> Decision:
        d = Decision()
        if isinstance(out, LoggedIn | LoginRefused):
            if self._login_answer is None:
                self._login_answer = out  # `tick` takes the next step
            d.work = True
        elif isinstance(out, Subscribed):
            d.progress = True
            if self.schedule.on_subscribed(out.arg):
                d.actions.append(Recovered(out.arg))
            if out.arg in self._carried and out.arg not in self.owned:
                self.owned.add(out.arg)
                if not self.live:
                    # A fresh subscription after a reconnect brings a fresh snapshot: the resubscribe is moot.
                    self.schedule.fresh_snapshot(out.arg)
                d.actions.append(Emit(LinkEventKind.SUBSCRIBED, (out.arg,)))
        elif isinstance(out, Unsubscribed):
            d.progress = True
            if out.arg in self.owned:
                self.owned.discard(out.arg)
                d.actions.append(Emit(LinkEventKind.DISCONNECTED, (out.arg,), reason="resubscribe"))
        elif isinstance(out, ArgRefused):
            d.progress = True
            self._refused(out, now, d)
        elif isinstance(out, Resend):
            self.outbox.append(out.request)
            d.progress = d.work = True
            d.actions.append(Split(out.code, out.request))
        elif isinstance(out, Notice):
            self.noticed = True
            d.actions.append(NoticeSeen(out.code, out.msg))
        elif isinstance(out, ConnCount):
            self._conn_count(out, now, d)
        elif isinstance(out, Unexpected):
            d.actions.append(UnexpectedSeen(out.event, out.why))
        return d

    def _refused(self, out: ArgRefused, now: float, d: Decision) -> None:
        if out.action is ArgAction.RECONNECT:
            d.actions.append(CloseLink(f"subscribe refused with {out.code} ({out.msg}): reconnecting", out.arg,
                                       out.code))
            return
        if out.action is ArgAction.RETRY:
            why = out.code or out.msg
            decision = self.schedule.on_transient(out.arg, why, now)
            d.work = True
            d.actions.append(Retrying(out.arg, out.code, decision) if isinstance(decision, Retry)
                             else ParkedArg(out.arg, why, decision))
            return
        self.fail(out.arg, out.code, out.msg, d)

    def no_answer(self, arg: SubArg, timeout_s: float, now: float) -> Decision:
        """A subscribe of `arg` went unanswered for `timeout_s`: a transient refusal."""
        d = Decision(progress=True)
        self._refused(ArgRefused(arg, None, f"no answer within {timeout_s}s", ArgAction.RETRY), now, d)
        return d

    def fail(self, arg: SubArg, code: str | None, msg: str, d: Decision) -> None:
        self.schedule.fail(arg, code or msg)
        self.owned.discard(arg)
        d.actions.append(FailedArg(arg, code, msg))
        d.actions.append(Emit(LinkEventKind.SUBSCRIBE_FAILED, (arg,), code=code, reason=msg))

    def _conn_count(self, out: ConnCount, now: float, d: Decision) -> None:
        if not out.exceeded:
            d.actions.append(ChannelCount(out.channel, out.count))
            return
        dropped = tuple(sorted(a for a in self.proto.held if a.channel == out.channel))
        self.proto.forget(dropped)
        reason = f"channel-conn-count-error: {out.count} connections hold {out.channel} (OKX allows 30)"
        for arg in dropped:
            self.owned.discard(arg)
            # Other connections may go away: try again later rather than never (the cap is per sub-account).
            why = "channel-conn-count-error"
            d.actions.append(ParkedArg(arg, why, self.schedule.park(arg, why, now)))
            d.work = True
        d.actions.append(ConnCountExceeded(out.channel, dropped, reason))
        if dropped:
            d.actions.append(Emit(LinkEventKind.SUBSCRIBE_FAILED, dropped, reason=reason))
