"""`okx-ingest check`: validate everything the daemon needs before it is deployed, then exit.

Settings (already validated on load), credentials (present, readable, accepted by OKX, not over-
privileged), the clock offset to OKX, and Kafka (reachable; topics present or creatable). Each problem
is one line saying what is wrong and how to fix it; the exit code is 0 only when everything passed.

`--offline` checks only what needs no network (settings, credentials present and readable, files the
settings name): for CI, image builds and config reviews where OKX and Kafka are out of reach.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO

from ingest.config import Settings
from ingest.core.clock import ServerClock
from ingest.credentials import CredentialStore, credentials_present
from ingest.errors import IngestError
from ingest.io.kafka import KafkaSink
from ingest.io.rest import OkxRestClient
from ingest.obs.logging import setup_logging
from ingest.services.clock import ClockService
from ingest.services.permissions import check_key_permissions
from ingest.supervisor import all_topics, wanted_args


async def check(settings: Settings, out: TextIO = sys.stdout, *, offline: bool = False) -> int:
    """Run every check, print one line each; 0 when all passed, 2 otherwise. `offline`: no network at all."""
    setup_logging("WARNING", "text")
    failures = 0

    def report(ok: bool, what: str) -> None:
        nonlocal failures
        failures += not ok
        print(f"{'ok  ' if ok else 'FAIL'} {what}", file=out)

    args = wanted_args(settings)
    report(True, f"settings: {len(args)} subscriptions, shard {settings.shard}, "
                 f"environment {settings.okx.environment.value}")
    store: CredentialStore | None = None
    if settings.okx.private or any(a.needs_login for a in args) or credentials_present():
        try:
            store = CredentialStore.from_settings(settings.okx)
            report(True, f"credentials: key {store.current().key_hint}")
        except IngestError as exc:
            report(False, f"credentials: {exc}")
    if offline:
        for ok, what in offline_checks(settings):
            report(ok, what)
        return 0 if failures == 0 else 2
    clock = ServerClock(lambda: time.time_ns() // 1_000_000)
    async with OkxRestClient.from_settings(settings, clock, store) as rest:
        service = ClockService.from_settings(rest, clock, settings.obs)
        try:
            sample = await service.measure()
            health = service.health().value
            report(health in ("ok", "warn"), f"clock: offset to OKX {sample.offset_ms:+d} ms "
                                             f"(rtt {sample.rtt_ms} ms, {health})")
        except IngestError as exc:
            report(False, f"clock: OKX server time unreachable: {exc}")
        if store is not None:
            try:
                info = await check_key_permissions(rest, settings.okx)
                report(True, f"key permissions: {','.join(info.perms)} (uid {info.uid})")
            except IngestError as exc:
                report(False, f"key permissions: {exc}")
    if settings.kafka.embedded:
        report(True, "kafka: embedded broker (memory only; started by `okx-ingest run`)")
    else:
        sink = KafkaSink(settings.kafka, topics=all_topics(settings.kafka.topic_prefix))
        try:
            await sink.start()
            report(True, f"kafka: {settings.kafka.bootstrap_servers} reachable, {len(sink.topics)} topics ready")
            for topic, drift in sink.topic_drift.items():
                if drift:  # advice, not a failure: existing topics are never changed
                    print(f"warn kafka: topic {topic} differs from its settings: {'; '.join(drift)}", file=out)
        except IngestError as exc:
            report(False, f"kafka: {exc}")
        finally:
            await sink.close()
    return 0 if failures == 0 else 2


def offline_checks(settings: Settings) -> list[tuple[bool, str]]:
    """What can be checked without the network: files the settings name, and where data would go."""
    out: list[tuple[bool, str]] = []
    kafka = settings.kafka
    for key in ("ssl_cafile", "ssl_certfile", "ssl_keyfile"):
        path = getattr(kafka, key, None)
        if path is not None:
            out.append((path.is_file(), f"kafka.{key}: {path}" + ("" if path.is_file() else " does not exist")))
    if kafka.embedded:
        out.append((True, "kafka: embedded broker (memory only: everything recorded is lost when the process "
                          "stops); not contacted (--offline)"))
    else:
        registry = f", schema registry {kafka.schema_registry_url}" if kafka.schema_registry_url else ""
        out.append((True, f"kafka: {kafka.bootstrap_servers} ({kafka.security_protocol}, "
                          f"{kafka.wire_format.value}{registry}); not contacted (--offline)"))
    out.append((True, "okx: not contacted (--offline): clock and key permissions unchecked"))
    return out
