"""The Dockerfile and the Helm chart, kept in step with the gateway's configuration and CLI.

Needs no docker or helm binary: the chart's values and templates are read as YAML and text. When
helm-python-sdk is installed (`pip install helm-python-sdk`: Helm's own Go SDK behind ctypes), the
chart is also rendered as `helm template` would and the rendered objects are checked; without it
those tests are skipped.
"""

import json
import re
import shlex
import tomllib
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from gateway.settings import GatewaySection, HttpSection, settings_from_dict

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "helm" / "dicomweb-gateway"
TEMPLATES = CHART / "templates"
DOCKERFILE = ROOT / "Dockerfile"
SCHEMA = json.loads((ROOT / "gateway" / "config.schema.json").read_text())
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())

EXPECTED_TEMPLATES = ["_helpers.tpl", "deployment.yaml", "service.yaml", "service-internal.yaml",
                      "configmap.yaml", "secret.yaml", "ingress.yaml", "NOTES.txt"]
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
