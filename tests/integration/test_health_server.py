"""The health server answers while the event loop is saturated, and drops clients that never finish a request."""

from __future__ import annotations

import asyncio
import socket
import threading
from collections.abc import AsyncIterator

import httpx
import pytest
from prometheus_client import CollectorRegistry, Counter

from ingest.errors import ConfigError
from ingest.obs.health import HealthServer, Readiness

#: The failure condition: a probe that does not answer within this long means the server depends on the loop.
CLIENT_TIMEOUT_S = 5.0


@pytest.fixture
async def server() -> AsyncIterator[HealthServer]:
    registry = CollectorRegistry()
    Counter("okx_ingest_busy_demo_total", "demo", registry=registry).inc(7)
    health = HealthServer(registry, lambda: Readiness(False, ("2 of 3 connections not live",)), "127.0.0.1", 0,
                          header_timeout_s=0.5)
    await health.start()
    try:
        yield health
    finally:
        await health.stop()


def _probe(port: int) -> dict[str, httpx.Response]:
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=CLIENT_TIMEOUT_S) as client:
        return {path: client.get(path) for path in ("/healthz", "/readyz", "/metrics")}


async def test_probes_and_metrics_answer_while_a_cpu_bound_coroutine_holds_the_event_loop(
        server: HealthServer) -> None:
    assert server.port is not None
    port = server.port
    answers: dict[str, httpx.Response] = {}
    failure: list[BaseException] = []
    done = threading.Event()

    def client() -> None:
        try:
            answers.update(_probe(port))
        except BaseException as exc:  # reported by the test below, after the loop is released
            failure.append(exc)
        finally:
            done.set()

    async def hog_the_loop() -> None:
        """A pipeline at saturation: it never yields to the loop until the probes are through (or gave up)."""
        threading.Thread(target=client, name="probe").start()
        while not done.wait(0):
            sum(range(1000))

    await hog_the_loop()
    assert not failure, failure
    assert answers["/healthz"].status_code == 200 and answers["/healthz"].json()["alive"] is True
    ready = answers["/readyz"]
    assert ready.status_code == 503 and ready.json()["reasons"] == ["2 of 3 connections not live"]
    assert "stale_s" in ready.json()  # said honestly: the loop could not give a fresher answer
    assert "okx_ingest_busy_demo_total 7.0" in answers["/metrics"].text


async def test_with_a_free_event_loop_answers_are_fresh(server: HealthServer) -> None:
    assert server.port is not None
    answers = await asyncio.to_thread(_probe, server.port)
    assert answers["/healthz"].json() == {"alive": True}
    assert "stale_s" not in answers["/readyz"].json()


async def test_a_client_that_never_finishes_its_request_headers_is_disconnected(server: HealthServer) -> None:
    assert server.port is not None
    port = server.port

    def half_open() -> bytes:
        with socket.create_connection(("127.0.0.1", port), timeout=CLIENT_TIMEOUT_S) as s:
            s.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")  # and never the blank line that ends the headers
            return s.recv(1024)  # b"" once the server closes; socket.timeout (a failure) if it never does

    assert await asyncio.to_thread(half_open) == b""
    # The server is still there for a well-behaved client.
    assert (await asyncio.to_thread(_probe, port))["/healthz"].status_code == 200


async def test_a_port_in_use_is_a_configuration_error_naming_the_key() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        health = HealthServer(CollectorRegistry(), lambda: Readiness(True), "127.0.0.1", taken.getsockname()[1],
                              port_key="backfill.metrics_port")
        with pytest.raises(ConfigError) as err:
            await health.start()
    assert err.value.key == "backfill.metrics_port"
