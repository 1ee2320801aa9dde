"""What a REST answer means, decided without a network: retried within the attempts, raised with the right
error, the breaker told the truth, and the key blamed only for what is the key's fault."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ingest.core.rest_policy import (
    CODE_MALFORMED,
    AnswerKind,
    BreakerNote,
    ErrorKind,
    Verdict,
    classify,
    decide_answer,
    decide_failure,
    parse_envelope,
)

MAX = 4


def drive(kinds: list[AnswerKind], *, idempotent: bool, signed: bool, can_resync: bool) -> list[Verdict]:
    """Feed one answer per attempt the way the client does, until the decision is not to try again."""
    verdicts: list[Verdict] = []
    resynced = False
    for attempt, kind in enumerate(kinds, start=1):
        d = decide_answer(kind, attempt=attempt, max_attempts=MAX, idempotent=idempotent, signed=signed,
                          window_s=2.0, can_resync=can_resync and not resynced)
        verdicts.append(d.verdict)
        if d.verdict is Verdict.RESYNC:
            resynced = True
        if d.verdict in (Verdict.RETURN, Verdict.RAISE):
            break
    return verdicts


@pytest.mark.parametrize(("status", "body", "kind"), [
    (200, b'{"code":"0","msg":"","data":[]}', AnswerKind.OK),
    (200, b'{"code":"50011","msg":"Rate limit reached","data":[]}', AnswerKind.SLOW_DOWN),  # 50011 as HTTP 200
    (429, b'{"code":"50011","msg":"Too Many Requests"}', AnswerKind.SLOW_DOWN),
    (503, b"<html>503 Service Unavailable</html>", AnswerKind.SERVER),
    (401, b'{"code":"50102","msg":"Timestamp request expired"}', AnswerKind.CLOCK),
    (401, b'{"code":"50101","msg":"APIKey does not match current environment."}', AnswerKind.ENV),
    (401, b'{"code":"50113","msg":"Invalid Sign"}', AnswerKind.AUTH),
    (200, b'{"code":"51000","msg":"Parameter instId error","data":[]}', AnswerKind.FATAL),
])
def test_an_answer_is_judged_by_its_code_first(status: int, body: bytes, kind: AnswerKind) -> None:
    assert classify(status, parse_envelope(status, body)) is kind


@given(kinds=st.lists(st.sampled_from(list(AnswerKind)), min_size=1, max_size=12), idempotent=st.booleans(),
       signed=st.booleans(), can_resync=st.booleans())
def test_whatever_okx_answers_a_request_ends_within_its_attempts_and_resyncs_at_most_once(
        kinds: list[AnswerKind], idempotent: bool, signed: bool, can_resync: bool) -> None:
    verdicts = drive(kinds, idempotent=idempotent, signed=signed, can_resync=can_resync)
    assert verdicts.count(Verdict.RETRY) <= MAX - 1
    assert verdicts.count(Verdict.RESYNC) <= 1
    assert Verdict.RETURN not in verdicts[:-1] and Verdict.RAISE not in verdicts[:-1]


@given(kind=st.sampled_from(list(AnswerKind)), attempt=st.integers(1, MAX), signed=st.booleans(),
       can_resync=st.booleans())
def test_a_post_is_never_sent_twice_after_okx_may_have_acted_on_it(
        kind: AnswerKind, attempt: int, signed: bool, can_resync: bool) -> None:
    d = decide_answer(kind, attempt=attempt, max_attempts=MAX, idempotent=False, signed=signed, window_s=2.0,
                      can_resync=can_resync)
    if kind is AnswerKind.SERVER:
        assert d.verdict is Verdict.RAISE and d.retriable


@given(kind=st.sampled_from(list(AnswerKind)), attempt=st.integers(1, MAX), idempotent=st.booleans(),
       signed=st.booleans(), can_resync=st.booleans())
def test_the_breaker_and_the_key_are_blamed_only_for_what_is_theirs(
        kind: AnswerKind, attempt: int, idempotent: bool, signed: bool, can_resync: bool) -> None:
    d = decide_answer(kind, attempt=attempt, max_attempts=MAX, idempotent=idempotent, signed=signed, window_s=2.0,
                      can_resync=can_resync)
    assert (d.breaker is BreakerNote.FAILURE) == (kind is AnswerKind.SERVER)
    assert (d.breaker is BreakerNote.NEUTRAL) == (kind is AnswerKind.SLOW_DOWN)
    assert d.blames_key == (signed and kind in (AnswerKind.ENV, AnswerKind.AUTH))  # never for a clock refusal
    assert d.hold_budget == (kind is AnswerKind.SLOW_DOWN)


def test_a_slow_down_pauses_past_the_window_and_the_last_one_raises_a_retriable_error() -> None:
    d = decide_answer(AnswerKind.SLOW_DOWN, attempt=1, max_attempts=MAX, idempotent=True, signed=False,
                      window_s=2.0, can_resync=False)
    assert (d.verdict, d.pause_s, d.backoff) == (Verdict.RETRY, 2.0, True)
    last = decide_answer(AnswerKind.SLOW_DOWN, attempt=MAX, max_attempts=MAX, idempotent=True, signed=False,
                         window_s=2.0, can_resync=False)
    assert (last.verdict, last.error, last.retriable) == (Verdict.RAISE, ErrorKind.API, True)


def test_a_clock_refusal_resyncs_once_then_raises_the_clock_error() -> None:
    first = decide_answer(AnswerKind.CLOCK, attempt=1, max_attempts=MAX, idempotent=True, signed=True,
                          window_s=2.0, can_resync=True)
    again = decide_answer(AnswerKind.CLOCK, attempt=1, max_attempts=MAX, idempotent=True, signed=True,
                          window_s=2.0, can_resync=False)
    assert first.verdict is Verdict.RESYNC
    assert (again.verdict, again.error, again.blames_key) == (Verdict.RAISE, ErrorKind.CLOCK, False)


@pytest.mark.parametrize(("pinned", "connect_failed", "idempotent", "attempt", "verdict", "error"), [
    (True, False, True, 1, Verdict.RAISE, ErrorKind.PIN),  # a pin failure is never retried
    (False, False, True, 1, Verdict.RETRY, None),
    (False, False, True, MAX, Verdict.RAISE, ErrorKind.TRANSPORT),
    (False, False, False, 1, Verdict.RAISE, ErrorKind.TRANSPORT),  # a POST that may have arrived: not resent
    (False, True, False, 1, Verdict.RETRY, None),  # never connected: safe to send again
])
def test_no_answer_is_retried_only_when_repeating_is_safe(pinned: bool, connect_failed: bool, idempotent: bool,
                                                         attempt: int, verdict: Verdict,
                                                         error: ErrorKind | None) -> None:
    d = decide_failure(pinned=pinned, connect_failed=connect_failed, attempt=attempt, max_attempts=MAX,
                       idempotent=idempotent)
    assert (d.verdict, d.error) == (verdict, error)
    assert d.breaker is (BreakerNote.NEUTRAL if pinned else BreakerNote.FAILURE)


# ---------------------------------------------------------------------------------------- the envelope


def test_success_envelope_gives_the_rows() -> None:
    env = parse_envelope(200, b'{"code":"0","msg":"","data":[{"ts":"1597026383085"}]}')
    assert (env.code, env.data) == ("0", [{"ts": "1597026383085"}])


def test_auth_failure_without_data_is_read() -> None:
    env = parse_envelope(401, b'{"msg":"Invalid OK-ACCESS-KEY","code":"50111"}')
    assert (env.code, env.msg, env.data) == ("50111", "Invalid OK-ACCESS-KEY", None)


def test_unknown_path_404_with_numeric_code_is_read() -> None:
    body = b'{"code":404,"data":{},"detailMsg":"","error_code":"404","error_message":"Not Found","msg":"Not Found"}'
    env = parse_envelope(404, body)
    assert (env.code, env.msg, env.data) == ("404", "Not Found", None)


def test_rate_limit_comes_as_200_and_as_429() -> None:
    assert parse_envelope(200, b'{"msg":"Rate limit reached. Please refer to API documentation and throttle '
                               b'requests accordingly","code":"50011","data":[]}').code == "50011"
    assert parse_envelope(429, b'{"msg":"Too Many Requests","code":"50011"}').code == "50011"


def test_non_json_and_odd_bodies_never_raise() -> None:
    env = parse_envelope(502, b"<html><body>502 Bad Gateway</body></html>")
    assert env.code == "http-502" and "Bad Gateway" in env.msg and env.data is None
    assert parse_envelope(200, b"[1,2]").code == "http-200"
    assert parse_envelope(200, b"").code == "http-200"
    assert parse_envelope(200, b'{"code":"0","msg":""}').code == CODE_MALFORMED
    assert parse_envelope(200, b'{"code":true,"data":[]}').code == CODE_MALFORMED
    assert parse_envelope(503, b'{"msg":"x"}').code == "http-503"
