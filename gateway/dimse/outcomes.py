"""DIMSE outcomes -> the :mod:`gateway.errors` tree and the :mod:`gateway.pacs` results, in one place.

Everything the PACS answers (a response status, PS3.7 Annex C; the sub-operation counters of C-GET and
C-MOVE, PS3.4 C.4.2, C.4.3), and everything that goes wrong on the way (a refused or aborted
association, a lost connection, a timeout) is interpreted here and nowhere else in the DIMSE edge
(docs/architecture.md, "DIMSE edge"): the operation modules only ask "is this pending?", "what went
wrong?" and "what does the caller get?". That keeps the mapping consistent across C-ECHO, C-FIND,
C-GET, C-MOVE and C-STORE, and testable without a network.

pynetdicom reports a DIMSE timeout, an abort or a broken connection with an *empty* status Dataset,
and a failed association with an Association object that is neither established nor rejected. The
elapsed time against the configured timeout tells a timeout (504) from an abort (502). A DICOM TLS
failure (PS3.15 Annex B.1) is only logged by pynetdicom; :mod:`gateway.dimse.tls` keeps the
exception for :func:`association_failure`, which names it as such.
"""

from __future__ import annotations

import ssl
import time
from collections.abc import Mapping, Sequence
from typing import Protocol

from pydicom.dataset import Dataset
from pydicom.multival import MultiValue

from gateway.errors import (
    AssociationAborted,
    AssociationRejected,
    DimseFailure,
    DimseTimeout,
    GatewayError,
    ModelRefused,
    NodeUnreachable,
)
from gateway.pacs import RetrieveOutcome, StoreResult
from translators.stow import PROCESSING_FAILURE, SOP_CLASS_NOT_SUPPORTED, TRANSFER_SYNTAX_NOT_SUPPORTED

# PS3.7 C.1 (general status classes) and PS3.4 C.4 (Query/Retrieve specifics).
SUCCESS = 0x0000
PENDING = frozenset({0xFF00, 0xFF01})
CANCELLED = 0xFE00
OUT_OF_RESOURCES = 0xA700
SUB_OPERATIONS_NOT_PERFORMED = frozenset({0xA701, 0xA702})   # partial: the caller checks what arrived
NOT_SUPPORTED = 0x0122                                        # Refused: SOP Class not supported
NOT_AUTHORISED = 0x0124                                       # Refused: not authorised (PS3.7 C.5.x)

_FAILURE_TEXT = {
    0xA700: "out of resources",
    0xA701: "out of resources: unable to calculate number of matches",
    0xA702: "out of resources: unable to perform sub-operations",
    0xA801: "move destination unknown",
    0xA900: "identifier does not match SOP class",
    0x0122: "SOP class not supported",
    0x0124: "not authorised",
    0x0210: "duplicate invocation",
    0x0211: "unrecognised operation",
    0x0212: "mistyped argument",
}

_SUB_OPERATION_COUNTERS = (("completed", "NumberOfCompletedSuboperations"),
                           ("failed", "NumberOfFailedSuboperations"),
                           ("warning", "NumberOfWarningSuboperations"))


class _Association(Protocol):
    """What :func:`association_failure` reads of a pynetdicom Association."""

    @property
    def is_rejected(self) -> bool: ...

    @property
    def is_aborted(self) -> bool: ...


# --------------------------------------------------------------------------- status classes


def describe_status(status: int) -> str:
    if status in _FAILURE_TEXT:
        return _FAILURE_TEXT[status]
    if 0xC000 <= status <= 0xCFFF:
        return "unable to process"
    return "failure"


def status_code(status: Dataset) -> int | None:
    """The response's Status, or None for pynetdicom's empty status (no response arrived)."""
    return int(status.Status) if "Status" in status else None


def is_pending(status: Dataset) -> bool:
    """A pending response: more follow (PS3.4 C.4.1-C.4.3)."""
    return status_code(status) in PENDING


def is_warning(code: int) -> bool:
    return 0xB000 <= code <= 0xBFFF


# --------------------------------------------------------------------------- errors


