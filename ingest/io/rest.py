"""The signed OKX REST client: one keep-alive httpx client, per-endpoint limits, retries, breaker, audit log.

* Signing happens in an `httpx.Auth` flow over the request exactly as it goes on the wire (the raw path
  with the query string this module encoded itself, and the exact body bytes), with OKX time from the
  shared `ServerClock` (SPEC 8.1).
* Every request passes a process-wide rate limiter (SPEC 8.3): one `SlidingWindow` per endpoint and IP
  (public) or per endpoint and API key (private). A slot counts from admission until the response has
  arrived and is then stamped with the arrival time, so however late a request reaches OKX (a queued
  connection, a slow network) OKX can never see more than the limit in any window. Waiters queue FIFO.
* OKX's answer is judged by the body's `code`, not the HTTP status (50011 comes as 200 and as 429); the
  envelope is parsed defensively (401 without `data`, 404 with a numeric code, proxies' HTML).
* Retries use full-jitter backoff; authentication failures are never retried blindly; a circuit breaker per
  endpoint stops hammering a failing endpoint.
* The policy is pure and lives in core: the limit table and the breaker in `ingest.core.rest_limits` (the
  breaker reports its transitions, logged and counted here), the answer's meaning in `ingest.core.rest_policy`.
* One audit line per HTTP request (`rest_request`), without headers: no secret can appear in it.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections import Counter, defaultdict
from collections.abc import Awaitable, Callable, Generator, Mapping
from dataclasses import dataclass, field
from typing import ClassVar
from urllib.parse import quote, urlsplit

import httpx
import orjson

from ingest.config import Settings
from ingest.core.backoff import full_jitter
from ingest.core.clock import OffsetSample, ServerClock
from ingest.core.ratelimit import SlidingWindow
from ingest.core.rest_limits import (
    TIME_PATH,
    BreakerEvent,
    BreakerState,
    CircuitBreaker,
    EndpointLimit,
    LimitTable,
    Scope,
)
from ingest.core.rest_policy import (
    CODE_TIMEOUT,
    CODE_TRANSPORT,
    BreakerNote,
    Decision,
    Envelope,
    ErrorKind,
    Verdict,
    classify,
    decide_answer,
    decide_failure,
    parse_envelope,
)
from ingest.credentials import CredentialStore
from ingest.errors import CredentialError, IngestError, OkxApiError, ProtocolError
from ingest.io.proxy import describe_proxy, proxy_for
from ingest.io.tls import client_ssl_context, find_pin_error
from ingest.okx.endpoints import DEMO_HEADER, REST_BASE, Environment
from ingest.okx.signing import rest_sign, rest_timestamp

log = logging.getLogger(__name__)

#: What to do about an authentication failure, by code (SPEC 8.2).
AUTH_FIXES: Mapping[str, str] = {
    "50100": "the API key is frozen: unfreeze it or create a new one on OKX's API page",
    "50103": "a signing header was missing (a bug in okx-ingest): report it",
    "50104": "a signing header was missing (a bug in okx-ingest): report it",
    "50105": "the passphrase is wrong: check OKX_API_PASSPHRASE",
    "50106": "a signing header was missing (a bug in okx-ingest): report it",
    "50107": "a signing header was missing (a bug in okx-ingest): report it",
    "50110": "this host's IP is not in the key's IP whitelist: add it on OKX's API page",
    "50111": "OKX does not know this API key: check OKX_API_KEY",
    "50112": "the timestamp header was malformed (a bug in okx-ingest): report it",
    "50113": "the signature is wrong: check OKX_API_SECRET (and that it belongs to OKX_API_KEY)",
    "50114": "the authorization is invalid: check the key, secret and passphrase",
    "50119": "the API key does not exist (deleted?): create a new one and rotate the credential files",
}

QueryValue = str | int | float | bool | None


# --------------------------------------------------------------------------------------------- limits


@dataclass(frozen=True, slots=True)
class BucketKey:
    """One budget: scope, OKX realm (host), endpoint, and the instType or API-key id it is counted for."""

    scope: Scope
    realm: str
    path: str
    qualifier: str = ""

    def label(self) -> str:
        q = f"[{self.qualifier}]" if self.qualifier else ""
        return f"{self.scope.value}:{self.realm}{self.path}{q}"


_GLOBAL_OKX_HOSTS = frozenset({"okx.com", "www.okx.com", "openapi.okx.com"})


def realm_of(base_url: str) -> str:
    """The budget realm of a base URL: OKX's global hosts are one service (and one IP budget)."""
    parts = urlsplit(base_url)
    host = (parts.hostname or "").lower()
    if host in _GLOBAL_OKX_HOSTS:
        return "okx.com"
    return f"{host}:{parts.port}" if parts.port else host


