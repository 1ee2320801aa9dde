"""TLS for OKX connections: verification always on, plus optional SPKI pinning that fails closed.

A pin is the base64 SHA-256 of a certificate's SubjectPublicKeyInfo (the HPKP form, also accepted with a
`sha256/` prefix). When pins are configured, a connection is accepted only if some certificate of the
verified chain (leaf, intermediate or root) has a pinned key, and the check runs inside the TLS handshake,
before a single byte of the request (and so before any signed header) is written.

The check lives in the SSLObject class of the context (`SSLContext.sslobject_class`), so one context works
for every asyncio client: httpx/httpcore (anyio `TLSStream`), `websockets` and aiohttp (asyncio's and
uvloop's SSL protocol), which all wrap the connection with `context.wrap_bio()` and call `do_handshake()`.
"""

from __future__ import annotations

import _ssl
import base64
import hashlib
import ssl
from collections.abc import Collection, Iterable, Sequence

import certifi
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from ingest.core.pins import PIN_PREFIX as PIN_PREFIX
from ingest.core.pins import normalize_pin as normalize_pin
from ingest.errors import ConfigError, IngestError


class TlsPinError(IngestError, ssl.SSLCertVerificationError):
    """A TLS peer's certificate chain matched none of the configured SPKI pins; never retried.

    It is an `ssl.SSLCertVerificationError` too, so TLS stacks treat it as a failed handshake and close
    the connection before any application data is sent.
    """

    retriable = False

    host: str
    pins: tuple[str, ...]
    seen: tuple[str, ...]

    def __new__(cls, host: str, pins: Collection[str], seen: Sequence[str]) -> TlsPinError:
        # OSError spreads extra constructor args over errno/strerror; give it the message alone.
        self = super().__new__(cls, _pin_message(host, pins, seen))
        self.host, self.pins, self.seen = host, tuple(sorted(pins)), tuple(seen)
        return self

    def __init__(self, host: str, pins: Collection[str], seen: Sequence[str]) -> None:
        super().__init__(_pin_message(host, pins, seen))

    def __str__(self) -> str:
        return _pin_message(self.host, self.pins, self.seen)

    def __reduce__(self) -> tuple[object, ...]:
        return (type(self), (self.host, self.pins, self.seen))


def _pin_message(host: str, pins: Collection[str], seen: Sequence[str]) -> str:
    return (
        f"TLS pin check failed for {host}: no certificate in its chain (SPKI sha256: "
        f"{', '.join(seen) or 'no chain'}) matches okx.tls_spki_pins ({', '.join(sorted(pins))}); the "
        "connection was refused before sending anything. If OKX rotated its keys, verify the new chain "
        "out of band and update okx.tls_spki_pins; if not, someone may be intercepting this connection."
    )


def spki_sha256(der_cert: bytes) -> str:
    """The pin of one DER certificate: base64(SHA-256(SubjectPublicKeyInfo))."""
    cert = x509.load_der_x509_certificate(der_cert)
    spki = cert.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return base64.b64encode(hashlib.sha256(spki).digest()).decode()


def peer_chain(ssl_object: ssl.SSLObject | ssl.SSLSocket) -> list[bytes]:
    """The verified chain of a connected TLS object as DER certificates, leaf first.

    Python 3.13 has a public `get_verified_chain()`; 3.11 and 3.12 have it on the C object only. Without
    either, the leaf alone is returned (pin a leaf key then, or upgrade Python).
    """
    public = getattr(ssl_object, "get_verified_chain", None)
    if public is not None:
        return [bytes(c) for c in public()]
    inner = getattr(ssl_object, "_sslobj", None)
    chain_fn = getattr(inner, "get_verified_chain", None)
    if chain_fn is not None:
        return [c.public_bytes(_ssl.ENCODING_DER) for c in chain_fn() or ()]
    leaf = ssl_object.getpeercert(binary_form=True)
    return [leaf] if leaf else []


def check_spki_pins(host: str, chain_der: Iterable[bytes], pins: Collection[str]) -> None:
    """Raise TlsPinError unless some certificate of `chain_der` has a pinned SPKI; no pins, no check."""
    if not pins:
        return
    wanted = {normalize_pin(p) for p in pins}
    seen = [spki_sha256(der) for der in chain_der]
    if wanted.isdisjoint(seen):
        raise TlsPinError(host, wanted, seen)


def verify_connection_pins(ssl_object: ssl.SSLObject | ssl.SSLSocket, pins: Collection[str]) -> None:
    """Check the pins of an already connected TLS object (e.g. `transport.get_extra_info("ssl_object")`).

    Prefer `client_ssl_context(pins)`, which checks during the handshake; this is for connections made
    with a context you do not control.
    """
    check_spki_pins(ssl_object.server_hostname or "?", peer_chain(ssl_object), pins)


class _PinnedSSLObject(ssl.SSLObject):
    """An SSLObject whose handshake also checks the context's SPKI pins (asyncio, uvloop, anyio)."""

    def do_handshake(self) -> None:
        super().do_handshake()
        pins: frozenset[str] = getattr(self.context, "spki_pins", frozenset())
        if pins:
            verify_connection_pins(self, pins)


class _PinnedSSLSocket(ssl.SSLSocket):
    """The blocking-socket counterpart of `_PinnedSSLObject` (sync clients, `requests`-style code)."""

    def do_handshake(self, block: bool = False) -> None:
        super().do_handshake(block)
        pins: frozenset[str] = getattr(self.context, "spki_pins", frozenset())
        if pins:
            verify_connection_pins(self, pins)


class PinnedSSLContext(ssl.SSLContext):
    """A client context that verifies certificates and host names and, if `spki_pins` is set, the pins."""

    spki_pins: frozenset[str]
    sslobject_class = _PinnedSSLObject
    sslsocket_class = _PinnedSSLSocket


def client_ssl_context(
    pins: Iterable[str] = (), *, cafile: str | None = None, cadata: str | None = None,
    extra_cafile: str | None = None,
) -> PinnedSSLContext:
    """The TLS context for every OKX connection, REST and WebSocket alike.

    Certificates are verified against certifi's roots (or `cafile`/`cadata`, for tests with a local CA), plus
    `extra_cafile` (`okx.ca_bundle`: a TLS-inspecting proxy's CA), and the host name is checked; there is
    deliberately no switch to turn verification off.
    """
    ctx = PinnedSSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.check_hostname = True
    if cafile is None and cadata is None:
        ctx.load_verify_locations(cafile=certifi.where())
    else:
        ctx.load_verify_locations(cafile=cafile, cadata=cadata)
    if extra_cafile is not None:
        try:
            ctx.load_verify_locations(cafile=extra_cafile)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError("okx.ca_bundle", f"{extra_cafile} cannot be loaded ({exc})",
                              "point it at a PEM file of CA certificates") from None
    ctx.spki_pins = frozenset(normalize_pin(p) for p in pins)
    return ctx


def find_pin_error(exc: BaseException) -> TlsPinError | None:
    """The TlsPinError behind a wrapped connect error (httpx.ConnectError, websockets, aiohttp), if any."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        if isinstance(current, TlsPinError):
            return current
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return None
