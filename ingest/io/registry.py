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
import json
import logging
from urllib.parse import quote, unquote, urlsplit, urlunsplit

import httpx

from ingest.credentials import Secret
from ingest.errors import IngestError
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
    ) -> None:
        url, username, password = _split_userinfo(url, username, password)
        auth = httpx.BasicAuth(username, password.reveal()) if username and password else None
        self.url = url.rstrip("/")  # without userinfo: this is what logs and errors show
        self._client = httpx.AsyncClient(base_url=self.url, timeout=timeout_s, auth=auth, transport=transport,
                                         headers={"Accept": CONTENT_TYPE})
        self._ids: dict[tuple[str, str], int] = {}
        self._locks: dict[tuple[str, str], asyncio.Lock] = {}

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


def _message(resp: httpx.Response) -> str:
    try:
        body = resp.json()
    except ValueError:
        return resp.text[:200] or resp.reason_phrase
    if isinstance(body, dict) and "message" in body:
        return f"{body.get('error_code', '')} {body['message']}".strip()
    return str(body)[:200]
