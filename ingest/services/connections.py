"""All OKX WebSocket connections of this process, built from the plan, under one connect limiter.

The manager decides which connections exist (`core.plan`), where they point (production, demo or
overridden URLs; port 443 by default), and owns their tasks. It routes the pipeline's resubscribe
requests to the connection that carries the arg, replaces logged-in connections make-before-break when
the credentials rotate, restarts a connection stopped by a refused key once the key changes, and reports
a status snapshot for health checks and metrics.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import ssl
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass

from ingest.config import OkxSettings, Subscription, WsSettings
from ingest.core.clock import ServerClock
from ingest.core.events import Inbound
from ingest.core.plan import PlanLimits, plan_connections
from ingest.credentials import CredentialStore
from ingest.errors import CredentialError, IngestError
from ingest.io.proxy import describe_proxy, proxy_for
from ingest.io.timer import SystemTimer, Timer
from ingest.io.tls import client_ssl_context
from ingest.io.ws import Connection
from ingest.io.ws_limiter import ConnectLimiter
from ingest.io.ws_link import ConnectionStatus, ConnState, LoginRejected
from ingest.okx.channels import Endpoint, SubArg
from ingest.okx.endpoints import ws_url

log = logging.getLogger(__name__)


def subscription_arg(sub: Subscription) -> SubArg:
    """The OKX arg of one configured subscription."""
    return SubArg(sub.channel, inst_id=sub.inst_id, inst_type=sub.inst_type, inst_family=sub.inst_family,
                  ccy=sub.ccy)


def endpoint_url(okx: OkxSettings, ws: WsSettings, endpoint: Endpoint) -> str:
    """The URL of `endpoint`: a per-endpoint override, else `okx.ws_base_url` or the environment's port-443 host."""
    override = {Endpoint.PUBLIC: ws.public_url, Endpoint.BUSINESS: ws.business_url,
                Endpoint.PRIVATE: ws.private_url}[endpoint]
    return override or ws_url(okx.environment, endpoint, okx.ws_base_url)


@dataclass(frozen=True, slots=True)
class ManagerStatus:
    """Every connection's status, and the process-wide connect limiter's count."""

    connections: tuple[ConnectionStatus, ...]
    connects_admitted: int
    stopped: dict[str, str]

    @property
    def live(self) -> int:
        return sum(1 for c in self.connections if c.state is ConnState.LIVE)


