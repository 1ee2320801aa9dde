"""Append-only on-disk journal of EncodedRecords: the write-ahead log between the pipeline and Kafka.

Every record is journaled before it is sent, and the journal remembers which entries Kafka acknowledged,
so a restart resends exactly the unacknowledged suffix (at-least-once; consumers drop duplicates by the
`record_id` header). One entry is one appended batch: one `writev` per batch, one CRC per batch, and a
torn entry is cut as a whole.

Directory layout (one journal per directory; a second process is refused by an flock on LOCK):

    LOCK                      held (flock) while a Journal has the directory open
    cursor                    highest acknowledged entry seq + CRC32, replaced atomically (rename)
    <first_seq:020d>.seg      segments: 8-byte magic, then frames, rotated at `segment_bytes`

Frame: `<payload_len u32><crc32 u32><seq u64><count u32><ts_ms u64><payload>`, where the payload is a
msgpack list of records (field names included, so a field added to EncodedRecord later still reads old
journals) and the CRC covers everything after itself. Seqs increase strictly (gaps only after a cut).

Recovery (`open`) verifies every frame. An incomplete or bad frame at the end of the last segment is the
torn tail of a write that a crash interrupted: it is truncated and logged, never raised. A bad frame inside
an older segment (disk corruption) is cut the same way and logged as an error, with what was cut. A bad or
missing cursor means "nothing acknowledged": everything on disk is resent, which at-least-once allows.

Durability is decided per group, not per record batch (the figures are in docs/PERFORMANCE.md):

* fsync, `fsync` "batch": appended entries are fsynced together, at most once per `sync_interval_s`
  (`sync_wait_s` says when the next one is due; the writer appends meanwhile). Entries become readable
  (are sent) only once synced, so Kafka never has a record the journal could lose. A power cut loses at
  most the entries appended since the last completed fsync: at most one sync interval (plus the fsync then
  running), none of them sent yet. "segment" fsyncs a segment when it is rotated; "never" leaves it to
  the OS. A SIGKILL loses nothing once `append` returned, whatever the policy: the data is in the page
  cache; only a kernel crash or power cut can lose unsynced bytes.
* cursor: `ack` moves the acknowledgement in memory at once (deleting fully acknowledged segments), but
  the cursor file is rewritten at most once per `cursor_interval_s` (`cursor_wait_s` says when a deferred
  write is due; the caller calls `save_cursor`) and always by `close`. A crash of any kind therefore
  resends the entries acknowledged since the last cursor write: those acknowledged during the last cursor
  interval, plus the sink write in flight. Nothing acknowledged is lost (it is in Kafka), and a consumer
  drops the resent copies by `record_id`. The cursor file is not fsynced: after a power cut it may be older
  still, which again only means more resends.

Reading: recently appended entries stay in memory (up to `cache_bytes`) so the healthy path never reads
its own writes back; when the sender falls behind (broker slow or down) the oldest cached entries are
dropped and read back from disk later, so memory stays flat however long the outage.

Bounded by `max_bytes` (bytes of segment files): `append` raises JournalFullError (retriable) instead of
growing, and so does a full disk (ENOSPC: the partial frame is truncated away). What to do then is the
caller's policy; Delivery stops taking records (back-pressure) and raises an alarm.

Not thread-safe, one writer: the event loop calls everything; only fsync runs in a worker thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import logging
import os
import struct
import time
import zlib
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Literal

import msgspec

from ingest.config import JournalSettings
from ingest.errors import DeliveryError
from ingest.io.sink import EncodedRecord

log = logging.getLogger(__name__)

FsyncPolicy = Literal["never", "segment", "batch"]

SEGMENT_MAGIC = b"OKXJRN\x00\x01"
SEGMENT_HEADER_BYTES = len(SEGMENT_MAGIC)
_CRC = struct.Struct("<II")  # payload_len, crc32
_TAIL = struct.Struct("<QIQ")  # seq, record count, append time (epoch ms)
FRAME_HEADER_BYTES = _CRC.size + _TAIL.size
_CURSOR = struct.Struct("<QI")  # acked seq, crc32 of the seq bytes
_MAX_PAYLOAD = 1 << 31


class JournalError(DeliveryError):
    """The journal cannot be used (directory in use, I/O error); says which directory and what to do."""

    retriable = False


class JournalFullError(JournalError):
    """No room for the entry: the journal reached `max_bytes`, or the disk is full. Retry once acks free space."""

    retriable = True

    def __init__(self, message: str, *, disk_full: bool) -> None:
        super().__init__(message)
        self.disk_full = disk_full


@dataclass(frozen=True, slots=True)
class JournalEntry:
    """One appended batch: its seq (acknowledge up to it with `Journal.ack`), records, append time, disk size."""

    seq: int
    records: list[EncodedRecord]
    ts_ms: int
    size: int


@dataclass(slots=True)
class _Segment:
    first_seq: int  # from the file name; a lower bound, unique and increasing across files
    path: Path
    size: int
    last_seq: int  # first_seq - 1 while empty

    @property
    def empty(self) -> bool:
        return self.last_seq < self.first_seq


@dataclass(frozen=True, slots=True)
class _Cached:
    entry: JournalEntry
    segment: int  # first_seq of the segment holding the frame
    offset: int


class _Disk(Enum):
    END = "end"  # nothing more on disk
    NOT_DURABLE = "not-durable"  # the next frame is written but not yet synced
    CACHED = "cached"  # the next frame is the oldest entry still in memory: read on from the cache


class Interval:
    """At most one action per `interval_s` of a monotonic clock: the rule behind grouped fsyncs and cursor
    writes. Pure (time passed in), so its decisions are tested with a fake clock."""

    __slots__ = ("interval_s", "last")

    def __init__(self, interval_s: float) -> None:
        if interval_s < 0:
            raise ValueError("interval_s must be >= 0")
        self.interval_s = interval_s
        self.last = float("-inf")

    def wait_s(self, now: float) -> float:
        """Seconds until the action is due again (0: now)."""
        return max(0.0, self.last + self.interval_s - now)

    def done(self, now: float) -> None:
        self.last = now


class Journal:
    """An append-only segment journal of EncodedRecords with a restart-proof acknowledgement cursor.

    Also a Sink (`start`/`write`/`flush`/`close`), so an archive or replay can reuse it as a destination.
    """

    name = "journal"

    def __init__(
        self,
        directory: Path,
        *,
        max_bytes: int = 2 * 1024**3,
        segment_bytes: int = 64 * 1024**2,
        fsync: FsyncPolicy = "batch",
        cache_bytes: int = 32 * 1024**2,
        sync_interval_s: float = 0.0,
        cursor_interval_s: float = 0.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if segment_bytes <= SEGMENT_HEADER_BYTES + FRAME_HEADER_BYTES or max_bytes < 2 * segment_bytes:
            raise ValueError("journal needs segment_bytes > 36 and max_bytes >= 2 * segment_bytes")
        self.directory = Path(directory)
        self.max_bytes = max_bytes
        self.segment_bytes = segment_bytes
        self.fsync_policy: FsyncPolicy = fsync
        self.cache_limit = cache_bytes
        self._encoder = msgspec.msgpack.Encoder()
        self._decoder = msgspec.msgpack.Decoder(list[EncodedRecord])
        self._lock_fd: int | None = None
        self._segments: list[_Segment] = []
        self._by_first: dict[int, _Segment] = {}
        self._wfd: int | None = None
        self._rfd: tuple[int, int] | None = None  # (segment first_seq, fd) of the segment being read
        self._to_sync: list[int] = []  # rotated segment fds, fsynced (then closed) by the next sync()
        self._active_dirty = False
        self._dir_dirty = False
        self._size = 0
        self._next_seq = 1
        self._acked_seq = 0
        self._durable_seq = 0
        self._read_seq = 0  # highest seq handed out by read()
        self._pending_entries = 0
        self._pending_records = 0
        self._pending_bytes = 0
        self._cache: deque[_Cached] = deque()
        self._cache_size = 0
        self._disk: tuple[int, int] | None = None  # next frame to read from disk, while not reading the cache
        self._inflight: deque[tuple[int, int, int]] = deque()  # (seq, count, size) read, not yet acked
        self._cursor_failing = False
        self._clock = clock
        self._sync_every = Interval(sync_interval_s)
        self._cursor_every = Interval(cursor_interval_s)
        self._saved_seq = 0  # acked seq the cursor file holds (as far as this process knows)

    @classmethod
    def from_settings(cls, settings: JournalSettings) -> Journal:
        return cls(settings.dir, max_bytes=settings.max_bytes, segment_bytes=settings.segment_bytes,
                   fsync=settings.fsync, cache_bytes=settings.cache_bytes,
                   sync_interval_s=settings.sync_interval_ms / 1000,
                   cursor_interval_s=settings.cursor_interval_ms / 1000)

    # -- state, for stats ---------------------------------------------------------------------------

    @property
    def is_open(self) -> bool:
        return self._wfd is not None

    @property
    def size_bytes(self) -> int:
        """Bytes of segment files on disk (what `max_bytes` bounds)."""
        return self._size

    @property
    def pending_entries(self) -> int:
        """Entries appended and not yet acknowledged."""
        return self._pending_entries

    @property
    def pending_records(self) -> int:
        return self._pending_records

    @property
    def pending_bytes(self) -> int:
        return self._pending_bytes

    @property
    def cache_bytes(self) -> int:
        """Bytes of unread entries held in memory (bounded by `cache_limit`)."""
        return self._cache_size

    @property
    def acked_seq(self) -> int:
        return self._acked_seq

    @property
    def next_seq(self) -> int:
        return self._next_seq

    @property
    def saved_seq(self) -> int:
        """The acknowledged seq the cursor file holds: a crash now resends the entries after it."""
        return self._saved_seq

    def segment_paths(self) -> list[Path]:
        return [s.path for s in self._segments]

    # -- lifecycle ----------------------------------------------------------------------------------

    def open(self) -> None:
        """Lock the directory, verify every segment (cutting a torn tail), load the cursor."""
        if self._wfd is not None:
            return
        self.directory.mkdir(parents=True, exist_ok=True)
        lock_fd = os.open(self.directory / "LOCK", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(lock_fd)
            raise JournalError(
                f"journal directory {self.directory} is in use by another process; run one daemon per "
                "journal.dir (give each shard its own directory)"
            ) from None
        self._lock_fd = lock_fd
        try:
            self._recover()
        except BaseException:
            self._release()
            raise

    def close_sync(self) -> None:
        """Fsync (unless policy is 'never'), close files, release the lock. Unacked entries stay for next open."""
        if self._lock_fd is None:
            return
        try:
            self.save_cursor(force=True)
            if self.fsync_policy != "never":
                self._sync_files(self._collect_sync(force=True), self.directory if self._dir_dirty else None)
                self._dir_dirty = False
        finally:
            self._release()

    def _release(self) -> None:
        for fd in self._to_sync:
            with contextlib.suppress(OSError):
                os.close(fd)
        self._to_sync = []
        for open_fd in (self._wfd, self._rfd[1] if self._rfd else None, self._lock_fd):
            if open_fd is not None:
                with contextlib.suppress(OSError):
                    os.close(open_fd)
        self._wfd = self._lock_fd = None
        self._rfd = None
        self._segments = []
        self._by_first = {}
        self._cache.clear()
        self._cache_size = 0
        self._inflight.clear()
        self._disk = None

    # -- Sink -----------------------------------------------------------------------------------------

    async def start(self) -> None:
        # Recovery reads every segment once; keep the event loop free while it does.
        await asyncio.to_thread(self.open)

    async def write(self, batch: Sequence[EncodedRecord]) -> None:
        """Append `batch` as one entry and make it durable per the fsync policy."""
        if batch:
            self.append(batch)
            await self.sync()

    async def flush(self) -> None:
        await self.sync(force=True)

    async def close(self) -> None:
        if self._lock_fd is not None and self.fsync_policy != "never":
            await self.sync(force=True)
        self.close_sync()

    # -- writing --------------------------------------------------------------------------------------

    def append(self, batch: Sequence[EncodedRecord], *, force: bool = False) -> int:
        """Append `batch` as one entry and return its seq. `force` ignores `max_bytes` (used on shutdown,
        bounded by the in-memory queue) but not a full disk. Raises JournalFullError with the journal intact."""
        if self._wfd is None:
            raise JournalError(f"journal {self.directory} is not open")
        if not batch:
            raise ValueError("append needs at least one record")
        records = batch if isinstance(batch, list) else list(batch)
        payload = self._encoder.encode(records)
        if len(payload) >= _MAX_PAYLOAD:
            raise ValueError(f"journal entry of {len(payload)} bytes is too large; append smaller batches")
        seq = self._next_seq
        ts_ms = time.time_ns() // 1_000_000
        tail = _TAIL.pack(seq, len(records), ts_ms)
        head = _CRC.pack(len(payload), zlib.crc32(payload, zlib.crc32(tail))) + tail
        size = FRAME_HEADER_BYTES + len(payload)
        active = self._segments[-1]
        rotate = not active.empty and active.size + size > self.segment_bytes
        if not force and self._size + size + (SEGMENT_HEADER_BYTES if rotate else 0) > self.max_bytes:
            if self._reclaim():
                active = self._segments[-1]
                rotate = False
            if self._size + size + (SEGMENT_HEADER_BYTES if rotate else 0) > self.max_bytes:
                raise JournalFullError(
                    f"journal {self.directory} is full ({self._size} of max_bytes {self.max_bytes}, "
                    f"{self._pending_records} records not yet acknowledged by Kafka)", disk_full=False)
        if rotate:
            self._rotate()
            active = self._segments[-1]
        offset = active.size
        self._write_frame(active, head, payload, size)
        active.size += size
        active.last_seq = seq
        self._size += size
        self._next_seq = seq + 1
        self._active_dirty = True
        self._pending_entries += 1
        self._pending_records += len(records)
        self._pending_bytes += size
        if self.fsync_policy != "batch":
            self._durable_seq = seq
        entry = JournalEntry(seq, records, ts_ms, size)
        self._cache.append(_Cached(entry, active.first_seq, offset))
        self._cache_size += size
        while self._cache_size > self.cache_limit and self._cache:
            # Drop the oldest unread entry from memory; the reader fetches it from disk when it gets there.
            dropped = self._cache.popleft()
            self._cache_size -= dropped.entry.size
            if self._disk is None:
                self._disk = (dropped.segment, dropped.offset)
        return seq

    def _write_frame(self, active: _Segment, head: bytes, payload: bytes, size: int) -> None:
        assert self._wfd is not None
        try:
            written = os.writev(self._wfd, [head, payload])
            if written < size:  # a short write to a regular file means the disk filled up mid-frame
                rest = (head + payload)[written:]
                while rest:
                    rest = rest[os.write(self._wfd, rest):]
        except OSError as exc:
            # Cut the partial frame so the segment stays a sequence of whole frames.
            try:
                os.ftruncate(self._wfd, active.size)
            except OSError as trunc_exc:
                log.error("journal_truncate_failed", extra={"path": str(active.path), "error": str(trunc_exc)})
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise JournalFullError(
                    f"disk holding journal {self.directory} is full ({exc.strerror}); free space on it",
                    disk_full=True) from exc
            raise JournalError(f"journal write to {active.path} failed: {exc}") from exc

    def _rotate(self) -> None:
        old_fd = self._wfd
        self._open_segment(self._next_seq)
        if old_fd is not None:
            if self.fsync_policy == "never":
                os.close(old_fd)
            else:
                self._to_sync.append(old_fd)

    def _open_segment(self, first_seq: int) -> None:
        path = self.directory / f"{first_seq:020d}.seg"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND, 0o644)
        try:
            os.write(fd, SEGMENT_MAGIC)
        except OSError as exc:
            os.close(fd)
            with contextlib.suppress(OSError):
                path.unlink()
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise JournalFullError(f"disk holding journal {self.directory} is full ({exc.strerror})",
                                       disk_full=True) from exc
            raise JournalError(f"cannot create journal segment {path}: {exc}") from exc
        seg = _Segment(first_seq, path, SEGMENT_HEADER_BYTES, first_seq - 1)
        self._segments.append(seg)
        self._by_first[first_seq] = seg
        self._size += SEGMENT_HEADER_BYTES
        self._wfd = fd
        self._active_dirty = True
        self._dir_dirty = True

    def _reclaim(self) -> bool:
        """When everything in the active segment is acknowledged, start a new one and delete it."""
        active = self._segments[-1]
        if active.empty or active.last_seq > self._acked_seq:
            return False
        self._rotate()
        self._delete_acked_segments()
        return True

    # -- durability -----------------------------------------------------------------------------------

    def _collect_sync(self, *, force: bool) -> list[int]:
        fds = self._to_sync
        self._to_sync = []
        if (force or self.fsync_policy == "batch") and self._active_dirty and self._wfd is not None:
            fds = [*fds, self._wfd]
            self._active_dirty = False
        return fds

    def sync_wait_s(self) -> float | None:
        """When `sync()` is worth calling: None when nothing waits for it, else seconds until it is due (0: now).

        With "batch", fsyncs are at most `sync_interval_s` apart; the other policies only publish appended
        entries to the reader (and fsync rotated segments), which costs nothing, so they are always due."""
        if self._wfd is None:
            return None
        appended = self._durable_seq < self._next_seq - 1
        if self.fsync_policy == "never":
            return 0.0 if appended else None
        if not appended and not self._to_sync and not self._dir_dirty:
            return None
        if self.fsync_policy != "batch":
            return 0.0
        return self._sync_every.wait_s(self._clock())

    async def sync(self, *, force: bool = False) -> None:
        """Make appended entries durable per the policy (`force`: regardless of it, unless 'never'),
        then let the reader see them. One fsync per call, in a worker thread; not rate-limited here
        (`sync_wait_s` is the writer's schedule)."""
        if self._wfd is None:
            return
        target = self._next_seq - 1
        if self.fsync_policy == "never":
            self._durable_seq = target
            return
        rotated = self._to_sync
        fds = self._collect_sync(force=force)
        dir_dirty, self._dir_dirty = self._dir_dirty, False
        try:
            if fds or dir_dirty:
                self._sync_every.done(self._clock())
                await asyncio.to_thread(self._sync_files, fds, self.directory if dir_dirty else None)
        except OSError as exc:
            log.error("journal_fsync_failed", extra={"dir": str(self.directory), "error": str(exc)})
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise JournalFullError(f"disk holding journal {self.directory} is full ({exc.strerror})",
                                       disk_full=True) from exc
            # After a failed fsync the kernel may have dropped the dirty pages: do not pretend otherwise.
            raise JournalError(f"fsync of journal {self.directory} failed ({exc}); check the disk") from exc
        finally:
            for fd in rotated:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self._durable_seq = max(self._durable_seq, target)

    @staticmethod
    def _sync_files(fds: list[int], directory: Path | None) -> None:
        for fd in fds:
            os.fsync(fd)
        if directory is not None:  # a new segment's directory entry must survive a power cut too
            dfd = os.open(directory, os.O_RDONLY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)

    # -- reading --------------------------------------------------------------------------------------

    def read(self, max_bytes: int) -> list[JournalEntry]:
        """The next unread durable entries in order, about `max_bytes` of them (at least one if any).

        Entries stay pending until `ack`; after a restart, reading starts again at the first unacked one.
        """
        out: list[JournalEntry] = []
        total = 0
        while total < max_bytes:
            entry: JournalEntry | _Disk
            if self._disk is not None:
                entry = self._read_disk()
                if entry is _Disk.CACHED:
                    self._disk = None
                    continue
                if entry is _Disk.END:
                    self._disk = None
                    if not self._cache:
                        break
                    continue
                if entry is _Disk.NOT_DURABLE:
                    break
            else:
                if not self._cache or self._cache[0].entry.seq > self._durable_seq:
                    break
                cached = self._cache.popleft()
                self._cache_size -= cached.entry.size
                entry = cached.entry
            assert isinstance(entry, JournalEntry)
            out.append(entry)
            total += entry.size
            self._read_seq = entry.seq
            self._inflight.append((entry.seq, len(entry.records), entry.size))
        return out

    def _read_disk(self) -> JournalEntry | _Disk:
        while True:
            assert self._disk is not None
            # Checked at every position, segment boundaries included: never read an entry twice.
            if self._cache and self._disk == (self._cache[0].segment, self._cache[0].offset):
                return _Disk.CACHED
            first, offset = self._disk
            seg = self._by_first.get(first)
            if seg is None:  # deleted under us (fully acked): continue with the next segment
                later = [s for s in self._segments if s.first_seq > first]
                if not later:
                    return _Disk.END
                self._disk = (later[0].first_seq, SEGMENT_HEADER_BYTES)
                continue
            if offset >= seg.size:
                if seg is self._segments[-1]:
                    return _Disk.END
                nxt = self._segments[self._segments.index(seg) + 1]
                self._disk = (nxt.first_seq, SEGMENT_HEADER_BYTES)
                continue
            fd = self._read_fd(seg)
            head = os.pread(fd, FRAME_HEADER_BYTES, offset)
            plen, crc = _CRC.unpack_from(head)
            seq, _count, ts_ms = _TAIL.unpack_from(head, _CRC.size)
            if seq > self._durable_seq:
                return _Disk.NOT_DURABLE
            payload = os.pread(fd, plen, offset + FRAME_HEADER_BYTES)
            if len(payload) != plen or zlib.crc32(payload, zlib.crc32(head[_CRC.size:])) != crc:
                # Verified at open or written by us since: the disk changed it. Skip the rest of the segment
                # rather than stop delivering; the error says exactly what is lost.
                log.error("journal_entry_corrupt", extra={"path": str(seg.path), "offset": offset, "seq": seq,
                                                          "skipped_bytes": seg.size - offset})
                self._disk = (first, seg.size)
                continue
            self._disk = (first, offset + FRAME_HEADER_BYTES + plen)
            return JournalEntry(seq, self._decoder.decode(payload), ts_ms, FRAME_HEADER_BYTES + plen)

    def _read_fd(self, seg: _Segment) -> int:
        if self._rfd is not None and self._rfd[0] == seg.first_seq:
            return self._rfd[1]
        if self._rfd is not None:
            os.close(self._rfd[1])
            self._rfd = None
        fd = os.open(seg.path, os.O_RDONLY)
        self._rfd = (seg.first_seq, fd)
        return fd

    # -- acknowledging --------------------------------------------------------------------------------

    def ack(self, seq: int) -> None:
        """Every entry up to `seq` (inclusive) reached its destination: never resend them."""
        if seq <= self._acked_seq:
            return
        if seq > self._read_seq:
            raise ValueError(f"cannot acknowledge seq {seq}: only entries up to {self._read_seq} were read")
        while self._inflight and self._inflight[0][0] <= seq:
            _, count, size = self._inflight.popleft()
            self._pending_entries -= 1
            self._pending_records -= count
            self._pending_bytes -= size
        self._acked_seq = seq
        # Delete before saving the cursor: deleting is safe with a stale cursor (those entries were delivered),
        # and on a full disk it frees the space the cursor needs.
        self._delete_acked_segments()
        self.save_cursor()

    def cursor_wait_s(self) -> float | None:
        """None when the cursor file is up to date, else seconds until `save_cursor()` will write it (0: now)."""
        if self._lock_fd is None or self._acked_seq == self._saved_seq:
            return None
        return self._cursor_every.wait_s(self._clock())

    def save_cursor(self, *, force: bool = False) -> bool:
        """Write the acknowledgement to the cursor file if it moved and the interval allows (`force`: now).
        Returns whether it wrote."""
        if self._lock_fd is None or self._acked_seq == self._saved_seq:
            return False
        now = self._clock()
        if not force and self._cursor_every.wait_s(now) > 0:
            return False
        self._cursor_every.done(now)
        return self._write_cursor()

    def _write_cursor(self) -> bool:
        body = _CURSOR.pack(self._acked_seq, zlib.crc32(self._acked_seq.to_bytes(8, "little")))
        tmp = self.directory / "cursor.tmp"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            try:
                if os.write(fd, body) != len(body):
                    raise OSError(errno.ENOSPC, "short write")
            finally:
                os.close(fd)
            os.replace(tmp, self.directory / "cursor")
        except OSError as exc:
            # Not fatal: the acknowledgement holds in memory, and a stale cursor only means more resends.
            if not self._cursor_failing:
                self._cursor_failing = True
                log.warning("journal_cursor_write_failed", extra={
                    "dir": str(self.directory), "error": str(exc),
                    "consequence": "after a restart, entries since the last saved cursor are sent again"})
            return False
        self._saved_seq = self._acked_seq
        if self._cursor_failing:
            self._cursor_failing = False
            log.info("journal_cursor_write_recovered", extra={"dir": str(self.directory)})
        return True

    def _delete_acked_segments(self) -> None:
        while len(self._segments) > 1 and (self._segments[0].empty or self._segments[0].last_seq <= self._acked_seq):
            seg = self._segments[0]
            if self._rfd is not None and self._rfd[0] == seg.first_seq:
                os.close(self._rfd[1])
                self._rfd = None
            try:
                seg.path.unlink(missing_ok=True)
            except OSError as exc:
                log.error("journal_segment_delete_failed", extra={"path": str(seg.path), "error": str(exc)})
                return  # kept and counted; tried again at the next acknowledgement
            self._segments.pop(0)
            del self._by_first[seg.first_seq]
            self._size -= seg.size

    # -- recovery -------------------------------------------------------------------------------------

    def _read_cursor(self) -> int:
        path = self.directory / "cursor"
        try:
            body = path.read_bytes()
        except FileNotFoundError:
            return 0
        if len(body) == _CURSOR.size:
            acked, crc = _CURSOR.unpack(body)
            if zlib.crc32(acked.to_bytes(8, "little")) == crc:
                return int(acked)
        log.error("journal_cursor_invalid", extra={"path": str(path), "consequence": "resending every journaled "
                                                    "entry (at-least-once; consumers dedupe by record_id)"})
        return 0

    def _recover(self) -> None:
        self._size = self._pending_entries = self._pending_records = self._pending_bytes = 0
        self._to_sync = []
        self._active_dirty = self._dir_dirty = False
        acked = self._read_cursor()
        with contextlib.suppress(FileNotFoundError):
            (self.directory / "cursor.tmp").unlink()
        paths = sorted(self.directory.glob("*.seg"))
        segments: list[_Segment] = []
        last_seq = 0
        first_unacked: tuple[int, int] | None = None
        for i, path in enumerate(paths):
            try:
                first = int(path.stem)
            except ValueError:
                self._quarantine(path, "segment name is not a seq")
                continue
            scanned = self._scan(path, first, acked, last_seq, is_last=i == len(paths) - 1)
            if scanned is None:
                continue
            seg, unacked_at = scanned
            if not seg.empty:
                last_seq = seg.last_seq
            if first_unacked is None and unacked_at is not None:
                first_unacked = (seg.first_seq, unacked_at)
            segments.append(seg)
        self._acked_seq = self._saved_seq = acked
        self._next_seq = max(last_seq, acked) + 1
        self._durable_seq = self._next_seq - 1
        self._read_seq = acked
        self._disk = first_unacked
        for seg in segments:
            if seg.empty or seg.last_seq <= acked:
                seg.path.unlink()  # fully acknowledged (or empty): nothing to resend from it
            else:
                self._segments.append(seg)
                self._by_first[seg.first_seq] = seg
                self._size += seg.size
        if self._segments:
            active = self._segments[-1]
            self._wfd = os.open(active.path, os.O_WRONLY | os.O_APPEND)
        else:
            self._open_segment(self._next_seq)
        if self._pending_entries:
            log.info("journal_recovered", extra={"dir": str(self.directory), "entries": self._pending_entries,
                                                 "records": self._pending_records, "bytes": self._pending_bytes,
                                                 "consequence": "resending unacknowledged records first"})

    def _scan(self, path: Path, first: int, acked: int, prev_seq: int, *,
              is_last: bool) -> tuple[_Segment, int | None] | None:
        """Verify one segment; cut it at its first bad frame. Returns the segment and the offset of its
        first unacknowledged entry, or None when the file is not a segment (it is quarantined)."""
        size = path.stat().st_size
        seg = _Segment(first, path, SEGMENT_HEADER_BYTES, first - 1)
        unacked_at: int | None = None
        with path.open("rb") as f:
            magic = f.read(SEGMENT_HEADER_BYTES)
            if magic != SEGMENT_MAGIC:
                if SEGMENT_MAGIC.startswith(magic):  # crashed while creating it: holds nothing
                    path.write_bytes(SEGMENT_MAGIC)
                    return seg, None
                self._quarantine(path, "bad magic")
                return None
            offset = SEGMENT_HEADER_BYTES
            problem = ""
            while offset < size:
                head = f.read(FRAME_HEADER_BYTES)
                if len(head) < FRAME_HEADER_BYTES:
                    problem = "incomplete frame header"
                    break
                plen, crc = _CRC.unpack_from(head)
                seq, count, _ts = _TAIL.unpack_from(head, _CRC.size)
                if plen > size - offset - FRAME_HEADER_BYTES:
                    problem = "frame longer than the file"
                    break
                payload = f.read(plen)
                if zlib.crc32(payload, zlib.crc32(head[_CRC.size:])) != crc:
                    problem = "CRC mismatch"
                    break
                if seq <= max(prev_seq, seg.last_seq):
                    problem = "seq not increasing"
                    break
                if seq > acked:
                    if unacked_at is None:
                        unacked_at = offset
                    self._pending_entries += 1
                    self._pending_records += count
                    self._pending_bytes += FRAME_HEADER_BYTES + plen
                seg.last_seq = seq
                offset += FRAME_HEADER_BYTES + plen
        if problem:
            level = logging.WARNING if is_last else logging.ERROR
            log.log(level, "journal_torn_tail" if is_last else "journal_segment_corrupt",
                    extra={"path": str(path), "offset": offset, "cut_bytes": size - offset, "reason": problem})
            os.truncate(path, offset)
        seg.size = offset
        return seg, unacked_at

    def _quarantine(self, path: Path, reason: str) -> None:
        target = path.with_name(path.name + ".corrupt")
        log.error("journal_segment_quarantined", extra={"path": str(path), "moved_to": str(target), "reason": reason})
        path.rename(target)
