"""The backfill's retry rule (issue: transient REST failures finalized gaps as `unfillable`).

Only a definitive answer from OKX decides a gap. A breaker (open, or its probe in flight), 429/50011, 5xx, a
timeout or a transport error costs a try only after a real wait that grows, and a gap that failed only
transiently stays open. These tests drive the real GapFiller with a REST stand-in that fails in every
transient way, in any order, and check the rule for every sequence; the breaker's own wait is tested too.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping
from dataclasses import dataclass, field

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ingest.config import BackfillSettings
from ingest.core.avro import RecordEncoder
from ingest.core.backfill import Outcome, judge, plan_jobs, retry_delay
from ingest.core.backoff import equal_jitter
from ingest.core.clock import ServerClock
from ingest.core.records import GapEvent, GapKind, GapStatus, StreamPosition
from ingest.core.rest_limits import BreakerEvent, CircuitBreaker, CircuitOpenError
from ingest.errors import CredentialError, IngestError, OkxApiError
from ingest.io.rest import RestTransportError
from ingest.io.sink import EncodedRecord
from ingest.services.backfill import GapFiller, _Counters

NOW = 1_790_000_000_000
LO, HI = 1000, 1011  # the gap: tradeIds 1001..1010
LOG = [(tid, NOW - 60_000 + tid) for tid in range(900, 1100)]


class FakeMonotonic:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def transient(kind: str) -> IngestError:
    """One transient failure as the REST client raises it after its own retries."""
    if kind == "breaker_open":
        return CircuitOpenError("/api/v5/market/history-trades", 5, 30.0, "HTTP 503")
    if kind == "breaker_probing":  # the probe is out: before the fix its wait was 0 s
        breaker = CircuitBreaker("/api/v5/market/history-trades", 1, 0.5, FakeMonotonic(), probe_wait_s=0.2)
        breaker.before_call()
        breaker.on_failure("HTTP 503")
        breaker._monotonic.now += 0.5  # type: ignore[attr-defined]
        assert breaker.before_call() is BreakerEvent.PROBING
        with pytest.raises(CircuitOpenError) as info:
            breaker.before_call()
        return info.value
    if kind == "rate_limited":
        return OkxApiError("50011", "Too Many Requests", http_status=429, retriable=True)
    if kind == "server":
        return OkxApiError("50001", "Service temporarily unavailable", http_status=503, retriable=True)
    if kind == "timeout":
        return RestTransportError("no answer from OKX: ReadTimeout")
    if kind == "auth_paused":
        err = CredentialError("signed requests paused after authentication failures")
        err.retriable = True
        return err
    raise AssertionError(kind)


KINDS = ["breaker_open", "breaker_probing", "rate_limited", "server", "timeout", "auth_paused"]


@dataclass
class FlakyRest:
    """history-trades as SPEC 8.3 pages it, failing with `failures` (one per request) before answering."""

    failures: list[str]
    clock: ServerClock = field(default_factory=lambda: ServerClock(lambda: NOW))
    credentials: None = None
    calls: int = 0

    async def get(self, path: str, params: Mapping[str, str]) -> list[dict[str, object]]:
        self.calls += 1
        if self.failures:
            raise transient(self.failures.pop(0))
        after, limit = int(params["after"]), int(params["limit"])
        rows = sorted((r for r in LOG if r[0] < after), reverse=True)[:limit]
        return [{"instId": "BTC-USDT", "tradeId": str(t), "px": "1", "sz": "1", "side": "buy", "ts": str(ts)}
                for t, ts in rows]


class Outlet:
    def __init__(self) -> None:
        self.records: list[EncodedRecord] = []

    async def put(self, record: EncodedRecord) -> None:
        self.records.append(record)


def the_gap(attempts: int = 0) -> GapEvent:
    t = NOW * 1_000_000
    return GapEvent(gap_id="g", kind=GapKind.TRADE_HOLE, status=GapStatus.OPEN, reason="test", channel="trades-all",
                    inst_id="BTC-USDT", before=StreamPosition(ts=NOW - 60_000 + LO, trade_id=LO),
                    after=StreamPosition(ts=NOW - 60_000 + HI, trade_id=HI), opened_ts_ns=t, detected_ts_ns=t,
                    attempts=attempts)


async def run(failures: list[str], max_attempts: int, tried: int = 0) -> tuple[Outcome, list[float], Outlet]:
    sleeps: list[float] = []

    async def sleep(delay: float) -> None:
        sleeps.append(delay)

    outlet = Outlet()
    filler = GapFiller(FlakyRest(list(failures)), outlet, RecordEncoder(), None,  # type: ignore[arg-type]
                       BackfillSettings(gap_max_attempts=max_attempts, retry_initial_s=0.25, gap_retry_max_s=60.0),
                       _Counters(), sleep=sleep)
    [job] = plan_jobs([(0, the_gap(tried))], NOW).jobs
    result = (await filler.fill(job.stream, [job], tried=tried))[0]
    return result.outcome, sleeps, outlet


@settings(max_examples=200, deadline=None)
@given(failures=st.lists(st.sampled_from(KINDS), max_size=12), max_attempts=st.integers(1, 6),
       tried=st.integers(0, 8))
async def test_transient_failures_never_decide_a_gap_and_every_try_waits_a_real_growing_time(
    failures: list[str], max_attempts: int, tried: int
) -> None:
    outcome, sleeps, outlet = await run(failures, max_attempts, tried)
    assert outcome.status is not GapStatus.UNFILLABLE and outcome.status is not GapStatus.PARTIAL
    if len(failures) < max_attempts:  # REST answered within the tries: filled, every id once
        assert outcome.status is GapStatus.FILLED and len(outlet.records) == HI - LO - 1
        assert len(sleeps) == len(failures)
    else:  # only transient failures: still open, to be taken up again later
        assert outcome.status is GapStatus.OPEN and "retried later" in outcome.note
        assert len(sleeps) == max_attempts - 1
    floors = [min(60.0, 0.25 * 2 ** (tried + n)) / 2 for n in range(len(sleeps))]
    for n, (delay, floor) in enumerate(zip(sleeps, floors, strict=True)):
        assert delay >= floor > 0, f"try {n + 1} waited {delay} s"
        kind = failures[n]
        if kind == "breaker_open":
            assert delay >= min(60.0, 30.0)  # at least the breaker's own cooldown
        if kind == "breaker_probing":
            assert delay >= 0.2  # at least the time the probe may take to decide


async def test_a_breaker_storm_leaves_the_gap_open_and_a_later_pass_fills_it() -> None:
    """The reported case: a 5xx storm opens the breaker; every gap waiting on it used to be committed
    unfillable within milliseconds. Now it stays open, and the next pass (later, waits longer) fills it."""
    first, sleeps, _ = await run(["server", "breaker_open", "breaker_probing", "breaker_probing", "breaker_open"], 5)
    assert first.status is GapStatus.OPEN and sum(sleeps) >= 30.0
    later, later_sleeps, outlet = await run([], 5, tried=5)
    assert later.status is GapStatus.FILLED and len(outlet.records) == HI - LO - 1 and later_sleeps == []


def test_only_a_definitive_answer_makes_a_gap_unfillable_or_partial() -> None:
    for found in (0, 3):
        for published in range(found + 1):
            assert judge(covered=False, found=found, published=published, shortfall="503",
                         transient=True).status is GapStatus.OPEN
    assert judge(covered=False, found=0, published=0, shortfall="history ends").status is GapStatus.UNFILLABLE
    assert judge(covered=False, found=2, published=2, shortfall="history ends").status is GapStatus.PARTIAL
    assert judge(covered=True, found=2, published=2, shortfall="", transient=True).status is GapStatus.FILLED


@settings(max_examples=200, deadline=None)
@given(initial=st.floats(0.001, 5), cap=st.floats(5, 120), skip=st.integers(0, 100),
       rand=st.floats(0, 1), retry_after=st.one_of(st.none(), st.floats(0, 200)))
def test_retry_delays_are_never_zero_grow_and_honour_the_breakers_wait(
    initial: float, cap: float, skip: int, rand: float, retry_after: float | None
) -> None:
    delays = equal_jitter(initial, cap, rand=lambda: rand, skip=skip)
    seq = [next(delays) for _ in range(8)]
    assert all(d >= min(cap, initial * 2 ** skip) / 2 > 0 for d in seq)
    assert all(b >= a / 2 for a, b in itertools.pairwise(seq))  # floors only grow
    d = retry_delay(seq[0], retry_after, cap)
    assert 0 < d <= cap and d >= min(cap, retry_after or 0.0)


def test_a_breaker_whose_probe_is_in_flight_asks_callers_to_wait() -> None:
    clock = FakeMonotonic()
    breaker = CircuitBreaker("/x", failures=1, cooldown_s=5.0, monotonic=clock, probe_wait_s=2.0)
    breaker.before_call()
    breaker.on_failure("HTTP 503")
    clock.now += 5.0
    assert breaker.before_call() is BreakerEvent.PROBING  # the probe
    with pytest.raises(CircuitOpenError, match="probe request is deciding") as info:
        breaker.before_call()
    assert info.value.probing and info.value.retry_after_s == 2.0
    clock.now += 4.999999  # the end of a cooldown a few microseconds away is not "0 s"
    breaker.on_failure("HTTP 503")
    clock.now += 4.999999
    with pytest.raises(CircuitOpenError) as again:
        breaker.before_call()
    assert again.value.retry_after_s >= CircuitBreaker.MIN_RETRY_S
