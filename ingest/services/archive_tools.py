"""`okx-ingest archive verify` and `archive compact`: offline tools over an archive root (blocking I/O)."""

from __future__ import annotations

import datetime as dt
import hashlib
import itertools
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote

import pyarrow as pa
import pyarrow.parquet as pq

from ingest.core.archive_schema import PartitionKey, file_name, parse_file_name
from ingest.io.archive_store import ArchiveStore, parquet_bytes
from ingest.services.archive import MANIFEST, REJECTED, Manifests, distinct_offsets, manifest_bytes

#: Where `archive compact` builds a directory's new contents before swapping it in: outside every dataset,
#: so no reader's `<dataset>/**/*.parquet` glob ever sees it.
STAGING = "_compact"

_Span = tuple[int, int, str]  # first offset, last offset, file name


class LiveDateError(ValueError):
    """`archive compact` of a date the archiver is still writing (today in UTC, or later)."""


def partitions(store: ArchiveStore, date: str | None = None) -> Iterator[PartitionKey]:
    """Every (dataset, date, instId) directory of the archive, optionally of one date."""
    for dataset in store.list_dirs(""):
        if dataset.startswith("_") and dataset != REJECTED:
            continue
        for d in store.list_dirs(dataset):
            if not d.startswith("date=") or (date is not None and d != f"date={date}"):
                continue
            for inst in store.list_dirs(f"{dataset}/{d}"):
                if inst.startswith("instId="):
                    yield PartitionKey(dataset, d[5:], unquote(inst[7:]))


@dataclass
class VerifyReport:
    """What `verify` found: its problems, and the totals it read (files, Parquet rows, Kafka records)."""

    problems: list[str] = field(default_factory=list)
    files: int = 0
    rows: int = 0
    records: int = 0

    def summary(self) -> str:
        return (f"{self.files} file(s), {self.rows} row(s), {self.records} record(s), "
                f"{len(self.problems)} problem(s)")


def verify_report(store: ArchiveStore, date: str | None = None) -> VerifyReport:
    """Re-read every file against its manifest: missing, corrupt (size, sha256, unreadable, row or record
    count), unlisted or overlapping files are problems; the totals count what the readable files hold."""
    report = VerifyReport()
    problems = report.problems
    manifests = Manifests(store)
    for key in partitions(store, date):
        rel = key.path()
        names = {n for n in store.list_names(rel) if n.endswith(".parquet")}
        if store.read_bytes(f"{rel}/{MANIFEST}") is None:
            problems.append(f"{rel}: no {MANIFEST}")
            continue
        doc = manifests.load(key)
        listed = {f["name"]: f for f in doc["files"]}
        for name, entry in sorted(listed.items()):
            data = store.read_bytes(f"{rel}/{name}")
            if data is None:
                problems.append(f"{rel}/{name}: missing (listed in the manifest)")
                continue
            if len(data) != entry["bytes"] or hashlib.sha256(data).hexdigest() != entry["sha256"]:
                problems.append(f"{rel}/{name}: corrupt (size or sha256 differs from the manifest)")
                continue
            try:
                table = pq.ParquetFile(pa.BufferReader(data)).read()
            except (pa.ArrowException, OSError) as exc:
                problems.append(f"{rel}/{name}: unreadable ({exc})")
                continue
            records = distinct_offsets(table) if key.dataset != REJECTED else table.num_rows
            report.files += 1
            report.rows += table.num_rows
            report.records += records
            if table.num_rows != entry["rows"]:
                problems.append(f"{rel}/{name}: {table.num_rows} rows, the manifest says {entry['rows']}")
            if "records" in entry and records != entry["records"] - entry.get("rejected", 0):
                problems.append(f"{rel}/{name}: {records} records, the manifest says "
                                f"{entry['records'] - entry.get('rejected', 0)}")
        for name in sorted(names - set(listed)):
            problems.append(f"{rel}/{name}: not in the manifest")
        for group in _spans(names).values():
            for (_, last_a, a), (first_b, _, b) in itertools.pairwise(sorted(group)):
                if first_b <= last_a:
                    problems.append(f"{rel}: {a} and {b} overlap (the same records twice)")
    return report


def verify(store: ArchiveStore, date: str | None = None) -> list[str]:
    """The problems `verify_report` finds (empty: the archive is whole)."""
    return verify_report(store, date).problems


def live_date(now: dt.datetime | None = None) -> str:
    """The first date the archiver may still be writing: today in UTC."""
    return (now or dt.datetime.now(dt.UTC)).date().isoformat()


