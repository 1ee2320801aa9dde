"""The layering docs/ARCHITECTURE.md promises, checked on the import statements themselves (ast, no import).

okx -> core -> io -> services -> supervisor -> cli: a module may import from its own layer and the ones
before it, never from a later one. The simulator is the server side and never uses the client's I/O.
Imports inside functions count too: a lazy import is still a dependency. The pure layers (okx, core) do no
I/O at all: no sockets, no event loop, no files, no logging; time and randomness are passed in.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "ingest"

#: Layer (a subpackage or top-level module of `ingest`) -> the layers it must not import from.
FORBIDDEN: dict[str, frozenset[str]] = {
    "okx": frozenset({"core", "io", "services", "supervisor", "cli"}),
    "core": frozenset({"io", "services", "supervisor", "cli"}),
    "sim": frozenset({"io", "services", "supervisor", "cli"}),
    "io": frozenset({"services", "supervisor", "cli"}),
    "services": frozenset({"supervisor", "cli"}),
    "config": frozenset({"io", "services", "supervisor", "cli"}),
}


#: What the pure layers must not import: sockets, event loops, threads, processes, clients, files, logs.
IO_MODULES = frozenset({
    "asyncio", "socket", "ssl", "selectors", "select", "subprocess", "threading", "multiprocessing", "signal",
    "http", "urllib.request", "httpx", "aiohttp", "websockets", "aiokafka", "aiobotocore", "boto3",
    "os", "shutil", "tempfile", "pathlib", "importlib.resources", "logging", "sqlite3",
})
PURE_LAYERS = ("okx", "core")
#: The order docs/ARCHITECTURE.md states and FORBIDDEN enforces.
ORDER = ("okx", "core", "io", "services", "supervisor", "cli")


def _layer(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[0] == "ingest" else None


def _module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path) -> list[tuple[int, str]]:
    """Every module `path` imports (absolute, relative ones resolved), with its line."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    package = _module_name(path).split(".")
    if path.name != "__init__.py":
        package = package[:-1]
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.extend((node.lineno, alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                target = ".".join([*base, node.module] if node.module else base)
            else:
                target = node.module or ""
            found.append((node.lineno, target))
            # `from ingest import io` imports the layer itself.
            found.extend((node.lineno, f"{target}.{alias.name}") for alias in node.names if target == "ingest")
    return found


def _violations() -> list[str]:
    bad: list[str] = []
    for path in sorted(PACKAGE.rglob("*.py")):
        layer = _layer(_module_name(path))
        forbidden = FORBIDDEN.get(layer or "")
        if not forbidden:
            continue
        for line, target in _imports(path):
            if _layer(target) in forbidden:
                bad.append(f"{path.relative_to(PACKAGE.parent)}:{line} imports {target}")
    return bad


def test_every_module_imports_only_from_its_own_or_an_earlier_layer() -> None:
    assert _violations() == []


def _io_imports() -> list[str]:
    bad: list[str] = []
    for layer in PURE_LAYERS:
        for path in sorted((PACKAGE / layer).rglob("*.py")):
            rel = str(path.relative_to(PACKAGE.parent))
            for line, target in _imports(path):
                hit = next((m for m in IO_MODULES if target == m or target.startswith(m + ".")), None)
                if hit is not None:
                    bad.append(f"{rel}:{line} imports {target}")
    return bad


def test_the_pure_layers_do_no_io() -> None:
    assert _io_imports() == []


def test_the_forbidden_arrows_are_exactly_the_documented_order() -> None:
    # Each layer of the chain is forbidden exactly the layers after it; the doc states the chain in this order.
    for i, layer in enumerate(ORDER[:-2]):
        assert FORBIDDEN[layer] == frozenset(ORDER[i + 1:]), layer
    doc = (PACKAGE.parent / "docs" / "ARCHITECTURE.md").read_text(encoding="utf-8")
    assert "`services -> core, io, okx`; `io -> core, okx`; `core -> okx`" in doc
    assert "okx, core and config import nothing from io, services, supervisor or cli" in doc


@pytest.mark.parametrize(("source", "target", "allowed"), [
    ("ingest/core/x.py", "import asyncio", False),
    ("ingest/core/x.py", "from socket import create_connection", False),
    ("ingest/okx/x.py", "import logging", False),
    ("ingest/core/x.py", "from pathlib import Path", False),
    ("ingest/core/x.py", "import importlib.resources", False),
    ("ingest/core/x.py", "from collections.abc import Iterator", True),
    ("ingest/io/x.py", "import asyncio", True),
])
def test_the_io_check_sees_io_imports_in_pure_modules(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                      source: str, target: str, allowed: bool) -> None:
    root = tmp_path / "ingest"
    path = tmp_path / source
    path.parent.mkdir(parents=True)
    (root / "core").mkdir(exist_ok=True)
    (root / "okx").mkdir(exist_ok=True)
    path.write_text(f"def f() -> None:\n    {target}\n")
    monkeypatch.setattr(__import__(__name__, fromlist=["PACKAGE"]), "PACKAGE", root)
    assert (_io_imports() == []) is allowed


@pytest.mark.parametrize(("source", "target", "allowed"), [
    ("ingest/core/x.py", "from ingest.io.sink import EncodedRecord", False),
    ("ingest/core/x.py", "from ..io import sink", False),
    ("ingest/core/x.py", "from ingest import services", False),
    ("ingest/sim/x.py", "import ingest.io.ws", False),
    ("ingest/io/x.py", "from ingest.services.pipeline import Pipeline", False),
    ("ingest/io/x.py", "from ingest.core.encoded import EncodedRecord", True),
    ("ingest/services/x.py", "from ingest.io import ws", True),
])
def test_the_check_sees_absolute_relative_and_package_imports(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                               source: str, target: str, allowed: bool) -> None:
    root = tmp_path / "ingest"
    path = tmp_path / source
    path.parent.mkdir(parents=True)
    path.write_text(f"def f() -> None:\n    {target}\n")
    monkeypatch.setattr(__import__(__name__, fromlist=["PACKAGE"]), "PACKAGE", root)
    assert (_violations() == []) is allowed
