"""QIDO-RS through the gateway against real Orthanc and DCMTK dcmqrscp (same data on both).

The two peers differ: dcmqrscp omits ModalitiesInStudy and the counts, matches PN case-sensitively
and ignores ModalitiesInStudy as a key (the node quirks of docs/architecture.md, "Search"). The
gateway must give the same answers from both; every test runs on each.
"""

from __future__ import annotations

from collections.abc import Iterator
from urllib.parse import quote

import httpx
import pytest
from dicomweb_client.api import DICOMwebClient

from gateway.demo_data import DEMO_STUDIES, generate_demo_datasets
from gateway.settings import Settings, settings_from_dict
from tests.support.quirk_pacs import QUIRKS, QuirkPacs
from tests.support.server import running_gateway

STUDIES = {s["study_uid"]: s for s in DEMO_STUDIES}
CT_CHEST = next(s for s in DEMO_STUDIES if s["accession_number"] == "A2303140011")


def node_config(name: str, peer: object, **quirks: bool) -> dict[str, object]:
    return {"name": name, "ae_title": peer.ae_title, "host": "127.0.0.1", "port": peer.dicom_port,
            "timeouts": {"connect": 3, "acse": 5, "dimse": 20, "network": 30}, "quirks": quirks}


def peer_settings(kind: str, peer: object) -> Settings:
    # No quirk flags: the profile and the safe defaults decide (issue 14).
    return settings_from_dict({"nodes": [node_config(kind.replace(":", "-"), peer)]})


class _QuirkPeer:
    def __init__(self, pacs: QuirkPacs) -> None:
        self.ae_title, self.dicom_port = pacs.ae_title, pacs.port


@pytest.fixture(scope="module", params=["orthanc", "dcmqrscp", *(f"quirk:{q}" for q in QUIRKS)])
def gw(request: pytest.FixtureRequest, orthanc: object, dcmqrscp: object) -> Iterator[httpx.Client]:
    kind: str = request.param
    quirk = QuirkPacs(kind.split(":")[1], generate_demo_datasets()) if kind.startswith("quirk:") else None
    try:
        if quirk is not None:
            quirk.start()
        peer = _QuirkPeer(quirk) if quirk is not None else orthanc if kind == "orthanc" else dcmqrscp
        with running_gateway(peer_settings(kind, peer)) as url, \
                httpx.Client(base_url=url + "/dicom-web", timeout=30) as client:
            client.peer = kind  # type: ignore[attr-defined]
            yield client
    finally:
        if quirk is not None:
            quirk.stop()


def values(ds: dict, tag: str) -> list:
    return ds.get(tag, {}).get("Value", [])


def uids(body: list[dict], tag: str = "0020000D") -> list[str]:
    return [values(d, tag)[0] for d in body]


def search(client: httpx.Client, path: str, **params: object) -> list[dict]:
    r = client.get(path, params=params)
    if r.status_code == 204:
        assert r.content == b""
        return []
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "application/dicom+json"
    return r.json()


def expected_order(studies: list[dict]) -> list[str]:
    return [s["study_uid"] for s in sorted(studies, key=lambda s: (s["study_date"], s["study_time"]),
                                           reverse=True)]


def test_all_studies_newest_first_with_counts_and_modalities(gw):
    body = search(gw, "/studies")
    assert uids(body) == expected_order(DEMO_STUDIES)
    for ds in body:
        study = STUDIES[values(ds, "0020000D")[0]]
        assert sorted(values(ds, "00080061")) == sorted(study["modalities"]), gw.peer
        assert values(ds, "00201206") == [study["num_series"]]
        assert values(ds, "00201208") == [study["num_instances"]]
        assert values(ds, "00100020") == [study["patient_id"]]
        assert values(ds, "00081190")[0].endswith(f"/dicom-web/studies/{study['study_uid']}")
        assert values(ds, "00080054")  # RetrieveAETitle names the node
        assert list(ds) == sorted(ds), "keys must be sorted (PS3.18 F.2.2)"


@pytest.mark.parametrize("name, expected_ids", [
    ("doe*", {"DGW0001", "DGW0002"}),
    ("DOE*", {"DGW0001", "DGW0002"}),
    ("doe^jane", {"DGW0002"}),
    ("Doe^John", {"DGW0001"}),
    ("sm?th*", {"DGW0003"}),
    ("*^anna", {"DGW0003"}),
    ("müller*", {"DGW0004"}),
])
def test_patient_name_matching_is_case_insensitive_on_every_peer(gw, name, expected_ids):
    body = search(gw, "/studies", PatientName=name)
    assert {values(d, "00100020")[0] for d in body} == expected_ids


