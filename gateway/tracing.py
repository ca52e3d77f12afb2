"""Optional OpenTelemetry traces: a server span per HTTP request, a child span per DIMSE operation and,
under a C-MOVE's, a span per C-STORE it brought to the storage SCP; exported over OTLP/HTTP
(docs/architecture.md, "App").

Off by default (``tracing.enabled``). Off, :class:`TracingMiddleware` is not installed, nothing
imports OpenTelemetry (this module does so only in :meth:`Tracing.start`), the DIMSE hooks
(:func:`dimse_span`, called by ``gateway.dimse.threads.Workers.run``, and :func:`move_arrivals`,
called once per C-MOVE by the retrieval) read one context variable that is None, and a received
C-STORE costs the storage SCP one attribute read (``PendingMove.trace`` is None).

On, the app's :class:`Tracing` owns a private ``TracerProvider`` (never the process-global one: an
embedded gateway leaves its host's tracing alone, and every app, every test, exports on its own),
sampled ``ParentBased(TraceIdRatioBased(sample_ratio))`` so that a caller's W3C ``traceparent``
(continued as the parent) decides for its trace, and a batch processor exporting to the configured
collector. Spans leave the request on a background thread: a slow or absent collector never delays
a response (spans are dropped when its queue is full).

What a span carries is what the metrics' labels carry, never patient data (docs/architecture.md,
"HTTP edge"): route templates, node names, fixed words, counts, durations, class names. No query
string, no header, no exception message (they may quote a query), and no UID anywhere: ``url.path``
is masked like the access log and, unlike it, with the UIDs masked too
(:func:`gateway.observability.masked_path`).
"""

from __future__ import annotations

import asyncio
import contextvars
import importlib.metadata
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from starlette.routing import BaseRoute
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gateway.observability import masked_path, route_template
from gateway.pacs import FindResult, RetrieveOutcome, StoreResult
from gateway.settings import TracingSection

if TYPE_CHECKING:
    from opentelemetry.context import Context
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SpanExporter
    from opentelemetry.trace import Span, Tracer
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

INSTRUMENTATION = "dicomweb-gateway"

UNTRACED_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})
"""Probes and scrapes, every few seconds from every replica: noise in a trace store."""

DIMSE_COMMANDS = {"echo": "C-ECHO", "find": "C-FIND", "get": "C-GET", "move": "C-MOVE", "store": "C-STORE"}

_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "OPTIONS", "PATCH"})
_PROPAGATED = (b"traceparent", b"tracestate")

ACTIVE: contextvars.ContextVar[Tracing | None] = contextvars.ContextVar("gateway_tracing", default=None)
"""The app's :class:`Tracing` while one of its traced requests is served (set by the middleware);
DIMSE work started from the request, in tasks it created included, inherits it."""

MOVE_ARRIVALS: contextvars.ContextVar[MoveArrivals | None] = contextvars.ContextVar(
    "gateway_move_arrivals", default=None)
"""The :class:`MoveArrivals` of the C-MOVE about to be issued, set around ``Pacs.move`` by the
retrieval (gateway/retrieval/fetching.py): that C-MOVE's span, once begun, is their parent."""


def _version() -> str:
    try:
        return importlib.metadata.version("dicomweb-gateway")
    except importlib.metadata.PackageNotFoundError:
        return "0"


