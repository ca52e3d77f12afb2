"""STOW-RS through the gateway into real Orthanc and dcmqrscp, and into a fault-injecting SCP.

Every stored instance is checked *in the PACS* (Orthanc's REST API, dcmqrscp's storage directory):
present, in the transfer syntax it was sent in, pixel data byte for byte.

Isolation: the instances are copies of the demo data with fresh UIDs under a patient of their own
(``STOW^Test``). The session's Orthanc is shared with other tests, so this module deletes its own
studies from it at the end (never the demo data). dcmqrscp has no delete and silently drops the
oldest study past its quota, so this module runs a dcmqrscp of its own instead of the session one.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import json
import threading
import time
from collections.abc import Iterator
from io import BytesIO
from pathlib import Path

import httpx
import numpy as np
import pydicom
import pytest
from dicomweb_client.api import DICOMwebClient
from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import generate_uid
from pynetdicom import AE, evt

from gateway.demo_data import generate_demo_datasets
from gateway.settings import settings_from_dict
from tests.support.server import free_port, running_gateway

from .peers import DcmqrscpPeer, OrthancPeer

EXPLICIT = "1.2.840.10008.1.2.1"
IMPLICIT = "1.2.840.10008.1.2"
RLE = "1.2.840.10008.1.2.5"
CT = "1.2.840.10008.5.1.4.1.1.2"
MR = "1.2.840.10008.5.1.4.1.1.4"
PET = "1.2.840.10008.5.1.4.1.1.128"
DICOM_JSON = "application/dicom+json"
TIMEOUTS = {"connect": 3, "acse": 5, "dimse": 30, "network": 60}


# ----------------------------------------------------------------------------- instances


@functools.cache
def _demo() -> tuple[Dataset, ...]:
    return tuple(generate_demo_datasets())


def template(modality: str = "CT", syntax: str = EXPLICIT) -> Dataset:
    return next(d for d in _demo() if d.Modality == modality and str(d.file_meta.TransferSyntaxUID) == syntax)


def fresh(n: int = 1, modality: str = "CT", syntax: str = EXPLICIT, study: str | None = None,
          series_count: int = 1) -> list[Dataset]:
    """``n`` copies of a demo instance with new UIDs, in a new study (or ``study``), own patient."""
    study = study or generate_uid()
    series = [generate_uid() for _ in range(series_count)]
    out = []
    base = template(modality, syntax)
    for i in range(n):
        ds = copy.deepcopy(base)
        ds.PatientID, ds.PatientName = "STOW0001", "Stow^Test"
        ds.StudyInstanceUID = study
        ds.SeriesInstanceUID = series[i % series_count]
        ds.SOPInstanceUID = generate_uid()
        ds.InstanceNumber = i + 1
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        out.append(ds)
    return out


def part10(ds: Dataset) -> bytes:
    out = BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


def multipart(parts: list[bytes], boundary: str = "stow-test-boundary", *, types: list[str] | None = None,
              extra: list[dict[str, str]] | None = None) -> bytes:
    body = b""
    for i, data in enumerate(parts):
        headers = {"Content-Type": (types or ["application/dicom"] * len(parts))[i]}
        headers.update((extra or [{}] * len(parts))[i])
        lines = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
        body += f"\r\n--{boundary}\r\n{lines}\r\n".encode() + data
    return body + f"\r\n--{boundary}--\r\n".encode()


def ct_header(boundary: str = "stow-test-boundary", root: str = "application/dicom") -> dict[str, str]:
    return {"Content-Type": f'multipart/related; type="{root}"; boundary="{boundary}"'}


def seq(body: dict, tag: str) -> list[dict]:
    return body.get(tag, {}).get("Value", [])


def uid_of(item: dict) -> str | None:
    return (item["00081155"].get("Value") or [None])[0]


def reasons(body: dict) -> dict[str | None, int]:
    return {uid_of(i): i["00081197"]["Value"][0] for i in seq(body, "00081198")}


def referenced(body: dict) -> list[str | None]:
    return [uid_of(i) for i in seq(body, "00081199")]


# ----------------------------------------------------------------------------- peers


@pytest.fixture(scope="module")
def own_dcmqrscp(tmp_path_factory) -> Iterator[DcmqrscpPeer]:
    with DcmqrscpPeer(tmp_path_factory.mktemp("stow-dcmqrscp"), ae_title="STOWQR", max_studies=100) as peer:
        yield peer


@pytest.fixture(scope="module")
def orthanc_cleanup(orthanc: OrthancPeer) -> Iterator[OrthancPeer]:
    yield orthanc
    status, body = orthanc.request("POST", "/tools/find",
                                   json.dumps({"Level": "Study", "Query": {"PatientID": "STOW*"}}).encode())
    assert status == 200
    for study_id in json.loads(body):
        orthanc.request("DELETE", f"/studies/{study_id}")


def orthanc_files(peer: OrthancPeer, study: str) -> dict[str, bytes]:
    query = {"Level": "Instance", "Query": {"StudyInstanceUID": study}, "Expand": True}
    status, body = peer.request("POST", "/tools/find", json.dumps(query).encode())
    assert status == 200, body
    files = {}
    for inst in json.loads(body):
        status, data = peer.request("GET", f"/instances/{inst['ID']}/file")
        assert status == 200
        files[inst["MainDicomTags"]["SOPInstanceUID"]] = data
    return files


def dcmqrscp_files(peer: DcmqrscpPeer, study: str) -> dict[str, bytes]:
    files = {}
    for path in peer.storage.rglob("*"):
        if not path.is_file() or path.name == "index.dat":
            continue
        data = path.read_bytes()
        ds = dcmread(BytesIO(data), stop_before_pixels=True)
        if ds.StudyInstanceUID == study:
            files[str(ds.SOPInstanceUID)] = data
    return files


def assert_in_pacs(gw, sent: list[Dataset], syntax: str | None = None) -> None:
    """Every instance of ``sent`` is in the PACS, in its transfer syntax, pixel data byte-identical."""
    studies = {ds.StudyInstanceUID for ds in sent}
    stored: dict[str, bytes] = {}
    for study in studies:
        stored.update(gw.files(study))
    assert set(stored) >= {ds.SOPInstanceUID for ds in sent}, f"missing in {gw.kind}"
    for ds in sent:
        got = dcmread(BytesIO(stored[ds.SOPInstanceUID]))
        assert str(got.file_meta.TransferSyntaxUID) == (syntax or str(ds.file_meta.TransferSyntaxUID))
        assert got.PixelData == ds.PixelData


class Gateway:
    def __init__(self, kind: str, url: str, files):
        self.kind, self.url, self.files = kind, url, files
        self.http = httpx.Client(base_url=url + "/dicom-web", timeout=120)

    def post(self, body, path: str = "/studies", headers: dict[str, str] | None = None) -> httpx.Response:
        return self.http.post(path, content=body, headers=headers or ct_header())


def settings_for(kind: str, peer, tmp: Path, **node_extra):
    return settings_from_dict({
        "gateway": {"ae_title": "DICOMWEBGW"},
        "spool": {"path": str(tmp)},
        "nodes": [{"name": kind, "ae_title": peer.ae_title, "host": "127.0.0.1", "port": peer.dicom_port,
                   "timeouts": TIMEOUTS, "quirks": {"case_sensitive_pn": kind == "dcmqrscp"}, **node_extra}],
    })


@pytest.fixture(scope="module", params=["orthanc", "dcmqrscp"])
def gw(request, orthanc_cleanup, own_dcmqrscp, tmp_path_factory) -> Iterator[Gateway]:
    kind = request.param
    peer = orthanc_cleanup if kind == "orthanc" else own_dcmqrscp
    files = functools.partial(orthanc_files if kind == "orthanc" else dcmqrscp_files, peer)
    with running_gateway(settings_for(kind, peer, tmp_path_factory.mktemp("spool"))) as url:
        gateway = Gateway(kind, url, files)
        yield gateway
        gateway.http.close()


@pytest.fixture(scope="module")
def orthanc_gw(orthanc_cleanup, tmp_path_factory) -> Iterator[Gateway]:
    with running_gateway(settings_for("orthanc", orthanc_cleanup, tmp_path_factory.mktemp("spool"))) as url:
        gateway = Gateway("orthanc", url, functools.partial(orthanc_files, orthanc_cleanup))
        yield gateway
        gateway.http.close()


# ----------------------------------------------------------------------------- real PACS


def test_python_dicomweb_client_chunked_upload(gw):
    sent = fresh(12)
    client = DICOMwebClient(url=f"{gw.url}/dicom-web")
    client.set_chunk_size(64 * 1024)      # the body is ~400 KB: sent with Transfer-Encoding: chunked
    result = client.store_instances(sent)
    assert [str(i.ReferencedSOPInstanceUID) for i in result.ReferencedSOPSequence] == [
        d.SOPInstanceUID for d in sent]
    assert "FailedSOPSequence" not in result
    assert result.RetrieveURL.endswith(f"/dicom-web/studies/{sent[0].StudyInstanceUID}")
    item = result.ReferencedSOPSequence[0]
    assert item.RetrieveURL.endswith(f"/studies/{sent[0].StudyInstanceUID}/series/{sent[0].SeriesInstanceUID}"
                                     f"/instances/{sent[0].SOPInstanceUID}")
    assert_in_pacs(gw, sent)


def test_python_client_study_targeted(gw):
    sent = fresh(3)
    result = DICOMwebClient(url=f"{gw.url}/dicom-web").store_instances(
        sent, study_instance_uid=sent[0].StudyInstanceUID)
    assert len(result.ReferencedSOPSequence) == 3
    assert_in_pacs(gw, sent)


def ohif_body(datasets: list[bytes], boundary: str) -> bytes:
    """OHIF's dicomweb-client 0.10.4 multipartEncode: leading CRLF, no final CRLF, NUL epilogue."""
    header = f"\r\n--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode()
    footer = f"\r\n--{boundary}--".encode()
    body = b"".join(header + d for d in datasets) + footer
    return body + b"\0" * (len(footer) * (len(datasets) - 1))


