"""The schema registry client against a small fake that follows the Confluent REST API.

The fake is a protocol double of an external service we cannot run here; it implements only what the
client uses: `POST /subjects/{subject}/versions` with the registry content type, answering `{"id": N}`
with ids global across subjects (as the real registry does), and its error bodies.
"""

from __future__ import annotations

import asyncio
import base64
import json
import secrets
import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from ingest.config import KafkaSettings
from ingest.io.broker import free_port
from ingest.io.registry import CONTENT_TYPE, RegistryError, SchemaRegistry, subject_for
from tests.integration.tls_support import make_pki

TRADE = json.dumps({"type": "record", "name": "Trade", "namespace": "okx.ingest.v1",
                    "fields": [{"name": "px", "type": "string"}]})
BOOK = json.dumps({"type": "record", "name": "Book", "namespace": "okx.ingest.v1",
                   "fields": [{"name": "seqId", "type": "long"}]})


@dataclass
class FakeRegistry:
    ids: dict[str, int] = field(default_factory=dict)  # schema text -> global id
    registered: list[tuple[str, int]] = field(default_factory=list)  # (subject, id) per successful call
    requests: int = 0
    authorization: list[str | None] = field(default_factory=list)
    incompatible: set[str] = field(default_factory=set)  # subjects that refuse new schemas
    fail_with: list[int] = field(default_factory=list)  # statuses to answer the next requests with

    async def register(self, request: web.Request) -> web.Response:
        self.requests += 1
        self.authorization.append(request.headers.get("Authorization"))
        if request.content_type != CONTENT_TYPE:
            return self.error(415, 415, f"unsupported content type {request.content_type}")
        if self.fail_with:
            return self.error(self.fail_with.pop(0), 50003, "Error while forwarding the request to the leader")
        subject = request.match_info["subject"]
        schema = json.loads(await request.read())["schema"]
        try:
            json.loads(schema)
        except ValueError:
            return self.error(422, 42201, "Invalid schema")
        if subject in self.incompatible:
            return self.error(409, 409, "Schema being registered is incompatible with an earlier schema")
        schema_id = self.ids.setdefault(schema, len(self.ids) + 1)
        self.registered.append((subject, schema_id))
        return web.json_response({"id": schema_id}, content_type=CONTENT_TYPE)

    @staticmethod
    def error(status: int, code: int, message: str) -> web.Response:
        return web.json_response({"error_code": code, "message": message}, status=status, content_type=CONTENT_TYPE)


@pytest.fixture
async def fake() -> AsyncIterator[tuple[FakeRegistry, str]]:
    registry = FakeRegistry()
    app = web.Application()
    app.router.add_post("/subjects/{subject}/versions", registry.register)
    server = TestServer(app)
    await server.start_server()
    try:
        yield registry, str(server.make_url(""))
    finally:
        await server.close()


async def test_registers_under_the_topic_value_subject_and_returns_the_id(fake: tuple[FakeRegistry, str]) -> None:
    registry, url = fake
    async with SchemaRegistry(url) as client:
        assert await client.schema_id("okx.trades", TRADE) == 1
    assert registry.registered == [("okx.trades-value", 1)]
    assert subject_for("okx.trades") == "okx.trades-value"


async def test_ids_are_cached_and_concurrent_callers_share_one_request(fake: tuple[FakeRegistry, str]) -> None:
    registry, url = fake
    async with SchemaRegistry(url) as client:
        ids = await asyncio.gather(*(client.schema_id("okx.trades", TRADE) for _ in range(10)))
        assert await client.schema_id("okx.trades", TRADE) == 1
    assert ids == [1] * 10
    assert registry.requests == 1


async def test_same_schema_on_two_topics_shares_the_id_and_each_subject_is_registered(
    fake: tuple[FakeRegistry, str]
) -> None:
    registry, url = fake
    async with SchemaRegistry(url) as client:
        assert await client.schema_id("okx.trades", TRADE) == 1
        assert await client.schema_id("okx.trades.backfill", TRADE) == 1
        assert await client.schema_id("okx.books", BOOK) == 2
    assert [s for s, _ in registry.registered] == ["okx.trades-value", "okx.trades.backfill-value", "okx.books-value"]


async def test_an_incompatible_schema_is_a_permanent_error_naming_the_subject_and_the_fix(
    fake: tuple[FakeRegistry, str]
) -> None:
    registry, url = fake
    registry.incompatible.add("okx.trades-value")
    async with SchemaRegistry(url) as client:
        with pytest.raises(RegistryError) as err:
            await client.schema_id("okx.trades", TRADE)
    assert not err.value.retriable and err.value.status == 409
    assert "okx.trades-value" in str(err.value) and "compatib" in str(err.value)


