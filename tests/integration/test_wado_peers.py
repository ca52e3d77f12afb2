"""WADO-RS through the gateway against real Orthanc (C-GET and C-MOVE), dcmqrscp (C-MOVE, C-GET) and
each quirk PACS (tests/support/quirk_pacs.py).

Everything retrieved is compared with the source files the peers were loaded with: pixel data byte
for byte, headers field by field. The quirk PACS nodes name their address only: no ``retrieve``, no
``query_model``, no quirk flags; the profile (probed at first contact, C-MOVE included) decides, and
the first request runs while it is unknown (issue 14; docs/architecture.md, "PACS profiles").
"""

from __future__ import annotations

from collections.abc import Iterator
from io import BytesIO
from pathlib import Path

import httpx
import pytest
from dicomweb_client.api import DICOMwebClient
from pydicom import dcmread
from pydicom.encaps import generate_frames

from gateway.demo_data import DEMO_STUDIES
from gateway.settings import settings_from_dict
from tests.support.multipart import parse_multipart
from tests.support.quirk_pacs import QUIRKS, QuirkPacs
from tests.support.server import running_gateway

CT = next(s for s in DEMO_STUDIES if s["accession_number"] == "A2303140011")
CT_AXIAL = CT["series"][1]
MR = next(s for s in DEMO_STUDIES if s["accession_number"] == "A2206210031")
MR_RLE = next(s for s in MR["series"] if s["transfer_syntax_uid"] == "1.2.840.10008.1.2.5")
MF = next(s for s in DEMO_STUDIES if "OT" in s["modalities"])
MF_SERIES = MF["series"][0]
MF_SOP = MF_SERIES["sop_instance_uids"][0]
EXPLICIT = "1.2.840.10008.1.2.1"
RLE = "1.2.840.10008.1.2.5"

CONFIGS = ["orthanc-get", "orthanc-move", "dcmqrscp-move", "dcmqrscp-get", *(f"quirk:{q}" for q in QUIRKS)]
TIMEOUTS = {"connect": 3, "acse": 5, "dimse": 30, "network": 60}
GW_AE = "DICOMWEBGW"


@pytest.fixture(scope="module")
def sources(demo_files: list[Path]) -> dict[str, Path]:
    return {str(dcmread(p, stop_before_pixels=True).SOPInstanceUID): p for p in demo_files}


@pytest.fixture(scope="module", params=CONFIGS)
def gw(request, orthanc, dcmqrscp, demo_files, gateway_scp_port, tmp_path_factory) -> Iterator[httpx.Client]:
    gateway = {"ae_title": GW_AE, "dimse_port": gateway_scp_port, "dimse_host": "127.0.0.1"}
    spool = {"path": str(tmp_path_factory.mktemp("spool"))}
    quirk: QuirkPacs | None = None
    if request.param.startswith("quirk:"):
        # The same files as the real peers, and the gateway's storage SCP as the C-MOVE destination.
        quirk = QuirkPacs(request.param.split(":")[1], [], files=demo_files,
                          move_destinations={GW_AE: ("127.0.0.1", gateway_scp_port)})
        quirk.start()
        # Its address only: retrieve, query_model and the quirks are learned (issue 14).
        node = {"name": "quirk", "ae_title": quirk.ae_title, "host": "127.0.0.1", "port": quirk.port,
                "timeouts": TIMEOUTS}
        raw = {"gateway": gateway, "spool": spool, "nodes": [node], "profiling": {"probe_move": True}}
    else:
        kind, retrieve = request.param.split("-")
        peer = orthanc if kind == "orthanc" else dcmqrscp
        raw = {"gateway": gateway, "spool": spool,
               "nodes": [{"name": kind, "ae_title": peer.ae_title, "host": "127.0.0.1", "port": peer.dicom_port,
                          # retrieve is the suite's dimension; no quirk flags (the profile decides, issue 14)
                          "retrieve": retrieve, "timeouts": TIMEOUTS}]}
    try:
        with running_gateway(settings_from_dict(raw)) as url, \
                httpx.Client(base_url=url + "/dicom-web", timeout=60) as client:
            client.config = request.param  # type: ignore[attr-defined]
            yield client
    finally:
        if quirk is not None:
            quirk.stop()


def pixel_bytes(data: bytes | Path) -> tuple[str, bytes]:
    ds = dcmread(BytesIO(data) if isinstance(data, bytes) else data)
    return str(ds.file_meta.TransferSyntaxUID), ds.PixelData


