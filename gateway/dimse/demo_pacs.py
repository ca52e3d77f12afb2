"""An in-process Query/Retrieve SCP holding instances in memory: the peer of ``dicomweb-gateway demo``.

Tests use it as a PACS they can configure and observe: fault injection (``fail_status``,
``find_delay``, ``patient_root_only``, case-sensitive PN, no counts, ModalitiesInStudy ignored, a
result cap ``max_matches``, idle associations aborted after ``network_timeout``) and counting what
reached the peer (``counters``, ``received_identifiers``).

Services (PS3.4 Annex C, all on one AE):

- Verification;
- C-FIND, Study Root (STUDY/SERIES/IMAGE) and Patient Root (PATIENT/STUDY/SERIES/IMAGE),
  hierarchical (C.4.1.3.1): the unique keys of every level above the query level must be present;
  matching by :mod:`translators.matching`; optional keys computed per level (counts,
  ModalitiesInStudy, SOPClassesInStudy, AvailableTransferSyntaxUID); pending status FF00, or FF01
  when computed keys were asked for but ``return_counts`` is off (they are then left out); C-CANCEL
  honoured between responses;
- C-GET and C-MOVE at PATIENT (Patient Root)/STUDY/SERIES/IMAGE level, by unique keys (UID lists
  allowed), sending each instance in the transfer syntax it was stored in;
- C-STORE of every storage SOP class pynetdicom knows, in any transfer syntax pynetdicom knows.

Keys of a level below the query level (e.g. SOPInstanceUID in a STUDY query) are neither matched nor
returned; attributes :mod:`gateway.dimse.demo_pacs_model` does not classify are treated as belonging
to the query level. That module holds the stored instances' record and the information model (levels,
unique and computed keys); this one the AE, its event handlers and the server lifecycle.
"""

from __future__ import annotations

import functools
import logging
import socket
import threading
import time
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)
from pynetdicom import (
    AE,
    ALL_TRANSFER_SYNTAXES,
    DEFAULT_TRANSFER_SYNTAXES,
    AllStoragePresentationContexts,
    build_context,
    evt,
)
from pynetdicom.dimse_messages import C_CANCEL_RQ
from pynetdicom.presentation import PresentationContext
from pynetdicom.transport import ThreadedAssociationServer

from gateway.dimse.demo_pacs_model import (
    ALL_COMPUTED,
    AVAILABLE_TRANSFER_SYNTAX_UID,
    LEVELS,
    MATCHABLE_COMPUTED,
    MODALITIES_IN_STUDY,
    RETRIEVE_AE_TITLE,
    SPECIFIC_CHARACTER_SET,
    UNIQUE_KEYS,
    Hierarchy,
    StoredInstance,
    check_level,
    ensure_file_meta,
    level_of,
    value_str,
)
from gateway.dimse.process import configure_pynetdicom
from gateway.dimse.socket_tuning import busy, guard_reactor
from translators.matching import DEFAULT_IGNORED_KEYS, build_response, dataset_matches, element_matches

LOGGER = logging.getLogger(__name__)

PENDING = 0xFF00
PENDING_OPTIONAL_KEYS_UNSUPPORTED = 0xFF01
CANCEL = 0xFE00
IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS = 0xA900
MAX_REQUESTED_CONTEXTS = 128  # PS3.8: presentation context IDs are odd numbers 1..255

VERIFICATION = UID("1.2.840.10008.1.1")
PATIENT_ROOT_FIND, PATIENT_ROOT_MOVE, PATIENT_ROOT_GET = (
    UID(f"1.2.840.10008.5.1.4.1.2.1.{n}") for n in (1, 2, 3)
)
STUDY_ROOT_FIND, STUDY_ROOT_MOVE, STUDY_ROOT_GET = (UID(f"1.2.840.10008.5.1.4.1.2.2.{n}") for n in (1, 2, 3))
_FIND: dict[str, str] = {PATIENT_ROOT_FIND: "PATIENT", STUDY_ROOT_FIND: "STUDY"}
_GET: dict[str, str] = {PATIENT_ROOT_GET: "PATIENT", STUDY_ROOT_GET: "STUDY"}
_MOVE: dict[str, str] = {PATIENT_ROOT_MOVE: "PATIENT", STUDY_ROOT_MOVE: "STUDY"}
_UNCOMPRESSED = {
    ImplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    DeflatedExplicitVRLittleEndian,
}
COUNTER_NAMES = ("associations", "echo", "find", "get", "move", "store", "cancel", "sent", "aborted")


