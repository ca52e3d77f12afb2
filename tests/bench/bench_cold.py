"""Cold-path benchmark: the gateway's first contact with a study, against DCMTK and raw DIMSE (report-only).

Run ``python3 tests/bench/bench_cold.py [--quick] [--slices N] [--only ROWS]`` from anywhere. On one
generated single-series CT study (400 slices of 512x512 16-bit, ~210 MB; ``--quick``: 60 slices), held
by an Orthanc it starts (TCP_NODELAY=1, DICOMweb plugin) and, for the C-MOVE row, by a DCMTK dcmqrscp
loaded with the same files, it measures in one run each row against an anchor measured in the same run
on the same data, and says whether the row's target holds:

1. ``cget``: cold study retrieve over C-GET (a fresh gateway process and an empty spool per sample;
   ``transfer-syntax=*``): the gateway with each DIMSE engine it can select ("fast", "pynetdicom")
   against DCMTK ``getscu`` and a raw pynetdicom C-GET (``bench_wado``). Target: gateway (fast)
   throughput >= 0.9x getscu's.
2. ``cmove``: the same over C-MOVE: the gateway with a dcmqrscp node (``retrieve: move``), its storage
   SCP on each engine, against DCMTK ``movescu`` moving the study from the same dcmqrscp into DCMTK
   ``storescp``. Target >= 0.9x movescu's throughput.
3. ``ttfb``: time to first byte (response headers) of a cold *series* retrieve against the raw C-GET's
   time to its first instance (association request to first instance written). Target <= that + 30 ms.
4. ``burst``: OHIF-like cold burst (series metadata, then frame 1 of ``--burst-frames`` instances at
   once over 6 connections; ``bench_cache.burst``) against a raw C-GET of the same series. Target
   <= 1.3x.
5. ``storm``: 40 concurrent frame requests on a cold series over two gateway replicas sharing the real
   Redis (unique key prefix) with the cluster configured; the PACS sits behind a loopback TCP proxy that
   counts the associations opened through it (``common.CountingProxy``). Target <= 3 associations.
6. ``qido``: cached QIDO-RS median latency and 8-client throughput against Orthanc's own QIDO-RS
   (``bench_cache.qido_phase``; the demo studies are loaded for it). Targets: median <= 0.5x
   Orthanc's, >= 1000 requests/s.
7. ``stow``: STOW-RS against ``storescu`` and raw pynetdicom C-STORE on the same files
   (``bench_stow.throughput``; fresh UIDs, one instance per slice). Target >= 0.9x storescu's throughput.
8. ``rss``: peak RSS of the gateway streaming a large study (2000 slices of 512x512, ~1 GB; ``--quick``:
   200) to a slow client (``bench_wado.rss_phase``). Target: growth < 256 MB.

Cold samples are interleaved (the order rotates each repetition) and medians reported. Every answer is
checked (instance counts, bytes, files, frames); a failed check is reported with the row, never a
sample. Report-only: the script exits 0 when a target is missed and prints MISSED in the table. The
run is bounded (``--budget``; a watchdog stops an overrun) and stops everything it started (Orthanc,
dcmqrscp, storescp, gateways, the proxy; Redis keys under its prefix deleted) also on failure or
Ctrl-C. The report goes to stdout and ``tests/bench/results/cold_path.md``; ``main()`` returns the
figures as a dict.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from gateway.demo_data import DEMO_STUDIES, write_demo_files  # noqa: E402
from tests.bench import bench_cache as bc  # noqa: E402
from tests.bench import bench_qido as bq  # noqa: E402
from tests.bench import bench_stow as bs  # noqa: E402
from tests.bench import bench_wado as bw  # noqa: E402
from tests.bench.common import (  # noqa: E402
    CountingProxy,
    StoreScp,
    Variant,
    dcmtk_version,
    engine_variants,
    metrics_of,
)
from tests.integration.peers import HOST, DcmqrscpPeer, OrthancPeer, PeerError, dcmtk_tool, free_port  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "cold_path.md"
ROWS = ("cget", "cmove", "ttfb", "burst", "storm", "qido", "stow", "rss")
NAN = float("nan")
RSS_BOUND = 256e6       # bench_wado's "bounded": growth of the peak over the idle RSS


class BenchError(RuntimeError):
    """A measurement could not be taken or gave a wrong answer."""


# ------------------------------------------------------------------------ rows and targets


@dataclass
class Target:
    what: str               # e.g. "throughput vs getscu"
    rule: str               # e.g. ">= 0.9x"
    unit: str
    gateway: float = NAN
    anchor: float = NAN
    anchor_label: str = ""
    ratio: float = NAN
    met: bool | None = None


@dataclass
class Row:
    key: str
    number: int
    title: str
    targets: list[Target] = field(default_factory=list)
    status: str = "skipped"            # measured | failed | skipped
    checks: list[str] = field(default_factory=list)    # answer checks that passed
    errors: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    table: list[str] = field(default_factory=list)     # markdown lines of the row's detail
    seconds: float = 0.0


@dataclass
class Run:
    opts: argparse.Namespace
    workdir: Path
    deadline: bw.Deadline
    study: bw.StudyFiles
    orthanc: OrthancPeer
    variants: list[Variant]
    move_variants: list[Variant] = field(default_factory=list)
    dcmqrscp: DcmqrscpPeer | None = None
    storescp: StoreScp | None = None
    move_port: int = 0
    raw: list[bw.RawResult] = field(default_factory=list)    # raw pynetdicom C-GETs of the study, any row
    prefix: str = ""
    stopped: str = ""


def med(values: Sequence[float]) -> float:
    return bw.med([v for v in values if not math.isnan(v)])


def verdict(t: Target) -> str:
    return {True: "met", False: "**MISSED**", None: "not measured"}[t.met]


def _f(x: float | None, digits: int = 2) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def _mb(n: float) -> str:
    return f"{n / 1e6:.0f}"


# ------------------------------------------------------------------------ shared steps


def warm_up(gw: bw.GatewayProcess) -> None:
    """One QIDO matching nothing: imports done, a C-FIND association open, nothing of the study known."""
    r = httpx.get(f"{gw.root}/dicom-web/studies", params={"PatientID": "DGWBENCH-NOBODY"},
                  headers={"Accept": "application/dicom+json"}, timeout=60)
    if r.status_code not in (200, 204) or (r.status_code == 200 and r.json()):
        raise BenchError(f"gateway warm-up QIDO answered {r.status_code}: {r.text[:200]}{gw.log_tail(10)}")


def gateway(run: Run, peer: Any, tag: str, variant: Variant, **node: Any) -> bw.GatewayProcess:
    return bw.GatewayProcess(peer, run.workdir, tag, node={**node, **variant.node}, gateway=variant.gateway)


def cold_retrieve(gw: bw.GatewayProcess, run: Run, url: str, who: str) -> bw.Transfer:
    """Stream ``url`` once (the whole study) and check every instance arrived and was spooled."""
    warm_up(gw)
    with httpx.Client(base_url=gw.root, timeout=300) as client:
        c0 = gw.cpu()
        t = bw.stream_get(client, url, bw.ACCEPT_DICOM)
        t.cpu = gw.cpu() - c0
    bw._check_transfer(t, run.study, who)
    if gw.spooled() != run.study.slices:
        raise BenchError(f"{who}: the spool holds {gw.spooled()} of {run.study.slices} instances")
    return t


def cold_retrieve_curl(gw: bw.GatewayProcess, run: Run, url: str, who: str) -> bw.Transfer:
    """:func:`cold_retrieve` with curl as the client (C, the body to /dev/null): the gateway's throughput
    without a Python client's parsing on the same two cores. curl does not split the multipart body:
    the check is its size and the spool holding every instance."""
    warm_up(gw)
    c0 = gw.cpu()
    started = time.perf_counter()
    done = subprocess.run(["curl", "-sS", "--fail", "-o", "/dev/null", "-H", f"Accept: {bw.ACCEPT_DICOM}",
                           "-w", "%{size_download} %{time_starttransfer}", f"{gw.root}{url}"],
                          capture_output=True, text=True, timeout=300)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise BenchError(f"{who}: curl failed: {done.stderr.strip()[:300]}")
    size, ttfb = done.stdout.split()
    t = bw.Transfer(seconds, float(ttfb), NAN, int(size), 0, cpu=gw.cpu() - c0)
    if t.nbytes < run.study.total_bytes:
        raise BenchError(f"{who}: {t.nbytes} bytes, fewer than the study's {run.study.total_bytes}")
    if gw.spooled() != run.study.slices:
        raise BenchError(f"{who}: the spool holds {gw.spooled()} of {run.study.slices} instances")
    return t


def raw_get(run: Run) -> bw.RawResult:
    r = bw.raw_get(run.orthanc, run.study, run.workdir / "raw-out")
    run.raw.append(r)
    return r


def interleave(run: Run, row: Row, blocks: list[tuple[str, Callable[[int], Any]]]) -> dict[str, list[Any]]:
    """``opts.reps`` repetitions of every block, the order rotated each time; trimmed by the budget."""
    samples: dict[str, list[Any]] = {name: [] for name, _ in blocks}
    per_rep: float | None = None
    for rep in range(run.opts.reps):
        if per_rep is not None and run.deadline.left() < per_rep + run.opts.reserve:
            row.notes.append(f"stopped after {rep} repetitions (time budget)")
            break
        started = time.monotonic()
        k = rep % len(blocks)
        for name, block in blocks[k:] + blocks[:k]:
            samples[name].append(block(rep))
        per_rep = time.monotonic() - started
    return samples


def transfer_table(run: Run, rows: list[tuple[str, list[Any]]], anchor: str) -> list[str]:
    """Median seconds, MB/s, receiver CPU and TTFB per client; throughput ratio this / ``anchor``."""
    size = run.study.total_bytes
    secs = {label: med([v.seconds for v in values]) for label, values in rows if values}
    lines = [f"| client | n | median s | min s | MB/s | receiver CPU s | TTFB ms | throughput / {anchor} |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for label, values in rows:
        if not values:
            continue
        ttfb = med([getattr(v, "ttfb", getattr(v, "first", NAN)) for v in values]) * 1000
        ratio = secs[anchor] / secs[label] if anchor in secs else NAN
        lines.append(f"| {label} | {len(values)} | {secs[label]:.2f} | {min(v.seconds for v in values):.2f} | "
                     f"{size / 1e6 / secs[label]:.0f} | {_f(med([v.cpu for v in values]))} | {_f(ttfb, 0)} | "
                     f"{_f(ratio)} |")
    return lines


def throughput_target(run: Run, what: str, gw: list[Any], anchor: list[Any], anchor_label: str) -> Target:
    t = Target(what, ">= 0.9x", "MB/s", anchor_label=anchor_label)
    if gw:
        t.gateway = run.study.total_bytes / 1e6 / med([v.seconds for v in gw])
    if anchor:
        t.anchor = run.study.total_bytes / 1e6 / med([v.seconds for v in anchor])
    if gw and anchor:
        t.ratio = t.gateway / t.anchor
        t.met = t.ratio >= 0.9
    return t


# ------------------------------------------------------------------------ 1, 2: cold study retrieve


def row_cget(run: Run, row: Row) -> None:
    study, url = run.study, f"/dicom-web/studies/{run.study.study_uid}"
    try:
        getscu_exe: str | None = dcmtk_tool("getscu")
    except PeerError as exc:
        getscu_exe = None
        row.errors.append(str(exc))
    blocks: list[tuple[str, Callable[[int], Any]]] = [
        (f"gateway, {v.label}",
         lambda rep, v=v: _stopped_gateway(gateway(run, run.orthanc, f"get-{v.name}{rep}", v),
                                           lambda gw: cold_retrieve(gw, run, url, f"gateway {v.label}")))
        for v in run.variants]
    if shutil.which("curl"):
        first = run.variants[0]
        blocks.append((f"gateway, {first.label}, curl client",
                       lambda rep: _stopped_gateway(gateway(run, run.orthanc, f"get-curl{rep}", first),
                                                    lambda gw: cold_retrieve_curl(gw, run, url, "gateway (curl)"))))
    else:
        row.errors.append("curl not found: no row with a C client")
    blocks.append(("raw pynetdicom C-GET", lambda rep: raw_get(run)))
    if getscu_exe:
        blocks.append(("DCMTK getscu", lambda rep: bw.getscu(run.orthanc, study, run.workdir / "getscu-out",
                                                              getscu_exe, timeout=300)))
    bw.raw_get(run.orthanc, study, run.workdir / "raw-out")     # untimed: Orthanc reads its files once
    samples = interleave(run, row, blocks)
    primary = samples[blocks[0][0]]
    row.targets.append(throughput_target(run, f"gateway ({run.variants[0].label}) throughput vs getscu",
                                         primary, samples.get("DCMTK getscu", []), "getscu"))
    row.table = transfer_table(run, list(samples.items()), "DCMTK getscu" if getscu_exe else blocks[0][0])
    row.checks.append(f"every gateway response had {study.slices} parts (curl: not counted) and >= "
                      f"{study.total_bytes} bytes, and its spool held every instance")
    row.notes.append("the curl row is the same gateway with a C client (the body to /dev/null): on two "
                     "cores the httpx client's multipart parsing takes CPU the gateway and the PACS "
                     "otherwise have; the target is computed on the httpx row")
    row.checks.append(f"raw C-GET and getscu wrote {study.slices} instances each time")


def _stopped_gateway(gw: bw.GatewayProcess, work: Callable[[bw.GatewayProcess], Any]) -> Any:
    try:
        return work(gw)
    finally:
        gw.stop()


def movescu(run: Run) -> bw.RawResult:
    """DCMTK movescu: the study from dcmqrscp into storescp; CPU is storescp's (the receiver)."""
    dq, scp, study = run.dcmqrscp, run.storescp, run.study
    assert dq is not None and scp is not None
    scp.clear()
    argv = [dcmtk_tool("movescu"), "-S", "-aet", "BENCHMOVESCU", "-aec", dq.ae_title, "-aem", scp.ae_title,
            "-pdu", str(bw.MAX_PDU), "-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={study.study_uid}",
            HOST, str(dq.dicom_port)]
    c0 = bw._proc_cpu(scp.pid)
    t0 = time.perf_counter()
    done = subprocess.run(argv, env=dict(os.environ, TCP_NODELAY="1"), capture_output=True, timeout=300,
                          check=False)
    seconds = time.perf_counter() - t0
    # storescp answers each C-STORE once the file is written, and dcmqrscp sends the final C-MOVE
    # response after the last sub-operation's answer: every file is on disk when movescu returns.
    files = scp.files()
    if done.returncode != 0 or len(files) != study.slices:
        raise BenchError(f"movescu exit {done.returncode}, storescp holds {len(files)} of {study.slices} files: "
                         f"{done.stderr[-300:]!r}")
    return bw.RawResult(seconds, bw._proc_cpu(scp.pid) - c0, NAN, len(files), sum(f.stat().st_size for f in files))