def test_tag_keys_and_keyword_keys_agree(gw):
    by_tag = search(gw, "/studies", **{"00100020": "DGW0003"})
    by_kw = search(gw, "/studies", PatientID="DGW0003")
    assert sorted(uids(by_tag)) == sorted(uids(by_kw)) and len(by_tag) == 2


@pytest.mark.parametrize("sep", [",", "\\"])
def test_uid_lists(gw, sep):
    wanted = [DEMO_STUDIES[0]["study_uid"], DEMO_STUDIES[3]["study_uid"]]
    body = search(gw, "/studies", StudyInstanceUID=sep.join(wanted))
    assert sorted(uids(body)) == sorted(wanted)


@pytest.mark.parametrize("mods, expected", [("CT,MR", {"CT", "MR"}), ("PT", {"PT"}), ("SR,DX", {"SR", "DX"})])
def test_modalities_in_study_is_or(gw, mods, expected):
    body = search(gw, "/studies", ModalitiesInStudy=mods)
    want = {s["study_uid"] for s in DEMO_STUDIES if expected & set(s["modalities"])}
    assert set(uids(body)) == want and len(body) == len(want)


@pytest.mark.parametrize("rng", ["20230101-", "-20200101", "20210101-20221231", "19700102-20200101",
                                 "20230314"])
def test_date_ranges(gw, rng):
    lo, _, hi = rng.partition("-") if "-" in rng else (rng, "", rng)
    want = {s["study_uid"] for s in DEMO_STUDIES if (not lo or s["study_date"] >= lo)
            and (not hi or s["study_date"] <= hi)}
    assert set(uids(search(gw, "/studies", StudyDate=rng))) == want


def test_wildcards_on_accession_and_description(gw):
    assert uids(search(gw, "/studies", AccessionNumber="A2303*")) == [CT_CHEST["study_uid"]]
    body = search(gw, "/studies", StudyDescription="CT CHEST*")
    assert {values(d, "00100020")[0] for d in body} == {"DGW0001"}


def test_includefield_forms(gw):
    comma = search(gw, "/studies", includefield="00081030,00080060", PatientID="DGW0001")
    assert all("00081030" in d for d in comma)
    assert all("00080060" not in d for d in comma)  # series-level attributes are not study results
    r = gw.get("/studies?includefield=StudyDescription&includefield=00100040&PatientID=DGW0001")
    assert all("00081030" in d and "00100040" in d for d in r.json())
    everything = search(gw, "/studies", includefield="all", PatientID="DGW0001")
    assert all("00081030" in d for d in everything)


def test_fuzzymatching_and_unknown_parameters_warn(gw):
    r = gw.get("/studies", params={"fuzzymatching": "true", "PatientID": "DGW0001"})
    assert r.status_code == 200
    assert any("fuzzymatching" in w for w in r.headers.get_list("warning"))
    r = gw.get("/studies", params={"fuzzymatching": "false", "PatientID": "DGW0001"})
    assert r.headers.get_list("warning") == []
    r = gw.get("/studies", params={"NoSuchAttribute": "1", "PatientID": "DGW0001"})
    assert r.status_code == 200 and len(r.json()) == 2
    assert any("NoSuchAttribute" in w for w in r.headers.get_list("warning"))


def test_paging_is_deterministic_and_204_past_the_end(gw):
    seen: list[str] = []
    for offset in range(0, 9, 3):
        r = gw.get("/studies", params={"limit": 3, "offset": offset})
        assert r.status_code == 200
        page = uids(r.json())
        seen += page
        more = any("additional results" in w for w in r.headers.get_list("warning"))
        assert more == (offset + 3 < len(DEMO_STUDIES))
    assert seen == expected_order(DEMO_STUDIES)
    r = gw.get("/studies", params={"limit": 3, "offset": 100})
    assert r.status_code == 204 and r.content == b""


def test_no_match_is_204(gw):
    r = gw.get("/studies", params={"PatientID": "NOBODY"})
    assert r.status_code == 204 and r.content == b""


@pytest.mark.parametrize("query", ["StudyDate=2024-01-01", "StudyInstanceUID=1.2.*", "limit=-5",
                                   "StudyTime=9999999", "offset=abc"])
def test_malformed_queries_are_400_with_json(gw, query):
    r = gw.get(f"/studies?{query}")
    assert r.status_code == 400
    assert r.headers["content-type"] == "application/json"
    assert r.json()["error"] == "BadRequest" and r.json()["detail"]


def test_study_series_with_counts(gw):
    body = search(gw, f"/studies/{CT_CHEST['study_uid']}/series")
    expected = sorted(CT_CHEST["series"], key=lambda s: s["series_number"])
    assert uids(body, "0020000E") == [s["series_uid"] for s in expected]
    for ds, series in zip(body, expected, strict=True):
        assert values(ds, "00080060") == [series["modality"]]
        assert values(ds, "00201209") == [series["num_instances"]]
        assert values(ds, "00200011") == [series["series_number"]]
        assert values(ds, "0020000D") == [CT_CHEST["study_uid"]]
        assert values(ds, "00081190")[0].endswith(f"/series/{series['series_uid']}")


