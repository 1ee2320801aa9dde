"""The deploy files agree with the code: commands parse, settings load, credentials are where the code looks.

Deploy files are never run here (no systemd, no cluster), so drift between them and the daemon would only
show in production; these checks make it show in `make test`.
"""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Any

import pytest
import yaml

from ingest.cli import _parser
from ingest.config import load_settings
from ingest.credentials import ENV_NAMES

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
UNITS = sorted((DEPLOY / "systemd").glob("*.service"))


def _unit(path: Path) -> dict[str, list[str]]:
    """A unit's settings; a template's `%i` (instance) and `%H` (host) expanded as for `<unit>@9120` on `host-a`."""
    return _unit_text(path.read_text().replace("%i", "9120").replace("%H", "host-a"))


def _unit_text(text: str) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for line in text.splitlines():
        if "=" in line and not line.lstrip().startswith(("#", "[")):
            key, _, value = line.partition("=")
            out.setdefault(key.strip(), []).append(value.strip())
    return out


def _settings_env(pairs: dict[str, str], monkeypatch: pytest.MonkeyPatch, config: Path | None = None) -> None:
    """Settings load with these OKX_INGEST__ variables set (a wrong key fails with ConfigError)."""
    for key, value in pairs.items():
        if key.startswith("OKX_INGEST__"):
            monkeypatch.setenv(key, value)
    load_settings(config)


