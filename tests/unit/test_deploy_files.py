"""The Dockerfile and the Helm chart, kept in step with the gateway's configuration and CLI.

Needs no docker or helm binary: the chart's values and templates are read as YAML and text, and the
chart is rendered as `helm template` would through helm-python-sdk (Helm's own Go SDK behind ctypes,
a test dependency) to check the rendered objects: where every secret goes, the NetworkPolicy, the
PodDisruptionBudget, the autoscaler, the ServiceMonitor and the audit volume. test_chart.py runs the
helm binary itself (lint, template) and validates the manifests against the Kubernetes schemas.
"""

import base64
import hashlib
import json
import re
import shlex
import tomllib
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from gateway.settings import GatewaySection, HttpSection, load_settings, settings_from_dict

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "helm" / "dicomweb-gateway"
TEMPLATES = CHART / "templates"
DOCKERFILE = ROOT / "Dockerfile"
SCHEMA = json.loads((ROOT / "gateway" / "config.schema.json").read_text())
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())

EXPECTED_TEMPLATES = ["_helpers.tpl", "deployment.yaml", "service.yaml", "service-internal.yaml",
                      "configmap.yaml", "secret.yaml", "ingress.yaml", "NOTES.txt", "networkpolicy.yaml",
                      "pdb.yaml", "hpa.yaml", "servicemonitor.yaml", "pvc-audit.yaml"]
NODE = {"name": "pacs", "ae_title": "PACS", "host": "pacs.hospital.example", "port": 104, "retrieve": "move"}
REDIS = "redis://redis-master.redis:6379/0"


def values() -> dict[str, Any]:
    return yaml.safe_load((CHART / "values.yaml").read_text())


def template(name: str) -> str:
    return (TEMPLATES / name).read_text()


def dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of the Dockerfile, continuation lines joined, comments dropped."""
    lines = [ln for ln in DOCKERFILE.read_text().splitlines() if not ln.lstrip().startswith("#")]
    text = re.sub(r"\\\n\s*", " ", "\n".join(lines))
    return [(m.group(1).upper(), m.group(2).strip())
            for m in re.finditer(r"^\s*([A-Za-z]+)\s+(.*)$", text, re.MULTILINE)]


def final_stage() -> list[tuple[str, str]]:
    instructions = dockerfile()
    start = max(i for i, (op, _) in enumerate(instructions) if op == "FROM")
    return instructions[start:]


def exec_form(op: str) -> list[str]:
    [args] = [a for o, a in final_stage() if o == op]
    parsed = json.loads(args)   # exec form: signals reach the gateway, no shell in between
    assert isinstance(parsed, list)
    return parsed


def config_mount() -> str:
    match = re.search(r"- name: config\s+mountPath: (\S+)", template("deployment.yaml"))
    assert match, "deployment.yaml mounts no config volume"
    return match.group(1)


# ---------------------------------------------------------------- values.yaml


def test_values_config_is_valid_for_schema_and_loader():
    config = values()["config"]
    jsonschema.validate(config, SCHEMA)
    settings = settings_from_dict(config)
    # A pod must listen on the pod network; the internal endpoint binds (and advertises) http.host too.
    assert settings.http.host == "0.0.0.0"
    assert settings.gateway.dimse_host == "0.0.0.0"
    assert settings.spool.path == "/var/spool/dicomweb-gateway"
    assert settings.cluster.internal_port is not None
    assert settings.cluster.shared_secret is None, "the shared secret belongs in the Secret, not the ConfigMap"
    assert settings.auth.mode == "none"


def test_values_config_with_a_node_and_redis_is_valid():
    config = values()["config"]
    config["nodes"] = [NODE]
    config["cache"] = {**config.get("cache", {}), "url": REDIS}   # what the chart does with redis.url
    jsonschema.validate(config, SCHEMA)
    settings = settings_from_dict(config)
    assert settings.nodes[0].retrieve == "move"
    assert settings.cache.url == REDIS


def test_ports_match_the_config_defaults():
    v = values()
    assert v["config"]["http"]["port"] == HttpSection().port == 8080
    assert v["config"]["gateway"]["dimse_port"] == GatewaySection().dimse_port == 11112
    assert v["service"]["port"] == v["config"]["http"]["port"]
    # The PACS is told this port for the C-MOVE destination; keep it the gateway's own.
    assert v["dimseService"]["port"] == v["config"]["gateway"]["dimse_port"]
    assert v["config"]["cluster"]["internal_port"] not in (8080, 11112)


def test_chart_metadata():
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert chart["apiVersion"] == "v2"
    assert chart["name"] == "dicomweb-gateway"
    assert str(chart["appVersion"]) == PYPROJECT["project"]["version"] == "0.1.0"
    assert values()["replicaCount"] == 2


# ---------------------------------------------------------------- templates


@pytest.mark.parametrize("name", EXPECTED_TEMPLATES)
def test_template_exists(name):
    assert (TEMPLATES / name).is_file()


def _has_path(tree: Any, path: list[str]) -> bool:
    for key in path:
        if not isinstance(tree, dict) or key not in tree:
            return False
        tree = tree[key]
    return True


def test_every_values_reference_resolves():
    v = values()
    refs: set[str] = set()
    for path in TEMPLATES.iterdir():
        refs |= set(re.findall(r"\$?\.Values((?:\.[A-Za-z_][A-Za-z0-9_]*)+)", path.read_text()))
    assert len(refs) > 20, "the reference regex no longer matches the templates"
    missing = sorted(ref for ref in refs if not _has_path(v, ref.strip(".").split(".")))
    assert not missing, f"referenced in templates but not in values.yaml: {missing}"


def test_probes_use_healthz_and_readyz_never_echo():
    deployment = template("deployment.yaml")
    probes = dict(re.findall(r"(\w+Probe):\s+httpGet:\s+path: (\S+)", deployment))
    assert probes == {"startupProbe": "/healthz", "livenessProbe": "/healthz", "readinessProbe": "/readyz"}
    assert "echo" not in "".join(probes.values())


def test_deployment_drains_and_runs_locked_down():
    deployment = template("deployment.yaml")
    v = values()
    assert "preStop:" in deployment and "terminationGracePeriodSeconds" in deployment
    assert v["terminationGracePeriodSeconds"] > v["preStopSleepSeconds"] > 0
    assert "podAntiAffinity" in deployment
    assert v["podSecurityContext"]["runAsNonRoot"] is True
    assert v["securityContext"]["readOnlyRootFilesystem"] is True
    # With a read-only root, the spool and /tmp are the writable places.
    mounts = re.findall(r"- name: (\w+)\s+mountPath: (.+)", deployment)
    assert ("spool", "{{ .Values.config.spool.path }}") in mounts
    assert ("tmp", "/tmp") in mounts
    assert "GATEWAY_CLUSTER__SHARED_SECRET" in deployment


def test_internal_port_is_headless_and_not_routed_by_the_ingress():
    internal = template("service-internal.yaml")
    assert "clusterIP: None" in internal
    assert "internal_port" not in template("ingress.yaml") + template("service.yaml")


# ---------------------------------------------------------------- Dockerfile


def test_dockerfile_base_user_and_install():
    stage = final_stage()
    assert stage[0] == ("FROM", "python:3.11-slim")
    [user] = [a for op, a in stage if op == "USER"]
    uid = user.split(":")[0]
    assert uid.isdigit() and int(uid) != 0, "numeric non-root USER (runAsNonRoot can check it)"
    installs = [a for op, a in dockerfile() if op == "RUN" and "pip install" in a]
    assert any(re.search(r"pip install(?: --[\w-]+)* \.(?:\s|$)", a) for a in installs), installs
    assert not any("[test" in a for a in installs), "the image carries no test extras"


def test_dockerfile_runs_the_console_script_on_the_mounted_config():
    [script] = PYPROJECT["project"]["scripts"]
    assert exec_form("ENTRYPOINT") == [script]
    cmd = exec_form("CMD")
    assert cmd[0] == "serve"
    assert "--allow-unauthenticated" not in cmd and "--host" not in cmd and "--workers" not in cmd
    config_path = cmd[cmd.index("--config") + 1]
    # The chart mounts the ConfigMap (key gateway.yaml) on that directory and passes the same path.
    assert str(Path(config_path).parent) == config_mount()
    assert re.search(rf"^\s+{re.escape(Path(config_path).name)}: \|", template("configmap.yaml"), re.MULTILINE)
    args = re.search(r"args:\n((?:\s+- .*\n)+)", template("deployment.yaml"))
    assert args
    assert [a.strip()[2:] for a in args.group(1).splitlines()[:3]] == cmd


def test_dockerfile_ports_volume_and_healthcheck():
    stage = final_stage()
    v = values()["config"]
    exposed = {int(p.split("/")[0]) for op, a in stage if op == "EXPOSE" for p in a.split()}
    assert exposed == {v["http"]["port"], v["gateway"]["dimse_port"], v["cluster"]["internal_port"]}
    volumes = [json.loads(a) for op, a in stage if op == "VOLUME"]
    assert [v["spool"]["path"]] in volumes
    [health] = [a for op, a in stage if op == "HEALTHCHECK"]
    assert "/healthz" in health and "?echo" not in health
    assert "python" in health and "curl" not in health and "wget" not in health


def test_image_contains_every_package():
    packages = {p.rstrip("*") for p in PYPROJECT["tool"]["setuptools"]["packages"]["find"]["include"]}
    copied = {shlex.split(a)[0].rstrip("/") for op, a in dockerfile() if op == "COPY" and "--from" not in a}
    assert packages <= copied
    allowed = {ln[1:].rstrip("/") for ln in (ROOT / ".dockerignore").read_text().splitlines()
               if ln.startswith("!")}
    assert packages | {"pyproject.toml", "README.md"} <= allowed


# ---------------------------------------------------------------- rendered (helm-python-sdk)


@pytest.fixture
def helm_sdk():
    # helm-python-sdk renders the chart with Helm's own code, no helm binary needed; it is a test
    # dependency (pyproject [test]), so a missing one fails loudly instead of skipping.
    import helm_python

    return helm_python


def render(helm: Any, overrides: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    """The chart rendered as `helm template dwg -n imaging`, as objects grouped by kind."""
    with helm.Chart.load(str(CHART)) as chart:
        out = chart.render(overrides, name="dwg", namespace="imaging")
    objects: dict[str, list[dict[str, Any]]] = {}
    for name, text in out.items():
        if name.endswith(".yaml"):
            for doc in yaml.safe_load_all(text):
                if doc:
                    objects.setdefault(doc["kind"], []).append(doc)
    return objects


def test_rendered_chart(helm_sdk):
    objects = render(helm_sdk, {"config": {"nodes": [NODE]}, "redis": {"url": REDIS}, "allowUnauthenticated": True})
    [configmap] = objects["ConfigMap"]
    config = yaml.safe_load(configmap["data"]["gateway.yaml"])
    jsonschema.validate(config, SCHEMA)
    settings = settings_from_dict(config)
    assert settings.cache.url == REDIS and settings.nodes[0].name == "pacs"

    [deployment] = objects["Deployment"]
    assert deployment["spec"]["replicas"] == 2
    pod = deployment["spec"]["template"]["spec"]
    [container] = pod["containers"]
    assert container["args"] == exec_form("CMD") + ["--allow-unauthenticated"]
    assert {p["name"]: p["containerPort"] for p in container["ports"]} == {
        "http": 8080, "dimse": 11112, "internal": settings.cluster.internal_port}
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["config"]["configMap"]["name"] == configmap["metadata"]["name"]
    assert volumes["spool"]["emptyDir"]["sizeLimit"] == "12800Mi"   # 10GiB + 25 %
    [secret_env] = [e for e in container["env"] if e["name"] == "GATEWAY_CLUSTER__SHARED_SECRET"]
    [secret] = objects["Secret"]
    assert secret_env["valueFrom"]["secretKeyRef"] == {"name": secret["metadata"]["name"], "key": "shared-secret"}
    assert len(secret["data"]["shared-secret"]) >= 48

    services = {s["metadata"]["name"]: s["spec"] for s in objects["Service"]}
    assert services["dwg-dicomweb-gateway-internal"]["clusterIP"] == "None"
    assert services["dwg-dicomweb-gateway-dimse"]["ports"][0]["targetPort"] == "dimse"
    assert "Ingress" not in objects


def test_rendered_spool_size_follows_max_bytes(helm_sdk):
    base: dict[str, Any] = {"config": {"nodes": [NODE]}, "redis": {"url": REDIS}, "allowUnauthenticated": True}

    def size(max_bytes: Any) -> str:
        base["config"]["spool"] = {"max_bytes": max_bytes}
        [deployment] = render(helm_sdk, base)["Deployment"]
        [spool] = [v for v in deployment["spec"]["template"]["spec"]["volumes"] if v["name"] == "spool"]
        return str(spool["emptyDir"]["sizeLimit"])

    assert size("512MiB") == "640Mi"
    assert size("1.5GB") == "1789Mi"
    assert size(2 * 1024**3) == "2560Mi"


@pytest.mark.parametrize(("overrides", "message"), [
    ({}, "config.nodes"),
    ({"config": {"nodes": [NODE]}, "redis": {"url": REDIS}}, "allowUnauthenticated"),
    ({"config": {"nodes": [NODE]}, "allowUnauthenticated": True}, "redis.url"),
    ({"config": {"nodes": [NODE], "spool": {"max_bytes": "lots"}}, "redis": {"url": REDIS},
      "allowUnauthenticated": True}, "max_bytes"),
])
def test_rendering_refuses_configs_that_cannot_work(helm_sdk, overrides, message):
    with pytest.raises(helm_sdk.HelmRenderError, match=message):
        render(helm_sdk, overrides)


def test_redis_url_from_a_secret_through_extra_env_counts(helm_sdk):
    env = [{"name": "GATEWAY_CACHE__URL", "valueFrom": {"secretKeyRef": {"name": "redis-auth", "key": "url"}}}]
    objects = render(helm_sdk, {"config": {"nodes": [NODE]}, "extraEnv": env, "allowUnauthenticated": True})
    [deployment] = objects["Deployment"]
    assert env[0] in deployment["spec"]["template"]["spec"]["containers"][0]["env"]


# ---------------------------------------------------------------- secrets (rendered)

API_KEYS = ["key-from-values-9f3a1c0d2e7b", "key-from-config-7b6e5d4c3a21"]
SHARED = "shared-secret-0123456789abcdef"
REDIS_PASSWORD = "r3dis p@ss/word%"      # not URL-safe: the chart escapes it into the URL
TLS_KEY = "-----BEGIN PRIVATE KEY-----\nMIIEvQSECRETKEYMATERIAL\n-----END PRIVATE KEY-----\n"
TLS_CERT = "-----BEGIN CERTIFICATE-----\nMIIDCERTIFICATE\n-----END CERTIFICATE-----\n"


def base() -> dict[str, Any]:
    return {"config": {"nodes": [NODE]}, "redis": {"url": REDIS}, "allowUnauthenticated": True}


def secrets_of(objects: dict[str, list[dict[str, Any]]]) -> dict[str, dict[str, str]]:
    return {s["metadata"]["name"]: {k: base64.b64decode(v).decode() for k, v in s.get("data", {}).items()}
            for s in objects.get("Secret", [])}


def container_of(objects: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    [deployment] = objects["Deployment"]
    [container] = deployment["spec"]["template"]["spec"]["containers"]
    return container  # type: ignore[no-any-return]


def pod_env(objects: dict[str, list[dict[str, Any]]],
            existing: dict[str, dict[str, str]] | None = None) -> dict[str, str]:
    """The container's environment as the kubelet builds it: secretKeyRefs resolved against the
    rendered Secrets (and `existing` ones of the namespace), $(VAR) expanded from earlier variables."""
    secrets = {**secrets_of(objects), **(existing or {})}
    env: dict[str, str] = {}
    for var in container_of(objects)["env"]:
        source = var.get("valueFrom", {})
        if "secretKeyRef" in source:
            env[var["name"]] = secrets[source["secretKeyRef"]["name"]][source["secretKeyRef"]["key"]]
        elif "fieldRef" in source:
            env[var["name"]] = "dwg-dicomweb-gateway-5d8f7-abcde"
        else:
            env[var["name"]] = re.sub(r"\$\((\w+)\)", lambda m: env.get(m.group(1), m.group(0)), var["value"])
    return env


def kubelet_settings(objects: dict[str, list[dict[str, Any]]], tmp_path: Path,
                     existing: dict[str, dict[str, str]] | None = None) -> Any:
    """The gateway's settings in the pod: the ConfigMap's gateway.yaml plus the GATEWAY_* variables."""
    [configmap] = objects["ConfigMap"]
    path = tmp_path / "gateway.yaml"
    path.write_text(configmap["data"]["gateway.yaml"])
    return load_settings(path, pod_env(objects, existing))


def key_matches(entry: Any, key: str) -> bool:
    """An API key as the gateway holds it: the key itself, or (keys configured by digest) its SHA-256."""
    return bool(entry == key or getattr(entry, "sha256", None) == hashlib.sha256(key.encode()).hexdigest())


def test_no_secret_value_reaches_a_configmap(helm_sdk, tmp_path):
    overrides = {
        "config": {"nodes": [NODE], "auth": {"mode": "api_key", "api_keys": [API_KEYS[1]]},
                   "cluster": {"internal_port": 8081, "shared_secret": SHARED}},
        "auth": {"apiKeys": [API_KEYS[0]]},
        "redis": {"url": REDIS, "password": REDIS_PASSWORD},
        "tls": {"secrets": [{"name": "dimse-tls", "certificate": TLS_CERT, "key": TLS_KEY}],
                "mounts": [{"secretName": "dimse-tls"}]},
    }
    objects = render(helm_sdk, overrides)
    secret_values = [*API_KEYS, SHARED, REDIS_PASSWORD, "r3dis", "MIIEvQSECRETKEYMATERIAL"]
    for kind, items in objects.items():
        if kind != "Secret":
            text = yaml.safe_dump(items)
            assert not [v for v in secret_values if v in text], f"a secret in a {kind}"
    [configmap] = objects["ConfigMap"]
    config = yaml.safe_load(configmap["data"]["gateway.yaml"])
    assert config["auth"] == {"mode": "api_key"} and config["cluster"] == {"internal_port": 8081}
    assert "url" not in config["cache"]
    jsonschema.validate(config, SCHEMA)

    secrets = secrets_of(objects)
    assert json.loads(secrets["dwg-dicomweb-gateway-auth"]["api-keys"]) == API_KEYS
    assert secrets["dwg-dicomweb-gateway-cluster"]["shared-secret"] == SHARED
    assert secrets["dimse-tls"] == {"tls.crt": TLS_CERT, "tls.key": TLS_KEY}
    [mount] = [m for m in container_of(objects)["volumeMounts"] if m["mountPath"] == "/etc/dicomweb-gateway-tls/dimse-tls"]
    assert mount["readOnly"] is True

    # The gateway, started as the kubelet starts it, sees every one of them.
    from redis.connection import parse_url

    settings = kubelet_settings(objects, tmp_path)
    assert settings.auth.mode == "api_key"
    assert len(settings.auth.api_keys) == 2
    assert all(key_matches(entry, key) for entry, key in zip(settings.auth.api_keys, API_KEYS, strict=True))
    assert settings.cluster.shared_secret == SHARED
    assert parse_url(settings.cache.url)["password"] == REDIS_PASSWORD
    assert settings.cache.url.endswith("@redis-master.redis:6379/0")


@pytest.mark.parametrize("url", ["redis://default:hunter2hunter2@redis-master.redis:6379/0",
                                 "redis://:hunter2hunter2@redis-master.redis:6379/0",
                                 "rediss://redis-master.redis:6380/0?password=hunter2hunter2"])
@pytest.mark.parametrize("where", ["redis.url", "config.cache.url"])
def test_a_redis_url_with_a_password_moves_to_a_secret(helm_sdk, tmp_path, url, where):
    overrides = base()
    if where == "redis.url":
        overrides["redis"]["url"] = url
    else:
        overrides["config"]["cache"] = {"url": url}
    objects = render(helm_sdk, overrides)
    [configmap] = objects["ConfigMap"]
    assert "hunter2" not in yaml.safe_dump(configmap)
    assert secrets_of(objects)["dwg-dicomweb-gateway-redis"] == {"url": url}
    assert kubelet_settings(objects, tmp_path).cache.url == url


def test_secrets_from_existing_secrets(helm_sdk, tmp_path):
    overrides = {
        "config": {"nodes": [NODE], "auth": {"mode": "api_key"}},
        "auth": {"existingSecret": "dwg-keys", "existingSecretKey": "keys"},
        "cluster": {"existingSecret": "dwg-cluster"},
        "redis": {"url": REDIS, "existingSecret": "redis", "existingSecretPasswordKey": "redis-password"},
    }
    objects = render(helm_sdk, overrides)
    assert "Secret" not in objects, "every secret is an existing Secret: the chart creates none"
    env = {e["name"]: e for e in container_of(objects)["env"]}
    assert env["GATEWAY_CACHE__URL"]["value"] == "redis://:$(DWG_REDIS_PASSWORD)@redis-master.redis:6379/0"
    existing = {"dwg-keys": {"keys": json.dumps(API_KEYS)}, "dwg-cluster": {"shared-secret": SHARED},
                "redis": {"redis-password": "Xq7s9VbN2mKp"}}
    settings = kubelet_settings(objects, tmp_path, existing)
    assert all(key_matches(entry, key) for entry, key in zip(settings.auth.api_keys, API_KEYS, strict=True))
    assert settings.cluster.shared_secret == SHARED
    assert settings.cache.url == "redis://:Xq7s9VbN2mKp@redis-master.redis:6379/0"

    # A Secret holding the whole URL instead.
    overrides["redis"] = {"existingSecret": "redis-url", "existingSecretUrlKey": "url"}
    objects = render(helm_sdk, overrides)
    existing["redis-url"] = {"url": "rediss://:pw@redis.example:6380/1"}
    assert kubelet_settings(objects, tmp_path, existing).cache.url == "rediss://:pw@redis.example:6380/1"
    assert "GATEWAY_CACHE__URL" not in {e["name"]: e for e in container_of(objects)["env"] if "value" in e}


def test_changed_secrets_roll_the_pods(helm_sdk):
    def annotations(keys: list[str]) -> dict[str, str]:
        overrides = {**base(), "allowUnauthenticated": False,
                     "config": {"nodes": [NODE], "auth": {"mode": "api_key"}}, "auth": {"apiKeys": keys}}
        [deployment] = render(helm_sdk, overrides)["Deployment"]
        return deployment["spec"]["template"]["metadata"]["annotations"]  # type: ignore[no-any-return]

    first, second = annotations(API_KEYS[:1]), annotations(API_KEYS)
    assert first["checksum/config"] == second["checksum/config"]
    assert first["checksum/secrets"] != second["checksum/secrets"]
    assert API_KEYS[0] not in json.dumps(first)


@pytest.mark.parametrize(("overrides", "message"), [
    ({"config": {"nodes": [NODE], "auth": {"mode": "api_key"}}}, "auth.apiKeys, or auth.existingSecret"),
    ({"config": {"nodes": [NODE], "auth": {"mode": "api_key"}},
      "auth": {"apiKeys": ["k"], "existingSecret": "keys"}}, "leave auth.apiKeys and config.auth.api_keys empty"),
    ({"redis": {"url": "redis://:a@r:6379/0", "password": "b"}}, "keep one"),
    ({"redis": {"url": "", "existingSecret": "redis"}}, "redis.existingSecret holds the password only"),
    ({"redis": {"url": "redis://:a@r:6379/0", "existingSecret": "redis"}}, "leave the password out of the URL"),
    ({"networkPolicy": {"enabled": True}}, "networkPolicy.pacs.cidrs"),
    ({"networkPolicy": {"enabled": True, "pacs": {"cidrs": ["10.0.0.0/24"]}}}, "networkPolicy.redis.cidrs"),
    ({"redis": {"url": ""}, "replicaCount": 1, "autoscaling": {"enabled": True}}, "C-MOVE with more than one replica"),
    ({"autoscaling": {"enabled": True, "minReplicas": 5, "maxReplicas": 3}}, "minReplicas is above"),
    ({"podDisruptionBudget": {"minAvailable": 1}}, "not both"),
    ({"audit": {"enabled": True, "persistence": {"enabled": True}}}, "ReadWriteMany"),
    ({"tls": {"mounts": [{"secretName": "x", "mountPath": "/etc/dicomweb-gateway/tls"}]}}, "inside the config volume"),
])
def test_rendering_refuses_broken_deployments(helm_sdk, overrides, message):
    values = base()
    for key, value in overrides.items():
        values[key] = {**values[key], **value} if isinstance(values.get(key), dict) else value
    with pytest.raises(helm_sdk.HelmRenderError, match=re.escape(message)):
        render(helm_sdk, values)


def test_values_schema_is_enforced_when_rendering(helm_sdk):
    with pytest.raises(helm_sdk.HelmValuesError, match="/replicaCount"):
        render(helm_sdk, {**base(), "replicaCount": "lots"})


# ---------------------------------------------------------------- NetworkPolicy, PDB, HPA, ServiceMonitor, audit


def test_network_policy(helm_sdk):
    assert "NetworkPolicy" not in render(helm_sdk, base()), "off by default"
    values = base()
    values["config"]["nodes"] = [NODE, {**NODE, "name": "archive", "port": 4242, "retrieve": "get"}]
    redis_peer = {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "redis"}}}
    values["networkPolicy"] = {"enabled": True, "pacs": {"cidrs": ["10.20.30.0/24"]}, "redis": {"peers": [redis_peer]}}
    objects = render(helm_sdk, values)
    [policy] = objects["NetworkPolicy"]
    spec = policy["spec"]
    pod_labels = objects["Deployment"][0]["spec"]["template"]["metadata"]["labels"]
    assert spec["podSelector"] == {"matchLabels": pod_labels}
    assert sorted(spec["policyTypes"]) == ["Egress", "Ingress"]
    self_peer = [{"podSelector": {"matchLabels": pod_labels}}]
    pacs = [{"ipBlock": {"cidr": "10.20.30.0/24"}}]

    # Ingress, port by port; every rule names its peers (a rule without would admit everyone).
    ingress = {tuple(p["port"] for p in rule["ports"]): rule["from"] for rule in spec["ingress"]}
    assert ingress == {
        ("http",): [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "ingress-nginx"}},
                     "podSelector": {"matchLabels": {"app.kubernetes.io/name": "ingress-nginx"}}}],
        ("internal",): self_peer,
        ("dimse",): pacs,
    }
    container_ports = {p["name"] for p in container_of(objects)["ports"]}
    assert {port for ports in ingress for port in ports} <= container_ports

    egress = {tuple((p["port"], p["protocol"]) for p in rule["ports"]): rule["to"] for rule in spec["egress"]}
    assert egress == {
        ((104, "TCP"), (4242, "TCP")): pacs,
        ((6379, "TCP"),): [redis_peer],
        ((8081, "TCP"),): self_peer,
        ((53, "UDP"), (53, "TCP")): [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "kube-system"}},
                                      "podSelector": {"matchLabels": {"k8s-app": "kube-dns"}}}],
    }

    # Without an ingress controller selector or httpFrom, the HTTP port admits no one (no empty rule).
    values["networkPolicy"]["ingressController"] = None     # null removes the default, as --set ...=null
    [policy] = render(helm_sdk, values)["NetworkPolicy"]
    assert all(rule.get("from") for rule in policy["spec"]["ingress"])
    assert "http" not in {p["port"] for rule in policy["spec"]["ingress"] for p in rule["ports"]}


def test_pod_disruption_budget(helm_sdk):
    objects = render(helm_sdk, base())
    [pdb] = objects["PodDisruptionBudget"]
    assert pdb["spec"]["maxUnavailable"] == 1 and "minAvailable" not in pdb["spec"]
    assert pdb["spec"]["selector"]["matchLabels"] == objects["Deployment"][0]["spec"]["selector"]["matchLabels"]
    [pdb] = render(helm_sdk, {**base(), "podDisruptionBudget": {"maxUnavailable": None, "minAvailable": "50%"}})[
        "PodDisruptionBudget"]
    assert pdb["spec"] == {"minAvailable": "50%", "selector": pdb["spec"]["selector"]}
    assert "PodDisruptionBudget" not in render(helm_sdk, {**base(), "podDisruptionBudget": {"enabled": False}})


def test_autoscaler_owns_the_replica_count(helm_sdk):
    objects = render(helm_sdk, base())
    assert "HorizontalPodAutoscaler" not in objects and objects["Deployment"][0]["spec"]["replicas"] == 2
    objects = render(helm_sdk, {**base(), "autoscaling": {"enabled": True, "minReplicas": 2, "maxReplicas": 5,
                                                          "targetMemoryUtilizationPercentage": 80}})
    [hpa] = objects["HorizontalPodAutoscaler"]
    [deployment] = objects["Deployment"]
    assert "replicas" not in deployment["spec"]
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment",
                                             "name": deployment["metadata"]["name"]}
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (2, 5)
    assert {m["resource"]["name"]: m["resource"]["target"]["averageUtilization"] for m in hpa["spec"]["metrics"]} == {
        "cpu": 70, "memory": 80}


def test_service_monitor_is_optional(helm_sdk):
    assert "ServiceMonitor" not in render(helm_sdk, base())
    objects = render(helm_sdk, {**base(), "metrics": {"serviceMonitor": {"enabled": True, "labels": {"release": "prom"}}}})
    [monitor] = objects["ServiceMonitor"]
    assert monitor["metadata"]["labels"]["release"] == "prom"
    assert monitor["spec"]["endpoints"][0]["port"] == "http"
    assert monitor["spec"]["endpoints"][0]["path"] == "/metrics"


def test_audit_volume(helm_sdk):
    def audit(values: dict[str, Any]) -> tuple[dict[str, Any], Any, Any]:
        objects = render(helm_sdk, {**base(), "audit": values})
        pod = objects["Deployment"][0]["spec"]["template"]["spec"]
        [volume] = [v for v in pod["volumes"] if v["name"] == "audit"]
        [mount] = [m for m in pod["containers"][0]["volumeMounts"] if m["name"] == "audit"]
        return volume, mount, objects.get("PersistentVolumeClaim")

    objects = render(helm_sdk, base())
    assert "audit" not in {v["name"] for v in objects["Deployment"][0]["spec"]["template"]["spec"]["volumes"]}

    volume, mount, claims = audit({"enabled": True})
    assert volume["emptyDir"] == {"sizeLimit": "1Gi"} and claims is None
    assert mount["mountPath"] == values()["audit"]["path"]

    volume, mount, claims = audit({"enabled": True, "path": "/audit", "persistence": {
        "enabled": True, "accessModes": ["ReadWriteMany"], "size": "5Gi", "storageClassName": "nfs"}})
    [claim] = claims
    assert volume["persistentVolumeClaim"]["claimName"] == claim["metadata"]["name"]
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"] and claim["spec"]["storageClassName"] == "nfs"
    assert claim["spec"]["resources"]["requests"]["storage"] == "5Gi"
    assert claim["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    assert mount["mountPath"] == "/audit"

    volume, _, claims = audit({"enabled": True, "persistence": {"enabled": True, "existingClaim": "audit-nfs"}})
    assert volume["persistentVolumeClaim"]["claimName"] == "audit-nfs" and claims is None
