"""WADO-RS benchmark: the gateway against raw C-GET and Orthanc's DICOMweb plugin (report-only).

Run ``python3 tests/bench/bench_wado.py [--quick]`` from anywhere. In one run, against one Orthanc it
starts (``TCP_NODELAY=1``, DICOMweb plugin) holding a generated single-series CT study (400 slices of
512x512 16-bit, ~210 MB; ``--quick``: 60 slices of 256x256), it measures:

1. **cold study retrieve** through the gateway (a fresh gateway process and an empty spool for each
   repetition; ``transfer-syntax=*``, i.e. the stored bytes) against a raw pynetdicom C-GET of the same
   study (our own SCU: max PDU 0, TCP_NODELAY, the C-STORE handler writes
   ``event.encoded_dataset()`` to files), the same raw SCU with pynetdicom's receive path patched
   (one ``recv_into`` per PDU instead of 4 KiB reads; what the gateway could gain from it), a minimal
   pure-Python C-GET receiver without pynetdicom (``ul_get``: what Python can do on this path; its
   files are checked byte for byte against the raw SCU's), and DCMTK's ``getscu`` (``TCP_NODELAY=1``,
   128 KiB PDUs, ``+B``); ratios gateway / each, in wall time and in the receiver's CPU time;
2. **warm study retrieve** (everything spooled) against Orthanc's own DICOMweb plugin serving the
   same study with the same Accept header; ratio;
3. **time to first byte** of a cold *series* retrieve (fresh gateway), next to the raw C-GET's time to
   its first instance and the IMAGE-level C-FIND the gateway needs for its manifest;
4. **series metadata** cold (nothing spooled: the gateway retrieves the series first), spooled (first
   request: headers parsed from the spool) and warm (cached JSON), Orthanc's plugin for reference;
   **frame latency** warm: median/p95 of single-frame requests on one keep-alive client (first request
   per instance, then again), and requests/s with 16 concurrent clients (threads, own keep-alive
   client each);
5. **peak RSS** (``VmHWM``) of the gateway process while it streams a study larger than 1 GB (2000
   slices of 512x512, generated file by file and loaded into Orthanc one at a time, never held in
   memory; ``--quick``: ~210 MB) to a slow client (sleeps between chunks to hold a set rate), next to
   the peak after the cold 210 MB retrieve with a fast client: RSS against study size.

The gateway always runs as a subprocess (``python -m gateway.cli serve --config FILE --port P``),
so its CPU time and RSS can be read from ``/proc/<pid>``; the HTTP clients run in this process. Cold
measurements are interleaved (the order rotates each repetition) so that drift on a busy machine hits
every client alike; medians are reported, with the receiver's CPU seconds, which other load on the
machine disturbs much less than wall time. The run is bounded (full < 8 min, ``--quick`` < 90 s): a
shared deadline trims repetitions and a watchdog stops everything if it is overrun. Everything started
is stopped in ``finally``. The report goes to stdout and ``tests/bench/results/wado.md``; ``main()``
returns the figures as a dict.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import re
import resource
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pynetdicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import UID, ExplicitVRLittleEndian
from pynetdicom import AE, build_role, evt

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from gateway.dimse.retrieve import part10_header  # noqa: E402
from tests.integration.peers import HOST, OrthancPeer, PeerError, dcmtk_tool, free_port  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "wado.md"
STUDY_ROOT_GET = "1.2.840.10008.5.1.4.1.2.2.3"
STUDY_ROOT_FIND = "1.2.840.10008.5.1.4.1.2.2.1"
CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"
NATIVE = ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2"]
UID_ROOT = "1.2.826.0.1.3680043.10.1082.99"   # the demo data's root, branch 99: benchmark studies
ACCEPT_DICOM = 'multipart/related; type="application/dicom"; transfer-syntax=*'
ACCEPT_FRAME = 'multipart/related; type="application/octet-stream"; transfer-syntax=*'
MAX_PDU = 131072       # the gateway's nodes[].max_pdu for queries; getscu's maximum
GW_AE = "DICOMWEBGW"


class BenchError(RuntimeError):
    """A measurement could not be taken or gave a wrong answer."""


class Deadline:
    """The run's time budget: phases ask what is left; a SIGALRM watchdog stops an overrun run."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.end = time.monotonic() + seconds

    def left(self) -> float:
        return self.end - time.monotonic()

    @contextlib.contextmanager
    def watchdog(self) -> Iterator[None]:
        def expired(signum: int, frame: Any) -> None:
            raise BenchError(f"time budget of {self.seconds:.0f} s exceeded")

        if not hasattr(signal, "SIGALRM") or threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = signal.signal(signal.SIGALRM, expired)
        signal.alarm(max(1, math.ceil(self.seconds)))
        try:
            yield
        finally:
            signal.alarm(0)
            signal.signal(signal.SIGALRM, previous)


# ------------------------------------------------------------------------ statistics


def percentile(samples: Sequence[float], fraction: float) -> float:
    """Nearest-rank percentile (no interpolation)."""
    ordered = sorted(samples)
    return ordered[max(0, math.ceil(fraction * len(ordered)) - 1)]


def med(samples: Sequence[float]) -> float:
    return statistics.median(samples) if samples else float("nan")


# ------------------------------------------------------------------------ data


@dataclass
class StudyFiles:
    study_uid: str
    series_uid: str
    sop_uids: list[str]
    slices: int
    size: int
    total_bytes: int = 0


def _phantom(size: int) -> np.ndarray:
    """A crude chest-like CT slice (stored values, RescaleIntercept -1024); content is irrelevant here."""
    axis = (np.arange(size) + 0.5) / size * 2 - 1
    v, u = np.meshgrid(axis, axis, indexing="ij")
    img = np.full((size, size), 24, dtype=np.int16)
    img[(u / 0.86) ** 2 + ((v - 0.05) / 0.62) ** 2 <= 1] = 924
    img[(u / 0.8) ** 2 + ((v - 0.05) / 0.56) ** 2 <= 1] = 1064
    for side in (-1, 1):
        img[((u - side * 0.37) / 0.27) ** 2 + ((v - 0.02) / 0.42) ** 2 <= 1] = 164
    img[u ** 2 + v ** 2 > 1] = -2000
    return img