@pytest.mark.parametrize("count", [1, 3])
def test_ohif_shaped_upload(gw, count):
    sent = fresh(count)
    boundary = "3c7d3e5b-0f0a-4a6f-9b3b-8e2f7d1c9a55"
    r = gw.post(ohif_body([part10(d) for d in sent], boundary), headers={
        "Content-Type": f'multipart/related; type="application/dicom"; boundary="{boundary}"',
        "Accept": "*/*"})
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "application/dicom+json"     # exactly, no charset
    assert referenced(r.json()) == [d.SOPInstanceUID for d in sent]
    assert_in_pacs(gw, sent)


def test_rle_instance_is_stored_in_its_own_transfer_syntax(gw):
    sent = fresh(2, "MR", RLE)
    r = gw.post(multipart([part10(d) for d in sent]))
    assert r.status_code == 200, r.text
    assert_in_pacs(gw, sent, syntax=RLE)


def test_mixed_parts_study_targeted(gw):
    good = fresh(2)
    study = good[0].StudyInstanceUID
    foreign = fresh(1)[0]
    body = multipart([part10(good[0]), b"this is not DICOM", part10(foreign), b"plain text", part10(good[1])],
                     types=["application/dicom", "application/dicom", "application/dicom", "text/plain",
                            "application/dicom"])
    r = gw.post(body, path=f"/studies/{study}")
    assert r.status_code == 202, r.text
    body = r.json()
    assert referenced(body) == [good[0].SOPInstanceUID, good[1].SOPInstanceUID]
    failed = seq(body, "00081198")
    assert [(uid_of(i), i["00081197"]["Value"][0]) for i in failed] == [
        (None, 0xC000), (foreign.SOPInstanceUID, 0xA900), (None, 0xC000)]
    assert body["00081190"]["Value"] == [f"{gw.url}/dicom-web/studies/{study}"]
    assert_in_pacs(gw, good)
    assert foreign.SOPInstanceUID not in gw.files(foreign.StudyInstanceUID)


