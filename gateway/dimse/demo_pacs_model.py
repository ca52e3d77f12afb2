"""The demo PACS's data: the instances it holds and the Query/Retrieve information model over them.

Pydicom only (no pynetdicom, no sockets); the SCP in :mod:`gateway.dimse.demo_pacs` answers from it:

- :class:`StoredInstance`: one held instance, the dataset matched on and the Part-10 bytes sent
  again as they are, and :func:`ensure_file_meta` for datasets added without a file meta;
- :data:`LEVELS` and :func:`level_of`: the Query/Retrieve level an attribute belongs to (PS3.4
  C.6.1.1, C.6.2.1; anything unclassified belongs to the query level);
- the computed keys (:data:`ALL_COMPUTED`: counts, ModalitiesInStudy, SOPClassesInStudy) and
  :class:`Hierarchy`, which computes them from every held instance;
- :func:`check_level`: an identifier's level, valid for the information model (Patient Root or Study
  Root) with its unique keys present (PS3.4 C.4.1.3.1 for C-FIND, C.4.2.2.1 / C.4.3.2.1 for C-GET
  and C-MOVE).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from io import BytesIO

from pydicom import dcmread
from pydicom.datadict import tag_for_keyword
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian

LEVELS = ("PATIENT", "STUDY", "SERIES", "IMAGE")
_MODEL_LEVELS = {"PATIENT": LEVELS, "STUDY": LEVELS[1:]}  # Patient Root, Study Root (C.6.1, C.6.2)


def _tags(keywords: str) -> frozenset[int]:
    tags = [tag_for_keyword(k) for k in keywords.split()]
    assert None not in tags, keywords
    return frozenset(int(t) for t in tags if t is not None)


UNIQUE_KEYS = (0x00100020, 0x0020000D, 0x0020000E, 0x00080018)  # PatientID, Study/Series/SOP Instance UID
SPECIFIC_CHARACTER_SET = 0x00080005
_QUERY_RETRIEVE_LEVEL = 0x00080052
RETRIEVE_AE_TITLE = 0x00080054
MODALITIES_IN_STUDY = 0x00080061
AVAILABLE_TRANSFER_SYNTAX_UID = 0x00083002

# Attributes computed from the whole hierarchy, by the level they describe.
_COMPUTED = {
    "PATIENT": _tags(
        "NumberOfPatientRelatedStudies NumberOfPatientRelatedSeries NumberOfPatientRelatedInstances"
    ),
    "STUDY": _tags(
        "NumberOfStudyRelatedSeries NumberOfStudyRelatedInstances ModalitiesInStudy SOPClassesInStudy"
    ),
    "SERIES": _tags("NumberOfSeriesRelatedInstances"),
}
ALL_COMPUTED = frozenset().union(*_COMPUTED.values())
MATCHABLE_COMPUTED = _tags("ModalitiesInStudy SOPClassesInStudy")
# Where well-known attributes live (PS3.4 C.6.1.1, C.6.2.1); patient attributes are group 0010.
_LEVEL_KEYS = {
    "STUDY": _COMPUTED["STUDY"]
    | _tags(
        """StudyInstanceUID StudyDate StudyTime AccessionNumber StudyID ReferringPhysicianName
        StudyDescription PatientAge PatientSize PatientWeight IssuerOfAccessionNumberSequence
        NameOfPhysiciansReadingStudy ProcedureCodeSequence AdmittingDiagnosesDescription"""
    ),
    "SERIES": _COMPUTED["SERIES"]
    | _tags(
        """SeriesInstanceUID Modality SeriesNumber SeriesDescription SeriesDate SeriesTime BodyPartExamined
        Laterality ProtocolName PerformedProcedureStepStartDate PerformedProcedureStepStartTime
        PerformedProcedureStepID RequestAttributesSequence FrameOfReferenceUID Manufacturer
        ManufacturerModelName StationName InstitutionName OperatorsName PerformingPhysicianName"""
    ),
    "IMAGE": _tags(
        """SOPInstanceUID SOPClassUID InstanceNumber ImageType ContentDate ContentTime AcquisitionDate
        AcquisitionTime AcquisitionDateTime AcquisitionNumber Rows Columns BitsAllocated BitsStored HighBit
        PixelRepresentation SamplesPerPixel PhotometricInterpretation NumberOfFrames ImagePositionPatient
        ImageOrientationPatient SliceLocation SliceThickness PixelSpacing WindowCenter WindowWidth
        AvailableTransferSyntaxUID ContentLabel ContentDescription ConceptNameCodeSequence CompletionFlag
        VerificationFlag InstanceCreationDate InstanceCreationTime"""
    ),
}


def level_of(tag: int, query_level: str) -> str:
    for level in ("IMAGE", "SERIES", "STUDY"):
        if tag in _LEVEL_KEYS[level]:
            return level
    if tag >> 16 == 0x0010 or tag in _COMPUTED["PATIENT"]:
        return "PATIENT"
    return query_level


@dataclass(frozen=True, slots=True)
class StoredInstance:
    """One instance the demo PACS holds, keyed by its SOP Instance UID."""

    dataset: Dataset  # for matching, with file_meta; without Pixel Data when ``raw`` is kept
    raw: bytes | None  # the Part 10 bytes as read or received, sent again as they are

    @classmethod
    def from_bytes(cls, raw: bytes) -> StoredInstance:
        return cls(ensure_file_meta(dcmread(BytesIO(raw), force=True, stop_before_pixels=True)), raw)

    @property
    def transfer_syntax(self) -> UID:
        return UID(self.dataset.file_meta.TransferSyntaxUID)

    def outgoing(self) -> Dataset:
        """The whole dataset, re-read from the stored bytes so it keeps its transfer syntax."""
        if self.raw is None:
            return self.dataset
        ds = dcmread(BytesIO(self.raw), force=True)
        if "TransferSyntaxUID" not in getattr(ds, "file_meta", ()):
            ds.file_meta = self.dataset.file_meta  # a bare dataset file, without Part 10 header
        return ds


def ensure_file_meta(ds: Dataset) -> Dataset:
    """``ds`` with its four UIDs checked (``ValueError``) and a missing file meta filled in place."""
    for keyword in ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID"):
        if not ds.get(keyword):
            raise ValueError(f"dataset has no {keyword}")
    meta = getattr(ds, "file_meta", None)
    if meta is None:
        meta = ds.file_meta = FileMetaDataset()
    if "TransferSyntaxUID" not in meta:
        implicit = ds.original_encoding[0]
        meta.TransferSyntaxUID = ImplicitVRLittleEndian if implicit else ExplicitVRLittleEndian
    meta.setdefault("MediaStorageSOPClassUID", ds.SOPClassUID)
    meta.setdefault("MediaStorageSOPInstanceUID", ds.SOPInstanceUID)
    return ds


def value_str(ds: Dataset, tag: int) -> str:
    """The element's value as text; ``""`` when absent or empty."""
    value = ds.get(tag)
    return "" if value is None or value.value is None else str(value.value)


