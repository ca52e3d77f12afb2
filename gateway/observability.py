"""Operators' view of the gateway: Prometheus metrics and structured logs (docs/architecture.md, "App").

* :class:`Registry`: counters and histograms with labels, and gauges read when scraped, rendered in
  the Prometheus text exposition format 0.0.4 (``# HELP``, ``# TYPE``, ``_bucket{le=...}``, ``_sum``,
  ``_count``) by ``/metrics``. Thread-safe: DIMSE work records from worker threads. One registry per
  app (``create_app`` builds it), so every app, and every test, counts on its own.
* :class:`RequestMetrics`: ASGI middleware counting and timing every HTTP request by route
  *template* (``/dicom-web/studies/{study}/series/{series}/metadata``), method and status class.
  Labels never hold a path's UIDs or a query: their values are route templates, node names, fixed
  words and error class names only.
* :class:`JsonFormatter`, :class:`TextFormatter` and :class:`RequestIdFilter`: one JSON object (or
  one text line, ``[req=...]``) per log record, with the id of the request being served (the audit
  trail's ``X-Request-ID``, gateway/audit.py) when there is one. A log record carries what its
  message says and nothing else of the request: no query string, no header (the operational log
  never holds patient data, docs/architecture.md, "HTTP edge").
* :func:`masked_path`: a request path as the access log and the trace spans may show it.
"""

from __future__ import annotations

import bisect
import datetime as dt
import logging
import math
import re
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from contextvars import ContextVar
from typing import Any

import orjson
from starlette.routing import BaseRoute, Mount, Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

LATENCY_BUCKETS: tuple[float, ...] = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
                                      60.0)
"""Seconds: a cached QIDO answers in milliseconds, a C-GET of a large series takes tens of seconds."""

UNMATCHED_ROUTE = "unmatched"
"""The route label of a path no route matches (scanners' probes must not add label values)."""

INF_BOUND = 'le="+Inf"'
_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "OPTIONS", "PATCH"})

LabelValues = tuple[str, ...]
Samples = Iterable[tuple[Mapping[str, str], float]]


# ---------------------------------------------------------------------------------------- metrics