def test_wrong_study_only_is_409(gw):
    sent = fresh(1)
    r = gw.post(multipart([part10(sent[0])]), path=f"/studies/{generate_uid()}")
    assert r.status_code == 409
    assert reasons(r.json()) == {sent[0].SOPInstanceUID: 0xA900}
    assert gw.files(sent[0].StudyInstanceUID) == {}


def test_only_garbage_is_400(gw):
    r = gw.post(multipart([b"not dicom", b"\0" * 200]))
    assert r.status_code == 400 and r.headers["content-type"] == DICOM_JSON
    assert [i["00081197"]["Value"][0] for i in seq(r.json(), "00081198")] == [0xC000, 0xC000]


def test_body_ending_mid_part(gw):
    sent = fresh(3)
    data = [part10(d) for d in sent]
    body = multipart(data)
    cut = body.index(data[2]) + len(data[2]) // 2     # inside the third instance's pixel data
    r = gw.post(body[:cut])
    assert r.status_code == 202, r.text
    assert referenced(r.json()) == [sent[0].SOPInstanceUID, sent[1].SOPInstanceUID]
    assert reasons(r.json()) == {sent[2].SOPInstanceUID: 0xC001}      # UIDs recovered from its header
    assert_in_pacs(gw, sent[:2])
    assert sent[2].SOPInstanceUID not in gw.files(sent[0].StudyInstanceUID)


