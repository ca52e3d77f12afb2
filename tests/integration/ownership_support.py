"""Helpers of test_data_ownership.py and test_data_freshness.py: generated instances, a direct C-GET
to check what a PACS serves, gateways (one or two replicas sharing Redis) and response parsing."""

from __future__ import annotations

import secrets
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import redis
from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, build_role, evt

from gateway.settings import settings_from_dict
from tests.support.multipart import parse_multipart
from tests.support.server import free_port, running_gateway

from .peers import DcmqrscpPeer, OrthancPeer

CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"
STUDY_ROOT_GET = "1.2.840.10008.5.1.4.1.2.2.3"
TIMEOUTS = {"connect": 3, "acse": 5, "dimse": 30, "network": 60}
SINGLE = {"Accept": "application/dicom"}


@dataclass
class Twins:
    """Node a's and node b's PACS, the study/series/SOP UIDs they share, and each node's copies."""

    a: OrthancPeer
    b: DcmqrscpPeer
    study: str
    series: list[str]
    sops: dict[str, list[str]]
    expected: dict[str, dict[str, Dataset]]     # node -> SOP Instance UID -> what that node holds
    other_study: str                            # another study on node a's PACS


def instance_ds(study: str, series: str, sop: str, *, number: int, series_number: int, patient_name: str,
                description: str, value: int, patient_id: str, rows: int = 64, cols: int = 64) -> Dataset:
    """A CT image, Explicit VR Little Endian, whose pixel values depend on ``value``."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CT_IMAGE
    meta.MediaStorageSOPInstanceUID = sop
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = CT_IMAGE
    ds.SOPInstanceUID = sop
    ds.StudyInstanceUID = study
    ds.SeriesInstanceUID = series
    ds.PatientID = patient_id
    ds.PatientName = patient_name
    ds.StudyDate, ds.StudyTime, ds.StudyID, ds.AccessionNumber = "20240102", "101500", "1", ""
    ds.Modality = "CT"
    ds.SeriesNumber = series_number
    ds.InstanceNumber = number
    ds.SeriesDescription = description
    ds.ImagePositionPatient = [0.0, 0.0, float(number)]
    ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
    ds.PixelSpacing = [0.5, 0.5]
    ds.SliceThickness = 1.0
    ds.Rows, ds.Columns = rows, cols
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.RescaleIntercept, ds.RescaleSlope = 0, 1
    pixels = ((np.arange(rows * cols, dtype=np.uint32) * 7 + value) % 65536).astype("<u2")
    ds.add_new(0x7FE00010, "OW", pixels.tobytes())
    return ds


def write_files(directory: Path, datasets: Sequence[Dataset]) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for ds in datasets:
        path = directory / f"{ds.SOPInstanceUID}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def part10(ds: Dataset) -> bytes:
    out = BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


def pacs_c_get(port: int, ae_title: str, study: str, series: str) -> dict[str, Dataset]:
    """The series as the PACS itself serves it (a C-GET of our own, no gateway involved)."""
    ae = AE(ae_title="OWNCHECK")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    ae.add_requested_context(STUDY_ROOT_GET)
    ae.add_requested_context(CT_IMAGE, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
    got: dict[str, Dataset] = {}

    def on_store(event: evt.Event) -> int:
        ds = event.dataset
        ds.file_meta = event.file_meta
        got[str(ds.SOPInstanceUID)] = ds
        return 0x0000

    assoc = ae.associate("127.0.0.1", port, ae_title=ae_title, ext_neg=[build_role(CT_IMAGE, scp_role=True)],
                         evt_handlers=[(evt.EVT_C_STORE, on_store)])
    assert assoc.is_established, f"no association with {ae_title} on port {port}"
    try:
        ident = Dataset()
        ident.QueryRetrieveLevel = "SERIES"
        ident.StudyInstanceUID = study
        ident.SeriesInstanceUID = series
        statuses = [s.Status for s, _ in assoc.send_c_get(ident, STUDY_ROOT_GET) if s]
        assert statuses and statuses[-1] == 0x0000, f"C-GET on {ae_title}: statuses {statuses}"
    finally:
        assoc.release()
    return got


def whose_dataset(item: bytes | Dataset | dict[str, Any], twins: Twins, sop: str | None = None) -> str:
    """"a" or "b" when ``item`` (Part-10 bytes, a dataset, or a DICOM JSON object) is entirely that
    node's copy (header and pixels); otherwise a description of what it is."""
    if isinstance(item, dict):
        desc = item.get("0008103E", {}).get("Value", ["?"])[0]
        name = item.get("00100010", {}).get("Value", [{}])[0].get("Alphabetic", "?")
        uid = item["00080018"]["Value"][0]
        pixels = None
    else:
        try:
            ds = item if isinstance(item, Dataset) else dcmread(BytesIO(item))
        except Exception as exc:  # noqa: BLE001 - reported as the answer
            return f"not DICOM ({type(exc).__name__}: {exc})"
        desc, name, uid = str(ds.get("SeriesDescription", "?")), str(ds.get("PatientName", "?")), str(
            ds.SOPInstanceUID)
        pixels = ds.get("PixelData")
    if sop is not None and uid != sop:
        return f"instance {uid} instead of {sop}"
    for node in ("a", "b"):
        if desc == f"TWIN-{node.upper()}" and name == f"Twin^{node.upper()}":
            if pixels is not None and pixels != twins.expected[node][uid].PixelData:
                return f"node {node}'s header with other pixel data"
            return node
    return f"unknown copy (SeriesDescription {desc!r}, PatientName {name!r})"


