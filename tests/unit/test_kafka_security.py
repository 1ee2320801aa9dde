"""`kafka_client_kwargs`: what every Kafka client of the project is configured with, secrets from the store."""

from __future__ import annotations

import base64
import io
import json
import logging
import secrets
import sys
import threading
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest

from ingest.config import KafkaSettings
from ingest.errors import ConfigError, CredentialError
from ingest.io.kafka_security import (
    MskIamTokenProvider,
    OidcTokenProvider,
    describe_security,
    kafka_client_kwargs,
)
from ingest.obs.logging import setup_logging


def sasl(**overrides: Any) -> KafkaSettings:
    base: dict[str, Any] = {"bootstrap_servers": "k1:9096", "security_protocol": "SASL_SSL",
                            "sasl_mechanism": "SCRAM-SHA-512", "sasl_username": "recorder"}
    return KafkaSettings(**{**base, **overrides})


def test_plaintext_has_no_tls_and_no_sasl() -> None:
    kw = kafka_client_kwargs(KafkaSettings(bootstrap_servers="k1:9092"), env={})
    assert kw["security_protocol"] == "PLAINTEXT"
    assert "ssl_context" not in kw and "sasl_mechanism" not in kw


def test_scram_over_tls_takes_the_password_from_the_environment_and_checks_host_names() -> None:
    password = secrets.token_hex(12)
    kw = kafka_client_kwargs(sasl(), env={"KAFKA_SASL_PASSWORD": password})
    assert kw["sasl_mechanism"] == "SCRAM-SHA-512"
    assert (kw["sasl_plain_username"], kw["sasl_plain_password"]) == ("recorder", password)
    assert kw["ssl_context"].check_hostname is True


def test_a_rotated_password_file_is_used_by_the_next_client(tmp_path: Path) -> None:
    secret_file = tmp_path / "pw"
    first, second = secrets.token_hex(8), secrets.token_hex(8)
    secret_file.write_text(first + "\n")
    env = {"KAFKA_SASL_PASSWORD_FILE": str(secret_file)}
    assert kafka_client_kwargs(sasl(), env=env)["sasl_plain_password"] == first
    secret_file.write_text(second)
    assert kafka_client_kwargs(sasl(), env=env)["sasl_plain_password"] == second


def test_the_user_may_come_from_the_environment_too() -> None:
    kw = kafka_client_kwargs(sasl(sasl_username=None, sasl_mechanism="PLAIN", security_protocol="SASL_PLAINTEXT"),
                             env={"KAFKA_SASL_USERNAME": "svc-okx", "KAFKA_SASL_PASSWORD": "pw-long-enough"})
    assert kw["sasl_plain_username"] == "svc-okx" and "ssl_context" not in kw


def test_a_missing_password_names_the_variable_and_the_user() -> None:
    with pytest.raises(CredentialError) as err:
        kafka_client_kwargs(sasl(), env={})
    assert "KAFKA_SASL_PASSWORD" in str(err.value) and "'recorder'" in str(err.value)


def test_a_missing_user_names_the_setting() -> None:
    with pytest.raises(ConfigError) as err:
        kafka_client_kwargs(sasl(sasl_username=None), env={"KAFKA_SASL_PASSWORD": "x" * 8})
    assert err.value.key == "kafka.sasl_username"


def test_a_missing_ca_file_names_the_setting(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as err:
        kafka_client_kwargs(KafkaSettings(bootstrap_servers="k:9093", security_protocol="SSL",
                                          ssl_cafile=tmp_path / "nope.pem"), env={})
    assert err.value.key == "kafka.ssl_cafile"


def test_the_password_read_is_masked_in_every_log_line() -> None:
    password = secrets.token_hex(12)
    kafka_client_kwargs(sasl(), env={"KAFKA_SASL_PASSWORD": password})
    root = logging.getLogger()
    saved, level, hooks = list(root.handlers), root.level, (sys.excepthook, threading.excepthook)
    out = io.StringIO()
    try:
        setup_logging("INFO", "json", stream=out)  # the process-wide redactor, as the daemon uses it
        logging.getLogger("aiokafka.conn").warning("sasl failed for %s", password)
        logging.getLogger("x").warning("kwargs", extra={"kwargs": {"sasl_plain_password": "anything-at-all"}})
    finally:
        root.handlers[:] = saved
        root.setLevel(level)
        sys.excepthook, threading.excepthook = hooks
    text = out.getvalue()
    assert password not in text and "anything-at-all" not in text and text.count("***") == 2


def test_describe_security_shows_the_setup_without_secrets() -> None:
    described = describe_security(sasl())
    assert described == {"security_protocol": "SASL_SSL", "ssl_cafile": "system CAs", "ssl_certfile": None,
                         "ssl_check_hostname": True, "sasl_mechanism": "SCRAM-SHA-512"}


# -- OAUTHBEARER ---------------------------------------------------------------------------------------------


async def test_msk_iam_provider_signs_a_connect_token_for_the_region(monkeypatch: pytest.MonkeyPatch) -> None:
    # Generated throwaway AWS credentials: the signer only signs locally, nothing is sent anywhere.
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIA" + secrets.token_hex(8).upper())
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secrets.token_urlsafe(30))
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    monkeypatch.delenv("AWS_SESSION_TOKEN", raising=False)
    kafka = sasl(sasl_mechanism="OAUTHBEARER", sasl_oauth_provider="aws-msk-iam", aws_region="eu-central-1")
    provider = kafka_client_kwargs(kafka, env={})["sasl_oauth_token_provider"]
    assert isinstance(provider, MskIamTokenProvider)
    token = await provider.token()
    url = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)).decode()
    parts = urlsplit(url)
    assert parts.hostname == "kafka.eu-central-1.amazonaws.com"
    assert parse_qs(parts.query)["Action"] == ["kafka-cluster:Connect"]
    assert await provider.token() == token  # reused while valid: one signature per burst of connections


