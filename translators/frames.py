"""Frames of a stored Part-10 file: where they are, how to read them, how to label them.

Pure functions over a file object the caller opens (no sockets, no HTTP). WADO-RS frames and
pixel data (PS3.18 §10.4, media types §8.7.3.3, Table 8.7.3-5) are served from the spool file:

1. :func:`index_part10` parses the header once with pydicom (``stop_before_pixels``) and walks the
   Pixel Data element itself, giving a :class:`FrameIndex` of file offsets per frame. It is small
   and serialisable (:meth:`FrameIndex.to_json`) so it can be stored beside the spool file.
2. :func:`read_frame` returns one frame with one seek and one read per fragment: the native bytes
   (PS3.5 §8.1.1, §8.2) or the frame's fragments joined into one codestream (PS3.5 Annex A.4).
3. :func:`media_type_for_transfer_syntax` labels each part; :func:`transfer_syntaxes_for_media_type`
   is the inverse used in Accept negotiation.
4. When the client cannot take the stored encoding (e.g. :data:`CORNERSTONE_UNDECODABLE`),
   :mod:`translators.frame_transcode` re-encodes the frame or the whole file.

Errors (all ``ValueError``)::

    ValueError
     ├── FrameError       frame number outside 1..NumberOfFrames (client error, 400)
     ├── NotIndexable     the stored file's pixel data cannot be located or split (server side)
     └── TranscodeError   no decoder/encoder for the pair, or the codec refused this image
                          (raised by translators.frame_transcode; defined here with its siblings)

Out of scope: Explicit VR Big Endian and Deflated files (``NotIndexable``: transcode them with
:func:`translators.frame_transcode.transcode_part10` first), and frames that are not byte-aligned
are re-aligned by :func:`read_frame` only for Bits Allocated 1 native data.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import BinaryIO, TypeVar

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.errors import BytesLengthException, InvalidDicomError

from translators.syntaxes import DEFLATED_LE, ENCAPSULATED_UNCOMPRESSED, RLE_LOSSLESS
from translators.syntaxes import EXPLICIT_VR_BE as EXPLICIT_BE
from translators.syntaxes import EXPLICIT_VR_LE as EXPLICIT_LE
from translators.syntaxes import IMPLICIT_VR_LE as IMPLICIT_LE

__all__ = [
    "CORNERSTONE_UNDECODABLE", "FrameError", "FrameIndex", "NotIndexable", "TranscodeError",
    "index_part10", "media_type_for_transfer_syntax", "read_frame", "transfer_syntaxes_for_media_type",
]


class FrameError(ValueError):
    """A frame number outside ``1..number_of_frames``."""


class NotIndexable(ValueError):
    """The file's pixel data cannot be located or split into frames."""


class TranscodeError(ValueError):
    """The requested transcoding is not possible (no codec, or the codec refused the image)."""


_TS = IMPLICIT_LE


def _ts(*suffixes: str) -> tuple[str, ...]:
    return tuple(f"{_TS}.4.{s}" for s in suffixes)


# PS3.18 Table 8.7.3-5, media type -> transfer syntaxes, the RESTful default first.
_MEDIA_TYPES: dict[str, tuple[str, ...]] = {
    "application/octet-stream": (EXPLICIT_LE,),
    "image/jpeg": _ts("70", "50", "51", "57"),
    "image/dicom-rle": (RLE_LOSSLESS,),
    "image/jls": _ts("80", "81"),
    "image/jp2": _ts("90", "91"),
    "image/jpx": _ts("92", "93"),
    "image/jphc": _ts("201", "202", "203"),
    "image/jxl": _ts("110", "111", "112"),
    "video/mpeg": _ts("100", "100.1", "101", "101.1"),
    "video/mp4": _ts("102", "102.1", "103", "103.1", "104", "104.1", "105", "105.1", "106", "106.1"),
    "video/H265": _ts("107", "108"),
}
# Names some clients still send (cornerstone's wadors loader, older editions of PS3.18).
_ALIASES = {"image/x-dicom-rle": "image/dicom-rle", "image/x-jls": "image/jls"}
_BY_LOWER = {name.lower(): name for name in _MEDIA_TYPES}
_RETIRED_JPEG = _ts("52", "53", "54", "55", "56", "58", "59", "60", "61", "62", "63", "64", "65", "66")
NATIVE_ALL = (IMPLICIT_LE, EXPLICIT_LE, ENCAPSULATED_UNCOMPRESSED, DEFLATED_LE, EXPLICIT_BE)
_MEDIA_TYPE_OF: dict[str, str] = {
    **{ts: "application/octet-stream" for ts in NATIVE_ALL},
    **{ts: "image/jpeg" for ts in _RETIRED_JPEG},
    **{ts: name for name, uids in _MEDIA_TYPES.items() if name != "application/octet-stream" for ts in uids},
}
_VIDEO = frozenset(ts for name, uids in _MEDIA_TYPES.items() if name.startswith("video/") for ts in uids)