def test_series_instances_in_instance_number_order(gw):
    series = CT_CHEST["series"][1]
    body = search(gw, f"/studies/{CT_CHEST['study_uid']}/series/{series['series_uid']}/instances")
    assert uids(body, "00080018") == series["sop_instance_uids"]
    assert [values(d, "00200013")[0] for d in body] == list(range(1, len(body) + 1))
    assert all(values(d, "00081190")[0].endswith(f"/instances/{values(d, '00080018')[0]}") for d in body)
    # OHIF's thumbnail fallback
    first = search(gw, f"/studies/{CT_CHEST['study_uid']}/series/{series['series_uid']}/instances",
                   limit=1, includefield="00080018")
    assert uids(first, "00080018") == series["sop_instance_uids"][:1]


def test_relational_series_carry_study_attributes(gw):
    body = search(gw, "/series", Modality="PT")
    pet = next(s for s in DEMO_STUDIES if "PT" in s["modalities"])
    assert uids(body) == [pet["study_uid"]]
    assert values(body[0], "00080060") == ["PT"]
    assert values(body[0], "00080020") == [pet["study_date"]]
    assert values(body[0], "00100020") == [pet["patient_id"]]


def test_relational_study_instances_and_all_instances(gw):
    body = search(gw, f"/studies/{CT_CHEST['study_uid']}/instances")
    want = [u for s in sorted(CT_CHEST["series"], key=lambda s: s["series_number"])
            for u in s["sop_instance_uids"]]
    assert uids(body, "00080018") == want
    one = CT_CHEST["series"][1]["sop_instance_uids"][3]
    found = search(gw, "/instances", SOPInstanceUID=one, PatientID="DGW0001")
    assert uids(found, "00080018") == [one]


def test_sequence_path_key_is_accepted(gw):
    r = gw.get(f"/studies/{CT_CHEST['study_uid']}/series",
               params={"RequestAttributesSequence.RequestedProcedureID": "NOPE"})
    assert r.status_code in (200, 204)


def test_character_sets_are_decoded(gw):
    yamada = search(gw, "/studies", PatientID="DGW0006")
    name = values(yamada[0], "00100010")[0]
    assert name["Alphabetic"] == "Yamada^Tarou"
    assert name["Ideographic"] == "山田^太郎"
    assert name.get("Phonetic") == "やまだ^たろう"
    muller = search(gw, "/studies", PatientID="DGW0004")
    assert values(muller[0], "00100010")[0] == {"Alphabetic": "Müller^Jürgen"}


def test_python_dicomweb_client_search_and_paging(gw):
    client = DICOMwebClient(url=str(gw.base_url).rstrip("/"))
    studies = client.search_for_studies(search_filters={"PatientName": "doe*"}, fuzzymatching=False)
    assert {values(d, "00100020")[0] for d in studies} == {"DGW0001", "DGW0002"}
    everything = client.search_for_studies(limit=3, get_remaining=True)
    assert uids(everything) == expected_order(DEMO_STUDIES)
    series = client.search_for_series(CT_CHEST["study_uid"], fields=["SeriesDescription"])
    assert len(series) == 2
    instances = client.search_for_instances(CT_CHEST["study_uid"], CT_CHEST["series"][0]["series_uid"])
    assert uids(instances, "00080018") == CT_CHEST["series"][0]["sop_instance_uids"]


def test_ohif_study_list_query(gw):
    q = ("limit=101&offset=0&fuzzymatching=false&includefield=00081030%2C00080060%2C00080090%2C00100030"
         f"&PatientName={quote('*doe*')}&ModalitiesInStudy=CT%2CMR")
    r = gw.get(f"/studies?{q}", headers={"Accept": "application/dicom+json"})
    assert r.status_code == 200
    assert {values(d, "00100020")[0] for d in r.json()} == {"DGW0001", "DGW0002"}
    for ds in r.json():
        assert values(ds, "00080061"), "ModalitiesInStudy must never be empty"
    ohif_backslash = gw.get("/studies", params={"StudyInstanceUID": "\\".join(
        [CT_CHEST["study_uid"], DEMO_STUDIES[2]["study_uid"]])})
    assert len(ohif_backslash.json()) == 2


def test_accept_negotiation(gw):
    assert gw.get("/studies", headers={"Accept": "application/json"}).status_code == 200
    assert gw.get("/studies", headers={"Accept": "*/*"}).status_code == 200
    r = gw.get("/studies", headers={"Accept": 'multipart/related; type="application/dicom+xml"'})
    assert r.status_code == 406 and r.json()["error"] == "NotAcceptable"
