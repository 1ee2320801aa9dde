"""`okx-ingest backfill --channel ...`: one range filled on demand, with progress on the terminal."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, TextIO

from aiokafka.errors import KafkaError

from ingest.config import KafkaSettings, Settings
from ingest.core.backfill import DataKind, Job, Stream, Window, data_kind, precheck
from ingest.core.records import GapStatus, TopicKind, topic_name
from ingest.errors import ConfigError, DeliveryError
from ingest.io.delivery import Delivery
from ingest.io.kafka import KafkaSink
from ingest.io.readback import TOPIC_OF_KIND as _TOPIC
from ingest.io.readback import TopicReadback, bootstrap_of, consumer_options
from ingest.io.rest import OkxRestClient
from ingest.services.backfill.clients import encoder_for, rest_client_for
from ingest.services.backfill.filler import GapFiller, PageEvent, _iso
from ingest.services.backfill.stats import _Counters
from ingest.services.clock import ClockService


class _Progress(Protocol):
    def update(self, event: PageEvent) -> None: ...

    def close(self, records: int, requests: int) -> None: ...


class _LineProgress:
    """Plain progress lines (no terminal): one every `interval_s`, plus the first and a final one."""

    def __init__(self, label: str, since_ms: int, until_ms: int, out: TextIO, interval_s: float) -> None:
        self._label, self._since, self._until, self._out = label, since_ms, until_ms, out
        self._interval = interval_s
        self._last: float | None = None

    def update(self, event: PageEvent) -> None:
        now = time.monotonic()
        if self._last is not None and now - self._last < self._interval:
            return
        self._last = now
        total = max(1, self._until - self._since)
        reached = event.reached_ts
        pct = 100 if reached is None or reached <= self._since else int(100 * (self._until - reached) / total)
        print(f"backfill {self._label}: {min(100, max(0, pct))}% (reached {_iso(reached)}), {event.records} records, "
              f"{event.requests} requests", file=self._out, flush=True)

    def close(self, records: int, requests: int) -> None:
        """Nothing: the summary line that follows says how the range ended (RangeResult.summary)."""


class _BarProgress:
    """A tqdm bar over the time range (the walk goes from `until` back to `since`)."""

    def __init__(self, label: str, since_ms: int, until_ms: int, out: TextIO) -> None:
        from tqdm import tqdm

        self._since, self._until = since_ms, until_ms
        self._bar = tqdm(total=max(1, until_ms - since_ms), desc=f"backfill {label}", unit="ms", unit_scale=True,
                         file=out, leave=True, bar_format="{l_bar}{bar}| {postfix}")
        self._done = 0

    def update(self, event: PageEvent) -> None:
        reached = self._since if event.reached_ts is None else max(self._since, event.reached_ts)
        covered = min(self._until, self._until - reached)
        if covered > self._done:
            self._bar.update(covered - self._done)
            self._done = covered
        self._bar.set_postfix_str(f"{event.records} records, {event.requests} requests")

    def close(self, records: int, requests: int) -> None:
        self._bar.set_postfix_str(f"{records} records, {requests} requests")
        self._bar.close()


@dataclass(frozen=True, slots=True)
class RangeResult:
    """How `backfill --channel` ended: the range's status, what it published, and why (for the summary line).

    Exit codes (`exit_code`): 0 filled; 3 partial (OKX returned part of the range, the rest is older than it
    keeps or its history ends); 4 unfillable (OKX keeps none of it); 1 not finished: Kafka was unreachable or
    did not acknowledge, or OKX kept failing transiently (run it again). 2 is a usage or settings error.
    """

    status: GapStatus | None
    records: int
    note: str
    requests: int = 0

    @property
    def exit_code(self) -> int:
        return {GapStatus.FILLED: 0, GapStatus.PARTIAL: 3, GapStatus.UNFILLABLE: 4}.get(self.status, 1) \
            if self.status is not None else 1

    @property
    def summary(self) -> str:
        what = self.status.value if self.status is not None and self.status is not GapStatus.OPEN else "not finished"
        return (f"{what}, {self.records} records published, {self.requests} requests"
                + (f": {self.note}" if self.note else ""))


async def _kafka_reachable(kafka: KafkaSettings, bootstrap: str) -> str | None:
    """None when a client can connect to Kafka within its request timeout, else why not (a bounded check,
    so an unreachable Kafka ends the command at once instead of after every retry of the read-back)."""
    from aiokafka.client import AIOKafkaClient

    client = AIOKafkaClient(**consumer_options(kafka, bootstrap))
    try:
        async with asyncio.timeout(kafka.request_timeout_ms / 1000):
            await client.bootstrap()
        return None
    except TimeoutError:
        return f"no answer within {kafka.request_timeout_ms} ms (kafka.request_timeout_ms)"
    except KafkaError as exc:
        return str(exc) or type(exc).__name__
    finally:
        with contextlib.suppress(Exception):
            async with asyncio.timeout(kafka.request_timeout_ms / 1000):
                await client.close()


async def backfill_range(settings: Settings, channel: str, inst_id: str, since_ms: int, until_ms: int, tty: bool,
                         *, out: TextIO | None = None, rest: OkxRestClient | None = None,
                         bootstrap_servers: str | None = None) -> RangeResult:
    """`okx-ingest backfill --channel C --inst I --since T --until T`: fetch [since, until) of one stream and
    publish what the topic lacks (same dedupe as the worker); returns the status and the records published.

    Books have no history: one current snapshot is published whatever the range. A progress bar on a
    terminal (`tty`), plain progress lines otherwise, on `out` (default stderr); the last line says how it
    ended, in the same words as the status (RangeResult.summary).
    """
    out = out if out is not None else sys.stderr
    kind = data_kind(channel)
    if kind is None:
        raise ConfigError("--channel", f"OKX's REST API keeps no history of channel {channel!r}",
                          "use trades, trades-all, candle<bar>, books*, funding-rate, fills or orders")
    if until_ms <= since_ms:
        raise ConfigError("--until", "the range is empty", "give an --until later than --since")
    owned: tuple[OkxRestClient, ClockService] | None = None
    if rest is None:
        owned = await rest_client_for(settings, private=kind in (DataKind.FILLS, DataKind.ORDERS))
        rest = owned[0]
    stream = Stream(kind, channel, inst_id, None)
    window = Window(0, since_ms, until_ms - 1)
    label = f"{channel} {inst_id}"
    progress: _Progress = (_BarProgress(label, since_ms, until_ms, out) if tty else
                           _LineProgress(label, since_ms, until_ms, out, settings.backfill.progress_interval_s))
    counters = _Counters()
    bootstrap = bootstrap_servers or bootstrap_of(settings.kafka)
    requests = 0

    def on_page(event: PageEvent) -> None:
        nonlocal requests
        requests = event.requests
        progress.update(event)

    def done(result: RangeResult) -> RangeResult:
        result = dataclasses.replace(result, requests=requests)
        print(f"backfill {label}: {result.summary}", file=out, flush=True)
        return result

    try:
        verdict = precheck(stream, window, channel, rest.clock.now_ms())
        if verdict is not None:
            return done(RangeResult(verdict.status, 0, f"nothing fetched: {verdict.note}"))
        kafka = settings.kafka
        unreachable = await _kafka_reachable(kafka, bootstrap)
        if unreachable is not None:
            return done(RangeResult(None, 0, f"Kafka at {bootstrap} is unreachable: {unreachable}; nothing "
                                             "fetched (check kafka.bootstrap_servers)"))
        with tempfile.TemporaryDirectory(prefix="okx-ingest-backfill-") as journal_dir:
            sink = KafkaSink(kafka, bootstrap_servers=bootstrap, topics=[topic_name(kafka.topic_prefix, k)
                                                                         for k in (_TOPIC[kind], TopicKind.DLQ)])
            journal = settings.journal
            delivery = Delivery.from_settings(sink, journal.model_copy(update={"dir": Path(journal_dir)}), kafka)
            readback = (TopicReadback(kafka, bootstrap, timeout_s=settings.backfill.readback_timeout_s,
                                      counters=counters) if settings.backfill.readback else None)
            await delivery.start()
            undelivered: str | None = None
            try:
                filler = GapFiller(rest, delivery, await encoder_for(settings), readback, settings.backfill, counters,
                                   on_page=on_page)
                job = Job(stream, window, (window,))
                results = await filler.fill(stream, [job])
                try:
                    await delivery.flush(timeout_s=journal.close_timeout_s)
                except (TimeoutError, DeliveryError) as exc:
                    undelivered = str(exc) or f"not acknowledged within {journal.close_timeout_s} s"
            finally:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(journal.close_timeout_s + 5.0):
                        await delivery.close(timeout_s=0.0 if undelivered else None)
        outcome = results[0].outcome
        records = sum(counters.records.values())
        progress.close(records, requests)
        if undelivered is not None:
            return done(RangeResult(None, records, f"Kafka did not acknowledge the records: {undelivered}; run "
                                                   "again (what reached the topic is not published twice)"))
        note = "" if outcome.status is GapStatus.FILLED else outcome.note
        return done(RangeResult(outcome.status, records, note))
    finally:
        if owned is not None:
            await owned[0].aclose()
