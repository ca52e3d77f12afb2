"""The DIMSE edge and federation under fault injection, counted at the peer (in-process SCPs)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import httpx
import pytest

from gateway.demo_data import DEMO_STUDIES, generate_demo_datasets
from gateway.dimse.demo_pacs import DemoPacs
from gateway.settings import settings_from_dict
from tests.support.server import free_port, running_gateway


@pytest.fixture(scope="module")
def datasets():
    return generate_demo_datasets()


def node(name: str, pacs: DemoPacs | None, port: int | None = None, **extra: object) -> dict[str, object]:
    cfg: dict[str, object] = {"name": name, "ae_title": pacs.ae_title if pacs else "NOBODY",
                              "host": "127.0.0.1", "port": port or (pacs.port if pacs else free_port()),
                              "timeouts": {"connect": 2, "acse": 3, "dimse": 3, "network": 10}}
    cfg.update(extra)
    return cfg


@pytest.fixture()
def pacs(datasets) -> Iterator[DemoPacs]:
    with DemoPacs(datasets, ae_title="PACS_A") as p:
        yield p


@pytest.fixture()
def pacs_b(datasets) -> Iterator[DemoPacs]:
    # Holds a subset: the two studies of patient DGW0001 plus nothing else.
    subset = [ds for ds in datasets if ds.PatientID == "DGW0001"]
    with DemoPacs(subset, ae_title="PACS_B") as p:
        yield p


def get(url: str, path: str, **params: object) -> httpx.Response:
    return httpx.get(url + path, params=params, timeout=30)


def test_federation_merges_dedupes_and_names_nodes(pacs, pacs_b):
    settings = settings_from_dict({"nodes": [node("a", pacs), node("b", pacs_b)]})
    with running_gateway(settings) as url:
        r = get(url, "/dicom-web/studies")
        assert r.status_code == 200
        body = r.json()
        assert len(body) == len(DEMO_STUDIES)
        aets = {ds["0020000D"]["Value"][0]: ds["00080054"]["Value"] for ds in body}
        for study in DEMO_STUDIES:
            expected = ["PACS_A", "PACS_B"] if study["patient_id"] == "DGW0001" else ["PACS_A"]
            assert aets[study["study_uid"]] == expected
        # /nodes/{name} targets exactly one node
        only_b = get(url, "/nodes/b/dicom-web/studies").json()
        assert {ds["00100020"]["Value"][0] for ds in only_b} == {"DGW0001"}
        assert all(ds["00081190"]["Value"][0].startswith(url + "/nodes/b/dicom-web/") for ds in only_b)


def test_a_failing_node_yields_a_warning_and_the_others_results(pacs):
    settings = settings_from_dict({"nodes": [node("a", pacs), node("dead", None)]})
    with running_gateway(settings) as url:
        r = get(url, "/dicom-web/studies", PatientID="DGW0001")
        assert r.status_code == 200 and len(r.json()) == 2
        assert any("dead" in w for w in r.headers.get_list("warning"))


def test_every_node_unreachable_is_502_naming_them():
    settings = settings_from_dict({"nodes": [node("dead1", None), node("dead2", None)]})
    with running_gateway(settings) as url:
        r = get(url, "/dicom-web/studies")
        assert r.status_code == 502
        body = r.json()
        assert body["error"] == "NodeUnreachable"
        assert "dead1" in body["node"] and "dead2" in body["node"]
        single = get(url, "/nodes/dead1/dicom-web/studies")
        assert single.status_code == 502 and single.json()["node"] == "dead1"


def test_slow_node_is_504_naming_it(datasets):
    with DemoPacs(datasets, ae_title="SLOW", find_delay=2.5) as slow:
        settings = settings_from_dict({"nodes": [node("slow", slow, timeouts={"dimse": 1, "connect": 2,
                                                                              "acse": 3, "network": 10})]})
        with running_gateway(settings) as url:
            r = get(url, "/dicom-web/studies")
            assert r.status_code == 504
            assert r.json()["node"] == "slow" and r.json()["error"] == "DimseTimeout"


def test_failure_status_is_502_with_status(datasets):
    with DemoPacs(datasets, ae_title="BROKEN", fail_status=0xA700) as broken:
        settings = settings_from_dict({"nodes": [node("broken", broken)]})
        with running_gateway(settings) as url:
            r = get(url, "/dicom-web/studies")
            assert r.status_code == 502
            assert r.json() == {"error": "DimseFailure", "detail": r.json()["detail"], "node": "broken",
                                "status": "A700"}
            assert "out of resources" in r.json()["detail"]


def test_wrong_called_ae_title_is_rejected_cleanly(pacs):
    # DemoPacs accepts any called AE; an unknown port on a listening PACS is the realistic refusal.
    settings = settings_from_dict({"nodes": [node("a", pacs, port=free_port())]})
    with running_gateway(settings) as url:
        r = get(url, "/readyz", echo=1)
        assert r.status_code == 200
        assert r.json()["nodes"]["a"]["ok"] is False
        assert r.json()["nodes"]["a"]["error"] == "NodeUnreachable"


def test_associations_are_reused_and_bounded(pacs):
    settings = settings_from_dict({"nodes": [node("a", pacs, max_query_associations=2)],
                                   # the probe's associations would be counted
                                   "profiling": {"enabled": False}})
    with running_gateway(settings) as url:
        for _ in range(5):
            assert get(url, "/dicom-web/studies", PatientID="DGW0001").status_code == 200
        assert pacs.counters["associations"] == 1, "sequential queries must reuse one association"
        pacs.find_delay = 0.2
        active = {"now": 0, "max": 0}
        lock = threading.Lock()

        def on_assoc_count() -> None:
            pass

        results: list[int] = []

        def worker() -> None:
            results.append(get(url, "/dicom-web/studies", PatientID="DGW0003").status_code)

        threads = [threading.Thread(target=worker) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert results == [200] * 8
        assert pacs.counters["associations"] <= 2, "max_query_associations bounds concurrent associations"
        del active, lock


def test_c_cancel_when_result_cap_is_hit(datasets):
    # A little delay per response lets the C-CANCEL reach the PACS before it has sent everything.
    with DemoPacs(datasets, ae_title="CAP", find_delay=0.05) as capped:
        settings = settings_from_dict({"nodes": [node("cap", capped, max_results=3)],
                                       # a probe's capped C-FIND would be counted
                                       "profiling": {"enabled": False}})
        with running_gateway(settings) as url:
            r = get(url, "/dicom-web/studies")
            assert r.status_code == 200
            assert len(r.json()) == 3
            assert any("result limit" in w for w in r.headers.get_list("warning"))
            assert capped.counters["cancel"] == 1


def test_c_cancel_when_the_client_goes_away(datasets):
    with DemoPacs(datasets, ae_title="SLOWISH", find_delay=0.4) as slowish:
        settings = settings_from_dict({"nodes": [node("s", slowish, timeouts={"dimse": 20, "connect": 2,
                                                                               "acse": 3, "network": 30})],
                                       # a probe's capped C-FIND would be counted
                                       "profiling": {"enabled": False}})
        with running_gateway(settings) as url:
            with pytest.raises(httpx.ReadTimeout):
                httpx.get(url + "/dicom-web/studies", timeout=0.6)
            deadline = time.monotonic() + 10
            while slowish.counters["cancel"] == 0 and time.monotonic() < deadline:
                time.sleep(0.05)
            assert slowish.counters["cancel"] == 1
            # The node's slot was given back: the next query works.
            slowish.find_delay = 0
            assert get(url, "/dicom-web/studies", PatientID="DGW0001").status_code == 200


def test_patient_root_only_pacs(datasets):
    with DemoPacs(datasets, ae_title="PATROOT", patient_root_only=True) as pr:
        settings = settings_from_dict({"nodes": [node("pr", pr, query_model="patient")]})
        with running_gateway(settings) as url:
            body = get(url, "/dicom-web/studies", PatientName="doe*").json()
            assert {d["00100020"]["Value"][0] for d in body} == {"DGW0001", "DGW0002"}
            assert all(d["00201208"]["Value"][0] > 0 for d in body)
            everything = get(url, "/dicom-web/studies").json()
            assert len(everything) == len(DEMO_STUDIES)
            study = DEMO_STUDIES[0]
            series = get(url, f"/dicom-web/studies/{study['study_uid']}/series").json()
            assert len(series) == study["num_series"]
            assert all(s["00201209"]["Value"][0] > 0 for s in series)
            # and the PACS really saw Patient Root requests only
            assert all(i.QueryRetrieveLevel in ("PATIENT", "STUDY", "SERIES", "IMAGE")
                       for i in pr.received_identifiers)
        # Not configured: the very first request is answered (the refused Study Root C-FIND was the
        # first contact; the probe it started learned Patient Root, and the search asked again).
        with running_gateway(settings_from_dict({"nodes": [node("pr", pr)]})) as url:
            assert len(get(url, "/dicom-web/studies").json()) == len(DEMO_STUDIES)
        # A Study Root node configured against it fails with a clear error naming the node.
        settings = settings_from_dict({"nodes": [node("pr", pr, query_model="study")]})
        with running_gateway(settings) as url:
            r = get(url, "/dicom-web/studies")
            assert r.status_code == 502 and "Study Root" in r.json()["detail"]


def test_identifiers_the_pacs_received(pacs):
    # Configured as a fact: unknown, ModalitiesInStudy is matched locally (docs/architecture.md,
    # "PACS profiles"), and this test is about the identifiers sent when the PACS matches it.
    settings = settings_from_dict({"nodes": [node("a", pacs, quirks={"modalities_in_study_matching": True})],
                                   # the probe's identifiers would be received too
                                   "profiling": {"enabled": False}})
    with running_gateway(settings) as url:
        pacs.received_identifiers.clear()
        assert get(url, "/dicom-web/studies", ModalitiesInStudy="CT,MR").status_code == 200
        first = [i for i in pacs.received_identifiers if i.QueryRetrieveLevel == "STUDY"]
        assert sorted(str(i.ModalitiesInStudy) for i in first) == ["CT", "MR"]
        for ident in first:
            for kw in ("StudyDate", "PatientName", "NumberOfStudyRelatedInstances", "StudyInstanceUID"):
                assert kw in ident


def test_counts_computed_when_the_pacs_omits_them(datasets):
    with DemoPacs(datasets, ae_title="NOCOUNT", return_counts=False, honour_modalities_in_study=False) as nc:
        settings = settings_from_dict({"nodes": [node("nc", nc, quirks={"modalities_in_study_matching": False})]})
        with running_gateway(settings) as url:
            body = get(url, "/dicom-web/studies").json()
            by_uid = {d["0020000D"]["Value"][0]: d for d in body}
            for study in DEMO_STUDIES:
                ds = by_uid[study["study_uid"]]
                assert ds["00201206"]["Value"] == [study["num_series"]]
                assert ds["00201208"]["Value"] == [study["num_instances"]]
                assert sorted(ds["00080061"]["Value"]) == sorted(study["modalities"])
            pt = get(url, "/dicom-web/studies", ModalitiesInStudy="PT").json()
            assert [d["00100020"]["Value"][0] for d in pt] == ["DGW0004"]
        with running_gateway(settings_from_dict({"nodes": [node("nc", nc, quirks={
                "compute_counts": False, "compute_modalities": False})]})) as url:
            body = get(url, "/dicom-web/studies").json()
            assert all("00201208" not in d and "00080061" not in d for d in body), \
                "never emitted empty when not computed"


def test_emulation_budget_is_enforced_with_a_warning(datasets):
    with DemoPacs(datasets, ae_title="NOCOUNT", return_counts=False) as nc:
        settings = settings_from_dict({"nodes": [node("nc", nc)], "limits": {"max_emulation_queries": 2},
                                       # the probe's C-FINDs would be counted
                                       "profiling": {"enabled": False}})
        with running_gateway(settings) as url:
            r = get(url, "/dicom-web/studies")
            assert r.status_code == 200 and len(r.json()) == len(DEMO_STUDIES)
            assert any("budget" in w for w in r.headers.get_list("warning"))
            assert nc.counters["find"] <= 1 + 2 + 2 * 4


def test_idle_associations_are_closed(pacs):
    settings = settings_from_dict({"nodes": [node("a", pacs)],
                                   # the probe's associations would be counted
                                   "profiling": {"enabled": False}})
    with running_gateway(settings) as url:
        assert get(url, "/dicom-web/studies", PatientID="DGW0001").status_code == 200
        time.sleep(6)   # past the pool's idle time (pynetdicom threads poll while an association idles)
        assert get(url, "/dicom-web/studies", PatientID="DGW0002").status_code == 200
        assert pacs.counters["associations"] == 2, "the idle association was closed and a new one opened"
