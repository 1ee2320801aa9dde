"""The link session on fake time: whatever OKX answers, link events stay balanced and refusals are honoured."""

from __future__ import annotations

from collections import Counter

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from ingest.core.events import LinkEventKind
from ingest.core.session import (
    HOUR_S,
    CloseLink,
    Decision,
    Emit,
    FailedArg,
    LinkSession,
    ParkedArg,
    Retrying,
)
from ingest.core.subscriptions import SubscriptionScheduler
from ingest.core.wsproto import OkxEvent, Request
from ingest.okx.channels import SubArg

ARGS = [SubArg("trades", inst_id=f"I{n}-USDT") for n in range(3)] + [SubArg("books", inst_id="I0-USDT")]
CODES = ["60018", "64003", "64007", "60014", "63999", "60011", "99999"]


def session(requests_per_hour: int = 480) -> LinkSession:
    schedule = SubscriptionScheduler(ARGS, retries=2, backoff_min_s=0.1, backoff_max_s=5.0,
                                     resubscribe_min_interval_s=1.0)
    return LinkSession(ARGS, schedule, max_request_bytes=120, requests_per_hour=requests_per_hour,
                       keepalive_s=25.0, pong_timeout_s=5.0)


def test_the_request_budget_never_allows_more_than_its_limit_within_an_hour() -> None:
    s, now, sent = session(requests_per_hour=5), 0.0, []
    for _ in range(12):
        while (delay := s.request_delay(now)) > 0:
            now += delay  # the driver sleeps this long on its timer
        sent.append(now)
    assert all(b - a >= HOUR_S for a, b in zip(sent, sent[5:], strict=False))
    assert sent[:5] == [0.0] * 5 and sent[5] >= HOUR_S


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
