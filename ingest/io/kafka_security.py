"""How every Kafka client of the project connects: one function turns `KafkaSettings` into aiokafka kwargs.

`kafka_client_kwargs(settings.kafka)` is what the recorder's producer and admin, the backfill worker's
consumers, `okx-ingest tail` and the archive/replay services pass to `AIOKafkaProducer`, `AIOKafkaConsumer`
and `AIOKafkaAdminClient`, so a cluster reachable by one is reachable by all.

- TLS (`SSL`, `SASL_SSL`): the CA bundle (`ssl_cafile`, else the system's), a client certificate and key for
  mutual TLS (`ssl_certfile`, `ssl_keyfile`, key password from `KAFKA_SSL_KEY_PASSWORD`), host names checked
  unless `ssl_check_hostname = false`.
- SASL PLAIN and SCRAM-SHA-256/512: the user from `sasl_username` (or `KAFKA_SASL_USERNAME`), the password from
  `KAFKA_SASL_PASSWORD`. OAUTHBEARER: a token provider (`sasl_oauth_provider`): AWS MSK IAM (the
  `aws-msk-iam-sasl-signer-python` package, imported only when used), an OIDC client-credentials grant (client
  secret from `KAFKA_OAUTH_CLIENT_SECRET`), or `module:factory` for anything else.

Secrets come from the environment or `*_FILE` (`ingest.credentials.read_secret`), never from the config file,
and are read each time kwargs are built: the sink builds them at every (re)connect, so a rotated secret file
is used from the next connection on. Every value read is registered with the log redactor.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import logging
import os
import ssl
import time
from collections.abc import Callable, Mapping
from typing import Any

import httpx
from aiokafka.abc import AbstractTokenProvider
from aiokafka.helpers import create_ssl_context

from ingest.config import KafkaSettings
from ingest.credentials import Secret, read_optional_secret, read_secret
from ingest.errors import ConfigError, CredentialError
from ingest.obs.redact import REDACTOR

log = logging.getLogger(__name__)

TLS_PROTOCOLS = ("SSL", "SASL_SSL")
SASL_PROTOCOLS = ("SASL_PLAINTEXT", "SASL_SSL")

Env = Mapping[str, str] | None


def kafka_client_kwargs(
    kafka: KafkaSettings, *, bootstrap_servers: str | None = None, client_id: str | None = None, env: Env = None
) -> dict[str, Any]:
    """The connection kwargs shared by AIOKafkaProducer, AIOKafkaConsumer and AIOKafkaAdminClient.

    `bootstrap_servers` overrides the settings' (the embedded broker's real address); `client_id` defaults to
    `kafka.client_id`. Raises ConfigError (a bad file or setting) or CredentialError (a missing secret), both
    naming what to fix.
    """
    kwargs: dict[str, Any] = {
        "bootstrap_servers": bootstrap_servers or kafka.bootstrap_servers,
        "client_id": client_id or kafka.client_id,
        "request_timeout_ms": kafka.request_timeout_ms,
        "retry_backoff_ms": kafka.retry_backoff_ms,
        "security_protocol": kafka.security_protocol,
    }
    if kafka.security_protocol in TLS_PROTOCOLS:
        kwargs["ssl_context"] = kafka_ssl_context(kafka, env=env)
    if kafka.security_protocol in SASL_PROTOCOLS:
        kwargs["sasl_mechanism"] = kafka.sasl_mechanism
        if kafka.sasl_mechanism == "OAUTHBEARER":
            kwargs["sasl_oauth_token_provider"] = oauth_token_provider(kafka, env=env)
        else:
            username, password = sasl_credentials(kafka, env=env)
            kwargs["sasl_plain_username"] = username
            kwargs["sasl_plain_password"] = password.reveal()
    return kwargs


def describe_security(kafka: KafkaSettings) -> dict[str, str | bool | None]:
    """What a connection uses, safe to log (no secret): protocol, mechanism, files, hostname checking."""
    out: dict[str, str | bool | None] = {"security_protocol": kafka.security_protocol}
    if kafka.security_protocol in TLS_PROTOCOLS:
        out.update(ssl_cafile=str(kafka.ssl_cafile) if kafka.ssl_cafile else "system CAs",
                   ssl_certfile=str(kafka.ssl_certfile) if kafka.ssl_certfile else None,
                   ssl_check_hostname=kafka.ssl_check_hostname)
    if kafka.security_protocol in SASL_PROTOCOLS:
        out["sasl_mechanism"] = kafka.sasl_mechanism
        if kafka.sasl_mechanism == "OAUTHBEARER":
            out["sasl_oauth_provider"] = kafka.sasl_oauth_provider
    return out


# -- TLS ---------------------------------------------------------------------------------------------------


def tls_context(
    *,
    cafile: os.PathLike[str] | str | None,
    certfile: os.PathLike[str] | str | None,
    keyfile: os.PathLike[str] | str | None,
    key_password: Secret | None,
    check_hostname: bool = True,
    keys: tuple[str, str, str] = ("kafka.ssl_cafile", "kafka.ssl_certfile", "kafka.ssl_keyfile"),
    password_var: str = "KAFKA_SSL_KEY_PASSWORD",
) -> ssl.SSLContext:
    """A verifying client context (optionally with a client certificate); errors name the setting at fault."""
    ca_key, cert_key, key_key = keys
    for key, path in ((ca_key, cafile), (cert_key, certfile), (key_key, keyfile)):
        if path is not None and not os.path.isfile(path):
            raise ConfigError(key, f"file {os.fspath(path)!r} does not exist", "point it at a readable PEM file")
    try:
        ctx: ssl.SSLContext = create_ssl_context(cafile=cafile)
    except ssl.SSLError as exc:
        raise ConfigError(ca_key, f"is not a PEM CA bundle ({exc.reason or exc})",
                          "give the CA certificate(s) in PEM form") from None
    if certfile is not None:
        password = key_password.reveal() if key_password is not None else None
        try:
            ctx.load_cert_chain(certfile, keyfile, password=password)
        except ssl.SSLError as exc:
            # OpenSSL says "PEM lib" for a wrong password and a broken file alike: tell them apart here.
            key_path = keyfile if keyfile is not None else certfile
            if _encrypted_pem(key_path):
                problem = ("the private key is encrypted and no password was given" if not password else
                           "the private key's password is wrong")
                raise ConfigError(key_key if keyfile else cert_key, problem,
                                  f"set {password_var} (or {password_var}_FILE) to the key's password") from None
            raise ConfigError(cert_key, f"client certificate/key could not be loaded ({exc.reason or exc})",
                              f"give the certificate in PEM form and its matching key in {key_key}") from None
    ctx.check_hostname = check_hostname
    return ctx


def _encrypted_pem(path: os.PathLike[str] | str) -> bool:
    try:
        with open(path, "rb") as f:
            head = f.read(4096)
    except OSError:
        return False
    return b"ENCRYPTED" in head


def _no_prompt(key_password: Secret | None) -> Secret | None:
    # Without a password OpenSSL asks on the terminal for an encrypted key; an empty one makes it fail instead.
    return key_password if key_password is not None else Secret("")


def kafka_ssl_context(kafka: KafkaSettings, *, env: Env = None) -> ssl.SSLContext:
    """The TLS context of `kafka`'s settings (CA, client certificate, key password from the credential store)."""
    key_password = read_optional_secret("KAFKA_SSL_KEY_PASSWORD", env) if kafka.ssl_certfile else None
    return tls_context(cafile=kafka.ssl_cafile, certfile=kafka.ssl_certfile, keyfile=kafka.ssl_keyfile,
                       key_password=_no_prompt(key_password) if kafka.ssl_certfile else None,
                       check_hostname=kafka.ssl_check_hostname)