class _StampWindow(SlidingWindow):
    """A SlidingWindow that also tells when its oldest admission leaves the window."""

    __slots__ = ()

    def next_expiry(self, now: float) -> float | None:
        self._expire(now)
        return self._times[0] + self.window_s if self._times else None


@dataclass(frozen=True, slots=True)
class BucketStats:
    """A budget's state for metrics."""

    limit: int
    window_s: float
    used: int
    in_flight: int
    admitted_total: int
    wait_s_total: float


class RateBucket:
    """One endpoint budget: FIFO admission, at most `limit` requests in flight or answered within a window."""

    def __init__(self, key: BucketKey, limit: EndpointLimit, monotonic: Callable[[], float],
                 sleep: Callable[[float], Awaitable[None]]) -> None:
        self.key = key
        self.limit = limit
        self._window = _StampWindow(limit.limit, limit.window_s)
        self._monotonic = monotonic
        self._sleep = sleep
        self.in_flight = 0
        self.admitted_total = 0
        self.wait_s_total = 0.0
        self._blocked_until = 0.0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._turn = asyncio.Lock()
        self._completed = asyncio.Event()

    def _primitives(self) -> tuple[asyncio.Lock, asyncio.Event]:
        # The registry outlives event loops (one per test); asyncio primitives must not.
        loop = asyncio.get_running_loop()
        if loop is not self._loop:
            self._loop, self._turn, self._completed = loop, asyncio.Lock(), asyncio.Event()
        return self._turn, self._completed

    async def acquire(self) -> float:
        """Wait for a slot (FIFO: asyncio.Lock wakes waiters in arrival order); returns the seconds waited.

        The caller must call `release()` exactly once when the response has arrived (or the attempt failed).
        """
        turn, completed = self._primitives()
        start = self._monotonic()
        async with turn:
            while True:
                now = self._monotonic()
                if now < self._blocked_until:
                    await self._sleep(self._blocked_until - now)
                    continue
                if self._window.remaining(now) - self.in_flight > 0:
                    self.in_flight += 1
                    break
                expiry = self._window.next_expiry(now)
                if expiry is None:  # every slot is in flight: the first answer starts a window entry
                    completed.clear()
                    await completed.wait()
                else:
                    await self._sleep(max(0.0, expiry - now))
        waited = self._monotonic() - start
        self.admitted_total += 1
        self.wait_s_total += waited
        return waited

    def release(self) -> None:
        """The request is answered (or abandoned): its slot now counts from this moment for one window."""
        self.in_flight -= 1
        if not self._window.try_acquire(self._monotonic()):  # cannot happen: used + in_flight <= limit
            log.error("rate_bucket_overcommitted", extra={"bucket": self.key.label()})
        if self._loop is not None:
            self._completed.set()

    def hold(self, seconds: float) -> None:
        """Admit nothing for `seconds` (OKX said 50011: something else on this IP or key used the budget)."""
        self._blocked_until = max(self._blocked_until, self._monotonic() + seconds)

    def stats(self) -> BucketStats:
        now = self._monotonic()
        return BucketStats(self.limit.limit, self.limit.window_s, self._window.used(now), self.in_flight,
                           self.admitted_total, self.wait_s_total)


class LimiterRegistry:
    """All rate budgets of the process. Every REST client shares `LimiterRegistry.default()`.

    Tests with fake time build their own, with `monotonic` and `sleep` that move the fake clock.
    """

    _default: ClassVar[LimiterRegistry | None] = None

    def __init__(self, monotonic: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], Awaitable[None]] = asyncio.sleep) -> None:
        self.monotonic = monotonic
        self.sleep = sleep
        self._buckets: dict[BucketKey, RateBucket] = {}

    @classmethod
    def default(cls) -> LimiterRegistry:
        if cls._default is None:
            cls._default = cls()
        return cls._default

    def bucket(self, key: BucketKey, limit: EndpointLimit) -> RateBucket:
        found = self._buckets.get(key)
        if found is None:
            found = self._buckets[key] = RateBucket(key, limit, self.monotonic, self.sleep)
        elif (found.limit.limit, found.limit.window_s) != (limit.limit, limit.window_s):
            # Two clients with different tables on one budget: the first one's limit stays in force.
            log.warning("rate_limit_conflict", extra={"bucket": key.label(), "kept": str(found.limit),
                                                      "ignored": str(limit)})
        return found

    def stats(self) -> dict[str, BucketStats]:
        return {k.label(): b.stats() for k, b in self._buckets.items()}


