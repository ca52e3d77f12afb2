"""WADO-RS routes (PS3.18 §10.4): negotiate first, locate, fetch once, stream from the spool.

Response headers go out only once the first instance is in hand, so 404/502/504 are still possible;
a failure after that raises inside the body generator, which ends the chunked body without its
closing delimiter: clients see a broken stream, never a short "complete" one (architecture.md §4).
"""

from __future__ import annotations

import logging
import re
from collections.abc import AsyncGenerator, AsyncIterator

from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from cache.base import key
from cache.spool import SpoolEntry
from gateway.errors import BadRequest, GatewayError, NotAcceptable, NotFound
from gateway.http import dicomweb_base, target_nodes
from gateway.instances import LOSSY, InstanceReader, instance_path, with_base
from gateway.retrieval import Manifest, RetrievalService, SeriesFetch
from gateway.settings import PacsNode
from translators import frames as fr
from translators import media
from translators import multipart as mp

log = logging.getLogger(__name__)


def _services(request: Request) -> tuple[RetrievalService, InstanceReader]:
    return request.app.state.retrieval, request.app.state.instances


def _negotiate(request: Request, category: media.Category, single_item: bool = False) -> media.Selection:
    try:
        return media.negotiate(category, accept_param=request.query_params.get("accept"),
                               accept_header=request.headers.get("accept"), single_item=single_item)
    except media.NotAcceptableMedia as exc:
        raise NotAcceptable(str(exc)) from None


_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")


def _uids(request: Request) -> tuple[str, str | None, str | None]:
    p = request.path_params
    for name in ("study", "series", "instance"):
        if name in p and not _UID.match(p[name]):
            raise BadRequest(f"{name} UID {p[name]!r} is not a valid UID")
    return p["study"], p.get("series"), p.get("instance")


async def _node(request: Request, study: str) -> tuple[PacsNode, PacsNode | None]:
    nodes, pinned = target_nodes(request, request.app.state.settings)
    service, _ = _services(request)
    return await service.locate(study, nodes), pinned


async def _manifests(request: Request) -> tuple[PacsNode, list[Manifest], str]:
    study, series, _ = _uids(request)
    node, pinned = await _node(request, study)
    service, _ = _services(request)
    base = dicomweb_base(request, request.app.state.settings, pinned)
    if series is None:
        return node, await service.series_list(node, study), base
    return node, [await service.manifest(node, study, series)], base


def _metrics(request: Request) -> dict[str, int]:
    return request.app.state.metrics  # type: ignore[no-any-return]


# ---------------------------------------------------------------------- instances


async def retrieve(request: Request) -> Response:
    """Study, series or instance as multipart/related application/dicom (or single part for one)."""
    study, series, instance = _uids(request)
    selection = _negotiate(request, "instance", single_item=instance is not None)
    if selection.media_type != "application/dicom":
        return await _retrieve_bulk(request, selection)
    node, manifests, base = await _manifests(request)
    service, reader = _services(request)
    if instance is not None:
        manifest = manifests[0]
        if instance not in manifest.uids:
            raise NotFound(f"instance {instance} was not found in series {manifest.series}")
        manifests = [Manifest(manifest.node, manifest.study, manifest.series,
                              [i for i in manifest.instances if i.sop_instance_uid == instance],
                              complete=False)]

    fetches: list[SeriesFetch] = []

    def start(i: int) -> SeriesFetch:
        f = service.fetch(node, manifests[i], priority=instance)
        f.join()
        fetches.append(f)
        return f

    async def entries() -> AsyncGenerator[SpoolEntry, None]:
        # One series after the other; the next series is fetched while this one streams.
        current = start(0)
        for i in range(len(manifests)):
            nxt = start(i + 1) if i + 1 < len(manifests) else None
            wanted = set(manifests[i].uids)
            async for uid in current.arrivals():
                if uid in wanted:
                    entry = service.entry(uid)
                    if entry is None:
                        raise GatewayError(f"instance {uid} left the spool before it was sent")
                    yield entry
            if nxt is not None:
                current = nxt

    gen = entries()
    try:
        first = await gen.__anext__()
    except BaseException:
        for f in fetches:
            f.leave()
        await gen.aclose()
        raise

    async def one_part(entry: SpoolEntry) -> tuple[str, AsyncIterator[bytes] | bytes]:
        ts = entry.transfer_syntax
        target = selection.transfer_syntax or media.EXPLICIT_VR_LE
        if ts == media.IMPLICIT_VR_LE and target == media.ANY_TS:
            target = media.EXPLICIT_VR_LE   # Implicit VR LE shall not be used by web services (§8.7.3)
        if target == media.ANY_TS or target == ts or (not selection.explicit_ts and ts in LOSSY):
            return ts, reader.chunks(entry)
        if not fr.can_transcode(ts, target):
            if selection.explicit_ts:
                raise NotAcceptable(f"instance {entry.sop_instance_uid} is stored as {ts} and cannot be "
                                    f"transcoded to {target}")
            return ts, reader.chunks(entry)
        return target, await reader.transcoded(entry, target)

    if not selection.multipart:
        try:
            ts, single = await one_part(first)
            data = single if isinstance(single, bytes) else b"".join([c async for c in single])
        finally:
            for f in fetches:
                f.leave()
            await gen.aclose()
        return Response(data, media_type=f"application/dicom; transfer-syntax={ts}")

    boundary = mp.new_boundary()

    async def stream() -> AsyncIterator[bytes]:
        ok = False
        try:
            is_first = True
            entry: SpoolEntry | None = first
            while entry is not None:
                ts, content = await one_part(entry)
                yield mp.part_header(boundary, "application/dicom", transfer_syntax=ts,
                                     location=base + instance_path(entry), first=is_first)
                is_first = False
                if isinstance(content, bytes):
                    yield content
                else:
                    async for chunk in content:
                        yield chunk
                entry = await anext(gen, None)
            yield mp.closing(boundary)
            ok = True
        finally:
            if not ok:
                _metrics(request)["aborted_streams"] += 1
            for f in fetches:
                f.leave()
            await gen.aclose()

    return StreamingResponse(stream(), media_type=mp.content_type("application/dicom", boundary))


