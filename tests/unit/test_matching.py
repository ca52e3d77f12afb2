"""PS3.4 C.2.2.2 matching rules: one concrete case per rule, then hypothesis properties."""

from __future__ import annotations

from datetime import date, datetime, time, timedelta
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydicom import config
from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset

from translators.matching import build_response, dataset_matches, element_matches


def elem(keyword: str, value: Any, vr: str | None = None) -> DataElement:
    """A key or candidate element; query syntax (ranges, wildcards) is no valid VR value: skip checks."""
    tag = tag_for_keyword(keyword)
    assert tag is not None
    return DataElement(tag, vr or dictionary_VR(tag), value, validation_mode=config.IGNORE)


def matches(keyword: str, key: Any, candidate: Any, **kwargs: Any) -> bool:
    cand = None if candidate is None else elem(keyword, candidate)
    return element_matches(elem(keyword, key), cand, **kwargs)


def dataset(**values: Any) -> Dataset:
    ds = Dataset()
    for keyword, value in values.items():
        ds.add(elem(keyword, value))
    return ds


# --- universal (C.2.2.2.3) ------------------------------------------------------------------------


@pytest.mark.parametrize("key", ["", None, "*"])
@pytest.mark.parametrize("candidate", ["Doe^John", "", None])
def test_universal_matches_anything_including_absent(key: str | None, candidate: str | None) -> None:
    assert matches("PatientName", key, candidate)


def test_zero_length_numeric_and_uid_keys_are_universal() -> None:
    assert matches("SeriesNumber", None, "7")
    assert matches("StudyInstanceUID", "", None)


def test_missing_candidate_with_non_universal_key_does_not_match() -> None:
    assert not matches("PatientID", "P1", None)
    assert not matches("PatientID", "P1", "")
    assert not matches("SeriesNumber", "1", None)


# --- single value (C.2.2.2.1) ---------------------------------------------------------------------


def test_single_value_is_exact_and_case_sensitive_for_non_pn() -> None:
    assert matches("AccessionNumber", "A1", "A1")
    assert not matches("AccessionNumber", "A1", "A10")
    assert not matches("AccessionNumber", "a1", "A1")
    assert matches("AccessionNumber", " A1 ", "A1")  # padding is not significant


def test_pn_is_case_insensitive_by_default_and_case_sensitive_when_asked() -> None:
    assert matches("PatientName", "Doe^John", "DOE^JOHN")
    assert not matches("PatientName", "Doe^John", "DOE^JOHN", pn_case_insensitive=False)
    assert matches("PatientName", "Doe^John", "Doe^John", pn_case_insensitive=False)


def test_pn_components_are_compared_leniently() -> None:
    assert matches("PatientName", "Doe^John", "Doe^John^^^")
    assert matches("PatientName", "Doe ^ John", "Doe^John")
    assert not matches("PatientName", "Doe", "Doe^John")
    assert not matches("PatientName", "Doe^John", "Doe^Jane")


def test_pn_single_group_key_matches_any_representation() -> None:
    name = "Yamada^Tarou=山田^太郎=やまだ^たろう"
    assert matches("PatientName", "yamada^tarou", name)
    assert matches("PatientName", "山田^太郎", name)
    assert matches("PatientName", "=山田^太郎", name)
    assert not matches("PatientName", "=Yamada^Tarou", name)


def test_single_date_and_time_match_exactly_with_legacy_forms() -> None:
    assert matches("StudyDate", "20240105", "20240105")
    assert not matches("StudyDate", "20240105", "20240106")
    assert matches("StudyDate", "2024.01.05", "20240105")
    assert matches("StudyDate", "20240105", "2024.01.05")
    assert matches("StudyTime", "103000", "103000")
    assert matches("StudyTime", "10:30:00", "103000")
    assert not matches("StudyTime", "103000", "103001")
    assert matches("StudyTime", "1030", "103045.5")  # a partial key covers its precision
    assert not matches("StudyDate", "20240105", "garbage")


