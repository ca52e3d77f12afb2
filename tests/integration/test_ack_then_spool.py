"""An instance acknowledged to the PACS but not spooled is retrieved again (docs/architecture.md, "Cache").

The fast engine answers each C-STORE (C-GET sub-operation, C-MOVE arrival at the storage SCP) before
it spools the instance: the PACS keeps the data, the spool is a cache. So a write that fails after the
acknowledgement (here the spool refuses one instance's first write, as a full disk would) leaves
that instance missing, and the retrieval's completeness check must bring it again: the client gets
every instance. On the pynetdicom engine the same fault is answered A700 before any acknowledgement;
the outcome for the client is the same.
"""

from __future__ import annotations

import logging
import threading
import time
from io import BytesIO
from typing import Any

import httpx
import pytest
from pydicom import dcmread

from cache.spool import Spool
from gateway.demo_data import DEMO_STUDIES
from gateway.dimse.pacs import PynetdicomPacs
from gateway.settings import settings_from_dict
from tests.integration.peers import OrthancPeer
from tests.support.multipart import parse_multipart
from tests.support.server import running_gateway

CT = next(s for s in DEMO_STUDIES if s["accession_number"] == "A2303140011")


def _settings(orthanc: OrthancPeer, scp_port: int, tmp_path: Any, retrieve: str, **sections: Any) -> Any:
    return settings_from_dict({"gateway": {"dimse_port": scp_port, "dimse_host": "127.0.0.1"},
                               "spool": {"path": str(tmp_path)}, **sections,
                               "nodes": [{"name": "o", "ae_title": orthanc.ae_title, "host": "127.0.0.1",
                                          "port": orthanc.dicom_port, "retrieve": retrieve}]})


def _retrieved_series(settings: Any, series: dict[str, Any], caplog: pytest.LogCaptureFixture) -> set[str]:
    """The SOP Instance UIDs of the series as one WADO-RS retrieve delivered them (200 asserted)."""
    with caplog.at_level(logging.WARNING), running_gateway(settings) as url:
        r = httpx.get(f"{url}/dicom-web/studies/{CT['study_uid']}/series/{series['series_uid']}",
                      headers={"Accept": 'multipart/related; type="application/dicom"; transfer-syntax=*'},
                      timeout=60)
    assert r.status_code == 200
    parts = parse_multipart(r.content, r.headers["content-type"])
    return {str(dcmread(BytesIO(b), stop_before_pixels=True).SOPInstanceUID) for _, b in parts}


@pytest.mark.parametrize("retrieve", ["get", "move"])
def test_a_write_refused_after_the_ack_is_retried_and_the_answer_is_complete(
        orthanc: OrthancPeer, gateway_scp_port: int, tmp_path: Any, retrieve: str,
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    series = CT["series"][1]
    victim = series["sop_instance_uids"][len(series["sop_instance_uids"]) // 2]
    refused: list[str] = []
    lock = threading.Lock()
    real_write = Spool.write

    def write(self: Spool, data: Any, instance: Any, **kwargs: Any) -> Any:
        with lock:
            first = instance.sop == victim and not refused
            if first:
                refused.append(instance.sop)
        if first:
            raise OSError(28, "No space left on device (injected)")
        return real_write(self, data, instance, **kwargs)

    monkeypatch.setattr(Spool, "write", write)
    settings = _settings(orthanc, gateway_scp_port, tmp_path, retrieve)
    got = _retrieved_series(settings, series, caplog)
    assert refused == [victim], "the injected fault happened once"
    assert got == set(series["sop_instance_uids"]), "the refused instance was retrieved again"
    acknowledger = settings.nodes[0].engine if retrieve == "get" else settings.gateway.scp_engine
    if acknowledger == "fast":
        # Acknowledged, then the write failed: logged; the PACS saw success, the completeness check
        # found it missing. (pynetdicom's A700 makes Orthanc fail a C-MOVE: another retry path.)
        assert "acknowledged" in caplog.text and "could not be spooled" in caplog.text
        assert "retrying 1 missing instances" in caplog.text


@pytest.mark.parametrize("retrieve", ["get", "move"])
def test_the_retrieval_is_over_only_once_acknowledged_writes_are_done(
        orthanc: OrthancPeer, gateway_scp_port: int, tmp_path: Any, retrieve: str,
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """Slow spool writes: the final C-GET/C-MOVE response arrives while the last acknowledged write
    still runs. Completeness must be judged after it (C-GET: same thread; C-MOVE: arrivals_routing.
    settle), else that instance would count as missing and be retrieved a second time. (Orthanc
    releases its sub-operation association before the final C-MOVE response, and that release is read
    after the write: a PACS that keeps the association open is what needs ``settle``, pinned by
    tests/unit/test_arrivals_ack_first.py.)"""
    series = CT["series"][1]
    real_write = Spool.write

    def slow_write(self: Spool, data: Any, instance: Any, **kwargs: Any) -> Any:
        time.sleep(0.05)
        return real_write(self, data, instance, **kwargs)

    monkeypatch.setattr(Spool, "write", slow_write)
    issued: list[str] = []
    for name in ("get", "move"):
        def counted(self: PynetdicomPacs, *args: Any, _name: str = name, _real: Any = getattr(PynetdicomPacs, name),
                    **kwargs: Any) -> Any:
            issued.append(_name)
            return _real(self, *args, **kwargs)
        monkeypatch.setattr(PynetdicomPacs, name, counted)
    settings = _settings(orthanc, gateway_scp_port, tmp_path, retrieve, profiling={"enabled": False})
    got = _retrieved_series(settings, series, caplog)
    assert got == set(series["sop_instance_uids"])
    assert issued == [retrieve], "one retrieval: no instance still being written was judged missing"
    assert "missing instances" not in caplog.text
