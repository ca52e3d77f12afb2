"""gateway.observability: exposition format, histograms, thread safety, route templates, JSON logs."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import threading
from contextvars import ContextVar

import httpx
import pytest
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from gateway.app import create_app
from gateway.audit import AuditSink, AuditTrail
from gateway.dimse import pool as pool_module
from gateway.dimse.pool import AssociationPool
from gateway.dimse.threads import Workers
from gateway.errors import NodeUnreachable
from gateway.observability import (
    LATENCY_BUCKETS,
    REQUEST_STATE,
    UNMATCHED_ROUTE,
    JsonFormatter,
    Registry,
    RequestIdFilter,
    RequestMetrics,
    family_lines,
    route_template,
)
from gateway.settings import AuditSection, ConfigError, LoggingSection, PacsNode, settings_from_dict
from gateway.startup import configure_logging

STUDY = "1.2.826.0.1.3680043.10.1082.1.1"
SERIES = "1.2.826.0.1.3680043.10.1082.1.1.2"
SOP = "1.2.826.0.1.3680043.10.1082.1.1.2.3"


def samples(text: str) -> dict[str, str]:
    return dict(line.rsplit(" ", 1) for line in text.splitlines() if line and not line.startswith("#"))


# ---------------------------------------------------------------------------------------- exposition


def test_counter_exposition_has_help_type_and_escaped_labels():
    registry = Registry()
    c = registry.counter("dwg_things_total", "things\nseen", ("node", "kind"))
    c.inc(node="a", kind="x")
    c.inc(2, node="a", kind="x")
    c.inc(node='q"uote\\', kind="y")
    text = registry.render()
    lines = text.splitlines()
    assert lines[0] == "# HELP dwg_things_total things\\nseen"
    assert lines[1] == "# TYPE dwg_things_total counter"
    assert 'dwg_things_total{node="a",kind="x"} 3.0' in lines
    assert 'dwg_things_total{node="q\\"uote\\\\",kind="y"} 1.0' in lines
    assert text.endswith("\n")
    assert c.value(node="a", kind="x") == 3


def test_labels_must_be_exactly_the_declared_ones_and_names_are_unique():
    registry = Registry()
    c = registry.counter("dwg_x_total", "x", ("node",))
    with pytest.raises(ValueError):
        c.inc(other="a")
    with pytest.raises(ValueError):
        c.inc(-1, node="a")
    assert registry.counter("dwg_x_total", "x", ("node",)) is c
    with pytest.raises(ValueError):
        registry.histogram("dwg_x_total", "x", ("node",))
    with pytest.raises(ValueError):
        registry.histogram("dwg_h", "h", ("le",))
    assert Registry().render() == ""


def test_histogram_buckets_are_cumulative_with_inf_sum_and_count():
    registry = Registry()
    h = registry.histogram("dwg_latency_seconds", "latency", ("op",), buckets=(0.1, 1, 10))
    for value in (0.1, 0.05, 0.5, 5, 100):     # 0.1 is in le="0.1": the bound is inclusive
        h.observe(value, op="find")
    lines = registry.render().splitlines()
    assert lines[:2] == ["# HELP dwg_latency_seconds latency", "# TYPE dwg_latency_seconds histogram"]
    assert lines[2:] == [
        'dwg_latency_seconds_bucket{op="find",le="0.1"} 2',
        'dwg_latency_seconds_bucket{op="find",le="1.0"} 3',
        'dwg_latency_seconds_bucket{op="find",le="10.0"} 4',
        'dwg_latency_seconds_bucket{op="find",le="+Inf"} 5',
        'dwg_latency_seconds_sum{op="find"} 105.65',
        'dwg_latency_seconds_count{op="find"} 5',
    ]
    assert h.snapshot(op="find") == ([2, 3, 4], 105.65, 5)
    assert h.snapshot(op="none") == ([0, 0, 0], 0.0, 0)


def test_default_latency_buckets_span_milliseconds_to_a_minute():
    assert LATENCY_BUCKETS[0] == 0.005 and LATENCY_BUCKETS[-1] == 60
    assert list(LATENCY_BUCKETS) == sorted(set(LATENCY_BUCKETS))


def test_callback_gauges_and_family_lines():
    registry = Registry()
    registry.gauge_callback("dwg_pool", "pool", ("node", "state"), lambda: [(("a", "idle"), 2)])
    assert registry.render().splitlines() == ["# HELP dwg_pool pool", "# TYPE dwg_pool gauge",
                                              'dwg_pool{node="a",state="idle"} 2']
    assert family_lines("dwg_c_total", "counter", "c", [({"cache": "qido"}, 4)]) == [
        "# HELP dwg_c_total c", "# TYPE dwg_c_total counter", 'dwg_c_total{cache="qido"} 4']


def test_counters_and_histograms_are_thread_safe():
    registry = Registry()
    c = registry.counter("dwg_n_total", "n", ("t",))
    h = registry.histogram("dwg_d_seconds", "d", ("t",))
    per_thread, threads = 5000, 8

    def work(i: int) -> None:
        for _ in range(per_thread):
            c.inc(t=str(i % 2))
            h.observe(0.02, t="x")
            if _ % 1000 == 0:
                registry.render()

    pool = [threading.Thread(target=work, args=(i,)) for i in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    assert c.value(t="0") + c.value(t="1") == per_thread * threads
    buckets, total, count = h.snapshot(t="x")
    assert count == per_thread * threads and buckets[-1] == count
    assert total == pytest.approx(0.02 * count)


# ---------------------------------------------------------------------------------------- routes


@pytest.fixture(scope="module")
def app_routes(tmp_path_factory):
    ohif = tmp_path_factory.mktemp("ohif")
    (ohif / "index.html").write_text("<html></html>")
    return create_app(settings_from_dict({}), ohif_dir=ohif).routes


@pytest.mark.parametrize("path, template", [
    ("/dicom-web/studies", "/dicom-web/studies"),
    (f"/dicom-web/studies/{STUDY}", "/dicom-web/studies/{study}"),
    (f"/dicom-web/studies/{STUDY}/series", "/dicom-web/studies/{study}/series"),
    (f"/dicom-web/studies/{STUDY}/series/{SERIES}/metadata",
     "/dicom-web/studies/{study}/series/{series}/metadata"),
    (f"/dicom-web/studies/{STUDY}/series/{SERIES}/instances/{SOP}/frames/1,2,3",
     "/dicom-web/studies/{study}/series/{series}/instances/{instance}/frames/{frames}"),
    (f"/nodes/orthanc/dicom-web/studies/{STUDY}/series/{SERIES}/rendered",
     "/nodes/{node}/dicom-web/studies/{study}/series/{series}/rendered"),
    ("/nodes/orthanc/wado", "/nodes/{node}/wado"),
    ("/wado", "/wado"),
    ("/dicom-web/", "/dicom-web/"),
    ("/metrics", "/metrics"),
    ("/app-config.js", "/app-config.js"),
    ("/assets/app.0123.js", "/{path}"),
])
def test_route_templates_hold_no_uid(app_routes, path, template):
    found = route_template(app_routes, path)
    assert found == template
    assert "1.2.826" not in found and "orthanc" not in found


def test_paths_no_route_serves_are_unmatched():
    routes = create_app(settings_from_dict({})).routes
    assert route_template(routes, f"/{STUDY}/nothing") is None
    assert route_template(routes, "/dicom-web/studies/x/y/z/w/v") is None


def _metrics_app(registry: Registry, log: logging.Logger) -> Starlette:
    async def endpoint(request: Request) -> PlainTextResponse:
        log.info("serving %s", request.path_params["study"])
        return PlainTextResponse("ok", status_code=200 if request.path_params["study"] != "bad" else 404)

    sink = AuditSink(AuditSection(), "AE")   # no sink: the audit middleware only assigns request ids
    return Starlette(routes=[Route("/studies/{study}", endpoint, methods=["GET"])],
                     middleware=[Middleware(RequestMetrics, registry=registry),
                                 Middleware(AuditTrail, sink=sink, gateway_ae="AE")])


def test_middleware_counts_by_template_and_logs_carry_the_request_id():
    registry = Registry()
    log = logging.getLogger("gateway.test_observability")
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    handler.addFilter(RequestIdFilter())
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    async def requests() -> None:
        transport = httpx.ASGITransport(app=_metrics_app(registry, log))
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            ok = await client.get(f"/studies/{STUDY}?PatientID=DGW0001", headers={"X-Request-ID": "req-42"})
            assert ok.status_code == 200
            assert (await client.get("/studies/bad")).status_code == 404
            assert (await client.get(f"/other/{STUDY}")).status_code == 404
            assert (await client.post(f"/studies/{STUDY}")).status_code == 405

    try:
        asyncio.run(requests())
    finally:
        log.removeHandler(handler)
    text = registry.render()
    values = samples(text)
    assert values['dwg_http_requests_total{route="/studies/{study}",method="GET",status="2xx"}'] == "1.0"
    assert values['dwg_http_requests_total{route="/studies/{study}",method="GET",status="4xx"}'] == "1.0"
    assert values['dwg_http_requests_total{route="/studies/{study}",method="POST",status="4xx"}'] == "1.0"
    assert values[f'dwg_http_requests_total{{route="{UNMATCHED_ROUTE}",method="GET",status="4xx"}}'] == "1.0"
    assert ('dwg_http_request_duration_seconds_count{route="/studies/{study}",method="GET",status="2xx"}'
            in values)
    assert STUDY not in text and "DGW0001" not in text
    first = json.loads(stream.getvalue().splitlines()[0])
    assert first["request_id"] == "req-42" and first["logger"] == "gateway.test_observability"
    assert "DGW0001" not in stream.getvalue()
    assert REQUEST_STATE.get() is None


def test_repeated_paths_keep_their_template_and_the_remembered_paths_are_bounded(monkeypatch):
    registry = Registry()
    monkeypatch.setattr(RequestMetrics, "TEMPLATES_KEPT", 3)
    app = _metrics_app(registry, logging.getLogger("gateway.test_observability"))

    async def requests() -> None:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
            for n in range(5):   # more distinct paths than it remembers, each asked twice
                for _ in range(2):
                    assert (await client.get(f"/studies/1.2.{n}")).status_code == 200
                    assert (await client.get(f"/other/1.2.{n}")).status_code == 404

    asyncio.run(requests())
    values = samples(registry.render())
    assert values['dwg_http_requests_total{route="/studies/{study}",method="GET",status="2xx"}'] == "10.0"
    assert values[f'dwg_http_requests_total{{route="{UNMATCHED_ROUTE}",method="GET",status="4xx"}}'] == "10.0"
    metrics = app.middleware_stack
    while not isinstance(metrics, RequestMetrics):   # the built stack: find our middleware in it
        metrics = metrics.app
    assert 0 < len(metrics._templates) <= 3


def test_label_values_in_order_are_checked_like_keywords():
    registry = Registry()
    counter = registry.counter("dwg_t_total", "t", ("route", "method"))
    histogram = registry.histogram("dwg_t_seconds", "t", ("route", "method"))
    counter.inc_values(("/a", "GET"))
    histogram.observe_values(0.003, ("/a", "GET"))
    assert counter.value(route="/a", method="GET") == 1
    assert histogram.snapshot(route="/a", method="GET")[2] == 1
    with pytest.raises(ValueError):
        counter.inc_values(("/a",))
    with pytest.raises(ValueError):
        histogram.observe_values(0.003, ("/a", "GET", "2xx"))


# ---------------------------------------------------------------------------------------- logs


def _record(msg: str = "hello %s", args: tuple[object, ...] = ("world",), **extra: object) -> logging.LogRecord:
    record = logging.LogRecord("gateway.x", logging.WARNING, __file__, 1, msg, args, None)
    record.__dict__.update(extra)
    return record


def test_json_formatter_writes_the_known_fields_only():
    line = JsonFormatter().format(_record(query="PatientName=DOE", headers={"authorization": "k"}))
    entry = json.loads(line)
    assert set(entry) == {"time", "level", "logger", "message"}
    assert entry["level"] == "WARNING" and entry["logger"] == "gateway.x" and entry["message"] == "hello world"
    assert entry["time"].endswith("Z") and "T" in entry["time"]
    assert "\n" not in line


def test_json_formatter_adds_request_id_and_exception():
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        import sys

        record = logging.LogRecord("gateway.x", logging.ERROR, __file__, 1, "failed", (), sys.exc_info())
    token = REQUEST_STATE.set({"request_id": "abc"})
    try:
        RequestIdFilter().filter(record)
    finally:
        REQUEST_STATE.reset(token)
    entry = json.loads(JsonFormatter().format(record))
    assert entry["request_id"] == "abc"
    assert "RuntimeError: boom" in entry["exception"]
    outside = _record()
    RequestIdFilter().filter(outside)
    assert "request_id" not in json.loads(JsonFormatter().format(outside))


def test_configure_logging_installs_one_handler_in_the_chosen_format():
    root = logging.getLogger()
    saved_handlers, saved_level = list(root.handlers), root.level
    stream = io.StringIO()
    try:
        configure_logging(LoggingSection(format="json", level="warning"), stream)
        assert len(root.handlers) == 1 and root.level == logging.WARNING
        logging.getLogger("gateway.y").warning("hi %d", 1)
        logging.getLogger("gateway.y").info("not shown")
        configure_logging(LoggingSection(), stream)
        logging.getLogger("gateway.y").info("plain")
    finally:
        for h in list(root.handlers):
            root.removeHandler(h)
        for h in saved_handlers:
            root.addHandler(h)
        root.setLevel(saved_level)
    first, second = stream.getvalue().splitlines()
    assert json.loads(first)["message"] == "hi 1"
    assert second.endswith("INFO gateway.y: plain")


def test_logging_section_is_validated():
    s = settings_from_dict({"logging": {"format": "json", "level": "debug"}})
    assert s.logging == LoggingSection(format="json", level="debug")
    assert settings_from_dict({}).logging == LoggingSection(format="text", level="info")
    with pytest.raises(ConfigError, match="^logging.format:"):
        settings_from_dict({"logging": {"format": "xml"}})


# ---------------------------------------------------------------------------------------- DIMSE


def test_workers_count_and_time_operations_in_the_callers_context():
    registry = Registry()
    workers = Workers(2, registry)
    var: ContextVar[str] = ContextVar("var", default="unset")
    seen: list[str] = []

    def ok() -> int:
        seen.append(var.get())
        return 1

    def fails() -> int:
        raise NodeUnreachable("down", node="n")

    async def main() -> None:
        var.set("request")
        budget = asyncio.Semaphore(1)
        assert await workers.run(ok, budget=budget, cancel=threading.Event(), grace=1, node="n",
                                 operation="find") == 1
        with pytest.raises(NodeUnreachable):
            await workers.run(fails, budget=budget, cancel=threading.Event(), grace=1, node="n",
                              operation="get")
        cancelled = threading.Event()
        cancelled.set()
        await workers.run(ok, budget=budget, cancel=cancelled, grace=1, node="n", operation="move")
        await workers.run(ok, budget=budget, cancel=threading.Event(), grace=1)   # not measured

    try:
        asyncio.run(main())
    finally:
        workers.shutdown()
    assert seen == ["request"] * 3
    values = samples(registry.render())
    assert values['dwg_dimse_operations_total{node="n",operation="find",outcome="ok"}'] == "1.0"
    assert values['dwg_dimse_operations_total{node="n",operation="get",outcome="NodeUnreachable"}'] == "1.0"
    assert values['dwg_dimse_operations_total{node="n",operation="move",outcome="cancelled"}'] == "1.0"
    assert values['dwg_dimse_operation_duration_seconds_count{node="n",operation="find",outcome="ok"}'] == "1"
    assert values['dwg_dimse_budget_wait_seconds_count{node="n",budget="query"}'] == "1"
    assert values['dwg_dimse_budget_wait_seconds_count{node="n",budget="transfer"}'] == "2"


class _FakeAssociation:
    is_established = True


def test_pool_reports_in_use_and_idle(monkeypatch):
    monkeypatch.setattr(pool_module, "open_association", lambda *a: _FakeAssociation())
    monkeypatch.setattr(pool_module, "close_association", lambda assoc: None)
    pool = AssociationPool(PacsNode(name="n", ae_title="AE", host="127.0.0.1", port=104), "GW", [],
                           idle_seconds=60)
    first, _ = pool.acquire()
    second, _ = pool.acquire()
    assert (pool.in_use, pool.idle) == (2, 0)
    pool.release(first, reusable=True)
    assert (pool.in_use, pool.idle) == (1, 1)
    pool.release(second, reusable=False)
    again, reused = pool.acquire()
    assert reused and (pool.in_use, pool.idle) == (1, 0)
    pool.release(again, reusable=False)
    assert (pool.in_use, pool.idle, pool.opened) == (0, 0, 2)


# ---------------------------------------------------------------------------------------- tracing


def test_tracing_section_is_validated_and_off_by_default(tmp_path):
    from gateway.settings import TracingSection, load_settings

    assert settings_from_dict({}).tracing == TracingSection(enabled=False)
    s = settings_from_dict({"tracing": {"enabled": True, "endpoint": "https://otel.example:4318/v1/traces",
                                        "service_name": "dwg-a", "sample_ratio": 0.25,
                                        "headers_env": "OTLP_HEADERS", "timeout": 3}})
    assert s.tracing == TracingSection(True, "https://otel.example:4318/v1/traces", "dwg-a", 0.25,
                                       "OTLP_HEADERS", 3.0)
    for bad, key in [({"endpoint": "collector:4318"}, "tracing.endpoint"),
                     ({"sample_ratio": 1.5}, "tracing.sample_ratio"),
                     ({"sample_ratio": True}, "tracing.sample_ratio"),
                     ({"headers_env": "not a name"}, "tracing.headers_env"),
                     ({"enabled": "yes"}, "tracing.enabled"),
                     ({"exporter": "zipkin"}, "tracing.exporter")]:          # unknown keys are refused
        with pytest.raises(ConfigError, match=f"^{key}:"):
            settings_from_dict({"tracing": bad})
    cfg = tmp_path / "c.yaml"
    cfg.write_text("tracing: {enabled: true, headers_env: OTLP_HEADERS}\n")
    with pytest.raises(ConfigError, match="OTLP_HEADERS is not set"):
        load_settings(cfg, env={})
    with pytest.raises(ConfigError) as bad_headers:
        load_settings(cfg, env={"OTLP_HEADERS": "Bearer s3cret"})
    assert "s3cret" not in str(bad_headers.value)                 # a credential is never echoed
    env = {"OTLP_HEADERS": "Authorization=Bearer%20s3cret, X-Scope-OrgID=imaging,"}
    assert load_settings(cfg, env=env).tracing.headers(env) == {"authorization": "Bearer s3cret",
                                                                 "x-scope-orgid": "imaging"}


def _traced_app(tracing, log: logging.Logger, work) -> Starlette:
    from gateway.tracing import TracingMiddleware

    async def endpoint(request: Request) -> PlainTextResponse:
        log.info("serving")
        if request.path_params["study"] == "fail":
            return PlainTextResponse("down", status_code=503)
        await work()
        return PlainTextResponse("ok")

    sink = AuditSink(AuditSection(), "AE")
    return Starlette(routes=[Route("/dicom-web/studies/{study}/work", endpoint, methods=["GET"])],
                     middleware=[Middleware(TracingMiddleware, tracing=tracing),
                                 Middleware(RequestMetrics, registry=Registry()),
                                 Middleware(AuditTrail, sink=sink, gateway_ae="AE")])


def test_spans_of_requests_and_dimse_work_and_the_json_log_carries_the_trace_id():
    """A real SDK with an in-memory exporter: the server span (masked path, status, request id), a
    DIMSE span per operation begun on its worker thread under the request's span, an error span
    naming only the error's class, and the trace id in the JSON log lines of the request."""
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
    from opentelemetry.trace import SpanKind, StatusCode

    from gateway.settings import TracingSection
    from gateway.tracing import ACTIVE, Tracing, dimse_span

    exporter = InMemorySpanExporter()
    tracing = Tracing(TracingSection(enabled=True), {})
    tracing.start(exporter=exporter)
    workers = Workers(2, Registry())
    log = logging.getLogger("gateway.test_tracing_unit")
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    handler.addFilter(RequestIdFilter())
    log.addHandler(handler)
    log.setLevel(logging.INFO)

    def fails() -> int:
        raise NodeUnreachable(f"study {STUDY} on node n", node="n")

    async def main() -> None:
        assert dimse_span("n", "find") is None            # no traced request: the hook does nothing
        budget = asyncio.Semaphore(1)

        async def work() -> None:   # the route's DIMSE work, in the request
            assert ACTIVE.get() is tracing
            await workers.run(lambda: 1, budget=budget, cancel=threading.Event(), grace=1,
                              node="n", operation="find")
            with pytest.raises(NodeUnreachable):
                await workers.run(fails, budget=budget, cancel=threading.Event(), grace=1,
                                  node="n", operation="get")

        transport = httpx.ASGITransport(app=_traced_app(tracing, log, work))
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            ok = await client.get(f"/dicom-web/studies/{STUDY}/work?PatientID=DGW0001",
                                  headers={"X-Request-ID": "req-9"})
            assert ok.status_code == 200
            assert (await client.get("/dicom-web/studies/fail/work")).status_code == 503
        await tracing.close()

    try:
        asyncio.run(main())
    finally:
        workers.shutdown()
        log.removeHandler(handler)
    spans = exporter.get_finished_spans()
    (server,) = [s for s in spans if s.kind == SpanKind.SERVER and s.attributes["http.response.status_code"] == 200]
    (failed,) = [s for s in spans if s.kind == SpanKind.SERVER and s is not server]
    assert server.name == "GET /dicom-web/studies/{study}/work"   # the route's template
    assert server.attributes["url.path"] == "/dicom-web/studies/…/…"   # "work" is no API word
    assert server.attributes["gateway.request_id"] == "req-9"
    assert failed.status.status_code == StatusCode.ERROR and failed.attributes["error.type"] == "503"
    find, get = sorted((s for s in spans if s.kind == SpanKind.CLIENT), key=lambda s: s.name == "DIMSE C-GET")
    assert find.name == "DIMSE C-FIND" and get.name == "DIMSE C-GET"
    for child in (find, get):
        assert child.parent.span_id == server.context.span_id and child.context.trace_id == server.context.trace_id
    assert find.attributes["dimse.outcome"] == "ok" and find.status.status_code == StatusCode.UNSET
    assert get.attributes["error.type"] == "NodeUnreachable" and get.status.status_code == StatusCode.ERROR
    assert get.status.description is None and not get.events   # no message: it may name a UID
    exported = repr([(s.name, dict(s.attributes), s.status.description) for s in spans])
    assert STUDY not in exported and "DGW0001" not in exported
    line = json.loads(stream.getvalue().splitlines()[0])
    assert line["request_id"] == "req-9" and line["trace_id"] == format(server.context.trace_id, "032x")
    assert not tracing.started


