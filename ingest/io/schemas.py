"""Reading and writing the .avsc files: the file side of `ingest.core.avro` and `ingest.core.contract`.

The packaged schemas live in `ingest/schemas`, a link to the repository's `schemas/` that is also packaged
with the wheel; older writer schemas in its `previous/` folder. The package root registers
`packaged_schemas` as core's default source, so it runs once per process, on first use.

The files are generated from the Structs (`ingest.core.contract`): `make schemas`, i.e.
`python -m ingest.io.schemas --write schemas`, rewrites them; `--check` only says whether they are current.
"""

from __future__ import annotations

import argparse
import functools
import importlib.resources
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from ingest.core.avro import SchemaError, SchemaSet
from ingest.core.contract import schema_files


def schema_directory() -> Path:
    """Where the packaged .avsc files are (`ingest/schemas`, a link to the repository's `schemas/`)."""
    return Path(str(importlib.resources.files("ingest").joinpath("schemas")))


def _read(paths: list[Path]) -> dict[str, object]:
    documents: dict[str, object] = {}
    for path in paths:
        try:
            documents[str(path)] = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise SchemaError(f"{path}: not a valid Avro schema ({exc}); fix or restore the file") from exc
    return documents


def load_schemas(directory: Path) -> SchemaSet:
    """Every `*.avsc` file of `directory`, and of its `previous/` folder as older writer schemas."""
    return SchemaSet.from_documents(_read(sorted(directory.glob("*.avsc"))),
                                    _read(sorted((directory / "previous").glob("*.avsc"))), where=str(directory))


@functools.cache
def packaged_schemas() -> SchemaSet:
    """The packaged schemas, read once per process."""
    return load_schemas(schema_directory())


def outdated_schema_files(directory: Path) -> list[str]:
    """The generated files that are missing from `directory` or differ from what the Structs say."""
    return [name for name, text in schema_files().items()
            if not (directory / name).is_file() or (directory / name).read_text(encoding="utf-8") != text]


def stale_schema_files(directory: Path) -> list[str]:
    """The .avsc files of `directory` (not `previous/`) that no record generates any more."""
    return sorted(p.name for p in directory.glob("*.avsc") if p.name not in schema_files())


def write_schemas(directory: Path) -> list[str]:
    """Write the generated .avsc files that differ into `directory`; the names written, in record order."""
    files = schema_files()
    changed = outdated_schema_files(directory)
    for name in changed:
        # newline="" writes the "\n" of the rendered text as is on every platform: the files are byte-compared.
        with open(directory / name, "w", encoding="utf-8", newline="") as out:
            out.write(files[name])
    return changed


def main(argv: Sequence[str] | None = None) -> int:
    """`--write DIR` regenerates the .avsc files from the Structs, `--check DIR` reports; 1 when not current."""
    parser = argparse.ArgumentParser(prog="python -m ingest.io.schemas",
                                     description="Generate schemas/*.avsc from the record Structs.")
    action = parser.add_mutually_exclusive_group(required=True)
    action.add_argument("--write", metavar="DIR", type=Path, help="write the generated files into DIR")
    action.add_argument("--check", metavar="DIR", type=Path, help="exit 1 unless DIR holds the generated files")
    args = parser.parse_args(argv)
    directory: Path = args.write or args.check
    if not directory.is_dir():
        print(f"{directory}: not a directory; point at the repository's schemas/ folder", file=sys.stderr)
        return 2
    stale = stale_schema_files(directory)
    if stale:
        print(f"{directory}: {', '.join(stale)} belong to no record in ingest/core/records.py; move a schema old "
              "data was written with to previous/ (as <name>.<fingerprint>.avsc), or delete it", file=sys.stderr)
    if args.check:
        outdated = outdated_schema_files(directory)
        for name in outdated:
            print(f"{directory / name}: not what ingest/core/records.py generates; run `make schemas`",
                  file=sys.stderr)
        return 1 if outdated or stale else 0
    for name in write_schemas(directory):
        print(f"wrote {directory / name}")
    return 1 if stale else 0


if __name__ == "__main__":
    raise SystemExit(main())
