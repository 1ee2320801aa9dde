"""Typed settings from a TOML file and the environment; every error names the key and the fix.

Precedence: environment (`OKX_INGEST__SECTION__KEY`) over the file (`--config`, or `OKX_INGEST_CONFIG`)
over defaults. Credentials are deliberately absent: they come only from the environment or secret
files (see `ingest.credentials`), never from this file.
"""

from __future__ import annotations

import difflib
import enum
import ipaddress
import json
import os
import re
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, PydanticBaseSettingsSource, SettingsConfigDict
from pydantic_settings.exceptions import SettingsError

from ingest.core.pins import normalize_pin
from ingest.errors import ConfigError
from ingest.okx.channels import (
    BUSINESS_PUBLIC_CHANNELS,
    CANDLE_BARS,
    INST_TYPE_CHANNELS,
    PUBLIC_CHANNELS,
    endpoint_for,
    is_candle,
)
from ingest.okx.endpoints import Environment

_FORBIDDEN_KEYS = {"api_key", "apikey", "secret", "api_secret", "passphrase", "password"}
#: Secret-looking keys beyond those: any `*password`, `*_secret` or `*_token` (the environment variable to use
#: instead is named in the error, see `_SECRET_ENV`).
_FORBIDDEN_SUFFIXES = ("password", "_secret", "_token")
_SECRET_ENV = {
    "sasl_password": "KAFKA_SASL_PASSWORD", "sasl_plain_password": "KAFKA_SASL_PASSWORD",
    "ssl_password": "KAFKA_SSL_KEY_PASSWORD", "ssl_key_password": "KAFKA_SSL_KEY_PASSWORD",
    "key_password": "KAFKA_SSL_KEY_PASSWORD", "client_secret": "KAFKA_OAUTH_CLIENT_SECRET",
    "sasl_oauth_client_secret": "KAFKA_OAUTH_CLIENT_SECRET", "oauth_client_secret": "KAFKA_OAUTH_CLIENT_SECRET",
    "schema_registry_password": "SCHEMA_REGISTRY_PASSWORD", "schema_registry_token": "SCHEMA_REGISTRY_TOKEN",
}

#: The instruments recorded when the config names none (README "Configuration" promises these).
DEFAULT_INSTRUMENTS: tuple[str, ...] = ("BTC-USDT", "ETH-USDT", "BTC-USDT-SWAP")
_FIX_SEP = ". Fix: "


def _comma_list(value: object) -> object:
    """A list from the environment: JSON (`["a","b"]`) or the plain comma form (`a,b`); a file gives lists."""
    if not isinstance(value, str):
        return value
    text = value.strip()
    if text.startswith("["):
        try:
            return json.loads(text)
        except ValueError:
            raise ValueError(f"{value!r} is not a JSON list{_FIX_SEP}write it as a,b,c or as [\"a\",\"b\"]") from None
    return [part.strip() for part in text.split(",") if part.strip()]


def _base_url(value: str | None, info: ValidationInfo) -> str | None:
    """A scheme://host[:port] URL of the right scheme, so a typo fails at start-up instead of retrying forever."""
    if value is None:
        return None
    schemes = ("ws", "wss") if info.field_name == "ws_base_url" else ("http", "https")
    example = f"{schemes[1]}://host[:port]"
    try:
        parts = urlsplit(value)
        parts.port  # noqa: B018 - raises ValueError for a port that is not a number in range
    except ValueError as exc:
        raise ValueError(f"{value!r} is not a valid URL ({exc}){_FIX_SEP}write it as {example}") from None
    if parts.scheme not in schemes or not parts.hostname:
        raise ValueError(f"{value!r} is not a {' or '.join(s + '://' for s in schemes)} URL with a host"
                         f"{_FIX_SEP}write it as {example}")
    return value


def _known_channels() -> list[str]:
    return sorted(PUBLIC_CHANNELS | BUSINESS_PUBLIC_CHANNELS | {"candle1m", "mark-price-candle1m", "index-candle1m"})


