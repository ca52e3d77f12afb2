"""WADO-RS failure handling: PACS without C-GET, unexpected C-STOREs, concurrent C-MOVEs."""

from __future__ import annotations

import threading
from io import BytesIO

import httpx
import pytest
from pydicom import dcmread
from pynetdicom import AE, StoragePresentationContexts, evt

from gateway.demo_data import DEMO_STUDIES, generate_demo_datasets
from gateway.settings import settings_from_dict
from tests.support.multipart import parse_multipart
from tests.support.server import free_port, running_gateway

CT = next(s for s in DEMO_STUDIES if s["accession_number"] == "A2303140011")
MR = next(s for s in DEMO_STUDIES if s["accession_number"] == "A2206210031")


def test_pacs_without_c_get_is_a_clear_502(tmp_path):
    """A Q/R SCP that answers C-FIND but offers no C-GET (many PACS): 502 telling what to configure."""
    from translators.matching import build_response, dataset_matches

    datasets = generate_demo_datasets()

    def on_find(event):
        for ds in datasets:
            if dataset_matches(event.identifier, ds):
                yield 0xFF00, build_response(event.identifier, ds)

    ae = AE("FINDONLY")
    ae.add_supported_context("1.2.840.10008.5.1.4.1.2.2.1")
    server = ae.start_server(("127.0.0.1", 0), block=False, evt_handlers=[(evt.EVT_C_FIND, on_find)])
    try:
        settings = settings_from_dict({"spool": {"path": str(tmp_path)}, "nodes": [
            {"name": "fo", "ae_title": "FINDONLY", "host": "127.0.0.1", "port": server.server_address[1]}]})
        with running_gateway(settings) as url:
            series = CT["series"][0]
            r = httpx.get(f"{url}/dicom-web/studies/{CT['study_uid']}/series/{series['series_uid']}", timeout=30)
            assert r.status_code == 502
            assert "retrieve: move" in r.json()["detail"] and r.json()["node"] == "fo"
    finally:
        server.shutdown()


def test_unexpected_c_store_is_refused(orthanc, tmp_path):
    port = free_port()
    settings = settings_from_dict({"gateway": {"dimse_port": port, "dimse_host": "127.0.0.1"},
                                   "spool": {"path": str(tmp_path)},
                                   "nodes": [{"name": "o", "ae_title": orthanc.ae_title, "host": "127.0.0.1",
                                              "port": orthanc.dicom_port, "retrieve": "move"}]})
    with running_gateway(settings):
        stranger = AE("INTRUDER")
        stranger.requested_contexts = StoragePresentationContexts
        assoc = stranger.associate("127.0.0.1", port, ae_title="DICOMWEBGW")
        assert assoc.is_rejected, "only the configured nodes' AE titles may associate with the storage SCP"
        # The configured PACS's own AE title gets an association, but nothing it was not asked for.
        known = AE(orthanc.ae_title)
        known.requested_contexts = StoragePresentationContexts
        assoc = known.associate("127.0.0.1", port, ae_title="DICOMWEBGW")
        assert assoc.is_established
        ds = generate_demo_datasets()[0]
        status = assoc.send_c_store(ds)
        assoc.release()
        assert status.Status == 0x0124, "a C-STORE matching no pending C-MOVE must not enter the spool"
    assert list(tmp_path.rglob("*.dcm")) == []


@pytest.mark.parametrize("retrieve", ["move", "get"])
def test_concurrent_retrievals_of_different_series_are_kept_apart(orthanc, gateway_scp_port, tmp_path, retrieve):
    settings = settings_from_dict({"gateway": {"dimse_port": gateway_scp_port, "dimse_host": "127.0.0.1"},
                                   "spool": {"path": str(tmp_path)},
                                   "nodes": [{"name": "o", "ae_title": orthanc.ae_title, "host": "127.0.0.1",
                                              "port": orthanc.dicom_port, "retrieve": retrieve}]})
    wanted = [(CT, CT["series"][1]), (MR, MR["series"][0]), (MR, MR["series"][1]), (CT, CT["series"][0])]
    results: dict[str, set[str]] = {}
    with running_gateway(settings) as url:
        def worker(study, series):
            r = httpx.get(f"{url}/dicom-web/studies/{study['study_uid']}/series/{series['series_uid']}",
                          headers={"Accept": 'multipart/related; type="application/dicom"; transfer-syntax=*'},
                          timeout=60)
            assert r.status_code == 200
            parts = parse_multipart(r.content, r.headers["content-type"])
            results[series["series_uid"]] = {
                str(dcmread(BytesIO(b), stop_before_pixels=True).SOPInstanceUID) for _, b in parts}

        threads = [threading.Thread(target=worker, args=pair) for pair in wanted]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    for _, series in wanted:
        assert results[series["series_uid"]] == set(series["sop_instance_uids"])
