"""Two gateway replicas sharing one Redis: what one learned, the other answers without the PACS."""

from __future__ import annotations

import secrets
import shutil
import subprocess
import time

import httpx

from gateway.demo_data import DEMO_STUDIES, generate_demo_datasets
from gateway.dimse.demo_pacs import DemoPacs
from gateway.settings import settings_from_dict
from tests.integration.peers import redis_ping
from tests.support.server import free_port, running_gateway

CT = next(s for s in DEMO_STUDIES if s["accession_number"] == "A2303140011")
AXIAL = CT["series"][1]


def replica_settings(redis_url: str, prefix: str, pacs_port: int, spool: str, **extra):
    return settings_from_dict({
        "cache": {"url": redis_url, "prefix": prefix, "timeout": 0.5},
        "spool": {"path": spool},
        "nodes": [{"name": "demo", "ae_title": "REPL", "host": "127.0.0.1", "port": pacs_port}], **extra})


def test_replica_b_answers_from_what_replica_a_cached(redis_url, tmp_path):
    prefix = f"test:{secrets.token_hex(6)}:"
    pacs = DemoPacs(generate_demo_datasets(), ae_title="REPL")
    pacs.start()
    try:
        a = replica_settings(redis_url, prefix, pacs.port, str(tmp_path / "a"))
        b = replica_settings(redis_url, prefix, pacs.port, str(tmp_path / "b"))
        with running_gateway(a) as url_a, running_gateway(b) as url_b:
            studies = httpx.get(url_a + "/dicom-web/studies", params={"PatientName": "doe*"}).json()
            meta_url = f"/dicom-web/studies/{CT['study_uid']}/series/{AXIAL['series_uid']}/metadata"
            meta = httpx.get(url_a + meta_url, timeout=60).json()
            assert len(meta) == AXIAL["num_instances"]
            pacs.stop()                                        # the PACS is gone
            from_b = httpx.get(url_b + "/dicom-web/studies", params={"PatientName": "doe*"})
            assert from_b.status_code == 200 and from_b.json() == [
                {**s, "00081190": {"vr": "UR", "Value": [s["00081190"]["Value"][0].replace(url_a, url_b)]}}
                for s in studies]
            meta_b = httpx.get(url_b + meta_url)
            assert meta_b.status_code == 200
            assert [m["00080018"] for m in meta_b.json()] == [m["00080018"] for m in meta]
            assert meta_b.json()[0]["7FE00010"]["BulkDataURI"].startswith(url_b + "/dicom-web/")
            # Without the cache the PACS outage shows: a 502 naming the node.
            r = httpx.get(url_b + "/dicom-web/studies", params={"PatientName": "doe*"},
                          headers={"Cache-Control": "no-cache"})
            assert r.status_code == 502 and r.json()["node"] == "demo"
    finally:
        pacs.stop()


def test_redis_killed_mid_test_requests_still_succeed(tmp_path):
    exe = shutil.which("redis-server")
    assert exe, "redis-server must be installed (scripts/install-test-deps.sh)"
    port = free_port()
    argv = [exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]

    def start() -> subprocess.Popen:
        proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while not redis_ping("127.0.0.1", port):
            assert time.monotonic() < deadline, "redis-server did not start"
            time.sleep(0.05)
        return proc

    redis = start()
    with DemoPacs(generate_demo_datasets(), ae_title="REPL") as pacs:
        settings = replica_settings(f"redis://127.0.0.1:{port}/0", "t:", pacs.port, str(tmp_path / "s"),
                                    profiling={"enabled": False})   # the probe's C-FINDs would be counted
        try:
            with running_gateway(settings) as url:
                assert httpx.get(url + "/dicom-web/studies").status_code == 200
                redis.kill()
                redis.wait(10)
                started = time.monotonic()
                for _ in range(3):
                    r = httpx.get(url + "/dicom-web/studies", params={"PatientID": "DGW0001"}, timeout=30)
                    assert r.status_code == 200 and len(r.json()) == 2
                assert time.monotonic() - started < 10, "bounded timeouts while Redis is down"
                metrics = httpx.get(url + "/metrics").text
                assert "dwg_cache_failures_total 0\n" not in metrics
                ready = httpx.get(url + "/readyz").json()
                assert ready["status"] == "ready" and ready["cache"] == "unavailable"
                redis = start()                                  # Redis is back
                deadline = time.monotonic() + 10
                while httpx.get(url + "/readyz").json()["cache"] != "ok":
                    assert time.monotonic() < deadline, "cache did not recover"
                    time.sleep(0.2)
                finds = pacs.counters["find"]
                httpx.get(url + "/dicom-web/studies", params={"PatientID": "DGW0003"})
                httpx.get(url + "/dicom-web/studies", params={"PatientID": "DGW0003"})
                assert pacs.counters["find"] == finds + 1, "the cache works again after recovery"
        finally:
            redis.kill()
            redis.wait(10)
