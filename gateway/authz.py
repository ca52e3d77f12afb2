"""Who is asking, and what they may do: the principal of a request and its grants per node.

Every request carries a :class:`Principal` (set by :mod:`gateway.auth`): an API key's name and
grants, an OIDC token's subject, client and the grants its claims earn, or, without authentication,
:data:`EVERYONE`. A grant names nodes (or ``*``) and operations: ``search`` (QIDO-RS), ``retrieve``
(WADO-RS, WADO-URI, rendered) and ``store`` (STOW-RS). The rules (docs/architecture.md, "HTTP edge"):

* ``/nodes/{name}/...`` without the right is 403, and so is an unknown name once authentication is
  on: unknown and forbidden nodes look the same, so names cannot be probed;
* a federated search leaves out, silently, the nodes the caller may not search;
* a federated retrieve or store never reaches a node the caller lacks the right for.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from gateway.settings import ClaimGrant, Grant, OidcSection, PacsNode


@dataclass(frozen=True)
class Principal:
    subject: str
    client: str | None
    method: str                     # "api_key" | "oidc" | "none"
    grants: tuple[Grant, ...]

    def may(self, node: str, operation: str) -> bool:
        lowered = node.lower()
        return any(operation in g.operations and ("*" in g.nodes or lowered in (n.lower() for n in g.nodes))
                   for g in self.grants)

    def permitted(self, nodes: Iterable[PacsNode], operation: str) -> list[PacsNode]:
        return [n for n in nodes if self.may(n.name, operation)]


EVERYONE = Principal("anonymous", None, "none", (Grant(),))
"""Without authentication (``auth.mode: none``, e.g. behind an authenticating proxy)."""


def claim_values(claims: Mapping[str, Any], path: str) -> list[str]:
    """The string values at a dotted claim path: a list's items, a space-separated string's words
    (OAuth ``scope``, RFC 8693 §4.2), a single string."""
    value: Any = claims
    for part in path.split("."):
        if not isinstance(value, Mapping) or part not in value:
            return []
        value = value[part]
    if isinstance(value, str):
        return value.split()
    if isinstance(value, Sequence):
        return [v for v in value if isinstance(v, str)]
    return []


def principal_from_claims(claims: Mapping[str, Any], oidc: OidcSection) -> Principal:
    """The token's subject and client, with every grant whose claim holds its value."""
    grants = tuple(rule.grant for rule in oidc.grants if _holds(claims, rule))
    subject = claims.get(oidc.subject_claim)
    client = claims.get(oidc.client_claim)
    return Principal(str(subject) if subject is not None else "?",
                     str(client) if client is not None else None, "oidc", grants)


def _holds(claims: Mapping[str, Any], rule: ClaimGrant) -> bool:
    return rule.value in claim_values(claims, rule.claim)
