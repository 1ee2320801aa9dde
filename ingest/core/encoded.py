"""The unit every sink takes: a record already encoded for Kafka (core, so encoders need no I/O import)."""

from __future__ import annotations

from typing import NamedTuple


class EncodedRecord(NamedTuple):
    """A record ready for Kafka: full topic name, key, value bytes, headers, timestamp (epoch ms).

    `headers` always include `schema` (the Avro full name) and `record_id` (stable across retries and
    journal replays, so consumers can drop the duplicates at-least-once delivery may cause).
    A NamedTuple rather than a frozen dataclass: one is built per record on the hot path, and a tuple is
    built several times faster while staying immutable.
    """

    topic: str
    key: bytes | None
    value: bytes
    headers: tuple[tuple[str, bytes], ...] = ()
    ts_ms: int | None = None
