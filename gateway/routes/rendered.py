"""Rendered and thumbnail resources (PS3.18 §10.4.1.1.3, §10.4.3.3.4) and WADO-URI (PS3.18 ch. 9).

Pixels come from the spooled instance (retrieved as for frames); rendering is
``translators.rendered`` in a worker thread. Thumbnails never carry burned-in text.
"""

from __future__ import annotations

from typing import Any

from pydicom.pixels.utils import pixel_array
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from cache.spool import SpoolEntry
from gateway.errors import BadRequest, NotAcceptable, NotFound
from gateway.http import NODE_HEADER, parse_frame_list, path_uids, target_nodes
from gateway.instances import InstanceReader
from gateway.retrieval.service import RetrievalService
from translators import multipart as mp
from translators import rendered as rd
from translators.uids import InvalidUid, check_uid


def _params(request: Request, thumbnail: bool) -> rd.RenderParams:
    try:
        params = rd.parse_render_params(request.query_params.multi_items(),
                                        accept_header=request.headers.get("accept"))
    except rd.UnsupportedRendering as exc:
        raise NotAcceptable(str(exc)) from None
    except rd.RenderError as exc:
        raise BadRequest(str(exc)) from None
    return rd.thumbnail_params(params) if thumbnail else params


def _services(request: Request) -> tuple[RetrievalService, InstanceReader]:
    return request.app.state.retrieval, request.app.state.instances


def _check_budget(request: Request, count: int, params: rd.RenderParams) -> None:
    """Bounded work per request, checked before any retrieval or decoding (limits.*)."""
    limits = request.app.state.settings.limits
    if count > limits.max_rendered_frames:
        raise BadRequest(f"at most {limits.max_rendered_frames} frames can be rendered in one request")
    vw, vh = (params.viewport[0], params.viewport[1]) if params.viewport else (512, 512)
    if count * vw * vh > limits.max_rendered_pixels:
        raise BadRequest(f"{count} frames of {vw}x{vh} exceed the {limits.max_rendered_pixels} pixels one "
                         f"rendered request may produce")