async def _retrieve_bulk(request: Request, selection: media.Selection) -> Response:
    """Instance resources asked as application/octet-stream (Table 10.4.4-1): their pixel data."""
    raise NotAcceptable("instance resources are available as application/dicom; use /frames or /bulkdata "
                        "for pixel data")


# ---------------------------------------------------------------------- metadata


async def metadata(request: Request) -> Response:
    study, series, instance = _uids(request)
    _negotiate(request, "metadata")
    settings = request.app.state.settings
    cache = request.app.state.cache
    meta_key = key("meta", "series", study, series) if series and not instance else None
    if meta_key is not None and "no-cache" not in request.headers.get("cache-control", ""):
        # Series metadata is one cache read once ingested, on every replica (no PACS, no spool).
        cached = await cache.get(meta_key)
        if cached is not None:
            _, pinned = target_nodes(request, settings)
            return Response(with_base(cached, dicomweb_base(request, settings, pinned)),
                            media_type="application/dicom+json")
    node, manifests, base = await _manifests(request)
    service, reader = _services(request)
    keep = request.app.state.settings.retrieval.series_for_frames
    parts: list[bytes] = []
    fetches = [service.fetch(node, m, priority=instance) for m in manifests]
    for f in fetches:
        f.join()
    try:
        for manifest, fetch in zip(manifests, fetches, strict=True):
            wanted = [instance] if instance else manifest.uids
            if instance and instance not in manifest.uids:
                raise NotFound(f"instance {instance} was not found in series {manifest.series}")
            for uid in wanted:
                await fetch.wait_for(uid)
                entry = service.entry(uid)
                if entry is None:
                    raise GatewayError(f"instance {uid} left the spool")
                parts.append(await reader.metadata(entry))
    finally:
        for f in fetches:
            if keep:
                f.waiters -= 1          # viewers ask for the frames next: let the fetch finish
            else:
                f.leave()
    raw = b"[" + b",".join(parts) + b"]"
    if meta_key is not None:
        await cache.set(meta_key, raw, settings.cache.ttl.metadata)
    return Response(with_base(raw, base), media_type="application/dicom+json")


# ---------------------------------------------------------------------- frames


def parse_frame_list(text: str) -> list[int]:
    """``1,3,5`` (also ``%2C``), 1-based, no duplicates (PS3.18 §10.4.1.1.4)."""
    numbers: list[int] = []
    for item in text.replace("%2C", ",").replace("%2c", ",").split(","):
        item = item.strip()
        if not item.isdigit() or int(item) < 1:
            raise BadRequest(f"frame list {text!r}: {item!r} is not a frame number (1-based)")
        n = int(item)
        if n in numbers:
            raise BadRequest(f"frame list {text!r}: frame {n} is listed twice")
        numbers.append(n)
    if not numbers:
        raise BadRequest("empty frame list")
    return numbers


async def _instance_entry(request: Request, keep: bool = True) -> tuple[SpoolEntry, str]:
    study, series, instance = _uids(request)
    assert series is not None and instance is not None
    node, pinned = await _node(request, study)
    service, _ = _services(request)
    base = dicomweb_base(request, request.app.state.settings, pinned)
    entry = service.entry(instance)
    if entry is not None and entry.study_uid == study and entry.series_uid == series:
        return entry, base
    manifest = await service.manifest(node, study, series)
    if instance not in manifest.uids:
        raise NotFound(f"instance {instance} was not found in series {series}")
    fetch = service.fetch(node, manifest, priority=instance)
    fetch.join()
    try:
        await fetch.wait_for(instance)
    finally:
        if keep and request.app.state.settings.retrieval.series_for_frames:
            fetch.waiters -= 1
        else:
            fetch.leave()
    found = service.entry(instance)
    if found is None:
        raise GatewayError(f"instance {instance} left the spool")
    return found, base


