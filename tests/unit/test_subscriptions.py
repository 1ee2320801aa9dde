"""The subscription scheduler on fake time: retries, parking, refusals for good and resubscribe coalescing."""

from __future__ import annotations

from itertools import pairwise

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from ingest.core.subscriptions import PARK_FIRST_S, PARK_MAX_S, Parked, Retry, SubscriptionScheduler
from ingest.okx.channels import SubArg

ARGS = [SubArg("trades", inst_id=f"I{n}-USDT") for n in range(4)]
RETRIES, FLOOR, CAP, RESUB_S = 3, 0.1, 5.0, 2.0


def scheduler() -> SubscriptionScheduler:
    return SubscriptionScheduler(ARGS, retries=RETRIES, backoff_min_s=FLOOR, backoff_max_s=CAP,
                                 resubscribe_min_interval_s=RESUB_S)


def test_transient_refusals_retry_quickly_then_park_doubling_to_the_cap_and_never_fail() -> None:
    s, arg = scheduler(), ARGS[0]
    decisions = [s.on_transient(arg, "64007", now=0.0) for _ in range(2 * (RETRIES + 1))]
    quick = [Retry(1.0, 1), Retry(2.0, 2), Retry(4.0, 3)]  # 10x the backoff floor, doubling, capped at CAP
    # Each slow retry that is refused again gets its quick retries back before it is parked for longer.
    assert decisions == [*quick, Parked(PARK_FIRST_S, 1), *quick, Parked(2 * PARK_FIRST_S, 2)]
    assert s.failed == {} and s.wanted() == ARGS


def test_a_parked_arg_that_keeps_being_refused_is_retried_ever_less_often_up_to_30_minutes() -> None:
    s, arg = scheduler(), ARGS[0]
    parks = [s.park(arg, "channel-conn-count-error", now=0.0) for _ in range(8)]
    assert [p.delay_s for p in parks] == [60.0, 120.0, 240.0, 480.0, 960.0, PARK_MAX_S, PARK_MAX_S, PARK_MAX_S]
    assert s.parked == {arg: (8, "channel-conn-count-error")}


def test_a_subscription_ends_the_retries_and_a_later_refusal_starts_with_a_quick_retry() -> None:
    s, arg = scheduler(), ARGS[0]
    s.park(arg, "64007", now=0.0)
    assert s.on_subscribed(arg)  # it recovered
    assert s.parked == {} and s.next_retry() is None
    assert s.on_transient(arg, "64007", now=10.0) == Retry(1.0, 1)


def test_an_arg_refused_for_good_is_never_asked_for_again() -> None:
    s, arg = scheduler(), ARGS[1]
    s.on_transient(arg, "64007", now=0.0)
    s.request_resubscribe(arg, "seqId break")
    s.fail(arg, "60018")
    assert s.failed == {arg: "60018"} and arg not in s.wanted()
    assert s.request_resubscribe(arg, "again") is None and s.pending_resubscribes() == 0
    assert s.due_retries(100.0, held=()) == [] and s.next_retry() is None


def test_resubscribes_of_an_arg_not_carried_are_refused() -> None:
    assert scheduler().request_resubscribe(SubArg("trades", inst_id="OTHER-USDT"), "x") is None


def test_a_pending_resubscribe_of_an_arg_neither_held_nor_in_flight_is_dropped() -> None:
    s = scheduler()
    s.request_resubscribe(ARGS[0], "break")
    assert s.due_resubscribes(0.0, held=(), in_flight=(ARGS[0],)) == ([], None)
    assert s.pending_resubscribes() == 1  # being subscribed: kept until it is held
    assert s.due_resubscribes(0.0, held=(), in_flight=()) == ([], None)
    assert s.pending_resubscribes() == 0  # a subscribe with a fresh snapshot comes anyway


class SchedulerOnFakeTime(RuleBasedStateMachine):
    """Any interleaving of refusals, subscriptions, resubscribe requests and time: the promises hold."""

    def __init__(self) -> None:
        super().__init__()
        self.s = scheduler()
        self.now = 0.0
        self.held: set[SubArg] = set()
        #: Model: when each arg's retry was scheduled for (None: none), and when its resubscribes were sent.
        self.retry_at: dict[SubArg, float | None] = dict.fromkeys(ARGS)
        self.failed: set[SubArg] = set()
        self.resub_sent: dict[SubArg, list[float]] = {a: [] for a in ARGS}
        self.resub_wanted: set[SubArg] = set()

    @rule(dt=st.floats(0.0, 700.0))
    def time_passes(self, dt: float) -> None:
        self.now += dt

    @rule(arg=st.sampled_from(ARGS))
    def refused_transiently(self, arg: SubArg) -> None:
        if arg in self.held:
            return
        d = self.s.on_transient(arg, "64007", self.now)
        if isinstance(d, Retry):
            assert 1 <= d.attempt <= RETRIES and d.delay_s <= CAP
        else:
            assert PARK_FIRST_S <= d.delay_s <= PARK_MAX_S
        self.retry_at[arg] = self.now + d.delay_s

    @rule(arg=st.sampled_from(ARGS))
    def refused_for_good(self, arg: SubArg) -> None:
        self.s.fail(arg, "60018")
        self.failed.add(arg)
        self.held.discard(arg)
        self.retry_at[arg] = None
        self.resub_wanted.discard(arg)

    @rule(arg=st.sampled_from(ARGS))
    def subscribed(self, arg: SubArg) -> None:
        if arg in self.failed:
            return
        self.s.on_subscribed(arg)
        self.held.add(arg)
        self.retry_at[arg] = None

    @rule(arg=st.sampled_from(ARGS))
    def resubscribe_requested(self, arg: SubArg) -> None:
        result = self.s.request_resubscribe(arg, "break")
        if arg in self.failed:
            assert result is None
        else:
            assert result is (arg not in self.resub_wanted)
            self.resub_wanted.add(arg)

    @rule()
    def tick(self) -> None:
        due = self.s.due_retries(self.now, self.held)
        for a in due:
            at = self.retry_at[a]
            assert at is not None and at <= self.now, "a retry came before its time"
            self.retry_at[a] = None
        for a, at in self.retry_at.items():
            if at is not None and at <= self.now and a not in self.held:
                raise AssertionError(f"{a} was due at {at} and not returned at {self.now}")
        resub, later = self.s.due_resubscribes(self.now, self.held, in_flight=())
        assert later is None or later > self.now
        self.resub_wanted &= self.held  # not held: dropped (a fresh subscription comes anyway)
        assert set(resub) <= self.resub_wanted
        self.s.start_resubscribe(resub, self.now)
        for a in resub:
            self.resub_sent[a].append(self.now)
            self.resub_wanted.discard(a)

    @precondition(lambda self: bool(self.resub_wanted))
    @rule()
    def every_pending_resubscribe_is_sent_once_its_interval_passed(self) -> None:
        self.now += RESUB_S
        self.tick()
        assert not self.resub_wanted & self.held

    @invariant()
    def failed_args_are_never_wanted_and_scheduled_ones_are_next(self) -> None:
        assert set(self.s.failed) == self.failed
        assert not set(self.s.wanted()) & self.failed
        times = [t for t in self.retry_at.values() if t is not None]
        assert self.s.next_retry() == (min(times) if times else None)

    @invariant()
    def resubscribes_of_one_arg_are_at_least_the_minimum_interval_apart(self) -> None:
        for sent in self.resub_sent.values():
            assert all(b - a >= RESUB_S for a, b in pairwise(sent))


TestSchedulerOnFakeTime = SchedulerOnFakeTime.TestCase
TestSchedulerOnFakeTime.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)
