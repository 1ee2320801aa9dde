"""Replay's archive source: the Parquet files `okx-ingest archive` writes, local or on S3.

Layout (docs/ARCHIVE.md): `{root}/{dataset}/date=YYYY-MM-DD/instId={instId}/{topic}+{partition}+{first}+{last}
.parquet`. A window reads the date directories it touches (exchange-time dates), of the instruments asked for,
and converts rows back to records with the archive's own mapping (`ingest.core.archive_schema`), so a record
is the same whether it comes from Kafka or from here. Files are only read, never written or moved.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Iterator
from pathlib import Path

import orjson
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from ingest.core.archive_schema import parse_file_name, parse_partition_path, table_to_records
from ingest.core.records import GapEvent, Record, TopicKind
from ingest.core.replay import Entry, archive_gap, sort_key
from ingest.io.archive_store import ArchiveStore
from ingest.replay._kafka import SourceError

#: Each directory's list of its files (written by the archive service, ingest/services/archive.py).
MANIFEST = "_manifest.json"

_DAY_MS = 86_400_000


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

    def read(self, kind: TopicKind, lo: int, hi: int, horizon: int,
             keep: Callable[[Record], bool], instruments: frozenset[str] | None = None
             ) -> tuple[list[list[Entry]], bool]:
        """Sorted entries with lo <= ts < hi, one list per file; and whether nothing older exists."""
        first, last = _date(lo), _date(hi - 1)
        dates_present: list[str] = []

        def in_window(date: str) -> bool:
            dates_present.append(date)
            return first <= date <= last

        out: list[list[Entry]] = []
        for path in self._files(kind, in_window, instruments):
            table = self._table(path, kind, lo, hi)
            if table is None or table.num_rows == 0:
                continue
            entries: list[Entry] = []
            for record, topic, part, off in table_to_records(table, kind):
                if keep(record):  # decimals come back from decimal128 already canonical
                    entries.append((sort_key(record, topic, part, off), record))
            entries.sort(key=lambda e: e[0])
            out.append(entries)
        # Older data may sit in the first date's directory before lo: only a date before it proves nothing is.
        at_begin = not dates_present or min(dates_present) > first
        return out, at_begin

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

