"""Reading the .avsc files: the file side of `ingest.core.avro`, which parses what it is handed.

The packaged schemas live in `ingest/schemas`, a link to the repository's `schemas/` that is also packaged
with the wheel; older writer schemas in its `previous/` folder. The package root registers
`packaged_schemas` as core's default source, so it runs once per process, on first use.
"""

from __future__ import annotations

import functools
import importlib.resources
import json
from pathlib import Path

from ingest.core.avro import SchemaError, SchemaSet


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
