"""STOW-RS benchmark: the gateway against DCMTK storescu and raw pynetdicom C-STORE (report-only).

Run ``python3 tests/bench/bench_stow.py [--quick]`` from anywhere. It starts its own Orthanc
(``TCP_NODELAY=1``, no demo data) on free loopback ports and the gateway as a subprocess
(``python -m gateway.cli serve --config ...``, the configured event loop, like production), then:

1. **Throughput**: the same N Part-10 CT files (fresh UIDs, 512x512 16-bit, ~0.5 MB each) stored into
   the same Orthanc by
   - DCMTK ``storescu -R`` (one association, the contexts the files need, 128 KiB PDUs),
   - raw pynetdicom: one association, ``send_c_store(path)`` with ``STORE_SEND_CHUNKED_DATASET`` (the
     file streamed, never decoded: pynetdicom at its best), TCP_NODELAY on its socket,
   - the gateway: one ``POST /dicom-web/studies`` streaming the files as multipart/related (chunked).
     Its time covers the upload, the header reads and the C-STOREs (sequential: the presentation
     contexts are negotiated from all parts, so the association opens once the body is in).
   After each run the study is checked in Orthanc (every instance present) and deleted, so every
   method inserts into the same state. Rounds rotate the order; the median per method is reported.
2. **Memory**: a fresh gateway subprocess receives one upload of 1 GiB (256 MiB with ``--quick``)
   generated on the fly by this process; the gateway's VmRSS is sampled from ``/proc/<pid>/status``
   every 50 ms and its VmHWM (peak) read at the end.

Results go to stdout and ``tests/bench/results/stow.md``; ``main()`` returns them as a dict.
Full run < 5 min, ``--quick`` < 60 s.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pynetdicom
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from pynetdicom import AE, _config

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from gateway.demo_data import generate_demo_datasets  # noqa: E402
from tests.integration.peers import HOST, OrthancPeer, dcmtk_tool, free_port  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "stow.md"
CT = "1.2.840.10008.5.1.4.1.1.2"
EXPLICIT = "1.2.840.10008.1.2.1"
MAX_PDU = 131072
BOUNDARY = "bench-stow-5f1d2c"
MIB = 1024 * 1024


class BenchError(RuntimeError):
    """A measurement could not be taken or gave a wrong answer."""


# ------------------------------------------------------------------------ data


def ct_template() -> Dataset:
    ds = next(d for d in generate_demo_datasets() if d.Modality == "CT" and d.Rows == d.Columns)
    ds.PatientID, ds.PatientName = "BENCH0001", "Bench^Stow"
    return ds


def instance(template: Dataset, study: str, series: str, number: int, size: int) -> Dataset:
    ds = copy.copy(template)
    ds.file_meta = copy.deepcopy(template.file_meta)
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.InstanceNumber = number
    ds.Rows = ds.Columns = size
    rng = np.random.default_rng(number)   # noise: realistic for a PACS that might compress
    ds.PixelData = (rng.integers(0, 1200, size * size, dtype=np.int16) - 1000).astype(np.int16).tobytes()
    return ds


def write_files(directory: Path, count: int, size: int) -> tuple[str, list[Path]]:
    template = ct_template()
    study, series = generate_uid(), generate_uid()
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for n in range(count):
        ds = instance(template, study, series, n + 1, size)
        path = directory / f"{n:05d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return study, paths


def multipart_from_files(paths: Sequence[Path]) -> Iterator[bytes]:
    for path in paths:
        yield f"\r\n--{BOUNDARY}\r\nContent-Type: application/dicom\r\n\r\n".encode()
        with path.open("rb") as fh:
            while chunk := fh.read(MIB):
                yield chunk
    yield f"\r\n--{BOUNDARY}--".encode()


STOW_HEADERS = {"Content-Type": f'multipart/related; type="application/dicom"; boundary="{BOUNDARY}"'}


# ------------------------------------------------------------------------ Orthanc helpers


def orthanc_count(peer: OrthancPeer, study: str) -> int:
    query = {"Level": "Instance", "Query": {"StudyInstanceUID": study}}
    status, body = peer.request("POST", "/tools/find", json.dumps(query).encode(), timeout=120)
    if status != 200:
        raise BenchError(f"Orthanc /tools/find failed: {status}")
    return len(json.loads(body))


def orthanc_delete(peer: OrthancPeer, study: str) -> None:
    status, body = peer.request("POST", "/tools/lookup", study.encode())
    for found in json.loads(body) if status == 200 else []:
        peer.request("DELETE", f"/studies/{found['ID']}", timeout=120)


# ------------------------------------------------------------------------ the three senders


def run_storescu(peer: OrthancPeer, paths: Sequence[Path]) -> None:
    argv = [dcmtk_tool("storescu"), "-aet", "BENCHSCU", "-aec", peer.ae_title, "-pdu", str(MAX_PDU), "-R",
            HOST, str(peer.dicom_port), *map(str, paths)]
    env = dict(os.environ, TCP_NODELAY="1")
    done = subprocess.run(argv, capture_output=True, text=True, env=env, check=False)
    if done.returncode != 0:
        raise BenchError(f"storescu failed ({done.returncode}): {done.stderr[-2000:]}")


def run_raw(peer: OrthancPeer, paths: Sequence[Path]) -> None:
    """One association, every file streamed with send_c_store(path). The reactor guard is the same
    workaround the gateway needs for back-to-back C-STOREs (pynetdicom 3.0.4 race, see store.py)."""
    _config.STORE_SEND_CHUNKED_DATASET = True
    ae = AE(ae_title="BENCHRAW")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 60
    ae.maximum_pdu_size = MAX_PDU
    ae.add_requested_context(CT, [EXPLICIT])
    assoc = ae.associate(HOST, peer.dicom_port, ae_title=peer.ae_title, max_pdu=MAX_PDU)
    if not assoc.is_established:
        raise BenchError("raw association not established")
    assoc.dul.socket.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    busy = False
    get_msg = assoc.dimse.get_msg

    def guarded(block: bool = False) -> Any:
        return (None, None) if busy and not block else get_msg(block)

    assoc.dimse.get_msg = guarded  # type: ignore[method-assign]
    try:
        for path in paths:
            busy = True
            try:
                status = assoc.send_c_store(path)
            finally:
                busy = False
            if not status or int(status.Status) != 0:
                raise BenchError(f"raw C-STORE failed: {status}")
    finally:
        assoc.release()


def run_gateway(url: str, paths: Sequence[Path]) -> None:
    with httpx.Client(timeout=600) as client:
        r = client.post(f"{url}/dicom-web/studies", content=multipart_from_files(paths), headers=STOW_HEADERS)
    if r.status_code != 200:
        raise BenchError(f"gateway STOW answered {r.status_code}: {r.text[:500]}")


# ------------------------------------------------------------------------ the gateway subprocess


def proc_status(pid: int) -> dict[str, int]:
    """VmRSS / VmHWM of a process in KiB."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in ("VmRSS", "VmHWM"):
            out[name] = int(value.split()[0])
    return out


