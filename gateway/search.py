"""QIDO-RS orchestration: C-FINDs on the targeted nodes, emulated features, federation.

The route parses the request (translators.qido), this module decides which C-FINDs to run on
which node and assembles the answer; translators do the pure work, the DIMSE client the I/O.

Emulated features (docs/architecture.md, "Search") each cost extra C-FINDs and draw on one
per-request budget (``limits.max_emulation_queries``); when it runs out the answer is still
returned, without the emulated values, and with a ``Warning: 299`` (as is an answer that a cap may
have cut, :func:`cut_short`: the gateway's ``max_results`` or the PACS's own result cap):

* counts (0020,1206/1208/1209) and ModalitiesInStudy computed by lower-level C-FINDs when the PACS
  does not return them (only for the page actually returned, except when ModalitiesInStudy is a
  match key on a node that ignores it, where every candidate needs it);
* relational resources (``/series``, ``/instances``, ``/studies/{s}/instances``) by fan-out through
  the hierarchy, unless the node accepts relational C-FIND;
* Patient Root nodes: STUDY-level searches go through a PATIENT-level C-FIND first;
* PN matching is case-insensitive everywhere: on nodes flagged ``case_sensitive_pn`` the PN key
  is sent universal and matched locally (so a name-only search reads up to the node's result cap).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset

from cache import keys
from cache.base import Cache
from cache.spool import Spool
from gateway.errors import BadRequest, GatewayError, NotFound, PacsError
from gateway.pacs import FindResult, Pacs
from gateway.patients import PatientIds
from gateway.profile import second_round
from gateway.profile.decide import safe_node
from gateway.query_cache import (
    BASE_PLACEHOLDER,
    BYPASS,
    Answer,
    AnswerTemplate,
    CachedFinder,
    Lookups,
    ResponseCache,
)
from gateway.settings import PacsNode, Settings
from translators import qido as q
from translators import qido_results as qr
from translators.matching import dataset_matches
from translators.uids import StudyId

log = logging.getLogger(__name__)

SOP_CLASS = 0x00080016


@dataclass
class SearchOutcome:
    datasets: list[Dataset]
    warnings: list[str] = field(default_factory=list)
    failed_nodes: list[GatewayError] = field(default_factory=list)
    cacheable: bool = True      # every node answered and no emulation C-FIND failed


class _Budget:
    def __init__(self, limit: int) -> None:
        self.left = limit
        self.exhausted = False
        self.emulation_failed = False   # an emulated value is missing because its C-FIND failed

    def take(self, n: int = 1) -> bool:
        if self.left < n:
            self.exhausted = True
            return False
        self.left -= n
        return True


class SearchService:
    def __init__(self, settings: Settings, pacs: Pacs, cache: Cache) -> None:
        self.settings = settings
        self.pacs = pacs
        self.cache = cache
        self.spool: Spool | None = None    # set by the app: SOPClassUIDs from spooled headers
        # Set by the app: the node as its PACS profile has it once the running probe has ended
        # (gateway.profile.service.NodeProfiles.settled; docs/architecture.md, "PACS profiles").
        self.settled_node: second_round.Settled | None = None
        lookups = Lookups()
        self.finder = CachedFinder(settings, pacs, cache, lookups)
        self.responses = ResponseCache(settings, cache, lookups)
        self.patients = PatientIds(lambda node, ident, model: self.finder.find(node, ident, model=model),
                                   cache, settings.cache.ttl.location)

    # ------------------------------------------------------------------ entry point

    async def respond(self, query: q.QidoQuery, nodes: Sequence[PacsNode], base_url: str, *,
                      use_cache: bool = True) -> Answer:
        """The QIDO-RS answer as DICOM JSON bytes with RetrieveURLs under ``base_url``.

        A cached answer of the same normalised request over the same nodes costs one cache round
        trip and no decoding (gateway/query_cache.py); otherwise it is computed against a
        placeholder base and cached when every node answered. ``use_cache=False``
        (Cache-Control: no-cache) skips the cached answer and the cached C-FIND results, but still
        joins a C-FIND in flight (gateway/coalescing.py) and caches what it computed."""
        versioned = await self.cache.get_versioned(self.responses.key(query, nodes))
        cached = self.responses.hit(versioned.value) if use_cache else None
        if cached is not None:
            return cached.answer(base_url, query.warnings)
        located = await self._located(query, nodes)
        # Against the placeholder base, without the request's parse warnings: both are per request.
        outcome = await self.search(replace(query, warnings=()), located, BASE_PLACEHOLDER,
                                    use_cache=use_cache)
        template = AnswerTemplate.render(outcome.datasets, outcome.warnings)
        if outcome.cacheable:
            await self.responses.store(versioned.key, template)
        return template.answer(base_url, query.warnings)

    async def _located(self, query: q.QidoQuery, nodes: Sequence[PacsNode]) -> Sequence[PacsNode]:
        """A federated search within one study asks only the nodes the location index names, when
        it names any (the answer is cached under every node it could have asked)."""
        if len(nodes) > 1 and query.study_uid:
            known = set(await self.study_nodes(query.study_uid))
            if known:
                return [n for n in nodes if n.name in known] or nodes
        return nodes

    async def search(self, query: q.QidoQuery, nodes: Sequence[PacsNode], base_url: str, *,
                     use_cache: bool = True) -> SearchOutcome:
        """Run the QIDO query on ``nodes``; ``use_cache=False`` (Cache-Control: no-cache) asks the PACS."""
        token = BYPASS.set(not use_cache)
        try:
            return await self._search(query, nodes, base_url)
        finally:
            BYPASS.reset(token)

    async def _search(self, query: q.QidoQuery, nodes: Sequence[PacsNode], base_url: str) -> SearchOutcome:
        # Quirks a node leaves open take their safe values; nodes from the routes are effective
        # already (docs/architecture.md, "PACS profiles"), and stay as they are.
        nodes = [safe_node(n) for n in nodes]
        budget = _Budget(self.settings.limits.max_emulation_queries)
        warnings = list(query.warnings)
        tasks = [self._search_node(node, query, budget) for node in nodes]
        results = await asyncio.gather(*tasks, return_exceptions=True)
        learned = await self._learned_models(nodes, results)
        if learned is not None:
            return await self._search(query, learned, base_url)

        per_node: list[tuple[str, str, list[Dataset]]] = []
        failures: list[GatewayError] = []
        for node, res in zip(nodes, results, strict=True):
            if isinstance(res, GatewayError):
                failures.append(res)
                warnings.append(f"node {node.name} failed: {res.detail}")
                log.warning("QIDO on node %s failed: %s", node.name, type(res).__name__)
                continue
            if isinstance(res, BaseException):
                raise res
            if res.truncated:
                limits = " or ".join(res.cut_by) or f"its result limit ({node.max_results})"
                warnings.append(f"node {node.name} has more matches than {limits}; only the first ones "
                                "were considered")
            per_node.append((node.name, node.ae_title, res.datasets))
        if failures and len(failures) == len(nodes):
            # Every queried node failed: answer with the worst error (504 beats 502), naming them all.
            if len(failures) == 1:
                raise failures[0]
            worst = max(failures, key=lambda e: e.status_code)
            names = ", ".join(e.node or "?" for e in failures)
            worst.detail = f"every queried node failed ({names}): " + "; ".join(e.detail for e in failures)
            worst.node = names
            raise worst

        merged = qr.merge(query.level, per_node)
        await self._record_locations(query.level, merged)
        cap = self.settings.limits.query_cap
        paged = qr.page(merged.datasets, query.level, query.limit, query.offset, cap)
        if paged.more:
            warnings.append("There are additional results that can be requested (use offset/limit).")
        by_name = {n.name: n for n in nodes}
        await self._complete(query, paged.datasets, merged.nodes, by_name, budget)
        if budget.exhausted:
            warnings.append("Some computed attributes (counts, ModalitiesInStudy, fan-out) were omitted: "
                            "the per-request query budget was exhausted.")
        for ds in paged.datasets:
            qr.normalise_result(ds)
            url = qr.retrieve_url(base_url, query.level, ds)
            if url:
                ds.add(DataElement(q.RETRIEVE_URL, "UR", url))
        return SearchOutcome(datasets=paged.datasets, warnings=warnings, failed_nodes=failures,
                             cacheable=not failures and not budget.emulation_failed)

    async def _learned_models(self, nodes: Sequence[PacsNode], results: Sequence[object]
                              ) -> list[PacsNode] | None:
        """Safe while unknown, for the query model too: a node whose query model is not configured
        and whose PACS refused the model tried (a Patient Root only PACS asked in Study Root before
        its profile was known) is asked again with the model its profile learned. That refusal was
        its first contact, which started the probe; the probe's association says which models the
        PACS accepts. The nodes with the learned models, or None when no refused node changed (then
        the refusal stands: at most one more round). The rule is retrieval's too
        (gateway/profile/second_round.py)."""
        return await second_round.relearned_nodes(nodes, results, self.settled_node, second_round.QUERY,
                                                  second_round.query_explained)

    # ------------------------------------------------------------------ one node

    async def _search_node(self, node: PacsNode, query: q.QidoQuery, budget: _Budget) -> FindResult:
        if query.relational and not node.quirks.relational_queries:
            return await self._fan_out(node, query, budget)
        if node.query_model == "patient":
            return await self._patient_root(node, query, budget)
        return await self._find_plan(node, query, budget)

    def _caps(self, node: PacsNode) -> q.NodeCapabilities:
        quirks = safe_node(node).quirks     # concrete values (docs/architecture.md, "PACS profiles")
        return q.NodeCapabilities(case_sensitive_pn=bool(quirks.case_sensitive_pn),
                                  modalities_in_study_matching=bool(quirks.modalities_in_study_matching),
                                  or_multiple_values=bool(quirks.or_multiple_modalities))

    async def _find_plan(self, node: PacsNode, query: q.QidoQuery, budget: _Budget,
                         extra: Dataset | None = None) -> FindResult:
        try:
            plan = q.build_identifiers(query, self._caps(node), max_identifiers=budget.left + 1)
        except q.TooManyQueries as exc:
            raise q_error(str(exc)) from None
        if extra is not None:
            for ident in plan.identifiers:
                ident.update(extra)
        if len(plan.identifiers) > 1 and not budget.take(len(plan.identifiers) - 1):
            raise q_error(f"the query expands to {len(plan.identifiers)} C-FINDs, over the per-request "
                          f"budget")
        results = await asyncio.gather(*(self.finder.find(node, ident) for ident in plan.identifiers))
        combined = FindResult(node=node.name)
        seen: set[str] = set()
        uid_tag = qr.uid_of(query.level)
        for res in results:
            _note_cut(combined, node, res)
            for ds in res.datasets:
                uid = qr.text_value(ds, uid_tag)
                if uid in seen:
                    continue
                seen.add(uid)
                combined.datasets.append(ds)
        if plan.local_keys:
            await self._local_filter(node, query, combined, plan.local_keys, budget)
        return combined

    async def _local_filter(self, node: PacsNode, query: q.QidoQuery, result: FindResult,
                            keys: list[q.MatchKey], budget: _Budget) -> None:
        """Match locally what the node could not (case-insensitive PN, ignored ModalitiesInStudy)."""
        if any(k.path == (q.MODALITIES_IN_STUDY,) for k in keys):
            await self._fill_study_details(node, result.datasets, budget, need_counts=False)
        identifier = q.local_identifier(keys)
        result.datasets = [ds for ds in result.datasets
                           if dataset_matches(identifier, ds, pn_case_insensitive=True)]

    # ------------------------------------------------------------------ Patient Root

    async def _patient_root(self, node: PacsNode, query: q.QidoQuery, budget: _Budget) -> FindResult:
        """Patient Root nodes need PatientID above STUDY level (PS3.4 C.6.1.1): find the patients first."""
        pid = query.match_value(q.PATIENT_ID)
        if pid is not None and len(pid.values) == 1 and not any(c in pid.values[0] for c in "*?") \
                and pid.values[0]:
            return await self._find_plan(node, query, budget)
        patient_query = q.QidoQuery(level="study", matches=tuple(
            m for m in query.matches if m.path[0] in q.PATIENT_LEVEL))
        plan = q.build_identifiers(patient_query, self._caps(node), dimse_level="PATIENT")
        patients = FindResult(node=node.name)
        for ident in plan.identifiers:
            for elem_tag in list(ident.keys()):
                if elem_tag not in q.PATIENT_LEVEL and elem_tag != q.QR_LEVEL and elem_tag != 0x00080005:
                    del ident[elem_tag]
            res = await self.finder.find(node, ident, model="patient")
            patients.datasets += res.datasets
            _note_cut(patients, node, res)
        ids = sorted({v for p in patients.datasets if (v := qr.text_value(p, q.PATIENT_ID))})
        combined = FindResult(node=node.name)
        _carry_cut(combined, patients)
        for patient_id in ids:
            if not budget.take():
                break
            sub = replace(query, matches=tuple(m for m in query.matches if m.path != (q.PATIENT_ID,))
                          + (q.MatchKey((q.PATIENT_ID,), (patient_id,)),))
            res = await self._find_plan(node, sub, budget)
            combined.datasets += res.datasets
            _carry_cut(combined, res)
        return combined

    # ------------------------------------------------------------------ relational fan-out

    async def _fan_out(self, node: PacsNode, query: q.QidoQuery, budget: _Budget) -> FindResult:
        """Relational queries through the hierarchy: studies -> series (-> instances)."""
        result = FindResult(node=node.name)
        study_keys = tuple(m for m in query.matches if q.level_of(m.path[0]) == "study")
        series_keys = tuple(m for m in query.matches if q.level_of(m.path[0]) == "series")
        if query.study_uid:
            studies = [_study_stub(query.study_uid)]
        else:
            sq = q.QidoQuery(level="study", matches=study_keys)
            found = await self._search_node(node, sq, budget)
            studies = found.datasets
            _carry_cut(result, found)
        for study in studies:
            study_uid = qr.text_value(study, q.STUDY_UID)
            if not budget.take():
                break
            at_series = query.level == "series"
            series_q = q.QidoQuery(level="series", study_uid=study_uid,
                                   matches=series_keys + (q.MatchKey((q.STUDY_UID,), (study_uid,)),),
                                   includefields=query.includefields if at_series else frozenset(),
                                   include_all=query.include_all and at_series)
            series_list = await self._search_node(node, series_q, budget)
            _carry_cut(result, series_list)
            if query.level == "series":
                result.datasets += [_with_parent(s, study) for s in series_list.datasets]
                continue
            for series in series_list.datasets:
                if not budget.take():
                    break
                series_uid = qr.text_value(series, q.SERIES_UID)
                own = tuple(m for m in query.matches if q.level_of(m.path[0]) == "instance")
                inst_q = replace(query, relational=False, study_uid=study_uid, series_uid=series_uid,
                                 matches=own + (q.MatchKey((q.STUDY_UID,), (study_uid,)),
                                                q.MatchKey((q.SERIES_UID,), (series_uid,))))
                inst = await self._search_node(node, inst_q, budget)
                _carry_cut(result, inst)
                result.datasets += [_with_parent(_with_parent(i, series), study) for i in inst.datasets]
        return result

    # ------------------------------------------------------------------ emulated attributes

    async def _complete(self, query: q.QidoQuery, datasets: list[Dataset], holders: dict[str, list[str]],
                        nodes: dict[str, PacsNode], budget: _Budget) -> None:
        uid_tag = qr.uid_of(query.level)
        groups: dict[str, list[Dataset]] = {}
        for ds in datasets:
            names = holders.get(qr.text_value(ds, uid_tag), [])
            if names:
                groups.setdefault(names[0], []).append(ds)
        for name, items in groups.items():
            node = nodes[name]
            if query.level == "study":
                await self._fill_study_details(node, items, budget, need_counts=True)
            elif query.level == "series" and node.quirks.compute_counts:
                await self._fill_series_counts(node, items, budget)
            elif query.level == "instance":
                self._fill_sop_classes(name, items)

    def _fill_sop_classes(self, node: str, instances: list[Dataset]) -> None:
        """SOPClassUID (PS3.18 Table 10.6.3-5) where the PACS left it out (dcmqrscp does), from the
        spooled header of an instance retrieved before; never a C-FIND (docs/architecture.md,
        "PACS profiles": attributes a PACS never returns)."""
        if self.spool is None:
            return
        for ds in instances:
            if qr.missing(ds, SOP_CLASS):
                entry = self.spool.get(node, qr.text_value(ds, q.SOP_UID))
                if entry is not None and entry.sop_class_uid:
                    ds.add(DataElement(SOP_CLASS, "UI", entry.sop_class_uid))

    async def _fill_study_details(self, node: PacsNode, studies: list[Dataset], budget: _Budget,
                                  *, need_counts: bool) -> None:
        want_mods = node.quirks.compute_modalities
        want_counts = need_counts and node.quirks.compute_counts
        todo = [s for s in studies
                if (want_mods and qr.missing(s, q.MODALITIES_IN_STUDY))
                or (want_counts and (qr.missing(s, q.N_STUDY_SERIES) or qr.missing(s, q.N_STUDY_INSTANCES)))]
        if not todo:
            return
        sem = asyncio.Semaphore(self.settings.limits.fanout_concurrency)

        async def one(study: Dataset) -> None:
            if not budget.take():
                return
            async with sem:
                ident = Dataset()
                ident.QueryRetrieveLevel = "SERIES"
                ident.StudyInstanceUID = qr.text_value(study, q.STUDY_UID)
                ident.SeriesInstanceUID = ""
                ident.Modality = ""
                ident.NumberOfSeriesRelatedInstances = None
                res = await self._emulation_find(node, ident, budget)
            if res is None:
                return
            mods = sorted({m for s in res.datasets for m in qr.text_value(s, q.MODALITY).split("\\") if m})
            if want_mods and qr.missing(study, q.MODALITIES_IN_STUDY) and mods:
                study.add(DataElement(q.MODALITIES_IN_STUDY, "CS", mods))
            if want_counts:
                if qr.missing(study, q.N_STUDY_SERIES):
                    study.add(DataElement(q.N_STUDY_SERIES, "IS", len(res.datasets)))
                if qr.missing(study, q.N_STUDY_INSTANCES):
                    await self._fill_series_counts(node, res.datasets, budget, parent=study)
                    counts = [int(qr.text_value(s, q.N_SERIES_INSTANCES) or -1) for s in res.datasets]
                    if all(c >= 0 for c in counts):
                        study.add(DataElement(q.N_STUDY_INSTANCES, "IS", sum(counts)))

        await asyncio.gather(*(one(s) for s in todo))

    async def _fill_series_counts(self, node: PacsNode, series_list: list[Dataset], budget: _Budget,
                                  parent: Dataset | None = None) -> None:
        todo = [s for s in series_list if qr.missing(s, q.N_SERIES_INSTANCES)]
        sem = asyncio.Semaphore(self.settings.limits.fanout_concurrency)

        async def one(series: Dataset) -> None:
            if not budget.take():
                return
            async with sem:
                ident = Dataset()
                ident.QueryRetrieveLevel = "IMAGE"
                ident.StudyInstanceUID = qr.text_value(parent or series, q.STUDY_UID)
                ident.SeriesInstanceUID = qr.text_value(series, q.SERIES_UID)
                ident.SOPInstanceUID = ""
                res = await self._emulation_find(node, ident, budget)
            if res is None:
                return
            series.add(DataElement(q.N_SERIES_INSTANCES, "IS", len(res.datasets)))

        await asyncio.gather(*(one(s) for s in todo))

    async def _emulation_find(self, node: PacsNode, ident: Dataset, budget: _Budget) -> FindResult | None:
        """A lower-level C-FIND for an emulated attribute; None when it cannot be done (never fatal)."""
        try:
            extra = await self._patient_key(node, str(ident.StudyInstanceUID), budget)
            if extra is False:
                return None
            if extra:
                ident.PatientID = extra
            return await self.finder.find(node, ident, model=node.query_model)
        except GatewayError as exc:
            log.warning("an emulation C-FIND on %s failed: %s", node.name, type(exc).__name__)
            budget.emulation_failed = True    # this answer lacks a value it should have: not cached
            return None

    async def _patient_key(self, node: PacsNode, study_uid: str, budget: _Budget) -> str | bool | None:
        """For Patient Root nodes, the PatientID a lower-level C-FIND needs (False: unknown)."""
        if node.query_model != "patient":
            return None
        pid = await self.patients.for_study(node, study_uid, budget.take)
        return pid if pid else False

    # ------------------------------------------------------------------ locations

    async def _record_locations(self, level: q.Level, merged: qr.Merged) -> None:
        """Remember which node holds which study (WADO goes straight there later), and each study's
        PatientID per node (Patient Root retrievals need it). The cache never raises."""
        ttl = self.settings.cache.ttl.location
        for ds in merged.datasets:
            study = qr.text_value(ds, q.STUDY_UID)
            if not study:
                continue
            names = merged.nodes.get(qr.text_value(ds, qr.uid_of(level)), [])
            if names:
                await self.cache.sadd(keys.study_locations(study), names, ttl)
            pid = qr.text_value(ds, q.PATIENT_ID)
            if pid:
                for name in names:
                    await self.patients.remember(StudyId(name, study), pid)

    async def study_nodes(self, study_uid: str) -> list[str]:
        return sorted(await self.cache.smembers(keys.study_locations(study_uid)))


def _study_stub(study_uid: str) -> Dataset:
    ds = Dataset()
    ds.StudyInstanceUID = study_uid
    return ds


def _with_parent(child: Dataset, parent: Dataset) -> Dataset:
    """Relational results carry their parents' attributes (PS3.18 §10.6.3.3.2)."""
    for elem in parent:
        if elem.tag not in child and elem.tag not in (q.QR_LEVEL, q.RETRIEVE_AET):
            child.add(elem)
    return child