def row_cmove(run: Run, row: Row) -> None:
    dq, url = run.dcmqrscp, f"/dicom-web/studies/{run.study.study_uid}"
    assert dq is not None
    blocks: list[tuple[str, Callable[[int], Any]]] = [
        (f"gateway, {v.label}",
         lambda rep, v=v: _stopped_gateway(
             bw.GatewayProcess(dq, run.workdir, f"move-{v.name}{rep}",
                               node={"name": "dcmqrscp", "retrieve": "move", **v.node},
                               gateway={"dimse_port": run.move_port, **v.gateway}),
             lambda gw: cold_retrieve(gw, run, url, f"gateway C-MOVE {v.label}")))
        for v in run.move_variants]
    blocks.append(("DCMTK movescu -> storescp", lambda rep: movescu(run)))
    movescu(run)      # untimed: dcmqrscp reads its files once
    samples = interleave(run, row, blocks)
    row.targets.append(throughput_target(run, f"gateway ({run.move_variants[0].label}) throughput vs movescu",
                                         samples[blocks[0][0]], samples["DCMTK movescu -> storescp"], "movescu"))
    row.table = transfer_table(run, list(samples.items()), "DCMTK movescu -> storescp")
    row.checks.append(f"every gateway response had {run.study.slices} parts, its spool every instance; "
                      f"storescp received {run.study.slices} files each time")


