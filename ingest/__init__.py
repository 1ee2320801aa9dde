"""okx-ingest: OKX streams into Kafka as validated Avro."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("okx-ingest")
except PackageNotFoundError:  # pragma: no cover - running from a source tree without an install
    __version__ = "0.0.0+unknown"
