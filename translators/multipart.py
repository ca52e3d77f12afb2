"""multipart/related (RFC 2387) for DICOMweb: a streaming encoder (PS3.18 §8.7.3.5.1).

The byte layout is what the strict client parsers need (docs/architecture.md, "HTTP edge"): no
preamble, the first line is ``--<boundary>``, exact ``Content-Type:`` / ``Content-Location:`` header
casing, CRLF before every delimiter, a random boundary long enough never to occur inside pixel data.
"""

from __future__ import annotations

import re
import secrets
from dataclasses import dataclass


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


# --------------------------------------------------------------------------- decoding
#
# An incremental, push-style decoder for request bodies (STOW-RS, PS3.18 §10.5.1.4; RFC 2046 §5.1.1,
# RFC 2387). It accepts what real clients send (docs/architecture.md, "STOW-RS"): a quoted or unquoted
# boundary, a preamble (OHIF and the Python dicomweb-client start with CRLF), transport padding after a
# delimiter, no CRLF after the close delimiter, any epilogue (OHIF's JS client leaves NUL bytes there),
# header names in any case. It never holds more than one part's header block plus a delimiter's length of
# data: the caller gets the body of each part in pieces and writes them wherever it likes.

MAX_HEADER_BYTES = 16384
"""A part's header block larger than this is a malformed body, not a reason to buffer more."""


class MultipartError(ValueError):
    """The body is not multipart/related as announced (bad Content-Type parameters, oversized headers).

    Raised by :meth:`MultipartDecoder.feed`, ``events`` holds what that call decoded before the error.
    """

    def __init__(self, message: str, events: list[Event] | None = None) -> None:
        super().__init__(message)
        self.events: list[Event] = events or []


@dataclass(frozen=True, slots=True)
class PartStart:
    """A part begins; ``headers`` has lower-case names (RFC 2045 names are case-insensitive)."""

    headers: dict[str, str]


@dataclass(frozen=True, slots=True)
class PartData:
    data: bytes | memoryview   # a view of the fed chunk where no copy was needed


@dataclass(frozen=True, slots=True)
class PartEnd:
    pass


@dataclass(frozen=True, slots=True)
class Truncated:
    """The body ended before the close delimiter.

    ``in_part``: a part had begun (its PartStart was emitted, or some of its header block had
    arrived) and never ended; its data is incomplete. False when the body merely stopped between
    parts (after a delimiter with nothing behind it, or before any delimiter at all).
    """

    reason: str
    in_part: bool


Event = PartStart | PartData | PartEnd | Truncated

_PREAMBLE, _HEADERS, _BODY, _AFTER_DELIMITER, _EPILOGUE = range(5)


def parse_media_type(value: str) -> tuple[str, dict[str, str]]:
    """``type/subtype`` (lower case) and its parameters (names lower case, values unquoted).

    Quoted values may contain ``;`` and backslash escapes (RFC 2045 §5.1, RFC 7230 §3.2.6).
    """
    items: list[str] = []
    current: list[str] = []
    quoted = escaped = False
    for ch in value:
        if escaped:
            current.append(ch)
            escaped = False
        elif quoted and ch == "\\":
            current.append(ch)
            escaped = True
        elif ch == '"':
            quoted = not quoted
            current.append(ch)
        elif ch == ";" and not quoted:
            items.append("".join(current))
            current = []
        else:
            current.append(ch)
    items.append("".join(current))
    media = items[0].strip().lower()
    params: dict[str, str] = {}
    for item in items[1:]:
        name, sep, raw = item.partition("=")
        name = name.strip().lower()
        if not sep or not name:
            continue
        raw = raw.strip()
        if len(raw) >= 2 and raw[0] == raw[-1] == '"':
            raw = re.sub(r"\\(.)", r"\1", raw[1:-1])
        params[name] = raw
    return media, params