def q_error(detail: str) -> GatewayError:
    return BadRequest(detail)


__all__ = ["SearchService", "SearchOutcome", "NotFound", "PacsError"]


def cut_short(node: PacsNode, res: FindResult) -> str | None:
    """The one rule for "this C-FIND answer may be missing matches" (then QIDO-RS says so with a
    ``Warning: 299``, PS3.18 8.3.4.4 / 6.7.1.2.3), for both caps: the gateway's own ``max_results``
    stopped it (C-CANCEL, ``truncated``), or it holds exactly as many matches as the PACS's own
    result cap (learned by its profile or configured, ``result_cap``; docs/architecture.md, "PACS
    profiles"): a PACS that stops there says nothing. Which cap, or None. For one C-FIND's answer."""
    if res.truncated:
        return f"its result limit ({node.max_results})"
    if node.result_cap and len(res.datasets) == node.result_cap:
        return f"its PACS's own result cap ({node.result_cap} matches per query)"
    return None


def _note_cut(into: FindResult, node: PacsNode, res: FindResult) -> None:
    """One C-FIND's answer ``res`` is part of ``into``: so is its truncation."""
    reason = cut_short(node, res)
    if reason is not None:
        into.truncated = True
        if reason not in into.cut_by:
            into.cut_by.append(reason)


def _carry_cut(into: FindResult, part: FindResult) -> None:
    """A combined answer ``part`` (already judged by :func:`cut_short`) is part of ``into``."""
    into.truncated |= part.truncated
    into.cut_by += [r for r in part.cut_by if r not in into.cut_by]
