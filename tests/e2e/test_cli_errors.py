"""Every bad input to the real `okx-ingest` command: exit 2, one clear error naming the key, no traceback.

Each case runs the installed entry point in a subprocess, as a user would, so nothing between `main()` and
the process exit (argparse, settings, start-up checks) can turn a mistake into a traceback unnoticed.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

OKX_INGEST = str(Path(sys.executable).with_name("okx-ingest"))


@dataclass(frozen=True)
class Case:
    """`args` run in a temporary directory holding `files`; stderr must name every string of `names`."""

    args: list[str]
    names: list[str]
    env: dict[str, str] = field(default_factory=dict)
    files: dict[str, bytes] = field(default_factory=dict)


def _cfg(toml: str) -> dict[str, bytes]:
    return {"bad.toml": toml.encode()}


CASES: dict[str, Case] = {
    "unknown channel in okx.channels": Case(
        ["run", "--config", "bad.toml"], ["okx.channels", "'trade'", "did you mean 'trades'"],
        files=_cfg('[okx]\nchannels = ["trade"]\n')),
    "candle bar OKX lacks, from the environment": Case(
        ["run"], ["okx.channels", "candle7m", "candle<bar>"], env={"OKX_INGEST__OKX__CHANNELS": "trades,candle7m"}),
    "config file not UTF-8": Case(
        ["run", "--config", "bad.toml"], ["bad.toml", "not UTF-8", "save it as UTF-8"],
        files={"bad.toml": b'[okx]\ninstruments = ["BTC-USDT"]\n# caf\xe9\n'}),
    "--config names a directory": Case(["check", "--config", "."], ["is a directory", "--config"]),
    "journal.dir under a file": Case(
        ["run"], ["journal.dir", "not a writable directory"],
        env={"OKX_INGEST__JOURNAL__DIR": "afile/journal"}, files={"afile": b"x"}),
    "journal.dir on a read-only file system": Case(
        ["run"], ["journal.dir", "not a writable directory"], env={"OKX_INGEST__JOURNAL__DIR": "/proc/okx-ingest"}),
    "backfill journal dir under a file": Case(
        ["backfill"], ["backfill.journal_dir", "not a writable directory"],
        env={"OKX_INGEST__BACKFILL__JOURNAL_DIR": "afile/journal"}, files={"afile": b"x"}),
    "metrics port in use": Case(
        ["run"], ["obs.metrics_port", "in use"], env={"OKX_INGEST__OBS__METRICS_PORT": "{busy}"}),
    "backfill metrics port in use": Case(
        ["backfill"], ["backfill.metrics_port", "in use"], env={"OKX_INGEST__BACKFILL__METRICS_PORT": "{busy}"}),
    "metrics host not a host name": Case(
        ["run"], ["obs.metrics_host", "'not a host'"], env={"OKX_INGEST__OBS__METRICS_HOST": "not a host"}),
    "metrics host not of this machine": Case(
        ["run"], ["obs.metrics_host", "192.0.2.1"], env={"OKX_INGEST__OBS__METRICS_HOST": "192.0.2.1"}),
    "metrics port out of range": Case(
        ["run"], ["obs.metrics_port", "65535"], env={"OKX_INGEST__OBS__METRICS_PORT": "70000"}),
    "simulate --port out of range": Case(["simulate", "--port", "99999"], ["--port", "99999", "0-65535"]),
    "simulate --port in use": Case(["simulate", "--port", "{busy}"], ["--port", "{busy}", "free port"]),
    "misspelled section in the environment": Case(
        ["run"], ["OKX_INGEST__KAFAK__BOOTSTRAP_SERVERS", "did you mean 'kafka'"],
        env={"OKX_INGEST__KAFAK__BOOTSTRAP_SERVERS": "k1:9092"}),
    "misspelled key in the environment": Case(
        ["check"], ["OKX_INGEST__OBS__METRICS_PROT", "did you mean 'metrics_port'"],
        env={"OKX_INGEST__OBS__METRICS_PROT": "1"}),
    "subscriptions from the environment not JSON": Case(
        ["run"], ["OKX_INGEST__OKX__SUBSCRIPTIONS", "JSON"], env={"OKX_INGEST__OKX__SUBSCRIPTIONS": "trades"}),
    "list from the environment half JSON": Case(
        ["run"], ["okx.instruments", "a,b,c"], env={"OKX_INGEST__OKX__INSTRUMENTS": '["BTC-USDT"'}),
    "ws_base_url not a WebSocket URL": Case(
        ["run"], ["okx.ws_base_url", "wss://"], env={"OKX_INGEST__OKX__WS_BASE_URL": "ws.okx.com:8443"}),
    "ws_base_url port out of range": Case(
        ["run"], ["okx.ws_base_url"], env={"OKX_INGEST__OKX__WS_BASE_URL": "wss://ws.okx.com:99999"}),
    "rest_base_url not an HTTP URL": Case(
        ["check"], ["okx.rest_base_url", "https://"], env={"OKX_INGEST__OKX__REST_BASE_URL": "wss://www.okx.com"}),
    "ws.public_url not a WebSocket URL": Case(
        ["run"], ["ws", "public_url"], env={"OKX_INGEST__WS__PUBLIC_URL": "https://ws.okx.com/ws/v5/public"}),
    "nothing to subscribe": Case(
        ["run", "--config", "bad.toml"], ["okx.instruments", "nothing to subscribe"],
        files=_cfg("[okx]\ninstruments = []\n")),
}


@pytest.fixture
def busy_port() -> Iterator[int]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield s.getsockname()[1]


def _clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items()
            if not k.startswith(("OKX_INGEST", "OKX_API_", "CREDENTIALS_DIRECTORY"))}


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_exits_2_with_one_error_naming_the_key_and_no_traceback(
        name: str, tmp_path: Path, busy_port: int) -> None:
    case = CASES[name]
    fill: Callable[[str], str] = lambda text: text.replace("{busy}", str(busy_port))  # noqa: E731
    for rel, content in case.files.items():
        (tmp_path / rel).write_bytes(content)
    env = {**_clean_env(), **{k: fill(v) for k, v in case.env.items()}}
    proc = subprocess.run([OKX_INGEST, *(fill(a) for a in case.args)], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=60, check=False)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    for wanted in case.names:
        assert fill(wanted) in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line and not line.startswith(("usage:", " "))]
    assert len(errors) == 1, proc.stderr  # one line (argparse adds its usage above it)


def test_run_without_network_says_so_in_one_line(tmp_path: Path) -> None:
    """`make run` offline: one line naming the host and the offline alternative, not a reconnect loop."""
    env = {**_clean_env(), "OKX_INGEST__OKX__WS_BASE_URL": "wss://ws.okx.invalid",  # RFC 2606: never resolves
           "OKX_INGEST__OKX__REST_BASE_URL": "https://www.okx.invalid", "OKX_INGEST__OBS__METRICS_PORT": "0"}
    proc = subprocess.run([OKX_INGEST, "run"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60,
                          check=False)
    assert proc.returncode == 1  # not a configuration error: restarted until the network is back
    assert proc.stderr.strip().splitlines() == [
        "okx-ingest: cannot resolve ws.okx.invalid: offline? `make demo` (okx-ingest demo) runs without network"]
