"""The clients both entry points build: the record encoder and the REST client with a measured clock."""

from __future__ import annotations

import logging
import time

from ingest.config import Settings
from ingest.core.avro import RecordEncoder
from ingest.core.clock import ServerClock
from ingest.core.records import topic_name
from ingest.credentials import CredentialStore, credentials_present
from ingest.errors import IngestError
from ingest.io.rest import OkxRestClient
from ingest.services.clock import ClockService

#: One logger for the whole package, the name it had as one module (it is in every JSON log line).
log = logging.getLogger("ingest.services.backfill")


async def encoder_for(settings: Settings) -> RecordEncoder:
    """The same wire format as the recorder: single-object, or Confluent ids from the schema registry."""
    prefix = settings.kafka.topic_prefix
    encoder = RecordEncoder(prefix)
    if not settings.kafka.schema_registry_url:
        return encoder
    import orjson

    from ingest.core.records import RECORD_TYPES
    from ingest.io.registry import SchemaRegistry

    async with SchemaRegistry.from_settings(settings.kafka) as registry:
        ids = {cls.AVRO_NAME: await registry.schema_id(topic_name(prefix, cls.TOPIC),
                                                       orjson.dumps(encoder.schemas[cls.AVRO_NAME].source).decode())
               for cls in RECORD_TYPES}
    return RecordEncoder(prefix, schema_ids=ids)


async def rest_client_for(settings: Settings, *, private: bool) -> tuple[OkxRestClient, ClockService]:
    """The process's REST client (credentials when present or needed) with a measured server-time offset."""
    store = CredentialStore.from_settings(settings.okx) if private or credentials_present() else None
    if store is not None:
        from ingest.obs.redact import REDACTOR

        REDACTOR.set_secrets(store.current().values())
    clock = ServerClock(lambda: time.time_ns() // 1_000_000)
    rest = OkxRestClient.from_settings(settings, clock, store)
    service = ClockService.from_settings(rest, clock, settings.obs)
    rest.on_clock_expired = service.resync
    try:
        await service.measure()
    except IngestError as exc:
        log.warning("clock_unmeasured", extra={"error": str(exc), "note": "signing with the local clock"})
    return rest, service
