"""The link session on fake time: whatever OKX answers, link events stay balanced and refusals are honoured,
and the driver's loop (tick, events, requests_to_send, sleep to next_deadline) keeps OKX's budget and never spins."""

from __future__ import annotations

import secrets
from collections import Counter

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from ingest.core.events import LinkEventKind
from ingest.core.session import (
    HOUR_S,
    AbortLink,
    Action,
    CloseLink,
    Decision,
    Emit,
    Entered,
    FailedArg,
    LinkFailed,
    LinkPhase,
    LinkSession,
    LoginAnswered,
    ParkedArg,
    Resubscribing,
    Retrying,
    SendPing,
)
from ingest.core.subscriptions import SubscriptionScheduler
from ingest.core.wsproto import LoggedIn, LoginRefused, OkxEvent, Request
from ingest.credentials import Credentials, Secret
from ingest.okx.channels import SubArg

ARGS = [SubArg("trades", inst_id=f"I{n}-USDT") for n in range(3)] + [SubArg("books", inst_id="I0-USDT")]
CODES = ["60018", "64003", "64007", "60014", "63999", "60011", "99999"]


KEEPALIVE, PONG_TIMEOUT, LOGIN_TIMEOUT, SUBSCRIBE_TIMEOUT = 25.0, 5.0, 10.0, 10.0


def session(requests_per_hour: int = 480, max_request_bytes: int = 120) -> LinkSession:
    schedule = SubscriptionScheduler(ARGS, retries=2, backoff_min_s=0.1, backoff_max_s=5.0,
                                     resubscribe_min_interval_s=1.0)
    return LinkSession(ARGS, schedule, max_request_bytes=max_request_bytes, requests_per_hour=requests_per_hour,
                       keepalive_s=KEEPALIVE, pong_timeout_s=PONG_TIMEOUT, login_timeout_s=LOGIN_TIMEOUT,
                       subscribe_timeout_s=SUBSCRIBE_TIMEOUT)


def login_request(s: LinkSession) -> Request:
    """A login signed with credentials made up for this test."""
    creds = Credentials(Secret(secrets.token_hex(8)), Secret(secrets.token_hex(16)), Secret(secrets.token_hex(6)))
    return s.proto.login(creds, server_ms=0)


def step(s: LinkSession, now: float, *, may_resubscribe: bool = True) -> tuple[list[Action], list[Request]]:
    """One turn of the driver's loop at `now`: tick, the decisions, the requests the budget admits."""
    s.tick(now, may_resubscribe=may_resubscribe)
    return [a for d in s.events() for a in d.actions], s.requests_to_send(now)


def ack_all(s: LinkSession, reqs: list[Request], now: float) -> list[Action]:
    return [a for r in reqs for arg in r.args for d in s.receive(OkxEvent(r.op, id=r.id, arg=arg), now)
            for a in d.actions]


def test_the_request_budget_never_allows_more_than_its_limit_within_an_hour() -> None:
    s, now = session(requests_per_hour=5), 0.0
    sent: list[float] = []
    s.start(None, now)
    while len(sent) < len(ARGS) and now < 3 * HOUR_S:
        _, reqs = step(s, now)
        sent.extend(now for _ in reqs)
        # OKX answers at once; the driver sleeps to the next deadline on its timer.
        ack_all(s, reqs, now)
        s.keepalive.last_rx = now
        now = max(now, s.next_deadline())
    assert len(sent) == len(ARGS) == 4
    s2 = session(requests_per_hour=2)
    s2.start(None, 0.0)
    _, first = step(s2, 0.0)
    assert len(first) == 2 and s2.budget_at == HOUR_S and s2.next_deadline() <= HOUR_S
    _, more = step(s2, HOUR_S - 1e-3)
    assert more == []
    _, later = step(s2, HOUR_S)
    assert len(later) == 2


