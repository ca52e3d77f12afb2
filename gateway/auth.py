"""Request authentication: static API keys (``auth.mode: api_key``).

Every request outside the small unauthenticated surface (:class:`ApiKeyMiddleware`) must carry one
of the configured keys, as ``Authorization: Bearer <key>`` (what OHIF and the DICOMweb clients send)
or ``X-Api-Key: <key>``; keys are compared in constant time. Anything else is
:class:`gateway.errors.Unauthorized` (401, JSON body, ``WWW-Authenticate`` challenge). OIDC/JWT is
not implemented yet, and the configuration refuses ``auth.mode: oidc`` rather than serving openly.
"""

from __future__ import annotations

import hmac

from starlette.types import ASGIApp, Receive, Scope, Send

from gateway.errors import Unauthorized
from gateway.http import error_response


class ApiKeyMiddleware:
    """What is open without credentials (the unauthenticated surface, docs/architecture.md, "HTTP
    edge"): ``/healthz``; ``/readyz`` without ``echo`` (it names no node); CORS preflights (an
    ``OPTIONS`` with ``Access-Control-Request-Method``; the CORS middleware outside answers them);
    ``/metrics`` only with ``auth.open_metrics``. Everything else, ``OPTIONS`` capabilities of a
    ``/nodes/{name}`` root included, needs a key, so node names cannot be enumerated."""

    def __init__(self, app: ASGIApp, keys: tuple[str, ...], open_metrics: bool = False) -> None:
        self.app = app
        self.keys = [k.encode() for k in keys]
        self.open_metrics = open_metrics

    def _open(self, scope: Scope) -> bool:
        path = scope["path"]
        if path == "/healthz" or (path == "/metrics" and self.open_metrics):
            return True
        if path == "/readyz":
            return b"echo" not in scope.get("query_string", b"")
        if scope["method"] == "OPTIONS":
            return any(name == b"access-control-request-method" for name, _ in scope.get("headers") or [])
        return False

    def _allowed(self, scope: Scope) -> bool:
        headers = dict(scope.get("headers") or [])
        offered = headers.get(b"x-api-key")
        auth = headers.get(b"authorization", b"")
        if offered is None and auth[:7].lower() == b"bearer ":
            offered = auth[7:].strip()
        if not offered:
            return False
        # Compare against every key so the time taken does not tell which one nearly matched.
        return any([hmac.compare_digest(offered, key) for key in self.keys])

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or self._open(scope) or self._allowed(scope):
            await self.app(scope, receive, send)
            return
        denied = Unauthorized("a valid API key is required (Authorization: Bearer <key> or X-Api-Key)")
        await error_response(denied)(scope, receive, send)
