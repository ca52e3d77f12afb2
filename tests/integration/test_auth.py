"""API-key authentication (auth.mode: api_key)."""

import httpx
import pytest

from gateway.demo_data import generate_demo_datasets
from gateway.dimse.demo_pacs import DemoPacs
from gateway.settings import ConfigError, settings_from_dict
from tests.support.server import running_gateway


def test_api_keys_are_required_except_for_probes_and_preflights():
    with DemoPacs(generate_demo_datasets(), ae_title="AUTH") as pacs:
        settings = settings_from_dict({
            "auth": {"mode": "api_key", "api_keys": ["k-one", "k-two"]},
            "http": {"cors_origins": ["http://viewer.example"]},
            "nodes": [{"name": "d", "ae_title": "AUTH", "host": "127.0.0.1", "port": pacs.port}]})
        with running_gateway(settings) as url:
            denied = httpx.get(url + "/dicom-web/studies", headers={"Origin": "http://viewer.example"})
            assert denied.status_code == 401 and denied.json()["error"] == "Unauthorized"
            assert denied.headers["access-control-allow-origin"] == "http://viewer.example"
            assert httpx.get(url + "/dicom-web/studies", headers={"Authorization": "Bearer nope"}).status_code == 401
            ok = httpx.get(url + "/dicom-web/studies", headers={"Authorization": "Bearer k-two"})
            assert ok.status_code == 200 and len(ok.json()) == 8
            assert httpx.get(url + "/dicom-web/studies", headers={"X-Api-Key": "k-one"}).status_code == 200
            assert httpx.get(url + "/wado", params={"requestType": "WADO"}).status_code == 401
            assert httpx.get(url + "/healthz").status_code == 200
            assert httpx.get(url + "/readyz").status_code == 200
            pre = httpx.options(url + "/dicom-web/studies", headers={
                "Origin": "http://viewer.example", "Access-Control-Request-Method": "GET",
                "Access-Control-Request-Headers": "authorization"})
            assert pre.status_code == 200


@pytest.mark.parametrize("open_metrics", [False, True])
def test_the_unauthenticated_surface_names_no_node(open_metrics):
    with DemoPacs(generate_demo_datasets(), ae_title="AUTH2") as pacs:
        settings = settings_from_dict({
            "auth": {"mode": "api_key", "api_keys": ["k"], "open_metrics": open_metrics},
            "nodes": [{"name": "secretnode", "ae_title": "AUTH2", "host": "127.0.0.1", "port": pacs.port}]})
        with running_gateway(settings) as url:
            ready = httpx.get(url + "/readyz")
            assert ready.status_code == 200 and "secretnode" not in ready.text
            assert httpx.get(url + "/readyz?echo=1").status_code == 401, "C-ECHO of every node needs a key"
            echoed = httpx.get(url + "/readyz?echo=1", headers={"X-Api-Key": "k"})
            assert echoed.status_code == 200 and echoed.json()["nodes"]["secretnode"]["ok"]
            metrics = httpx.get(url + "/metrics")
            if open_metrics:
                assert metrics.status_code == 200 and "secretnode" in metrics.text
            else:
                assert metrics.status_code == 401
                assert httpx.get(url + "/metrics", headers={"X-Api-Key": "k"}).status_code == 200
            # Capabilities of a known and of an unknown node root look the same without a key.
            known = httpx.options(url + "/nodes/secretnode/dicom-web/")
            unknown = httpx.options(url + "/nodes/nosuchnode/dicom-web/")
            assert known.status_code == unknown.status_code == 401
            assert known.json() == unknown.json()


def test_unimplemented_or_keyless_auth_is_refused():
    with pytest.raises(ConfigError, match="auth.mode"):
        settings_from_dict({"auth": {"mode": "oidc"}})
    with pytest.raises(ConfigError, match="auth.api_keys"):
        settings_from_dict({"auth": {"mode": "api_key"}})
