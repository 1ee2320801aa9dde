"""`okx-ingest archive verify` and `archive compact`: offline tools over an archive root (blocking I/O)."""

from __future__ import annotations

import hashlib
import itertools
from collections.abc import Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from ingest.core.archive_schema import PartitionKey, file_name, parse_file_name
from ingest.io.archive_store import ArchiveStore, parquet_bytes
from ingest.services.archive import MANIFEST, Manifests


def partitions(store: ArchiveStore, date: str | None = None) -> Iterator[PartitionKey]:
    """Every (dataset, date, instId) directory of the archive, optionally of one date."""
    for dataset in store.list_dirs(""):
        if dataset.startswith("_") and dataset != "_rejected":
            continue
        for d in store.list_dirs(dataset):
            if not d.startswith("date=") or (date is not None and d != f"date={date}"):
                continue
            for inst in store.list_dirs(f"{dataset}/{d}"):
                if inst.startswith("instId="):
                    from urllib.parse import unquote

                    yield PartitionKey(dataset, d[5:], unquote(inst[7:]))


def verify(store: ArchiveStore, date: str | None = None) -> list[str]:
    """Problems found: files missing, corrupt (size, sha256, unreadable, row count), unlisted or overlapping."""
    problems: list[str] = []
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
                rows = pq.ParquetFile(pa.BufferReader(data)).read().num_rows
            except (pa.ArrowException, OSError) as exc:
                problems.append(f"{rel}/{name}: unreadable ({exc})")
                continue
            if rows != entry["rows"]:
                problems.append(f"{rel}/{name}: {rows} rows, the manifest says {entry['rows']}")
        for name in sorted(names - set(listed)):
            problems.append(f"{rel}/{name}: not in the manifest")
        spans: dict[tuple[str, int], list[tuple[int, int, str]]] = {}
        for name in names:
            fc = parse_file_name(name)
            if fc is not None:
                spans.setdefault((fc.topic, fc.partition), []).append((fc.first_offset, fc.last_offset, name))
        for group in spans.values():
            group.sort()
            for (_, last_a, a), (first_b, _, b) in itertools.pairwise(group):
                if first_b <= last_a:
                    problems.append(f"{rel}: {a} and {b} overlap (the same records twice)")
    return problems


def compact(store: ArchiveStore, *, date: str, min_bytes: int, target_bytes: int) -> dict[str, int]:
    """Merge runs of small files per directory and Kafka partition into files below `target_bytes`.

    The merged file is named by the run's first and last offset and written before the inputs are
    removed; a file whose offsets a larger file covers is a leftover of an interrupted run and is removed,
    so running it again finishes the work and changes nothing after that (idempotent, exactly once).
    """
    report = {"partitions": 0, "merged_files": 0, "written_files": 0, "removed_leftovers": 0}
    manifests = Manifests(store)
    for key in partitions(store, date):
        rel = key.path()
        doc = manifests.load(key)
        sizes = {f["name"]: f["bytes"] for f in doc["files"]}
        groups: dict[tuple[str, int], list[tuple[int, int, str]]] = {}
        for name in store.list_names(rel):
            fc = parse_file_name(name)
            if fc is not None:
                groups.setdefault((fc.topic, fc.partition), []).append((fc.first_offset, fc.last_offset, name))
        report["partitions"] += 1
        for (topic, partition), files in groups.items():
            files.sort(key=lambda f: (f[0], -f[1]))
            kept: list[tuple[int, int, str]] = []
            for f0 in files:  # drop inputs a merged file of an interrupted run already covers
                if kept and f0[1] <= kept[-1][1]:
                    store.delete(f"{rel}/{f0[2]}")
                    manifests.remove_files(key, [f0[2]])
                    report["removed_leftovers"] += 1
                else:
                    kept.append(f0)
            run: list[tuple[int, int, str]] = []
            run_bytes = 0
            tail: list[tuple[int, int, str] | None] = [*kept, None]
            for f in tail:
                size = sizes.get(f[2], min_bytes) if f is not None else 0
                if f is not None and size < min_bytes and run_bytes + size < target_bytes:
                    run.append(f)
                    run_bytes += size
                    continue
                if len(run) > 1:
                    _merge(store, manifests, key, topic, partition, run)
                    report["merged_files"] += len(run)
                    report["written_files"] += 1
                run, run_bytes = ([f], size) if f is not None and size < min_bytes else ([], 0)
    return report


def _merge(store: ArchiveStore, manifests: Manifests, key: PartitionKey, topic: str, partition: int,
           run: list[tuple[int, int, str]]) -> None:
    rel = key.path()
    tables = []
    for _, _, name in run:
        data = store.read_bytes(f"{rel}/{name}")
        assert data is not None
        tables.append(pq.read_table(pa.BufferReader(data)))
    table = pa.concat_tables(tables, promote_options="default")
    name = file_name(topic, partition, run[0][0], run[-1][1])
    data = parquet_bytes(table)
    store.write_atomic(store.path(f"{rel}/{name}"), data)
    entries = {f["name"]: f for f in manifests.load(key)["files"]}
    merged = {"name": name, "rows": table.num_rows, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest(),
              "firstOffset": run[0][0], "lastOffset": run[-1][1], "topic": topic, "partition": partition}
    olds = [entries[n] for _, _, n in run if n in entries]
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
    doc = manifests.load(key)
    doc["files"] = sorted([f for f in doc["files"] if f["name"] not in {n for _, _, n in run}] + [merged],
                          key=lambda f: f["name"])
    manifests._save(key, doc)
    for _, _, old in run:
        store.delete(f"{rel}/{old}")