def test_metadata_and_bulk_data_form(gw):
    sent = fresh(2, series_count=2)
    metadata = []
    for i, ds in enumerate(sent):
        obj = ds.to_json_dict(bulk_data_threshold=1024, bulk_data_element_handler=lambda e: "")
        obj["7FE00010"] = {"vr": "OW", "BulkDataURI": f"{gw.url}/bulk/{i}"}
        metadata.append(obj)
    parts = [json.dumps(metadata).encode(), sent[0].PixelData, sent[1].PixelData]
    body = multipart(parts, types=[DICOM_JSON, "application/octet-stream", "application/octet-stream"],
                     extra=[{}, {"Content-Location": f"{gw.url}/bulk/0"}, {"Content-Location": "/bulk/1"}])
    r = gw.post(body, headers=ct_header(root=DICOM_JSON))
    assert r.status_code == 200, r.text
    assert referenced(r.json()) == [d.SOPInstanceUID for d in sent]
    assert_in_pacs(gw, sent)


def test_metadata_with_missing_bulk_data_fails_that_instance(gw):
    ds = fresh(1)[0]
    obj = ds.to_json_dict(bulk_data_threshold=1024, bulk_data_element_handler=lambda e: "")
    obj["7FE00010"] = {"vr": "OW", "BulkDataURI": "http://elsewhere/never-sent"}
    r = gw.post(multipart([json.dumps([obj]).encode()], types=[DICOM_JSON]), headers=ct_header(root=DICOM_JSON))
    assert r.status_code == 400
    assert reasons(r.json()) == {ds.SOPInstanceUID: 0xC002}


@pytest.mark.parametrize(("content_type", "status"), [
    ("application/dicom", 415),
    ('multipart/related; type="application/dicom+xml"; boundary=x', 415),
    ("multipart/related; type=image/jpeg; boundary=x", 415),
    ("multipart/form-data; boundary=x", 415),
    ("", 415),
    ('multipart/related; type="application/dicom"', 400),     # no boundary
])
def test_unsupported_media_types(gw, content_type, status):
    r = gw.post(multipart([part10(fresh(1)[0])], "x"), headers={"Content-Type": content_type})
    assert r.status_code == status
    assert r.json()["error"] == ("UnsupportedMediaType" if status == 415 else "BadRequest")


