"""STOW-RS routes (PS3.18 §10.5): stream the body to disk, C-STORE the instances, answer Annex I.

1. Check the Content-Type before reading a byte: ``multipart/related`` with ``type`` absent,
   ``application/dicom`` or ``application/dicom+json``, else 415; no boundary -> 400.
2. Stream ``request.stream()`` (chunked or not) through :class:`translators.multipart.MultipartDecoder`;
   every part goes to its own temp file under the spool's ``.incoming`` directory (same filesystem)
   while it arrives, so memory stays bounded whatever the upload size. File writes are small
   (one HTTP chunk) page-cache writes done on the event loop; everything slower runs in threads.
3. Prepare (in a thread): read each ``application/dicom`` part's header only (``stop_before_pixels``)
   for SOP class/instance, transfer syntax, study and series; build Part-10 instances from
   ``application/dicom+json`` parts plus the bulk data parts their BulkDataURIs name (matched by
   Content-Location). Parts that cannot be stored get their failure code here (translators.stow).
4. C-STORE what is left over one association (:mod:`gateway.dimse.store`); success only for what
   the PACS confirmed.
5. Invalidate cached queries (generation counters ``gen:{node}`` and ``gen:{node}:{study}``, see
   cache/base.py), record locations (study -> node, series -> study), answer.

The target node: ``/nodes/{name}/dicom-web`` stores there; federated ``/dicom-web`` stores to
``gateway.stow_node`` (default: the first node). The whole request holds one store slot of that node.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO
from urllib.parse import urlsplit

import orjson
from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.errors import InvalidDicomError
from pydicom.uid import UID
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.routing import Route

from cache.base import Cache, key
from gateway.errors import BadRequest, GatewayError, UnsupportedMediaType
from gateway.http import DICOM_JSON, dicomweb_base, negotiate_search, target_nodes
from gateway.pacs import StoreItem
from gateway.settings import PacsNode, Settings
from translators import multipart as mp
from translators import stow as st

log = logging.getLogger(__name__)

DICOM = "application/dicom"
IMPLICIT_VR_LE = "1.2.840.10008.1.2"
EXPLICIT_VR_LE = "1.2.840.10008.1.2.1"
EXPLICIT_VR_BE = "1.2.840.10008.1.2.2"
PREPEND, REWRITE = "prepend", "rewrite"
METADATA_TYPES = (DICOM_JSON, "application/json")
ROOT_TYPES = ("", DICOM, DICOM_JSON)


@dataclass
class _Part:
    headers: dict[str, str]
    path: Path
    size: int = 0
    complete: bool = False

    @property
    def media_type(self) -> str:
        return mp.parse_media_type(self.headers.get("content-type", ""))[0]


@dataclass
class _Header:
    sop_class: str
    sop_instance: str
    syntax: str
    study: str
    series: str


@dataclass
class _Prepared:
    """One entry per instance of the request, in order: an item to store, or a failure already."""

    entries: list[tuple[_Header | None, StoreItem | None, int | None]] = field(default_factory=list)

    def fail(self, header: _Header | None, status: int) -> None:
        self.entries.append((header, None, status))

    def store(self, header: _Header, item: StoreItem) -> None:
        self.entries.append((header, item, None))


class _Receiver:
    """Applies decoder events: each part to a temp file of its own, as its bytes arrive."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.parts: list[_Part] = []
        self.truncated_headers = False   # the body ended inside a part's header block
        self._fh: BinaryIO | None = None

    def apply(self, events: Iterable[mp.Event]) -> None:
        for event in events:
            if isinstance(event, mp.PartData):
                self._write(event.data)
            elif isinstance(event, mp.PartStart):
                fd, name = tempfile.mkstemp(dir=self.workdir, suffix=".part")
                self._fh = open(fd, "wb")  # noqa: SIM115 - closed at PartEnd or by close()
                self.parts.append(_Part(event.headers, Path(name)))
            elif isinstance(event, mp.PartEnd):
                self.parts[-1].complete = True
                self.close()
            elif isinstance(event, mp.Truncated) and event.in_part and self._fh is None:
                self.truncated_headers = True

    def _write(self, data: bytes) -> None:
        assert self._fh is not None
        self._fh.write(data)
        self.parts[-1].size += len(data)

    def close(self) -> None:
        fh, self._fh = self._fh, None
        if fh is not None:
            fh.close()


