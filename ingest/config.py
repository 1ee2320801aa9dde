"""Typed settings from a TOML file and the environment; every error names the key and the fix.

Precedence: environment (`OKX_INGEST__SECTION__KEY`) over the file (`--config`, or `OKX_INGEST_CONFIG`)
over defaults. Credentials are deliberately absent: they come only from the environment or secret
files (see `ingest.credentials`), never from this file.
"""

from __future__ import annotations

import enum
import os
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from ingest.errors import ConfigError
from ingest.io.tls import normalize_pin
from ingest.okx.channels import INST_TYPE_CHANNELS, endpoint_for, is_candle
from ingest.okx.endpoints import Environment

_FORBIDDEN_KEYS = {"api_key", "apikey", "secret", "api_secret", "passphrase", "password"}


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Subscription(_Section):
    """One subscription arg as OKX takes it."""

    channel: str
    inst_id: str | None = None
    inst_type: str | None = None
    inst_family: str | None = None
    ccy: str | None = None

    @model_validator(mode="after")
    def _known_channel(self) -> Subscription:
        if endpoint_for(self.channel) is None:
            raise ValueError(f"unknown OKX channel {self.channel!r} (see SPEC channel map; candles are candle<bar>)")
        if self.channel in INST_TYPE_CHANNELS and self.inst_type is None and self.inst_id is None:
            raise ValueError(f"channel {self.channel!r} needs inst_type (e.g. SWAP or ANY)")
        needs_inst = not (self.channel in INST_TYPE_CHANNELS or self.channel in
                          {"account", "balance_and_position", "fills", "status", "liquidation-warning",
                           "account-greeks"})
        if (needs_inst and self.inst_id is None and not is_candle(self.channel)) or (
            is_candle(self.channel) and self.inst_id is None
        ):
            raise ValueError(f"channel {self.channel!r} needs inst_id")
        return self

    def to_arg(self) -> dict[str, str]:
        """The arg object OKX expects in a subscribe request."""
        arg = {"channel": self.channel}
        for key, name in (("inst_id", "instId"), ("inst_type", "instType"), ("inst_family", "instFamily"),
                          ("ccy", "ccy")):
            value = getattr(self, key)
            if value is not None:
                arg[name] = value
        return arg


class OkxSettings(_Section):
    """Where to connect and what to subscribe."""

    environment: Environment = Environment.PRODUCTION
    ws_base_url: str | None = Field(default=None, description="override scheme://host[:port] for all WS endpoints")
    rest_base_url: str | None = Field(default=None, description="override the REST base URL")
    subscriptions: list[Subscription] = Field(default_factory=list)
    instruments: list[str] = Field(default_factory=list, description="shorthand: instIds for `channels`")
    channels: list[str] = Field(default_factory=lambda: ["trades", "books", "tickers"],
                                description="channels subscribed for every entry of `instruments`")
    private: bool = Field(default=False, description="record the account's private streams (needs credentials)")
    allow_withdraw_permission: bool = False
    allow_trade_permission: bool = True
    tls_spki_pins: list[str] = Field(default_factory=list, description="base64 sha256 SPKI pins for OKX hosts")
    rest_max_connections: Annotated[int, Field(gt=0, le=200)] = 20
    rest_keepalive_s: Annotated[float, Field(gt=0)] = 30.0
    rest_limit_share: Annotated[float, Field(gt=0, le=1)] = Field(
        default=1.0, description="fraction of each OKX REST limit this process may use (split it between "
                                 "processes sharing one IP or API key)")
    credential_poll_s: Annotated[float, Field(gt=0)] = Field(
        default=5.0, description="how often the *_FILE credential files are checked for rotation")
    auth_failure_threshold: Annotated[int, Field(gt=0)] = Field(
        default=3, description="consecutive authentication failures before signed traffic pauses")
    auth_pause_initial_s: Annotated[float, Field(gt=0)] = 30.0
    auth_pause_max_s: Annotated[float, Field(gt=0)] = 900.0

    @field_validator("tls_spki_pins")
    @classmethod
    def _pins_are_sha256(cls, pins: list[str]) -> list[str]:
        return [normalize_pin(p) for p in pins]

    @model_validator(mode="after")
    def _auth_pause_bounds(self) -> OkxSettings:
        if self.auth_pause_max_s < self.auth_pause_initial_s:
            raise ValueError("auth_pause_max_s must be >= auth_pause_initial_s")
        return self

    def all_subscriptions(self) -> list[Subscription]:
        """Explicit subscriptions plus the instruments x channels shorthand, without duplicates."""
        out = list(self.subscriptions)
        for inst in self.instruments:
            for ch in self.channels:
                out.append(Subscription(channel=ch, inst_id=inst))
        seen: set[tuple[str, str | None, str | None]] = set()
        unique = []
        for s in out:
            k = (s.channel, s.inst_id, s.inst_type)
            if k not in seen:
                seen.add(k)
                unique.append(s)
        return unique


