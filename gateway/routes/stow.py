"""STOW-RS routes (PS3.18 §10.5): parse the request, let :class:`gateway.stow.service.StowService` do the
work, answer the Store Instances Response (Annex I; docs/architecture.md, "STOW-RS").

Checked before a byte of the body is read: the Accept header (the response is DICOM JSON, else 406),
the study UID of ``POST /studies/{study}`` (400), the Content-Type (PS3.18 §10.5.1.2:
``multipart/related`` with ``type`` absent, ``application/dicom`` or ``application/dicom+json``,
else 415; no boundary, 400) and the target node: ``/nodes/{name}/dicom-web`` stores there, federated
``/dicom-web`` stores to ``gateway.stow_node`` (default: the first node).
"""

from __future__ import annotations

import logging

from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.routing import Route

from gateway.errors import BadRequest, Forbidden, GatewayError, UnsupportedMediaType
from gateway.http import NODE_HEADER, dicomweb_base, negotiate_search, target_nodes
from gateway.settings import PacsNode, Settings
from gateway.stow.prepare import DICOM, ROOT_TYPES
from gateway.stow.service import StowService
from translators import multipart as mp
from translators import stow as st
from translators.media import DICOM_JSON
from translators.uids import InvalidUid, check_uid

log = logging.getLogger(__name__)

CLIENT_CLOSED_REQUEST = 499


def _content_type(request: Request) -> tuple[str, str]:
    """(root part type, boundary) of a STOW-RS request, or 415/400 (PS3.18 §10.5.1.2, Table 10.5.3-1)."""
    raw = request.headers.get("content-type", "")
    media, params = mp.parse_media_type(raw)
    if media != "multipart/related":
        raise UnsupportedMediaType(f"STOW-RS takes multipart/related with type {DICOM} or {DICOM_JSON}, "
                                   f"not {media or 'no Content-Type'!r}")
    root = params.get("type", "").strip().lower()
    if root not in ROOT_TYPES:
        raise UnsupportedMediaType(f"multipart/related type {root!r} is not supported; use {DICOM} or "
                                   f"{DICOM_JSON}")
    try:
        return root, mp.boundary_from_content_type(raw)
    except mp.MultipartError as exc:
        raise BadRequest(str(exc)) from None


def _study(request: Request) -> str | None:
    study: str | None = request.path_params.get("study")
    if study is None:
        return None
    try:
        return check_uid("study UID", study)
    except InvalidUid as exc:
        raise BadRequest(str(exc)) from None


def _node(request: Request, settings: Settings) -> tuple[PacsNode, PacsNode | None]:
    """The node to store to, and the node the URL names (None on federated ``/dicom-web``)."""
    permitted, pinned = target_nodes(request, settings, "store")
    node = pinned or settings.stow_node
    if node is None:
        raise GatewayError("no node is configured to store to (gateway.stow_node)")
    if node not in permitted:   # federated STOW goes to gateway.stow_node only, never elsewhere
        raise Forbidden(f"these credentials may not store on node {node.name!r}")
    return node, pinned


async def store(request: Request) -> Response:
    settings: Settings = request.app.state.settings
    negotiate_search(request)   # the response is DICOM JSON; an Accept without it is a 406
    study = _study(request)
    node, pinned = _node(request, settings)
    root, boundary = _content_type(request)
    service: StowService = request.app.state.stow
    try:
        outcomes = await service.store(node, root_type=root, boundary=boundary, body=request.stream(),
                                       study=study)
    except ClientDisconnect:
        # The parts that had arrived complete were stored all the same, and the cache bumped for
        # them; the service's log line counts them. Nobody is left to read an answer.
        log.info("STOW-RS client left during the upload")
        return Response(status_code=CLIENT_CLOSED_REQUEST)
    body = st.response_bytes(st.store_response(outcomes, dicomweb_base(request, settings, pinned), study))
    return Response(body, status_code=st.http_status(outcomes), media_type=DICOM_JSON,
                    headers={NODE_HEADER: node.name})


def routes() -> list[Route]:
    return [
        Route("/studies", store, methods=["POST"]),
        Route("/studies/{study}", store, methods=["POST"]),
    ]
