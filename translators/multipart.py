"""multipart/related (RFC 2387) for DICOMweb: a streaming encoder (PS3.18 §8.7.3.5.1).

Byte layout follows dicomweb-notes §3.4, which the strict client parsers need: no preamble, the
first line is ``--<boundary>``, exact ``Content-Type:`` / ``Content-Location:`` header casing, CRLF
before every delimiter, a random boundary long enough never to occur inside pixel data.
"""

from __future__ import annotations

import secrets


def new_boundary() -> str:
    return f"dwg-{secrets.token_hex(16)}"


def content_type(part_type: str, boundary: str, transfer_syntax: str | None = None) -> str:
    """The response Content-Type: ``multipart/related; type="<part type>"; boundary=<b>``."""
    value = f'multipart/related; type="{part_type}"; boundary={boundary}'
    if transfer_syntax:
        value += f"; transfer-syntax={transfer_syntax}"
    return value


def part_header(boundary: str, media_type: str, *, transfer_syntax: str | None = None,
                location: str | None = None, first: bool = False, length: int | None = None) -> bytes:
    """Delimiter + headers + blank line of one part. ``first``: no CRLF before the first delimiter."""
    lines = [f"--{boundary}"]
    ctype = media_type + (f"; transfer-syntax={transfer_syntax}" if transfer_syntax else "")
    lines.append(f"Content-Type: {ctype}")
    if location:
        lines.append(f"Content-Location: {location}")
    if length is not None:
        lines.append(f"Content-Length: {length}")
    text = "\r\n".join(lines) + "\r\n\r\n"
    return (b"" if first else b"\r\n") + text.encode("ascii")


def closing(boundary: str) -> bytes:
    return f"\r\n--{boundary}--\r\n".encode("ascii")
