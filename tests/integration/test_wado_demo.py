"""WADO-RS behaviour counted at the peer (in-process SCP): single-flight, spool reuse, cancel,
rendered/thumbnail, bulkdata, WADO-URI."""

from __future__ import annotations

import io
import threading
import time
from collections.abc import Iterator

import httpx
import numpy as np
import pytest
from PIL import Image
from pydicom import dcmread

from gateway.demo_data import DEMO_STUDIES, DemoScale, generate_demo_datasets
from gateway.dimse.demo_pacs import DemoPacs
from gateway.settings import settings_from_dict
from tests.support.multipart import parse_multipart
from tests.support.server import running_gateway

CT = next(s for s in DEMO_STUDIES if s["accession_number"] == "A2303140011")
AXIAL = CT["series"][1]
MF = next(s for s in DEMO_STUDIES if "OT" in s["modalities"])
MF_SERIES = MF["series"][0]
MF_SOP = MF_SERIES["sop_instance_uids"][0]


@pytest.fixture(scope="module")
def datasets():
    return {str(ds.SOPInstanceUID): ds for ds in generate_demo_datasets()}


@pytest.fixture()
def pacs(datasets):
    with DemoPacs(datasets.values(), ae_title="WADOPACS") as p:
        yield p


def gateway(pacs, tmp_path, **extra) -> Iterator[httpx.Client]:
    settings = settings_from_dict({
        "spool": {"path": str(tmp_path / "spool")},
        "nodes": [{"name": "demo", "ae_title": "WADOPACS", "host": "127.0.0.1", "port": pacs.port}], **extra})
    with running_gateway(settings) as url, httpx.Client(base_url=url + "/dicom-web", timeout=60) as client:
        yield client


@pytest.fixture()
def gw(pacs, tmp_path):
    yield from gateway(pacs, tmp_path)


@pytest.fixture()
def unprobed(pacs, tmp_path):
    """For tests that count retrievals at the PACS: the profile probe's C-GET would be counted."""
    yield from gateway(pacs, tmp_path, profiling={"enabled": False})


def series_url(study, series):
    return f"/studies/{study['study_uid']}/series/{series['series_uid']}"


