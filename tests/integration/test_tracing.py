"""OpenTelemetry traces (gateway/tracing.py) exported to a real OTLP/HTTP receiver served here,
decoded with the protobuf classes of opentelemetry-proto (what the exporter itself encodes with):

* a QIDO and a WADO against a real PACS (the in-process pynetdicom Q/R SCP) each give a SERVER span
  with a DIMSE child span (C-FIND, C-GET) of the same trace, on the worker thread;
* a WADO on a ``retrieve: move`` node: the C-MOVE's span has a SERVER span ``DIMSE C-STORE`` per
  instance the PACS sent to the gateway's storage SCP (whichever ``scp_engine`` the run uses,
  ``GATEWAY_GATEWAY__DIMSE_ENGINE``), children of the C-MOVE's span;
* an incoming W3C ``traceparent`` is continued (its trace id, its span as the parent), an unsampled
  one is not exported;
* no patient data anywhere in what was exported: the names, IDs and UIDs of the test data (sent in
  the query and the path) do not appear in the serialized payloads;
* tracing off: nothing is exported and no OpenTelemetry module is even imported (a subprocess).
"""

from __future__ import annotations

import json
import secrets
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.trace.v1.trace_pb2 import Span, Status

from gateway.demo_data import DEMO_STUDIES, generate_demo_datasets
from gateway.dimse.demo_pacs import DemoPacs
from gateway.settings import settings_from_dict
from tests.support.multipart import parse_multipart
from tests.support.server import free_port, running_gateway

ROOT = Path(__file__).resolve().parents[2]
CT = next(s for s in DEMO_STUDIES if s["accession_number"] == "A2303140011")
AXIAL = CT["series"][1]


@dataclass
class Receiver:
    """An OTLP/HTTP traces endpoint (POST /v1/traces, application/x-protobuf) on a loopback port."""

    url: str
    bodies: list[bytes] = field(default_factory=list)
    headers: list[dict[str, str]] = field(default_factory=list)

    def spans(self) -> list[Span]:
        out: list[Span] = []
        for body in self.bodies:
            request = ExportTraceServiceRequest()
            request.ParseFromString(body)
            for resource_spans in request.resource_spans:
                for scope_spans in resource_spans.scope_spans:
                    out.extend(scope_spans.spans)
        return out

    def service_names(self) -> set[str]:
        names = set()
        for body in self.bodies:
            request = ExportTraceServiceRequest()
            request.ParseFromString(body)
            for resource_spans in request.resource_spans:
                names |= {a.value.string_value for a in resource_spans.resource.attributes
                          if a.key == "service.name"}
        return names


@contextmanager
def otlp_receiver() -> Iterator[Receiver]:
    received = Receiver(url="")
    lock = threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 - http.server's naming
            body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
            ok = self.path == "/v1/traces" and self.headers.get("Content-Type") == "application/x-protobuf"
            if ok:
                with lock:
                    received.bodies.append(body)
                    received.headers.append({k.lower(): v for k, v in self.headers.items()})
            answer = ExportTraceServiceResponse().SerializeToString()
            self.send_response(200 if ok else 400)
            self.send_header("Content-Type", "application/x-protobuf")
            self.send_header("Content-Length", str(len(answer)))
            self.end_headers()
            self.wfile.write(answer)

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - http.server's signature
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    received.url = f"http://127.0.0.1:{server.server_address[1]}/v1/traces"
    thread = threading.Thread(target=server.serve_forever, name="otlp-receiver", daemon=True)
    thread.start()
    try:
        yield received
    finally:
        server.shutdown()
        server.server_close()


def attrs(span: Span) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for a in span.attributes:
        kind = a.value.WhichOneof("value")
        out[a.key] = getattr(a.value, kind) if kind else None
    return out


def settings_for(port: int, tmp_path: Path, tracing: dict[str, Any]) -> Any:
    return settings_from_dict({
        "spool": {"path": str(tmp_path / "spool")},
        "nodes": [{"name": "trc", "ae_title": "TRCPACS", "host": "127.0.0.1", "port": port, "retrieve": "get"}],
        "tracing": tracing})