def boundary_from_content_type(content_type: str) -> str:
    """The ``boundary`` parameter of a multipart Content-Type, quoted or not (RFC 2046 §5.1.1)."""
    media, params = parse_media_type(content_type)
    if not media.startswith("multipart/"):
        raise MultipartError(f"not a multipart media type: {media!r}")
    boundary = params.get("boundary", "")
    if not boundary:
        raise MultipartError("the multipart Content-Type has no boundary parameter")
    if len(boundary) > 200 or any(ord(c) < 0x20 or ord(c) > 0x7E for c in boundary):
        raise MultipartError("the multipart boundary is not 1-200 printable ASCII characters")
    return boundary


def _parse_headers(block: bytes) -> dict[str, str]:
    headers: dict[str, str] = {}
    last: str | None = None
    for line in block.decode("latin-1").split("\r\n"):
        if not line:
            continue
        if line[0] in " \t" and last is not None:   # obsolete line folding (RFC 5322 §3.2.2)
            headers[last] += " " + line.strip()
            continue
        name, sep, value = line.partition(":")
        if not sep:
            continue   # not a header line; tolerated like other lenient parsers do
        last = name.strip().lower()
        value = value.strip()
        headers[last] = f"{headers[last]}, {value}" if last in headers else value
    return headers


_SLICE = 4096   # bytes of a chunk taken into the decoder's buffer at a time outside part bodies


