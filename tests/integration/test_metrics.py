"""/metrics against a running gateway and the demo PACS: route histograms by template (no UID in
any label), DIMSE operations and latencies per node, query association gauges, cache hits and
misses; and the JSON log of ``serve`` with the request id and without the query string."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time

import httpx
import yaml

from gateway.demo_data import DEMO_STUDIES, UID_ROOT, generate_demo_datasets
from gateway.dimse.demo_pacs import DemoPacs
from gateway.settings import settings_from_dict
from tests.support.server import free_port, running_gateway

CT = next(s for s in DEMO_STUDIES if s["accession_number"] == "A2303140011")
AXIAL = CT["series"][1]
SOP = AXIAL["sop_instance_uids"][0]
UID_LIKE = re.compile(r"\d+(?:\.\d+){3,}")


def samples(text: str) -> dict[str, float]:
    return {key: float(value) for key, value in
            (line.rsplit(" ", 1) for line in text.splitlines() if line and not line.startswith("#"))}


def test_metrics_after_qido_metadata_and_frames(tmp_path):
    with DemoPacs(generate_demo_datasets(), ae_title="OBSPACS") as pacs:
        settings = settings_from_dict({
            "spool": {"path": str(tmp_path / "spool")},
            "nodes": [{"name": "obs", "ae_title": "OBSPACS", "host": "127.0.0.1", "port": pacs.port,
                       "retrieve": "get"}],
            "profiling": {"enabled": False}})   # the probe's DIMSE operations would be counted
        with running_gateway(settings) as url, httpx.Client(base_url=url, timeout=60) as client:
            study, series = CT["study_uid"], AXIAL["series_uid"]
            before = samples(client.get("/metrics").text)
            assert before['dwg_query_associations{node="obs",state="in_use"}'] == 0   # every node, from start
            assert not any(key.startswith("dwg_dimse_operations_total") for key in before)
            first = client.get("/dicom-web/studies", params={"StudyInstanceUID": study})
            assert first.status_code == 200 and len(first.json()) == 1
            cached = client.get("/dicom-web/studies", params={"StudyInstanceUID": study})
            assert cached.json() == first.json()
            base = f"/dicom-web/studies/{study}/series/{series}"
            assert client.get(base + "/metadata").status_code == 200
            assert client.get(base + "/metadata").status_code == 200
            frame = client.get(f"{base}/instances/{SOP}/frames/1",
                               headers={"Accept": 'multipart/related; type="application/octet-stream"'})
            assert frame.status_code == 200
            assert client.get(f"/dicom-web/studies/{study}/nothing-here").status_code == 404
            # The series' C-GET may still be finishing after the responses (viewers ask for the frames
            # next, docs/architecture.md "Retrieval"): its outcome is counted when it ends.
            deadline = time.monotonic() + 20
            while True:
                text = client.get("/metrics").text
                if 'operation="get",outcome=' in text or time.monotonic() > deadline:
                    break
                time.sleep(0.1)

    values = samples(text)
    # Existing values are still there, before the registry's.
    assert values['dwg_query_associations_opened_total{node="obs"}'] >= 1
    assert values["dwg_retrievals_total"] == 1
    # Per-route requests and latency histograms, by template.
    studies = 'route="/dicom-web/studies",method="GET",status="2xx"'
    assert values[f"dwg_http_requests_total{{{studies}}}"] == 2
    assert values[f'dwg_http_request_duration_seconds_bucket{{{studies},le="+Inf"}}'] == 2
    assert values[f"dwg_http_request_duration_seconds_count{{{studies}}}"] == 2
    assert f"dwg_http_request_duration_seconds_sum{{{studies}}}" in values
    metadata = 'route="/dicom-web/studies/{study}/series/{series}/metadata",method="GET",status="2xx"'
    assert values[f"dwg_http_request_duration_seconds_count{{{metadata}}}"] == 2
    frames = ('route="/dicom-web/studies/{study}/series/{series}/instances/{instance}/frames/{frames}",'
              'method="GET",status="2xx"')
    assert values[f"dwg_http_requests_total{{{frames}}}"] == 1
    assert values['dwg_http_requests_total{route="/metrics",method="GET",status="2xx"}'] >= 1
    assert values['dwg_http_requests_total{route="unmatched",method="GET",status="4xx"}'] == 1
    # No UID (nor anything like one) in any label or line.
    assert UID_ROOT not in text and not UID_LIKE.search(text), UID_LIKE.search(text)
    for uid in (study, series, SOP):
        assert uid not in text
    # DIMSE operations by node, operation and outcome, with latencies.
    assert values['dwg_dimse_operations_total{node="obs",operation="find",outcome="ok"}'] >= 1
    assert values['dwg_dimse_operations_total{node="obs",operation="get",outcome="ok"}'] >= 1
    get_count = values['dwg_dimse_operation_duration_seconds_count{node="obs",operation="get",outcome="ok"}']
    assert get_count == values['dwg_dimse_operations_total{node="obs",operation="get",outcome="ok"}']
    assert values['dwg_dimse_operation_duration_seconds_sum{node="obs",operation="get",outcome="ok"}'] > 0
    assert values['dwg_dimse_budget_wait_seconds_count{node="obs",budget="query"}'] >= 1
    assert values['dwg_dimse_budget_wait_seconds_count{node="obs",budget="transfer"}'] >= 1
    # Query association pool: nothing in use between requests; the idle one is kept for reuse.
    assert values['dwg_query_associations{node="obs",state="in_use"}'] == 0
    assert values['dwg_query_associations{node="obs",state="idle"}'] >= 0
    # Cache hits and misses.
    assert values['dwg_cache_lookups_total{cache="qido",result="hit"}'] >= 1
    assert values['dwg_cache_lookups_total{cache="qido",result="miss"}'] >= 1
    assert values['dwg_cache_lookups_total{cache="series_metadata",result="miss"}'] == 1
    assert values['dwg_cache_lookups_total{cache="series_metadata",result="hit"}'] == 1
    for kind in ("counter", "histogram", "gauge"):
        assert f" {kind}\n" in text
    assert "# TYPE dwg_http_request_duration_seconds histogram" in text


def test_serve_logs_json_lines_with_the_request_id(tmp_path):
    with DemoPacs(generate_demo_datasets(), ae_title="OBSLOG") as pacs:
        port = free_port()
        cfg = tmp_path / "gateway.yaml"
        cfg.write_text(yaml.safe_dump({
            "logging": {"format": "text"},
            "nodes": [{"name": "p", "ae_title": "OBSLOG", "host": "127.0.0.1", "port": pacs.port}]}))
        env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
        proc = subprocess.Popen([sys.executable, "-m", "gateway.cli", "serve", "--config", str(cfg), "--port",
                                 str(port), "--log-format", "json"],
                                env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            deadline = time.monotonic() + 30
            while True:
                try:
                    if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                assert proc.poll() is None and time.monotonic() < deadline, "serve did not start"
                time.sleep(0.1)
            r = httpx.get(f"http://127.0.0.1:{port}/dicom-web/studies", params={"PatientID": "DGW0001"},
                          headers={"X-Request-ID": "obs-test-1"}, timeout=30)
            assert r.status_code == 200
        finally:
            proc.send_signal(signal.SIGTERM)
            out, err = proc.communicate(timeout=20)
    lines = [line for line in err.splitlines() if line.strip()]
    entries = [json.loads(line) for line in lines]   # every line is one JSON object
    assert all({"time", "level", "logger", "message"} <= set(e) for e in entries)
    access = [e for e in entries if e["logger"] == "uvicorn.access" and "/dicom-web/studies" in e["message"]]
    assert access and access[0]["request_id"] == "obs-test-1"
    assert "DGW0001" not in err and "PatientID" not in err
    started = [e for e in entries if "startup complete" in e["message"]]
    assert started and "request_id" not in started[0], "start-up lines belong to no request"
