"""App factory and lifespan: builds the cache, the DIMSE client and the services from Settings."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import replace
from pathlib import Path

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Mount

from cache.base import Cache
from cache.memory import MemoryCache
from cache.spool import Spool
from gateway.audit import AuditSink, AuditTrail
from gateway.auth import Authenticator
from gateway.cluster import cluster_enabled
from gateway.cluster.coordinator import ClusterCoordinator
from gateway.coalescing import CoalescingPacs
from gateway.dimse.pacs import PynetdicomPacs
from gateway.dimse.storage_scp import AnyStorageScp, storage_scp
from gateway.errors import GatewayError, InternalError, NotFound
from gateway.http import NODE_HEADER, error_response
from gateway.instances import InstanceReader
from gateway.observability import Registry, RequestMetrics
from gateway.oidc import TokenValidator
from gateway.profile.service import NodeProfiles, move_probe
from gateway.request_limits import RequestLimits
from gateway.retrieval.service import RetrievalService
from gateway.routes import admin, capabilities, openapi, qido, rendered, stow, wado
from gateway.routes.internal import InternalServer, advertised_url
from gateway.search import SearchService
from gateway.settings import Settings
from gateway.startup import configure_process
from gateway.stow.service import StowService
from gateway.tracing import Tracing, TracingMiddleware

log = logging.getLogger(__name__)

BACKGROUND_CONNECTIONS = 64   # Redis connections beyond one per concurrent request (make_cache)

EXPOSED_HEADERS = ["Content-Type", "Content-Location", "Content-Length", "Warning", NODE_HEADER,
                   "X-Request-ID"]


def make_cache(settings: Settings) -> Cache:
    if settings.cache.url:
        from cache.redis import RedisCache  # imports redis only when a URL is configured

        c = settings.cache
        # One connection per request the process may serve at once, and some for the replicas'
        # background work (leases, streams, detached commands of cancelled callers).
        return RedisCache(settings.cache.url, prefix=c.prefix, timeout=c.timeout, password=c.password(),
                          tls_ca_file=c.tls.ca_file, tls_cert_file=c.tls.cert_file,
                          tls_key_file=c.tls.key_file,
                          max_connections=settings.limits.max_requests_total + BACKGROUND_CONNECTIONS)
    return MemoryCache(max_entries=settings.cache.max_entries, prefix=settings.cache.prefix,
                       max_bytes=settings.cache.max_bytes)


async def _start_cluster(settings: Settings, cache: Cache, spool: Spool, scp: AnyStorageScp | None,
                         stack: AsyncExitStack, clustered: bool) -> ClusterCoordinator | None:
    """Replicas sharing Redis (``clustered``: gateway.cluster.cluster_enabled): the internal endpoint
    other replicas copy from, and the coordinator that shares retrievals (gateway/cluster/); None
    when this replica works alone."""
    if not clustered:
        return None
    secret, port = settings.cluster.shared_secret, settings.cluster.internal_port
    assert secret and port is not None
    server = InternalServer(spool, secret, settings.http.host, port)
    await server.start()
    stack.push_async_callback(server.stop)
    coordinator = ClusterCoordinator(cache, spool, secret, advertised_url(settings.http.host, server.port))
    stack.push_async_callback(coordinator.close)
    if scp is not None:
        scp.attach_cluster(asyncio.get_running_loop(), coordinator.moves.lookup)
    log.info("cluster: replica %s, internal endpoint %s", coordinator.replica_id, coordinator.url)
    return coordinator


def create_app(settings: Settings, *, cache: Cache | None = None, ohif_dir: Path | None = None) -> Starlette:
    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        # Every service is built here, once, and closed in reverse order (docs/architecture.md, "App").
        configure_process()   # pydicom validation, pynetdicom config (gateway/startup.py)
        async with AsyncExitStack() as stack:
            if tracing is not None:   # first in, last out: the spans of the services' shutdown export too
                tracing.start()
                stack.push_async_callback(tracing.close)
            app.state.settings = settings
            app.state.metrics = metrics
            app.state.observability = observability
            app.state.audit = audit_sink
            stack.callback(audit_sink.close)
            if validator is not None:
                stack.push_async_callback(validator.close)
            app.state.cache = cache or make_cache(settings)
            stack.push_async_callback(app.state.cache.close)
            clustered = cluster_enabled(settings, app.state.cache)
            # Every service gets the coalescing Pacs: identical concurrent C-FINDs cost the PACS one,
            # across replicas too when they form a cluster (gateway/coalescing.py).
            dimse = PynetdicomPacs(settings, observability)
            # PACS profiles (docs/architecture.md, "PACS profiles"): the services' Pacs reports each
            # contact, and the routes find the effective nodes in app.state.settings.
            profiles = NodeProfiles(settings, dimse, app.state.cache, registry=observability)
            app.state.profiles = profiles
            app.state.pacs = profiles.watching(CoalescingPacs(dimse, app.state.cache if clustered else None,
                                                              observability))
            stack.push_async_callback(app.state.pacs.close)
            stack.push_async_callback(profiles.close)
            profiles.on_change = lambda nodes: setattr(app.state, "settings", replace(settings, nodes=nodes))
            profiles.on_change(profiles.effective_nodes())
            app.state.search = SearchService(settings, app.state.pacs, app.state.cache)
            app.state.spool = Spool(settings.spool.path, settings.spool.max_bytes)
            app.state.search.spool = app.state.spool   # SOPClassUIDs a PACS leaves out ("PACS profiles")
            app.state.search.settled_node = profiles.settled   # a refused query model ("PACS profiles")
            stack.callback(app.state.spool.close)
            app.state.instances = InstanceReader()
            stack.callback(app.state.instances.close)
            app.state.stow = StowService(settings, app.state.pacs, app.state.cache, app.state.spool)
            app.state.spool.on_commit = app.state.instances.index_at_ingest
            scp = None
            if any(n.retrieve == "move" for n in settings.nodes) or (
                    settings.profiling.enabled and settings.profiling.probe_move):
                scp = storage_scp(settings)   # gateway.scp_engine decides which implementation
                scp.start()
                stack.callback(scp.stop)
                profiles.attach_move_destination(move_probe(scp, settings.gateway.ae_title, app.state.cache))
            app.state.storage_scp = scp
            coordinator = await _start_cluster(settings, app.state.cache, app.state.spool, scp, stack,
                                               clustered)
            app.state.cluster = coordinator
            app.state.retrieval = RetrievalService(settings, app.state.pacs, app.state.cache, app.state.spool,
                                                   app.state.instances, scp, coordinator)
            app.state.retrieval.settled_node = profiles.settled   # safe while unknown ("PACS profiles")
            stack.push_async_callback(app.state.retrieval.close)
            yield

    async def gateway_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, GatewayError)
        return error_response(exc)

    async def http_error(request: Request, exc: Exception) -> Response:
        # Starlette's own 404 (no route matched) and 405 (wrong method): the same JSON error body.
        assert isinstance(exc, HTTPException)
        error = NotFound("no such resource") if exc.status_code == 404 else GatewayError(str(exc.detail))
        error.status_code = exc.status_code
        return error_response(error)

    async def unexpected(request: Request, exc: Exception) -> Response:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return error_response(InternalError("internal error"))

    metrics = {"aborted_streams": 0, "refused_requests": 0}
    observability = Registry()   # /metrics: routes, DIMSE, associations (gateway/observability.py)
    audit_sink = AuditSink(settings.audit, settings.gateway.ae_title)
    validator = TokenValidator(settings.auth.oidc) if settings.auth.mode == "oidc" else None
    dicomweb = qido.routes() + wado.routes() + stow.routes()
    dicomweb += rendered.routes() + rendered.root_routes() + capabilities.routes()
    # OpenTelemetry only when enabled (gateway/tracing.py): off, the SDK is never imported.
    tracing = Tracing(settings.tracing, settings.tracing.headers()) if settings.tracing.enabled else None
    middleware = []
    if tracing is not None:   # outermost: the request's span covers everything the gateway does with it
        middleware.append(Middleware(TracingMiddleware, tracing=tracing))
    if settings.http.cors_origins:
        middleware.append(Middleware(
            CORSMiddleware, allow_origins=list(settings.http.cors_origins),
            allow_methods=["GET", "POST", "OPTIONS"],
            allow_headers=["Authorization", "Accept", "Content-Type"],
            expose_headers=EXPOSED_HEADERS, allow_credentials="*" not in settings.http.cors_origins))
    middleware.append(Middleware(RequestMetrics, registry=observability))  # every request, refused ones too
    # Inside CORS, so 429/503 and 401 carry CORS headers (a browser shows the reason, not a CORS error);
    # the audit trail outside authentication, so refused credentials are audited too.
    middleware.append(Middleware(AuditTrail, sink=audit_sink, gateway_ae=settings.gateway.ae_title,
                                 include_query=settings.audit.include_query))
    lim = settings.limits
    middleware.append(Middleware(RequestLimits, per_client=lim.max_requests_per_client,
                                 total=lim.max_requests_total, metrics=metrics,
                                 trusted_proxies=tuple(settings.http.trusted_proxies)))
    # Every request gets a principal (everyone when auth.mode is none); preflights never need one.
    middleware.append(Middleware(Authenticator, auth=settings.auth, validator=validator))
    routes = [*admin.routes(), *rendered.wado_uri_routes(), Mount("/dicom-web", routes=dicomweb),
              *openapi.routes(),
              Mount("/nodes/{node}/dicom-web", routes=dicomweb)]
    if ohif_dir is not None:
        from gateway.ohif import ohif_routes

        routes += ohif_routes(ohif_dir)  # last: its Mount("/") catches every remaining path
    return Starlette(
        routes=routes,
        middleware=middleware,
        exception_handlers={GatewayError: gateway_error, HTTPException: http_error, Exception: unexpected},
        lifespan=lifespan,
    )