def _content_type(request: Request) -> tuple[str, str]:
    """(root part type, boundary) of a STOW-RS request, or 415/400 (PS3.18 §10.5.1.2, Table 10.5.3-1)."""
    raw = request.headers.get("content-type", "")
    media, params = mp.parse_media_type(raw)
    if media != "multipart/related":
        raise UnsupportedMediaType(f"STOW-RS takes multipart/related with type {DICOM} or {DICOM_JSON}, "
                                   f"not {media or 'no Content-Type'!r}")
    root = params.get("type", "").strip().lower()
    if root not in ROOT_TYPES:
        raise UnsupportedMediaType(f"multipart/related type {root!r} is not supported; use {DICOM} or "
                                   f"{DICOM_JSON}")
    try:
        return root, mp.boundary_from_content_type(raw)
    except mp.MultipartError as exc:
        raise BadRequest(str(exc)) from None


def _node(request: Request, settings: Settings) -> tuple[PacsNode, PacsNode | None]:
    _, pinned = target_nodes(request, settings)
    node = pinned or settings.stow_node
    if node is None:
        raise GatewayError("no node is configured to store to (gateway.stow_node)")
    return node, pinned


async def store(request: Request) -> Response:
    settings: Settings = request.app.state.settings
    negotiate_search(request)   # the response is DICOM JSON; an Accept without it is a 406
    study = request.path_params.get("study")
    if study is not None and not _is_uid(study):
        raise BadRequest(f"study UID {study!r} is not a valid UID")
    node, pinned = _node(request, settings)
    root, boundary = _content_type(request)
    workdir = Path(tempfile.mkdtemp(prefix="stow-", dir=request.app.state.spool.tmp))
    try:
        receiver = _Receiver(workdir)
        try:
            await _receive(request, mp.MultipartDecoder(boundary), receiver)
        except ClientDisconnect:
            log.info("STOW-RS client left during the upload; nothing stored")
            return Response(status_code=499)
        finally:
            receiver.close()
        if not receiver.parts and not receiver.truncated_headers:
            raise BadRequest(f"the body holds no part delimited by the boundary {boundary!r}")
        prepared = await run_in_threadpool(_prepare, receiver, root, study, workdir)
        items = [item for _, item, _ in prepared.entries if item is not None]
        results = iter(await request.app.state.pacs.store(node, items, workdir))
        outcomes: list[st.InstanceOutcome] = []
        for header, item, status in prepared.entries:
            code = next(results).status if item is not None else status
            assert code is not None
            outcomes.append(st.InstanceOutcome(
                header.sop_class if header else None, header.sop_instance if header else None, code,
                header.study if header else None, header.series if header else None))
    finally:
        await run_in_threadpool(shutil.rmtree, workdir, True)
    await _after_store(request.app.state.cache, settings, node, outcomes)
    base = dicomweb_base(request, settings, pinned)
    body = st.response_bytes(st.store_response(outcomes, base, study))
    stored = sum(1 for o in outcomes if st.is_stored(o.status))
    log.info("STOW-RS to %s: %d of %d instances stored", node.name, stored, len(outcomes))
    return Response(body, status_code=st.http_status(outcomes), media_type=DICOM_JSON)


async def _receive(request: Request, decoder: mp.MultipartDecoder, receiver: _Receiver) -> None:
    broken = False
    async for chunk in request.stream():
        if broken or not chunk:
            continue   # drain the rest, so that the client reads our answer
        try:
            receiver.apply(decoder.feed(chunk))
        except mp.MultipartError as exc:
            # Past this point the body cannot be split into parts; the parts before it are kept and
            # the one it broke off is reported as truncated.
            log.info("STOW-RS body stops being valid multipart: %s", exc)
            receiver.apply(exc.events)
            receiver.apply(decoder.close())
            broken = True
    if not broken:
        receiver.apply(decoder.close())


def _is_uid(value: str) -> bool:
    return 0 < len(value) <= 64 and all(p.isdigit() for p in value.split("."))


# ----------------------------------------------------------------------------- preparing (thread)


