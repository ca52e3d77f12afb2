"""Parsing of the ``auth`` section's structured values: API keys (stored as SHA-256 hashes only),
the grants saying which nodes and operations a key or a token claim allows, the accepted JWS
algorithms (asymmetric only) and the ``auth.oidc`` block. The cross-field checks of ``auth``
(an issuer and audience with ``mode: oidc``, a key with ``mode: api_key``) stay with the whole
configuration in :func:`gateway.settings.load.settings_from_dict`.
"""

from __future__ import annotations

import hashlib
import re
from typing import Any

from gateway.settings.convert import _num, _Section, _str, _str_list, _url
from gateway.settings.sections import (
    OPERATIONS,
    SAFE_ALGORITHMS,
    ApiKey,
    ClaimGrant,
    ConfigError,
    Grant,
    OidcSection,
)


def _grant(v: Any, key: str) -> Grant:
    if not isinstance(v, dict) or set(v) - {"nodes", "operations"}:
        raise ConfigError(f"{key}: expected {{nodes: [...], operations: [...]}}, got {v!r}")
    nodes = _str_list(v.get("nodes", ["*"]), f"{key}.nodes")
    operations = _str_list(v.get("operations", list(OPERATIONS)), f"{key}.operations")
    bad = [o for o in operations if o not in OPERATIONS]
    if bad:
        raise ConfigError(f"{key}.operations: {bad[0]!r} is not one of {', '.join(OPERATIONS)}")
    return Grant(nodes, operations)


def _api_keys(v: Any, key: str) -> tuple[ApiKey, ...]:
    """Each key as ``{sha256, name, grants}``; a plain string is a legacy key with every right,
    hashed here (only the hash is kept in memory). ``GATEWAY_AUTH__API_KEYS`` may hold the list."""
    if isinstance(v, str):
        v = [s.strip() for s in v.split(",") if s.strip()]
    if not isinstance(v, list):
        raise ConfigError(f"{key}: expected a list of keys, got {type(v).__name__}")
    keys = []
    for i, item in enumerate(v):
        where = f"{key}[{i}]"
        if isinstance(item, str) and item:
            keys.append(ApiKey(hashlib.sha256(item.encode()).hexdigest(), f"key{i + 1}"))
            continue
        if not isinstance(item, dict) or set(item) - {"sha256", "name", "grants"}:
            raise ConfigError(f"{where}: expected a key string or {{sha256, name, grants}}")
        digest = item.get("sha256")
        if not isinstance(digest, str) or not re.fullmatch(r"[0-9a-fA-F]{64}", digest):
            raise ConfigError(f"{where}.sha256: expected 64 hex digits (printf %s KEY | sha256sum)")
        grants = item.get("grants", [{}])
        if not isinstance(grants, list):
            raise ConfigError(f"{where}.grants: expected a list")
        keys.append(ApiKey(digest.lower(), _str(item.get("name", f"key{i + 1}"), f"{where}.name"),
                           tuple(_grant(g, f"{where}.grants[{j}]") for j, g in enumerate(grants))))
    return tuple(keys)


def _claim_grants(v: Any, key: str) -> tuple[ClaimGrant, ...]:
    if not isinstance(v, list):
        raise ConfigError(f"{key}: expected a list of {{claim, value, nodes, operations}}")
    out = []
    for i, item in enumerate(v):
        where = f"{key}[{i}]"
        if not isinstance(item, dict) or set(item) - {"claim", "value", "nodes", "operations"}:
            raise ConfigError(f"{where}: expected {{claim, value, nodes, operations}}")
        grant = _grant({k: item[k] for k in ("nodes", "operations") if k in item}, where)
        out.append(ClaimGrant(_str(item.get("claim"), f"{where}.claim"),
                              _str(item.get("value"), f"{where}.value"), grant))
    return tuple(out)


def _algorithms(v: Any, key: str) -> tuple[str, ...]:
    algorithms = _str_list(v, key)
    unsafe = [a for a in algorithms if a not in SAFE_ALGORITHMS]
    if unsafe or not algorithms:
        raise ConfigError(f"{key}: {unsafe[0] if unsafe else 'nothing'!r} is not allowed "
                          f"(asymmetric algorithms only: {', '.join(sorted(SAFE_ALGORITHMS))})")
    return algorithms


def _oidc(o: _Section) -> OidcSection:
    d = OidcSection()
    return OidcSection(
        issuer=o.get("issuer", d.issuer, _url),
        audience=o.get("audience", d.audience, _str_list),
        jwks_url=o.get("jwks_url", d.jwks_url, _url),
        algorithms=o.get("algorithms", d.algorithms, _algorithms),
        clock_skew=o.get("clock_skew", d.clock_skew, _num),
        jwks_refresh_interval=o.get("jwks_refresh_interval", d.jwks_refresh_interval, _num),
        client_claim=o.get("client_claim", d.client_claim, _str),
        subject_claim=o.get("subject_claim", d.subject_claim, _str),
        grants=o.get("grants", d.grants, _claim_grants),
    )
