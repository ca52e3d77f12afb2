"""The access log keeps what an operator needs (the API's words, UIDs, node names) and nothing a
client typed elsewhere: no query string, no free text in path segments. Trace spans mask the UIDs
too. Text log lines name the request they belong to (``[req=...]``)."""

import asyncio
import io
import logging
import re

import httpx
import pytest
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from gateway.audit import AuditSink, AuditTrail
from gateway.observability import (
    REQUEST_STATE,
    Registry,
    RequestIdFilter,
    RequestMetrics,
    TextFormatter,
    masked_path,
)
from gateway.settings import AuditSection, LoggingSection
from gateway.startup import NoQueryStrings, configure_logging


@pytest.mark.parametrize("path, shown", [
    ("/dicom-web/studies/1.2.3/series/4.5/instances/6.7/frames/1,2", "/dicom-web/studies/1.2.3/series/4.5/instances/6.7/frames/1,2"),
    ("/nodes/orthanc/dicom-web/studies", "/nodes/orthanc/dicom-web/studies"),
    ("/dicom-web/studies/DGW0001/metadata", "/dicom-web/studies/…/metadata"),
    ("/dicom-web/studies/Doe%5EJohn", "/dicom-web/studies/…"),
    ("/dicom-web/studies/1.2/series/3/instances/4/bulkdata/0040a730.0.0040a160",
     "/dicom-web/studies/1.2/series/3/instances/4/bulkdata/0040a730.0.0040a160"),
])
def test_paths_are_masked_outside_the_apis_vocabulary(path, shown):
    assert masked_path(path) == shown


@pytest.mark.parametrize("path, shown", [
    ("/dicom-web/studies/1.2.3/series/4.5/instances/6.7/frames/1,2", "/dicom-web/studies/…/series/…/instances/…/frames/1,2"),
    ("/nodes/orthanc/dicom-web/studies/1.2.3/metadata", "/nodes/orthanc/dicom-web/studies/…/metadata"),
    ("/dicom-web/studies/DGW0001/metadata", "/dicom-web/studies/…/metadata"),
    ("/dicom-web/studies/3/series", "/dicom-web/studies/…/series"),          # a UID of one component
    ("/wado/1.2.840.10008.1.2", "/wado/…"),                                  # a dotted number anywhere
    ("/dicom-web/studies", "/dicom-web/studies"),
])
def test_span_paths_mask_uids_too(path, shown):
    assert masked_path(path, uids=False) == shown


def test_query_strings_are_dropped_from_access_records():
    record = logging.LogRecord("uvicorn.access", logging.INFO, "", 0, '%s - "%s %s HTTP/%s" %d',
                               ("127.0.0.1:5", "GET", "/dicom-web/studies?PatientName=Doe*", "1.1", 200), None)
    assert NoQueryStrings().filter(record)
    assert record.getMessage() == '127.0.0.1:5 - "GET /dicom-web/studies?… HTTP/1.1" 200'


def _text_record(msg: str = "hello") -> logging.LogRecord:
    return logging.LogRecord("gateway.x", logging.INFO, __file__, 1, msg, (), None)


def test_text_lines_name_the_request_in_scope_only():
    token = REQUEST_STATE.set({"request_id": "req-7"})
    try:
        inside = _text_record()
        RequestIdFilter().filter(inside)
    finally:
        REQUEST_STATE.reset(token)
    outside = _text_record()
    RequestIdFilter().filter(outside)
    assert TextFormatter().format(inside).endswith(" INFO gateway.x [req=req-7]: hello")
    assert TextFormatter().format(outside).endswith(" INFO gateway.x: hello")


def test_text_log_of_a_served_request_carries_the_x_request_id():
    """configure_logging's text handler, a request through the audit trail (which takes the
    X-Request-ID) and the metrics middleware (which puts the request's state in scope)."""
    log = logging.getLogger("gateway.test_access_log")

    async def endpoint(request: Request) -> PlainTextResponse:
        log.info("serving")
        return PlainTextResponse("ok")

    app = Starlette(routes=[Route("/studies/{study}", endpoint)],
                    middleware=[Middleware(RequestMetrics, registry=Registry()),
                                Middleware(AuditTrail, sink=AuditSink(AuditSection(), "AE"), gateway_ae="AE")])
    root = logging.getLogger()
    saved_handlers, saved_level = list(root.handlers), root.level
    stream = io.StringIO()

    async def call() -> None:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
            assert (await client.get("/studies/1.2.3", headers={"X-Request-ID": "abc-123"})).status_code == 200
            assert (await client.get("/studies/1.2.4", headers={"X-Request-ID": "bad id\n"})).status_code == 200

    try:
        configure_logging(LoggingSection(format="text"), stream)
        asyncio.run(call())
        log.info("after")
    finally:
        for h in list(root.handlers):
            root.removeHandler(h)
        for h in saved_handlers:
            root.addHandler(h)
        root.setLevel(saved_level)
    lines = [line for line in stream.getvalue().splitlines() if "gateway.test_access_log" in line]
    assert lines[0].endswith("gateway.test_access_log [req=abc-123]: serving")
    # A malformed X-Request-ID is replaced by a made id (no space or newline reaches the line).
    assert re.search(r" \[req=[0-9a-f]{16}\]: serving$", lines[1]) and "bad id" not in lines[1]
    assert lines[2].endswith("gateway.test_access_log: after")
