"""translators.qido and translators.qido_results: parsing, identifiers, merge and paging (pure)."""

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydicom.dataset import Dataset

from translators import qido as q
from translators import qido_results as qr


def parse(level="study", **kw):
    items = kw.pop("items", [])
    return q.parse_query(level, items, **kw)


def test_keyword_and_tag_keys_are_equivalent():
    a = parse(items=[("PatientID", "123")])
    b = parse(items=[("00100020", "123")])
    c = parse(items=[("00100020".lower(), "123")])
    assert a.matches == b.matches == c.matches == (q.MatchKey((0x00100020,), ("123",)),)


def test_uid_lists_accept_comma_and_backslash():
    for value in ("1.2.3,1.2.4", "1.2.3\\1.2.4"):
        query = parse(items=[("StudyInstanceUID", value)])
        ident = q.build_identifiers(query).identifiers
        assert len(ident) == 1
        assert list(ident[0].StudyInstanceUID) == ["1.2.3", "1.2.4"]


def test_modalities_in_study_list_means_or():
    query = parse(items=[("ModalitiesInStudy", "CT,MR")])
    plan = q.build_identifiers(query)
    assert sorted(i.ModalitiesInStudy for i in plan.identifiers) == ["CT", "MR"]
    plan = q.build_identifiers(query, q.NodeCapabilities(or_multiple_values=True))
    assert len(plan.identifiers) == 1 and list(plan.identifiers[0].ModalitiesInStudy) == ["CT", "MR"]


def test_modalities_filtered_locally_when_node_ignores_them():
    query = parse(items=[("ModalitiesInStudy", "CT,MR")])
    plan = q.build_identifiers(query, q.NodeCapabilities(modalities_in_study_matching=False))
    assert len(plan.identifiers) == 1 and plan.identifiers[0].ModalitiesInStudy in ("", None)
    assert plan.local_keys[0].values == ("CT", "MR")


def test_case_sensitive_pn_is_widened_and_kept_for_local_matching():
    query = parse(items=[("PatientName", "doe*")])
    plan = q.build_identifiers(query, q.NodeCapabilities(case_sensitive_pn=True))
    assert plan.identifiers[0].PatientName in ("", None)
    assert plan.local_keys == [q.MatchKey((0x00100010,), ("doe*",))]
    plain = q.build_identifiers(query)
    assert str(plain.identifiers[0].PatientName) == "doe*" and not plain.local_keys


def test_default_return_keys_per_level():
    study = q.build_identifiers(parse()).identifiers[0]
    for kw in ("StudyDate", "StudyTime", "AccessionNumber", "ModalitiesInStudy", "ReferringPhysicianName",
               "PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyInstanceUID", "StudyID",
               "NumberOfStudyRelatedSeries", "NumberOfStudyRelatedInstances"):
        assert kw in study, kw
    assert study.QueryRetrieveLevel == "STUDY"
    series = q.build_identifiers(parse("series", study_uid="1.2")).identifiers[0]
    assert series.QueryRetrieveLevel == "SERIES" and series.StudyInstanceUID == "1.2"
    for kw in ("Modality", "SeriesDescription", "SeriesNumber", "SeriesInstanceUID",
               "NumberOfSeriesRelatedInstances"):
        assert kw in series, kw
    inst = q.build_identifiers(parse("instance", study_uid="1.2", series_uid="1.3")).identifiers[0]
    assert inst.QueryRetrieveLevel == "IMAGE" and inst.SeriesInstanceUID == "1.3"
    for kw in ("SOPClassUID", "SOPInstanceUID", "InstanceNumber", "Rows", "Columns", "NumberOfFrames"):
        assert kw in inst, kw


def test_includefield_comma_repeated_and_all():
    a = parse(items=[("includefield", "00081030,00080060"), ("includefield", "StudyDescription")])
    ident = q.build_identifiers(a).identifiers[0]
    assert "StudyDescription" in ident
    assert "Modality" not in ident            # series-level attribute is not asked at study level
    every = q.build_identifiers(parse(items=[("includefield", "all")])).identifiers[0]
    assert "StudyDescription" in every and "PatientAge" in every
    inst_all = q.build_identifiers(parse("instance", study_uid="1", series_uid="2",
                                         items=[("includefield", "all")])).identifiers[0]
    assert "ImageType" in inst_all and "Modality" in inst_all


def test_sequence_path_match():
    query = parse("series", study_uid="1.2", items=[("RequestAttributesSequence.AccessionNumber", "A1")])
    ident = q.build_identifiers(query).identifiers[0]
    assert ident.RequestAttributesSequence[0].AccessionNumber == "A1"


@pytest.mark.parametrize("items", [
    [("StudyDate", "2024-01-01")], [("StudyDate", "2024013")], [("StudyDate", "abc")],
    [("StudyInstanceUID", "1.2.*")], [("StudyInstanceUID", "abc")], [("limit", "-1")],
    [("offset", "x")], [("fuzzymatching", "maybe")], [("StudyTime", "25:00")],
    [("NumberOfStudyRelatedInstances", "many")], [("StudyDate", "-")],
])
def test_malformed_queries_raise(items):
    with pytest.raises(q.QueryError):
        parse(items=items)