# -- SASL PLAIN / SCRAM ------------------------------------------------------------------------------------


def sasl_credentials(kafka: KafkaSettings, *, env: Env = None) -> tuple[str, Secret]:
    """The SASL user (`kafka.sasl_username`, else KAFKA_SASL_USERNAME) and password (KAFKA_SASL_PASSWORD)."""
    username = kafka.sasl_username
    if username is None:
        given = read_optional_secret("KAFKA_SASL_USERNAME", env)
        if given is None:
            raise ConfigError("kafka.sasl_username", f"{kafka.security_protocol} with {kafka.sasl_mechanism} needs "
                              "a user", "set kafka.sasl_username, or KAFKA_SASL_USERNAME in the environment")
        username = given.reveal()
    try:
        password = read_secret("KAFKA_SASL_PASSWORD", env)
    except CredentialError as exc:
        raise CredentialError(f"{exc} (the Kafka SASL password of user {username!r})") from None
    return username, password


# -- SASL OAUTHBEARER ----------------------------------------------------------------------------------------


class MskIamTokenProvider(AbstractTokenProvider):  # type: ignore[misc]
    """AWS MSK IAM: a SigV4-presigned token from the standard AWS credential chain (role, env, profile).

    Tokens last 15 minutes; aiokafka asks at each new connection, and one is reused until a minute before it
    expires, so a burst of connections signs once.
    """

    def __init__(self, region: str, *, clock: Callable[[], float] = time.time) -> None:
        try:
            from aws_msk_iam_sasl_signer import MSKAuthTokenProvider
        except ImportError:
            raise ConfigError("kafka.sasl_oauth_provider", "'aws-msk-iam' needs the aws-msk-iam-sasl-signer-python "
                              "package", "pip install 'okx-ingest[msk]' (or aws-msk-iam-sasl-signer-python)") from None
        self.region = region
        self._signer = MSKAuthTokenProvider
        self._clock = clock
        self._token: tuple[str, float] | None = None
        self._lock = asyncio.Lock()

    async def token(self) -> str:
        async with self._lock:
            if self._token is None or self._token[1] - 60.0 <= self._clock():
                token, expiry_ms = await asyncio.to_thread(self._signer.generate_auth_token, self.region)
                self._token = (token, expiry_ms / 1000)
                log.info("kafka_msk_iam_token", extra={"region": self.region,
                                                       "expires_in_s": round(expiry_ms / 1000 - self._clock())})
            return self._token[0]


