"""C-GET and C-MOVE: retrieval of instances from a node, in worker threads.

Sub-operations (C-STORE) reach ``on_instance`` with the dataset bytes exactly as received (Part-10,
the transfer syntax negotiated for that presentation context); the caller writes them to the spool
and signals its waiters. The handler runs on pynetdicom's association thread, so ``on_instance``
must be quick (write, rename, signal) or the PACS times out.

C-GET negotiates one transfer syntax per presentation context (pynetdicom gotcha, see DemoPacs): to
receive compressed data untouched we propose one context per (SOP class, transfer syntax) for the
SOP classes the C-FIND found, within the 128-context limit, plus uncompressed fallbacks.
"""

from __future__ import annotations

import logging
import re
import struct
import threading
import time
from collections.abc import Iterable
from io import BytesIO
from typing import Any, Literal

from pydicom.dataset import Dataset
from pynetdicom import AE, PYNETDICOM_IMPLEMENTATION_UID, PYNETDICOM_IMPLEMENTATION_VERSION, build_role, evt

from gateway.dimse.outcomes import status_error
from gateway.dimse.socket_tuning import busy, close_association, guard_reactor, new_ae, on_connection_open
from gateway.errors import DimseFailure, GatewayError
from gateway.pacs import OnInstance, RetrieveOutcome
from gateway.settings import PacsNode

log = logging.getLogger(__name__)

STUDY_ROOT_GET = "1.2.840.10008.5.1.4.1.2.2.3"
STUDY_ROOT_MOVE = "1.2.840.10008.5.1.4.1.2.2.2"
PATIENT_ROOT_GET = "1.2.840.10008.5.1.4.1.2.1.3"
PATIENT_ROOT_MOVE = "1.2.840.10008.5.1.4.1.2.1.2"

NATIVE = ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2"]
# Compressed syntaxes proposed each in its own context, most common first.
COMPRESSED = [
    "1.2.840.10008.1.2.5",        # RLE Lossless
    "1.2.840.10008.1.2.4.70",     # JPEG Lossless SV1
    "1.2.840.10008.1.2.4.50",     # JPEG Baseline
    "1.2.840.10008.1.2.4.90",     # JPEG 2000 Lossless
    "1.2.840.10008.1.2.4.91",     # JPEG 2000
    "1.2.840.10008.1.2.4.80",     # JPEG-LS Lossless
    "1.2.840.10008.1.2.4.81",     # JPEG-LS Near-Lossless
    "1.2.840.10008.1.2.4.51",     # JPEG Extended
    "1.2.840.10008.1.2.4.57",     # JPEG Lossless
    "1.2.840.10008.1.2.1.99",     # Deflated Explicit VR LE
]
# When the C-FIND did not tell us the SOP classes (dcmqrscp omits them): the usual suspects.
COMMON_STORAGE = [
    "1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.5.1.4.1.1.4", "1.2.840.10008.5.1.4.1.1.1",
    "1.2.840.10008.5.1.4.1.1.1.1", "1.2.840.10008.5.1.4.1.1.1.2", "1.2.840.10008.5.1.4.1.1.128",
    "1.2.840.10008.5.1.4.1.1.7", "1.2.840.10008.5.1.4.1.1.7.2", "1.2.840.10008.5.1.4.1.1.7.3",
    "1.2.840.10008.5.1.4.1.1.7.4", "1.2.840.10008.5.1.4.1.1.6.1", "1.2.840.10008.5.1.4.1.1.3.1",
    "1.2.840.10008.5.1.4.1.1.12.1", "1.2.840.10008.5.1.4.1.1.20", "1.2.840.10008.5.1.4.1.1.1.2.1",
    "1.2.840.10008.5.1.4.1.1.2.1", "1.2.840.10008.5.1.4.1.1.4.1", "1.2.840.10008.5.1.4.1.1.88.11",
    "1.2.840.10008.5.1.4.1.1.88.22", "1.2.840.10008.5.1.4.1.1.88.33", "1.2.840.10008.5.1.4.1.1.66.4",
    "1.2.840.10008.5.1.4.1.1.481.3", "1.2.840.10008.5.1.4.1.1.11.1", "1.2.840.10008.5.1.4.1.1.88.59",
    "1.2.840.10008.5.1.4.1.1.104.1", "1.2.840.10008.5.1.4.1.1.12.2", "1.2.840.10008.5.1.4.1.1.481.1",
]
MAX_CONTEXTS = 128


_PLAIN_UID = re.compile(r"[0-9.]{1,64}")
_PREAMBLE = b"\x00" * 128 + b"DICM"


def _meta_element(element: int, vr: bytes, value: bytes) -> bytes:
    # Group 0002, Explicit VR Little Endian, 2-byte length (UI, SH, UL).
    return struct.pack("<HH2sH", 0x0002, element, vr, len(value)) + value