def node_cfg(name: str, peer: OrthancPeer | DcmqrscpPeer) -> dict[str, Any]:
    return {"name": name, "ae_title": peer.ae_title, "host": "127.0.0.1", "port": peer.dicom_port,
            "retrieve": "get", "timeouts": TIMEOUTS}


def dead_node(name: str) -> dict[str, Any]:
    """A node whose port nothing listens on (connection refused at once)."""
    return {"name": name, "ae_title": "NOBODYHOME", "host": "127.0.0.1", "port": free_port(),
            "retrieve": "get", "timeouts": TIMEOUTS}


def redis_prefix(redis_url: str) -> Iterator[str]:
    """A fresh cache prefix; its keys are deleted afterwards."""
    prefix = f"test:own:{secrets.token_hex(6)}:"
    yield prefix
    client = redis.Redis.from_url(redis_url)
    try:
        keys = list(client.scan_iter(match=prefix + "*", count=1000))
        if keys:
            client.delete(*keys)
    finally:
        client.close()


@contextmanager
def replicas(count: int, nodes: list[dict[str, Any]], redis_url: str, prefix: str, tmp_path: Path, *,
             max_bytes: int | None = None) -> Iterator[list[str]]:
    """``count`` gateways (in-thread uvicorn) sharing Redis under ``prefix``; with two or more, the
    cluster is configured (internal port, shared secret). Yields their root URLs."""
    secret = secrets.token_hex(16)
    with ExitStack() as stack:
        roots = []
        for i in range(count):
            spool: dict[str, Any] = {"path": str(tmp_path / f"spool-{i + 1}")}
            if max_bytes is not None:
                spool["max_bytes"] = max_bytes
            cfg: dict[str, Any] = {"cache": {"url": redis_url, "prefix": prefix, "timeout": 0.5},
                                   "spool": spool, "nodes": nodes}
            if count > 1:
                cfg["cluster"] = {"internal_port": free_port(), "shared_secret": secret}
            roots.append(stack.enter_context(running_gateway(settings_from_dict(cfg))))
        yield roots


def parse_parts(r: httpx.Response) -> list[tuple[dict[str, str], bytes]] | str:
    """The parts of a multipart/related response, or why it is not a complete one."""
    try:
        return parse_multipart(r.content, r.headers.get("content-type", ""))
    except (AssertionError, ValueError, StopIteration) as exc:
        return f"not a complete multipart/related body ({exc or type(exc).__name__})"