CORNERSTONE_UNDECODABLE: frozenset[str] = frozenset(_ts("92", "93")) | _VIDEO
"""Stored encodings cornerstone 5.x cannot decode (JPEG 2000 Part 2 multi-component, video): transcode
or refuse (docs/architecture.md, "Retrieval")."""

# Native little endian: split by arithmetic here, read as pixels without a codec by frame_transcode.
NATIVE_SOURCES = frozenset({IMPLICIT_LE, EXPLICIT_LE, DEFLATED_LE})

_PIXEL_TAGS = {0x7FE00010: "PixelData", 0x7FE00008: "FloatPixelData", 0x7FE00009: "DoubleFloatPixelData"}
_LONG_VRS = frozenset({b"OB", b"OW", b"OF", b"OD", b"OL", b"OV", b"UN"})
_ITEM = 0xFFFEE000
_SEQUENCE_DELIMITER = 0xFFFEE0DD
_UNDEFINED = 0xFFFFFFFF
# First bytes of a frame's codestream: JPEG / JPEG-LS SOI, JPEG 2000 SOC, jp2 signature box.
_START_MARKERS = (b"\xff\xd8", b"\xff\x4f", b"\x00\x00\x00\x0cjP  ")
_END_MARKER = b"\xff\xd9"  # JPEG / JPEG-LS EOI and JPEG 2000 EOC

Spans = tuple[tuple[tuple[int, int], ...], ...]
"""Per frame, the ``(file_offset, length)`` of its bytes or fragments."""


@dataclass(frozen=True)
class FrameIndex:
    """Where each frame of a stored instance lies in its file.

    ``frames[i]`` holds ``(file_offset, length)`` of frame ``i + 1``'s bytes: one span for native
    data, one per fragment (item value, item header excluded) for encapsulated data. For Bits
    Allocated 1 frames whose bit length is not a multiple of 8 the span covers the bytes holding
    the frame and :func:`read_frame` shifts the bits into place.
    """

    transfer_syntax: str
    encapsulated: bool
    number_of_frames: int
    pixel_offset: int
    pixel_length: int
    frames: Spans
    rows: int
    columns: int
    samples_per_pixel: int
    bits_allocated: int
    pixel_keyword: str = "PixelData"  # or FloatPixelData / DoubleFloatPixelData (7FE0,0008/0009)

    def to_json(self) -> bytes:
        doc = {
            "v": 1,
            "transfer_syntax": self.transfer_syntax,
            "encapsulated": self.encapsulated,
            "number_of_frames": self.number_of_frames,
            "pixel_offset": self.pixel_offset,
            "pixel_length": self.pixel_length,
            "frames": [[list(span) for span in frame] for frame in self.frames],
            "rows": self.rows,
            "columns": self.columns,
            "samples_per_pixel": self.samples_per_pixel,
            "bits_allocated": self.bits_allocated,
            "pixel_keyword": self.pixel_keyword,
        }
        return json.dumps(doc, separators=(",", ":")).encode()

    @classmethod
    def from_json(cls, b: bytes) -> FrameIndex:
        """Inverse of :meth:`to_json`; raises ``ValueError`` for anything else."""
        try:
            doc = json.loads(b)
            if doc.get("v") != 1:
                raise ValueError(f"unknown frame index version {doc.get('v')!r}")
            index = cls(
                transfer_syntax=_checked(doc["transfer_syntax"], str),
                encapsulated=_checked(doc["encapsulated"], bool),
                number_of_frames=_checked(doc["number_of_frames"], int),
                pixel_offset=_checked(doc["pixel_offset"], int),
                pixel_length=_checked(doc["pixel_length"], int),
                frames=tuple(
                    tuple((_checked(o, int), _checked(n, int)) for o, n in frame) for frame in doc["frames"]
                ),
                rows=_checked(doc["rows"], int),
                columns=_checked(doc["columns"], int),
                samples_per_pixel=_checked(doc["samples_per_pixel"], int),
                bits_allocated=_checked(doc["bits_allocated"], int),
                pixel_keyword=_checked(doc["pixel_keyword"], str),
            )
        except (KeyError, TypeError, AttributeError) as exc:
            raise ValueError(f"malformed frame index: {exc!r}") from exc
        if len(index.frames) != index.number_of_frames or index.pixel_keyword not in _PIXEL_TAGS.values():
            raise ValueError("malformed frame index")
        return index