def association_failure(assoc: _Association, node: str, *, connected: bool, started: float,
                        connect_timeout: float | None, tls_enabled: bool = False,
                        tls_error: OSError | None = None, rejection: str | None = None,
                        acse_timeout: float | None = None) -> GatewayError:
    """The error for an association that did not become established; the one rule for both engines
    (the fast engine passes an object with the same two flags).

    ``tls_enabled``: the node is configured for DICOM TLS; ``tls_error``: what failed in its TLS layer
    (the handshake, or the peer's alert on the first read), which decides the error. ``rejection``:
    the A-ASSOCIATE-RJ's result, source and reason in words (PS3.8 §9.3.4), when known.
    ``acse_timeout``: the ARTIM timer (PS3.8 §9.1.5); a connected association that failed after it is
    a peer that never answered (pynetdicom aborts it then, which must not read as the peer's abort).
    """
    if tls_error is not None:
        return tls_failure(node, tls_error, elapsed=time.monotonic() - started)
    if assoc.is_rejected:
        why = f": {rejection}" if rejection else ""
        return AssociationRejected(f"node {node} rejected the association{why} (check AE titles and "
                                   f"the PACS's list of known peers)", node=node)
    if not connected:
        elapsed = time.monotonic() - started
        if connect_timeout is not None and elapsed >= connect_timeout * 0.95:
            return DimseTimeout(f"node {node}: TCP connect timed out after {elapsed:.1f} s", node=node)
        return NodeUnreachable(f"node {node} is unreachable (connection refused or no route)", node=node)
    if acse_timeout is not None and time.monotonic() - started >= acse_timeout * 0.95:
        return DimseTimeout(f"node {node} did not answer the association request in time", node=node)
    if assoc.is_aborted:
        hint = "" if tls_enabled else (f" (a node that requires DICOM TLS does this to a plain connection: "
                                       f"check nodes[{node}].tls)")
        return AssociationAborted(f"node {node} aborted the association request or closed the "
                                  f"connection{hint}", node=node)
    return DimseTimeout(f"node {node} did not answer the association request in time", node=node)


def no_context_accepted(node: str, proposed: int) -> AssociationRejected:
    """The node answered the association request but accepted none of the presentation contexts
    (PS3.8 §9.3.3.2): it supports none of the proposed services or transfer syntaxes."""
    return AssociationRejected(f"node {node} accepted none of the {proposed} presentation contexts proposed "
                               f"(it supports none of these services in these transfer syntaxes)", node=node)


def no_response(node: str, operation: str, *, timed_out: bool, elapsed: float) -> GatewayError:
    """No response arrived: the DIMSE timeout passed (504), or the association was aborted or the
    connection lost (502)."""
    if timed_out:
        return DimseTimeout(f"node {node}: {operation} timed out after {elapsed:.1f} s", node=node)
    return AssociationAborted(f"node {node}: association aborted during {operation}", node=node)


# OpenSSL's X509_V_ERR_* codes (x509_vfy.h) that call for another remedy than the CA bundle.
_VERIFY_FIX = {
    9: "the certificate is not yet valid: check the clocks",             # CERT_NOT_YET_VALID
    10: "the node's certificate must be renewed (or the clocks checked)",  # CERT_HAS_EXPIRED
    62: "set nodes[{node}].tls.server_name to a name the certificate carries",   # HOSTNAME_MISMATCH
    64: "set nodes[{node}].tls.server_name to a name the certificate carries",   # IP_ADDRESS_MISMATCH
}


def tls_failure(node: str, error: OSError, *, elapsed: float) -> GatewayError:
    """The error for a failed DICOM TLS handshake with ``node`` (502; a handshake timeout 504)."""
    where = f"check nodes[{node}].tls"
    if isinstance(error, ssl.SSLCertVerificationError):
        reason = error.verify_message or error.reason or str(error)
        fix = _VERIFY_FIX.get(error.verify_code, "{where} (ca_file)").format(node=node, where=where)
        return NodeUnreachable(f"node {node}: DICOM TLS failure: the node's certificate was not accepted "
                               f"({reason}); {fix}", node=node)
    if isinstance(error, TimeoutError):
        return DimseTimeout(f"node {node}: DICOM TLS handshake timed out after {elapsed:.1f} s", node=node)
    if isinstance(error, ConnectionError | ssl.SSLEOFError | ssl.SSLZeroReturnError):
        return NodeUnreachable(f"node {node}: DICOM TLS failure: the node closed the connection during the "
                               f"TLS handshake (does its port speak DICOM TLS?); {where}", node=node)
    reason = getattr(error, "reason", None) or str(error)
    text = str(reason).lower().replace("_", " ")
    if ("alert" in text and "certificate" in text) or "unknown ca" in text:
        return NodeUnreachable(f"node {node}: DICOM TLS failure: the node refused our client certificate "
                               f"({text}); {where} (cert_file, key_file)", node=node)
    return NodeUnreachable(f"node {node}: DICOM TLS failure: the handshake failed ({text}); {where}",
                           node=node)


def status_error(status: Dataset, node: str, operation: str, *, started: float,
                 dimse_timeout: float | None) -> GatewayError | None:
    """None for success/pending/cancel/warning; otherwise the error for this DIMSE response status."""
    return code_error(status_code(status), node, operation, started=started, dimse_timeout=dimse_timeout)