def test_series_retrieve_is_byte_identical_in_stored_syntax(gw, sources):
    r = gw.get(f"/studies/{MR['study_uid']}/series/{MR_RLE['series_uid']}",
               headers={"Accept": 'multipart/related; type="application/dicom"; transfer-syntax=*'})
    assert r.status_code == 200, r.text
    parts = parse_multipart(r.content, r.headers["content-type"])
    assert len(parts) == MR_RLE["num_instances"]
    got = set()
    for headers, body in parts:
        ts, pixels = pixel_bytes(body)
        assert headers["Content-Type"] == f"application/dicom; transfer-syntax={ts}"
        sop = str(dcmread(BytesIO(body), stop_before_pixels=True).SOPInstanceUID)
        assert headers["Content-Location"].endswith(f"/instances/{sop}")
        src_ts, src_pixels = pixel_bytes(sources[sop])
        assert ts == src_ts == RLE
        assert pixels == src_pixels
        got.add(sop)
    assert got == set(MR_RLE["sop_instance_uids"])


def test_default_application_dicom_is_explicit_vr_little_endian(gw, sources):
    r = gw.get(f"/studies/{MR['study_uid']}/series/{MR_RLE['series_uid']}")
    assert r.status_code == 200
    parts = parse_multipart(r.content, r.headers["content-type"])
    for headers, body in parts:
        ds = dcmread(BytesIO(body))
        assert str(ds.file_meta.TransferSyntaxUID) == EXPLICIT
        assert headers["Content-Type"] == f"application/dicom; transfer-syntax={EXPLICIT}"
        src = dcmread(sources[str(ds.SOPInstanceUID)])
        assert (ds.pixel_array == src.pixel_array).all()


def test_study_retrieve_has_every_instance(gw):
    r = gw.get(f"/studies/{CT['study_uid']}")
    assert r.status_code == 200
    parts = parse_multipart(r.content, r.headers["content-type"])
    sops = {str(dcmread(BytesIO(b), stop_before_pixels=True).SOPInstanceUID) for _, b in parts}
    assert sops == {u for s in CT["series"] for u in s["sop_instance_uids"]}


REPORT = next(s for s in DEMO_STUDIES if "SR" in s["modalities"])


def test_a_report_and_images_are_retrieved_whole_and_unchanged(gw, sources):
    # The report (Basic Text SR) is of a class the first C-GET of its series, which proposes common
    # image classes only, does not offer: its class is looked up and it is retrieved with it
    # (docs/architecture.md, "Retrieval"; dcmqrscp names no class: the common storage classes).
    r = gw.get(f"/studies/{REPORT['study_uid']}",
               headers={"Accept": 'multipart/related; type="application/dicom"; transfer-syntax=*'})
    assert r.status_code == 200, r.text
    parts = parse_multipart(r.content, r.headers["content-type"])
    got = {str(dcmread(BytesIO(b), stop_before_pixels=True).SOPInstanceUID): b for _, b in parts}
    assert set(got) == {u for s in REPORT["series"] for u in s["sop_instance_uids"]}
    assert "SR" in {s["modality"] for s in REPORT["series"]}
    for sop, body in got.items():
        assert dcmread(BytesIO(body)) == dcmread(sources[sop]), "every element as stored"


def test_single_instance_single_part(gw, sources):
    sop = CT_AXIAL["sop_instance_uids"][5]
    r = gw.get(f"/studies/{CT['study_uid']}/series/{CT_AXIAL['series_uid']}/instances/{sop}",
               headers={"Accept": "application/dicom"})
    assert r.status_code == 200
    assert r.headers["content-type"] == f"application/dicom; transfer-syntax={EXPLICIT}"
    assert pixel_bytes(r.content)[1] == pixel_bytes(sources[sop])[1]


def test_series_metadata_matches_source_headers(gw, sources):
    r = gw.get(f"/studies/{CT['study_uid']}/series/{CT_AXIAL['series_uid']}/metadata")
    assert r.status_code == 200 and r.headers["content-type"] == "application/dicom+json"
    body = r.json()
    assert len(body) == CT_AXIAL["num_instances"]
    base = str(gw.base_url).rstrip("/")
    for item in body:
        sop = item["00080018"]["Value"][0]
        src = dcmread(sources[sop], stop_before_pixels=True)
        assert item["00280010"]["Value"] == [src.Rows]
        assert item["00280011"]["Value"] == [src.Columns]
        assert item["00200032"]["Value"] == [float(v) for v in src.ImagePositionPatient]
        assert item["00100010"]["Value"][0]["Alphabetic"] == str(src.PatientName)
        assert item["00281053"]["Value"] == [float(src.RescaleSlope)]
        assert item["00083002"]["Value"] == [EXPLICIT]
        assert item["7FE00010"]["BulkDataURI"].startswith(base + "/studies/")
        assert "00020010" not in item
        assert list(item) == sorted(item)


