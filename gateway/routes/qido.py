"""QIDO-RS routes (PS3.18 §10.6): parse -> SearchService.respond -> the DICOM JSON bytes it made."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from gateway.errors import BadRequest
from gateway.http import (
    ClientGone,
    dicomweb_base,
    negotiate_search,
    target_nodes,
    unless_client_leaves,
    with_warnings,
)
from gateway.search import SearchService
from translators import qido as q
from translators.media import DICOM_JSON


async def _search(request: Request, level: q.Level, *, relational: bool = False) -> Response:
    settings = request.app.state.settings
    service: SearchService = request.app.state.search
    negotiate_search(request)
    try:
        query = q.parse_query(level, request.query_params.multi_items(),
                              study_uid=request.path_params.get("study"),
                              series_uid=request.path_params.get("series"), relational=relational)
    except q.QueryError as exc:
        raise BadRequest(str(exc)) from None
    nodes, pinned = target_nodes(request, settings, "search")
    try:
        answer = await unless_client_leaves(
            request, service.respond(query, nodes, dicomweb_base(request, settings, pinned),
                                     use_cache="no-cache" not in request.headers.get("cache-control", "")))
    except ClientGone:
        return Response(status_code=499)
    if answer.body is None:
        return with_warnings(Response(status_code=204), answer.warnings)
    return with_warnings(Response(answer.body, media_type=DICOM_JSON), answer.warnings)


async def studies(request: Request) -> Response:
    return await _search(request, "study")


async def study_series(request: Request) -> Response:
    return await _search(request, "series")


async def series_instances(request: Request) -> Response:
    return await _search(request, "instance")


async def all_series(request: Request) -> Response:
    return await _search(request, "series", relational=True)


async def all_instances(request: Request) -> Response:
    return await _search(request, "instance", relational=True)


async def study_instances(request: Request) -> Response:
    return await _search(request, "instance", relational=True)


def routes() -> list[Route]:
    return [
        Route("/studies", studies, methods=["GET"]),
        Route("/studies/{study}/series", study_series, methods=["GET"]),
        Route("/studies/{study}/series/{series}/instances", series_instances, methods=["GET"]),
        Route("/studies/{study}/instances", study_instances, methods=["GET"]),
        Route("/series", all_series, methods=["GET"]),
        Route("/instances", all_instances, methods=["GET"]),
    ]
