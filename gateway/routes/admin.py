"""Health, readiness, metrics and PACS profiles (docs/architecture.md, "HTTP edge": /readyz fails only
when the process cannot serve; a cache outage is reported in its body, never a failure).

``/admin/nodes/{node}/profile`` (docs/architecture.md, "PACS profiles"): GET shows what the gateway
measured about the node's PACS and the behaviour it chose; POST probes it again in the background.
Authentication like every other route (the middleware); with it on, the node's ``search`` grant is
needed to read and ``search`` plus ``retrieve`` to probe (a probe retrieves one instance), and an
unknown node looks forbidden, as everywhere (:func:`gateway.http.target_nodes`). The profile holds
no patient data."""

from __future__ import annotations

import asyncio

from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse
from starlette.routing import Route

from gateway.errors import GatewayError
from gateway.http import target_nodes
from gateway.observability import Registry, family_lines
from gateway.profile import report
from gateway.profile.service import NodeProfiles


async def healthz(request: Request) -> JSONResponse:
    return JSONResponse({"status": "ok"})


async def readyz(request: Request) -> JSONResponse:
    state = request.app.state
    try:
        cache_ok = await asyncio.wait_for(state.cache.ping(), timeout=1.0)
    except TimeoutError:   # the cache answers its miss value on an outage; only slowness is left
        cache_ok = False
    body: dict[str, object] = {"status": "ready", "cache": "ok" if cache_ok else "unavailable"}
    if request.query_params.get("echo") in ("1", "true"):
        async def one(node: object) -> dict[str, object]:
            try:
                rtt = await state.pacs.echo(node)
                return {"ok": True, "rtt_ms": round(rtt * 1000, 1)}
            except GatewayError as exc:
                return {"ok": False, "error": type(exc).__name__, "detail": exc.detail}

        nodes = state.settings.nodes
        results = await asyncio.gather(*(one(n) for n in nodes))
        body["nodes"] = {n.name: r for n, r in zip(nodes, results, strict=True)}
    return JSONResponse(body)


async def metrics(request: Request) -> PlainTextResponse:
    """Prometheus text exposition of the gateway's counters and gauges, then the app's registry
    (HTTP routes, DIMSE operations, query associations; gateway/observability.py)."""
    state = request.app.state
    spool = state.spool
    scp = state.storage_scp
    values: list[tuple[str, str, str, float]] = [
        ("dwg_aborted_streams_total", "counter", "WADO streams aborted after headers were sent",
         state.metrics["aborted_streams"]),
        ("dwg_refused_requests_total", "counter", "requests refused with 429/503 (concurrency limits)",
         state.metrics["refused_requests"]),
        ("dwg_retrievals_total", "counter", "C-GET/C-MOVE series retrievals started",
         state.retrieval.retrievals_started),
        ("dwg_spool_bytes", "gauge", "bytes held in the local spool", spool.total_bytes),
        ("dwg_spool_evictions_total", "counter", "instances evicted from the spool", spool.evictions),
        ("dwg_unexpected_stores_total", "counter", "C-STOREs that matched no pending C-MOVE",
         scp.unexpected if scp is not None else 0),
        ("dwg_remote_stores_total", "counter", "C-STOREs received for another replica's C-MOVE",
         getattr(scp, "remote_stores", 0) if scp is not None else 0),
        ("dwg_incomplete_retrievals_total", "counter",
         "retrievals that ended with instances the PACS did not deliver", state.retrieval.incomplete),
        ("dwg_cache_failures_total", "counter", "cache operations that failed (served without cache)",
         getattr(state.cache, "failures", 0)),
        ("dwg_cache_pool_full_total", "counter",
         "cache operations served as a miss because every Redis connection was busy",
         getattr(state.cache, "pool_full", 0)),
    ]
    lines: list[str] = []
    for name, kind, help_text, value in values:
        lines += [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}", f"{name} {value}"]
    lines += ["# HELP dwg_query_associations_opened_total query associations opened per node "
              "(reuse shows as fewer than C-FINDs)", "# TYPE dwg_query_associations_opened_total counter"]
    for node in state.settings.nodes:
        opened = state.pacs.query_associations_opened(node)
        lines.append(f'dwg_query_associations_opened_total{{node="{node.name}"}} {opened}')
    finder = state.search.finder
    retrieval = state.retrieval
    lines += family_lines("dwg_cache_lookups_total", "counter",
                          "cache lookups by cache (qido: C-FIND results, series_metadata) and result", [
                              ({"cache": "qido", "result": "hit"}, finder.hits),
                              ({"cache": "qido", "result": "miss"}, finder.misses),
                              ({"cache": "series_metadata", "result": "hit"}, retrieval.metadata_hits),
                              ({"cache": "series_metadata", "result": "miss"}, retrieval.metadata_misses)])
    registry: Registry | None = getattr(state, "observability", None)
    text = "\n".join(lines) + "\n" + (registry.render() if registry is not None else "")
    return PlainTextResponse(text, media_type="text/plain; version=0.0.4")


def _profile_report(request: Request) -> dict[str, object]:
    profiles: NodeProfiles = request.app.state.profiles
    node = target_nodes(request, request.app.state.settings, "search")[0][0]
    resolution = profiles.resolution(node.name)
    assert resolution is not None   # target_nodes only answers configured nodes
    return report.as_json(node, profiles.state(node.name), profiles.error(node.name),
                          profiles.profile(node.name), resolution)


async def node_profile(request: Request) -> JSONResponse:
    return JSONResponse(_profile_report(request))


async def reprobe(request: Request) -> JSONResponse:
    """Starts a probe (or joins the running one) and answers at once: 202 with the profile as it was."""
    target_nodes(request, request.app.state.settings, "retrieve")   # a probe retrieves one instance
    body = _profile_report(request)
    profiles: NodeProfiles = request.app.state.profiles
    name = str(body["node"])
    if profiles.state(name) != "probing":
        task = asyncio.get_running_loop().create_task(profiles.reprobe(name))
        _BACKGROUND.add(task)
        task.add_done_callback(_BACKGROUND.discard)
        body["state"] = "probing"
    return JSONResponse(body, status_code=202)


_BACKGROUND: set[asyncio.Task[object]] = set()
"""Probes started by POST, referenced until they end (the loop keeps only weak references)."""


def routes() -> list[Route]:
    return [Route("/healthz", healthz, methods=["GET"]), Route("/readyz", readyz, methods=["GET"]),
            Route("/metrics", metrics, methods=["GET"]),
            Route("/admin/nodes/{node}/profile", node_profile, methods=["GET"]),
            Route("/admin/nodes/{node}/profile", reprobe, methods=["POST"])]
