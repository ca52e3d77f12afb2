"""An in-memory PACS behind the :class:`gateway.pacs.Pacs` interface, for unit tests of the services.

Each node holds Part-10 instances (bytes) by (study, series, sop). ``find`` answers STUDY/SERIES/IMAGE
C-FINDs from them (only the keys the services use); ``get`` delivers the requested instances through
``on_instance`` from a worker thread, as the real C-GET does. Calls are counted per operation.
"""

from __future__ import annotations

import asyncio
import threading
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from io import BytesIO
from pathlib import Path

from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian

from gateway.errors import NodeUnreachable
from gateway.pacs import (
    FindResult,
    OnInstance,
    QueryModel,
    RetrieveOutcome,
    RetrieveRequest,
    StoreItem,
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
        held = self._check(node)
        if self.gate is not None:
            await self.gate.wait()
        wanted = [(k, v) for k, v in sorted(held.items()) if k[0] == request.study
                  and (request.series is None or k[1] == request.series)
                  and (request.sops is None or k[2] in request.sops)]
        outcome = RetrieveOutcome()

        def deliver() -> None:
            for (_, _, sop), data in wanted:
                if cancel.is_set():
                    outcome.cancelled = True
                    return
                on_instance(data, sop, CT, ExplicitVRLittleEndian)
                outcome.completed += 1

        await asyncio.to_thread(deliver)
        return outcome

    async def move(self, node: PacsNode, request: RetrieveRequest, *, destination: str, msg_id: int,
                   cancel: threading.Event) -> RetrieveOutcome:
        raise NotImplementedError

    async def store(self, node: PacsNode, items: Sequence[StoreItem], workdir: Path) -> list[StoreResult]:
        self.calls["store"] += 1
        self._check(node)
        results = []
        for item in items:
            data = item.path.read_bytes()
            ds = dcmread(BytesIO(data))
            self.nodes.setdefault(node.name, {})[(str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID),
                                                  item.sop_instance_uid)] = data
            results.append(StoreResult(0, confirmed=True, sent_syntax=item.transfer_syntax))
        return results

    def query_associations_opened(self, node: PacsNode) -> int:
        return 0

    async def close(self) -> None:
        pass
