"""Logs and Sentry events never carry a secret; operators get structured lines and health endpoints."""

from __future__ import annotations

import io
import logging
import secrets

import httpx
import orjson
import pytest
from prometheus_client import CollectorRegistry, Counter

from ingest.credentials import Secret
from ingest.obs.health import HealthServer, Readiness
from ingest.obs.logging import setup_logging
from ingest.obs.redact import Redactor
from ingest.obs.sentry import _scrubber


@pytest.fixture
def secret_values() -> list[str]:
    return [secrets.token_hex(16), secrets.token_urlsafe(24), secrets.token_hex(6)]


def _capture(redactor: Redactor, fmt: str, level: str = "DEBUG") -> tuple[io.StringIO, logging.Handler]:
    out = io.StringIO()
    handler = setup_logging(level, fmt, stream=out, redactor=redactor)  # type: ignore[arg-type]
    return out, handler


@pytest.mark.parametrize("fmt", ["json", "text"])
def test_secret_values_are_masked_in_messages_fields_and_tracebacks(fmt: str, secret_values: list[str]) -> None:
    redactor = Redactor()
    redactor.set_secrets(secret_values)
    out, handler = _capture(redactor, fmt)
    key, secret, passphrase = secret_values
    log = logging.getLogger("test.leak")
    login = f'{{"op":"login","args":[{{"apiKey":"{key}","passphrase":"{passphrase}"}}]}}'
    log.debug("> TEXT %s", login)  # what websockets logs at DEBUG for an outgoing frame
    log.info("rest_request", extra={"headers": {"OK-ACCESS-PASSPHRASE": passphrase}, "body": secret})
    try:
        raise RuntimeError(f"library error mentioning {secret}")
    except RuntimeError:
        log.exception("boom")
    text = out.getvalue()
    logging.getLogger().removeHandler(handler)
    assert text.count("***") >= 5
    for value in secret_values:
        assert value not in text
    assert "rest_request" in text and "boom" in text


def test_json_lines_carry_event_and_fields() -> None:
    out, handler = _capture(Redactor(), "json", "INFO")
    logging.getLogger("test.fields").info("ws_state", extra={"conn": "public-0#1", "to": "live"})
    logging.getLogger().removeHandler(handler)
    line = orjson.loads(out.getvalue().splitlines()[-1])
    assert line["event"] == "ws_state" and line["conn"] == "public-0#1" and line["to"] == "live"
    assert line["level"] == "info" and line["ts"].endswith("Z")


def test_secret_type_and_rotation_keep_old_values_masked(secret_values: list[str]) -> None:
    redactor = Redactor()
    redactor.set_secrets(secret_values[:1])
    redactor.set_secrets(secret_values[1:])  # rotation: the old key may still appear in a late log line
    assert redactor.scrub(" ".join(secret_values)) == "*** *** ***"
    assert secret_values[0] not in f"{Secret(secret_values[0])!r} {Secret(secret_values[0])}"


def test_sentry_before_send_scrubs_nested_event(secret_values: list[str]) -> None:
    redactor = Redactor()
    redactor.set_secrets(secret_values)
    event = {
        "message": f"failed with {secret_values[1]}",
        "exception": {"values": [{"value": f"sign={secret_values[0]}", "stacktrace": {"frames": []}}]},
        "breadcrumbs": {"values": [{"message": secret_values[2], "data": {"k": [secret_values[0]]}}]},
        "extra": {"n": 3},
    }
    scrubbed = _scrubber(redactor)(event, {})
    dumped = orjson.dumps(scrubbed).decode()
    assert all(v not in dumped for v in secret_values)
    assert scrubbed["extra"] == {"n": 3}


def test_short_values_are_not_treated_as_secrets() -> None:
    redactor = Redactor()
    redactor.set_secrets(["1", "ab"])
    assert redactor.scrub("1 ab 10") == "1 ab 10"


async def test_health_server_reports_metrics_liveness_and_readiness_reasons() -> None:
    registry = CollectorRegistry()
    Counter("okx_ingest_demo_total", "demo", registry=registry).inc(3)
    state = {"ready": False}

    def readiness() -> Readiness:
        if state["ready"]:
            return Readiness(True)
        return Readiness(False, ("broker unreachable",), {"connections_live": 0})

    server = HealthServer(registry, readiness, "127.0.0.1", 0)
    await server.start()
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{server.port}") as client:
            metrics = await client.get("/metrics")
            assert "okx_ingest_demo_total 3.0" in metrics.text
            assert (await client.get("/healthz")).json() == {"alive": True}
            not_ready = await client.get("/readyz")
            assert not_ready.status_code == 503
            assert not_ready.json()["reasons"] == ["broker unreachable"]
            state["ready"] = True
            assert (await client.get("/readyz")).status_code == 200
    finally:
        await server.stop()


def test_no_log_call_uses_a_field_name_that_logging_reserves() -> None:
    """`extra={"args": ...}` raises KeyError at runtime, on exactly the path that was being logged."""
    import ast
    from pathlib import Path

    import ingest

    reserved = set(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {"message", "asctime"}
    clashes = []
    for path in Path(ingest.__file__).parent.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.keyword) and node.arg == "extra" and isinstance(node.value, ast.Dict):
                clashes += [f"{path.name}:{k.lineno} {k.value!r}" for k in node.value.keys
                            if isinstance(k, ast.Constant) and k.value in reserved]
    assert clashes == []


def test_credential_fields_are_masked_even_in_a_truncated_login_frame() -> None:
    redactor = Redactor()  # nothing registered: a truncated frame leaves no whole secret to recognise anyway
    frame = '> TEXT \'{"id":"l1","op":"login","args":[{"apiKey":"073f...addcTJ+bPghbBPdjso="}]}\' [190 bytes]'
    assert redactor.scrub(frame) == '> TEXT \'{"id":"l1","op":"login","args":[{"apiKey":"***"}]}\' [190 bytes]'
    as_json = orjson.dumps({"event": frame}).decode()  # the JSON log line escapes the quotes
    assert "073f" not in redactor.scrub(as_json) and 'apiKey\\":\\"***' in redactor.scrub(as_json)
    headers = "{'OK-ACCESS-KEY': 'k1', 'OK-ACCESS-SIGN': 's=', 'OK-ACCESS-PASSPHRASE': 'p', 'Accept': 'json'}"
    assert redactor.scrub(headers) == (
        "{'OK-ACCESS-KEY': '***', 'OK-ACCESS-SIGN': '***', 'OK-ACCESS-PASSPHRASE': '***', 'Accept': 'json'}")
    prose = "signed=True design: the passphrase is wrong"
    assert redactor.scrub(prose) == prose


def test_setting_up_logging_at_debug_again_lets_library_debug_through() -> None:
    import sys
    import threading

    root = logging.getLogger()
    saved, level, hooks = list(root.handlers), root.level, (sys.excepthook, threading.excepthook)
    try:
        setup_logging("INFO", "json", stream=io.StringIO())
        assert logging.getLogger("websockets").getEffectiveLevel() == logging.WARNING
        setup_logging("DEBUG", "json", stream=io.StringIO())
        assert logging.getLogger("websockets").getEffectiveLevel() == logging.DEBUG
    finally:
        for h in list(root.handlers):
            root.removeHandler(h)
        for h in saved:
            root.addHandler(h)
        root.setLevel(level)
        sys.excepthook, threading.excepthook = hooks
