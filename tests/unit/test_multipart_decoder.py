"""translators.multipart decoder: byte-exact client bodies, every chunk split, truncation, hypothesis."""

from __future__ import annotations

import pytest
from dicomweb_client.api import DICOMwebClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from translators.multipart import (
    MAX_HEADER_BYTES,
    MultipartDecoder,
    MultipartError,
    PartData,
    PartEnd,
    PartStart,
    Truncated,
    boundary_from_content_type,
    closing,
    parse_media_type,
    part_header,
)

Parts = list[tuple[dict[str, str], bytes]]


def decode(body: bytes, boundary: str, chunks: list[int] | None = None) -> tuple[Parts, list[Truncated]]:
    """Feed ``body`` split at ``chunks`` (cut positions); coalesce PartData; return parts + truncations."""
    decoder = MultipartDecoder(boundary)
    cuts = [0, *sorted(chunks or []), len(body)]
    events = []
    for start, end in zip(cuts, cuts[1:], strict=False):
        events += decoder.feed(body[start:end])
    events += decoder.close()
    parts: Parts = []
    truncated = []
    open_part = False
    for event in events:
        if isinstance(event, PartStart):
            assert not open_part
            parts.append((event.headers, b""))
            open_part = True
        elif isinstance(event, PartData):
            assert open_part and event.data
            parts[-1] = (parts[-1][0], parts[-1][1] + event.data)
        elif isinstance(event, PartEnd):
            assert open_part
            open_part = False
        else:
            truncated.append(event)
    return parts, truncated


def ohif_body(datasets: list[bytes], boundary: str) -> bytes:
    """What OHIF's dicomweb-client 0.10.4 ``multipartEncode`` sends, reproduced byte for byte: the
    buffer is sized for one footer per dataset but only one is written, so NUL bytes trail it."""
    header = f"\r\n--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode()
    footer = f"\r\n--{boundary}--".encode()
    total = sum(len(header) + len(d) + len(footer) for d in datasets)
    out = bytearray(total)
    position = 0
    for data in datasets:
        out[position:position + len(header)] = header
        out[position + len(header):position + len(header) + len(data)] = data
        position += len(header) + len(data)
    out[position:position + len(footer)] = footer
    return bytes(out)


DICM = [b"\0" * 128 + b"DICM" + bytes(range(256)) * 3, b"\0" * 128 + b"DICM\r\n--not-the-boundary\r\n",
        b"\0" * 128 + b"DICM" + b"\r\n" * 50]
OHIF_BOUNDARY = "a8e2d6c0-3f1b-4c2d-9e7a-0b5d4c3e2f1a"


def test_ohif_body_quoted_boundary_leading_crlf_no_final_crlf_nul_epilogue():
    content_type = f'multipart/related; type="application/dicom"; boundary="{OHIF_BOUNDARY}"'
    body = ohif_body(DICM, OHIF_BOUNDARY)
    assert body.startswith(b"\r\n--") and body.endswith(b"--" + b"\0" * (2 * (len(OHIF_BOUNDARY) + 6)))
    boundary = boundary_from_content_type(content_type)
    assert boundary == OHIF_BOUNDARY
    parts, truncated = decode(body, boundary)
    assert truncated == []
    assert parts == [({"content-type": "application/dicom"}, d) for d in DICM]


def test_python_dicomweb_client_body_exact_bytes():
    content_type = ('multipart/related; type="application/dicom"; '
                    'boundary="0f3cf5c0-70e0-41ef-baef-c6f9f65ec3e1"')
    body = DICOMwebClient._encode_multipart_message(DICM, content_type)   # the client's own encoder
    assert body.startswith(b"\r\n--0f3cf5c0") and body.endswith(b"e1--")
    parts, truncated = decode(body, boundary_from_content_type(content_type))
    assert truncated == [] and [p[1] for p in parts] == DICM


