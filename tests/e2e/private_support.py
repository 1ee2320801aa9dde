"""Helpers for the private-stream end-to-end tests: generated keys, settings, waits and record grouping."""

from __future__ import annotations

import asyncio
import os
import secrets
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

from ingest.config import Settings
from ingest.core.records import Record
from ingest.sim import SimConfig, SimServer
from tests.e2e.harness import RunningDaemon, daemon_settings

INSTS = ("BTC-USDT", "BTC-USDT-SWAP")
#: What `okx.private = true` subscribes (supervisor.PRIVATE_ARGS), by channel.
PRIVATE_CHANNELS = ("orders", "positions", "account", "balance_and_position", "orders-algo")


@dataclass(frozen=True)
class Keys:
    """One API key, generated for the test that uses it (never a committed literal)."""

    api_key: str
    api_secret: str
    passphrase: str

    @classmethod
    def new(cls) -> Keys:
        return cls(secrets.token_hex(16), secrets.token_hex(32), secrets.token_hex(8))

    def values(self) -> tuple[str, str, str]:
        return self.api_key, self.api_secret, self.passphrase

    def env(self) -> dict[str, str]:
        return {"OKX_API_KEY": self.api_key, "OKX_API_SECRET": self.api_secret, "OKX_API_PASSPHRASE": self.passphrase}

    def sim(self, **config: Any) -> SimConfig:
        return SimConfig(instruments=INSTS, seed=11, api_key=self.api_key, api_secret=self.api_secret,
                         passphrase=self.passphrase, **config)

    def write_files(self, directory: Path) -> dict[str, str]:
        """Write the three secret files (each replaced atomically, as a secret volume does); the *_FILE env."""
        directory.mkdir(parents=True, exist_ok=True)
        env = {}
        for name, value in zip(("OKX_API_KEY", "OKX_API_SECRET", "OKX_API_PASSPHRASE"), self.values(), strict=True):
            path = directory / name.lower()
            tmp = directory / f".{name.lower()}.tmp"
            tmp.write_text(value + "\n")
            os.replace(tmp, path)
            env[f"{name}_FILE"] = str(path)
        return env


def private_settings(sim: SimServer, bootstrap: str, prefix: str, tmp_path: Path, *,
                     okx: dict[str, Any] | None = None, **sections: Any) -> Settings:
    """A daemon recording only the private streams of the simulator's account."""
    return daemon_settings(sim, bootstrap, prefix, tmp_path / "journal",
                           okx={"channels": [], "private": True, **(okx or {})}, **sections)


async def until(predicate: Callable[[], object], what: str, timeout_s: float = 20.0) -> None:
    """Wait for a condition on the daemon's own state (its counters change without notifying anyone)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not predicate():
        if loop.time() > deadline:
            raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")
        await asyncio.sleep(0.01)  # polling a condition, not a fixed delay


async def private_up(sim: SimServer, channels: tuple[str, ...] = PRIVATE_CHANNELS) -> None:
    """Every private channel is held by an open connection of the simulator."""
    for channel in channels:
        await sim.wait_subscribed({"channel": channel}, timeout=20)


async def reconciled(run: RunningDaemon, count: int) -> None:
    """The daemon's pipeline has handled `count` REST reads of the account and none is outstanding."""
    parts = run.daemon.parts
    assert parts.pipeline is not None and parts.reconciler is not None
    pipeline, reconciler = parts.pipeline, parts.reconciler
    await until(lambda: pipeline.stats.reconciliations >= count and not reconciler.pending
                and pipeline.inbox.qsize() == 0, f"{count} private reconciliation(s)")


async def scrape(run: RunningDaemon, path: str = "/metrics") -> str:
    health = run.daemon.parts.health
    assert health is not None and health.port is not None
    async with aiohttp.ClientSession() as session, session.get(f"http://127.0.0.1:{health.port}{path}") as resp:
        return await resp.text()


def metric(text: str, name: str, **labels: str) -> float | None:
    """The value of one sample in a Prometheus text exposition, None when absent."""
    want = ",".join(f'{k}="{v}"' for k, v in labels.items())
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        head, _, value = line.rpartition(" ")
        sample = head if "{" in head else head + "{}"
        if sample.split("{")[0] == name and (not labels or all(p in sample for p in want.split(","))):
            return float(value)
    return None


def by_key(rows: list[tuple[int, bytes | None, Record, dict[str, bytes]]]) -> dict[bytes, list[tuple[int, Record]]]:
    """Records grouped by Kafka key, in partition order (the order a consumer of that key sees)."""
    out: dict[bytes, list[tuple[int, Record]]] = defaultdict(list)
    for partition, key, record, _ in rows:
        assert key is not None
        out[key].append((partition, record))
    return out
