"""Where `core.avro.default_schemas()` comes from, registered at the package edge.

Core parses schemas but reads no files. The package root registers the file reader of `ingest.io.schemas`
here without importing either module (this one is import-free), so `import ingest` stays cheap and the
first record encoded or decoded reads the packaged .avsc files once.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ingest.core.avro import SchemaSet

_source: Callable[[], SchemaSet] | None = None
_loaded: SchemaSet | None = None


def register(source: Callable[[], SchemaSet] | None, loaded: SchemaSet | None = None) -> None:
    """Set the loader (called once, on first use) or an already loaded set; forgets what was loaded before."""
    global _source, _loaded
    _source, _loaded = source, loaded


def current() -> SchemaSet | None:
    """The registered set, loaded now if only a loader is registered; None when nothing is registered."""
    global _loaded
    if _loaded is None and _source is not None:
        _loaded = _source()
    return _loaded
