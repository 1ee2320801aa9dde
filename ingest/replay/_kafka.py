"""Replay's Kafka source: reads a window of the data topics and okx.gaps with a group-less consumer.

Seeking by time does not trust the broker's timestamp index: a broker may answer every ListOffsets time
lookup with offset 0 (the embedded test broker does), so an answer is accepted only if the records around it
prove it (the record at it is at or after the time, the one before it is not); otherwise the offset is found by
binary search on the records' own timestamps. A partition's reported end may lag its last batch (the embedded
broker reports the last batch's first offset + 1), so a partition is read until a fetch past the end is empty.

Reading stops early, before the end of a partition, once its records are past `horizon`: the window's end,
or later when a backfill wrote records for the window afterwards (their Kafka timestamps are their exchange
ts, but they sit at offsets written at fill time), plus `reorder_margin_ms` for records that reached one
partition slightly out of exchange-time order. Replay never writes: the consumer has no group and no commits.

Streaming (`KafkaStreams`): a partition is near-sorted by exchange time, so each is read forward through a
reorder heap that releases a record once the partition's Kafka timestamps are `REORDER_MARGIN_MS` past it:
memory is one margin of records per partition, never the window. A record later than that (more out of order
than the margin allows) cannot be placed: it is left out and handed to the stream's `on_late` (the replay counts
it: `stats.late`, the CLI's summary line; `stats.late_raw` for okx.raw frames, serve's summary) and logged.
A probe (the book lookback's search for the last checkpoint) passes none: it keeps nothing, and the read that
follows it counts the same records once.
Backfilled records (`source` header `rest`) are the exception by design, they sit at offsets written at fill
time: the repaired view reads them in a second pass (headers only, decoding just the window's `rest` ones),
sorted, as one extra stream per partition; its memory is what the backfill wrote for the window, not the window.
"""

from __future__ import annotations

import asyncio
import heapq
import logging
import threading
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

from aiokafka import AIOKafkaConsumer
from aiokafka.errors import KafkaError
from aiokafka.structs import TopicPartition

from ingest.config import KafkaSettings
from ingest.core.avro import DecodeError, decode
from ingest.core.records import GapEvent, OkxRecord, Record, Source, TopicKind, topic_name
from ingest.core.replay import Entry, LazyStream, SortKey, canonical, sort_key
from ingest.errors import ConfigError, IngestError
from ingest.io.kafka_security import kafka_client_kwargs

#: How far out of exchange-time order records of one partition may be (Kafka seeks, stops and the reorder heap).
REORDER_MARGIN_MS = 60_000
#: Told each entry a stream left out for arriving too late to place (None: a probe, not counted): its sort key
#: and record (an okx.raw record carries several frames, and replay counts frames).
OnLate = Callable[[SortKey, Record], None] | None
#: Records fetched per step of a partition stream.
FETCH_RECORDS = 2_000
#: Bytes a fetch asks for per partition (4x that per response): what the client buffers is bounded by it,
#: not by the window (aiokafka's defaults, 1 MiB and 50 MiB, would let one response hold most of a window).
FETCH_BYTES = 256 * 1024

T = TypeVar("T")
log = logging.getLogger(__name__)


class SourceError(IngestError):
    """The replay source cannot be read (unreachable broker, unreadable archive file)."""


def client_kwargs(kafka: KafkaSettings, bootstrap: str | None = None) -> dict[str, Any]:
    """Consumer connection options from the services' Kafka settings: the same security (TLS, mutual TLS,
    SASL with secrets from the credential store) as every other service, under replay's client id."""
    servers = bootstrap or kafka.bootstrap_servers
    if servers == "embedded":
        raise ConfigError("kafka.bootstrap_servers", "is 'embedded': replay reads an existing cluster",
                          "pass --source kafka://HOST:PORT or set kafka.bootstrap_servers")
    return kafka_client_kwargs(kafka, bootstrap_servers=servers, client_id=f"{kafka.client_id}-replay")


@dataclass(frozen=True, slots=True)
class Probe:
    """The first record at or after an offset: its offset and Kafka timestamp (None past the end)."""

    offset: int
    ts: int | None


