"""HTTP endpoints for operators: `/metrics` (Prometheus), `/healthz` (alive), `/readyz` (doing its job).

Kubernetes restarts a pod whose liveness fails, so `/healthz` only says the event loop answers;
`/readyz` says whether data flows (connections live, broker reachable) and explains why not.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

from aiohttp import web
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Readiness:
    """Ready or not, with the reasons an operator needs to act on."""

    ready: bool
    reasons: tuple[str, ...] = field(default=())
    details: dict[str, object] = field(default_factory=dict)


class HealthServer:
    """aiohttp server for /metrics, /healthz and /readyz on the configured host and port (0 = any free port)."""

    def __init__(self, registry: CollectorRegistry, readiness: Callable[[], Readiness], host: str, port: int) -> None:
        self._registry = registry
        self._readiness = readiness
        self._host = host
        self._port = port
        self._runner: web.AppRunner | None = None
        self.port: int | None = None

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/readyz", self._readyz)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self._host, self._port)
        await site.start()
        self.port = int(self._runner.addresses[0][1])
        log.info("health_server_listening", extra={"host": self._host, "port": self.port})

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _metrics(self, _: web.Request) -> web.Response:
        body = generate_latest(self._registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def _healthz(self, _: web.Request) -> web.Response:
        return web.json_response({"alive": True})

    async def _readyz(self, _: web.Request) -> web.Response:
        r = self._readiness()
        body = {"ready": r.ready, "reasons": list(r.reasons), **r.details}
        return web.json_response(body, status=200 if r.ready else 503, dumps=_dumps)


def _dumps(obj: object) -> str:
    import orjson

    return orjson.dumps(obj, default=str).decode()
