"""PACS profiles against real peers: no quirk flag in any config, and QIDO/WADO still right.

Orthanc, DCMTK's dcmqrscp and one in-process SCP per quirk (tests/support/quirk_pacs.py) are each
served by a gateway whose node names only its address. The first contact probes the PACS in the
background; the profile (GET /admin/nodes/{name}/profile) must name the quirk, the behaviour chosen
must make the basics work, a configured flag must win and be reported as overridden, an upgraded
PACS (another Implementation Version Name) must be profiled again, and no probe output, log line or
cached profile may carry the patient names the probes saw (docs/architecture.md, "PACS profiles").
"""

from __future__ import annotations

import io
import json
import logging
import re
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from pydicom import dcmread
from pydicom.dataset import Dataset

from gateway.demo_data import DEMO_STUDIES
from gateway.profile.report import as_text
from gateway.settings import settings_from_dict
from tests.support.multipart import parse_multipart
from tests.support.quirk_pacs import (
    DROP_IDLE_AFTER,
    LIMITED_QUIRKS,
    RESULT_CAP,
    TANAKA,
    TANAKA_ID,
    QuirkPacs,
)
from tests.support.server import free_port, running_gateway

pytestmark = pytest.mark.integration

GW_AE = "DICOMWEBGW"
TIMEOUTS = {"connect": 3, "acse": 5, "dimse": 20, "network": 30}
CT = next(s for s in DEMO_STUDIES if s["accession_number"] == "A2303140011")
MR = next(s for s in DEMO_STUDIES if s["accession_number"] == "A2206210031")
MR_RLE = next(s for s in MR["series"] if s["transfer_syntax_uid"] == "1.2.840.10008.1.2.5")
PT_SERIES = [se for s in DEMO_STUDIES for se in s["series"] if se["modality"] == "PT"]
# Everything that identifies a patient in the peers' data: none of it may leave a probe.
_IDENTIFIERS = ({TANAKA, TANAKA_ID, "TANAKA", "TARO"} | {s["patient_id"] for s in DEMO_STUDIES}
                | {part for s in DEMO_STUDIES for part in re.split(r"[\^=]", s["patient_name"]) if len(part) > 2})
PATIENT_DATA = re.compile("|".join(rf"\b{re.escape(v)}\b" for v in sorted(_IDENTIFIERS, key=len, reverse=True)),
                          re.IGNORECASE)


# ------------------------------------------------------------------------------------ helpers


def node(name: str, ae_title: str, port: int, **extra: Any) -> dict[str, Any]:
    """A node with its address only: no retrieve, no query_model, no quirks."""
    return {"name": name, "ae_title": ae_title, "host": "127.0.0.1", "port": port, "timeouts": TIMEOUTS,
            **extra}


def config(nodes: list[dict[str, Any]], tmp: Path, *, scp_port: int | None = None,
           **profiling: Any) -> dict[str, Any]:
    raw: dict[str, Any] = {"spool": {"path": str(tmp / "spool")}, "nodes": nodes,
                           "profiling": {"enabled": True, "probe_move": scp_port is not None, **profiling}}
    if scp_port is not None:
        raw["gateway"] = {"ae_title": GW_AE, "dimse_port": scp_port, "dimse_host": "127.0.0.1"}
    return raw


@pytest.fixture()
def serve(tmp_path: Path) -> Iterator[Any]:
    """serve(raw config) -> an httpx client on the gateway's root (closed with the test)."""
    from contextlib import ExitStack

    with ExitStack() as stack:
        def start(raw: dict[str, Any]) -> httpx.Client:
            url = stack.enter_context(running_gateway(settings_from_dict(raw)))
            return stack.enter_context(httpx.Client(base_url=url, timeout=60))
        yield start


def profile(client: httpx.Client, name: str) -> dict[str, Any]:
    r = client.get(f"/admin/nodes/{name}/profile")
    assert r.status_code == 200, r.text
    return r.json()


