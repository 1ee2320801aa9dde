"""`okx-ingest backfill`: the worker as a service on the runtime, with metrics, health and credentials."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from ingest.config import Settings
from ingest.errors import IngestError
from ingest.runtime import Runtime, finish_task
from ingest.services.backfill.clients import encoder_for, rest_client_for
from ingest.services.backfill.stats import backfill_metrics
from ingest.services.backfill.worker import BackfillWorker

#: One logger for the whole package, the name it had as one module (it is in every JSON log line).
log = logging.getLogger("ingest.services.backfill")


async def run_worker(settings: Settings) -> int:
    """`okx-ingest backfill`: one worker of the group until SIGTERM/SIGINT; 0 on a clean stop, 1 on failure.

    Also serves /metrics, /healthz and /readyz (obs.metrics_host/port, as the deploy files probe), keeps the
    server-time offset measured, and follows credential rotation (secret files polled, SIGHUP re-reads).
    """
    from ingest.obs.health import HealthServer, Readiness
    from ingest.obs.metrics import new_component_registry
    from ingest.services.permissions import require_safe_key
    from ingest.services.process import (
        configure_observability,
        credential_metrics,
        exit_code_for,
        install_signals,
        keep_credentials,
        key_verifier,
    )

    configure_observability(settings)
    stop, reload = asyncio.Event(), asyncio.Event()
    remove_signals = install_signals(stop, reload)
    rest, clock_service = await rest_client_for(settings, private=False)
    health: HealthServer | None = None
    try:
        if rest.credentials is not None:  # refuse an over-privileged key before any signed request
            await require_safe_key(rest, settings.okx)
        worker = BackfillWorker(settings, rest, encoder=await encoder_for(settings))
        registry, collector = new_component_registry("backfill")

        def metrics() -> list[Any]:
            return backfill_metrics(worker.stats()) + credential_metrics(rest.credentials)

        def readiness() -> Readiness:
            d = worker.delivery.stats
            reasons = [r for r, bad in ((f"delivery failed: {d.last_error}", d.failed),
                                        ("Kafka unreachable", not d.broker_up)) if bad]
            return Readiness(not reasons, tuple(reasons), {"partitions": worker.stats().partitions})

        collector.add(metrics)
        health = HealthServer(registry, readiness, settings.obs.metrics_host, settings.backfill.metrics_port,
                              port_key="backfill.metrics_port")
        await health.start()
        runtime = Runtime("backfill", stop_timeout_s=settings.backfill.stop_timeout_s)
        async with runtime:
            runtime.spawn("clock", clock_service.run())
            if rest.credentials is not None:
                verify = key_verifier(settings, rest.clock)  # a rotated key is checked before any use
                runtime.spawn("credentials", keep_credentials(rest.credentials, settings.okx.credential_poll_s,
                                                              reload, verify=verify))
            worker_stop = asyncio.Event()
            worker_task = runtime.spawn("worker", worker.run(worker_stop), essential=True)
            # A helper that dies (a rotated key that may withdraw) stops the worker too: fail closed.
            ended = await runtime.wait(stop)
            worker_stop.set()
            if runtime.pop("worker") is not None:
                # Its own stop is bounded step by step (batch, consumer, delivery); this bounds the whole.
                await finish_task(worker_task, settings.backfill.stop_timeout_s * 2
                                  + settings.journal.close_timeout_s, what="backfill worker")
        if ended.error is not None:
            log.error("backfill_stopped", extra={"task": ended.task, "error": repr(ended.error)})
            return exit_code_for(ended.error)
        return ended.exit_code
    except IngestError as exc:
        log.error("backfill_failed", extra={"error": str(exc)})
        return exit_code_for(exc)
    finally:
        if health is not None:
            await health.stop()
        await rest.aclose()
        remove_signals()