def test_study_and_instance_metadata(gw):
    study = gw.get(f"/studies/{CT['study_uid']}/metadata").json()
    assert len(study) == CT["num_instances"]
    sop = CT_AXIAL["sop_instance_uids"][0]
    one = gw.get(f"/studies/{CT['study_uid']}/series/{CT_AXIAL['series_uid']}/instances/{sop}/metadata").json()
    assert len(one) == 1 and one[0]["00080018"]["Value"] == [sop]


@pytest.mark.parametrize("accept", [
    'multipart/related; type="application/octet-stream"; transfer-syntax="*"',   # OHIF default
    "multipart/related; type=application/octet-stream; transfer-syntax=*",       # omitQuotation...
])
def test_multiframe_frames_in_requested_order(gw, sources, accept):
    r = gw.get(f"/studies/{MF['study_uid']}/series/{MF_SERIES['series_uid']}/instances/{MF_SOP}/frames/3,1,7",
               headers={"Accept": accept})
    assert r.status_code == 200, r.text
    parts = parse_multipart(r.content, r.headers["content-type"])
    src = dcmread(sources[MF_SOP])
    frame_len = src.Rows * src.Columns * src.BitsAllocated // 8
    for (headers, body), n in zip(parts, [3, 1, 7], strict=True):
        assert headers["Content-Type"] == f"application/octet-stream; transfer-syntax={EXPLICIT}"
        assert headers["Content-Location"].endswith(f"/frames/{n}")
        assert body == src.PixelData[(n - 1) * frame_len:n * frame_len]


def test_compressed_frames_native_and_transcoded(gw, sources):
    sop = MR_RLE["sop_instance_uids"][3]
    url = f"/studies/{MR['study_uid']}/series/{MR_RLE['series_uid']}/instances/{sop}/frames/1"
    r = gw.get(url, headers={"Accept": 'multipart/related; type="application/octet-stream"; transfer-syntax=*'})
    (headers, body), = parse_multipart(r.content, r.headers["content-type"])
    assert headers["Content-Type"] == f"image/dicom-rle; transfer-syntax={RLE}"
    src = dcmread(sources[sop])
    assert body == next(generate_frames(src.PixelData, number_of_frames=1))
    r = gw.get(url, headers={"Accept": 'multipart/related; type="application/octet-stream"'})
    (headers, body), = parse_multipart(r.content, r.headers["content-type"])
    assert headers["Content-Type"] == f"application/octet-stream; transfer-syntax={EXPLICIT}"
    assert body == src.pixel_array.tobytes()


def test_bad_frames_and_unknown_uids(gw):
    base = f"/studies/{MF['study_uid']}/series/{MF_SERIES['series_uid']}/instances/{MF_SOP}"
    assert gw.get(base + "/frames/0").status_code == 400
    assert gw.get(base + "/frames/99").status_code == 400
    assert gw.get(base + "/frames/1,1").status_code == 400
    assert gw.get(base + "/frames/x").status_code == 400
    assert gw.get("/studies/1.2.3.4.5.6/metadata").status_code == 404
    assert gw.get(f"/studies/{MF['study_uid']}/series/1.2.3.999/metadata").status_code == 404
    r = gw.get(f"/studies/{MF['study_uid']}/series/{MF_SERIES['series_uid']}/instances/1.2.3.999")
    assert r.status_code == 404 and r.json()["error"] == "NotFound"


def test_406_is_decided_before_any_dimse(gw):
    r = gw.get(f"/studies/{CT['study_uid']}", headers={"Accept": "image/png"})
    assert r.status_code == 406
    r = gw.get("/studies/1.2.3.4.5.6.7/metadata", headers={"Accept": "application/dicom"})
    assert r.status_code == 406


def test_python_dicomweb_client(gw, sources):
    client = DICOMwebClient(url=str(gw.base_url).rstrip("/"))
    instances = client.retrieve_series(CT["study_uid"], CT_AXIAL["series_uid"])
    assert {str(i.SOPInstanceUID) for i in instances} == set(CT_AXIAL["sop_instance_uids"])
    frames = client.retrieve_instance_frames(MF["study_uid"], MF_SERIES["series_uid"], MF_SOP,
                                             frame_numbers=[2, 4])
    src = dcmread(sources[MF_SOP])
    frame_len = src.Rows * src.Columns * 2
    assert frames == [src.PixelData[frame_len:2 * frame_len], src.PixelData[3 * frame_len:4 * frame_len]]
    meta = client.retrieve_series_metadata(CT["study_uid"], CT_AXIAL["series_uid"])
    assert len(meta) == CT_AXIAL["num_instances"]
    inst = client.retrieve_instance(CT["study_uid"], CT_AXIAL["series_uid"], CT_AXIAL["sop_instance_uids"][0])
    assert str(inst.SOPInstanceUID) == CT_AXIAL["sop_instance_uids"][0]
