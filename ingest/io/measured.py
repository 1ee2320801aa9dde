"""A sink wrapper that tells an observer which records the inner sink acknowledged (ack latency metrics).

Wrapping keeps the Kafka sink and the delivery path unaware of metrics: the observer is called only after a
write returned, that is once the broker acknowledged every record of it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from ingest.io.sink import EncodedRecord, Sink


class AckObserver(Protocol):
    def acked(self, records: Sequence[EncodedRecord]) -> None: ...


class MeasuredSink:
    """`inner`, plus `observer.acked(batch)` after each successful write."""

    def __init__(self, inner: Sink, observer: AckObserver) -> None:
        self.inner = inner
        self.observer = observer
        self.name = inner.name

    async def start(self) -> None:
        await self.inner.start()

    async def write(self, batch: Sequence[EncodedRecord]) -> None:
        await self.inner.write(batch)
        self.observer.acked(batch)

    async def flush(self) -> None:
        await self.inner.flush()

    async def close(self) -> None:
        await self.inner.close()
