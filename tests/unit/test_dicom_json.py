"""Tests for translators.dicom_json (PS3.18 Annex F)."""

from __future__ import annotations

import base64
import io
import json
import math
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydicom import Dataset, config, dcmread, dcmwrite
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.filebase import DicomBytesIO
from pydicom.filereader import read_dataset
from pydicom.filewriter import write_dataset
from pydicom.sequence import Sequence
from pydicom.tag import BaseTag
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian, JPEGBaseline8Bit
from pynetdicom.dsutils import decode as dimse_decode
from pynetdicom.dsutils import encode as dimse_encode

from translators.dicom_json import (
    dataset_to_json,
    datasets_to_json_bytes,
    decode_text_value,
    json_bytes,
)


@pytest.fixture(autouse=True)
def _pydicom_warns() -> Iterator[None]:
    """These tests expect pydicom's default WARN validation; the gateway package sets IGNORE globally."""
    old = config.settings.reading_validation_mode
    config.settings.reading_validation_mode = config.WARN
    yield
    config.settings.reading_validation_mode = old


GOLDEN = Path(__file__).parent.parent / "data" / "dicom_json_golden.json"
JAPANESE_PN = "Yamada^Tarou=山田^太郎=やまだ^たろう"


def _uri(path: tuple[int, ...], elem: DataElement) -> str | None:
    """Bulk data callback used by the golden test: tags in hex, item indexes in decimal."""
    if elem.tag == 0x00281203:
        return None  # large, but no URI: inlined anyway
    parts = [f"{p:08X}" if i % 2 == 0 else str(p) for i, p in enumerate(path)]
    return "https://gw.example/bulk/" + "/".join(parts)


def _golden_dataset() -> Dataset:
    ds = Dataset()
    ds.add_new(0x00080000, "UL", 1234)  # group length: never encoded
    ds.add_new(0x00020010, "UI", ExplicitVRLittleEndian)  # file meta in the dataset: excluded
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.ImageType = ["ORIGINAL", "", "AXIAL"]
    ds.InstanceCreationDate = "20240131"
    ds.InstanceCreationTime = "101500.123"
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    ds.StudyDate = ""
    ds.AcquisitionDateTime = "20240131101500.123+0100"
    ds.RetrieveAETitle = "PACS"
    ds.Modality = "CT"
    ds.InstitutionName = "Klinikum Süd"
    ds.InstitutionAddress = "Hauptstraße 1\\80331 München"  # ST: one value, backslash kept
    ds.ReferringPhysicianName = ""
    ds.LongCodeValue = "A-LONG-CODE-VALUE-0123456789"
    ds.CodingSchemeURL = "http://snomed.info/sct"
    ds.ExtendedCodeMeaning = "Long text"
    ds.StudyDescription = "CT Thorax"
    inner = Dataset()
    inner.CodeValue = "T-D3000"
    inner.CodingSchemeDesignator = "SRT"
    inner.CodeMeaning = "Chest"
    item = Dataset()
    item.CodeValue = "CTCHEST"
    item.CodingSchemeDesignator = "99LOCAL"
    item.EquivalentCodeSequence = Sequence([inner, Dataset()])
    item.add_new(0x00660016, "OF", b"\x00\x00\x80\x3f" * 8)  # 32 bytes in an item -> BulkDataURI
    ds.ProcedureCodeSequence = Sequence([item, Dataset()])
    ds.ReferencedSeriesSequence = Sequence([])
    block = ds.private_block(0x0009, "ACME 1.0", create=True)
    block.add_new(0x01, "LO", "secret")
    block.add_new(0x02, "UN", b"\x01\x02\x03\x04")
    ds.PatientName = JAPANESE_PN
    ds.OtherPatientNames = ["Doe^John", "", "=Doe^Jane"]
    ds.PatientBirthName = "Smith^Ann==Smith"
    ds.PatientAge = "054Y"
    ds.StrainAdditionalInformation = "UT text"
    ds.SliceThickness = "1.250"
    ds.SpacingBetweenSlices = "5"
    ds.PixelSpacing = ["0.5", "", "-2E-3"]
    ds.ExaminedBodyThickness = 12.5  # FL
    ds.TimeRange = [0.25, -1.0]  # FD
    ds.ReferencePixelX0 = -7  # SL
    ds.TagAngleSecondAxis = -3  # SS
    ds.SimpleFrameList = [1, 4294967295]  # UL
    ds.SelectorSVValue = [-(2**63), 5]  # SV
    ds.FileOffsetInContainer = 2**64 - 1  # UV
    ds.InstanceNumber = "7"
    ds.DimensionIndexPointer = [0x00181063, 0x00209157]
    ds.FrameIncrementPointer = 0x00181063
    ds.Rows = 2
    ds.Columns = 2
    ds.BitsAllocated = 16
    ds.PixelRepresentation = 1
    ds.add_new(0x00280106, "US or SS", -12)  # SmallestImagePixelValue: SS (signed pixels)
    ds.RedPaletteColorLookupTableData = b"\x00\x01\x02\x03"  # OW, small: inline
    ds.GreenPaletteColorLookupTableData = b"\x00\x01" * 12  # OW, large: BulkDataURI
    ds.BluePaletteColorLookupTableData = b"\x02\x03" * 12  # OW, large, callback says None
    ds.add_new(0x0042_0011, "OB", b"%PDF")  # EncapsulatedDocument
    ds.add_new(0x0066_0022, "OD", b"\x00" * 7 + b"\x40")  # DoublePointCoordinatesData, 2.0
    ds.add_new(0x0066_0040, "OL", b"\x01\x00\x00\x00")  # LongPrimitivePointIndexList
    ds.add_new(0x7FE0_0001, "OV", b"")  # ExtendedOffsetTable, empty
    ds.add_new(0x7FE0_0010, "OW", b"\x00\x00" * 4)  # PixelData, small but never inlined
    return ds