def _check_shorthand_channel(channel: str) -> None:
    """Refuse a channel OKX does not have, naming the nearest ones, when the settings are loaded."""
    if endpoint_for(channel) is not None:
        return
    m = re.match(r"^(candle|mark-price-candle|index-candle)(.+)$", channel)
    if m:
        bars = ", ".join(sorted(CANDLE_BARS))
        raise ValueError(f"unknown OKX channel {channel!r}: {m.group(2)!r} is not a bar OKX has{_FIX_SEP}"
                         f"use {m.group(1)}<bar> with a bar from {bars}")
    near = difflib.get_close_matches(channel, _known_channels(), n=3)
    hint = f"did you mean {' or '.join(repr(n) for n in near)}?" if near else "see README 'Configuration'"
    raise ValueError(f"unknown OKX channel {channel!r}{_FIX_SEP}{hint}")


def _check_host(value: str) -> str:
    """An IP address or a DNS name: anything else cannot be bound (the error would come much later)."""
    try:
        ipaddress.ip_address(value)
        return value
    except ValueError:
        pass
    if value and len(value) <= 253 and all(re.fullmatch(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)", label)
                                           for label in value.rstrip(".").split(".")):
        return value
    raise ValueError(f"{value!r} is neither an IP address nor a host name{_FIX_SEP}use an address of this host "
                     "such as 127.0.0.1, 0.0.0.0 (all interfaces) or the pod IP")


