"""``GET /openapi.json``: the OpenAPI 3.1 description of the HTTP API, the static ``gateway/openapi.json``.

The document is kept in step with the routes by ``tests/unit/test_openapi.py`` and drives the fuzzing
of the running gateway (``tests/integration/test_fuzz_api.py``). With authentication on it needs
credentials like every path outside the unauthenticated surface (docs/architecture.md, "HTTP edge"):
it names no node, but the surface stays the probes and CORS preflights."""

from __future__ import annotations

from functools import cache
from importlib.resources import files

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

DOCUMENT = "openapi.json"


@cache
def document_bytes() -> bytes:
    """The document as shipped in the package (read once)."""
    return files("gateway").joinpath(DOCUMENT).read_bytes()


async def openapi(request: Request) -> Response:
    return Response(document_bytes(), media_type="application/json")


def routes() -> list[Route]:
    return [Route("/openapi.json", openapi, methods=["GET"])]