def generate_ct_study(directory: Path, number: int, slices: int, size: int) -> Iterator[Path]:
    """Write a one-series CT study file by file (yielding each path); nothing is held in memory.

    A consumer may delete each file once it has moved on to the next one. Fills ``study`` (see
    :func:`ct_study`) as it goes.
    """
    directory.mkdir(parents=True, exist_ok=True)
    base = _phantom(size)
    noise = np.random.default_rng(number).integers(-12, 13, size=size * size + 4096, dtype=np.int16)
    study, series = f"{UID_ROOT}.1.{number}", f"{UID_ROOT}.2.{number}.1"
    for i in range(slices):
        sop = f"{UID_ROOT}.3.{number}.1.{i + 1}"
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID = UID(CT_IMAGE)
        ds.file_meta.MediaStorageSOPInstanceUID = UID(sop)
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.SpecificCharacterSet = "ISO_IR 100"
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.SOPClassUID = CT_IMAGE
        ds.SOPInstanceUID = sop
        ds.StudyDate = ds.SeriesDate = ds.ContentDate = "20240105"
        ds.StudyTime = ds.SeriesTime = "101500"
        ds.AccessionNumber = f"BENCH{number:04d}"
        ds.Modality = "CT"
        ds.Manufacturer = "DGW Benchmark"
        ds.StudyDescription = f"CT benchmark {slices}x{size}"
        ds.SeriesDescription = "Thorax 1mm"
        ds.PatientName = "Bench^Wado"
        ds.PatientID = f"DGWBENCH{number}"
        ds.PatientBirthDate = "19700101"
        ds.PatientSex = "O"
        ds.SliceThickness = 1.0
        ds.KVP = 120
        ds.StudyInstanceUID = study
        ds.SeriesInstanceUID = series
        ds.StudyID = f"B{number}"
        ds.SeriesNumber = 1
        ds.InstanceNumber = i + 1
        ds.ImagePositionPatient = [-175.0, -175.0, -float(i)]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.FrameOfReferenceUID = f"{UID_ROOT}.4.{number}"
        ds.SliceLocation = -float(i)
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows = ds.Columns = size
        ds.PixelSpacing = [round(350.0 / size, 6)] * 2
        ds.BitsAllocated = ds.BitsStored = 16
        ds.HighBit = 15
        ds.PixelRepresentation = 1
        ds.WindowCenter, ds.WindowWidth = 40, 400
        ds.RescaleIntercept, ds.RescaleSlope = -1024, 1
        offset = (i * 7919) % 4096
        ds.PixelData = (base + noise[offset:offset + size * size].reshape(size, size)).tobytes()
        path = directory / f"ct{number}_{i + 1:05d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        yield path


def ct_study(number: int, slices: int, size: int) -> StudyFiles:
    return StudyFiles(f"{UID_ROOT}.1.{number}", f"{UID_ROOT}.2.{number}.1",
                      [f"{UID_ROOT}.3.{number}.1.{i + 1}" for i in range(slices)], slices, size)


def load_study(peer: OrthancPeer, directory: Path, number: int, slices: int, size: int) -> StudyFiles:
    """Generate and upload a study one file at a time (each file deleted once uploaded)."""
    study = ct_study(number, slices, size)
    previous: list[Path] = []

    def paths() -> Iterator[Path]:
        for path in generate_ct_study(directory, number, slices, size):
            for old in previous:
                old.unlink(missing_ok=True)
            previous[:] = [path]
            study.total_bytes += path.stat().st_size
            yield path

    try:
        loaded = peer.load(paths())
    finally:
        for old in previous:
            old.unlink(missing_ok=True)
    if loaded != slices:
        raise BenchError(f"loaded {loaded} of {slices} instances into Orthanc")
    return study


# ------------------------------------------------------------------------ the gateway process