class WsSettings(_Section):
    """Connection behaviour; defaults follow OKX's documented limits."""

    keepalive_s: Annotated[float, Field(gt=0, lt=30)] = 20.0
    pong_timeout_s: Annotated[float, Field(gt=0)] = 10.0
    backoff_min_s: Annotated[float, Field(gt=0)] = 0.1
    backoff_max_s: Annotated[float, Field(gt=0)] = 30.0
    healthy_after_s: Annotated[float, Field(ge=0)] = 30.0
    connects_per_s: Annotated[float, Field(gt=0, le=3)] = 3.0
    requests_per_hour: Annotated[int, Field(gt=0, le=480)] = 480
    args_per_connection: Annotated[int, Field(gt=0)] = 100
    depth_channels_per_connection: Annotated[int, Field(gt=0, lt=30)] = 29
    subscribe_max_bytes: Annotated[int, Field(gt=0, le=65536)] = 60000
    login_timeout_s: Annotated[float, Field(gt=0)] = 10.0
    subscribe_timeout_s: Annotated[float, Field(gt=0)] = 10.0
    notice_cutover_timeout_s: Annotated[float, Field(gt=0)] = 30.0
    public_url: str | None = Field(default=None, description="full URL of the public endpoint (beats ws_base_url)")
    business_url: str | None = Field(default=None, description="full URL of the business endpoint")
    private_url: str | None = Field(default=None, description="full URL of the private endpoint")
    connect_timeout_s: Annotated[float, Field(gt=0)] = 10.0
    close_timeout_s: Annotated[float, Field(gt=0)] = Field(
        default=2.0, description="wait for OKX's close frame before dropping the socket")
    max_message_bytes: Annotated[int, Field(gt=0)] = Field(
        default=16 * 1024 * 1024, description="largest inbound message accepted (instrument snapshots are MBs)")
    subscribe_retries: Annotated[int, Field(ge=0)] = Field(
        default=3, description="retries of an arg OKX refused with a transient error, before it counts as failed")
    resubscribe_min_interval_s: Annotated[float, Field(ge=0)] = Field(
        default=5.0, description="least time between two resubscribes of one arg (book resyncs)")
    cutover_catchup_s: Annotated[float, Field(gt=0)] = Field(
        default=5.0, description="after a 64008 replacement's predecessor closed, wait this long at most for the "
                                 "replacement to deliver what the old connection did before cutting over")
    shutdown_timeout_s: Annotated[float, Field(gt=0)] = Field(
        default=10.0, description="on shutdown, time to close sockets and hand their last frames to the pipeline")
    compression: bool = Field(
        default=True, description="offer permessage-deflate: less bandwidth, about 4.5 us more CPU "
                                  "per message (make bench); turn off when CPU, not the link, is the limit")

    @model_validator(mode="after")
    def _bounds(self) -> WsSettings:
        if self.backoff_max_s < self.backoff_min_s:
            raise ValueError("backoff_max_s must be >= backoff_min_s")
        for key in ("public_url", "business_url", "private_url"):
            url = getattr(self, key)
            if url is not None and not url.startswith(("wss://", "ws://")):
                raise ValueError(f"{key} must be a ws:// or wss:// URL, got {url!r}")
        return self


class Compression(enum.StrEnum):
    NONE = "none"
    GZIP = "gzip"
    SNAPPY = "snappy"
    LZ4 = "lz4"
    ZSTD = "zstd"


class WireFormat(enum.StrEnum):
    SINGLE_OBJECT = "single-object"
    CONFLUENT = "confluent"


_DAY_MS = 86_400_000

