"""A small Confluent Schema Registry client: register each Avro schema, get its id, cache it.

Used only when `kafka.schema_registry_url` is set (wire_format "confluent": magic byte + schema id + Avro).

Subject naming: TopicNameStrategy, `<topic>-value`, the registry's and Confluent serializers' default.
Each of our topics carries one record type (one schema per topic kind), so per-topic subjects give
per-topic compatibility checks and consumers with default deserializer settings find them without
configuration. RecordNameStrategy would only be needed if a topic mixed record types, and ours do not.

Registration is idempotent on the registry side (the same schema under the same subject returns the
existing id), so the client simply registers on first use and caches `(subject, schema) -> id`.
Errors carry `retriable`: network trouble, 429 and 5xx are; an incompatible (409) or invalid (422)
schema, bad credentials (401/403) or a wrong URL (404) are not, and the message names the fix.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import ssl
from collections.abc import Generator, Mapping
from urllib.parse import quote, unquote, urlsplit, urlunsplit

import httpx

from ingest.config import KafkaSettings
from ingest.credentials import Secret, read_optional_secret, read_secret, secret_present
from ingest.errors import ConfigError, IngestError
from ingest.io.kafka_security import tls_context
from ingest.obs.redact import REDACTOR

log = logging.getLogger(__name__)

CONTENT_TYPE = "application/vnd.schemaregistry.v1+json"

_FIXES = {
    401: "check the schema registry credentials",
    403: "check the schema registry credentials and their permissions on this subject",
    404: "check kafka.schema_registry_url (it should be the registry's base URL)",
    409: "evolve the schema compatibly, or change the subject's compatibility level on the registry",
    422: "fix the schema (the registry could not parse it as Avro)",
}


class RegistryError(IngestError):
    """The schema registry refused or could not be reached; `retriable` says whether trying again helps."""

    def __init__(self, message: str, *, status: int | None = None, retriable: bool) -> None:
        super().__init__(message)
        self.status = status
        self.retriable = retriable


def subject_for(topic: str) -> str:
    """TopicNameStrategy: the subject of a topic's record values."""
    return f"{topic}-value"


def _split_userinfo(url: str, username: str | None, password: Secret | None) -> tuple[str, str | None, Secret | None]:
    """`https://user:pass@host` is how registry credentials are often given: use them for basic auth, mask the
    password in every log line, and keep them out of the URL that logs and error messages show."""
    parts = urlsplit(url)
    if parts.username is None:
        return url, username, password
    user, secret = unquote(parts.username), unquote(parts.password or "")
    REDACTOR.set_secrets([secret])
    host = parts.hostname or ""
    netloc = f"[{host}]" if ":" in host else host
    if parts.port is not None:
        netloc = f"{netloc}:{parts.port}"
    return urlunsplit(parts._replace(netloc=netloc)), username or user, password or Secret(secret)