async def _render_all(request: Request, entry: SpoolEntry, numbers: list[int],
                      params: rd.RenderParams) -> list[bytes]:
    """Each frame rendered from ONE read of the instance, one frame decoded at a time, after checking
    that a decoded frame fits ``limits.max_decode_bytes``."""
    _, reader = _services(request)
    ds = await reader.dataset(entry)
    if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
        raise BadRequest("the instance has no pixel data to render")
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    for frame in numbers:
        if not 1 <= frame <= frames:
            raise BadRequest(f"frame {frame} is outside 1..{frames}")
    decoded = (int(ds.get("Rows", 0) or 0) * int(ds.get("Columns", 0) or 0)
               * int(ds.get("SamplesPerPixel", 1) or 1) * max(1, int(ds.get("BitsAllocated", 8) or 8) // 8))
    limit = request.app.state.settings.limits.max_decode_bytes
    if decoded > limit:
        raise BadRequest(f"a decoded frame of this instance ({decoded} bytes) exceeds the rendering limit "
                         f"({limit} bytes)")

    def work(frame: int) -> bytes:
        pixels = pixel_array(ds, index=frame - 1) if frames > 1 else pixel_array(ds)
        return rd.render_frame(ds, pixels, params, frame=frame)

    try:
        return [await reader.run(work, frame) for frame in numbers]
    except rd.UnsupportedRendering as exc:
        raise NotAcceptable(str(exc)) from None
    except rd.RenderError as exc:
        raise BadRequest(str(exc)) from None


async def rendered(request: Request) -> Response:
    """Instance, frame(s), series or study rendered as JPEG/PNG/GIF."""
    thumbnail = request.url.path.endswith("/thumbnail")
    params = _params(request, thumbnail)          # 400/406 before any DIMSE work
    study, series, instance = path_uids(request)
    frames_text = request.path_params.get("frames")
    limits = request.app.state.settings.limits
    numbers = parse_frame_list(frames_text, limits.max_frames_per_request) if frames_text else None
    _check_budget(request, len(numbers) if numbers else 1, params)
    nodes, _ = target_nodes(request, request.app.state.settings, "retrieve")
    service, reader = _services(request)
    if instance is None:
        pinned = service.representative(nodes, study, series)
        numbers = None
    else:
        assert series is not None
        pinned = service.instance(nodes, study, series, instance)
    async with pinned as entry:
        if numbers is None:
            index = await reader.frame_index(entry)
            count = index.number_of_frames if index else 1
            numbers = [rd.pick_thumbnail_frame(count) if thumbnail else 1]
        images = await _render_all(request, entry, numbers, params)
    headers = {NODE_HEADER: entry.node}
    if len(images) == 1:
        return Response(images[0], media_type=params.media_type, headers=headers)
    boundary = mp.new_boundary()
    body = b"".join(mp.part_header(boundary, params.media_type, first=i == 0) + img
                    for i, img in enumerate(images)) + mp.closing(boundary)
    return Response(body, media_type=mp.content_type(params.media_type, boundary), headers=headers)


# ---------------------------------------------------------------------- WADO-URI


async def wado_uri(request: Request) -> Response:
    """``?requestType=WADO&studyUID=&seriesUID=&objectUID=[&contentType=][&frameNumber=]`` (PS3.18 §9)."""
    q = request.query_params
    if q.get("requestType") != "WADO":
        raise BadRequest("requestType=WADO is required")
    missing = [k for k in ("studyUID", "seriesUID", "objectUID") if not q.get(k)]
    if missing:
        raise BadRequest(f"missing parameter(s): {', '.join(missing)}")
    try:
        study, series, sop = (check_uid("studyUID", q["studyUID"]), check_uid("seriesUID", q["seriesUID"]),
                              check_uid("objectUID", q["objectUID"]))
    except InvalidUid as exc:
        raise BadRequest(str(exc)) from None
    nodes, _ = target_nodes(request, request.app.state.settings, "retrieve")   # 403/404 before any work
    content_types = [c.strip() for c in (q.get("contentType") or "image/jpeg").split(",") if c.strip()]
    frame_text = q.get("frameNumber") or q.get("frame")   # OHIF sends the non-standard `frame`
    frame = 1
    if frame_text:
        if not (frame_text.isascii() and frame_text.isdigit()) or int(frame_text) < 1:
            raise BadRequest(f"frameNumber {frame_text!r} is not a frame number")
        frame = int(frame_text)
    service, _ = _services(request)
    if "application/dicom" in content_types:
        async with service.instance(nodes, study, series, sop) as entry:
            data, ts = await service.whole_instance(entry, q.get("transferSyntax"),
                                                    explicit=bool(q.get("transferSyntax")))
        disposition = f'attachment; filename="{sop}.dcm"'
        return Response(data, media_type="application/dicom",
                        headers={"Content-Disposition": disposition, "X-Transfer-Syntax": ts,
                                 NODE_HEADER: entry.node})
    renderable = [c for c in content_types if c in rd.RENDERABLE or c in ("*/*", "image/*")]
    if not renderable:
        raise NotAcceptable(f"contentType {','.join(content_types)} is not supported")
    media_type = "image/jpeg" if renderable[0] in ("*/*", "image/*") else renderable[0]
    items: list[tuple[str, str]] = [("accept", media_type)]
    if q.get("imageQuality"):
        items.append(("quality", q["imageQuality"]))
    if q.get("windowCenter") and q.get("windowWidth"):
        items.append(("window", f"{q['windowCenter']},{q['windowWidth']},linear"))
    if q.get("rows") or q.get("columns"):
        rows = q.get("rows") or q.get("columns")
        cols = q.get("columns") or q.get("rows")
        items.append(("viewport", f"{cols},{rows}"))
    try:
        params = rd.parse_render_params(items)
    except rd.RenderError as exc:
        raise BadRequest(str(exc)) from None
    _check_budget(request, 1, params)
    async with service.instance(nodes, study, series, sop) as entry:
        [image] = await _render_all(request, entry, [frame], params)
    return Response(image, media_type=params.media_type, headers={NODE_HEADER: entry.node})


def routes() -> list[Route]:
    inst = "/studies/{study}/series/{series}/instances/{instance}"
    out: list[Route] = []
    for kind in ("rendered", "thumbnail"):
        for path in ("/studies/{study}", "/studies/{study}/series/{series}", inst, inst + "/frames/{frames}"):
            out.append(Route(f"{path}/{kind}", rendered, methods=["GET"]))
    return out


async def wado_uri_on_root(request: Request) -> Response:
    """WADO-URI on the DICOMweb root itself (the JS dicomweb-client builds such URLs)."""
    if "requestType" not in request.query_params:
        raise NotFound("the DICOMweb root has no resource; see OPTIONS for the capabilities")
    return await wado_uri(request)


def wado_uri_routes() -> list[Route]:
    return [Route("/wado", wado_uri, methods=["GET"]), Route("/nodes/{node}/wado", wado_uri, methods=["GET"]),
            Route("/dicom-web", wado_uri_on_root, methods=["GET"]),
            Route("/nodes/{node}/dicom-web", wado_uri_on_root, methods=["GET"])]


def root_routes() -> list[Route]:
    """Inside the /dicom-web mounts: ``GET /dicom-web/?requestType=WADO&...``."""
    return [Route("/", wado_uri_on_root, methods=["GET"])]


__all__: list[Any] = ["routes", "wado_uri_routes"]