#: Topic-level configs sent when a topic is created, per topic kind; `kafka.topics.<kind>.config` adds to them
#: or overrides them. okx.gaps (one record per gap status change, keyed by stream) and okx.instruments (the
#: instrument list, keyed by instId) are state: compacted, but only after a week, so the backfill worker and
#: any consumer see every record first. okx.raw is bulky and kept for a shorter time.
DEFAULT_TOPIC_CONFIGS: dict[str, dict[str, str]] = {
    "gaps": {"cleanup.policy": "compact", "min.compaction.lag.ms": str(7 * _DAY_MS)},
    "instruments": {"cleanup.policy": "compact", "min.compaction.lag.ms": str(7 * _DAY_MS)},
    "raw": {"retention.ms": str(3 * _DAY_MS)},
    "dlq": {"retention.ms": str(30 * _DAY_MS)},
}


class TopicSettings(_Section):
    """`[kafka.topics.<kind>]`: one topic's partitions, replication and topic-level configs (applied when the
    topic is created; an existing topic is only checked, never changed)."""

    partitions: Annotated[int, Field(gt=0)] | None = Field(default=None, description="default: kafka.partitions")
    replication_factor: Annotated[int, Field(gt=0)] | None = Field(
        default=None, description="default: kafka.replication_factor")
    config: dict[str, str] = Field(default_factory=dict, description="Kafka topic configs, e.g. "
                                   '{"retention.ms" = "604800000"}, on top of the defaults of that topic')


class TopicSpec(BaseModel):
    """What one topic should look like: the defaults, kafka.partitions/replication_factor and its overrides."""

    model_config = ConfigDict(frozen=True)

    partitions: int
    replication_factor: int
    config: dict[str, str]


class KafkaSettings(_Section):
    """The Kafka sink. `embedded` runs a memory-only broker on 127.0.0.1:9092 (demos, tests)."""

    bootstrap_servers: str = "embedded"
    embedded_port: int = 9092
    topic_prefix: str = "okx."
    compression: Compression = Compression.ZSTD
    linger_ms: Annotated[int, Field(ge=0)] = 5
    max_batch_bytes: Annotated[int, Field(gt=0)] = 1_048_576
    enable_idempotence: bool | None = Field(
        default=None, description="None: on for real Kafka, off for the embedded broker (which refuses it)"
    )
    create_topics: bool = True
    partitions: Annotated[int, Field(gt=0)] = 6
    replication_factor: Annotated[int, Field(gt=0)] = 1
    wire_format: WireFormat = WireFormat.SINGLE_OBJECT
    schema_registry_url: str | None = None
    publish_raw: bool = True
    max_record_bytes: Annotated[int, Field(gt=1024)] = Field(
        default=1_000_000, description="largest record value produced; bigger ones (a raw frame of a huge snapshot) "
                                       "become a dead letter holding their start, since Kafka would refuse them "
                                       "(broker message.max.bytes is about 1 MB by default)")
    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] = Field(
        default="PLAIN", description="with SASL_*; the username/password come from the credential store, never here"
    )
    ssl_cafile: Path | None = Field(default=None, description="CA bundle for SSL/SASL_SSL (default: system CAs)")
    client_id: str = "okx-ingest"
    request_timeout_ms: Annotated[int, Field(gt=0)] = Field(
        default=30_000, description="one produce/admin request; a down broker fails a write after about this long"
    )
    delivery_timeout_ms: Annotated[int, Field(gt=0)] = Field(
        default=120_000, description="hard cap on one write (the idempotent producer otherwise retries forever)"
    )
    retry_backoff_ms: Annotated[int, Field(gt=0)] = 100
    reconnect_backoff_max_ms: Annotated[int, Field(gt=0)] = Field(
        default=5_000, description="cap of the jittered wait between delivery attempts while the broker is down"
    )
    topics: dict[str, TopicSettings] = Field(
        default_factory=dict, description="per topic kind (`raw`, `gaps`, ...): partitions, replication_factor, "
                                          "config; see DEFAULT_TOPIC_CONFIGS for what is set without them")

    @field_validator("security_protocol")
    @classmethod
    def _no_sasl_yet(cls, v: str) -> str:
        if v.startswith("SASL"):
            raise ValueError("SASL is not supported yet (its credentials are not wired through the credential "
                             "store); use PLAINTEXT or SSL (mutual TLS via the broker's listener)")
        return v

    @field_validator("topics")
    @classmethod
    def _known_topic_kinds(cls, v: dict[str, TopicSettings]) -> dict[str, TopicSettings]:
        from ingest.core.records import TopicKind

        known = {k.value for k in TopicKind}
        unknown = sorted(set(v) - known)
        if unknown:
            raise ValueError(f"unknown topic kind {unknown[0]!r} in kafka.topics "
                             f"(use one of {', '.join(sorted(known))})")
        return v

    def topic_spec(self, kind: str) -> TopicSpec:
        """Partitions, replication factor and configs a topic of this kind is created with (or checked against)."""
        own = self.topics.get(kind, TopicSettings())
        return TopicSpec(partitions=own.partitions or self.partitions,
                         replication_factor=own.replication_factor or self.replication_factor,
                         config={**DEFAULT_TOPIC_CONFIGS.get(kind, {}), **own.config})

    @field_validator("bootstrap_servers")
    @classmethod
    def _bootstrap_named(cls, v: str) -> str:
        # The production config (config/production.toml, the image's) leaves it empty on purpose: it must be named.
        if not v.strip():
            raise ValueError("no Kafka brokers named: set host:port[,host:port...] (e.g. "
                             "OKX_INGEST__KAFKA__BOOTSTRAP_SERVERS=kafka-0:9092), or 'embedded' for a memory-only "
                             "broker that loses everything when the process stops (demos only)")
        return v.strip()

    @property
    def embedded(self) -> bool:
        return self.bootstrap_servers == "embedded"

    @property
    def idempotence(self) -> bool:
        return (not self.embedded) if self.enable_idempotence is None else self.enable_idempotence

    @model_validator(mode="after")
    def _registry_matches_format(self) -> KafkaSettings:
        if self.wire_format is WireFormat.CONFLUENT and not self.schema_registry_url:
            raise ValueError("wire_format 'confluent' needs schema_registry_url")
        if self.delivery_timeout_ms < self.request_timeout_ms:
            raise ValueError("delivery_timeout_ms must be >= request_timeout_ms")
        return self