def test_msk_iam_without_a_region_names_the_setting() -> None:
    kafka = sasl(sasl_mechanism="OAUTHBEARER", sasl_oauth_provider="aws-msk-iam")
    with pytest.raises(ConfigError) as err:
        kafka_client_kwargs(kafka, env={})
    assert err.value.key == "kafka.aws_region"


async def test_oidc_provider_runs_the_client_credentials_grant_with_the_secret_from_the_store() -> None:
    client_secret = secrets.token_hex(16)
    seen: list[httpx.Request] = []

    def token_endpoint(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, json={"access_token": f"tok-{len(seen)}", "expires_in": 3600})

    kafka = sasl(sasl_mechanism="OAUTHBEARER", sasl_oauth_provider="oidc",
                 sasl_oauth_token_url="https://idp.example/oauth2/token", sasl_oauth_client_id="okx-ingest",
                 sasl_oauth_scope="kafka", sasl_oauth_extensions={"logicalCluster": "lkc-1"})
    provider = OidcTokenProvider(kafka, env={"KAFKA_OAUTH_CLIENT_SECRET": client_secret},
                                 transport=httpx.MockTransport(token_endpoint))
    assert await provider.token() == "tok-1"
    assert await provider.token() == "tok-1"  # cached until a minute before expiry
    assert provider.extensions() == {"logicalCluster": "lkc-1"}
    assert len(seen) == 1
    form = parse_qs(seen[0].content.decode())
    assert form == {"grant_type": ["client_credentials"], "scope": ["kafka"]}
    basic = base64.b64encode(f"okx-ingest:{client_secret}".encode()).decode()
    assert seen[0].headers["Authorization"] == f"Basic {basic}"


async def test_oidc_refusal_names_the_client_and_the_secret_variable() -> None:
    kafka = sasl(sasl_mechanism="OAUTHBEARER", sasl_oauth_provider="oidc",
                 sasl_oauth_token_url="https://idp.example/token", sasl_oauth_client_id="okx-ingest")
    provider = OidcTokenProvider(kafka, env={"KAFKA_OAUTH_CLIENT_SECRET": "wrong-secret"},
                                 transport=httpx.MockTransport(lambda r: httpx.Response(
                                     401, content=json.dumps({"error": "invalid_client"}).encode())))
    with pytest.raises(CredentialError) as err:
        await provider.token()
    assert "okx-ingest" in str(err.value) and "KAFKA_OAUTH_CLIENT_SECRET" in str(err.value)
    assert "wrong-secret" not in str(err.value)


def test_an_unimportable_custom_provider_names_the_setting() -> None:
    kafka = sasl(sasl_mechanism="OAUTHBEARER", sasl_oauth_provider="no_such_module:factory")
    with pytest.raises(ConfigError) as err:
        kafka_client_kwargs(kafka, env={})
    assert err.value.key == "kafka.sasl_oauth_provider"


def test_offline_check_builds_the_security_settings_and_names_a_missing_secret(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from ingest.check import offline_checks
    from ingest.config import Settings

    settings = Settings(kafka=sasl())
    monkeypatch.delenv("KAFKA_SASL_PASSWORD", raising=False)
    monkeypatch.delenv("KAFKA_SASL_PASSWORD_FILE", raising=False)
    failed = [what for ok, what in offline_checks(settings) if not ok]
    assert len(failed) == 1 and "KAFKA_SASL_PASSWORD" in failed[0]
    password = secrets.token_hex(10)
    monkeypatch.setenv("KAFKA_SASL_PASSWORD", password)
    results = offline_checks(settings)
    assert all(ok for ok, _ in results)
    line = next(what for _, what in results if what.startswith("kafka security"))
    assert "sasl_mechanism=SCRAM-SHA-512" in line and password not in line
