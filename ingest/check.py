"""`okx-ingest check`: validate everything the daemon needs before it is deployed, then exit.

Settings (already validated on load), credentials (present, readable, accepted by OKX, not over-
privileged) when the settings need them, the clock offset to OKX, every instrument and channel against
OKX's `/public/instruments` (what OKX would refuse at subscribe time), and Kafka (reachable; topics present).
It changes nothing anywhere: no topic is created, no subscription made. Each problem is one line saying what
is wrong and how to fix it; the exit code is 0 only when everything passed.

`--offline` checks only what needs no network (settings, credentials present and readable, files the
settings name): for CI, image builds and config reviews where OKX and Kafka are out of reach.
"""

from __future__ import annotations

import sys
import time
from collections import defaultdict
from collections.abc import Callable, Iterable
from typing import TextIO

from ingest.config import KafkaSettings, Settings
from ingest.core.clock import ServerClock
from ingest.credentials import CredentialStore, credentials_present
from ingest.errors import IngestError
from ingest.io.kafka import KafkaSink, MissingTopicsError
from ingest.io.kafka_security import describe_security, kafka_client_kwargs
from ingest.io.rest import OkxRestClient
from ingest.obs.logging import setup_logging
from ingest.okx.channels import CHANNEL_INST_TYPES, INST_TYPE_CHANNELS, SubArg, inst_type_of
from ingest.services.clock import ClockService
from ingest.services.permissions import check_key_permissions
from ingest.supervisor import all_topics, wanted_args

INSTRUMENTS_PATH = "/api/v5/public/instruments"
Report = Callable[[bool, str], None]


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
    needed = settings.okx.private or any(a.needs_login for a in args)
    store: CredentialStore | None = None
    if needed or credentials_present():
        try:
            store = CredentialStore.from_settings(settings.okx)
            report(True, f"credentials: key {store.current().key_hint}")
        except IngestError as exc:
            # Public-only settings never use a key: a stale *_FILE variable is worth a line, not a failure.
            report(not needed, f"credentials: {exc}" if needed else
                   f"credentials: not needed by these settings (public streams only); ignoring: {exc}")
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
        await check_instruments(rest, args, report)
    if settings.kafka.embedded:
        report(True, "kafka: embedded broker (memory only; started by `okx-ingest run`)")
    else:
        await _check_kafka(settings, report, out)
    return 0 if failures == 0 else 2


async def _check_kafka(settings: Settings, report: Report, out: TextIO) -> None:
    """Reachable, which topics exist and how they differ from their settings: read-only (a check must not
    create the topics it checks), so the sink runs with create_topics off, once more for the existing ones."""
    kafka = settings.kafka
    topics = all_topics(kafka.topic_prefix)
    try:
        missing, drift = await _inspect_topics(settings, topics)
        if missing:
            drift = (await _inspect_topics(settings, [t for t in topics if t not in missing]))[1]
    except IngestError as exc:
        report(False, f"kafka: {exc}")
        return
    if not missing:
        report(True, f"kafka: {kafka.bootstrap_servers} reachable, all {len(topics)} topics exist")
    elif kafka.create_topics:
        report(True, f"kafka: {kafka.bootstrap_servers} reachable; {len(missing)} of {len(topics)} topics "
                     "missing, `okx-ingest run` creates them (kafka.create_topics = true)")
    else:
        report(False, f"kafka: {MissingTopicsError(missing, kafka.partitions, kafka.replication_factor)}")
    for topic, differences in drift.items():
        if differences:  # advice, not a failure: existing topics are never changed
            print(f"warn kafka: topic {topic} differs from its settings: {'; '.join(differences)}", file=out)


async def _inspect_topics(settings: Settings, topics: list[str]) -> tuple[tuple[str, ...], dict[str, list[str]]]:
    """(missing topics, drift of the existing ones) as the sink sees them on connecting, creating nothing."""
    if not topics:
        return (), {}
    sink = KafkaSink(settings.kafka.model_copy(update={"create_topics": False}), topics=topics)
    try:
        await sink.start()
        return (), {t: list(d) for t, d in sink.topic_drift.items()}
    except MissingTopicsError as exc:
        return exc.topics, {}
    finally:
        await sink.close()