class OidcTokenProvider(AbstractTokenProvider):  # type: ignore[misc]
    """OAuth 2 client-credentials grant (Confluent Cloud OAuth, Aiven, Strimzi with Keycloak...).

    The client secret is read from the credential store at each fetch (rotation), the token cached until a
    minute before `expires_in`. `transport` swaps the network (tests).
    """

    def __init__(self, kafka: KafkaSettings, *, env: Env = None, transport: httpx.AsyncBaseTransport | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        assert kafka.sasl_oauth_token_url is not None and kafka.sasl_oauth_client_id is not None
        self.token_url = kafka.sasl_oauth_token_url
        self.client_id = kafka.sasl_oauth_client_id
        self.scope = kafka.sasl_oauth_scope
        self._extensions = dict(kafka.sasl_oauth_extensions)
        self._env = env
        self._transport = transport
        self._clock = clock
        self._token: tuple[str, float] | None = None
        self._lock = asyncio.Lock()

    def extensions(self) -> dict[str, str]:
        return dict(self._extensions)

    async def token(self) -> str:
        async with self._lock:
            if self._token is None or self._token[1] - 60.0 <= self._clock():
                self._token = await self._fetch()
            return self._token[0]

    async def _fetch(self) -> tuple[str, float]:
        secret = read_secret("KAFKA_OAUTH_CLIENT_SECRET", self._env)
        form = {"grant_type": "client_credentials"}
        if self.scope:
            form["scope"] = self.scope
        async with httpx.AsyncClient(transport=self._transport, timeout=10.0) as client:
            try:
                resp = await client.post(self.token_url, data=form, auth=(self.client_id, secret.reveal()))
            except httpx.HTTPError as exc:
                raise CredentialError(f"OAuth token endpoint {self.token_url} unreachable: {exc}") from None
        if resp.status_code != 200:
            raise CredentialError(f"OAuth token endpoint {self.token_url} refused client {self.client_id!r} "
                                  f"(HTTP {resp.status_code}); check kafka.sasl_oauth_client_id and "
                                  "KAFKA_OAUTH_CLIENT_SECRET")
        try:
            body = resp.json()
            token = str(body["access_token"])
            expires_in = float(body.get("expires_in", 300))
        except (ValueError, KeyError, TypeError):
            raise CredentialError(f"OAuth token endpoint {self.token_url} answered without an access_token") from None
        REDACTOR.set_secrets([token])
        return token, self._clock() + expires_in


def oauth_token_provider(kafka: KafkaSettings, *, env: Env = None) -> AbstractTokenProvider:
    """The OAUTHBEARER token provider `kafka.sasl_oauth_provider` names."""
    name = kafka.sasl_oauth_provider
    if name == "aws-msk-iam":
        region = kafka.aws_region or (env if env is not None else os.environ).get("AWS_REGION")
        if not region:
            raise ConfigError("kafka.aws_region", "AWS MSK IAM needs the cluster's region",
                              "set kafka.aws_region (or AWS_REGION in the environment)")
        return MskIamTokenProvider(region)
    if name == "oidc":
        return OidcTokenProvider(kafka, env=env)
    module_name, _, attr = name.partition(":")
    try:
        factory = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise ConfigError("kafka.sasl_oauth_provider", f"{name!r} cannot be imported ({exc})",
                          "give 'module:factory' of an installed module") from None
    provider = factory(kafka)
    if not isinstance(provider, AbstractTokenProvider):
        raise ConfigError("kafka.sasl_oauth_provider", f"{name} returned {type(provider).__name__}",
                          "return an aiokafka.abc.AbstractTokenProvider")
    return provider


# -- diagnosis of a failed connection ------------------------------------------------------------------------


async def diagnose_tls(kafka: KafkaSettings, bootstrap_servers: str, *, env: Env = None,
                       timeout_s: float = 3.0) -> str | None:
    """Why a TLS connection to the first bootstrap server fails, in words an operator can act on; None if it
    does not (or TLS is not in use).

    aiokafka reports every TLS failure as "Unable to bootstrap", which hides the two usual causes: a broker that
    requires a client certificate (mutual TLS) and a certificate that does not name the host connected to.
    """
    if kafka.security_protocol not in TLS_PROTOCOLS:
        return None
    first = bootstrap_servers.split(",")[0].strip()
    host, _, port_text = first.rpartition(":")
    host = host.strip("[]")
    try:
        port = int(port_text)
        ctx = kafka_ssl_context(kafka, env=env)
    except (ValueError, ConfigError, CredentialError):
        return None
    writer: asyncio.StreamWriter | None = None
    try:
        async with asyncio.timeout(timeout_s):
            reader, writer = await asyncio.open_connection(host, port, ssl=ctx, server_hostname=host)
            # TLS 1.3 sends the server's refusal of a missing client certificate after the handshake.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(min(1.0, timeout_s / 2)):
                    await reader.read(1)
    except ssl.SSLCertVerificationError as exc:
        detail = exc.verify_message or str(exc)
        if "hostname" in detail.lower() or "ip address mismatch" in detail.lower():
            return (f"the broker's certificate does not name {host!r} ({detail}): connect by a name the "
                    "certificate carries (kafka.bootstrap_servers and the broker's advertised listeners), or, for a "
                    "test setup only, set kafka.ssl_check_hostname = false")
        return (f"the broker's certificate is not trusted ({detail}): set kafka.ssl_cafile to the CA that signed "
                "it")
    except ssl.SSLError as exc:
        text = f"{exc.reason or ''} {exc}".upper()
        if "CERTIFICATE_REQUIRED" in text or ("HANDSHAKE_FAILURE" in text and kafka.ssl_certfile is None):
            return ("the broker requires a client certificate (mutual TLS): set kafka.ssl_certfile and "
                    "kafka.ssl_keyfile (key password in KAFKA_SSL_KEY_PASSWORD)")
        if "UNKNOWN_CA" in text or "BAD_CERTIFICATE" in text:
            return ("the broker refused our client certificate (not signed by a CA it trusts): check "
                    "kafka.ssl_certfile")
        if "WRONG_VERSION_NUMBER" in text or "RECORD_LAYER" in text:
            return "the broker does not speak TLS on this port: use security_protocol PLAINTEXT, or the TLS listener"
        return f"TLS handshake failed: {exc.reason or exc}"
    except (OSError, TimeoutError):
        return None
    finally:
        if writer is not None:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()
    return None