class DemoPacs:
    """A pynetdicom Q/R SCP + storage SCP over an in-memory store; see the module docstring."""

    def __init__(
        self,
        datasets: Iterable[Dataset] | None = None,
        *,
        files: Iterable[Path] | None = None,
        ae_title: str = "DEMOPACS",
        host: str = "127.0.0.1",
        port: int = 0,
        move_destinations: Mapping[str, tuple[str, int]] | None = None,
        patient_root_only: bool = False,
        case_sensitive_pn: bool = False,
        return_counts: bool = True,
        honour_modalities_in_study: bool = True,
        find_delay: float = 0.0,
        fail_status: int | None = None,
        fail_comment: str | None = None,
        max_pdu: int = 16382,
        max_associations: int = 32,
        max_matches: int | None = None,
        network_timeout: float | None = None,
    ) -> None:
        self.ae_title = ae_title
        self.host = host
        self.port = port
        self.move_destinations: dict[str, tuple[str, int]] = dict(move_destinations or {})
        self.patient_root_only = patient_root_only
        self.case_sensitive_pn = case_sensitive_pn
        self.return_counts = return_counts
        self.honour_modalities_in_study = honour_modalities_in_study
        self.find_delay = find_delay
        self.fail_status = fail_status
        self.fail_comment = fail_comment   # ErrorComment (0000,0902) sent with a C-FIND fail_status
        self.max_pdu = max_pdu
        self.max_associations = max_associations
        self.max_matches = max_matches          # C-FIND: success after this many matches (a PACS's cap)
        self.network_timeout = network_timeout  # an association idle this long is aborted (None: 60 s)
        self.counters: dict[str, int] = dict.fromkeys(COUNTER_NAMES, 0)
        self.received_identifiers: list[Dataset] = []  # C-FIND identifiers, as the peer sent them
        self.received_retrieve_identifiers: list[Dataset] = []  # C-GET and C-MOVE identifiers
        self._lock = threading.Lock()
        self._instances: dict[str, StoredInstance] = {}
        self._ae: AE | None = None
        self._server: ThreadedAssociationServer | None = None
        for ds in datasets or ():
            self.add(ds)
        for path in files or ():
            self.add_file(path)

    # --- the store ---------------------------------------------------------------------------------

    def add(self, ds: Dataset) -> None:
        """Hold ``ds`` (not a copy); a missing file meta / Transfer Syntax UID is filled in place."""
        self._put(StoredInstance(ensure_file_meta(ds), None))

    def add_file(self, path: Path) -> None:
        """Hold the file's bytes, to send them unchanged; only the attributes before Pixel Data are parsed."""
        self._put(StoredInstance.from_bytes(Path(path).read_bytes()))

    def _put(self, inst: StoredInstance) -> None:
        with self._lock:
            self._instances[str(inst.dataset.SOPInstanceUID)] = inst

    def get(self, sop_instance_uid: str) -> Dataset | None:
        """The whole instance (a fresh decode for file-loaded or received ones, else the object added)."""
        with self._lock:
            inst = self._instances.get(sop_instance_uid)
        return None if inst is None else inst.outgoing()

    def sop_instance_uids(self) -> list[str]:
        with self._lock:
            return list(self._instances)

    def _snapshot(self) -> list[StoredInstance]:
        with self._lock:
            return list(self._instances.values())

    def _count(self, name: str, n: int = 1) -> None:
        with self._lock:
            self.counters[name] += n

    # --- server lifecycle ------------------------------------------------------------------------------

    def start(self) -> None:
        """Start serving in background threads; with ``port=0`` the chosen port is in ``.port``."""
        if self._server is not None:
            raise RuntimeError("DemoPacs already started")
        configure_pynetdicom()
        ae = AE(ae_title=self.ae_title)
        ae.maximum_pdu_size = self.max_pdu
        ae.maximum_associations = self.max_associations  # pynetdicom's default is 10
        if self.network_timeout is not None:
            ae.network_timeout = self.network_timeout
        ae.add_supported_context(VERIFICATION, DEFAULT_TRANSFER_SYNTAXES)
        models = [_FIND, _GET, _MOVE]
        for model in models:
            for sop_class, root in model.items():
                if root == "PATIENT" or not self.patient_root_only:
                    ae.add_supported_context(sop_class, DEFAULT_TRANSFER_SYNTAXES)
        for cx in AllStoragePresentationContexts:
            # Both roles: the peer may send us C-STOREs (we are SCP), and a C-GET peer proposes SCP/SCU
            # role selection to be the storage SCP for our sub-operations (PS3.4 C.4.3, PS3.7 D.3.3.4).
            ae.add_supported_context(
                str(cx.abstract_syntax), ALL_TRANSFER_SYNTAXES, scu_role=True, scp_role=True
            )
        handlers: list[Any] = [
            (evt.EVT_CONN_OPEN, _set_nodelay),
            (evt.EVT_ACCEPTED, self._on_accepted),
            (evt.EVT_ABORTED, self._on_aborted),
            (evt.EVT_DIMSE_RECV, self._on_dimse_recv),
            (evt.EVT_C_ECHO, self._on_echo),
            (evt.EVT_C_FIND, self._on_find),
            (evt.EVT_C_GET, self._on_get),
            (evt.EVT_C_MOVE, self._on_move),
            (evt.EVT_C_STORE, self._on_store),
        ]
        server = ae.start_server((self.host, self.port), block=False, evt_handlers=handlers)
        assert server is not None
        self._ae, self._server = ae, server
        self.port = int(server.server_address[1])
        LOGGER.info("demo PACS %s listening on %s:%d", self.ae_title, self.host, self.port)

    def stop(self) -> None:
        if self._ae is not None:
            self._ae.shutdown()  # aborts active associations, then stops the server
        self._ae = self._server = None

    def __enter__(self) -> DemoPacs:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # --- handlers ------------------------------------------------------------------------------------

    def _on_accepted(self, event: evt.Event) -> None:
        self._count("associations")

    def _on_aborted(self, event: evt.Event) -> None:
        # Either side's A-ABORT (or the connection lost), ours included: network_timeout aborts.
        self._count("aborted")

    def _on_dimse_recv(self, event: evt.Event) -> None:
        # Counted on arrival, even when every response was already sent (nothing left to cancel).
        if isinstance(event.message, C_CANCEL_RQ):
            self._count("cancel")

    def _on_echo(self, event: evt.Event) -> int:
        self._count("echo")
        return 0x0000

    def _on_store(self, event: evt.Event) -> int:
        self._count("store")
        try:
            self._put(StoredInstance.from_bytes(event.encoded_dataset()))
        except ValueError:
            return IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS
        return 0x0000

    def _received(self, name: str, event: evt.Event) -> Dataset:
        identifier = event.identifier
        with self._lock:
            self.counters[name] += 1
            received = self.received_identifiers if name == "find" else self.received_retrieve_identifiers
            received.append(identifier)
        return identifier

    def _on_find(self, event: evt.Event) -> Iterator[tuple[int | Dataset, Dataset | None]]:
        identifier = self._received("find", event)
        if self.fail_status is not None:
            status: int | Dataset = self.fail_status
            if self.fail_comment is not None:
                status = Dataset()
                status.Status = self.fail_status
                status.ErrorComment = self.fail_comment
            yield status, None
            return
        level = check_level(identifier, _FIND[str(event.request.AffectedSOPClassUID)], hierarchical=True)
        if level is None:
            yield IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS, None
            return
        matching, returned, status = self._split_keys(identifier, level)
        matches = 0
        for candidate in self._candidates(level, identifier):
            if not dataset_matches(
                matching,
                candidate,
                pn_case_insensitive=not self.case_sensitive_pn,
                ignore=DEFAULT_IGNORED_KEYS,
            ):
                continue
            if self.max_matches is not None and matches >= self.max_matches:
                break   # a PACS's result cap: the rest is silently left out (success, no warning)
            if not self._pause(event):
                yield CANCEL, None
                return
            response = build_response(returned, candidate, pn_case_insensitive=not self.case_sensitive_pn)
            if RETRIEVE_AE_TITLE in response:
                response.RetrieveAETitle = self.ae_title
            matches += 1
            yield status, response
        self._pause(event)
        LOGGER.info("C-FIND %s from %s: %d matches", level, event.assoc.requestor.ae_title, matches)

    def _pause(self, event: evt.Event) -> bool:
        """Sleep ``find_delay``; False if the request was cancelled (before or during the sleep).

        pynetdicom's ``event.is_cancelled`` is consume-once: reading True clears the C-CANCEL.
        """
        deadline = time.monotonic() + self.find_delay
        while True:
            if event.is_cancelled:
                return False
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not event.assoc.is_established:
                return True
            time.sleep(min(0.01, remaining))

    def _split_keys(self, identifier: Dataset, level: str) -> tuple[Dataset, Dataset, int]:
        """(keys to match, keys to return, pending status) for a query at ``level``."""
        depth = LEVELS.index(level)
        matching, returned = Dataset(), Dataset()
        status = PENDING
        for elem in identifier:
            tag = int(elem.tag)
            if LEVELS.index(level_of(tag, level)) > depth:
                continue  # "shall not be returned" (C.4.1.2.2): a key below the query level
            if tag in ALL_COMPUTED and not self.return_counts:
                status = PENDING_OPTIONAL_KEYS_UNSUPPORTED
            else:
                returned.add(elem)
            if tag in ALL_COMPUTED and tag not in MATCHABLE_COMPUTED:
                continue  # counts are return keys only
            if tag == MODALITIES_IN_STUDY and not self.honour_modalities_in_study:
                continue
            matching.add(elem)
        return matching, returned, status

    def _candidates(self, level: str, identifier: Dataset) -> Iterator[Dataset]:
        """One dataset per entity at ``level``: the identifier's attributes of its first instance."""
        instances = self._snapshot()
        hierarchy = Hierarchy(instances)
        wanted = [int(tag) for tag in identifier.keys()] + [SPECIFIC_CHARACTER_SET]
        entity_key = UNIQUE_KEYS[LEVELS.index(level)]
        seen: set[str] = set()
        for inst in instances:
            ds = inst.dataset
            key = value_str(ds, entity_key)
            if key in seen:
                continue
            seen.add(key)
            candidate = Dataset()
            for tag in wanted:
                if tag in ds and tag not in ALL_COMPUTED:
                    candidate.add(ds[tag])
            for computed in hierarchy.computed(level, ds):
                candidate.add(computed)
            if level == "IMAGE":
                candidate.add(DataElement(AVAILABLE_TRANSFER_SYNTAX_UID, "UI", inst.transfer_syntax))
            yield candidate

    def _select(self, identifier: Dataset, level: str) -> list[StoredInstance]:
        """Instances named by the retrieve identifier's unique keys (PS3.4 C.4.2.2.1, C.4.3.2.1)."""
        keys = [identifier[t] for t in UNIQUE_KEYS[: LEVELS.index(level) + 1] if t in identifier]
        return [
            inst
            for inst in self._snapshot()
            if all(element_matches(k, inst.dataset.get(k.tag)) for k in keys)
        ]

    def _retrieve_request(
        self, name: str, event: evt.Event, models: dict[str, str]
    ) -> tuple[int, list[StoredInstance]]:
        identifier = self._received(name, event)
        if self.fail_status is not None:
            return self.fail_status, []
        level = check_level(identifier, models[str(event.request.AffectedSOPClassUID)], hierarchical=False)
        if level is None:
            return IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS, []
        instances = self._select(identifier, level)
        requestor = event.assoc.requestor.ae_title
        LOGGER.info("C-%s %s from %s: %d instances", name.upper(), level, requestor, len(instances))
        return 0x0000, instances

    def _send(
        self, event: evt.Event, instances: list[StoredInstance]
    ) -> Iterator[tuple[int, Dataset | None]]:
        for inst in instances:
            if event.is_cancelled:
                yield CANCEL, None
                return
            self._count("sent")
            yield PENDING, inst.outgoing()

    def _on_get(self, event: evt.Event) -> Iterator[int | tuple[int, Dataset | None]]:
        status, instances = self._retrieve_request("get", event, _GET)
        if status:
            yield 1
            yield status, None
            return
        yield len(instances)
        yield from self._send(event, instances)

    def _on_move(self, event: evt.Event) -> Iterator[Any]:
        destination = self.move_destinations.get(event.move_destination or "")
        status, instances = self._retrieve_request("move", event, _MOVE)
        if destination is None:
            yield None, None  # pynetdicom answers A801 "Move Destination unknown"
            return
        options = {
            "contexts": _storage_contexts(instances),
            "max_pdu": self.max_pdu,
            "evt_handlers": [(evt.EVT_CONN_OPEN, _tune_move_association)],
        }
        yield destination[0], destination[1], options
        if status:
            yield 1
            yield status, None
            return
        yield len(instances)
        yield from self._send(event, instances)