# ------------------------------------------------------------------------ 3: TTFB


def row_ttfb(run: Run, row: Row) -> None:
    study, variant = run.study, run.variants[0]
    url = f"/dicom-web/studies/{study.study_uid}/series/{study.series_uid}"
    heads: list[float] = []
    firsts: list[float] = []
    finds: list[float] = []
    own_raw = len(run.raw) < run.opts.reps      # the C-GET row's raw samples serve as anchor when it ran
    for rep in range(run.opts.reps):
        if rep and run.deadline.left() < run.opts.reserve + 15:
            row.notes.append(f"stopped after {rep} repetitions (time budget)")
            break
        gw = gateway(run, run.orthanc, f"ttfb{rep}", variant)
        try:
            warm_up(gw)
            with httpx.Client(base_url=gw.root, timeout=120) as client:
                t = bw.stream_get(client, url, bw.ACCEPT_DICOM, chunk=64 << 10, max_parts=1)
        finally:
            gw.stop()
        if t.parts < 1 or t.nbytes <= 0:
            raise BenchError(f"cold series retrieve: {t.parts} parts, {t.nbytes} bytes")
        heads.append(t.ttfb * 1000)
        firsts.append(t.first_part * 1000)
        if own_raw:
            raw_get(run)
        finds.append(bw.raw_manifest_find(run.orthanc, study) * 1000)
    raw_first = med([r.first * 1000 for r in run.raw])
    target = Target(f"gateway ({variant.label}) TTFB vs raw C-GET first instance", "<= anchor + 30 ms", "ms",
                    gateway=med(heads), anchor=raw_first, anchor_label="raw first instance")
    target.ratio = target.gateway / target.anchor
    target.met = target.gateway <= target.anchor + 30
    row.targets.append(target)
    row.table = [
        "| gateway TTFB (headers) | gateway first part complete | raw C-GET first instance | "
        "raw IMAGE C-FIND (the manifest) | n gateway / raw |",
        "| ---: | ---: | ---: | ---: | ---: |",
        f"| {_f(med(heads), 0)} | {_f(med(firsts), 0)} | {_f(raw_first, 0)} | {_f(med(finds), 0)} | "
        f"{len(heads)} / {len(run.raw)} |",
    ]
    row.checks.append("every cold series response was 200 with a first part; the raw C-GETs received every "
                      "instance; the raw C-FIND found every instance")