async def test_a_server_error_is_retriable_and_not_cached(fake: tuple[FakeRegistry, str]) -> None:
    registry, url = fake
    registry.fail_with.append(503)
    async with SchemaRegistry(url) as client:
        with pytest.raises(RegistryError) as err:
            await client.schema_id("okx.trades", TRADE)
        assert err.value.retriable and err.value.status == 503
        assert await client.schema_id("okx.trades", TRADE) == 1
    assert registry.requests == 2


async def test_an_unreachable_registry_is_retriable() -> None:
    async with SchemaRegistry(f"http://127.0.0.1:{free_port()}", timeout_s=2.0) as client:
        with pytest.raises(RegistryError) as err:
            await client.schema_id("okx.trades", TRADE)
    assert err.value.retriable and "unreachable" in str(err.value)


async def test_a_schema_that_is_not_json_is_refused_before_any_request(fake: tuple[FakeRegistry, str]) -> None:
    registry, url = fake
    async with SchemaRegistry(url) as client:
        with pytest.raises(RegistryError) as err:
            await client.schema_id("okx.trades", "{not json")
    assert not err.value.retriable and registry.requests == 0


async def test_credentials_in_the_url_authenticate_and_never_show_in_errors_or_logs(
        fake: tuple[FakeRegistry, str], caplog: pytest.LogCaptureFixture) -> None:
    import base64
    import logging
    import secrets

    caplog.set_level(logging.DEBUG)
    registry, url = fake
    password = secrets.token_hex(12)
    with_userinfo = url.replace("http://", f"http://svc-okx:{password}@")
    async with SchemaRegistry(with_userinfo) as client:
        assert password not in client.url
        await client.schema_id("okx.trades", TRADE)
        registry.incompatible.add("okx.books-value")
        with pytest.raises(RegistryError) as err:
            await client.schema_id("okx.books", BOOK)
    assert registry.authorization[0] == "Basic " + base64.b64encode(f"svc-okx:{password}".encode()).decode()
    assert "schema_registered" in caplog.text  # the registry URL was logged, without the password
    assert password not in str(err.value) and password not in caplog.text


async def test_bearer_token_comes_from_the_credential_store_and_rotates(
        fake: tuple[FakeRegistry, str], tmp_path: Path) -> None:
    registry, url = fake
    token_file = tmp_path / "registry-token"
    first, second = secrets.token_hex(16), secrets.token_hex(16)
    token_file.write_text(first)
    kafka = KafkaSettings(schema_registry_url=url)
    async with SchemaRegistry.from_settings(kafka, env={"SCHEMA_REGISTRY_TOKEN_FILE": str(token_file)}) as client:
        await client.schema_id("okx.trades", TRADE)
        token_file.write_text(second)
        await client.schema_id("okx.books", BOOK)
    assert registry.authorization == [f"Bearer {first}", f"Bearer {second}"]


async def test_basic_auth_user_from_settings_password_from_the_store(fake: tuple[FakeRegistry, str]) -> None:
    registry, url = fake
    password = secrets.token_hex(12)
    kafka = KafkaSettings(schema_registry_url=url, schema_registry_username="sr-user")
    async with SchemaRegistry.from_settings(kafka, env={"SCHEMA_REGISTRY_PASSWORD": password}) as client:
        await client.schema_id("okx.trades", TRADE)
    assert registry.authorization == ["Basic " + base64.b64encode(f"sr-user:{password}".encode()).decode()]


async def test_https_registry_with_its_own_ca_and_a_client_certificate(tmp_path: Path) -> None:
    pki = make_pki(tmp_path, ("127.0.0.1",))
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(pki.ca))
    server_ctx.load_cert_chain(pki.server_cert, pki.server_key)
    server_ctx.verify_mode = ssl.CERT_REQUIRED  # mutual TLS: no client certificate, no answer
    registry = FakeRegistry()
    app = web.Application()
    app.router.add_post("/subjects/{subject}/versions", registry.register)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port, ssl_context=server_ctx).start()
    try:
        url = f"https://127.0.0.1:{port}"
        with_cert = KafkaSettings(schema_registry_url=url, schema_registry_cafile=pki.ca,
                                  schema_registry_certfile=pki.client_cert, schema_registry_keyfile=pki.client_key)
        async with SchemaRegistry.from_settings(with_cert, env={}) as client:
            assert await client.schema_id("okx.trades", TRADE) == 1
        without = KafkaSettings(schema_registry_url=url, schema_registry_cafile=pki.ca)
        async with SchemaRegistry.from_settings(without, env={}) as client:
            with pytest.raises(RegistryError) as err:
                await client.schema_id("okx.books", BOOK)
        assert err.value.retriable
    finally:
        await runner.cleanup()