def _frame_media(stored_ts: str, selection: media.Selection) -> tuple[str, str]:
    """(part media type, transfer syntax) for frames (dicomweb-notes §3.3-3.4)."""
    target = selection.transfer_syntax or media.EXPLICIT_VR_LE
    if target == media.ANY_TS:
        if stored_ts == media.IMPLICIT_VR_LE:
            return "application/octet-stream", media.EXPLICIT_VR_LE   # same frame bytes (little endian)
        if stored_ts in fr.CORNERSTONE_UNDECODABLE:
            return "application/octet-stream", media.EXPLICIT_VR_LE
        return fr.media_type_for_transfer_syntax(stored_ts), stored_ts
    return fr.media_type_for_transfer_syntax(target), target


async def frames(request: Request) -> Response:
    numbers = parse_frame_list(request.path_params["frames"])
    selection = _negotiate(request, "frames", single_item=len(numbers) == 1)
    entry, base = await _instance_entry(request)
    _, reader = _services(request)
    try:
        raw = await reader.frames(entry, numbers)
    except fr.FrameError as exc:
        raise BadRequest(str(exc)) from None
    except fr.NotIndexable as exc:
        raise GatewayError(f"instance {entry.sop_instance_uid} cannot be split into frames: {exc}") from None
    part_type, ts = _frame_media(entry.transfer_syntax, selection)
    native_le = {media.EXPLICIT_VR_LE, media.IMPLICIT_VR_LE}
    if ts != entry.transfer_syntax and not {ts, entry.transfer_syntax} <= native_le:
        try:
            raw = [await reader.transcode_frame(entry, f, ts) for f in raw]
        except fr.TranscodeError as exc:
            raise NotAcceptable(f"frames stored as {entry.transfer_syntax} cannot be delivered as {ts}: "
                                f"{exc}") from None
    location = base + instance_path(entry) + "/frames/"
    if not selection.multipart:
        return Response(raw[0], media_type=f"{part_type}; transfer-syntax={ts}")
    boundary = mp.new_boundary()
    chunks: list[bytes] = []
    for i, (n, data) in enumerate(zip(numbers, raw, strict=True)):
        chunks.append(mp.part_header(boundary, part_type, transfer_syntax=ts, location=f"{location}{n}",
                                     first=i == 0))
        chunks.append(data)
    chunks.append(mp.closing(boundary))
    return Response(b"".join(chunks), media_type=mp.content_type(selection.media_type, boundary))


# ---------------------------------------------------------------------- bulkdata


async def bulkdata(request: Request) -> Response:
    path_text = request.path_params["path"]
    try:
        path = [int(p, 16) if i % 2 == 0 else int(p) for i, p in enumerate(path_text.split("."))]
    except ValueError:
        raise BadRequest(f"bulkdata path {path_text!r} is not a tag path") from None
    entry, base = await _instance_entry(request)
    _, reader = _services(request)
    if path == [0x7FE00010]:
        index = await reader.frame_index(entry)
        if index is None:
            raise NotFound("the instance has no pixel data")
        numbers = list(range(1, index.number_of_frames + 1))
        if not index.encapsulated:
            data = b"".join(await reader.frames(entry, numbers))
            location = base + instance_path(entry) + "/bulkdata/7FE00010"
            return _bulk_response(request, data, entry.transfer_syntax, location)
        request.path_params["frames"] = ",".join(map(str, numbers))
        return await frames(request)
    value = await reader.element_bytes(entry, path)
    if value is None:
        raise NotFound(f"no bulk data at {path_text}")
    return _bulk_response(request, value, None, base + instance_path(entry) + f"/bulkdata/{path_text}")


async def pixeldata(request: Request) -> Response:
    """``…/instances/{i}/pixeldata`` (PS3.18 Table H-1): every frame, one part each, as for /frames."""
    entry, _ = await _instance_entry(request)
    _, reader = _services(request)
    index = await reader.frame_index(entry)
    if index is None:
        raise NotFound("the instance has no pixel data")
    request.path_params["frames"] = ",".join(map(str, range(1, index.number_of_frames + 1)))
    return await frames(request)


def _bulk_response(request: Request, data: bytes, ts: str | None, location: str) -> Response:
    selection = _negotiate(request, "bulkdata", single_item=True)
    if ts == media.IMPLICIT_VR_LE:
        ts = media.EXPLICIT_VR_LE   # same bytes; Implicit VR LE is not a web transfer syntax
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
        headers = {"Content-Range": f"bytes {start}-{end}/{len(data)}", "Accept-Ranges": "bytes"}
        return Response(data[start:end + 1], status_code=206, media_type="application/octet-stream",
                        headers=headers)
    suffix = f"; transfer-syntax={ts}" if ts else ""
    if not selection.multipart:
        return Response(data, media_type="application/octet-stream" + suffix,
                        headers={"Accept-Ranges": "bytes"})
    boundary = mp.new_boundary()
    head = mp.part_header(boundary, "application/octet-stream", transfer_syntax=ts, location=location,
                          first=True)
    body = head + data + mp.closing(boundary)
    return Response(body, media_type=mp.content_type("application/octet-stream", boundary))


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
