"""The C-FIND probes of a PACS profile: read-only, small, and about the PACS's own data.

Each probe asks a question whose answer the gateway can check against what the PACS itself
returned a moment earlier (docs/architecture.md, "PACS profiles"):

1. a sample: a STUDY-level C-FIND without match keys (Patient Root: PATIENT level first), capped at
   a few results, with exactly the return keys QIDO-RS asks for (PS3.18 Table 10.6.3-3); then the
   SERIES and IMAGE levels of one sampled study (Tables 10.6.3-4/-5): which keys never come back;
2. PN matching (PS3.4 C.2.2.2.1, C.2.2.2.4): one PatientName of the sample, asked for together with
   its study's UID (Patient Root: its PatientID) as returned, with its case changed, with its first
   letters and a trailing ``*``, and, as a control, with a name that cannot match;
3. ModalitiesInStudy as a match key: a modality the study lacks (must find nothing) and one it has;
   then both as one multi-valued key (PS3.4 C.2.2.2.2: OR);
4. a StudyDate range around the study's date, and one after it (C.2.2.2.5);
5. relational queries (C.4.1.2.2.1, Study Root only): the sampled series by its UID alone at SERIES
   level and the sampled instance by its UID alone at IMAGE level;
6. a result cap (Study Root only): a STUDY-level C-FIND without match keys, read up to the node's
   ``max_results`` (the gateway's own cap, then C-CANCEL), returns K studies; then the same split in
   two disjoint StudyDate ranges at a date D it returned (``-D`` and ``D+1-``). Every study either
   range returns matches the keyless query too, so more distinct studies than K means the keyless
   answer was cut: the PACS caps results at K. Only StudyInstanceUID and StudyDate are asked for.

Names, IDs and UIDs found here stay in :class:`Sample` (in memory, for the next probes); the
observations only say what was asked in general terms and how many answers matched.
"""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from pydicom.datadict import keyword_for_tag
from pydicom.dataset import Dataset

from gateway.errors import DimseFailure, GatewayError
from gateway.pacs import Pacs, QueryModel
from gateway.profile import facts as f
from gateway.profile.facts import Observation, not_tested
from gateway.settings import PacsNode
from translators import qido as q
from translators import qido_results as qr

SAMPLE = 10
"""Results read from the keyless C-FINDs before the C-CANCEL (C-FIND has no paging, PS3.4 C.4.1)."""
TARGETED = 5
"""Cap of the targeted C-FINDs: they name one study, series or instance and expect 0 or 1 match."""
PATIENT_SAMPLE = 3
"""Patient Root: patients whose studies are sampled."""

MODALITIES = ("OT", "CT", "MR", "US", "CR", "DX", "XA", "NM", "PT", "MG", "SR")
PATIENT_NAME, STUDY_DATE, SOP_CLASS = 0x00100010, 0x00080020, 0x00080016
_NOT_RETURNED = frozenset({0x00080005, q.QR_LEVEL})   # the character set and the level are not attributes
NO_MATCH_PREFIX = "QQZX"
"""Prefixed to a known name for the control query: a PACS that finds the study anyway ignores PN keys."""


@dataclass
class Sample:
    """What the probes work with. Patient data, kept in memory for the duration of the probe only."""

    model: QueryModel
    study_uid: str = ""
    patient_id: str = ""
    patient_name: str = ""          # one usable name (see usable_name), or ""
    study_date: str = ""
    modalities: list[str] = field(default_factory=list)
    series_uid: str = ""
    sop_uid: str = ""
    sop_class: str = ""


@dataclass
class QueryFindings:
    observations: dict[str, Observation] = field(default_factory=dict)
    missing: dict[str, list[str]] = field(default_factory=dict)
    find_seconds: list[float] = field(default_factory=list)     # targeted C-FINDs (small responses)
    sample: Sample | None = None
    result_cap: int | None = None                               # the PACS's cap, when one was proven


# ------------------------------------------------------------------------------------ pure helpers


def usable_name(value: str) -> bool:
    """A PatientName fit for the PN probes: one ASCII component group (no ``=``), letters whose case
    can change, no wildcard or separator characters of a query."""
    text = value.strip()
    return (2 <= len(text) <= 64 and text.isascii() and "=" not in text and not any(c in text for c in "*?\\")
            and text.swapcase() != text and any(c.isalpha() for c in text.split("^")[0]))


def case_changed(name: str) -> str:
    return name.strip().swapcase()


