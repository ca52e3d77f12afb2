"""Deterministic, realistic demo DICOM studies for tests, benchmarks and the demo.

Every call returns the same UIDs and the same pixel values (no clock, no random generator: noise
comes from an integer hash), so tests can hard-code what they expect. Pixel data are simple
phantoms that look like the anatomy named in the descriptions. Default scale (``DemoScale()``):
6 patients, 8 studies, 13 series, 111 instances, about 3.8 MB.

| PatientID | PatientName                          | Sex | BirthDate | SpecificCharacterSet    |
|-----------|--------------------------------------|-----|-----------|-------------------------|
| DGW0001   | Doe^John                             | M   | 19610412  | (absent)                |
| DGW0002   | DOE^JANE                             | F   | 19780930  | (absent)                |
| DGW0003   | Smith^Anna                           | F   | 19900105  | ISO_IR 100              |
| DGW0004   | Müller^Jürgen                        | M   | 19550723  | ISO_IR 100              |
| DGW0005   | Østergård^Søren                      | M   | 19831201  | ISO_IR 192              |
| DGW0006   | Yamada^Tarou=山田^太郎=やまだ^たろう   | M   | 19700214  | ["", "ISO 2022 IR 87"]  |

| # | PatientID | StudyDate/Time    | Accession   | StudyDescription       | Series no. modality (instances) |
|---|-----------|-------------------|-------------|------------------------|---------------------------------|
| 1 | DGW0001   | 20230314 101530   | A2303140011 | CT CHEST W/O CONTRAST  | 1 CT topogram (1), 2 CT (24)    |
| 2 | DGW0001   | 20210210 083000   | A2102100007 | CT CHEST (the prior)   | 2 CT 5 mm (12)                  |
| 3 | DGW0002   | 20220621 142233.5 | A2206210031 | MR BRAIN               | 1 MR T1 (16), 2 MR T2 RLE (16)  |
| 4 | DGW0003   | 20191108 091205   | A1911080004 | CR CHEST 2 VIEWS       | 1 CR MONOCHROME1 (2)            |
| 5 | DGW0003   | 20240115 163045   | A2401150102 | CT ABDOMEN W CONTRAST  | 2 CT (12), 900 SR (1)           |
| 6 | DGW0004   | 20200902 073512   | A2009020019 | PET/CT Ganzkörper      | 2 CT (12), 3 PT 64x64 (12)      |
| 7 | DGW0005   | 20240527 110003   | A2405270008 | Hjerte cine (sekundær) | 1 OT 12 frames (1)              |
| 8 | DGW0006   | 20231005 152140   | A2310050055 | 膝 X線                 | 1 DX AP (1), 2 DX LAT (1)       |

Instance counts scale with ``DemoScale``: study 1 axial = ct_slices; studies 2, 5, 6 = ct_slices // 2
per series; study 3 = mr_slices per series; study 7 = mf_frames frames of mf_size.

- Transfer syntax: Explicit VR Little Endian everywhere except study 3 series 2 (MR T2), which is
  RLE Lossless, so retrieval tests see encapsulated pixel data.
- CT: CT Image Storage, signed 16-bit, RescaleIntercept -1024, stored -2000 outside the reconstruction
  circle; ImagePositionPatient steps by SliceThickness along z; shared FrameOfReferenceUID per study.
- MR: MR Image Storage, unsigned 16-bit (12 bits stored); PT: PET Image Storage, BQML with a
  RescaleSlope; CR: CR Image Storage, MONOCHROME1; DX: DX For Presentation; OT: Multi-frame Grayscale
  Word Secondary Capture (NumberOfFrames, FrameTime); SR: Basic Text SR with no pixel data.
- Matching tests: "Doe^John" vs "DOE^JANE" differ in case; studies 2/1 are a prior/current pair;
  studies 5 and 6 mix modalities (CT+SR, CT+PT) for ModalitiesInStudy.
- UIDs are hand-built under ``UID_ROOT``: study ``<root>1.<study>``, series ``<root>2.<study>.<series>``,
  instance ``<root>3.<study>.<series>.<instance>``, frame of reference ``<root>4.<study>.<n>``.

``DEMO_STUDIES`` (computed lazily from ``generate_demo_datasets()``) summarises each study as a dict;
``summarize_studies`` does the same for any scale.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import UID, ExplicitVRLittleEndian, RLELossless

from gateway.demo_phantoms import (
    _cine,
    _cr_chest,
    _ct_abdomen_hu,
    _ct_chest_hu,
    _ct_stored,
    _ct_topogram,
    _dx_knee,
    _mr_brain,
    _pet,
)

UID_ROOT = "1.2.826.0.1.3680043.10.1082."

CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"
MR_IMAGE = "1.2.840.10008.5.1.4.1.1.4"
CR_IMAGE = "1.2.840.10008.5.1.4.1.1.1"
DX_PRESENTATION = "1.2.840.10008.5.1.4.1.1.1.1"
PET_IMAGE = "1.2.840.10008.5.1.4.1.1.128"
MF_WORD_SC = "1.2.840.10008.5.1.4.1.1.7.3"
BASIC_TEXT_SR = "1.2.840.10008.5.1.4.1.1.88.11"

__all__ = [
    "DEMO_STUDIES",
    "UID_ROOT",
    "DemoScale",
    "generate_demo_datasets",
    "summarize_studies",
    "write_demo_files",
]


@dataclass(frozen=True)
class DemoScale:
    """Sizes of the generated objects; the defaults keep the whole set at a few MB."""

    ct_slices: int = 24
    ct_size: int = 128
    mr_slices: int = 16
    mr_size: int = 128
    mf_frames: int = 12
    mf_size: int = 96


# ---------------------------------------------------------------------------------------------
# Dataset assembly.


@dataclass(frozen=True)
class _Patient:
    name: str
    patient_id: str
    birth_date: str
    sex: str
    charset: str | list[str] | None = None


@dataclass(frozen=True)
class _Study:
    number: int
    patient: _Patient
    date: str
    time: str
    description: str
    accession: str
    study_id: str
    referring: str

    @property
    def uid(self) -> str:
        return f"{UID_ROOT}1.{self.number}"

    def frame_of_reference(self, n: int = 1) -> str:
        return f"{UID_ROOT}4.{self.number}.{n}"


@dataclass(frozen=True)
class _Series:
    study: _Study
    number: int
    modality: str
    description: str
    minutes: int = 0
    body_part: str = ""

    @property
    def uid(self) -> str:
        return f"{UID_ROOT}2.{self.study.number}.{self.number}"

    def instance_uid(self, instance: int) -> str:
        return f"{UID_ROOT}3.{self.study.number}.{self.number}.{instance}"

    def time(self, seconds: int = 0) -> str:
        start = datetime.strptime(self.study.time[:6], "%H%M%S")
        return (start + timedelta(minutes=self.minutes, seconds=seconds)).strftime("%H%M%S")


_JOHN = _Patient("Doe^John", "DGW0001", "19610412", "M")
_JANE = _Patient("DOE^JANE", "DGW0002", "19780930", "F")
_ANNA = _Patient("Smith^Anna", "DGW0003", "19900105", "F", "ISO_IR 100")
_JUERGEN = _Patient("Müller^Jürgen", "DGW0004", "19550723", "M", "ISO_IR 100")
_SOEREN = _Patient("Østergård^Søren", "DGW0005", "19831201", "M", "ISO_IR 192")
_TAROU = _Patient("Yamada^Tarou=山田^太郎=やまだ^たろう", "DGW0006", "19700214", "M", ["", "ISO 2022 IR 87"])

_EQUIPMENT = {
    "CT": ("DGW Demo Medical", "Phantom CT 64", "CTSCAN01"),
    "MR": ("DGW Demo Medical", "Phantom MR 1.5T", "MRSCAN01"),
    "PT": ("DGW Demo Medical", "Phantom PET/CT", "PETCT01"),
    "CR": ("DGW Demo Imaging", "Phantom CR Reader", "CRREADER1"),
    "DX": ("DGW Demo Imaging", "Phantom DR", "DXROOM2"),
    "OT": ("DGW Demo Software", "Phantom Capture", "WSD01"),
    "SR": ("DGW Demo Software", "Phantom Reporting", "REPORT01"),
}


def _age(birth: str, on: str) -> str:
    b, d = (
        date.fromisoformat(f"{birth[:4]}-{birth[4:6]}-{birth[6:]}"),
        date.fromisoformat(f"{on[:4]}-{on[4:6]}-{on[6:]}"),
    )
    years = d.year - b.year - ((d.month, d.day) < (b.month, b.day))
    return f"{years:03d}Y"


def _base(series: _Series, sop_class: str, instance: int, seconds: int = 0) -> Dataset:
    study, patient = series.study, series.study.patient
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = UID(sop_class)
    ds.file_meta.MediaStorageSOPInstanceUID = UID(series.instance_uid(instance))
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    if patient.charset is not None:
        ds.SpecificCharacterSet = patient.charset
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = series.instance_uid(instance)
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = study.date
    ds.StudyTime = study.time
    ds.SeriesTime = series.time()
    ds.ContentTime = series.time(seconds)
    ds.AccessionNumber = study.accession
    ds.Modality = series.modality
    manufacturer, model, station = _EQUIPMENT[series.modality]
    ds.Manufacturer = manufacturer
    ds.InstitutionName = "Demo General Hospital"
    ds.ReferringPhysicianName = study.referring
    ds.StationName = station
    ds.StudyDescription = study.description
    ds.SeriesDescription = series.description
    ds.ManufacturerModelName = model
    ds.PatientName = patient.name
    ds.PatientID = patient.patient_id
    ds.IssuerOfPatientID = "DGW"
    ds.PatientBirthDate = patient.birth_date
    ds.PatientSex = patient.sex
    ds.PatientAge = _age(patient.birth_date, study.date)
    if series.body_part:
        ds.BodyPartExamined = series.body_part
    ds.SoftwareVersions = "dicomweb-gateway demo 1"
    ds.StudyInstanceUID = study.uid
    ds.SeriesInstanceUID = series.uid
    ds.StudyID = study.study_id
    ds.SeriesNumber = series.number
    ds.InstanceNumber = instance
    return ds


def _image(
    ds: Dataset, pixels: np.ndarray, photometric: str, bits_stored: int, window: tuple[float, float]
) -> Dataset:
    ds.set_pixel_data(pixels, photometric, bits_stored, generate_instance_uid=False)
    ds.WindowCenter, ds.WindowWidth = window
    return ds


def _axial(ds: Dataset, size: int, fov_mm: float, z_mm: float, thickness: float) -> None:
    """Patient-based geometry for an axial slice (PS3.3 C.7.6.2), head-first supine."""
    spacing = fov_mm / size
    ds.PatientPosition = "HFS"
    ds.SliceThickness = thickness
    corner = round(-fov_mm / 2 + spacing / 2, 4)
    ds.ImagePositionPatient = [corner, corner, round(z_mm, 4)]
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.SliceLocation = round(z_mm, 4)
    ds.PixelSpacing = [round(spacing, 6), round(spacing, 6)]


def _ct_series(
    series: _Series, hu: Callable[[float, int], np.ndarray], slices: int, size: int, span_mm: float, z0: float
) -> list[Dataset]:
    thickness = round(span_mm / slices, 3)
    out = []
    for i in range(slices):
        ds = _base(series, CT_IMAGE, i + 1, seconds=i)
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.AcquisitionNumber = 1
        ds.KVP = 120
        ds.ConvolutionKernel = "B30f"
        ds.FrameOfReferenceUID = series.study.frame_of_reference()
        ds.PositionReferenceIndicator = ""
        _axial(ds, size, 350.0, z0 - i * thickness, thickness)
        ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = -1024, 1, "HU"
        out.append(_image(ds, _ct_stored(hu(i / max(slices - 1, 1), i)), "MONOCHROME2", 16, (40, 400)))
    return out


def _study_ct_current(scale: DemoScale) -> list[Dataset]:
    study = _Study(
        1, _JOHN, "20230314", "101530", "CT CHEST W/O CONTRAST", "A2303140011", "CT1401", "House^Gregory^^Dr."
    )
    topo = _Series(study, 1, "CT", "Topogram 0.6 T20f", 0, "CHEST")
    ds = _base(topo, CT_IMAGE, 1)
    ds.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
    ds.FrameOfReferenceUID = study.frame_of_reference()
    ds.PositionReferenceIndicator = ""
    span = 1.7 * 300.0
    ds.PatientPosition = "HFS"
    ds.ImagePositionPatient = [-175.0, 0.0, 0.35 * 300.0]
    ds.ImageOrientationPatient = [1, 0, 0, 0, 0, -1]
    ds.PixelSpacing = [round(span / scale.ct_size, 6), round(350.0 / scale.ct_size, 6)]
    ds.SliceThickness = 0.6
    ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = -1024, 1, "HU"
    series = [_image(ds, _ct_topogram(scale.ct_size), "MONOCHROME2", 16, (300, 2000))]
    axial = _Series(study, 2, "CT", "Thorax 2.5mm B30f", 2, "CHEST")
    series += _ct_series(
        axial,
        lambda z, i: _ct_chest_hu(scale.ct_size, z, 100 + i),
        scale.ct_slices,
        scale.ct_size,
        300.0,
        0.0,
    )
    return series


def _study_ct_prior(scale: DemoScale) -> list[Dataset]:
    study = _Study(2, _JOHN, "20210210", "083000", "CT CHEST", "A2102100007", "CT0210", "House^Gregory^^Dr.")
    axial = _Series(study, 2, "CT", "Thorax 5mm B30f", 1, "CHEST")
    slices = max(scale.ct_slices // 2, 1)
    return _ct_series(
        axial, lambda z, i: _ct_chest_hu(scale.ct_size, z, 200 + i), slices, scale.ct_size, 300.0, 0.0
    )


def _study_mr_brain(scale: DemoScale) -> list[Dataset]:
    study = _Study(3, _JANE, "20220621", "142233.5", "MR BRAIN", "A2206210031", "MR0621", "Grey^Meredith")
    out = []
    protocols = (
        (1, "Ax T1 SE", "T1", "SE", 12.0, 500.0, 1, 0),
        (2, "Ax T2 TSE", "T2", "SE", 100.0, 4000.0, 15, 4),
    )
    for number, description, weighting, sequence, te, tr, etl, minutes in protocols:
        series = _Series(study, number, "MR", description, minutes, "HEAD")
        for i in range(scale.mr_slices):
            ds = _base(series, MR_IMAGE, i + 1, seconds=3 * i)
            ds.ImageType = ["ORIGINAL", "PRIMARY", "M", "ND"]
            ds.ScanningSequence = sequence
            ds.SequenceVariant = "SK"
            ds.ScanOptions = "" if weighting == "T1" else "FS"
            ds.MRAcquisitionType = "2D"
            ds.EchoTime, ds.RepetitionTime, ds.EchoTrainLength = te, tr, etl
            ds.MagneticFieldStrength, ds.ImagingFrequency = 1.5, 63.87
            ds.ProtocolName = f"BRAIN {weighting}"
            ds.FrameOfReferenceUID = study.frame_of_reference()
            ds.PositionReferenceIndicator = ""
            _axial(ds, scale.mr_size, 230.0, -40.0 + 6.0 * i, 5.0)
            ds.SpacingBetweenSlices = 6.0
            z = i / max(scale.mr_slices - 1, 1)
            window = (600, 1000) if weighting == "T1" else (800, 1600)
            ds = _image(
                ds, _mr_brain(scale.mr_size, z, weighting, 300 + 40 * number + i), "MONOCHROME2", 12, window
            )
            if weighting == "T2":
                ds.compress(RLELossless, generate_instance_uid=False)
            out.append(ds)
    return out


def _study_cr(scale: DemoScale) -> list[Dataset]:
    study = _Study(4, _ANNA, "20191108", "091205", "CR CHEST 2 VIEWS", "A1911080004", "CR1108", "")
    series = _Series(study, 1, "CR", "Chest PA+LAT", 0, "CHEST")
    size = 2 * scale.ct_size
    out = []
    for i, view in enumerate(("PA", "LL")):
        ds = _base(series, CR_IMAGE, i + 1, seconds=60 * i)
        ds.ImageType = ["ORIGINAL", "PRIMARY"]
        ds.ViewPosition = view
        ds.PatientOrientation = ["L", "F"] if view == "PA" else ["A", "F"]
        ds.ImagerPixelSpacing = [round(430.0 / size, 6)] * 2
        ds.KVP = 125 if view == "PA" else 110
        out.append(_image(ds, _cr_chest(size, view == "LL", 400 + i), "MONOCHROME1", 12, (2400, 3600)))
    return out


def _study_ct_sr(scale: DemoScale) -> list[Dataset]:
    study = _Study(
        5, _ANNA, "20240115", "163045", "CT ABDOMEN W CONTRAST", "A2401150102", "CT0115", "Shepherd^Derek"
    )
    slices = max(scale.ct_slices // 2, 1)
    axial = _Series(study, 2, "CT", "Abdomen 5mm portal venous", 1, "ABDOMEN")
    out = _ct_series(
        axial, lambda z, i: _ct_abdomen_hu(scale.ct_size, z, 500 + i), slices, scale.ct_size, 240.0, -320.0
    )
    report = _Series(study, 900, "SR", "Radiology report", 40)
    ds = _base(report, BASIC_TEXT_SR, 1)
    ds.ValueType = "CONTAINER"
    ds.ConceptNameCodeSequence = Sequence([_code("18748-4", "LN", "Diagnostic Imaging Report")])
    ds.ContinuityOfContent = "SEPARATE"
    ds.CompletionFlag, ds.VerificationFlag = "COMPLETE", "UNVERIFIED"
    ds.PerformedProcedureCodeSequence = Sequence([])
    ds.ReferencedPerformedProcedureStepSequence = Sequence([])
    findings = Dataset()
    findings.RelationshipType, findings.ValueType = "CONTAINS", "TEXT"
    findings.ConceptNameCodeSequence = Sequence([_code("121071", "DCM", "Finding")])
    findings.TextValue = "Liver, spleen and kidneys unremarkable. No free fluid."
    ds.ContentSequence = Sequence([findings])
    ds.InstanceCreationDate, ds.InstanceCreationTime = study.date, report.time()
    return [*out, ds]


def _code(value: str, scheme: str, meaning: str) -> Dataset:
    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = value, scheme, meaning
    return item


def _study_pet_ct(scale: DemoScale) -> list[Dataset]:
    study = _Study(
        6, _JUERGEN, "20200902", "073512", "PET/CT Ganzkörper", "A2009020019", "PT0902", "Schröder^Käthe"
    )
    slices = max(scale.ct_slices // 2, 1)
    ct = _Series(study, 2, "CT", "CT Schwächungskorrektur", 1, "CHEST")
    out = _ct_series(
        ct, lambda z, i: _ct_chest_hu(scale.ct_size, z, 600 + i, noise=30), slices, scale.ct_size, 300.0, 0.0
    )
    pet = _Series(study, 3, "PT", "PET AC Ganzkörper", 4, "CHEST")
    size = max(scale.ct_size // 2, 8)
    thickness = round(300.0 / slices, 3)
    for i in range(slices):
        ds = _base(pet, PET_IMAGE, i + 1, seconds=10 * i)
        ds.ImageType = ["ORIGINAL", "PRIMARY"]
        ds.SeriesType = ["STATIC", "IMAGE"]
        ds.Units, ds.CountsSource, ds.DecayCorrection = "BQML", "EMISSION", "START"
        ds.CorrectedImage = ["ATTN", "DECY", "NORM"]
        ds.NumberOfSlices = slices
        ds.ImageIndex = i + 1
        ds.FrameOfReferenceUID = study.frame_of_reference()
        ds.PositionReferenceIndicator = ""
        _axial(ds, size, 350.0, -i * thickness, thickness)
        ds.RescaleIntercept, ds.RescaleSlope = 0, 10
        radio = Dataset()
        radio.Radiopharmaceutical = "Fluorodeoxyglucose F^18^"
        radio.RadionuclideTotalDose = 250000000
        radio.RadionuclideHalfLife = 6586.2
        ds.RadiopharmaceuticalInformationSequence = Sequence([radio])
        z = i / max(slices - 1, 1)
        out.append(_image(ds, _pet(size, z, 700 + i), "MONOCHROME2", 16, (5000, 10000)))
    return out


def _study_cine(scale: DemoScale) -> list[Dataset]:
    study = _Study(
        7, _SOEREN, "20240527", "110003", "Hjerte cine (sekundær)", "A2405270008", "OT0527", "Ærø^Åse"
    )
    series = _Series(study, 1, "OT", "Cine kortakse", 0, "HEART")
    ds = _base(series, MF_WORD_SC, 1)
    ds.ImageType = ["DERIVED", "SECONDARY"]
    ds.ConversionType = "WSD"
    ds.FrameTime = 40.0
    ds.FrameIncrementPointer = 0x00181063  # -> FrameTime
    ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = 0, 1, "US"
    ds.PixelSpacing = [1.5, 1.5]
    return [_image(ds, _cine(scale.mf_size, scale.mf_frames), "MONOCHROME2", 12, (1000, 2000))]


def _study_dx(scale: DemoScale) -> list[Dataset]:
    study = _Study(
        8,
        _TAROU,
        "20231005",
        "152140",
        "膝 X線",
        "A2310050055",
        "DX1005",
        "Sato^Hanako=佐藤^花子=さとう^はなこ",
    )
    size = 2 * scale.ct_size
    out = []
    for number, view, lateral in ((1, "AP", False), (2, "LAT", True)):
        series = _Series(study, number, "DX", f"Knee {view}", number - 1, "KNEE")
        ds = _base(series, DX_PRESENTATION, 1)
        ds.ImageType = ["ORIGINAL", "PRIMARY"]
        ds.PresentationIntentType = "FOR PRESENTATION"
        ds.ViewPosition = view
        ds.Laterality = ds.ImageLaterality = "R"
        ds.PatientOrientation = ["L", "F"] if not lateral else ["A", "F"]
        ds.DetectorType = "SCINTILLATOR"
        ds.ImagerPixelSpacing = [round(250.0 / size, 6)] * 2
        ds.PixelIntensityRelationship, ds.PixelIntensityRelationshipSign = "LIN", 1
        ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = 0, 1, "US"
        ds.KVP = 65
        out.append(_image(ds, _dx_knee(size, lateral, 800 + number), "MONOCHROME2", 12, (1800, 3000)))
    return out


_STUDIES: tuple[Callable[[DemoScale], list[Dataset]], ...] = (
    _study_ct_current,
    _study_ct_prior,
    _study_mr_brain,
    _study_cr,
    _study_ct_sr,
    _study_pet_ct,
    _study_cine,
    _study_dx,
)


def generate_demo_datasets(scale: DemoScale = DemoScale()) -> list[Dataset]:
    """All demo instances, in study/series/instance order, each ready to write as Part 10."""
    return [ds for build in _STUDIES for ds in build(scale)]


def _filename(ds: Dataset) -> str:
    study, series, instance = ds.SOPInstanceUID[len(UID_ROOT) + 2 :].split(".")
    return f"s{int(study):02d}_se{int(series):03d}_{ds.Modality.lower()}_{int(instance):04d}.dcm"


def write_demo_files(directory: Path, scale: DemoScale = DemoScale()) -> list[Path]:
    """Write one Part 10 file per demo instance into ``directory`` (created if needed)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for ds in generate_demo_datasets(scale):
        path = directory / _filename(ds)
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def summarize_studies(datasets: Iterable[Dataset]) -> list[dict[str, Any]]:
    """One dict per study (in first-seen order) with its patient, UIDs, modalities and counts."""
    studies: dict[str, dict[str, Any]] = {}
    for ds in datasets:
        study = studies.setdefault(
            ds.StudyInstanceUID,
            {
                "patient_name": str(ds.PatientName),
                "patient_id": ds.PatientID,
                "specific_character_set": ds.get("SpecificCharacterSet"),
                "study_uid": ds.StudyInstanceUID,
                "study_date": ds.StudyDate,
                "study_time": ds.StudyTime,
                "study_description": ds.StudyDescription,
                "accession_number": ds.AccessionNumber,
                "modalities": [],
                "num_series": 0,
                "num_instances": 0,
                "series": {},
            },
        )
        series = study["series"].setdefault(
            ds.SeriesInstanceUID,
            {
                "series_uid": ds.SeriesInstanceUID,
                "series_number": int(ds.SeriesNumber),
                "modality": ds.Modality,
                "series_description": ds.SeriesDescription,
                "sop_class_uid": ds.SOPClassUID,
                "transfer_syntax_uid": ds.file_meta.TransferSyntaxUID,
                "num_instances": 0,
                "sop_instance_uids": [],
            },
        )
        series["num_instances"] += 1
        series["sop_instance_uids"].append(ds.SOPInstanceUID)
        study["num_instances"] += 1
    for study in studies.values():
        study["series"] = list(study["series"].values())
        study["num_series"] = len(study["series"])
        study["modalities"] = sorted({s["modality"] for s in study["series"]})
    return list(studies.values())


# Declared, not assigned: module __getattr__ computes it on first access (importing stays cheap).
DEMO_STUDIES: list[dict[str, Any]]


@functools.cache
def _default_summary() -> list[dict[str, Any]]:
    return summarize_studies(generate_demo_datasets())


def __getattr__(name: str) -> Any:
    if name == "DEMO_STUDIES":
        return _default_summary()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