def _read_header(path: Path) -> tuple[_Header, str]:
    """The UIDs a C-STORE needs, and what the file needs before it can be sent ("", PREPEND, REWRITE).

    STOW-RS asks for PS3.10 files, but the Python dicomweb-client writes datasets built in memory
    without the preamble and ``DICM`` (``dcmwrite`` without ``enforce_file_format``), sometimes
    without a file meta at all: those are read with ``force`` and accepted when they carry their SOP
    UIDs. The chunked C-STORE takes the UIDs and the transfer syntax from the file meta: a good meta
    without the preamble just gets the preamble and ``DICM`` prepended (a copy, no decoding); a
    missing or inconsistent meta means a rewrite through pydicom.
    """
    try:
        ds = dcmread(path, stop_before_pixels=True)
        part10 = True
    except InvalidDicomError:
        with path.open("rb") as fh:
            start = fh.read(2)
        if start not in (b"\x02\x00", b"\x08\x00"):
            raise   # not a data set starting with its file meta or group 0008: not DICOM
        ds = dcmread(path, stop_before_pixels=True, force=True)
        part10 = False
    meta = ds.file_meta if "file_meta" in ds.__dict__ else FileMetaDataset()
    syntax = str(meta.get("TransferSyntaxUID", "") or "")
    if not syntax and not part10 and ds.original_encoding[0] is not None:
        syntax = {(True, True): IMPLICIT_VR_LE, (False, True): EXPLICIT_VR_LE,
                  (False, False): EXPLICIT_VR_BE}.get(ds.original_encoding, "")
    header = _Header(str(ds.get("SOPClassUID", "") or ""), str(ds.get("SOPInstanceUID", "") or ""), syntax,
                     str(ds.get("StudyInstanceUID", "") or ""), str(ds.get("SeriesInstanceUID", "") or ""))
    consistent = (str(meta.get("MediaStorageSOPClassUID", "")) == header.sop_class
                  and str(meta.get("MediaStorageSOPInstanceUID", "")) == header.sop_instance
                  and "TransferSyntaxUID" in meta)
    return header, "" if part10 and consistent else PREPEND if consistent else REWRITE


def _rewrite(path: Path, header: _Header, workdir: Path, how: str) -> Path:
    """The instance as a proper Part-10 file whose meta matches its data set."""
    if how == PREPEND:
        fd, name = tempfile.mkstemp(dir=workdir, suffix=".dcm")
        with open(fd, "wb") as out, path.open("rb") as src:
            out.write(b"\0" * 128 + b"DICM")
            shutil.copyfileobj(src, out, 1024 * 1024)
        return Path(name)
    ds = dcmread(path, force=True)
    meta = ds.file_meta if "file_meta" in ds.__dict__ else FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID(header.sop_class)
    meta.MediaStorageSOPInstanceUID = UID(header.sop_instance)
    meta.TransferSyntaxUID = UID(header.syntax)
    ds.file_meta = meta
    return _write(ds, workdir)


def _write(ds: Dataset, workdir: Path) -> Path:
    fd, name = tempfile.mkstemp(dir=workdir, suffix=".dcm")
    with open(fd, "wb") as fh:
        ds.save_as(fh, enforce_file_format=True)
    return Path(name)


def _header_or_none(path: Path) -> _Header | None:
    try:
        return _read_header(path)[0]
    except Exception:  # noqa: BLE001 - whatever is unreadable stays unknown
        return None


def _prepare(receiver: _Receiver, root: str, study: str | None, workdir: Path) -> _Prepared:
    prepared = _Prepared()
    parts = receiver.parts
    metadata_form = root == DICOM_JSON or any(p.media_type in METADATA_TYPES for p in parts)
    bulk = _BulkParts([p for p in parts if p.complete and p.media_type not in (DICOM, *METADATA_TYPES)])
    for part in parts:
        media = part.media_type or root or DICOM
        if not part.complete:
            # The body ended inside this part: report it, with its UIDs when its header arrived.
            header = _header_or_none(part.path) if media == DICOM else None
            prepared.fail(header, st.TRUNCATED)
        elif media == DICOM:
            _prepare_instance(prepared, part, study, workdir)
        elif media in METADATA_TYPES:
            _prepare_metadata(prepared, part, bulk, study, workdir)
        elif not metadata_form:
            prepared.fail(None, st.NOT_DICOM)   # e.g. text/plain among application/dicom parts
    if receiver.truncated_headers:
        prepared.fail(None, st.TRUNCATED)
    return prepared


def _check_study(prepared: _Prepared, header: _Header, study: str | None) -> bool:
    if study is not None and header.study != study:
        prepared.fail(header, st.STUDY_UID_MISMATCH)
        return False
    return True


def _prepare_instance(prepared: _Prepared, part: _Part, study: str | None, workdir: Path) -> None:
    try:
        header, fix = _read_header(part.path)
    except Exception:  # noqa: BLE001 - not DICOM, or not parseable at all
        prepared.fail(None, st.NOT_DICOM)
        return
    if not _is_uid(header.sop_class) or not _is_uid(header.sop_instance) or not header.syntax:
        prepared.fail(header if _is_uid(header.sop_instance) else None, st.NOT_DICOM)
        return
    if not _check_study(prepared, header, study):
        return
    path = part.path
    if fix:
        try:
            path = _rewrite(part.path, header, workdir, fix)
        except Exception:  # noqa: BLE001
            prepared.fail(header, st.NOT_DICOM)
            return
    prepared.store(header, StoreItem(path, header.sop_class, header.sop_instance, header.syntax))


