"""WADO-RS routes (PS3.18 §10.4): parse, ask the retrieval service, render.

Negotiation (406) and UID checks (400) come before any DIMSE work. Response headers go out only
once the first instance is in hand, so 404/502/504 are still possible; a failure after that raises
inside the body generator, which ends the chunked body without its closing delimiter: clients see a
broken stream, never a short "complete" one (docs/architecture.md, "Retrieval"). Every response
names the node that answered in ``X-Gateway-Node``.
"""

from __future__ import annotations

import logging
import re
from collections.abc import AsyncIterator

from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from cache.spool import SpoolEntry
from gateway.errors import BadRequest, GatewayError, NotAcceptable, NotFound
from gateway.http import NODE_HEADER, dicomweb_base, parse_frame_list, path_uids, target_nodes
from gateway.instances import InstanceReader, instance_path, with_base
from gateway.retrieval.service import RetrievalService
from translators import frames as fr
from translators import media
from translators import multipart as mp
from translators.syntaxes import EXPLICIT_VR_LE, IMPLICIT_VR_LE

log = logging.getLogger(__name__)


def _services(request: Request) -> tuple[RetrievalService, InstanceReader]:
    return request.app.state.retrieval, request.app.state.instances


def negotiate(request: Request, category: media.Category, single_item: bool = False) -> media.Selection:
    try:
        return media.negotiate(
            category,
            accept_param=request.query_params.get("accept"),
            accept_header=request.headers.get("accept"),
            single_item=single_item,
        )
    except media.NotAcceptableMedia as exc:
        raise NotAcceptable(str(exc)) from None


def _metrics(request: Request) -> dict[str, int]:
    return request.app.state.metrics  # type: ignore[no-any-return]


# ---------------------------------------------------------------------- instances


async def retrieve(request: Request) -> Response:
    """Study, series or instance as multipart/related application/dicom (or single part for one)."""
    study, series, instance = path_uids(request)
    selection = negotiate(request, "instance", single_item=instance is not None)
    if selection.media_type != "application/dicom":
        raise NotAcceptable(
            "instance resources are available as application/dicom; use /frames or /bulkdata for pixel data"
        )
    nodes, pinned = target_nodes(request, request.app.state.settings, "retrieve")
    service, _ = _services(request)
    parts = await service.parts(nodes, study, series, instance, selection)
    headers = {NODE_HEADER: parts.node.name}
    if not selection.multipart:
        try:
            part = parts.first
            data = (
                part.content if isinstance(part.content, bytes) else b"".join([c async for c in part.content])
            )
        finally:
            await parts.aclose()
        return Response(
            data, media_type=f"application/dicom; transfer-syntax={part.transfer_syntax}", headers=headers
        )

    base = dicomweb_base(request, request.app.state.settings, pinned)
    boundary = mp.new_boundary()

    async def body() -> AsyncIterator[bytes]:
        ok = False
        try:
            first = True
            async for part in parts:
                yield mp.part_header(
                    boundary,
                    "application/dicom",
                    transfer_syntax=part.transfer_syntax,
                    location=base + instance_path(part.entry),
                    first=first,
                )
                first = False
                if isinstance(part.content, bytes):
                    yield part.content
                else:
                    async for chunk in part.content:
                        yield chunk
            yield mp.closing(boundary)
            ok = True
        finally:
            if not ok:
                _metrics(request)["aborted_streams"] += 1
            await parts.aclose()

    return StreamingResponse(
        body(), media_type=mp.content_type("application/dicom", boundary), headers=headers
    )


# ---------------------------------------------------------------------- metadata


async def metadata(request: Request) -> Response:
    study, series, instance = path_uids(request)
    negotiate(request, "metadata")
    settings = request.app.state.settings
    nodes, pinned = target_nodes(request, settings, "retrieve")
    service, _ = _services(request)
    found = await service.metadata(
        nodes, study, series, instance, use_cache="no-cache" not in request.headers.get("cache-control", "")
    )
    return Response(
        with_base(found.json, dicomweb_base(request, settings, pinned)),
        media_type="application/dicom+json",
        headers={NODE_HEADER: found.node.name},
    )


