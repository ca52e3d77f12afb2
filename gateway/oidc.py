"""OIDC bearer tokens: JWS signature, issuer, audience and times checked against the issuer's JWKS.

* The JWKS comes from ``auth.oidc.jwks_url``, or from the issuer's discovery document
  (``{issuer}/.well-known/openid-configuration`` -> ``jwks_uri``, OpenID Connect Discovery 1.0 §4),
  fetched with httpx and kept; a token whose ``kid`` is unknown refetches it (key rotation), at most
  every ``jwks_refresh_interval`` seconds, so forged ``kid`` values cannot hammer the issuer.
* Algorithms: only the configured asymmetric ones (never ``none``, never HS*, so a public key can
  never be used as an HMAC secret); the key's own ``alg`` (RFC 7517 §4.4), when given, must match.
* Claims: ``iss`` equal to the issuer, ``aud`` one of the configured audiences, ``exp`` and ``nbf``
  with ``clock_skew`` seconds of leeway; ``exp`` is required.

Failures are :class:`TokenError` with an RFC 6750 §3.1 error code and a description that names the
failed check (never the token).
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import httpx
import jwt

from gateway.settings import OidcSection

log = logging.getLogger(__name__)
_KEY_TYPE = {"RS": "RSA", "PS": "RSA", "ES": "EC", "Ed": "OKP"}   # JWS alg family -> JWK kty


class TokenError(Exception):
    def __init__(self, description: str, error: str = "invalid_token") -> None:
        super().__init__(description)
        self.error = error
        self.description = description


class TokenValidator:
    def __init__(self, oidc: OidcSection, http: httpx.AsyncClient | None = None) -> None:
        self.oidc = oidc
        self._http = http or httpx.AsyncClient(timeout=httpx.Timeout(10.0, connect=5.0))
        self._keys: dict[str, tuple[jwt.PyJWK, dict[str, Any]]] = {}
        self._anonymous: list[tuple[jwt.PyJWK, dict[str, Any]]] = []      # keys without a kid
        self._fetched = 0.0
        self._jwks_url = oidc.jwks_url
        self._lock = asyncio.Lock()
        self.fetches = 0

    async def close(self) -> None:
        await self._http.aclose()

    async def validate(self, token: str) -> dict[str, Any]:
        """The token's claims, or :class:`TokenError`."""
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise TokenError("the bearer token is not a JWS") from None
        alg = header.get("alg")
        if alg not in self.oidc.algorithms:
            raise TokenError(f"signing algorithm {str(alg)[:16]!r} is not accepted")
        key = await self._key(header.get("kid"), alg)
        try:
            claims: dict[str, Any] = jwt.decode(
                token, key.key, algorithms=[alg], audience=list(self.oidc.audience),
                issuer=self.oidc.issuer, leeway=self.oidc.clock_skew,
                options={"require": ["exp", "iss", "aud"]})
        except jwt.ExpiredSignatureError:
            raise TokenError("the token has expired") from None
        except jwt.ImmatureSignatureError:
            raise TokenError("the token is not valid yet (nbf/iat in the future)") from None
        except jwt.InvalidIssuerError:
            raise TokenError("the token's issuer is not the configured one") from None
        except jwt.InvalidAudienceError:
            raise TokenError("the token is not meant for this gateway (aud)") from None
        except jwt.MissingRequiredClaimError as exc:
            raise TokenError(f"the token has no {exc.claim!r} claim") from None
        except jwt.InvalidSignatureError:
            raise TokenError("the token's signature does not verify") from None
        except jwt.PyJWTError as exc:
            raise TokenError(f"the token is not valid ({type(exc).__name__})") from None
        return claims

    async def _key(self, kid: Any, alg: str) -> jwt.PyJWK:
        if not self._fetched:
            await self._refresh(force=True)
        key = self._find(kid, alg)
        if key is None and await self._refresh(force=False):
            key = self._find(kid, alg)
        if key is None:
            raise TokenError("the token's signing key is not in the issuer's key set")
        return key

    def _find(self, kid: Any, alg: str) -> jwt.PyJWK | None:
        if isinstance(kid, str):
            candidates = [self._keys[kid]] if kid in self._keys else []
        else:
            candidates = self._anonymous if kid is None else []
        for key, jwk in candidates:
            # The key's declared alg (RFC 7517 §4.4) must be the token's, and its type must fit.
            if jwk.get("alg") in (None, alg) and jwk.get("kty") == _KEY_TYPE[alg[:2]]:
                return key
        return None

    async def _refresh(self, *, force: bool) -> bool:
        """Refetch the JWKS unless it was fetched less than ``jwks_refresh_interval`` ago."""
        async with self._lock:
            if not force and time.monotonic() - self._fetched < self.oidc.jwks_refresh_interval:
                return False
            self._fetched = time.monotonic()
            try:
                url = self._jwks_url or await self._discover()
                response = await self._http.get(url)
                response.raise_for_status()
                document = response.json()
            except (httpx.HTTPError, ValueError) as exc:
                log.warning("fetching the OIDC issuer's keys failed: %s", type(exc).__name__)
                raise TokenError("the issuer's signing keys are not available", "invalid_token") from None
            self.fetches += 1
            keys: dict[str, tuple[jwt.PyJWK, dict[str, Any]]] = {}
            anonymous: list[tuple[jwt.PyJWK, dict[str, Any]]] = []
            for item in document.get("keys", []) if isinstance(document, dict) else []:
                if not isinstance(item, dict) or item.get("use", "sig") != "sig":
                    continue
                try:
                    key = jwt.PyJWK(item)
                except jwt.PyJWTError:
                    continue                      # a key type or curve we cannot use: skip it
                if isinstance(item.get("kid"), str):
                    keys[item["kid"]] = (key, item)
                else:
                    anonymous.append((key, item))
            self._keys, self._anonymous = keys, anonymous
            return True

    async def _discover(self) -> str:
        response = await self._http.get(f"{self.oidc.issuer}/.well-known/openid-configuration")
        response.raise_for_status()
        url = response.json().get("jwks_uri")
        if not isinstance(url, str) or not url.startswith(("https://", "http://")):
            raise ValueError("no jwks_uri in the discovery document")
        self._jwks_url = url
        return url
