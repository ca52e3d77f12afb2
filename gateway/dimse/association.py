"""Opening and closing the associations the gateway requests: one way for every operation.

Every association the gateway opens as a requestor (queries, C-GET, C-MOVE, C-STORE) goes through
:func:`open_association`, so all of them get the same treatment:

* the node's timeouts (connect, ACSE, DIMSE, network) and PDU size;
* DICOM TLS when the node has ``tls.enabled`` (PS3.15 Annex B.1): the node's one context from
  :mod:`gateway.dimse.tls`, for every operation alike;
* the TCP tuning and the reactor-race guard of :mod:`gateway.dimse.socket_tuning`, without which
  responses wait for delayed ACKs or get lost between back-to-back operations;
* one mapping of failure to the error tree (:func:`gateway.dimse.outcomes.association_failure`): it
  tells "nobody listens" from "the TCP connect timed out", "the TLS handshake failed" (certificate,
  CA, host name, a port that does not speak TLS), "the PACS rejected us" (AE titles;
  A-ASSOCIATE-RJ, PS3.8 §9.3.4) and "the PACS never answered the request", which needs to know
  whether the TCP connection ever opened.

A fresh pynetdicom AE per association: it only carries our AE title and timeouts, and the contexts
are given per request (docs/architecture.md, "DIMSE edge").
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from typing import Literal, overload

from pynetdicom import AE, build_context, build_role, evt
from pynetdicom.association import Association

from gateway.dimse import tls
from gateway.dimse.contexts import Context
from gateway.dimse.outcomes import association_failure, no_context_accepted
from gateway.dimse.socket_tuning import guard_reactor, on_connection_open
from gateway.settings import PacsNode

log = logging.getLogger(__name__)

Handler = tuple[evt.EventType, Callable[[evt.Event], object]]


def _requestor(calling_ae: str, node: PacsNode, max_pdu: int) -> AE:
    """An AE for requesting associations to ``node``, with the node's timeouts."""
    ae = AE(ae_title=calling_ae)
    t = node.timeouts
    ae.connection_timeout = t.connect
    ae.acse_timeout = t.acse
    ae.dimse_timeout = t.dimse
    ae.network_timeout = t.network
    ae.maximum_pdu_size = max_pdu
    return ae


@overload
def open_association(calling_ae: str, node: PacsNode, contexts: Sequence[Context], *,
                     max_pdu: int | None = None, handlers: Sequence[Handler] = (),
                     scp_roles: Sequence[str] = (),
                     none_accepted_ok: Literal[False] = False) -> Association: ...


@overload
def open_association(calling_ae: str, node: PacsNode, contexts: Sequence[Context], *,
                     max_pdu: int | None = None, handlers: Sequence[Handler] = (),
                     scp_roles: Sequence[str] = (),
                     none_accepted_ok: Literal[True]) -> Association | None: ...


def open_association(calling_ae: str, node: PacsNode, contexts: Sequence[Context], *,
                     max_pdu: int | None = None, handlers: Sequence[Handler] = (),
                     scp_roles: Sequence[str] = (), none_accepted_ok: bool = False) -> Association | None:
    """An established, tuned and guarded association to ``node`` proposing ``contexts``, in order.

    ``max_pdu``: the largest PDU we receive (default the node's ``max_pdu``; 0 is unlimited).
    ``handlers``: pynetdicom event handlers bound to the association (e.g. C-GET's C-STORE).
    ``scp_roles``: SOP classes for which we propose the SCP role (C-GET sub-operations, PS3.7 D.3.3.4).
    ``none_accepted_ok``: when the PACS accepted the association but none of the contexts (pynetdicom
    then aborts it, PS3.8 §9.3.3.2), return None instead of raising; the caller decides per item.

    Raises the :mod:`gateway.errors` tree (502/504 naming the node) for every other failure.
    """
    pdu = node.max_pdu if max_pdu is None else max_pdu
    secure = tls.attempt(node)
    connected = threading.Event()
    started = time.monotonic()

    def on_open(event: evt.Event) -> None:
        connected.set()
        on_connection_open(event)

    assoc = _requestor(calling_ae, node, pdu).associate(
        node.host, node.port, contexts=[build_context(cls, list(syntaxes)) for cls, syntaxes in contexts],
        ae_title=node.ae_title, max_pdu=pdu,
        ext_neg=[build_role(cls, scp_role=True) for cls in scp_roles] or None,
        evt_handlers=[(evt.EVT_CONN_OPEN, on_open), *handlers],
        tls_args=secure.tls_args if secure is not None else None,
    )
    if not assoc.is_established:
        if assoc.rejected_contexts and not assoc.accepted_contexts:
            if none_accepted_ok:
                return None
            raise no_context_accepted(node.name, len(contexts))
        raise association_failure(assoc, node.name, connected=connected.is_set(), started=started,
                                  connect_timeout=node.timeouts.connect, tls_enabled=secure is not None,
                                  tls_error=secure.error if secure is not None else None,
                                  acse_timeout=node.timeouts.acse)
    guard_reactor(assoc)
    return assoc


def accepts(assoc: Association, abstract_syntax: str) -> bool:
    """Whether the PACS accepted a context for ``abstract_syntax``."""
    return any(cx.abstract_syntax == abstract_syntax for cx in assoc.accepted_contexts)


def accepted_syntaxes(assoc: Association, abstract_syntax: str) -> list[str]:
    """The transfer syntaxes the PACS accepted for ``abstract_syntax``, one per accepted context."""
    return [str(cx.transfer_syntax[0]) for cx in assoc.accepted_contexts
            if cx.abstract_syntax == abstract_syntax]


def close_association(assoc: Association, *, clean: bool = True) -> None:
    """Release (or, not ``clean``, abort) an association; closing a broken one never raises."""
    try:
        if clean and assoc.is_established:
            assoc.release()
        else:
            assoc.abort()
    except Exception:  # noqa: BLE001 - closing a broken association must never raise
        log.debug("closing an association failed", exc_info=True)

