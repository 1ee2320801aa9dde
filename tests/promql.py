"""Metric names a dashboard or a rule file queries, read with a real PromQL parser (promql-parser)."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import promql_parser
import yaml

ROOT = Path(__file__).resolve().parents[1]
DASHBOARD = ROOT / "deploy" / "grafana" / "okx-ingest.json"
RULES = ROOT / "deploy" / "prometheus" / "okx-ingest-rules.yaml"

#: Grafana's built-in interval variables, and our template variables, as values PromQL accepts.
_GRAFANA_VARS = {"$__rate_interval": "5m", "$__interval": "1m", "$__range": "1h", "$instance": ".*"}


def grafana_expressions(dashboard: dict[str, Any]) -> list[str]:
    """Every `expr` of every panel (rows' nested panels included), with Grafana variables substituted."""
    out: list[str] = []

    def walk(panels: list[dict[str, Any]]) -> None:
        for panel in panels:
            walk(panel.get("panels", []))
            for target in panel.get("targets", []):
                expr = target["expr"]
                for var, value in _GRAFANA_VARS.items():
                    expr = expr.replace(var, value)
                assert "$" not in expr, f"unknown Grafana variable in {target['expr']!r}"
                out.append(expr)

    walk(dashboard["panels"])
    return out


def rule_expressions(rules: dict[str, Any]) -> list[str]:
    return [rule["expr"] for group in rules["groups"] for rule in group["rules"]]


def metric_names(expr: str) -> set[str]:
    """Names of every series selector in `expr` (raises ValueError when it is not valid PromQL)."""
    return set(_names(promql_parser.parse(expr)))


def _names(node: Any) -> Iterator[str]:
    if isinstance(node, promql_parser.VectorSelector):
        if node.name:
            yield node.name
        else:  # {__name__="x"}
            yield from re.findall(r'__name__="([^"]+)"', str(node.matchers))
        return
    if isinstance(node, promql_parser.MatrixSelector):
        yield from _names(node.vector_selector)
        return
    for attr in ("expr", "lhs", "rhs", "param"):
        child = getattr(node, attr, None)
        if child is not None:
            yield from _names(child)
    for child in getattr(node, "args", None) or ():
        yield from _names(child)


def dashboard() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return loaded


def rules() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load(RULES.read_text())
    return loaded


def queried_metrics() -> dict[str, set[str]]:
    """Metric name -> where it is queried ("dashboard", "rules")."""
    out: dict[str, set[str]] = {}
    for where, exprs in (("dashboard", grafana_expressions(dashboard())), ("rules", rule_expressions(rules()))):
        for expr in exprs:
            for name in metric_names(expr):
                out.setdefault(name, set()).add(where)
    return out
