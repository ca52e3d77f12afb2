"""Request authentication: API keys and OIDC bearer tokens (``auth.mode``), and the principal.

Every request outside the small unauthenticated surface (:meth:`Authenticator._open`) must carry
credentials: an API key as ``X-Api-Key: <key>`` or ``Authorization: Bearer <key>`` (what OHIF and the
DICOMweb clients send), or, with ``auth.mode: oidc``, a JWT from the configured issuer as
``Authorization: Bearer <token>`` (:mod:`gateway.oidc`). Keys are configured as SHA-256 digests and
compared in constant time. Anything else is :class:`gateway.errors.Unauthorized`: 401, JSON body,
and an RFC 6750 ``WWW-Authenticate`` challenge naming the error. The request's
:class:`gateway.authz.Principal` goes into the ASGI scope's state (``request.state.principal``),
where the routes' node selection (:func:`gateway.http.target_nodes`) and the audit trail read it.
"""

from __future__ import annotations

import hashlib
import hmac

from starlette.types import ASGIApp, Receive, Scope, Send

from gateway.authz import EVERYONE, Principal, principal_from_claims
from gateway.errors import Unauthorized
from gateway.http import error_response
from gateway.oidc import TokenError, TokenValidator
from gateway.settings import AuthSection

KEY_HINT = "credentials are required (Authorization: Bearer <API key or token>, or X-Api-Key)"


def set_principal(scope: Scope, principal: Principal) -> None:
    scope.setdefault("state", {})["principal"] = principal


class Authenticator:
    def __init__(self, app: ASGIApp, auth: AuthSection, validator: TokenValidator | None = None) -> None:
        self.app = app
        self.auth = auth
        self.validator = validator
        self.keys = [(bytes.fromhex(k.sha256), k) for k in auth.api_keys]

    def _open(self, scope: Scope) -> bool:
        """The unauthenticated surface (docs/architecture.md, "HTTP edge"): ``/healthz``; ``/readyz``
        without ``echo`` (it names no node); CORS preflights (an ``OPTIONS`` with
        ``Access-Control-Request-Method``: the CORS middleware outside answers them); ``/metrics``
        only with ``auth.open_metrics``. Everything else, ``OPTIONS`` capabilities of a
        ``/nodes/{name}`` root included, needs credentials, so node names cannot be enumerated."""
        path = scope["path"]
        if path == "/healthz" or (path == "/metrics" and self.auth.open_metrics):
            return True
        if path == "/readyz":
            return b"echo" not in scope.get("query_string", b"")
        if scope["method"] == "OPTIONS":
            return any(name == b"access-control-request-method" for name, _ in scope.get("headers") or [])
        return False

    def _api_key(self, offered: bytes) -> Principal | None:
        digest = hashlib.sha256(offered).digest()
        # Compare against every key so the time taken does not tell which one nearly matched.
        matches = [key for expected, key in self.keys if hmac.compare_digest(digest, expected)]
        if not matches:
            return None
        key = matches[0]
        return Principal(key.name, key.name, "api_key", key.grants)

    async def _principal(self, scope: Scope) -> Principal:
        headers = dict(scope.get("headers") or [])
        offered = headers.get(b"x-api-key")
        auth = headers.get(b"authorization", b"")
        bearer = auth[7:].strip() if auth[:7].lower() == b"bearer " else None
        if offered is not None or (bearer and bearer.count(b".") != 2):
            principal = self._api_key(offered if offered is not None else bearer or b"")
            if principal is None:
                raise Unauthorized("the API key is not valid", error="invalid_token")
            return principal
        if bearer is None:
            raise Unauthorized(KEY_HINT)
        key = self._api_key(bearer)          # a key may look like a JWT (three dot-separated parts)
        if key is not None:
            return key
        if self.validator is None:
            raise Unauthorized("the API key is not valid", error="invalid_token")
        try:
            claims = await self.validator.validate(bearer.decode("latin-1"))
        except TokenError as exc:
            raise Unauthorized(exc.description, error=exc.error) from None
        return principal_from_claims(claims, self.auth.oidc)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if self.auth.mode == "none":
            set_principal(scope, EVERYONE)
            await self.app(scope, receive, send)
            return
        if self._open(scope):
            await self.app(scope, receive, send)
            return
        try:
            principal = await self._principal(scope)
        except Unauthorized as denied:
            await error_response(denied)(scope, receive, send)
            return
        set_principal(scope, principal)
        await self.app(scope, receive, send)