# ------------------------------------------------------------------------------------------- envelope


@dataclass(frozen=True, slots=True)
class RestResponse:
    """A successful OKX answer: its rows and when it was sent and received (local wall clock, epoch ms)."""

    method: str
    path: str
    http_status: int
    data: list[object]
    sent_ms: int
    recv_ms: int

    def records(self) -> list[dict[str, object]]:
        """The rows as JSON objects (most endpoints); ProtocolError if a row is not an object."""
        rows: list[dict[str, object]] = []
        for row in self.data:
            if not isinstance(row, dict):
                raise ProtocolError(f"{self.method} {self.path} returned a non-object row {row!r:.80}; "
                                    "use get_arrays() for array rows such as candles")
            rows.append(row)
        return rows

    def arrays(self) -> list[list[object]]:
        """The rows as JSON arrays (candles); ProtocolError if a row is not an array."""
        rows: list[list[object]] = []
        for row in self.data:
            if not isinstance(row, list):
                raise ProtocolError(f"{self.method} {self.path} returned a non-array row {row!r:.80}; use get()")
            rows.append(row)
        return rows


def encode_query(params: Mapping[str, QueryValue] | None) -> str:
    """The query string as sent and signed: given order, None dropped, commas kept (OKX's list separator)."""
    if not params:
        return ""
    parts = []
    for key, value in params.items():
        if value is None:
            continue
        text = ("true" if value else "false") if isinstance(value, bool) else str(value)
        parts.append(f"{quote(key, safe='')}={quote(text, safe=',')}")
    return "&".join(parts)


# ----------------------------------------------------------------------------------------------- auth


class OkxAuth(httpx.Auth):
    """Signs a request as httpx will send it: OK-ACCESS-KEY/SIGN/TIMESTAMP/PASSPHRASE (SPEC 8.1).

    The prehash takes the raw request target (path and query exactly as on the wire) and the exact body
    bytes, and the timestamp is OKX time from the shared ServerClock, read at the moment of signing.
    """

    requires_request_body = True

    def __init__(self, store: CredentialStore, clock: ServerClock) -> None:
        self._store = store
        self._clock = clock

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        creds = self._store.current()
        timestamp = rest_timestamp(self._clock.now_ms())
        request_path = request.url.raw_path.decode("ascii")
        body = request.content.decode("utf-8")
        request.headers["OK-ACCESS-KEY"] = creds.api_key.reveal()
        request.headers["OK-ACCESS-SIGN"] = rest_sign(creds.secret.reveal(), timestamp, request.method,
                                                      request_path, body)
        request.headers["OK-ACCESS-TIMESTAMP"] = timestamp
        request.headers["OK-ACCESS-PASSPHRASE"] = creds.passphrase.reveal()
        yield request


# --------------------------------------------------------------------------------------------- client


class RestTransportError(IngestError):
    """No usable answer from OKX (timeout, refused connection, broken stream) after the allowed attempts."""

    retriable = True


@dataclass(frozen=True, slots=True)
class RestStats:
    """Counters for metrics and health: requests by (endpoint, code), retries, limiter waits, breakers."""

    requests: Mapping[tuple[str, str], int]
    retries: Mapping[str, int]
    limiter_wait_s: Mapping[str, float]
    breakers: Mapping[str, BreakerState]
    breaker_opened: Mapping[str, int]
    in_flight: int


@dataclass
class _Counters:
    requests: Counter[tuple[str, str]] = field(default_factory=Counter)
    retries: Counter[str] = field(default_factory=Counter)
    breaker_opened: Counter[str] = field(default_factory=Counter)
    waits: defaultdict[str, float] = field(default_factory=lambda: defaultdict(float))
    in_flight: int = 0