def test_concurrent_identical_requests_share_one_retrieval(unprobed, pacs):
    url = series_url(CT, AXIAL) + "/metadata"
    results: list[int] = []

    def worker():
        results.append(len(unprobed.get(url).json()))

    threads = [threading.Thread(target=worker) for _ in range(10)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [AXIAL["num_instances"]] * 10
    assert pacs.counters["get"] == 1, "one C-GET for ten concurrent requests (counted at the PACS)"
    assert pacs.counters["sent"] == AXIAL["num_instances"]
    # Repeated requests come from the spool: no further retrieval.
    r = unprobed.get(series_url(CT, AXIAL))
    assert r.status_code == 200
    assert len(parse_multipart(r.content, r.headers["content-type"])) == AXIAL["num_instances"]
    sop = AXIAL["sop_instance_uids"][4]
    assert unprobed.get(series_url(CT, AXIAL) + f"/instances/{sop}/frames/1").status_code == 200
    assert pacs.counters["get"] == 1 and pacs.counters["sent"] == AXIAL["num_instances"]


def test_frame_request_fetches_its_instance_first_then_the_series(unprobed, pacs):
    sop = AXIAL["sop_instance_uids"][-1]
    r = unprobed.get(series_url(CT, AXIAL) + f"/instances/{sop}/frames/1")
    assert r.status_code == 200
    first = pacs.received_retrieve_identifiers[0]
    assert first.QueryRetrieveLevel == "IMAGE" and first.SOPInstanceUID == sop
    deadline = time.monotonic() + 10
    while pacs.counters["sent"] < AXIAL["num_instances"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert pacs.counters["sent"] == AXIAL["num_instances"], "the rest of the series is prefetched"


def test_client_disconnect_mid_stream_cancels_the_retrieval(datasets, tmp_path):
    big = generate_demo_datasets(DemoScale(ct_slices=160, ct_size=256))
    study = next(ds for ds in big if ds.AccessionNumber == "A2303140011" and ds.SeriesNumber == 2)
    with DemoPacs(big, ae_title="BIG", max_pdu=16382) as pacs:
        settings = settings_from_dict({"spool": {"path": str(tmp_path / "s")}, "nodes": [
            {"name": "big", "ae_title": "BIG", "host": "127.0.0.1", "port": pacs.port}],
            "profiling": {"enabled": False}})   # a probe's capped C-FIND (C-CANCEL) would be counted
        with running_gateway(settings) as url:
            target = f"{url}/dicom-web/studies/{study.StudyInstanceUID}/series/{study.SeriesInstanceUID}"
            with httpx.stream("GET", target, timeout=30) as r:
                assert r.status_code == 200
                next(r.iter_bytes())        # headers and the first bytes arrived while the PACS sends
            deadline = time.monotonic() + 15
            while pacs.counters["cancel"] == 0 and time.monotonic() < deadline:
                time.sleep(0.05)
            assert pacs.counters["cancel"] == 1, "the last waiter left: C-CANCEL"
            assert pacs.counters["sent"] < 160
            leaked = [t.name for t in threading.enumerate() if t.name.startswith("retrieve")
                      and t.is_alive() and "idle" not in t.name]
            assert len(leaked) <= 32


def test_rendered_and_thumbnail(gw, datasets):
    sop = AXIAL["sop_instance_uids"][10]
    r = gw.get(series_url(CT, AXIAL) + f"/instances/{sop}/rendered")
    assert r.status_code == 200 and r.headers["content-type"] == "image/jpeg"
    img = Image.open(io.BytesIO(r.content))
    ds = datasets[sop]
    assert img.size == (ds.Columns, ds.Rows)
    png = gw.get(series_url(CT, AXIAL) + f"/instances/{sop}/rendered", params={"accept": "image/png"})
    assert png.headers["content-type"] == "image/png"
    rendered = np.asarray(Image.open(io.BytesIO(png.content)).convert("L"), dtype=float)
    # Independent linear VOI (PS3.3 C.11.2.1.2.1) from the dataset's first window.
    hu = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    c, w = float(ds.WindowCenter[0] if ds["WindowCenter"].VM > 1 else ds.WindowCenter), \
        float(ds.WindowWidth[0] if ds["WindowWidth"].VM > 1 else ds.WindowWidth)
    expected = np.clip(((hu - (c - 0.5)) / (w - 1) + 0.5) * 255, 0, 255)
    assert np.abs(rendered - expected).mean() < 1.5
    # OHIF thumbnail: ?accept=image/jpeg wins over its multipart Accept header.
    thumb = gw.get(series_url(CT, AXIAL) + "/thumbnail", params={"accept": "image/jpeg"},
                   headers={"Accept": 'multipart/related; type="application/octet-stream"'})
    assert thumb.status_code == 200 and thumb.headers["content-type"] == "image/jpeg"
    assert max(Image.open(io.BytesIO(thumb.content)).size) <= 128
    study_thumb = gw.get(f"/studies/{CT['study_uid']}/thumbnail", params={"viewport": "64,64"})
    assert study_thumb.status_code == 200 and max(Image.open(io.BytesIO(study_thumb.content)).size) == 64
    frames = gw.get(f"/studies/{MF['study_uid']}/series/{MF_SERIES['series_uid']}/instances/{MF_SOP}"
                    "/frames/2,5/rendered", params={"accept": "image/png"})
    assert len(parse_multipart(frames.content, frames.headers["content-type"])) == 2
    assert gw.get(series_url(CT, AXIAL) + f"/instances/{sop}/rendered",
                  params={"window": "abc"}).status_code == 400
    assert gw.get(series_url(CT, AXIAL) + f"/instances/{sop}/rendered",
                  headers={"Accept": "application/dicom"}).status_code == 406


def test_bulkdata_uris_from_metadata_with_range(gw, datasets):
    meta = gw.get(series_url(CT, AXIAL) + "/metadata").json()
    item = next(m for m in meta if m["00080018"]["Value"][0] == AXIAL["sop_instance_uids"][0])
    uri = item["7FE00010"]["BulkDataURI"]
    src = datasets[AXIAL["sop_instance_uids"][0]].PixelData
    whole = httpx.get(uri, headers={"Accept": "application/octet-stream"})
    assert whole.status_code == 200 and whole.content == src
    part = httpx.get(uri, headers={"Accept": "application/octet-stream", "Range": "bytes=100-199"})
    assert part.status_code == 206 and part.content == src[100:200]
    assert part.headers["content-range"] == f"bytes 100-199/{len(src)}"
    multi = httpx.get(uri)
    (headers, body), = parse_multipart(multi.content, multi.headers["content-type"])
    assert body == src and headers["Content-Location"] == uri


def test_forwarded_headers_only_from_trusted_proxies(gw):
    meta = gw.get(series_url(CT, AXIAL) + "/metadata",
                  headers={"X-Forwarded-Proto": "https", "X-Forwarded-Host": "pacs.example.org",
                           "X-Forwarded-Prefix": "/gw"}).json()
    assert meta[0]["7FE00010"]["BulkDataURI"].startswith("https://pacs.example.org/gw/dicom-web/studies/")


def test_wado_uri(gw, datasets):
    root = str(gw.base_url).rsplit("/dicom-web", 1)[0]
    sop = AXIAL["sop_instance_uids"][2]
    params = {"requestType": "WADO", "studyUID": CT["study_uid"], "seriesUID": AXIAL["series_uid"],
              "objectUID": sop}
    jpeg = httpx.get(root + "/wado", params=params)
    assert jpeg.status_code == 200 and jpeg.headers["content-type"] == "image/jpeg"
    dicom = httpx.get(root + "/wado", params={**params, "contentType": "application/dicom",
                                              "transferSyntax": "*"})
    assert dicom.status_code == 200
    assert dcmread(io.BytesIO(dicom.content)).PixelData == datasets[sop].PixelData
    mf = httpx.get(root + "/wado", params={"requestType": "WADO", "studyUID": MF["study_uid"],
                                           "seriesUID": MF_SERIES["series_uid"], "objectUID": MF_SOP,
                                           "frame": "3", "contentType": "image/png"})
    assert mf.status_code == 200 and mf.headers["content-type"] == "image/png"
    assert httpx.get(root + "/wado", params={"requestType": "WADO"}).status_code == 400


def test_metrics_endpoint(gw, pacs):
    gw.get(series_url(CT, AXIAL) + "/metadata")
    root = str(gw.base_url).rsplit("/dicom-web", 1)[0]
    text = httpx.get(root + "/metrics").text
    values = dict(line.rsplit(" ", 1) for line in text.splitlines() if line and not line.startswith("#"))
    assert float(values["dwg_retrievals_total"]) == 1
    assert float(values["dwg_spool_bytes"]) > 0
    assert float(values['dwg_query_associations_opened_total{node="demo"}']) >= 1


def test_wado_uri_on_the_dicomweb_root_and_no_implicit_vr_on_the_web(gw, datasets):
    root = str(gw.base_url).rstrip("/")
    sop = AXIAL["sop_instance_uids"][1]
    params = {"requestType": "WADO", "studyUID": CT["study_uid"], "seriesUID": AXIAL["series_uid"],
              "objectUID": sop, "contentType": "application/dicom", "transferSyntax": "*"}
    for url in (root, root + "/"):
        r = httpx.get(url, params=params, follow_redirects=False)
        assert r.status_code == 200, (url, r.status_code)
    # Whatever syntax the C-GET agreed, web clients never get Implicit VR LE (PS3.18 §8.7.3).
    r = gw.get(series_url(CT, AXIAL), headers={"Accept": 'multipart/related; type="application/dicom"; transfer-syntax=*'})
    for headers, body in parse_multipart(r.content, r.headers["content-type"]):
        assert "transfer-syntax=1.2.840.10008.1.2;" not in headers["Content-Type"] + ";"
        assert str(dcmread(io.BytesIO(body)).file_meta.TransferSyntaxUID) != "1.2.840.10008.1.2"
    meta = gw.get(series_url(CT, AXIAL) + "/metadata").json()
    assert {m["00083002"]["Value"][0] for m in meta} == {"1.2.840.10008.1.2.1"}


def test_pixeldata_resource(gw, datasets):
    url = f"/studies/{MF['study_uid']}/series/{MF_SERIES['series_uid']}/instances/{MF_SOP}/pixeldata"
    r = gw.get(url)
    assert r.status_code == 200
    parts = parse_multipart(r.content, r.headers["content-type"])
    src = datasets[MF_SOP]
    frame_len = src.Rows * src.Columns * src.BitsAllocated // 8
    assert len(parts) == int(src.NumberOfFrames)
    assert b"".join(body for _, body in parts) == src.PixelData[:frame_len * int(src.NumberOfFrames)]