def test_slow_upload_is_stored_part_by_part(gw):
    """A client sending one part at a time: each instance is in the PACS before the next part is sent
    (the gateway stores while the upload runs, docs/architecture.md "STOW-RS"). The client waits for
    the PACS to hold the previous part (at most 20 s), so a gateway storing only at the end fails the
    check instead of hanging."""
    sent = fresh(3)
    study = sent[0].StudyInstanceUID
    boundary = "slow-upload-boundary"
    delimiter = f"\r\n--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode()
    # A part is complete when the delimiter after it arrives: each chunk carries it.
    chunks = [(delimiter if i == 0 else b"") + part10(ds)
              + (delimiter if i + 1 < len(sent) else f"\r\n--{boundary}--\r\n".encode())
              for i, ds in enumerate(sent)]
    held_before_next: list[set[str]] = []

    def body() -> Iterator[bytes]:
        for i, chunk in enumerate(chunks):
            if i:
                deadline = time.monotonic() + 20
                while len(gw.files(study)) < i and time.monotonic() < deadline:
                    time.sleep(0.1)
                held_before_next.append(set(gw.files(study)))
            yield chunk

    r = gw.post(body(), headers=ct_header(boundary))
    assert r.status_code == 200, r.text
    assert held_before_next == [{sent[0].SOPInstanceUID}, {sent[0].SOPInstanceUID, sent[1].SOPInstanceUID}]
    assert_in_pacs(gw, sent)


def test_qido_right_after_stow_sees_the_new_study(gw):
    sent = fresh(3, series_count=2)
    study = sent[0].StudyInstanceUID
    assert gw.http.get("/studies", params={"StudyInstanceUID": study}).status_code == 204
    assert gw.post(multipart([part10(d) for d in sent])).status_code == 200
    r = gw.http.get("/studies", params={"StudyInstanceUID": study})
    assert r.status_code == 200 and [d["0020000D"]["Value"][0] for d in r.json()] == [study]
    series = gw.http.get(f"/studies/{study}/series")
    assert {d["0020000E"]["Value"][0] for d in series.json()} == {d.SeriesInstanceUID for d in sent}
    # The location index learned the study: WADO finds it without a C-FIND at STUDY level.
    wado = gw.http.get(f"/studies/{study}/series/{sent[0].SeriesInstanceUID}/instances/{sent[0].SOPInstanceUID}",
                       headers={"Accept": "application/dicom"})
    assert wado.status_code == 200 and dcmread(BytesIO(wado.content)).PixelData == sent[0].PixelData


def test_500_instances_in_one_request_every_one_byte_identical(orthanc_gw):
    sent = fresh(520, series_count=4)
    started = time.monotonic()
    r = orthanc_gw.post(multipart([part10(d) for d in sent]))
    assert r.status_code == 200, r.text[:500]
    assert len(referenced(r.json())) == 520
    assert time.monotonic() - started < 120
    assert_in_pacs(orthanc_gw, sent)


def _rss_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def test_100mb_streamed_upload_keeps_memory_bounded(orthanc_gw):
    """~100 MB generated on the fly and sent chunked. The gateway runs in a thread of this process
    (tests.support.server), so this process's VmRSS covers it; peak growth must stay well below the
    upload size (the body is on disk, C-STORE streams from the file)."""
    count, size = 50, 1024
    base = template("CT")
    study, series = generate_uid(), generate_uid()
    uids = [generate_uid() for _ in range(count)]
    boundary = "big-upload-boundary"

    def instance(i: int) -> bytes:
        ds = copy.copy(base)
        ds.file_meta = copy.deepcopy(base.file_meta)
        ds.PatientID, ds.PatientName = "STOW0001", "Stow^Big"
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID = study, series, uids[i]
        ds.file_meta.MediaStorageSOPInstanceUID = uids[i]
        ds.InstanceNumber = i + 1
        ds.Rows = ds.Columns = size
        ds.PixelData = ((np.arange(size * size, dtype=np.uint32) * 7 + i) % 4000).astype(np.int16).tobytes()
        return part10(ds)

    def body() -> Iterator[bytes]:
        for i in range(count):
            data = instance(i)
            yield f"\r\n--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode()
            for start in range(0, len(data), 256 * 1024):
                yield data[start:start + 256 * 1024]
        yield f"\r\n--{boundary}--".encode()

    peak = baseline = _rss_kib()
    stop = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not stop.is_set():
            peak = max(peak, _rss_kib())
            time.sleep(0.01)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        r = orthanc_gw.post(body(), headers=ct_header(boundary))
    finally:
        stop.set()
        sampler.join()
    assert r.status_code == 200, r.text[:500]
    assert len(referenced(r.json())) == count
    growth_mb = (peak - baseline) / 1024
    assert growth_mb < 150, f"RSS grew by {growth_mb:.0f} MB during a ~100 MB upload"
    stored = orthanc_files(orthanc_gw.files.args[0], study)
    assert set(stored) == set(uids)
    for i in (0, count - 1):
        expected = dcmread(BytesIO(instance(i))).PixelData
        assert dcmread(BytesIO(stored[uids[i]])).PixelData == expected


