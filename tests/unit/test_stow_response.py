"""translators.stow: Store Instances Response (PS3.18 Annex I), Table 10.5.3-1 statuses, and the
metadata + bulk data form. (The C-STORE presentation-context plan: test_stow_planning.py.)"""

from __future__ import annotations

import json
from io import BytesIO

import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.encaps import generate_frames

from translators import stow as st

BASE = "http://gw/dicom-web"
CT = "1.2.840.10008.5.1.4.1.1.2"
MR = "1.2.840.10008.5.1.4.1.1.4"
EXPLICIT = "1.2.840.10008.1.2.1"
IMPLICIT = "1.2.840.10008.1.2"
RLE = "1.2.840.10008.1.2.5"


def outcome(status, n=1, study="1.2.3", series="1.2.3.4"):
    return st.InstanceOutcome(CT, f"1.2.3.4.{n}", status, study, series)


@pytest.mark.parametrize(("statuses", "expected"), [
    ([0x0000, 0x0000], 200),
    ([0x0000, 0xB000], 202),          # all stored, one with a warning
    ([0xB007], 202),
    ([0x0000, 0xA700], 202),          # some stored, some failed
    ([0x0000, st.NOT_DICOM], 202),
    ([st.NOT_DICOM, st.TRUNCATED], 400),   # none stored, all bad syntax
    ([0xC000], 400),
    ([st.STUDY_UID_MISMATCH], 409),   # conflict
    ([st.SOP_CLASS_NOT_SUPPORTED], 409),
    ([st.TRANSFER_SYNTAX_NOT_SUPPORTED], 409),
    ([st.NOT_DICOM, st.STUDY_UID_MISMATCH], 409),   # a mixture of reasons
    ([0xA700, st.PROCESSING_FAILURE], 409),
    ([], 400),
])
def test_http_status_table_10_5_3_1(statuses, expected):
    assert st.http_status([outcome(s, i) for i, s in enumerate(statuses)]) == expected


def test_warning_and_stored_classification():
    for code in (0xB000, 0xB006, 0xB007, 0x0001, 0x0107, 0x0116):
        assert st.is_warning(code) and st.is_stored(code)
    for code in (0xA700, 0xA900, 0xC000, 0x0110, 0x0122, 0x0211, 0xFE00):
        assert not st.is_stored(code)
    assert st.is_stored(0) and not st.is_warning(0)


def test_store_response_exact_json():
    outcomes = [outcome(0, 1), outcome(0xB000, 2), outcome(0xA700, 3),
                st.InstanceOutcome(None, None, st.NOT_DICOM)]
    body = st.response_bytes(st.store_response(outcomes, BASE))
    inst = f"{BASE}/studies/1.2.3/series/1.2.3.4/instances/1.2.3.4."
    assert json.loads(body) == {
        "00081190": {"vr": "UR", "Value": [f"{BASE}/studies/1.2.3"]},
        "00081198": {"vr": "SQ", "Value": [
            {"00081150": {"vr": "UI", "Value": [CT]}, "00081155": {"vr": "UI", "Value": ["1.2.3.4.3"]},
             "00081197": {"vr": "US", "Value": [0xA700]}},
            {"00081150": {"vr": "UI"}, "00081155": {"vr": "UI"}, "00081197": {"vr": "US", "Value": [0xC000]}},
        ]},
        "00081199": {"vr": "SQ", "Value": [
            {"00081150": {"vr": "UI", "Value": [CT]}, "00081155": {"vr": "UI", "Value": ["1.2.3.4.1"]},
             "00081190": {"vr": "UR", "Value": [inst + "1"]}},
            {"00081150": {"vr": "UI", "Value": [CT]}, "00081155": {"vr": "UI", "Value": ["1.2.3.4.2"]},
             "00081190": {"vr": "UR", "Value": [inst + "2"]}, "00081196": {"vr": "US", "Value": [0xB000]}},
        ]},
    }
    # Tags ascending at every level (Annex F.2.1.1), vr first like the rest of the gateway's JSON.
    top = json.loads(body)
    assert list(top) == sorted(top)
    for seq in ("00081198", "00081199"):
        for item in top[seq]["Value"]:
            assert list(item) == sorted(item)
    assert body.startswith(b'{"00081190":{"vr":"UR","Value":')
    # pydicom (what the Python dicomweb-client does with it) reads it.
    ds = Dataset.from_json(body.decode())
    assert ds.FailedSOPSequence[0].FailureReason == 0xA700
    assert ds.ReferencedSOPSequence[1].WarningReason == 0xB000