def test_numeric_vrs_compare_as_numbers() -> None:
    assert matches("SeriesNumber", "5", "05")
    assert not matches("SeriesNumber", "5", "6")
    assert matches("SliceThickness", "1.0", "1.000")
    assert matches("Rows", 512, 512)
    assert not matches("Rows", 512, 256)
    assert element_matches(
        DataElement(0x00181050, "FL", 0.1), DataElement(0x00181050, "FL", 0.10000000149011612)
    )


def test_binary_and_at_vrs_compare_values() -> None:
    assert element_matches(
        DataElement(0x00091010, "OB", b"\x01\x02"), DataElement(0x00091010, "OB", b"\x01\x02")
    )
    assert not element_matches(DataElement(0x00091010, "OB", b"\x01"), DataElement(0x00091010, "OB", b"\x02"))
    assert element_matches(
        DataElement(0x00209165, "AT", 0x00100010), DataElement(0x00209165, "AT", 0x00100010)
    )


def test_un_candidate_is_read_as_the_key_vr() -> None:
    assert element_matches(elem("PatientID", "P1"), DataElement(0x00100020, "UN", b"P1"))
    assert element_matches(elem("ModalitiesInStudy", "PT"), DataElement(0x00080061, "UN", b"CT\\PT"))
    assert not element_matches(elem("ModalitiesInStudy", "MR"), DataElement(0x00080061, "UN", b"CT\\PT"))


# --- list of UIDs (C.2.2.2.2) and multiple values ----------------------------------------------------


def test_uid_list_is_any_of_and_never_wildcard() -> None:
    assert matches("StudyInstanceUID", ["1.2.3", "1.2.4"], "1.2.4")
    assert not matches("StudyInstanceUID", ["1.2.3", "1.2.4"], "1.2.5")
    assert matches("StudyInstanceUID", "1.2.3", "1.2.3\0")
    assert not matches("StudyInstanceUID", "1.2.?", "1.2.3")
    assert not matches("StudyInstanceUID", "1.2*", "1.2.3")


def test_multi_valued_candidate_matches_if_any_value_does() -> None:
    assert matches("ModalitiesInStudy", "CT", ["CT", "PT"])
    assert matches("ModalitiesInStudy", "PT", ["CT", "PT"])
    assert not matches("ModalitiesInStudy", "MR", ["CT", "PT"])


def test_multi_valued_key_is_any_of() -> None:
    assert matches("ModalitiesInStudy", ["CT", "MR"], "MR")
    assert matches("ModalitiesInStudy", ["CT", "MR"], ["MR", "SR"])
    assert not matches("ModalitiesInStudy", ["CT", "MR"], ["PT", "SR"])
    assert matches("ModalitiesInStudy", "CT\\MR", ["PT", "CT"])  # backslash text from a raw element


# --- wild card (C.2.2.2.4) -----------------------------------------------------------------------


def test_wildcards() -> None:
    assert matches("PatientID", "P*", "P123")
    assert matches("PatientID", "P?2*", "P123")
    assert not matches("PatientID", "P?2*", "P13")
    assert matches("PatientID", "*", "")  # "*" alone is universal
    assert not matches("PatientID", "p*", "P123")  # case-sensitive outside PN
    assert matches("PatientName", "*doe*", "Doe^John")
    assert not matches("PatientName", "*doe*", "Doe^John", pn_case_insensitive=False)
    assert matches("PatientName", "Doe^J?hn", "DOE^JOHN")
    assert matches("StudyDescription", "CT*(prior)", "CT CHEST (prior)")  # regex metacharacters are literal
    assert not matches("StudyDescription", "C.*", "CT CHEST")


def test_wildcards_are_not_interpreted_for_dates() -> None:
    assert not matches("StudyDate", "2024*", "20240105")
    assert matches("StudyDate", "*", "20240105")


# --- range (C.2.2.2.5) ---------------------------------------------------------------------------


