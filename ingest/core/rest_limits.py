"""What the REST client may send, sans-I/O: OKX's per-endpoint limits and the per-endpoint circuit breaker.

`ingest.io.rest` admits, sends and sleeps; the numbers it obeys and the breaker's state machine live here.
`LimitTable` is OKX's documented table (SPEC 8.3), shared between processes or scaled for tests.
`CircuitBreaker` reads an injected monotonic clock and never logs: each call returns the transition it made
(`BreakerEvent`), and the client logs and counts those, so the policy can be driven on fake time.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import ClassVar

from ingest.errors import IngestError

TIME_PATH = "/api/v5/public/time"
ACCOUNT_CONFIG_PATH = "/api/v5/account/config"
PUBLIC_PREFIXES = ("/api/v5/public/", "/api/v5/market/")


# --------------------------------------------------------------------------------------------- limits


class Scope(enum.StrEnum):
    """Whose budget a limit is: OKX counts public endpoints per IP (some per IP and instType), private per user."""

    IP = "ip"
    IP_INST_TYPE = "ip+instType"
    USER = "user"


@dataclass(frozen=True, slots=True)
class EndpointLimit:
    """At most `limit` requests per `window_s` seconds, counted per `scope`."""

    limit: int
    window_s: float
    scope: Scope

    @property
    def private(self) -> bool:
        return self.scope is Scope.USER


#: SPEC 8.3, OKX's documented REST limits ([EN] 2025, unchanged in [ZH] 2026).
OKX_LIMITS: Mapping[str, EndpointLimit] = {
    TIME_PATH: EndpointLimit(10, 2.0, Scope.IP),
    "/api/v5/public/instruments": EndpointLimit(20, 2.0, Scope.IP_INST_TYPE),
    "/api/v5/market/trades": EndpointLimit(100, 2.0, Scope.IP),
    "/api/v5/market/history-trades": EndpointLimit(20, 2.0, Scope.IP),
    "/api/v5/market/candles": EndpointLimit(40, 2.0, Scope.IP),
    "/api/v5/market/history-candles": EndpointLimit(20, 2.0, Scope.IP),
    "/api/v5/market/books": EndpointLimit(40, 2.0, Scope.IP),
    "/api/v5/market/books-full": EndpointLimit(10, 2.0, Scope.IP),
    # OKX counts it per IP and instId; counted per IP here, which never exceeds that.
    "/api/v5/public/funding-rate-history": EndpointLimit(10, 2.0, Scope.IP),
    "/api/v5/trade/fills": EndpointLimit(60, 2.0, Scope.USER),
    "/api/v5/trade/fills-history": EndpointLimit(10, 2.0, Scope.USER),
    "/api/v5/trade/orders-history": EndpointLimit(40, 2.0, Scope.USER),
    "/api/v5/trade/orders-pending": EndpointLimit(60, 2.0, Scope.USER),
    "/api/v5/trade/orders-history-archive": EndpointLimit(20, 2.0, Scope.USER),
    "/api/v5/account/balance": EndpointLimit(10, 2.0, Scope.USER),
    "/api/v5/account/positions": EndpointLimit(10, 2.0, Scope.USER),
    ACCOUNT_CONFIG_PATH: EndpointLimit(5, 2.0, Scope.USER),
}
#: For endpoints missing from the table: the smallest documented limit, so an unknown one is never overrun.
UNKNOWN_LIMIT = EndpointLimit(5, 2.0, Scope.IP)


class LimitTable:
    """The limits this process obeys: OKX's table, optionally shared with other processes or scaled for tests.

    `share` (okx.rest_limit_share) gives this process a fraction of each limit, for several daemons behind
    one IP or one API key. `window_scale` lengthens (or, against the simulator, shortens) every window.
    """

    def __init__(
        self,
        limits: Mapping[str, EndpointLimit] = OKX_LIMITS,
        *,
        share: float = 1.0,
        window_scale: float = 1.0,
    ) -> None:
        if not 0 < share <= 1 or window_scale <= 0:
            raise ValueError(f"share must be in (0, 1] and window_scale > 0, got {share}, {window_scale}")
        self._limits = dict(limits)
        self.share = share
        self.window_scale = window_scale

    def _adjust(self, base: EndpointLimit) -> EndpointLimit:
        return EndpointLimit(max(1, int(base.limit * self.share)), base.window_s * self.window_scale, base.scope)

    def lookup(self, path: str) -> EndpointLimit:
        """The limit of `path`; unknown paths get the smallest documented one, scoped by their prefix."""
        base = self._limits.get(path)
        if base is None:
            scope = Scope.IP if path.startswith(PUBLIC_PREFIXES) else Scope.USER
            base = EndpointLimit(UNKNOWN_LIMIT.limit, UNKNOWN_LIMIT.window_s, scope)
        return self._adjust(base)

    def known(self, path: str) -> bool:
        return path in self._limits

    def items(self) -> list[tuple[str, EndpointLimit]]:
        return [(p, self._adjust(lim)) for p, lim in sorted(self._limits.items())]


# -------------------------------------------------------------------------------------------- breaker


class BreakerState(enum.StrEnum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


class BreakerEvent(enum.Enum):
    """A transition the breaker made, for the caller to log and count (the breaker itself does no I/O)."""

    PROBING = "probing"  # half-open: this call is the one probe
    OPENED = "opened"  # consecutive failures reached the threshold, or the probe failed
    CLOSED = "closed"  # a success after the breaker had opened


class CircuitOpenError(IngestError):
    """An endpoint failed repeatedly and is paused; retry after `retry_after_s` (or work on another endpoint)."""

    retriable = True

    def __init__(self, endpoint: str, failures: int, retry_after_s: float, last_failure: str | None = None, *,
                 probing: bool = False) -> None:
        self.endpoint = endpoint
        #: Always > 0: how long to wait before asking again (the rest of the cooldown, or while the probe is
        #: out the time it may take to decide), so no caller spins on an open breaker.
        self.retry_after_s = retry_after_s
        self.probing = probing
        cause = f" (last: {last_failure})" if last_failure else ""
        when = (f"a probe request is deciding whether it recovered; ask again in {retry_after_s:.1f} s" if probing
                else f"the next probe is allowed in {retry_after_s:.1f} s")
        super().__init__(
            f"OKX endpoint {endpoint} is paused after {failures} consecutive failures{cause}; {when}. Check the "
            "network and OKX's status page if this persists."
        )


class CircuitBreaker:
    """Closed -> open after `failures` consecutive failures -> half-open after `cooldown_s` (one probe).

    The probe's success closes the breaker; its failure opens it for another cooldown. Other callers get
    CircuitOpenError while open or while the probe is out, so a sick endpoint sees one request per cooldown.
    The error's `retry_after_s` is never 0: while the probe is out it is `probe_wait_s` (default: the
    cooldown; the client passes its request timeout when shorter, the longest a probe can take to decide).
    Every method returns the `BreakerEvent` it caused (or None), never logs.
    """

    #: The shortest wait an open breaker asks for (the end of a cooldown can be a few microseconds away).
    MIN_RETRY_S: ClassVar[float] = 0.01

    def __init__(self, endpoint: str, failures: int, cooldown_s: float, monotonic: Callable[[], float],
                 probe_wait_s: float | None = None) -> None:
        self.endpoint = endpoint
        self._threshold = failures
        self.cooldown_s = cooldown_s
        self._probe_wait = max(self.MIN_RETRY_S, min(cooldown_s, probe_wait_s) if probe_wait_s else cooldown_s)
        self._monotonic = monotonic
        self.consecutive_failures = 0
        self._opened_at: float | None = None
        self._probe_out = False
        self.last_failure: str | None = None

    @property
    def state(self) -> BreakerState:
        if self._opened_at is None:
            return BreakerState.CLOSED
        if self._monotonic() - self._opened_at >= self.cooldown_s:
            return BreakerState.HALF_OPEN
        return BreakerState.OPEN

    @property
    def probe_out(self) -> bool:
        """Whether the half-open probe has been handed out and not yet decided."""
        return self._probe_out

    def before_call(self) -> BreakerEvent | None:
        """Raise CircuitOpenError unless a call may go; PROBING when this call is the half-open probe."""
        state = self.state
        if state is BreakerState.CLOSED:
            return None
        if state is BreakerState.HALF_OPEN and not self._probe_out:
            self._probe_out = True
            return BreakerEvent.PROBING
        assert self._opened_at is not None
        if state is BreakerState.HALF_OPEN:  # the probe is out: its answer decides, not the clock
            raise CircuitOpenError(self.endpoint, self.consecutive_failures, self._probe_wait, self.last_failure,
                                   probing=True)
        remaining = max(self.MIN_RETRY_S, self._opened_at + self.cooldown_s - self._monotonic())
        raise CircuitOpenError(self.endpoint, self.consecutive_failures, remaining, self.last_failure)

    def on_success(self) -> BreakerEvent | None:
        """The endpoint answered: reset the count; CLOSED when the breaker had opened."""
        was_open = self._opened_at is not None
        self.consecutive_failures = 0
        self._opened_at = None
        self._probe_out = False
        return BreakerEvent.CLOSED if was_open else None

    def on_failure(self, what: str = "") -> BreakerEvent | None:
        """The endpoint is unwell (`what` says how); OPENED when this failure opens (or reopens) the breaker."""
        self.consecutive_failures += 1
        self.last_failure = what or self.last_failure
        was_probe, self._probe_out = self._probe_out, False
        if was_probe or (self._opened_at is None and self.consecutive_failures >= self._threshold):
            self._opened_at = self._monotonic()
            return BreakerEvent.OPENED
        return None

    def on_neutral(self, was_probe: bool) -> None:
        """The call proved nothing (rate-limited, cancelled): let the next caller probe."""
        if was_probe:
            self._probe_out = False