# ------------------------------------------------------------------------ 4: OHIF-like burst


def row_burst(run: Run, row: Row) -> None:
    study, variant, opts = run.study, run.variants[0], run.opts
    frames = min(opts.burst_frames, study.slices)

    def gateway_burst(rep: int) -> bc.Burst:
        gw = gateway(run, run.orthanc, f"burst{rep}", variant)
        try:
            warm_up(gw)
            b = bc.burst(gw.root + "/dicom-web", study.slices, opts.burst_connections, "gateway", "cold",
                         study=study.study_uid, series_uid=study.series_uid, max_frames=frames)
            b.retrievals = int(metrics_of(gw.root).get("dwg_retrievals_total", -1))
        finally:
            gw.stop()
        if b.errors:
            raise BenchError(f"cold burst: {len(b.errors)} errors: {'; '.join(b.errors[:2])}")
        return b

    samples = interleave(run, row, [("gateway", gateway_burst), ("raw", lambda rep: raw_get(run))])
    bursts, raws = samples["gateway"], samples["raw"]
    raw_ms = med([r.seconds * 1000 for r in raws])
    t = Target(f"gateway ({variant.label}) cold burst vs raw C-GET of the series", "<= 1.3x", "ms",
               gateway=med([b.total_ms for b in bursts]), anchor=raw_ms, anchor_label="raw C-GET")
    t.ratio = t.gateway / t.anchor
    t.met = t.ratio <= 1.3
    row.targets.append(t)
    all_frames = [ms for b in bursts for ms in b.frames]
    row.table = [
        f"Series metadata, then frame 1 of {frames} of the {study.slices} instances (spread evenly) over "
        f"{opts.burst_connections} keep-alive connections, a fresh gateway each time (`bench_cache.burst`).",
        "",
        "| n | metadata ms | first frame ms | last frame (total) ms | frame p50 / p95 ms | retrievals | "
        "raw C-GET ms |",
        "| ---: | ---: | ---: | ---: | ---: | --- | ---: |",
        f"| {len(bursts)} | {_f(med([b.meta_ms for b in bursts]), 0)} | "
        f"{_f(med([b.first_frame_ms for b in bursts]), 0)} | {_f(t.gateway, 0)} | "
        f"{_f(bw.med(all_frames), 1)} / {_f(bq.percentile(all_frames, 0.95) if all_frames else NAN, 1)} | "
        f"{', '.join(str(b.retrievals) for b in bursts)} | {_f(raw_ms, 0)} |",
    ]
    row.checks.append(f"every burst got {frames} frames of the right size and a complete metadata answer; "
                      "every raw C-GET received every instance")


# ------------------------------------------------------------------------ 5: frame storm over two replicas


def storm(roots: list[str], study: bw.StudyFiles, count: int) -> dict[str, Any]:
    """``count`` frame requests at once (own connection each, opened beforehand), alternating replicas."""
    n = study.slices
    picks = [round(i * (n - 1) / max(1, count - 1)) for i in range(count)] if count <= n else \
        [i % n for i in range(count)]
    base = f"/dicom-web/studies/{study.study_uid}/series/{study.series_uid}/instances"
    frame_bytes = study.size * study.size * 2
    clients = [httpx.Client(base_url=roots[i % len(roots)], timeout=180) for i in range(count)]
    barrier = threading.Barrier(count + 1, timeout=60)
    results: list[tuple[int, int, float] | str] = ["not run"] * count

    def worker(i: int) -> None:
        try:
            barrier.wait()
            t0 = time.perf_counter()
            r = clients[i].get(f"{base}/{study.sop_uids[picks[i]]}/frames/1", headers={"Accept": bw.ACCEPT_FRAME})
            results[i] = (r.status_code, len(r.content), (time.perf_counter() - t0) * 1000)
        except Exception as exc:  # noqa: BLE001 - reported
            results[i] = f"{type(exc).__name__}: {exc}"[:200]

    try:
        for c in clients:
            c.get("/healthz")
        threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(count)]
        for thread in threads:
            thread.start()
        since = time.monotonic()
        barrier.wait()
        t0 = time.perf_counter()
        for thread in threads:
            thread.join(240)
        wall = time.perf_counter() - t0
    finally:
        for c in clients:
            c.close()
    latencies: list[float] = []
    errors: list[str] = []
    for r in results:
        if isinstance(r, str):
            errors.append(r)
        elif r[0] != 200 or r[1] < frame_bytes:
            errors.append(f"HTTP {r[0]}, {r[1]} bytes")
        else:
            latencies.append(r[2])
    return {"since": since, "wall": wall, "ok": len(latencies), "errors": errors,
            "p50": bw.med(latencies), "max": max(latencies, default=NAN)}


