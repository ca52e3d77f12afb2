"""DIMSE outcomes -> the GatewayError tree, in exactly one place (style.md example 4).

pynetdicom reports a DIMSE timeout, an abort or a broken connection with an *empty* status
Dataset, and a failed association with an Association object that is neither established nor
rejected. These helpers turn both into typed errors that name the node.
"""

from __future__ import annotations

import time

from pydicom.dataset import Dataset

from gateway.errors import (
    AssociationAborted,
    AssociationRejected,
    DimseFailure,
    DimseTimeout,
    GatewayError,
    NodeUnreachable,
)

PENDING = {0xFF00, 0xFF01}
SUCCESS = 0x0000
CANCELLED = 0xFE00

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


def describe_status(status: int) -> str:
    if status in _FAILURE_TEXT:
        return _FAILURE_TEXT[status]
    if 0xC000 <= status <= 0xCFFF:
        return "unable to process"
    return "failure"


def association_failure(assoc: object, node: str, *, connected: bool, started: float,
                        connect_timeout: float | None) -> GatewayError:
    """The error for an association that did not become established."""
    if getattr(assoc, "is_rejected", False):
        return AssociationRejected(f"node {node} rejected the association (check AE titles and "
                                   f"the PACS's list of known peers)", node=node)
    if not connected:
        elapsed = time.monotonic() - started
        if connect_timeout is not None and elapsed >= connect_timeout * 0.95:
            return DimseTimeout(f"node {node}: TCP connect timed out after {elapsed:.1f} s", node=node)
        return NodeUnreachable(f"node {node} is unreachable (connection refused or no route)", node=node)
    if getattr(assoc, "is_aborted", False):
        return AssociationAborted(f"node {node} aborted the association request", node=node)
    return DimseTimeout(f"node {node} did not answer the association request in time", node=node)


def status_error(status: Dataset, node: str, operation: str, *, started: float,
                 dimse_timeout: float | None) -> GatewayError | None:
    """None for success/pending/cancel; otherwise the error for this DIMSE response status."""
    if "Status" not in status:
        elapsed = time.monotonic() - started
        if dimse_timeout is not None and elapsed >= dimse_timeout * 0.95:
            return DimseTimeout(f"node {node}: {operation} timed out after {elapsed:.1f} s", node=node)
        return AssociationAborted(f"node {node}: association aborted during {operation}", node=node)
    code = int(status.Status)
    if code in PENDING or code in (SUCCESS, CANCELLED) or 0xB000 <= code <= 0xBFFF:
        return None
    comment = str(status.get("ErrorComment", "") or "")
    detail = f"node {node}: {operation} failed with status 0x{code:04X} ({describe_status(code)})"
    if comment:
        detail += f": {comment}"
    return DimseFailure(detail, node=node, status=code)
