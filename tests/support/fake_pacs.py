"""An in-memory PACS behind the :class:`gateway.pacs.Pacs` interface, for unit tests of the services.

Each node holds Part-10 instances (bytes) by (study, series, sop). ``find`` answers STUDY/SERIES/IMAGE
C-FINDs from them (only the keys the services use); ``get`` delivers the requested instances through
``on_instance`` from a worker thread, as the real C-GET does. Calls are counted per operation.
"""

from __future__ import annotations

import asyncio
import threading
from collections import Counter
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from io import BytesIO
from pathlib import Path

from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian

from gateway.errors import NodeUnreachable
from gateway.pacs import (
    AssociationFacts,
    FindResult,
    NotRequested,
    OnInstance,
    ProbeContext,
    QueryModel,
    RetrieveOutcome,
    RetrieveRequest,
    StoreItem,
    StoreItems,
    StoreResult,
)
from gateway.settings import PacsNode

CT = "1.2.840.10008.5.1.4.1.1.2"


def part10(study: str, series: str, sop: str, *, marker: str = "", number: int = 1, size: int = 64) -> bytes:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = CT
    ds.file_meta.MediaStorageSOPInstanceUID = sop
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = CT
    ds.SOPInstanceUID = sop
    ds.StudyInstanceUID = study
    ds.SeriesInstanceUID = series
    ds.InstanceNumber = number
    ds.SeriesDescription = marker
    ds.Modality = "CT"
    ds.ImageComments = "x" * size
    buf = BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


async def _each(items: StoreItems) -> AsyncIterator[StoreItem]:
    if isinstance(items, Sequence):
        for item in items:
            yield item
    else:
        async for item in items:
            yield item


def _patient(node: str) -> Dataset:
    ds = Dataset()
    ds.PatientID = f"PID-{node}"
    return ds