def wait_for_get(client: httpx.Client) -> None:
    """The series' C-GET may still run after the response (docs/architecture.md, "Retrieval")."""
    deadline = time.monotonic() + 30
    while 'operation="get",outcome=' not in client.get("/metrics").text:
        assert time.monotonic() < deadline, "the C-GET did not end"
        time.sleep(0.1)


def test_qido_and_wado_export_server_spans_with_dimse_children_and_no_patient_data(tmp_path, monkeypatch):
    monkeypatch.setenv("DWG_TEST_OTLP_HEADERS", "authorization=Bearer%20t0ken,x-scope-orgid=imaging")
    trace_id, parent_id = secrets.token_hex(16), secrets.token_hex(8)
    unsampled_trace = secrets.token_hex(16)
    study, series = CT["study_uid"], AXIAL["series_uid"]
    with otlp_receiver() as receiver, DemoPacs(generate_demo_datasets(), ae_title="TRCPACS") as pacs:
        settings = settings_for(pacs.port, tmp_path, {
            "enabled": True, "endpoint": receiver.url, "service_name": "dwg-test",
            "headers_env": "DWG_TEST_OTLP_HEADERS"})
        with running_gateway(settings) as url, httpx.Client(base_url=url, timeout=60) as client:
            qido = client.get("/dicom-web/studies", params={"PatientID": CT["patient_id"]},
                              headers={"traceparent": f"00-{trace_id}-{parent_id}-01"})
            assert qido.status_code == 200 and qido.json()[0]["0020000D"]["Value"] == [study]
            metadata = client.get(f"/dicom-web/studies/{study}/series/{series}/metadata")
            assert metadata.status_code == 200 and len(metadata.json()) == AXIAL["num_instances"]
            unsampled = client.get("/dicom-web/studies", params={"StudyInstanceUID": study},
                                   headers={"traceparent": f"00-{unsampled_trace}-{parent_id}-00",
                                            "Cache-Control": "no-cache"})
            assert unsampled.status_code == 200
            assert client.get("/healthz").status_code == 200
            wait_for_get(client)
        # The gateway has stopped: its lifespan flushed the batch processor.

    spans = receiver.spans()
    assert receiver.service_names() == {"dwg-test"}
    assert {h.get("authorization") for h in receiver.headers} == {"Bearer t0ken"}   # headers_env
    assert {h.get("x-scope-orgid") for h in receiver.headers} == {"imaging"}
    server = [s for s in spans if s.kind == Span.SPAN_KIND_SERVER]
    assert all(s.trace_id.hex() != unsampled_trace for s in spans), "an unsampled traceparent was exported"
    assert not any(attrs(s).get("url.path") == "/healthz" for s in server), "probes are not traced"

    # QIDO: the caller's trace continued, the C-FIND a child on the same trace.
    (search,) = [s for s in server if s.trace_id.hex() == trace_id]
    assert search.parent_span_id.hex() == parent_id
    assert search.name == "GET /dicom-web/studies"
    a = attrs(search)
    assert a["http.route"] == "/dicom-web/studies" and a["http.request.method"] == "GET"
    assert a["http.response.status_code"] == 200 and a["url.path"] == "/dicom-web/studies"
    assert a["gateway.request_id"] == qido.headers["X-Request-ID"]   # the audit record's id
    assert search.status.code != Status.STATUS_CODE_ERROR
    finds = [s for s in spans if s.parent_span_id == search.span_id]
    assert finds and all(s.trace_id == search.trace_id for s in finds)
    for find in finds:
        assert find.name == "DIMSE C-FIND" and find.kind == Span.SPAN_KIND_CLIENT
        fa = attrs(find)
        assert fa["dimse.node"] == "trc" and fa["dimse.operation"] == "find" and fa["dimse.outcome"] == "ok"
        assert fa["dimse.truncated"] is False and fa["dimse.budget_wait_seconds"] >= 0
        assert search.start_time_unix_nano <= find.start_time_unix_nano <= find.end_time_unix_nano
        assert find.end_time_unix_nano <= search.end_time_unix_nano
    assert attrs(finds[0])["dimse.results"] == len(qido.json())   # the studies C-FIND, then emulation

    # WADO (series metadata): a new trace, whose C-GET is a child of the request's span.
    (wado,) = [s for s in server if attrs(s).get("http.route", "").endswith("/series/{series}/metadata")]
    assert wado.name == "GET /dicom-web/studies/{study}/series/{series}/metadata"
    assert not wado.parent_span_id and wado.trace_id.hex() != trace_id
    assert attrs(wado)["url.path"] == "/dicom-web/studies/…/series/…/metadata"
    gets = [s for s in spans if s.name == "DIMSE C-GET"]
    assert len(gets) == 1 and gets[0].parent_span_id == wado.span_id and gets[0].trace_id == wado.trace_id
    ga = attrs(gets[0])
    assert ga["dimse.outcome"] == "ok" and ga["dimse.operation"] == "get"
    assert ga["dimse.completed"] == AXIAL["num_instances"] and ga["dimse.failed"] == 0

    # No patient data in any exported byte: names, IDs and every UID of the study that was asked for.
    payload = b"".join(receiver.bodies)
    name_parts = [p for p in str(CT["patient_name"]).replace("^", " ").split() if len(p) > 2]
    secrets_ = [CT["patient_name"], CT["patient_id"], *name_parts, study,
                *(s["series_uid"] for s in CT["series"]),
                *(uid for s in CT["series"] for uid in s["sop_instance_uids"])]
    leaked = [s for s in secrets_ if s.encode() in payload or s.lower().encode() in payload.lower()]
    assert not leaked, f"patient data in the exported spans: {leaked}"