def test_date_ranges() -> None:
    assert matches("StudyDate", "20240101-20240131", "20240101")
    assert matches("StudyDate", "20240101-20240131", "20240131")
    assert not matches("StudyDate", "20240101-20240131", "20240201")
    assert matches("StudyDate", "-20240131", "19700101")
    assert not matches("StudyDate", "-20240131", "20240201")
    assert matches("StudyDate", "20240101-", "29991231")
    assert not matches("StudyDate", "20240101-", "20231231")
    assert matches("StudyDate", "2024.01.01-2024.01.31", "20240115")
    assert not matches("StudyDate", "20240131-20240101", "20240115")  # reversed range is empty
    assert not matches("StudyDate", "2024-20240131", "20240115")  # malformed bound


def test_time_ranges_with_partial_and_fractional_bounds() -> None:
    assert matches("StudyTime", "10-11", "100000")
    assert matches("StudyTime", "10-11", "115959.999999")  # "11" covers the whole hour
    assert not matches("StudyTime", "10-11", "120000")
    assert matches("StudyTime", "1030-", "1030")
    assert not matches("StudyTime", "1030-", "102959.9")
    assert matches("StudyTime", "-103000.5", "103000.5")
    assert not matches("StudyTime", "-103000.5", "103000.6")
    assert matches("StudyTime", "083000.123456-083000.123456", "083000.123456")
    assert not matches("StudyTime", "10-11", "99")


def test_datetime_ranges_and_offsets() -> None:
    key = "20240101100000-20240101120000"
    assert matches("AcquisitionDateTime", key, "20240101100000")
    assert matches("AcquisitionDateTime", key, "20240101120000.5")
    assert not matches("AcquisitionDateTime", key, "20240101120001")
    assert matches("AcquisitionDateTime", "2024-", "20250101")
    assert matches("AcquisitionDateTime", "-2024", "20241231235959.999999")
    assert not matches("AcquisitionDateTime", "-2024", "20250101")
    assert matches("AcquisitionDateTime", "202402", "20240229")
    # both sides with offsets: compared in UTC (10:00+0100 == 09:00Z)
    assert matches("AcquisitionDateTime", "20240101100000+0100-20240101100000+0100", "20240101090000+0000")
    assert not matches("AcquisitionDateTime", "20240101100000+0100-", "20240101085959+0000")
    # a negative offset is not a range separator
    assert matches("AcquisitionDateTime", "20240101120000-0500", "20240101170000+0000")
    assert matches("AcquisitionDateTime", "20240101-0500-", "20240102")
    assert not matches("AcquisitionDateTime", "bad-range", "20240101")


# --- sequence (C.2.2.2.6) ------------------------------------------------------------------------


def _request_attributes(*items: dict[str, str]) -> list[Dataset]:
    return [dataset(**item) for item in items]


def test_sequence_matching() -> None:
    candidate = elem(
        "RequestAttributesSequence",
        _request_attributes(
            {"RequestedProcedureID": "RP1", "ScheduledProcedureStepID": "S1"},
            {"RequestedProcedureID": "RP2", "ScheduledProcedureStepID": "S2"},
        ),
    )
    key = elem("RequestAttributesSequence", _request_attributes({"RequestedProcedureID": "RP2"}))
    assert element_matches(key, candidate)
    both = _request_attributes({"RequestedProcedureID": "RP2", "ScheduledProcedureStepID": "S1"})
    assert not element_matches(elem("RequestAttributesSequence", both), candidate)  # same item for all keys
    assert element_matches(elem("RequestAttributesSequence", [Dataset()]), candidate)
    assert element_matches(elem("RequestAttributesSequence", []), None)
    assert not element_matches(key, None)
    assert not element_matches(key, elem("RequestAttributesSequence", []))


def test_dataset_matches_all_keys_and_ignores_control_keys() -> None:
    candidate = dataset(PatientName="Doe^John", StudyDate="20240105", ModalitiesInStudy=["CT", "PT"])
    identifier = dataset(
        QueryRetrieveLevel="STUDY",
        SpecificCharacterSet="ISO_IR 100",
        PatientName="doe*",
        StudyDate="20240101-20240131",
        ModalitiesInStudy="PT",
        StudyInstanceUID="",
    )
    assert dataset_matches(identifier, candidate)
    identifier.PatientName = "smith*"
    assert not dataset_matches(identifier, candidate)
    assert dataset_matches(identifier, candidate, ignore={0x00100010, 0x00080052, 0x00080005})


