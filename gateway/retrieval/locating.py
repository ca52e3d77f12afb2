"""Where a study is, and what a series holds: the node, and the manifest to check completeness by.

* **Locate**: ``/nodes/{name}/...`` names its node; federated ``/dicom-web/...`` takes the first node
  in config order that holds the study, by the location index (learned from QIDO and STOW), else by
  a STUDY-level C-FIND on each node in turn, in the node's model: Patient Root needs the PatientID
  at STUDY level (PS3.4 C.6.1), so there the study's PatientID is looked up
  (:class:`gateway.patients.PatientIds`, the one rule), and a node holds the study when it has one.
  A node that refuses the model while its ``query_model`` is not configured is asked once more in
  the model its profile learned (gateway/profile/second_round.py) and is returned as settled.
* **Manifest**: an IMAGE-level C-FIND on the node, with the study AND the series UID, lists the
  series' instances (404 when empty, never a silent empty 200). A wrong study UID with a right
  series UID therefore finds nothing. It asks the level's required and unique keys
  (InstanceNumber, SOPInstanceUID; PS3.4 C.6.1.1.5), not SOPClassUID: an optional key, which some
  PACS answer by reading each instance's file (Orthanc: a 400-instance manifest took 0.13 s and 0.08 s
  of its CPU with it, 0.06 s and 0.02 s without). A retrieval needs a class only for an instance its
  first C-GET could not bring: :meth:`Locator.sop_classes` asks for those. Manifests are memoised per
  (node, study, series) for ``MANIFEST_TTL`` seconds and only under the study generation they were
  listed at (cache.keys, freshness): a STOW into the study on any replica makes every replica list
  it again. Instances a retrieval delivered that the C-FIND did not list are added to the memo
  (:meth:`Locator.add_arrivals`). A retrieval no longer waits for the manifest
  (gateway.retrieval.fetching: early start); the last manifest listed, fresh or not, tells it
  whether some of the series may already be spooled.
* **Once per question**: concurrent requests for the same locate, manifest or series list share one
  C-FIND (:class:`~gateway.inflight.InFlight`): a burst of frame requests on a cold
  series asks the PACS once, not once per request.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence

from pydicom.dataset import Dataset

from cache import keys
from cache.base import Cache
from gateway.errors import GatewayError, NotFound
from gateway.inflight import InFlight
from gateway.pacs import Pacs
from gateway.patients import PatientIds
from gateway.profile import second_round
from gateway.retrieval.fetch import InstanceRef, Manifest
from gateway.settings import PacsNode, Settings
from translators import qido as q
from translators import qido_results as qr
from translators.uids import SeriesId, StudyId

MANIFEST_TTL = 60.0
UID_LIST_CHUNK = 500    # UIDs per C-FIND or retrieve naming instances (a PACS may cap a key's length)
MAX_MEMO = 4096


class Locator:
    def __init__(self, settings: Settings, pacs: Pacs, cache: Cache, patients: PatientIds) -> None:
        self.settings = settings
        self.pacs = pacs
        self.cache = cache
        self.patients = patients
        self._manifests: dict[SeriesId, Manifest] = {}
        self._locating: InFlight[tuple[str, tuple[str, ...]], PacsNode] = InFlight()
        self._listing: InFlight[tuple[SeriesId, int], Manifest] = InFlight()
        self._series: InFlight[tuple[str, str], list[str]] = InFlight()
        # Set by the retrieval service: the node once its running probe has ended ("PACS profiles").
        self.settled_node: second_round.Settled | None = None

    async def locate(self, study: str, nodes: Sequence[PacsNode]) -> PacsNode:
        """The first node (config order) holding the study; the only node when one is named."""
        if len(nodes) == 1:
            return nodes[0]
        key = (study, tuple(n.name for n in nodes))
        return await self._locating.run(key, lambda: self._locate(study, nodes))

    async def _locate(self, study: str, nodes: Sequence[PacsNode]) -> PacsNode:
        known = await self.cache.smembers(keys.study_locations(study))
        for node in nodes:
            if node.name in known:
                return node
        for node in nodes:
            try:
                held = await self._holds(node, study)
            except GatewayError as exc:
                again = (await second_round.relearned(node, self.settled_node, second_round.QUERY)
                         if second_round.query_explained(exc) else None)
                if again is None:
                    continue
                node = again
                try:
                    held = await self._holds(node, study)
                except GatewayError:
                    continue
            if held:
                await self.cache.sadd(
                    keys.study_locations(study), [node.name], self.settings.cache.ttl.location
                )
                return node
        raise NotFound(f"study {study} was not found on any node")

    async def _holds(self, node: PacsNode, study: str) -> bool:
        """Whether the node has the study: one STUDY-level C-FIND in its model (Patient Root: the
        PatientID lookup, which is that C-FIND with a universal PatientID, and is remembered)."""
        if node.query_model == "patient":
            return await self.patients.for_study(node, study) is not None
        ident = Dataset()
        ident.QueryRetrieveLevel = "STUDY"
        ident.StudyInstanceUID = study
        res = await self.pacs.find(node, ident, model=node.query_model)
        return bool(res.datasets)

    async def generation(self, study: StudyId) -> int:
        return await self.cache.get_int(keys.study_generation(study))

    async def memo(self, sid: SeriesId) -> Manifest | None:
        """The memoised manifest while it is fresh (listed under the current study generation, less
        than ``MANIFEST_TTL`` ago); None when it would have to be listed again."""
        return self._fresh(sid, await self.generation(sid.study_id))

    def _fresh(self, sid: SeriesId, generation: int) -> Manifest | None:
        memo = self._manifests.get(sid)
        if (
            memo is not None
            and memo.generation == generation
            and time.monotonic() - memo.fetched < MANIFEST_TTL
        ):
            return memo
        return None

    def hint(self, sid: SeriesId) -> Manifest | None:
        """The last manifest listed for the series, fresh or not (what may be in the spool)."""
        return self._manifests.get(sid)

    async def manifest(self, node: PacsNode, study: str, series: str) -> Manifest:
        sid = SeriesId(node.name, study, series)
        generation = await self.generation(sid.study_id)
        memo = self._fresh(sid, generation)
        if memo is not None:
            return memo
        return await self._listing.run((sid, generation), lambda: self._list(node, sid, generation))

    async def _list(self, node: PacsNode, sid: SeriesId, generation: int) -> Manifest:
        study, series = sid.study, sid.series
        ident = await self._image_query(node, sid, "")
        ident.InstanceNumber = None   # no SOPClassUID: see the module docstring
        res = await self.pacs.find(node, ident, model=node.query_model, max_results=1_000_000)
        found = [(sop, d) for d in _of_series(res.datasets, sid) if (sop := qr.text_value(d, q.SOP_UID))]
        if not found:
            self._manifests.pop(sid, None)
            raise NotFound(
                f"series {series} of study {study} was not found on node {node.name}", node=node.name
            )
        refs = sorted(
            (
                InstanceRef(sop, qr.text_value(d, q.SOP_CLASS_UID), _num(qr.text_value(d, q.INSTANCE_NUMBER)))
                for sop, d in found
            ),
            key=lambda r: (r.number, r.sop_instance_uid),
        )
        manifest = Manifest(sid, refs, generation=generation)
        if len(self._manifests) >= MAX_MEMO:
            self._manifests.pop(next(iter(self._manifests)))
        self._manifests[sid] = manifest
        return manifest

    async def sop_classes(self, node: PacsNode, sid: SeriesId, sops: Sequence[str]) -> dict[str, str]:
        """The SOP classes of ``sops`` (instances of the series), by one IMAGE-level C-FIND per
        ``UID_LIST_CHUNK`` naming them (UID list matching, PS3.4 C.2.2.2.2); an instance whose answer
        has no SOPClassUID (dcmqrscp never returns it) is left out."""
        found: dict[str, str] = {}
        for start in range(0, len(sops), UID_LIST_CHUNK):
            ident = await self._image_query(node, sid, list(sops[start : start + UID_LIST_CHUNK]))
            ident.SOPClassUID = ""
            res = await self.pacs.find(node, ident, model=node.query_model, max_results=1_000_000)
            for d in _of_series(res.datasets, sid):
                sop, cls = qr.text_value(d, q.SOP_UID), qr.text_value(d, q.SOP_CLASS_UID)
                if sop and cls:
                    found[sop] = cls
        return found

    def add_arrivals(self, listed: Manifest, extras: list[InstanceRef]) -> None:
        """Instances a retrieval delivered that ``listed`` did not name (stored on the PACS after the
        C-FIND; their headers proved them the series'): the memo names them too, after the others,
        so later requests serve the series as it was delivered."""
        if self._manifests.get(listed.id) is listed and extras:
            self._manifests[listed.id] = Manifest(
                listed.id, [*listed.instances, *extras], generation=listed.generation, fetched=listed.fetched
            )

    def forget(self, series: SeriesId) -> None:
        """Drop a memo a failed retrieval suggests is stale (instances removed on the PACS)."""
        self._manifests.pop(series, None)

    async def series_uids(self, node: PacsNode, study: str) -> list[str]:
        """The study's series on the node, by SeriesNumber (404 when it has none)."""
        return await self._series.run((node.name, study), lambda: self._series_uids(node, study))

    async def _series_uids(self, node: PacsNode, study: str) -> list[str]:
        ident = Dataset()
        ident.QueryRetrieveLevel = "SERIES"
        ident.StudyInstanceUID = study
        ident.SeriesInstanceUID = ""
        ident.SeriesNumber = None
        ident.Modality = ""
        await self._patient_key(node, study, ident)
        res = await self.pacs.find(node, ident, model=node.query_model)
        series = [
            d
            for d in res.datasets
            if d.get("SeriesInstanceUID") and str(d.get("StudyInstanceUID", study) or study) == study
        ]
        if not series:
            raise NotFound(f"study {study} was not found on node {node.name}", node=node.name)
        series.sort(key=lambda d: (_num(d.get("SeriesNumber")), str(d.SeriesInstanceUID)))
        return list(dict.fromkeys(str(s.SeriesInstanceUID) for s in series))

    async def _image_query(self, node: PacsNode, sid: SeriesId, sops: str | list[str]) -> Dataset:
        """An IMAGE-level identifier for the series' instances ``sops`` ("": all), with the
        PatientID a Patient Root node needs; the caller adds the return keys."""
        ident = Dataset()
        ident.QueryRetrieveLevel = "IMAGE"
        ident.StudyInstanceUID = sid.study
        ident.SeriesInstanceUID = sid.series
        ident.SOPInstanceUID = sops
        await self._patient_key(node, sid.study, ident)
        return ident

    async def _patient_key(self, node: PacsNode, study: str, ident: Dataset) -> None:
        """Patient Root: the study's PatientID, a unique key of a level above (PS3.4 C.4.1.3.1); a
        node that has no patient holding the study does not hold it (404, not the PACS's A900)."""
        if node.query_model != "patient":
            return
        pid = await self.patients.for_study(node, study)
        if not pid:
            raise NotFound(f"study {study} was not found on node {node.name}", node=node.name)
        ident.PatientID = pid


def _of_series(answers: Sequence[Dataset], sid: SeriesId) -> Iterator[Dataset]:
    """The IMAGE-level answers of the series' study and series: a PACS that ignores a key must not
    widen the answer. qr.text_value reads these raw: 400 matches cost ~2 ms, not ~40 ms of values."""
    for d in answers:
        if (qr.text_value(d, q.SERIES_UID) or sid.series) == sid.series and \
                (qr.text_value(d, q.STUDY_UID) or sid.study) == sid.study:
            yield d


def _num(value: object) -> float:
    try:
        return float(str(value))
    except (TypeError, ValueError):
        return float("inf")