def part10_header(sop_class: str, sop_instance: str, transfer_syntax: str) -> bytes | None:
    """Preamble, ``DICM`` and the File Meta Information, byte for byte what pynetdicom's
    ``Event.encoded_dataset(include_meta=True)`` puts before the dataset (``create_file_meta`` +
    ``encode_file_meta``), without building and encoding a pydicom dataset for every sub-operation
    (~0.2-0.4 ms of GIL-held time each, on the association's critical path). ``None`` for values the
    fast path does not cover (not a plain UID); the caller then uses pynetdicom's encoder.
    """
    uids = (sop_class, sop_instance, transfer_syntax)
    if not all(_PLAIN_UID.fullmatch(u) for u in uids):
        return None
    version = PYNETDICOM_IMPLEMENTATION_VERSION.encode("ascii")
    body = b"".join((
        struct.pack("<HH2sHI", 0x0002, 0x0001, b"OB", 0, 2), b"\x00\x01",   # FileMetaInformationVersion
        *(_meta_element(el, b"UI", _ui(uid)) for el, uid in ((0x0002, sop_class), (0x0003, sop_instance),
                                                            (0x0010, transfer_syntax),
                                                            (0x0012, PYNETDICOM_IMPLEMENTATION_UID))),
        _meta_element(0x0013, b"SH", version + b" " * (len(version) % 2)),
    ))
    return _PREAMBLE + struct.pack("<HH2sHI", 0x0002, 0x0000, b"UL", 4, len(body)) + body


def _ui(uid: str) -> bytes:
    value = uid.encode("ascii")
    return value + b"\x00" * (len(value) % 2)


def encoded_part10(event: evt.Event, sop_class: str, sop_instance: str, transfer_syntax: str) -> bytes:
    """The C-STORE dataset as received, as a Part-10 file (one copy of the dataset bytes)."""
    stream = getattr(event.request, "DataSet", None)
    if isinstance(stream, BytesIO):   # not a temp file path (_config.STORE_RECV_CHUNKED_DATASET)
        header = part10_header(sop_class, sop_instance, transfer_syntax)
        if header is not None:
            return b"".join((header, stream.getvalue()))
    return bytes(event.encoded_dataset(include_meta=True))


def storage_contexts(sop_classes: Iterable[str], reserved: int = 1,
                     compressed_first: bool = False) -> list[tuple[str, list[str]]]:
    """(SOP class, [transfer syntax]) pairs within the 128-context limit (PS3.8 §9.3.2.2).

    Order matters: DCMTK-based PACS send each C-GET sub-operation on the *first* accepted context of
    its SOP class and fail when they cannot convert the file to it. ``compressed_first`` is used for
    the retry of instances a native-first attempt could not deliver.
    """
    classes = list(dict.fromkeys(sop_classes)) or COMMON_STORAGE
    budget = MAX_CONTEXTS - reserved
    # Explicit and Implicit VR LE in separate contexts, Explicit first: an SCP picks one syntax per
    # context (pynetdicom acceptors prefer Implicit), and Implicit VR LE must not reach web clients
    # (PS3.18 §8.7.3), so we would have to re-encode every instance.
    native: list[tuple[str, list[str]]] = [(c, [ts]) for ts in NATIVE for c in classes][:budget]
    compressed: list[tuple[str, list[str]]] = []
    for ts in COMPRESSED:   # breadth first: every class gets RLE before any gets JPEG-LS
        for cls in classes:
            if len(native) + len(compressed) >= budget:
                break
            compressed.append((cls, [ts]))
    return compressed + native if compressed_first else native + compressed


def _identifier(level: str, study: str, series: str | None, sops: list[str] | None,
                patient_id: str | None) -> Dataset:
    ds = Dataset()
    ds.QueryRetrieveLevel = level
    if patient_id:
        ds.PatientID = patient_id
    ds.StudyInstanceUID = study
    if series:
        ds.SeriesInstanceUID = series
    if sops:
        ds.SOPInstanceUID = sops if len(sops) > 1 else sops[0]
    return ds