def test_build_response_returns_requested_keys_only() -> None:
    candidate = dataset(
        SpecificCharacterSet="ISO_IR 100",
        PatientName="Müller^Jürgen",
        PatientID="P1",
        StudyInstanceUID="1.2.3",
        StudyDescription="hidden",
        RequestAttributesSequence=_request_attributes(
            {"RequestedProcedureID": "RP1", "ScheduledProcedureStepID": "S1"},
            {"RequestedProcedureID": "RP2", "ScheduledProcedureStepID": "S2"},
        ),
        ReferencedStudySequence=_request_attributes({"ReferencedSOPInstanceUID": "9.9"}),
    )
    identifier = dataset(
        QueryRetrieveLevel="STUDY",
        PatientName="",
        PatientID="P1",
        AccessionNumber="",
        RequestAttributesSequence=_request_attributes({"RequestedProcedureID": "RP2"}),
        ReferencedStudySequence=[],
        ReferencedPatientSequence=[],
    )
    response = build_response(identifier, candidate)
    assert [e.keyword for e in response] == [
        "SpecificCharacterSet",
        "AccessionNumber",
        "QueryRetrieveLevel",
        "ReferencedStudySequence",
        "ReferencedPatientSequence",
        "PatientName",
        "PatientID",
        "RequestAttributesSequence",
    ]
    assert response.QueryRetrieveLevel == "STUDY"
    assert response.PatientName == "Müller^Jürgen"
    assert response["AccessionNumber"].is_empty
    assert len(response.ReferencedPatientSequence) == 0
    assert response.ReferencedStudySequence[0].ReferencedSOPInstanceUID == "9.9"  # universal: whole item
    items = response.RequestAttributesSequence
    assert len(items) == 1 and items[0].RequestedProcedureID == "RP2"
    assert "ScheduledProcedureStepID" not in items[0]  # only the item keys come back
    response.PatientID = "changed"
    assert candidate.PatientID == "P1"  # a copy, not a view


def test_build_response_filters_sequence_items_with_the_pn_rule() -> None:
    item = dataset(PatientName="DOE^JOHN", PatientID="P1")
    candidate = dataset(ReferencedPatientSequence=[item])
    identifier = dataset(ReferencedPatientSequence=[dataset(PatientName="doe*")])
    assert len(build_response(identifier, candidate).ReferencedPatientSequence) == 1
    assert (
        len(build_response(identifier, candidate, pn_case_insensitive=False).ReferencedPatientSequence) == 0
    )


def test_build_response_resolves_ambiguous_vr_for_missing_elements() -> None:
    identifier = Dataset()
    identifier.SmallestImagePixelValue = None
    response = build_response(identifier, Dataset())
    assert response["SmallestImagePixelValue"].VR == "US"


# --- properties -------------------------------------------------------------------------------------

_STRING_VRS = {
    "PatientName": st.from_regex(r"[A-Za-z]{1,10}(\^[A-Za-z]{1,10}){0,2}", fullmatch=True),
    "PatientID": st.from_regex(r"[A-Za-z0-9\-]{1,16}", fullmatch=True),
    "StudyDescription": st.text(
        st.characters(codec="latin-1", exclude_characters="\\*?"), min_size=1, max_size=20
    ),
    "Modality": st.sampled_from(["CT", "MR", "PT", "SR", "OT"]),
    "StudyInstanceUID": st.from_regex(r"[1-9][0-9]{0,3}(\.[1-9][0-9]{0,5}){1,6}", fullmatch=True),
}
_DATES = st.dates(min_value=date(1900, 1, 1), max_value=date(2100, 12, 31))
_TIMES = st.times()
_DATETIMES = st.datetimes(min_value=datetime(1900, 1, 1), max_value=datetime(2100, 12, 31))


def _da(d: date) -> str:
    return d.strftime("%Y%m%d")


def _tm(t: time) -> str:
    return t.strftime("%H%M%S.%f")


def _dt(d: datetime) -> str:
    return d.strftime("%Y%m%d%H%M%S.%f")