_T = TypeVar("_T")


def _checked(value: object, kind: type[_T]) -> _T:
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise TypeError(f"expected {kind.__name__}, got {value!r}")
    return value


# --------------------------------------------------------------------------- indexing


def index_part10(fp: BinaryIO) -> FrameIndex | None:
    """Index the frames of the Part-10 file in ``fp``; ``None`` when it has no pixel data.

    Reads the header with pydicom up to (7FE0,0010) Pixel Data (or Float / Double Float Pixel
    Data), then the element header itself: 12 bytes in explicit VR, 8 in implicit VR (PS3.5 §7.1).
    Native data (PS3.5 §8.1.1, §8.2) is split by arithmetic; encapsulated data (undefined length,
    PS3.5 Annex A.4) by walking its items: the first is the Basic Offset Table, then one or more
    fragments per frame. Fragments are mapped to frames by, in order: the Extended Offset Table
    (7FE0,0001)/(7FE0,0002) (PS3.3 C.7.6.3.1.8); a single frame takes every fragment; as many
    fragments as frames maps 1:1; the Basic Offset Table; JPEG/JPEG 2000 start and end markers
    at fragment boundaries. Raises :class:`NotIndexable` when none of these gives
    NumberOfFrames frames, for Deflated and Big Endian files, and for truncated files.
    """
    try:
        return _index_part10(fp)
    except NotIndexable:
        raise
    # pydicom parses lazily: a corrupt header can fail in dcmread or on first access to an element.
    except (InvalidDicomError, BytesLengthException, EOFError, OSError, ValueError, NotImplementedError,
            KeyError, TypeError, struct.error) as exc:
        raise NotIndexable(f"not a readable DICOM file: {exc}") from exc


def _index_part10(fp: BinaryIO) -> FrameIndex | None:
    fp.seek(0, 2)
    size = fp.tell()
    fp.seek(0)
    header = dcmread(fp, stop_before_pixels=True)
    ts = str(header.file_meta.get("TransferSyntaxUID", ""))
    if not ts:
        raise NotIndexable("no (0002,0010) Transfer Syntax UID in the file meta information")
    if ts == DEFLATED_LE:
        raise NotIndexable("deflated data set: transcode_part10() it to Explicit VR Little Endian first")
    implicit, little = header.original_encoding
    if little is False or ts == EXPLICIT_BE:
        raise NotIndexable("big endian pixel data is not supported")

    start = fp.tell()
    head = fp.read(8)
    if len(head) < 8:
        return None
    group, element, length = struct.unpack("<HHL", head)
    if (group << 16 | element) not in _PIXEL_TAGS:
        return None
    value_offset = start + 8
    if not implicit and head[4:6] in _LONG_VRS:
        extra = fp.read(4)
        if len(extra) < 4:
            raise NotIndexable("truncated Pixel Data element header")
        (length,) = struct.unpack("<L", extra)
        value_offset = start + 12
    elif not implicit:
        length = struct.unpack("<H", head[6:8])[0]

    rows = header_int(header, "Rows")
    columns = header_int(header, "Columns")
    if rows < 1 or columns < 1:
        raise NotIndexable("missing or zero Rows / Columns")
    keyword = _PIXEL_TAGS[group << 16 | element]
    default_bits = {"FloatPixelData": 32, "DoubleFloatPixelData": 64}.get(keyword, 0)
    bits = header_int(header, "BitsAllocated", default_bits)
    if bits < 1 or (bits != 1 and bits % 8):
        raise NotIndexable(f"unsupported Bits Allocated {bits}")
    spp = header_int(header, "SamplesPerPixel", 1)
    nframes = max(header_int(header, "NumberOfFrames", 1), 1)

    if length != _UNDEFINED:
        if ts not in NATIVE_SOURCES:
            raise NotIndexable(f"defined-length Pixel Data in compressed transfer syntax {ts}")
        frame_bits = _frame_bits(rows, columns, spp, bits, str(header.get("PhotometricInterpretation", "")))
        frames = _native_spans(value_offset, length, frame_bits, nframes)
        if value_offset + length > size:
            raise NotIndexable("file ends inside the Pixel Data element")
        return FrameIndex(ts, False, nframes, value_offset, length, frames, rows, columns, spp, bits, keyword)

    items, end = _scan_items(fp, value_offset, size)
    if not items:
        raise NotIndexable("encapsulated Pixel Data has no Basic Offset Table item")
    bot, fragments = items[0], items[1:]
    if not fragments:
        raise NotIndexable("encapsulated Pixel Data has no fragments")
    grouped = _group_fragments(fp, header, bot, fragments, nframes)
    length = end - value_offset
    return FrameIndex(ts, True, len(grouped), value_offset, length, grouped, rows, columns, spp, bits,
                      keyword)