# ---------------------------------------------------------------------- frames


def instance_uids(request: Request) -> tuple[str, str, str]:
    study, series, instance = path_uids(request)
    assert series is not None and instance is not None
    return study, series, instance


async def _frames_response(request: Request, entry: SpoolEntry, numbers: list[int], base: str) -> Response:
    selection = negotiate(request, "frames", single_item=len(numbers) == 1)
    _, reader = _services(request)
    try:
        raw = await reader.frames(entry, numbers)
    except fr.FrameError as exc:
        raise BadRequest(str(exc)) from None
    except fr.NotIndexable as exc:
        raise GatewayError(f"instance {entry.sop_instance_uid} cannot be split into frames: {exc}") from None
    part_type, ts = media.frame_media(entry.transfer_syntax, selection.transfer_syntax)
    native_le = {EXPLICIT_VR_LE, IMPLICIT_VR_LE}
    if ts != entry.transfer_syntax and not {ts, entry.transfer_syntax} <= native_le:
        try:
            raw = [await reader.transcode_frame(entry, f, ts) for f in raw]
        except fr.TranscodeError as exc:
            raise NotAcceptable(
                f"frames stored as {entry.transfer_syntax} cannot be delivered as {ts}: {exc}"
            ) from None
    headers = {NODE_HEADER: entry.node}
    if not selection.multipart:
        return Response(raw[0], media_type=f"{part_type}; transfer-syntax={ts}", headers=headers)
    location = base + instance_path(entry) + "/frames/"
    boundary = mp.new_boundary()
    chunks: list[bytes] = []
    for i, (n, data) in enumerate(zip(numbers, raw, strict=True)):
        chunks.append(
            mp.part_header(boundary, part_type, transfer_syntax=ts, location=f"{location}{n}", first=i == 0)
        )
        chunks.append(data)
    chunks.append(mp.closing(boundary))
    return Response(
        b"".join(chunks), media_type=mp.content_type(selection.media_type, boundary), headers=headers
    )


async def frames(request: Request) -> Response:
    limits = request.app.state.settings.limits
    numbers = parse_frame_list(request.path_params["frames"], limits.max_frames_per_request)
    negotiate(request, "frames", single_item=len(numbers) == 1)  # 406 before any DIMSE work
    study, series, sop = instance_uids(request)
    settings = request.app.state.settings
    nodes, pinned = target_nodes(request, settings, "retrieve")
    service, _ = _services(request)
    async with service.instance(nodes, study, series, sop) as entry:
        return await _frames_response(request, entry, numbers, dicomweb_base(request, settings, pinned))


# ---------------------------------------------------------------------- bulkdata


# The tag paths of the BulkDataURIs the metadata emits: 8-hex tags, item indexes between them.
_TAG_PATH = re.compile(r"[0-9A-Fa-f]{8}(?:\.[0-9]{1,9}\.[0-9A-Fa-f]{8})*")


async def bulkdata(request: Request) -> Response:
    path_text = request.path_params["path"]
    if not _TAG_PATH.fullmatch(path_text):   # int() alone took signs, "0x", "_" and tags past 32 bits
        raise BadRequest(f"bulkdata path {path_text[:80]!r} is not a tag path")
    path = [int(p, 16) if i % 2 == 0 else int(p) for i, p in enumerate(path_text.split("."))]
    if path != [0x7FE00010]:
        negotiate(request, "bulkdata", single_item=True)  # pixel data negotiates as frames below
    study, series, sop = instance_uids(request)
    settings = request.app.state.settings
    nodes, pinned = target_nodes(request, settings, "retrieve")
    base = dicomweb_base(request, settings, pinned)
    service, reader = _services(request)
    async with service.instance(nodes, study, series, sop) as entry:
        location = base + instance_path(entry) + f"/bulkdata/{path_text}"
        if path == [0x7FE00010]:
            index = await reader.frame_index(entry)
            if index is None:
                raise NotFound("the instance has no pixel data", node=entry.node)
            numbers = list(range(1, index.number_of_frames + 1))
            if index.encapsulated:
                return await _frames_response(request, entry, numbers, base)
            data = b"".join(await reader.frames(entry, numbers))
            return _bulk_response(request, data, entry.transfer_syntax, location, entry.node)
        value = await reader.element_bytes(entry, path)
        if value is None:
            raise NotFound(f"no bulk data at {path_text}", node=entry.node)
        return _bulk_response(request, value, None, location, entry.node)