class JournalSettings(_Section):
    """The write-ahead journal and the delivery path (io/delivery.py) that drains it into Kafka."""

    dir: Path = Path("./var/journal")
    max_bytes: Annotated[int, Field(gt=0)] = 2 * 1024**3
    segment_bytes: Annotated[int, Field(gt=0)] = 64 * 1024**2
    queue_size: Annotated[int, Field(gt=0)] = 50_000
    fsync: Literal["never", "segment", "batch"] = "batch"
    cache_bytes: Annotated[int, Field(ge=0)] = Field(
        default=32 * 1024**2, description="journaled, not yet sent entries kept in memory (beyond: read from disk)"
    )
    drain_batch_bytes: Annotated[int, Field(gt=0)] = Field(
        default=4 * 1024**2, description="most bytes handed to the Kafka sink in one write"
    )
    close_timeout_s: Annotated[float, Field(ge=0)] = Field(
        default=10.0, description="on shutdown, how long to keep draining to Kafka before leaving the rest journaled"
    )

    @model_validator(mode="after")
    def _bounds(self) -> JournalSettings:
        if self.max_bytes < 2 * self.segment_bytes:
            raise ValueError("max_bytes must be at least 2 * segment_bytes")
        return self


class BackfillSettings(_Section):
    """The REST backfill worker (`okx-ingest backfill`, services/backfill.py)."""

    group_id: str = "okx-ingest-backfill"
    concurrency: Annotated[int, Field(gt=0)] = Field(
        default=4, description="streams (channel + instrument) fetched at once within a batch of gaps")
    max_attempts: Annotated[int, Field(gt=0)] = 8
    breaker_failures: Annotated[int, Field(gt=0)] = 5
    breaker_cooldown_s: Annotated[float, Field(gt=0)] = 30.0
    request_timeout_s: Annotated[float, Field(gt=0)] = 10.0
    retry_initial_s: Annotated[float, Field(gt=0)] = Field(
        default=0.25, description="first REST retry delay (full jitter, doubling up to retry_max_s)")
    retry_max_s: Annotated[float, Field(gt=0)] = 10.0
    batch_max_gaps: Annotated[int, Field(gt=0)] = Field(
        default=500, description="most gap records taken from okx.gaps at once: coalesced, filled and committed "
                                 "together")
    poll_timeout_ms: Annotated[int, Field(gt=0)] = 1_000
    session_timeout_ms: Annotated[int, Field(gt=0)] = Field(
        default=10_000, description="how long the group waits for a silent (dead) worker before its gaps move on")
    heartbeat_interval_ms: Annotated[int, Field(gt=0)] = 3_000
    max_poll_interval_ms: Annotated[int, Field(gt=0)] = Field(
        default=300_000, description="a worker that does not poll for this long leaves the group (the worker "
                                     "keeps polling while it fills a long gap)")
    gap_max_attempts: Annotated[int, Field(gt=0)] = Field(
        default=5, description="tries per gap while OKX fails transiently (5xx, breaker open, timeouts) before "
                               "it is reported partial, so no gap is retried forever")
    gap_retry_max_s: Annotated[float, Field(gt=0)] = Field(
        default=60.0, description="longest wait between two tries of one gap")
    max_records_per_gap: Annotated[int, Field(gt=0)] = Field(
        default=2_000_000, description="rows fetched for one coalesced range at most; beyond, the gap is partial")
    readback: bool = Field(
        default=True, description="read the data topic back around each gap and publish only what it lacks "
                                  "(exactly once across restarts and duplicate gap events)")
    readback_margin_ms: Annotated[int, Field(ge=0)] = Field(
        default=60_000, description="read back from this long before a gap's lower time bound (clock skew)")
    readback_timeout_s: Annotated[float, Field(gt=0)] = 120.0
    order_lookback_s: Annotated[float, Field(ge=0)] = Field(
        default=86_400.0, description="orders-history filters on creation time: look this far before a gap for "
                                      "orders that completed inside it")
    journal_dir: Path | None = Field(
        default=None, description="delivery journal of this worker (default <journal.dir>/backfill-<shard>); "
                                  "its unacknowledged backlog is discarded at start, the consumer offset rules")
    progress_interval_s: Annotated[float, Field(gt=0)] = Field(
        default=2.0, description="`backfill --channel` without a terminal: one progress line this often")

    @model_validator(mode="after")
    def _retry_bounds(self) -> BackfillSettings:
        if self.retry_max_s < self.retry_initial_s:
            raise ValueError("retry_max_s must be >= retry_initial_s")
        if self.heartbeat_interval_ms >= self.session_timeout_ms:
            raise ValueError("heartbeat_interval_ms must be < session_timeout_ms")
        return self


