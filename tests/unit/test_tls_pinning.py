"""SPKI pinning: verification stays on, a pinned key lets the connection through, any other is refused
before a byte of the request is sent, for httpx (REST) and websockets (WS) alike.

The server certificate is generated here with `cryptography` for each run (never committed) and served by
a local aiohttp TLS server.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import ipaddress
import secrets
import ssl
import subprocess
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
import websockets.asyncio.client as ws_client
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from ingest.config import load_settings
from ingest.core.clock import ServerClock
from ingest.credentials import CredentialStore
from ingest.errors import ConfigError
from ingest.io.rest import LimiterRegistry, OkxRestClient
from ingest.io.tls import (
    TlsPinError,
    check_spki_pins,
    client_ssl_context,
    find_pin_error,
    normalize_pin,
    spki_sha256,
)


@dataclass(frozen=True)
class CertFiles:
    cert_pem: str
    cert_path: Path
    key_path: Path
    pin: str


def _make_cert(tmp: Path, name: str) -> CertFiles:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(hours=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                    x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                       critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = tmp / f"{name}.pem", tmp / f"{name}.key"
    pem = cert.public_bytes(serialization.Encoding.PEM)
    cert_path.write_bytes(pem)
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    spki = key.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return CertFiles(pem.decode(), cert_path, key_path, base64.b64encode(hashlib.sha256(spki).digest()).decode())


@pytest.fixture(scope="module")
def cert(tmp_path_factory: pytest.TempPathFactory) -> CertFiles:
    return _make_cert(tmp_path_factory.mktemp("tls"), "server")


@pytest.fixture(scope="module")
def other_cert(tmp_path_factory: pytest.TempPathFactory) -> CertFiles:
    return _make_cert(tmp_path_factory.mktemp("tls-other"), "other")


@dataclass
class TlsServer:
    port: int
    hits: list[str] = field(default_factory=list)

    def url(self, scheme: str = "https") -> str:
        return f"{scheme}://localhost:{self.port}"


@pytest.fixture
async def tls_server(cert: CertFiles) -> AsyncIterator[TlsServer]:
    """A local HTTPS + WSS server; `hits` records every request that reached it."""
    state = TlsServer(0)

    async def time(request: web.Request) -> web.Response:
        state.hits.append(request.raw_path)
        return web.json_response({"code": "0", "msg": "", "data": [{"ts": "1700000000000"}]})

    async def ws(request: web.Request) -> web.WebSocketResponse:
        state.hits.append(request.raw_path)
        sock = web.WebSocketResponse()
        await sock.prepare(request)
        await sock.close()
        return sock

    app = web.Application()
    app.router.add_get("/api/v5/public/time", time)
    app.router.add_get("/api/v5/account/config", time)
    app.router.add_get("/ws/v5/public", ws)
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(cert.cert_path, cert.key_path)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=server_ctx)
    await site.start()
    state.port = runner.addresses[0][1]
    try:
        yield state
    finally:
        await runner.cleanup()


WRONG_PIN = base64.b64encode(hashlib.sha256(b"some other key").digest()).decode()


def test_pin_of_a_certificate_is_the_sha256_of_its_subject_public_key_info(cert: CertFiles) -> None:
    der = x509.load_pem_x509_certificate(cert.cert_pem.encode()).public_bytes(serialization.Encoding.DER)
    assert spki_sha256(der) == cert.pin


def test_pin_matches_openssl_computation(cert: CertFiles) -> None:
    pubkey = subprocess.run(["openssl", "x509", "-in", str(cert.cert_path), "-pubkey", "-noout"],
                            check=True, capture_output=True).stdout
    der = subprocess.run(["openssl", "pkey", "-pubin", "-outform", "der"], input=pubkey, check=True,
                         capture_output=True).stdout
    assert base64.b64encode(hashlib.sha256(der).digest()).decode() == cert.pin


def test_pins_are_accepted_bare_or_with_sha256_prefix_and_anything_else_is_refused() -> None:
    assert normalize_pin(f"sha256/{WRONG_PIN}") == WRONG_PIN
    assert normalize_pin(f"  {WRONG_PIN}\n") == WRONG_PIN
    for bad in ("not base64!", base64.b64encode(b"short").decode(), ""):
        with pytest.raises(ValueError, match="pin"):
            normalize_pin(bad)


def test_config_validates_and_normalizes_pins() -> None:
    s = load_settings(okx={"tls_spki_pins": [f"sha256/{WRONG_PIN}"]})
    assert s.okx.tls_spki_pins == [WRONG_PIN]
    with pytest.raises(ConfigError, match=r"okx\.tls_spki_pins"):
        load_settings(okx={"tls_spki_pins": ["abc"]})


def test_chain_check_needs_one_pinned_certificate_and_names_host_and_pins(cert: CertFiles) -> None:
    der = x509.load_pem_x509_certificate(cert.cert_pem.encode()).public_bytes(serialization.Encoding.DER)
    check_spki_pins("openapi.okx.com", [der], [WRONG_PIN, cert.pin])
    check_spki_pins("openapi.okx.com", [der], [])
    with pytest.raises(TlsPinError) as info:
        check_spki_pins("openapi.okx.com", [der], [WRONG_PIN])
    text = str(info.value)
    assert "openapi.okx.com" in text and WRONG_PIN in text and cert.pin in text and "refused" in text
    assert not info.value.retriable


async def test_matching_pin_lets_httpx_through(tls_server: TlsServer, cert: CertFiles) -> None:
    ctx = client_ssl_context([WRONG_PIN, cert.pin], cadata=cert.cert_pem)
    async with httpx.AsyncClient(verify=ctx) as client:
        response = await client.get(f"{tls_server.url()}/api/v5/public/time")
    assert response.status_code == 200
    assert tls_server.hits == ["/api/v5/public/time"]


async def test_non_matching_pin_refuses_httpx_before_sending_anything(tls_server: TlsServer,
                                                                      cert: CertFiles) -> None:
    ctx = client_ssl_context([WRONG_PIN], cadata=cert.cert_pem)
    async with httpx.AsyncClient(verify=ctx) as client:
        with pytest.raises(httpx.ConnectError) as info:
            await client.get(f"{tls_server.url()}/api/v5/public/time")
    pin_error = find_pin_error(info.value)
    assert pin_error is not None and pin_error.host == "localhost"
    assert tls_server.hits == []


async def test_verification_stays_on_even_when_the_pin_matches(tls_server: TlsServer, cert: CertFiles,
                                                               other_cert: CertFiles) -> None:
    ctx = client_ssl_context([cert.pin], cadata=other_cert.cert_pem)  # the server's cert is not trusted
    async with httpx.AsyncClient(verify=ctx) as client:
        with pytest.raises(httpx.ConnectError) as info:
            await client.get(f"{tls_server.url()}/api/v5/public/time")
    assert find_pin_error(info.value) is None
    assert "CERTIFICATE_VERIFY_FAILED" in str(info.value)
    assert tls_server.hits == []


async def test_rest_client_fails_closed_on_a_pin_mismatch_without_retrying(tls_server: TlsServer,
                                                                           cert: CertFiles) -> None:
    env = {"OKX_API_KEY": secrets.token_hex(16), "OKX_API_SECRET": secrets.token_hex(16),
           "OKX_API_PASSPHRASE": secrets.token_hex(8)}
    client = OkxRestClient(clock=ServerClock(lambda: 1_700_000_000_000), credentials=CredentialStore(env),
                           base_url=tls_server.url(), tls_spki_pins=(WRONG_PIN,), ssl_cafile=str(cert.cert_path),
                           registry=LimiterRegistry(), max_attempts=5)
    async with client:
        with pytest.raises(TlsPinError, match="localhost"):
            await client.get("/api/v5/account/config")
    assert tls_server.hits == []
    assert sum(client.stats().retries.values()) == 0


async def test_rest_client_with_the_right_pin_works(tls_server: TlsServer, cert: CertFiles) -> None:
    client = OkxRestClient(clock=ServerClock(lambda: 1_700_000_000_000), base_url=tls_server.url(),
                           tls_spki_pins=(cert.pin,), ssl_cafile=str(cert.cert_path), registry=LimiterRegistry())
    async with client:
        sample = await client.server_time_sample()
    assert sample.server_ms == 1_700_000_000_000


async def test_websocket_connect_with_a_wrong_pin_is_refused(tls_server: TlsServer, cert: CertFiles) -> None:
    ctx = client_ssl_context([WRONG_PIN], cadata=cert.cert_pem)
    with pytest.raises(ssl.SSLCertVerificationError) as info:
        async with ws_client.connect(f"{tls_server.url('wss')}/ws/v5/public", ssl=ctx):
            pass
    assert find_pin_error(info.value) is not None
    assert tls_server.hits == []


async def test_websocket_connect_with_the_right_pin_works(tls_server: TlsServer, cert: CertFiles) -> None:
    ctx = client_ssl_context([cert.pin], cadata=cert.cert_pem)
    async with ws_client.connect(f"{tls_server.url('wss')}/ws/v5/public", ssl=ctx) as conn:
        await conn.wait_closed()
    assert tls_server.hits == ["/ws/v5/public"]


def test_pin_check_also_runs_under_uvloop(cert: CertFiles) -> None:
    """The daemon runs on uvloop, whose SSL protocol is its own port of asyncio's: the check must hold there."""
    import uvloop

    async def scenario() -> tuple[bool, int]:
        hits: list[str] = []

        async def ws(request: web.Request) -> web.WebSocketResponse:
            hits.append(request.raw_path)
            sock = web.WebSocketResponse()
            await sock.prepare(request)
            await sock.close()
            return sock

        app = web.Application()
        app.router.add_get("/ws/v5/public", ws)
        server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        server_ctx.load_cert_chain(cert.cert_path, cert.key_path)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=server_ctx)
        await site.start()
        port = runner.addresses[0][1]
        try:
            try:
                async with ws_client.connect(f"wss://localhost:{port}/ws/v5/public",
                                             ssl=client_ssl_context([WRONG_PIN], cadata=cert.cert_pem)):
                    refused = False
            except ssl.SSLCertVerificationError as exc:
                refused = find_pin_error(exc) is not None
            return refused, len(hits)
        finally:
            await runner.cleanup()

    refused, hits = uvloop.run(scenario())
    assert refused and hits == 0
