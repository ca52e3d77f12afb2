"""The storage SCP's answer to an A-ASSOCIATE-RQ: accept (which contexts, which syntax) or reject why.

Pure: an :class:`~gateway.dimse.fast.pdu.AssociateRq` and the acceptor's :class:`AcceptorPolicy` in,
an :class:`~gateway.dimse.fast.pdu.AssociateAc` or :class:`~gateway.dimse.fast.pdu.AssociateRj` out;
:mod:`gateway.dimse.fast.scp_association` sends it. Rules (PS3.8 §9.3.3, §9.3.4, PS3.7 Annex D),
kept the same as pynetdicom's acceptor so the two engines (``gateway.scp_engine``) negotiate alike:

* **Rejections** (A-ASSOCIATE-RJ, result / source / reason): protocol version without bit 0,
  permanent / ACSE / "protocol version not supported" (1/2/2); another application context,
  1/1/2; a calling AE title not in the allow-list (when one is configured), 1/1/3; a called AE
  title that is not ours, 1/1/7; too many associations at once, transient / presentation /
  "local limit exceeded" (2/3/2).
* **Presentation contexts**, each answered in the order proposed: an abstract syntax we do not
  support is result 3; otherwise the first syntax of *our* preference list
  (:func:`gateway.dimse.contexts.scp_contexts`, native or compressed first) that was proposed is
  accepted, none of them is result 4. A context ID proposed twice is refused (result 2) the second
  time: a PDV must name exactly one context. A refused context still carries a transfer syntax
  sub-item (the first proposed; PS3.8 §9.3.3.2: not significant). All refused is still an
  association (the peer finds out and releases), as pynetdicom does.
* **Role selection** (PS3.7 D.3.3.4), asynchronous operations window (D.3.3.3), user identity and
  extended negotiation items are not answered: default roles (the peer is SCU, we are the storage
  SCP), one operation at a time, no identity check beyond the AE titles.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from gateway.dimse.contexts import Context
from gateway.dimse.fast.pdu import (
    ABSTRACT_SYNTAX_NOT_SUPPORTED,
    ACCEPTANCE,
    APPLICATION_CONTEXT,
    DEFAULT_IMPLEMENTATION_CLASS_UID,
    DEFAULT_IMPLEMENTATION_VERSION,
    NO_REASON,
    PROTOCOL_VERSION,
    REJECTED_PERMANENT,
    REJECTED_TRANSIENT,
    RJ_SERVICE_PROVIDER_ACSE,
    RJ_SERVICE_PROVIDER_PRESENTATION,
    RJ_SERVICE_USER,
    TRANSFER_SYNTAXES_NOT_SUPPORTED,
    AssociateAc,
    AssociateRj,
    AssociateRq,
    ContextResult,
    UserInformation,
)

# A-ASSOCIATE-RJ reasons (PS3.8 Table 9-21), by source.
REASON_APPLICATION_CONTEXT = 2        # service user
REASON_CALLING_AE = 3                 # service user
REASON_CALLED_AE = 7                  # service user
REASON_PROTOCOL_VERSION = 2           # service provider (ACSE)
REASON_LOCAL_LIMIT = 2                # service provider (presentation)


@dataclass(frozen=True)
class AcceptorPolicy:
    """Who may associate with the storage SCP, and what it says about itself in the A-ASSOCIATE-AC."""

    ae_title: str
    calling_ae_titles: frozenset[str] = frozenset()     # empty: any calling AE title
    max_pdu: int = 0                                    # the largest PDU we receive (0: unlimited)
    implementation_class_uid: str = DEFAULT_IMPLEMENTATION_CLASS_UID
    implementation_version: str = DEFAULT_IMPLEMENTATION_VERSION


@dataclass(frozen=True)
class Accepted:
    """An accepted association: the A-ASSOCIATE-AC to send and what it agreed."""

    ac: AssociateAc
    contexts: Mapping[int, tuple[str, str]]   # context ID -> (abstract syntax, transfer syntax)
    peer_max_pdu: int                         # the largest PDU the peer receives (0: unlimited)


def supported(contexts: Sequence[Context]) -> dict[str, tuple[str, ...]]:
    """Our preference list as a lookup: abstract syntax -> transfer syntaxes, preferred first."""
    return {abstract: tuple(syntaxes) for abstract, syntaxes in contexts}


def negotiate(rq: AssociateRq, policy: AcceptorPolicy, ours: Mapping[str, Sequence[str]], *,
              at_capacity: bool = False) -> Accepted | AssociateRj:
    """The acceptor's answer to ``rq`` (see the module docstring for the rules)."""
    rejection = _rejection(rq, policy, at_capacity)
    if rejection is not None:
        return rejection
    results: list[ContextResult] = []
    agreed: dict[int, tuple[str, str]] = {}
    seen: set[int] = set()
    for cx in rq.contexts:
        first = cx.transfer_syntaxes[0]
        if cx.id in seen:
            results.append(ContextResult(cx.id, NO_REASON, first))
            continue
        seen.add(cx.id)
        syntaxes = ours.get(cx.abstract_syntax)
        if syntaxes is None:
            results.append(ContextResult(cx.id, ABSTRACT_SYNTAX_NOT_SUPPORTED, first))
            continue
        chosen = next((ts for ts in syntaxes if ts in cx.transfer_syntaxes), None)
        if chosen is None:
            results.append(ContextResult(cx.id, TRANSFER_SYNTAXES_NOT_SUPPORTED, first))
            continue
        results.append(ContextResult(cx.id, ACCEPTANCE, chosen))
        agreed[cx.id] = (cx.abstract_syntax, chosen)
    user = UserInformation(max_pdu=policy.max_pdu, implementation_class_uid=policy.implementation_class_uid,
                           implementation_version_name=policy.implementation_version)
    ac = AssociateAc(called_ae=rq.called_ae, calling_ae=rq.calling_ae, results=tuple(results), user=user)
    return Accepted(ac=ac, contexts=agreed, peer_max_pdu=rq.user.max_pdu)


def _rejection(rq: AssociateRq, policy: AcceptorPolicy, at_capacity: bool) -> AssociateRj | None:
    if not rq.protocol_version & PROTOCOL_VERSION:
        return AssociateRj(REJECTED_PERMANENT, RJ_SERVICE_PROVIDER_ACSE, REASON_PROTOCOL_VERSION)
    if rq.application_context != APPLICATION_CONTEXT:
        return AssociateRj(REJECTED_PERMANENT, RJ_SERVICE_USER, REASON_APPLICATION_CONTEXT)
    if policy.calling_ae_titles and rq.calling_ae not in policy.calling_ae_titles:
        return AssociateRj(REJECTED_PERMANENT, RJ_SERVICE_USER, REASON_CALLING_AE)
    if rq.called_ae != policy.ae_title.strip():
        return AssociateRj(REJECTED_PERMANENT, RJ_SERVICE_USER, REASON_CALLED_AE)
    if at_capacity:
        return AssociateRj(REJECTED_TRANSIENT, RJ_SERVICE_PROVIDER_PRESENTATION, REASON_LOCAL_LIMIT)
    return None