def header_int(ds: Dataset, keyword: str, default: int = 0) -> int:
    """An integer attribute of the image pixel module (``default`` when absent or empty; a value
    that is not an integer: :class:`NotIndexable`)."""
    value = ds.get(keyword)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except (TypeError, ValueError) as exc:
        raise NotIndexable(f"bad {keyword} value {value!r}") from exc


def _frame_bits(rows: int, columns: int, spp: int, bits: int, photometric: str = "") -> int:
    """Bits in one native frame (PS3.5 §8.1.1); YBR_FULL_422 stores 2 samples a pixel (PS3.3 C.7.6.3.1.2)."""
    if photometric == "YBR_FULL_422" and spp == 3:
        spp = 2
    return rows * columns * spp * bits


def _native_spans(offset: int, length: int, frame_bits: int, nframes: int) -> Spans:
    if (nframes * frame_bits + 7) // 8 > length:
        raise NotIndexable(f"Pixel Data holds {length} bytes, fewer than {nframes} frames need")
    spans = []
    for i in range(nframes):
        first, last = i * frame_bits // 8, ((i + 1) * frame_bits + 7) // 8
        spans.append(((offset + first, last - first),))
    return tuple(spans)


def _scan_items(fp: BinaryIO, offset: int, size: int) -> tuple[list[tuple[int, int]], int]:
    """``(value_offset, length)`` of each item up to the Sequence Delimitation Item (PS3.5 A.4)."""
    items: list[tuple[int, int]] = []
    pos = offset
    fp.seek(pos)
    while True:
        head = fp.read(8)
        if len(head) < 8:  # no delimiter before end of file: tolerate, as pydicom does
            return items, pos
        group, element, length = struct.unpack("<HHL", head)
        tag = group << 16 | element
        if tag == _SEQUENCE_DELIMITER:
            return items, pos
        if tag != _ITEM or length == _UNDEFINED:
            raise NotIndexable(f"unexpected ({group:04X},{element:04X}) in encapsulated Pixel Data at {pos}")
        if pos + 8 + length > size:
            raise NotIndexable("file ends inside an encapsulated Pixel Data item")
        items.append((pos + 8, length))
        pos += 8 + length
        fp.seek(pos)