@dataclass
class FakePacs:
    nodes: dict[str, dict[tuple[str, str, str], bytes]] = field(default_factory=dict)
    down: set[str] = field(default_factory=set)
    calls: Counter[str] = field(default_factory=Counter)
    gate: asyncio.Event | None = None          # when set, get waits for it (to observe in-flight state)
    find_delay: float = 0.0                    # seconds every C-FIND takes (requests pile up behind it)
    finds: Counter[str] = field(default_factory=Counter)   # C-FINDs by query level
    retrieves: list[RetrieveRequest] = field(default_factory=list)   # every get, in order
    by_level_key_only: bool = False            # get ignores the keys above the level (as Orthanc does)
    refused: list[str] = field(default_factory=list)   # SOP UIDs whose delivery on_instance refused
    manifest_gate: asyncio.Event | None = None  # when set, IMAGE-level C-FINDs wait for it
    unlisted: set[str] = field(default_factory=set)   # SOP UIDs C-FINDs do not report (stored later)

    def add(self, node: str, study: str, series: str, sop: str, **kw: object) -> bytes:
        data = part10(study, series, sop, **kw)  # type: ignore[arg-type]
        self.nodes.setdefault(node, {})[(study, series, sop)] = data
        return data

    def _check(self, node: PacsNode) -> dict[tuple[str, str, str], bytes]:
        if node.name in self.down:
            raise NodeUnreachable(f"node {node.name} is unreachable", node=node.name)
        return self.nodes.get(node.name, {})

    async def echo(self, node: PacsNode) -> float:
        self._check(node)
        return 0.001

    async def find(self, node: PacsNode, identifier: Dataset, *, model: QueryModel | None = None,
                   max_results: int | None = None) -> FindResult:
        self.calls["find"] += 1
        held = self._check(node)
        level = identifier.QueryRetrieveLevel
        self.finds[str(level)] += 1
        if self.find_delay:
            await asyncio.sleep(self.find_delay)
        if level == "IMAGE" and self.manifest_gate is not None:
            await self.manifest_gate.wait()
        if level == "PATIENT":
            return FindResult(node.name, [_patient(node.name)] if held else [])
        study = str(identifier.get("StudyInstanceUID", "") or "")
        series = str(identifier.get("SeriesInstanceUID", "") or "")
        out: dict[str, Dataset] = {}
        for (st, se, sop), _ in sorted(held.items()):
            if study and st != study:
                continue
            if level in ("SERIES", "IMAGE") and series and se != series:
                continue
            if level == "IMAGE" and sop in self.unlisted:
                continue
            ds = Dataset()
            ds.StudyInstanceUID = st
            ds.PatientID = f"PID-{node.name}"
            if level in ("SERIES", "IMAGE"):
                ds.SeriesInstanceUID = se
                ds.SeriesNumber = 1
            if level == "IMAGE":
                ds.SOPInstanceUID = sop
                ds.SOPClassUID = CT
                ds.InstanceNumber = int(sop.rsplit(".", 1)[-1])
            out[{"STUDY": st, "SERIES": se, "IMAGE": sop}[level]] = ds
        return FindResult(node.name, list(out.values()))

    async def get(self, node: PacsNode, request: RetrieveRequest, on_instance: OnInstance,
                  cancel: threading.Event) -> RetrieveOutcome:
        self.calls["get"] += 1
        self.retrieves.append(request)
        held = self._check(node)
        if self.gate is not None:
            await self.gate.wait()
        wanted = [(k, v) for k, v in sorted(held.items()) if k[0] == request.study
                  and (request.series is None or k[1] == request.series)
                  and (request.sops is None or k[2] in request.sops)]
        if self.by_level_key_only:
            wanted = [(k, v) for k, v in sorted(held.items())
                      if (k[2] in request.sops if request.sops is not None
                          else k[1] == request.series if request.series is not None
                          else k[0] == request.study)]
        outcome = RetrieveOutcome()

        def deliver() -> None:
            for (_, _, sop), data in wanted:
                if cancel.is_set():
                    outcome.cancelled = True
                    return
                try:
                    on_instance(data, sop, CT, ExplicitVRLittleEndian)
                except NotRequested:     # the DIMSE edge answers it with a refusal (PS3.4 C.4.3)
                    self.refused.append(sop)
                    outcome.failed += 1
                    continue
                outcome.completed += 1

        await asyncio.to_thread(deliver)
        return outcome

    async def move(self, node: PacsNode, request: RetrieveRequest, *, destination: str, msg_id: int,
                   cancel: threading.Event) -> RetrieveOutcome:
        raise NotImplementedError

    async def store(self, node: PacsNode, items: StoreItems, workdir: Path) -> list[StoreResult]:
        self.calls["store"] += 1
        self._check(node)
        results = []
        # Items that come one by one (STOW-RS) are stored as they come, like the real edge does.
        async for item in _each(items):
            data = item.path.read_bytes()
            ds = dcmread(BytesIO(data))
            self.nodes.setdefault(node.name, {})[(str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID),
                                                  item.sop_instance_uid)] = data
            results.append(StoreResult(0, confirmed=True, sent_syntax=item.transfer_syntax))
        return results

    def query_associations_opened(self, node: PacsNode) -> int:
        return 0

    async def associate_probe(self, node: PacsNode, contexts: Sequence[ProbeContext], *,
                              scp_roles: Sequence[str] = (),
                              timed_find: tuple[str, Dataset] | None = None,
                              hold_idle: float = 0.0) -> AssociationFacts:
        """A PACS that accepts every proposed context (the first syntax of each), in every role."""
        self.calls["associate_probe"] += 1
        self._check(node)
        return AssociationFacts(accepted=tuple((cls, syntaxes[0], cls in scp_roles) for cls, syntaxes in contexts),
                                rejected=(), max_pdu=16384, implementation_class_uid="1.2.3.4.5",
                                implementation_version_name="FAKEPACS_1", associate_seconds=0.001,
                                untuned_find_seconds=(0.001,) * 3 if timed_find else (),
                                idle_kept_seconds=hold_idle or None)

    async def close(self) -> None:
        pass
