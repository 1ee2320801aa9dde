"""The REST client's pure policy on fake time: OKX's limit table and the per-endpoint circuit breaker."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ingest.core.rest_limits import (
    OKX_LIMITS,
    PUBLIC_PREFIXES,
    BreakerEvent,
    BreakerState,
    CircuitBreaker,
    CircuitOpenError,
    EndpointLimit,
    LimitTable,
    Scope,
)


def state_of(breaker: CircuitBreaker) -> BreakerState:
    return breaker.state


class FakeMonotonic:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


# ------------------------------------------------------------------------------------------- the table


def test_limit_table_has_okx_documented_limits_and_scopes() -> None:
    table = LimitTable()
    assert table.lookup("/api/v5/public/time") == EndpointLimit(10, 2.0, Scope.IP)
    assert table.lookup("/api/v5/public/instruments").scope is Scope.IP_INST_TYPE
    assert table.lookup("/api/v5/market/history-trades") == EndpointLimit(20, 2.0, Scope.IP)
    assert table.lookup("/api/v5/trade/fills") == EndpointLimit(60, 2.0, Scope.USER)
    assert table.lookup("/api/v5/account/config") == EndpointLimit(5, 2.0, Scope.USER)
    assert all(lim.window_s == 2.0 for lim in OKX_LIMITS.values())


def test_unknown_endpoints_get_the_smallest_limit_scoped_by_prefix() -> None:
    table = LimitTable()
    assert table.lookup("/api/v5/market/new-thing") == EndpointLimit(5, 2.0, Scope.IP)
    assert table.lookup("/api/v5/asset/balances") == EndpointLimit(5, 2.0, Scope.USER)
    assert not table.known("/api/v5/asset/balances")


def test_share_and_window_scale_adjust_every_limit() -> None:
    half = LimitTable(share=0.5)
    assert half.lookup("/api/v5/market/trades").limit == 50
    assert half.lookup("/api/v5/account/config").limit == 2
    assert LimitTable(share=0.01).lookup("/api/v5/account/config").limit == 1
    assert LimitTable(window_scale=0.05).lookup("/api/v5/public/time").window_s == pytest.approx(0.1)
    with pytest.raises(ValueError, match="share"):
        LimitTable(share=1.5)


PATHS = st.one_of(
    st.sampled_from(sorted(OKX_LIMITS)),
    st.builds(lambda prefix, tail: prefix + tail,
              st.sampled_from([*PUBLIC_PREFIXES, "/api/v5/asset/", "/api/v5/trade/", "/"]),
              st.text("abcdefghijklmnopqrstuvwxyz-", min_size=1, max_size=12)),
)
SHARES = st.floats(0.001, 1.0)
SCALES = st.floats(0.001, 100.0)


@settings(max_examples=300, deadline=None)
@given(PATHS, SHARES, SCALES)
def test_a_looked_up_limit_is_the_documented_one_shared_and_scaled_and_never_above_it(
        path: str, share: float, scale: float) -> None:
    table = LimitTable(share=share, window_scale=scale)
    got = table.lookup(path)
    base = OKX_LIMITS.get(path)
    if base is None:  # unknown: the smallest documented limit, public or private by the prefix
        assert not table.known(path)
        assert got.scope is (Scope.IP if path.startswith(PUBLIC_PREFIXES) else Scope.USER)
        base = EndpointLimit(min(lim.limit for lim in OKX_LIMITS.values()), 2.0, got.scope)
    assert 1 <= got.limit <= base.limit
    assert got.limit == max(1, int(base.limit * share))
    assert got.window_s == pytest.approx(base.window_s * scale)
    assert got.scope is base.scope and got.private is (got.scope is Scope.USER)
    assert (path, got) in table.items() or not table.known(path)


@settings(max_examples=200, deadline=None)
@given(PATHS, SHARES, SHARES)
def test_a_larger_share_never_gets_a_smaller_limit(path: str, a: float, b: float) -> None:
    low, high = sorted((a, b))
    assert LimitTable(share=low).lookup(path).limit <= LimitTable(share=high).lookup(path).limit


@settings(max_examples=200, deadline=None)
@given(st.sampled_from(sorted(OKX_LIMITS)), st.integers(1, 100))
def test_n_processes_with_a_share_of_one_nth_never_overrun_okx_together(path: str, n: int) -> None:
    documented = OKX_LIMITS[path].limit
    if n <= documented:  # beyond that each still gets the floor of one request (documented in CONFIG)
        assert n * LimitTable(share=1 / n).lookup(path).limit <= documented


@given(st.one_of(st.floats(max_value=0.0), st.floats(min_value=1.0001)), SCALES)
def test_a_share_outside_zero_to_one_is_refused(share: float, scale: float) -> None:
    with pytest.raises(ValueError, match="share"):
        LimitTable(share=share, window_scale=scale)


# ----------------------------------------------------------------------------------------- the breaker


def test_breaker_opens_after_consecutive_failures_and_probes_after_the_cooldown() -> None:
    clock = FakeMonotonic()
    breaker = CircuitBreaker("/api/v5/market/books", failures=3, cooldown_s=30.0, monotonic=clock)
    for _ in range(2):
        assert breaker.before_call() is None
        assert breaker.on_failure() is None
    breaker.before_call()
    assert breaker.on_success() is None  # a success in between resets the count; nothing had opened
    events = []
    for _ in range(3):
        breaker.before_call()
        events.append(breaker.on_failure())
    assert events == [None, None, BreakerEvent.OPENED]
    assert breaker.state is BreakerState.OPEN
    with pytest.raises(CircuitOpenError, match=r"paused after 3 consecutive failures.*30\.0 s") as info:
        breaker.before_call()
    assert info.value.retriable and info.value.retry_after_s == 30.0
    clock.now += 30.0
    assert state_of(breaker) is BreakerState.HALF_OPEN
    assert breaker.before_call() is BreakerEvent.PROBING  # the probe
    with pytest.raises(CircuitOpenError):
        breaker.before_call()  # only one probe at a time
    assert breaker.on_success() is BreakerEvent.CLOSED
    assert state_of(breaker) is BreakerState.CLOSED


def test_a_failed_probe_reopens_and_an_inconclusive_one_frees_the_probe_slot() -> None:
    clock = FakeMonotonic()
    breaker = CircuitBreaker("/x", failures=1, cooldown_s=5.0, monotonic=clock)
    breaker.before_call()
    assert breaker.on_failure() is BreakerEvent.OPENED
    clock.now += 5.0
    assert breaker.before_call() is BreakerEvent.PROBING
    breaker.on_neutral(True)  # e.g. rate-limited: proves nothing
    assert breaker.before_call() is BreakerEvent.PROBING
    assert breaker.on_failure() is BreakerEvent.OPENED
    assert breaker.state is BreakerState.OPEN
    clock.now += 5.0
    assert state_of(breaker) is BreakerState.HALF_OPEN


@dataclass
class _Run:
    """A driven breaker's surroundings: fake time, the calls it admitted and not yet answered, failure history."""

    clock: FakeMonotonic = field(default_factory=FakeMonotonic)
    in_flight: list[bool] = field(default_factory=list)  # per admitted call: was it handed out as the probe
    failures_since_success: int = 0
    last_opened_at: float | None = None


