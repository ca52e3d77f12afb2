"""Accept negotiation for WADO-RS (PS3.18 §8.7.8, §8.7.3, Table 10.4.4-1).

Order of precedence, decided before any DIMSE work (docs/architecture.md, "Retrieval"):

1. the ``accept`` query parameter (its media ranges, by q-value),
2. else the ``Accept`` header (by q-value),
3. else a wildcard range matching the resource category -> that category's default,
4. else :class:`NotAcceptableMedia` (406).

Quoted and unquoted parameter values are equivalent (``type="application/dicom"`` ==
``type=application/dicom``; ``transfer-syntax="*"`` == ``transfer-syntax=*``); ranges are split on
commas outside quotes. An absent Accept header accepts anything (the category default).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from pydicom.uid import UID

from translators.frame_transcode import can_transcode
from translators.frames import (
    CORNERSTONE_UNDECODABLE,
    media_type_for_transfer_syntax,
    transfer_syntaxes_for_media_type,
)
from translators.syntaxes import ANY as ANY_TS
from translators.syntaxes import EXPLICIT_VR_LE, IMPLICIT_VR_LE, LOSSY
from translators.uids import is_uid

Category = Literal["instance", "metadata", "frames", "bulkdata", "rendered"]
DICOM_JSON = "application/dicom+json"

# Compressed bulk media types (PS3.18 Table 8.7.3-5); the first TS of each is its default.
COMPRESSED_TYPES: dict[str, tuple[str, ...]] = {
    "image/jpeg": ("1.2.840.10008.1.2.4.70", "1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.4.51",
                   "1.2.840.10008.1.2.4.57"),
    "image/dicom-rle": ("1.2.840.10008.1.2.5",),
    "image/x-dicom-rle": ("1.2.840.10008.1.2.5",),
    "image/jls": ("1.2.840.10008.1.2.4.80", "1.2.840.10008.1.2.4.81"),
    "image/x-jls": ("1.2.840.10008.1.2.4.80", "1.2.840.10008.1.2.4.81"),
    "image/jp2": ("1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.4.91"),
    "image/jpx": ("1.2.840.10008.1.2.4.92", "1.2.840.10008.1.2.4.93"),
    "image/jphc": ("1.2.840.10008.1.2.4.201", "1.2.840.10008.1.2.4.202", "1.2.840.10008.1.2.4.203"),
    "video/mpeg": ("1.2.840.10008.1.2.4.100", "1.2.840.10008.1.2.4.101"),
    "video/mp4": ("1.2.840.10008.1.2.4.102", "1.2.840.10008.1.2.4.103", "1.2.840.10008.1.2.4.104",
                  "1.2.840.10008.1.2.4.105", "1.2.840.10008.1.2.4.106", "1.2.840.10008.1.2.4.107",
                  "1.2.840.10008.1.2.4.108"),
}
OHIF_ALIASES = {"image/dicom+jpeg": "image/jpeg", "image/dicom+jp2": "image/jp2",
                "image/dicom+jpx": "image/jpx", "image/dicom+jls": "image/jls"}
RENDERED_TYPES = ("image/jpeg", "image/png", "image/gif")


class NotAcceptableMedia(ValueError):
    """Nothing the client accepts can be produced (-> 406)."""


@dataclass(frozen=True)
class MediaRange:
    type: str                      # e.g. "multipart/related", "application/dicom", "*/*"
    params: tuple[tuple[str, str], ...]
    q: float = 1.0

    def param(self, name: str) -> str | None:
        return next((v for k, v in self.params if k == name), None)


@dataclass(frozen=True)
class Selection:
    """What to send: ``multipart`` or single-part, the part media type and the transfer syntax
    (a UID, or ``*`` = as stored)."""

    multipart: bool
    media_type: str
    transfer_syntax: str | None
    explicit_ts: bool = False      # the client named the transfer syntax (vs. the media type's default)


def _split_outside_quotes(text: str, sep: str) -> list[str]:
    parts: list[str] = []
    buf: list[str] = []
    quoted = False
    for ch in text:
        if ch == '"':
            quoted = not quoted
        if ch == sep and not quoted:
            parts.append("".join(buf))
            buf = []
        else:
            buf.append(ch)
    parts.append("".join(buf))
    return parts


def parse_accept(header: str) -> list[MediaRange]:
    """RFC 7231 media ranges, highest q first (stable for equal q). Quotes are removed."""
    ranges: list[tuple[int, MediaRange]] = []
    for position, raw in enumerate(_split_outside_quotes(header, ",")):
        pieces = [p.strip() for p in _split_outside_quotes(raw, ";")]
        if not pieces or not pieces[0]:
            continue
        mtype = pieces[0].lower()
        params: list[tuple[str, str]] = []
        q = 1.0
        for piece in pieces[1:]:
            if "=" not in piece:
                continue
            name, _, value = piece.partition("=")
            name = name.strip().lower()
            value = value.strip().strip('"').strip()
            if name == "q":
                try:
                    q = float(value)
                except ValueError:
                    q = 0.0
                continue
            params.append((name, value if name == "transfer-syntax" else value.lower()))
        if q > 0:
            ranges.append((position, MediaRange(mtype, tuple(params), q)))
    ranges.sort(key=lambda pr: (-pr[1].q, pr[0]))
    return [r for _, r in ranges]


def _wildcard_for(mrange: MediaRange, category: Category) -> bool:
    if mrange.type in ("*/*", "*"):
        return True
    if mrange.type == "multipart/related":
        inner = mrange.param("type") or "*/*"
        return inner in ("*/*", "*", "application/*", "image/*")
    major = mrange.type.split("/")[0]
    return mrange.type.endswith("/*") and (major == "image" and category == "rendered"
                                          or major == "application" and category != "rendered")


def _instance_choice(mrange: MediaRange, single_item: bool) -> Selection | None:
    if mrange.type == "multipart/related":
        inner = mrange.param("type")
        ts = mrange.param("transfer-syntax")
        if inner == "application/dicom":
            return Selection(True, "application/dicom", ts or EXPLICIT_VR_LE, ts is not None)
        if inner in ("application/octet-stream",):
            return Selection(True, "application/octet-stream", ts or EXPLICIT_VR_LE, ts is not None)
        inner = OHIF_ALIASES.get(inner or "", inner)
        if inner in COMPRESSED_TYPES:
            return Selection(True, inner, ts or COMPRESSED_TYPES[inner][0], ts is not None)
        return None
    if mrange.type == "application/dicom" and single_item:
        ts = mrange.param("transfer-syntax")
        return Selection(False, "application/dicom", ts or EXPLICIT_VR_LE, ts is not None)
    return None


def _bulk_choice(mrange: MediaRange, single_item: bool) -> Selection | None:
    ts = mrange.param("transfer-syntax")
    if mrange.type == "multipart/related":
        inner = OHIF_ALIASES.get(mrange.param("type") or "", mrange.param("type") or "")
        if inner == "application/octet-stream":
            return Selection(True, inner, ts or EXPLICIT_VR_LE, ts is not None)
        if inner in COMPRESSED_TYPES:
            return Selection(True, inner, ts or COMPRESSED_TYPES[inner][0], ts is not None)
        return None
    mtype = OHIF_ALIASES.get(mrange.type, mrange.type)
    if single_item and mtype == "application/octet-stream":
        return Selection(False, mtype, ts or EXPLICIT_VR_LE, ts is not None)
    if single_item and mtype in COMPRESSED_TYPES:
        return Selection(False, mtype, ts or COMPRESSED_TYPES[mtype][0], ts is not None)
    return None


_DEFAULTS: dict[str, Selection] = {
    "instance": Selection(True, "application/dicom", EXPLICIT_VR_LE),
    "metadata": Selection(False, "application/dicom+json", None),
    # Bulk data default (docs/architecture.md, "Retrieval"): stored encoding, each part labelled with
    # its real type.
    "frames": Selection(True, "application/octet-stream", ANY_TS),
    "bulkdata": Selection(True, "application/octet-stream", ANY_TS),
    "rendered": Selection(False, "image/jpeg", None),
}


def negotiate(category: Category, *, accept_param: str | None, accept_header: str | None,
              single_item: bool = False) -> Selection:
    """Pick the response media type for a WADO-RS resource (PS3.18 §8.7.8). Raises NotAcceptableMedia."""
    sources = [s for s in (accept_param, accept_header) if s is not None and s.strip()]
    if not sources:
        return _DEFAULTS[category]
    for source in sources:
        ranges = parse_accept(source)
        for mrange in ranges:
            choice = _choose(category, mrange, single_item)
            if choice is not None and deliverable(choice):
                return choice
        for mrange in ranges:
            if _wildcard_for(mrange, category):
                return _DEFAULTS[category]
    raise NotAcceptableMedia(f"none of the accepted media types ({'; '.join(sources)}) can be produced "
                             f"for a {category} resource")


def deliverable(selection: Selection) -> bool:
    """Whether the selection's transfer syntax can be delivered at all, decided before any DIMSE
    (PS3.18 §8.7.3.5): ``*``, or a transfer syntax UID that belongs to the part's media type
    (Table 8.7.3-5); for application/dicom any transfer syntax (it may be the stored one)."""
    ts = selection.transfer_syntax
    if ts is None or ts == ANY_TS:
        return True
    if not is_uid(ts) or not UID(ts).is_transfer_syntax:
        return False
    if selection.media_type == "application/dicom":
        return True
    if selection.media_type == "application/octet-stream":
        return ts in (EXPLICIT_VR_LE, IMPLICIT_VR_LE)
    return ts in transfer_syntaxes_for_media_type(selection.media_type)


def _choose(category: Category, mrange: MediaRange, single_item: bool) -> Selection | None:
    if category == "instance":
        return _instance_choice(mrange, single_item)
    if category == "metadata":
        if mrange.type in ("application/dicom+json", "application/json"):
            return _DEFAULTS["metadata"]
        return None
    if category in ("frames", "bulkdata"):
        return _bulk_choice(mrange, single_item)
    if mrange.type in RENDERED_TYPES:
        return Selection(False, mrange.type, None)
    return None


# ---------------------------------------------------------------------- what to send (one rule each)


def instance_syntax(stored: str, requested: str | None, *, explicit: bool) -> str | None:
    """The transfer syntax to send a whole stored instance in (PS3.18 §8.7.3.5).

    ``requested``: the negotiated syntax (None: the media type's default, Explicit VR LE);
    ``explicit``: the client named it. Rules, in order: ``*`` sends the stored encoding, except that
    Implicit VR LE is never sent to a web client (§8.7.3: Explicit VR LE instead, same values); the
    stored syntax as requested is sent as is; lossy data is not decompressed for a default request
    (the loss is done, decoding only multiplies bytes); otherwise transcode when possible. None
    when the client named a syntax the instance cannot be transcoded to (406); a default request
    that cannot be honoured gets the stored encoding.
    """
    target = requested or EXPLICIT_VR_LE
    if target == ANY_TS:
        return EXPLICIT_VR_LE if stored == IMPLICIT_VR_LE else stored
    if target == stored:
        return stored
    if not explicit and stored in LOSSY:
        return stored
    if can_transcode(stored, target):
        return target
    return None if explicit else stored


def frame_media(stored: str, requested: str | None) -> tuple[str, str]:
    """(part media type, transfer syntax) for frames and pixel data (PS3.18 Table 8.7.3-5).

    ``*`` keeps the stored encoding, as its own media type, except Implicit VR LE (sent as the same
    little-endian bytes labelled Explicit VR LE) and encodings cornerstone cannot decode (sent
    decoded, as application/octet-stream).
    """
    target = requested or EXPLICIT_VR_LE
    if target == ANY_TS:
        if stored == IMPLICIT_VR_LE or stored in CORNERSTONE_UNDECODABLE:
            return "application/octet-stream", EXPLICIT_VR_LE
        return media_type_for_transfer_syntax(stored), stored
    return media_type_for_transfer_syntax(target), target
