"""Sentry error reporting with every secret scrubbed before an event leaves the process.

PII collection stays at its default (off), request bodies and local variables are not attached, and
`before_send`/`before_breadcrumb` run every event through the process redactor, so even a secret
inside a library's exception message is masked. Trace propagation is off for every host: sentry-sdk would
otherwise add `sentry-trace` and `baggage` (with the DSN's public key) to each request to OKX, a schema
registry or any other third party.
"""

from __future__ import annotations

import logging
from typing import Any

from ingest.obs.redact import REDACTOR, Redactor

log = logging.getLogger(__name__)


def _scrubber(redactor: Redactor) -> Any:
    def scrub(event: Any, _hint: Any) -> Any:
        return redactor.scrub_obj(event)

    return scrub


def init_sentry(dsn: str | None, *, release: str, environment: str, redactor: Redactor = REDACTOR) -> bool:
    """Initialise Sentry when a DSN is configured; returns whether it is on."""
    if not dsn:
        return False
    import sentry_sdk
    from sentry_sdk.integrations.logging import LoggingIntegration

    sentry_sdk.init(
        dsn=dsn,
        release=release,
        environment=environment,
        include_local_variables=False,
        max_request_body_size="never",
        trace_propagation_targets=[],  # no outgoing request (OKX, registry, ...) gets sentry-trace/baggage
        before_send=_scrubber(redactor),
        before_breadcrumb=_scrubber(redactor),
        integrations=[LoggingIntegration(level=logging.INFO, event_level=logging.ERROR)],
    )
    log.info("sentry_enabled", extra={"environment": environment, "release": release})
    return True
