"""REST signing through the httpx Auth flow: what is signed is exactly what goes on the wire.

Signatures are recomputed here with hmac/hashlib/base64 from what a local server actually received (raw
request target, body bytes, headers), independently of `ingest.okx.signing`.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import httpx
import pytest
from aiohttp import web

from ingest.core.clock import OffsetSample, ServerClock
from ingest.credentials import CredentialStore
from ingest.io.rest import LimiterRegistry, OkxAuth, OkxRestClient, encode_query
from ingest.okx.endpoints import Environment

WALL_MS = 1_607_418_537_715  # 2020-12-08T09:08:57.715Z


@dataclass
class Seen:
    method: str
    raw_path: str
    body: bytes
    headers: dict[str, str]


@dataclass
class EchoServer:
    url: str
    seen: list[Seen] = field(default_factory=list)


@pytest.fixture
async def echo_server() -> AsyncIterator[EchoServer]:
    """Answers every request with an OKX success envelope and records it as received."""
    state = EchoServer("")

    async def handle(request: web.Request) -> web.Response:
        state.seen.append(Seen(request.method, request.raw_path, await request.read(),
                               {k.lower(): v for k, v in request.headers.items()}))
        return web.json_response({"code": "0", "msg": "", "data": [{"ts": str(WALL_MS + 5)}]})

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    state.url = f"http://127.0.0.1:{runner.addresses[0][1]}"
    try:
        yield state
    finally:
        await runner.cleanup()


def _env() -> dict[str, str]:
    return {"OKX_API_KEY": secrets.token_hex(16), "OKX_API_SECRET": secrets.token_hex(16),
            "OKX_API_PASSPHRASE": secrets.token_hex(8)}


def _independent_sign(secret: str, prehash: str) -> str:
    return base64.b64encode(hmac.new(secret.encode(), prehash.encode(), hashlib.sha256).digest()).decode()


def _client(server: EchoServer, store: CredentialStore | None, clock: ServerClock | None = None,
            environment: Environment = Environment.PRODUCTION) -> OkxRestClient:
    return OkxRestClient(clock=clock or ServerClock(lambda: WALL_MS), credentials=store, base_url=server.url,
                         environment=environment, registry=LimiterRegistry())


async def test_private_get_is_signed_over_the_query_string_exactly_as_received(echo_server: EchoServer) -> None:
    env = _env()
    async with _client(echo_server, CredentialStore(env)) as client:
        await client.get("/api/v5/account/balance", {"ccy": "BTC,ETH", "note": "a b&c/d", "skip": None})
    (seen,) = echo_server.seen
    assert seen.raw_path == "/api/v5/account/balance?ccy=BTC,ETH&note=a%20b%26c%2Fd"
    ts = seen.headers["ok-access-timestamp"]
    assert ts == "2020-12-08T09:08:57.715Z"
    assert seen.headers["ok-access-sign"] == _independent_sign(env["OKX_API_SECRET"], f"{ts}GET{seen.raw_path}")
    assert seen.headers["ok-access-key"] == env["OKX_API_KEY"]
    assert seen.headers["ok-access-passphrase"] == env["OKX_API_PASSPHRASE"]
    assert seen.headers["content-type"] == "application/json"


async def test_post_body_is_signed_as_the_exact_bytes_sent(echo_server: EchoServer) -> None:
    env = _env()
    async with _client(echo_server, CredentialStore(env)) as client:
        await client.request("POST", "/api/v5/account/set-something", body={"instId": "BTC-USDT", "sz": "1"})
    (seen,) = echo_server.seen
    assert seen.body == b'{"instId":"BTC-USDT","sz":"1"}'
    ts = seen.headers["ok-access-timestamp"]
    prehash = f"{ts}POST{seen.raw_path}{seen.body.decode()}"
    assert seen.headers["ok-access-sign"] == _independent_sign(env["OKX_API_SECRET"], prehash)


async def test_timestamp_is_okx_time_from_the_shared_server_clock(echo_server: EchoServer) -> None:
    clock = ServerClock(lambda: WALL_MS)
    clock.update(OffsetSample(sent_ms=WALL_MS, recv_ms=WALL_MS, server_ms=WALL_MS + 45_250))
    async with _client(echo_server, CredentialStore(_env()), clock) as client:
        await client.get("/api/v5/account/config")
    assert echo_server.seen[0].headers["ok-access-timestamp"] == "2020-12-08T09:09:42.965Z"


async def test_public_requests_carry_no_credentials(echo_server: EchoServer) -> None:
    env = _env()
    async with _client(echo_server, CredentialStore(env)) as client:
        await client.get("/api/v5/market/trades", {"instId": "BTC-USDT", "limit": 500})
    (seen,) = echo_server.seen
    assert seen.raw_path == "/api/v5/market/trades?instId=BTC-USDT&limit=500"
    assert not any(h.startswith("ok-access-") for h in seen.headers)
    for value in env.values():
        assert value not in str(seen.headers)


async def test_demo_mode_sends_the_simulated_trading_header(echo_server: EchoServer) -> None:
    async with _client(echo_server, CredentialStore(_env()), environment=Environment.DEMO) as client:
        await client.get("/api/v5/public/time")
        await client.get("/api/v5/account/config")
    assert [s.headers.get("x-simulated-trading") for s in echo_server.seen] == ["1", "1"]
    async with _client(echo_server, None) as live:
        await live.get("/api/v5/public/time")
    assert "x-simulated-trading" not in echo_server.seen[-1].headers


async def test_each_request_is_signed_with_the_credentials_current_at_that_moment(echo_server: EchoServer) -> None:
    first, second = _env(), _env()
    env = dict(first)
    store = CredentialStore(env)
    async with _client(echo_server, store) as client:
        await client.get("/api/v5/account/config")
        env.update(second)
        assert await store.reload()
        await client.get("/api/v5/account/config")
    keys = [s.headers["ok-access-key"] for s in echo_server.seen]
    assert keys == [first["OKX_API_KEY"], second["OKX_API_KEY"]]
    last = echo_server.seen[-1]
    assert last.headers["ok-access-sign"] == _independent_sign(
        second["OKX_API_SECRET"], f"{last.headers['ok-access-timestamp']}GET{last.raw_path}")


def test_auth_flow_signs_without_a_network() -> None:
    """httpx's Auth generator is testable on its own: one yielded request, signed."""
    env = _env()
    auth = OkxAuth(CredentialStore(env), ServerClock(lambda: WALL_MS))
    request = httpx.Request("GET", "https://openapi.okx.com/api/v5/trade/fills?instType=SPOT&limit=100")
    flow = auth.auth_flow(request)
    signed = next(flow)
    ts = "2020-12-08T09:08:57.715Z"
    assert signed.headers["OK-ACCESS-SIGN"] == _independent_sign(
        env["OKX_API_SECRET"], f"{ts}GET/api/v5/trade/fills?instType=SPOT&limit=100")
    with pytest.raises(StopIteration):
        flow.send(httpx.Response(200))


def test_query_encoding_keeps_order_and_commas_and_drops_none() -> None:
    assert encode_query({"instId": "BTC-USDT", "after": 123, "before": None, "ok": True}) == \
        "instId=BTC-USDT&after=123&ok=true"
    assert encode_query({"ccy": "BTC,ETH,USDT"}) == "ccy=BTC,ETH,USDT"
    assert encode_query({"q": "a=b&c"}) == "q=a%3Db%26c"
    assert encode_query(None) == "" and encode_query({}) == ""
