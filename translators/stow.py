"""STOW-RS: per-instance outcomes -> Store Instances Response (PS3.18 §10.5.3, Annex I), and the
metadata + bulk data request form -> a Part-10 dataset (PS3.18 §10.5.1.4.2).

Pure: no I/O. The gateway collects one :class:`InstanceOutcome` per part it received (a C-STORE
status from the PACS, or a failure code of its own for parts it could not send) and this module
turns them into the response body and the HTTP status of Table 10.5.3-1.

Failure Reason values (Annex I Table I.2-2; C-STORE statuses PS3.4 B.2.3) are the PACS's own status
when the PACS answered; otherwise the gateway uses these documented codes:

=======  ===========================================================================================
0x0110   Processing failure: the association ended (abort, timeout, connection lost) before the PACS
         confirmed this instance, or the gateway failed internally. Never reported as stored.
0x0122   Referenced SOP Class not supported: the PACS accepted no presentation context for it.
0xA900   The instance's Study Instance UID does not match the study of ``POST /studies/{study}``
         (Table I.2-2 "data set does not match SOP class" range; the instance does not belong to
         the targeted study). A conflict: 409 when nothing was stored.
0xC000   Cannot understand: the part is not a DICOM Part-10 instance (no preamble/``DICM``, no SOP
         Class/Instance UID), or its media type is not one STOW-RS accepts.
0xC001   Cannot understand: the request body ended inside this part (truncated upload).
0xC002   Cannot understand: a metadata dataset that cannot be made into an instance (bad DICOM JSON,
         bulk data it references that is not in the request, compressed multi-frame bulk data).
0xC122   Referenced Transfer Syntax not supported: the PACS refused the instance's transfer syntax
         and the gateway could not transcode it to one the PACS accepted.
=======  ===========================================================================================

Warning Reason (00081196) is the PACS's warning status: B000 coercion of data elements, B006
elements discarded, B007 data set does not match SOP class (or another warning code it sent).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import orjson
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import UID

from translators.frames import transfer_syntaxes_for_media_type
from translators.syntaxes import EXPLICIT_VR_LE

PROCESSING_FAILURE = 0x0110
SOP_CLASS_NOT_SUPPORTED = 0x0122
STUDY_UID_MISMATCH = 0xA900
NOT_DICOM = 0xC000
TRUNCATED = 0xC001
BAD_METADATA = 0xC002
TRANSFER_SYNTAX_NOT_SUPPORTED = 0xC122

# General DIMSE warnings (PS3.7 C.4) and the C-STORE warning range (PS3.4 B.2.3).
_WARNINGS = frozenset({0x0001, 0x0107, 0x0116})

RETRIEVE_URL = "00081190"
FAILED_SOP_SEQUENCE = "00081198"
REFERENCED_SOP_SEQUENCE = "00081199"
REFERENCED_SOP_CLASS_UID = "00081150"
REFERENCED_SOP_INSTANCE_UID = "00081155"
WARNING_REASON = "00081196"
FAILURE_REASON = "00081197"


@dataclass(frozen=True)
class InstanceOutcome:
    """What happened to one part of the request. UIDs are None when they could not be read."""

    sop_class_uid: str | None
    sop_instance_uid: str | None
    status: int
    study_uid: str | None = None
    series_uid: str | None = None


def is_warning(status: int) -> bool:
    return status in _WARNINGS or 0xB000 <= status <= 0xBFFF


def is_stored(status: int) -> bool:
    """Success or warning: the PACS has the instance (PS3.4 B.2.3)."""
    return status == 0x0000 or is_warning(status)


def _bad_syntax(status: int) -> bool:
    # "Cannot understand" (Cxxx), except C122 which is the PACS refusing a transfer syntax.
    return 0xC000 <= status <= 0xCFFF and status != TRANSFER_SYNTAX_NOT_SUPPORTED


def http_status(outcomes: Sequence[InstanceOutcome]) -> int:
    """PS3.18 Table 10.5.3-1.

    200: every instance stored without warning. 202: some stored, with warnings or failures for
    others (also: all stored, some with warnings). 400: none stored and every failure is bad syntax
    (or the request held no part at all). 409: none stored for any other reason (conflict: study
    mismatch, unsupported SOP class or transfer syntax, PACS refusals, or a mixture).
    """
    if not outcomes:
        return 400
    stored = [o for o in outcomes if is_stored(o.status)]
    if stored:
        clean = len(stored) == len(outcomes) and all(o.status == 0 for o in stored)
        return 200 if clean else 202
    if all(_bad_syntax(o.status) for o in outcomes):
        return 400
    return 409


def _value(vr: str, *values: object) -> dict[str, Any]:
    present = [v for v in values if v is not None]
    return {"vr": vr, "Value": present} if present else {"vr": vr}


def study_url(base_url: str, study: str) -> str:
    return f"{base_url}/studies/{study}"


def instance_url(base_url: str, study: str, series: str, sop: str) -> str:
    return f"{base_url}/studies/{study}/series/{series}/instances/{sop}"


def store_response(outcomes: Iterable[InstanceOutcome], base_url: str,
                   target_study: str | None = None) -> dict[str, Any]:
    """The Store Instances Response Module (Annex I Table I.1-1) as a DICOM JSON object (Annex F).

    Retrieve URL (0008,1190, type 2): the targeted study, else the one study every stored instance
    belongs to, else empty. Referenced SOP Sequence: stored instances, each with its instance
    Retrieve URL and, for warnings, Warning Reason. Failed SOP Sequence: the rest, with Failure
    Reason. UIDs that could not be read are sent as empty values.
    """
    referenced: list[dict[str, Any]] = []
    failed: list[dict[str, Any]] = []
    studies: set[str] = set()
    for o in outcomes:
        item: dict[str, Any] = {
            REFERENCED_SOP_CLASS_UID: _value("UI", o.sop_class_uid),
            REFERENCED_SOP_INSTANCE_UID: _value("UI", o.sop_instance_uid),
        }
        if is_stored(o.status):
            if o.study_uid and o.series_uid and o.sop_instance_uid:
                item[RETRIEVE_URL] = _value(
                    "UR", instance_url(base_url, o.study_uid, o.series_uid, o.sop_instance_uid))
                studies.add(o.study_uid)
            if o.status != 0:
                item[WARNING_REASON] = _value("US", o.status)
            referenced.append(item)
        else:
            item[FAILURE_REASON] = _value("US", o.status)
            failed.append(item)
    study = target_study or (next(iter(studies)) if len(studies) == 1 else None)
    response: dict[str, Any] = {RETRIEVE_URL: _value("UR", study_url(base_url, study) if study else None)}
    if failed:
        response[FAILED_SOP_SEQUENCE] = {"vr": "SQ", "Value": failed}
    if referenced:
        response[REFERENCED_SOP_SEQUENCE] = {"vr": "SQ", "Value": referenced}
    return response


def response_bytes(response: dict[str, Any]) -> bytes:
    """DICOM JSON bytes. :func:`store_response` builds its objects with the tags in ascending order
    (Annex F.2.1.1) and ``vr`` before ``Value``, like the rest of the gateway's DICOM JSON."""
    return orjson.dumps(response)