def test_a_login_is_sent_first_and_subscribing_waits_for_its_ack() -> None:
    s = session()
    login = login_request(s)
    s.start(login, 0.0)
    _, reqs = step(s, 0.0)
    assert reqs == [login] and s.phase is LinkPhase.LOGGING_IN
    assert s.next_deadline() == LOGIN_TIMEOUT
    assert [d.work for d in s.receive(OkxEvent("login", code="0", conn_id="c1"), 1.0)] == [True]
    actions, subs = step(s, 1.0)
    assert actions == [LoginAnswered(LoggedIn("c1")), Entered(LinkPhase.SUBSCRIBING)]
    assert {a for r in subs for a in r.args} == set(ARGS)
    ack_all(s, subs, 2.0)
    actions, _ = step(s, 2.0)
    assert actions == [Entered(LinkPhase.LIVE)] and s.live


def test_an_unanswered_login_fails_the_link_at_login_timeout_and_a_refusal_at_once() -> None:
    s = session()
    s.start(login_request(s), 0.0)
    step(s, 0.0)
    assert step(s, LOGIN_TIMEOUT - 1e-3)[0] == []
    assert step(s, LOGIN_TIMEOUT)[0] == [LinkFailed(f"no login answer within {LOGIN_TIMEOUT}s", login=True)]
    assert s.phase is LinkPhase.ENDED and step(s, 2 * LOGIN_TIMEOUT) == ([], [])
    r = session()
    r.start(login_request(r), 0.0)
    step(r, 0.0)
    list(r.receive(OkxEvent("error", code="60009", msg="Login failed."), 0.5))
    [answered] = step(r, 0.5)[0]
    assert isinstance(answered, LoginAnswered) and isinstance(answered.result, LoginRefused)
    assert r.phase is LinkPhase.ENDED


def test_a_silent_link_is_pinged_at_keepalive_s_and_aborted_pong_timeout_s_later() -> None:
    s = session()
    s.start(None, 0.0)
    ack_all(s, step(s, 0.0)[1], 0.0)
    s.keepalive.last_rx = 0.0
    step(s, 0.0)
    assert s.next_deadline() == KEEPALIVE
    assert step(s, KEEPALIVE)[0] == [SendPing()]
    assert s.next_deadline() == KEEPALIVE + PONG_TIMEOUT
    assert step(s, KEEPALIVE + PONG_TIMEOUT)[0] == [AbortLink(f"no pong within {PONG_TIMEOUT}s")]


def test_no_subscribe_answer_fails_a_link_that_holds_nothing_and_retries_on_one_that_holds_something() -> None:
    s = session()
    s.start(None, 0.0)
    step(s, 0.0)
    assert s.next_deadline() == SUBSCRIBE_TIMEOUT
    assert step(s, SUBSCRIBE_TIMEOUT)[0] == [LinkFailed(f"no answer to subscribe within {SUBSCRIBE_TIMEOUT}s")]
    h = session()
    h.start(None, 0.0)
    reqs = step(h, 0.0)[1]
    ack_all(h, reqs[:1], 1.0)
    actions, _ = step(h, 1.0 + SUBSCRIBE_TIMEOUT)
    assert h.phase is LinkPhase.LIVE and any(isinstance(a, Retrying) for a in actions)


def test_a_resubscribe_unsubscribes_first_and_subscribes_again_only_after_the_answer() -> None:
    s = session()
    s.start(None, 0.0)
    ack_all(s, step(s, 0.0)[1], 0.0)
    step(s, 0.0)
    assert s.schedule.request_resubscribe(ARGS[0], "checksum") is True
    assert s.schedule.request_resubscribe(ARGS[0], "again") is False  # coalesced
    assert step(s, 1.0, may_resubscribe=False) == ([], [])  # a hand-over in progress: not now
    actions, [unsub] = step(s, 1.0)
    assert actions == [Resubscribing((ARGS[0],), frozenset({"checksum"}))] and unsub.op == "unsubscribe"
    assert step(s, 1.5) == ([], [])
    emitted = ack_all(s, [unsub], 2.0)
    assert emitted == [Emit(LinkEventKind.DISCONNECTED, (ARGS[0],), reason="resubscribe")]
    _, [sub] = step(s, 2.0)
    assert sub.op == "subscribe" and sub.args == (ARGS[0],)
    assert ack_all(s, [sub], 2.5) == [Emit(LinkEventKind.SUBSCRIBED, (ARGS[0],))]
    # At most one resubscribe per arg per resubscribe_min_interval_s (1 s): the next waits for its deadline.
    s.schedule.request_resubscribe(ARGS[0], "checksum")
    assert step(s, 1.5 + 0.1) == ([], []) and s.next_deadline() == 2.0