OFF_SCRIPT = textwrap.dedent("""
    import json, sys
    import httpx
    from gateway.demo_data import DEMO_STUDIES, generate_demo_datasets
    from gateway.dimse.demo_pacs import DemoPacs
    from gateway.settings import settings_from_dict
    from tests.support.server import running_gateway

    study = DEMO_STUDIES[0]["study_uid"]
    with DemoPacs(generate_demo_datasets(), ae_title="OFFPACS") as pacs:
        settings = settings_from_dict({
            "spool": {"path": sys.argv[2]},
            "nodes": [{"name": "off", "ae_title": "OFFPACS", "host": "127.0.0.1", "port": pacs.port}],
            "tracing": {"enabled": False, "endpoint": sys.argv[1]}})
        with running_gateway(settings) as url:
            answer = httpx.get(url + "/dicom-web/studies", params={"StudyInstanceUID": study},
                               headers={"traceparent": "00-" + "1" * 32 + "-" + "2" * 16 + "-01"}, timeout=60)
            status = answer.status_code
    print(json.dumps({"status": status, "otel": sorted(m for m in sys.modules if m.startswith("opentelemetry"))}))
""")


def test_a_c_move_retrieve_traces_each_c_store_arriving_at_the_storage_scp(tmp_path):
    study, series = CT["study_uid"], AXIAL["series_uid"]
    scp_port = free_port()
    with otlp_receiver() as receiver, DemoPacs(generate_demo_datasets(), ae_title="TRCMOVE",
                                               move_destinations={"DICOMWEBGW": ("127.0.0.1", scp_port)}) as pacs:
        settings = settings_from_dict({
            "gateway": {"ae_title": "DICOMWEBGW", "dimse_host": "127.0.0.1", "dimse_port": scp_port},
            "spool": {"path": str(tmp_path / "spool")},
            "nodes": [{"name": "mv", "ae_title": "TRCMOVE", "host": "127.0.0.1", "port": pacs.port,
                       "retrieve": "move"}],
            "profiling": {"enabled": False},   # its probe's C-MOVE would be no request's, but arrive too
            "tracing": {"enabled": True, "endpoint": receiver.url}})
        with running_gateway(settings) as url, httpx.Client(base_url=url, timeout=60) as client:
            answer = client.get(f"/dicom-web/studies/{study}/series/{series}",
                                headers={"Accept": 'multipart/related; type="application/dicom"'})
            assert answer.status_code == 200
            assert len(parse_multipart(answer.content, answer.headers["content-type"])) == AXIAL["num_instances"]
            deadline = time.monotonic() + 30
            while 'operation="move",outcome=' not in client.get("/metrics").text:
                assert time.monotonic() < deadline, "the C-MOVE did not end"
                time.sleep(0.1)
    assert pacs.counters["move"] >= 1

    spans = receiver.spans()
    (wado,) = [s for s in spans if s.kind == Span.SPAN_KIND_SERVER and s.name.startswith("GET ")]
    assert wado.name == "GET /dicom-web/studies/{study}/series/{series}"
    moves = [s for s in spans if s.name == "DIMSE C-MOVE"]
    assert moves and all(m.parent_span_id == wado.span_id and m.kind == Span.SPAN_KIND_CLIENT for m in moves)
    stores = [s for s in spans if s.name == "DIMSE C-STORE"]
    assert len(stores) == AXIAL["num_instances"], "one span per instance the PACS sent"
    for store in stores:
        assert store.kind == Span.SPAN_KIND_SERVER and store.trace_id == wado.trace_id
        assert store.parent_span_id in {m.span_id for m in moves}, "a child of its C-MOVE's span"
        a = attrs(store)
        assert (a["dimse.node"], a["dimse.operation"], a["dimse.command"]) == ("mv", "store", "C-STORE")
        assert a["dimse.outcome"] == "ok" and a["dimse.status"] == 0
        assert store.status.code != Status.STATUS_CODE_ERROR
        parent = next(m for m in moves if m.span_id == store.parent_span_id)
        assert parent.start_time_unix_nano <= store.start_time_unix_nano <= store.end_time_unix_nano
    assert sum(attrs(m)["dimse.completed"] for m in moves) == AXIAL["num_instances"]   # the PACS agrees
    payload = b"".join(receiver.bodies)
    leaked = [u for u in (study, series, *AXIAL["sop_instance_uids"]) if u.encode() in payload]
    assert not leaked, f"UIDs in the exported spans: {leaked}"