async def pixeldata(request: Request) -> Response:
    """``…/instances/{i}/pixeldata`` (PS3.18 Table H-1): every frame, one part each, as for /frames."""
    study, series, sop = instance_uids(request)
    settings = request.app.state.settings
    nodes, pinned = target_nodes(request, settings, "retrieve")
    service, reader = _services(request)
    async with service.instance(nodes, study, series, sop) as entry:
        index = await reader.frame_index(entry)
        if index is None:
            raise NotFound("the instance has no pixel data", node=entry.node)
        numbers = list(range(1, index.number_of_frames + 1))
        return await _frames_response(request, entry, numbers, dicomweb_base(request, settings, pinned))


def _bulk_response(request: Request, data: bytes, ts: str | None, location: str, node: str) -> Response:
    selection = negotiate(request, "bulkdata", single_item=True)
    if ts == IMPLICIT_VR_LE:
        ts = EXPLICIT_VR_LE  # same bytes; Implicit VR LE is not a web transfer syntax
    headers = {NODE_HEADER: node}
    rng = request.headers.get("range")
    if rng and not selection.multipart:
        m = re.fullmatch(r"bytes=(\d*)-(\d*)", rng.strip())
        if not m or (not m.group(1) and not m.group(2)):
            return Response(status_code=416, headers={"Content-Range": f"bytes */{len(data)}"})
        if m.group(1):
            start = int(m.group(1))
            end = min(int(m.group(2)), len(data) - 1) if m.group(2) else len(data) - 1
        else:
            start, end = max(0, len(data) - int(m.group(2))), len(data) - 1
        if start >= len(data) or start > end:
            return Response(status_code=416, headers={"Content-Range": f"bytes */{len(data)}"})
        headers.update({"Content-Range": f"bytes {start}-{end}/{len(data)}", "Accept-Ranges": "bytes"})
        return Response(
            data[start : end + 1], status_code=206, media_type="application/octet-stream", headers=headers
        )
    suffix = f"; transfer-syntax={ts}" if ts else ""
    if not selection.multipart:
        return Response(
            data,
            media_type="application/octet-stream" + suffix,
            headers={**headers, "Accept-Ranges": "bytes"},
        )
    boundary = mp.new_boundary()
    head = mp.part_header(
        boundary, "application/octet-stream", transfer_syntax=ts, location=location, first=True
    )
    body = head + data + mp.closing(boundary)
    return Response(body, media_type=mp.content_type("application/octet-stream", boundary), headers=headers)


def routes() -> list[Route]:
    inst = "/studies/{study}/series/{series}/instances/{instance}"
    return [
        Route("/studies/{study}", retrieve, methods=["GET"]),
        Route("/studies/{study}/series/{series}", retrieve, methods=["GET"]),
        Route(inst, retrieve, methods=["GET"]),
        Route("/studies/{study}/metadata", metadata, methods=["GET"]),
        Route("/studies/{study}/series/{series}/metadata", metadata, methods=["GET"]),
        Route(inst + "/metadata", metadata, methods=["GET"]),
        Route(inst + "/frames/{frames}", frames, methods=["GET"]),
        Route(inst + "/bulkdata/{path}", bulkdata, methods=["GET"]),
        Route(inst + "/pixeldata", pixeldata, methods=["GET"]),
    ]