def code_error(code: int | None, node: str, operation: str, *, started: float,
               dimse_timeout: float | None) -> GatewayError | None:
    """:func:`status_error` for the status as a number (None: no response arrived), for an engine
    that reads command sets without pydicom."""
    if code is None:
        elapsed = time.monotonic() - started
        timed_out = dimse_timeout is not None and elapsed >= dimse_timeout * 0.95
        return no_response(node, operation, timed_out=timed_out, elapsed=elapsed)
    if code in PENDING or code in (SUCCESS, CANCELLED) or is_warning(code):
        return None
    # The PACS's ErrorComment is free text that may name the patient or echo the identifier: it goes
    # neither into the response nor into the log. The status code says what a client can act on.
    detail = f"node {node}: {operation} failed with status 0x{code:04X} ({describe_status(code)})"
    return DimseFailure(detail, node=node, status=code)


def find_model_refused(node: str, root: str) -> DimseFailure:
    """The node accepted the query association but not this C-FIND information model."""
    name = "Patient" if root == "patient" else "Study"
    return ModelRefused(f"node {node} does not support {name} Root C-FIND (set query_model for this node)",
                        node=node, status=NOT_SUPPORTED)


def get_refused(node: str) -> DimseFailure:
    """The node accepted the C-GET association (for its C-FIND context) but not C-GET."""
    return ModelRefused(f"node {node} does not accept C-GET; configure `retrieve: move` for it",
                        node=node, status=NOT_SUPPORTED)


def move_refused(node: str) -> DimseFailure:
    return ModelRefused(f"node {node} does not accept C-MOVE", node=node, status=NOT_SUPPORTED)


def echo_refused(node: str) -> DimseFailure:
    """The node accepted the query association but not the Verification SOP class."""
    return DimseFailure(f"node {node} does not accept C-ECHO (Verification)", node=node, status=NOT_SUPPORTED)


# --------------------------------------------------------------------------- C-GET / C-MOVE


def retrieve_response(status: Dataset, identifier: Dataset | None, outcome: RetrieveOutcome, node: str,
                      operation: str, *, started: float, dimse_timeout: float | None) -> bool:
    """Fold one C-GET/C-MOVE response into ``outcome``; True while pending (a C-CANCEL may follow).

    The sub-operation counters and the Failed SOP Instance UID List are taken from every response
    that carries them. Cancel (FE00) marks the outcome cancelled; warning (B000-BFFF: some
    sub-operations failed) and A701/A702 (out of resources for sub-operations) are partial results the
    caller judges by what arrived; any other failure, and an empty status, raise.
    """
    counters = {attr: int(status.get(keyword)) for attr, keyword in _SUB_OPERATION_COUNTERS
                if keyword in status and status.get(keyword) is not None}
    failed_uids = (_uid_list(identifier.FailedSOPInstanceUIDList)
                   if identifier is not None and "FailedSOPInstanceUIDList" in identifier else None)
    return retrieve_status(status_code(status), counters, failed_uids, outcome, node, operation,
                           started=started, dimse_timeout=dimse_timeout)


def retrieve_status(code: int | None, counters: Mapping[str, int], failed_uids: list[str] | None,
                    outcome: RetrieveOutcome, node: str, operation: str, *, started: float,
                    dimse_timeout: float | None) -> bool:
    """:func:`retrieve_response` for values already read: ``counters`` by RetrieveOutcome attribute
    (``completed``, ``failed``, ``warning``), the Failed SOP Instance UID List when one came."""
    err = code_error(code, node, operation, started=started, dimse_timeout=dimse_timeout)
    for attr, value in counters.items():
        setattr(outcome, attr, value)
    if failed_uids is not None:
        outcome.failed_uids = failed_uids
    if code == CANCELLED:
        outcome.cancelled = True
    elif code is not None and (is_warning(code) or code in SUB_OPERATIONS_NOT_PERFORMED):
        pass
    elif err is not None:
        raise err
    return code in PENDING


def _uid_list(value: object) -> list[str]:
    values: Sequence[object] = value if isinstance(value, list | tuple | MultiValue) else [value]
    return [str(v) for v in values if v]


# --------------------------------------------------------------------------- C-STORE


def store_response(status: Dataset, sent_syntax: str) -> StoreResult:
    """The result of a C-STORE the PACS may have answered.

    Nothing unconfirmed is a success: an empty status (abort, timeout or lost connection) means the
    outcome is unknown, so the instance is a processing failure (0110) and not confirmed.
    """
    code = status_code(status)
    if code is None:
        return store_lost()
    return StoreResult(code, confirmed=True, sent_syntax=sent_syntax)


def store_lost() -> StoreResult:
    """Never sent or never answered: cancelled, association gone, not established, file unsendable."""
    return StoreResult(PROCESSING_FAILURE, confirmed=False)


def store_sop_class_refused() -> StoreResult:
    """The PACS accepted no context for the item's SOP class."""
    return StoreResult(SOP_CLASS_NOT_SUPPORTED, confirmed=False)


def store_syntax_refused() -> StoreResult:
    """The PACS accepted neither the item's syntax nor a native one it could be transcoded to."""
    return StoreResult(TRANSFER_SYNTAX_NOT_SUPPORTED, confirmed=False)