def compact(store: ArchiveStore, *, date: str, min_bytes: int, target_bytes: int,
            now: dt.datetime | None = None) -> dict[str, int]:
    """Merge runs of small files per directory and Kafka partition into files below `target_bytes`.

    Refuses today's date and later (LiveDateError): the archiver writes them. Holds the date's lock
    exclusively, so no archiver writes a file of that date meanwhile and a second compact waits, and re-reads
    every manifest under it. Locally each directory's new contents (merged files, the untouched files as hard
    links, the new manifest) are built in `_compact/` and swapped in with one atomic rename, so a reader sees
    the old files or the new, never both or neither; an interrupted run leaves only `_compact/`, removed by the
    next. On S3 (no rename, no lock) the merged file is written, the manifest switched, then the inputs
    deleted, and a file a larger one covers is removed as the leftover of an interrupted run. Running it
    again changes nothing (idempotent); every record stays exactly once.
    """
    if date >= live_date(now):
        raise LiveDateError(f"{date} is not over yet in UTC (today is {live_date(now)}): the archiver is still "
                            "writing it; compact days the archiver has finished with")
    report = {"partitions": 0, "merged_files": 0, "written_files": 0, "removed_leftovers": 0}
    with store.date_lock(date, exclusive=True):
        _clear_staging(store, date)  # an interrupted run's half-built or swapped-out directories
        for key in partitions(store, date):
            report["partitions"] += 1
            if store.local:
                _compact_swap(store, key, min_bytes, target_bytes, report)
            else:
                _compact_in_place(store, key, min_bytes, target_bytes, report)
        _clear_staging(store, date)
    return report


def _clear_staging(store: ArchiveStore, date: str) -> None:
    """Remove the date's staging (`_compact/<dataset>/date=D`, as `_compact_swap` lays it out), then
    `_compact/<dataset>` and `_compact` if that left them empty: a compact leaves nothing behind. Another
    date's compact may be using them (it holds only its own date's lock): a directory in use is not empty, and
    one emptied meanwhile is recreated by its next write (every write there creates its parents)."""
    for dataset in store.list_dirs(STAGING):
        store.remove_tree(f"{STAGING}/{dataset}/date={date}")
        store.remove_empty_dir(f"{STAGING}/{dataset}")
    store.remove_empty_dir(STAGING)


def _spans(names: set[str] | list[str]) -> dict[tuple[str, int], list[_Span]]:
    out: dict[tuple[str, int], list[_Span]] = {}
    for name in names:
        fc = parse_file_name(name)
        if fc is not None:
            out.setdefault((fc.topic, fc.partition), []).append((fc.first_offset, fc.last_offset, name))
    return out


def _runs(files: list[_Span], sizes: dict[str, int], min_bytes: int, target_bytes: int) -> list[list[_Span]]:
    """Runs of two or more consecutive small files whose sum stays below `target_bytes`."""
    out: list[list[_Span]] = []
    run: list[_Span] = []
    run_bytes = 0
    for f in [*sorted(files), None]:
        size = sizes.get(f[2], min_bytes) if f is not None else 0
        if f is not None and size < min_bytes and run_bytes + size < target_bytes:
            run.append(f)
            run_bytes += size
            continue
        if len(run) > 1:
            out.append(run)
        run, run_bytes = ([f], size) if f is not None and size < min_bytes else ([], 0)
    return out


def _merged(store: ArchiveStore, rel: str, topic: str, partition: int, run: list[_Span],
            entries: dict[str, dict[str, Any]]) -> tuple[str, bytes, dict[str, Any]]:
    """The merged file of a run: its name, bytes and manifest entry (counts summed, bounds of both ends)."""
    tables = []
    for _, _, name in run:
        data = store.read_bytes(f"{rel}/{name}")
        if data is None:
            raise OSError(f"{rel}/{name} vanished during compaction")
        tables.append(pq.read_table(pa.BufferReader(data)))
    table = pa.concat_tables(tables, promote_options="default")
    name = file_name(topic, partition, run[0][0], run[-1][1])
    data = parquet_bytes(table)
    olds = [entries[n] for _, _, n in run if n in entries]
    merged: dict[str, Any] = {"name": name, "rows": table.num_rows, "bytes": len(data),
                              "sha256": hashlib.sha256(data).hexdigest(), "firstOffset": run[0][0],
                              "lastOffset": run[-1][1], "topic": olds[0].get("topic", topic) if olds else topic,
                              "partition": partition}
    if olds and all("records" in e for e in olds):
        merged["records"] = sum(e["records"] for e in olds)
        if any(e.get("rejected") for e in olds):
            merged["rejected"] = sum(e.get("rejected", 0) for e in olds)
    for k, pick in (("firstTs", min), ("lastTs", max)):
        vals = [e[k] for e in olds if k in e]
        if vals:
            merged[k] = pick(vals)
    for k in ("firstSeqId", "firstTradeId"):
        if olds and k in olds[0]:
            merged[k] = olds[0][k]
    for k in ("lastSeqId", "lastTradeId"):
        if olds and k in olds[-1]:
            merged[k] = olds[-1][k]
    return name, data, merged


