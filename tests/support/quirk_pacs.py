"""In-process PACS with one quirk each, for the PACS profile tests (docs/architecture.md, "PACS profiles").

Each is :class:`gateway.dimse.demo_pacs.DemoPacs` (a pynetdicom Q/R SCP over in-memory instances),
started as usual and then changed the way a real PACS would differ:

==================  ==============================================================================
quirk               behaviour
==================  ==============================================================================
case_sensitive      PN matched case-sensitively (DCMTK's dcmqrscp does this)
no_counts           NumberOf...Related... and ModalitiesInStudy never returned, ModalitiesInStudy
                    ignored as a match key
hierarchical        no relational C-FIND: the unique keys of every level above are required
                    (DemoPacs's own rule, PS3.4 C.4.1.3.1)
patient_root_only   only the Patient Root models are accepted
no_c_get            the C-GET models are not accepted (C-MOVE only)
no_move_originator  C-MOVE sub-operations carry no Move Originator AE title / Message ID
no_compressed_get   for C-GET, only uncompressed storage contexts are accepted (our SCP role)
nagle               Nagle's algorithm left on (no TCP_NODELAY): responses wait for delayed ACKs
drops_idle          an association idle for DROP_IDLE_AFTER (1 s) is aborted (pynetdicom's
                    ``network_timeout``; DCMTK's and many PACS's idle timeouts do the same, longer)
result_cap          a C-FIND ends (success, no warning) after RESULT_CAP (4) matches; the data hold 9
                    studies on 9 dates, so the probe's date partitions see more than 4
==================  ==============================================================================

``QUIRKS`` are the quirks the gateway serves in full: the QIDO and WADO peer suites run against each.
``LIMITED_QUIRKS`` (``result_cap``) cannot be served in full, only reported: no gateway can return
matches the PACS leaves out, so a capped PACS fails those suites' "every study" expectations by
design; it is profiled and its answers warned about (tests/integration/test_profiling.py).

``version_name`` sets the Implementation Version Name of its A-ASSOCIATE-AC (PS3.7 D.3.3.2.3), so
a test can "upgrade" the PACS. The data: the demo studies plus one patient ``TANAKA^TARO``, whose
name the probes may see but must never print, log or store.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Iterator
from typing import Any

from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import build_context, evt
from pynetdicom.presentation import PresentationContext

from gateway.demo_data import generate_demo_datasets
from gateway.dimse.demo_pacs import _GET, DemoPacs, _set_nodelay

QUIRKS = ("case_sensitive", "no_counts", "hierarchical", "patient_root_only", "no_c_get",
          "no_move_originator", "no_compressed_get", "nagle", "drops_idle")
LIMITED_QUIRKS = ("result_cap",)
ALL_QUIRKS = QUIRKS + LIMITED_QUIRKS
RESULT_CAP = 4
DROP_IDLE_AFTER = 1.0

TANAKA = "TANAKA^TARO"
TANAKA_ID = "QPK0001"
CT = "1.2.840.10008.5.1.4.1.1.2"
NATIVE = (ExplicitVRLittleEndian, ImplicitVRLittleEndian)


def tanaka_instance() -> Dataset:
    """One CT instance of patient TANAKA^TARO (upper-case, as many PACS store names)."""
    ds = Dataset()
    ds.SOPClassUID = CT
    ds.SOPInstanceUID = "1.2.826.0.1.3680043.8.498.77001.1.1.1"
    ds.StudyInstanceUID = "1.2.826.0.1.3680043.8.498.77001"
    ds.SeriesInstanceUID = "1.2.826.0.1.3680043.8.498.77001.1"
    ds.PatientName = TANAKA
    ds.PatientID = TANAKA_ID
    ds.PatientBirthDate = "19650101"
    ds.StudyDate = "20220202"
    ds.StudyTime = "101010"
    ds.AccessionNumber = "QPK-1"
    ds.Modality = "CT"
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1
    ds.Rows = ds.Columns = 2
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.PixelData = b"\x00\x01" * 4
    return ds


def quirk_data() -> list[Dataset]:
    return [*generate_demo_datasets(), tanaka_instance()]


class QuirkPacs(DemoPacs):
    def __init__(self, quirk: str | None, datasets: Iterable[Dataset] | None = None, *,
                 version_name: str = "QUIRKPACS_1", **kwargs: Any) -> None:
        if quirk is not None and quirk not in ALL_QUIRKS:
            raise ValueError(f"unknown quirk {quirk!r}")
        options: dict[str, Any] = {
            "case_sensitive": {"case_sensitive_pn": True},
            "no_counts": {"return_counts": False, "honour_modalities_in_study": False},
            "patient_root_only": {"patient_root_only": True},
            "result_cap": {"max_matches": RESULT_CAP},
            "drops_idle": {"network_timeout": DROP_IDLE_AFTER},
        }.get(quirk or "", {})
        super().__init__(quirk_data() if datasets is None else datasets, **options, **kwargs)
        self.quirk = quirk
        self.version_name = version_name

    def start(self) -> None:
        super().start()
        ae, server = self._ae, self._server
        assert ae is not None and server is not None
        ae.implementation_version_name = self.version_name
        if self.quirk == "no_c_get":
            server.contexts = [cx for cx in server.contexts if str(cx.abstract_syntax) not in _GET]
        elif self.quirk == "no_compressed_get":
            server.contexts = [_native_only(cx) for cx in server.contexts]
        elif self.quirk == "nagle":
            server.unbind(evt.EVT_CONN_OPEN, _set_nodelay)

    def _on_move(self, event: evt.Event) -> Iterator[Any]:
        moves = super()._on_move(event)
        if self.quirk != "no_move_originator":
            yield from moves
            return
        first = next(moves)
        if isinstance(first, tuple) and len(first) == 3:
            host, port, options = first
            handlers = [*options.get("evt_handlers", []), (evt.EVT_CONN_OPEN, _without_originator)]
            first = (host, port, {**options, "evt_handlers": handlers})
        yield first
        yield from moves


def _native_only(cx: PresentationContext) -> PresentationContext:
    """A storage context cut down to the uncompressed syntaxes (other SOP classes unchanged)."""
    syntaxes = [str(s) for s in cx.transfer_syntax]
    if not syntaxes or all(s in NATIVE for s in syntaxes) or str(cx.abstract_syntax).startswith(
            "1.2.840.10008.5.1.4.1.2."):
        return cx
    narrowed = build_context(cx.abstract_syntax, [s for s in syntaxes if s in NATIVE])
    narrowed.scu_role, narrowed.scp_role = cx.scu_role, cx.scp_role
    return narrowed


def _without_originator(event: evt.Event) -> None:
    """On the C-MOVE's own association to the destination: C-STOREs without the originator fields."""
    assoc = event.assoc
    send = assoc.send_c_store

    @functools.wraps(send)
    def plain(dataset: Any, msg_id: int = 1, priority: int = 2, originator_aet: Any = None,
              originator_id: Any = None) -> Any:
        return send(dataset, msg_id=msg_id, priority=priority)

    assoc.send_c_store = plain