def _check_not_below(section: BaseModel, high: str, low: str) -> None:
    """`high` >= `low` (a retry or backoff ceiling and its first delay, a deadline and the wait inside it): one
    rule and one message for every section's pair, the field names spelled once as the user writes them."""
    if getattr(section, high) < getattr(section, low):
        raise ValueError(f"{high} must be >= {low}")



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
        _check_shorthand_channel(self.channel)
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
    instruments: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: list(DEFAULT_INSTRUMENTS),
        description="shorthand: instIds for `channels` (`[]` records `subscriptions` only)")
    channels: Annotated[list[str], NoDecode] = Field(default_factory=lambda: ["trades", "books", "tickers"],
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
    ca_bundle: Path | None = Field(
        default=None, description="extra CA certificates (PEM) trusted for OKX besides the public roots: the CA of a "
                                  "TLS-inspecting corporate proxy (SPKI pins, if set, still apply)")
    proxy: str | None = Field(
        default=None, description="HTTP(S) proxy for OKX REST and WebSocket (http://host:port, CONNECT tunnels); "
                                  "unset: HTTPS_PROXY/HTTP_PROXY and NO_PROXY from the environment; 'direct': none")
    book_checkpoint_s: Annotated[float, Field(ge=0)] = Field(
        default=60.0, description="seconds between full-book checkpoint records per incremental book (0 = off)")

    @field_validator("proxy")
    @classmethod
    def _proxy_url(cls, v: str | None) -> str | None:
        if v is not None and v != "direct" and not v.startswith(("http://", "https://")):
            raise ValueError(f"proxy must be an http:// or https:// URL or 'direct', got {v!r}")
        return v

    _comma_lists = field_validator("instruments", "channels", mode="before")(_comma_list)
    _urls = field_validator("ws_base_url", "rest_base_url")(_base_url)

    @field_validator("channels")
    @classmethod
    def _channels_known(cls, channels: list[str]) -> list[str]:
        for ch in channels:
            _check_shorthand_channel(ch)
        return channels

    @field_validator("tls_spki_pins")
    @classmethod
    def _pins_are_sha256(cls, pins: list[str]) -> list[str]:
        return [normalize_pin(p) for p in pins]

    @model_validator(mode="after")
    def _auth_pause_bounds(self) -> OkxSettings:
        _check_not_below(self, "auth_pause_max_s", "auth_pause_initial_s")
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
        _check_not_below(self, "backoff_max_s", "backoff_min_s")
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
    sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512", "OAUTHBEARER"] = Field(
        default="PLAIN", description="with SASL_*; the password comes from KAFKA_SASL_PASSWORD(_FILE), never here"
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

    # Security (io/kafka_security.py). Secrets never live here: KAFKA_SASL_PASSWORD, KAFKA_SSL_KEY_PASSWORD,
    # KAFKA_OAUTH_CLIENT_SECRET, SCHEMA_REGISTRY_PASSWORD and SCHEMA_REGISTRY_TOKEN (or *_FILE) do.
    ssl_certfile: Path | None = Field(default=None, description="client certificate (PEM) for mutual TLS")
    ssl_keyfile: Path | None = Field(
        default=None, description="its private key (PEM); if encrypted, the password is KAFKA_SSL_KEY_PASSWORD")
    ssl_check_hostname: bool = Field(
        default=True, description="check that the broker's certificate names the host connected to")
    sasl_username: str | None = Field(
        default=None, description="SASL PLAIN/SCRAM user (else KAFKA_SASL_USERNAME from the environment)")
    sasl_oauth_provider: str = Field(
        default="aws-msk-iam", description="OAUTHBEARER token source: 'aws-msk-iam', 'oidc' (client credentials "
                                           "grant) or 'module:factory' returning an aiokafka AbstractTokenProvider")
    sasl_oauth_token_url: str | None = Field(default=None, description="'oidc': the token endpoint")
    sasl_oauth_client_id: str | None = Field(
        default=None, description="'oidc': client id (its secret is KAFKA_OAUTH_CLIENT_SECRET)")
    sasl_oauth_scope: str | None = Field(default=None, description="'oidc': scope requested, if the IdP wants one")
    sasl_oauth_extensions: dict[str, str] = Field(
        default_factory=dict, description="SASL extensions sent with the token (Confluent Cloud: logicalCluster, "
                                          "identityPoolId)")
    aws_region: str | None = Field(
        default=None, description="'aws-msk-iam': the cluster's region (default: AWS_REGION from the environment)")
    schema_registry_username: str | None = Field(
        default=None, description="registry basic-auth user (password: SCHEMA_REGISTRY_PASSWORD); or set "
                                  "SCHEMA_REGISTRY_TOKEN for a bearer token")
    schema_registry_cafile: Path | None = Field(default=None, description="CA bundle of the registry's HTTPS")
    schema_registry_certfile: Path | None = Field(default=None, description="client certificate for the registry")
    schema_registry_keyfile: Path | None = Field(
        default=None, description="its key (password: SCHEMA_REGISTRY_SSL_KEY_PASSWORD, if encrypted)")

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
        _check_not_below(self, "delivery_timeout_ms", "request_timeout_ms")
        return self

    @model_validator(mode="after")
    def _security_consistent(self) -> KafkaSettings:
        tls = self.security_protocol in ("SSL", "SASL_SSL")
        for key in ("ssl_cafile", "ssl_certfile", "ssl_keyfile"):
            if getattr(self, key) is not None and not tls:
                raise ValueError(f"{key} is set but security_protocol is {self.security_protocol}; "
                                 "use SSL or SASL_SSL for TLS")
        if self.ssl_keyfile is not None and self.ssl_certfile is None:
            raise ValueError("ssl_keyfile needs ssl_certfile (the client certificate)")
        if self.security_protocol.startswith("SASL") and self.sasl_mechanism == "OAUTHBEARER":
            known = ("aws-msk-iam", "oidc")
            if self.sasl_oauth_provider not in known and ":" not in self.sasl_oauth_provider:
                raise ValueError("sasl_oauth_provider must be 'aws-msk-iam', 'oidc' or 'module:factory'")
            if self.sasl_oauth_provider == "oidc" and not (self.sasl_oauth_token_url and self.sasl_oauth_client_id):
                raise ValueError("sasl_oauth_provider 'oidc' needs sasl_oauth_token_url and sasl_oauth_client_id")
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
    sync_interval_ms: Annotated[int, Field(ge=0)] = Field(
        default=10, description="fsync \"batch\": appended entries are fsynced together at most this often (a power "
                                "cut loses at most this long of journaled, not yet sent records; adds up to it to "
                                "receive -> ack latency)")
    cursor_interval_ms: Annotated[int, Field(ge=0)] = Field(
        default=100, description="the acknowledgement cursor is saved at most this often (a crash resends the "
                                 "records Kafka acknowledged in the last interval; consumers dedupe by recordId)")

    @model_validator(mode="after")
    def _bounds(self) -> JournalSettings:
        if self.max_bytes < 2 * self.segment_bytes:
            raise ValueError("max_bytes must be at least 2 * segment_bytes")
        return self


class BackfillSettings(_Section):
    """The REST backfill worker (`okx-ingest backfill`, services/backfill/)."""

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
        default=5, description="tries of a gap in one pass while OKX fails transiently (breaker, 429/50011, 5xx, "
                               "timeouts), each after a growing wait; then the gap is put back open on okx.gaps "
                               "and retried later. Transient failures never make a gap partial or unfillable")
    gap_retry_max_s: Annotated[float, Field(gt=0)] = Field(
        default=60.0, description="longest wait between two tries of one gap (the waits grow up to it, also "
                                  "across passes)")
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
    metrics_port: Annotated[int, Field(ge=0, le=65535)] = Field(
        default=9109, description="/metrics, /healthz, /readyz of the worker on obs.metrics_host: its own port, so "
                                  "the recorder and the worker can share one config file on one host")
    stop_timeout_s: Annotated[float, Field(gt=0)] = Field(
        default=10.0, description="longest wait for each step of the worker's stop or rebalance (the running "
                                  "batch, the consumer); the delivery gets journal.close_timeout_s on top")

    @model_validator(mode="after")
    def _retry_bounds(self) -> BackfillSettings:
        _check_not_below(self, "retry_max_s", "retry_initial_s")
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

    @model_validator(mode="after")
    def _retry_bounds(self) -> ArchiveSettings:
        _check_not_below(self, "retry_max_s", "retry_initial_s")
        return self