# ----------------------------------------------------------------------------- fault injection


class FaultScp:
    """A storage SCP that accepts only ``supported`` (SOP class -> transfer syntaxes), answers each
    C-STORE with ``statuses[SOPInstanceUID]`` (default success), can drop the connection on the n-th
    C-STORE without answering it, and records what it received, the associations, and how many
    C-STOREs it was handling at once (more than one means concurrent associations)."""

    def __init__(self, supported: dict[str, list[str]], *, statuses: dict[str, int] | None = None,
                 drop_on: int | None = None, delay: float = 0.0) -> None:
        self.supported, self.statuses, self.drop_on, self.delay = supported, statuses or {}, drop_on, delay
        self.received: dict[str, tuple[str, bytes]] = {}   # SOP instance -> (transfer syntax, pixel data)
        self.associations = self.stores = self.in_store = self.max_in_store = 0
        self.ae_title = "FAULTSCP"
        self._lock = threading.Lock()
        self._ae = AE(ae_title=self.ae_title)
        for cls, syntaxes in supported.items():
            self._ae.add_supported_context(cls, syntaxes)
        self._ae.maximum_associations = 16
        handlers = [(evt.EVT_C_STORE, self._store), (evt.EVT_ACCEPTED, self._accepted)]
        self._server = self._ae.start_server(("127.0.0.1", 0), block=False, evt_handlers=handlers)
        self.dicom_port = self._server.server_address[1]

    def _accepted(self, event) -> None:
        with self._lock:
            self.associations += 1

    def _store(self, event) -> int:
        with self._lock:
            self.stores += 1
            n = self.stores
            self.in_store += 1
            self.max_in_store = max(self.max_in_store, self.in_store)
        try:
            return self._answer(event, n)
        finally:
            with self._lock:
                self.in_store -= 1

    def _answer(self, event, n: int) -> int:
        if self.delay:
            time.sleep(self.delay)
        if self.drop_on is not None and n >= self.drop_on:
            event.assoc.dul.socket.socket.close()   # the PACS "crashes": no answer, connection gone
            return 0xA700
        ds = event.dataset
        ds.file_meta = event.file_meta
        self.received[str(ds.SOPInstanceUID)] = (str(event.context.transfer_syntax), ds.PixelData)
        return self.statuses.get(str(ds.SOPInstanceUID), 0x0000)

    def stop(self) -> None:
        self._ae.shutdown()


@pytest.fixture()
def fault_gw(tmp_path) -> Iterator:
    """Start a FaultScp and a gateway whose only node it is; both stopped after the test."""
    with contextlib.ExitStack() as stack:

        def start(supported: dict[str, list[str]], *, max_associations: int = 4, **scp_options):
            scp = FaultScp(supported, **scp_options)
            stack.callback(scp.stop)
            url = stack.enter_context(running_gateway(settings_from_dict({
                "spool": {"path": str(tmp_path / f"spool-{scp.dicom_port}")},
                "profiling": {"enabled": False},   # its probe association would be counted at the SCP
                "nodes": [{"name": "fault", "ae_title": scp.ae_title, "host": "127.0.0.1",
                           "port": scp.dicom_port, "max_associations": max_associations,
                           "timeouts": {"connect": 2, "acse": 3, "dimse": 5, "network": 10}}],
            })))
            return scp, Gateway("fault", url, None)

        yield start


