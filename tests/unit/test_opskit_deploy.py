"""The local stack, the image and the Kubernetes manifests agree with the code (no Docker engine, no cluster).

Compose: the file parses, every okx-ingest service runs a command the CLI accepts, and every config file it
reads passes `okx-ingest check --offline`; Prometheus's config passes promtool with the files compose mounts.
Image: the build context leaves out the venv and caches, dependencies come from the hashed lock, it runs as
a non-root user on a read-only root. Kubernetes: kustomize renders base and production overlay, and the
result validates against the Kubernetes schemas (kubernetes-validate, offline).
"""

from __future__ import annotations

import argparse
import fnmatch
import re
import shutil
import socket
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from ingest.cli import _parser
from ingest.config import load_settings
from ingest.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "deploy" / "compose" / "compose.yaml"
K8S_VERSION = "1.30.0"


def _compose() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load(COMPOSE.read_text())
    return loaded


def _binds(service: dict[str, Any]) -> dict[str, Path]:
    """Container path -> host path of a service's bind mounts (compose resolves them against its file)."""
    out: dict[str, Path] = {}
    for volume in service.get("volumes", []):
        source, _, rest = volume.partition(":")
        if source.startswith("."):
            out[rest.split(":")[0]] = (COMPOSE.parent / source).resolve()
    return out


def _host_path(service: dict[str, Any], container_path: str) -> Path:
    for target, source in sorted(_binds(service).items(), key=lambda kv: -len(kv[0])):
        if container_path == target or container_path.startswith(target + "/"):
            return source / Path(container_path).relative_to(target) if container_path != target else source
    raise AssertionError(f"{container_path} is not on a bind mount of the service")


def _subcommands() -> set[str]:
    [sub] = [a for a in _parser()._actions if isinstance(a, argparse._SubParsersAction)]
    return set(sub.choices)


def _ingest_services() -> dict[str, dict[str, Any]]:
    return {name: s for name, s in _compose()["services"].items() if s.get("image", "").startswith("okx-ingest")}


def test_compose_has_the_whole_stack_with_the_recorder_backfill_and_archive() -> None:
    services = _compose()["services"]
    assert {"kafka", "schema-registry", "kafka-ui", "prometheus", "grafana"} <= set(services)
    assert set(_ingest_services()) == {"recorder", "backfill", "archive"}
    kafka = services["kafka"]["environment"]
    assert kafka["KAFKA_PROCESS_ROLES"] == "broker,controller"  # KRaft, no ZooKeeper
    for name, service in _ingest_services().items():
        assert service["user"] == "10001" and service["read_only"] is True, name
        assert any(v.endswith(":/var/lib/okx-ingest") for v in service["volumes"]), f"{name}: state on a volume"


def _offline_check(config: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "ingest.cli", "check", "--offline", "--config", str(config)],
                          capture_output=True, text=True, timeout=60, env=env, cwd=ROOT)


@pytest.mark.parametrize("name", sorted(_ingest_services()))
def test_every_compose_service_config_passes_the_offline_check(name: str) -> None:
    service = _ingest_services()[name]
    argv = service["command"]
    assert argv[0] in _subcommands() and _parser().parse_args(argv).command == argv[0], argv
    assert "profiles" not in service, f"{name} must start with `docker compose up`"
    config = _host_path(service, argv[argv.index("--config") + 1])
    out = _offline_check(config)
    assert out.returncode == 0, out.stdout + out.stderr
    settings = load_settings(config)
    assert settings.kafka.wire_format.value == "confluent" and not settings.kafka.embedded
    assert settings.kafka.bootstrap_servers.split(":")[0] in _compose()["services"]
    assert settings.kafka.schema_registry_url == "http://schema-registry:8081"
    assert settings.obs.metrics_host == "0.0.0.0"


