"""The operations kit agrees with itself and with the code: dashboard, alert rules, ServiceMonitor, samplers.

That every queried metric is really exported is proven against the running processes in
tests/e2e/test_observability.py; here: the files are valid for the tools that load them.
"""

from __future__ import annotations

import shutil
import subprocess

import pytest
import yaml
from prometheus_client import CollectorRegistry
from prometheus_client.samples import Sample

from ingest.io.sink import EncodedRecord
from ingest.obs.metrics import AckLatency
from tests.promql import ROOT, RULES, dashboard, grafana_expressions, metric_names, rule_expressions, rules

PROM = ROOT / "deploy" / "prometheus"


def _promtool() -> str:
    path = shutil.which("promtool")
    assert path, "promtool not found: apt-get install -y --no-install-recommends prometheus"
    return path


def test_alert_rules_pass_promtool_check() -> None:
    out = subprocess.run([_promtool(), "check", "rules", str(RULES)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr


def test_alerts_fire_when_and_only_when_their_condition_lasts() -> None:
    tests = PROM / "tests" / "okx-ingest-rules.test.yaml"
    out = subprocess.run([_promtool(), "test", "rules", str(tests)], capture_output=True, text=True, timeout=60,
                         cwd=tests.parent)
    assert out.returncode == 0, out.stdout + out.stderr


def test_prometheusrule_carries_exactly_the_plain_rule_file() -> None:
    cr = yaml.safe_load((PROM / "prometheusrule.yaml").read_text())
    assert cr["apiVersion"] == "monitoring.coreos.com/v1" and cr["kind"] == "PrometheusRule"
    assert cr["spec"]["groups"] == rules()["groups"]


def test_every_alert_has_a_severity_a_summary_and_a_description() -> None:
    alerts = [r for g in rules()["groups"] for r in g["rules"]]
    names = [a["alert"] for a in alerts]
    assert len(names) == len(set(names))
    for a in alerts:
        assert a["labels"]["severity"] in ("warning", "critical"), a["alert"]
        assert a["annotations"]["summary"] and a["annotations"]["description"], a["alert"]


def test_dashboard_queries_are_valid_promql_over_okx_ingest_and_process_metrics() -> None:
    exprs = grafana_expressions(dashboard())
    assert len(exprs) >= 20
    for expr in exprs + rule_expressions(rules()):
        names = metric_names(expr)  # raises on invalid PromQL
        assert names, expr
        assert all(n.startswith(("okx_ingest_", "process_")) for n in names), expr


def test_metric_names_are_found_inside_functions_aggregations_and_binary_operators() -> None:
    expr = 'histogram_quantile(0.9, sum by (le) (rate(a_bucket[5m]))) / on() group_left b - -c{x="1"} > bool 1'
    assert metric_names(expr) == {"a_bucket", "b", "c"}
    with pytest.raises(ValueError):
        metric_names("rate(a[5m]")


def test_servicemonitor_selects_the_metrics_port_of_the_okx_ingest_service() -> None:
    monitor = yaml.safe_load((PROM / "servicemonitor.yaml").read_text())
    service = yaml.safe_load((ROOT / "deploy" / "k8s" / "services.yaml").read_text())
    selector = monitor["spec"]["selector"]["matchLabels"]
    assert selector.items() <= service["metadata"]["labels"].items()
    assert {e["port"] for e in monitor["spec"]["endpoints"]} <= {p["name"] for p in service["spec"]["ports"]}
    kustomization = yaml.safe_load((PROM / "kustomization.yaml").read_text())
    assert set(kustomization["resources"]) == {"servicemonitor.yaml", "prometheusrule.yaml"}


def _record(n: int) -> EncodedRecord:
    return EncodedRecord("okx.trades", None, b"v%d" % n)


def _samples(latency: AckLatency) -> list[Sample]:
    [family] = latency.histogram.collect()
    return list(family.samples)


def test_ack_latency_observes_a_marked_record_once_when_its_batch_is_acknowledged() -> None:
    now = [10_000_000_000]
    latency = AckLatency(CollectorRegistry(), now_ns=lambda: now[0])
    first, last, other = _record(1), _record(2), _record(3)
    latency.mark(last, recv_ts_ns=now[0] - 40_000_000)  # received 40 ms ago
    latency.acked([other])  # another batch: nothing to observe
    assert [s.value for s in _samples(latency) if s.name.endswith("_count")] == [0]
    now[0] += 10_000_000
    latency.acked([first, last])
    latency.acked([first, last])  # a resent batch does not count twice
    samples = {(s.name, s.labels.get("le")): s.value for s in _samples(latency)}
    assert samples[("okx_ingest_receive_to_ack_seconds_count", None)] == 1
    assert samples[("okx_ingest_receive_to_ack_seconds_sum", None)] == pytest.approx(0.05)
    assert samples[("okx_ingest_receive_to_ack_seconds_bucket", "0.025")] == 0
    assert samples[("okx_ingest_receive_to_ack_seconds_bucket", "0.05")] == 1


def test_ack_latency_forgets_the_oldest_marks_beyond_its_bound() -> None:
    latency = AckLatency(CollectorRegistry(), max_pending=2, now_ns=lambda: 0)
    records = [_record(i) for i in range(3)]
    for r in records:
        latency.mark(r, 0)
    latency.acked(records)
    count = [s.value for s in _samples(latency) if s.name.endswith("_count")]
    assert count == [2]


def test_grafana_dashboard_file_is_provisionable() -> None:
    dash = dashboard()
    assert dash["uid"] == "okx-ingest" and dash["title"]
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    for p in dash["panels"]:
        if p["type"] != "row":
            assert p["datasource"]["uid"] == "${datasource}" and p["targets"], p["title"]
