"""No API secret leaves the process: a full private run at DEBUG, every output channel grepped.

The daemon runs with generated credentials against the simulator, logging at DEBUG (libraries included:
websockets logs the login frames it sends, httpx the requests it signs), with Sentry pointed at a local
HTTP endpoint that keeps every envelope. The run includes a refused login, an error event, an exception
whose message carries the secrets, and that exception reaching the crash hook. Then everything the process
emitted (the log, every Kafka topic with keys and headers, the Sentry envelopes, /metrics, /healthz,
/readyz) is searched for the three values, their base64, hex and URL-encoded forms, and any 12-character
piece of them (a truncated log line is a leak too).
"""

from __future__ import annotations

import asyncio
import base64
import gzip
import io
import logging
import sys
import threading
from pathlib import Path
from urllib.parse import quote

import pytest
import sentry_sdk
from aiohttp import web
from aiokafka import AIOKafkaConsumer
from aiokafka.structs import TopicPartition

from ingest.core.records import TopicKind, topic_name
from ingest.obs.logging import setup_logging
from ingest.obs.sentry import init_sentry
from ingest.sim import SimServer
from tests.conftest import BrokerInfo
from tests.e2e.harness import running
from tests.e2e.private_support import Keys, private_settings, private_up, reconciled, scrape

#: A piece this long of a secret found anywhere is a leak (random hex: no false positives at this length).
PIECE = 12


class SentryInbox:
    """A local Sentry ingest endpoint: keeps every envelope (or legacy store) body, decompressed."""

    def __init__(self) -> None:
        self.bodies: list[bytes] = []
        self._runner: web.AppRunner | None = None
        self.port = 0

    async def _accept(self, request: web.Request) -> web.Response:
        body = await request.read()  # aiohttp undoes Content-Encoding: gzip itself; older versions did not
        if body[:2] == b"\x1f\x8b":
            body = gzip.decompress(body)
        self.bodies.append(body)
        return web.json_response({"id": "0" * 32})

    async def __aenter__(self) -> SentryInbox:
        app = web.Application()
        app.router.add_post("/{tail:.*}", self._accept)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = int(self._runner.addresses[0][1])
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._runner is not None
        await self._runner.cleanup()


async def _everything_in_kafka(bootstrap: str, prefix: str) -> bytes:
    """Keys, values and headers of every message on every topic of this run."""
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False, group_id=None)
    await consumer.start()
    out = bytearray()
    try:
        topics = [topic_name(prefix, kind) for kind in TopicKind]
        await consumer._client.force_metadata_update()
        tps = [TopicPartition(t, p) for t in topics for p in sorted(consumer.partitions_for_topic(t) or ())]
        assert tps, "no topics were created"
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        ends = await consumer.end_offsets(tps)
        async with asyncio.timeout(30):
            while [tp for tp in tps if await consumer.position(tp) < ends[tp]]:
                for msgs in (await consumer.getmany(*tps, timeout_ms=200)).values():
                    for m in msgs:
                        out += (m.key or b"") + (m.value or b"") + b"".join(k.encode() + v for k, v in m.headers)
    finally:
        await consumer.stop()
    return bytes(out)


def _forms(secret: str) -> set[bytes]:
    raw = secret.encode()
    whole = {raw, base64.b64encode(raw), base64.urlsafe_b64encode(raw), quote(secret, safe="").encode(),
             raw.hex().encode()}
    return whole | {raw[i:i + PIECE] for i in range(len(raw) - PIECE + 1)}


async def test_no_secret_reaches_logs_records_metrics_or_sentry_at_debug(
    kafka_broker: BrokerInfo, topic_prefix: str, tmp_path: Path
) -> None:
    keys = Keys.new()
    log_buffer = io.StringIO()
    root = logging.getLogger()
    saved_handlers, saved_level = list(root.handlers), root.level
    saved_hooks = sys.excepthook, threading.excepthook
    try:
        async with SentryInbox() as inbox:
            setup_logging("DEBUG", "json", stream=log_buffer)
            assert init_sentry(f"http://public@127.0.0.1:{inbox.port}/1", release="okx-ingest@leak-test",
                               environment="test")
            async with SimServer(keys.sim()) as sim:
                sim.faults.reject_logins(code="60009", count=1)  # one refused login, then it goes through
                settings = private_settings(sim, kafka_broker.bootstrap_servers, topic_prefix, tmp_path,
                                            obs={"log_level": "DEBUG"})
                async with running(settings, env=keys.env()) as run:
                    await private_up(sim)
                    await reconciled(run, 1)
                    order = await sim.account.place_order("BTC-USDT", "buy", "0.01", "50000")
                    await sim.account.fill(order)
                    # Errors that would carry the secrets to Sentry if nothing scrubbed them.
                    probe = logging.getLogger("ingest.leak_probe")
                    probe.error("leak_probe", extra={"detail": " ".join(keys.values())})
                    try:
                        raise RuntimeError(f"signing failed with secret {keys.api_secret} / {keys.passphrase}")
                    except RuntimeError:
                        probe.exception("leak_probe_exception")
                        sentry_sdk.capture_exception()
                        sys.excepthook(*sys.exc_info())  # what a crash would print  # type: ignore[arg-type]
                    pages = [await scrape(run, path) for path in ("/metrics", "/healthz", "/readyz")]
                    assert await run.shutdown() == 0
                    stats = run.daemon.parts.manager
                    assert stats is not None and sum(c.counters.login_failures for c in stats.connections) == 1
            await asyncio.to_thread(sentry_sdk.flush, 10)  # the transport thread posts to our own loop
            envelopes = b"\n".join(inbox.bodies)
    finally:
        client = sentry_sdk.get_client()
        client.close()
        for handler in list(root.handlers):
            root.removeHandler(handler)
        for handler in saved_handlers:
            root.addHandler(handler)
        root.setLevel(saved_level)
        sys.excepthook, threading.excepthook = saved_hooks

    logs = log_buffer.getvalue()
    kafka = await _everything_in_kafka(kafka_broker.bootstrap_servers, topic_prefix)
    # The channels really carried the material: a test that captured nothing would prove nothing.
    login_frames = [line for line in logs.splitlines() if '"logger":"websockets.client"' in line
                    and 'op\\":\\"login' in line]
    assert len(login_frames) >= 3, "websockets logged the login frames it sent (DEBUG)"
    # websockets truncates long frames, which leaves pieces too short to match any secret: masked by field.
    assert all('apiKey\\":\\"***\\"' in line for line in login_frames), "a login frame was logged unmasked"
    assert '"event":"ws_login_refused"' in logs and '"logger":"httpx"' in logs
    assert '"event":"unhandled_exception"' in logs and "signing failed with secret ***" in logs
    assert b"leak_probe" in envelopes and b"signing failed with secret" in envelopes
    assert b"okx_ingest_frames_total" in pages[0].encode()
    assert len(kafka) > 1000
    haystack = logs.encode() + kafka + envelopes + "".join(pages).encode()
    for name, secret in zip(("OKX_API_KEY", "OKX_API_SECRET", "OKX_API_PASSPHRASE"), keys.values(), strict=True):
        found = sum(1 for f in _forms(secret) if f in haystack)
        if found:  # never print the pieces: a failing run must not leak them into CI output either
            pytest.fail(f"{name} leaked: {found} of its forms or {PIECE}-character pieces found")


@pytest.fixture(autouse=True)
def _no_sentry_left_behind() -> None:
    """Sentry is process-global: make sure no other test starts with this one's client."""
    assert not sentry_sdk.get_client().is_active()
