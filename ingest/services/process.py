"""What every long-running okx-ingest process does the same way: signals, credential rotation, observability.

The recorder (`supervisor.py`) and the backfill worker (`services/backfill/`) are separate processes with
separate jobs; their handling of SIGTERM/SIGINT/SIGHUP, of rotated secret files, and of logging and Sentry
must not drift apart, so it lives here once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Callable

from prometheus_client.core import Metric

from ingest import __version__
from ingest.config import Settings
from ingest.core.clock import ServerClock
from ingest.credentials import CredentialFileWatcher, Credentials, CredentialStore, UnsafeKeyError, Verifier
from ingest.errors import ConfigError
from ingest.io.rest import OkxRestClient
from ingest.obs.logging import setup_logging
from ingest.obs.metrics import counter
from ingest.obs.redact import REDACTOR
from ingest.obs.sentry import init_sentry
from ingest.services.permissions import require_safe_key

log = logging.getLogger(__name__)


def configure_observability(settings: Settings) -> None:
    """Structured, redacting logs for every logger, and Sentry when a DSN is configured."""
    setup_logging(settings.obs.log_level, settings.obs.log_format)
    init_sentry(settings.obs.sentry_dsn, release=f"okx-ingest@{__version__}",
                environment=settings.okx.environment.value)


def install_signals(stop: asyncio.Event, reload: asyncio.Event) -> Callable[[], None]:
    """SIGTERM/SIGINT set `stop`, SIGHUP sets `reload`; returns the function that removes the handlers."""
    loop = asyncio.get_running_loop()
    handlers = {signal.SIGTERM: stop.set, signal.SIGINT: stop.set, signal.SIGHUP: reload.set}
    for sig, handler in handlers.items():
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            loop.add_signal_handler(sig, handler)

    def remove() -> None:
        for sig in handlers:
            with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
                loop.remove_signal_handler(sig)

    return remove


def key_verifier(settings: Settings, clock: ServerClock) -> Verifier:
    """The check a rotated key passes before any use (fail closed): its permissions, read with a signed request
    of its own, on a client of its own, so nothing (no login, no other request) uses it before it passed."""

    async def verify(candidate: Credentials) -> None:
        REDACTOR.set_secrets(candidate.values())  # masked from the first request that carries them
        probe = CredentialStore.holding(candidate, settings.okx)
        async with OkxRestClient.from_settings(settings, clock, probe) as rest:
            await require_safe_key(rest, settings.okx)
        log.info("credentials_verified", extra={"key_hint": candidate.key_hint})

    return verify


def credential_metrics(store: CredentialStore | None) -> list[Metric]:
    """The alert counter of refused rotations, the same in every process (0 without a key, so alerts see the
    first refusal)."""
    refused = counter("credential_rotations_refused", "Rotated credentials refused (the old key kept working): "
                      "unreadable, rejected by OKX or over-privileged")
    refused.add_metric([], 0 if store is None else store.rotations_refused_total + store.reload_failures_total)
    return [refused]


def exit_code_for(error: BaseException) -> int:
    """2 for what a restart cannot fix (a key that must not be used, a bad setting), else 1 (restart me)."""
    if isinstance(error, BaseExceptionGroup):
        return max((exit_code_for(e) for e in error.exceptions), default=1)
    return 2 if isinstance(error, UnsafeKeyError | ConfigError) else 1


async def keep_credentials(store: CredentialStore, poll_s: float, reload: asyncio.Event, *,
                           verify: Verifier | None = None) -> None:
    """Rotation without a restart: secret files polled, SIGHUP (`reload`) re-reads them. With `verify` (see
    `key_verifier`), new credentials are checked before the store hands them out; a refusal keeps the old ones
    (logged as an alert, counted), and a key that must not be used at all ends this task with UnsafeKeyError
    (the process then stops with exit 2). Secret values are masked in every log line from the moment they are
    loaded. Runs until cancelled."""
    store.verifier = verify

    async def on_reload() -> None:
        while True:
            await reload.wait()
            reload.clear()
            changed = await store.reload()
            log.info("credentials_reloaded", extra={"changed": changed, "key": store.current().key_hint})

    async def mask() -> None:
        version = store.version
        while True:
            version = await store.wait_changed(version)
            REDACTOR.set_secrets(store.current().values())

    watcher = CredentialFileWatcher(store, poll_s)  # its baseline: the files as they are now
    await store.reload()  # files replaced between the start-up load and that baseline would go unnoticed
    REDACTOR.set_secrets(store.current().values())
    async with asyncio.TaskGroup() as tg:
        tg.create_task(watcher.run(), name="credential-files")
        tg.create_task(on_reload(), name="credential-reload")
        tg.create_task(mask(), name="credential-mask")
