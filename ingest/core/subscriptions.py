"""When to (re)subscribe each arg of one logical connection, sans-I/O: one state object per arg, time passed in.

OKX refuses a subscribe arg in three ways (`ingest.core.wsproto.ArgAction`): for good (60018, 64003: never
asked again), transiently (64007, 60014, 63999, no answer: asked again quickly a few times, then parked and
asked again far less often, never given up on), or with `channel-conn-count-error` (parked at once: other
connections may go away). Independently, the pipeline asks for resubscribes (unsubscribe + subscribe, for a
fresh book snapshot), coalesced per arg and at most one per arg per `resubscribe_min_interval_s`.

The scheduler decides what is due when; the connection (`ingest.io.ws`) sends the requests, logs, and sleeps
until `next_deadline()`. It outlives physical connections: a retry pending when a socket drops stays due on
the next one, a resubscribe pending then is dropped once the fresh subscription brings its snapshot.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable
from dataclasses import dataclass

from ingest.okx.channels import SubArg

#: A transiently refused arg, once its quick retries are spent, is retried this long later, doubling to the cap.
PARK_FIRST_S = 60.0
PARK_MAX_S = 1800.0


@dataclass(slots=True)
class ArgState:
    """Everything the scheduler knows about one arg."""

    #: Quick retries spent since the arg was last held or parked.
    attempts: int = 0
    #: When to subscribe it again (None: nothing scheduled).
    retry_at: float | None = None
    #: Times parked since the arg was last held (0: not parked), and the code (or reason) of the last refusal.
    parked: int = 0
    parked_why: str = ""
    #: Refused for good, with OKX's code (or message): never subscribed again by this process.
    failed: str | None = None
    #: A resubscribe was asked for and not yet sent: the first reason given.
    resubscribe: str | None = None
    #: When the last resubscribe of this arg was sent (None: never).
    resubscribed_at: float | None = None


@dataclass(frozen=True, slots=True)
class Retry:
    """A transient refusal within the quick retries: subscribe again after `delay_s`."""

    delay_s: float
    attempt: int


@dataclass(frozen=True, slots=True)
class Parked:
    """Retried much later (`delay_s`), for the `times`-th time in a row."""

    delay_s: float
    times: int


class SubscriptionScheduler:
    """Per-arg subscribe retries, parking and resubscribe coalescing for one logical connection."""

    def __init__(self, args: Iterable[SubArg], *, retries: int, backoff_min_s: float, backoff_max_s: float,
                 resubscribe_min_interval_s: float) -> None:
        self.args: tuple[SubArg, ...] = tuple(args)
        self.states: dict[SubArg, ArgState] = {a: ArgState() for a in self.args}
        self._carried = frozenset(self.args)
        self.retries = retries
        self.backoff_min_s = backoff_min_s
        self.backoff_max_s = backoff_max_s
        self.resubscribe_min_interval_s = resubscribe_min_interval_s

    # -- views

    @property
    def failed(self) -> dict[SubArg, str]:
        """Args refused for good, with the code (or message) OKX gave."""
        return {a: st.failed for a, st in self.states.items() if st.failed is not None}

    @property
    def parked(self) -> dict[SubArg, tuple[int, str]]:
        """Args retried only rarely now: (times parked, last code)."""
        return {a: (st.parked, st.parked_why) for a, st in self.states.items() if st.parked}

    def wanted(self, args: Iterable[SubArg] | None = None) -> list[SubArg]:
        """`args` (default: all) without those refused for good: what a subscribe should ask for."""
        return [a for a in (self.args if args is None else args) if self._state(a).failed is None]

    def pending_resubscribes(self) -> int:
        return sum(1 for st in self.states.values() if st.resubscribe is not None)

    def _state(self, arg: SubArg) -> ArgState:
        st = self.states.get(arg)
        if st is None:  # an arg OKX named that this connection does not carry: tracked, never subscribed
            st = self.states[arg] = ArgState()
        return st

    # -- inputs

    def request_resubscribe(self, arg: SubArg, reason: str) -> bool | None:
        """Ask for a resubscribe of `arg`: True when newly pending, False when one already is (coalesced),
        None when this connection does not carry `arg` or OKX refused it for good."""
        st = self.states.get(arg) if arg in self._carried else None
        if st is None or st.failed is not None:
            return None
        if st.resubscribe is not None:
            return False
        st.resubscribe = reason
        return True

    def on_subscribed(self, arg: SubArg) -> bool:
        """OKX holds `arg`: retries end. True when it had been parked (it recovered)."""
        st = self.states.get(arg)
        if st is None:
            return False
        recovered = st.parked > 0
        st.retry_at = None
        st.attempts = 0
        st.parked = 0
        st.parked_why = ""
        return recovered

    def fresh_snapshot(self, arg: SubArg) -> None:
        """A first subscription on a new connection brings a fresh snapshot: a pending resubscribe is moot."""
        st = self.states.get(arg)
        if st is not None:
            st.resubscribe = None

    def on_transient(self, arg: SubArg, why: str, now: float) -> Retry | Parked:
        """A transient refusal (or no answer): a quick retry (10x the reconnect backoff's floor, doubling:
        1 s, 2 s, 4 s with the defaults) while they last, else parked."""
        st = self._state(arg)
        attempts = st.attempts + 1
        if attempts > self.retries:
            return self.park(arg, why, now)
        st.attempts = attempts
        delay = min(self.backoff_max_s, self.backoff_min_s * 10 * 2 ** (attempts - 1))
        st.retry_at = now + delay
        return Retry(delay, attempts)

    def park(self, arg: SubArg, why: str, now: float) -> Parked:
        """Retry `arg` far less often (60 s doubling to 30 min): a transient refusal never fails it for good,
        and its stream's open gap stays open until its first record."""
        st = self._state(arg)
        st.parked += 1
        st.parked_why = why
        delay = min(PARK_MAX_S, PARK_FIRST_S * 2 ** (st.parked - 1))
        st.attempts = 0
        st.retry_at = now + delay
        return Parked(delay, st.parked)

    def fail(self, arg: SubArg, why: str) -> None:
        """OKX refused `arg` for good: no retry, no resubscribe."""
        st = self._state(arg)
        st.failed = why
        st.retry_at = None
        st.attempts = 0
        st.resubscribe = None

    # -- decisions

    def due_retries(self, now: float, held: Collection[SubArg]) -> list[SubArg]:
        """Args whose retry time has come and that the connection does not hold; their retry is consumed.
        Some may have failed meanwhile: filter with `wanted()` before subscribing."""
        due = sorted(a for a, st in self.states.items()
                     if st.retry_at is not None and st.retry_at <= now and a not in held)
        for a in due:
            self.states[a].retry_at = None
        return due

    def due_resubscribes(self, now: float, held: Collection[SubArg],
                         in_flight: Collection[SubArg]) -> tuple[list[SubArg], float | None]:
        """Pending resubscribes allowed now (sorted), and when the next deferred one will be.

        A pending resubscribe of an arg neither held nor being subscribed is dropped: a subscribe (with a
        fresh snapshot) comes anyway.
        """
        due: list[SubArg] = []
        later: list[float] = []
        for arg, st in self.states.items():
            if st.resubscribe is None:
                continue
            if arg not in held:
                if arg not in in_flight:
                    st.resubscribe = None
                continue
            allowed = (st.resubscribed_at if st.resubscribed_at is not None else -1e18) \
                + self.resubscribe_min_interval_s
            if allowed <= now:
                due.append(arg)
            else:
                later.append(allowed)
        return sorted(due), (min(later) if later else None)

    def start_resubscribe(self, args: Iterable[SubArg], now: float) -> set[str]:
        """The resubscribe of `args` is being sent now; returns the reasons that asked for it."""
        reasons: set[str] = set()
        for a in args:
            st = self._state(a)
            if st.resubscribe is not None:
                reasons.add(st.resubscribe)
            st.resubscribe = None
            st.resubscribed_at = now
        return reasons

    def next_retry(self) -> float | None:
        """The earliest scheduled retry (None: none)."""
        times = [st.retry_at for st in self.states.values() if st.retry_at is not None]
        return min(times) if times else None