def test_compose_prometheus_config_loads_the_mounted_rules_and_scrapes_every_okx_ingest_service(
        tmp_path: Path) -> None:
    promtool = shutil.which("promtool")
    assert promtool, "promtool not found: apt-get install -y --no-install-recommends prometheus"
    prometheus = _compose()["services"]["prometheus"]
    config = yaml.safe_load(_host_path(prometheus, "/etc/prometheus/prometheus.yml").read_text())
    config["rule_files"] = [str(_host_path(prometheus, p)) for p in config["rule_files"]]
    assert Path(config["rule_files"][0]) == ROOT / "deploy" / "prometheus" / "okx-ingest-rules.yaml"
    checked = tmp_path / "prometheus.yml"
    checked.write_text(yaml.safe_dump(config))
    out = subprocess.run([promtool, "check", "config", str(checked)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    targets = {t for job in config["scrape_configs"] for sc in job["static_configs"] for t in sc["targets"]}
    settings = load_settings(ROOT / "deploy" / "compose" / "config" / "okx-ingest.toml")
    bound = {"backfill": settings.backfill.metrics_port, "archive": settings.archive.metrics_port}
    ports = {name: bound.get(name, settings.obs.metrics_port) for name in _ingest_services()}  # the port it binds
    assert len(set(ports.values())) == len(ports)
    assert targets == {f"{name}:{port}" for name, port in ports.items()}


def test_compose_grafana_is_provisioned_with_the_dashboard_and_the_prometheus_datasource() -> None:
    grafana = _compose()["services"]["grafana"]
    provisioning = _host_path(grafana, "/etc/grafana/provisioning")
    [datasource] = yaml.safe_load((provisioning / "datasources" / "prometheus.yaml").read_text())["datasources"]
    assert datasource["type"] == "prometheus" and datasource["url"] == "http://prometheus:9090"
    [provider] = yaml.safe_load((provisioning / "dashboards" / "okx-ingest.yaml").read_text())["providers"]
    dashboard = _host_path(grafana, provider["options"]["path"] + "/okx-ingest.json")
    assert dashboard == ROOT / "deploy" / "grafana" / "okx-ingest.json"


def test_offline_check_touches_no_network_and_reports_missing_credentials(tmp_path: Path) -> None:
    with socket.socket() as listener:  # everything the settings name points here: no connection may arrive
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        listener.setblocking(False)
        port = listener.getsockname()[1]
        config = tmp_path / "c.toml"
        config.write_text(f'[okx]\nrest_base_url = "http://127.0.0.1:{port}"\nws_base_url = "ws://127.0.0.1:{port}"\n'
                          f'private = true\n[kafka]\nbootstrap_servers = "127.0.0.1:{port}"\n')
        env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
        out = _offline_check(config, env)
        assert out.returncode == 2
        assert "FAIL credentials" in out.stdout and "OKX_API_KEY" in out.stdout
        assert f"kafka: 127.0.0.1:{port}" in out.stdout and "not contacted" in out.stdout
        for name in ("key", "secret", "passphrase"):
            (tmp_path / name).write_text(f"test-{name}-{port}")
        env.update({"OKX_API_KEY_FILE": str(tmp_path / "key"), "OKX_API_SECRET_FILE": str(tmp_path / "secret"),
                    "OKX_API_PASSPHRASE_FILE": str(tmp_path / "passphrase")})
        out = _offline_check(config, env)
        assert out.returncode == 0, out.stdout + out.stderr
        assert f"test-key-{port}" not in out.stdout  # only a hint of the key is ever printed
        with pytest.raises(BlockingIOError):
            listener.accept()


def test_offline_check_of_a_bad_setting_names_the_key_without_a_traceback(tmp_path: Path) -> None:
    config = tmp_path / "c.toml"
    config.write_text('[kafka]\nbootstrap_servers = "k:9092"\ncompresion = "zstd"\n')
    out = _offline_check(config)
    assert out.returncode == 2
    assert "kafka.compresion" in out.stderr and "Traceback" not in out.stderr


# ---------------------------------------------------------------------------------------------------- image


def _dockerignored(path: str, patterns: list[str]) -> bool:
    """Docker's rule: the last matching pattern wins; `!` re-includes; `dir/` matches what is under it."""
    ignored = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        pat = pattern.removeprefix("!").rstrip("/")
        candidates = [path, *(str(p) for p in Path(path).parents if str(p) != ".")]
        if any(fnmatch.fnmatch(c, pat) or fnmatch.fnmatch(c, pat.replace("**/", "")) for c in candidates):
            ignored = not negate
    return ignored


def test_build_context_holds_what_the_dockerfile_copies_and_nothing_heavy_or_secret() -> None:
    patterns = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
                if line.strip() and not line.startswith("#")]
    dockerfile = (ROOT / "deploy" / "Dockerfile").read_text()
    copied = [src for line in dockerfile.splitlines() if line.startswith("COPY ") and "--from" not in line
              for src in line.split()[1:-1]]
    assert {"requirements.lock", "pyproject.toml", "ingest", "schemas", "config/production.toml"} <= set(copied)
    for src in copied:
        assert not _dockerignored(src, patterns), f"{src} is copied but excluded from the build context"
    for heavy in (".venv/bin/python", "var/journal/0/seg", ".git/HEAD", ".mypy_cache/x", ".pytest_cache/x",
                  "ingest/__pycache__/cli.cpython-311.pyc", "tests/unit/test_config.py", "config/okx-ingest.toml"):
        assert _dockerignored(heavy, patterns), f"{heavy} would be sent to the Docker daemon"


def test_image_installs_the_hashed_lock_and_runs_as_non_root_with_the_production_config() -> None:
    text = (ROOT / "deploy" / "Dockerfile").read_text()
    assert "--require-hashes -r requirements.lock" in text
    assert "--no-deps ." in text  # the project itself resolves nothing again
    [user] = re.findall(r"^USER (\S+)$", text, re.M)
    assert user.split(":")[0] == "10001"
    assert "COPY config/production.toml /etc/okx-ingest/okx-ingest.toml" in text
    assert 'VOLUME ["/var/lib/okx-ingest"]' in text and "PYTHONDONTWRITEBYTECODE=1" in text


def test_the_production_config_refuses_to_start_until_kafka_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    config = ROOT / "config" / "production.toml"
    with pytest.raises(ConfigError) as err:
        load_settings(config)
    assert "kafka.bootstrap_servers" in str(err.value) and "OKX_INGEST__KAFKA__BOOTSTRAP_SERVERS" in str(err.value)
    monkeypatch.setenv("OKX_INGEST__KAFKA__BOOTSTRAP_SERVERS", "kafka-0:9092,kafka-1:9092")
    settings = load_settings(config)
    assert not settings.kafka.embedded and settings.kafka.idempotence
    monkeypatch.setenv("OKX_INGEST__KAFKA__BOOTSTRAP_SERVERS", "embedded")  # only when asked for by name
    assert load_settings(config).kafka.embedded


def _pins(lock: Path) -> dict[str, str]:
    text = lock.read_text()
    pins = dict(re.findall(r"^([A-Za-z0-9_.\-]+)==([^\s;]+)(?: ;[^\\\n]*)? \\$", text, re.M))
    assert pins, lock
    blocks = re.split(r"^(?=[A-Za-z0-9_.\-]+==)", text, flags=re.M)[1:]
    assert all("--hash=sha256:" in b for b in blocks), f"{lock.name}: every pin carries its hashes"
    return {canonicalize_name(k): v for k, v in pins.items()}


def test_locks_pin_every_dependency_within_pyproject_and_agree_with_each_other() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    runtime, dev = _pins(ROOT / "requirements.lock"), _pins(ROOT / "requirements-dev.lock")
    extras = project["optional-dependencies"]
    # The image carries the msk extra: kafka.sasl_oauth_provider = "aws-msk-iam" must work in it.
    for lock, deps in ((runtime, project["dependencies"] + extras["msk"]),
                       (dev, project["dependencies"] + extras["dev"])):
        for dep in map(Requirement, deps):
            if dep.marker is not None and not dep.marker.evaluate():
                continue
            name = canonicalize_name(dep.name)
            assert name in lock, f"{dep.name} is not pinned"
            assert dep.specifier.contains(lock[name], prereleases=True), f"{dep.name}=={lock[name]} vs {dep}"
    assert {n: v for n, v in dev.items() if n in runtime} == runtime  # CI tests what the image runs
    makefile = (ROOT / "Makefile").read_text()
    assert "--require-hashes -r $(LOCK)" in makefile and "--no-deps -e ." in makefile


# ----------------------------------------------------------------------------------------------- kubernetes


def _kustomize(path: Path) -> list[dict[str, Any]]:
    kubectl = shutil.which("kubectl")
    assert kubectl, "kubectl (with its built-in kustomize) not found"
    out = subprocess.run([kubectl, "kustomize", str(path)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return [d for d in yaml.safe_load_all(out.stdout) if d]


@pytest.mark.parametrize("overlay", ["k8s", "k8s-production"])
def test_kustomize_output_validates_against_the_kubernetes_schemas(overlay: str) -> None:
    docs = _kustomize(ROOT / "deploy" / overlay)
    assert {d["kind"] for d in docs} >= {"Namespace", "ConfigMap", "StatefulSet", "Deployment", "Service"}
    for doc in docs:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    for doc in docs:
        for container in doc.get("spec", {}).get("template", {}).get("spec", {}).get("containers", []):
            image = container["image"]
            assert ":" in image and not image.endswith(":latest"), f"{doc['metadata']['name']}: {image}"


def test_schema_validation_catches_a_broken_manifest() -> None:
    [deployment] = [d for d in _kustomize(ROOT / "deploy" / "k8s")
                    if d["kind"] == "Deployment" and d["metadata"]["name"] == "okx-ingest-backfill"]
    deployment["spec"]["replicas"] = "two"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, K8S_VERSION, strict=True)


def test_production_overlay_sets_resources_security_and_spreads_replicas() -> None:
    docs = {(d["kind"], d["metadata"]["name"]): d for d in _kustomize(ROOT / "deploy" / "k8s-production")}
    workloads = [("StatefulSet", "okx-ingest"), ("Deployment", "okx-ingest-backfill"),
                 ("Deployment", "okx-ingest-archive")]
    for workload in workloads:
        pod = docs[workload]["spec"]["template"]["spec"]
        [container] = pod["containers"]
        assert container["image"].startswith("registry.example.com/okx-ingest:")
        resources = container["resources"]
        assert {"cpu", "memory"} <= resources["requests"].keys() and "memory" in resources["limits"]
        sc = container["securityContext"]
        assert sc["readOnlyRootFilesystem"] and not sc["allowPrivilegeEscalation"] and sc["capabilities"]["drop"] == [
            "ALL"]
        assert pod["securityContext"]["runAsNonRoot"] and pod["securityContext"]["runAsUser"] == 10001
        assert pod["automountServiceAccountToken"] is False
        assert "podAntiAffinity" in pod["affinity"]
        mounts = {m["mountPath"] for m in container["volumeMounts"]}
        assert "/tmp" in mounts or any(e.get("value", "").startswith("/tmp") for e in container["env"])
    # The recorder keeps its journal on its volume; the base's volumes survive the patch.
    recorder = docs[("StatefulSet", "okx-ingest")]["spec"]["template"]["spec"]["containers"][0]
    assert {"/var/lib/okx-ingest", "/etc/okx-ingest", "/var/run/secrets/okx", "/tmp"} <= {
        m["mountPath"] for m in recorder["volumeMounts"]}