def _golden_json() -> dict[str, Any]:
    return dataset_to_json(_golden_dataset(), bulk_data_uri=_uri, inline_threshold=16)


def _ordered_keys(data: bytes) -> list[list[str]]:
    """Every object's keys in document order."""
    found: list[list[str]] = []

    def hook(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        found.append([k for k, _ in pairs])
        return dict(pairs)

    json.loads(data, object_pairs_hook=hook)
    return found


def _raw(tag: int, vr: str, value: bytes) -> RawDataElement:
    """An explicit VR little endian element as pydicom's reader leaves it."""
    return RawDataElement(BaseTag(tag), vr, len(value), value, 0, False, True)


def _put(ds: Dataset, raw: RawDataElement) -> None:
    ds[raw.tag] = raw


def _write(ds: Dataset, *, implicit: bool) -> bytes:
    fp = DicomBytesIO()
    fp.is_little_endian = True
    fp.is_implicit_VR = implicit
    write_dataset(fp, ds)
    return fp.getvalue()


def _read(data: bytes, *, implicit: bool) -> Dataset:
    return read_dataset(io.BytesIO(data), implicit, True)


def _convert_all(ds: Dataset) -> None:
    """Force pydicom to convert every raw element (recursively), as other code might."""
    for elem in ds:
        if elem.VR == "SQ":
            for item in elem.value:
                _convert_all(item)


# ---------------------------------------------------------------------------------------------
# Golden file and structure


def test_golden_file() -> None:
    assert _golden_json() == json.loads(GOLDEN.read_text(encoding="utf-8"))


def test_keys_are_sorted_uppercase_hex_and_vr_comes_first() -> None:
    data = datasets_to_json_bytes([_golden_dataset()], bulk_data_uri=_uri, inline_threshold=16)
    objects = _ordered_keys(data)
    assert len(objects) > 50
    for keys in objects:
        if "vr" in keys:  # attribute object
            assert keys[0] == "vr"
            assert len({"Value", "BulkDataURI", "InlineBinary"} & set(keys)) <= 1
        elif keys and set(keys) <= {"Alphabetic", "Ideographic", "Phonetic"}:  # PN value
            assert list(keys) == [k for k in ("Alphabetic", "Ideographic", "Phonetic") if k in keys]
        else:  # dataset object, possibly an empty item
            assert all(re.fullmatch("[0-9A-F]{8}", k) for k in keys)
            assert keys == sorted(keys)


def test_key_order_follows_tags_not_insertion() -> None:
    ds = Dataset()
    ds.PatientID = "1"
    ds.StudyInstanceUID = "1.2"
    ds.AccessionNumber = "A"
    ds.add_new(0x00090010, "LO", "X")
    assert list(dataset_to_json(ds)) == ["00080050", "00090010", "00100020", "0020000D"]


def test_group_length_and_file_meta_excluded_by_default() -> None:
    got = _golden_json()
    assert "00080000" not in got
    assert "00020010" not in got
    with_meta = dataset_to_json(_golden_dataset(), exclude_group_0002=False)
    assert with_meta["00020010"] == {"vr": "UI", "Value": [ExplicitVRLittleEndian]}
    assert "00080000" not in with_meta


def test_file_meta_of_a_file_dataset_is_not_encoded() -> None:
    ds = _study(1)
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = UID("1.2.3")
    ds.file_meta.MediaStorageSOPInstanceUID = UID("1.2.3.4")
    buffer = io.BytesIO()
    dcmwrite(buffer, ds, enforce_file_format=True)
    read = dcmread(io.BytesIO(buffer.getvalue()), force=True)
    assert not [k for k in dataset_to_json(read) if k.startswith("0002")]


def test_datasets_to_json_bytes_is_one_array() -> None:
    data = datasets_to_json_bytes([_study(1), _study(2)])
    decoded = json.loads(data)
    assert isinstance(decoded, list) and len(decoded) == 2
    assert decoded[1]["00100020"] == {"vr": "LO", "Value": ["P2"]}
    assert datasets_to_json_bytes([]) == b"[]"


def test_json_bytes_serialises_built_objects() -> None:
    objs = [dataset_to_json(_study(1))]
    assert json_bytes(objs) == datasets_to_json_bytes([_study(1)])
    assert json_bytes([]) == b"[]"


# ---------------------------------------------------------------------------------------------
# Values


def test_empty_values_in_multi_values_are_null() -> None:
    got = _golden_json()
    assert got["00080008"] == {"vr": "CS", "Value": ["ORIGINAL", None, "AXIAL"]}
    assert got["00280030"] == {"vr": "DS", "Value": [0.5, None, -0.002]}
    assert got["00101001"]["Value"][1] is None


def test_empty_elements_have_only_vr() -> None:
    got = _golden_json()
    assert got["00080020"] == {"vr": "DA"}
    assert got["00080090"] == {"vr": "PN"}
    assert got["00081115"] == {"vr": "SQ"}
    assert got["7FE00001"] == {"vr": "OV"}


def test_person_names() -> None:
    got = _golden_json()
    assert got["00100010"] == {
        "vr": "PN",
        "Value": [{"Alphabetic": "Yamada^Tarou", "Ideographic": "山田^太郎", "Phonetic": "やまだ^たろう"}],
    }
    assert got["00101001"] == {
        "vr": "PN",
        "Value": [{"Alphabetic": "Doe^John"}, None, {"Ideographic": "Doe^Jane"}],
    }
    assert got["00101005"] == {"vr": "PN", "Value": [{"Alphabetic": "Smith^Ann", "Phonetic": "Smith"}]}


def test_multi_valued_pn_with_empty_value_where_pydicom_fails() -> None:
    ds = Dataset()
    ds.OtherPatientNames = ["A^B", ""]
    with pytest.raises(IndexError):
        ds.to_json_dict()  # the pydicom 3.0.2 bug this encoder works around
    assert dataset_to_json(ds)["00101001"] == {"vr": "PN", "Value": [{"Alphabetic": "A^B"}, None]}


def test_attribute_tags_are_hex_strings() -> None:
    got = _golden_json()
    assert got["00209165"] == {"vr": "AT", "Value": ["00181063", "00209157"]}
    assert got["00280009"] == {"vr": "AT", "Value": ["00181063"]}


def test_numbers() -> None:
    got = _golden_json()
    assert got["00180050"] == {"vr": "DS", "Value": [1.25]}
    assert got["00180088"] == {"vr": "DS", "Value": [5]}
    assert isinstance(got["00180088"]["Value"][0], int)
    assert got["00200013"] == {"vr": "IS", "Value": [7]}
    assert got["00109431"] == {"vr": "FL", "Value": [12.5]}
    assert got["00081163"] == {"vr": "FD", "Value": [0.25, -1.0]}
    assert got["00720082"] == {"vr": "SV", "Value": [-(2**63), 5]}
    assert got["0008040C"] == {"vr": "UV", "Value": [2**64 - 1]}
    assert b'"Value":[18446744073709551615]' in datasets_to_json_bytes([_golden_dataset()])


def test_invalid_ds_and_is_values_are_kept_as_strings() -> None:
    ds = Dataset()
    values = {
        0x00181050: ("DS", b"abc\\1 "),
        0x00181051: ("DS", b"1e999"),
        0x00181052: ("DS", b"nan "),
        0x00200012: ("IS", b"1.5 "),
        0x00200013: ("IS", b"2.0\\\\x"),
    }
    for tag, (vr, raw) in values.items():
        _put(ds, _raw(tag, vr, raw))
    expected = {
        "00181050": {"vr": "DS", "Value": ["abc", 1]},
        "00181051": {"vr": "DS", "Value": ["1e999"]},
        "00181052": {"vr": "DS", "Value": ["nan"]},
        "00200012": {"vr": "IS", "Value": ["1.5"]},
        "00200013": {"vr": "IS", "Value": [2, None, "x"]},
    }
    assert dataset_to_json(ds) == expected
    with pytest.warns(UserWarning):  # pydicom warns while converting the invalid values
        _convert_all(ds)
    assert dataset_to_json(ds) == expected


def test_ambiguous_vrs_are_resolved_without_touching_the_dataset() -> None:
    ds = _golden_dataset()
    assert _golden_json()["00280106"] == {"vr": "SS", "Value": [-12]}
    assert ds[0x00280106].VR == "US or SS"
    ds.PixelRepresentation = 0
    ds[0x00280106].value = 12
    assert dataset_to_json(ds)["00280106"] == {"vr": "US", "Value": [12]}


def test_ambiguous_vrs_without_context_fall_back_sensibly() -> None:
    ds = Dataset()
    ds.add_new(0x7FE00010, "OB or OW", b"\x01\x02")  # no BitsAllocated: pydicom cannot decide
    ds.add_new(0x00283006, "US or OW", [1, 2])  # LUTData without LUTDescriptor
    ds.add_new(0x00280106, "US or SS", 3)
    got = dataset_to_json(ds, omit_pixel_data_without_uri=False)
    assert got["7FE00010"] == {"vr": "OW", "InlineBinary": "AQI="}
    assert got["00283006"] == {"vr": "US", "Value": [1, 2]}
    assert got["00280106"] == {"vr": "US", "Value": [3]}


def test_implicit_vr_ambiguous_elements_from_bytes() -> None:
    ds = Dataset()
    ds.PixelRepresentation = 1
    ds.BitsAllocated = 16
    ds.add_new(0x00280106, "SS", -2)
    ds.add_new(0x7FE00010, "OW", b"\x01\x00\x02\x00")
    read = _read(_write(ds, implicit=True), implicit=True)
    got = dataset_to_json(read, omit_pixel_data_without_uri=False)
    assert got["00280106"] == {"vr": "SS", "Value": [-2]}
    assert got["7FE00010"] == {"vr": "OW", "InlineBinary": "AQACAA=="}


def test_private_elements_are_kept_with_their_creator() -> None:
    got = _golden_json()
    assert got["00090010"] == {"vr": "LO", "Value": ["ACME 1.0"]}
    assert got["00091001"] == {"vr": "LO", "Value": ["secret"]}
    assert got["00091002"] == {"vr": "UN", "InlineBinary": "AQIDBA=="}


def test_private_elements_read_as_implicit_vr_become_un() -> None:
    ds = Dataset()
    ds.private_block(0x0011, "NOBODY KNOWS", create=True).add_new(0x01, "LO", "x y")
    got = dataset_to_json(_read(_write(ds, implicit=True), implicit=True))
    assert got["00110010"] == {"vr": "LO", "Value": ["NOBODY KNOWS"]}
    assert got["00111001"] == {"vr": "UN", "InlineBinary": base64.b64encode(b"x y ").decode()}


def test_datetime_conversion_objects_are_dicom_strings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(config, "datetime_conversion", True)
    ds = Dataset()
    ds.StudyDate = "20240131"
    ds.StudyTime = "1015"
    ds.AcquisitionDateTime = "20240131101500"
    got = dataset_to_json(ds)
    assert got["00080020"] == {"vr": "DA", "Value": ["20240131"]}
    assert got["00080030"] == {"vr": "TM", "Value": ["1015"]}
    assert got["0008002A"] == {"vr": "DT", "Value": ["20240131101500"]}


def test_values_held_as_bytes_are_decoded_with_the_nearest_character_set() -> None:
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.add(DataElement(0x00100020, "LO", "Müller".encode("latin-1")))
    ds.add(DataElement(0x00280010, "US", b"\x02\x00\x03\x00"))
    item = Dataset()
    item.add(DataElement(0x00080104, "LO", "Jürgen".encode("latin-1")))
    ds.ProcedureCodeSequence = Sequence([item])
    got = dataset_to_json(ds)
    assert got["00100020"] == {"vr": "LO", "Value": ["Müller"]}
    assert got["00280010"] == {"vr": "US", "Value": [2, 3]}
    assert got["00081032"]["Value"][0]["00080104"] == {"vr": "LO", "Value": ["Jürgen"]}


def test_empty_non_text_elements() -> None:
    ds = Dataset()
    ds.Rows = None
    ds.TimeRange = None
    ds.PatientName = None
    ds.FrameIncrementPointer = None
    ds.InstanceNumber = None
    assert dataset_to_json(ds) == {
        "00081163": {"vr": "FD"},
        "00100010": {"vr": "PN"},
        "00200013": {"vr": "IS"},
        "00280009": {"vr": "AT"},
        "00280010": {"vr": "US"},
    }


def test_raw_elements_decoded_here_match_pydicom() -> None:
    ds = Dataset()
    _put(ds, _raw(0x00080054, "AE", b" PACS \\ARCHIVE "))
    _put(ds, _raw(0x0008010E, "UR", b"http://snomed.info/sct "))
    _put(ds, _raw(0x00080016, "UI", b"1.2.840.10008.5.1.4.1.1.2\x00"))
    _put(ds, _raw(0x00080060, "CS", b""))
    _put(ds, _raw(0x00080050, "SH", b"  "))
    _put(ds, _raw(0x00280010, "US", b""))
    _put(ds, _raw(0x00280011, "US", b"\x00\x02"))
    _put(ds, _raw(0x00081163, "FD", b"\x00\x00\x00\x00\x00\x00\xf0\x3f"))
    _put(ds, _raw(0x00100010, "PN", b"Doe^John=^\\\\=Y "))
    _put(ds, _raw(0x00200013, "IS", b" 12 "))
    expected = {
        "00080016": {"vr": "UI", "Value": ["1.2.840.10008.5.1.4.1.1.2"]},
        "00080050": {"vr": "SH"},
        "00080054": {"vr": "AE", "Value": ["PACS", "ARCHIVE"]},
        "00080060": {"vr": "CS"},
        "0008010E": {"vr": "UR", "Value": ["http://snomed.info/sct"]},
        "00081163": {"vr": "FD", "Value": [1.0]},
        "00100010": {
            "vr": "PN",
            "Value": [{"Alphabetic": "Doe^John", "Ideographic": "^"}, None, {"Ideographic": "Y"}],
        },
        "00200013": {"vr": "IS", "Value": [12]},
        "00280010": {"vr": "US"},
        "00280011": {"vr": "US", "Value": [512]},
    }
    assert dataset_to_json(ds) == expected
    assert isinstance(ds.get_item(0x00080054), RawDataElement)  # the dataset was left as it was
    _convert_all(ds)
    assert dataset_to_json(ds) == expected


def test_unknown_public_tag_in_implicit_vr_goes_through_pydicom() -> None:
    ds = Dataset()
    _put(ds, RawDataElement(BaseTag(0x00080002), None, 2, b"AB", 0, True, True))
    with pytest.warns(UserWarning, match="VR lookup failed"):
        assert dataset_to_json(ds) == {"00080002": {"vr": "UN", "InlineBinary": "QUI="}}


def test_numpy_ds_values(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(config, "use_DS_numpy", True)
    ds = Dataset()
    _put(ds, _raw(0x00280030, "DS", b"0.5\\2 "))
    _convert_all(ds)
    assert type(ds.PixelSpacing).__module__ == "numpy"
    assert dataset_to_json(ds) == {"00280030": {"vr": "DS", "Value": [0.5, 2]}}


def test_is_with_a_decimal_point_from_pydicom() -> None:
    ds = Dataset()
    _put(ds, _raw(0x00200013, "IS", b"3.0 "))
    with pytest.warns(UserWarning):
        _convert_all(ds)
    assert dataset_to_json(ds) == {"00200013": {"vr": "IS", "Value": [3]}}


def test_unconvertible_raw_element_becomes_un() -> None:
    ds = Dataset()
    _put(ds, _raw(0x00280010, "US", b"\x01\x02\x03"))
    assert dataset_to_json(ds) == {"00280010": {"vr": "UN", "InlineBinary": "AQID"}}


def test_text_is_decoded_here_when_pydicom_conversion_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    # A reading callback turns the fast path off; strict validation makes pydicom's conversion raise.
    monkeypatch.setattr(config, "data_element_callback", lambda raw, **kwargs: raw)
    monkeypatch.setattr(config.settings, "reading_validation_mode", config.RAISE)
    ds = Dataset()
    raw = "Müller^Jürgen\\=Ö".encode("latin-1") + b"\\" + b"A" * 70
    _put(ds, _raw(0x00080005, "CS", b"ISO_IR 100"))
    _put(ds, _raw(0x00101001, "PN", raw))
    _put(ds, _raw(0x00181050, "DS", b"1.5\\x\\2 "))
    _put(ds, _raw(0x00081030, "LO", b"L" * 65 + b"\\"))  # LO values have up to 64 characters
    _put(ds, _raw(0x00080050, "SH", b""))
    got = dataset_to_json(ds)
    assert got["00101001"] == {
        "vr": "PN",
        "Value": [{"Alphabetic": "Müller^Jürgen"}, {"Ideographic": "Ö"}, {"Alphabetic": "A" * 70}],
    }
    assert got["00181050"] == {"vr": "DS", "Value": [1.5, "x", 2]}
    assert got["00081030"] == {"vr": "LO", "Value": ["L" * 65, None]}
    assert got["00080050"] == {"vr": "SH"}


# ---------------------------------------------------------------------------------------------
# Binary values, bulk data and pixel data


def test_inline_binary_and_bulk_data_uri() -> None:
    got = _golden_json()
    assert got["00281201"] == {"vr": "OW", "InlineBinary": "AAECAw=="}
    assert got["00281202"] == {"vr": "OW", "BulkDataURI": "https://gw.example/bulk/00281202"}
    assert got["00281203"] == {"vr": "OW", "InlineBinary": base64.b64encode(b"\x02\x03" * 12).decode()}
    assert got["00420011"] == {"vr": "OB", "InlineBinary": "JVBERg=="}
    assert got["00660022"] == {"vr": "OD", "InlineBinary": "AAAAAAAAAEA="}
    assert got["00660040"] == {"vr": "OL", "InlineBinary": "AQAAAA=="}


def test_bulk_data_callback_receives_tag_path_and_element() -> None:
    calls: list[tuple[tuple[int, ...], int, int]] = []

    def record(path: tuple[int, ...], elem: DataElement) -> str:
        calls.append((path, int(elem.tag), len(elem.value)))
        return f"uri:{len(calls)}"

    got = dataset_to_json(_golden_dataset(), bulk_data_uri=record, inline_threshold=16)
    assert calls == [
        ((0x00081032, 0, 0x00660016), 0x00660016, 32),
        ((0x00281202,), 0x00281202, 24),
        ((0x00281203,), 0x00281203, 24),
        ((0x7FE00010,), 0x7FE00010, 8),
    ]
    assert got["00081032"]["Value"][0]["00660016"] == {"vr": "OF", "BulkDataURI": "uri:1"}
    assert got["7FE00010"] == {"vr": "OW", "BulkDataURI": "uri:4"}


def test_threshold_is_inclusive() -> None:
    ds = Dataset()
    ds.RedPaletteColorLookupTableData = b"\x00" * 16
    asked: list[tuple[int, ...]] = []

    def uri(path: tuple[int, ...], elem: DataElement) -> str:
        asked.append(path)
        return "x"

    assert "InlineBinary" in dataset_to_json(ds, bulk_data_uri=uri, inline_threshold=16)["00281201"]
    assert not asked
    ds.RedPaletteColorLookupTableData = b"\x00" * 18
    assert dataset_to_json(ds, bulk_data_uri=uri, inline_threshold=16)["00281201"]["BulkDataURI"] == "x"


@pytest.mark.parametrize("tag", [0x7FE00008, 0x7FE00009, 0x7FE00010])
def test_pixel_data_without_uri_is_omitted(tag: int) -> None:
    ds = Dataset()
    ds.Rows = 1
    ds.add_new(tag, {0x7FE00008: "OF", 0x7FE00009: "OD", 0x7FE00010: "OW"}[tag], b"\x00" * 8)
    assert dataset_to_json(ds) == {"00280010": {"vr": "US", "Value": [1]}}
    assert dataset_to_json(ds, bulk_data_uri=lambda p, e: None) == {"00280010": {"vr": "US", "Value": [1]}}
    kept = dataset_to_json(ds, omit_pixel_data_without_uri=False)
    assert kept[f"{tag:08X}"]["InlineBinary"] == "AAAAAAAAAAA="


def test_encapsulated_pixel_data() -> None:
    frames = [b"\xff\xd8frame-one\xff\xd9", b"\xff\xd8frame-two\xff\xd9"]
    ds = Dataset()
    ds.BitsAllocated = 8
    ds.add_new(0x7FE00010, "OB", encapsulate(frames))
    ds[0x7FE00010].is_undefined_length = True
    seen: list[bytes] = []

    def uri(path: tuple[int, ...], elem: DataElement) -> str:
        seen.append(elem.value)
        return "/pixeldata"

    assert dataset_to_json(ds, bulk_data_uri=uri)["7FE00010"] == {"vr": "OB", "BulkDataURI": "/pixeldata"}
    assert seen == [encapsulate(frames)]
    inline = dataset_to_json(ds, omit_pixel_data_without_uri=False)["7FE00010"]
    assert base64.b64decode(inline["InlineBinary"]) == encapsulate(frames)

    # ... and from a file, where the element is read raw and its VR is 'OB or OW' when implicit
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
    buffer = io.BytesIO()
    dcmwrite(buffer, ds)
    read = dcmread(io.BytesIO(buffer.getvalue()), force=True)
    inline = dataset_to_json(read, omit_pixel_data_without_uri=False)["7FE00010"]
    assert inline["vr"] == "OB"
    assert base64.b64decode(inline["InlineBinary"]) == encapsulate(frames)


def test_big_endian_words_are_emitted_little_endian() -> None:
    ds = Dataset()
    ds.RedPaletteColorLookupTableData = b"\x01\x02\x03\x04"
    ds.add_new(0x00660016, "OF", b"\x01\x02\x03\x04")
    ds.add_new(0x00420011, "OB", b"\x01\x02\x03\x04")
    fp = DicomBytesIO()
    fp.is_little_endian = False
    fp.is_implicit_VR = False
    write_dataset(fp, ds)
    read = read_dataset(io.BytesIO(fp.getvalue()), False, False)
    got = dataset_to_json(read)
    assert base64.b64decode(got["00281201"]["InlineBinary"]) == b"\x02\x01\x04\x03"
    assert base64.b64decode(got["00660016"]["InlineBinary"]) == b"\x04\x03\x02\x01"
    assert base64.b64decode(got["00420011"]["InlineBinary"]) == b"\x01\x02\x03\x04"


# ---------------------------------------------------------------------------------------------
# Sequences


def test_sequences_nested_two_deep_with_empty_items() -> None:
    got = _golden_json()["00081032"]
    assert got["vr"] == "SQ"
    first, second = got["Value"]
    assert second == {}
    assert first["00080100"] == {"vr": "SH", "Value": ["CTCHEST"]}
    assert first["00080121"] == {
        "vr": "SQ",
        "Value": [
            {
                "00080100": {"vr": "SH", "Value": ["T-D3000"]},
                "00080102": {"vr": "SH", "Value": ["SRT"]},
                "00080104": {"vr": "LO", "Value": ["Chest"]},
            },
            {},
        ],
    }


# ---------------------------------------------------------------------------------------------
# Character sets


def _charset_dataset(charset: str | list[str], name: str, text: str) -> Dataset:
    ds = Dataset()
    ds.SpecificCharacterSet = charset
    ds.PatientName = name
    ds.StudyDescription = text
    ds.OtherPatientNames = [name, "", name]
    item = Dataset()
    item.CodeMeaning = text  # an item inherits the character set of its parent
    item.PatientName = name
    ds.ProcedureCodeSequence = Sequence([item])
    return ds


CHARSET_CASES = [
    pytest.param("ISO_IR 100", "Müller^Jürgen", "Schädel", "Müller".encode("latin-1"), id="latin1"),
    pytest.param("ISO_IR 192", "Wang^XiaoDong=王^小東", "頭部 CT", "王".encode(), id="utf8"),
    pytest.param("GB18030", "Wang^XiaoDong=王^小东", "头部", "王".encode("gb18030"), id="gb18030"),
    pytest.param(["", "ISO 2022 IR 87"], JAPANESE_PN, "頭部", b"\x1b$B;3ED\x1b(B", id="iso2022-jp"),
    pytest.param(
        ["ISO 2022 IR 100", "ISO 2022 IR 126"], "Müller^Jürgen=Διονυσιος", "Κεφάλι", b"\x1b-F", id="greek"
    ),
]


def _expected_charset_json(name: str, text: str) -> tuple[dict[str, Any], dict[str, Any]]:
    groups = dict(zip(("Alphabetic", "Ideographic", "Phonetic"), name.split("="), strict=False))
    pn = {"vr": "PN", "Value": [groups]}
    desc = {"vr": "LO", "Value": [text]}
    return pn, desc


@pytest.mark.parametrize(("charset", "name", "text", "marker"), CHARSET_CASES)
@pytest.mark.parametrize("implicit", [True, False], ids=["implicit", "explicit"])
def test_charsets_from_bytes(
    charset: str | list[str], name: str, text: str, marker: bytes, implicit: bool
) -> None:
    original = _charset_dataset(charset, name, text)
    data = _write(original, implicit=implicit)
    assert marker in data  # really encoded in the source character set
    pn, desc = _expected_charset_json(name, text)
    for read in (_read(data, implicit=implicit), _file_roundtrip(original, implicit=implicit)):
        got = dataset_to_json(read)
        assert got["00100010"] == pn
        assert got["00081030"] == desc
        assert got["00101001"] == {"vr": "PN", "Value": [pn["Value"][0], None, pn["Value"][0]]}
        item = got["00081032"]["Value"][0]
        assert item["00080104"] == desc and item["00100010"] == pn
        assert got["00080005"] == dataset_to_json(original)["00080005"]  # source charset kept
        assert got == dataset_to_json(original)
        _convert_all(read)  # pydicom's own conversion gives the same result ...
        converted = dataset_to_json(read)
        if "ISO 2022 IR 126" in charset:
            # ... except that pydicom writes no escape back to the first character set before
            # the "\\" of a multi-valued PN and does not reset there when reading (PS3.5
            # 6.1.2.5.3 says it shall be reset): its third name decodes as Greek.
            assert converted["00101001"]["Value"][2]["Alphabetic"] != "Müller^Jürgen"
            converted["00101001"] = got["00101001"]
        assert converted == got


def _file_roundtrip(ds: Dataset, *, implicit: bool) -> Dataset:
    buffer = io.BytesIO()
    ds = ds.copy()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian if implicit else ExplicitVRLittleEndian
    dcmwrite(buffer, ds)
    return dcmread(io.BytesIO(buffer.getvalue()), force=True)


def test_iso_2022_japanese_exact_output() -> None:
    data = _write(_charset_dataset(["", "ISO 2022 IR 87"], JAPANESE_PN, "頭部"), implicit=False)
    got = datasets_to_json_bytes([_read(data, implicit=False)])
    assert "00080005" in got.decode()
    expected_pn = (
        '"00100010":{"vr":"PN","Value":[{"Alphabetic":"Yamada^Tarou",'
        '"Ideographic":"山田^太郎","Phonetic":"やまだ^たろう"}]}'
    )
    assert expected_pn in got.decode("utf-8")
    assert '"00080005":{"vr":"CS","Value":[null,"ISO 2022 IR 87"]}' in got.decode()


@pytest.mark.parametrize(("charset", "name", "text", "marker"), CHARSET_CASES)
def test_charsets_from_c_find_identifiers(
    charset: str | list[str], name: str, text: str, marker: bytes
) -> None:
    # pynetdicom hands C-FIND identifiers over as datasets of raw elements (dsutils.decode)
    original = _charset_dataset(charset, name, text)
    original.QueryRetrieveLevel = "STUDY"
    encoded = dimse_encode(original, True, True)
    assert encoded is not None and marker in encoded
    identifier = dimse_decode(io.BytesIO(encoded), True, True)
    assert isinstance(identifier.get_item(0x00100010), RawDataElement)
    assert dataset_to_json(identifier) == dataset_to_json(original)
    assert isinstance(identifier.get_item(0x00100010), RawDataElement)  # encoding did not convert


def test_decode_text_value() -> None:
    jis = b"Yamada^Tarou=\x1b$B;3ED\x1b(B^\x1b$BB@O:\x1b(B=\x1b$B$d$^$@\x1b(B^\x1b$B$?$m$&\x1b(B "
    assert decode_text_value(jis, "PN", ["", "ISO 2022 IR 87"]) == JAPANESE_PN
    two = b"\x1b$B;3ED\x1b(B\\\x1b$BB@O:\x1b(B"
    assert decode_text_value(two, "LO", ["", "ISO 2022 IR 87"]) == "山田\\太郎"
    assert decode_text_value("Müller ".encode("latin-1"), "LO", ["ISO_IR 100"]) == "Müller"
    assert decode_text_value(b"a\\b  ", "ST", ["ISO_IR 192"]) == "a\\b"
    assert decode_text_value(b"1.2.3\x00", "UI", []) == "1.2.3"


def test_iso_2022_code_extensions_reset_at_delimiters() -> None:
    # PS3.5 6.1.2.5.3: the first character set is active again at "\\" (and "^", "=" in PN),
    # even when the encoder wrote no escape sequence back to it.
    greek = ["ISO 2022 IR 100", "ISO 2022 IR 126"]
    assert decode_text_value(b"\x1b-F\xc4\xe9\xef\xed\\M\xfcller", "LO", greek) == "Διον\\Müller"
    assert decode_text_value(b"\x1b-F\xc4\xe9\xef\xed^M\xfcller", "PN", greek) == "Διον^Müller"
    raw = b"\x1b-F\xc4\xe9\xef\xed\\M\xfcller"
    ds = Dataset()
    _put(ds, _raw(0x00080005, "CS", b"ISO 2022 IR 100\\ISO 2022 IR 126 "))
    _put(ds, _raw(0x00081030, "LO", raw))
    assert dataset_to_json(ds)["00081030"] == {"vr": "LO", "Value": ["Διον", "Müller"]}


def test_multi_byte_characters_containing_delimiter_bytes() -> None:
    # 倍 is ESC $ B "G\\" and 表 is ESC $ B "I=" in ISO 2022 IR 87; GB18030 has 0x5C trail bytes
    jis = ["", "ISO 2022 IR 87"]
    assert decode_text_value("倍".encode("iso2022_jp") + b"\\x", "LO", jis) == "倍\\x"
    assert decode_text_value(b"Bai^Hyou=" + "倍^表".encode("iso2022_jp"), "PN", jis) == "Bai^Hyou=倍^表"
    gb = "乗\\丂"  # both have a 0x5C trail byte in GB18030
    assert b"\\" in "乗".encode("gb18030")
    assert decode_text_value(gb.encode("gb18030"), "LO", ["GB18030"]) == gb
    original = Dataset()
    original.SpecificCharacterSet = jis
    original.PatientName = "Bai^Hyou=倍^表"
    original.StudyDescription = ["倍表", "十"]
    read = _read(_write(original, implicit=False), implicit=False)
    assert dataset_to_json(read) == dataset_to_json(original)


# ---------------------------------------------------------------------------------------------
# Property tests


_WORD = st.text(st.characters(categories=["Lu", "Ll", "Nd"], codec="utf-8"), min_size=1, max_size=8)
_ASCII_WORD = st.text(st.sampled_from("ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_"), min_size=1, max_size=8)


def _multi(strategy: st.SearchStrategy[Any], empty: Any) -> st.SearchStrategy[Any]:
    """A single value, or 2-4 values some of which may be empty."""
    return st.one_of(
        strategy, st.lists(st.one_of(strategy, st.just(empty)), min_size=2, max_size=4).map(list)
    )


_PN_GROUP = st.lists(_WORD, min_size=1, max_size=3).map("^".join)
_PN = st.lists(st.one_of(st.just(""), _PN_GROUP), min_size=1, max_size=3).map("=".join).filter(bool)
_DS = st.one_of(
    st.integers(-(10**9), 10**9).map(str),
    st.floats(-1e6, 1e6, allow_nan=False, allow_infinity=False).map(lambda f: f"{f:.6g}"),
)
_UID = st.lists(st.integers(1, 99999), min_size=2, max_size=6).map(lambda p: ".".join(map(str, p)))
_VALUES: dict[str, st.SearchStrategy[Any]] = {
    "CS": _multi(_ASCII_WORD, ""),
    "LO": _multi(st.lists(_WORD, min_size=1, max_size=3).map(" ".join), ""),
    "SH": _multi(_WORD, ""),
    "UI": _multi(_UID, ""),
    "DA": st.dates().map(lambda d: f"{d.year:04d}{d.month:02d}{d.day:02d}"),
    "LT": st.lists(_WORD, min_size=1, max_size=5).map(" ".join),
    "PN": _multi(_PN, ""),
    "DS": _multi(_DS, ""),
    "IS": _multi(st.integers(-(2**31), 2**31 - 1).map(str), ""),
    "US": _multi(st.integers(0, 2**16 - 1), None).filter(lambda v: not isinstance(v, list) or None not in v),
    "SL": st.lists(st.integers(-(2**31), 2**31 - 1), min_size=1, max_size=3),
    "FL": st.floats(width=32, allow_nan=False, allow_infinity=False),
    "FD": st.lists(st.floats(allow_nan=False, allow_infinity=False), min_size=1, max_size=3),
}
_TAGS = {
    "CS": [0x00080060, 0x00080008, 0x00180015],
    "LO": [0x00081030, 0x00080070, 0x00081090],
    "SH": [0x00080050, 0x00200010, 0x00081010],
    "UI": [0x0020000D, 0x0020000E, 0x00080018],
    "DA": [0x00080020, 0x00100030, 0x00080021],
    "LT": [0x00104000, 0x00204000],
    "PN": [0x00100010, 0x00080090, 0x00101001],
    "DS": [0x00280030, 0x00180050, 0x00101030],
    "IS": [0x00200013, 0x00201208, 0x00200012],
    "US": [0x00280010, 0x00280011, 0x00280100],
    "SL": [0x00186020, 0x00186022],
    "FL": [0x00089459, 0x00109431],
    "FD": [0x00081163, 0x00082134],
}
_ELEMENTS = st.sampled_from([(tag, vr) for vr, tags in _TAGS.items() for tag in tags])
_SEQUENCE_TAGS = [0x00081115, 0x00081032]


@st.composite
def _datasets(draw: st.DrawFn, depth: int = 0) -> Dataset:
    ds = Dataset()
    for tag, vr in draw(st.lists(_ELEMENTS, max_size=8, unique=True)):
        ds.add_new(tag, vr, draw(_VALUES[vr]))
    if depth < 2:
        for tag in draw(st.lists(st.sampled_from(_SEQUENCE_TAGS), max_size=2, unique=True)):
            items = draw(st.lists(_datasets(depth + 1), max_size=2))
            ds.add_new(tag, "SQ", Sequence(items))
    return ds


def _normalise(ds: Dataset) -> dict[int, Any]:
    """Comparable values: DS/IS as numbers, empty strings as None, PN as text without trailing
    empty groups, strings without trailing whitespace, single values as one-element lists."""
    out: dict[int, Any] = {}
    for elem in ds:
        value = elem.value
        if elem.VR == "SQ":
            out[elem.tag] = [_normalise(item) for item in value]
            continue
        values = list(value) if isinstance(value, list | tuple) or elem.VM > 1 else [value]
        norm: list[Any] = []
        for v in values:
            if v is None or v == "":
                norm.append(None)
            elif elem.VR in ("DS", "IS"):
                norm.append(float(v))
            elif elem.VR == "PN":
                norm.append(str(v).rstrip("="))
            elif isinstance(v, str):
                norm.append(v.rstrip())
            else:
                norm.append(v)
        out[elem.tag] = [] if norm == [None] else norm
    return out


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_datasets())
def test_round_trip_through_pydicom_from_json(ds: Dataset) -> None:
    encoded = orjson.loads(datasets_to_json_bytes([ds]))[0]
    assert list(encoded) == sorted(encoded)
    decoded = Dataset.from_json(encoded)
    assert _normalise(decoded) == _normalise(ds)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    _datasets(),
    st.sampled_from(["ISO_IR 192", "GB18030"]),
    st.booleans(),
)
def test_raw_elements_encode_like_built_ones(ds: Dataset, charset: str, implicit: bool) -> None:
    # datasets read from bytes are encoded from their raw elements; they must match the originals
    ds.SpecificCharacterSet = charset
    read = _read(_write(ds, implicit=implicit), implicit=implicit)
    expected = dataset_to_json(ds)
    assert dataset_to_json(read) == expected
    _convert_all(read)
    assert dataset_to_json(read) == expected


def test_no_nan_or_infinity_reaches_json() -> None:
    ds = Dataset()
    ds.TimeRange = [math.inf, 1.0]
    assert orjson.loads(datasets_to_json_bytes([ds]))[0]["00081163"]["Value"] == [None, 1.0]


# ---------------------------------------------------------------------------------------------
# Helpers


def _study(i: int) -> Dataset:
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.StudyDate = "20240101"
    ds.StudyTime = "101010.123"
    ds.AccessionNumber = f"ACC{i}"
    ds.ModalitiesInStudy = ["CT", "SR"]
    ds.ReferringPhysicianName = "Doe^John"
    ds.StudyDescription = "CT Thorax Müller"
    ds.PatientName = "Müller^Jürgen"
    ds.PatientID = f"P{i}"
    ds.StudyInstanceUID = f"1.2.826.0.1.3680043.8.498.{i}"
    ds.NumberOfStudyRelatedInstances = 300
    return ds


@pytest.fixture(autouse=True)
def _no_global_config_leaks() -> Iterator[None]:
    before = (config.settings.reading_validation_mode, config.data_element_callback)
    yield
    assert (config.settings.reading_validation_mode, config.data_element_callback) == before
