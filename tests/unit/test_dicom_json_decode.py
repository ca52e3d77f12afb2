"""translators.dicom_json_decode: the gateway's own DICOM JSON decodes back to the same JSON."""

from hypothesis import given
from hypothesis import strategies as st
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from gateway.demo_data import generate_demo_datasets
from translators.dicom_json import dataset_to_json
from translators.dicom_json_decode import dataset_from_json
from translators.matching import build_response
from translators.qido import build_identifiers, parse_query


def test_cfind_responses_round_trip():
    ident = build_identifiers(parse_query("study", [("includefield", "all")])).identifiers[0]
    for ds in generate_demo_datasets()[:40]:
        response = build_response(ident, ds)
        encoded = dataset_to_json(response)
        assert dataset_to_json(dataset_from_json(encoded)) == encoded


def test_pn_groups_sequences_nulls_and_binary():
    ds = Dataset()
    ds.PatientName = "Yamada^Tarou=山田^太郎=やまだ^たろう"
    ds.OtherPatientNames = ["A^B", "", "C"]
    ds.ModalitiesInStudy = ["CT", "", "MR"]
    ds.NumberOfStudyRelatedInstances = "12"
    ds.SliceThickness = "2.5"
    item = Dataset()
    item.AccessionNumber = "X1"
    ds.RequestAttributesSequence = Sequence([item, Dataset()])
    ds.add_new(0x00091001, "OB", b"\x00\x01\x02")
    encoded = dataset_to_json(ds)
    back = dataset_from_json(encoded)
    assert str(back.PatientName) == "Yamada^Tarou=山田^太郎=やまだ^たろう"
    assert dataset_to_json(back) == encoded


@given(st.lists(st.text(alphabet="ABCDEFGHIJ^ ", min_size=0, max_size=12), min_size=1, max_size=4),
       st.lists(st.integers(0, 10**6), min_size=1, max_size=3))
def test_strings_and_numbers_round_trip(names, numbers):
    ds = Dataset()
    ds.StudyDescription = names[0].strip()
    ds.add_new(0x00201208, "IS", [str(n) for n in numbers] if len(numbers) > 1 else str(numbers[0]))
    encoded = dataset_to_json(ds)
    assert dataset_to_json(dataset_from_json(encoded)) == encoded
