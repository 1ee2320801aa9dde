"""The REST client's policy, with a scripted transport and fake time: what is retried, how long it waits,
when the breaker opens, how auth failures are handled, and what the audit log says.

The simulator-backed tests (tests/integration/test_rest.py) check the same behaviours against real HTTP.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Callable, Iterator

import httpx
import pytest

from ingest.core.clock import ServerClock
from ingest.core.rest_limits import BreakerState, CircuitOpenError
from ingest.credentials import AuthFailureGuard, AuthPausedError, CredentialStore
from ingest.errors import CredentialError, OkxApiError
from ingest.io.rest import LimiterRegistry, OkxRestClient, RestTransportError
from ingest.okx.endpoints import Environment

OK = {"code": "0", "msg": "", "data": [{"ok": "1"}]}
BOOKS = "/api/v5/market/books"
CONFIG = "/api/v5/account/config"


class FakeTime:
    """Monotonic time that moves only when the client sleeps."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


Reply = httpx.Response | Exception


class Script:
    """A transport answering from a list (the last answer repeats); records every request."""

    def __init__(self, *replies: Reply) -> None:
        self.replies = list(replies)
        self.requests: list[httpx.Request] = []

    def set(self, *replies: Reply) -> None:
        self.replies = list(replies)

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        reply = self.replies.pop(0) if len(self.replies) > 1 else self.replies[0]
        if isinstance(reply, Exception):
            raise reply
        return reply


def json(status: int, body: object) -> httpx.Response:
    return httpx.Response(status, json=body)


def _env() -> dict[str, str]:
    return {"OKX_API_KEY": secrets.token_hex(16), "OKX_API_SECRET": secrets.token_hex(16),
            "OKX_API_PASSPHRASE": secrets.token_hex(8)}


@pytest.fixture
def fake_time() -> FakeTime:
    return FakeTime()


@pytest.fixture
def make_client(fake_time: FakeTime) -> Iterator[Callable[..., OkxRestClient]]:
    def make(script: Script, *, store: CredentialStore | None = None, **kwargs: object) -> OkxRestClient:
        options: dict[str, object] = {"max_attempts": 4, "retry_initial_s": 0.1, "retry_max_s": 1.0,
                                      "breaker_failures": 3, "breaker_cooldown_s": 30.0}
        options.update(kwargs)
        return OkxRestClient(
            clock=ServerClock(lambda: 1_700_000_000_000), credentials=store, base_url="https://openapi.okx.com",
            registry=LimiterRegistry(fake_time, fake_time.sleep), transport=httpx.MockTransport(script),
            monotonic=fake_time, sleep=fake_time.sleep, rand=lambda: 0.5, **options,  # type: ignore[arg-type]
        )

    yield make


async def test_rate_limit_as_http_200_is_retried_after_the_window(make_client: Callable[..., OkxRestClient],
                                                                   fake_time: FakeTime) -> None:
    script = Script(json(200, {"code": "50011", "msg": "Rate limit reached.", "data": []}), json(200, OK))
    async with make_client(script) as client:
        assert await client.get(BOOKS, {"instId": "BTC-USDT"}) == [{"ok": "1"}]
    assert len(script.requests) == 2
    assert fake_time.sleeps[0] >= 2.0  # at least to the end of OKX's 2 s window
    assert client.stats().requests == {(BOOKS, "50011"): 1, (BOOKS, "0"): 1}
    assert client.breaker_state(BOOKS) is BreakerState.CLOSED


async def test_rate_limit_as_http_429_is_retried_too(make_client: Callable[..., OkxRestClient],
                                                     fake_time: FakeTime) -> None:
    script = Script(json(429, {"code": "50011", "msg": "Too Many Requests"}), httpx.Response(429, text="slow down"),
                    json(200, OK))
    async with make_client(script) as client:
        await client.get(BOOKS)
    assert len(script.requests) == 3
    assert all(s >= 2.0 for s in fake_time.sleeps)


async def test_persistent_rate_limiting_ends_in_a_retriable_error(make_client: Callable[..., OkxRestClient]) -> None:
    script = Script(json(429, {"code": "50011", "msg": "Too Many Requests"}))
    async with make_client(script) as client:
        with pytest.raises(OkxApiError) as info:
            await client.get(BOOKS)
    assert info.value.code == "50011" and info.value.retriable and info.value.http_status == 429
    assert len(script.requests) == 4


