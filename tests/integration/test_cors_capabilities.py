"""CORS for browser viewers and the capabilities (WADL) OPTIONS on the service root."""

import httpx

from gateway.demo_data import generate_demo_datasets
from gateway.dimse.demo_pacs import DemoPacs
from gateway.settings import settings_from_dict
from tests.support.server import running_gateway


def test_cors_preflight_and_capabilities():
    with DemoPacs(generate_demo_datasets(), ae_title="CORS") as pacs:
        settings = settings_from_dict({
            "http": {"cors_origins": ["http://viewer.example"]},
            "nodes": [{"name": "d", "ae_title": "CORS", "host": "127.0.0.1", "port": pacs.port}]})
        with running_gateway(settings) as url:
            pre = httpx.options(url + "/dicom-web/studies", headers={
                "Origin": "http://viewer.example", "Access-Control-Request-Method": "GET",
                "Access-Control-Request-Headers": "authorization, accept"})
            assert pre.status_code == 200
            assert pre.headers["access-control-allow-origin"] == "http://viewer.example"
            assert "authorization" in pre.headers["access-control-allow-headers"].lower()
            r = httpx.get(url + "/dicom-web/studies", headers={"Origin": "http://viewer.example",
                                                             "Authorization": "Bearer x"})
            assert r.headers["access-control-allow-origin"] == "http://viewer.example"
            assert "warning" in r.headers["access-control-expose-headers"].lower()
            denied = httpx.options(url + "/dicom-web/studies", headers={
                "Origin": "http://evil.example", "Access-Control-Request-Method": "GET"})
            assert "access-control-allow-origin" not in denied.headers
            wadl = httpx.options(url + "/dicom-web/")
            assert wadl.status_code == 200
            assert wadl.headers["content-type"].startswith("application/vnd.sun.wadl+xml")
            assert f'base="{url}/dicom-web/"' in wadl.text and 'path="studies"' in wadl.text