def test_c_stores_arriving_for_a_traced_c_move_are_spans_under_its_span_on_both_router_paths():
    """The storage SCP's arrivals (ArrivalRouter.store: pynetdicom's engine; accept then write: the
    fast one) of a move issued in a traced request: a SERVER span each, child of the C-MOVE's span,
    with the status and outcome and no UID; a move issued untraced carries no trace at all."""
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
    from opentelemetry.trace import SpanKind, StatusCode

    from gateway.dimse.arrivals_routing import REFUSED_NOT_AUTHORISED, SUCCESS, ArrivalRouter
    from gateway.pacs import PendingMove
    from gateway.settings import TracingSection
    from gateway.tracing import ACTIVE, MOVE_ARRIVALS, Tracing, move_arrivals
    from tests.unit.test_arrivals_routing import Sink, arrival

    assert move_arrivals("n") is None                      # no traced request: nothing to carry
    exporter = InMemorySpanExporter()
    tracing = Tracing(TracingSection(enabled=True), {})
    tracing.start(exporter=exporter)
    router = ArrivalRouter()
    sink = Sink(fail=False)
    active = ACTIVE.set(tracing)
    try:
        trace = move_arrivals("n")
        assert trace is not None
        router.register(PendingMove(7, STUDY, SERIES, {SOP, SOP + "1", SOP + "2"}, sink, trace=trace))
        issuing = MOVE_ARRIVALS.set(trace)
        move = tracing.dimse("n", "move")
        MOVE_ARRIVALS.reset(issuing)
    finally:
        ACTIVE.reset(active)
    assert move is not None
    move.begin()                                           # on the worker thread, before the C-MOVE-RQ
    assert router.store(arrival(SOP, msg_id=7, study=STUDY, series=SERIES)) == SUCCESS
    assert router.store(arrival(SOP, msg_id=7, study=STUDY, series=SERIES)) == REFUSED_NOT_AUTHORISED
    status, write = router.accept(arrival(SOP + "1", msg_id=7, study=STUDY, series=SERIES))
    assert status == SUCCESS and write is not None
    write()
    sink.fail = True
    status, write = router.accept(arrival(SOP + "2", msg_id=7, study=STUDY, series=SERIES))
    assert status == SUCCESS and write is not None
    write()                                                # acknowledged, then the write failed
    move.end("ok", None)
    asyncio.run(tracing.close())

    spans = exporter.get_finished_spans()
    (c_move,) = [s for s in spans if s.name == "DIMSE C-MOVE"]
    stores = [s for s in spans if s.name == "DIMSE C-STORE"]
    assert len(stores) == 4 and len(spans) == 5
    for span in stores:
        assert span.kind == SpanKind.SERVER and span.parent.span_id == c_move.context.span_id
        assert span.context.trace_id == c_move.context.trace_id
        assert {k: span.attributes[k] for k in ("dimse.node", "dimse.operation", "dimse.command")} == {
            "dimse.node": "n", "dimse.operation": "store", "dimse.command": "C-STORE"}
    assert [(s.attributes["dimse.outcome"], s.attributes["dimse.status"], s.status.status_code) for s in stores] \
        == [("ok", 0, StatusCode.UNSET), ("refused", REFUSED_NOT_AUTHORISED, StatusCode.ERROR),
            ("ok", 0, StatusCode.UNSET), ("not_stored", 0, StatusCode.ERROR)]
    assert stores[3].attributes["error.type"] == "not_stored"
    exported = repr([(s.name, dict(s.attributes)) for s in spans])
    assert STUDY not in exported and SERIES not in exported and SOP not in exported