def test_an_ack_emits_subscribed_once_and_a_repeated_ack_nothing() -> None:
    s = session()
    s.subscribe(ARGS[:1])
    [req] = s.outbox
    first = list(s.receive(OkxEvent("subscribe", id=req.id, arg=ARGS[0]), now=0.0))
    again = list(s.receive(OkxEvent("subscribe", id=req.id, arg=ARGS[0]), now=0.0))
    assert [a for d in first for a in d.actions] == [Emit(LinkEventKind.SUBSCRIBED, (ARGS[0],))]
    assert [a for d in again for a in d.actions] == []
    assert s.owned == {ARGS[0]}


@pytest.mark.parametrize(("code", "action"), [("60018", FailedArg), ("64007", Retrying), ("60011", CloseLink)])
def test_a_refused_single_arg_is_failed_retried_or_reconnected_by_its_code(code: str, action: type) -> None:
    s = session()
    s.subscribe(ARGS[:1])
    [req] = s.outbox
    [d] = list(s.receive(OkxEvent("error", id=req.id, code=code, msg="refused"), now=0.0))
    assert isinstance(d.actions[0], action) and d.progress


class SessionAgainstAnyOkx(RuleBasedStateMachine):
    """OKX answering (or not) in any order; the consumer's view, rebuilt from the emitted events, agrees."""

    def __init__(self) -> None:
        super().__init__()
        self.s = session()
        self.now = 0.0
        self.sent: list[Request] = []
        self.owned: set[SubArg] = set()  # as a consumer sees it from SUBSCRIBED / DISCONNECTED / SUBSCRIBE_FAILED
        self.failed: set[SubArg] = set()
        self.closed = False

    def apply(self, decisions: list[Decision]) -> None:
        for d in decisions:
            for act in d.actions:
                if isinstance(act, Emit):
                    for arg in act.args:
                        if act.kind is LinkEventKind.SUBSCRIBED:
                            assert arg not in self.owned, "SUBSCRIBED twice without a balancing event"
                            self.owned.add(arg)
                        elif act.kind is LinkEventKind.DISCONNECTED:
                            assert arg in self.owned, "DISCONNECTED for an arg never announced"
                            self.owned.discard(arg)
                        elif act.kind is LinkEventKind.SUBSCRIBE_FAILED:
                            self.owned.discard(arg)
                elif isinstance(act, FailedArg):
                    self.failed.add(act.arg)
                elif isinstance(act, CloseLink):
                    self.closed = True
                elif isinstance(act, ParkedArg):
                    assert act.arg not in self.failed

    def send(self) -> None:
        self.sent.extend(self.s.outbox)
        self.s.outbox.clear()

    @rule()
    def subscribe_everything_wanted(self) -> None:
        self.s.subscribe()
        self.send()

    @precondition(lambda self: bool(self.sent))
    @rule(data=st.data())
    def okx_acks_one_arg(self, data: st.DataObject) -> None:
        req = data.draw(st.sampled_from(self.sent))
        if req.args:
            arg = data.draw(st.sampled_from(req.args))
            with_id = data.draw(st.booleans())
            self.apply(list(self.s.receive(OkxEvent(req.op, id=req.id if with_id else None, arg=arg), self.now)))

    @precondition(lambda self: bool(self.sent))
    @rule(data=st.data(), code=st.sampled_from(CODES))
    def okx_refuses_a_request(self, data: st.DataObject, code: str) -> None:
        req = data.draw(st.sampled_from(self.sent))
        name = data.draw(st.none() | st.sampled_from(req.args)) if req.args else None
        msg = f"Wrong URL or channel:{name.channel},instId:{name.inst_id} doesn't exist." if name else "refused"
        self.apply(list(self.s.receive(OkxEvent("error", id=req.id, code=code, msg=msg), self.now)))
        self.send()  # resends after a split

    @rule()
    def okx_drops_a_channel_for_too_many_connections(self) -> None:
        ev = OkxEvent("channel-conn-count-error", channel="trades", conn_count="31")
        self.apply(list(self.s.receive(ev, self.now)))

    @precondition(lambda self: bool(self.s.owned))
    @rule(data=st.data())
    def resubscribe_one(self, data: st.DataObject) -> None:
        arg = data.draw(st.sampled_from(sorted(self.s.owned)))
        self.s.outbox.extend(self.s.proto.unsubscribe([arg]))
        self.send()

    @rule()
    def nothing_answered_in_time(self) -> None:
        for arg in sorted(self.s.proto.abandon()):
            self.apply([self.s.no_answer(arg, 2.0, self.now)])

    @rule(dt=st.floats(0.0, 2000.0))
    def retries_come_due(self, dt: float) -> None:
        self.now += dt
        due = self.s.schedule.due_retries(self.now, self.s.proto.held)
        self.s.subscribe(due)
        self.send()

    @invariant()
    def the_consumer_sees_what_the_session_owns(self) -> None:
        assert self.owned == self.s.owned
        assert self.s.owned <= set(ARGS)

    @invariant()
    def an_arg_refused_for_good_is_never_asked_for_again(self) -> None:
        assert set(self.s.schedule.failed) == self.failed
        self.s.subscribe()
        asked = Counter(a for r in self.s.outbox for a in r.args)
        assert not set(asked) & self.failed
        self.send()