class KafkaReader:
    """Async reads of one cluster; `KafkaSource` runs them on a private event loop thread."""

    def __init__(self, kafka: KafkaSettings, bootstrap: str | None, *, timeout_s: float | None = None,
                 exact_decimals: bool = False) -> None:
        self._exact = exact_decimals
        self._kwargs = client_kwargs(kafka, bootstrap)
        self._prefix = kafka.topic_prefix
        # Connecting, and any read that stops making progress, gets this long (at least 30 s).
        self._timeout_s = timeout_s if timeout_s is not None else max(30.0, kafka.request_timeout_ms / 1000)
        self.bootstrap = self._kwargs["bootstrap_servers"]

    def topic(self, kind: TopicKind) -> str:
        return topic_name(self._prefix, kind)

    async def _consumer(self) -> AIOKafkaConsumer:
        # A short fetch wait: a replay reads to the end of partitions, where the broker would otherwise hold
        # every empty fetch for the default 500 ms. Small fetches keep the client's buffers small.
        consumer = AIOKafkaConsumer(**self._kwargs, group_id=None, enable_auto_commit=False,
                                    auto_offset_reset="earliest", fetch_max_wait_ms=50,
                                    max_partition_fetch_bytes=FETCH_BYTES, fetch_max_bytes=FETCH_BYTES * 4)
        try:
            async with asyncio.timeout(self._timeout_s):
                await consumer.start()
        except (KafkaError, OSError, TimeoutError) as exc:
            await consumer.stop()
            raise SourceError(f"Kafka at {self.bootstrap} is unreachable ({type(exc).__name__}: {exc}); "
                              "check --source / kafka.bootstrap_servers") from None
        return consumer

    async def topics(self) -> set[str]:
        consumer = await self._consumer()
        try:
            return set(await consumer.topics())
        finally:
            await consumer.stop()

    async def _assign(self, consumer: AIOKafkaConsumer, topic: str) -> tuple[
            list[TopicPartition], dict[TopicPartition, int], dict[TopicPartition, int]]:
        """Assign every partition of `topic` to `consumer` (in partition order) and return them with their
        beginning and reported end offsets; no partitions (an absent topic) is `[]` and empty maps. Shared by
        the whole-window read and the streams so both start from the same view of the topic; the reported end
        may lag the last batch, which the reads handle (`_seek_time`, `_fetch`), not this."""
        parts = consumer.partitions_for_topic(topic)
        if not parts:
            return [], {}, {}
        tps = [TopicPartition(topic, p) for p in sorted(parts)]
        consumer.assign(tps)
        begins = await consumer.beginning_offsets(tps)
        ends = await consumer.end_offsets(tps)
        return tps, begins, ends

    async def read(self, kind: TopicKind, lo: int, hi: int, horizon: int,
                   keep: Callable[[Record], bool]) -> tuple[list[list[Entry]], bool]:
        """Sorted entries of `kind` with lo <= ts < hi, one list per partition; and whether `lo` reached
        back to the start of every partition (nothing older exists)."""
        topic = self.topic(kind)
        consumer = await self._consumer()
        try:
            # No overall deadline (a long window takes long): each wait has its own bound (metadata requests by
            # request_timeout_ms, reads by their progress deadline).
            tps, begins, ends = await self._assign(consumer, topic)
            if not tps:
                return [], True
            out: list[list[Entry]] = []
            at_begin = True
            for tp in tps:
                first = await self._seek_time(consumer, tp, lo - REORDER_MARGIN_MS, begins[tp], ends[tp])
                at_begin = at_begin and first <= begins[tp]
                entries = await self._scan(consumer, tp, first, ends[tp], lo, hi, horizon, keep)
                entries.sort(key=lambda e: e[0])
                out.append(entries)
            return out, at_begin
        except TimeoutError:
            raise SourceError(f"reading {topic} from {self.bootstrap} timed out") from None
        except KafkaError as exc:
            raise SourceError(f"reading {topic} from {self.bootstrap} failed: {exc}") from None
        finally:
            await consumer.stop()

    async def read_gaps(self) -> list[tuple[GapEvent, str, int, int]]:
        """Every gap revision in okx.gaps (small: one record per gap revision)."""
        topic = self.topic(TopicKind.GAPS)
        found: list[tuple[GapEvent, str, int, int]] = []

        def keep(record: Record) -> bool:
            return isinstance(record, GapEvent)

        consumer = await self._consumer()
        try:
            async with asyncio.timeout(self._timeout_s * 10):
                parts = consumer.partitions_for_topic(topic)
                for p in sorted(parts or ()):
                    tp = TopicPartition(topic, p)
                    consumer.assign([tp])
                    begin = (await consumer.beginning_offsets([tp]))[tp]
                    end = (await consumer.end_offsets([tp]))[tp]
                    for key, rec in await self._scan(consumer, tp, begin, end, -(1 << 62), 1 << 62, 1 << 62, keep):
                        if isinstance(rec, GapEvent):
                            found.append((rec, key[2], key[3], key[4]))
        except TimeoutError:
            raise SourceError(f"reading {topic} from {self.bootstrap} timed out") from None
        except KafkaError as exc:
            raise SourceError(f"reading {topic} from {self.bootstrap} failed: {exc}") from None
        finally:
            await consumer.stop()
        return found

    async def _fetch(self, consumer: AIOKafkaConsumer, tp: TopicPartition, end: int) -> list[Any] | None:
        """The next messages of `tp` from its position; None at the end of the partition."""
        loop = asyncio.get_running_loop()
        since = loop.time()
        while True:
            batch = await consumer.getmany(tp, timeout_ms=100 if await consumer.position(tp) >= end else 2_000,
                                           max_records=FETCH_RECORDS)
            msgs = batch.get(tp) or []
            if msgs:
                return msgs
            if await consumer.position(tp) >= end:
                return None
            if loop.time() - since > self._timeout_s:  # a broker that stopped answering, not a slow read
                raise SourceError(f"reading {tp.topic}[{tp.partition}] from {self.bootstrap} made no progress for "
                                  f"{self._timeout_s:.0f} s at offset {await consumer.position(tp)} of {end}")

    def _entry(self, tp: TopicPartition, m: Any, lo: int, hi: int, keep: Callable[[Record], bool],
               rest: bool | None = None) -> Entry | None:
        """The message as an entry, if it is a record of ours in [lo, hi) that `keep` keeps; `rest`: only
        backfilled ones (True), only the others (False), both (None); told by the header, before decoding."""
        if m.value is None:
            return None
        headers = dict(m.headers)
        source = headers.get("source")
        if rest is not None and source is not None and (source == b"rest") is not rest:
            return None
        schema = headers.get("schema")
        try:
            record = decode(m.value, schema_name=schema.decode() if schema else None)
        except DecodeError:
            return None  # not a record of ours (another writer's message): replay reads, never judges
        if rest is not None and source is None and isinstance(record, OkxRecord) and (
                record.source is Source.REST) is not rest:
            return None  # written before the source header: told by the record itself
        key = sort_key(record, tp.topic, tp.partition, m.offset, m.timestamp)
        if not lo <= key[0] < hi:  # raw frames too, by their Kafka ts: the archive bounds them the same way
            return None
        if not keep(record):
            return None
        return key, record if self._exact else canonical(record)

    async def _probe(self, consumer: AIOKafkaConsumer, tp: TopicPartition, offset: int) -> Probe:
        consumer.seek(tp, offset)
        batch = await consumer.getmany(tp, timeout_ms=300, max_records=1)
        msgs = batch.get(tp) or []
        if not msgs:
            return Probe(offset, None)
        return Probe(msgs[0].offset, int(msgs[0].timestamp))

    async def _seek_time(self, consumer: AIOKafkaConsumer, tp: TopicPartition, ts: int, begin: int, end: int) -> int:
        """The first offset whose record's timestamp is >= ts (timestamps are near-sorted in a partition)."""
        if end <= begin:
            return begin
        try:
            found = await consumer.offsets_for_times({tp: max(0, ts)})
        except KafkaError:
            found = {}
        hit = found.get(tp)
        if hit is not None and await self._proves(consumer, tp, hit.offset, ts, begin):
            return int(hit.offset)
        first = await self._probe(consumer, tp, begin)
        if first.ts is not None and first.ts >= ts:  # the window reaches back before the partition's start
            return begin
        lo, hi = begin, end  # invariant: records before lo are < ts; the answer is <= hi
        while lo < hi:
            mid = (lo + hi) // 2
            probe = await self._probe(consumer, tp, mid)
            if probe.ts is None or probe.ts >= ts:
                hi = mid
            else:
                lo = probe.offset + 1
        if lo >= end:  # the reported end may lag the last batch: walk what follows it
            return await self._walk(consumer, tp, max(begin, end - 1), ts)
        return lo

    async def _walk(self, consumer: AIOKafkaConsumer, tp: TopicPartition, offset: int, ts: int) -> int:
        consumer.seek(tp, offset)
        nxt = offset
        while True:
            batch = await consumer.getmany(tp, timeout_ms=200)
            msgs = batch.get(tp) or []
            if not msgs:
                return nxt
            for m in msgs:
                if m.timestamp >= ts:
                    return int(m.offset)
                nxt = m.offset + 1

    async def _proves(self, consumer: AIOKafkaConsumer, tp: TopicPartition, offset: int, ts: int, begin: int) -> bool:
        at = await self._probe(consumer, tp, offset)
        if at.ts is None or at.ts < ts:
            return False
        if offset <= begin:
            return True
        before = await self._probe(consumer, tp, offset - 1)
        return before.ts is not None and before.ts < ts and before.offset < offset

    async def _scan(self, consumer: AIOKafkaConsumer, tp: TopicPartition, first: int, end: int, lo: int, hi: int,
                    horizon: int, keep: Callable[[Record], bool]) -> list[Entry]:
        consumer.seek(tp, first)
        out: list[Entry] = []
        topic, part = tp.topic, tp.partition
        stop = horizon + REORDER_MARGIN_MS
        loop = asyncio.get_running_loop()
        progress = loop.time()
        while True:
            batch = await consumer.getmany(tp, timeout_ms=100 if await consumer.position(tp) >= end else 2_000)
            msgs = batch.get(tp) or []
            if not msgs:
                if await consumer.position(tp) >= end:
                    return out
                if loop.time() - progress > self._timeout_s:  # a broker that stopped answering, not a slow read
                    raise SourceError(f"reading {topic}[{part}] from {self.bootstrap} made no progress for "
                                      f"{self._timeout_s:.0f} s at offset {await consumer.position(tp)} of {end}")
                continue
            progress = loop.time()
            for m in msgs:
                if m.timestamp > stop:
                    return out
                if m.value is None:
                    continue
                headers = dict(m.headers)
                schema = headers.get("schema")
                try:
                    record = decode(m.value, schema_name=schema.decode() if schema else None)
                except DecodeError:
                    continue  # not a record of ours (another writer's message): replay reads, never judges
                key = sort_key(record, topic, part, m.offset, m.timestamp)
                if isinstance(record, OkxRecord) and not lo <= key[0] < hi:
                    continue
                if keep(record):
                    out.append((key, record if self._exact else canonical(record)))