class MultipartDecoder:
    """Feed body bytes in any chunking; get the same events whatever the chunk boundaries.

    >>> d = MultipartDecoder("b")
    >>> d.feed(b"--b\\r\\nContent-Type: application/dicom\\r\\n\\r\\nDATA\\r\\n--b--")
    [PartStart(headers={'content-type': 'application/dicom'}), PartData(data=b'DATA'), PartEnd()]
    >>> d.close()
    []
    """

    def __init__(self, boundary: str) -> None:
        if not boundary:
            raise MultipartError("empty multipart boundary")
        self._dash_boundary = b"--" + boundary.encode("latin-1")
        self._delimiter = b"\r\n" + self._dash_boundary
        self._buf = bytearray()
        self._state = _PREAMBLE
        self._at_start = True   # nothing discarded yet: a delimiter may open the body without CRLF
        self._closed = False
        self.parts = 0   # parts started so far

    @property
    def done(self) -> bool:
        """The close delimiter has been seen; whatever follows is epilogue and ignored."""
        return self._state == _EPILOGUE

    def feed(self, data: bytes) -> list[Event]:
        if self._closed:
            raise MultipartError("feed() after close()")
        if self._state == _EPILOGUE or not data:
            return []
        events: list[Event] = []
        view = memoryview(data) if type(data) is bytes else None   # views need immutable data
        pos = 0
        try:
            while pos < len(data) and self._state != _EPILOGUE:
                if self._state == _BODY and view is not None:
                    moved = self._body_without_copy(data, pos, view, events)
                    if moved > pos:
                        pos = moved
                        continue
                # Delimiters and headers go through the buffer, a bounded slice at a time, so that
                # the part body after them is passed on by the path above.
                end = len(data) if view is None else min(len(data), pos + _SLICE)
                self._buf += data[pos:end]
                pos = end
                while self._step(events):
                    pass
        except MultipartError as exc:
            exc.events = events
            raise
        return events

    def _body_without_copy(self, data: bytes, pos: int, view: memoryview, events: list[Event]) -> int:
        """Inside a part, the common case: ``data`` from ``pos`` holds no delimiter, or one past some
        bytes of the part. Those bytes are passed on as views of ``data`` instead of going through
        the buffer (two copies of almost every byte of an upload less); returns the position up to
        which ``data`` was used (``pos``: nothing, when a delimiter starts here or may straddle the
        buffer's tail: the buffered steps take it)."""
        keep = len(self._delimiter) - 1
        buf = self._buf
        if len(buf) > keep or len(data) - pos < keep:
            return pos
        # A delimiter starting in the held tail is found where the tail meets the data.
        if buf and (bytes(buf) + data[pos:pos + keep]).find(self._delimiter) >= 0:
            return pos
        at = data.find(self._delimiter, pos)
        if at == pos:
            return pos
        end = at if at >= 0 else len(data) - keep
        if buf:
            events.append(PartData(bytes(buf)))
            buf.clear()
        if end > pos:
            events.append(PartData(view[pos:end]))
        if at >= 0:
            return at
        buf += view[end:]          # held back: may be the start of a delimiter
        return len(data)

    def close(self) -> list[Event]:
        """The body has ended: [] after a close delimiter, else the data still held and a Truncated."""
        if self._closed:
            return []
        self._closed = True
        state, buf = self._state, bytes(self._buf)
        self._buf.clear()
        if state == _EPILOGUE:
            return []
        if state == _PREAMBLE:
            return [Truncated("no multipart delimiter in the body", in_part=False)]
        if state == _HEADERS:
            return [Truncated("the body ended inside a part's headers", in_part=bool(buf))]
        if state == _AFTER_DELIMITER:
            return [Truncated("the body ended without the close delimiter", in_part=False)]
        events: list[Event] = [PartData(buf)] if buf else []
        events.append(Truncated("the body ended inside a part", in_part=True))
        return events

    # One transition per call; False when more input is needed.
    def _step(self, events: list[Event]) -> bool:
        buf = self._buf
        if self._state == _PREAMBLE:
            if self._at_start:
                if buf.startswith(self._dash_boundary):
                    del buf[: len(self._dash_boundary)]
                    self._state = _AFTER_DELIMITER
                    return True
                if self._dash_boundary.startswith(buf):
                    return False   # could still become the opening delimiter
            at = buf.find(self._delimiter)
            if at < 0:
                keep = len(self._delimiter) - 1
                if len(buf) > keep:
                    del buf[: len(buf) - keep]
                    self._at_start = False
                return False
            del buf[: at + len(self._delimiter)]
            self._state = _AFTER_DELIMITER
            return True
        if self._state == _AFTER_DELIMITER:
            if len(buf) < 2:
                return False
            if buf.startswith(b"--"):
                buf.clear()
                self._state = _EPILOGUE
                return False
            end = buf.find(b"\r\n")
            if end < 0:
                if len(buf) > MAX_HEADER_BYTES:
                    raise MultipartError("no line end after a multipart delimiter")
                return False
            # Transport padding (RFC 2046: linear white space) up to the CRLF is ignored.
            del buf[: end + 2]
            self._state = _HEADERS
            return True
        if self._state == _HEADERS:
            if buf.startswith(b"\r\n"):   # no header fields at all
                block_end, skip = 0, 2
            else:
                block_end = buf.find(b"\r\n\r\n")
                if block_end < 0:
                    if len(buf) > MAX_HEADER_BYTES:
                        raise MultipartError(f"a part's headers exceed {MAX_HEADER_BYTES} bytes")
                    return False
                skip = 4
            if block_end > MAX_HEADER_BYTES:
                raise MultipartError(f"a part's headers exceed {MAX_HEADER_BYTES} bytes")
            headers = _parse_headers(bytes(buf[:block_end]))
            del buf[: block_end + skip]
            self.parts += 1
            events.append(PartStart(headers))
            self._state = _BODY
            return True
        if self._state == _BODY:
            at = buf.find(self._delimiter)
            if at < 0:
                # Keep what could be the start of a delimiter split across chunks.
                keep = len(self._delimiter) - 1
                if len(buf) > keep:
                    cut = len(buf) - keep
                    events.append(PartData(_head(buf, cut)))
                    del buf[:cut]
                return False
            if at:
                events.append(PartData(_head(buf, at)))
            events.append(PartEnd())
            del buf[: at + len(self._delimiter)]
            self._state = _AFTER_DELIMITER
            return True
        return False


def _head(buf: bytearray, n: int) -> bytes:
    """``bytes(buf[:n])`` in one copy instead of two (the slice of a bytearray is a copy already):
    part bodies are the whole upload."""
    with memoryview(buf) as view:
        return view[:n].tobytes()