class Retriever:
    """C-GET / C-MOVE runner for one gateway; per node a semaphore bounds retrieval associations."""

    def __init__(self, calling_ae: str) -> None:
        self.calling_ae = calling_ae

    def _ae(self, node: PacsNode) -> AE:
        # max PDU 0 = unlimited: the PACS sends PDUs as large as it likes (throughput)
        return new_ae(self.calling_ae, node, max_pdu=0)

    def _associate(self, ae: AE, node: PacsNode, handlers: list[Any],
                   ext_neg: list[Any] | None = None) -> Any:
        from gateway.dimse.outcomes import association_failure

        connected = threading.Event()
        started = time.monotonic()

        def on_open(event: evt.Event) -> None:
            connected.set()
            on_connection_open(event)

        assoc = ae.associate(node.host, node.port, ae_title=node.ae_title, max_pdu=0,
                             ext_neg=ext_neg, evt_handlers=[(evt.EVT_CONN_OPEN, on_open), *handlers])
        if not assoc.is_established:
            raise association_failure(assoc, node.name, connected=connected.is_set(), started=started,
                                      connect_timeout=node.timeouts.connect)
        guard_reactor(assoc)
        return assoc

    def get(self, node: PacsNode, *, level: Literal["STUDY", "SERIES", "IMAGE"], study: str,
            series: str | None = None, sops: list[str] | None = None, sop_classes: Iterable[str] = (),
            on_instance: OnInstance, cancel: threading.Event,
            patient_id: str | None = None, compressed_first: bool = False) -> RetrieveOutcome:
        """Blocking C-GET; storage sub-operations arrive on the same association."""
        model = PATIENT_ROOT_GET if node.query_model == "patient" else STUDY_ROOT_GET
        ae = self._ae(node)
        ae.add_requested_context(model)
        # Also propose C-FIND: a PACS without C-GET then still accepts the association, and we can
        # say exactly what is missing instead of reporting an abort.
        ae.add_requested_context(model[:-1] + "1")
        contexts = storage_contexts(sop_classes, reserved=2, compressed_first=compressed_first)
        for cls, syntaxes in contexts:
            ae.add_requested_context(cls, syntaxes)
        roles = [build_role(cls, scp_role=True) for cls in dict.fromkeys(c for c, _ in contexts)]
        outcome = RetrieveOutcome()

        def handle_store(event: evt.Event) -> int:
            if cancel.is_set():
                return 0xA700
            try:
                req: Any = event.request
                sop, cls, ts = (str(req.AffectedSOPInstanceUID), str(req.AffectedSOPClassUID),
                                str(event.context.transfer_syntax))
                on_instance(encoded_part10(event, cls, sop, ts), sop, cls, ts)
            except Exception:  # noqa: BLE001 - tell the PACS, keep the association alive
                log.exception("storing a C-GET sub-operation failed")
                return 0xA700
            outcome.received += 1
            return 0x0000

        assoc = self._associate(ae, node, [(evt.EVT_C_STORE, handle_store)], ext_neg=roles)
        try:
            if not any(cx.abstract_syntax == model for cx in assoc.accepted_contexts):
                raise DimseFailure(f"node {node.name} does not accept C-GET; configure `retrieve: move` "
                                   f"for it", node=node.name, status=0x0122)
            identifier = _identifier(level, study, series, sops, patient_id)
            with busy(assoc):
                self._run(assoc, assoc.send_c_get(identifier, model, msg_id=1), node, "C-GET", outcome,
                          cancel, model, 1)
        finally:
            self._close(assoc, clean=not outcome.cancelled)
        return outcome

    def move(self, node: PacsNode, *, level: Literal["STUDY", "SERIES", "IMAGE"], study: str,
             series: str | None = None, sops: list[str] | None = None, destination: str, msg_id: int,
             cancel: threading.Event, patient_id: str | None = None) -> RetrieveOutcome:
        """Blocking C-MOVE to ``destination`` (our storage SCP); arrivals are routed by the SCP."""
        model = PATIENT_ROOT_MOVE if node.query_model == "patient" else STUDY_ROOT_MOVE
        ae = self._ae(node)
        ae.add_requested_context(model)
        outcome = RetrieveOutcome()
        assoc = self._associate(ae, node, [])
        try:
            if not assoc.accepted_contexts:
                raise DimseFailure(f"node {node.name} does not accept C-MOVE", node=node.name, status=0x0122)
            identifier = _identifier(level, study, series, sops, patient_id)
            with busy(assoc):
                self._run(assoc, assoc.send_c_move(identifier, destination, model, msg_id=msg_id), node,
                          "C-MOVE", outcome, cancel, model, msg_id)
        finally:
            self._close(assoc, clean=not outcome.cancelled)
        return outcome

    @staticmethod
    def _run(assoc: Any, responses: Iterable[tuple[Dataset, Dataset | None]], node: PacsNode, op: str,
             outcome: RetrieveOutcome, cancel: threading.Event, model: str, msg_id: int) -> None:
        started = time.monotonic()
        for status, identifier in responses:
            err: GatewayError | None = status_error(status, node.name, op, started=started,
                                                    dimse_timeout=node.timeouts.dimse)
            code = int(status.Status) if "Status" in status else None
            for attr, name in (("completed", "NumberOfCompletedSuboperations"),
                               ("failed", "NumberOfFailedSuboperations"),
                               ("warning", "NumberOfWarningSuboperations")):
                if name in status and status.get(name) is not None:
                    setattr(outcome, attr, int(status.get(name)))
            if identifier is not None and "FailedSOPInstanceUIDList" in identifier:
                value = identifier.FailedSOPInstanceUIDList
                values = value if isinstance(value, list | tuple) or type(value).__name__ == "MultiValue" \
                    else [value]
                outcome.failed_uids = [str(v) for v in values if v]
            if code == 0xFE00:
                outcome.cancelled = True
            elif code is not None and 0xB000 <= code <= 0xBFFF:
                pass   # warning: some sub-operations failed; the caller checks what arrived
            elif code == 0xA702 or (code is not None and code in (0xA701,)):
                pass   # out of resources for sub-operations: partial, reported by the caller
            elif err is not None:
                raise err
            if cancel.is_set() and not outcome.cancelled and code in (0xFF00, 0xFF01):
                assoc.send_c_cancel(msg_id, query_model=model)
                outcome.cancelled = True

    @staticmethod
    def _close(assoc: Any, *, clean: bool) -> None:
        close_association(assoc, clean=clean)