NATIVE = [EXPLICIT, IMPLICIT]


def test_mixed_pacs_statuses_one_association(fault_gw):
    scp, gw = fault_gw({CT: NATIVE, MR: NATIVE})
    ok, out_of_resources, coerced = fresh(3)
    study = ok.StudyInstanceUID
    pet = fresh(1, "PT", study=study)[0]             # SOP class the PACS rejects at association time
    rle = fresh(1, "MR", RLE, study=study)[0]         # PACS refuses RLE: transcoded to a native syntax
    for ds in (out_of_resources, coerced):
        ds.StudyInstanceUID = study
    scp.statuses = {out_of_resources.SOPInstanceUID: 0xA700, coerced.SOPInstanceUID: 0xB000}
    # The first instance's class and syntax are proposed with the native syntaxes of the common
    # classes (CT, PET among them), so the rest needs no second association (a later pair that was
    # not proposed does: test_stow_streaming.py).
    sent = [rle, ok, out_of_resources, pet, coerced]
    r = gw.post(multipart([part10(d) for d in sent]))
    assert r.status_code == 202, r.text
    body = r.json()
    assert referenced(body) == [rle.SOPInstanceUID, ok.SOPInstanceUID, coerced.SOPInstanceUID]
    warning = seq(body, "00081199")[2]
    assert warning["00081196"] == {"vr": "US", "Value": [0xB000]}
    assert reasons(body) == {out_of_resources.SOPInstanceUID: 0xA700, pet.SOPInstanceUID: 0x0122}
    assert scp.associations == 1                      # one association for the whole request
    syntax, pixels = scp.received[rle.SOPInstanceUID]
    assert syntax in NATIVE
    assert np.array_equal(np.frombuffer(pixels, dtype=np.uint16).reshape(rle.Rows, rle.Columns),
                          rle.pixel_array)
    assert scp.received[ok.SOPInstanceUID] == (EXPLICIT, ok.PixelData)   # untouched, its own syntax


def test_datasets_without_preamble_or_file_meta(fault_gw):
    """The Python dicomweb-client writes in-memory datasets without preamble/DICM; some writers send
    a bare data set. Both are accepted and stored in the encoding they came in."""
    scp, gw = fault_gw({CT: NATIVE})
    python_client, bare = fresh(2)
    first = BytesIO()
    pydicom.dcmwrite(first, python_client)            # file meta, no preamble, no DICM
    assert not first.getvalue().startswith(b"\0" * 128)
    bare.file_meta = FileMetaDataset()
    second = BytesIO()
    pydicom.dcmwrite(second, bare, implicit_vr=True, little_endian=True)   # no meta at all
    r = gw.post(multipart([first.getvalue(), second.getvalue()]))
    assert r.status_code == 200, r.text
    assert scp.received[python_client.SOPInstanceUID] == (EXPLICIT, python_client.PixelData)
    assert scp.received[bare.SOPInstanceUID] == (IMPLICIT, bare.PixelData)


def test_connection_dropped_mid_upload_never_reports_success(fault_gw):
    scp, gw = fault_gw({CT: NATIVE}, drop_on=3)
    sent = fresh(5)
    r = gw.post(multipart([part10(d) for d in sent]))
    assert r.status_code == 202, r.text
    assert referenced(r.json()) == [sent[0].SOPInstanceUID, sent[1].SOPInstanceUID]
    assert reasons(r.json()) == {d.SOPInstanceUID: 0x0110 for d in sent[2:]}


def test_connection_dropped_on_first_instance_is_409(fault_gw):
    scp, gw = fault_gw({CT: NATIVE}, drop_on=1)
    sent = fresh(2)
    r = gw.post(multipart([part10(d) for d in sent]))
    assert r.status_code == 409
    assert reasons(r.json()) == {d.SOPInstanceUID: 0x0110 for d in sent}


def test_unsupported_sop_class_only_is_409(fault_gw):
    scp, gw = fault_gw({MR: NATIVE})
    sent = fresh(1)
    r = gw.post(multipart([part10(sent[0])]))
    assert r.status_code == 409
    assert reasons(r.json()) == {sent[0].SOPInstanceUID: 0x0122}