def test_gateway_encoder_round_trips():
    b = "dwg-xyz"
    body = part_header(b, "application/dicom", transfer_syntax="1.2.840.10008.1.2.1", first=True) + DICM[0]
    body += part_header(b, "application/dicom", location="http://x/y") + DICM[1] + closing(b)
    parts, truncated = decode(body, b)
    assert truncated == []
    assert parts == [({"content-type": "application/dicom; transfer-syntax=1.2.840.10008.1.2.1"}, DICM[0]),
                     ({"content-type": "application/dicom", "content-location": "http://x/y"}, DICM[1])]


def test_header_names_in_any_case_folding_and_no_headers():
    body = (b"--b\r\nCONTENT-TYPE: application/dicom+json\r\ncontent-LOCATION:  http://a/b \r\n"
            b"X-Long: one\r\n two\r\n\r\n[]\r\n--b\r\n\r\nno headers\r\n--b\r\nContent-Type: x\r\n\r\n"
            b"\r\n--b--\r\n")
    parts, truncated = decode(body, "b")
    assert truncated == []
    assert parts == [({"content-type": "application/dicom+json", "content-location": "http://a/b",
                       "x-long": "one two"}, b"[]"),
                     ({}, b"no headers"),
                     ({"content-type": "x"}, b"")]


def test_preamble_padding_and_epilogue():
    body = (b"preamble text --b not at a line start\r\n--b  \t\r\nContent-Type: a\r\n\r\nX\r\n--b--  epilogue"
            b"\r\n--b\r\nContent-Type: ignored\r\n\r\nY\r\n--b--\r\n")
    parts, truncated = decode(body, "b")
    assert parts == [({"content-type": "a"}, b"X")] and truncated == []


def test_boundary_straddling_every_split_point():
    body = ohif_body(DICM, OHIF_BOUNDARY)
    expected = decode(body, OHIF_BOUNDARY)
    for cut in range(len(body) + 1):
        assert decode(body, OHIF_BOUNDARY, [cut]) == expected, cut
    for cut in range(0, len(body) - 3, 7):   # and three-way splits around every delimiter
        assert decode(body, OHIF_BOUNDARY, [cut, cut + 1, cut + 3]) == expected, cut


def test_byte_by_byte():
    body = DICOMwebClient._encode_multipart_message(DICM, 'multipart/related; type="application/dicom"; boundary=q')
    assert decode(body, "q", list(range(1, len(body)))) == decode(body, "q")


def test_truncated_inside_a_part_keeps_the_data_and_reports_it():
    body = ohif_body(DICM[:2], OHIF_BOUNDARY)
    cut = body.index(DICM[1]) + 100
    parts, truncated = decode(body[:cut], OHIF_BOUNDARY)
    assert parts[0][1] == DICM[0]
    assert parts[1][1] == DICM[1][:100]
    assert truncated == [Truncated("the body ended inside a part", in_part=True)]


@pytest.mark.parametrize(("body", "in_part"), [
    (b"", False),
    (b"garbage without delimiter", False),
    (b"--b\r\nContent-Type: app", True),        # inside the header block
    (b"--b\r\n", False),                         # after a delimiter, nothing behind it
    (b"--b\r\nA: b\r\n\r\nxy\r\n--b", False),     # last part complete, close delimiter missing
])
def test_truncation_kinds(body, in_part):
    _, truncated = decode(body, "b")
    assert len(truncated) == 1 and truncated[0].in_part is in_part


def test_oversized_headers_raise_with_the_events_so_far():
    decoder = MultipartDecoder("b")
    with pytest.raises(MultipartError) as info:
        decoder.feed(b"--b\r\nA: 1\r\n\r\nok\r\n--b\r\nX: " + b"y" * (MAX_HEADER_BYTES + 10))
    assert info.value.events == [PartStart({"a": "1"}), PartData(b"ok"), PartEnd()]