@pytest.mark.parametrize("unit", UNITS, ids=[u.name for u in UNITS])
def test_systemd_units_run_a_valid_command_with_credentials_from_loadcredential(
        unit: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    u = _unit(unit)
    [exec_start] = u["ExecStart"]
    argv = shlex.split(exec_start)
    assert argv[0].endswith("/okx-ingest")
    args = _parser().parse_args(argv[1:])
    assert args.command in ("run", "backfill", "archive")
    env = dict(e.split("=", 1) for e in u.get("Environment", []))
    loaded = {c.split(":", 1)[0] for c in u.get("LoadCredential", [])}
    if args.command == "archive":  # it never talks to OKX: no OKX key on its host process
        assert not loaded and not any(f"{name}_FILE" in env for name in ENV_NAMES)
    else:
        for name in ENV_NAMES:
            assert env[f"{name}_FILE"] == f"%d/{name.lower()}"  # %d is systemd's credentials directory
            assert name.lower() in loaded
        assert u["ExecReload"] == ["/bin/kill -HUP $MAINPID"]  # SIGHUP re-reads credentials
    assert u["KillSignal"] == ["SIGTERM"] and u["KillMode"] == ["mixed"]  # the daemon drains, then stops children
    _settings_env(env, monkeypatch)


def _docs() -> list[dict[str, Any]]:
    docs: list[dict[str, Any]] = []
    for path in sorted((DEPLOY / "k8s").glob("*.yaml")):
        docs.extend(d for d in yaml.safe_load_all(path.read_text()) if d)
    return docs


def test_kustomization_lists_every_manifest() -> None:
    kustomization = yaml.safe_load((DEPLOY / "k8s" / "kustomization.yaml").read_text())
    files = {p.name for p in (DEPLOY / "k8s").glob("*.yaml")} - {"kustomization.yaml"}
    assert set(kustomization["resources"]) == files


def test_kubernetes_config_loads_and_containers_find_their_credentials(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    docs = _docs()
    [configmap] = [d for d in docs if d["kind"] == "ConfigMap"]
    config = tmp_path / "okx-ingest.toml"
    config.write_text(configmap["data"]["okx-ingest.toml"])
    workloads = [d for d in docs if d["kind"] in ("StatefulSet", "Deployment")]
    assert {w["metadata"]["name"] for w in workloads} == {"okx-ingest", "okx-ingest-backfill", "okx-ingest-archive"}
    # OKX's REST limits are per IP and per key across the processes that call OKX: shares must not add up past 1.
    processes = sum(w["spec"]["replicas"] for w in workloads if w["metadata"]["name"] != "okx-ingest-archive")
    assert load_settings(config).okx.rest_limit_share * processes <= 1.0
    assert load_settings(config).archive.url.startswith("s3://")  # a pod's disk does not outlive the pod
    for w in workloads:
        spec = w["spec"]["template"]["spec"]
        [container] = spec["containers"]
        args = _parser().parse_args(container["args"])
        assert args.command in ("run", "backfill", "archive")
        mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
        secret_volumes = {v["name"] for v in spec["volumes"] if "secret" in v}
        env = {e["name"]: e.get("value") for e in container["env"]}
        credential_files = [f"{name}_FILE" for name in ENV_NAMES]
        if args.command == "archive":  # no OKX key; S3 credentials (if any) from a secret volume
            assert not set(credential_files) & env.keys()
            credential_files = ["AWS_SHARED_CREDENTIALS_FILE"]
        for var in credential_files:
            path = Path(env[var])
            assert mounts.get(str(path.parent)) in secret_volumes, f"{var} is not on a secret volume"
        probes = {container["livenessProbe"]["httpGet"]["path"], container["readinessProbe"]["httpGet"]["path"]}
        assert probes == {"/healthz", "/readyz"}
        _settings_env({k: v for k, v in env.items() if v is not None}, monkeypatch, config)


def test_dockerfile_default_command_parses() -> None:
    text = (DEPLOY / "Dockerfile").read_text()
    cmd = next(line for line in text.splitlines() if line.startswith("CMD "))
    args = yaml.safe_load(cmd.removeprefix("CMD "))  # the exec form is a JSON (YAML) list
    assert _parser().parse_args(args).command == "run"


@pytest.mark.parametrize("unit", UNITS, ids=[u.name for u in UNITS])
def test_systemd_units_do_not_restart_on_a_configuration_error(unit: Path) -> None:
    """Exit 2 (bad configuration, an over-privileged key) cannot be cured by a restart: systemd must stop."""
    u = _unit(unit)
    assert u["Restart"] == ["always"]
    assert u["RestartPreventExitStatus"] == ["2"]


def test_recorder_backfill_worker_and_archiver_on_one_config_listen_on_different_ports() -> None:
    """The systemd units read the same file: no service's health server may take another's port."""
    settings = load_settings(ROOT / "config" / "okx-ingest.toml")
    ports = [settings.obs.metrics_port, settings.backfill.metrics_port, settings.archive.metrics_port]
    assert len(set(ports)) == 3
    configs = {_unit(u)["ExecStart"][0].split("--config", 1)[1].strip() for u in UNITS}
    assert len(UNITS) == 4 and len(configs) == 1  # the case this guards: one file for every unit


def test_the_replica_template_gives_each_instance_its_own_member_name_state_and_port(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """okx-ingest@9120 and okx-ingest@9121 on one host: distinct member names, journals and metrics ports, one
    group; `%i`/`%H` expanded as systemd would."""
    [unit] = [u for u in UNITS if u.name == "okx-ingest@.service"]
    names, ports, dirs = set(), set(), set()
    for instance in ("9120", "9121"):
        text = unit.read_text().replace("%i", instance).replace("%H", "host-a")
        env = dict(e.split("=", 1) for e in _unit_text(text).get("Environment", []))
        for key, value in env.items():
            if key.startswith("OKX_INGEST__"):
                monkeypatch.setenv(key, value)
        settings = load_settings(ROOT / "config" / "okx-ingest.toml")
        assert settings.cluster.enabled
        names.add(settings.cluster.member_name({}))
        ports.add(settings.obs.metrics_port)
        dirs.add(settings.journal.dir)
    assert names == {"host-a-9120", "host-a-9121"} and len(ports) == 2 and len(dirs) == 2


def test_archive_unit_waits_out_the_drain_before_systemd_kills_it() -> None:
    """SIGKILL before the drain ends loses no record (nothing uncommitted is lost) but redoes work: give the
    drain and the consumer's bounded stop their time."""
    settings = load_settings(ROOT / "config" / "okx-ingest.toml")
    [unit] = [u for u in UNITS if u.name == "okx-ingest-archive.service"]
    assert int(_unit(unit)["TimeoutStopSec"][0]) >= settings.archive.drain_timeout_s + 10


def test_kubernetes_metrics_listen_on_the_pod_ip_and_the_port_each_process_binds(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    docs = _docs()
    [configmap] = [d for d in docs if d["kind"] == "ConfigMap"]
    config = tmp_path / "okx-ingest.toml"
    config.write_text(configmap["data"]["okx-ingest.toml"])
    monkeypatch.setenv("OKX_INGEST__OBS__METRICS_HOST", "10.1.2.3")  # what the downward API gives a pod
    settings = load_settings(config)
    for w in (d for d in docs if d["kind"] in ("StatefulSet", "Deployment")):
        [container] = w["spec"]["template"]["spec"]["containers"]
        env = {e["name"]: e for e in container["env"]}
        assert env["OKX_INGEST__OBS__METRICS_HOST"]["valueFrom"] == {"fieldRef": {"fieldPath": "status.podIP"}}
        command = _parser().parse_args(container["args"]).command
        bound = {"run": settings.obs.metrics_port, "backfill": settings.backfill.metrics_port,
                 "archive": settings.archive.metrics_port}[command]
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        assert ports["metrics"] == bound
        assert w["spec"]["template"]["metadata"]["annotations"]["prometheus.io/port"] == str(bound)
    assert "0.0.0.0" not in configmap["data"]["okx-ingest.toml"]