def test_tracing_off_exports_nothing_and_imports_no_opentelemetry(tmp_path):
    with otlp_receiver() as receiver:
        done = subprocess.run([sys.executable, "-c", OFF_SCRIPT, receiver.url, str(tmp_path / "spool")],
                              cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr[-3000:]
        result = json.loads(done.stdout.strip().splitlines()[-1])
        time.sleep(0.5)
    assert result["status"] == 200
    assert result["otel"] == [], "tracing is off, yet OpenTelemetry was imported"
    assert receiver.bodies == []


@pytest.mark.parametrize("ratio", [0.0])
def test_sample_ratio_zero_exports_no_new_trace_but_continues_a_sampled_caller(tmp_path, ratio):
    trace_id, parent_id = secrets.token_hex(16), secrets.token_hex(8)
    with otlp_receiver() as receiver, DemoPacs(generate_demo_datasets(), ae_title="TRCPACS") as pacs:
        settings = settings_for(pacs.port, tmp_path, {"enabled": True, "endpoint": receiver.url,
                                                      "sample_ratio": ratio})
        with running_gateway(settings) as url, httpx.Client(base_url=url, timeout=60) as client:
            params = {"StudyInstanceUID": CT["study_uid"]}
            assert client.get("/dicom-web/studies", params=params).status_code == 200
            continued = client.get("/dicom-web/studies", params=params,
                                   headers={"traceparent": f"00-{trace_id}-{parent_id}-01",
                                            "Cache-Control": "no-cache"})
            assert continued.status_code == 200
    spans = receiver.spans()
    assert spans, "the sampled caller's trace was not exported"
    assert {s.trace_id.hex() for s in spans} == {trace_id}
    assert {s.name for s in spans} == {"GET /dicom-web/studies", "DIMSE C-FIND"}