class Tracing:
    """The app's tracer: built by ``create_app`` when ``tracing.enabled``, started and shut down by
    its lifespan. Before :meth:`start` and after :meth:`close` requests are not traced."""

    def __init__(self, section: TracingSection, headers: Mapping[str, str]) -> None:
        self.section = section
        self._headers = dict(headers)
        self._provider: TracerProvider | None = None
        self._tracer: Tracer | None = None
        self._propagator: TraceContextTextMapPropagator | None = None

    @property
    def started(self) -> bool:
        return self._tracer is not None

    def start(self, exporter: SpanExporter | None = None) -> None:
        """Import the SDK and the exporter (only now: off, they are never loaded) and build the provider.
        ``exporter``: instead of OTLP/HTTP to the configured endpoint (tests)."""
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
        from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        s = self.section
        version = _version()
        # Resource.create adds the SDK's attributes and OTEL_RESOURCE_ATTRIBUTES (a pod's name, a
        # cluster's); the service name of the settings wins over OTEL_SERVICE_NAME.
        resource = Resource.create({"service.name": s.service_name, "service.version": version})
        provider = TracerProvider(resource=resource, sampler=ParentBased(TraceIdRatioBased(s.sample_ratio)))
        if exporter is None:
            exporter = OTLPSpanExporter(endpoint=s.endpoint, headers=self._headers, timeout=s.timeout)
        provider.add_span_processor(BatchSpanProcessor(exporter))
        self._provider = provider
        self._propagator = TraceContextTextMapPropagator()
        self._tracer = provider.get_tracer(INSTRUMENTATION, version)

    async def close(self) -> None:
        """Export what is queued (bounded by the export timeout) and stop the exporter's thread."""
        provider, self._provider, self._tracer = self._provider, None, None
        if provider is not None:
            timeout_ms = int(max(self.section.timeout, 1.0) * 1000)
            await asyncio.to_thread(provider.force_flush, timeout_ms)
            await asyncio.to_thread(provider.shutdown)

    # ------------------------------------------------------------------ spans

    def server_span(self, scope: Scope) -> Span | None:
        """The SERVER span of an HTTP request, child of its ``traceparent`` when it has one."""
        from opentelemetry.trace import SpanKind

        tracer, propagator = self._tracer, self._propagator
        if tracer is None or propagator is None:
            return None
        carrier = {name.decode("latin-1"): value.decode("latin-1")
                   for name, value in scope.get("headers", ()) if name in _PROPAGATED}
        parent = propagator.extract(carrier) if carrier else None
        method = str(scope.get("method", "GET"))
        method = method if method in _METHODS else "_OTHER"
        routes: Sequence[BaseRoute] = getattr(scope.get("app"), "routes", None) or []
        template = route_template(routes, str(scope["path"]))
        attributes: dict[str, Any] = {
            "http.request.method": method,
            "url.path": masked_path(str(scope["path"]), uids=False),
            "url.scheme": str(scope.get("scheme", "http")),
            "network.protocol.version": str(scope.get("http_version", "1.1")),
        }
        if template is not None:
            attributes["http.route"] = template
        # Semantic conventions: "{method} {route}", the method alone when no route matched.
        name = f"{method} {template}" if template is not None else method
        return tracer.start_span(name, context=parent, kind=SpanKind.SERVER, attributes=attributes)

    def dimse(self, node: str, operation: str) -> DimseSpan | None:
        """A DIMSE operation's span-to-be, its parent captured now, on the caller's (event loop's)
        context: the operation runs on a worker thread, where no span is current."""
        from opentelemetry import context as otel_context

        if self._tracer is None:
            return None
        arrivals = MOVE_ARRIVALS.get() if operation == "move" else None
        return DimseSpan(self._tracer, otel_context.get_current(), node, operation, arrivals)

    def arrivals(self, node: str) -> MoveArrivals | None:
        """The spans-to-be of a C-MOVE's sub-operations on ``node``, parented by the request's span
        (captured now, on the loop) until the C-MOVE's own span begins."""
        from opentelemetry import context as otel_context

        if self._tracer is None:
            return None
        return MoveArrivals(self._tracer, otel_context.get_current(), node)


class DimseSpan:
    """One DIMSE operation's CLIENT span, begun and ended on its worker thread by ``Workers.run``."""

    __slots__ = ("_arrivals", "_node", "_operation", "_parent", "_span", "_tracer", "budget_wait")

    def __init__(self, tracer: Tracer, parent: Context, node: str, operation: str,
                 arrivals: MoveArrivals | None = None) -> None:
        self._tracer = tracer
        self._parent = parent
        self._node = node
        self._operation = operation
        self._arrivals = arrivals   # a C-MOVE's: the spans of its sub-operations become its children
        self._span: Span | None = None
        self.budget_wait = 0.0   # seconds waited for the node's association budget (set before begin)

    def begin(self) -> None:
        from opentelemetry.trace import SpanKind, set_span_in_context

        command = DIMSE_COMMANDS.get(self._operation, self._operation)
        self._span = self._tracer.start_span(
            f"DIMSE {command}", context=self._parent, kind=SpanKind.CLIENT,
            attributes={"dimse.node": self._node, "dimse.operation": self._operation,
                        "dimse.command": command, "dimse.budget_wait_seconds": self.budget_wait})
        if self._arrivals is not None:
            # Before the C-MOVE-RQ is sent, so before any of its C-STOREs can arrive.
            self._arrivals.parent = set_span_in_context(self._span, self._parent)

    def end(self, outcome: str, result: object) -> None:
        """``outcome`` as the metrics label it (``ok``, ``cancelled`` or an error's class name) and
        the counts ``result`` carries, never its identifiers (UIDs, data sets)."""
        from opentelemetry.trace import Status, StatusCode

        span, self._span = self._span, None
        if span is None:
            return
        span.set_attribute("dimse.outcome", outcome)
        for key, value in _result_attributes(result).items():
            span.set_attribute(key, value)
        if outcome not in ("ok", "cancelled"):
            span.set_attribute("error.type", outcome)
            span.set_status(Status(StatusCode.ERROR))
        span.end()


