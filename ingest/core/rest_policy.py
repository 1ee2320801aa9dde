"""What one OKX REST answer means, sans-I/O: the envelope read defensively, then return, retry or raise.

`ingest.io.rest.OkxRestClient.request` sends, waits and sleeps; the decision it carries out comes from
here: `decide_answer` for an answer OKX gave (judged by the body's `code`, not the HTTP status: 50011
comes as 200 and as 429), `decide_failure` for no answer at all. Each decision also says what the
endpoint's circuit breaker (`core/rest_limits.CircuitBreaker`) should learn from it and whether the key is to
blame.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

import orjson

from ingest.okx import codes

CODE_TRANSPORT = "transport"
CODE_TIMEOUT = "timeout"
CODE_MALFORMED = "malformed"

#: Codes that mean "this key (or its use) is rejected": counted by the store's auth-failure guard.
AUTH_FAILURE_CODES: frozenset[str] = frozenset(
    {"50100", codes.ENV_MISMATCH, "50103", "50104", "50105", "50106", "50107", "50110", codes.INVALID_ACCESS_KEY,
     codes.INVALID_ACCESS_TIMESTAMP, codes.INVALID_SIGNATURE, "50114", "50119", codes.REST_TIMESTAMP_EXPIRED}
)
#: The endpoint is unwell: retry with backoff and count towards its breaker.
SERVER_FAILURE_CODES: frozenset[str] = frozenset(
    {codes.SERVICE_UNAVAILABLE, "50004", codes.SYSTEM_BUSY, codes.SYSTEM_ERROR}
)
#: OKX asks us to slow down: retry after the window, without blaming the endpoint.
SLOW_DOWN_CODES: frozenset[str] = frozenset({codes.RATE_LIMITED, codes.TOO_FREQUENT})


@dataclass(frozen=True, slots=True)
class Envelope:
    """OKX's response envelope as far as it could be read."""

    code: str
    msg: str
    data: list[object] | None


def parse_envelope(http_status: int, body: bytes) -> Envelope:
    """Read `{"code","msg","data"}` without trusting its shape (SPEC 8.2).

    `code` becomes a string (the 404 shape has a number); a body that is not a JSON object gets the code
    `http-<status>` and the start of the body as its message.
    """
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError:
        doc = None
    if not isinstance(doc, dict):
        snippet = body[:200].decode("utf-8", "replace").strip()
        return Envelope(f"http-{http_status}", f"not an OKX JSON envelope: {snippet!r}", None)
    raw_code = doc.get("code", doc.get("error_code"))
    if isinstance(raw_code, bool) or not isinstance(raw_code, str | int):
        code = CODE_MALFORMED if http_status < 300 else f"http-{http_status}"
    else:
        code = str(raw_code)
    msg = doc.get("msg") or doc.get("error_message") or ""
    msg = msg if isinstance(msg, str) else str(msg)
    data = doc.get("data")
    if not isinstance(data, list):
        if code == "0":
            return Envelope(CODE_MALFORMED, f"code 0 without a data array: {body[:200]!r}", None)
        data = None
    return Envelope(code, msg, data)


class AnswerKind(enum.Enum):
    """What kind of answer OKX gave."""

    OK = enum.auto()
    SLOW_DOWN = enum.auto()
    SERVER = enum.auto()
    CLOCK = enum.auto()
    ENV = enum.auto()
    AUTH = enum.auto()
    FATAL = enum.auto()


def classify(http_status: int, env: Envelope) -> AnswerKind:
    """The kind of `env`, by its code first (the HTTP status only where the code says nothing)."""
    if env.code == "0" and 200 <= http_status < 300 and env.data is not None:
        return AnswerKind.OK
    if env.code in SLOW_DOWN_CODES or (http_status == 429 and env.code not in SERVER_FAILURE_CODES):
        return AnswerKind.SLOW_DOWN
    if env.code in SERVER_FAILURE_CODES or http_status >= 500:
        return AnswerKind.SERVER
    if env.code == codes.REST_TIMESTAMP_EXPIRED:
        return AnswerKind.CLOCK
    if env.code == codes.ENV_MISMATCH:
        return AnswerKind.ENV
    if env.code in AUTH_FAILURE_CODES:
        return AnswerKind.AUTH
    return AnswerKind.FATAL


