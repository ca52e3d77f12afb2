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


def test_unimplemented_or_keyless_auth_is_refused():
    with pytest.raises(ConfigError, match="auth.mode"):
        settings_from_dict({"auth": {"mode": "oidc"}})
    with pytest.raises(ConfigError, match="auth.api_keys"):
        settings_from_dict({"auth": {"mode": "api_key"}})