def wait_profiled(client: httpx.Client, name: str, *, other_than: str | None = None,
                  timeout: float = 60) -> dict[str, Any]:
    """Until the node has a profile (one probed at another time than ``other_than``)."""
    deadline = time.monotonic() + timeout
    while True:
        body = profile(client, name)
        if body["state"] == "probed" and body["probed_at"] != other_than:
            return body
        assert body["state"] != "failed", body["error"]
        assert time.monotonic() < deadline, f"node {name} was not profiled: {body['state']}"
        time.sleep(0.1)


def fact(body: dict[str, Any], key: str) -> dict[str, str]:
    return next(row for row in body["facts"] if row["fact"] == key)


def setting(body: dict[str, Any], name: str) -> dict[str, Any]:
    return next(s for s in body["settings"] if s["setting"] == name)


def search(client: httpx.Client, path: str, **params: Any) -> list[dict[str, Any]]:
    r = client.get("/dicom-web" + path, params=params)
    if r.status_code == 204:
        return []
    assert r.status_code == 200, r.text
    return r.json()


def values(ds: dict[str, Any], tag: str) -> list[Any]:
    return ds.get(tag, {}).get("Value", [])


def patient_ids(body: list[dict[str, Any]]) -> set[str]:
    return {values(d, "00100020")[0] for d in body}


def assert_basics(client: httpx.Client, *, tanaka: bool) -> None:
    """QIDO and WADO basics, whatever the PACS does by itself."""
    studies = search(client, "/studies")
    by_uid = {values(d, "0020000D")[0]: d for d in studies}
    for study in DEMO_STUDIES:
        ds = by_uid[study["study_uid"]]
        assert sorted(values(ds, "00080061")) == sorted(study["modalities"])
        assert values(ds, "00201206") == [study["num_series"]]
        assert values(ds, "00201208") == [study["num_instances"]]
    assert patient_ids(search(client, "/studies", PatientName="doe*")) == {"DGW0001", "DGW0002"}
    assert patient_ids(search(client, "/studies", PatientName="DOE^jane")) == {"DGW0002"}
    if tanaka:
        assert patient_ids(search(client, "/studies", PatientName="tan*")) == {TANAKA_ID}
    mr_only = search(client, "/studies", ModalitiesInStudy="MR")
    assert [values(d, "0020000D")[0] for d in mr_only] == [MR["study_uid"]]
    pet = search(client, "/series", Modality="PT")
    assert {values(d, "0020000E")[0] for d in pet} == {s["series_uid"] for s in PT_SERIES}
    series = CT["series"][1]
    metadata = client.get(f"/dicom-web/studies/{CT['study_uid']}/series/{series['series_uid']}/metadata")
    assert metadata.status_code == 200, metadata.text
    assert len(metadata.json()) == series["num_instances"]


def assert_capped_answers_are_flagged(client: httpx.Client) -> None:
    """A PACS that silently stops at RESULT_CAP matches: an answer of exactly that many may be cut,
    and QIDO-RS says so (Warning 299, naming the PACS's cap); an answer under the cap is whole."""
    r = client.get("/dicom-web/studies")
    assert r.status_code == 200, r.text
    assert len(r.json()) == RESULT_CAP
    assert any(f"result cap ({RESULT_CAP} matches" in w for w in r.headers.get_list("warning")), r.headers
    one = client.get("/dicom-web/studies", params={"StudyInstanceUID": CT["study_uid"]})
    assert one.status_code == 200 and len(one.json()) == 1
    assert not any("result cap" in w for w in one.headers.get_list("warning")), one.headers


def retrieve_rle_instance(client: httpx.Client) -> Dataset:
    sop = MR_RLE["sop_instance_uids"][0]
    r = client.get(f"/dicom-web/studies/{MR['study_uid']}/series/{MR_RLE['series_uid']}/instances/{sop}",
                   headers={"Accept": 'multipart/related; type="application/dicom"; transfer-syntax=*'})
    assert r.status_code == 200, r.text
    parts = parse_multipart(r.content, r.headers["content-type"])
    return dcmread(io.BytesIO(parts[0][1]))


