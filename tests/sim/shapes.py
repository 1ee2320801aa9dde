"""Structural comparison of JSON messages: same keys and the same JSON value types, recursively.

Values are never compared, only their JSON types (string, integer, number, boolean, array, object), which is
what a parser written against real OKX frames depends on.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def json_type(value: object) -> str:
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    if isinstance(value, dict):
        return "object"
    return "null"


def shape_diff(ours: object, ref: object, path: str = "$", extra_ok: frozenset[str] = frozenset(),
               missing_ok: frozenset[str] = frozenset()) -> list[str]:
    """Differences between `ours` and the reference `ref` (empty when they have the same shape). Keys in
    `extra_ok` may appear only in ours, keys in `missing_ok` only in the reference, at any depth."""
    if json_type(ours) != json_type(ref):
        return [f"{path}: {json_type(ours)} where the reference has {json_type(ref)} ({ours!r} vs {ref!r})"]
    if isinstance(ours, dict) and isinstance(ref, dict):
        out = [f"{path}.{k}: not in the reference" for k in ours if k not in ref and k not in extra_ok]
        out += [f"{path}.{k}: missing" for k in ref if k not in ours and k not in missing_ok]
        for k in ours:
            if k in ref:
                out += shape_diff(ours[k], ref[k], f"{path}.{k}", extra_ok, missing_ok)
        return out
    if isinstance(ours, list) and isinstance(ref, list) and ours and ref:
        out = []
        for i, item in enumerate(ours):
            out += shape_diff(item, ref[0], f"{path}[{i}]", extra_ok, missing_ok)
            if out:
                break
        return out
    return []


def load_jsonl(path: Path) -> list[dict[str, Any]]:
    out = []
    for line in path.read_text().splitlines():
        line = line.strip()
        if line:
            msg = json.loads(line)
            if isinstance(msg, dict):
                out.append(msg)
    return out
