"""The worker: one member of the backfill consumer group, from `okx.gaps` batches to fills and commits."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TypeAlias

from aiokafka import AIOKafkaConsumer
from aiokafka.abc import ConsumerRebalanceListener
from aiokafka.errors import KafkaError
from aiokafka.structs import ConsumerRecord, TopicPartition

from ingest.config import JournalSettings, Settings
from ingest.core.avro import DecodeError, RecordEncoder, decode
from ingest.core.backfill import DAY_MS, Job, Stream, emission_key, plan_jobs, status_update
from ingest.core.backoff import full_jitter
from ingest.core.orders import BoundedSeen
from ingest.core.records import GapEvent, GapStatus, TopicKind, topic_name
from ingest.errors import DeliveryError, IngestError
from ingest.io.delivery import Delivery
from ingest.io.journal import Journal
from ingest.io.kafka import KafkaSink, describe
from ingest.io.readback import TopicReadback, bootstrap_of, consumer_options
from ingest.io.rest import OkxRestClient
from ingest.runtime import bounded, stop_task
from ingest.services.backfill.filler import GapFiller, GapResult
from ingest.services.backfill.lease import _FencedOutlet, _Lease
from ingest.services.backfill.stats import BackfillStats, _Counters

#: One logger for the whole package, the name it had as one module (it is in every JSON log line).
log = logging.getLogger("ingest.services.backfill")

#: A record as the consumers return it.
_Message: TypeAlias = ConsumerRecord


def discard_backlog(directory: Path, journal: JournalSettings) -> int:
    """Acknowledge (drop) what a previous run left unacknowledged in the worker's journal; returns how many.

    Safe because the worker commits a batch only after the broker acknowledged all of it: whatever is still
    journaled belongs to an uncommitted batch, which the partition's owner redoes (see the package docstring).
    """
    j = Journal(directory, max_bytes=journal.max_bytes, segment_bytes=journal.segment_bytes, fsync=journal.fsync,
                cache_bytes=journal.cache_bytes)
    j.open()
    try:
        dropped = j.pending_records
        while entries := j.read(journal.drain_batch_bytes):
            j.ack(entries[-1].seq)
        return dropped
    finally:
        j.close_sync()


def _first_error(exc: BaseException) -> BaseException:
    """The first leaf of an exception group (TaskGroup), so callers see one error with its own type."""
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    return exc


class _Rebalance(ConsumerRebalanceListener):  # type: ignore[misc]
    """Abandon the running batch before partitions move, so no two workers fill one gap at once."""

    def __init__(self, worker: BackfillWorker) -> None:
        self._worker = worker

    async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        await self._worker._on_revoked(revoked)

    async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        self._worker._on_assigned(assigned)


class BackfillWorker:
    """One member of the backfill consumer group (see the package docstring): `run(stop)` until `stop` is set.

    Owns its delivery (journal under `backfill.journal_dir`, default `<journal.dir>/backfill-<shard>`), its
    gap consumer and its read-back consumer; the REST client is shared and owned by the caller.
    """

    def __init__(self, settings: Settings, rest: OkxRestClient, *, bootstrap_servers: str | None = None,
                 encoder: RecordEncoder | None = None, name: str | None = None) -> None:
        self.settings = settings
        self.rest = rest
        bf = settings.backfill
        kafka = settings.kafka
        self.name = name or f"backfill-{settings.shard}"
        self.bootstrap = bootstrap_servers or bootstrap_of(kafka)
        self.encoder = encoder or RecordEncoder(kafka.topic_prefix)
        self.gaps_topic = topic_name(kafka.topic_prefix, TopicKind.GAPS)
        self.journal_dir = bf.journal_dir or settings.journal.dir / f"backfill-{settings.shard}"
        topics = [topic_name(kafka.topic_prefix, k) for k in TopicKind]
        sink = KafkaSink(kafka, bootstrap_servers=self.bootstrap, topics=topics)
        self.delivery = Delivery.from_settings(sink, settings.journal.model_copy(update={"dir": self.journal_dir}),
                                               kafka)
        self._counters = _Counters()
        self.readback = (TopicReadback(kafka, self.bootstrap, timeout_s=bf.readback_timeout_s,
                                       counters=self._counters) if bf.readback else None)
        self.filler = GapFiller(rest, _FencedOutlet(lambda: self._lease, self.delivery), self.encoder, self.readback,
                                bf, self._counters)
        self._lease: _Lease | None = None
        self._consumer: AIOKafkaConsumer | None = None
        self._batch: asyncio.Task[None] | None = None
        self._seen: BoundedSeen[tuple[object, ...]] = BoundedSeen(200_000, 7 * DAY_MS)
        self._changed = asyncio.Event()

    # ---- public

    def stats(self) -> BackfillStats:
        c = self._counters
        rest = self.rest.stats()
        return BackfillStats(
            gaps_received=c.gaps_received, gaps_pending=c.gaps_pending,
            gaps_filled=c.gaps_by_status[GapStatus.FILLED.value],
            gaps_partial=c.gaps_by_status[GapStatus.PARTIAL.value],
            gaps_unfillable=c.gaps_by_status[GapStatus.UNFILLABLE.value], gaps_failed=c.gaps_failed,
            gaps_deferred=c.gaps_deferred, fenced=c.fenced,
            gaps_ignored=c.gaps_ignored, gaps_duplicate=c.gaps_duplicate, gaps_undecodable=c.gaps_undecodable,
            records_backfilled=dict(c.records), records_already_present=c.records_already_present,
            dead_letters=c.dead_letters, readback_records=c.readback_records, batches=c.batches,
            batches_abandoned=c.batches_abandoned, commits=c.commits, partitions=c.partitions,
            requests=dict(rest.requests), limiter_wait_s=dict(rest.limiter_wait_s),
            breakers_open=tuple(sorted(p for p, st in rest.breakers.items() if st.value != "closed")),
            backlog=c.backlog, oldest_pending_detected_ns=c.oldest_pending_detected_ns,
        )

    async def wait_for(self, predicate: Callable[[BackfillStats], bool], timeout_s: float | None = None) -> None:
        """Return once `predicate(stats())` holds, re-checked at every state change (never by polling)."""
        async with asyncio.timeout(timeout_s):
            while not predicate(self.stats()):
                await self._changed.wait()

    async def run(self, stop: asyncio.Event | None = None) -> None:
        """Join the group and fill gaps until `stop` is set; raises on what the worker cannot go on with."""
        stop = stop or asyncio.Event()
        bf = self.settings.backfill
        dropped = await asyncio.to_thread(discard_backlog, self.journal_dir, self.settings.journal)
        if dropped:
            log.warning("backfill_journal_discarded", extra={
                "records": dropped, "dir": str(self.journal_dir),
                "why": "they belong to batches that were never committed; their partitions' owners redo them"})
        await self.delivery.start()
        try:
            consumer = AIOKafkaConsumer(
                **consumer_options(self.settings.kafka, self.bootstrap), group_id=bf.group_id,
                enable_auto_commit=False, auto_offset_reset="earliest", session_timeout_ms=bf.session_timeout_ms,
                heartbeat_interval_ms=bf.heartbeat_interval_ms, max_poll_interval_ms=bf.max_poll_interval_ms,
                rebalance_timeout_ms=bf.max_poll_interval_ms)
            await consumer.start()
            self._consumer = consumer
            consumer.subscribe([self.gaps_topic], listener=_Rebalance(self))
            log.info("backfill_started", extra={"worker": self.name, "group": bf.group_id, "topic": self.gaps_topic,
                                                "kafka": self.bootstrap, "journal": str(self.journal_dir)})
            delays = full_jitter(0.5, 30.0)
            while not stop.is_set():
                batch = await consumer.getmany(timeout_ms=bf.poll_timeout_ms, max_records=bf.batch_max_gaps)
                await self._measure_backlog(consumer, batch)
                if not batch:
                    continue
                try:
                    await self._run_batch(consumer, batch, stop)
                    delays = full_jitter(0.5, 30.0)
                except IngestError as exc:
                    if not exc.retriable:
                        raise
                    wait = next(delays)
                    log.warning("backfill_batch_retry", extra={"error": str(exc), "retry_in_s": round(wait, 3)})
                    self._rewind(consumer, batch)
                    await asyncio.sleep(wait)  # backoff while Kafka or OKX recovers, not synchronisation
        finally:
            await self._close()

    # ---- batches

    async def _run_batch(self, consumer: AIOKafkaConsumer, batch: Mapping[TopicPartition, list[_Message]],
                         stop: asyncio.Event) -> None:
        """Process one polled batch while keeping the group membership alive; commit when fully acknowledged."""
        records = [m for tp in sorted(batch, key=lambda t: (t.topic, t.partition)) for m in batch[tp]]
        offsets = {tp: msgs[-1].offset + 1 for tp, msgs in batch.items() if msgs}
        self._lease = _Lease(consumer, {tp: msgs[0].offset for tp, msgs in batch.items() if msgs},
                             self.settings.backfill.session_timeout_ms / 1000,
                             self.settings.kafka.request_timeout_ms / 1000, self._counters)
        consumer.pause(*consumer.assignment())
        task = asyncio.create_task(self._process(consumer, records, offsets), name="backfill-batch")
        self._batch = task
        stopper = asyncio.create_task(stop.wait(), name="backfill-stop")
        keepalive_s = min(5.0, self.settings.backfill.max_poll_interval_ms / 4000)
        try:
            while not task.done():
                await asyncio.wait({task, stopper}, timeout=keepalive_s, return_when=asyncio.FIRST_COMPLETED)
                if task.done():
                    break
                if stopper.done():
                    await self._settle(task)
                    break
                # Poll (paused: fetches nothing) so a long batch never counts as a dead consumer.
                extra = await consumer.getmany(timeout_ms=0)
                for tp, msgs in extra.items():  # newly assigned after a rebalance: fetch them again later
                    if msgs:
                        consumer.seek(tp, msgs[0].offset)
        finally:
            stopper.cancel()
            if not task.done():  # cancelled from outside (or the poll failed): the batch must not outlive us
                await self._settle(task)
            self._batch = None
            lease, self._lease = self._lease, None
            with contextlib.suppress(Exception):
                consumer.resume(*consumer.paused())
        if lease is not None and lease.lost is not None:
            log.warning("backfill_fenced", extra={"worker": self.name, "gaps": len(records), "why": lease.lost,
                                                  "consequence": "nothing more published or committed for it"})
            self._counters.gaps_pending = 0
            self._counters.oldest_pending_detected_ns = None
            self._notify()
        if task.cancelled():
            self._counters.batches_abandoned += 1
            log.info("backfill_batch_abandoned", extra={"gaps": len(records),
                                                        "why": "stopping or partitions revoked; not committed"})
            return
        exc = task.exception()
        if exc is not None:
            raise _first_error(exc)

    async def _process(self, consumer: AIOKafkaConsumer, records: list[_Message],
                       offsets: Mapping[TopicPartition, int]) -> None:
        items = self._open_gaps(records)
        now_ms = self.rest.clock.now_ms()
        plan = plan_jobs(items, now_ms)
        results: dict[int, GapResult] = {i: GapResult(o, 0) for i, o in plan.decided.items()}
        by_stream: dict[Stream, list[Job]] = defaultdict(list)
        for job in plan.jobs:
            by_stream[job.stream].append(job)
        slots = asyncio.Semaphore(self.settings.backfill.concurrency)
        gaps = dict(items)

        async def fill(stream: Stream, jobs: list[Job]) -> None:
            tried = max(gaps[m.item].attempts for job in jobs for m in job.members)
            async with slots:
                results.update(await self.filler.fill(stream, jobs, tried=tried))

        try:
            async with asyncio.TaskGroup() as tg:
                for stream, jobs in by_stream.items():
                    tg.create_task(fill(stream, jobs), name=f"backfill-{stream}")
        except BaseExceptionGroup as group:
            raise _first_error(group) from None
        await self.delivery.flush()  # the data is acknowledged before any gap is marked done
        now_ns = time.time_ns()
        updates: list[tuple[GapEvent, GapEvent, GapResult]] = []
        lease = self._lease
        for item, gap in items:
            result = results[item]
            update = status_update(gap, result.outcome, attempts=result.attempts, now_ns=now_ns)
            if lease is not None:
                await lease.check()
            await self.delivery.put(self.encoder.encode(update))
            updates.append((gap, update, result))
        await self.delivery.flush()
        if lease is not None:
            await lease.check()
        await self._commit(consumer, offsets)
        c = self._counters
        c.batches += 1
        for gap, update, result in updates:
            self._seen.first_time(emission_key(gap), now_ms)
            if result.deferred:
                # Only transient failures: nothing about the gap is decided. Its new open revision is on
                # okx.gaps, so this group takes it up again (with longer waits: `attempts` keeps counting).
                c.gaps_deferred += 1
                log.warning("backfill_gap_deferred", extra={
                    "gap_id": gap.gap_id, "channel": gap.channel, "inst_id": gap.inst_id,
                    "attempts": update.attempts, "revision": update.revision, "records": update.records_filled,
                    "note": update.note})
                continue
            c.gaps_by_status[update.status.value] += 1
            c.gaps_failed += result.failed
            log.info("backfill_gap_done", extra={
                "gap_id": gap.gap_id, "channel": gap.channel, "inst_id": gap.inst_id, "kind": gap.kind.value,
                "status": update.status.value, "records": update.records_filled, "attempts": update.attempts,
                "revision": update.revision, "note": update.note})
        self._notify()

    def _open_gaps(self, records: Sequence[_Message]) -> list[tuple[int, GapEvent]]:
        """The open gap events of a batch, each emission once; everything else is counted and skipped."""
        c = self._counters
        items: list[tuple[int, GapEvent]] = []
        keys: set[tuple[object, ...]] = set()
        for i, m in enumerate(records):
            gap = self._decode(m)
            if gap is None:
                c.gaps_undecodable += 1
                continue
            if gap.status is not GapStatus.OPEN:
                c.gaps_ignored += 1
                continue
            key = emission_key(gap)
            if key in self._seen or key in keys:
                c.gaps_duplicate += 1
                continue
            keys.add(key)
            items.append((i, gap))
        c.gaps_received += len(items)
        c.gaps_pending = len(items)
        c.oldest_pending_detected_ns = min((g.detected_ts_ns for _, g in items), default=None)
        self._notify()
        return items

    @staticmethod
    def _decode(m: _Message) -> GapEvent | None:
        if m.value is None:
            return None
        schema = dict(m.headers).get("schema")
        try:
            record = decode(m.value, schema_name=schema.decode() if schema else None)
        except DecodeError as exc:
            log.warning("backfill_gap_undecodable", extra={"partition": m.partition, "offset": m.offset,
                                                           "error": str(exc)})
            return None
        if not isinstance(record, GapEvent):
            log.warning("backfill_not_a_gap", extra={"partition": m.partition, "offset": m.offset,
                                                     "schema": type(record).__name__})
            return None
        return record

    async def _measure_backlog(self, consumer: AIOKafkaConsumer,
                               batch: Mapping[TopicPartition, list[_Message]]) -> None:
        """Gap records on our partitions not yet committed: the high watermark of each (from the last fetch)
        minus the fetch position, plus the batch just taken. Never fails the worker: a metric only."""
        try:
            async with asyncio.timeout(1.0):
                behind = 0
                for tp in consumer.assignment():
                    high = consumer.highwater(tp)
                    if high is None:
                        return  # not fetched yet: unknown, not zero
                    behind += max(0, high - await consumer.position(tp))
        except Exception as exc:  # the next poll measures again
            log.debug("backfill_backlog_unmeasured", extra={"error": describe(exc)})
            return
        self._counters.backlog = behind + sum(len(msgs) for msgs in batch.values())

    async def _commit(self, consumer: AIOKafkaConsumer, offsets: Mapping[TopicPartition, int]) -> None:
        try:
            await consumer.commit(dict(offsets))
        except KafkaError as exc:
            # Partitions moved during the batch: their new owner redoes it (read-back keeps the data single).
            log.warning("backfill_commit_failed", extra={"error": str(exc), "offsets": {
                f"{tp.topic}/{tp.partition}": off for tp, off in offsets.items()}})
            return
        self._counters.commits += 1

    @staticmethod
    def _rewind(consumer: AIOKafkaConsumer, batch: Mapping[TopicPartition, list[_Message]]
                ) -> None:
        assigned = consumer.assignment()
        for tp, msgs in batch.items():
            if msgs and tp in assigned:
                consumer.seek(tp, msgs[0].offset)

    # ---- group membership

    async def _settle(self, task: asyncio.Task[None]) -> bool:
        """Cancel the batch and wait for it to end, at most `backfill.stop_timeout_s`; False if it did not.

        An abandoned batch commits nothing: its commit is its last step, after everything it put was
        acknowledged, and a cancelled batch never gets there.
        """
        return await stop_task(task, self.settings.backfill.stop_timeout_s, what=f"{self.name} batch")

    async def _on_revoked(self, revoked: set[TopicPartition]) -> None:
        task = self._batch
        if task is not None and not task.done():
            await self._settle(task)
        try:
            # What the abandoned batch already put must reach the broker before another worker reads back.
            await self.delivery.flush(timeout_s=self.settings.journal.close_timeout_s)
        except (TimeoutError, DeliveryError) as exc:
            log.warning("backfill_flush_before_rebalance_failed", extra={"error": str(exc) or type(exc).__name__})
        self._counters.partitions = 0
        if revoked:
            log.info("backfill_partitions_revoked", extra={"worker": self.name, "partitions": len(revoked)})
        self._notify()

    def _on_assigned(self, assigned: set[TopicPartition]) -> None:
        self._counters.partitions = len(assigned)
        log.info("backfill_partitions_assigned", extra={"worker": self.name,
                                                        "partitions": sorted(tp.partition for tp in assigned)})
        self._notify()

    async def _close(self) -> None:
        """Every step bounded (`backfill.stop_timeout_s`; the delivery `journal.close_timeout_s` on top): a stop
        during a Kafka outage returns, leaving what was not acknowledged journaled (discarded at the next
        start: its batch was not committed and is redone)."""
        bf = self.settings.backfill
        task = self._batch
        if task is not None and not task.done():
            await self._settle(task)
        consumer, self._consumer = self._consumer, None
        if consumer is not None:  # leave-group is a courtesy: if it does not finish, the session expires
            await bounded(consumer.stop(), bf.stop_timeout_s, what=f"{self.name} gap consumer stop")
        close_s = self.settings.journal.close_timeout_s
        await bounded(self.delivery.close(timeout_s=close_s), close_s + bf.stop_timeout_s,
                      what=f"{self.name} delivery close")
        log.info("backfill_stopped", extra={"worker": self.name, **_summary(self.stats())})
        self._notify()

    def _notify(self) -> None:
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()


def _summary(stats: BackfillStats) -> dict[str, object]:
    return {"gaps_filled": stats.gaps_filled, "gaps_partial": stats.gaps_partial,
            "gaps_unfillable": stats.gaps_unfillable, "gaps_failed": stats.gaps_failed,
            "gaps_deferred": stats.gaps_deferred,
            "records": stats.records_total, "commits": stats.commits}
