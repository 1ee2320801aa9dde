"""The layering docs/ARCHITECTURE.md promises, checked on the import statements themselves (ast, no import).

okx -> core -> io -> services -> supervisor -> cli: a module may import from its own layer and the ones
before it, never from a later one. The simulator is the server side and never uses the client's I/O.
Imports inside functions count too: a lazy import is still a dependency.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "ingest"

#: Layer (a subpackage or top-level module of `ingest`) -> the layers it must not import from.
FORBIDDEN: dict[str, frozenset[str]] = {
    "okx": frozenset({"io", "services", "supervisor", "cli"}),
    "core": frozenset({"io", "services", "supervisor", "cli"}),
    "sim": frozenset({"io", "services", "supervisor", "cli"}),
    "io": frozenset({"services", "supervisor", "cli"}),
    "services": frozenset({"supervisor", "cli"}),
    "config": frozenset({"io", "services", "supervisor", "cli"}),
}


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