def _plan(store: ArchiveStore, key: PartitionKey, min_bytes: int, target_bytes: int
          ) -> tuple[dict[str, Any], list[str], list[tuple[str, int, list[_Span]]]]:
    """The directory's manifest (re-read), its file names, and the runs to merge per Kafka partition."""
    rel = key.path()
    doc = Manifests(store).load(key)
    sizes = {f["name"]: f["bytes"] for f in doc["files"]}
    names = [n for n in store.list_names(rel) if parse_file_name(n) is not None]
    runs = [(topic, partition, run) for (topic, partition), files in _spans(names).items()
            for run in _runs(files, sizes, min_bytes, target_bytes)]
    return doc, names, runs


def _leftovers(names: list[str]) -> set[str]:
    """Files whose offsets a larger file of the same partition covers: inputs of an interrupted merge."""
    out: set[str] = set()
    for files in _spans(names).values():
        kept: list[_Span] = []
        for f in sorted(files, key=lambda f: (f[0], -f[1])):
            if kept and f[1] <= kept[-1][1]:
                out.add(f[2])
            else:
                kept.append(f)
    return out


def _compact_swap(store: ArchiveStore, key: PartitionKey, min_bytes: int, target_bytes: int,
                  report: dict[str, int]) -> None:
    rel = key.path()
    doc, names, runs = _plan(store, key, min_bytes, target_bytes)
    gone = _leftovers(names)
    runs = [(t, p, r) for t, p, r in runs if not any(n in gone for _, _, n in r)]
    if not runs and not gone:
        return
    report["removed_leftovers"] += len(gone)
    staged = f"{STAGING}/{rel}"
    store.remove_tree(staged)
    entries = {f["name"]: f for f in doc["files"]}
    added: list[dict[str, Any]] = []
    for topic, partition, run in runs:
        name, data, entry = _merged(store, rel, topic, partition, run, entries)
        store.write_atomic(store.path(f"{staged}/{name}"), data)
        gone.update(n for _, _, n in run)
        added.append(entry)
        report["merged_files"] += len(run)
        report["written_files"] += 1
    for name in store.list_names(rel):  # everything else, unchanged (hidden temporaries of a killed writer too)
        if name not in gone and name != MANIFEST:
            store.link_into(f"{rel}/{name}", f"{staged}/{name}")
    doc["files"] = sorted([f for f in doc["files"] if f["name"] not in gone] + added, key=lambda f: f["name"])
    store.write_atomic(store.path(f"{staged}/{MANIFEST}"), manifest_bytes(doc))
    store.swap_dirs(staged, rel)
    store.remove_tree(staged)  # now the old contents


def _compact_in_place(store: ArchiveStore, key: PartitionKey, min_bytes: int, target_bytes: int,
                      report: dict[str, int]) -> None:
    rel = key.path()
    manifests = Manifests(store)
    names = [n for n in store.list_names(rel) if parse_file_name(n) is not None]
    for name in sorted(_leftovers(names)):
        store.delete(f"{rel}/{name}")
        manifests.remove_files(key, [name])
        report["removed_leftovers"] += 1
    doc, _, runs = _plan(store, key, min_bytes, target_bytes)
    for topic, partition, run in runs:
        entries = {f["name"]: f for f in doc["files"]}
        name, data, entry = _merged(store, rel, topic, partition, run, entries)
        store.write_atomic(store.path(f"{rel}/{name}"), data)
        inputs = {n for _, _, n in run}
        doc["files"] = sorted([f for f in doc["files"] if f["name"] not in inputs] + [entry],
                              key=lambda f: f["name"])
        store.write_atomic(store.path(f"{rel}/{MANIFEST}"), manifest_bytes(doc))
        for old in inputs:
            store.delete(f"{rel}/{old}")
        report["merged_files"] += len(run)
        report["written_files"] += 1
