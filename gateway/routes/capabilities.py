"""Retrieve Capabilities (PS3.18 §8.9, Annex H): ``OPTIONS`` on the service root -> a WADL document.

With ``http.cors_origins`` set, CORS preflights (``OPTIONS`` with ``Access-Control-Request-Method``)
never reach this route: the CORS middleware answers them first (docs/architecture.md, "HTTP edge").
"""

from __future__ import annotations

from xml.sax.saxutils import quoteattr

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from gateway.http import dicomweb_base, target_nodes

_RESOURCES = [
    ("studies", ["GET", "POST"]), ("series", ["GET"]), ("instances", ["GET"]),
    ("studies/{study}", ["GET", "POST"]), ("studies/{study}/metadata", ["GET"]),
    ("studies/{study}/rendered", ["GET"]), ("studies/{study}/thumbnail", ["GET"]),
    ("studies/{study}/series", ["GET"]), ("studies/{study}/instances", ["GET"]),
    ("studies/{study}/series/{series}", ["GET"]), ("studies/{study}/series/{series}/metadata", ["GET"]),
    ("studies/{study}/series/{series}/rendered", ["GET"]),
    ("studies/{study}/series/{series}/thumbnail", ["GET"]),
    ("studies/{study}/series/{series}/instances", ["GET"]),
    ("studies/{study}/series/{series}/instances/{instance}", ["GET"]),
    ("studies/{study}/series/{series}/instances/{instance}/metadata", ["GET"]),
    ("studies/{study}/series/{series}/instances/{instance}/rendered", ["GET"]),
    ("studies/{study}/series/{series}/instances/{instance}/thumbnail", ["GET"]),
    ("studies/{study}/series/{series}/instances/{instance}/frames/{frames}", ["GET"]),
    ("studies/{study}/series/{series}/instances/{instance}/frames/{frames}/rendered", ["GET"]),
    ("studies/{study}/series/{series}/instances/{instance}/bulkdata/{path}", ["GET"]),
]


async def capabilities(request: Request) -> Response:
    _, pinned = target_nodes(request, request.app.state.settings, "search")
    base = dicomweb_base(request, request.app.state.settings, pinned) + "/"
    body = ['<?xml version="1.0" encoding="UTF-8"?>',
            '<application xmlns="http://wadl.dev.java.net/2009/02">',
            f"  <resources base={quoteattr(base)}>"]
    for path, methods in _RESOURCES:
        body.append(f"    <resource path={quoteattr(path)}>")
        body += [f'      <method name="{m}"/>' for m in methods]
        body.append("    </resource>")
    body += ["  </resources>", "</application>", ""]
    return Response("\n".join(body), media_type="application/vnd.sun.wadl+xml",
                    headers={"Allow": "GET, POST, OPTIONS"})


def routes() -> list[Route]:
    return [Route("/", capabilities, methods=["OPTIONS"])]
