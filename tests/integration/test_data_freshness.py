"""Freshness and lifetime of what the gateway keeps: a STOW into a series is seen at once on every
replica; a spool smaller than the working set never truncates a stream or loses a frame under it.

One real Orthanc of this module's own ("a"; STOW reaches it by C-STORE), loaded with generated
instances (``ownership_support.py``). Gateways run in-thread under uvicorn and share the session's
Redis under a random prefix (deleted afterwards); two replicas also share the cluster.
"""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from io import BytesIO

import httpx
import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from .ownership_support import instance_ds, node_cfg, parse_parts, part10, redis_prefix, replicas, write_files
from .peers import OrthancPeer

pytestmark = pytest.mark.integration

SERIES_ANY = {"Accept": 'multipart/related; type="application/dicom"; transfer-syntax=*'}
FRAMES_ANY = {"Accept": 'multipart/related; type="application/octet-stream"; transfer-syntax=*'}
# A server pushes up to ~4 MB of a response into loopback socket buffers however slowly the client
# reads (tcp_wmem), so a stream lags behind its series' arrivals only past that: series of ~6.3 MB.
EVICTION_SERIES = 4
EVICTION_INSTANCES = 12
EVICTION_SIDE = 512                           # 512 x 512 x 16 bit: 512 KiB of pixel data per instance
SPOOL_BYTES = 15_000_000                      # < 4 series of ~6.3 MB; each series > a third of it
ROUNDS = 4
# The slow reader's own receive buffer stays small (no autotuning to megabytes on the client side).
SLOW_READER = [(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)]


@dataclass
class Data:
    orthanc: OrthancPeer
    study: str                                # the STOW target series' study
    series: str
    initial: dict[str, Dataset]
    evict_study: str
    evict_series: dict[str, dict[str, Dataset]]   # series UID -> SOP UID -> dataset


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Data]:
    root = tmp_path_factory.mktemp("freshness")
    study, series = generate_uid(), generate_uid()
    initial = {}
    for n in range(1, 4):
        sop = generate_uid()
        initial[sop] = instance_ds(study, series, sop, number=n, series_number=1, patient_name="Fresh^Stow",
                                   description="FRESH", value=n, patient_id="OWN0101")
    evict_study = generate_uid()
    evict: dict[str, dict[str, Dataset]] = {}
    for k in range(EVICTION_SERIES):
        uid = generate_uid()
        evict[uid] = {}
        for n in range(1, EVICTION_INSTANCES + 1):
            sop = generate_uid()
            evict[uid][sop] = instance_ds(evict_study, uid, sop, number=n, series_number=k + 1,
                                          patient_name="Evict^Spool", description=f"EVICT-{k + 1}",
                                          value=1000 * k + n, patient_id="OWN0102",
                                          rows=EVICTION_SIDE, cols=EVICTION_SIDE)
    files = write_files(root / "files", list(initial.values()) +
                        [ds for s in evict.values() for ds in s.values()])
    with OrthancPeer(root / "orthanc", ae_title="FRESHA") as orthanc:
        orthanc.load(files)
        yield Data(orthanc, study, series, initial, evict_study, evict)


@pytest.fixture
def prefix(redis_url: str) -> Iterator[str]:
    yield from redis_prefix(redis_url)


def orthanc_series_sops(peer: OrthancPeer, series: str) -> set[str]:
    query = {"Level": "Instance", "Query": {"SeriesInstanceUID": series}, "Expand": True}
    status, body = peer.request("POST", "/tools/find", json.dumps(query).encode())
    assert status == 200, body
    return {i["MainDicomTags"]["SOPInstanceUID"] for i in json.loads(body)}


def stow_body(datasets: list[Dataset], boundary: str) -> bytes:
    body = b"".join(f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode() + part10(ds) + b"\r\n"
                    for ds in datasets)
    return body + f"--{boundary}--\r\n".encode()


# ----------------------------------------------------------------------------- 2. freshness after STOW


def series_views(client: httpx.Client, root: str, study: str, series: str) -> dict[str, list[str] | str]:
    """The SOP Instance UIDs series metadata, series retrieve and QIDO instances list (or what failed)."""
    base = f"{root}/nodes/a/dicom-web/studies/{study}/series/{series}"
    views: dict[str, list[str] | str] = {}
    r = client.get(base + "/metadata")
    views["metadata"] = sorted(i["00080018"]["Value"][0] for i in r.json()) if r.status_code == 200 else \
        f"HTTP {r.status_code}"
    r = client.get(base, headers=SERIES_ANY)
    parts = parse_parts(r) if r.status_code == 200 else f"HTTP {r.status_code}"
    views["retrieve"] = parts if isinstance(parts, str) else sorted(
        str(dcmread(BytesIO(body), stop_before_pixels=True).SOPInstanceUID) for _, body in parts)
    r = client.get(base + "/instances")
    views["qido"] = sorted(i["00080018"]["Value"][0] for i in r.json()) if r.status_code == 200 else \
        f"HTTP {r.status_code}"
    return views