@pytest.fixture()
def no_patient_data_logged() -> Iterator[list[str]]:
    """Every INFO+ record of the gateway's loggers during the test, checked for the peers' patient data."""
    lines: list[str] = []

    class Capture(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if record.name.startswith(("gateway", "cache", "translators", "pynetdicom", "uvicorn")):
                lines.append(record.getMessage())

    handler = Capture(logging.INFO)
    logging.getLogger().addHandler(handler)
    try:
        yield lines
    finally:
        logging.getLogger().removeHandler(handler)
    leaks = [line for line in lines if PATIENT_DATA.search(line)]
    assert not leaks, leaks[:5]


# ------------------------------------------------------------------------------------ real peers


def test_orthanc_without_flags(serve, orthanc, gateway_scp_port, tmp_path, no_patient_data_logged):
    client = serve(config([node("orthanc", orthanc.ae_title, orthanc.dicom_port)], tmp_path,
                          scp_port=gateway_scp_port))
    assert profile(client, "orthanc")["state"] == "unknown", "nothing is probed before first contact"
    search(client, "/studies", PatientName="doe*")          # first contact: the probe starts behind it
    body = wait_profiled(client, "orthanc")
    assert fact(body, "pn_case_insensitive")["result"].endswith("case-insensitive")
    assert setting(body, "case_sensitive_pn") == {"setting": "case_sensitive_pn", "value": False,
                                                  "source": "learned", "learned": False, "overridden": False}
    assert setting(body, "modalities_in_study_matching")["value"] is True
    assert setting(body, "retrieve")["value"] == "get"
    assert fact(body, "c_move")["result"] == "delivered"
    assert body["implementation"]["class_uid"].startswith("1.2.276.0.7230010.3"), "Orthanc is DCMTK inside"
    assert_basics(client, tanaka=False)


def test_dcmqrscp_without_flags(serve, dcmqrscp, gateway_scp_port, tmp_path, no_patient_data_logged):
    """dcmqrscp matches PN case-sensitively, ignores ModalitiesInStudy and returns no counts: with no
    flag at all, ``doe*`` still finds Doe^John and DOE^JANE, before and after the probe."""
    client = serve(config([node("dcmqrscp", dcmqrscp.ae_title, dcmqrscp.dicom_port)], tmp_path,
                          scp_port=gateway_scp_port))
    assert patient_ids(search(client, "/studies", PatientName="doe*")) == {"DGW0001", "DGW0002"}
    body = wait_profiled(client, "dcmqrscp")
    assert "case-sensitive" in fact(body, "pn_case_insensitive")["result"]
    assert setting(body, "case_sensitive_pn")["value"] is True
    assert fact(body, "modalities_in_study_matching")["result"].endswith("the key is ignored")
    assert setting(body, "modalities_in_study_matching")["value"] is False
    study_missing = {item["attribute"]: item["filled"] for item in body["never_returned"]["study"]}
    assert study_missing["NumberOfStudyRelatedSeries"] == "computed by lower-level C-FINDs"
    assert study_missing["ModalitiesInStudy"] == "computed by lower-level C-FINDs"
    assert body["implementation"]["version_name"].startswith("OFFIS_DCMTK")
    instance_missing = {item["attribute"]: item["filled"] for item in body["never_returned"]["instance"]}
    assert instance_missing["SOPClassUID"].startswith("from the spooled header")
    assert_basics(client, tanaka=False)
    # dcmqrscp leaves SOPClassUID out at IMAGE level; the series just retrieved fills it in.
    series = CT["series"][1]
    listed = search(client, f"/studies/{CT['study_uid']}/series/{series['series_uid']}/instances")
    assert len(listed) == series["num_instances"]
    assert {values(d, "00080016")[0] for d in listed} == {series["sop_class_uid"]}


# ------------------------------------------------------------------------------------ one quirk each


QUIRK_FACTS = {
    # quirk: (fact, its value as the probe saw it, the setting chosen and its value)
    "case_sensitive": ("pn_case_insensitive", "not found with its case changed: case-sensitive",
                       "case_sensitive_pn", True),
    "no_counts": ("modalities_in_study_matching", "found with a modality it lacks: the key is ignored",
                  "modalities_in_study_matching", False),
    "hierarchical": ("relational_queries", "refused at SERIES level", "relational_queries", False),
    "patient_root_only": ("find_models", "Patient Root", "query_model", "patient"),
    "no_c_get": ("c_get", "the Study Root C-GET model is not accepted", "retrieve", "move"),
    "no_move_originator": ("move_originator_id", "absent: arrivals are routed by SOP Instance UID", None, None),
    "no_compressed_get": ("get_compressed_contexts", "none accepted", "retrieve", "move"),
    "nagle": ("nagle", "stalls (Nagle on at the PACS", None, None),
    # Pooled for less than the PACS keeps them: half the time it stayed open (~1 s), to 0.1 s.
    "drops_idle": ("idle_associations", "closed by the PACS after", "query_idle_seconds",
                   lambda v: 0 < v < DROP_IDLE_AFTER),
    "result_cap": ("result_cap", f"capped at {RESULT_CAP} matches (partitions found", "result_cap", RESULT_CAP),
}


@pytest.mark.parametrize("quirk", sorted(QUIRK_FACTS))
def test_each_quirk_is_named_and_served_without_flags(quirk, serve, tmp_path, no_patient_data_logged):
    scp_port = free_port()
    with QuirkPacs(quirk, move_destinations={GW_AE: ("127.0.0.1", scp_port)}) as pacs:
        client = serve(config([node("quirky", pacs.ae_title, pacs.port)], tmp_path, scp_port=scp_port))
        # First contact (a Patient Root only PACS refuses it: Study Root is the default until the
        # profile says otherwise); the probe starts behind it.
        client.get("/dicom-web/studies", params={"PatientName": "tan*"})
        body = wait_profiled(client, "quirky")
        key, result, name, value = QUIRK_FACTS[quirk]
        assert result in fact(body, key)["result"], fact(body, key)
        # The table `dicomweb-gateway probe` prints names it too (its RESULT column wraps at 40).
        table = as_text(body)
        assert all(line in table for line in textwrap.wrap(fact(body, key)["result"], 40, break_on_hyphens=False))
        if name is not None:
            chosen = setting(body, name)
            assert (value(chosen["value"]) if callable(value) else chosen["value"] == value), chosen
            assert chosen["source"] == "learned"
        if quirk in LIMITED_QUIRKS:
            assert_capped_answers_are_flagged(client)
            return
        assert_basics(client, tanaka=True)
        if quirk == "no_compressed_get":
            # Compressed data comes by C-MOVE, which the profile chose: stored RLE, delivered as stored.
            assert str(retrieve_rle_instance(client).file_meta.TransferSyntaxUID) == "1.2.840.10008.1.2.5"


@pytest.mark.parametrize("quirk, learned", [("patient_root_only", ("query_model", "patient")),
                                            ("no_c_get", ("retrieve", "move")),
                                            ("no_compressed_get", ("retrieve", "move"))])
def test_a_first_contact_retrieval_waits_for_the_profile_it_started(quirk, learned, serve, tmp_path,
                                                                     no_patient_data_logged):
    """Safe while unknown, for retrieval: the first contact is a WADO-RS request that the safe
    defaults (Study Root, C-GET) cannot serve on this PACS. It waits for the probe it started and is
    served once more as the profile settled the node (gateway/profile/second_round.py), stored
    syntax unchanged; not a 502 until the probe ends."""
    scp_port = free_port()
    with QuirkPacs(quirk, move_destinations={GW_AE: ("127.0.0.1", scp_port)}) as pacs:
        client = serve(config([node("quirky", pacs.ae_title, pacs.port)], tmp_path, scp_port=scp_port))
        assert profile(client, "quirky")["state"] == "unknown"
        r = client.get(f"/dicom-web/studies/{MR['study_uid']}/series/{MR_RLE['series_uid']}",
                       headers={"Accept": 'multipart/related; type="application/dicom"; transfer-syntax=*'})
        assert r.status_code == 200, r.text
        got = [dcmread(io.BytesIO(body)) for _, body in parse_multipart(r.content, r.headers["content-type"])]
        assert sorted(str(ds.SOPInstanceUID) for ds in got) == sorted(MR_RLE["sop_instance_uids"])
        assert {str(ds.file_meta.TransferSyntaxUID) for ds in got} == {"1.2.840.10008.1.2.5"}
        name, value = learned
        body = profile(client, "quirky")
        assert body["state"] == "probed" and setting(body, name)["value"] == value
        if name == "retrieve":
            assert pacs.counters["move"] >= 2, "the probe's C-MOVE, then the request's"


def test_a_federated_retrieval_locates_the_study_on_a_patient_root_only_pacs(serve, tmp_path):
    """Locating a study for a federated URL asks each node in its model: the first node holds
    nothing; the second refuses Study Root (its profile unknown), is asked again in Patient Root
    once its probe has ended, and holds the study (its PatientID looked up, PS3.4 C.6.1)."""
    with QuirkPacs(None, [], ae_title="EMPTY") as empty, QuirkPacs("patient_root_only") as pacs:
        client = serve(config([node("empty", empty.ae_title, empty.port),
                               node("patientroot", pacs.ae_title, pacs.port)], tmp_path))
        series = CT["series"][1]
        r = client.get(f"/dicom-web/studies/{CT['study_uid']}/series/{series['series_uid']}/metadata")
        assert r.status_code == 200, r.text
        assert r.headers["X-Gateway-Node"] == "patientroot"
        assert len(r.json()) == series["num_instances"]
        missing = client.get("/dicom-web/studies/1.2.3.4.5.6/metadata")
        assert missing.status_code == 404, missing.text


def test_safe_defaults_while_nothing_is_known(serve, tmp_path, no_patient_data_logged):
    """Profiling off and no flags: every behaviour is the one correct on every PACS."""
    with QuirkPacs("no_counts", case_sensitive_pn=True) as pacs:
        client = serve(config([node("quirky", pacs.ae_title, pacs.port)], tmp_path, enabled=False))
        assert_basics(client, tanaka=True)
        body = profile(client, "quirky")
        assert body["state"] == "unknown" and fact(body, "pn_case_insensitive")["result"] == "not probed yet"
        chosen = {s["setting"]: (s["value"], s["source"]) for s in body["settings"]}
        assert chosen == {"query_model": ("study", "safe default"), "retrieve": ("get", "safe default"),
                          "case_sensitive_pn": (True, "safe default"), "compute_counts": (True, "safe default"),
                          "compute_modalities": (True, "safe default"),
                          "modalities_in_study_matching": (False, "safe default"),
                          "or_multiple_modalities": (False, "safe default"),
                          "relational_queries": (False, "safe default"),
                          "result_cap": (0, "safe default"), "query_idle_seconds": (5.0, "safe default")}
        assert profile(client, "quirky")["state"] == "unknown", "nothing was probed"


@pytest.mark.parametrize("configured", [None, 5])
def test_idle_associations_are_not_pooled_longer_than_the_pacs_keeps_them(configured, serve, tmp_path):
    """The drops_idle PACS aborts an association idle for 1 s (its ``aborted`` counter). Learned: the
    gateway pools this node's idle query associations for less (0.5 s), so a QIDO after more than
    1 s idle opens a fresh association and the PACS never has to drop one of ours. Configured to
    the old 5 s instead (no profile): the PACS drops the pooled one, and the next QIDO still gets
    its answer (the pool skips or retries a dead association), which is why 5 s is a safe default."""
    with QuirkPacs("drops_idle") as pacs:
        extra = {} if configured is None else {"query_idle_seconds": configured}
        client = serve(config([node("quirky", pacs.ae_title, pacs.port, **extra)], tmp_path,
                              enabled=configured is None))
        if configured is None:
            assert client.post("/admin/nodes/quirky/profile").status_code == 202
            chosen = setting(wait_profiled(client, "quirky"), "query_idle_seconds")
            assert chosen["source"] == "learned" and 0 < chosen["value"] < DROP_IDLE_AFTER, chosen
        time.sleep(DROP_IDLE_AFTER + 0.5)   # the probe's own idle associations (held, pooled) are gone
        opened, aborted = pacs.counters["associations"], pacs.counters["aborted"]
        # Two different searches (the second is no query-cache hit), each one C-FIND.
        assert patient_ids(search(client, "/studies", PatientID="DGW0001")) == {"DGW0001"}
        time.sleep(DROP_IDLE_AFTER + 0.5)
        assert patient_ids(search(client, "/studies", PatientID="DGW0002")) == {"DGW0002"}
        assert pacs.counters["associations"] - opened == 2, "each QIDO on an association of its own"
        dropped = pacs.counters["aborted"] - aborted
        if configured is None:
            assert dropped == 0, "no association of ours was left idle until the PACS dropped it"
        else:
            assert dropped == 1, "kept 5 s, the pooled association was dropped by the PACS after 1 s"


def test_a_configured_flag_wins_and_is_reported_as_overridden(serve, tmp_path):
    with QuirkPacs("case_sensitive") as pacs:
        client = serve(config([node("quirky", pacs.ae_title, pacs.port,
                                    quirks={"case_sensitive_pn": False})], tmp_path))
        r = client.post("/admin/nodes/quirky/profile")
        assert r.status_code == 202 and r.json()["state"] == "probing"
        body = wait_profiled(client, "quirky")
        assert setting(body, "case_sensitive_pn") == {"setting": "case_sensitive_pn", "value": False,
                                                      "source": "configured", "learned": True,
                                                      "overridden": True}
        assert fact(body, "pn_case_insensitive")["overridden"] == "yes (profile: true, differs)"
        # The configured value is what runs: PN keys go to the PACS as they are, case-sensitively.
        assert search(client, "/studies", PatientName="tan*") == []
        assert patient_ids(search(client, "/studies", PatientName="TAN*")) == {TANAKA_ID}


def test_an_upgraded_pacs_is_profiled_again(serve, tmp_path):
    port = free_port()
    with QuirkPacs("case_sensitive", port=port, version_name="QUIRK_A"):
        client = serve(config([node("quirky", "DEMOPACS", port)], tmp_path, identity_check=0.5))
        search(client, "/studies", PatientName="tan*")
        before = wait_profiled(client, "quirky")
        assert before["implementation"]["version_name"] == "QUIRK_A"
        assert setting(before, "case_sensitive_pn")["value"] is True
    with QuirkPacs(None, port=port, version_name="QUIRK_B"):
        time.sleep(0.6)
        # A contact (a new query: a cached answer reaches no PACS): the implementation check is due.
        search(client, "/studies", PatientID=TANAKA_ID)
        after = wait_profiled(client, "quirky", other_than=before["probed_at"])
        assert after["implementation"]["version_name"] == "QUIRK_B"
        assert setting(after, "case_sensitive_pn") == {"setting": "case_sensitive_pn", "value": False,
                                                       "source": "learned", "learned": False,
                                                       "overridden": False}


def test_the_profile_is_shared_through_redis(tmp_path, redis_url):
    """One replica probes; another adopts its profile from the cache instead of probing again."""
    prefix = f"dwg-profile-test-{time.time_ns()}:"
    with QuirkPacs("case_sensitive") as pacs:
        raw = config([node("quirky", pacs.ae_title, pacs.port)], tmp_path)
        raw["cache"] = {"url": redis_url, "prefix": prefix}
        with running_gateway(settings_from_dict(raw)) as url_a, httpx.Client(base_url=url_a, timeout=60) as a:
            a.post("/admin/nodes/quirky/profile")
            probed = wait_profiled(a, "quirky")
            retrieved = pacs.counters["get"]
            assert retrieved == 1, "A's probe retrieved one instance"
            with running_gateway(settings_from_dict(raw)) as url_b, \
                    httpx.Client(base_url=url_b, timeout=60) as b:
                search(b, "/studies", PatientID=TANAKA_ID)      # B's first contact
                body = wait_profiled(b, "quirky")
                assert body["probed_at"] == probed["probed_at"]
                assert setting(body, "case_sensitive_pn")["value"] is True
                assert pacs.counters["get"] == retrieved, "B did not probe"
    import redis

    stored = redis.Redis.from_url(redis_url).get(prefix + "profile:quirky")
    assert stored and json.loads(stored)["implementation_version_name"] == "QUIRKPACS_1"
    assert not PATIENT_DATA.search(stored.decode()), "the shared profile holds no patient data"


# ------------------------------------------------------------------------------------ visible, no PHI


def test_probe_command_metrics_and_cache_hold_no_patient_data(serve, tmp_path, no_patient_data_logged):
    with QuirkPacs("case_sensitive") as pacs:
        cfg = tmp_path / "gateway.yaml"
        cfg.write_text(yaml.safe_dump({"nodes": [node("quirky", pacs.ae_title, pacs.port)]}))
        cli = [sys.executable, "-m", "gateway.cli", "probe", "--config", str(cfg)]
        table = subprocess.run(cli, capture_output=True, text=True, timeout=120)
        assert table.returncode == 0, table.stderr
        assert "case-sensitive" in table.stdout and "QUIRKPACS_1" in table.stdout
        as_json = subprocess.run(cli + ["quirky", "--json"], capture_output=True, text=True, timeout=120)
        assert as_json.returncode == 0, as_json.stderr
        printed = json.loads(as_json.stdout)
        assert printed["node"] == "quirky" and setting(printed, "case_sensitive_pn")["value"] is True
        for out in (table.stdout, table.stderr, as_json.stdout, as_json.stderr):
            assert not PATIENT_DATA.search(out), PATIENT_DATA.search(out)

        client = serve(config([node("quirky", pacs.ae_title, pacs.port)], tmp_path))
        client.post("/admin/nodes/quirky/profile")
        body = wait_profiled(client, "quirky")
        assert not PATIENT_DATA.search(json.dumps(body))
        metrics = client.get("/metrics").text
        assert re.search(r'dwg_pacs_profile_info\{node="quirky",state="probed",implementation_class_uid="[0-9.]+",'
                         r'implementation_version_name="QUIRKPACS_1"\} 1', metrics)
        assert ('dwg_pacs_behaviour_info{node="quirky",setting="case_sensitive_pn",value="true",'
                'source="learned"} 1') in metrics
        assert not PATIENT_DATA.search(metrics)
        missing = client.get("/admin/nodes/nosuch/profile")
        assert missing.status_code == 404 and missing.json()["error"] == "NotFound"


def test_the_admin_endpoint_follows_authentication_and_grants(tmp_path):
    import hashlib

    def key(secret: str, name: str, operations: list[str]) -> dict[str, Any]:
        return {"sha256": hashlib.sha256(secret.encode()).hexdigest(), "name": name,
                "grants": [{"nodes": ["quirky"], "operations": operations}]}

    with QuirkPacs(None) as pacs:
        raw = config([node("quirky", pacs.ae_title, pacs.port)], tmp_path, enabled=False)
        raw["auth"] = {"mode": "api_key", "api_keys": [key("reader", "reader", ["search"]),
                                                       key("admin", "admin", ["search", "retrieve"]),
                                                       key("storer", "storer", ["store"])]}
        with running_gateway(settings_from_dict(raw)) as url, httpx.Client(base_url=url, timeout=60) as c:
            path = "/admin/nodes/quirky/profile"
            assert c.get(path).status_code == 401
            assert c.get(path, headers={"X-Api-Key": "storer"}).status_code == 403
            assert c.get("/admin/nodes/nosuch/profile", headers={"X-Api-Key": "admin"}).status_code == 403
            assert c.get(path, headers={"X-Api-Key": "reader"}).json()["state"] == "unknown"
            assert c.post(path, headers={"X-Api-Key": "reader"}).status_code == 403, "a probe retrieves"
            assert c.post(path, headers={"X-Api-Key": "admin"}).status_code == 202
            deadline = time.monotonic() + 30
            while c.get(path, headers={"X-Api-Key": "admin"}).json()["state"] != "probed":
                assert time.monotonic() < deadline
                time.sleep(0.1)
