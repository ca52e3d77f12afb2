"""App factory and lifespan: builds the cache, the DIMSE client and the services from Settings."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Mount

from cache.base import Cache
from cache.memory import MemoryCache
from cache.spool import Spool
from gateway.auth import ApiKeyMiddleware
from gateway.cluster import start_cluster, stop_cluster
from gateway.dimse.pacs import PynetdicomPacs
from gateway.dimse.storage_scp import StorageScp
from gateway.errors import GatewayError
from gateway.http import error_response
from gateway.instances import InstanceReader
from gateway.retrieval import RetrievalService
from gateway.routes import admin, capabilities, qido, rendered, stow, wado
from gateway.search import SearchService
from gateway.settings import Settings
from gateway.startup import configure_process

log = logging.getLogger(__name__)

EXPOSED_HEADERS = ["Content-Type", "Content-Location", "Content-Length", "Warning"]


def make_cache(settings: Settings) -> Cache:
    if settings.cache.url:
        from cache.redis import RedisCache  # imports redis only when a URL is configured

        return RedisCache(settings.cache.url, prefix=settings.cache.prefix, timeout=settings.cache.timeout)
    return MemoryCache(max_entries=settings.cache.max_entries, prefix=settings.cache.prefix)


def create_app(settings: Settings, *, cache: Cache | None = None, ohif_dir: Path | None = None) -> Starlette:
    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        configure_process()   # pydicom validation, pynetdicom config (gateway/startup.py)
        app.state.settings = settings
        app.state.metrics = {"aborted_streams": 0}
        app.state.cache = cache or make_cache(settings)
        app.state.pacs = PynetdicomPacs(settings)
        app.state.search = SearchService(settings, app.state.pacs, app.state.cache)
        app.state.spool = Spool(settings.spool.path, settings.spool.max_bytes)
        app.state.instances = InstanceReader()
        app.state.spool.on_commit = app.state.instances.index_at_ingest
        scp = None
        if any(n.retrieve == "move" for n in settings.nodes):
            g = settings.gateway
            scp = StorageScp(g.ae_title, g.dimse_host, g.dimse_port,
                             reject_unexpected=settings.retrieval.reject_unexpected_stores)
            scp.start()
        app.state.storage_scp = scp
        # Replicas sharing Redis: series lease, arrivals stream, internal endpoint (gateway/cluster.py).
        try:
            cluster, internal = await start_cluster(settings, app.state.cache, app.state.spool, scp)
        except BaseException:
            if scp is not None:
                scp.stop()
            raise
        app.state.cluster = cluster
        app.state.retrieval = RetrievalService(settings, app.state.pacs, app.state.cache,
                                               app.state.spool, scp, cluster=cluster)
        try:
            yield
        finally:
            await app.state.retrieval.close()
            if scp is not None:
                scp.stop()
            await stop_cluster(cluster, internal)
            app.state.instances.close()
            app.state.spool.close()
            await app.state.pacs.close()
            await app.state.cache.close()

    async def gateway_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, GatewayError)
        return error_response(exc)

    async def unexpected(request: Request, exc: Exception) -> Response:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return JSONResponse({"error": "InternalError", "detail": "internal error", "node": None},
                            status_code=500)

    dicomweb = qido.routes() + wado.routes() + stow.routes()
    dicomweb += rendered.routes() + rendered.root_routes() + capabilities.routes()
    middleware = []
    if settings.http.cors_origins:
        middleware.append(Middleware(
            CORSMiddleware, allow_origins=list(settings.http.cors_origins),
            allow_methods=["GET", "POST", "OPTIONS"],
            allow_headers=["Authorization", "Accept", "Content-Type"],
            expose_headers=EXPOSED_HEADERS, allow_credentials="*" not in settings.http.cors_origins))
    if settings.auth.mode == "api_key":
        # Inside CORS, so 401s carry CORS headers and preflights never need a key.
        middleware.append(Middleware(ApiKeyMiddleware, keys=settings.auth.api_keys))
    routes = [*admin.routes(), *rendered.wado_uri_routes(), Mount("/dicom-web", routes=dicomweb),
              Mount("/nodes/{node}/dicom-web", routes=dicomweb)]
    if ohif_dir is not None:
        from gateway.ohif import ohif_routes

        routes += ohif_routes(ohif_dir)  # last: its Mount("/") catches every remaining path
    return Starlette(
        routes=routes,
        middleware=middleware,
        exception_handlers={GatewayError: gateway_error, Exception: unexpected},
        lifespan=lifespan,
    )