def row_storm(run: Run, row: Row) -> None:
    opts, study, variant = run.opts, run.study, run.variants[0]
    keys = bc.RedisKeys(opts.redis, run.prefix)
    keys.ping()
    keys.client.close()
    lines = ["| rep | associations | by kind | pooled at start | frames OK | wall s | frame p50 / max ms | "
             "retrievals A / B |", "| ---: | ---: | --- | ---: | ---: | ---: | ---: | --- |"]
    counts: list[int] = []
    with CountingProxy(HOST, run.orthanc.dicom_port) as proxy:
        for rep in range(opts.reps):
            if rep and run.deadline.left() < opts.reserve + 40:
                row.notes.append(f"stopped after {rep} repetitions (time budget)")
                break
            prefix, secret = f"{run.prefix}storm{rep}:", secrets.token_hex(16)
            replicas: list[bw.GatewayProcess] = []
            try:
                for name in "ab":     # same cache prefix and secret, each its own internal port
                    extra = (f"cache: {json.dumps({'url': opts.redis, 'prefix': prefix})}\n"
                             f"cluster: {json.dumps({'internal_port': free_port(), 'shared_secret': secret})}\n")
                    replicas.append(bw.GatewayProcess(run.orthanc, run.workdir, f"storm{rep}{name}", extra,
                                                      node={"port": proxy.port, **variant.node},
                                                      gateway=variant.gateway))
                for gw in replicas:
                    warm_up(gw)
                # The warm-up's pooled C-FIND associations close after their idle time (gateway/dimse/pool.py):
                # wait for them, so that every association the storm needs is opened during it.
                until = time.monotonic() + 15
                while proxy.active and time.monotonic() < until:
                    time.sleep(0.2)
                pooled = proxy.active
                got = storm([gw.root for gw in replicas], study, opts.storm)
                until = time.monotonic() + 180
                while max(gw.spooled() for gw in replicas) < study.slices and time.monotonic() < until:
                    time.sleep(0.2)
                spooled = max(gw.spooled() for gw in replicas)
                time.sleep(0.5)
                opened = proxy.opened_since(got["since"])
                retrievals = [int(metrics_of(gw.root).get("dwg_retrievals_total", -1)) for gw in replicas]
            finally:
                for gw in replicas:
                    gw.stop()
            if got["errors"]:
                raise BenchError(f"storm: {len(got['errors'])} of {opts.storm} frame requests failed: "
                                 f"{'; '.join(dict.fromkeys(got['errors']))[:300]}")
            if spooled < study.slices:
                raise BenchError(f"storm: the series retrieval did not finish ({spooled} of {study.slices})")
            counts.append(len(opened))
            kinds = ", ".join(f"{k} {v}" for k, v in sorted(CountingProxy.by_kind(opened).items()))
            lines.append(f"| {rep + 1} | {len(opened)} | {kinds} | {pooled} | {got['ok']} | {got['wall']:.2f} | "
                         f"{_f(got['p50'], 0)} / {_f(got['max'], 0)} | {' / '.join(map(str, retrievals))} |")
    t = Target(f"associations at the PACS, {opts.storm} frame requests over 2 replicas ({variant.label})",
               "<= 3", "associations", gateway=float(max(counts)), anchor=float(opts.storm),
               anchor_label="frame requests")
    t.ratio = t.gateway / t.anchor
    t.met = t.gateway <= 3
    row.targets.append(t)
    row.table = [
        f"Two gateway replicas (cluster configured, Redis {opts.redis}, a fresh key prefix per repetition), "
        f"frame 1 of {opts.storm} instances spread over the series, one connection per request, alternating "
        "replicas, all released at once. Associations: accepted by a loopback TCP proxy in front of "
        "Orthanc from the storm's start until the series was spooled, classified by the SOP classes their "
        "A-ASSOCIATE-RQ proposed. The figure is the largest count over the repetitions.",
        "", *lines]
    row.checks.append(f"every frame request answered 200 with a whole frame; a replica spooled all "
                      f"{study.slices} instances each time")


# ------------------------------------------------------------------------ 6: cached QIDO