class MoveArrivals:
    """The spans of the C-STOREs a traced C-MOVE's sub-operations arrive as at the gateway's storage
    SCP (``PendingMove.trace``): ``ArrivalRouter`` of either engine (gateway/dimse/arrivals_routing.py)
    begins one per C-STORE routed to the move and ends it once answered and spooled, on the
    association's thread. SERVER spans ``DIMSE C-STORE``, children of the C-MOVE's span, with the
    attributes of the other DIMSE spans (``dimse.node``: the node the move went to) and no UID."""

    __slots__ = ("_node", "_tracer", "parent")

    def __init__(self, tracer: Tracer, parent: Context, node: str) -> None:
        self._tracer = tracer
        self._node = node
        self.parent = parent

    def begin(self) -> ReceivedStoreSpan:
        from opentelemetry.trace import SpanKind

        return ReceivedStoreSpan(self._tracer.start_span(
            "DIMSE C-STORE", context=self.parent, kind=SpanKind.SERVER,
            attributes={"dimse.node": self._node, "dimse.operation": "store", "dimse.command": "C-STORE"}))


class ReceivedStoreSpan:
    """One received C-STORE's span (:class:`MoveArrivals`)."""

    __slots__ = ("_span",)

    def __init__(self, span: Span) -> None:
        self._span = span

    def end(self, status: int, stored: bool) -> None:
        """``dimse.status``: the C-STORE-RSP's status; ``dimse.outcome``: ``ok`` (spooled),
        ``refused`` (answered with a failure status) or ``not_stored`` (acknowledged, but the write
        after the answer failed: the retrieval brings it again)."""
        from opentelemetry.trace import Status, StatusCode

        outcome = "ok" if stored else "refused" if status else "not_stored"
        self._span.set_attribute("dimse.status", status)
        self._span.set_attribute("dimse.outcome", outcome)
        if outcome != "ok":
            self._span.set_attribute("error.type", outcome)
            self._span.set_status(Status(StatusCode.ERROR))
        self._span.end()


def _result_attributes(result: object) -> dict[str, int | bool]:
    if isinstance(result, FindResult):
        return {"dimse.results": len(result.datasets), "dimse.truncated": result.truncated}
    if isinstance(result, RetrieveOutcome):
        return {"dimse.completed": result.completed, "dimse.failed": result.failed,
                "dimse.warning": result.warning, "dimse.received": result.received,
                "dimse.cancelled": result.cancelled}
    if isinstance(result, list) and all(isinstance(r, StoreResult) for r in result):
        return {"dimse.instances": len(result), "dimse.confirmed": sum(1 for r in result if r.confirmed)}
    return {}


def dimse_span(node: str, operation: str) -> DimseSpan | None:
    """The hook of ``Workers.run``: a span for this operation when the request is traced, else None
    (tracing off: one context variable read)."""
    tracing = ACTIVE.get()
    return None if tracing is None else tracing.dimse(node, operation)


def move_arrivals(node: str) -> MoveArrivals | None:
    """The retrieval's hook, once per C-MOVE it issues: the trace of the move's arrivals when the
    request is traced, else None (tracing off: one context variable read)."""
    tracing = ACTIVE.get()
    return None if tracing is None else tracing.arrivals(node)


class TracingMiddleware:
    """ASGI middleware, the outermost: one SERVER span per HTTP request (not for ``UNTRACED_PATHS``),
    current while the request is served and ended when its body was sent, with the response status
    (an error for 5xx, as the semantic conventions have it for servers) and the request id of the
    audit trail (``gateway.request_id``), so a trace leads to the request's log lines and audit record."""

    def __init__(self, app: ASGIApp, tracing: Tracing) -> None:
        self.app = app
        self.tracing = tracing

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in UNTRACED_PATHS:
            await self.app(scope, receive, send)
            return
        span = self.tracing.server_span(scope)
        if span is None:
            await self.app(scope, receive, send)
            return
        from opentelemetry import context as otel_context
        from opentelemetry import trace

        state: dict[str, Any] = scope.setdefault("state", {})
        span_context = span.get_span_context()
        if span_context.trace_flags.sampled:
            state["trace_id"] = format(span_context.trace_id, "032x")   # JSON log lines carry it
        attached = otel_context.attach(trace.set_span_in_context(span))
        active = ACTIVE.set(self.tracing)
        status = 0
        error: str | None = None

        async def sending(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, sending)
        except BaseException as exc:
            error = type(exc).__name__   # the class only: a message may quote the request
            raise
        finally:
            ACTIVE.reset(active)
            otel_context.detach(attached)
            self._finish(span, status, error, state)

    @staticmethod
    def _finish(span: Span, status: int, error: str | None, state: Mapping[str, Any]) -> None:
        from opentelemetry.trace import Status, StatusCode

        if status:
            span.set_attribute("http.response.status_code", status)
        request_id = state.get("request_id")
        if isinstance(request_id, str):
            span.set_attribute("gateway.request_id", request_id)
        if error is not None or status >= 500 or not status:
            span.set_attribute("error.type", error or (str(status) if status else "no response"))
            span.set_status(Status(StatusCode.ERROR))
        span.end()
