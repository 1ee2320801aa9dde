"""One physical OKX WebSocket connection's decisions, sans-I/O: event frames and the time in, actions out.

`LinkSession` holds what dies with a socket: the login/subscribe conversation (`wsproto.LinkProtocol`),
the hourly request budget, the keepalive watchdog and the args this connection announced SUBSCRIBED for
(`owned`). It shares the logical connection's `SubscriptionScheduler`, which outlives sockets.

`receive(event, now, live)` yields one `Decision` per protocol outcome, lazily: the driver (`ingest.io.ws`)
carries out each one (puts link events into the pipeline, logs, closes the socket) before the next is
computed, so link events keep frame order and nobody sees state ahead of what was emitted.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

from ingest.core.events import LinkEventKind
from ingest.core.keepalive import Keepalive
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


@dataclass(frozen=True, slots=True)
class Emit:
    """Put a link event for this connection into the pipeline."""

    kind: LinkEventKind
    args: tuple[SubArg, ...]
    code: str | None = None
    reason: str = ""


@dataclass(frozen=True, slots=True)
class LoginAnswered:
    result: LoggedIn | LoginRefused


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
          | ChannelCount | ConnCountExceeded | UnexpectedSeen)


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
                 requests_per_hour: int, keepalive_s: float, pong_timeout_s: float) -> None:
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

    # -- outbound

    def subscribe(self, args: Iterable[SubArg] | None = None) -> None:
        """Queue subscribe requests for `args` (default: every arg) not refused for good."""
        self.outbox.extend(self.proto.subscribe(self.schedule.wanted(args)))

    def request_delay(self, now: float) -> float:
        """0 (and the request is counted) when the hourly budget allows one more request now, else how long
        to wait before asking again."""
        if self.budget.try_acquire(now):
            return 0.0
        return self.budget.delay(now)

    # -- inbound

    def receive(self, ev: OkxEvent, now: float) -> Iterator[Decision]:
        """One event frame: a decision per outcome, each computed once the previous one was carried out."""
        for out in self.proto.receive(ev):
            yield self._decide(out, now)

    def _decide(self, out: Outcome, now: float) -> Decision:
        d = Decision()
        if isinstance(out, LoggedIn | LoginRefused):
            d.actions.append(LoginAnswered(out))
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