def test_unreachable_node_is_502_naming_it(tmp_path):
    settings = settings_from_dict({"spool": {"path": str(tmp_path)}, "nodes": [
        {"name": "gone", "ae_title": "NOBODY", "host": "127.0.0.1", "port": free_port(),
         "timeouts": {"connect": 2, "acse": 2, "dimse": 2, "network": 5}}]})
    with running_gateway(settings) as url:
        r = httpx.post(f"{url}/dicom-web/studies", content=multipart([part10(fresh(1)[0])]), headers=ct_header())
    assert r.status_code == 502 and r.json()["node"] == "gone"


def test_max_associations_respected_across_requests(fault_gw):
    scp, gw = fault_gw({CT: NATIVE}, delay=0.05, max_associations=1)
    bodies = [multipart([part10(d) for d in fresh(3)]) for _ in range(3)]
    results: list[int] = []

    def post(body):
        with httpx.Client(timeout=60) as client:
            results.append(client.post(f"{gw.url}/dicom-web/studies", content=body, headers=ct_header()).status_code)

    threads = [threading.Thread(target=post, args=(b,)) for b in bodies]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [200, 200, 200]
    assert scp.associations == 3 and scp.max_in_store == 1   # never two associations storing at once


def test_nodes_route_stores_to_the_named_node(tmp_path):
    a, b = FaultScp({CT: NATIVE}), FaultScp({CT: NATIVE})
    try:
        nodes = [{"name": n, "ae_title": s.ae_title, "host": "127.0.0.1", "port": s.dicom_port, "timeouts": TIMEOUTS}
                 for n, s in (("a", a), ("b", b))]
        settings = settings_from_dict({"spool": {"path": str(tmp_path)}, "nodes": nodes,
                                       "gateway": {"stow_node": "b"}})
        with running_gateway(settings) as url:
            first, second = fresh(1)[0], fresh(1)[0]
            r = httpx.post(f"{url}/dicom-web/studies", content=multipart([part10(first)]), headers=ct_header())
            assert r.status_code == 200
            r = httpx.post(f"{url}/nodes/a/dicom-web/studies", content=multipart([part10(second)]),
                           headers=ct_header())
            assert r.status_code == 200
            assert seq(r.json(), "00081199")[0]["00081190"]["Value"][0].startswith(f"{url}/nodes/a/dicom-web/")
        assert set(b.received) == {first.SOPInstanceUID} and set(a.received) == {second.SOPInstanceUID}
    finally:
        a.stop()
        b.stop()


def test_one_bulk_part_named_by_many_elements_costs_its_size_once(gw):
    """STOW amplification: an 8 MB bulk part named by 25 BulkDataURIs used to be read 25 times
    (~200 MB). Now a part fills one element: the instance fails, and the request's peak Python
    memory stays near the part's size (tracemalloc covers the in-process gateway's threads)."""
    import tracemalloc

    ds = fresh(1)[0]
    obj = ds.to_json_dict(bulk_data_threshold=1024, bulk_data_element_handler=lambda e: "")
    uri = f"{gw.url}/bulk/big"
    obj["7FE00010"] = {"vr": "OW", "BulkDataURI": uri}
    for i in range(24):
        obj[f"0009{0x1010 + i:04X}"] = {"vr": "OB", "BulkDataURI": uri}
    big = b"\1" * (8 << 20)
    body = multipart([json.dumps([obj]).encode(), big], types=[DICOM_JSON, "application/octet-stream"],
                     extra=[{}, {"Content-Location": uri}])
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        before = tracemalloc.get_traced_memory()[0]
        r = gw.post(body, headers=ct_header(root=DICOM_JSON))
        peak = tracemalloc.get_traced_memory()[1] - before
    finally:
        tracemalloc.stop()
    assert r.status_code == 400 and reasons(r.json()) == {ds.SOPInstanceUID: 0xC002}
    assert peak < 64 << 20, f"peak {peak >> 20} MB for an 8 MB upload"
