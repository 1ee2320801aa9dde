"""Replay's archive source: the Parquet files `okx-ingest archive` writes, local or on S3.

Layout (docs/ARCHIVE.md): `{root}/{dataset}/date=YYYY-MM-DD/instId={instId}/{topic}+{partition}+{first}+{last}
.parquet`. A window reads the date directories it touches (exchange-time dates), of the instruments asked for,
and converts rows back to records with the archive's own mapping (`ingest.core.archive_schema`), so a record
is the same whether it comes from Kafka or from here. Files are only read, never written or moved.

Streaming (`streams`): each row group whose `ts` statistics overlap the window is one lazy stream, opened by
the merge only when it reaches the row group's first ts (core/replay.py `lazy_merge`), sorted on its own
(a file is in offset order, not exchange-time order: backfilled rows sit later) and decoded `SLICE_ROWS` rows
at a time. Memory is the row groups open at once (those whose ts ranges overlap the current position), never
the window. A book record's level rows may straddle two row groups: the first one's stream reads the
record's rows at the head of the next, which skips them (found from the `_offset` statistics).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Iterable, Iterator
from itertools import compress
from pathlib import Path

import numpy as np
import orjson
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from ingest.core.archive_schema import (
    RECORD_TYPE_BY_KIND,
    parse_file_name,
    parse_partition_path,
    table_records,
    table_to_records,
)
from ingest.core.records import GapEvent, OkxRecord, Record, TopicKind
from ingest.core.replay import Entry, LazyStream, SortKey, archive_gap, sort_key
from ingest.io.archive_store import ArchiveStore
from ingest.replay._kafka import SourceError

#: Each directory's list of its files (written by the archive service, ingest/services/archive.py).
MANIFEST = "_manifest.json"

_DAY_MS = 86_400_000
#: Rows decoded into records at a time from an open row group (bounds the Python objects alive per stream).
SLICE_ROWS = 4_096
#: The columns of the total order, as the archive names them (rows of one record share them all).
_ORDER_COLUMNS = ("ts", "recvTsNs", "_topic", "_partition", "_offset")


def _stat(md: pq.FileMetaData, rg: int, column: str) -> tuple[int, int] | None:
    """(min, max) physical values of an integer column in a row group, None without statistics."""
    meta = md.row_group(rg)
    for j in range(meta.num_columns):
        col = meta.column(j)
        if col.path_in_schema == column:
            st = col.statistics
            if st is None or not st.has_min_max:
                return None
            lo, hi = st.min_raw, st.max_raw
            return (lo, hi) if isinstance(lo, int) and isinstance(hi, int) else None
    return None


def _sort_keys(records: list[Record], heads: pa.Table, kind: TopicKind) -> Iterable[SortKey]:
    """`sort_key` of each record, from the columns it was built from (one zip, not a call per record)."""
    topics = heads.column("_topic").to_pylist()
    parts = heads.column("_partition").to_pylist()
    offs = heads.column("_offset").to_pylist()
    if issubclass(RECORD_TYPE_BY_KIND[kind], OkxRecord) and {"ts", "recvTsNs"} <= set(heads.column_names):
        ts, recv = heads.column("ts"), heads.column("recvTsNs")
        if not ts.null_count and not recv.null_count:  # the records' own ts and recv_ts_ns
            return zip(ts.cast(pa.int64()).to_pylist(), recv.cast(pa.int64()).to_pylist(), topics, parts, offs,
                       strict=True)
    return map(sort_key, records, topics, parts, offs)


def _date(ms: int) -> str:
    return dt.datetime.fromtimestamp(ms / 1000, tz=dt.UTC).date().isoformat()


class ArchiveSource:
    """Reads one archive root; `lenient` turns an unreadable file into a gap item instead of an error."""

    def __init__(self, root: str | Path, *, lenient: bool = False, endpoint_override: str | None = None,
                 region: str | None = None) -> None:
        text = str(root)
        try:
            # The archive's own store: the same S3 settings (archive.s3_endpoint_override, s3_region) apply.
            store = ArchiveStore.from_url(text, endpoint_override=endpoint_override, region=region)
            self._fs, self._root = store.fs, store.root
            info = self._fs.get_file_info(self._root)
        except (pa.ArrowInvalid, OSError) as exc:
            raise SourceError(f"archive {text} cannot be opened: {exc}") from None
        self.name = text
        self.lenient = lenient
        self.problems: list[GapEvent] = []
        #: The replay's window: the bounds of a problem's gap item.
        self.window = (0, 0)
        # S3 has no directories: a prefix with objects under it is one; an empty or absent one is not.
        if info.type == pafs.FileType.File or (info.type == pafs.FileType.NotFound and store.local):
            raise SourceError(f"archive {text} does not exist or is not a directory; pass the archive.url root")

    def _dirs(self, path: str) -> list[str]:
        try:
            infos = self._fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
        except OSError as exc:
            raise SourceError(f"listing {path} failed: {exc}") from None
        return sorted(i.path for i in infos if i.type == pafs.FileType.Directory)

    def _files(self, kind: TopicKind, dates: Callable[[str], bool],
               instruments: frozenset[str] | None) -> Iterator[str]:
        for date_dir in self._dirs(f"{self._root}/{kind.value}"):
            name = date_dir.rsplit("/", 1)[-1]
            if not name.startswith("date=") or not dates(name[5:]):
                continue
            for inst_dir in self._dirs(date_dir):
                key = parse_partition_path(inst_dir[len(self._root):])
                if key is None or (instruments is not None and key.inst_id not in instruments):
                    continue
                infos = self._fs.get_file_info(pafs.FileSelector(inst_dir))
                present = {i.path.rsplit("/", 1)[-1] for i in infos if i.type == pafs.FileType.File}
                names = {n for n in present if parse_file_name(n) is not None}
                for missing in sorted(self._manifest_names(inst_dir) - present):
                    self._problem(f"{inst_dir}/{missing}", kind, "named by its manifest but missing")
                yield from (f"{inst_dir}/{n}" for n in sorted(names))

    def _manifest_names(self, inst_dir: str) -> set[str]:
        """The files a directory's `_manifest.json` lists (none when it has no manifest)."""
        try:
            with self._fs.open_input_stream(f"{inst_dir}/{MANIFEST}") as f:
                doc = orjson.loads(f.read())
        except (FileNotFoundError, orjson.JSONDecodeError):
            return set()
        except OSError:
            return set()
        files = doc.get("files", []) if isinstance(doc, dict) else []
        return {f["name"] for f in files if isinstance(f, dict) and isinstance(f.get("name"), str)}

    def _problem(self, path: str, kind: TopicKind, reason: str) -> None:
        """An unreadable or missing file: an error naming it, or (lenient) a gap item bounded by the window."""
        rel = path[len(self._root):].lstrip("/")
        if not self.lenient:
            raise SourceError(f"archive file {rel} is {reason}; restore it from Kafka with `okx-ingest archive`, "
                              "or replay around it with --lenient")
        key = parse_partition_path(rel.rsplit("/", 1)[0])
        if any(p.gap_id == f"archive:{rel}" for p in self.problems):
            return  # a file read again (a longer book lookback) is one problem
        self.problems.append(archive_gap(rel, reason, kind.value, key.inst_id if key else None, *self.window))

    def instruments(self, kind: TopicKind) -> set[str]:
        out = set()
        for date_dir in self._dirs(f"{self._root}/{kind.value}"):
            for inst_dir in self._dirs(date_dir):
                key = parse_partition_path(inst_dir[len(self._root):])
                if key is not None:
                    out.add(key.inst_id)
        return out

    def kinds(self) -> set[TopicKind]:
        names = {d.rsplit("/", 1)[-1] for d in self._dirs(self._root)}
        return {k for k in TopicKind if k.value in names}

    def _table(self, path: str, kind: TopicKind, lo: int | None, hi: int | None) -> pa.Table | None:
        try:
            with self._fs.open_input_file(path) as f:
                table = pq.read_table(f)
            if lo is not None and hi is not None and "ts" in table.column_names:
                ts = table.column("ts").cast(pa.int64())
                mask = pc.and_(pc.greater_equal(ts, lo), pc.less(ts, hi))
                table = table.filter(mask)
            return table
        except (pa.ArrowInvalid, OSError) as exc:
            self._problem(path, kind, f"unreadable ({exc})")
            return None

    def _metadata(self, path: str, kind: TopicKind) -> pq.FileMetaData | None:
        try:
            with self._fs.open_input_file(path) as f:
                return pq.ParquetFile(f).metadata
        except (pa.ArrowInvalid, OSError) as exc:
            self._problem(path, kind, f"unreadable ({exc})")
            return None

    def streams(self, kind: TopicKind, lo: int, hi: int, keep: Callable[[Record], bool] | None,
                instruments: frozenset[str] | None = None) -> tuple[list[LazyStream], bool]:
        """Lazy sorted streams of the entries with lo <= ts < hi, one per row group that may hold some (by
        its statistics), of the records `keep` keeps (None: all); and whether nothing older exists. Only file
        footers are read here."""
        first, last = _date(lo), _date(hi - 1)
        dates_present: list[str] = []

        def in_window(date: str) -> bool:
            dates_present.append(date)
            return first <= date <= last

        out: list[LazyStream] = []
        for path in self._files(kind, in_window, instruments):
            md = self._metadata(path, kind)
            if md is None:
                continue
            n = md.num_row_groups
            ts = [_stat(md, i, "ts") or _stat(md, i, "_kafka_ts") for i in range(n)]
            offs = [_stat(md, i, "_offset") for i in range(n)]
            for i in range(n):
                bounds = ts[i]
                if md.row_group(i).num_rows == 0 or (bounds is not None and (bounds[1] < lo or bounds[0] >= hi)):
                    continue
                prev, cur, nxt = offs[i - 1] if i else None, offs[i], offs[i + 1] if i + 1 < n else None
                skip_head = prev is not None and cur is not None and cur[0] == prev[1]
                tail = nxt is not None and cur is not None and nxt[0] == cur[1]
                # A row group whose first record started in the previous one: that record sorts at its ts,
                # which the previous stream yields; this one starts no earlier than its own minimum.
                lower = max(lo, bounds[0]) if bounds is not None else lo
                out.append(LazyStream(lower, self._opener(path, md, kind, i, skip_head, tail, lo, hi, keep)))
        at_begin = not dates_present or min(dates_present) > first
        return out, at_begin

    def _opener(self, path: str, md: pq.FileMetaData, kind: TopicKind, rg: int, skip_head: bool, tail: bool,
                lo: int, hi: int, keep: Callable[[Record], bool] | None) -> Callable[[], Iterator[Entry]]:
        def entries() -> Iterator[Entry]:
            table = self._row_group(path, md, kind, rg, skip_head, tail)
            if table is None:
                return
            # Records without an exchange ts (raw frames) are placed by their Kafka ts, as from Kafka.
            ts = table.column("ts" if "ts" in table.column_names else "_kafka_ts").cast(pa.int64())
            inside = pc.and_(pc.greater_equal(ts, lo), pc.less(ts, hi))
            if pc.all(inside, skip_nulls=False).as_py() is not True:  # a copy of every column: only when needed
                table = table.filter(inside)
            if table.num_rows == 0:
                return
            order = [(c, "ascending") for c in _ORDER_COLUMNS if c in table.column_names]
            # Arrow's sort is stable: a book record's level rows stay together and in their order. A row group
            # of live records is mostly in order already, and then needs no copy.
            indices = pc.sort_indices(table, sort_keys=order)
            if not (np.asarray(indices) == np.arange(len(indices))).all():
                table = table.take(indices)
            offsets = table.column("_offset").to_numpy()
            n, at = table.num_rows, 0
            while at < n:
                stop = min(n, at + SLICE_ROWS)
                while stop < n and offsets[stop] == offsets[stop - 1]:
                    stop += 1  # never cut a record's rows
                # Decimals come back from decimal128 already canonical.
                records, heads = table_records(table.slice(at, stop - at), kind)
                keys = _sort_keys(records, heads, kind)
                if keep is None:
                    yield from zip(keys, records, strict=True)
                else:
                    yield from compress(zip(keys, records, strict=True), map(keep, records))
                at = stop

        return entries

    def _row_group(self, path: str, md: pq.FileMetaData, kind: TopicKind, rg: int, skip_head: bool,
                   tail: bool) -> pa.Table | None:
        try:
            with self._fs.open_input_file(path) as f:
                pf = pq.ParquetFile(f, metadata=md)
                table = pf.read_row_group(rg)
                if skip_head:
                    head = table.column("_offset")[0]
                    table = table.filter(pc.not_equal(table.column("_offset"), head))
                nxt_rg = rg + 1
                while tail and table.num_rows and nxt_rg < md.num_row_groups:
                    last = table.column("_offset")[-1]
                    nxt = pf.read_row_group(nxt_rg)
                    more = nxt.filter(pc.equal(nxt.column("_offset"), last))
                    table = pa.concat_tables([table, more.cast(table.schema)])
                    tail, nxt_rg = more.num_rows == nxt.num_rows, nxt_rg + 1  # a record over 3+ row groups
            return table
        except (pa.ArrowInvalid, OSError) as exc:
            self._problem(path, kind, f"unreadable ({exc})")
            return None

    def _overlapping(self, md: pq.FileMetaData, lo: int, hi: int) -> list[int]:
        """The row groups that may hold rows with lo <= ts < hi (all of them without statistics)."""
        out = []
        for i in range(md.num_row_groups):
            bounds = _stat(md, i, "ts")
            if md.row_group(i).num_rows and (bounds is None or (bounds[1] >= lo and bounds[0] < hi)):
                out.append(i)
        return out

    def window_rows(self, kind: TopicKind, lo: int, hi: int, instruments: frozenset[str] | None) -> int:
        """Rows of the row groups that overlap [lo, hi), from the footers alone (sizing `.batches()` slices)."""
        first, last = _date(lo), _date(hi - 1)
        total = 0
        for path in self._files(kind, lambda d: first <= d <= last, instruments):
            md = self._metadata(path, kind)
            if md is not None:
                total += sum(md.row_group(i).num_rows for i in self._overlapping(md, lo, hi))
        return total

    def window_table(self, path: str, kind: TopicKind, lo: int, hi: int) -> pa.Table | None:
        """The file's rows with lo <= ts < hi, reading only the row groups whose statistics overlap."""
        try:
            with self._fs.open_input_file(path) as f:
                pf = pq.ParquetFile(f)
                groups = self._overlapping(pf.metadata, lo, hi)
                table = pf.read_row_groups(groups) if groups else pf.schema_arrow.empty_table()
            ts = table.column("ts").cast(pa.int64())
            return table.filter(pc.and_(pc.greater_equal(ts, lo), pc.less(ts, hi)))
        except (pa.ArrowInvalid, OSError) as exc:
            self._problem(path, kind, f"unreadable ({exc})")
            return None

    def read(self, kind: TopicKind, lo: int, hi: int, horizon: int,
             keep: Callable[[Record], bool] | None, instruments: frozenset[str] | None = None
             ) -> tuple[list[list[Entry]], bool]:
        """`streams`, read whole (tests and small reads): sorted entry lists; whether nothing older exists."""
        streams, at_begin = self.streams(kind, lo, hi, keep, instruments)
        return [list(s.open()) for s in streams], at_begin

    def read_gaps(self, instruments: frozenset[str] | None = None) -> list[tuple[GapEvent, str, int, int]]:
        found: list[tuple[GapEvent, str, int, int]] = []
        for path in self._files(TopicKind.GAPS, lambda _d: True, None):
            table = self._table(path, TopicKind.GAPS, None, None)
            if table is None:
                continue
            for record, topic, part, off in table_to_records(table, TopicKind.GAPS):
                if isinstance(record, GapEvent) and (instruments is None or record.inst_id in instruments):
                    found.append((record, topic, part, off))
        return found

