"""The keepalive watchdog on fake time: when it pings, when it gives up, and that our own backlog never counts."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from ingest.core.keepalive import Keepalive, KeepaliveAction

KEEPALIVE, PONG_TIMEOUT = 25.0, 5.0


def drive(ka: Keepalive, until: float, arrivals: list[float], backlog: set[int] | None = None,
          answer_pings: bool = False) -> list[tuple[float, KeepaliveAction]]:
    """Run the watchdog the way the connection does: sleep to its next deadline (or the next arrival), tick."""
    now, pending = ka.last_rx, sorted(arrivals)
    acted: list[tuple[float, KeepaliveAction]] = []
    step = 0
    while now < until:
        deadline = ka.next_deadline()
        if pending and pending[0] < deadline:
            now = pending.pop(0)
            ka.last_rx = now  # the reader stamps every frame; the watchdog is not woken for it
            continue
        now = deadline
        step += 1
        action = ka.tick(now, backlogged=backlog is not None and step in backlog)
        if action is KeepaliveAction.ABORT:
            acted.append((now, action))
            return acted
        if action is KeepaliveAction.PING:
            acted.append((now, action))
            ka.pinged(now)
            if answer_pings:
                pending = sorted([*pending, now + 0.1])  # the pong
    return acted


def test_a_silent_peer_is_pinged_after_keepalive_s_and_given_up_pong_timeout_s_later() -> None:
    ka = Keepalive(KEEPALIVE, PONG_TIMEOUT, now=100.0)
    assert drive(ka, 1000.0, []) == [(125.0, KeepaliveAction.PING), (130.0, KeepaliveAction.ABORT)]


def test_a_peer_that_answers_every_ping_is_pinged_forever_and_never_given_up() -> None:
    ka = Keepalive(KEEPALIVE, PONG_TIMEOUT, now=0.0)
    acted = drive(ka, 1000.0, [], answer_pings=True)
    assert acted and all(a is KeepaliveAction.PING for _, a in acted)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.floats(0.0, 500.0), max_size=40), st.booleans())
def test_nothing_happens_while_frames_arrive_more_often_than_keepalive_s(gaps: list[float], answer: bool) -> None:
    ka = Keepalive(KEEPALIVE, PONG_TIMEOUT, now=0.0)
    arrivals, t = [], 0.0
    for g in gaps:
        t += min(g, KEEPALIVE * 0.99)
        arrivals.append(t)
    assert drive(ka, t, arrivals, answer_pings=answer) == []


@settings(max_examples=300, deadline=None)
@given(st.lists(st.floats(0.0, 100.0), max_size=30), st.booleans())
def test_a_ping_comes_only_after_keepalive_s_of_silence_and_an_abort_only_after_an_unanswered_one(
        arrivals: list[float], answer: bool) -> None:
    ka = Keepalive(KEEPALIVE, PONG_TIMEOUT, now=0.0)
    acted = drive(ka, 200.0, arrivals, answer_pings=answer)
    rx = [0.0, *sorted(arrivals)]
    for when, action in acted:
        last = max(t for t in rx if t < when)  # at equal times the driver ticks first
        if action is KeepaliveAction.PING:
            assert when >= last + KEEPALIVE
        else:
            pinged = max(w for w, a in acted if a is KeepaliveAction.PING and w < when)
            assert last < pinged and when >= pinged + PONG_TIMEOUT and not answer
    if not answer and (not arrivals or max(arrivals) < 200.0 - KEEPALIVE - PONG_TIMEOUT - 1):
        assert acted and acted[-1][1] is KeepaliveAction.ABORT  # silence is always found out


@settings(max_examples=100, deadline=None)
@given(st.integers(1, 50))
def test_our_own_backlog_is_never_taken_for_the_peers_silence(ticks: int) -> None:
    # The socket is paused (or a message waits for the pipeline) for `ticks` wake-ups, then the peer is silent.
    acted = drive(Keepalive(KEEPALIVE, PONG_TIMEOUT, now=0.0), 10_000.0, [], backlog=set(range(1, ticks + 1)))
    backlog_ends = KEEPALIVE * ticks
    assert acted == [(backlog_ends + KEEPALIVE, KeepaliveAction.PING),
                     (backlog_ends + KEEPALIVE + PONG_TIMEOUT, KeepaliveAction.ABORT)]
