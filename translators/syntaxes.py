"""Transfer syntax UIDs (PS3.5 §10, PS3.6 Annex A) and the groupings the gateway decides by.

The one home of these constants: the DIMSE edge (which contexts to propose or accept), the WADO
services (what to send a web client) and STOW (what a part is encoded in) all import them here.
"""

from __future__ import annotations

_TS = "1.2.840.10008.1.2"

IMPLICIT_VR_LE = _TS
EXPLICIT_VR_LE = f"{_TS}.1"
ENCAPSULATED_UNCOMPRESSED = f"{_TS}.1.98"
DEFLATED_LE = f"{_TS}.1.99"
EXPLICIT_VR_BE = f"{_TS}.2"
RLE_LOSSLESS = f"{_TS}.5"
JPEG_BASELINE = f"{_TS}.4.50"
JPEG_EXTENDED = f"{_TS}.4.51"
JPEG_LOSSLESS = f"{_TS}.4.57"
JPEG_LOSSLESS_SV1 = f"{_TS}.4.70"
JPEG_LS_LOSSLESS = f"{_TS}.4.80"
JPEG_LS_NEAR_LOSSLESS = f"{_TS}.4.81"
JPEG_2000_LOSSLESS = f"{_TS}.4.90"
JPEG_2000 = f"{_TS}.4.91"

ANY = "*"
"""``transfer-syntax=*`` in an Accept header: the stored encoding (PS3.18 §8.7.3.5.2)."""

NATIVE: tuple[str, ...] = (EXPLICIT_VR_LE, IMPLICIT_VR_LE)
"""The uncompressed little-endian syntaxes every Storage SCP accepts (PS3.4 B.2), Explicit first:
Implicit VR LE must not reach web clients (PS3.18 §8.7.3), so it is only ever a fallback."""

LEGACY: tuple[str, ...] = (DEFLATED_LE, EXPLICIT_VR_BE)
"""Accepted as a last resort, never proposed first."""

COMPRESSED_PREFERENCE: tuple[str, ...] = (
    RLE_LOSSLESS, JPEG_LOSSLESS_SV1, JPEG_BASELINE, JPEG_2000_LOSSLESS, JPEG_2000, JPEG_LS_LOSSLESS,
    JPEG_LS_NEAR_LOSSLESS, JPEG_EXTENDED, JPEG_LOSSLESS, DEFLATED_LE,
)
"""Compressed syntaxes a C-GET proposes, each in a context of its own, most common first."""


def _jpeg(*suffixes: str) -> frozenset[str]:
    return frozenset(f"{_TS}.4.{s}" for s in suffixes)


LOSSY: frozenset[str] = _jpeg("50", "51", "81", "91", "93", "100", "101", "102", "103", "104", "105", "106",
                              "107", "108", "203")
"""Lossy encodings: never decompressed unasked (the loss is done; decoding only multiplies bytes)."""
