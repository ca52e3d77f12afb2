"""The pure parts of PACS profiles: the probes' helpers, the profile's JSON, the report, the settings."""

from __future__ import annotations

import pytest
from pydicom.dataset import Dataset

from gateway.profile import facts as f
from gateway.profile import report
from gateway.profile.decide import resolve
from gateway.profile.facts import Observation, PacsProfile
from gateway.profile.queries import (
    absent_modality,
    case_changed,
    date_windows,
    default_identifier,
    never_returned,
    partitions,
    split_date,
    usable_name,
    wildcard_prefix,
)
from gateway.settings import ConfigError, NodeQuirks, settings_from_dict

# ------------------------------------------------------------------------------------ probe helpers


@pytest.mark.parametrize("name, usable", [
    ("Doe^John", True), ("DOE^JANE", True), ("TANAKA^TARO", True), ("doe", True),
    ("Yamada^Tarou=山田^太郎", False),      # more than one component group
    ("Müller^Jürgen", False),              # not ASCII: a character set question, not a case one
    ("12345", False), ("^", False), ("D", False), ("Doe*", False), ("Do?e", False), ("", False),
])
def test_usable_name(name, usable):
    assert usable_name(name) is usable


def test_name_variants():
    assert case_changed("Doe^John") == "dOE^jOHN"
    assert case_changed("TANAKA^TARO") == "tanaka^taro"
    assert wildcard_prefix("TANAKA^TARO") == "TAN*"
    assert wildcard_prefix("Doe^John") == "Do*"
    assert wildcard_prefix("Li") == "L*"


def test_absent_modality_and_date_windows():
    assert absent_modality(["CT"]) == "OT"
    assert absent_modality(["OT", "CT"]) == "MR"
    assert date_windows("20230314") == ("20230313-20230315", "20230315-")
    assert date_windows("20240301") == ("20240229-20240302", "20240302-")
    assert date_windows("") is None and date_windows("2023.03.14") is None


def test_never_returned_lists_keys_no_response_carried_with_a_value():
    ident = default_identifier("study")
    a, b = Dataset(), Dataset()
    a.StudyInstanceUID, a.PatientName, a.AccessionNumber = "1.2", "A^B", ""
    b.StudyInstanceUID, b.AccessionNumber = "1.3", "X1"
    missing = never_returned(ident, [a, b])
    assert "StudyInstanceUID" not in missing and "PatientName" not in missing
    assert "AccessionNumber" not in missing, "one response carried it"
    assert {"NumberOfStudyRelatedSeries", "ModalitiesInStudy", "StudyDate"} <= set(missing)
    assert "SpecificCharacterSet" not in missing and "QueryRetrieveLevel" not in missing


def test_result_cap_partitions_are_disjoint_and_split_at_the_median_date():
    assert split_date(["20240115", "", "20191108", "nonsense", "20220621 "]) == "20220621"
    assert split_date(["", "x"]) is None
    before, after = partitions("20221231")
    assert (before, after) == ("-20221231", "20230101-")   # no date is in both ranges


# ------------------------------------------------------------------------------------ JSON


def test_profile_json_round_trip_and_misses():
    p = PacsProfile("n", probed_at=12.5, seconds=0.4, implementation_class_uid="1.2.3",
                    implementation_version_name="X_1", facts={f.C_GET: Observation("t", "r", True)},
                    missing={"study": ["ModalitiesInStudy"]}, latency_ms={"echo": 1.5},
                    result_cap=5, idle_kept_seconds=1.05)
    assert PacsProfile.from_json(p.to_json()) == p
    assert PacsProfile.from_json(PacsProfile("n").to_json()) == PacsProfile("n")   # the numbers unknown
    assert p.identity == ("1.2.3", "X_1")
    assert PacsProfile.from_json(b"not json") is None
    assert PacsProfile.from_json(b'{"format": 999}') is None
    assert PacsProfile.from_json(b'{"format": 1, "node": "n"}') is None
    assert PacsProfile.from_json(p.to_json().replace(b'"format":2', b'"format":1')) is None, \
        "a profile from before the result cap and idle facts is probed again"
    assert PacsProfile.from_json(p.to_json().replace(b'"result_cap":5', b'"result_cap":"5"')) is None
    assert PacsProfile.from_json(p.to_json().replace(b'"value":true', b'"value":[1]')) is None


# ------------------------------------------------------------------------------------ report


def _node(**extra: object):
    return settings_from_dict({"nodes": [{"name": "n", "ae_title": "N", "host": "h", "port": 104,
                                         **extra}]}).nodes[0]


