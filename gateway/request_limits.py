"""Concurrent requests per client and in total (docs/architecture.md, "HTTP edge").

Request line and headers are bounded too (431 past :data:`gateway.http.MAX_REQUEST_HEAD`).
One client (an address; behind ``http.trusted_proxies``, the first ``X-Forwarded-For`` entry) may
have at most ``limits.max_requests_per_client`` requests in flight, the whole process at most
``limits.max_requests_total``; past either the request is refused at once, before any work, with
429 or 503 and ``Retry-After``, so one client's burst cannot starve the others or the PACS. A
request counts until its response body has been sent (streams included). The probes are exempt.
"""

from __future__ import annotations

from collections import Counter

from starlette.types import ASGIApp, Receive, Scope, Send

from gateway.errors import GatewayError, RequestHeadTooLarge, ServiceBusy, TooManyRequests
from gateway.http import MAX_REQUEST_HEAD, error_response

EXEMPT = ("/healthz", "/readyz")


class RequestLimits:
    def __init__(self, app: ASGIApp, *, per_client: int, total: int, metrics: dict[str, int],
                 trusted_proxies: tuple[str, ...] = ()) -> None:
        self.app = app
        self.per_client = per_client
        self.total = total
        self.trusted = frozenset(trusted_proxies)
        self.in_flight: Counter[str] = Counter()
        self.metrics = metrics          # the app's counters (/metrics): refused_requests

    def _client(self, scope: Scope) -> str:
        peer = scope.get("client")
        host = str(peer[0]) if peer else "?"
        if host in self.trusted:
            for name, value in scope.get("headers") or []:
                if name == b"x-forwarded-for":
                    return value.decode("latin-1").split(",")[0].strip() or host
        return host

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in EXEMPT:
            await self.app(scope, receive, send)
            return
        client = self._client(scope)
        refusal: GatewayError | None = None
        head = len(scope.get("raw_path") or b"") + len(scope.get("query_string") or b"") + sum(
            len(name) + len(value) + 4 for name, value in scope.get("headers") or [])
        if head > MAX_REQUEST_HEAD:
            refusal = RequestHeadTooLarge(f"the request line and headers exceed {MAX_REQUEST_HEAD} bytes")
        elif sum(self.in_flight.values()) >= self.total:
            refusal = ServiceBusy(f"the gateway is serving {self.total} requests; retry shortly")
        elif self.in_flight[client] >= self.per_client:
            refusal = TooManyRequests(f"at most {self.per_client} concurrent requests per client")
        if refusal is not None:
            self.metrics["refused_requests"] = self.metrics.get("refused_requests", 0) + 1
            await error_response(refusal)(scope, receive, send)
            return
        self.in_flight[client] += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.in_flight[client] -= 1
            if self.in_flight[client] <= 0:
                del self.in_flight[client]
