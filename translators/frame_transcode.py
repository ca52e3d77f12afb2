"""Transcoding of stored pixel data: whether a transfer syntax can be served, and re-encoding into it.

Pure functions (no sockets, no HTTP) over what :mod:`translators.frames` locates and reads. When the
client cannot take the stored encoding (e.g. :data:`translators.frames.CORNERSTONE_UNDECODABLE`, or
a transfer syntax named in Accept; docs/architecture.md, "Retrieval"):

- :func:`can_transcode` says whether a source/target transfer syntax pair is possible here: any
  decodable source to native little endian or to an installed lossless encoder (PS3.5 §8.2);
- :func:`transcode_frame` re-encodes one frame from :func:`translators.frames.read_frame`;
- :func:`transcode_part10` re-encodes a whole Part-10 file (PS3.10 §7.1), every other element kept.

The two transcoders raise :class:`translators.frames.TranscodeError` (a ``ValueError``) when there
is no decoder/encoder for the pair or the codec refused this image; it is defined beside
``FrameError`` and ``NotIndexable`` so a frames request handles the one error family.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from functools import cache
from io import BytesIO
from typing import Any

import numpy as np
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate
from pydicom.pixels.decoders.base import get_decoder
from pydicom.pixels.encoders.base import get_encoder
from pydicom.pixels.utils import decompress, pack_bits
from pydicom.uid import UID

# The syntax groups and the header reader are shared with indexing, so both agree on "native".
from translators.frames import NATIVE_ALL, NATIVE_SOURCES, FrameIndex, TranscodeError, header_int
from translators.syntaxes import EXPLICIT_VR_LE as EXPLICIT_LE
from translators.syntaxes import IMPLICIT_VR_LE as IMPLICIT_LE
from translators.syntaxes import JPEG_2000_LOSSLESS, JPEG_LS_LOSSLESS, RLE_LOSSLESS

__all__ = ["TranscodeError", "can_transcode", "transcode_frame", "transcode_part10"]

# What pydicom can write: native little endian, and only lossless encodings, since lossy
# re-encoding needs quality parameters a WADO request cannot carry.
_NATIVE_TARGETS = frozenset({IMPLICIT_LE, EXPLICIT_LE})
_LOSSLESS_TARGETS = frozenset({RLE_LOSSLESS, JPEG_LS_LOSSLESS, JPEG_2000_LOSSLESS})


@cache
def _decodable(ts: str) -> bool:
    if ts in NATIVE_SOURCES:
        return True
    if ts in NATIVE_ALL:  # big endian, encapsulated uncompressed: no pydicom path to native LE
        return False
    try:
        return bool(get_decoder(ts).is_available)
    except (NotImplementedError, ValueError):
        return False


@cache
def _encodable(ts: str) -> bool:
    if ts in _NATIVE_TARGETS:
        return True
    if ts not in _LOSSLESS_TARGETS:
        return False
    try:
        return bool(get_encoder(ts).is_available)
    except (NotImplementedError, ValueError):
        return False


def can_transcode(source_ts: str, target_ts: str) -> bool:
    """Whether stored ``source_ts`` pixel data can be delivered in ``target_ts`` here.

    True for the identity, any decodable source (native little endian, or a compressed syntax with
    an installed pydicom decoder) to Explicit/Implicit VR Little Endian, and to the lossless
    encodings with an installed encoder: RLE Lossless (pydicom), JPEG-LS Lossless (pyjpegls),
    JPEG 2000 Lossless (pylibjpeg-openjpeg). Lossy targets other than the identity are refused.
    """
    return source_ts == target_ts or (_decodable(source_ts) and _encodable(target_ts))


@contextmanager
def _codec_errors(what: str) -> Iterator[None]:
    # pydicom and its plugins raise RuntimeError, ValueError, AttributeError, NotImplementedError...:
    # translate them once, here.
    try:
        yield
    except TranscodeError:
        raise
    except Exception as exc:
        raise TranscodeError(f"{what}: {exc}") from exc


def transcode_frame(frame: bytes, index: FrameIndex, header: Dataset, target_ts: str) -> bytes:
    """One frame from :func:`read_frame`, re-encoded in ``target_ts`` (PS3.5 §8.2, Annex A.4).

    ``header`` supplies Bits Stored, Pixel Representation, Photometric Interpretation and Planar
    Configuration. Native output is pixel-interleaved (Planar Configuration 0) little endian;
    decoded YCbCr (compressed, or native YBR_FULL_422) becomes RGB, as pydicom's ``decompress``
    does, so a client must then be told Photometric Interpretation RGB. Compressed output is one
    codestream (lossless only).
    Raises :class:`TranscodeError` when :func:`can_transcode` is false or the codec fails (e.g.
    JPEG 2000 encoding of images under 32x32 pixels, JPEG-LS of more than 16 bits).
    """
    source = index.transfer_syntax
    if not can_transcode(source, target_ts):
        raise TranscodeError(f"cannot transcode {source} to {target_ts}")
    if source == target_ts or (source in NATIVE_SOURCES and target_ts in _NATIVE_TARGETS):
        return frame
    opts = _pixel_options(index, header)
    native = source in NATIVE_SOURCES
    with _codec_errors(f"decoding a {source} frame"):
        decoder = get_decoder(EXPLICIT_LE if native else source)
        src = frame if native else encapsulate([frame])
        # YCbCr is converted to RGB except for native YBR_FULL, a valid input for every encoder here.
        as_rgb = not native or opts["photometric_interpretation"] == "YBR_FULL_422"
        arr, meta = decoder.as_array(src, index=0, **{**opts, "as_rgb": as_rgb})
    if target_ts in _NATIVE_TARGETS:
        return _native_bytes(arr, index.bits_allocated, int(opts["pixel_representation"]))
    opts.update(photometric_interpretation=meta["photometric_interpretation"], planar_configuration=0)
    with _codec_errors(f"encoding a frame as {target_ts}"):
        return bytes(get_encoder(target_ts).encode(arr, **opts))


def _pixel_options(index: FrameIndex, header: Dataset) -> dict[str, Any]:
    spp = index.samples_per_pixel
    photometric = header.get("PhotometricInterpretation") or ("MONOCHROME2" if spp == 1 else "RGB")
    return {
        "rows": index.rows,
        "columns": index.columns,
        "samples_per_pixel": spp,
        "bits_allocated": index.bits_allocated,
        "bits_stored": header_int(header, "BitsStored", index.bits_allocated),
        "pixel_representation": header_int(header, "PixelRepresentation", 0),
        "photometric_interpretation": str(photometric),
        "planar_configuration": header_int(header, "PlanarConfiguration", 0),
        "number_of_frames": 1,
        "pixel_keyword": index.pixel_keyword,
    }


def _native_bytes(arr: np.ndarray[Any, Any], bits_allocated: int, pixel_representation: int) -> bytes:
    if bits_allocated == 1:
        return bytes(pack_bits(arr))
    if arr.dtype.kind in "iu":
        kind = "i" if pixel_representation else "u"
        arr = arr.astype(f"<{kind}{bits_allocated // 8}", copy=False)
    else:
        arr = arr.astype(arr.dtype.newbyteorder("<"), copy=False)
    return arr.tobytes()


def transcode_part10(data: bytes, target_ts: str) -> bytes:
    """The Part-10 file ``data`` re-encoded in ``target_ts`` (PS3.10 §7.1, PS3.5 §8.2, Annex A.4).

    Compressed pixel data is decompressed (YCbCr lossy JPEG becomes RGB) and, for a compressed
    target, recompressed with pydicom's ``Dataset.compress``; every other element is kept, the
    SOP Instance UID included, and the file meta Transfer Syntax UID is updated. The identity
    returns ``data`` unchanged. Raises :class:`TranscodeError` when not possible.
    """
    with _codec_errors("reading the instance"):
        ds = dcmread(BytesIO(data))
    source = str(ds.file_meta.get("TransferSyntaxUID", ""))
    if source == target_ts:
        return data
    if not can_transcode(source, target_ts):
        raise TranscodeError(f"cannot transcode {source} to {target_ts}")
    has_pixels = "PixelData" in ds
    if target_ts not in _NATIVE_TARGETS and ("FloatPixelData" in ds or "DoubleFloatPixelData" in ds):
        raise TranscodeError("float pixel data has no compressed transfer syntax (PS3.5 §8.2)")
    with _codec_errors(f"transcoding {source} to {target_ts}"):
        if has_pixels and source not in NATIVE_SOURCES:
            decompress(ds, as_rgb=True, generate_instance_uid=False)
            for keyword in ("ExtendedOffsetTable", "ExtendedOffsetTableLengths"):
                if keyword in ds:
                    del ds[keyword]
        if has_pixels and target_ts not in _NATIVE_TARGETS:
            arr = None
            if ds.get("PhotometricInterpretation") == "YBR_FULL_422":  # subsampled (PS3.3 C.7.6.3.1.2)
                arr = ds.pixel_array  # as RGB, like the frames
                ds.PhotometricInterpretation, ds.PlanarConfiguration = "RGB", 0
            ds.compress(target_ts, arr, generate_instance_uid=False)
        ds.file_meta.TransferSyntaxUID = UID(target_ts)
        out = BytesIO()
        ds.save_as(out, enforce_file_format=True, implicit_vr=target_ts == IMPLICIT_LE, little_endian=True)
    return out.getvalue()
