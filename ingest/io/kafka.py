"""The Kafka sink: an aiokafka producer behind the Sink protocol, plus topic management.

`write(batch)` returns only once the broker acknowledged every record (acks=all) and raises DeliveryError
otherwise, with `retriable` telling the caller whether trying again can help. Nothing fails silently.

How a batch is sent, and why:
- Records are grouped per topic-partition into aiokafka BatchBuilders (`create_batch`/`send_batch`), with the
  partition computed here by the Java client's murmur2 rule (same key -> same partition as any Kafka client).
  This skips aiokafka's per-record futures and is about twice as fast as `send()` per record.
- Within one partition the batches of a write go one after another, each only once the previous one was
  acknowledged: if one fails, the later ones are never sent, so a retry of the whole write can duplicate a
  prefix (dropped by consumers via `record_id`) but never reorder records of a key.
- After any failed write the producer is discarded and the next write starts a new one. That drops stale
  batches (so nothing from a failed write is delivered behind the retry) and re-checks the topics first: the
  embedded broker is memory-only and comes back empty, and it auto-creates unknown topics with its own
  partition count when any client asks for their metadata, so topics are re-created before the producer looks.
- `delivery_timeout_ms` caps a write: the idempotent producer (on for real Kafka) otherwise retries forever
  while the broker is down, and a write must fail so the caller can report the outage.

Topic management: topics are created (partitions, replication factor and topic configs per kind, see
`KafkaSettings.topic_spec`) when `create_topics` is on, otherwise checked with a metadata request that cannot
auto-create them; missing topics fail with MissingTopicsError naming them and the fix. Topics that exist are
compared with their settings and every difference is logged with its fix, never changed (`topic_drift`).
Topics first seen in a write are handled the same way.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType
from aiokafka.errors import KafkaError, KafkaTimeoutError, ProducerClosed, for_code
from aiokafka.helpers import create_ssl_context
from aiokafka.partitioner import murmur2

from ingest.config import Compression, KafkaSettings, TopicSpec
from ingest.credentials import Secret
from ingest.errors import ConfigError, DeliveryError
from ingest.io.aiokafka_compat import stop_producer
from ingest.io.sink import EncodedRecord

log = logging.getLogger(__name__)

_TOPIC_EXISTS = 36
_KEY_CACHE_MAX = 100_000


class MissingTopicsError(DeliveryError):
    """Topics we must write to do not exist and `kafka.create_topics` is off."""

    retriable = False

    def __init__(self, topics: Sequence[str], partitions: int, replication_factor: int) -> None:
        self.topics = tuple(topics)
        super().__init__(
            f"Kafka topics missing: {', '.join(self.topics)}. Create them (partitions={partitions}, "
            f"replication_factor={replication_factor}) or set kafka.create_topics = true"
        )


def delivery_error(message: str, exc: BaseException | None = None, *, retriable: bool | None = None) -> DeliveryError:
    """A DeliveryError whose `retriable` flag follows the cause (or is given)."""
    err = DeliveryError(f"{message}: {describe(exc)}" if exc is not None else message)
    err.retriable = is_retriable(exc) if retriable is None else retriable
    return err


def describe(exc: BaseException | None) -> str:
    """`Type: message`, without repeating the type (aiokafka's messages already start with it)."""
    name = type(exc).__name__
    text = str(exc) if exc is not None else ""
    return text if text.startswith(name) else f"{name}: {text}" if text else name


def is_retriable(exc: BaseException | None) -> bool:
    """Transient (worth another attempt) vs permanent (authorization, sizes, unsupported features)."""
    if exc is None:
        return True
    if isinstance(exc, DeliveryError):
        return exc.retriable
    # aiokafka marks these non-retriable although they only mean "not now": a timeout, a closed producer.
    if isinstance(exc, KafkaTimeoutError | ProducerClosed | OSError | TimeoutError):
        return True
    if isinstance(exc, KafkaError):
        return bool(exc.retriable)
    return False


@dataclass(frozen=True, slots=True)
class ProducerOptions:
    """What the producer is configured with (logged at connect, inspected by tests); no secrets."""

    bootstrap_servers: str
    acks: str
    compression: str | None
    idempotence: bool
    linger_ms: int
    max_batch_bytes: int
    request_timeout_ms: int
    delivery_timeout_ms: int
    security_protocol: str


class KafkaSink:
    """Sink to Kafka (see module docstring). One write at a time; `write` is not re-entrant."""

    name = "kafka"

    def __init__(
        self,
        settings: KafkaSettings,
        *,
        bootstrap_servers: str | None = None,
        topics: Iterable[str] = (),
        sasl_username: str | None = None,
        sasl_password: Secret | None = None,
    ) -> None:
        if bootstrap_servers is None and settings.embedded:
            raise ConfigError("kafka.bootstrap_servers", "is 'embedded' but no running broker address was given",
                              "start ingest.io.broker.EmbeddedBroker and pass its bootstrap_servers")
        if settings.security_protocol.startswith("SASL") and not (sasl_username and sasl_password):
            raise ConfigError("kafka.security_protocol", f"{settings.security_protocol} needs SASL credentials",
                              "provide the Kafka username/password through the credential store")
        self.settings = settings
        self.options = ProducerOptions(
            bootstrap_servers=bootstrap_servers or settings.bootstrap_servers,
            acks="all",
            compression=None if settings.compression is Compression.NONE else settings.compression.value,
            idempotence=settings.idempotence,
            linger_ms=settings.linger_ms,
            max_batch_bytes=settings.max_batch_bytes,
            request_timeout_ms=settings.request_timeout_ms,
            delivery_timeout_ms=settings.delivery_timeout_ms,
            security_protocol=settings.security_protocol,
        )
        self._sasl_username = sasl_username
        self._sasl_password = sasl_password
        self._topics: dict[str, None] = dict.fromkeys(topics)  # every topic we write to, in first-seen order
        self._ready: set[str] = set()  # topics created/checked since the current producer connected
        self._partitions: dict[str, list[int]] = {}
        self._key_hash: dict[bytes, int] = {}  # murmur2 is pure Python in aiokafka: hash each key once
        self._producer: AIOKafkaProducer | None = None
        #: Existing topics whose partitions, replication or configs differ from the settings (checked, not changed).
        self.topic_drift: dict[str, tuple[str, ...]] = {}

    @property
    def connected(self) -> bool:
        return self._producer is not None

    @property
    def topics(self) -> list[str]:
        return list(self._topics)

    # -- client configuration -------------------------------------------------------------------------

    def _client_kwargs(self) -> dict[str, Any]:
        s = self.settings
        kwargs: dict[str, Any] = {
            "bootstrap_servers": self.options.bootstrap_servers,
            "client_id": s.client_id,
            "request_timeout_ms": s.request_timeout_ms,
            "retry_backoff_ms": s.retry_backoff_ms,
            "security_protocol": s.security_protocol,
        }
        if s.security_protocol in ("SSL", "SASL_SSL"):
            kwargs["ssl_context"] = create_ssl_context(cafile=str(s.ssl_cafile) if s.ssl_cafile else None)
        if s.security_protocol.startswith("SASL") and self._sasl_username and self._sasl_password:
            kwargs["sasl_mechanism"] = s.sasl_mechanism
            kwargs["sasl_plain_username"] = self._sasl_username
            kwargs["sasl_plain_password"] = self._sasl_password.reveal()
        return kwargs

    def _producer_kwargs(self) -> dict[str, Any]:
        o = self.options
        return {
            **self._client_kwargs(),
            "acks": "all",
            "compression_type": o.compression,
            "enable_idempotence": o.idempotence,
            "linger_ms": o.linger_ms,
            "max_batch_size": o.max_batch_bytes,
            "max_request_size": max(o.max_batch_bytes, 1_048_576),
        }

    # -- lifecycle ------------------------------------------------------------------------------------

    async def start(self) -> None:
        """Connect and create/check every known topic. Raises DeliveryError (retriable when the broker is
        merely unreachable, MissingTopicsError or another permanent one when configuration must change)."""
        try:
            await self._connect()
        except BaseException:
            await self._reset()
            raise

    async def ensure_topics(self, topics: Iterable[str]) -> None:
        """Create (or check) `topics` now if connected, else on connect; remembered for every reconnect."""
        new = [t for t in topics if t not in self._topics]
        self._topics.update(dict.fromkeys(new))
        if self._producer is not None:
            await self._ensure([t for t in self._topics if t not in self._ready])

    async def flush(self) -> None:
        # write() waits for every acknowledgement, so nothing is buffered between calls.
        if self._producer is not None:
            await self._producer.flush()

    async def close(self) -> None:
        await self._reset()

    async def _connect(self) -> AIOKafkaProducer:
        if self._producer is not None:
            return self._producer
        producer = AIOKafkaProducer(**self._producer_kwargs())
        try:
            await producer.start()
        except BaseException as exc:
            await stop_producer(producer, self.settings.request_timeout_ms / 1000)
            if isinstance(exc, Exception):
                hint = ""
                if self.options.idempotence and not is_retriable(exc):
                    hint = (" (the broker may not support the idempotent producer, as the embedded one does not: "
                            "set kafka.enable_idempotence = false for it)")
                raise delivery_error(f"Kafka producer could not connect to {self.options.bootstrap_servers}{hint}",
                                     exc) from exc
            raise
        self._producer = producer
        self._ready.clear()
        self._partitions.clear()
        log.info("kafka_connected", extra={"bootstrap": self.options.bootstrap_servers,
                                           "compression": self.options.compression,
                                           "idempotence": self.options.idempotence})
        await self._ensure(list(self._topics))
        return producer

    async def _reset(self) -> None:
        producer, self._producer = self._producer, None
        self._ready.clear()
        self._partitions.clear()
        if producer is not None:
            await stop_producer(producer, self.settings.request_timeout_ms / 1000)

    # -- topics ---------------------------------------------------------------------------------------

    async def _ensure(self, topics: list[str]) -> None:
        todo = [t for t in topics if t not in self._ready]
        if not todo:
            return
        s = self.settings
        admin = AIOKafkaAdminClient(**self._client_kwargs())
        try:
            await admin.start()
            # A full listing (metadata for no named topic) never auto-creates one, unlike naming them.
            existing = {t["topic"]: t for t in await admin.describe_topics()}
            missing = [t for t in todo if t not in existing]
            if missing and not s.create_topics:
                raise MissingTopicsError(missing, s.partitions, s.replication_factor)
            if missing:
                specs = {t: self.topic_spec(t) for t in missing}
                resp = await admin.create_topics(
                    [NewTopic(t, num_partitions=spec.partitions, replication_factor=spec.replication_factor,
                              topic_configs=dict(spec.config) or None) for t, spec in specs.items()],
                    timeout_ms=s.request_timeout_ms)
                for item in resp.topic_errors:
                    topic, code = item[0], item[1]
                    if code not in (0, _TOPIC_EXISTS):
                        err = for_code(code)()
                        raise delivery_error(f"could not create Kafka topic {topic}", err)
                log.info("kafka_topics_created", extra={"topics": {
                    t: {"partitions": spec.partitions, "replication_factor": spec.replication_factor,
                        **spec.config} for t, spec in specs.items()}})
            present = [t for t in todo if t in existing]
            if present:
                await self._check_topics(admin, {t: existing[t] for t in present})
        except DeliveryError:
            raise
        except Exception as exc:
            raise delivery_error("could not create or check Kafka topics", exc) from exc
        finally:
            with contextlib.suppress(Exception):
                await admin.close()
        self._ready.update(todo)

    def topic_spec(self, topic: str) -> TopicSpec:
        """The settings of a full topic name (`<prefix><kind>`); topics outside the prefix get the plain ones."""
        prefix = self.settings.topic_prefix
        kind = topic[len(prefix):] if topic.startswith(prefix) else ""
        return self.settings.topic_spec(kind)

    async def _check_topics(self, admin: AIOKafkaAdminClient, metadata: dict[str, dict[str, Any]]) -> None:
        """Compare existing topics with their settings and log each difference with its fix; never change them
        (an existing topic's settings may be deliberate, and partitions decide where keys go). A broker that
        cannot describe configs is logged once per check, not an error: the check is advice."""
        wanted = {t: self.topic_spec(t) for t in metadata}
        actual: dict[str, dict[str, str | None]] = {}
        try:
            resources = [ConfigResource(ConfigResourceType.TOPIC, t) for t in metadata]
            for response in await admin.describe_configs(resources):
                for resource in response.resources:
                    error_code, _, _, name, entries = resource[:5]
                    if error_code == 0:
                        actual[name] = {e[0]: e[1] for e in entries}
        except Exception as exc:
            log.warning("kafka_topic_configs_unchecked", extra={"topics": sorted(metadata), "error": describe(exc)})
        for topic, spec in wanted.items():
            drift: list[str] = []
            partitions = metadata[topic].get("partitions") or []
            if len(partitions) != spec.partitions:
                drift.append(f"partitions {len(partitions)} (settings: {spec.partitions})")
            replicas = {len(p.get("replicas") or ()) for p in partitions}
            if replicas and replicas != {spec.replication_factor}:
                drift.append(f"replication factor {','.join(map(str, sorted(replicas)))} "
                             f"(settings: {spec.replication_factor})")
            if topic in actual:
                drift += [f"{key}={actual[topic].get(key)} (settings: {value})" for key, value in spec.config.items()
                          if actual[topic].get(key) != value]
            self.topic_drift[topic] = tuple(drift)
            if drift:
                log.warning("kafka_topic_differs_from_settings", extra={
                    "topic": topic, "differences": drift,
                    "action": "left as it is; change the topic (kafka-configs.sh --alter --entity-type topics "
                              f"--entity-name {topic} --add-config KEY=VALUE) or kafka.topics.<kind> to match"})

    async def _partitions_of(self, producer: AIOKafkaProducer, topic: str) -> list[int]:
        parts = self._partitions.get(topic)
        if parts is None:
            parts = sorted(await producer.partitions_for(topic))
            if not parts:
                raise delivery_error(f"Kafka reports no partitions for topic {topic}", retriable=True)
            self._partitions[topic] = parts
        return parts

    # -- writing --------------------------------------------------------------------------------------

    async def write(self, batch: Sequence[EncodedRecord]) -> None:
        """Return once the broker acknowledged every record; raise DeliveryError otherwise."""
        if not batch:
            return
        try:
            async with asyncio.timeout(self.settings.delivery_timeout_ms / 1000):
                await self._write(batch)
        except DeliveryError:
            await self._reset()
            raise
        except Exception as exc:
            await self._reset()
            if isinstance(exc, TimeoutError):
                raise delivery_error(f"Kafka did not acknowledge {len(batch)} records within delivery_timeout_ms="
                                     f"{self.settings.delivery_timeout_ms}", retriable=True) from exc
            raise delivery_error(f"Kafka write of {len(batch)} records failed", exc) from exc

    async def _write(self, batch: Sequence[EncodedRecord]) -> None:
        producer = await self._connect()
        topics = {r.topic for r in batch}
        unready = [t for t in topics if t not in self._ready]
        if unready:
            self._topics.update(dict.fromkeys(unready))
            await self._ensure(unready)
        # Per topic: its partitions, and the one partition its unkeyed records of this write stick to.
        routes: dict[str, tuple[list[int], int]] = {}
        for topic in topics:
            parts = await self._partitions_of(producer, topic)
            routes[topic] = (parts, random.choice(parts))
        key_hash = self._key_hash
        if len(key_hash) > _KEY_CACHE_MAX:
            key_hash.clear()
        chains: dict[tuple[str, int], list[Any]] = {}
        for r in batch:
            parts, partition = routes[r.topic]
            key = r.key
            if key is not None:
                h = key_hash.get(key)
                if h is None:
                    h = key_hash[key] = murmur2(key) & 0x7FFFFFFF
                partition = parts[h % len(parts)]
            chain = chains.get((r.topic, partition))
            if chain is None:
                chain = chains[(r.topic, partition)] = [producer.create_batch()]
            headers = list(r.headers)  # the C record builder takes a list only
            if chain[-1].append(timestamp=r.ts_ms, key=key, value=r.value, headers=headers) is None:
                chain.append(producer.create_batch())
                if chain[-1].append(timestamp=r.ts_ms, key=key, value=r.value, headers=headers) is None:
                    raise delivery_error(f"record of {len(r.value)} bytes does not fit a Kafka batch "
                                         f"(max_batch_bytes={self.options.max_batch_bytes})", retriable=False)
        results = await asyncio.gather(
            *(_send_chain(producer, t, p, builders) for (t, p), builders in chains.items()), return_exceptions=True)
        errors = [e for e in results if isinstance(e, BaseException)]
        if errors:
            permanent = [e for e in errors if not is_retriable(e)]
            first = (permanent or errors)[0]
            raise delivery_error(f"Kafka refused {len(errors)} of {len(chains)} partition batches", first) from first


async def _send_chain(producer: AIOKafkaProducer, topic: str, partition: int, builders: list[Any]) -> None:
    """Send one partition's batches in order, each after the previous one was acknowledged."""
    for builder in builders:
        builder.close()  # a closed batch does not linger: it was filled on purpose
        fut = await producer.send_batch(builder, topic, partition=partition)
        await fut