class Hierarchy:
    """Counts and modalities of every patient, study and series, for the computed keys."""

    def __init__(self, instances: Iterable[StoredInstance]) -> None:
        self.series_instances: Counter[str] = Counter()
        self.study_instances: Counter[str] = Counter()
        self.patient_instances: Counter[str] = Counter()
        self.study_series: dict[str, dict[str, None]] = {}
        self.patient_series: dict[str, dict[str, None]] = {}
        self.patient_studies: dict[str, dict[str, None]] = {}
        self.study_modalities: dict[str, dict[str, None]] = {}
        self.study_sop_classes: dict[str, dict[str, None]] = {}
        for inst in instances:
            ds = inst.dataset
            patient, study, series = (value_str(ds, tag) for tag in UNIQUE_KEYS[:3])
            self.series_instances[series] += 1
            self.study_instances[study] += 1
            self.patient_instances[patient] += 1
            self.study_series.setdefault(study, {})[series] = None
            self.patient_series.setdefault(patient, {})[series] = None
            self.patient_studies.setdefault(patient, {})[study] = None
            if ds.get("Modality"):
                self.study_modalities.setdefault(study, {})[str(ds.Modality)] = None
            self.study_sop_classes.setdefault(study, {})[str(ds.SOPClassUID)] = None

    def computed(self, level: str, ds: Dataset) -> list[DataElement]:
        patient, study, series = (value_str(ds, tag) for tag in UNIQUE_KEYS[:3])
        if level == "PATIENT":
            return [
                DataElement(0x00201200, "IS", len(self.patient_studies[patient])),
                DataElement(0x00201202, "IS", len(self.patient_series[patient])),
                DataElement(0x00201204, "IS", self.patient_instances[patient]),
            ]
        if level == "STUDY":
            return [
                DataElement(MODALITIES_IN_STUDY, "CS", sorted(self.study_modalities.get(study, {}))),
                DataElement(0x00080062, "UI", list(self.study_sop_classes[study])),
                DataElement(0x00201206, "IS", len(self.study_series[study])),
                DataElement(0x00201208, "IS", self.study_instances[study]),
            ]
        if level == "SERIES":
            return [DataElement(0x00201209, "IS", self.series_instances[series])]
        return []


def check_level(identifier: Dataset, model: str, *, hierarchical: bool) -> str | None:
    """The identifier's Query/Retrieve Level if valid for ``model`` with its unique keys present."""
    level = value_str(identifier, _QUERY_RETRIEVE_LEVEL).strip().upper()
    if level not in _MODEL_LEVELS[model]:
        return None
    first = LEVELS.index(_MODEL_LEVELS[model][0])
    depth = LEVELS.index(level)
    # C-FIND needs the unique keys above the level; C-GET/C-MOVE also the one at the level.
    required = UNIQUE_KEYS[first:depth] if hierarchical else UNIQUE_KEYS[first : depth + 1]
    if any(not value_str(identifier, tag).strip() for tag in required):
        return None
    return level