THRESHOLD, COOLDOWN, PROBE_WAIT = 3, 5.0, 2.0
OPS = st.lists(st.one_of(
    st.tuples(st.just("advance"), st.floats(0.0, 2 * COOLDOWN)),
    st.tuples(st.sampled_from(["call", "success", "failure", "neutral"]), st.integers(0, 5)),
), max_size=80)


@settings(max_examples=400, deadline=None)
@given(OPS)
def test_whatever_the_answers_and_their_timing_the_breaker_keeps_its_contract(
        ops: list[tuple[str, float | int]]) -> None:
    """Admits only when closed or for one probe per cooldown; refuses with a positive wait; reports exactly
    its transitions (which the client logs and counts), on fake time."""
    run = _Run()
    breaker = CircuitBreaker("/x", THRESHOLD, COOLDOWN, run.clock, probe_wait_s=PROBE_WAIT)
    for op, arg in ops:
        before, probe_out = breaker.state, breaker.probe_out
        if op == "advance":
            run.clock.now += float(arg)
            continue
        if op == "call":
            try:
                event = breaker.before_call()
            except CircuitOpenError as refused:
                assert before is not BreakerState.CLOSED
                assert refused.retry_after_s >= CircuitBreaker.MIN_RETRY_S
                assert refused.probing is (before is BreakerState.HALF_OPEN) and (refused.probing is probe_out)
                assert refused.retry_after_s == PROBE_WAIT if refused.probing else refused.retry_after_s <= COOLDOWN
                continue
            # Admitted: while closed as a plain call, otherwise only as the one probe, a cooldown after opening.
            assert event is (None if before is BreakerState.CLOSED else BreakerEvent.PROBING)
            if event is BreakerEvent.PROBING:
                assert not probe_out and breaker.probe_out
                assert run.last_opened_at is not None and run.clock.now - run.last_opened_at >= COOLDOWN
            run.in_flight.append(event is BreakerEvent.PROBING)
            continue
        if not run.in_flight:
            continue
        was_probe = run.in_flight.pop(int(arg) % len(run.in_flight))
        if op == "success":
            event = breaker.on_success()
            assert event is (None if before is BreakerState.CLOSED else BreakerEvent.CLOSED)
            assert breaker.state is BreakerState.CLOSED and breaker.consecutive_failures == 0
            run.failures_since_success = 0
        elif op == "failure":
            run.failures_since_success += 1
            event = breaker.on_failure(f"failure {run.failures_since_success}")
            # A failure while the probe is out decides the probe (reopens); else the threshold opens it.
            opens = probe_out or (before is BreakerState.CLOSED and run.failures_since_success >= THRESHOLD)
            assert event is (BreakerEvent.OPENED if opens else None)
            assert breaker.consecutive_failures == run.failures_since_success
            assert breaker.last_failure == f"failure {run.failures_since_success}"
            if event is BreakerEvent.OPENED:
                run.last_opened_at = run.clock.now
                assert breaker.state is BreakerState.OPEN
            assert not breaker.probe_out
        else:
            breaker.on_neutral(was_probe)
            assert breaker.state is before and breaker.probe_out is (probe_out and not was_probe)