class _BulkParts:
    """Bulk data parts by Content-Location: exact, or by path when one side is relative/absolute."""

    def __init__(self, parts: list[_Part]) -> None:
        self._exact: dict[str, _Part] = {}
        self._by_path: dict[str, _Part] = {}
        for part in parts:
            location = part.headers.get("content-location", "").strip()
            if location:
                self._exact.setdefault(location, part)
                self._by_path.setdefault(_path_of(location), part)

    def __call__(self, uri: str) -> tuple[bytes, str] | None:
        part = self._exact.get(uri) or self._by_path.get(_path_of(uri))
        if part is None:
            return None
        return part.path.read_bytes(), part.headers.get("content-type", "application/octet-stream")


def _path_of(uri: str) -> str:
    parts = urlsplit(uri)
    return parts.path + (f"?{parts.query}" if parts.query else "")


def _prepare_metadata(prepared: _Prepared, part: _Part, bulk: _BulkParts, study: str | None,
                      workdir: Path) -> None:
    try:
        datasets = orjson.loads(part.path.read_bytes())
    except orjson.JSONDecodeError:
        prepared.fail(None, st.BAD_METADATA)
        return
    if isinstance(datasets, dict):
        datasets = [datasets]
    if not isinstance(datasets, list) or not datasets:
        prepared.fail(None, st.BAD_METADATA)
        return
    for obj in datasets:
        try:
            ds = st.instance_from_json(obj, bulk)
        except st.MetadataError as exc:
            prepared.fail(_json_header(obj), exc.status)
            continue
        header = _Header(str(ds.SOPClassUID), str(ds.SOPInstanceUID),
                         str(ds.file_meta.TransferSyntaxUID), str(ds.get("StudyInstanceUID", "") or ""),
                         str(ds.get("SeriesInstanceUID", "") or ""))
        if not _check_study(prepared, header, study):
            continue
        try:
            path = _write(ds, workdir)
        except Exception:  # noqa: BLE001 - values pydicom cannot encode
            log.info("a STOW-RS metadata dataset could not be written as Part 10", exc_info=True)
            prepared.fail(header, st.BAD_METADATA)
            continue
        prepared.store(header, StoreItem(path, header.sop_class, header.sop_instance, header.syntax))


def _json_header(obj: object) -> _Header | None:
    """UIDs straight from a DICOM JSON object, for the failure item of one that could not be built."""
    if not isinstance(obj, dict):
        return None

    def first(tag: str) -> str:
        value = obj.get(tag, {}).get("Value") if isinstance(obj.get(tag), dict) else None
        return str(value[0]) if isinstance(value, list) and value else ""

    sop = first("00080018")
    if not sop:
        return None
    return _Header(first("00080016"), sop, "", first("0020000D"), first("0020000E"))


# ----------------------------------------------------------------------------- after the C-STORE


async def _after_store(cache: Cache, settings: Settings, node: PacsNode,
                       outcomes: list[st.InstanceOutcome]) -> None:
    """Bump query generations (cached searches of this node/study are stale) and record locations.

    A cache failure never fails the request: the instances are in the PACS already.
    """
    stored = [o for o in outcomes if st.is_stored(o.status) and o.study_uid]
    if not stored:
        return
    ttl = settings.cache.ttl.location
    studies = sorted({o.study_uid for o in stored if o.study_uid})
    series = {o.series_uid: o.study_uid for o in stored if o.series_uid and o.study_uid}
    try:
        await cache.incr(key("gen", node.name))
        for study in studies:
            await cache.incr(key("gen", node.name, study))
            await cache.sadd(key("loc", "study", study), [node.name], ttl)
        for uid, study in series.items():
            await cache.sadd(key("loc", "series", uid), [study], ttl)
            await cache.delete(key("meta", "series", study, uid))   # cached series metadata is stale
    except Exception:  # noqa: BLE001 - CacheError, Redis outage: degrade, never fail the request
        log.warning("STOW-RS: cache invalidation / location recording failed", exc_info=True)


def routes() -> list[Route]:
    return [
        Route("/studies", store, methods=["POST"]),
        Route("/studies/{study}", store, methods=["POST"]),
    ]