def row_qido(run: Run, row: Row) -> None:
    opts, variant = run.opts, run.variants[0]
    keys = bc.RedisKeys(opts.redis, run.prefix)
    keys.ping()
    expected = {bc.FILTER_ROW: sum(1 for s in DEMO_STUDIES if s["patient_id"] == "DGW0001"),
                bc.ALL_ROW: len(DEMO_STUDIES) + 1}     # + the benchmark's CT study
    qopts = argparse.Namespace(iterations=opts.qido_iterations, warmup=opts.qido_warmup, duration=opts.duration,
                               block=max(1, min(20, math.ceil(opts.qido_iterations / 3))), clients=opts.clients,
                               latency_budget=opts.qido_budget, reserve_after_qido=opts.reserve)
    gw = bc.CachedGateway(run.orthanc, run.workdir, "qido", opts.redis, f"{run.prefix}qido:",
                          node=variant.node, gateway=variant.gateway)
    try:
        gw.warm_up_elsewhere()
        q = bc.qido_phase(gw, run.orthanc, expected, qopts, run.deadline)

        def healthz_worker() -> tuple[Callable[[], int], Callable[[], None]]:
            client = httpx.Client(base_url=gw.root, timeout=30)
            return (lambda: client.get("/healthz").status_code), client.close

        ceiling = bq.run_load(healthz_worker, opts.clients, opts.duration)
        stored = keys.count(f"{gw.prefix}qido:*")
    finally:
        gw.stop()
        keys.client.close()
    lat, load = q["latency"][bc.FILTER_ROW], q["load"][bc.FILTER_ROW]
    errors = sum(d["errors"] for r in q["latency"].values() for d in r.values()) + \
        sum(d["errors"] for r in q["load"].values() for d in r.values() if d)
    if errors:
        samples = [e for r in q["latency"].values() for d in r.values() for e in d["error_samples"]]
        raise BenchError(f"QIDO: {errors} failed or wrong answers: {samples[:2]}")
    if stored < 1:
        raise BenchError("no QIDO key under the gateway's prefix in Redis: the hits did not come from Redis")
    t = Target(f"cached QIDO median latency vs Orthanc QIDO-RS ({variant.label})", "<= 0.5x", "ms",
               gateway=lat["cached"]["median"], anchor=lat["orthanc"]["median"], anchor_label="Orthanc")
    t.ratio = t.gateway / t.anchor
    t.met = t.ratio <= 0.5
    row.targets.append(t)
    tp = Target(f"cached QIDO throughput, {opts.clients} clients", ">= 1000 req/s", "req/s",
                anchor_label="Orthanc")
    if load.get("cached") and load.get("orthanc"):
        tp.gateway, tp.anchor = load["cached"]["rps"], load["orthanc"]["rps"]
        tp.ratio = tp.gateway / tp.anchor
        tp.met = tp.gateway >= 1000
    else:
        row.notes.append("throughput windows skipped (time budget)")
    row.targets.append(tp)
    row.table = [
        f"`bench_cache.qido_phase`: latency over one keep-alive client per target ({opts.qido_iterations} timed "
        f"requests, interleaved blocks), throughput with {opts.clients} client threads for {opts.duration:.1f} s. "
        f"Client ceiling: `/healthz` under the same load answered {ceiling['rps']:.0f} requests/s (p50 "
        f"{ceiling['p50_ms']:.1f} ms).",
        "",
        "| query | target | n | median ms | p95 ms | requests/s |",
        "| --- | --- | ---: | ---: | ---: | ---: |",
    ]
    for query in bc.QUERIES:
        for name, label in bc.TARGETS.items():
            la, lo = q["latency"].get(query, {}).get(name), q["load"].get(query, {}).get(name)
            if la:
                row.table.append(f"| `{query}` | {label} | {la['n']} | {la['median']:.1f} | {la['p95']:.1f} | "
                                 f"{_f(lo['rps'] if lo else NAN, 0)} |")
    row.checks.append(f"every QIDO answer had the expected number of studies ({expected[bc.FILTER_ROW]} "
                      f"filtered, {expected[bc.ALL_ROW]} all); {stored} QIDO keys in Redis")


# ------------------------------------------------------------------------ 7: STOW


def row_stow(run: Run, row: Row) -> None:
    opts, variant = run.opts, run.variants[0]
    stow_study, paths = bs.write_files(run.workdir / "stow", opts.stow_files, opts.size)
    gw = gateway(run, run.orthanc, "stow", variant,
                 timeouts={"connect": 5, "acse": 10, "dimse": 120, "network": 300})
    try:
        warm_up(gw)
        tp = bs.throughput(run.orthanc, gw.root, stow_study, paths, opts.reps)
    finally:
        gw.stop()
        shutil.rmtree(run.workdir / "stow", ignore_errors=True)
    rows = tp["rows"]
    t = Target(f"gateway ({variant.label}) STOW throughput vs storescu", ">= 0.9x", "MiB/s",
               gateway=rows["gateway"]["mb_s"], anchor=rows["storescu"]["mb_s"], anchor_label="storescu",
               ratio=tp["ratio_vs_storescu"])
    t.met = t.ratio >= 0.9
    row.targets.append(t)
    row.table = [
        f"{tp['instances']} CT instances ({tp['mib']:.0f} MiB, {opts.size}x{opts.size}, fresh UIDs), "
        f"{tp['rounds']} round(s), order rotated (`bench_stow.throughput`).",
        "",
        "| sender | median s | MiB/s | instances/s | runs |",
        "| --- | ---: | ---: | ---: | --- |",
        *[f"| {name} | {r['seconds']:.2f} | {r['mb_s']:.0f} | {r['instances_s']:.0f} | "
          f"{', '.join(f'{s:.2f}' for s in r['samples'])} |" for name, r in rows.items()],
    ]
    row.checks.append(f"after every sender Orthanc held all {tp['instances']} instances (then deleted)")


# ------------------------------------------------------------------------ 8: RSS


def row_rss(run: Run, row: Row) -> None:
    opts, variant = run.opts, run.variants[0]
    big = bw.load_study(run.orthanc, run.workdir / "big", 2, opts.big_slices, 512)
    rss = bw.rss_phase(run.orthanc, big, run.workdir, opts, run.deadline, node=variant.node,
                       gateway=variant.gateway)
    growth = rss["vmhwm"] - rss["baseline_rss"]
    t = Target(f"gateway ({variant.label}) peak RSS growth streaming {_mb(big.total_bytes)} MB slowly",
               "< 256 MB", "MB", gateway=growth / 1e6, anchor=big.total_bytes / 1e6, anchor_label="study size",
               ratio=growth / big.total_bytes)
    t.met = growth < RSS_BOUND
    row.targets.append(t)
    row.table = [
        "| study | client rate MB/s | client s | spool filled after s | baseline RSS MB | peak (VmHWM) MB | "
        "growth MB |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
        f"| {_mb(big.total_bytes)} MB ({big.slices} instances) | {rss['rate'] / 1e6:.0f} | "
        f"{rss['client_seconds']:.1f} | {_f(rss['spool_filled_seconds'], 1)} | {_mb(rss['baseline_rss'])} | "
        f"{_mb(rss['vmhwm'])} | {_mb(growth)} |",
    ]
    row.checks.append(f"the slow client received {big.slices} parts and every byte")


# ------------------------------------------------------------------------ report


TITLES = {
    "cget": "Cold study retrieve over C-GET", "cmove": "Cold study retrieve over C-MOVE",
    "ttfb": "Cold series TTFB", "burst": "OHIF-like cold burst", "storm": "Frame storm over two replicas",
    "qido": "Cached QIDO-RS", "stow": "STOW-RS", "rss": "Peak RSS, slow client",
}
FUNCTIONS: dict[str, Callable[[Run, Row], None]] = {
    "cget": row_cget, "cmove": row_cmove, "ttfb": row_ttfb, "burst": row_burst, "storm": row_storm,
    "qido": row_qido, "stow": row_stow, "rss": row_rss,
}