class OkxRestClient:
    """The one REST client of the process: public and signed GETs with limits, retries and a breaker.

    Use `from_settings` in the daemon; the constructor takes every collaborator explicitly so tests can
    inject a transport, a limiter registry with fake time, or short windows.
    """

    def __init__(
        self,
        *,
        clock: ServerClock,
        credentials: CredentialStore | None = None,
        environment: Environment = Environment.PRODUCTION,
        base_url: str | None = None,
        limits: LimitTable | None = None,
        registry: LimiterRegistry | None = None,
        timeout_s: float = 10.0,
        max_attempts: int = 8,
        retry_initial_s: float = 0.25,
        retry_max_s: float = 10.0,
        breaker_failures: int = 5,
        breaker_cooldown_s: float = 30.0,
        max_connections: int = 20,
        keepalive_s: float = 30.0,
        tls_spki_pins: tuple[str, ...] = (),
        ssl_cafile: str | None = None,
        extra_cafile: str | None = None,
        proxy: str | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
        on_clock_expired: Callable[[], Awaitable[object]] | None = None,
        monotonic: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        rand: Callable[[], float] = random.random,
    ) -> None:
        if max_attempts <= 0:
            raise ValueError("max_attempts must be > 0")
        self.clock = clock
        self.credentials = credentials
        self.environment = environment
        self.base_url = (base_url or REST_BASE).rstrip("/")
        self.realm = realm_of(self.base_url)
        self.limits = limits or LimitTable()
        self.registry = registry or LimiterRegistry.default()
        self.on_clock_expired = on_clock_expired
        self._max_attempts = max_attempts
        self._timeout_s = timeout_s
        self._retry_initial = retry_initial_s
        self._retry_max = retry_max_s
        self._breaker_failures = breaker_failures
        self._breaker_cooldown = breaker_cooldown_s
        self._monotonic = monotonic
        self._sleep = sleep
        self._rand = rand
        self._breakers: dict[str, CircuitBreaker] = {}
        self._counters = _Counters()
        self._warned_unknown: set[str] = set()
        headers = {"Accept": "application/json", "Content-Type": "application/json", "User-Agent": "okx-ingest"}
        if environment is Environment.DEMO:
            headers[DEMO_HEADER[0]] = DEMO_HEADER[1]
        if transport is None:
            transport = httpx.AsyncHTTPTransport(
                verify=client_ssl_context(tls_spki_pins, cafile=ssl_cafile, extra_cafile=extra_cafile),
                proxy=proxy,  # a CONNECT tunnel: TLS and pins stay end to end with OKX
                http1=True,
                http2=False,
                retries=0,
                limits=httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections,
                                    keepalive_expiry=keepalive_s),
            )
        if proxy is not None:
            log.info("okx_rest_proxy", extra={"proxy": describe_proxy(proxy), "base_url": self.base_url})
        # trust_env=False: the proxy is chosen explicitly (io/proxy.py, HTTPS_PROXY/NO_PROXY included), never by
        # httpx's own reading of the environment (.netrc, SSL_CERT_FILE would route around the pinned context).
        # pool=None: httpx never times out waiting for a connection, because no request ever waits for one
        # there: `_slots` admits at most max_connections exchanges, before signing. A signed request that queued
        # in the pool could outlive OKX's 30 s timestamp window (50102) behind slow answers.
        self._slots = asyncio.Semaphore(max_connections)
        self._http = httpx.AsyncClient(
            base_url=self.base_url, transport=transport, headers=headers, trust_env=False, follow_redirects=False,
            timeout=httpx.Timeout(timeout_s, pool=None),
        )
        self._auth = OkxAuth(credentials, clock) if credentials is not None else None

    @classmethod
    def from_settings(
        cls,
        settings: Settings,
        clock: ServerClock,
        credentials: CredentialStore | None = None,
        *,
        transport: httpx.AsyncBaseTransport | None = None,
        registry: LimiterRegistry | None = None,
        on_clock_expired: Callable[[], Awaitable[object]] | None = None,
    ) -> OkxRestClient:
        okx, bf = settings.okx, settings.backfill
        return cls(
            clock=clock, credentials=credentials, environment=okx.environment, base_url=okx.rest_base_url,
            limits=LimitTable(share=okx.rest_limit_share), registry=registry, timeout_s=bf.request_timeout_s,
            max_attempts=bf.max_attempts, retry_initial_s=bf.retry_initial_s, retry_max_s=bf.retry_max_s,
            breaker_failures=bf.breaker_failures, breaker_cooldown_s=bf.breaker_cooldown_s,
            max_connections=okx.rest_max_connections, keepalive_s=okx.rest_keepalive_s,
            tls_spki_pins=tuple(okx.tls_spki_pins), transport=transport, on_clock_expired=on_clock_expired,
            extra_cafile=str(okx.ca_bundle) if okx.ca_bundle else None,
            proxy=proxy_for(okx.rest_base_url or REST_BASE, okx.proxy),
        )

    async def __aenter__(self) -> OkxRestClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    # ---- public API

    async def get(self, path: str, params: Mapping[str, QueryValue] | None = None, *,
                  signed: bool | None = None) -> list[dict[str, object]]:
        """GET `path` and return its `data` rows as objects; see `request` for errors."""
        return (await self.request("GET", path, params, signed=signed)).records()

    async def get_arrays(self, path: str, params: Mapping[str, QueryValue] | None = None, *,
                         signed: bool | None = None) -> list[list[object]]:
        """GET `path` whose rows are arrays (candles)."""
        return (await self.request("GET", path, params, signed=signed)).arrays()

    async def server_time_sample(self) -> OffsetSample:
        """One `GET /api/v5/public/time` probe for the clock service (local send/receive times and OKX's ts)."""
        response = await self.request("GET", TIME_PATH, signed=False)
        rows = response.records()
        ts = rows[0].get("ts") if rows else None
        if not isinstance(ts, str) or not ts.isdigit():
            raise ProtocolError(f"{TIME_PATH} returned no millisecond ts: {rows!r:.120}")
        return OffsetSample(response.sent_ms, response.recv_ms, int(ts))

    async def request(
        self,
        method: str,
        path: str,
        params: Mapping[str, QueryValue] | None = None,
        *,
        body: dict[str, object] | list[object] | None = None,
        signed: bool | None = None,
    ) -> RestResponse:
        """Send one logical request (with retries) and return OKX's successful answer.

        `signed` defaults to whether the endpoint is private. Raises OkxApiError (OKX said no; `retriable`
        tells whether trying later may help), CredentialError (no key, wrong environment, auth paused),
        CircuitOpenError, RestTransportError, or TlsPinError (never retried).
        """
        method = method.upper()
        limit = self.limits.lookup(path)
        if not self.limits.known(path) and path not in self._warned_unknown:
            self._warned_unknown.add(path)
            log.warning("rest_limit_unknown", extra={"path": path, "assumed_limit": limit.limit,
                                                     "window_s": limit.window_s})
        signed = limit.private if signed is None else signed
        query = encode_query(params)
        target = f"{path}?{query}" if query else path
        content = orjson.dumps(body) if body is not None else b""
        idempotent = method == "GET"
        breaker = self._breaker(path)
        delays = full_jitter(self._retry_initial, self._retry_max, rand=self._rand)
        clock_resynced = False
        attempt = 0
        while True:
            attempt += 1
            key_hint, key_id = self._signing_identity(method, path) if signed else (None, "")
            is_probe = self._on_breaker(breaker, breaker.before_call()) is BreakerEvent.PROBING
            decided = False
            try:
                bucket = self.registry.bucket(self._bucket_key(path, limit, params, key_id), limit)
                waited = await bucket.acquire()
                self._counters.waits[path] += waited
                self._counters.in_flight += 1
                try:
                    async with self._slots:  # a free connection first, then sign and send at once
                        sent_ms = self.clock.local_ms()
                        status, raw, okx_ts, failure = await self._exchange(method, target, content, signed)
                        recv_ms = self.clock.local_ms()
                finally:
                    self._counters.in_flight -= 1
                    bucket.release()
                env = parse_envelope(status, raw) if failure is None else None
                code = env.code if env is not None else (CODE_TIMEOUT if isinstance(failure, httpx.TimeoutException)
                                                         else CODE_TRANSPORT)
                self._counters.requests[(path, code)] += 1
                self._audit(method, path, params, status, code, env, failure, sent_ms, recv_ms, attempt, waited,
                            signed, key_hint, okx_ts)
                pin_error = find_pin_error(failure) if failure is not None else None
                if env is None:
                    d = decide_failure(pinned=pin_error is not None,
                                       connect_failed=isinstance(failure, httpx.ConnectError | httpx.ConnectTimeout),
                                       attempt=attempt, max_attempts=self._max_attempts, idempotent=idempotent)
                else:
                    d = decide_answer(classify(status, env), attempt=attempt, max_attempts=self._max_attempts,
                                      idempotent=idempotent, signed=signed, window_s=limit.window_s,
                                      can_resync=not clock_resynced and self.on_clock_expired is not None)
                self._note(breaker, d, is_probe, status, env, failure)
                decided = True
                if d.hold_budget:
                    bucket.hold(d.pause_s)
                if d.verdict is Verdict.RETURN:
                    if d.key_ok and self.credentials is not None:
                        self.credentials.record_auth_success()
                    assert env is not None and env.data is not None
                    return RestResponse(method, path, status, env.data, sent_ms, recv_ms)
                if d.verdict is Verdict.RETRY:
                    await self._retry_pause(path, d.pause_s + (next(delays) if d.backoff else 0.0))
                    continue
                if d.verdict is Verdict.RESYNC:
                    assert self.on_clock_expired is not None
                    clock_resynced = True
                    log.warning("rest_clock_expired", extra={"path": path, "offset_ms": self.clock.offset_ms,
                                                             "action": "resync the clock and retry once"})
                    await self.on_clock_expired()
                    self._counters.retries[path] += 1
                    continue
                if d.blames_key and env is not None and self.credentials is not None:
                    self.credentials.record_auth_failure(env.code)
                raise self._error(d, method, path, attempt, status, env, failure, pin_error)
            finally:
                if not decided:  # cancelled or failed before an outcome: free the probe slot
                    breaker.on_neutral(is_probe)

    def stats(self) -> RestStats:
        c = self._counters
        return RestStats(
            requests=dict(c.requests), retries=dict(c.retries), limiter_wait_s=dict(c.waits),
            breakers={p: b.state for p, b in self._breakers.items()},
            breaker_opened={p: c.breaker_opened[p] for p in self._breakers}, in_flight=c.in_flight,
        )

    def breaker_state(self, path: str) -> BreakerState:
        return self._breaker(path).state

    # ---- internals

    def _breaker(self, path: str) -> CircuitBreaker:
        found = self._breakers.get(path)
        if found is None:
            found = self._breakers[path] = CircuitBreaker(path, self._breaker_failures, self._breaker_cooldown,
                                                          self._monotonic, probe_wait_s=self._timeout_s)
        return found

    def _signing_identity(self, method: str, path: str) -> tuple[str, str]:
        if self.credentials is None:
            raise CredentialError(
                f"{method} {path} is a private endpoint and needs an API key: set OKX_API_KEY, OKX_API_SECRET "
                "and OKX_API_PASSPHRASE (or their *_FILE variants)"
            )
        self.credentials.check_auth_allowed()
        creds = self.credentials.current()
        return creds.key_hint, creds.key_id

    def _bucket_key(self, path: str, limit: EndpointLimit, params: Mapping[str, QueryValue] | None,
                    key_id: str) -> BucketKey:
        if limit.scope is Scope.USER:
            return BucketKey(Scope.USER, self.realm, path, key_id)
        if limit.scope is Scope.IP_INST_TYPE:
            inst_type = (params or {}).get("instType")
            return BucketKey(Scope.IP_INST_TYPE, self.realm, path, str(inst_type or ""))
        return BucketKey(Scope.IP, self.realm, path)

    async def _exchange(
        self, method: str, target: str, content: bytes, signed: bool
    ) -> tuple[int, bytes, str | None, httpx.HTTPError | None]:
        """One HTTP round trip: (status, body, signed timestamp, transport failure)."""
        request = self._http.build_request(method, target, content=content or None)
        try:
            response = await self._http.send(request, auth=self._auth if signed else None)
        except httpx.HTTPError as exc:  # transport errors, and a body that cannot be decoded (bad encoding)
            return 0, b"", None, exc
        try:
            okx_ts = response.request.headers.get("OK-ACCESS-TIMESTAMP")
            return response.status_code, response.content, okx_ts, None
        finally:
            await response.aclose()

    def _note(self, breaker: CircuitBreaker, d: Decision, is_probe: bool, status: int, env: Envelope | None,
              failure: BaseException | None) -> None:
        """Tell the endpoint's breaker what the attempt showed."""
        if d.breaker is BreakerNote.SUCCESS:
            self._on_breaker(breaker, breaker.on_success())
        elif d.breaker is BreakerNote.NEUTRAL:
            breaker.on_neutral(is_probe)
        elif env is not None:
            self._on_breaker(breaker, breaker.on_failure(f"HTTP {status}, OKX code {env.code}: {env.msg}"[:200]))
        else:
            self._on_breaker(breaker, breaker.on_failure(f"{type(failure).__name__}: {failure}"))

    def _on_breaker(self, breaker: CircuitBreaker, event: BreakerEvent | None) -> BreakerEvent | None:
        """Log and count a transition of `breaker` (the core breaker only reports it); returns `event`."""
        if event is BreakerEvent.PROBING:
            log.info("rest_breaker_probe", extra={"endpoint": breaker.endpoint})
        elif event is BreakerEvent.CLOSED:
            log.info("rest_breaker_closed", extra={"endpoint": breaker.endpoint})
        elif event is BreakerEvent.OPENED:
            self._counters.breaker_opened[breaker.endpoint] += 1
            log.warning("rest_breaker_open", extra={"endpoint": breaker.endpoint,
                                                    "failures": breaker.consecutive_failures,
                                                    "cooldown_s": breaker.cooldown_s,
                                                    "last_failure": breaker.last_failure})
        return event

    def _error(self, d: Decision, method: str, path: str, attempt: int, status: int, env: Envelope | None,
               failure: BaseException | None, pin_error: IngestError | None) -> IngestError:
        """The error a RAISE decision stands for, saying what happened and what to do."""
        if d.error is ErrorKind.PIN and pin_error is not None:
            return pin_error
        if d.error is ErrorKind.TRANSPORT or env is None:
            error = RestTransportError(
                f"no answer from OKX for {method} {path} after {attempt} attempt(s): "
                f"{type(failure).__name__}: {failure}; check the network and OKX's status")
            error.__cause__ = failure
            return error
        if d.error is ErrorKind.ENVIRONMENT:
            return self._environment_error(env)
        if d.error is ErrorKind.CLOCK:
            return OkxApiError(env.code, f"{env.msg} (the request's OKX-time timestamp was more than 30 s "
                               "off OKX's clock even after a resync: fix the host clock with NTP)",
                               http_status=status, retriable=False)
        return self._api_error(env, status, retriable=d.retriable)

    async def _retry_pause(self, path: str, delay: float) -> None:
        self._counters.retries[path] += 1
        await self._sleep(delay)

    def _api_error(self, env: Envelope, status: int, *, retriable: bool) -> OkxApiError:
        msg = env.msg or "(no message)"
        fix = AUTH_FIXES.get(env.code)
        if fix is not None:
            msg = f"{msg} ({fix})"
        return OkxApiError(env.code, msg, http_status=status, retriable=retriable)

    def _environment_error(self, env: Envelope) -> CredentialError:
        mode, other = (("demo", "live") if self.environment is Environment.DEMO else ("live", "demo"))
        return CredentialError(
            f"OKX answered {env.code} ({env.msg or 'APIKey does not match current environment'}): this key "
            f"belongs to the other environment (demo vs live). okx-ingest runs in {mode} mode, the key was "
            f"created for {other} trading: use a key made in {mode} trading, or set okx.environment to "
            f"{'production' if other == 'live' else 'demo'}"
        )

    def _audit(
        self, method: str, path: str, params: Mapping[str, QueryValue] | None, status: int, code: str,
        env: Envelope | None, failure: BaseException | None, sent_ms: int, recv_ms: int, attempt: int,
        waited_s: float, signed: bool, key_hint: str | None, okx_ts: str | None,
    ) -> None:
        extra: dict[str, object] = {
            "method": method,
            "path": path,
            "params": {k: v for k, v in (params or {}).items() if v is not None},
            "http_status": status or None,
            "okx_code": code,
            "duration_ms": recv_ms - sent_ms,
            "started_at": rest_timestamp(sent_ms),
            "finished_at": rest_timestamp(recv_ms),
            "attempt": attempt,
            "limiter_wait_ms": round(waited_s * 1000, 3),
            "signed": signed,
        }
        if env is not None and env.code != "0":
            extra["okx_msg"] = env.msg[:200]
        if failure is not None:
            extra["error"] = f"{type(failure).__name__}: {failure}"[:300]
        if signed:
            extra["key_hint"] = key_hint
            extra["okx_ts"] = okx_ts
        log.info("rest_request", extra=extra)
