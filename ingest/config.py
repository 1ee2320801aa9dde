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
        if needs_inst and self.inst_id is None and not is_candle(self.channel) or (
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

    @model_validator(mode="after")
    def _bounds(self) -> WsSettings:
        if self.backoff_max_s < self.backoff_min_s:
            raise ValueError("backoff_max_s must be >= backoff_min_s")
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
    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"

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
        return self


class JournalSettings(_Section):
    """The on-disk spill journal used when the broker is slow or down."""

    dir: Path = Path("./var/journal")
    max_bytes: Annotated[int, Field(gt=0)] = 2 * 1024**3
    segment_bytes: Annotated[int, Field(gt=0)] = 64 * 1024**2
    queue_size: Annotated[int, Field(gt=0)] = 50_000
    fsync: Literal["never", "segment", "batch"] = "batch"


class BackfillSettings(_Section):
    """The REST backfill worker."""

    group_id: str = "okx-ingest-backfill"
    concurrency: Annotated[int, Field(gt=0)] = 4
    max_attempts: Annotated[int, Field(gt=0)] = 8
    breaker_failures: Annotated[int, Field(gt=0)] = 5
    breaker_cooldown_s: Annotated[float, Field(gt=0)] = 30.0
    request_timeout_s: Annotated[float, Field(gt=0)] = 10.0


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