def run_row(run: Run, row: Row) -> None:
    if run.stopped:
        row.errors.append(f"not run: {run.stopped}")
        return
    started = time.monotonic()
    try:
        FUNCTIONS[row.key](run, row)
        row.status = "measured"
    except Exception as exc:  # noqa: BLE001 - report-only: the row says what failed, the run goes on
        row.status = "failed"
        message = f"{type(exc).__name__}: {exc}"
        # Long messages end with a log tail: keep their head and the tail, where the cause is.
        row.errors.append(message if len(message) <= 1200 else f"{message[:300]} [...] {message[-900:]}")
        if run.deadline.left() <= 0:
            run.stopped = "time budget exhausted"
    finally:
        row.seconds = time.monotonic() - started
        shutil.rmtree(run.workdir / "raw-out", ignore_errors=True)
        shutil.rmtree(run.workdir / "getscu-out", ignore_errors=True)
    if row.errors and row.status == "measured":
        row.status = "failed"
    print(f"[bench_cold] {row.number}. {row.title}: {row.status} in {row.seconds:.0f} s "
          + "; ".join(f"{t.what}: {_f(t.ratio)} ({verdict(t)})" for t in row.targets), flush=True)


def render(result: dict[str, Any]) -> str:
    m, o, st = result["machine"], result["options"], result["study"]
    cmd = "python3 tests/bench/bench_cold.py" + (" " + " ".join(o["argv"]) if o["argv"] else "")
    lines = [
        "# Cold-path benchmark: the gateway against DCMTK and raw pynetdicom, one study, one run",
        "",
        f"- Date: {result['date']}; `{cmd}` (took {result['wall_seconds']:.0f} s); gateway code at {m['revision']}",
        f"- Machine: nproc {m['nproc']} ({m['cpu']}), {m['platform']}, Python {m['python']}, pynetdicom "
        f"{m['pynetdicom']}, httpx {m['httpx']}, Orthanc {m.get('orthanc', '?')}, DCMTK {m['dcmtk']}, Redis "
        f"{m.get('redis', '?')}; load average {m['load']:.2f} at start, {result['load_end']:.2f} at the end. "
        "The peers, the gateways and the clients share these cores.",
        f"- Study: one CT series, {st['slices']} slices of {st['size']}x{st['size']} 16-bit, Explicit VR LE, "
        f"{_mb(st['bytes'])} MB, in Orthanc (TCP_NODELAY=1, MaximumPduLength 131072, DICOMweb plugin)"
        + (" and in dcmqrscp (TCP_NODELAY=1)" if st.get("dcmqrscp") else "") + ".",
        f"- Gateway: `python -m gateway.cli serve` subprocesses, a fresh process and empty spool for each cold "
        f"sample. Engines: {'; '.join(result['engines'])}.",
        f"- {o['reps']} interleaved repetitions (order rotated), medians. Ratios are gateway / anchor "
        "(throughput ratios: above 1, the gateway is faster). Report-only: MISSED targets do not fail the run.",
        "",
        "## Summary",
        "",
        "| # | row | gateway | anchor | ratio | target | result |",
        "| ---: | --- | ---: | ---: | ---: | --- | --- |",
    ]
    for row in result["rows"].values():
        if not row["targets"]:
            lines.append(f"| {row['number']} | {row['title']} | - | - | - | - | "
                         f"{'FAILED' if row['status'] == 'failed' else 'not run'} |")
        for t in row["targets"]:
            mark = verdict(Target(**t)) + (" (with errors)" if row["errors"] else "")
            lines.append(f"| {row['number']} | {t['what']} | {_f(t['gateway'], 1)} {t['unit']} | "
                         f"{_f(t['anchor'], 1)} ({t['anchor_label']}) | {_f(t['ratio'])} | {t['rule']} | {mark} |")
    for row in result["rows"].values():
        lines += ["", f"## {row['number']}. {row['title']} ({row['status']}, {row['seconds']:.0f} s)", ""]
        lines += row["table"] or ["(no figures)"]
        if row["checks"] and row["status"] == "measured":
            lines += ["", "Answer checks passed: " + "; ".join(row["checks"]) + "."]
        lines += [f"\n- Note: {n}" for n in row["notes"]]
        lines += [f"\n- **Error**: {e}" for e in row["errors"]]
    if result["notes"]:
        lines += ["", "## Notes", ""] + [f"- {n}" for n in result["notes"]]
    return "\n".join(lines) + "\n"


def machine(opts: argparse.Namespace) -> dict[str, Any]:
    info = bw.machine_info()
    info["revision"] = bq.revision()
    info["dcmtk"] = dcmtk_version()
    with contextlib.suppress(Exception):
        import redis

        client = redis.Redis.from_url(opts.redis, socket_timeout=3, socket_connect_timeout=3)
        info["redis"] = client.info("server").get("redis_version", "?")
        client.close()
    return info