def _group_fragments(
    fp: BinaryIO, header: Dataset, bot: tuple[int, int], fragments: list[tuple[int, int]], nframes: int
) -> Spans:
    # Offset-table offsets count from the first byte of the first fragment's item tag.
    origin = fragments[0][0] - 8
    if "ExtendedOffsetTable" in header:
        offsets = _uint64s(header.ExtendedOffsetTable)
        lengths = _uint64s(header.get("ExtendedOffsetTableLengths", b""))
        grouped = _by_offsets(fragments, offsets, origin)
        if grouped is None:
            raise NotIndexable("Extended Offset Table does not match the fragments")
        if len(lengths) == len(grouped):  # one fragment per frame (PS3.3 Table C.7-11a)
            pairs = zip(grouped, lengths, strict=True)
            grouped = tuple(((f[0][0], min(f[0][1], n)),) if len(f) == 1 else f for f, n in pairs)
        return grouped
    if nframes == 1:
        return (tuple(fragments),)
    if len(fragments) == nframes:
        return tuple((f,) for f in fragments)
    if bot[1]:
        fp.seek(bot[0])
        table = fp.read(bot[1])
        offsets = list(struct.unpack(f"<{len(table) // 4}L", table[: len(table) // 4 * 4]))
        grouped = _by_offsets(fragments, offsets, origin)
        if grouped is not None and len(grouped) == nframes:
            return grouped
    grouped = _by_markers(fp, fragments)
    if len(grouped) != nframes:
        raise NotIndexable(
            f"cannot split {len(fragments)} fragments into {nframes} frames: no usable offset table/markers"
        )
    return grouped


def _uint64s(raw: object) -> list[int]:
    data = bytes(raw) if isinstance(raw, bytes | bytearray) else b""
    return list(struct.unpack(f"<{len(data) // 8}Q", data[: len(data) // 8 * 8]))


def _by_offsets(
    fragments: Sequence[tuple[int, int]], offsets: Sequence[int], origin: int
) -> Spans | None:
    """Frames from offsets that must each fall on a fragment's item tag; ``None`` when they don't."""
    starts = {off - 8 - origin: i for i, (off, _) in enumerate(fragments)}
    try:
        firsts = [starts[o] for o in offsets]
    except KeyError:
        return None
    if not firsts or firsts[0] != 0 or any(a >= b for a, b in zip(firsts, firsts[1:], strict=False)):
        return None
    bounds = [*firsts, len(fragments)]
    return tuple(tuple(fragments[a:b]) for a, b in zip(bounds, bounds[1:], strict=False))


def _by_markers(fp: BinaryIO, fragments: Sequence[tuple[int, int]]) -> Spans:
    """Start a frame at a fragment opening with a start marker right after one ending a codestream."""
    frames: list[list[tuple[int, int]]] = []
    previous_ends = True
    for off, length in fragments:
        fp.seek(off)
        opening = fp.read(min(length, 12))
        if not frames or (previous_ends and opening.startswith(_START_MARKERS)):
            frames.append([])
        frames[-1].append((off, length))
        fp.seek(off + max(length - 10, 0))
        previous_ends = _END_MARKER in fp.read(min(length, 10))
    return tuple(tuple(f) for f in frames)


# --------------------------------------------------------------------------- reading


def read_frame(fp: BinaryIO, index: FrameIndex, number: int) -> bytes:
    """Frame ``number`` (1-based, PS3.18 §10.4.1.1.3) as stored.

    Native data: the frame's bytes (PS3.5 §8.1.1), Bits Allocated 1 frames realigned to start at
    bit 0 of their first byte with unused high bits zero. Encapsulated data: the frame's
    fragments concatenated into one codestream, fragment padding kept (PS3.5 A.4, §8.2).
    """
    if isinstance(number, bool) or not isinstance(number, int) or not 1 <= number <= index.number_of_frames:
        raise FrameError(f"frame {number!r} is not in 1..{index.number_of_frames}")
    chunks = []
    for offset, length in index.frames[number - 1]:
        fp.seek(offset)
        chunk = fp.read(length)
        if len(chunk) != length:
            raise NotIndexable("the file is shorter than its frame index")
        chunks.append(chunk)
    data = b"".join(chunks)
    bits = _frame_bits(index.rows, index.columns, index.samples_per_pixel, index.bits_allocated)
    if index.encapsulated or bits % 8 == 0:
        return data
    shift = (number - 1) * bits % 8
    value = (int.from_bytes(data, "little") >> shift) & ((1 << bits) - 1)
    return value.to_bytes((bits + 7) // 8, "little")


# --------------------------------------------------------------------------- media types


def media_type_for_transfer_syntax(ts: str) -> str:
    """The bulk data media type of a frame in ``ts`` (PS3.18 Table 8.7.3-5).

    Native syntaxes and unknown ones give ``application/octet-stream``; always send the
    ``transfer-syntax`` parameter too (docs/architecture.md, "HTTP edge").
    """
    return _MEDIA_TYPE_OF.get(ts, "application/octet-stream")


def transfer_syntaxes_for_media_type(media_type: str) -> list[str]:
    """Transfer syntaxes of a bulk data media type, the RESTful default first (PS3.18 Table 8.7.3-5).

    Parameters are ignored and case does not matter; unknown types give ``[]``.
    """
    name = media_type.split(";", 1)[0].strip().lower()
    name = _BY_LOWER.get(_ALIASES.get(name, name), "")
    return list(_MEDIA_TYPES.get(name, ()))
