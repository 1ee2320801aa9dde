"""HTTP endpoints for operators: `/metrics` (Prometheus), `/healthz` (alive), `/readyz` (doing its job).

Served from a thread of their own (stdlib `http.server`), not from the event loop: a pipeline that keeps its
loop busy at saturation must still answer its probes and scrapes within a second, or Kubernetes would kill a
pod that is merely working hard. The thread never touches the loop's objects: it asks the loop for a fresh
answer (metrics text, readiness) and, when the loop does not give one within `fresh_timeout_s`, serves the
last answer the loop produced, marked stale. `/healthz` fails only when the loop has given no answer for
`stall_s` (a hung loop, which a restart cures).

Every connection gets `header_timeout_s` to send its request and at most `max_connections` are served at
once: a half-open or slow client is dropped instead of holding a thread forever.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import errno
import logging
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import orjson
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from ingest.errors import ConfigError

log = logging.getLogger(__name__)

JSON = "application/json"


@dataclass(frozen=True, slots=True)
class Readiness:
    """Ready or not, with the reasons an operator needs to act on."""

    ready: bool
    reasons: tuple[str, ...] = field(default=())
    details: dict[str, object] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class _Answer:
    """One response, built on the event loop, immutable so the server thread can share it safely."""

    status: int
    content_type: str
    body: bytes
    at: float  # monotonic time it was built


class HealthServer:
    """/metrics, /healthz and /readyz on the configured host and port (0 = any free port), from a thread."""

    def __init__(
        self,
        registry: CollectorRegistry,
        readiness: Callable[[], Readiness],
        host: str,
        port: int,
        *,
        port_key: str = "obs.metrics_port",
        header_timeout_s: float = 5.0,
        fresh_timeout_s: float = 0.5,
        stall_s: float = 60.0,
        max_connections: int = 16,
    ) -> None:
        self._registry = registry
        self._readiness = readiness
        self._host = host
        self._port = port
        self._port_key = port_key
        self.header_timeout_s = header_timeout_s
        self.fresh_timeout_s = fresh_timeout_s
        self.stall_s = stall_s
        self._slots = threading.BoundedSemaphore(max_connections)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        # Written by the loop, read by server threads: each is one reference assignment of an immutable value.
        self._last: dict[str, _Answer] = {}
        self._loop_seen = time.monotonic()
        self.port: int | None = None

    async def start(self) -> None:
        """Bind (a port in use or a foreign address is a ConfigError naming the key) and serve from a thread."""
        self._loop = asyncio.get_running_loop()
        for path in _ROUTES:
            self._refresh(path)
        try:
            server = _Server((self._host, self._port), _handler_for(self), self)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise ConfigError(self._port_key, f"port {self._port} on {self._host} is in use",
                                  "stop what listens there or choose another port (0 picks a free one)") from None
            raise ConfigError("obs.metrics_host", f"cannot listen on {self._host}:{self._port} "
                              f"({exc.strerror or exc})", "use an address of this host (127.0.0.1, 0.0.0.0, the "
                              "pod IP)") from None
        self._server = server
        self.port = int(server.server_address[1])
        self._thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.2},
                                        name="health-server", daemon=True)
        self._thread.start()
        log.info("health_server_listening", extra={"host": self._host, "port": self.port})

    async def stop(self) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        await asyncio.to_thread(server.shutdown)
        server.server_close()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join, 5.0)
            self._thread = None

    # ---- on the event loop ------------------------------------------------------------------------------

    def _refresh(self, path: str) -> _Answer:
        """Build the answer for `path` (runs on the loop: the readiness callback and the collectors read loop
        state) and keep it as the fallback for when the loop is busy."""
        now = time.monotonic()
        self._loop_seen = now
        if path == "/metrics":
            answer = _Answer(200, CONTENT_TYPE_LATEST, generate_latest(self._registry), now)
        elif path == "/readyz":
            r = self._readiness()
            body = {"ready": r.ready, "reasons": list(r.reasons), **r.details}
            answer = _Answer(200 if r.ready else 503, JSON, orjson.dumps(body, default=str), now)
        else:
            answer = _Answer(200, JSON, b'{"alive":true}', now)
        self._last[path] = answer
        return answer

    # ---- on a server thread -----------------------------------------------------------------------------

    def answer(self, path: str) -> _Answer:
        """A fresh answer from the loop if it gives one in time, else the last one, marked stale."""
        loop = self._loop
        fresh: concurrent.futures.Future[_Answer] = concurrent.futures.Future()

        def build() -> None:
            if fresh.set_running_or_notify_cancel():
                try:
                    fresh.set_result(self._refresh(path))
                except Exception as exc:  # a collector's bug must not leave the client waiting
                    fresh.set_exception(exc)

        try:
            if loop is None or loop.is_closed():
                raise RuntimeError("no event loop")
            loop.call_soon_threadsafe(build)
            return fresh.result(self.fresh_timeout_s)
        except (concurrent.futures.TimeoutError, RuntimeError):
            fresh.cancel()
        except Exception:
            log.exception("health_answer_failed", extra={"path": path})
            return _Answer(500, JSON, b'{"error":"see the log"}', time.monotonic())
        return self._stale(path)

    def _stale(self, path: str) -> _Answer:
        busy_s = time.monotonic() - self._loop_seen
        last = self._last[path]
        if path == "/healthz":
            alive = busy_s < self.stall_s
            body = {"alive": alive, "event_loop_unresponsive_s": round(busy_s, 3)}
            return _Answer(200 if alive else 503, JSON, orjson.dumps(body), last.at)
        if path == "/readyz":
            body = orjson.loads(last.body)
            body["stale_s"] = round(time.monotonic() - last.at, 3)
            return _Answer(last.status, JSON, orjson.dumps(body), last.at)
        return last


_ROUTES = ("/metrics", "/healthz", "/readyz")


class _Server(ThreadingHTTPServer):
    """A thread per connection, at most `max_connections` at once (the rest are closed at once)."""

    daemon_threads = True

    def __init__(self, address: tuple[str, int], handler: type[BaseHTTPRequestHandler], owner: HealthServer) -> None:
        self.owner = owner
        host = address[0]
        self.address_family = socket.AF_INET6 if ":" in host else socket.AF_INET
        super().__init__(address, handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self.owner._slots.acquire(blocking=False):
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self.owner._slots.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.owner._slots.release()


def _handler_for(owner: HealthServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        # The socket timeout bounds reading the request line and headers: a half-open client is dropped.
        timeout = owner.header_timeout_s
        server_version = "okx-ingest"
        sys_version = ""

        def do_GET(self) -> None:
            path = self.path.split("?", 1)[0]
            if path not in _ROUTES:
                self._send(_Answer(404, JSON, b'{"error":"not found"}', 0.0))
                return
            self._send(owner.answer(path))

        def _send(self, answer: _Answer) -> None:
            self.send_response(answer.status)
            self.send_header("Content-Type", answer.content_type)
            self.send_header("Content-Length", str(len(answer.body)))
            self.end_headers()
            self.wfile.write(answer.body)

        def log_message(self, format: str, *args: Any) -> None:
            """Probes every few seconds are not worth a log line each."""

    return Handler
