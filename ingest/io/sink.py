"""The one sink interface every destination implements (Kafka, journal, archive, test capture).

Records reach a sink already encoded: the bytes that go to Kafka are the bytes a journal stores and a
replay reads, so nothing is re-encoded on the way and a journal can be drained into any sink.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from ingest.core.encoded import EncodedRecord as EncodedRecord


class Sink(Protocol):
    """A destination for encoded records. `write` returns once the sink owns the records durably
    (for Kafka: acknowledged by the broker), and raises DeliveryError (retriable or not) otherwise."""

    name: str

    async def start(self) -> None: ...

    async def write(self, batch: Sequence[EncodedRecord]) -> None: ...

    async def flush(self) -> None: ...

    async def close(self) -> None: ...