_INSTANCE_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,199}")


class ClusterSettings(_Section):
    """`[cluster]`: replicas split the shards through a Kafka consumer group (docs/CLUSTER.md); off without
    `group_id` (one process records everything)."""

    group_id: str | None = Field(
        default=None, description="consumer group of the replicas on the control topic <prefix>shards; unset: no "
                                  "cluster, this process records every subscription")
    shards: Annotated[int, Field(gt=0, le=4096)] = Field(
        default=64, description="shards the subscriptions are hashed onto (one control-topic partition each); "
                                "the same in every replica, changed only with every replica stopped")
    instance_id: str | None = Field(
        default=None, description="this replica's static member name (group.instance.id); default: HOSTNAME "
                                  "(the StatefulSet pod name)")
    session_timeout_ms: Annotated[int, Field(ge=1000)] = Field(
        default=10_000, description="a silent replica loses its shards after this long (takeover time)")
    heartbeat_interval_ms: Annotated[int, Field(gt=0)] = 1_000
    static_membership: bool = Field(
        default=True, description="join as a static member (group.instance.id = the replica's name), so a restart "
                                  "within the session timeout keeps its shards; false: a dynamic member (a restart "
                                  "moves shards; for brokers that mishandle static members, see docs/CLUSTER.md)")
    position_interval_s: Annotated[float, Field(gt=0)] = Field(
        default=2.0, description="how often the owner writes its acknowledged stream positions to <prefix>positions")
    copies: Annotated[int, Field(ge=1, le=4)] = Field(
        default=1, description="replicas recording every shard at once (A/B feeds): the replicas split into this "
                               "many groups, one per copy, each recording every shard; a gap event is raised only "
                               "for what no other copy recorded (docs/CLUSTER.md, \"Copies\")")
    copy_index: Annotated[int, Field(ge=0)] | None = Field(
        default=None, description="which copy this replica records (0 .. copies-1); default: the number that ends "
                                  "the replica's name modulo copies (okx-ingest-3 -> copy 1 of 2)")
    copy_gap_wait_s: Annotated[float, Field(gt=0, le=300)] = Field(
        default=10.0, description="with copies > 1: how long a gap waits for another copy's positions to show it "
                                  "recorded the gap's window (then the gap is dropped) before it is published")
    handover_timeout_s: Annotated[float, Field(ge=0, le=300)] = Field(
        default=20.0, description="longest make-before-break hand-over of a planned move (rolling restart, scale "
                                  "up or down); past it the move becomes a takeover (gap, backfill); 0: always a "
                                  "takeover. A stopping dynamic member waits up to twice this long (for the new "
                                  "owner's prepared record) before its shutdown")

    @field_validator("group_id")
    @classmethod
    def _group_named(cls, v: str | None) -> str | None:
        if v is not None and not v.strip():
            raise ValueError(f"group_id is empty{_FIX_SEP}name the group (e.g. okx-ingest) or remove the key")
        return v

    @field_validator("instance_id")
    @classmethod
    def _instance_name(cls, v: str | None) -> str | None:
        if v is not None and not _INSTANCE_RE.fullmatch(v):
            raise ValueError(f"{v!r} is not a replica name{_FIX_SEP}use letters, digits, '.', '-' or '_' "
                             "(e.g. the pod name okx-ingest-0)")
        return v

    @model_validator(mode="after")
    def _copy_in_range(self) -> ClusterSettings:
        if self.copy_index is not None and self.copy_index >= self.copies:
            raise ValueError(f"copy_index = {self.copy_index} is not below copies = {self.copies}{_FIX_SEP}set "
                             f"copy_index to 0 .. {self.copies - 1}, or remove it (the replica's name decides)")
        return self

    @model_validator(mode="after")
    def _heartbeat_inside_session(self) -> ClusterSettings:
        if self.heartbeat_interval_ms * 3 > self.session_timeout_ms:
            raise ValueError("heartbeat_interval_ms must be at most a third of session_timeout_ms")
        return self

    @property
    def enabled(self) -> bool:
        return self.group_id is not None

    def copy_of(self, member: str) -> int:
        """The copy this replica records: `copy_index`, else the number its name ends with modulo `copies` (StatefulSet
        ordinals alternate between copies, so a scale-up adds to both); ConfigError for a name without one."""
        if self.copies == 1:
            return 0
        if self.copy_index is not None:
            return self.copy_index
        m = re.search(r"([0-9]+)$", member)
        if m is None:
            raise ConfigError("cluster.copy_index", f"copies = {self.copies} and the replica name {member!r} does "
                              "not end with a number",
                              "set OKX_INGEST__CLUSTER__COPY_INDEX (0 .. copies-1) for each replica")
        return int(m.group(1)) % self.copies

    def group_of(self, copy: int) -> str:
        """The consumer group of one copy: `group_id` itself with one copy (unchanged from before copies)."""
        assert self.group_id is not None
        return self.group_id if self.copies == 1 else f"{self.group_id}-copy{copy}"

    def control_topic(self, prefix: str, copy: int) -> str:
        """The control topic of one copy's group (its partitions are the shards; hand-over records go there)."""
        return f"{prefix}shards" if self.copies == 1 else f"{prefix}shards-copy{copy}"

    def member_name(self, environ: Mapping[str, str]) -> str:
        """This replica's static member name: `instance_id`, else HOSTNAME; ConfigError when neither is usable."""
        name = self.instance_id or environ.get("HOSTNAME", "").strip()
        if not name:
            raise ConfigError("cluster.instance_id", "no replica name (cluster.group_id is set, HOSTNAME is not)",
                              "set OKX_INGEST__CLUSTER__INSTANCE_ID (e.g. the pod name okx-ingest-0)")
        if not _INSTANCE_RE.fullmatch(name):
            raise ConfigError("cluster.instance_id", f"HOSTNAME {name!r} is not a usable replica name",
                              "set OKX_INGEST__CLUSTER__INSTANCE_ID to letters, digits, '.', '-' or '_'")
        return name


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
    max_pipeline_lag_s: Annotated[float, Field(gt=0)] = Field(
        default=5.0, description="/readyz turns not ready while the oldest frame received from OKX and not yet "
        "processed is older than this (okx_ingest_pipeline_lag_seconds): the pipeline is held or does not keep "
        "up, the sockets pause, and OKX may close them with 4005 (a gap)")

    _host = field_validator("metrics_host")(_check_host)


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
    cluster: ClusterSettings = Field(default_factory=ClusterSettings)
    shard: str = Field(default="0", description="name of this replica's shard; state is kept per shard")

    @field_validator("shard")
    @classmethod
    def _shard_name(cls, v: str) -> str:
        if not v or not all((c.isascii() and c.isalnum()) or c in "-_" for c in v):
            raise ValueError("shard must be ASCII letters, digits, '-' or '_'")
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
            if str(k).lower() in _FORBIDDEN_KEYS or str(k).lower().endswith(_FORBIDDEN_SUFFIXES):
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
        data = _read_file(path)
    secret_keys = _find_secret_keys(data)
    if secret_keys:
        env_name = _SECRET_ENV.get(secret_keys[0].rsplit(".", 1)[-1].lower())
        raise ConfigError(secret_keys[0], "credentials are not read from the config file",
                          f"remove it and set {env_name} (or {env_name}_FILE) instead" if env_name else
                          "remove it and set OKX_API_KEY/OKX_API_SECRET/OKX_API_PASSPHRASE (or *_FILE) instead")
    check_environment(os.environ)
    for k, v in overrides.items():
        data[k] = v
    try:
        return Settings(**data)
    except SettingsError as exc:  # a value check_environment let through but pydantic-settings cannot decode
        raise ConfigError("environment", str(exc), "write lists and tables in OKX_INGEST__* variables as JSON") \
            from None
    except ValidationError as exc:
        err = exc.errors()[0]
        key = ".".join(str(p) for p in err["loc"]) or "settings"
        fix = _FIXES.get(err["type"], "see README 'Configuration' for the allowed values")
        if err["type"] in ("enum", "literal_error") and "expected" in err.get("ctx", {}):
            fix = f"use {err['ctx']['expected']}"
        problem = str(err["msg"]).removeprefix("Value error, ")
        if _FIX_SEP in problem:
            problem, fix = problem.split(_FIX_SEP, 1)
        raise ConfigError(key, problem, fix) from None


