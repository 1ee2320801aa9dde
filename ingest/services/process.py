"""What every long-running okx-ingest process does the same way: signals, credential rotation, observability.

The recorder (`supervisor.py`) and the backfill worker (`services/backfill.py`) are separate processes with
separate jobs; their handling of SIGTERM/SIGINT/SIGHUP, of rotated secret files, and of logging and Sentry
must not drift apart, so it lives here once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Awaitable, Callable

from ingest import __version__
from ingest.config import Settings
from ingest.credentials import CredentialFileWatcher, CredentialStore
from ingest.obs.logging import setup_logging
from ingest.obs.redact import REDACTOR
from ingest.obs.sentry import init_sentry

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


async def keep_credentials(store: CredentialStore, poll_s: float, reload: asyncio.Event, *,
                           on_rotated: Callable[[], Awaitable[None]] | None = None) -> None:
    """Rotation without a restart: secret files polled, SIGHUP (`reload`) re-reads them, and new secret values
    are masked in every log line from the moment they are loaded. `on_rotated` runs after each change (the key
    permission check): if it raises, this task ends with that error (fail closed). Runs until cancelled."""

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
            if on_rotated is not None:
                await on_rotated()

    async with asyncio.TaskGroup() as tg:
        tg.create_task(CredentialFileWatcher(store, poll_s).run(), name="credential-files")
        tg.create_task(on_reload(), name="credential-reload")
        tg.create_task(mask(), name="credential-mask")