TestSessionAgainstAnyOkx = SessionAgainstAnyOkx.TestCase
TestSessionAgainstAnyOkx.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)


class DrivenSession(RuleBasedStateMachine):
    """The driver's loop on fake time against an OKX that answers late, refuses, or says nothing at all."""

    LIMIT = 6

    def __init__(self) -> None:
        super().__init__()
        self.s = session(requests_per_hour=self.LIMIT)
        self.now = 0.0
        self.s.start(None, self.now)
        self.sent: list[tuple[float, Request]] = []
        self.unanswered: list[Request] = []
        self.ended = False
        self.turn()

    def turn(self) -> None:
        actions, reqs = step(self.s, self.now)
        self.ended = self.ended or any(isinstance(a, LinkFailed | AbortLink) for a in actions)
        self.sent.extend((self.now, r) for r in reqs)
        self.unanswered.extend(reqs)

    @precondition(lambda self: bool(self.unanswered))
    @rule(data=st.data(), code=st.sampled_from([None, *CODES]))
    def okx_answers_a_request(self, data: st.DataObject, code: str | None) -> None:
        req = self.unanswered.pop(data.draw(st.integers(0, len(self.unanswered) - 1)))
        self.s.keepalive.last_rx = self.now
        events = ([OkxEvent(req.op, id=req.id, arg=a) for a in req.args] if code is None
                  else [OkxEvent("error", id=req.id, code=code, msg="refused")])
        for ev in events:
            for _ in self.s.receive(ev, self.now):
                pass
        self.turn()

    @precondition(lambda self: bool(self.s.owned))
    @rule(data=st.data())
    def the_pipeline_asks_for_a_resubscribe(self, data: st.DataObject) -> None:
        self.s.schedule.request_resubscribe(data.draw(st.sampled_from(sorted(self.s.owned))), "checksum")
        self.turn()

    @rule(fraction=st.floats(0.0, 1.0), pong=st.booleans())
    def time_passes_until_at_most_the_next_deadline(self, fraction: float, pong: bool) -> None:
        deadline = self.s.next_deadline()
        self.now = max(self.now, self.now + (deadline - self.now) * fraction)
        if pong:
            self.s.keepalive.last_rx = self.now
        self.turn()

    @invariant()
    def the_loop_never_spins(self) -> None:
        # Right after a turn, the same instant brings nothing new, and the timer is armed in the future.
        assert step(self.s, self.now) == ([], [])
        assert self.s.next_deadline() > self.now or self.s.phase is LinkPhase.ENDED

    @invariant()
    def no_more_requests_than_the_budget_within_any_hour(self) -> None:
        times = [t for t, _ in self.sent]
        assert all(b - a >= HOUR_S for a, b in zip(times, times[self.LIMIT:], strict=False))

    @invariant()
    def a_failed_link_stays_ended(self) -> None:
        assert not self.ended or self.s.phase is LinkPhase.ENDED


TestDrivenSession = DrivenSession.TestCase
TestDrivenSession.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)
