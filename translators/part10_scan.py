"""A few top-level values of a Part-10 file, read without pydicom: the ingest fast path.

Every instance a retrieval brings is looked at twice on its way into the spool: its Study and Series
Instance UIDs when no manifest vouches for it yet (:mod:`gateway.retrieval.membership`) and its
frame index (:func:`translators.frames.index_part10`). pydicom builds a whole ``Dataset`` for that,
~0.6-0.9 ms of GIL-held time per instance on the association's thread, more than receiving the
instance costs (docs/architecture.md, "DIMSE edge"). The data set walk here reads element headers
with ``struct`` and keeps the raw values of the tags asked for: tens of microseconds.

It covers the common case only and says so: :class:`Unscannable` for anything else (no preamble,
Big Endian or Deflated data, an encoding the element headers contradict, an undefined-length
element that is not a sequence, data ending early, nesting past :data:`MAX_DEPTH`), and the
callers then use pydicom, so results never differ from the pydicom path; only the time does.

Encodings (PS3.5 §7.1): the File Meta Information is Explicit VR Little Endian (PS3.10 §7.1); the
data set Implicit VR Little Endian for ``1.2.840.10008.1.2``, Explicit VR Little Endian for every
other standard syntax but Big Endian and Deflated. Sequences of undefined length are walked item by
item (PS3.5 §7.5); an explicit ``UN`` of undefined length (PS3.5 §6.2.2) is left to pydicom.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable
from dataclasses import dataclass, field

from translators import frames as fr
from translators.syntaxes import DEFLATED_LE, EXPLICIT_VR_BE, EXPLICIT_VR_LE, IMPLICIT_VR_LE

__all__ = ["HEAD", "Scan", "Unscannable", "data_set_offset", "index_native", "scan", "study_series"]

HEAD = 64 << 10
"""Bytes of a file to hand to :func:`scan` for its header: the file meta and the top-level elements
before the pixel data (headers are ~2-20 KiB; a longer one is Unscannable and goes to pydicom)."""
STUDY_INSTANCE_UID = 0x0020000D
SERIES_INSTANCE_UID = 0x0020000E
_SAMPLES, _PHOTOMETRIC, _FRAMES = 0x00280002, 0x00280004, 0x00280008
_ROWS, _COLUMNS, _BITS = 0x00280010, 0x00280011, 0x00280100
_IMAGE_TAGS = frozenset({_SAMPLES, _PHOTOMETRIC, _FRAMES, _ROWS, _COLUMNS, _BITS})
_PIXEL_TAGS = frozenset({0x7FE00008, 0x7FE00009, 0x7FE00010})
_TS_TAG = 0x00020010
_ITEM, _ITEM_END, _SEQUENCE_END = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD
_UNDEFINED = 0xFFFFFFFF
MAX_DEPTH = 16
"""Nested sequences walked before giving up (pydicom has no such limit; it only costs time)."""
_STANDARD = "1.2.840.10008.1.2."
# PS3.5 Table 7.1-1: VRs with a 2-byte reserved field and a 4-byte length in Explicit VR.
_LONG = frozenset({b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"})
_SHORT = frozenset({b"AE", b"AS", b"AT", b"CS", b"DA", b"DS", b"DT", b"FD", b"FL", b"IS", b"LO", b"LT", b"PN",
                    b"SH", b"SL", b"SS", b"ST", b"TM", b"UI", b"UL", b"US"})
_TAG_LEN = struct.Struct("<HHI")        # implicit element / item header: group, element, 4-byte length
_EXPLICIT = struct.Struct("<HH2sH")     # explicit element header: group, element, VR, 2-byte length
_U32 = struct.Struct("<I")
_U16 = struct.Struct("<H")


class Unscannable(ValueError):
    """Not on the fast path: the caller reads the file with pydicom instead."""


@dataclass
class Scan:
    """What :func:`scan` found: the transfer syntax, raw values, and the pixel element if reached."""

    transfer_syntax: str
    values: dict[int, bytes] = field(default_factory=dict)
    meta: dict[int, bytes] = field(default_factory=dict)   # raw values of the file meta (group 0002)
    pixel_tag: int | None = None
    pixel_offset: int = 0      # offset of the pixel element's value
    pixel_length: int = 0      # its length field (0xFFFFFFFF: undefined, encapsulated)


def scan(data: bytes | memoryview, wanted: frozenset[int], *, stop_after: int = 0xFFFFFFFF) -> Scan:
    """Walk the top level of the Part-10 bytes ``data`` until an element past ``stop_after``, a pixel
    data element, or the end; keep the raw values of ``wanted`` top-level tags. ``data`` may be the
    head of a file: running out before the stop raises :class:`Unscannable`."""
    view = memoryview(data).cast("B")
    if len(view) < 144 or bytes(view[128:132]) != b"DICM":
        raise Unscannable("no Part-10 preamble")
    pos, ts, meta = _file_meta(view)
    if ts == IMPLICIT_VR_LE:
        implicit = True
    elif ts.startswith(_STANDARD) and ts not in (EXPLICIT_VR_BE, DEFLATED_LE):
        implicit = False
    else:
        raise Unscannable(f"transfer syntax {ts} is not read here")
    found = Scan(ts, meta=meta)
    end = len(view)
    if implicit and pos + 6 <= end and bytes(view[pos + 4:pos + 6]) in _LONG | _SHORT:
        # pydicom reads such a data set as explicit whatever the meta says: leave it to pydicom
        raise Unscannable("an implicit VR data set that looks explicit")
    while pos < end:
        tag, vr, length, header = _element(view, pos, implicit)
        if tag > stop_after:
            return found
        if tag in _PIXEL_TAGS:
            found.pixel_tag, found.pixel_offset, found.pixel_length = tag, pos + header, length
            return found
        value = pos + header
        if length == _UNDEFINED:
            if vr not in (b"SQ", None):
                raise Unscannable(f"undefined length on a {vr!r} element")
            pos = _skip_sequence(view, value, implicit, 1)
            continue
        if value + length > end:
            raise Unscannable("data ends inside an element")
        if tag in wanted:
            found.values[tag] = bytes(view[value:value + length])
        pos = value + length
    if stop_after != 0xFFFFFFFF:
        raise Unscannable("data ended before the tags asked for")
    return found


def head_of(pieces: Iterable[bytes | bytearray | memoryview], size: int = HEAD) -> bytes:
    """The first ``size`` bytes of a file held as a sequence of pieces (fewer when it is shorter):
    what :func:`scan` and :func:`data_set_offset` read, copied from as few pieces as hold them."""
    head = bytearray()
    for piece in pieces:
        if len(head) >= size:
            break
        head += memoryview(piece).cast("B")[:size - len(head)]
    return bytes(head)


def data_set_offset(head: bytes | memoryview) -> int:
    """Where the data set of a Part-10 file starts: after the preamble, ``DICM`` and the group 0002
    elements (PS3.10 §7.1), from the file's first bytes (:data:`HEAD` hold any real file meta).
    :class:`Unscannable` for bytes that are not a Part-10 file with a transfer syntax in its meta."""
    view = memoryview(head).cast("B")
    if len(view) < 132 or bytes(view[128:132]) != b"DICM":
        raise Unscannable("no Part-10 preamble")
    offset = _file_meta(view)[0]
    if offset + 8 > len(view):   # the meta ran to the end of the head: not a data set in sight
        raise Unscannable("no data set after the file meta information")
    return offset


def _file_meta(view: memoryview) -> tuple[int, str, dict[int, bytes]]:
    """Read the group 0002 elements (Explicit VR LE): the data set's offset, the transfer syntax and
    the raw values of the meta."""
    pos, meta = 132, {}
    end = len(view)
    while pos + 8 <= end and _U16.unpack_from(view, pos)[0] == 0x0002:
        tag, vr, length, header = _element(view, pos, False)
        if length == _UNDEFINED or pos + header + length > end:
            raise Unscannable("malformed file meta information")
        meta[tag] = bytes(view[pos + header:pos + header + length])
        pos += header + length
    ts = _text(meta.get(_TS_TAG))
    if not ts:
        raise Unscannable("no transfer syntax in the file meta information")
    return pos, ts, meta


def _element(view: memoryview, pos: int, implicit: bool) -> tuple[int, bytes | None, int, int]:
    """(tag, VR or None, length, header size) of the element at ``pos``."""
    if pos + 8 > len(view):
        raise Unscannable("data ends inside an element header")
    if implicit:
        group, element, length = _TAG_LEN.unpack_from(view, pos)
        return group << 16 | element, None, length, 8
    group, element, vr, short = _EXPLICIT.unpack_from(view, pos)
    tag = group << 16 | element
    if group == 0xFFFE:
        raise Unscannable("an item tag where an element was expected")
    if vr in _LONG:
        if pos + 12 > len(view):
            raise Unscannable("data ends inside an element header")
        return tag, vr, _U32.unpack_from(view, pos + 8)[0], 12
    if vr in _SHORT:
        return tag, vr, short, 8
    raise Unscannable(f"unknown VR {vr!r}: the header contradicts the transfer syntax")


def _skip_sequence(view: memoryview, pos: int, implicit: bool, depth: int) -> int:
    """Offset after an undefined-length sequence starting at ``pos`` (its first item)."""
    if depth > MAX_DEPTH:
        raise Unscannable("sequences nested too deep")
    end = len(view)
    while True:
        if pos + 8 > end:
            raise Unscannable("data ends inside a sequence")
        group, element, length = _TAG_LEN.unpack_from(view, pos)
        tag = group << 16 | element
        pos += 8
        if tag == _SEQUENCE_END:
            return pos
        if tag != _ITEM:
            raise Unscannable("a sequence holds something other than items")
        if length != _UNDEFINED:
            pos += length
            continue
        while True:   # an undefined-length item: its elements up to the item delimiter
            if pos + 8 > end:
                raise Unscannable("data ends inside an item")
            if _U32.unpack_from(view, pos)[0] == 0xE00DFFFE:   # (FFFE,E00D) little endian
                pos += 8
                break
            _, vr, length, header = _element(view, pos, implicit)
            pos += header
            if length == _UNDEFINED:
                if vr not in (b"SQ", None):
                    raise Unscannable(f"undefined length on a {vr!r} element")
                pos = _skip_sequence(view, pos, implicit, depth + 1)
            else:
                pos += length


def _text(raw: bytes | None) -> str:
    return "" if raw is None else raw.decode("ascii", "replace").rstrip("\x00 ")


def study_series(data: bytes | memoryview) -> tuple[str, str]:
    """Study and Series Instance UID of the Part-10 bytes ("" for one absent); :class:`Unscannable`
    when this fast path does not cover them."""
    found = scan(data, frozenset({STUDY_INSTANCE_UID, SERIES_INSTANCE_UID}), stop_after=SERIES_INSTANCE_UID)
    return _text(found.values.get(STUDY_INSTANCE_UID)), _text(found.values.get(SERIES_INSTANCE_UID))


def _us(values: dict[int, bytes], tag: int, default: int) -> int:
    raw = values.get(tag)
    if not raw:
        return default
    if len(raw) != 2:
        raise Unscannable("a US value that is not one 16-bit number")
    return int(_U16.unpack(raw)[0])


def index_native(head: bytes | memoryview, size: int) -> fr.FrameIndex | None:
    """The frame index of a native (uncompressed, defined-length) Part-10 file whose first bytes are
    ``head`` and whose size is ``size``: what :func:`translators.frames.index_part10` gives for it.
    :class:`Unscannable` for everything else (encapsulated data, no pixel data, a value that pydicom
    would read or reject otherwise): the caller then uses ``index_part10``."""
    found = scan(head, _IMAGE_TAGS)
    tag = found.pixel_tag
    if tag is None or found.pixel_length == _UNDEFINED:
        raise Unscannable("no native pixel data in the head")
    if found.transfer_syntax not in (EXPLICIT_VR_LE, IMPLICIT_VR_LE):
        raise Unscannable("pixel data of another transfer syntax")
    values = found.values
    keyword = fr._PIXEL_TAGS[tag]
    rows, columns = _us(values, _ROWS, 0), _us(values, _COLUMNS, 0)
    bits = _us(values, _BITS, {"FloatPixelData": 32, "DoubleFloatPixelData": 64}.get(keyword, 0))
    spp = _us(values, _SAMPLES, 1)
    frames_text = _text(values.get(_FRAMES))
    if frames_text and not frames_text.isdigit():
        raise Unscannable("a Number of Frames pydicom would read otherwise")
    nframes = max(int(frames_text or 1), 1)
    if rows < 1 or columns < 1 or bits < 1 or (bits != 1 and bits % 8):
        raise Unscannable("image values the pydicom path reports")
    offset, length = found.pixel_offset, found.pixel_length
    frame_bits = fr._frame_bits(rows, columns, spp, bits, _text(values.get(_PHOTOMETRIC)))
    if offset + length > size or (nframes * frame_bits + 7) // 8 > length:
        raise Unscannable("pixel data shorter than its frames: the pydicom path reports it")
    return fr.FrameIndex(found.transfer_syntax, False, nframes, offset, length,
                         fr._native_spans(offset, length, frame_bits, nframes), rows, columns, spp, bits,
                         keyword)