class KafkaStreams:
    """Sync, bounded-memory streams of one cluster, driven on a private event-loop thread (the replay API is
    synchronous and may be called inside a running loop). `close` stops every consumer and the thread."""

    def __init__(self, reader: KafkaReader) -> None:
        self._reader = reader
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="replay-kafka", daemon=True)
        self._thread.start()
        self._consumers: list[AIOKafkaConsumer] = []
        #: Records left out for being later than the reorder margin allows, by the streams that count (logged).
        self.late = 0

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    def close(self) -> None:
        for consumer in self._consumers:
            self.run(consumer.stop())
        self._consumers.clear()
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()

    def open(self, kind: TopicKind, lo: int, hi: int, keep: Callable[[Record], bool],
             rest_horizon: int | None, on_late: OnLate = None) -> tuple[list[LazyStream], bool]:
        """Streams of `kind` with lo <= ts < hi: per partition its live records (reorder heap) and, when
        `rest_horizon` is set (the repaired view with filled gaps), its backfilled ones read up to that horizon;
        and whether `lo` reached back to the start of every partition. `on_late` is told every record left out
        for arriving too late (module docstring)."""
        return self.run(self._open(kind, lo, hi, keep, rest_horizon, on_late))

    async def _open(self, kind: TopicKind, lo: int, hi: int, keep: Callable[[Record], bool],
                    rest_horizon: int | None, on_late: OnLate) -> tuple[list[LazyStream], bool]:
        reader = self._reader
        topic = reader.topic(kind)
        consumer = await reader._consumer()
        self._consumers.append(consumer)
        try:
            tps, begins, ends = await reader._assign(consumer, topic)
            if not tps:
                return [], True
            firsts = {tp: await reader._seek_time(consumer, tp, lo - REORDER_MARGIN_MS, begins[tp], ends[tp])
                      for tp in tps}
        except TimeoutError:
            raise SourceError(f"reading {topic} from {reader.bootstrap} timed out") from None
        except KafkaError as exc:
            raise SourceError(f"reading {topic} from {reader.bootstrap} failed: {exc}") from None
        at_begin = all(firsts[tp] <= begins[tp] for tp in tps)
        rest_consumer = None
        if rest_horizon is not None:  # its own positions: both passes of a partition run side by side
            rest_consumer = await reader._consumer()
            self._consumers.append(rest_consumer)
            rest_consumer.assign(tps)
        out: list[LazyStream] = []
        for tp in tps:
            out.append(LazyStream(lo, self._opener(self._live, consumer, tp, firsts[tp], ends[tp], lo, hi, keep,
                                                   hi + REORDER_MARGIN_MS, on_late)))
            if rest_consumer is not None and rest_horizon is not None:
                out.append(LazyStream(lo, self._opener(self._rest, rest_consumer, tp, firsts[tp], ends[tp], lo, hi,
                                                       keep, max(hi, rest_horizon) + REORDER_MARGIN_MS)))
        return out, at_begin

    def _opener(self, fn: Callable[..., Iterator[Entry]], *args: Any) -> Callable[[], Iterator[Entry]]:
        return lambda: fn(*args)

    def _messages(self, consumer: AIOKafkaConsumer, tp: TopicPartition, first: int, end: int,
                  stop: int) -> Iterator[Any]:
        """The partition's messages from `first` in offset order until one stamped past `stop` (or the end)."""
        reader = self._reader
        self.run(_seek(consumer, tp, first))
        while True:
            try:
                msgs = self.run(reader._fetch(consumer, tp, end))
            except TimeoutError:
                raise SourceError(f"reading {tp.topic} from {reader.bootstrap} timed out") from None
            except KafkaError as exc:
                raise SourceError(f"reading {tp.topic} from {reader.bootstrap} failed: {exc}") from None
            if msgs is None:
                return
            for m in msgs:
                if m.timestamp > stop:
                    return
                yield m

    def _live(self, consumer: AIOKafkaConsumer, tp: TopicPartition, first: int, end: int, lo: int, hi: int,
              keep: Callable[[Record], bool], stop: int, on_late: OnLate) -> Iterator[Entry]:
        heap: list[tuple[SortKey, Record]] = []
        high = -(1 << 62)  # the highest Kafka timestamp read so far
        last: SortKey | None = None  # the last key released
        for m in self._messages(consumer, tp, first, end, stop):
            high = max(high, m.timestamp)
            entry = self._reader._entry(tp, m, lo, hi, keep, rest=False)
            if entry is not None:
                if last is not None and entry[0] < last:
                    if on_late is None:
                        continue  # a probe: the read that follows it counts this record
                    on_late(*entry)
                    self.late += 1
                    if self.late in (1, 1000, 1_000_000):
                        log.warning("replay: %s[%d] offset %d is more than %d ms out of exchange-time order; "
                                    "left out (%d so far)", tp.topic, tp.partition, m.offset, REORDER_MARGIN_MS,
                                    self.late)
                    continue
                heapq.heappush(heap, entry)
            while heap and heap[0][0][0] < high - REORDER_MARGIN_MS:
                out = heapq.heappop(heap)
                last = out[0]
                yield out
        while heap:
            yield heapq.heappop(heap)

    def _rest(self, consumer: AIOKafkaConsumer, tp: TopicPartition, first: int, end: int, lo: int, hi: int,
              keep: Callable[[Record], bool], stop: int) -> Iterator[Entry]:
        found: list[Entry] = []
        for m in self._messages(consumer, tp, first, end, stop):
            entry = self._reader._entry(tp, m, lo, hi, keep, rest=True)
            if entry is not None:
                found.append(entry)
        found.sort(key=lambda e: e[0])
        yield from found


async def _seek(consumer: AIOKafkaConsumer, tp: TopicPartition, offset: int) -> None:
    consumer.seek(tp, offset)
