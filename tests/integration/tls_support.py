"""A TLS (or mutual-TLS) Kafka endpoint for tests: the embedded broker behind Debian's stunnel4.

The broker listens in plain text on a loopback port and advertises the stunnel port, so every connection a
client makes (bootstrap and partition leaders alike) goes through TLS. The CA, server and client certificates
are generated per test with `cryptography`; nothing is read from or written to the repository.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import ipaddress
import shutil
import subprocess
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from ingest.io.broker import EmbeddedBroker, free_port


@dataclass(frozen=True)
class Pki:
    """Files of a throwaway PKI: a CA, a server certificate and a client certificate (plain and encrypted key)."""

    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    client_key_encrypted: Path
    client_key_password: str
    other_ca: Path  # a CA that signed nothing of the above


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _ca(cn: str) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    cert = (x509.CertificateBuilder().subject_name(_name(cn)).issuer_name(_name(cn)).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                         content_commitment=False, key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, encipher_only=False, decipher_only=False),
                           critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256()))
    return key, cert


def _leaf(ca_key: ec.EllipticCurvePrivateKey, ca_cert: x509.Certificate, cn: str, names: Sequence[str],
          usage: x509.ObjectIdentifier) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    sans: list[x509.GeneralName] = []
    for n in names:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(n)))
        except ValueError:
            sans.append(x509.DNSName(n))
    builder = (x509.CertificateBuilder().subject_name(_name(cn)).issuer_name(ca_cert.subject)
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=1))
               .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
               .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
               .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                              critical=False))
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    return key, builder.sign(ca_key, hashes.SHA256())


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _key_pem(key: ec.EllipticCurvePrivateKey, password: str | None = None) -> bytes:
    enc: serialization.KeySerializationEncryption = (
        serialization.BestAvailableEncryption(password.encode()) if password else serialization.NoEncryption())
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, enc)


def make_pki(directory: Path, server_names: Sequence[str] = ("localhost",)) -> Pki:
    """A fresh PKI in `directory`; the server certificate names `server_names` (DNS names or IPs) only."""
    import secrets

    directory.mkdir(parents=True, exist_ok=True)
    ca_key, ca_cert = _ca("okx-ingest test CA")
    s_key, s_cert = _leaf(ca_key, ca_cert, server_names[0], server_names, ExtendedKeyUsageOID.SERVER_AUTH)
    c_key, c_cert = _leaf(ca_key, ca_cert, "okx-ingest-client", (), ExtendedKeyUsageOID.CLIENT_AUTH)
    _, other = _ca("unrelated CA")
    password = secrets.token_hex(8)
    files = {"ca.pem": _pem(ca_cert), "server.pem": _pem(s_cert), "server.key": _key_pem(s_key),
             "client.pem": _pem(c_cert), "client.key": _key_pem(c_key),
             "client-encrypted.key": _key_pem(c_key, password), "other-ca.pem": _pem(other)}
    for name, data in files.items():
        (directory / name).write_bytes(data)
        if name.endswith(".key"):
            (directory / name).chmod(0o600)
    return Pki(directory / "ca.pem", directory / "server.pem", directory / "server.key", directory / "client.pem",
               directory / "client.key", directory / "client-encrypted.key", password, directory / "other-ca.pem")


def stunnel_binary() -> str:
    """stunnel from Debian's stunnel4 package; its absence fails the test with the install line."""
    found = shutil.which("stunnel4") or shutil.which("stunnel")
    if found is None:
        raise RuntimeError("stunnel is not installed: apt-get install -y stunnel4")
    return found


@dataclass
class TlsKafka:
    """A running TLS endpoint: where to connect and the PKI that secures it."""

    bootstrap_servers: str
    port: int
    pki: Pki
    broker: EmbeddedBroker


async def _wait_listening(port: int, proc: subprocess.Popen[bytes], log: Path, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            text = await asyncio.to_thread(log.read_text, errors="replace")
            raise RuntimeError(f"stunnel exited with {proc.returncode}: {text[-2000:]}")
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            await asyncio.sleep(0.05)  # polling an external process's readiness, not synchronising tasks
            continue
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
        return
    raise RuntimeError(f"stunnel did not listen on {port} within {timeout_s} s")


def _spawn(argv: list[str]) -> subprocess.Popen[bytes]:
    """Popen returns at once (fork + exec): safe on the event loop."""
    return subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)


@contextlib.asynccontextmanager
async def stunnel(directory: Path, pki: Pki, target_port: int, *, mutual: bool = False) -> AsyncIterator[int]:
    """TLS on a free loopback port (yielded) in front of `target_port` (plain TCP), with the PKI's server
    certificate; with `mutual`, clients must show a certificate of the PKI's CA."""
    tls_port = free_port()
    log = directory / f"stunnel-{tls_port}.log"
    conf = directory / f"stunnel-{tls_port}.conf"
    lines = ["foreground = yes", "pid =", f"output = {log}", "debug = 5", "[tls]",
             f"accept = 127.0.0.1:{tls_port}", f"connect = 127.0.0.1:{target_port}",
             f"cert = {pki.server_cert}", f"key = {pki.server_key}"]
    if mutual:
        lines += [f"CAfile = {pki.ca}", "verifyChain = yes", "requireCert = yes"]
    conf.write_text("\n".join(lines) + "\n")
    proc = _spawn([stunnel_binary(), str(conf)])
    try:
        await _wait_listening(tls_port, proc, log)
        yield tls_port
    finally:
        proc.terminate()
        try:
            await asyncio.to_thread(proc.wait, 10)
        except subprocess.TimeoutExpired:
            proc.kill()
            await asyncio.to_thread(proc.wait, 10)


@contextlib.asynccontextmanager
async def tls_kafka(directory: Path, *, mutual: bool, server_names: Sequence[str] = ("localhost",),
                    advertised_host: str = "localhost") -> AsyncIterator[TlsKafka]:
    """The embedded broker behind stunnel on a free port; with `mutual`, clients must show a certificate of
    the test CA."""
    pki = make_pki(directory / "pki", server_names)
    plain_port = free_port()
    async with stunnel(directory, pki, plain_port, mutual=mutual) as tls_port:
        broker = EmbeddedBroker(port=plain_port, advertised=f"{advertised_host}:{tls_port}")
        try:
            await broker.start()
            yield TlsKafka(f"{advertised_host}:{tls_port}", tls_port, pki, broker)
        finally:
            await broker.stop()