def _read_file(path: Path) -> dict[str, Any]:
    """The TOML table of the config file; every way reading it fails is a ConfigError naming the file."""
    where = f"file {path}"
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(where, "config file not found", "pass an existing file with --config") from None
    except IsADirectoryError:
        raise ConfigError(where, "is a directory", "pass the TOML file itself with --config, e.g. "
                                                   "config/okx-ingest.toml") from None
    except OSError as exc:
        raise ConfigError(where, f"cannot be read ({exc.strerror})", "fix the path or its permissions") from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ConfigError(where, f"is not UTF-8 text (byte {exc.start})", "save it as UTF-8") from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(where, f"not valid TOML ({exc})", "fix the syntax at that line") from None


_ENV_PREFIX = "OKX_INGEST__"


def check_environment(environ: Mapping[str, str]) -> None:
    """Refuse an `OKX_INGEST__*` variable that names no setting (pydantic-settings ignores it silently, so a
    typo such as `OKX_INGEST__KAFAK__BOOTSTRAP_SERVERS` would leave the default in force) or whose value is
    not valid JSON where JSON is the only form (tables, lists of tables)."""
    for name, value in environ.items():
        if not name.upper().startswith(_ENV_PREFIX):
            continue
        model: type[BaseModel] = Settings
        parts = name[len(_ENV_PREFIX):].lower().split("__")
        for depth, part in enumerate(parts):
            field = model.model_fields.get(part)
            if field is None:
                known = ", ".join(sorted(model.model_fields))
                near = difflib.get_close_matches(part, list(model.model_fields), n=1)
                hint = f"did you mean {near[0]!r}? " if near else ""
                where = ".".join(parts[:depth]) or "the top level"
                raise ConfigError(name, f"{part!r} is not a setting of {where}",
                                  f"{hint}use one of {known} (README 'Configuration')")
            annotation = field.annotation
            if isinstance(annotation, type) and issubclass(annotation, BaseModel):
                if depth == len(parts) - 1:
                    _require_json(name, value, "a JSON table, e.g. {\"key\": \"value\"}")
                model = annotation
                continue
            if depth < len(parts) - 1:
                raise ConfigError(name, f"{part!r} is a single setting, it has no {parts[depth + 1]!r}",
                                  f"set OKX_INGEST__{'__'.join(parts[:depth + 1]).upper()} instead")
            if NoDecode not in field.metadata and str(annotation).startswith(("list[", "dict[")):
                _require_json(name, value, "JSON, e.g. [{\"channel\": \"trades\", \"inst_id\": \"BTC-USDT\"}]")


