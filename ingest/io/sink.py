"""The one sink interface every destination implements (Kafka, journal, archive, test capture).

Records reach a sink already encoded: the bytes that go to Kafka are the bytes a journal stores and a
replay reads, so nothing is re-encoded on the way and a journal can be drained into any sink.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple, Protocol


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


class Sink(Protocol):
    """A destination for encoded records. `write` returns once the sink owns the records durably
    (for Kafka: acknowledged by the broker), and raises DeliveryError (retriable or not) otherwise."""

    name: str

    async def start(self) -> None: ...

    async def write(self, batch: Sequence[EncodedRecord]) -> None: ...

    async def flush(self) -> None: ...

    async def close(self) -> None: ...