def test_stow_into_a_retrieved_series_is_seen_at_once_on_both_replicas(data, redis_url, prefix, tmp_path):
    before = sorted(data.initial)
    new = instance_ds(data.study, data.series, generate_uid(), number=4, series_number=1,
                      patient_name="Fresh^Stow", description="FRESH", value=4, patient_id="OWN0101")
    after = sorted([*before, new.SOPInstanceUID])
    with replicas(2, [node_cfg("a", data.orthanc)], redis_url, prefix, tmp_path) as roots, \
            httpx.Client(timeout=60) as client:
        # Retrieved, metadata and QIDO fetched (manifests, metadata, searches cached) on both replicas.
        for root in roots:
            assert series_views(client, root, data.study, data.series) == \
                {"metadata": before, "retrieve": before, "qido": before}
        boundary = "ownership-stow-boundary"
        r = client.post(roots[0] + "/nodes/a/dicom-web/studies", content=stow_body([new], boundary),
                        headers={"Content-Type": f'multipart/related; type="application/dicom"; '
                                                 f'boundary="{boundary}"',
                                 "Accept": "application/dicom+json"})
        assert r.status_code == 200, r.text
        stored = [i["00081155"]["Value"][0] for i in r.json()["00081199"]["Value"]]
        assert stored == [new.SOPInstanceUID] and "00081198" not in r.json()
        assert orthanc_series_sops(data.orthanc, data.series) == set(after), "the PACS holds the new instance"
        problems = []
        for i, root in enumerate(roots):
            for view, got in series_views(client, root, data.study, data.series).items():
                if got != after:
                    missing = "without the new instance" if got == before else f"{got}"
                    problems.append(f"replica {i + 1} {view}: {missing}")
    assert not problems, "right after the STOW, stale views of the series:\n" + "\n".join(problems)


# ----------------------------------------------------------------------------- 3. eviction under load


def read_series_slowly(root: str, study: str, series: str, expected: dict[str, Dataset]) -> str | None:
    """Stream the series in small reads with pauses; None when every part is there and intact."""
    url = f"{root}/nodes/a/dicom-web/studies/{study}/series/{series}"
    body = bytearray()
    try:
        with httpx.Client(transport=httpx.HTTPTransport(socket_options=SLOW_READER), timeout=60) as slow, \
                slow.stream("GET", url, headers=SERIES_ANY) as r:
            if r.status_code != 200:
                return f"HTTP {r.status_code} {r.read()[:200]!r}"
            for chunk in r.iter_bytes(32768):
                body += chunk
                time.sleep(0.01)
            content_type = r.headers["content-type"]
    except httpx.HTTPError as exc:
        return f"stream broken after {len(body)} bytes: {type(exc).__name__}: {exc}"
    parts = parse_parts(httpx.Response(200, content=bytes(body), headers={"content-type": content_type}))
    if isinstance(parts, str):
        return parts
    got = {}
    for _, part in parts:
        try:
            ds = dcmread(BytesIO(part))
        except Exception as exc:  # noqa: BLE001 - reported
            return f"a part is not DICOM: {exc}"
        got[str(ds.SOPInstanceUID)] = ds
    if sorted(got) != sorted(expected) or len(parts) != len(expected):
        return f"{len(parts)} parts, {len(set(got) & set(expected))} of {len(expected)} instances"
    bad = [sop for sop, ds in got.items() if ds.PixelData != expected[sop].PixelData]
    return f"pixel data differs in {len(bad)} parts" if bad else None


def read_frame(client: httpx.Client, root: str, study: str, series: str, sop: str, ds: Dataset) -> str | None:
    url = f"{root}/nodes/a/dicom-web/studies/{study}/series/{series}/instances/{sop}/frames/1"
    try:
        r = client.get(url, headers=FRAMES_ANY)
    except httpx.HTTPError as exc:
        return f"frames: {type(exc).__name__}: {exc}"
    if r.status_code != 200:
        return f"frames: HTTP {r.status_code} {r.text[:200]!r}"
    parts = parse_parts(r)
    if isinstance(parts, str):
        return f"frames: {parts}"
    if len(parts) != 1 or parts[0][1] != ds.PixelData:
        return f"frames: {len(parts)} parts, first of {len(parts[0][1]) if parts else 0} bytes " \
               f"(want {len(ds.PixelData)} bytes, as stored)"
    return None


def test_small_spool_never_evicts_what_a_stream_is_sending(data, redis_url, prefix, tmp_path):
    per_series = sum(len(part10(ds)) for ds in next(iter(data.evict_series.values())).values())
    assert SPOOL_BYTES / 3 < per_series and EVICTION_SERIES * per_series > SPOOL_BYTES, "the scenario's sizes"
    problems: list[str] = []
    with replicas(1, [node_cfg("a", data.orthanc)], redis_url, prefix, tmp_path, max_bytes=SPOOL_BYTES) as (root,), \
            httpx.Client(timeout=60, limits=httpx.Limits(max_connections=16)) as client, \
            ThreadPoolExecutor(12) as pool:
        for round_no in range(1, ROUNDS + 1):
            jobs = {}
            for k, (series, instances) in enumerate(data.evict_series.items()):
                jobs[f"series #{k + 1} stream"] = pool.submit(read_series_slowly, root, data.evict_study,
                                                              series, instances)
            for k, (series, instances) in enumerate(data.evict_series.items()):
                for n, (sop, ds) in enumerate(instances.items(), start=1):
                    jobs[f"series #{k + 1} instance {n} frame 1"] = pool.submit(
                        read_frame, client, root, data.evict_study, series, sop, ds)
            for what, job in jobs.items():
                problem = job.result(timeout=120)
                if problem:
                    problems.append(f"round {round_no}, {what}: {problem}")
        metrics = client.get(root + "/metrics").text
    evictions = [line for line in metrics.splitlines() if line.startswith("dwg_spool_evictions_total ")]
    assert evictions and float(evictions[0].split()[1]) > 0, "the spool was smaller than the working set"
    assert not problems, f"{len(problems)} failed reads under eviction:\n" + "\n".join(problems[:40])