def test_nothing_after_close_delimiter_and_close_is_idempotent():
    decoder = MultipartDecoder("b")
    assert decoder.feed(b"--b--") == [] and decoder.done
    assert decoder.feed(b"\r\n--b\r\n\r\nlater") == []
    assert decoder.close() == [] and decoder.close() == []
    with pytest.raises(MultipartError):
        decoder.feed(b"x")


@pytest.mark.parametrize(("content_type", "boundary"), [
    ('multipart/related; type="application/dicom"; boundary="0f3c-41ef"', "0f3c-41ef"),
    ("multipart/related; type=application/dicom; boundary=0f3c-41ef", "0f3c-41ef"),
    ('Multipart/Related;BOUNDARY="a;b=c";type="application/dicom"', "a;b=c"),
    ('multipart/related; boundary="with \\"quote\\""', 'with "quote"'),
    ("multipart/related;boundary=plain ; type=application/dicom+json", "plain"),
])
def test_boundary_from_content_type(content_type, boundary):
    assert boundary_from_content_type(content_type) == boundary


@pytest.mark.parametrize("content_type", ["multipart/related; type=application/dicom", "application/dicom",
                                          'multipart/related; boundary=""', ""])
def test_boundary_missing_or_not_multipart(content_type):
    with pytest.raises(MultipartError):
        boundary_from_content_type(content_type)


def test_parse_media_type_type_with_or_without_quotes():
    assert parse_media_type('multipart/related; type="application/dicom+json"; boundary=x') == (
        "multipart/related", {"type": "application/dicom+json", "boundary": "x"})
    assert parse_media_type("Multipart/Related; Type=application/dicom")[1] == {"type": "application/dicom"}


# ----------------------------------------------------------------------------- property

_TRICKY = [b"\r\n", b"--", b"\r\n--", b"\r\n--bo", b"\r\n--bound", b"\r", b"\n", b"-", b"\0", b"bound"]
payload = st.lists(st.one_of(st.sampled_from(_TRICKY), st.binary(max_size=40)), max_size=12).map(b"".join)


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(parts=st.lists(payload, min_size=1, max_size=5), data=st.data(),
       leading_crlf=st.booleans(), final_crlf=st.booleans(), epilogue=st.binary(max_size=20))
def test_any_split_parses_identically(parts, data, leading_crlf, final_crlf, epilogue):
    boundary = "boundary"
    # A body a client could send: no part contains the delimiter (RFC 2046 §5.1.1).
    parts = [p for p in parts if b"\r\n--" + boundary.encode() not in p + b"\r\n"]
    body = b"\r\n" if leading_crlf else b""
    body += b"".join(f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode() + p + b"\r\n"
                     for p in parts)
    body += f"--{boundary}--".encode() + (b"\r\n" if final_crlf else b"") + epilogue
    expected = [({"content-type": "application/dicom"}, p) for p in parts]
    assert decode(body, boundary) == (expected, [])
    cuts = data.draw(st.lists(st.integers(0, len(body)), max_size=8))
    assert decode(body, boundary, cuts) == (expected, [])


def test_part_bodies_pass_as_views_of_the_fed_chunks():
    """Inside a part, a chunk without a delimiter is passed on as views of it (no copy through the
    buffer), the last len(delimiter) - 1 bytes held back; the bytes come out exact."""
    boundary = "dwg-0123456789abcdef"
    payload = bytes(range(256)) * 4096                       # 1 MiB
    body = (part_header(boundary, "application/dicom", first=True) + payload + closing(boundary))
    decoder = MultipartDecoder(boundary)
    events = []
    for start in range(0, len(body), 65536):
        events += decoder.feed(body[start:start + 65536])
    events += decoder.close()
    data = [e.data for e in events if isinstance(e, PartData)]
    assert b"".join(bytes(d) for d in data) == payload
    views = [d for d in data if isinstance(d, memoryview)]
    assert sum(len(v) for v in views) > 0.99 * len(payload)
    assert [type(e) for e in events if not isinstance(e, PartData)] == [PartStart, PartEnd]