class Verdict(enum.Enum):
    """What the client does next."""

    RETURN = "return"  # the answer is the result
    RETRY = "retry"  # after `pause_s` (+ a backoff step when `backoff`)
    RESYNC = "resync"  # resync the clock, then retry at once (once per request)
    RAISE = "raise"  # `error` says which error


class BreakerNote(enum.Enum):
    """What the endpoint's circuit breaker learns from the attempt."""

    SUCCESS = "success"  # the endpoint answered, whatever it thinks of us
    FAILURE = "failure"  # the endpoint is unwell
    NEUTRAL = "neutral"  # says nothing about the endpoint (OKX's rate limit, a pinned TLS key)


class ErrorKind(enum.Enum):
    """Which error a RAISE means."""

    API = "api"  # OkxApiError (`retriable` says whether later may help)
    ENVIRONMENT = "environment"  # a key of the other environment (demo vs live)
    CLOCK = "clock"  # timestamp refused even after a resync
    TRANSPORT = "transport"  # no answer after the allowed attempts
    PIN = "pin"  # the TLS public key pin failed: never retried


@dataclass(frozen=True, slots=True)
class Decision:
    verdict: Verdict
    breaker: BreakerNote
    #: RETRY: wait this long (plus one backoff step when `backoff`); SLOW_DOWN also holds the budget this long.
    pause_s: float = 0.0
    backoff: bool = False
    hold_budget: bool = False
    error: ErrorKind | None = None
    retriable: bool = False
    #: The answer blames the key (counted by the credential store's auth-failure guard).
    blames_key: bool = False
    #: The key's use succeeded (resets the guard).
    key_ok: bool = False


def decide_answer(kind: AnswerKind, *, attempt: int, max_attempts: int, idempotent: bool, signed: bool,
                  window_s: float, can_resync: bool) -> Decision:
    """What an answer of `kind` at attempt `attempt` (from 1) means.

    `window_s`: the endpoint's rate-limit window (a SLOW_DOWN pauses past it); `can_resync`: a clock resync
    is available and was not tried yet for this request.
    """
    last = attempt >= max_attempts
    if kind is AnswerKind.OK:
        return Decision(Verdict.RETURN, BreakerNote.SUCCESS, key_ok=signed)
    if kind is AnswerKind.SLOW_DOWN:
        # OKX counts more than we do (another process on this IP or key): pause the whole budget past the
        # window in which the refusal was counted, then retry with jitter on top.
        if last:
            return Decision(Verdict.RAISE, BreakerNote.NEUTRAL, hold_budget=True, pause_s=window_s,
                            error=ErrorKind.API, retriable=True)
        return Decision(Verdict.RETRY, BreakerNote.NEUTRAL, pause_s=window_s, backoff=True, hold_budget=True)
    if kind is AnswerKind.SERVER:
        if not idempotent or last:
            return Decision(Verdict.RAISE, BreakerNote.FAILURE, error=ErrorKind.API, retriable=True)
        return Decision(Verdict.RETRY, BreakerNote.FAILURE, backoff=True)
    # The endpoint answered: it is healthy, whatever it thinks of us.
    if kind is AnswerKind.CLOCK and can_resync:
        return Decision(Verdict.RESYNC, BreakerNote.SUCCESS)
    # A timestamp refusal (50102) is the clock's fault, not the key's: never counted against the key.
    blames = signed and kind in (AnswerKind.ENV, AnswerKind.AUTH)
    error = {AnswerKind.ENV: ErrorKind.ENVIRONMENT, AnswerKind.CLOCK: ErrorKind.CLOCK}.get(kind, ErrorKind.API)
    return Decision(Verdict.RAISE, BreakerNote.SUCCESS, error=error, blames_key=blames)


def decide_failure(*, pinned: bool, connect_failed: bool, attempt: int, max_attempts: int,
                   idempotent: bool) -> Decision:
    """No answer at all: a TLS pin failure is final; otherwise retry what is safe to repeat.

    `connect_failed`: the request never reached OKX (connect error or connect timeout), so even a POST may
    be sent again.
    """
    if pinned:
        return Decision(Verdict.RAISE, BreakerNote.NEUTRAL, error=ErrorKind.PIN)
    if not (idempotent or connect_failed) or attempt >= max_attempts:
        return Decision(Verdict.RAISE, BreakerNote.FAILURE, error=ErrorKind.TRANSPORT, retriable=True)
    return Decision(Verdict.RETRY, BreakerNote.FAILURE, backoff=True)