def _instrument_args(args: Iterable[SubArg]) -> dict[str, list[str]]:
    """instId -> channels, for the args that name a tradable instrument (index channels name an index)."""
    out: dict[str, list[str]] = defaultdict(list)
    for a in args:
        if a.inst_id and a.channel not in INST_TYPE_CHANNELS and not a.channel.startswith(("index-", "status")):
            out[a.inst_id].append(a.channel)
    return out


async def check_instruments(rest: OkxRestClient, args: list[SubArg], report: Report) -> None:
    """Every instrument exists at OKX and every channel fits its instrument's type (one request per type)."""
    wanted = _instrument_args(args)
    problems: list[str] = []
    for a in args:
        allowed = CHANNEL_INST_TYPES.get(a.channel)
        if a.channel in INST_TYPE_CHANNELS and a.inst_type and allowed and a.inst_type not in allowed | {"ANY"}:
            problems.append(f"{a.channel} with instType {a.inst_type}: OKX serves it for "
                            f"{', '.join(sorted(allowed))} only")
    queries: dict[tuple[str, str | None], set[str]] = defaultdict(set)
    for inst in wanted:
        kind = inst_type_of(inst)
        family = "-".join(inst.split("-")[:2]) if kind == "OPTION" else None
        queries[(kind, family)].add(inst)
    known: dict[str, str] = {}
    try:
        for (kind, family), insts in queries.items():
            params = {"instType": kind, **({"instFamily": family} if family else {})}
            for row in await rest.get(INSTRUMENTS_PATH, params, signed=False):
                inst_id, state = row.get("instId"), row.get("state")
                if isinstance(inst_id, str) and inst_id in insts:
                    known[inst_id] = kind if state in (None, "", "live", "preopen") else f"{kind} ({state})"
    except IngestError as exc:
        report(False, f"instruments: {INSTRUMENTS_PATH} unreachable, instruments unchecked: {exc}")
        return
    for inst, channels in wanted.items():
        found = known.get(inst)
        if found is None:
            problems.append(f"{inst}: OKX has no {inst_type_of(inst)} instrument of that name (check the spelling "
                            "in okx.instruments / okx.subscriptions; swaps end in -SWAP)")
            continue
        for channel in channels:
            allowed = CHANNEL_INST_TYPES.get(channel)
            if allowed and found.split()[0] not in allowed:
                problems.append(f"{channel} for {inst}: OKX serves {channel} for {', '.join(sorted(allowed))} "
                                f"only and {inst} is {found}; remove it or subscribe it for a swap (e.g. "
                                f"{inst}-SWAP)")
    for problem in problems:
        report(False, f"subscriptions: {problem}")
    if not problems:
        report(True, f"instruments: {len(wanted)} known to OKX, every channel fits its instrument type")


def offline_checks(settings: Settings) -> list[tuple[bool, str]]:
    """What can be checked without the network: files the settings name, and where data would go."""
    out: list[tuple[bool, str]] = []
    kafka = settings.kafka
    for key in ("ssl_cafile", "ssl_certfile", "ssl_keyfile"):
        path = getattr(kafka, key, None)
        if path is not None:
            out.append((path.is_file(), f"kafka.{key}: {path}" + ("" if path.is_file() else " does not exist")))
    if kafka.security_protocol != "PLAINTEXT":
        out.append(_security_check(kafka))
    if kafka.embedded:
        out.append((True, "kafka: embedded broker (memory only: everything recorded is lost when the process "
                          "stops); not contacted (--offline)"))
    else:
        registry = f", schema registry {kafka.schema_registry_url}" if kafka.schema_registry_url else ""
        out.append((True, f"kafka: {kafka.bootstrap_servers} ({kafka.security_protocol}, "
                          f"{kafka.wire_format.value}{registry}); not contacted (--offline)"))
    out.append((True, "okx: not contacted (--offline): clock and key permissions unchecked"))
    return out


def _security_check(kafka: KafkaSettings) -> tuple[bool, str]:
    """Build the Kafka clients' TLS context and SASL settings without connecting: the files load, the key
    password decrypts the key, the SASL secrets are present (their values are not shown)."""
    try:
        kafka_client_kwargs(kafka)
    except IngestError as exc:
        return False, f"kafka security: {exc}"
    shown = ", ".join(f"{k}={v}" for k, v in describe_security(kafka).items())
    return True, f"kafka security: {shown}; secrets present"
