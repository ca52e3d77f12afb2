"""The PatientID of a study on a Patient Root node: the one rule, for searches and retrievals.

Patient Root C-FIND/C-GET/C-MOVE (PS3.4 C.6.1) need the PatientID at STUDY level and below, which a
DICOMweb URL does not carry. The rule, cheapest first:

1. the cached answer (``cache.keys.patient_id``, learned from earlier searches and lookups);
2. a STUDY-level C-FIND with the study UID and a universal PatientID, which most Patient Root SCPs
   answer (relational-ish; PS3.4 C.4.1.2.2.1 allows it);
3. only when that finds nothing, or is refused with a failure status (a strictly hierarchical SCP
   wants the PatientID, the unique key of the level above, PS3.4 C.4.1.3.1, and answers A900):
   PATIENT-level C-FIND for every patient, then a STUDY-level C-FIND per patient until one holds the
   study, each extra C-FIND drawing on the caller's budget.

The answer is cached for ``cache.ttl.location``; concurrent callers asking for the same study share
one lookup (a retrieval's manifest C-FIND and its C-GET/C-MOVE both need it at once).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from pydicom.dataset import Dataset

from cache import keys
from cache.base import Cache
from gateway.errors import DimseFailure, ModelRefused
from gateway.inflight import InFlight
from gateway.pacs import FindResult, QueryModel
from gateway.settings import PacsNode
from translators.uids import StudyId

Find = Callable[[PacsNode, Dataset, QueryModel], Awaitable[FindResult]]
"""A C-FIND (the search service passes its cached finder, retrieval the PACS interface)."""


class PatientIds:
    def __init__(self, find: Find, cache: Cache, ttl: float) -> None:
        self._find = find
        self._cache = cache
        self._ttl = ttl
        self._looking: InFlight[StudyId, str | None] = InFlight()

    async def remember(self, study: StudyId, patient_id: str) -> None:
        if patient_id:
            await self._cache.set(keys.patient_id(study), patient_id.encode(), self._ttl)

    async def for_study(
        self, node: PacsNode, study_uid: str, take_budget: Callable[[], bool] = lambda: True
    ) -> str | None:
        """The study's PatientID on ``node`` (None: the node does not hold the study, or the budget
        ran out); only for Patient Root nodes, callers check ``node.query_model``."""
        study = StudyId(node.name, study_uid)
        cached = await self._cache.get(keys.patient_id(study))
        if cached is not None:
            return cached.decode()
        return await self._looking.run(study, lambda: self._look_up(node, study, take_budget))

    async def _look_up(self, node: PacsNode, study: StudyId, take_budget: Callable[[], bool]) -> str | None:
        study_uid = study.study
        probe = Dataset()
        probe.QueryRetrieveLevel = "STUDY"
        probe.StudyInstanceUID = study_uid
        probe.PatientID = ""
        try:
            found = await self._find(node, probe, "patient")
        except ModelRefused:
            raise   # no Patient Root at all: enumerating would be refused the same way
        except DimseFailure:
            found = FindResult(node=node.name)   # a hierarchical SCP wants the PatientID: enumerate
        pid = next((str(d.get("PatientID", "") or "") for d in found.datasets if d.get("PatientID")), "")
        if not pid:
            pid = await self._by_enumeration(node, study_uid, take_budget) or ""
        if not pid:
            return None
        await self.remember(study, pid)
        return pid

    async def _by_enumeration(
        self, node: PacsNode, study_uid: str, take_budget: Callable[[], bool]
    ) -> str | None:
        patients = Dataset()
        patients.QueryRetrieveLevel = "PATIENT"
        patients.PatientID = ""
        listed = await self._find(node, patients, "patient")
        for patient in listed.datasets:
            pid = str(patient.get("PatientID", "") or "")
            if not pid or not take_budget():
                continue
            probe = Dataset()
            probe.QueryRetrieveLevel = "STUDY"
            probe.PatientID = pid
            probe.StudyInstanceUID = study_uid
            if (await self._find(node, probe, "patient")).datasets:
                return pid
        return None
