"""OKX through an HTTPS (CONNECT) proxy, with an extra CA bundle, on loopback.

"OKX" is the simulator behind stunnel with a certificate from a CA generated here (as a TLS-inspecting
corporate proxy's CA would be: not among the public roots), and the proxy is a small CONNECT proxy in this
file that records which targets it tunnelled to.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from ingest.config import OkxSettings, load_settings
from ingest.core.clock import ServerClock
from ingest.core.events import Inbound, LinkEventKind
from ingest.errors import IngestError
from ingest.io.broker import free_port
from ingest.io.rest import OkxRestClient
from ingest.services.connections import ConnectionManager
from ingest.sim import SimConfig, SimServer
from tests.integration._ws_support import Recorder, count, fast_ws, local_clock, running
from tests.integration.tls_support import Pki, make_pki, stunnel


@dataclass
class ConnectProxy:
    """An HTTP proxy that only tunnels (CONNECT), as corporate proxies do for HTTPS."""

    port: int = 0
    targets: list[str] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            method, target, _ = head.split(b"\r\n", 1)[0].decode().split(" ", 2)
            if method != "CONNECT":
                writer.write(b"HTTP/1.1 405 Method Not Allowed\r\nContent-Length: 0\r\n\r\n")
                return
            self.targets.append(target)
            host, _, port = target.rpartition(":")
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1" if host == "localhost" else host,
                                                                 int(port))
            writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
            await writer.drain()
            await asyncio.gather(_pipe(reader, up_writer), _pipe(up_reader, writer))
        except (OSError, asyncio.IncompleteReadError, ValueError):
            pass
        finally:
            writer.close()


async def _pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
    try:
        while data := await src.read(65536):
            dst.write(data)
            await dst.drain()
    except OSError:
        pass
    finally:
        with contextlib.suppress(OSError):
            dst.close()


@dataclass(frozen=True)
class TlsOkx:
    rest: str
    ws: str
    pki: Pki
    sim: SimServer


@pytest.fixture
async def proxy() -> AsyncIterator[ConnectProxy]:
    p = ConnectProxy(port=free_port())
    server = await asyncio.start_server(p.handle, "127.0.0.1", p.port)
    try:
        yield p
    finally:
        server.close()
        await server.wait_closed()


@pytest.fixture
async def tls_okx(tmp_path: Path) -> AsyncIterator[TlsOkx]:
    pki = make_pki(tmp_path / "pki", ("localhost",))
    config = SimConfig(instruments=("BTC-USDT",), auto_tick_s=None)
    async with SimServer(config, host="127.0.0.1", port=0) as sim, stunnel(tmp_path, pki, sim.port) as port:
        yield TlsOkx(f"https://localhost:{port}", f"wss://localhost:{port}", pki, sim)


def okx_settings(okx: TlsOkx, **kw: object) -> OkxSettings:
    return load_settings(None, okx={"rest_base_url": okx.rest, "ws_base_url": okx.ws, "instruments": ["BTC-USDT"],
                                    "channels": ["trades"], **kw}).okx


async def rest_time(okx: OkxSettings) -> list[dict[str, object]]:
    settings = load_settings(None, okx=okx.model_dump(mode="json"), backfill={"max_attempts": 1})
    clock = ServerClock(lambda: 0)
    async with OkxRestClient.from_settings(settings, clock) as client:
        return await client.get("/api/v5/public/time")


async def test_rest_goes_through_the_proxy_and_trusts_the_extra_ca_bundle(
        tls_okx: TlsOkx, proxy: ConnectProxy) -> None:
    rows = await rest_time(okx_settings(tls_okx, proxy=proxy.url, ca_bundle=str(tls_okx.pki.ca)))
    assert "ts" in rows[0]
    assert proxy.targets == [tls_okx.rest.removeprefix("https://")]


async def test_without_the_extra_ca_bundle_the_inspecting_proxys_certificate_is_refused(
        tls_okx: TlsOkx, proxy: ConnectProxy) -> None:
    with pytest.raises((httpx.ConnectError, IngestError), match="CERTIFICATE_VERIFY_FAILED"):
        await rest_time(okx_settings(tls_okx, proxy=proxy.url))
    assert proxy.targets  # it did go through the proxy: the refusal is the certificate's


async def test_https_proxy_from_the_environment_and_no_proxy_bypass(
        tls_okx: TlsOkx, proxy: ConnectProxy, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HTTPS_PROXY", proxy.url)
    await rest_time(okx_settings(tls_okx, ca_bundle=str(tls_okx.pki.ca)))
    assert len(proxy.targets) == 1
    monkeypatch.setenv("NO_PROXY", "example.org,localhost")
    await rest_time(okx_settings(tls_okx, ca_bundle=str(tls_okx.pki.ca)))
    assert len(proxy.targets) == 1  # bypassed: straight to OKX


async def test_websocket_subscribes_through_the_proxy_with_the_extra_ca_bundle(
        tls_okx: TlsOkx, proxy: ConnectProxy) -> None:
    okx = okx_settings(tls_okx, proxy=proxy.url, ca_bundle=str(tls_okx.pki.ca))
    queue: asyncio.Queue[Inbound] = asyncio.Queue(10_000)
    rec = Recorder(queue)
    manager = ConnectionManager(okx, fast_ws(), queue, clock=local_clock())
    async with running(rec.run(), manager.run()):
        await rec.wait_for(lambda items: count(LinkEventKind.SUBSCRIBED)(items) == 1, timeout=10)
    assert proxy.targets and set(proxy.targets) == {tls_okx.ws.removeprefix("wss://")}
    assert tls_okx.sim.stats.ws_connects >= 1
