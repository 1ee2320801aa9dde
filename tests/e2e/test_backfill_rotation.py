"""The backfill worker holds a key too: a rotation to a key that can withdraw is refused before any use, exit 2."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from ingest.config import load_settings
from ingest.services.backfill import run_worker
from ingest.sim import SimServer
from tests.conftest import BrokerInfo
from tests.e2e.private_support import Keys, until


@pytest.fixture(autouse=True)
def _keep_process_setup() -> Iterator[None]:
    """`run_worker` sets up logging and hooks as the command does; give the other tests theirs back."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    hooks = sys.excepthook, threading.excepthook
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    sys.excepthook, threading.excepthook = hooks


async def test_a_rotation_to_a_key_that_can_withdraw_stops_the_backfill_worker_with_exit_2(
        kafka_broker: BrokerInfo, topic_prefix: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    old, new = Keys.new(), Keys.new()
    secret_dir = tmp_path / "secrets"
    for name, value in old.write_files(secret_dir).items():
        monkeypatch.setenv(name, value)
    async with SimServer(old.sim()) as sim:
        settings = load_settings(
            None, okx={"rest_base_url": sim.rest_base, "credential_poll_s": 0.05},
            kafka={"bootstrap_servers": kafka_broker.bootstrap_servers, "topic_prefix": topic_prefix,
                   "enable_idempotence": False},
            journal={"dir": str(tmp_path / "journal")},
            backfill={"group_id": f"{topic_prefix}backfill", "metrics_port": 0, "session_timeout_ms": 3000,
                      "heartbeat_interval_ms": 300, "poll_timeout_ms": 200},
            obs={"log_format": "text"})
        worker = asyncio.create_task(run_worker(settings))
        try:
            await until(lambda: any(r.key == old.api_key for r in sim.stats.rest_log), "the start-up key check")
            sim.set_credentials(*new.values())
            sim.config = sim.rest.config = dataclasses.replace(sim.config, perm="read_only,withdraw,trade")
            new.write_files(secret_dir)
            async with asyncio.timeout(30):
                code = await worker
        finally:
            worker.cancel()
            await asyncio.gather(worker, return_exceptions=True)
    assert code == 2
    assert [r.path for r in sim.stats.rest_log if r.key == new.api_key] == ["/api/v5/account/config"]
