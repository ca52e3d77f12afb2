"""Health and readiness (architecture.md §4: /readyz fails only when the process cannot serve)."""

from __future__ import annotations

import asyncio

from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from gateway.errors import GatewayError


async def healthz(request: Request) -> JSONResponse:
    return JSONResponse({"status": "ok"})


async def readyz(request: Request) -> JSONResponse:
    state = request.app.state
    try:
        cache_ok = await asyncio.wait_for(state.cache.ping(), timeout=1.0)
    except Exception:  # noqa: BLE001 - a cache outage is reported, never fatal
        cache_ok = False
    body: dict[str, object] = {"status": "ready", "cache": "ok" if cache_ok else "unavailable"}
    if request.query_params.get("echo") in ("1", "true"):
        async def one(node: object) -> dict[str, object]:
            try:
                rtt = await state.dimse.echo(node)
                return {"ok": True, "rtt_ms": round(rtt * 1000, 1)}
            except GatewayError as exc:
                return {"ok": False, "error": type(exc).__name__, "detail": exc.detail}

        nodes = state.settings.nodes
        results = await asyncio.gather(*(one(n) for n in nodes))
        body["nodes"] = {n.name: r for n, r in zip(nodes, results, strict=True)}
    return JSONResponse(body)


def routes() -> list[Route]:
    return [Route("/healthz", healthz, methods=["GET"]), Route("/readyz", readyz, methods=["GET"])]
