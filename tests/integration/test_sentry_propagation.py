"""With Sentry on, no outgoing request carries Sentry's trace headers (they hold the DSN's public key)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import aiohttp
import httpx
import pytest
import sentry_sdk
from aiohttp import web

from ingest.obs.sentry import init_sentry

TRACE_HEADERS = ("sentry-trace", "baggage", "traceparent")


@pytest.fixture
async def third_party() -> AsyncIterator[tuple[str, list[dict[str, str]]]]:
    """A loopback server standing in for OKX: it keeps the headers of every request."""
    seen: list[dict[str, str]] = []

    async def handle(request: web.Request) -> web.Response:
        seen.append({k.lower(): v for k, v in request.headers.items()})
        return web.json_response({"code": "0", "data": []})

    app = web.Application()
    app.router.add_get("/{tail:.*}", handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield f"http://127.0.0.1:{runner.addresses[0][1]}", seen
    finally:
        await runner.cleanup()


async def test_requests_to_third_party_hosts_get_no_sentry_trace_headers(
        third_party: tuple[str, list[dict[str, str]]]) -> None:
    base, seen = third_party
    # Port 9 (discard): nothing is sent to it in this test; the DSN only has to switch Sentry on.
    assert init_sentry("http://public@127.0.0.1:9/1", release="okx-ingest@test", environment="test")
    try:
        with sentry_sdk.start_transaction(name="probe", sampled=True):  # a trace that could be propagated
            async with httpx.AsyncClient() as client:
                await client.get(f"{base}/api/v5/public/time")
            async with aiohttp.ClientSession() as session, session.get(f"{base}/api/v5/public/time") as resp:
                await resp.read()
    finally:
        sentry_sdk.get_client().close(timeout=0)
    assert len(seen) == 2
    for headers in seen:
        assert not [h for h in TRACE_HEADERS if h in headers], headers