class ConnectionManager:
    """Owns every OKX WebSocket connection of this process.

    Implements `core.events.Resubscriber`. `run()` keeps all connections up until cancelled; on
    cancellation each connection closes its socket only after every frame it received was put into the
    queue (bounded by `ws.shutdown_timeout_s`).
    """

    def __init__(
        self,
        okx: OkxSettings,
        ws: WsSettings,
        queue: asyncio.Queue[Inbound],
        *,
        credentials: CredentialStore | None = None,
        clock: ServerClock | None = None,
        resync_clock: Callable[[], Awaitable[None]] | None = None,
        ssl_context: ssl.SSLContext | None = None,
        backoff: Callable[[], Iterator[float]] | None = None,
        monotonic: Callable[[], float] = time.monotonic,
        args: list[SubArg] | None = None,
        timer: Timer | None = None,
        limiter: ConnectLimiter | None = None,
        name_prefix: str = "",
    ) -> None:
        wanted = args if args is not None else [subscription_arg(s) for s in okx.all_subscriptions()]
        self.plan = plan_connections(
            wanted, PlanLimits(ws.args_per_connection, ws.depth_channels_per_connection, ws.subscribe_max_bytes))
        if name_prefix:  # several managers in one process (cluster shards): connection ids stay unique
            self.plan = tuple(dataclasses.replace(c, name=f"{name_prefix}{c.name}") for c in self.plan)
        needs_login = [c.name for c in self.plan if c.login]
        if needs_login and credentials is None:
            raise CredentialError(
                f"connections {', '.join(needs_login)} carry channels that need a login (private channels, "
                "books-l2-tbt); set OKX_API_KEY, OKX_API_SECRET and OKX_API_PASSPHRASE (or their *_FILE)"
            )
        self._credentials = credentials
        self._clock = clock or ServerClock(lambda: time.time_ns() // 1_000_000)
        #: One clock for every connection's timing decisions (tests inject fake time here).
        timer = timer if timer is not None else SystemTimer(monotonic)
        #: Shared by every manager of a process when given: OKX's connect limit is per IP.
        self.limiter = limiter or ConnectLimiter(ws.connects_per_s, timer)
        urls = {c.name: endpoint_url(okx, ws, c.endpoint) for c in self.plan}
        if ssl_context is None and any(u.startswith("wss://") for u in urls.values()):
            ssl_context = client_ssl_context(okx.tls_spki_pins,
                                             extra_cafile=str(okx.ca_bundle) if okx.ca_bundle else None)
        proxies = {name: proxy_for(url, okx.proxy) for name, url in urls.items()}
        for name, proxy in proxies.items():
            if proxy is not None:
                log.info("okx_ws_proxy", extra={"ws_name": name, "proxy": describe_proxy(proxy)})
        self.connections = tuple(
            Connection(spec, urls[spec.name], ws, queue, limiter=self.limiter, credentials=credentials,
                       clock=self._clock, resync_clock=resync_clock, backoff=backoff, timer=timer,
                       ssl_context=ssl_context, proxy=proxies[spec.name])
            for spec in self.plan
        )
        self._by_arg = {arg: conn for conn in self.connections for arg in conn.args}
        self._stopped: dict[str, str] = {}

    async def run(self) -> None:
        """Run every connection until cancelled (one task each, plus the credential watcher)."""
        log.info("ws_manager_start", extra={"connections": len(self.connections),
                                            "arg_count": len(self._by_arg)})
        async with asyncio.TaskGroup() as tg:
            for conn in self.connections:
                tg.create_task(self._keep(conn), name=f"ws-{conn.name}")
            if self._credentials is not None and any(c.login for c in self.connections):
                tg.create_task(self._watch_credentials(self._credentials), name="ws-credentials")

    def request_resubscribe(self, arg: SubArg, reason: str) -> None:
        """Resubscribe one arg on the connection that carries it (non-blocking, coalesced, rate-limited)."""
        conn = self._by_arg.get(arg)
        if conn is None or not conn.request_resubscribe(arg, reason):
            log.warning("ws_resubscribe_ignored", extra={"arg": str(arg), "reason": reason,
                                                         "why": "no connection carries it" if conn is None
                                                         else "refused for good"})

    def status(self) -> ManagerStatus:
        return ManagerStatus(tuple(c.status() for c in self.connections), self.limiter.admitted,
                             dict(self._stopped))

    async def _keep(self, conn: Connection) -> None:
        """Run one connection; when OKX refused its key, keep it stopped until the credentials change."""
        while True:
            seen = self._credentials.version if self._credentials is not None else 0
            try:
                await conn.run()
                return
            except LoginRejected as exc:
                self._stopped[conn.name] = str(exc)
                log.error("ws_connection_stopped", extra={"ws_name": conn.name, "code": exc.code, "error": str(exc)})
                if self._credentials is None:
                    return
                await self._credentials.wait_changed(seen)
                del self._stopped[conn.name]
                log.info("ws_connection_restart", extra={"ws_name": conn.name, "reason": "credentials changed"})
            except IngestError as exc:  # e.g. a TLS pin mismatch: never retried, reported
                self._stopped[conn.name] = str(exc)
                log.error("ws_connection_stopped", extra={"ws_name": conn.name, "error": str(exc)})
                return

    async def _watch_credentials(self, store: CredentialStore) -> None:
        version = store.version
        while True:
            version = await store.wait_changed(version)
            replacing = [c.name for c in self.connections if c.login and c.on_credentials_changed(version)]
            log.info("ws_credentials_rotated", extra={"key": store.current().key_hint, "replacing": replacing})