async def test_server_errors_and_timeouts_are_retried_with_backoff(make_client: Callable[..., OkxRestClient],
                                                                   fake_time: FakeTime) -> None:
    script = Script(httpx.Response(502, text="<html>Bad Gateway</html>"), httpx.ReadTimeout("slow"),
                    json(200, {"code": "50013", "msg": "Systems are busy"}), json(200, OK))
    async with make_client(script, breaker_failures=5) as client:
        await client.get(BOOKS)
    assert len(script.requests) == 4
    assert fake_time.sleeps == [0.05, 0.1, 0.2]  # full jitter with rand=0.5: half of 0.1, 0.2, 0.4
    codes = client.stats().requests
    assert codes == {(BOOKS, "http-502"): 1, (BOOKS, "timeout"): 1, (BOOKS, "50013"): 1, (BOOKS, "0"): 1}


async def test_transport_failures_end_in_a_retriable_transport_error(
        make_client: Callable[..., OkxRestClient]) -> None:
    script = Script(httpx.ConnectError("refused"))
    async with make_client(script, breaker_failures=10) as client:
        with pytest.raises(RestTransportError, match="after 4 attempt") as info:
            await client.get(BOOKS)
    assert info.value.retriable


async def test_an_undecodable_body_is_a_retriable_transport_failure_not_a_crash(
        make_client: Callable[..., OkxRestClient]) -> None:
    """A proxy or CDN answering with a broken Content-Encoding must not kill the task that asked."""
    broken = httpx.Response(200, headers={"Content-Encoding": "gzip"}, stream=httpx.ByteStream(b"not gzip"))
    script = Script(broken, json(200, OK))
    async with make_client(script) as client:
        assert await client.get(BOOKS) == [{"ok": "1"}]
    assert len(script.requests) == 2


async def test_business_errors_are_not_retried(make_client: Callable[..., OkxRestClient]) -> None:
    script = Script(json(200, {"code": "51001", "msg": "Instrument ID does not exist", "data": []}))
    async with make_client(script) as client:
        with pytest.raises(OkxApiError) as info:
            await client.get(BOOKS, {"instId": "NOPE"})
    assert (info.value.code, info.value.retriable) == ("51001", False)
    assert len(script.requests) == 1


async def test_unknown_path_404_shape_is_an_error_not_a_crash(make_client: Callable[..., OkxRestClient]) -> None:
    script = Script(json(404, {"code": 404, "data": {}, "detailMsg": "", "error_code": "404",
                               "error_message": "Not Found", "msg": "Not Found"}))
    async with make_client(script) as client:
        with pytest.raises(OkxApiError, match="Not Found") as info:
            await client.get("/api/v5/market/nope")
    assert info.value.code == "404" and info.value.http_status == 404 and not info.value.retriable


async def test_breaker_opens_after_consecutive_failures_and_recovers_through_a_probe(
        make_client: Callable[..., OkxRestClient], fake_time: FakeTime, caplog: pytest.LogCaptureFixture) -> None:
    script = Script(httpx.Response(503, text="unavailable"))
    caplog.set_level(logging.INFO, logger="ingest.io.rest")
    async with make_client(script, max_attempts=10) as client:
        with pytest.raises(CircuitOpenError) as info:
            await client.get(BOOKS)
        assert len(script.requests) == 3  # the breaker stopped the retries
        assert client.breaker_state(BOOKS) is BreakerState.OPEN
        with pytest.raises(CircuitOpenError):
            await client.get(BOOKS)
        assert len(script.requests) == 3  # nothing sent while open
        assert client.stats().breakers[BOOKS] is BreakerState.OPEN
        script.set(json(200, OK))
        assert await client.get("/api/v5/market/trades") == [{"ok": "1"}]  # other endpoints are unaffected
        with pytest.raises(CircuitOpenError):
            await client.get(BOOKS)  # this one stays paused for the whole cooldown
        assert len(script.requests) == 4
        fake_time.now += info.value.retry_after_s
        assert client.breaker_state(BOOKS) is BreakerState.HALF_OPEN
        assert await client.get(BOOKS) == [{"ok": "1"}]
        assert client.breaker_state(BOOKS) is BreakerState.CLOSED
        assert client.stats().breaker_opened == {BOOKS: 1, "/api/v5/market/trades": 0}
    # The core breaker only reports its transitions; the client logs each one.
    transitions = [r for r in caplog.records if r.getMessage().startswith("rest_breaker")]
    assert [r.getMessage() for r in transitions] == ["rest_breaker_open", "rest_breaker_probe", "rest_breaker_closed"]
    opened = transitions[0].__dict__
    assert (opened["endpoint"], opened["failures"], opened["cooldown_s"]) == (BOOKS, 3, 30.0)
    assert "HTTP 503" in opened["last_failure"] and transitions[0].levelno == logging.WARNING