class SchemaRegistry:
    """Registers schemas and caches their ids. Pass `transport` to swap the network (tests, proxies)."""

    def __init__(
        self,
        url: str,
        *,
        timeout_s: float = 10.0,
        username: str | None = None,
        password: Secret | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
        auth: httpx.Auth | None = None,
        verify: ssl.SSLContext | None = None,
    ) -> None:
        url, username, password = _split_userinfo(url, username, password)
        if auth is None and username and password:
            auth = httpx.BasicAuth(username, password.reveal())
        self.url = url.rstrip("/")  # without userinfo: this is what logs and errors show
        self._client = httpx.AsyncClient(base_url=self.url, timeout=timeout_s, auth=auth, transport=transport,
                                         headers={"Accept": CONTENT_TYPE}, verify=verify or True)
        self._ids: dict[tuple[str, str], int] = {}
        self._locks: dict[tuple[str, str], asyncio.Lock] = {}

    @classmethod
    def from_settings(cls, kafka: KafkaSettings, *, env: Mapping[str, str] | None = None,
                      transport: httpx.AsyncBaseTransport | None = None) -> SchemaRegistry:
        """The registry of `kafka.schema_registry_url`, with the credential store's basic auth or bearer token
        (SCHEMA_REGISTRY_PASSWORD / SCHEMA_REGISTRY_TOKEN, read at each request: rotation applies at once) and
        its own CA and client certificate."""
        if not kafka.schema_registry_url:
            raise ConfigError("kafka.schema_registry_url", "is not set", "set it to the registry's base URL")
        auth: httpx.Auth | None = None
        if secret_present("SCHEMA_REGISTRY_TOKEN", env):
            auth = StoreAuth(None, "SCHEMA_REGISTRY_TOKEN", env)
        elif kafka.schema_registry_username is not None:
            auth = StoreAuth(kafka.schema_registry_username, "SCHEMA_REGISTRY_PASSWORD", env)
        verify: ssl.SSLContext | None = None
        if kafka.schema_registry_cafile or kafka.schema_registry_certfile:
            key_password = (read_optional_secret("SCHEMA_REGISTRY_SSL_KEY_PASSWORD", env)
                            if kafka.schema_registry_certfile else None)
            verify = tls_context(
                cafile=kafka.schema_registry_cafile, certfile=kafka.schema_registry_certfile,
                keyfile=kafka.schema_registry_keyfile,
                key_password=(key_password or Secret("")) if kafka.schema_registry_certfile else None,
                keys=("kafka.schema_registry_cafile", "kafka.schema_registry_certfile",
                      "kafka.schema_registry_keyfile"), password_var="SCHEMA_REGISTRY_SSL_KEY_PASSWORD")
        return cls(kafka.schema_registry_url, auth=auth, verify=verify, transport=transport)

    async def __aenter__(self) -> SchemaRegistry:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._client.aclose()

    async def schema_id(self, topic: str, schema: str) -> int:
        """The id of `schema` (Avro schema JSON text) for the values of `topic`, registering it if needed."""
        return await self.register(subject_for(topic), schema)

    async def register(self, subject: str, schema: str) -> int:
        """Register `schema` under `subject` (idempotent) and return its id; cached after the first call."""
        try:
            canonical = json.dumps(json.loads(schema), separators=(",", ":"), sort_keys=True)
        except ValueError as exc:
            raise RegistryError(f"schema for subject {subject} is not JSON: {exc}", retriable=False) from exc
        key = (subject, canonical)
        cached = self._ids.get(key)
        if cached is not None:
            return cached
        async with self._locks.setdefault(key, asyncio.Lock()):  # one request per schema, however many callers
            cached = self._ids.get(key)
            if cached is None:
                cached = self._ids[key] = await self._post(subject, canonical)
                log.info("schema_registered", extra={"subject": subject, "schema_id": cached,
                                                     "registry": self.url})
        return cached

    async def schema_text(self, schema_id: int) -> str:
        """The schema (Avro JSON text) registered under `schema_id`: what a Confluent-framed record was written with."""
        try:
            resp = await self._client.get(f"/schemas/ids/{schema_id}")
        except httpx.HTTPError as exc:
            raise RegistryError(f"schema registry {self.url} unreachable while reading schema id {schema_id}: "
                                f"{exc!r}", retriable=True) from exc
        if resp.status_code != 200:
            status = resp.status_code
            raise RegistryError(f"schema registry has no schema id {schema_id} (HTTP {status}: {_message(resp)})",
                                status=status, retriable=status == 429 or status >= 500)
        try:
            return str(resp.json()["schema"])
        except (ValueError, KeyError, TypeError) as exc:
            raise RegistryError(f"schema registry answered {resp.text[:200]!r} for id {schema_id}",
                                status=resp.status_code, retriable=False) from exc

    async def _post(self, subject: str, schema: str) -> int:
        path = f"/subjects/{quote(subject, safe='')}/versions"
        try:
            resp = await self._client.post(path, content=json.dumps({"schema": schema}).encode(),
                                           headers={"Content-Type": CONTENT_TYPE})
        except httpx.HTTPError as exc:
            raise RegistryError(f"schema registry {self.url} unreachable while registering {subject}: {exc!r}",
                                retriable=True) from exc
        if resp.status_code != 200:
            detail = _message(resp)
            status = resp.status_code
            retriable = status == 429 or status >= 500
            fix = _FIXES.get(status, "retry later" if retriable else "see the registry's message")
            raise RegistryError(f"schema registry refused subject {subject} (HTTP {status}: {detail}). Fix: {fix}",
                                status=status, retriable=retriable)
        try:
            schema_id = resp.json()["id"]
        except (ValueError, KeyError, TypeError) as exc:
            raise RegistryError(f"schema registry answered {resp.text[:200]!r} for {subject}, without an id",
                                status=resp.status_code, retriable=False) from exc
        if not isinstance(schema_id, int):
            raise RegistryError(f"schema registry returned a non-integer id {schema_id!r} for {subject}",
                                status=resp.status_code, retriable=False)
        return schema_id


class StoreAuth(httpx.Auth):
    """Basic auth (a user) or a bearer token (no user) whose secret is read from the credential store at each
    request, so a rotated secret file takes effect without a restart."""

    def __init__(self, username: str | None, secret_name: str, env: Mapping[str, str] | None) -> None:
        self.username = username
        self.secret_name = secret_name
        self._env = env

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        secret = read_secret(self.secret_name, self._env)
        if self.username is None:
            request.headers["Authorization"] = f"Bearer {secret.reveal()}"
        else:
            pair = f"{self.username}:{secret.reveal()}".encode()
            request.headers["Authorization"] = f"Basic {base64.b64encode(pair).decode()}"
        yield request


def _message(resp: httpx.Response) -> str:
    try:
        body = resp.json()
    except ValueError:
        return resp.text[:200] or resp.reason_phrase
    if isinstance(body, dict) and "message" in body:
        return f"{body.get('error_code', '')} {body['message']}".strip()
    return str(body)[:200]