# ------------------------------------------------------------------------ entry point


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="60 slices, 2 repetitions, short windows (~3 min)")
    parser.add_argument("--slices", type=int, help="slices of the study (400; quick 60)")
    parser.add_argument("--size", type=int, default=512, help="rows = columns of the study (512)")
    parser.add_argument("--reps", type=int, help="repetitions per row (3; quick 2)")
    parser.add_argument("--only", help=f"comma list of rows to run ({','.join(ROWS)}; default all)")
    parser.add_argument("--burst-frames", type=int, default=200, help="frames in the OHIF-like burst (200)")
    parser.add_argument("--burst-connections", type=int, default=6, help="burst connections (6, a browser's)")
    parser.add_argument("--storm", type=int, default=40, help="concurrent frame requests of the storm (40)")
    parser.add_argument("--stow-files", type=int, help="instances stored per STOW sender (= --slices)")
    parser.add_argument("--big-slices", type=int, help="slices (512x512) of the RSS study (2000; quick 200)")
    parser.add_argument("--slow-rate", type=float, help="slow client's rate in MB/s (30; quick 40)")
    parser.add_argument("--duration", type=float, help="seconds per QIDO throughput window (5; quick 1.5)")
    parser.add_argument("--clients", type=int, default=8, help="concurrent QIDO clients (8)")
    parser.add_argument("--budget", type=float, help="seconds for the whole run (1500; quick 420)")
    parser.add_argument("--redis", default=bc.DEFAULT_REDIS, help=f"Redis URL ({bc.DEFAULT_REDIS})")
    parser.add_argument("--workdir", type=Path, help="where data, spools and logs go (a temp dir)")
    parser.add_argument("--output", type=Path, default=RESULTS, help=f"markdown report ({RESULTS})")
    opts = parser.parse_args(argv)
    q = opts.quick
    opts.argv = list(argv) if argv is not None else sys.argv[1:]
    opts.slices = opts.slices or (60 if q else 400)
    opts.reps = opts.reps or (2 if q else 3)
    opts.rows = [r.strip() for r in (opts.only or ",".join(ROWS)).split(",") if r.strip()]
    if unknown := [r for r in opts.rows if r not in ROWS]:
        parser.error(f"unknown rows {unknown}; choose from {','.join(ROWS)}")
    opts.stow_files = opts.stow_files or opts.slices
    opts.big_slices = (200 if q else 2000) if opts.big_slices is None else opts.big_slices
    opts.slow_rate = opts.slow_rate or (40.0 if q else 30.0)
    opts.duration = opts.duration or (1.5 if q else 5.0)
    opts.budget = opts.budget or (420.0 if q else 1500.0)
    opts.reserve = 10.0 if q else 30.0          # kept for the rows after a trimmed one and the report
    opts.qido_iterations = 30 if q else 200
    opts.qido_warmup = 3 if q else 10
    opts.qido_budget = 6.0 if q else 40.0
    if min(opts.slices, opts.size, opts.reps, opts.burst_frames, opts.burst_connections, opts.storm,
           opts.stow_files, opts.clients) < 1 or opts.big_slices < 0 or opts.duration <= 0:
        parser.error("counts and durations must be positive")
    if "rss" in opts.rows and opts.big_slices == 0:
        opts.rows.remove("rss")
    return opts


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    opts = parse_args(argv)
    started = time.monotonic()
    deadline = bw.Deadline(opts.budget)
    info = machine(opts)
    variants, notes = engine_variants()
    move_variants, move_notes = engine_variants(storage_scp=True) if "cmove" in opts.rows else ([], [])
    notes += [n for n in move_notes if n not in notes]
    workdir = Path(tempfile.mkdtemp(prefix="bench-cold-", dir=opts.workdir))
    orthanc = OrthancPeer(workdir / "orthanc", tcp_nodelay=True, dicomweb=True)
    study = bw.ct_study(1, opts.slices, opts.size)
    rows = {key: Row(key, ROWS.index(key) + 1, TITLES[key]) for key in ROWS if key in opts.rows}
    run = Run(opts, workdir, deadline, study, orthanc, variants, move_variants,
              prefix=f"bench-cold-{os.getpid()}-{secrets.token_hex(4)}:")
    result: dict[str, Any] = {"notes": notes}
    try:
        with deadline.watchdog():
            orthanc.start()
            status, body = orthanc.request("GET", "/system")
            if status == 200:
                info["orthanc"] = json.loads(body).get("Version", "?")
            paths = list(bw.generate_ct_study(workdir / "data", 1, opts.slices, opts.size))
            study.total_bytes = sum(p.stat().st_size for p in paths)
            if orthanc.load(paths) != len(paths):
                raise BenchError("Orthanc did not load every file")
            if "cmove" in rows:
                run.move_port = free_port()
                run.storescp = StoreScp(workdir / "storescp").start()
                run.dcmqrscp = DcmqrscpPeer(workdir / "dcmqrscp", modalities={
                    "gateway": [bw.GW_AE, HOST, run.move_port],
                    "storescp": [run.storescp.ae_title, HOST, run.storescp.port]})
                run.dcmqrscp.start()
                run.dcmqrscp.load(paths)
            shutil.rmtree(workdir / "data", ignore_errors=True)
            if "qido" in rows:
                demo = write_demo_files(workdir / "demo")
                if orthanc.load(demo) != len(demo):
                    raise BenchError("Orthanc did not load every demo file")
                shutil.rmtree(workdir / "demo", ignore_errors=True)
            for row in rows.values():
                run_row(run, row)
    finally:
        if run.dcmqrscp is not None:
            run.dcmqrscp.stop()
        if run.storescp is not None:
            run.storescp.stop()
        orthanc.stop()
        if {"storm", "qido"} & rows.keys():
            with contextlib.suppress(Exception):
                result["redis_keys_deleted"] = bc.RedisKeys(opts.redis, run.prefix).cleanup()
        shutil.rmtree(workdir, ignore_errors=True)
    result.update({
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"), "machine": info,
        "options": {"argv": opts.argv, "reps": opts.reps, "quick": opts.quick, "rows": opts.rows},
        "study": {"slices": study.slices, "size": study.size, "bytes": study.total_bytes,
                  "dcmqrscp": "cmove" in rows},
        "engines": [f"requestor: {', '.join(v.label for v in variants)}"]
        + ([f"C-MOVE rows: {', '.join(v.label for v in move_variants)}"] if move_variants else []),
        "rows": {key: asdict(row) for key, row in rows.items()},
        "load_end": os.getloadavg()[0], "wall_seconds": time.monotonic() - started,
    })
    result["markdown"] = render(result)
    print(result["markdown"])
    print(f"(run took {result['wall_seconds']:.0f} s; written to {opts.output})")
    opts.output.parent.mkdir(parents=True, exist_ok=True)
    opts.output.write_text(result["markdown"])
    return result


if __name__ == "__main__":
    main()