def _storage_contexts(instances: Iterable[StoredInstance]) -> list[PresentationContext]:
    """Contexts to propose to a C-MOVE destination: each SOP class in each stored transfer syntax."""
    wanted: dict[tuple[str, tuple[str, ...]], None] = {}
    for inst in instances:
        ts = inst.transfer_syntax
        syntaxes = (ts,) if ts not in _UNCOMPRESSED else (ts, ExplicitVRLittleEndian, ImplicitVRLittleEndian)
        wanted[(str(inst.dataset.SOPClassUID), tuple(dict.fromkeys(syntaxes)))] = None
    if not wanted:
        return [build_context(VERIFICATION)]
    if len(wanted) > MAX_REQUESTED_CONTEXTS:
        LOGGER.warning("C-MOVE needs %d presentation contexts, proposing the first 128", len(wanted))
    return [build_context(sop, list(ts)) for sop, ts in list(wanted)[:MAX_REQUESTED_CONTEXTS]]


def _tune_move_association(event: evt.Event) -> None:
    """The C-MOVE's own association to the destination sends C-STOREs back to back: TCP_NODELAY, and
    the reactor guard the gateway's requestor associations get (gateway/dimse/socket_tuning.py:
    without it pynetdicom's reactor now and then takes a C-STORE-RSP off the queue, and the
    sub-operation waits for the DIMSE timeout; seen against a fast destination)."""
    _set_nodelay(event)
    assoc = event.assoc
    guard_reactor(assoc)
    send = assoc.send_c_store

    @functools.wraps(send)
    def guarded(*args: Any, **kwargs: Any) -> Any:
        with busy(assoc):
            return send(*args, **kwargs)

    assoc.send_c_store = guarded  # type: ignore[method-assign]


def _set_nodelay(event: evt.Event) -> None:
    """DIMSE is request/response with small PDUs: Nagle's algorithm only adds latency."""
    try:
        sock = event.assoc.dul.socket.socket  # type: ignore[union-attr]
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except (AttributeError, OSError):
        pass
