"""Delivery: the one path from the pipeline to Kafka; bounded memory, write-ahead journal, order kept.

    put() -> bounded in-memory queue -> [writer task] -> Journal (disk) -> [sender task] -> Sink (Kafka)
                                                                        <- ack (journal cursor) -------

Design: write-ahead, in batches. Every record is journaled (one `writev` per batch, fsync per policy)
before it is sent, and the journal's cursor advances only when the sink acknowledged the batch. Chosen
over spill-on-trouble because it has one path instead of two (no switch-over logic to get wrong, no
"healthy" mode that keeps tens of thousands of records only in memory), it gives the same guarantee
whether the broker is healthy, slow or down, and it costs little: the journal keeps recently appended
entries in memory, so the healthy path writes to the page cache but never reads back from disk.

Guarantees:
- Nothing is lost when the broker is slow or down: the writer keeps journaling while the sender retries
  (jittered backoff); once the broker answers, the backlog drains in journal order, then new records.
- Order: one queue, one writer, one sender, one sink write in flight, the journal read in append order;
  the Kafka sink keeps partition order within a write. A retry resends a whole batch, so a consumer may
  see a prefix twice (at-least-once): drop duplicates by the `record_id` header, keeping the first.
- Memory is flat: at most `queue_size` records wait in memory (put() then waits: back-pressure), plus the
  journal's read cache (`cache_bytes`) and one batch in flight (`drain_batch_bytes`).
- SIGKILL loses at most what was not yet journaled: the records still in the in-memory queue
  (`stats.queued`, at most `queue_size`). Anything journaled survives a SIGKILL; with fsync "batch" it
  also survives a power cut once its grouped fsync ran (at most `sync_interval_ms` after it was journaled;
  until then it is not sent either). A restart resends every journaled record after the saved cursor:
  the unacknowledged ones, and those acknowledged within the last `cursor_interval_ms` (journal.py).
- A full journal (`max_bytes`) or a full disk is an alarm (`stats.journal_full`, one `journal_full`
  warning), not a crash: the writer stops taking records, the queue fills, put() waits, the pipeline and
  its sockets slow down (OKX then applies its own limits or disconnects: a visible gap, never a silent
  loss), and everything resumes as Kafka acknowledgements free journal space.
- A permanent delivery error (authorization, missing topics with create_topics off, a record too large)
  is never retried silently: it is logged, kept in `failure`, and raised by every later put().

close(): stops taking records, journals everything still queued (even past `max_bytes`: that excess is
bounded by the queue), then keeps delivering until the journal is empty or `close_timeout_s` passed;
what is left stays journaled for the next start, and a log line says how much. It returns either way.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass

from ingest.config import JournalSettings, KafkaSettings
from ingest.core.backoff import full_jitter
from ingest.errors import DeliveryError
from ingest.io.journal import Journal, JournalEntry, JournalError, JournalFullError
from ingest.io.sink import EncodedRecord, Sink
from ingest.runtime import CANCEL_GRACE_S, bounded, finish_task

log = logging.getLogger(__name__)

_ENTRY_MAX_RECORDS = 5_000
_ENTRY_MAX_BYTES = 1024 * 1024
_RECORD_OVERHEAD = 64  # rough per-record framing, for sizing journal entries without encoding twice
_DISK_FULL_RETRY_S = 1.0  # a full disk sends no notification when space is freed: look again this often


@dataclass(slots=True)
class DeliveryStats:
    """Counters and state for metrics and health (plain attributes; read them, do not write them)."""

    records_in: int = 0  # accepted by put()
    records_out: int = 0  # acknowledged by the sink (a resent batch counts again)
    batches_out: int = 0
    queued: int = 0  # in memory, not yet journaled: what a SIGKILL would lose
    queued_max: int = 0  # high-water mark of `queued`
    queue_size: int = 0  # the bound of `queued`
    journal_entries: int = 0  # journaled, not yet acknowledged
    journal_records: int = 0
    journal_pending_bytes: int = 0
    journal_bytes: int = 0  # segment files on disk (bounded by journal max_bytes)
    journal_cache_bytes: int = 0  # unread journal entries held in memory (bounded by cache_bytes)
    journal_full: bool = False  # alarm: back-pressure is on
    broker_up: bool = False
    delivery_errors: int = 0  # failed sink writes (each retried unless permanent)
    last_error: str | None = None
    oldest_pending_ms: int | None = None  # when the batch being delivered was journaled (epoch ms)
    failed: bool = False  # a permanent error stopped delivery; see Delivery.failure

    def drain_lag_s(self, now_ms: int | None = None) -> float:
        """How long the oldest record being delivered has waited in the journal (0 when nothing is pending)."""
        if self.oldest_pending_ms is None:
            return 0.0
        now = time.time_ns() // 1_000_000 if now_ms is None else now_ms
        return max(0.0, (now - self.oldest_pending_ms) / 1000)


def _closed_error() -> DeliveryError:
    err = DeliveryError("delivery is closed: no more records are accepted")
    err.retriable = False
    return err


class Delivery:
    """Bounded queue -> journal -> sink, with the guarantees in the module docstring.

    Owns two tasks (writer: queue -> journal; sender: journal -> sink), started by `start()` and ended
    by `close()`. Depends on the Sink protocol only, so tests and other destinations plug in directly.
    """

    def __init__(
        self,
        sink: Sink,
        journal: Journal,
        *,
        queue_size: int = 50_000,
        drain_batch_bytes: int = 4 * 1024 * 1024,
        close_timeout_s: float = 10.0,
        backoff: Callable[[], Iterator[float]] = lambda: full_jitter(0.05, 5.0),
    ) -> None:
        if queue_size <= 0 or drain_batch_bytes <= 0:
            raise ValueError("queue_size and drain_batch_bytes must be positive")
        self.sink = sink
        self.journal = journal
        self.queue_size = queue_size
        self.drain_batch_bytes = drain_batch_bytes
        self.close_timeout_s = close_timeout_s
        self._backoff = backoff
        self._entry_bytes = max(1, min(_ENTRY_MAX_BYTES, drain_batch_bytes, journal.segment_bytes // 4))
        self.stats = DeliveryStats(queue_size=queue_size)
        self.failure: DeliveryError | None = None
        self._buffer: deque[EncodedRecord] = deque()
        self._nonempty = asyncio.Event()  # writer: records are queued
        self._space = asyncio.Event()  # put(): the queue has room again
        self._readable = asyncio.Event()  # sender: the journal has new durable entries
        self._space_freed = asyncio.Event()  # writer: acknowledgements freed journal space
        self._changed = asyncio.Event()  # wait_for(): stats changed
        self._writer: asyncio.Task[None] | None = None
        self._sender: asyncio.Task[None] | None = None
        self._closing = False
        self._closed = False
        self._close_deadline = float("inf")
        self._down_since: float | None = None
        self._full_disk = False

    @classmethod
    def from_settings(cls, sink: Sink, journal: JournalSettings, kafka: KafkaSettings) -> Delivery:
        cap_s = kafka.reconnect_backoff_max_ms / 1000
        return cls(sink, Journal.from_settings(journal), queue_size=journal.queue_size,
                   drain_batch_bytes=journal.drain_batch_bytes, close_timeout_s=journal.close_timeout_s,
                   backoff=lambda: full_jitter(min(0.05, cap_s), cap_s))

    # -- public API -----------------------------------------------------------------------------------

    async def start(self) -> None:
        """Open (recover) the journal, connect the sink if it answers, start the writer and sender tasks.

        An unreachable broker is not an error here: records are journaled until it answers. A permanent
        error (e.g. missing topics with create_topics off, a journal directory in use) is raised.
        """
        await self.journal.start()
        self._sync_journal_stats()
        try:
            await self.sink.start()
            self._set_up(True)
        except DeliveryError as exc:
            if not exc.retriable:
                await self.journal.close()
                raise
            self.stats.delivery_errors += 1
            self.stats.last_error = str(exc)
            self._set_up(False, exc)
        self._writer = asyncio.create_task(self._run("writer", self._write_loop), name="delivery-writer")
        self._sender = asyncio.create_task(self._run("sender", self._send_loop), name="delivery-sender")

    async def put(self, record: EncodedRecord) -> None:
        """Queue one record; waits while `queue_size` records are queued (back-pressure).

        Raises DeliveryError once delivery failed permanently or is closed.
        """
        if self.stats.queued >= self.queue_size or self.failure is not None or self._closing:
            await self._room()
        self._buffer.append(record)
        self._accepted(1)

    async def put_many(self, records: Sequence[EncodedRecord]) -> None:
        """Queue several records at once (one frame's records): one check and one wake-up instead of one each.

        The queue may exceed `queue_size` by at most one call's records; memory stays bounded.
        """
        if not records:
            return
        if self.stats.queued >= self.queue_size or self.failure is not None or self._closing:
            await self._room()
        self._buffer.extend(records)
        self._accepted(len(records))

    async def _room(self) -> None:
        """Wait until the queue has room; raise when delivery failed for good or is closing."""
        stats = self.stats
        while stats.queued >= self.queue_size or self.failure is not None or self._closing:
            if self.failure is not None:
                raise self.failure
            if self._closing:
                raise _closed_error()
            self._space.clear()
            self._notify()  # "put() is blocked" is a state change worth waking observers for
            await self._space.wait()

    def _accepted(self, n: int) -> None:
        stats = self.stats
        stats.records_in += n
        stats.queued += n
        if stats.queued > stats.queued_max:
            stats.queued_max = stats.queued
        if not self._nonempty.is_set():
            self._nonempty.set()

    async def wait_for(self, predicate: Callable[[DeliveryStats], bool], timeout_s: float | None = None) -> None:
        """Return once `predicate(stats)` holds, re-checking at every state change (not by polling)."""
        async with asyncio.timeout(timeout_s):
            while not predicate(self.stats):
                await self._changed.wait()

    async def flush(self, timeout_s: float | None = None) -> None:
        """Wait until nothing is queued or journaled-but-unacknowledged (with a steady inflow, use wait_for)."""
        await self.wait_for(lambda s: (s.failed or (s.queued == 0 and s.journal_entries == 0)), timeout_s)
        if self.failure is not None:
            raise self.failure

    async def close(self, timeout_s: float | None = None) -> None:
        """Journal what is queued, deliver until empty or `timeout_s` (default close_timeout_s), leave the
        rest journaled for the next start, release everything. Returns either way."""
        if self._closed:
            return
        self._closed = True
        loop = asyncio.get_running_loop()
        deadline = loop.time() + (self.close_timeout_s if timeout_s is None else timeout_s)
        self._close_deadline = deadline
        self._closing = True
        for event in (self._nonempty, self._space, self._space_freed):
            event.set()
        if self._writer is not None:
            # Journaling what is queued is local disk work; it gets the whole budget plus a grace, never more.
            await finish_task(self._writer, max(0.0, deadline - loop.time()) + CANCEL_GRACE_S,
                              what="delivery writer")
        if self.stats.queued:  # only when the journal failed or the disk is full
            log.error("delivery_closed_with_unjournaled_records", extra={
                "records": self.stats.queued, "dir": str(self.journal.directory),
                "journal_full": self.stats.journal_full, "failure": str(self.failure) if self.failure else None,
                "consequence": "these records could not be journaled and are lost"})
        self._readable.set()
        if self._sender is not None:
            # The sender also gives up by itself at the deadline (a cancel can be swallowed inside a write).
            await finish_task(self._sender, max(0.0, deadline - loop.time()), what="delivery sender")
        await bounded(self.sink.close(), max(CANCEL_GRACE_S, deadline - loop.time()),
                      what=f"closing sink {self.sink.name}")
        self._sync_journal_stats()
        stats = self.stats
        left = (stats.journal_entries, stats.journal_records, stats.journal_pending_bytes)
        try:
            if self.journal.is_open:
                await self.journal.close()
        except Exception as exc:
            log.error("journal_close_failed", extra={"dir": str(self.journal.directory), "error": str(exc)})
        if left[1]:
            log.warning("delivery_closed_with_backlog", extra={
                "sink": self.sink.name, "entries": left[0], "records": left[1], "bytes": left[2],
                "dir": str(self.journal.directory),
                "consequence": "left in the journal; sent first on the next start"})
        else:
            log.info("delivery_closed", extra={"sink": self.sink.name, "records_in": stats.records_in,
                                               "records_out": stats.records_out})
        self._notify()

    # -- tasks ----------------------------------------------------------------------------------------

    async def _run(self, role: str, loop: Callable[[], Awaitable[None]]) -> None:
        """Run one task's loop; a permanent or unexpected error becomes `failure`, never a silent death."""
        try:
            await loop()
        except asyncio.CancelledError:
            raise
        except DeliveryError as exc:
            self._fail(role, exc)
        except Exception as exc:
            log.exception("delivery_task_crashed", extra={"task": role})
            err = DeliveryError(f"delivery {role} crashed: {type(exc).__name__}: {exc}")
            err.retriable = False
            self._fail(role, err)

    def _fail(self, role: str, exc: DeliveryError) -> None:
        if self.failure is None:
            self.failure = exc
            self.stats.failed = True
            self.stats.last_error = str(exc)
            log.error("delivery_failed", extra={"task": role, "error": str(exc), "retriable": exc.retriable,
                                                "journaled_records": self.journal.pending_records,
                                                "consequence": "put() raises; journaled records are kept"})
        self._space.set()
        self._readable.set()
        self._notify()

    async def _write_loop(self) -> None:
        buf = self._buffer
        journal = self.journal
        stats = self.stats
        while True:
            if not buf:
                wait_s = journal.sync_wait_s()
                if wait_s is None:
                    if self._closing:
                        return
                    self._nonempty.clear()
                    await self._nonempty.wait()
                    continue
                if wait_s > 0 and not self._closing:
                    # Appended entries wait for the grouped fsync; new records are appended meanwhile.
                    self._nonempty.clear()
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(wait_s):
                            await self._nonempty.wait()
                    continue
                await self._sync(None)
                continue
            # Cleared before trying, not before waiting: an ack landing while we fsync must still wake us.
            self._space_freed.clear()
            appended = 0
            full: JournalFullError | None = None
            while buf:
                chunk: list[EncodedRecord] = []
                size = 0
                while buf and len(chunk) < _ENTRY_MAX_RECORDS and size < self._entry_bytes:
                    record = buf.popleft()
                    chunk.append(record)
                    size += len(record.value) + _RECORD_OVERHEAD
                try:
                    # On close, exceed max_bytes rather than drop: the excess is bounded by the queue.
                    journal.append(chunk, force=self._closing)
                except JournalError as exc:
                    buf.extendleft(reversed(chunk))
                    if not isinstance(exc, JournalFullError):
                        raise
                    full = exc
                    break
                appended += len(chunk)
                stats.queued -= len(chunk)
            if appended:
                self._space.set()
                if self._closing or journal.sync_wait_s() == 0:
                    full = await self._sync(full)
                else:
                    self._sync_journal_stats()
                    self._notify()
            if full is not None:
                if self._closing and full.disk_full:
                    return  # nowhere to put them: close() reports what is lost
                await self._wait_for_space(full)

    async def _sync(self, full: JournalFullError | None) -> JournalFullError | None:
        """One grouped fsync of everything appended so far, then hand it to the sender."""
        try:
            await self.journal.sync()
        except JournalFullError as exc:  # fsync found the disk full
            full = exc
        self._readable.set()
        self._sync_journal_stats()
        if full is None:
            self._clear_full_alarm()
        self._notify()
        return full

    def _clear_full_alarm(self) -> None:
        """End the alarm once appends succeed with room to spare (hysteresis: no flapping while draining)."""
        stats = self.stats
        if stats.journal_full and (self._full_disk or self.journal.size_bytes <= 0.75 * self.journal.max_bytes):
            stats.journal_full = False
            log.info("journal_space_available", extra={"dir": str(self.journal.directory),
                                                       "journal_bytes": self.journal.size_bytes})

    async def _wait_for_space(self, full: JournalFullError) -> None:
        stats = self.stats
        if not stats.journal_full:
            stats.journal_full = True
            self._full_disk = full.disk_full
            log.warning("journal_full", extra={
                "dir": str(self.journal.directory), "journal_bytes": self.journal.size_bytes,
                "max_bytes": self.journal.max_bytes, "disk_full": full.disk_full,
                "journal_records": self.journal.pending_records, "queued": stats.queued, "error": str(full),
                "action": "back-pressure: put() waits until Kafka acknowledgements free journal space"})
            self._sync_journal_stats()
            self._notify()
        if self._closing:
            return
        if full.disk_full:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(_DISK_FULL_RETRY_S):
                    await self._space_freed.wait()
        else:
            await self._space_freed.wait()

    async def _send_loop(self) -> None:
        journal = self.journal
        stats = self.stats
        while True:
            self._readable.clear()
            journal.save_cursor()  # when its interval allows: at most one cursor write per interval
            entries = journal.read(self.drain_batch_bytes)
            if not entries:
                stats.oldest_pending_ms = None
                if self._closing and self._writer is not None and self._writer.done():
                    return
                if self.failure is not None:
                    return
                cursor_s = journal.cursor_wait_s()
                if cursor_s is None:
                    await self._readable.wait()
                else:  # idle with a deferred cursor write: do it when due, so it lags by one interval at most
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(cursor_s):
                            await self._readable.wait()
                continue
            stats.oldest_pending_ms = entries[0].ts_ms
            records = _records_of(entries)
            if not await self._deliver(records):
                return  # closing and out of time: the rest stays journaled for the next start
            journal.ack(entries[-1].seq)
            stats.records_out += len(records)
            stats.batches_out += 1
            self._sync_journal_stats()
            self._space_freed.set()
            if stats.journal_full and not self._full_disk:
                self._clear_full_alarm()
            self._notify()

    async def _deliver(self, records: list[EncodedRecord]) -> bool:
        """Write until the sink acknowledges (True); retriable errors wait a jittered backoff and try again.
        False once closing has run out of time: the batch stays journaled, unacknowledged."""
        delays: Iterator[float] | None = None
        loop = asyncio.get_running_loop()
        while True:
            try:
                if self._closing:
                    left = self._close_deadline - loop.time()
                    if left <= 0:
                        return False
                    async with asyncio.timeout(left):
                        await self.sink.write(records)
                else:
                    await self.sink.write(records)
            except TimeoutError:
                if self._closing:
                    return False  # the closing deadline above
                raise
            except DeliveryError as exc:
                self.stats.delivery_errors += 1
                self.stats.last_error = str(exc)
                if not exc.retriable:
                    raise
                self._set_up(False, exc)
                if delays is None:
                    delays = self._backoff()
                delay = next(delays)
                if self._closing:
                    delay = min(delay, max(0.0, self._close_deadline - loop.time()))
                await asyncio.sleep(delay)  # retry backoff (a timer, not synchronisation)
                continue
            self._set_up(True)
            return True

    # -- state ----------------------------------------------------------------------------------------

    def _set_up(self, up: bool, exc: DeliveryError | None = None) -> None:
        stats = self.stats
        if up and not stats.broker_up:
            outage = None if self._down_since is None else round(time.monotonic() - self._down_since, 3)
            log.info("sink_available", extra={"sink": self.sink.name, "outage_s": outage,
                                              "journal_records": self.journal.pending_records})
            self._down_since = None
        elif not up and (stats.broker_up or self._down_since is None):
            self._down_since = time.monotonic()
            log.warning("sink_unavailable", extra={
                "sink": self.sink.name, "error": str(exc) if exc else None,
                "action": "journaling records; they are sent in order once the sink answers"})
        if up != stats.broker_up:
            stats.broker_up = up
            self._notify()

    def _sync_journal_stats(self) -> None:
        j = self.journal
        s = self.stats
        s.journal_entries = j.pending_entries
        s.journal_records = j.pending_records
        s.journal_pending_bytes = j.pending_bytes
        s.journal_bytes = j.size_bytes
        s.journal_cache_bytes = j.cache_bytes

    def _notify(self) -> None:
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()


def _records_of(entries: list[JournalEntry]) -> list[EncodedRecord]:
    if len(entries) == 1:
        return entries[0].records
    return list(itertools.chain.from_iterable(e.records for e in entries))