def _proc_status(pid: int, key: str) -> int:
    """A ``kB`` line of /proc/<pid>/status, in bytes (0 when the process is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


def _proc_cpu(pid: int) -> float:
    """User + system CPU seconds of a process (all threads)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class GatewayProcess:
    """``python -m gateway.cli serve`` on a free loopback port with its own config and spool."""

    def __init__(self, peer: Any, workdir: Path, tag: str, extra_config: str = "", *,
                 node: dict[str, Any] | None = None, gateway: dict[str, Any] | None = None) -> None:
        """``peer``: the PACS (its ``ae_title`` and ``dicom_port``: an OrthancPeer or DcmqrscpPeer).

        ``extra_config``: more top-level YAML sections (e.g. ``cache:``) appended to the config;
        ``node`` / ``gateway``: keys overriding the node's and the ``gateway:`` section's defaults
        (e.g. ``{"retrieve": "move"}``, ``{"dimse_port": 11112}``).
        """
        self.workdir = workdir / f"gw-{tag}"
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.spool = self.workdir / "spool"
        self.port = free_port()
        self.root = f"http://{HOST}:{self.port}"
        self.log_path = self.workdir / "gateway.log"
        config = self.workdir / "gateway.yaml"
        gateway_section = {"ae_title": GW_AE, "dimse_host": HOST, "dimse_port": free_port(), **(gateway or {})}
        node_section = {"name": "orthanc", "ae_title": peer.ae_title, "host": HOST, "port": peer.dicom_port,
                        "retrieve": "get", "timeouts": {"connect": 5, "acse": 10, "dimse": 30, "network": 60},
                        **(node or {})}
        self.dimse_port = int(gateway_section["dimse_port"])
        config.write_text(    # JSON flow mappings are YAML
            f"gateway: {json.dumps(gateway_section)}\n"
            f"nodes: [{json.dumps(node_section)}]\n"
            f"spool: {json.dumps({'path': str(self.spool), 'max_bytes': '20GiB'})}\n"
            # No PACS profiling: each sample is a fresh process, whose first contact would probe the
            # PACS (C-FINDs, a C-GET, an association held idle 5.5 s) beside the measured request;
            # a deployment probes a node once a day, so its cold requests run beside no probe.
            + ("" if "profiling:" in extra_config else 'profiling: {"enabled": false}\n')
            + extra_config
        )
        setpriv = shutil.which("setpriv")
        prefix = [setpriv, "--pdeathsig", "TERM"] if setpriv else []
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
        self._log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [*prefix, sys.executable, "-m", "gateway.cli", "serve", "--config", str(config), "--port",
             str(self.port)], cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=self._log,
            stderr=subprocess.STDOUT, start_new_session=True)
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise

    @property
    def pid(self) -> int:
        return self.proc.pid

    def _wait_ready(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise BenchError(f"gateway exited with {self.proc.returncode}{self.log_tail()}")
            try:
                if httpx.get(self.root + "/healthz", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        raise BenchError(f"gateway not ready after {timeout:.0f} s{self.log_tail()}")

    def warm_up(self, study: StudyFiles) -> None:
        """One QIDO request: imports done, C-FIND association open; nothing is spooled."""
        r = httpx.get(f"{self.root}/dicom-web/studies", params={"StudyInstanceUID": study.study_uid},
                      headers={"Accept": "application/dicom+json"}, timeout=30)
        if r.status_code != 200 or len(r.json()) != 1:
            raise BenchError(f"gateway warm-up QIDO answered {r.status_code}: {r.text[:200]}")

    def cpu(self) -> float:
        return _proc_cpu(self.pid)

    def rss(self) -> int:
        return _proc_status(self.pid, "VmRSS")

    def hwm(self) -> int:
        return _proc_status(self.pid, "VmHWM")

    def spooled(self) -> int:
        # <spool>/<node>/<sop>.dcm (older layouts: <spool>/<sop>.dcm)
        return sum(1 for _ in Path(self.spool).glob("*.dcm")) + sum(1 for _ in Path(self.spool).glob("*/*.dcm"))

    def log_tail(self, lines: int = 30) -> str:
        try:
            text = self.log_path.read_text(errors="replace").splitlines()[-lines:]
        except OSError:
            return ""
        return "\n--- gateway log ---\n" + "\n".join(text)

    def stop(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        self._log.close()
        shutil.rmtree(self.spool, ignore_errors=True)


# ------------------------------------------------------------------------ HTTP clients


@dataclass
class Transfer:
    seconds: float
    ttfb: float          # response headers received
    first_part: float    # first part complete (second delimiter seen, or the end)
    nbytes: int
    parts: int
    cpu: float = float("nan")


def _boundary(content_type: str) -> bytes:
    m = re.search(r'boundary="?([^";]+)"?', content_type)
    if not m:
        raise BenchError(f"no boundary in {content_type!r}")
    return b"--" + m.group(1).encode()


class PatternCount:
    """Occurrences of ``pattern`` in a stream fed in pieces, those spanning two pieces included,
    without joining the pieces (the client's CPU shares the machine with the gateway and the PACS)."""

    def __init__(self, pattern: bytes) -> None:
        if len(pattern) < 2:
            raise ValueError("a delimiter of at least two bytes")
        self.pattern = pattern
        self.count = 0
        self._tail = b""        # the last len(pattern) - 1 bytes fed

    def feed(self, data: bytes) -> None:
        # Within ``data``, plus those starting in the tail (shorter than the pattern, so it holds
        # none whole): they end within data's first k bytes.
        k = len(self.pattern) - 1
        self.count += data.count(self.pattern) + (self._tail + data[:k]).count(self.pattern)
        self._tail = (self._tail + data)[-k:] if len(data) < k else data[len(data) - k:]


def stream_get(client: httpx.Client, url: str, accept: str, *, rate: float | None = None,
               chunk: int | None = None, max_parts: int | None = None) -> Transfer:
    """GET a multipart response, counting parts on the fly; ``rate`` (bytes/s) makes a slow client.

    ``chunk``: read in pieces of that size (None: as they arrive, nothing re-chunked or copied).
    ``max_parts``: stop reading (close the connection) once that many parts have started.
    """
    t0 = time.perf_counter()
    with client.stream("GET", url, headers={"Accept": accept}) as r:
        ttfb = time.perf_counter() - t0
        if r.status_code != 200:
            r.read()
            raise BenchError(f"GET {url} answered {r.status_code}: {r.text[:200]}")
        delim = _boundary(r.headers.get("content-type", ""))
        seen, closings = PatternCount(delim), PatternCount(delim + b"--")
        nbytes = 0
        first_part = float("nan")
        for data in r.iter_raw(chunk):
            nbytes += len(data)
            seen.feed(data)
            closings.feed(data)
            if seen.count >= 2 and math.isnan(first_part):
                first_part = time.perf_counter() - t0
            if max_parts is not None and seen.count > max_parts:
                break
            if rate:
                ahead = nbytes / rate - (time.perf_counter() - t0)
                if ahead > 0:
                    time.sleep(ahead)
    seconds = time.perf_counter() - t0
    return Transfer(seconds, ttfb, first_part if not math.isnan(first_part) else seconds, nbytes,
                    seen.count - closings.count)


def get_json(client: httpx.Client, url: str) -> tuple[float, int]:
    t0 = time.perf_counter()
    r = client.get(url, headers={"Accept": "application/dicom+json"})
    elapsed = time.perf_counter() - t0
    if r.status_code != 200:
        raise BenchError(f"GET {url} answered {r.status_code}: {r.text[:200]}")
    return elapsed, len(r.json())


# ------------------------------------------------------------------------ raw DIMSE clients


def _fast_recv(transport: Any) -> None:
    """Patch one association's transport: read each PDU with ``recv_into`` into one buffer.

    pynetdicom 3.0 reads every PDU in 4 KiB ``recv()`` calls appended to a bytearray: 32 syscalls (and
    32 GIL releases) per 128 KiB PDU. Benchmark-only: shows what the gateway could gain.
    """
    sock = transport.socket

    def recv(nr_bytes: int) -> bytearray:
        buf = bytearray(nr_bytes)
        view = memoryview(buf)
        got = 0
        while got < nr_bytes:
            n = sock.recv_into(view[got:], nr_bytes - got)
            if not n:
                del buf[got:]
                return buf
            got += n
        return buf

    transport.recv = recv


@dataclass
class RawResult:
    seconds: float
    cpu: float
    first: float      # first instance written
    count: int
    nbytes: int


def raw_get(peer: OrthancPeer, study: StudyFiles, out: Path, *, fast_recv: bool = False) -> RawResult:
    """A raw pynetdicom C-GET of the study, each instance written to ``out`` as received."""
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    ae = AE(ae_title="BENCHRAW")
    ae.maximum_pdu_size = 0
    ae.acse_timeout, ae.dimse_timeout, ae.network_timeout = 10, 60, 60
    ae.add_requested_context(STUDY_ROOT_GET)
    ae.add_requested_context(CT_IMAGE, NATIVE)
    got: dict[str, Any] = {"count": 0, "bytes": 0, "first": float("nan")}
    t0 = time.perf_counter()

    def on_store(event: evt.Event) -> int:
        data = event.encoded_dataset(include_meta=True)
        request: Any = event.request
        (out / f"{request.AffectedSOPInstanceUID}.dcm").write_bytes(data)
        got["count"] += 1
        got["bytes"] += len(data)
        if got["count"] == 1:
            got["first"] = time.perf_counter() - t0
        return 0x0000

    def on_open(event: evt.Event) -> None:
        transport: Any = event.assoc.dul.socket
        transport.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if fast_recv:
            _fast_recv(transport)

    c0 = time.process_time()
    assoc = ae.associate(HOST, peer.dicom_port, ae_title=peer.ae_title, max_pdu=0,
                         ext_neg=[build_role(CT_IMAGE, scp_role=True)],
                         evt_handlers=[(evt.EVT_C_STORE, on_store), (evt.EVT_CONN_OPEN, on_open)])
    if not assoc.is_established:
        raise BenchError("raw C-GET association not established")
    try:
        identifier = Dataset()
        identifier.QueryRetrieveLevel = "STUDY"
        identifier.StudyInstanceUID = study.study_uid
        final = None
        for status, _ in assoc.send_c_get(identifier, STUDY_ROOT_GET):
            final = int(status.Status) if status and "Status" in status else None
    finally:
        if assoc.is_established:
            assoc.release()
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    if final != 0x0000 or got["count"] != study.slices:
        raise BenchError(f"raw C-GET: status {final}, {got['count']} of {study.slices} instances")
    return RawResult(seconds, cpu, got["first"], got["count"], got["bytes"])


def getscu(peer: OrthancPeer, study: StudyFiles, out: Path, exe: str, timeout: float) -> RawResult:
    """DCMTK getscu: Study Root, 128 KiB PDUs, Explicit VR LE preferred, bit-preserving writes."""
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    env = dict(os.environ, TCP_NODELAY="1")
    argv = [exe, "-S", "-aet", "BENCHGETSCU", "-aec", peer.ae_title, "-pdu", str(MAX_PDU), "+xe", "+B",
            "-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={study.study_uid}", "-od", str(out),
            HOST, str(peer.dicom_port)]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    done = subprocess.run(argv, env=env, capture_output=True, timeout=timeout, check=False)
    seconds = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    files = list(out.iterdir())
    if done.returncode != 0 or len(files) != study.slices:
        raise BenchError(f"getscu exit {done.returncode}, {len(files)} of {study.slices} files: "
                         f"{done.stderr[-300:]!r}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return RawResult(seconds, cpu, float("nan"), len(files), sum(f.stat().st_size for f in files))


# A minimal single-threaded C-GET receiver in pure Python, benchmark only: it parses PDUs and PDVs
# itself, writes dataset fragments straight to the file (never reassembling an instance in memory) and
# answers each C-STORE with a hand-encoded response. It measures what Python can do on this path
# without pynetdicom's per-message machinery (threads, queues, 1 ms polling, pydicom-encoded commands).
# Only what this benchmark needs: Study Root C-GET of one SOP class, Implicit VR LE commands.

_APP_CONTEXT = b"1.2.840.10008.3.1.1.1"


def _ul_item(kind: int, payload: bytes) -> bytes:
    return struct.pack(">BBH", kind, 0, len(payload)) + payload


def _ui(uid: str) -> bytes:
    value = uid.encode("ascii")
    return value + b"\0" * (len(value) % 2)


def _command(elements: list[tuple[int, bytes]]) -> bytes:
    body = b"".join(struct.pack("<HHI", 0, el, len(v)) + v for el, v in elements)
    return struct.pack("<HHI", 0, 0, 4) + struct.pack("<I", len(body)) + body


def _p_data(context_id: int, control: int, data: bytes) -> bytes:
    pdv = struct.pack(">IBB", len(data) + 2, context_id, control) + data
    return struct.pack(">BBI", 0x04, 0, len(pdv)) + pdv


def _parse_command(data: bytes) -> dict[int, bytes]:
    out, i = {}, 0
    while i + 8 <= len(data):
        _, element, length = struct.unpack_from("<HHI", data, i)
        out[element] = data[i + 8:i + 8 + length]
        i += 8 + length
    return out


class _PduReader:
    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = bytearray(1 << 20)

    def exact(self, n: int) -> memoryview:
        if n > len(self.buf):
            self.buf = bytearray(n)
        view = memoryview(self.buf)[:n]
        got = 0
        while got < n:
            k = self.sock.recv_into(view[got:], n - got)
            if not k:
                raise BenchError("UL prototype: peer closed the connection")
            got += k
        return view

    def pdu(self) -> tuple[int, memoryview]:
        kind, _, length = struct.unpack(">BBI", self.exact(6))
        return kind, self.exact(length)   # valid until the next read


def ul_get(peer: OrthancPeer, study: StudyFiles, out: Path) -> RawResult:
    """C-GET of the study with the pure-Python receiver; files identical to the raw SCU's."""
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    t0, c0 = time.perf_counter(), time.process_time()
    sock = socket.create_connection((HOST, peer.dicom_port), timeout=60)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    reader = _PduReader(sock)
    count = nbytes = 0
    first = float("nan")
    try:
        contexts = [(1, STUDY_ROOT_GET, [NATIVE[1]]), (3, CT_IMAGE, NATIVE)]
        body = struct.pack(">HH", 1, 0) + peer.ae_title.encode().ljust(16) + b"BENCHULGET".ljust(16) + b"\0" * 32
        body += _ul_item(0x10, _APP_CONTEXT)
        for cid, abstract, syntaxes in contexts:
            sub = _ul_item(0x30, abstract.encode()) + b"".join(_ul_item(0x40, ts.encode()) for ts in syntaxes)
            body += _ul_item(0x20, bytes([cid, 0, 0, 0]) + sub)
        role = CT_IMAGE.encode()
        user = (_ul_item(0x51, struct.pack(">I", 0)) + _ul_item(0x52, UID_ROOT.encode() + b".9")
                + _ul_item(0x54, struct.pack(">H", len(role)) + role + bytes([0, 1])))
        body += _ul_item(0x50, user)
        sock.sendall(struct.pack(">BBI", 0x01, 0, len(body)) + body)
        kind, view = reader.pdu()
        if kind != 0x02:
            raise BenchError(f"UL prototype: association not accepted (PDU type {kind:#04x})")
        ac, i, accepted = bytes(view), 68, {}
        while i + 4 <= len(ac):
            item, _, length = struct.unpack_from(">BBH", ac, i)
            if item == 0x21 and ac[i + 6] == 0 and ac[i + 8] == 0x40:
                ts_len = struct.unpack_from(">H", ac, i + 10)[0]
                accepted[ac[i + 4]] = ac[i + 12:i + 12 + ts_len].decode().rstrip("\0")
            i += 4 + length
        if 1 not in accepted or 3 not in accepted:
            raise BenchError(f"UL prototype: contexts accepted {accepted}")
        identifier = (struct.pack("<HHI", 0x0008, 0x0052, 6) + b"STUDY "
                      + struct.pack("<HHI", 0x0020, 0x000D, len(_ui(study.study_uid))) + _ui(study.study_uid))
        get_rq = _command([(0x0002, _ui(STUDY_ROOT_GET)), (0x0100, struct.pack("<H", 0x0010)),
                           (0x0110, struct.pack("<H", 1)), (0x0700, struct.pack("<H", 0)),
                           (0x0800, struct.pack("<H", 0))])
        sock.sendall(_p_data(1, 0x03, get_rq) + _p_data(1, 0x02, identifier))
        command = bytearray()
        current: dict[int, bytes] = {}
        fd = -1                       # the open instance file; -1: discard dataset fragments
        tmp = out / ".incoming.part"
        while True:
            kind, view = reader.pdu()
            if kind != 0x04:
                raise BenchError(f"UL prototype: unexpected PDU type {kind:#04x}")
            i = 0
            while i < len(view):
                length, cid, control = struct.unpack_from(">IBB", view, i)
                data = view[i + 6:i + 4 + length]
                i += 4 + length
                if control & 1:       # command fragment
                    command += data
                    if not control & 2:
                        continue
                    current = _parse_command(bytes(command))
                    command.clear()
                    field_ = struct.unpack("<H", current[0x0100])[0]
                    if field_ == 0x0001:      # C-STORE-RQ: the file starts with our Part-10 header
                        header = part10_header(current[0x0002].rstrip(b"\0 ").decode(),
                                               current[0x1000].rstrip(b"\0 ").decode(), accepted[cid])
                        if header is None:
                            raise BenchError("UL prototype: unexpected UID")
                        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
                        os.write(fd, header)
                        current[-1] = bytes([cid])
                    elif field_ == 0x8010:    # C-GET-RSP
                        status = struct.unpack("<H", current[0x0900])[0]
                        if status in (0xFF00, 0xFF01):
                            continue
                        sock.sendall(struct.pack(">BBI", 0x05, 0, 4) + b"\0" * 4)   # A-RELEASE-RQ
                        reader.pdu()
                        if status != 0x0000 or count != study.slices:
                            raise BenchError(f"UL prototype: final status {status:#06x}, {count} instances")
                        return RawResult(time.perf_counter() - t0, time.process_time() - c0, first, count,
                                         nbytes)
                    continue
                if fd < 0:
                    continue
                rest = data
                while rest:
                    rest = rest[os.write(fd, rest):]
                nbytes += len(data)
                if control & 2:           # last fragment: close, rename, answer
                    os.close(fd)
                    fd = -1
                    sop = current[0x1000].rstrip(b"\0 ").decode()
                    os.replace(tmp, out / f"{sop}.dcm")
                    count += 1
                    if count == 1:
                        first = time.perf_counter() - t0
                    rsp = _command([(0x0002, current[0x0002]), (0x0100, struct.pack("<H", 0x8001)),
                                    (0x0120, current[0x0110]), (0x0800, struct.pack("<H", 0x0101)),
                                    (0x0900, struct.pack("<H", 0)), (0x1000, current[0x1000])])
                    sock.sendall(_p_data(current[-1][0], 0x03, rsp))
    finally:
        sock.close()


def raw_manifest_find(peer: OrthancPeer, study: StudyFiles) -> float:
    """The IMAGE-level C-FIND a cold series retrieve starts with (the gateway's manifest), raw."""
    ae = AE(ae_title="BENCHRAW")
    ae.acse_timeout, ae.dimse_timeout, ae.network_timeout = 10, 30, 30
    ae.add_requested_context(STUDY_ROOT_FIND)
    assoc = ae.associate(HOST, peer.dicom_port, ae_title=peer.ae_title, max_pdu=MAX_PDU)
    if not assoc.is_established:
        raise BenchError("raw C-FIND association not established")
    try:
        transport: Any = assoc.dul.socket
        transport.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        ident = Dataset()
        ident.QueryRetrieveLevel = "IMAGE"
        ident.StudyInstanceUID = study.study_uid
        ident.SeriesInstanceUID = study.series_uid
        ident.SOPInstanceUID = ""
        ident.SOPClassUID = ""
        ident.InstanceNumber = None
        t0 = time.perf_counter()
        matches = sum(1 for status, _ in assoc.send_c_find(ident, STUDY_ROOT_FIND)
                      if status and int(status.Status) in (0xFF00, 0xFF01))
        elapsed = time.perf_counter() - t0
    finally:
        assoc.release()
    if matches != study.slices:
        raise BenchError(f"raw IMAGE C-FIND found {matches} of {study.slices}")
    return elapsed


# ------------------------------------------------------------------------ phases


@dataclass
class Samples:
    """Per-row samples; ``errors`` are reported, never silently dropped."""

    rows: dict[str, list[Any]] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)

    def add(self, name: str, value: Any) -> None:
        self.rows.setdefault(name, []).append(value)


def _check_transfer(t: Transfer, study: StudyFiles, who: str) -> None:
    if t.parts != study.slices or t.nbytes < study.total_bytes:
        raise BenchError(f"{who}: {t.parts} parts / {t.nbytes} bytes, expected {study.slices} parts and "
                         f">= {study.total_bytes} bytes")


def cold_and_warm(peer: OrthancPeer, study: StudyFiles, workdir: Path, opts: argparse.Namespace,
                  deadline: Deadline, getscu_exe: str | None) -> Samples:
    """Phases 1 and 2 (and the spooled/warm metadata rows): interleaved repetitions."""
    s = Samples()
    study_url = f"/dicom-web/studies/{study.study_uid}"
    series_meta = f"{study_url}/series/{study.series_uid}/metadata"
    orthanc = httpx.Client(base_url=peer.dicomweb_url, timeout=120)

    def gateway_block(rep: int) -> None:
        gw = GatewayProcess(peer, workdir, f"cold{rep}")
        try:
            gw.warm_up(study)
            s.add("gw_baseline_rss", gw.rss())
            with httpx.Client(base_url=gw.root, timeout=120) as client:
                c0 = gw.cpu()
                t = stream_get(client, study_url, ACCEPT_DICOM)
                t.cpu = gw.cpu() - c0
                _check_transfer(t, study, "gateway cold")
                s.add("gw_cold", t)
                s.add("gw_cold_hwm", gw.hwm())
                if gw.spooled() != study.slices:
                    raise BenchError(f"spool holds {gw.spooled()} of {study.slices} after the retrieve")
                for _ in range(opts.warm_reps):
                    c0 = gw.cpu()
                    w = stream_get(client, study_url, ACCEPT_DICOM)
                    w.cpu = gw.cpu() - c0
                    _check_transfer(w, study, "gateway warm")
                    s.add("gw_warm", w)
                    o = stream_get(orthanc, f"/studies/{study.study_uid}", ACCEPT_DICOM)
                    _check_transfer(o, study, "Orthanc DICOMweb")
                    s.add("orthanc_warm", o)
                elapsed, n = get_json(client, series_meta)
                s.add("meta_spooled", elapsed)
                for _ in range(3):
                    elapsed, n2 = get_json(client, series_meta)
                    s.add("meta_warm", elapsed)
                if n != study.slices or n2 != study.slices:
                    raise BenchError(f"metadata: {n}/{n2} instances, expected {study.slices}")
                elapsed, n = get_json(orthanc, f"/studies/{study.study_uid}/series/{study.series_uid}/metadata")
                s.add("orthanc_meta", elapsed)
        finally:
            gw.stop()

    def raw_block(rep: int) -> None:
        r = raw_get(peer, study, workdir / "raw-out")
        s.add("raw", r)

    def patched_block(rep: int) -> None:
        s.add("raw_fast", raw_get(peer, study, workdir / "raw-out", fast_recv=True))

    def ul_block(rep: int) -> None:
        s.add("ul", ul_get(peer, study, workdir / "ul-out"))

    def getscu_block(rep: int) -> None:
        assert getscu_exe is not None
        s.add("getscu", getscu(peer, study, workdir / "getscu-out", getscu_exe, timeout=120))

    blocks: list[Callable[[int], None]] = [gateway_block, raw_block, patched_block, ul_block]
    if getscu_exe:
        blocks.append(getscu_block)
    # Untimed warm-up of Orthanc's DICOMweb plugin and page cache (its first answer reads the files).
    stream_get(orthanc, f"/studies/{study.study_uid}", ACCEPT_DICOM)
    raw_block(-1)
    ul_block(-1)
    for sop in study.sop_uids[:: max(1, study.slices // 8)]:
        if (workdir / "ul-out" / f"{sop}.dcm").read_bytes() != (workdir / "raw-out" / f"{sop}.dcm").read_bytes():
            raise BenchError(f"UL prototype wrote {sop} differently from the raw pynetdicom SCU")
    s.rows.pop("raw", None)
    s.rows.pop("ul", None)
    try:
        per_rep = None
        for rep in range(opts.reps):
            started = time.monotonic()
            if per_rep is not None and deadline.left() < per_rep + opts.reserve:
                s.errors.append(f"cold/warm: stopped after {rep} repetitions (time budget)")
                break
            for block in blocks[rep % len(blocks):] + blocks[:rep % len(blocks)]:
                block(rep)
            per_rep = time.monotonic() - started
    finally:
        orthanc.close()
        shutil.rmtree(workdir / "raw-out", ignore_errors=True)
        shutil.rmtree(workdir / "getscu-out", ignore_errors=True)
        shutil.rmtree(workdir / "ul-out", ignore_errors=True)
    return s


def series_ttfb(peer: OrthancPeer, study: StudyFiles, workdir: Path, opts: argparse.Namespace,
                deadline: Deadline) -> Samples:
    """Phase 3: TTFB of a cold series retrieve (fresh gateway each time; closed after the first part)."""
    s = Samples()
    url = f"/dicom-web/studies/{study.study_uid}/series/{study.series_uid}"
    for rep in range(opts.reps):
        if deadline.left() < opts.reserve + 10:
            s.errors.append(f"TTFB: stopped after {rep} repetitions (time budget)")
            break
        gw = GatewayProcess(peer, workdir, f"ttfb{rep}")
        try:
            gw.warm_up(study)
            with httpx.Client(base_url=gw.root, timeout=60) as client:
                s.add("gw_series_ttfb", stream_get(client, url, ACCEPT_DICOM, chunk=64 << 10, max_parts=1))
        finally:
            gw.stop()
        s.add("raw_find", raw_manifest_find(peer, study))
    return s


def _frame_urls(study: StudyFiles, count: int) -> list[str]:
    base = f"/studies/{study.study_uid}/series/{study.series_uid}/instances"
    return [f"{base}/{study.sop_uids[i % study.slices]}/frames/1" for i in range(count)]


def _frame_get(client: httpx.Client, url: str, frame_bytes: int) -> float:
    t0 = time.perf_counter()
    r = client.get(url, headers={"Accept": ACCEPT_FRAME})
    elapsed = time.perf_counter() - t0
    if r.status_code != 200 or len(r.content) < frame_bytes:
        raise BenchError(f"frame {url} answered {r.status_code} with {len(r.content)} bytes")
    return elapsed * 1000


def frame_load(root: str, urls: list[str], frame_bytes: int, clients: int, duration: float) -> dict[str, Any]:
    """``clients`` threads (own keep-alive client each) requesting frames for ``duration`` s."""
    lock = threading.Lock()
    latencies: list[float] = []
    errors: list[str] = []
    window: dict[str, float] = {}
    barrier = threading.Barrier(
        clients + 1, action=lambda: window.update(end=time.perf_counter() + duration), timeout=60)

    def worker(k: int) -> None:
        mine: list[float] = []
        with httpx.Client(base_url=root, timeout=30) as client:
            try:
                _frame_get(client, urls[k % len(urls)], frame_bytes)   # connect, untimed
                barrier.wait()
                i = k * 7
                while time.perf_counter() < window["end"]:
                    try:
                        ms = _frame_get(client, urls[i % len(urls)], frame_bytes)
                    except (BenchError, httpx.HTTPError) as exc:
                        with lock:
                            errors.append(str(exc)[:200])
                        continue
                    finally:
                        i += 1
                    if time.perf_counter() <= window["end"]:
                        mine.append(ms)
            except threading.BrokenBarrierError:
                pass
            except Exception as exc:  # noqa: BLE001 - reported
                with lock:
                    errors.append(f"{type(exc).__name__}: {exc}"[:200])
                barrier.abort()
            finally:
                with lock:
                    latencies.extend(mine)

    threads = [threading.Thread(target=worker, args=(k,), daemon=True) for k in range(clients)]
    for t in threads:
        t.start()
    with contextlib.suppress(threading.BrokenBarrierError):
        barrier.wait()
    for t in threads:
        t.join(duration + 60)
    if not latencies:
        raise BenchError(f"frame load: no request succeeded: {errors[:3]}")
    return {"clients": clients, "rps": len(latencies) / duration, "n": len(latencies),
            "p50": med(latencies), "p95": percentile(latencies, 0.95), "errors": len(errors),
            "error_samples": list(dict.fromkeys(errors))[:3]}


def metadata_and_frames(peer: OrthancPeer, study: StudyFiles, workdir: Path, opts: argparse.Namespace,
                        deadline: Deadline) -> Samples:
    """Phase 4: cold series metadata (fresh gateway), then frames on the now spooled series."""
    s = Samples()
    meta = f"/dicom-web/studies/{study.study_uid}/series/{study.series_uid}/metadata"
    frame_bytes = study.size * study.size * 2
    reps = max(1, opts.reps - 1)
    for rep in range(reps):
        if rep and deadline.left() < opts.reserve + 30:
            s.errors.append(f"metadata cold: stopped after {rep} repetitions (time budget)")
            break
        gw = GatewayProcess(peer, workdir, f"meta{rep}")
        try:
            gw.warm_up(study)
            with httpx.Client(base_url=gw.root, timeout=120) as client:
                elapsed, n = get_json(client, meta)
                if n != study.slices:
                    raise BenchError(f"cold metadata: {n} instances, expected {study.slices}")
                s.add("meta_cold", elapsed)
                if rep < reps - 1:
                    continue
                # Frames, on the last gateway: its spool holds the series (metadata needs every instance).
                deadline_ok = time.monotonic() + 30
                while gw.spooled() < study.slices and time.monotonic() < deadline_ok:
                    time.sleep(0.1)
                urls = _frame_urls(study, min(opts.frames, study.slices))
                api = "/dicom-web"
                s.rows["frame_first"] = [_frame_get(client, api + u, frame_bytes) for u in urls]
                s.rows["frame_warm"] = [_frame_get(client, api + u, frame_bytes) for u in urls]
                with httpx.Client(base_url=peer.dicomweb_url, timeout=60) as orthanc:
                    for u in urls[:10]:
                        _frame_get(orthanc, u, frame_bytes)   # untimed warm-up
                    s.rows["orthanc_frame"] = [_frame_get(orthanc, u, frame_bytes) for u in urls]
                s.add("frame_load", frame_load(gw.root + api, urls, frame_bytes, opts.clients, opts.duration))
                s.add("frame_load_orthanc", frame_load(peer.dicomweb_url, urls, frame_bytes, opts.clients,
                                                       opts.duration))
        finally:
            gw.stop()
    return s


def rss_phase(peer: OrthancPeer, big: StudyFiles, workdir: Path, opts: argparse.Namespace,
              deadline: Deadline, **gateway_options: Any) -> dict[str, Any]:
    """Phase 5: peak RSS of the gateway streaming ``big`` to a slow client.

    ``gateway_options``: passed to :class:`GatewayProcess` (``node=``, ``gateway=`` overrides).
    """
    budget = deadline.left() - opts.reserve - 15
    rate = opts.slow_rate * 1e6
    if big.total_bytes / rate > budget:
        rate = big.total_bytes / max(budget, 5.0)   # read faster rather than overrun the budget
    gw = GatewayProcess(peer, workdir, "rss", **gateway_options)
    samples: list[tuple[float, int, int]] = []
    stop = threading.Event()
    try:
        gw.warm_up(big)
        baseline = gw.rss()
        t0 = time.perf_counter()

        def sampler() -> None:
            while not stop.is_set():
                samples.append((time.perf_counter() - t0, gw.rss(), gw.spooled()))
                stop.wait(0.1)

        thread = threading.Thread(target=sampler, daemon=True)
        thread.start()
        with httpx.Client(base_url=gw.root, timeout=120) as client:
            t = stream_get(client, f"/dicom-web/studies/{big.study_uid}", ACCEPT_DICOM, rate=rate,
                           chunk=256 << 10)
        stop.set()
        thread.join(5)
        _check_transfer(t, big, "gateway (RSS run)")
        filled = next((ts for ts, _, n in samples if n >= big.slices), float("nan"))
        return {"study_bytes": big.total_bytes, "instances": big.slices, "rate": rate,
                "client_seconds": t.seconds, "spool_filled_seconds": filled, "baseline_rss": baseline,
                "peak_rss_sampled": max((r for _, r, _ in samples), default=0), "vmhwm": gw.hwm(),
                "end_rss": gw.rss(), "ttfb": t.ttfb}
    finally:
        stop.set()
        gw.stop()


# ------------------------------------------------------------------------ report


def machine_info(peer: OrthancPeer | None = None) -> dict[str, Any]:
    cpu = "?"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {"nproc": os.cpu_count(), "cpu": cpu, "python": platform.python_version(),
            "platform": platform.platform(terse=True), "pynetdicom": pynetdicom.__version__,
            "httpx": httpx.__version__, "load": os.getloadavg()[0]}


def _mb(n: float) -> str:
    return f"{n / 1e6:.0f}"


def summarize(s: dict[str, list[Any]], study: StudyFiles) -> dict[str, Any]:
    """Medians per row (wall, CPU, MB/s) and the ratios the README quotes."""
    out: dict[str, Any] = {}
    for name in ("gw_cold", "raw", "raw_fast", "ul", "getscu", "gw_warm", "orthanc_warm"):
        values = s.get(name, [])
        if not values:
            continue
        wall = med([v.seconds for v in values])
        out[name] = {"n": len(values), "seconds": wall, "min": min(v.seconds for v in values),
                     "cpu": med([v.cpu for v in values]), "mbps": study.total_bytes / 1e6 / wall,
                     "ttfb": med([getattr(v, "ttfb", float("nan")) for v in values]),
                     "first": med([getattr(v, "first", float("nan")) for v in values])}
    ratios: dict[str, float] = {}
    if "gw_cold" in out:
        for base in ("raw", "raw_fast", "ul", "getscu"):
            if base in out:
                ratios[f"cold_gw/{base}"] = out["gw_cold"]["seconds"] / out[base]["seconds"]
                ratios[f"cold_gw/{base}_cpu"] = out["gw_cold"]["cpu"] / out[base]["cpu"]
    if "gw_warm" in out and "orthanc_warm" in out:
        ratios["warm_gw/orthanc"] = out["gw_warm"]["seconds"] / out["orthanc_warm"]["seconds"]
    out["ratios"] = ratios
    return out


def _fmt(x: float, digits: int = 2) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def render(result: dict[str, Any]) -> str:
    m, o, st, big = result["machine"], result["options"], result["study"], result.get("rss")
    sm, r = result["summary"], result["summary"]["ratios"]
    lines = [
        "# WADO-RS benchmark: gateway vs raw C-GET and Orthanc's DICOMweb plugin",
        "",
        f"- Date: {result['date']}; `python3 tests/bench/bench_wado.py{' --quick' if o['quick'] else ''}` "
        f"(took {result['wall_seconds']:.0f} s)",
        f"- Machine: nproc {m['nproc']} ({m['cpu']}), {m['platform']}, Python {m['python']}, pynetdicom "
        f"{m['pynetdicom']}, httpx {m['httpx']}, Orthanc {m.get('orthanc', '?')}; load average "
        f"{m['load']:.2f} at start, {result['load_end']:.2f} at the end. Orthanc, the gateway and the "
        f"clients share these cores.",
        f"- Study: one CT series, {st['slices']} slices of {st['size']}x{st['size']} 16-bit, Explicit VR LE, "
        f"{_mb(st['bytes'])} MB; Orthanc with TCP_NODELAY=1, MaximumPduLength 131072. Spool and raw "
        f"outputs on the same filesystem ({result['workdir_fs']}).",
        f"- {o['reps']} interleaved repetitions (order rotated); medians. CPU = user + system seconds of "
        f"the receiving process (gateway subprocess, the benchmark process for raw pynetdicom, getscu).",
        "",
        "## Cold and warm study retrieve (`transfer-syntax=*`)",
        "",
        "| client | n | median s | min s | MB/s | CPU s | TTFB ms | ratio gateway / this |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    labels = {
        "gw_cold": "gateway, cold (fresh process, empty spool)",
        "raw": "raw pynetdicom C-GET (files, TCP_NODELAY, max PDU 0)",
        "raw_fast": "raw pynetdicom C-GET, 1 recv per PDU (patched, benchmark only)",
        "ul": "pure-Python C-GET receiver, no pynetdicom (prototype, benchmark only)",
        "getscu": "DCMTK getscu (TCP_NODELAY=1, 128 KiB PDU, +B)",
        "gw_warm": "gateway, warm (spooled)",
        "orthanc_warm": "Orthanc DICOMweb plugin (same Accept)",
    }
    for name, label in labels.items():
        row = sm.get(name)
        if row is None:
            continue
        if name in ("raw", "raw_fast", "ul", "getscu"):
            ratio = f"{r[f'cold_gw/{name}']:.2f} (CPU {r[f'cold_gw/{name}_cpu']:.2f})"
        elif name == "orthanc_warm":
            ratio = f"{r['warm_gw/orthanc']:.2f}"
        else:
            ratio = ""
        ttfb = row["ttfb"] if name.startswith(("gw", "orthanc")) else row["first"]
        lines.append(f"| {label} | {row['n']} | {row['seconds']:.2f} | {row['min']:.2f} | {row['mbps']:.0f} | "
                     f"{_fmt(row['cpu'])} | {_fmt(ttfb * 1000, 0)} | {ratio} |")
    lines += [
        "",
        "TTFB: response headers for HTTP; for raw C-GET the time from association request to the first "
        "instance written. Orthanc's CPU is not counted.",
        "",
        "## Time to first byte, cold series retrieve (fresh gateway; ms, median)",
        "",
        "| gateway headers | gateway first part | raw C-GET first instance | raw IMAGE C-FIND (manifest) |",
        "| ---: | ---: | ---: | ---: |",
        f"| {_fmt(result['ttfb']['headers'] * 1000, 0)} | {_fmt(result['ttfb']['first_part'] * 1000, 0)} | "
        f"{_fmt(sm.get('raw', {}).get('first', float('nan')) * 1000, 0)} | "
        f"{_fmt(result['ttfb']['raw_find'] * 1000, 0)} |",
        "",
        "## Series metadata and frames (ms)",
        "",
        "| request | n | median | p95 | Orthanc plugin median |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    lat = result["latency"]
    for key, label, ref in (("meta_cold", "series metadata, cold (retrieves the series)", None),
                            ("meta_spooled", "series metadata, spooled (first request)", None),
                            ("meta_warm", "series metadata, warm", "orthanc_meta"),
                            ("frame_first", "frame, spooled, first request per instance", None),
                            ("frame_warm", "frame, warm", "orthanc_frame")):
        if key in lat:
            d = lat[key]
            refv = _fmt(lat[ref]["median"], 1) if ref and ref in lat else ""
            lines.append(f"| {label} | {d['n']} | {d['median']:.1f} | {d['p95']:.1f} | {refv} |")
    fl, flo = result.get("frame_load"), result.get("frame_load_orthanc")
    if fl:
        lines += [
            "",
            f"Frames under load ({fl['clients']} concurrent keep-alive clients, {o['duration']:.0f} s): "
            f"gateway {fl['rps']:.0f} requests/s (p50 {fl['p50']:.1f} ms, p95 {fl['p95']:.1f} ms, "
            f"{fl['errors']} errors)"
            + (f"; Orthanc plugin {flo['rps']:.0f} requests/s (p50 {flo['p50']:.1f} ms, p95 {flo['p95']:.1f} ms)"
               f"; ratio {fl['rps'] / flo['rps']:.2f}" if flo else "") + ".",
        ]
    lines += ["", "## Gateway peak RSS against study size", ""]
    lines += ["| study | client | peak RSS (VmHWM) MB | baseline RSS MB | growth MB |",
              "| --- | --- | ---: | ---: | ---: |"]
    cold_hwm = result.get("cold_hwm")
    if cold_hwm:
        lines.append(f"| {_mb(st['bytes'])} MB ({st['slices']} instances) | fast (cold retrieve) | "
                     f"{_mb(cold_hwm)} | {_mb(result.get('baseline_rss', 0))} | "
                     f"{_mb(cold_hwm - result.get('baseline_rss', 0))} |")
    if big:
        lines.append(f"| {_mb(big['study_bytes'])} MB ({big['instances']} instances) | slow, "
                     f"{big['rate'] / 1e6:.0f} MB/s | {_mb(big['vmhwm'])} | {_mb(big['baseline_rss'])} | "
                     f"{_mb(big['vmhwm'] - big['baseline_rss'])} |")
        lines += ["", f"Slow client: {big['client_seconds']:.1f} s to read the study; the spool held every "
                  f"instance after {_fmt(big['spool_filled_seconds'], 1)} s (the retrieval ran at PACS "
                  f"speed, not at the client's). RSS at the end {_mb(big['end_rss'])} MB. Bounded: "
                  f"{'yes' if big['vmhwm'] < big['baseline_rss'] + 256e6 else 'NO'} (growth < 256 MB)."]
    elif o["quick"]:
        lines += ["", "(skipped)"]
    if result["errors"]:
        lines += ["", "## Notes and errors", ""] + [f"- {e}" for e in result["errors"]]
    lines += ["", "## Ratios", ""] + [f"- {k}: {v:.2f}" for k, v in r.items()]
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------ entry point


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="60 slices 256x256, ~210 MB RSS study (< 90 s)")
    parser.add_argument("--reps", type=int, help="cold repetitions per client (3; quick 2)")
    parser.add_argument("--slices", type=int, help="slices of the main study (400; quick 60)")
    parser.add_argument("--size", type=int, help="rows = columns of the main study (512; quick 256)")
    parser.add_argument("--big-slices", type=int, help="slices (512x512) of the RSS study (2000; quick 400; 0 skips)")
    parser.add_argument("--slow-rate", type=float, help="slow client's rate in MB/s (30; quick 40)")
    parser.add_argument("--frames", type=int, default=200, help="single-frame requests per row (200)")
    parser.add_argument("--clients", type=int, default=16, help="concurrent frame clients (16)")
    parser.add_argument("--duration", type=float, help="seconds per frame load window (5; quick 2)")
    parser.add_argument("--budget", type=float, help="seconds for the whole run (470; quick 85)")
    parser.add_argument("--workdir", type=Path, help="where data, spools and outputs go (a temp dir)")
    parser.add_argument("--output", type=Path, default=RESULTS, help=f"markdown report ({RESULTS})")
    opts = parser.parse_args(argv)
    q = opts.quick
    opts.reps = opts.reps or (2 if q else 3)
    opts.slices = opts.slices or (60 if q else 400)
    opts.size = opts.size or (256 if q else 512)
    opts.big_slices = (400 if q else 2000) if opts.big_slices is None else opts.big_slices
    opts.slow_rate = opts.slow_rate or (40.0 if q else 30.0)
    opts.duration = opts.duration or (2.0 if q else 5.0)
    opts.budget = opts.budget or (85.0 if q else 470.0)
    opts.warm_reps = 1
    opts.reserve = 5.0 if q else 15.0     # kept for stopping and writing the report
    if min(opts.reps, opts.slices, opts.size, opts.frames, opts.clients) < 1 or opts.big_slices < 0:
        parser.error("counts must be positive")
    return opts


def _lat(values: list[float]) -> dict[str, float]:
    return {"n": len(values), "median": med(values), "p95": percentile(values, 0.95)}


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    opts = parse_args(argv)
    started = time.monotonic()
    deadline = Deadline(opts.budget)
    machine = machine_info()
    try:
        getscu_exe: str | None = dcmtk_tool("getscu")
    except PeerError:
        getscu_exe = None
    errors: list[str] = [] if getscu_exe else ["DCMTK getscu not found: its row is missing"]
    tmp = tempfile.mkdtemp(prefix="bench-wado-", dir=opts.workdir)
    workdir = Path(tmp)
    peer = OrthancPeer(workdir / "orthanc", tcp_nodelay=True, dicomweb=True)
    result: dict[str, Any] = {}
    try:
        with deadline.watchdog():
            peer.start()
            status, body = peer.request("GET", "/system")
            if status == 200:
                machine["orthanc"] = json.loads(body).get("Version", "?")
            t0 = time.monotonic()
            study = load_study(peer, workdir / "data", 1, opts.slices, opts.size)
            load_seconds = time.monotonic() - t0
            cw = cold_and_warm(peer, study, workdir, opts, deadline, getscu_exe)
            tt = series_ttfb(peer, study, workdir, opts, deadline)
            mf = metadata_and_frames(peer, study, workdir, opts, deadline)
            errors += cw.errors + tt.errors + mf.errors
            rss = None
            if opts.big_slices:
                need = 10 + opts.big_slices * (0.015 + 0.53 / opts.slow_rate)   # generate + load + stream
                if deadline.left() < need + opts.reserve:
                    errors.append(f"RSS run skipped: {deadline.left():.0f} s left, ~{need:.0f} s needed")
                else:
                    big = load_study(peer, workdir / "big", 2, opts.big_slices, 512)
                    rss = rss_phase(peer, big, workdir, opts, deadline)
            rows = {**cw.rows, **tt.rows, **mf.rows}
            ttfb = rows.get("gw_series_ttfb", [])
            lat_keys = ("meta_spooled", "meta_warm", "orthanc_meta", "meta_cold", "frame_first", "frame_warm",
                        "orthanc_frame")
            result = {
                "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
                "machine": machine,
                "options": {k: getattr(opts, k) for k in ("quick", "reps", "frames", "clients", "duration",
                                                           "slow_rate", "budget")},
                "study": {"slices": study.slices, "size": study.size, "bytes": study.total_bytes,
                          "load_seconds": load_seconds},
                "summary": summarize(rows, study),
                "ttfb": {"headers": med([t.ttfb for t in ttfb]), "first_part": med([t.first_part for t in ttfb]),
                         "raw_find": med(rows.get("raw_find", []))},
                "latency": {k: _lat([v * 1000 if k.startswith(("meta", "orthanc_meta")) else v
                                     for v in rows[k]]) for k in lat_keys if rows.get(k)},
                "frame_load": (rows.get("frame_load") or [None])[0],
                "frame_load_orthanc": (rows.get("frame_load_orthanc") or [None])[0],
                "cold_hwm": med(rows.get("gw_cold_hwm", [])) if rows.get("gw_cold_hwm") else None,
                "baseline_rss": med(rows.get("gw_baseline_rss", [])) if rows.get("gw_baseline_rss") else 0,
                "rss": rss,
                "errors": errors,
                "workdir_fs": _fs_type(workdir),
            }
    finally:
        peer.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    result["load_end"] = os.getloadavg()[0]
    result["wall_seconds"] = time.monotonic() - started
    result["markdown"] = render(result)
    print(result["markdown"])
    print(f"(run took {result['wall_seconds']:.0f} s; written to {opts.output})")
    opts.output.parent.mkdir(parents=True, exist_ok=True)
    opts.output.write_text(result["markdown"])
    return result


def _fs_type(path: Path) -> str:
    """Filesystem type of ``path`` from /proc/mounts (longest matching mount point)."""
    best, kind = "", "?"
    with contextlib.suppress(OSError):
        for line in Path("/proc/mounts").read_text().splitlines():
            parts = line.split()
            if len(parts) > 2 and str(path).startswith(parts[1]) and len(parts[1]) > len(best):
                best, kind = parts[1], parts[2]
    return kind


if __name__ == "__main__":
    main()