class ArchiveSettings(_Section):
    """The Parquet archive (`okx-ingest archive`, services/archive.py; docs/ARCHIVE.md)."""

    url: str = Field(default="./var/archive", description="local directory or s3://bucket/prefix")
    group_id: str = "okx-ingest-archive"
    s3_endpoint_override: str | None = Field(
        default=None, description="host:port or URL of an S3-compatible store (MinIO, Ceph...); credentials come "
                                  "from the standard AWS environment/credential chain")
    s3_region: str | None = None
    rotate_s: Annotated[int, Field(gt=0, le=86_400)] = Field(
        default=3600, description="a file never spans two buckets of this much exchange time")
    max_file_bytes: Annotated[int, Field(gt=0)] = Field(
        default=64 * 1024**2, description="close a file when its records reach this many (Avro) bytes")
    idle_close_s: Annotated[float, Field(gt=0)] = Field(
        default=60.0, description="close a file when its instrument has had no record for this long")
    max_open_s: Annotated[float, Field(gt=0)] = Field(
        default=120.0, description="close a file this long after it opened, so the archive stays minutes behind")
    max_buffer_bytes: Annotated[int, Field(gt=0)] = Field(
        default=256 * 1024**2, description="all open files together; past it the largest is written first")
    poll_max_records: Annotated[int, Field(gt=0)] = 10_000
    retry_initial_s: Annotated[float, Field(gt=0)] = 0.5
    retry_max_s: Annotated[float, Field(gt=0)] = 30.0
    drain_timeout_s: Annotated[float, Field(gt=0)] = Field(
        default=30.0, description="on SIGTERM, write and commit what is buffered for at most this long")
    metrics_port: Annotated[int, Field(ge=0, le=65535)] = Field(
        default=9110, description="the archive service's /metrics, /healthz, /readyz (on obs.metrics_host)")
    embedded: bool = Field(
        default=True, description="with kafka.bootstrap_servers = \"embedded\", the recorder also archives "
                                  "in-process into `url`")
    session_timeout_ms: Annotated[int, Field(gt=0)] = 10_000
    max_poll_interval_ms: Annotated[int, Field(gt=0)] = 300_000
    compact_min_bytes: Annotated[int, Field(gt=0)] = Field(
        default=128 * 1024**2, description="`archive compact`: files below this are merged")
    compact_target_bytes: Annotated[int, Field(gt=0)] = Field(
        default=512 * 1024**2, description="`archive compact`: merged files stay below this")


