"""A multipart/related parser that behaves like the strict clients (docs/architecture.md, "HTTP edge").

cornerstone takes the boundary from the first ``--`` line of the body (not the header), reads the
part type only from a header line starting with exactly ``Content-Type:``, and the JS dicomweb-client
requires each part's headers to end within 1000 bytes. We check all of that, plus that the header's
boundary agrees, and return (headers, body) per part.
"""

from __future__ import annotations


def parse_multipart(body: bytes, content_type: str) -> list[tuple[dict[str, str], bytes]]:
    assert content_type.startswith("multipart/related"), content_type
    header_boundary = next(p.split("=", 1)[1].strip().strip('"') for p in content_type.split(";")
                           if p.strip().startswith("boundary="))
    first_line = body.split(b"\r\n", 1)[0]
    assert first_line.startswith(b"--"), "body must start with the boundary line (no preamble)"
    boundary = first_line[2:]
    assert boundary.decode() == header_boundary
    delimiter = b"\r\n--" + boundary
    assert body.endswith(delimiter + b"--\r\n") or body.endswith(delimiter + b"--"), "closing delimiter"
    chunks = (b"\r\n" + body).split(delimiter)
    assert chunks[0] == b""
    parts = []
    for chunk in chunks[1:-1]:
        assert chunk.startswith(b"\r\n")
        head_end = chunk.index(b"\r\n\r\n", 2)
        assert head_end < 1000, "part headers must end within 1000 bytes"
        headers: dict[str, str] = {}
        for line in chunk[2:head_end].decode("ascii").split("\r\n"):
            name, _, value = line.partition(":")
            headers[name] = value.strip()
        assert "Content-Type" in headers, f"exact 'Content-Type:' header missing: {headers}"
        parts.append((headers, chunk[head_end + 4:]))
    assert chunks[-1] in (b"--\r\n", b"--"), chunks[-1][:20]
    return parts
