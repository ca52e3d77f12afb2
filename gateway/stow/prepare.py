"""Received STOW-RS parts -> Part-10 instances ready for C-STORE, or their failure codes (blocking: run
it in a thread).

* ``application/dicom`` parts (PS3.18 §10.5.1.4.1), one at a time as each arrives
  (:func:`prepare_instance`): only the header is read for SOP class/instance, transfer syntax,
  study and series (the common case by :mod:`translators.part10_scan`, tens of microseconds, else
  pydicom with ``stop_before_pixels``); files that are not proper Part-10 are repaired
  (:func:`read_header`).
* Everything else once the body has ended (:func:`prepare_rest`): ``application/dicom+json`` parts
  (PS3.18 §10.5.1.4.2), each dataset an instance with the bulk data parts its BulkDataURIs name
  (matched by Content-Location, and a bulk part may come after its metadata), written as Part 10;
  parts of other types (bulk data, or not DICOM); the part the body ended in.

Each part gives its entries (one per instance, or none for a bulk data part), so that the response
(Annex I) lists them in request order. Failure codes are those of :mod:`translators.stow`.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import orjson
from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.errors import InvalidDicomError
from pydicom.uid import UID

from gateway.pacs import StoreItem
from gateway.stow.receive import Part, Received
from translators import part10_scan, syntaxes
from translators import stow as st
from translators.media import DICOM_JSON
from translators.uids import is_uid

log = logging.getLogger(__name__)

DICOM = "application/dicom"
METADATA_TYPES = (DICOM_JSON, "application/json")
ROOT_TYPES = ("", DICOM, DICOM_JSON)
"""The ``type`` parameters of ``multipart/related`` STOW-RS accepts ("": absent; PS3.18 §10.5.1.2)."""

PREPEND, REWRITE = "prepend", "rewrite"

# A data set without file meta, read with ``force``: (implicit VR, little endian) -> its syntax.
_ENCODINGS: dict[tuple[bool | None, bool | None], str] = {
    (True, True): syntaxes.IMPLICIT_VR_LE, (False, True): syntaxes.EXPLICIT_VR_LE,
    (False, False): syntaxes.EXPLICIT_VR_BE}


@dataclass(frozen=True)
class Header:
    """What the C-STORE and the response need of one instance ("" for what could not be read)."""

    sop_class: str
    sop_instance: str
    syntax: str
    study: str
    series: str


@dataclass(frozen=True)
class Entry:
    """One instance of the request: an item to store, or a failure code already."""

    header: Header | None
    item: StoreItem | None = None
    status: int | None = None


class Prepared:
    """The entries of one part, in the order of its instances."""

    def __init__(self) -> None:
        self.entries: list[Entry] = []

    def fail(self, header: Header | None, status: int) -> None:
        self.entries.append(Entry(header, status=status))

    def store(self, header: Header, item: StoreItem) -> None:
        self.entries.append(Entry(header, item=item))


def media_of(part: Part, root: str) -> str:
    """The part's media type; ``root`` (the request's ``type`` parameter, one of :data:`ROOT_TYPES`)
    for a part without a Content-Type."""
    return part.media_type or root or DICOM


def prepare_instance(part: Part, study: str | None, workdir: Path) -> list[Entry]:
    """A complete ``application/dicom`` part -> its entry. ``study``: the study of
    ``POST /studies/{study}`` (an instance of any other study fails with 0xA900)."""
    prepared = Prepared()
    _prepare_instance(prepared, part, study, workdir)
    return prepared.entries


def prepare_instance_inline(part: Part, study: str | None) -> list[Entry] | None:
    """:func:`prepare_instance` for the common case (a Part-10 file whose meta matches its data set,
    read by :mod:`translators.part10_scan` from its first 64 KiB: tens of microseconds, so cheaper
    on the event loop than a hop to a thread); None for anything else, which goes to
    :func:`prepare_instance` in a thread (pydicom, repairs)."""
    try:
        header = _scan_header(part.head(part10_scan.HEAD))
    except (part10_scan.Unscannable, OSError):
        return None
    prepared = Prepared()
    _accept(prepared, part, header, "", study, None)
    return prepared.entries


def prepare_rest(received: Received, deferred: Sequence[Part], root: str, study: str | None,
                 workdir: Path) -> tuple[dict[int, list[Entry]], list[Entry]]:
    """Once the body has ended: the entries of the ``deferred`` parts (every complete part that is
    not ``application/dicom``, in request order) and of the part the body ended in, by part index;
    and the entries that belong to no part (a part whose header block was cut off)."""
    parts = received.parts
    metadata_form = root == DICOM_JSON or any(p.media_type in METADATA_TYPES for p in parts)
    bulk = _BulkParts([p for p in parts if p.complete and p.media_type not in (DICOM, *METADATA_TYPES)])
    by_part: dict[int, list[Entry]] = {}
    for part in deferred:
        prepared = Prepared()
        if media_of(part, root) in METADATA_TYPES:
            _prepare_metadata(prepared, part, bulk, study, workdir)
        elif not metadata_form:
            prepared.fail(None, st.NOT_DICOM)   # e.g. text/plain among application/dicom parts
        by_part[part.index] = prepared.entries
    for part in parts:
        if not part.complete:
            # The body ended inside this part: report it, with its UIDs when its header arrived.
            header = _header_or_none(part) if media_of(part, root) == DICOM else None
            by_part[part.index] = [Entry(header, status=st.TRUNCATED)]
    trailing = [Entry(None, status=st.TRUNCATED)] if received.truncated_headers else []
    return by_part, trailing


# ----------------------------------------------------------------------------- application/dicom


def _text(ds: Dataset, keyword: str) -> str:
    return str(ds.get(keyword, "") or "")


_SOP_CLASS, _SOP_INSTANCE = 0x00080016, 0x00080018
_HEADER_TAGS = frozenset({_SOP_CLASS, _SOP_INSTANCE, part10_scan.STUDY_INSTANCE_UID,
                          part10_scan.SERIES_INSTANCE_UID})
_META_CLASS, _META_INSTANCE, _META_SYNTAX = 0x00020002, 0x00020003, 0x00020010


def _uid_text(raw: bytes | None) -> str:
    """A UI value as pydicom gives it (trailing NULs and spaces stripped); Unscannable for what
    pydicom would read otherwise (several values, bytes outside ASCII)."""
    if raw is None:
        return ""
    if b"\\" in raw or not raw.isascii():
        raise part10_scan.Unscannable("a UID value pydicom reads otherwise")
    return raw.decode("ascii").rstrip("\0 ")


def _scan_header(head: bytes) -> Header:
    """The common case without pydicom: a Part-10 file whose meta matches its data set, read from its
    first bytes (``head``, :data:`translators.part10_scan.HEAD` of them).
    :class:`translators.part10_scan.Unscannable` for anything else (the caller then reads it with
    pydicom, so the answer is the same, only slower)."""
    found = part10_scan.scan(head, _HEADER_TAGS, stop_after=part10_scan.SERIES_INSTANCE_UID)
    values, meta = found.values, found.meta
    header = Header(_uid_text(values.get(_SOP_CLASS)), _uid_text(values.get(_SOP_INSTANCE)),
                    _uid_text(meta.get(_META_SYNTAX)), _uid_text(values.get(part10_scan.STUDY_INSTANCE_UID)),
                    _uid_text(values.get(part10_scan.SERIES_INSTANCE_UID)))
    if (not header.syntax or _uid_text(meta.get(_META_CLASS)) != header.sop_class
            or _uid_text(meta.get(_META_INSTANCE)) != header.sop_instance):
        raise part10_scan.Unscannable("the file meta does not match the data set")
    return header


def read_header(path: Path) -> tuple[Header, str]:
    """The UIDs a C-STORE needs, and what the file needs before it can be sent ("", PREPEND, REWRITE).

    STOW-RS asks for PS3.10 files, but the Python dicomweb-client writes datasets built in memory
    without the preamble and ``DICM`` (``dcmwrite`` without ``enforce_file_format``), sometimes
    without a file meta at all: those are read with ``force`` and accepted when they carry their SOP
    UIDs. The C-STORE takes the UIDs and the transfer syntax from the file meta: a good meta without
    the preamble just gets the preamble and ``DICM`` prepended (a copy, no decoding); a missing or
    inconsistent meta means a rewrite through pydicom.
    """
    try:
        with path.open("rb") as fh:
            return _scan_header(fh.read(part10_scan.HEAD)), ""
    except part10_scan.Unscannable:
        pass
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
        syntax = _ENCODINGS.get(ds.original_encoding, "")
    header = Header(_text(ds, "SOPClassUID"), _text(ds, "SOPInstanceUID"), syntax,
                    _text(ds, "StudyInstanceUID"), _text(ds, "SeriesInstanceUID"))
    consistent = (str(meta.get("MediaStorageSOPClassUID", "")) == header.sop_class
                  and str(meta.get("MediaStorageSOPInstanceUID", "")) == header.sop_instance
                  and "TransferSyntaxUID" in meta)
    return header, "" if part10 and consistent else PREPEND if consistent else REWRITE


def repair(path: Path, header: Header, workdir: Path, how: str) -> Path:
    """The instance as a proper Part-10 file whose meta matches its data set (a new file)."""
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


def _header_or_none(part: Part) -> Header | None:
    try:
        return read_header(part.file())[0]
    except Exception:  # noqa: BLE001 - whatever is unreadable stays unknown
        return None


def _study_matches(prepared: Prepared, header: Header, study: str | None) -> bool:
    if study is not None and header.study != study:
        prepared.fail(header, st.STUDY_UID_MISMATCH)
        return False
    return True


def _prepare_instance(prepared: Prepared, part: Part, study: str | None, workdir: Path) -> None:
    try:
        header, fix = read_header(part.file())
    except Exception:  # noqa: BLE001 - not DICOM, or not parseable at all
        prepared.fail(None, st.NOT_DICOM)
        return
    _accept(prepared, part, header, fix, study, workdir)


def _accept(prepared: Prepared, part: Part, header: Header, fix: str, study: str | None,
            workdir: Path | None) -> None:
    if not is_uid(header.sop_class) or not is_uid(header.sop_instance) or not header.syntax:
        prepared.fail(header if is_uid(header.sop_instance) else None, st.NOT_DICOM)
        return
    if not _study_matches(prepared, header, study):
        return
    if fix:
        assert workdir is not None
        try:
            path = repair(part.file(), header, workdir, fix)
        except Exception:  # noqa: BLE001
            prepared.fail(header, st.NOT_DICOM)
            return
        item = StoreItem(path, header.sop_class, header.sop_instance, header.syntax)
    elif part.pieces is not None:   # sent from memory as received; a file only if a reader needs one
        item = StoreItem(None, header.sop_class, header.sop_instance, header.syntax,
                         pieces=part.pieces, materialize=part.file)
    else:
        item = StoreItem(part.file(), header.sop_class, header.sop_instance, header.syntax)
    prepared.store(header, item)


# ----------------------------------------------------------------------------- application/dicom+json


class _BulkParts:
    """Bulk data parts by Content-Location: exact, or by path when one side is relative/absolute."""

    def __init__(self, parts: list[Part]) -> None:
        self._exact: dict[str, Part] = {}
        self._by_path: dict[str, Part] = {}
        self._used: set[int] = set()
        for part in parts:
            location = part.headers.get("content-location", "").strip()
            if location:
                self._exact.setdefault(location, part)
                self._by_path.setdefault(_path_of(location), part)

    def __call__(self, uri: str) -> tuple[bytes, str] | None:
        part = self._exact.get(uri) or self._by_path.get(_path_of(uri))
        if part is None or id(part) in self._used:
            # Each bulk part is read once and fills one element: a second BulkDataURI naming the
            # same part would multiply the upload in memory and in the PACS (it fails that instance).
            return None
        self._used.add(id(part))
        return part.file().read_bytes(), part.headers.get("content-type", "application/octet-stream")


def _path_of(uri: str) -> str:
    parts = urlsplit(uri)
    return parts.path + (f"?{parts.query}" if parts.query else "")


def _prepare_metadata(prepared: Prepared, part: Part, bulk: _BulkParts, study: str | None,
                      workdir: Path) -> None:
    try:
        datasets: object = orjson.loads(part.file().read_bytes())
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
        header = Header(str(ds.SOPClassUID), str(ds.SOPInstanceUID), str(ds.file_meta.TransferSyntaxUID),
                        _text(ds, "StudyInstanceUID"), _text(ds, "SeriesInstanceUID"))
        if not _study_matches(prepared, header, study):
            continue
        try:
            path = _write(ds, workdir)
        except Exception as exc:  # noqa: BLE001 - values pydicom cannot encode
            # The type only: pydicom's messages quote element values, which may identify the patient.
            log.info("a STOW-RS metadata dataset could not be written as Part 10: %s", type(exc).__name__)
            prepared.fail(header, st.BAD_METADATA)
            continue
        prepared.store(header, StoreItem(path, header.sop_class, header.sop_instance, header.syntax))


def _json_header(obj: object) -> Header | None:
    """UIDs straight from a DICOM JSON object, for the failure item of one that could not be built."""
    if not isinstance(obj, dict):
        return None

    def first(tag: str) -> str:
        element = obj.get(tag)
        value = element.get("Value") if isinstance(element, dict) else None
        return str(value[0]) if isinstance(value, list) and value else ""

    sop = first("00080018")
    if not sop:
        return None
    return Header(first("00080016"), sop, "", first("0020000D"), first("0020000E"))