@contextlib.contextmanager
def gateway_process(peer: OrthancPeer, workdir: Path) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    workdir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    config = workdir / "gateway.yaml"
    config.write_text(json.dumps({    # JSON is YAML
        "gateway": {"ae_title": "DICOMWEBGW", "dimse_host": HOST, "dimse_port": free_port()},
        "http": {"host": HOST, "port": port},
        "spool": {"path": str(workdir / "spool")},
        "profiling": {"enabled": False},   # no probe beside the measured upload (bench_wado.GatewayProcess)
        "nodes": [{"name": "orthanc", "ae_title": peer.ae_title, "host": HOST, "port": peer.dicom_port,
                   "timeouts": {"connect": 5, "acse": 10, "dimse": 120, "network": 300}}],
    }))
    log = (workdir / "gateway.log").open("wb")
    proc = subprocess.Popen([sys.executable, "-m", "gateway.cli", "serve", "--config", str(config)],
                            cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    url = f"http://{HOST}:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            if proc.poll() is not None:
                raise BenchError(f"gateway exited: {(workdir / 'gateway.log').read_text()[-2000:]}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise BenchError("gateway did not start")
            time.sleep(0.1)
        yield url, proc
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(15)
        log.close()


# ------------------------------------------------------------------------ measurements


def throughput(peer: OrthancPeer, url: str, study: str, paths: Sequence[Path], rounds: int) -> dict[str, Any]:
    senders: dict[str, Callable[[], None]] = {
        "storescu": lambda: run_storescu(peer, paths),
        "raw pynetdicom": lambda: run_raw(peer, paths),
        "gateway": lambda: run_gateway(url, paths),
    }
    names = list(senders)
    times: dict[str, list[float]] = {n: [] for n in names}
    orthanc_delete(peer, study)
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            started = time.monotonic()
            senders[name]()
            times[name].append(time.monotonic() - started)
            got = orthanc_count(peer, study)
            if got != len(paths):
                raise BenchError(f"{name}: Orthanc holds {got} of {len(paths)} instances")
            orthanc_delete(peer, study)
    size = sum(p.stat().st_size for p in paths)
    rows = {}
    for name, samples in times.items():
        median = statistics.median(samples)
        rows[name] = {"seconds": median, "samples": samples, "mb_s": size / MIB / median,
                      "instances_s": len(paths) / median}
    gw = rows["gateway"]["seconds"]
    return {"instances": len(paths), "mib": size / MIB, "rounds": rounds, "rows": rows,
            "ratio_vs_storescu": rows["storescu"]["seconds"] / gw,
            "ratio_vs_raw": rows["raw pynetdicom"]["seconds"] / gw}


def big_upload(peer: OrthancPeer, workdir: Path, total_mib: int) -> dict[str, Any]:
    size = 1024                                   # 2 MiB of pixel data per instance
    count = max(1, total_mib // 2)
    template = ct_template()
    study, series = generate_uid(), generate_uid()
    sent = 0

    def body() -> Iterator[bytes]:
        nonlocal sent
        buf = io.BytesIO()
        for n in range(count):
            buf.seek(0)
            buf.truncate()
            instance(template, study, series, n + 1, size).save_as(buf, enforce_file_format=True)
            data = buf.getvalue()
            sent += len(data)
            yield f"\r\n--{BOUNDARY}\r\nContent-Type: application/dicom\r\n\r\n".encode()
            for start in range(0, len(data), 256 * 1024):
                yield data[start:start + 256 * 1024]
        yield f"\r\n--{BOUNDARY}--".encode()

    with gateway_process(peer, workdir / "gateway-big") as (url, proc):
        httpx.get(f"{url}/dicom-web/studies", params={"StudyInstanceUID": study}, timeout=30)  # warm up
        before = proc_status(proc.pid)
        peak_sampled = before["VmRSS"]
        stop = threading.Event()

        def sample() -> None:
            nonlocal peak_sampled
            while not stop.is_set():
                with contextlib.suppress(OSError, KeyError):
                    peak_sampled = max(peak_sampled, proc_status(proc.pid)["VmRSS"])
                time.sleep(0.05)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        started = time.monotonic()
        try:
            with httpx.Client(timeout=1200) as client:
                r = client.post(f"{url}/dicom-web/studies", content=body(), headers=STOW_HEADERS)
        finally:
            stop.set()
            sampler.join()
        seconds = time.monotonic() - started
        after = proc_status(proc.pid)
    if r.status_code != 200:
        raise BenchError(f"big upload answered {r.status_code}: {r.text[:300]}")
    stored = orthanc_count(peer, study)
    orthanc_delete(peer, study)
    if stored != count:
        raise BenchError(f"big upload: Orthanc holds {stored} of {count}")
    return {"instances": count, "mib": sent / MIB, "seconds": seconds, "mb_s": sent / MIB / seconds,
            "rss_before_mib": before["VmRSS"] / 1024, "rss_peak_sampled_mib": peak_sampled / 1024,
            "vmhwm_mib": after["VmHWM"] / 1024, "hwm_before_mib": before["VmHWM"] / 1024}


# ------------------------------------------------------------------------ report


def machine_info() -> dict[str, Any]:
    return {"nproc": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
            "pynetdicom": pynetdicom.__version__, "load": os.getloadavg()[0]}


def render(result: dict[str, Any]) -> str:
    m, tp, big = result["machine"], result["throughput"], result["big"]
    cmd = "python3 tests/bench/bench_stow.py" + (" --quick" if result["quick"] else "")
    lines = [
        "# STOW-RS benchmark: gateway vs storescu and raw pynetdicom C-STORE",
        "",
        f"- Date: {result['date']}; `{cmd}`",
        f"- Machine: nproc {m['nproc']}, {m['platform']}, Python {m['python']}, pynetdicom {m['pynetdicom']},"
        f" Orthanc {m.get('orthanc', '?')}; load average {m['load']:.2f} at start. Orthanc, the gateway and"
        " the senders share these cores.",
        f"- Data: {tp['instances']} CT instances, 512x512 16-bit, {tp['mib']:.0f} MiB in all, Explicit VR LE;"
        f" the same files for every sender, into the same Orthanc (TCP_NODELAY=1), the study deleted"
        f" between runs. Median of {tp['rounds']} round(s), order rotated.",
        "- Gateway: `python -m gateway.cli serve` subprocess; one `POST /dicom-web/studies` streaming the"
        " files (chunked); its time covers upload, header reads and C-STOREs, which run one after the"
        " other (contexts are negotiated from all parts). storescu: `-R`, 128 KiB PDUs, TCP_NODELAY=1."
        " Raw: one association, `send_c_store(path)` streamed from disk.",
        "- Ratios are sender time / gateway time: below 1 means the gateway is slower.",
        "",
        "## Throughput",
        "",
        "| sender | seconds (median) | MiB/s | instances/s | runs |",
        "| --- | ---: | ---: | ---: | --- |",
    ]
    for name, row in tp["rows"].items():
        runs = ", ".join(f"{s:.2f}" for s in row["samples"])
        lines.append(f"| {name} | {row['seconds']:.2f} | {row['mb_s']:.0f} | {row['instances_s']:.0f} | {runs} |")
    lines += [
        "",
        f"- gateway vs storescu: **{tp['ratio_vs_storescu']:.2f}** (storescu time / gateway time)",
        f"- gateway vs raw pynetdicom: **{tp['ratio_vs_raw']:.2f}** (raw time / gateway time)",
        "",
        f"## Gateway memory during a {big['mib']:.0f} MiB upload",
        "",
        f"A fresh gateway subprocess; {big['instances']} instances of 2 MiB generated on the fly by the"
        " benchmark and sent chunked in one request. VmRSS sampled every 50 ms; VmHWM is the kernel's peak.",
        "",
        "| upload | seconds | MiB/s | RSS before | RSS peak (sampled) | VmHWM after | growth |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        f"| {big['mib']:.0f} MiB | {big['seconds']:.1f} | {big['mb_s']:.0f} | {big['rss_before_mib']:.0f} MiB"
        f" | {big['rss_peak_sampled_mib']:.0f} MiB | {big['vmhwm_mib']:.0f} MiB"
        f" | {big['vmhwm_mib'] - big['rss_before_mib']:.0f} MiB |",
        "",
    ]
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="100 files, 1 round, 256 MiB upload (< 60 s)")
    parser.add_argument("--files", type=int, help="instances for the throughput rows (400; quick 100)")
    parser.add_argument("--rounds", type=int, help="rounds per sender (3; quick 1)")
    parser.add_argument("--big-mib", type=int, help="size of the memory upload in MiB (1024; quick 256)")
    parser.add_argument("--output", type=Path, default=RESULTS, help=f"markdown report ({RESULTS})")
    opts = parser.parse_args(argv)
    opts.files = opts.files or (100 if opts.quick else 400)
    opts.rounds = opts.rounds or (1 if opts.quick else 3)
    opts.big_mib = opts.big_mib or (256 if opts.quick else 1024)
    return opts


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    opts = parse_args(argv)
    started = time.monotonic()
    machine = machine_info()
    with tempfile.TemporaryDirectory(prefix="bench-stow-") as tmp:
        work = Path(tmp)
        study, paths = write_files(work / "files", opts.files, 512)
        with OrthancPeer(work / "orthanc", dicomweb=False) as peer:
            status, body = peer.request("GET", "/system")
            if status == 200:
                machine["orthanc"] = json.loads(body).get("Version", "?")
            with gateway_process(peer, work / "gateway") as (url, _):
                tp = throughput(peer, url, study, paths, opts.rounds)
            big = big_upload(peer, work, opts.big_mib)
    result: dict[str, Any] = {"date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"), "quick": opts.quick,
                              "machine": machine, "throughput": tp, "big": big,
                              "wall_seconds": time.monotonic() - started}
    result["markdown"] = render(result)
    print(result["markdown"])
    print(f"(run took {result['wall_seconds']:.0f} s; written to {opts.output})")
    opts.output.parent.mkdir(parents=True, exist_ok=True)
    opts.output.write_text(result["markdown"])
    return result


if __name__ == "__main__":
    main()