def test_report_rows_name_the_choice_and_the_override():
    p = PacsProfile("n", probed_at=1.0, implementation_class_uid="1.2.3", implementation_version_name="V")
    p.facts[f.PN_CASE_INSENSITIVE] = Observation("how", "not found with its case changed: case-sensitive", False)
    p.facts[f.RETURN_KEYS_STUDY] = Observation("how", "never returned ...", False)
    p.missing = {"study": ["NumberOfStudyRelatedSeries", "AccessionNumber"], "instance": ["SOPClassUID"]}
    node = _node(quirks={"modalities_in_study_matching": True})
    body = report.as_json(node, "probed", None, p, resolve(node, p))
    rows = {r["fact"]: r for r in body["facts"]}
    assert list(rows) == list(f.FACTS)
    assert rows[f.PN_CASE_INSENSITIVE]["behaviour"].startswith("case_sensitive_pn = true (learned)")
    assert rows[f.PN_CASE_INSENSITIVE]["overridden"] == "no"
    assert rows[f.MODALITIES_MATCHING]["overridden"] == "yes (nothing learned)"
    assert rows[f.C_GET]["result"] == "not probed yet"
    filled = {i["attribute"]: i["filled"] for i in body["never_returned"]["study"]}
    assert filled == {"NumberOfStudyRelatedSeries": "computed by lower-level C-FINDs",
                      "AccessionNumber": "not filled: left out of the answer"}
    assert body["never_returned"]["instance"][0]["filled"].startswith("from the spooled header")
    text = report.as_text(body)
    assert text.startswith("node n: probed, probed 1970-01-01T00:00:01Z")
    assert "implementation: 1.2.3 V" in text and "case-sensitive" in text
    assert all(len(line) < 200 for line in text.splitlines())


def test_report_shows_the_limits_learned_and_what_they_do():
    p = PacsProfile("n", probed_at=1.0, result_cap=5, idle_kept_seconds=1.0)
    p.facts[f.RESULT_CAP] = Observation("how", "capped at 5 matches (partitions found 9)", False)
    p.facts[f.IDLE] = Observation("how", "closed by the PACS after 1.0 s idle", False)
    node = _node()
    body = report.as_json(node, "probed", None, p, resolve(node, p))
    rows = {r["fact"]: r for r in body["facts"]}
    assert rows[f.RESULT_CAP]["behaviour"] == ("result_cap = 5 (learned): an answer of exactly 5 matches "
                                               "gets a Warning 299 (possibly cut)")
    assert rows[f.IDLE]["behaviour"] == ("query_idle_seconds = 0.5 (learned): idle query associations "
                                         "reused for 0.5 s")
    settings = {s["setting"]: s for s in body["settings"]}
    assert settings["result_cap"]["value"] == 5 and settings["query_idle_seconds"]["learned"] == 0.5
    off = _node(query_idle_seconds=0)
    assert "closed at once (not reused)" in report.as_json(off, "probed", None, p, resolve(off, p))["facts"][1][
        "behaviour"]


def test_report_before_any_profile():
    node = _node()
    body = report.as_json(node, "unknown", None, None, resolve(node, None))
    assert body["probed_at"] is None and body["implementation"] is None and body["never_returned"] == {}
    assert {s["source"] for s in body["settings"]} == {"safe default"}
    assert "node n: unknown" in report.as_text(body)


# ------------------------------------------------------------------------------------ settings


def test_quirks_are_tri_state_and_profiling_is_configurable():
    s = settings_from_dict({
        "nodes": [{"name": "n", "ae_title": "N", "host": "h", "port": 104,
                   "quirks": {"case_sensitive_pn": True, "relational_queries": None}}],
        "profiling": {"enabled": False, "interval": 3600, "identity_check": 10, "probe_move": True}})
    assert s.nodes[0].quirks == NodeQuirks(case_sensitive_pn=True)
    assert (s.nodes[0].result_cap, s.nodes[0].query_idle_seconds) == (None, None)   # the profile decides
    limits = settings_from_dict({"nodes": [{"name": "n", "ae_title": "N", "host": "h", "port": 104,
                                            "result_cap": 500, "query_idle_seconds": 0}]}).nodes[0]
    assert (limits.result_cap, limits.query_idle_seconds) == (500, 0.0)
    assert (s.profiling.enabled, s.profiling.interval, s.profiling.identity_check, s.profiling.probe_move) == \
        (False, 3600.0, 10.0, True)
    assert settings_from_dict({}).profiling.interval == 86400.0


@pytest.mark.parametrize("raw, key", [
    ({"profiling": {"interval": "daily"}}, "profiling.interval"),
    ({"profiling": {"enabled": "yes"}}, "profiling.enabled"),
    ({"profiling": {"probe": True}}, "profiling.probe"),
    ({"nodes": [{"name": "o", "ae_title": "O", "host": "h", "port": 1, "quirks": {"case_sensitive_pn": 1}}]},
     "nodes[o].quirks.case_sensitive_pn"),
    ({"nodes": [{"name": "o", "ae_title": "O", "host": "h", "port": 1, "query_model": "series"}]},
     "nodes[o].query_model"),
    ({"nodes": [{"name": "o", "ae_title": "O", "host": "h", "port": 1, "result_cap": -1}]}, "nodes[o].result_cap"),
    ({"nodes": [{"name": "o", "ae_title": "O", "host": "h", "port": 1, "query_idle_seconds": "5s"}]},
     "nodes[o].query_idle_seconds"),
])
def test_bad_profiling_settings_name_the_key(raw, key):
    with pytest.raises(ConfigError) as err:
        settings_from_dict(raw)
    assert str(err.value).startswith(key + ":")