class ObsSettings(_Section):
    """Logging, metrics, health and Sentry."""

    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    log_format: Literal["json", "text"] = "json"
    metrics_host: str = "127.0.0.1"
    metrics_port: Annotated[int, Field(ge=0, le=65535)] = 9108
    sentry_dsn: str | None = None
    clock_check_interval_s: Annotated[float, Field(gt=0)] = 300.0
    clock_warn_ms: Annotated[int, Field(gt=0)] = 2000
    clock_fail_ms: Annotated[int, Field(gt=0)] = 25000
    clock_samples: Annotated[int, Field(gt=0, le=10)] = Field(
        default=4, description="server-time probes per check; the one with the shortest round trip wins")


class Settings(BaseSettings):
    """All settings of one daemon process."""

    model_config = SettingsConfigDict(env_prefix="OKX_INGEST__", env_nested_delimiter="__", extra="forbid",
                                      frozen=True)

    okx: OkxSettings = Field(default_factory=OkxSettings)
    ws: WsSettings = Field(default_factory=WsSettings)
    kafka: KafkaSettings = Field(default_factory=KafkaSettings)
    journal: JournalSettings = Field(default_factory=JournalSettings)
    backfill: BackfillSettings = Field(default_factory=BackfillSettings)
    obs: ObsSettings = Field(default_factory=ObsSettings)
    archive: ArchiveSettings = Field(default_factory=ArchiveSettings)
    shard: str = Field(default="0", description="name of this replica's shard; state is kept per shard")

    @field_validator("shard")
    @classmethod
    def _shard_name(cls, v: str) -> str:
        if not v or not all(c.isalnum() or c in "-_" for c in v):
            raise ValueError("shard must be letters, digits, '-' or '_'")
        return v

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # Environment beats the file (passed as init kwargs).
        return env_settings, init_settings


_FIXES: dict[str, str] = {
    "extra_forbidden": "remove it or check its spelling against README 'Configuration'",
    "missing": "add it",
    "enum": "use one of the allowed values",
    "literal_error": "use one of the allowed values",
}


def _find_secret_keys(data: Any, path: str = "") -> list[str]:
    found = []
    if isinstance(data, dict):
        for k, v in data.items():
            p = f"{path}.{k}" if path else str(k)
            if str(k).lower() in _FORBIDDEN_KEYS:
                found.append(p)
            found.extend(_find_secret_keys(v, p))
    elif isinstance(data, list):
        for i, v in enumerate(data):
            found.extend(_find_secret_keys(v, f"{path}[{i}]"))
    return found


def load_settings(path: Path | None = None, **overrides: Any) -> Settings:
    """Settings from `path` (TOML), the environment and `overrides`; raises ConfigError naming the key."""
    path = path or (Path(os.environ["OKX_INGEST_CONFIG"]) if os.environ.get("OKX_INGEST_CONFIG") else None)
    data: dict[str, Any] = {}
    if path is not None:
        try:
            data = tomllib.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError(str(path), "config file not found", "pass an existing file with --config") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(str(path), f"not valid TOML ({exc})", "fix the syntax at that line") from None
    secret_keys = _find_secret_keys(data)
    if secret_keys:
        raise ConfigError(secret_keys[0], "credentials are not read from the config file",
                          "remove it and set OKX_API_KEY/OKX_API_SECRET/OKX_API_PASSPHRASE (or *_FILE) instead")
    for k, v in overrides.items():
        data[k] = v
    try:
        return Settings(**data)
    except ValidationError as exc:
        err = exc.errors()[0]
        key = ".".join(str(p) for p in err["loc"]) or "settings"
        fix = _FIXES.get(err["type"], "see README 'Configuration' for the allowed values")
        if err["type"] in ("enum", "literal_error") and "expected" in err.get("ctx", {}):
            fix = f"use {err['ctx']['expected']}"
        raise ConfigError(key, err["msg"], fix) from None