def test_retrieve_url_targeted_single_and_mixed_studies():
    assert st.store_response([outcome(0xA900)], BASE, "9.9")["00081190"] == {
        "vr": "UR", "Value": [f"{BASE}/studies/9.9"]}
    mixed = [outcome(0, 1, study="1.1"), outcome(0, 2, study="2.2")]
    assert st.store_response(mixed, BASE)["00081190"] == {"vr": "UR"}      # type 2: present, empty
    failed_only = st.store_response([outcome(0xA700)], BASE)
    assert failed_only["00081190"] == {"vr": "UR"} and "00081199" not in failed_only


# ----------------------------------------------------------------------------- metadata + bulk data


def ct_json(pixel_uri="http://gw/bulk/1", frames=None):
    obj = {
        "00080016": {"vr": "UI", "Value": [CT]},
        "00080018": {"vr": "UI", "Value": ["1.2.3.4.5"]},
        "0020000D": {"vr": "UI", "Value": ["1.2.3"]},
        "0020000E": {"vr": "UI", "Value": ["1.2.3.4"]},
        "00280002": {"vr": "US", "Value": [1]},
        "00280004": {"vr": "CS", "Value": ["MONOCHROME2"]},
        "00280010": {"vr": "US", "Value": [2]},
        "00280011": {"vr": "US", "Value": [2]},
        "00280100": {"vr": "US", "Value": [16]},
        "00280101": {"vr": "US", "Value": [16]},
        "00280102": {"vr": "US", "Value": [15]},
        "00280103": {"vr": "US", "Value": [0]},
        "00020010": {"vr": "UI", "Value": ["1.2.840.10008.1.2.2"]},   # group 2 in JSON: ignored
        "7FE00010": {"vr": "OW", "BulkDataURI": pixel_uri},
    }
    if frames:
        obj["00280008"] = {"vr": "IS", "Value": [frames]}
    return obj


def test_instance_from_json_uncompressed_bulk_data():
    pixels = bytes(range(8))
    ds = st.instance_from_json(ct_json(), {"http://gw/bulk/1": (pixels, "application/octet-stream")}.get)
    assert str(ds.file_meta.TransferSyntaxUID) == EXPLICIT
    assert str(ds.file_meta.MediaStorageSOPInstanceUID) == "1.2.3.4.5"
    assert "TransferSyntaxUID" not in ds          # not copied into the data set
    out = BytesIO()
    ds.save_as(out, enforce_file_format=True)
    back = dcmread(BytesIO(out.getvalue()))
    assert back.PixelData == pixels and back.Rows == 2 and back.SOPClassUID == CT


def test_instance_from_json_compressed_single_frame():
    frame = b"\x00\x00\x00\x01" + b"\x00" * 60     # opaque to this layer
    lookup = {"http://gw/bulk/1": (frame, f"image/dicom-rle; transfer-syntax={RLE}")}.get
    ds = st.instance_from_json(ct_json(), lookup)
    assert str(ds.file_meta.TransferSyntaxUID) == RLE
    out = BytesIO()
    ds.save_as(out, enforce_file_format=True)
    back = dcmread(BytesIO(out.getvalue()))
    assert list(generate_frames(back.PixelData, number_of_frames=1)) == [frame]


@pytest.mark.parametrize(("obj", "lookup", "status"), [
    (ct_json(), {}.get, st.BAD_METADATA),                                        # bulk data missing
    ({"00100010": {"vr": "PN", "Value": [{"Alphabetic": "X"}]}}, {}.get, st.NOT_DICOM),   # no SOP UIDs
    ("not an object", {}.get, st.BAD_METADATA),
    ({"00280010": {"vr": "US", "Value": ["abc"]}}, {}.get, st.BAD_METADATA),     # bad value
    ({"00080016": {"Value": ["1"]}}, {}.get, st.BAD_METADATA),                   # no vr
    ({"00081199": {"vr": "SQ", "Value": ["x"]}}, {}.get, st.BAD_METADATA),       # bad item
    (ct_json(frames=2), {"http://gw/bulk/1": (b"x", "image/jpeg")}.get, st.BAD_METADATA),   # multi-frame
    (ct_json(), {"http://gw/bulk/1": (b"x", "image/unknown")}.get, st.TRANSFER_SYNTAX_NOT_SUPPORTED),
])
def test_instance_from_json_failures(obj, lookup, status):
    with pytest.raises(st.MetadataError) as info:
        st.instance_from_json(obj, lookup)
    assert info.value.status == status