_ANY_VALUE = st.one_of(
    *(st.tuples(st.just(k), s) for k, s in _STRING_VRS.items()),
    st.tuples(st.just("StudyDate"), _DATES.map(_da)),
    st.tuples(st.just("StudyTime"), _TIMES.map(_tm)),
    st.tuples(st.just("AcquisitionDateTime"), _DATETIMES.map(_dt)),
    st.tuples(st.just("SeriesNumber"), st.integers(-(2**31), 2**31 - 1).map(str)),
    st.tuples(st.just("SliceThickness"), st.decimals(-1000, 1000, places=3).map(str)),
)


@given(_ANY_VALUE, st.booleans())
def test_universal_always_matches(keyword_value: tuple[str, str], absent: bool) -> None:
    keyword, value = keyword_value
    assert matches(keyword, "", None if absent else value)
    assert matches(keyword, None, None if absent else value)


@given(_ANY_VALUE)
def test_star_always_matches_strings(keyword_value: tuple[str, str]) -> None:
    keyword, value = keyword_value
    if keyword not in ("SeriesNumber", "SliceThickness"):
        assert matches(keyword, "*", value)
        assert matches(keyword, "*", None)


@given(_ANY_VALUE, st.booleans())
def test_a_value_matches_itself(keyword_value: tuple[str, str], case_insensitive: bool) -> None:
    keyword, value = keyword_value
    assert matches(keyword, value, value, pn_case_insensitive=case_insensitive)


@given(st.lists(_DATES, min_size=3, max_size=3).map(sorted))
def test_date_range_contains_its_bounds_and_between(dates: list[date]) -> None:
    low, middle, high = dates
    key = f"{_da(low)}-{_da(high)}"
    for value in (low, middle, high):
        assert matches("StudyDate", key, _da(value))
        assert matches("StudyDate", f"-{_da(high)}", _da(value))
        assert matches("StudyDate", f"{_da(low)}-", _da(value))
    assert not matches("StudyDate", key, _da(high + timedelta(days=1)))


@given(st.lists(_TIMES, min_size=3, max_size=3).map(sorted))
def test_time_range_contains_its_bounds_and_between(times: list[time]) -> None:
    low, middle, high = times
    key = f"{_tm(low)}-{_tm(high)}"
    for value in (low, middle, high):
        assert matches("StudyTime", key, _tm(value))
    # the same bounds at minute precision still contain them
    assert matches("StudyTime", f"{low:%H%M}-{high:%H%M}", _tm(middle))


@given(st.lists(_DATETIMES, min_size=3, max_size=3).map(sorted))
def test_datetime_range_contains_its_bounds_and_between(moments: list[datetime]) -> None:
    low, middle, high = moments
    key = f"{_dt(low)}-{_dt(high)}"
    for value in (low, middle, high):
        assert matches("AcquisitionDateTime", key, _dt(value))
    assert not matches("AcquisitionDateTime", key, _dt(high + timedelta(microseconds=1)))


@given(st.from_regex(r"[A-Za-z]{1,8}(\^[A-Za-z]{1,8})?", fullmatch=True))
def test_case_insensitivity_only_for_pn(name: str) -> None:
    upper, lower = name.upper(), name.lower()
    assert matches("PatientName", upper, lower)
    assert matches("PatientName", upper + "*", lower, pn_case_insensitive=True)
    assert not matches("PatientName", upper, lower, pn_case_insensitive=False)
    assert not matches("PatientID", upper.replace("^", ""), lower.replace("^", ""))
    assert not matches("StudyDescription", upper, lower)
    assert not matches("StudyDescription", upper + "*", lower)


@given(st.from_regex(r"[A-Za-z0-9]{1,8}", fullmatch=True), st.from_regex(r"[A-Za-z0-9]{0,8}", fullmatch=True))
def test_prefix_wildcard_matches_any_suffix(prefix: str, suffix: str) -> None:
    assert matches("PatientID", prefix + "*", prefix + suffix)
    assert matches("PatientID", prefix + "?" * len(suffix), prefix + suffix)
