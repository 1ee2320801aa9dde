"""Where archive files live: a local directory or an S3 bucket, through pyarrow's filesystem layer.

A file becomes visible to readers only when complete: locally it is written under a hidden temporary name,
fsynced, renamed into place and the directory fsynced; on S3 an object exists only once its upload has
completed. So a SIGKILL at any moment leaves either the whole file or nothing under a `*.parquet` name.
Every method is blocking (call it from a thread); every failure is an OSError with the path in it.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import hashlib
import os
import shutil
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from ingest.errors import ConfigError

#: Parquet writer options: zstd, statistics for pruning by DuckDB and Polars; the encodings per column below.
PARQUET_OPTIONS: dict[str, object] = {"compression": "zstd", "compression_level": 3, "write_statistics": True}
#: High-cardinality identifiers that share long prefixes (`public-0#1:BTC-USDT:...`, consecutive trade ids):
#: DELTA_BYTE_ARRAY stores each as the length of the prefix it shares with the previous one plus the rest.
DELTA_STRINGS = frozenset({"recordId", "tradeId", "eventKey", "ordId", "clOrdId", "billId", "tradeIdFirst"})
TMP_SUFFIX = ".tmp"
#: Lock files, one per date (`_locks/date=D.lock`): the archiver holds it shared while it writes a file and
#: its manifest, `archive compact` exclusive for the whole date, so neither sees the other half-done.
LOCKS = "_locks"
#: Name prefix of the start-up check's probe object, written in the root and deleted at once.
PROBE_PREFIX = "_probe-"
_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


@dataclass(frozen=True, slots=True)
class WrittenFile:
    """What a manifest records of one file."""

    name: str
    rows: int
    bytes: int
    sha256: str


def column_encodings(schema: pa.Schema) -> dict[str, str]:
    """Delta encodings where they beat dictionaries: integers and timestamps (times, offsets, sequence numbers
    rise by small steps: DELTA_BINARY_PACKED keeps only the bits of each step) and identifier strings. Every
    other column keeps dictionary encoding. Plain Parquet encodings that DuckDB, Polars and pyarrow all read;
    they cut the trades archive by about a third (docs/PERFORMANCE.md, "Archive")."""
    out: dict[str, str] = {}
    for f in schema:
        if pa.types.is_integer(f.type) or pa.types.is_timestamp(f.type):
            out[f.name] = "DELTA_BINARY_PACKED"
        elif f.name in DELTA_STRINGS and pa.types.is_string(f.type):
            out[f.name] = "DELTA_BYTE_ARRAY"
    return out


def parquet_bytes(table: pa.Table) -> bytes:
    """A table as the bytes of one Parquet file (row groups of at most 128 Ki rows)."""
    encodings = column_encodings(table.schema)
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, row_group_size=131_072, column_encoding=encodings,
                   use_dictionary=[n for n in table.column_names if n not in encodings], **PARQUET_OPTIONS)
    return bytes(sink.getvalue().to_pybytes())


class ArchiveStore:
    """One archive root. `local` tells whether renames and fsyncs apply (S3 has neither nor needs them)."""

    def __init__(self, fs: pafs.FileSystem, root: str, *, local: bool, url: str) -> None:
        self.fs = fs
        self.root = root.rstrip("/")
        self.local = local
        self.url = url

    @classmethod
    def from_url(cls, url: str, *, endpoint_override: str | None = None, region: str | None = None) -> ArchiveStore:
        """A store for `archive.url`: a path (or file://) or s3://bucket/prefix (credentials: AWS chain)."""
        parsed = urlparse(url)
        if parsed.scheme == "s3":
            if not parsed.netloc:
                raise ConfigError("archive.url", f"{url!r} names no bucket", "use s3://bucket/prefix")
            kwargs: dict[str, object] = {}
            if endpoint_override:
                ep = urlparse(endpoint_override if "://" in endpoint_override else f"http://{endpoint_override}")
                kwargs["endpoint_override"] = ep.netloc
                kwargs["scheme"] = ep.scheme or "http"
            if region:
                kwargs["region"] = region
            fs = pafs.S3FileSystem(**kwargs)
            return cls(fs, f"{parsed.netloc}/{parsed.path.strip('/')}".rstrip("/"), local=False, url=url)
        if parsed.scheme not in ("", "file"):
            raise ConfigError("archive.url", f"scheme {parsed.scheme!r} is not supported",
                              "use a local directory or s3://bucket/prefix")
        path = Path(parsed.path if parsed.scheme == "file" else url).resolve()
        return cls(pafs.LocalFileSystem(), str(path), local=True, url=url)

    def path(self, rel: str) -> str:
        return f"{self.root}/{rel}" if rel else self.root

    # ---- start-up check -----------------------------------------------------------------------------

    def check_readable(self) -> None:
        """The root can be listed: locally an existing directory, on S3 an existing bucket; raises ConfigError
        naming the setting otherwise. Writes nothing (`archive verify` only reads). A missing local root is an
        error, not an empty archive: a mistyped path must not verify as "0 problems"."""
        if self.local:
            if not os.path.exists(self.root):
                raise ConfigError("archive.url", f"{self.root} does not exist",
                                  "point it at the archive directory (the archiver creates it with its first "
                                  "file)")
            if not os.path.isdir(self.root):
                raise ConfigError("archive.url", f"{self.root} is not a directory",
                                  "point it at the archive directory")
            return
        bucket = self.root.split("/", 1)[0]
        try:
            info = self.fs.get_file_info(bucket)
        except OSError as exc:
            raise ConfigError("archive.url", f"cannot reach bucket {bucket!r}: {_short(exc)}",
                              "check the bucket name, archive.s3_endpoint_override and the AWS credentials "
                              "(AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, AWS_PROFILE or the instance role)"
                              ) from None
        if info.type == pafs.FileType.NotFound:
            raise ConfigError("archive.url", f"bucket {bucket!r} does not exist", "create it or fix the name")

    def check_writable(self) -> None:
        """Write, read and delete a probe object; raises ConfigError naming the setting when that fails.

        The probe sits in the root itself, not in a directory of its own: deleting it leaves nothing behind,
        and members starting together never remove a directory another one is about to write into."""
        if self.local:
            try:
                os.makedirs(self.root, exist_ok=True)
            except OSError as exc:
                raise ConfigError("archive.url", f"cannot create {self.root}: {exc.strerror or exc}",
                                  "point it at a writable directory") from None
        else:
            self.check_readable()
        probe = self.path(f"{PROBE_PREFIX}{uuid.uuid4().hex}")
        try:
            self.write_atomic(probe, b"probe")
            self.fs.delete_file(probe)
        except OSError as exc:
            raise ConfigError("archive.url", f"cannot write to {self.url}: {_short(exc)}",
                              "grant write access (s3:PutObject/DeleteObject, or directory permissions) or fix "
                              "the AWS credentials") from None

    # ---- files --------------------------------------------------------------------------------------

    def write_atomic(self, path: str, data: bytes) -> None:
        """`data` at `path`, visible only complete (tmp + fsync + rename + dir fsync locally)."""
        if not self.local:
            with self.fs.open_output_stream(path) as out:  # the object exists once the upload completes
                out.write(data)
            return
        directory, name = os.path.split(path)
        os.makedirs(directory, exist_ok=True)
        tmp = os.path.join(directory, f".{name}.{uuid.uuid4().hex[:8]}{TMP_SUFFIX}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            try:
                view = memoryview(data)
                while view:
                    n = os.write(fd, view)
                    view = view[n:]
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, path)
        except BaseException:
            # A full disk (ENOSPC) or a failed fsync: the partial temporary would hold the space the retry needs.
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        _fsync_dir(directory)

    def write_parquet(self, rel_dir: str, name: str, table: pa.Table) -> WrittenFile:
        data = parquet_bytes(table)
        self.write_atomic(self.path(f"{rel_dir}/{name}"), data)
        return WrittenFile(name, table.num_rows, len(data), hashlib.sha256(data).hexdigest())

    def read_bytes(self, rel: str) -> bytes | None:
        """The object's bytes, or None when it does not exist."""
        try:
            with self.fs.open_input_stream(self.path(rel)) as f:
                return bytes(f.read())
        except FileNotFoundError:
            return None
        except OSError as exc:
            if "not found" in str(exc).lower() or "no such" in str(exc).lower():
                return None
            raise

    def list_names(self, rel_dir: str) -> list[str]:
        """Names of the files directly in `rel_dir` (none if it does not exist)."""
        selector = pafs.FileSelector(self.path(rel_dir), allow_not_found=True, recursive=False)
        return sorted(info.base_name for info in self.fs.get_file_info(selector) if info.type == pafs.FileType.File)

    def list_dirs(self, rel_dir: str) -> list[str]:
        selector = pafs.FileSelector(self.path(rel_dir), allow_not_found=True, recursive=False)
        return sorted(info.base_name for info in self.fs.get_file_info(selector)
                      if info.type == pafs.FileType.Directory)

    def delete(self, rel: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.fs.delete_file(self.path(rel))

    @contextlib.contextmanager
    def date_lock(self, date: str, *, exclusive: bool) -> Iterator[None]:
        """Hold the lock of one date (blocking); a no-op on S3, which has no locks (see docs/ARCHIVE.md)."""
        if not self.local:
            yield
            return
        os.makedirs(self.path(LOCKS), exist_ok=True)
        fd = os.open(self.path(f"{LOCKS}/date={date}.lock"), os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
            yield
        finally:
            os.close(fd)  # releases the lock

    def swap_dirs(self, staged_rel: str, live_rel: str) -> None:
        """Exchange two local directories in one rename (Linux `renameat2(RENAME_EXCHANGE)`), so a reader
        listing `live_rel` sees the old files or the new ones, never a mix and never none; the old ones end up
        at `staged_rel`. Both parents are fsynced."""
        staged, live = self.path(staged_rel), self.path(live_rel)
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.renameat2(_AT_FDCWD, staged.encode(), _AT_FDCWD, live.encode(), _RENAME_EXCHANGE) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"cannot swap {staged} and {live}: {os.strerror(err)}")
        for directory in {os.path.dirname(staged), os.path.dirname(live)}:
            _fsync_dir(directory)

    def link_into(self, src_rel: str, dst_rel: str) -> None:
        """`dst_rel` as a second name of `src_rel` (local: a hard link, no copy; the bytes stay the same)."""
        src, dst = self.path(src_rel), self.path(dst_rel)
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        try:
            os.link(src, dst)
        except OSError as exc:
            if exc.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK):
                raise
            shutil.copy2(src, dst)

    def remove_tree(self, rel_dir: str) -> None:
        if self.local:
            shutil.rmtree(self.path(rel_dir), ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                self.fs.delete_dir(self.path(rel_dir))

    def remove_empty_dir(self, rel_dir: str) -> None:
        """Remove a local directory if it is empty (S3 has no directories: nothing to do)."""
        if self.local:
            with contextlib.suppress(OSError):  # not empty (in use), or already gone
                os.rmdir(self.path(rel_dir))

    def remove_temporaries(self, rel_dir: str) -> int:
        """Delete temporary files a killed writer left in `rel_dir` (local only); returns how many."""
        if not self.local:
            return 0
        n = 0
        for name in self.list_names(rel_dir):
            if name.startswith(".") and name.endswith(TMP_SUFFIX):
                self.delete(f"{rel_dir}/{name}")
                n += 1
        return n


def _fsync_dir(directory: str) -> None:
    dfd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:300] if text else type(exc).__name__
