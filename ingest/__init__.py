"""okx-ingest: OKX streams into Kafka as validated Avro."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING

from ingest.core import schema_source

if TYPE_CHECKING:
    from ingest.core.avro import SchemaSet

try:
    __version__ = version("okx-ingest")
except PackageNotFoundError:  # pragma: no cover - running from a source tree without an install
    __version__ = "0.0.0+unknown"


def _packaged_schemas() -> SchemaSet:
    # Core parses schemas but reads no files: the package edge hands it the file reader (io), run on first use.
    from ingest.io.schemas import packaged_schemas

    return packaged_schemas()


schema_source.register(_packaged_schemas)