# --------------------------------------------------------------------------- metadata + bulk data


class MetadataError(ValueError):
    """A metadata dataset that cannot become an instance; ``status`` is its Failure Reason."""

    def __init__(self, message: str, status: int = BAD_METADATA) -> None:
        super().__init__(message)
        self.status = status


BulkLookup = Callable[[str], tuple[bytes, str] | None]
"""BulkDataURI -> (the bytes of the part whose Content-Location matches, its Content-Type)."""

_PIXEL_DATA = "7FE00010"


def instance_from_json(obj: object, bulk: BulkLookup) -> Dataset:
    """One dataset of an ``application/dicom+json`` STOW part -> a dataset with file meta.

    Bulk data referenced by BulkDataURI comes from the request's other parts (PS3.18 §10.5.1.4.2).
    Uncompressed (``application/octet-stream``) bulk data is little endian and stored as Explicit VR
    Little Endian; a compressed pixel data part (``image/jpeg``, ``image/jls``, ... with an optional
    ``transfer-syntax`` parameter) is encapsulated as the single frame of a single-frame instance.
    Group 0002 in the JSON is ignored (the file meta is built here). Raises MetadataError.
    """
    if not isinstance(obj, dict):
        raise MetadataError("a metadata item is not a DICOM JSON object")
    body = {k: v for k, v in obj.items() if not (isinstance(k, str) and k.upper().startswith("0002"))}
    pixel_media: list[str] = []
    missing: list[str] = []

    def handler(tag: str, vr: str, uri: str) -> bytes:
        found = bulk(uri)
        if found is None:
            missing.append(uri)
            return b""
        data, media = found
        if tag.upper() == _PIXEL_DATA:
            pixel_media.append(media)
        return data

    try:
        ds = Dataset.from_json(body, bulk_data_uri_handler=handler)
    except Exception as exc:  # noqa: BLE001 - pydicom raises many kinds on malformed JSON
        raise MetadataError(f"invalid DICOM JSON: {type(exc).__name__}") from None
    if missing:
        raise MetadataError(f"bulk data not in the request: {', '.join(missing[:3])}")
    sop_class = str(ds.get("SOPClassUID", "") or "")
    sop_instance = str(ds.get("SOPInstanceUID", "") or "")
    if not sop_class or not sop_instance:
        raise MetadataError("the metadata has no SOP Class UID or SOP Instance UID", NOT_DICOM)
    syntax = EXPLICIT_VR_LE
    media = pixel_media[0].split(";", 1)[0].strip().lower() if pixel_media else ""
    if media and media != "application/octet-stream":
        syntax = _compressed_syntax(pixel_media[0])
        if int(ds.get("NumberOfFrames", 1) or 1) > 1:
            raise MetadataError("compressed bulk data is supported for single-frame instances only")
        ds.PixelData = encapsulate([ds.PixelData])
        ds["PixelData"].VR = "OB"
        ds["PixelData"].is_undefined_length = True
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID(sop_class)
    meta.MediaStorageSOPInstanceUID = UID(sop_instance)
    meta.TransferSyntaxUID = UID(syntax)
    ds.file_meta = meta
    return ds


def _compressed_syntax(content_type: str) -> str:
    params = {}
    for item in content_type.split(";")[1:]:
        name, _, value = item.partition("=")
        params[name.strip().lower()] = value.strip().strip('"')
    syntaxes = transfer_syntaxes_for_media_type(content_type)
    syntax = params.get("transfer-syntax") or (syntaxes[0] if syntaxes else "")
    if not syntax or (syntaxes and syntax not in syntaxes):
        raise MetadataError(f"unsupported bulk data media type {content_type!r}",
                            TRANSFER_SYNTAX_NOT_SUPPORTED)
    return syntax