def _require_json(name: str, value: str, form: str) -> None:
    try:
        json.loads(value)
    except ValueError:
        raise ConfigError(name, "is not valid JSON", f"write it as {form}") from None


def require_cluster(settings: Settings, environ: Mapping[str, str]) -> str | None:
    """This replica's member name in cluster mode (None without `cluster.group_id`); ConfigError (exit 2) for a
    combination cluster mode does not support yet."""
    cluster = settings.cluster
    if not cluster.enabled:
        return None
    if settings.okx.private:
        raise ConfigError("okx.private", "private streams are not sharded (cluster.group_id is set)",
                          "record the private streams with a separate recorder that has no cluster.group_id")
    if settings.kafka.embedded:
        raise ConfigError("kafka.bootstrap_servers", "the replicas of a cluster need one shared Kafka, not the "
                          "embedded broker of each process", "set kafka.bootstrap_servers to the Kafka brokers")
    return cluster.member_name(environ)


def require_subscriptions(settings: Settings) -> None:
    """The recorder with nothing to subscribe would start and record nothing: refuse it up front."""
    if not settings.okx.all_subscriptions() and not settings.okx.private:
        raise ConfigError("okx.instruments", "nothing to subscribe (no instruments, no subscriptions, private off)",
                          "list instruments (okx.instruments = [\"BTC-USDT\"]) or add [[okx.subscriptions]]")
