"""HTTP helpers shared by the routes: external base URL, JSON errors, Warning headers, negotiation."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable
from typing import TypeVar

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from gateway.authz import EVERYONE, Principal
from gateway.errors import BadRequest, Forbidden, GatewayError, NotAcceptable, NotFound
from gateway.settings import PacsNode, Settings
from translators.media import DICOM_JSON
from translators.uids import InvalidUid, check_uid

T = TypeVar("T")


class ClientGone(Exception):
    """The HTTP client disconnected while we were working for it."""


async def unless_client_leaves(request: Request, work: Awaitable[T]) -> T:
    """Run ``work``; if the client disconnects first, cancel it (which C-CANCELs its C-FINDs,
    docs/architecture.md, "HTTP edge") and raise ClientGone. Only for bodiless requests: it
    consumes receive()."""
    task = asyncio.ensure_future(work)

    async def disconnected() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    watcher = asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        task.cancel()
        watcher.cancel()
        raise
    watcher.cancel()
    if task.done():
        return task.result()
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError, Exception):
        await task
    raise ClientGone()
SERVICE = "dicomweb-gateway"


def external_root(request: Request, settings: Settings) -> str:
    """Scheme://host[/prefix] as the client sees us. ``X-Forwarded-*`` is trusted only from
    ``http.trusted_proxies`` (docs/architecture.md, "HTTP edge"), so no client can poison URLs
    other users get."""
    if settings.gateway.base_url:
        return settings.gateway.base_url
    scheme = str(request.scope.get("scheme") or request.url.scheme)   # no URL built per request
    host = request.headers.get("host") or f"{request.url.hostname}:{request.url.port}"
    prefix = ""
    client = request.client.host if request.client else None
    if client is not None and client in settings.http.trusted_proxies:
        fwd = request.headers
        scheme = (fwd.get("x-forwarded-proto") or scheme).split(",")[0].strip()
        host = (fwd.get("x-forwarded-host") or host).split(",")[0].strip()
        prefix = (fwd.get("x-forwarded-prefix") or "").split(",")[0].strip().rstrip("/")
        if prefix and not prefix.startswith("/"):
            prefix = "/" + prefix
    return f"{scheme}://{host}{prefix}"


def dicomweb_base(request: Request, settings: Settings, node: PacsNode | None) -> str:
    root = external_root(request, settings)
    return f"{root}/nodes/{node.name}/dicom-web" if node else f"{root}/dicom-web"


def principal(request: Request) -> Principal:
    """The caller (set by gateway.auth; without authentication, everyone)."""
    found = getattr(request.state, "principal", None)
    return found if isinstance(found, Principal) else EVERYONE


def target_nodes(request: Request, settings: Settings,
                 operation: str) -> tuple[list[PacsNode], PacsNode | None]:
    """The nodes this request may use for ``operation`` (gateway.authz): every permitted node for
    federated ``/dicom-web`` (403 when none is), or the one named in ``/nodes/{node}/dicom-web``.
    With authentication on, an unknown node and a forbidden one are the same 403."""
    caller = principal(request)
    name = request.path_params.get("node")
    if name is None:
        permitted = caller.permitted(settings.nodes, operation)
        if settings.nodes and not permitted:
            raise Forbidden(f"these credentials may not {operation} on any node")
        return permitted, None
    node = settings.node(name)
    if caller.method != "none" and (node is None or not caller.may(node.name, operation)):
        raise Forbidden(f"these credentials may not {operation} on node {name[:64]!r}")
    if node is None:
        raise NotFound(f"no node named {name[:64]!r} is configured")
    return [node], node


MAX_REQUEST_HEAD = 32 * 1024
"""Bytes of request line + headers the HTTP server buffers (past it: 431/400 and the connection is
closed before any work); a QIDO URL with every key at its VR's length fits well within it."""

NODE_HEADER = "X-Gateway-Node"
"""Names the node that answered a WADO request (federated ones included): docs/architecture.md, "Identity"."""


def parse_frame_list(text: str, max_count: int) -> list[int]:
    """``1,3,5`` (also ``%2C``), 1-based, ASCII digits, no duplicates, at most ``max_count`` frames
    (PS3.18 §10.4.1.1.4; ``limits.max_frames_per_request``)."""
    numbers: list[int] = []
    items = text.replace("%2C", ",").replace("%2c", ",").split(",")
    if len(items) > max_count:
        raise BadRequest(f"frame list: more than {max_count} frames in one request")
    seen: set[int] = set()
    for item in items:
        item = item.strip()
        if not (item.isascii() and item.isdigit()) or int(item) < 1:
            raise BadRequest(f"frame list: {item[:20]!r} is not a frame number (1-based)")
        n = int(item)
        if n in seen:
            raise BadRequest(f"frame list: frame {n} is listed twice")
        seen.add(n)
        numbers.append(n)
    if not numbers:
        raise BadRequest("empty frame list")
    return numbers


def path_uids(request: Request) -> tuple[str, str | None, str | None]:
    """(study, series, instance) UIDs of a DICOMweb path, each checked (400 for a non-UID)."""
    p = request.path_params
    try:
        return (check_uid("study UID", p["study"]),
                check_uid("series UID", p["series"]) if "series" in p else None,
                check_uid("instance UID", p["instance"]) if "instance" in p else None)
    except InvalidUid as exc:
        raise BadRequest(str(exc)) from None


def error_response(exc: GatewayError) -> JSONResponse:
    """The one renderer of an error: the JSON body of :mod:`gateway.errors`, its status and headers."""
    return JSONResponse(exc.to_json(), status_code=exc.status_code, headers=exc.headers)


MAX_WARNING_TEXT = 300


def header_text(text: str, limit: int = MAX_WARNING_TEXT) -> str:
    """``text`` as a header value: visible ASCII and spaces only (RFC 9110 §5.5; anything else,
    CR and LF included, escaped as ``\\uXXXX``, so a client-chosen parameter name can neither split
    the header nor break its latin-1 encoding), cut to ``limit`` characters."""
    safe = "".join(c if " " <= c <= "~" else f"\\u{ord(c):04x}" for c in text)
    return safe if len(safe) <= limit else safe[:limit] + "..."


def with_warnings(response: Response, warnings: list[str]) -> Response:
    for text in dict.fromkeys(warnings):
        # PS3.18 §8.3.4: "Warning: 299 {service}: {text}"; one header line per warning.
        response.headers.append("Warning", f"299 {SERVICE}: {header_text(text)}")
    return response


def negotiate_search(request: Request) -> None:
    """QIDO media type (PS3.18 §10.6.1, §8.7.8): JSON is the one we produce; XML-multipart -> 406."""
    wanted = request.query_params.get("accept") or request.headers.get("accept") or "*/*"
    for part in wanted.split(","):
        media = part.split(";")[0].strip().lower()
        params = part.lower()
        if "q=0" in params.replace(" ", "") and "q=0." not in params.replace(" ", ""):
            continue
        if media in (DICOM_JSON, "application/json", "*/*", "application/*"):
            return
        if media == "multipart/related" and ("dicom+json" in params or "*/*" in params):
            return
    raise NotAcceptable(f"search results are available as {DICOM_JSON}; the request accepts only {wanted!r}")