def _escape_label(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def format_value(value: float) -> str:
    """A sample value or bucket bound as the exposition format writes it (``+Inf``, ``1.0``, ``0.25``)."""
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if math.isnan(value):
        return "NaN"
    if float(value).is_integer():
        return f"{float(value):.1f}" if isinstance(value, float) else str(int(value))
    return repr(float(value))


def _labels(names: Sequence[str], values: Sequence[str], extra: str = "") -> str:
    parts = [f'{n}="{_escape_label(v)}"' for n, v in zip(names, values, strict=True)]
    if extra:
        parts.append(extra)
    return "{" + ",".join(parts) + "}" if parts else ""


def family_lines(name: str, kind: str, help_text: str, samples: Samples) -> list[str]:
    """``# HELP``, ``# TYPE`` and one line per (labels, value): for values kept outside a registry."""
    lines = [f"# HELP {name} {_escape_help(help_text)}", f"# TYPE {name} {kind}"]
    for labels, value in samples:
        lines.append(f"{name}{_labels(list(labels), list(labels.values()))} {format_value(value)}")
    return lines


class _Metric:
    kind = "untyped"

    def __init__(self, name: str, help_text: str, labelnames: Sequence[str]) -> None:
        self.name = name
        self.help = help_text
        self.labelnames = tuple(labelnames)
        self._lock = threading.Lock()

    def _key(self, labels: Mapping[str, str]) -> LabelValues:
        if set(labels) != set(self.labelnames):
            raise ValueError(f"{self.name}: labels {sorted(labels)} instead of {sorted(self.labelnames)}")
        return tuple(str(labels[n]) for n in self.labelnames)

    def samples(self) -> list[str]:
        raise NotImplementedError

    def render(self) -> list[str]:
        return [f"# HELP {self.name} {_escape_help(self.help)}", f"# TYPE {self.name} {self.kind}",
                *self.samples()]


class Counter(_Metric):
    kind = "counter"

    def __init__(self, name: str, help_text: str, labelnames: Sequence[str]) -> None:
        super().__init__(name, help_text, labelnames)
        self._values: dict[LabelValues, float] = {}

    def inc(self, amount: float = 1.0, **labels: str) -> None:
        if amount < 0:
            raise ValueError(f"{self.name}: a counter only goes up")
        key = self._key(labels)
        with self._lock:
            self._values[key] = self._values.get(key, 0) + amount

    def inc_values(self, values: LabelValues, amount: float = 1.0) -> None:
        """:meth:`inc` with the label values in ``labelnames`` order (a hot path: no keyword dict)."""
        if len(values) != len(self.labelnames) or amount < 0:
            raise ValueError(f"{self.name}: {len(values)} label values or a negative amount")
        with self._lock:
            self._values[values] = self._values.get(values, 0) + amount

    def value(self, **labels: str) -> float:
        key = self._key(labels)
        with self._lock:
            return self._values.get(key, 0)

    def samples(self) -> list[str]:
        with self._lock:
            values = sorted(self._values.items())
        return [f"{self.name}{_labels(self.labelnames, k)} {format_value(v)}" for k, v in values]


class _Series:
    __slots__ = ("buckets", "count", "sum")

    def __init__(self, size: int) -> None:
        self.buckets = [0] * size   # per bound, not cumulative; the +Inf bucket is ``count``
        self.sum = 0.0
        self.count = 0


class Histogram(_Metric):
    kind = "histogram"

    def __init__(self, name: str, help_text: str, labelnames: Sequence[str],
                 buckets: Sequence[float] = LATENCY_BUCKETS) -> None:
        if "le" in labelnames:
            raise ValueError(f"{name}: 'le' is reserved for bucket bounds")
        bounds = sorted(float(b) for b in buckets if not math.isinf(b))
        if not bounds or len(set(bounds)) != len(bounds):
            raise ValueError(f"{name}: bucket bounds must be distinct and at least one")
        super().__init__(name, help_text, labelnames)
        self.bounds = tuple(bounds)
        self._series: dict[LabelValues, _Series] = {}

    def observe(self, value: float, **labels: str) -> None:
        self.observe_values(value, self._key(labels))

    def observe_values(self, value: float, key: LabelValues) -> None:
        """:meth:`observe` with the label values in ``labelnames`` order (a hot path)."""
        if len(key) != len(self.labelnames):
            raise ValueError(f"{self.name}: {len(key)} label values instead of {len(self.labelnames)}")
        index = bisect.bisect_left(self.bounds, value)   # the first bound >= value: le semantics
        with self._lock:
            series = self._series.get(key)
            if series is None:
                series = self._series[key] = _Series(len(self.bounds))
            if index < len(self.bounds):
                series.buckets[index] += 1
            series.sum += value
            series.count += 1

    def snapshot(self, **labels: str) -> tuple[list[int], float, int]:
        """Cumulative bucket counts (one per bound, +Inf excluded), sum and count."""
        key = self._key(labels)
        with self._lock:
            series = self._series.get(key) or _Series(len(self.bounds))
            return _cumulative(series.buckets), series.sum, series.count

    def samples(self) -> list[str]:
        with self._lock:
            copied = sorted((k, (list(s.buckets), s.sum, s.count)) for k, s in self._series.items())
        lines: list[str] = []
        for key, (buckets, total, count) in copied:
            for bound, n in zip(self.bounds, _cumulative(buckets), strict=True):
                le = f'le="{format_value(bound)}"'
                lines.append(f"{self.name}_bucket{_labels(self.labelnames, key, le)} {n}")
            lines.append(f"{self.name}_bucket{_labels(self.labelnames, key, INF_BOUND)} {count}")
            lines.append(f"{self.name}_sum{_labels(self.labelnames, key)} {format_value(total)}")
            lines.append(f"{self.name}_count{_labels(self.labelnames, key)} {count}")
        return lines


def _cumulative(buckets: Sequence[int]) -> list[int]:
    out: list[int] = []
    running = 0
    for n in buckets:
        running += n
        out.append(running)
    return out


class CallbackGauge(_Metric):
    """A gauge whose samples are read when scraped (associations in use, idle ones...)."""

    kind = "gauge"

    def __init__(self, name: str, help_text: str, labelnames: Sequence[str],
                 collect: Callable[[], Iterable[tuple[LabelValues, float]]]) -> None:
        super().__init__(name, help_text, labelnames)
        self._collect = collect

    def samples(self) -> list[str]:
        return [f"{self.name}{_labels(self.labelnames, k)} {format_value(v)}" for k, v in self._collect()]


class Registry:
    """The metrics of one app, rendered in registration order."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._metrics: dict[str, _Metric] = {}

    def _register(self, metric: _Metric) -> _Metric:
        with self._lock:
            known = self._metrics.get(metric.name)
            if known is None:
                self._metrics[metric.name] = metric
                return metric
        if type(known) is not type(metric) or known.labelnames != metric.labelnames:
            raise ValueError(f"{metric.name} is already registered as another {known.kind}")
        return known

    def counter(self, name: str, help_text: str, labelnames: Sequence[str] = ()) -> Counter:
        metric = self._register(Counter(name, help_text, labelnames))
        assert isinstance(metric, Counter)
        return metric

    def histogram(self, name: str, help_text: str, labelnames: Sequence[str] = (),
                  buckets: Sequence[float] = LATENCY_BUCKETS) -> Histogram:
        metric = self._register(Histogram(name, help_text, labelnames, buckets))
        assert isinstance(metric, Histogram)
        return metric

    def gauge_callback(self, name: str, help_text: str, labelnames: Sequence[str],
                       collect: Callable[[], Iterable[tuple[LabelValues, float]]]) -> None:
        """Register (or replace) a gauge read from ``collect`` at every scrape."""
        with self._lock:
            self._metrics[name] = CallbackGauge(name, help_text, labelnames, collect)

    def render(self) -> str:
        """The exposition text, ending with a newline (empty when nothing is registered)."""
        with self._lock:
            metrics = list(self._metrics.values())
        lines: list[str] = []
        for metric in metrics:
            lines += metric.render()
        return "\n".join(lines) + "\n" if lines else ""


# ---------------------------------------------------------------------------------------- HTTP


def route_template(routes: Sequence[BaseRoute], path: str, prefix: str = "") -> str | None:
    """The template of the route that serves ``path`` (its Mounts' prefixes joined), or None.

    Matched the way Starlette's router matches, by path only (a 405 still has its route), so the
    label is the same whether the request was answered, refused before routing (401, 429) or failed.
    """
    for route in routes:
        if isinstance(route, Route):
            if route.path_regex.match(path):
                return prefix + route.path
        elif isinstance(route, Mount):
            matched = route.path_regex.match(path)
            if matched is None:
                continue
            inner = route.routes
            if not inner:                      # an app mounted whole (static files)
                return prefix + route.path + "/{path}"
            found = route_template(inner, "/" + matched.group("path"), prefix + route.path)
            if found is not None:
                return found
    return None


# Path segments a log line or a span may show: the API's own words, UIDs, frame lists, tag paths and
# node names. Anything else (a malformed path may carry any text a client typed) is masked.
_SAFE_SEGMENT = re.compile(r"[0-9.,]{1,130}|[0-9A-Fa-f.]{8,100}|[A-Za-z][A-Za-z0-9_.-]{0,63}")
_WORD = re.compile(r"[A-Za-z][A-Za-z0-9_.-]*")
_UID_LIKE = re.compile(r"[0-9]+(?:\.[0-9]+)+")
_API_WORDS = frozenset({"dicom-web", "nodes", "studies", "series", "instances", "metadata", "frames",
                        "rendered", "thumbnail", "bulkdata", "pixeldata", "wado", "healthz", "readyz",
                        "metrics", "openapi.json", "internal"})
_UID_PARENTS = frozenset({"studies", "series", "instances"})
MASK = "…"


def masked_path(path: str, *, uids: bool = True) -> str:
    """``path`` with every segment that is none of the API's words, UIDs, frame lists, tag paths or
    node names replaced by ``…``. ``uids=False`` masks the UIDs too (what follows ``studies``,
    ``series`` or ``instances``, and any dotted number): the trace spans leave every identifier out,
    while the access log keeps UIDs for an operator to trace a request."""
    segments = path.split("/")
    out = []
    for i, segment in enumerate(segments):
        before = segments[i - 1] if i > 0 else ""
        keep = segment == "" or (_SAFE_SEGMENT.fullmatch(segment) is not None and (
            not _WORD.fullmatch(segment) or segment in _API_WORDS or before == "nodes"))
        if keep and not uids and segment and (before in _UID_PARENTS or _UID_LIKE.fullmatch(segment)):
            keep = False
        out.append(segment if keep else MASK)
    return "/".join(out)


def status_class(status: int) -> str:
    return f"{status // 100}xx" if 100 <= status < 600 else "5xx"


REQUEST_STATE: ContextVar[dict[str, Any] | None] = ContextVar("gateway_request_state", default=None)
"""The ASGI ``scope["state"]`` of the request being served: the audit trail writes its
``request_id`` there (gateway/audit.py), after this middleware has set the variable."""


def current_request_id() -> str | None:
    return _state_str("request_id")


def current_trace_id() -> str | None:
    """The trace id of the request's span (gateway/tracing.py) when tracing is on and it is sampled."""
    return _state_str("trace_id")


def _state_str(key: str) -> str | None:
    state = REQUEST_STATE.get()
    value = state.get(key) if state is not None else None
    return value if isinstance(value, str) else None


class RequestMetrics:
    """ASGI middleware: ``dwg_http_requests_total`` and ``dwg_http_request_duration_seconds`` by
    route template, method and status class (the time until the last byte of the body was handed
    to the server), and the request's state in :data:`REQUEST_STATE` for the log records."""

    TEMPLATES_KEPT = 4096
    """Paths whose route template is remembered (then forgotten all at once): a repeated path (the
    same QIDO, the same study's frames) skips matching every route's regular expression again."""

    def __init__(self, app: ASGIApp, registry: Registry) -> None:
        self.app = app
        labels = ("route", "method", "status")
        self.requests = registry.counter("dwg_http_requests_total", "HTTP requests answered", labels)
        self.duration = registry.histogram(
            "dwg_http_request_duration_seconds", "HTTP request duration, until the body was sent", labels)
        self._templates: dict[str, str] = {}

    def _template(self, routes: Sequence[BaseRoute], path: str) -> str:
        found = self._templates.get(path)
        if found is None:
            found = route_template(routes, path) or UNMATCHED_ROUTE
            if len(self._templates) >= self.TEMPLATES_KEPT:
                self._templates.clear()
            self._templates[path] = found
        return found

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = str(scope["path"])
        app = scope.get("app")
        token = REQUEST_STATE.set(scope.setdefault("state", {}))
        started = time.perf_counter()
        status = 0

        async def sending(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:
            REQUEST_STATE.reset(token)
            elapsed = time.perf_counter() - started
            routes: Sequence[BaseRoute] = getattr(app, "routes", None) or []
            method = str(scope.get("method", "GET"))
            route = self._template(routes, path)
            method = method if method in _METHODS else "other"
            answered = status_class(status) if status else "5xx"   # raised before any response
            key = (route, method, answered)
            self.requests.inc_values(key)
            self.duration.observe_values(elapsed, key)


# ---------------------------------------------------------------------------------------- logs


class RequestIdFilter(logging.Filter):
    """Adds ``request_id`` and ``trace_id`` (None outside a request, or untraced) to every record its
    handler sees; on a handler, so records of every logger (uvicorn's access log, DIMSE worker
    threads) get them."""

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "request_id", None) is None:
            record.request_id = current_request_id()
        if getattr(record, "trace_id", None) is None:
            record.trace_id = current_trace_id()
        return True


TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s%(request_tag)s: %(message)s"


class TextFormatter(logging.Formatter):
    """``TEXT_FORMAT``: ``<time> <LEVEL> <logger> [req=<id>]: <message>``, the ``[req=...]`` part only
    while a request is served (its id was checked by the audit trail: no spaces, no newlines)."""

    def __init__(self) -> None:
        super().__init__(TEXT_FORMAT)

    def format(self, record: logging.LogRecord) -> str:
        request_id = getattr(record, "request_id", None)
        record.request_tag = f" [req={request_id}]" if isinstance(request_id, str) else ""
        return super().format(record)


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ``time`` (UTC, ISO 8601), ``level``, ``logger``, ``message``,
    ``request_id`` when known, ``trace_id`` when the request is traced, ``exception`` when the
    record has one. Nothing else of the record
    or the request is added (no ``extra`` fields, no query strings, no headers)."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": dt.datetime.fromtimestamp(record.created, dt.UTC).isoformat(timespec="milliseconds")
            .replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        request_id = getattr(record, "request_id", None)
        if isinstance(request_id, str):
            entry["request_id"] = request_id
        trace_id = getattr(record, "trace_id", None)
        if isinstance(trace_id, str):
            entry["trace_id"] = trace_id
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        elif record.exc_text:
            entry["exception"] = record.exc_text
        return orjson.dumps(entry, default=str).decode()
