"""QIDO result cache: hits without DIMSE traffic (counted at the PACS), no-cache bypass, invalidation."""

import asyncio

import httpx

from cache import keys
from cache.memory import MemoryCache
from gateway.demo_data import generate_demo_datasets
from gateway.dimse.demo_pacs import DemoPacs
from gateway.settings import settings_from_dict
from tests.support.server import running_gateway


def test_cached_qido_answers_without_dimse_and_no_cache_bypasses():
    with DemoPacs(generate_demo_datasets(), ae_title="QC") as pacs:
        settings = settings_from_dict({"nodes": [{"name": "qc", "ae_title": "QC", "host": "127.0.0.1",
                                                  "port": pacs.port}]})
        with running_gateway(settings) as url:
            first = httpx.get(url + "/dicom-web/studies", params={"PatientName": "doe*"})
            finds = pacs.counters["find"]
            assert finds >= 1
            for _ in range(3):
                again = httpx.get(url + "/dicom-web/studies", params={"PatientName": "doe*"})
                assert again.json() == first.json()
            assert pacs.counters["find"] == finds, "cache hits must not reach the PACS"
            # Paging is served from the same cached result set.
            page = httpx.get(url + "/dicom-web/studies", params={"PatientName": "doe*", "limit": 1, "offset": 1})
            assert page.json() == first.json()[1:2]
            assert pacs.counters["find"] == finds
            fresh = httpx.get(url + "/dicom-web/studies", params={"PatientName": "doe*"},
                              headers={"Cache-Control": "no-cache"})
            assert fresh.json() == first.json()
            assert pacs.counters["find"] > finds


def test_generation_bump_invalidates(tmp_path):
    with DemoPacs(generate_demo_datasets(), ae_title="QC2") as pacs:
        settings = settings_from_dict({"nodes": [{"name": "qc2", "ae_title": "QC2", "host": "127.0.0.1",
                                                  "port": pacs.port}]})
        cache = MemoryCache()
        with running_gateway(settings, cache=cache) as url:
            httpx.get(url + "/dicom-web/studies")
            finds = pacs.counters["find"]
            httpx.get(url + "/dicom-web/studies")
            assert pacs.counters["find"] == finds
            asyncio.run(cache.incr(keys.node_generation("qc2")))   # what STOW does after storing
            httpx.get(url + "/dicom-web/studies")
            assert pacs.counters["find"] > finds