async def test_timestamp_expired_resyncs_the_clock_once_then_retries(make_client: Callable[..., OkxRestClient]) -> None:
    resyncs: list[int] = []

    async def resync() -> None:
        resyncs.append(1)

    expired = json(401, {"msg": "Timestamp request expired", "code": "50102"})
    script = Script(expired, json(200, OK))
    async with make_client(script, store=CredentialStore(_env()), on_clock_expired=resync) as client:
        await client.get(CONFIG)
        assert resyncs == [1]
        script.set(expired)
        with pytest.raises(OkxApiError, match="NTP") as info:
            await client.get(CONFIG)
    assert resyncs == [1, 1]
    assert info.value.code == "50102" and not info.value.retriable
    # The clock's fault, never the key's: no "check the key" alert, no pause of signed traffic.
    assert client.credentials is not None and client.credentials.auth.failures_total == 0


async def test_environment_mismatch_says_the_key_belongs_to_the_other_environment(
        make_client: Callable[..., OkxRestClient]) -> None:
    script = Script(json(401, {"msg": "APIKey does not match current environment.", "code": "50101"}))
    async with make_client(script, store=CredentialStore(_env()), environment=Environment.DEMO) as client:
        with pytest.raises(CredentialError, match=r"other environment \(demo vs live\).*runs in demo mode"):
            await client.get(CONFIG)
    assert len(script.requests) == 1


async def test_repeated_auth_failures_pause_signed_traffic_without_touching_okx(
        make_client: Callable[..., OkxRestClient], fake_time: FakeTime) -> None:
    store = CredentialStore(_env(), auth_guard=AuthFailureGuard(threshold=2, initial_pause_s=60, monotonic=fake_time))
    script = Script(json(401, {"msg": "Invalid Sign", "code": "50113"}))
    async with make_client(script, store=store) as client:
        for _ in range(2):
            with pytest.raises(OkxApiError, match="50113"):
                await client.get(CONFIG)
        with pytest.raises(AuthPausedError, match=r"paused for 60\.0 s"):
            await client.get(CONFIG)
        assert len(script.requests) == 2
        script.set(json(200, OK))
        assert await client.get(BOOKS) == [{"ok": "1"}]  # public traffic goes on
        with pytest.raises(AuthPausedError):
            await client.get(CONFIG)
        fake_time.now += 60.0
        await client.get(CONFIG)
    assert store.auth.consecutive == 0


async def test_private_endpoint_without_credentials_names_the_variables(
        make_client: Callable[..., OkxRestClient]) -> None:
    async with make_client(Script(json(200, OK))) as client:
        with pytest.raises(CredentialError, match="OKX_API_KEY"):
            await client.get(CONFIG)


async def test_every_request_is_audited_once_without_secrets(make_client: Callable[..., OkxRestClient],
                                                             caplog: pytest.LogCaptureFixture) -> None:
    env = _env()
    store = CredentialStore(env)
    script = Script(json(200, {"code": "50011", "msg": "Rate limit reached.", "data": []}), json(200, OK))
    with caplog.at_level(logging.INFO, logger="ingest.io.rest"):
        async with make_client(script, store=store) as client:
            await client.get("/api/v5/trade/fills", {"instType": "SPOT", "limit": 100})
    lines = [r for r in caplog.records if r.getMessage() == "rest_request"]
    assert len(lines) == 2
    first, second = (r.__dict__ for r in lines)
    assert (first["okx_code"], first["attempt"], second["okx_code"], second["attempt"]) == ("50011", 1, "0", 2)
    for field in ("method", "path", "params", "http_status", "duration_ms", "started_at", "finished_at",
                  "limiter_wait_ms", "key_hint", "okx_ts"):
        assert field in second
    assert second["params"] == {"instType": "SPOT", "limit": 100}
    assert second["key_hint"] == store.current().key_hint
    assert len(second["started_at"]) == 24 and second["started_at"].endswith("Z")  # ms precision
    dumped = " ".join(f"{r.getMessage()} {r.__dict__}" for r in caplog.records)
    for value in env.values():
        assert value not in dumped
    assert "OK-ACCESS" not in dumped