@pytest.mark.parametrize("value", ["20240101", "20240101-20240131", "-20240131", "20240101-",
                                   "19700102-20241231"])
def test_date_ranges_accepted(value):
    query = parse(items=[("StudyDate", value)])
    assert q.build_identifiers(query).identifiers[0].StudyDate == value


def test_unknown_parameters_are_ignored_with_a_warning():
    query = parse(items=[("NotAnAttribute", "x"), ("_", "123"), ("accept", "application/dicom+json")])
    assert query.matches == ()
    assert any("NotAnAttribute" in w for w in query.warnings)


def test_fuzzymatching_true_warns_and_false_is_silent():
    assert any("fuzzymatching" in w for w in parse(items=[("fuzzymatching", "true")]).warnings)
    assert parse(items=[("fuzzymatching", "false")]).warnings == ()


def test_path_uid_conflict_is_rejected():
    with pytest.raises(q.QueryError):
        parse("series", study_uid="1.2", items=[("StudyInstanceUID", "1.3")])


def test_non_ascii_values_declare_utf8():
    ident = q.build_identifiers(parse(items=[("PatientName", "Müller*")])).identifiers[0]
    assert ident.SpecificCharacterSet == "ISO_IR 192"


def _study(uid, date, time="", aet=None):
    ds = Dataset()
    ds.StudyInstanceUID = uid
    ds.StudyDate = date
    ds.StudyTime = time
    return ds


def test_merge_dedupes_and_names_nodes():
    a = [_study("1.1", "20240101"), _study("1.2", "20230101")]
    b = [_study("1.2", "20230101"), _study("1.3", "20220101")]
    merged = qr.merge("study", [("a", "AE_A", a), ("b", "AE_B", b)])
    uids = [d.StudyInstanceUID for d in merged.datasets]
    assert sorted(uids) == ["1.1", "1.2", "1.3"]
    assert merged.nodes["1.2"] == ["a", "b"]
    both = next(d for d in merged.datasets if d.StudyInstanceUID == "1.2")
    assert list(both.RetrieveAETitle) == ["AE_A", "AE_B"]


def test_page_orders_newest_first_and_slices():
    studies = [_study(f"1.{i}", f"2024010{i}", "1200") for i in range(1, 8)]
    first = qr.page(studies, "study", limit=3, offset=0, cap=100)
    assert [d.StudyInstanceUID for d in first.datasets] == ["1.7", "1.6", "1.5"] and first.more
    last = qr.page(studies, "study", limit=3, offset=6, cap=100)
    assert [d.StudyInstanceUID for d in last.datasets] == ["1.1"] and not last.more
    assert qr.page(studies, "study", limit=3, offset=10, cap=100).datasets == []


@given(st.lists(st.tuples(st.integers(0, 30), st.sampled_from(["20240101", "20230505", ""])),
                max_size=30, unique_by=lambda t: t[0]),
       st.integers(1, 7), st.permutations(range(30)))
def test_paging_is_deterministic_and_complete(rows, limit, perm):
    studies = [_study(f"1.{n}", date) for n, date in rows]
    shuffled = [studies[i] for i in perm if i < len(studies)] + studies[len(perm):]
    pages, offset = [], 0
    while True:
        p = qr.page(shuffled, "study", limit=limit, offset=offset, cap=1000)
        if not p.datasets:
            break
        pages += [d.StudyInstanceUID for d in p.datasets]
        offset += len(p.datasets)
    assert sorted(pages) == sorted(d.StudyInstanceUID for d in studies)
    assert len(pages) == len(set(pages))
    again = [d.StudyInstanceUID for d in qr.page(studies, "study", None, 0, 1000).datasets]
    assert pages == again


def test_normalise_result_drops_empty_modalities_and_fixes_dates():
    from pydicom import config

    old = config.settings.reading_validation_mode
    config.settings.reading_validation_mode = config.IGNORE
    try:
        ds = _study("1.1", "2024.01.31", "10:30:00")
        ds.ModalitiesInStudy = ""
        ds.QueryRetrieveLevel = "STUDY"
        qr.normalise_result(ds)
    finally:
        config.settings.reading_validation_mode = old
    assert "ModalitiesInStudy" not in ds and "QueryRetrieveLevel" not in ds
    assert ds.StudyDate == "20240131" and ds.StudyTime == "103000"


def test_retrieve_url_per_level():
    ds = _study("1.1", "20240101")
    ds.SeriesInstanceUID = "1.1.2"
    ds.SOPInstanceUID = "1.1.2.3"
    assert qr.retrieve_url("http://x/dicom-web", "study", ds) == "http://x/dicom-web/studies/1.1"
    assert qr.retrieve_url("http://x/dicom-web", "instance", ds).endswith("/series/1.1.2/instances/1.1.2.3")
