import json
from pathlib import Path

import jsonschema
import pytest
import yaml

from gateway.settings import ConfigError, load_settings, settings_from_dict

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "gateway" / "config.example.yaml"
SCHEMA = ROOT / "gateway" / "config.schema.json"


def test_example_config_is_valid_for_schema_and_loader():
    raw = yaml.safe_load(EXAMPLE.read_text())
    jsonschema.validate(raw, json.loads(SCHEMA.read_text()))
    settings = load_settings(EXAMPLE, env={})
    assert settings.nodes[0].name == "orthanc"
    assert settings.spool.max_bytes == 10 * 1024**3
    assert settings.nodes[0].timeouts.dimse == 30


def test_schema_and_loader_know_the_same_keys():
    schema = json.loads(SCHEMA.read_text())
    from gateway import settings as s

    sections = {"gateway": s.GatewaySection, "http": s.HttpSection, "cache": s.CacheSection,
                "spool": s.SpoolSection, "retrieval": s.RetrievalSection, "cluster": s.ClusterSection,
                "auth": s.AuthSection, "limits": s.LimitsSection, "audit": s.AuditSection,
                "logging": s.LoggingSection}
    assert set(schema["properties"]) == set(s.Settings.__dataclass_fields__)
    for name, cls in sections.items():
        assert set(schema["properties"][name]["properties"]) == set(cls.__dataclass_fields__), name
    node_props = schema["properties"]["nodes"]["items"]["properties"]
    assert set(node_props) == set(s.PacsNode.__dataclass_fields__)
    assert set(node_props["quirks"]["properties"]) == set(s.NodeQuirks.__dataclass_fields__)


def test_env_overrides_nodes_by_name_and_nested_keys(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({"nodes": [{"name": "orthanc", "ae_title": "ORTHANC", "host": "127.0.0.1",
                                              "port": 4242}]}))
    env = {"GATEWAY_NODES__ORTHANC__PORT": "4243", "GATEWAY_NODES__ORTHANC__TIMEOUTS__DIMSE": "12.5",
           "GATEWAY_CACHE__URL": "redis://127.0.0.1:6379/0", "GATEWAY_HTTP__PORT": "9000",
           "GATEWAY_NODES__ORTHANC__QUIRKS__CASE_SENSITIVE_PN": "true"}
    s = load_settings(cfg, env=env)
    assert s.nodes[0].port == 4243
    assert s.nodes[0].timeouts.dimse == 12.5
    assert s.nodes[0].quirks.case_sensitive_pn is True
    assert s.cache.url == "redis://127.0.0.1:6379/0"
    assert s.http.port == 9000


def test_config_path_from_env(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("http: {port: 1234}\n")
    assert load_settings(None, env={"GATEWAY_CONFIG": str(cfg)}).http.port == 1234


def test_env_can_define_a_new_node():
    env = {"GATEWAY_NODES__DCM__AE_TITLE": "DCM", "GATEWAY_NODES__DCM__HOST": "127.0.0.1",
           "GATEWAY_NODES__DCM__PORT": "104"}
    s = load_settings(None, env=env)
    assert s.node("dcm") is not None and s.node("dcm").port == 104


@pytest.mark.parametrize("raw, key", [
    ({"nodes": [{"name": "o", "ae_title": "O", "host": "h", "port": 4242, "timeouts": {"dimse": "slow"}}]},
     "nodes[o].timeouts.dimse"),
    ({"nodes": [{"name": "o", "ae_title": "O", "host": "h", "port": 70000}]}, "nodes[o].port"),
    ({"nodes": [{"name": "o", "ae_title": "WAY_TOO_LONG_AE_TITLE", "host": "h", "port": 1}]},
     "nodes[o].ae_title"),
    ({"nodes": [{"name": "o", "host": "h", "port": 1}]}, "nodes[o].ae_title"),
    ({"nodes": [{"name": "o", "ae_title": "O", "host": "h", "port": 1, "retrieve": "fetch"}]},
     "nodes[o].retrieve"),
    ({"http": {"prot": 1}}, "http.prot"),
    ({"spool": {"max_bytes": "ten gigs"}}, "spool.max_bytes"),
    ({"cache": {"url": "http://redis"}}, "cache.url"),
    ({"gateway": {"stow_node": "missing"}}, "gateway.stow_node"),
    ({"gateway": {"base_url": "pacs.example.org"}}, "gateway.base_url"),
    ({"nodes": [{"name": "a", "ae_title": "A", "host": "h", "port": 1},
                {"name": "A", "ae_title": "B", "host": "h", "port": 2}]}, "nodes[A].name"),
])
def test_invalid_values_name_the_key(raw, key):
    with pytest.raises(ConfigError) as err:
        settings_from_dict(raw)
    assert str(err.value).startswith(key + ":"), str(err.value)


def test_sizes_and_defaults():
    s = settings_from_dict({"spool": {"max_bytes": "512MiB"}})
    assert s.spool.max_bytes == 512 * 1024**2
    assert s.gateway.ae_title == "DICOMWEBGW" and s.http.port == 8080 and s.cache.url is None


def test_missing_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="config file"):
        load_settings(tmp_path / "nope.yaml", env={})


def test_event_loop_is_asyncio_unless_uvloop_is_chosen():
    # asyncio by default: uvloop's socket writes hold the GIL (HttpSection.event_loop)
    assert settings_from_dict({}).http.event_loop == "asyncio"
    assert settings_from_dict({"http": {"event_loop": "uvloop"}}).http.event_loop == "uvloop"
    with pytest.raises(ConfigError, match=r"http\.event_loop: expected one of asyncio, uvloop, got 'tokio'"):
        settings_from_dict({"http": {"event_loop": "tokio"}})