def wildcard_prefix(name: str) -> str:
    """The first letters of the family name followed by ``*`` (a trailing wildcard, C.2.2.2.4)."""
    family = name.strip().split("^")[0]
    return family[: max(1, min(3, len(family) - 1))] + "*"


def absent_modality(present: Sequence[str]) -> str:
    return next(m for m in MODALITIES if m not in present)


def date_windows(study_date: str) -> tuple[str, str] | None:
    """(a range around ``study_date``, a range after it) as DA range values, or None for a bad date."""
    try:
        day = dt.datetime.strptime(study_date.strip()[:8], "%Y%m%d").date()
    except ValueError:
        return None
    before, after = day - dt.timedelta(days=1), day + dt.timedelta(days=1)
    return f"{before:%Y%m%d}-{after:%Y%m%d}", f"{after:%Y%m%d}-"


def split_date(dates: Sequence[str]) -> str | None:
    """The median of the valid StudyDates (YYYYMMDD) among ``dates``, or None: where the cap probe
    splits the keyless query in two disjoint ranges (both likely to hold studies)."""
    valid = sorted(d.strip()[:8] for d in dates if date_windows(d) is not None)
    return valid[len(valid) // 2] if valid else None


def partitions(day: str) -> tuple[str, str]:
    """``-day`` and ``day+1-``: two DA ranges that no study matches both of (C.2.2.2.5)."""
    after = dt.datetime.strptime(day, "%Y%m%d").date() + dt.timedelta(days=1)
    return f"-{day}", f"{after:%Y%m%d}-"


def never_returned(identifier: Dataset, responses: Sequence[Dataset]) -> list[str]:
    """Keywords of the identifier's keys no response carried with a value (absent or empty in all)."""
    out = []
    for elem in identifier:
        tag = int(elem.tag)
        if tag in _NOT_RETURNED or any(not qr.missing(ds, tag) for ds in responses):
            continue
        out.append(keyword_for_tag(tag) or f"{tag:08X}")
    return out


def default_identifier(level: q.Level, dimse_level: str | None = None) -> Dataset:
    """The identifier QIDO-RS sends for a keyless search at ``level`` (PS3.18 §10.6.3.3 defaults)."""
    return q.build_identifiers(q.QidoQuery(level=level), dimse_level=dimse_level).identifiers[0]


# ------------------------------------------------------------------------------------ the probes


class QueryProbe:
    def __init__(self, pacs: Pacs, node: PacsNode, model: QueryModel) -> None:
        self.pacs = pacs
        self.node = node
        self.model = model
        self.found = QueryFindings()

    async def run(self) -> QueryFindings:
        sample = await self._sample()
        self.found.sample = sample
        obs = self.found.observations
        if not sample.study_uid:
            why = "the PACS returned no study to test with"
            for fact in (f.PN_CASE_INSENSITIVE, f.PN_WILDCARD, f.MODALITIES_MATCHING, f.OR_VALUES,
                         f.DATE_RANGES, f.RELATIONAL, f.RESULT_CAP):
                obs.setdefault(fact, not_tested("C-FIND", why))
            return self.found
        await self._series_and_instances(sample)
        await self._guarded(f.PN_CASE_INSENSITIVE, self._pn, sample)
        await self._guarded(f.MODALITIES_MATCHING, self._modalities, sample)
        await self._guarded(f.DATE_RANGES, self._dates, sample)
        await self._guarded(f.RELATIONAL, self._relational, sample)
        await self._guarded(f.RESULT_CAP, self._result_cap, sample)
        return self.found

    async def _guarded(self, fact: str, step: object, sample: Sample) -> None:
        """A probe step whose DIMSE failure becomes the observation of its (first) fact."""
        try:
            await step(sample)  # type: ignore[operator]
        except GatewayError as exc:
            self.found.observations.setdefault(fact, Observation("C-FIND", f"failed: {_failure(exc)}"))

    async def _find(self, ident: Dataset, cap: int = TARGETED, *, timed: bool = True,
                    model: QueryModel | None = None) -> list[Dataset]:
        started = time.monotonic()
        res = await self.pacs.find(self.node, ident, model=model or self.model, max_results=cap)
        if timed:
            self.found.find_seconds.append(time.monotonic() - started)
        return res.datasets

    # -- 1. the sample

    async def _sample(self) -> Sample:
        sample = Sample(self.model)
        ident = default_identifier("study")
        studies: list[Dataset] = []
        try:
            if self.model == "patient":
                patients = Dataset()
                patients.QueryRetrieveLevel = "PATIENT"
                patients.PatientID = ""
                patients.PatientName = ""
                for patient in (await self._find(patients, SAMPLE, timed=False))[:PATIENT_SAMPLE]:
                    pid = qr.text_value(patient, q.PATIENT_ID)
                    if pid:
                        per_patient = _copy(ident)
                        per_patient.PatientID = pid
                        studies += await self._find(per_patient, SAMPLE, timed=False)
            else:
                studies = await self._find(ident, SAMPLE, timed=False)
        except GatewayError as exc:
            self.found.observations[f.RETURN_KEYS_STUDY] = Observation(
                "STUDY-level C-FIND without match keys", f"failed: {_failure(exc)}")
            return sample
        studies = [s for s in studies if qr.text_value(s, q.STUDY_UID)]
        if not studies:
            self.found.observations[f.RETURN_KEYS_STUDY] = Observation(
                "STUDY-level C-FIND without match keys", "no study returned")
            return sample
        self._record_keys("study", ident, studies,
                          "STUDY-level C-FIND without match keys" if self.model == "study" else
                          "PATIENT-level C-FIND without match keys, then STUDY level per patient")
        chosen = next((s for s in studies if usable_name(qr.text_value(s, PATIENT_NAME))), studies[0])
        sample.study_uid = qr.text_value(chosen, q.STUDY_UID)
        sample.patient_id = qr.text_value(chosen, q.PATIENT_ID)
        name = qr.text_value(chosen, PATIENT_NAME)
        sample.patient_name = name.strip() if usable_name(name) else ""
        sample.study_date = qr.text_value(chosen, STUDY_DATE)
        sample.modalities = [m for m in qr.text_value(chosen, q.MODALITIES_IN_STUDY).split("\\") if m]
        return sample

    def _record_keys(self, level: q.Level, ident: Dataset, responses: list[Dataset], test: str) -> None:
        missing = never_returned(ident, responses)
        self.found.missing[level] = missing
        result = (f"every key came back ({len(responses)} sampled)" if not missing else
                  f"never returned with a value ({len(responses)} sampled): {', '.join(missing)}")
        self.found.observations[f.RETURN_KEYS[level]] = Observation(test, result, not missing)

    def _scoped(self, ident: Dataset, sample: Sample) -> Dataset:
        """``ident`` with the unique keys above its level that a hierarchical query needs."""
        if self.model == "patient" and sample.patient_id:
            ident.PatientID = sample.patient_id
        return ident

    # -- the sampled study's series and instances

    async def _series_and_instances(self, sample: Sample) -> None:
        obs = self.found.observations
        ident = default_identifier("series")
        ident.StudyInstanceUID = sample.study_uid
        try:
            series = await self._find(self._scoped(ident, sample), SAMPLE, timed=False)
        except GatewayError as exc:
            obs[f.RETURN_KEYS_SERIES] = Observation("SERIES-level C-FIND in one sampled study",
                                                    f"failed: {_failure(exc)}")
            return
        series = [s for s in series if qr.text_value(s, q.SERIES_UID)]
        if not series:
            obs[f.RETURN_KEYS_SERIES] = Observation("SERIES-level C-FIND in one sampled study", "no series")
            return
        self._record_keys("series", ident, series, "SERIES-level C-FIND in one sampled study")
        for s in series:
            modality = qr.text_value(s, q.MODALITY)
            if modality and modality not in sample.modalities:
                sample.modalities.append(modality)
        sample.series_uid = qr.text_value(series[0], q.SERIES_UID)
        ident = default_identifier("instance")
        ident.StudyInstanceUID = sample.study_uid
        ident.SeriesInstanceUID = sample.series_uid
        try:
            instances = await self._find(self._scoped(ident, sample), SAMPLE, timed=False)
        except GatewayError as exc:
            obs[f.RETURN_KEYS_INSTANCE] = Observation("IMAGE-level C-FIND in one sampled series",
                                                      f"failed: {_failure(exc)}")
            return
        instances = [i for i in instances if qr.text_value(i, q.SOP_UID)]
        if instances:
            self._record_keys("instance", ident, instances, "IMAGE-level C-FIND in one sampled series")
            sample.sop_uid = qr.text_value(instances[0], q.SOP_UID)
            sample.sop_class = qr.text_value(instances[0], SOP_CLASS)

    # -- 2. PN matching

    async def _matches(self, sample: Sample, **keys: object) -> int:
        """How many of the PACS's answers are the sampled study (Patient Root at PATIENT level: the
        sampled patient) when asked for with ``keys`` besides its unique key."""
        ident = Dataset()
        if self.model == "patient":
            ident.QueryRetrieveLevel = "PATIENT"
            ident.PatientID = sample.patient_id
            own, tag = sample.patient_id, q.PATIENT_ID
        else:
            ident.QueryRetrieveLevel = "STUDY"
            ident.StudyInstanceUID = sample.study_uid
            own, tag = sample.study_uid, q.STUDY_UID
        for keyword, value in keys.items():
            setattr(ident, keyword, value)
        return sum(1 for ds in await self._find(ident) if qr.text_value(ds, tag) in ("", own))

    async def _pn(self, sample: Sample) -> None:
        obs = self.found.observations
        level = "PATIENT" if self.model == "patient" else "STUDY"
        test = (f"{level}-level C-FIND for one sampled {'patient' if level == 'PATIENT' else 'study'} with "
                "one PatientName the PACS returned (not recorded): as returned, case changed, a control "
                "that cannot match")
        wild_test = f"{level}-level C-FIND with the name's first letters and a trailing '*'"
        if not sample.patient_name or (self.model == "patient" and not sample.patient_id):
            why = "no sampled PatientName has letters whose case can change (ASCII, one component group)"
            obs[f.PN_CASE_INSENSITIVE] = not_tested(test, why)
            obs[f.PN_WILDCARD] = not_tested(wild_test, why)
            return
        name = sample.patient_name
        exact = await self._matches(sample, PatientName=name)
        control = await self._matches(sample, PatientName=NO_MATCH_PREFIX + name)
        changed = await self._matches(sample, PatientName=case_changed(name))
        wildcard = await self._matches(sample, PatientName=wildcard_prefix(name))
        if exact == 0 or control > 0:
            result = ("the name as returned found nothing" if exact == 0 else
                      "a name that cannot match found the entity: PatientName is ignored as a key")
            obs[f.PN_CASE_INSENSITIVE] = Observation(test, result, False)
        elif changed:
            obs[f.PN_CASE_INSENSITIVE] = Observation(test, "found with its case changed: case-insensitive",
                                                     True)
        else:
            obs[f.PN_CASE_INSENSITIVE] = Observation(test, "not found with its case changed: case-sensitive",
                                                     False)
        obs[f.PN_WILDCARD] = Observation(wild_test, "found" if wildcard else "not found", bool(wildcard))

    # -- 3. ModalitiesInStudy

    async def _modalities(self, sample: Sample) -> None:
        obs = self.found.observations
        test = ("STUDY-level C-FIND for one sampled study with ModalitiesInStudy = a modality it lacks, "
                "then one it has")
        or_test = "the same with both modalities as one multi-valued key (OR, PS3.4 C.2.2.2.2)"
        if not sample.modalities:
            obs[f.MODALITIES_MATCHING] = not_tested(test, "the sampled study's modalities are unknown")
            obs[f.OR_VALUES] = not_tested(or_test, "the sampled study's modalities are unknown")
            return
        has, lacks = sample.modalities[0], absent_modality(sample.modalities)
        wrong = await self._study_matches(sample, ModalitiesInStudy=lacks)
        right = await self._study_matches(sample, ModalitiesInStudy=has)
        if wrong:
            obs[f.MODALITIES_MATCHING] = Observation(
                test, "found with a modality it lacks: the key is ignored", False)
        elif not right:
            obs[f.MODALITIES_MATCHING] = Observation(test, "not found even with a modality it has", False)
        else:
            obs[f.MODALITIES_MATCHING] = Observation(test, "honoured", True)
        if wrong or not right:
            obs[f.OR_VALUES] = not_tested(or_test, "ModalitiesInStudy is not honoured as a key")
            return
        either = await self._study_matches(sample, ModalitiesInStudy=[lacks, has])
        obs[f.OR_VALUES] = Observation(or_test, "found: OR" if either else "not found: no OR", bool(either))

    async def _study_matches(self, sample: Sample, **keys: object) -> int:
        ident = Dataset()
        ident.QueryRetrieveLevel = "STUDY"
        ident.StudyInstanceUID = sample.study_uid
        for keyword, value in keys.items():
            setattr(ident, keyword, value)
        found = await self._find(self._scoped(ident, sample))
        return sum(1 for ds in found if qr.text_value(ds, q.STUDY_UID) in ("", sample.study_uid))

    # -- 4. date ranges

    async def _dates(self, sample: Sample) -> None:
        test = "STUDY-level C-FIND for one sampled study with a StudyDate range around its date, one after it"
        windows = date_windows(sample.study_date)
        if windows is None:
            self.found.observations[f.DATE_RANGES] = not_tested(test, "the sampled study has no StudyDate")
            return
        inside, after = windows
        found = await self._study_matches(sample, StudyDate=inside)
        wrong = await self._study_matches(sample, StudyDate=after)
        works = bool(found) and not wrong
        result = "honoured" if works else ("not found within the range" if not found else
                                           "found outside the range: ranges are ignored")
        self.found.observations[f.DATE_RANGES] = Observation(test, result, works)

    # -- 5. relational queries

    async def _relational(self, sample: Sample) -> None:
        test = ("SERIES-level C-FIND by the sampled SeriesInstanceUID alone, IMAGE-level by the sampled "
                "SOPInstanceUID alone (no keys of the levels above)")
        obs = self.found.observations
        if self.model != "study":
            obs[f.RELATIONAL] = not_tested(test, "Study Root is not accepted (Patient Root only)")
            return
        if not (sample.series_uid and sample.sop_uid):
            obs[f.RELATIONAL] = not_tested(test, "no series or instance was sampled")
            return
        answers = []
        for level, keyword, uid, tag in (("SERIES", "SeriesInstanceUID", sample.series_uid, q.SERIES_UID),
                                         ("IMAGE", "SOPInstanceUID", sample.sop_uid, q.SOP_UID)):
            ident = Dataset()
            ident.QueryRetrieveLevel = level
            setattr(ident, keyword, uid)
            try:
                found = await self._find(ident)
            except GatewayError as exc:
                obs[f.RELATIONAL] = Observation(test, f"refused at {level} level: {_failure(exc)}", False)
                return
            answers.append(sum(1 for ds in found if qr.text_value(ds, tag) == uid))
        works = all(answers)
        obs[f.RELATIONAL] = Observation(test, "answered" if works else "not answered (hierarchical only)",
                                        works)


    # -- 6. result cap

    async def _result_cap(self, sample: Sample) -> None:
        limit = self.node.max_results
        test = (f"STUDY-level C-FIND without match keys read up to the gateway's cap ({limit}), then the "
                "same in two disjoint StudyDate ranges split at a date it returned")
        obs = self.found.observations
        if self.model != "study":
            obs[f.RESULT_CAP] = not_tested(test, "Study Root is not accepted (Patient Root only)")
            return
        try:
            whole = await self.pacs.find(self.node, _study_dates(), model="study", max_results=limit)
        except DimseFailure as exc:
            # A PACS may end a query that matches too much with a failure (e.g. 0xA700 out of
            # resources, 0xC001 unable to process); its ErrorComment is never read (patient data).
            obs[f.RESULT_CAP] = Observation(test, f"the query without match keys was refused: {_failure(exc)}"
                                            " (the PACS may refuse large results)", False)
            return
        uids = {qr.text_value(ds, q.STUDY_UID) for ds in whole.datasets} - {""}
        count = len(whole.datasets)
        if whole.truncated or count >= limit:
            obs[f.RESULT_CAP] = Observation(test, f"not tested beyond the gateway's own cap ({limit})")
            return
        day = split_date([qr.text_value(ds, STUDY_DATE) for ds in whole.datasets])
        if day is None:
            obs[f.RESULT_CAP] = not_tested(test, f"none of the {count} studies returned has a StudyDate")
            return
        seen = set(uids)
        for window in partitions(day):
            ident = _study_dates()
            ident.StudyDate = window
            # More than ``count`` from one range already proves the cut; no need to read further.
            part = await self.pacs.find(self.node, ident, model="study", max_results=count + 1)
            seen |= {qr.text_value(ds, q.STUDY_UID) for ds in part.datasets} - {""}
        self.found.result_cap = count if len(seen) > count else None
        if len(seen) > count:
            obs[f.RESULT_CAP] = Observation(test, f"capped at {count} matches (partitions found {len(seen)})",
                                            False)
        else:
            obs[f.RESULT_CAP] = Observation(test, f"no cap seen: {count} studies, the partitions found no "
                                            "other", True)


def _study_dates() -> Dataset:
    ident = Dataset()
    ident.QueryRetrieveLevel = "STUDY"
    ident.StudyInstanceUID = ""
    ident.StudyDate = ""
    return ident


def _copy(ds: Dataset) -> Dataset:
    out = Dataset()
    for elem in ds:
        out.add(elem)
    return out


def _failure(exc: GatewayError) -> str:
    """An error as the observation shows it (the error tree never carries patient data)."""
    return f"{type(exc).__name__}: {exc.detail}"[:200]
