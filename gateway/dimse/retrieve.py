"""C-GET and C-MOVE (blocking; run by :mod:`gateway.dimse.threads` under the node's transfer budget).

* **C-GET** (PS3.4 C.4.3): the instances come back as C-STORE sub-operations on the same association,
  for which the gateway is the storage SCP (role selection, PS3.7 D.3.3.4). Each reaches
  ``on_instance`` with the data set bytes exactly as received, as a Part-10 file in the transfer syntax
  negotiated for its context; the handler runs on pynetdicom's association thread, so ``on_instance``
  must be quick (write, rename, signal) or the PACS times out. Which contexts are proposed is
  :func:`gateway.dimse.contexts.get_proposal`'s decision.
* **C-MOVE** (PS3.4 C.4.2): the PACS opens its own association to the destination (the gateway's
  storage SCP, :mod:`gateway.dimse.storage_scp`), which routes the arrivals.
* **Cancellation**: while responses are pending, a set ``cancel`` sends one C-CANCEL (PS3.7 9.3.3.3,
  9.3.4.3); C-GET sub-operations arriving after it are refused. An association that saw a cancel is
  aborted, not released.

What the responses mean (counters, partial results, failures) is :func:`gateway.dimse.outcomes.
retrieve_response`'s call. Building the Part-10 header per sub-operation is on the association's
critical path, hence :func:`gateway.dimse.part10.part10_header` (docs/architecture.md, "DIMSE edge").
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from io import BytesIO
from typing import cast

from pydicom.dataset import Dataset
from pynetdicom import evt
from pynetdicom.association import Association
from pynetdicom.dimse_primitives import C_STORE

from gateway.dimse import outcomes
from gateway.dimse.association import accepts, close_association, open_association
from gateway.dimse.contexts import get_proposal, move_contexts, move_model
from gateway.dimse.part10 import part10_header
from gateway.dimse.socket_tuning import busy
from gateway.pacs import NotRequested, OnInstance, RetrieveOutcome, RetrieveRequest
from gateway.settings import PacsNode

log = logging.getLogger(__name__)

UNLIMITED_PDU = 0   # the PACS sends PDUs as large as it likes (throughput)

__all__ = ["encoded_part10", "get", "move", "part10_header"]   # part10_header: moved, still importable here


# --------------------------------------------------------------------------- operations


def get(calling_ae: str, node: PacsNode, request: RetrieveRequest, on_instance: OnInstance,
        cancel: threading.Event) -> RetrieveOutcome:
    """C-GET; storage sub-operations arrive on the same association, through ``on_instance``."""
    proposal = get_proposal(node.query_model, request.sop_classes, compressed_first=request.compressed_first)
    outcome = RetrieveOutcome()

    def handle_store(event: evt.Event) -> int:
        if cancel.is_set():
            return outcomes.OUT_OF_RESOURCES
        try:
            req = cast(C_STORE, event.request)
            sop, cls, ts = (str(req.AffectedSOPInstanceUID), str(req.AffectedSOPClassUID),
                            str(event.context.transfer_syntax))
            on_instance(encoded_part10(event, cls, sop, ts), sop, cls, ts)
        except NotRequested:
            return outcomes.NOT_AUTHORISED
        except Exception:  # noqa: BLE001 - tell the PACS, keep the association alive
            log.exception("storing a C-GET sub-operation failed")
            return outcomes.OUT_OF_RESOURCES
        outcome.received += 1
        return outcomes.SUCCESS

    assoc = open_association(calling_ae, node, proposal.contexts, max_pdu=UNLIMITED_PDU,
                             handlers=[(evt.EVT_C_STORE, handle_store)], scp_roles=proposal.scp_roles)
    try:
        if not accepts(assoc, proposal.model):
            raise outcomes.get_refused(node.name)
        with busy(assoc):
            responses = assoc.send_c_get(_identifier(request), proposal.model, msg_id=1)
            _follow(assoc, responses, node, "C-GET", outcome, cancel, proposal.model, 1)
    finally:
        close_association(assoc, clean=not outcome.cancelled)
    return outcome


def move(calling_ae: str, node: PacsNode, request: RetrieveRequest, *, destination: str, msg_id: int,
         cancel: threading.Event) -> RetrieveOutcome:
    """C-MOVE to ``destination``; the arrivals are routed by the storage SCP."""
    model = move_model(node.query_model)
    outcome = RetrieveOutcome()
    assoc = open_association(calling_ae, node, move_contexts(node.query_model), max_pdu=UNLIMITED_PDU)
    try:
        if not accepts(assoc, model):
            raise outcomes.move_refused(node.name)
        with busy(assoc):
            responses = assoc.send_c_move(_identifier(request), destination, model, msg_id=msg_id)
            _follow(assoc, responses, node, "C-MOVE", outcome, cancel, model, msg_id)
    finally:
        close_association(assoc, clean=not outcome.cancelled)
    return outcome


def _follow(assoc: Association, responses: Iterator[tuple[Dataset, Dataset | None]], node: PacsNode,
            operation: str, outcome: RetrieveOutcome, cancel: threading.Event, model: str,
            msg_id: int) -> None:
    """Read every response into ``outcome``; one C-CANCEL once ``cancel`` is set while pending."""
    started = time.monotonic()
    for status, identifier in responses:
        pending = outcomes.retrieve_response(status, identifier, outcome, node.name, operation,
                                             started=started, dimse_timeout=node.timeouts.dimse)
        if pending and cancel.is_set() and not outcome.cancelled:
            assoc.send_c_cancel(msg_id, query_model=model)
            outcome.cancelled = True


def _identifier(request: RetrieveRequest) -> Dataset:
    """The retrieve identifier: the unique keys down to the level (PS3.4 C.4.2, C.4.3)."""
    ds = Dataset()
    ds.QueryRetrieveLevel = request.level
    if request.patient_id:
        ds.PatientID = request.patient_id
    ds.StudyInstanceUID = request.study
    if request.series:
        ds.SeriesInstanceUID = request.series
    if request.sops:
        sops = list(request.sops)
        ds.SOPInstanceUID = sops if len(sops) > 1 else sops[0]
    return ds


# --------------------------------------------------------------------------- Part-10 encoding


def encoded_part10(event: evt.Event, sop_class: str, sop_instance: str, transfer_syntax: str) -> bytes:
    """The C-STORE dataset as received, as a Part-10 file (one copy of the dataset bytes)."""
    stream = getattr(event.request, "DataSet", None)
    if isinstance(stream, BytesIO):   # not a temp file path (_config.STORE_RECV_CHUNKED_DATASET)
        header = part10_header(sop_class, sop_instance, transfer_syntax)
        if header is not None:
            return b"".join((header, stream.getvalue()))
    return bytes(event.encoded_dataset(include_meta=True))
