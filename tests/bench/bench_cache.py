"""Redis cache benchmark: cached QIDO, warm series metadata, OHIF-like burst (report-only).

Run ``python3 tests/bench/bench_cache.py [--quick]`` from anywhere. In one run, against one Orthanc it
starts (``TCP_NODELAY=1``, DICOMweb plugin) loaded with the demo data at
``DemoScale(ct_slices=200, ct_size=256)`` (8 studies; study 1's axial CT series has 200 slices of
256x256 16-bit), with the gateway as a subprocess (``python -m gateway.cli serve --config FILE``)
configured with ``cache: {url: redis://127.0.0.1:6379/15, prefix: <unique per run and process>}``,
it measures:

1. **QIDO** ``/studies?PatientID=DGW0001`` and ``/studies`` (all 8): gateway cache hits (plain
   repeated requests), gateway uncached (``Cache-Control: no-cache``: one C-FIND per request) and
   Orthanc's own QIDO-RS (``{orthanc}/dicom-web/studies?...``); median/p95 latency over one keep-alive
   client each (interleaved blocks, ``bench_qido.measure``), and requests/s with 8 concurrent clients
   (threads, own keep-alive ``httpx.Client`` each; ``bench_qido.run_load``) for a fixed window;
2. **warm series metadata** of the 200-slice series: the gateway that retrieved it, a second gateway
   process on the same Redis prefix with an empty spool (served from Redis only: checked, its spool
   stays empty and it starts no retrieval), and Orthanc's plugin
   ``/studies/{s}/series/{se}/metadata``;
3. **OHIF-like burst**: series metadata, then at once 200 frame requests (``/frames/1`` of each
   instance named by the metadata, OHIF's Accept ``multipart/related;
   type="application/octet-stream"; transfer-syntax=*``) over as many keep-alive connections as a
   browser opens (6, and 16); wall time from the metadata request to the last frame, per-frame
   p50/p95. **Cold**: a fresh gateway process, empty spool, a fresh cache prefix (nothing of the study
   known), warmed up only by a QIDO on another patient. **Warm**: the same burst again on that
   process. The same burst against Orthanc's plugin for comparison (Orthanc has no cold state worth
   measuring here: it has read these files already).

The run is bounded (full < 4 min, ``--quick`` < 60 s): a shared deadline trims repetitions and a
watchdog stops an overrun run. Everything started (Orthanc, gateway processes) is stopped and every
Redis key under the run's prefix deleted in ``finally``. The report goes to stdout and
``tests/bench/results/cache.md``; ``main()`` returns the figures as a dict.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import secrets
import shutil
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import redis

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from gateway.demo_data import DEMO_STUDIES, UID_ROOT, DemoScale, write_demo_files  # noqa: E402
from tests.bench import bench_qido as bq  # noqa: E402
from tests.bench import bench_wado as bw  # noqa: E402
from tests.bench.common import metrics_of  # noqa: E402
from tests.integration.peers import OrthancPeer  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "cache.md"
DEFAULT_REDIS = "redis://127.0.0.1:6379/15"
ACCEPT_JSON = "application/dicom+json"
ACCEPT_FRAME = bw.ACCEPT_FRAME      # OHIF's: multipart/related; type="application/octet-stream"; transfer-syntax=*
FILTER_ROW = "/studies?PatientID=DGW0001"
ALL_ROW = "/studies (all)"
QUERIES: dict[str, list[tuple[str, str]]] = {FILTER_ROW: [("PatientID", "DGW0001")], ALL_ROW: []}
TARGETS = {"cached": "gateway, cache hit", "uncached": "gateway, no-cache (C-FIND)",
           "orthanc": "Orthanc QIDO-RS (plugin)"}
BURST_STUDY = f"{UID_ROOT}1.1"      # demo study 1 ...
BURST_SERIES = f"{UID_ROOT}2.1.2"   # ... its axial CT series: DemoScale.ct_slices instances
SOP_UID, INSTANCE_NUMBER, ROWS, COLUMNS, BITS = "00080018", "00200013", "00280010", "00280011", "00280100"

BenchError = bq.BenchError   # what bench_qido's measure/run_load count as a failed call


# ------------------------------------------------------------------------ Redis and the gateway


class RedisKeys:
    """The benchmark's own view of Redis: checks that the gateway wrote there, and the cleanup."""

    def __init__(self, url: str, base_prefix: str) -> None:
        self.url = url
        self.base = base_prefix
        self.client = redis.Redis.from_url(url, socket_timeout=5, socket_connect_timeout=5)

    def ping(self) -> None:
        try:
            self.client.ping()
        except redis.RedisError as exc:
            raise BenchError(f"Redis at {self.url} is not reachable: {exc}") from exc

    def count(self, pattern: str) -> int:
        return sum(1 for _ in self.client.scan_iter(match=pattern, count=1000))

    def exists(self, name: str) -> bool:
        return bool(self.client.exists(name))

    def cleanup(self) -> int:
        """Delete every key under the run's base prefix; returns how many."""
        removed = 0
        batch: list[bytes] = []
        for name in self.client.scan_iter(match=self.base + "*", count=1000):
            batch.append(name)
            if len(batch) >= 500:
                removed += int(self.client.delete(*batch))
                batch.clear()
        if batch:
            removed += int(self.client.delete(*batch))
        self.client.close()
        return removed


class CachedGateway(bw.GatewayProcess):
    """bench_wado's gateway subprocess (same node, spool and timeouts), with the Redis cache configured.

    TTLs are raised to an hour so that no cached answer expires in the middle of a measurement window.
    """

    def __init__(self, peer: OrthancPeer, workdir: Path, tag: str, redis_url: str, prefix: str,
                 **options: Any) -> None:
        """``options``: passed to ``bench_wado.GatewayProcess`` (``node=``, ``gateway=`` overrides)."""
        self.prefix = prefix
        super().__init__(peer, workdir, tag, extra_config=(
            "cache:\n"
            f"  url: {json.dumps(redis_url)}\n  prefix: {json.dumps(prefix)}\n"
            "  ttl: {study: 3600, series: 3600, instance: 3600, metadata: 3600}\n"), **options)

    def warm_up_elsewhere(self) -> None:
        """One QIDO on another patient: imports done, C-FIND association open, nothing of study 1 known."""
        r = httpx.get(f"{self.root}/dicom-web/studies", params={"PatientID": "DGW0003"},
                      headers={"Accept": ACCEPT_JSON}, timeout=30)
        if r.status_code != 200:
            raise BenchError(f"gateway warm-up QIDO answered {r.status_code}: {r.text[:200]}")

    def metrics(self) -> dict[str, float]:
        return metrics_of(self.root)


# ------------------------------------------------------------------------ QIDO


def qido_call(client: httpx.Client, path: str, params: list[tuple[str, str]], expected: int,
              no_cache: bool = False) -> Callable[[], int]:
    headers = {"Accept": ACCEPT_JSON}
    if no_cache:
        headers["Cache-Control"] = "no-cache"

    def call() -> int:
        try:
            r = client.get(path, params=params, headers=headers)
        except httpx.HTTPError as exc:
            raise BenchError(f"{path}: {type(exc).__name__}: {exc}") from exc
        if r.status_code == 204:
            return 0
        if r.status_code != 200:
            raise BenchError(f"{client.base_url}{path} answered {r.status_code}: {r.text[:200]}")
        found = len(r.json())
        if found != expected:
            raise BenchError(f"{client.base_url}{path} found {found} studies, expected {expected}")
        return found

    return call


def qido_target(name: str, gw: CachedGateway, peer: OrthancPeer) -> tuple[str, str, bool]:
    """(base URL, path, no-cache) of one QIDO target."""
    if name == "orthanc":
        return peer.dicomweb_url, "/studies", False
    return gw.root, "/dicom-web/studies", name == "uncached"


def qido_phase(gw: CachedGateway, peer: OrthancPeer, expected: dict[str, int], opts: argparse.Namespace,
               deadline: bw.Deadline) -> dict[str, Any]:
    clients = {name: httpx.Client(base_url=qido_target(name, gw, peer)[0], timeout=30) for name in TARGETS}
    latency: dict[str, dict[str, Any]] = {}
    load: dict[str, dict[str, Any]] = {}
    try:
        for row, params in QUERIES.items():
            calls = {}
            for name, client in clients.items():
                _, path, no_cache = qido_target(name, gw, peer)
                calls[name] = qido_call(client, path, params, expected[row], no_cache)
            got = bq.measure(calls, expected[row], opts.iterations, opts.warmup, opts.latency_budget / 2,
                             opts.block)
            latency[row] = {name: {"n": len(s.samples), "median": statistics.median(s.samples),
                                   "p95": bq.percentile(s.samples, 0.95), "errors": len(s.errors),
                                   "error_samples": s.errors[:2]} for name, s in got.items()}
    finally:
        for client in clients.values():
            client.close()
    with httpx.Client(base_url=gw.root, timeout=30) as client:
        floor = []
        for _ in range(max(20, opts.iterations // 4)):
            t = time.perf_counter()
            client.get("/healthz")
            floor.append((time.perf_counter() - t) * 1000)
    floor = floor[5:]
    for row, params in QUERIES.items():
        for name in TARGETS:
            if deadline.left() < opts.duration + 20 + opts.reserve_after_qido:
                load.setdefault(row, {})[name] = None
                continue
            base, path, no_cache = qido_target(name, gw, peer)

            def make_worker(base: str = base, path: str = path, no_cache: bool = no_cache,
                            params: list[tuple[str, str]] = params,
                            want: int = expected[row]) -> tuple[Callable[[], int], Callable[[], None]]:
                client = httpx.Client(base_url=base, timeout=30)
                return qido_call(client, path, params, want, no_cache), client.close

            load.setdefault(row, {})[name] = bq.run_load(make_worker, opts.clients, opts.duration)
    return {"latency": latency, "load": load,
            "healthz": {"n": len(floor), "median": statistics.median(floor), "p95": bq.percentile(floor, 0.95)}}


# ------------------------------------------------------------------------ series metadata


def metadata_uids(body: Any, expected: int) -> tuple[list[str], int]:
    """SOP Instance UIDs in InstanceNumber order, and the bytes of one uncompressed frame."""
    if not isinstance(body, list) or len(body) != expected:
        raise BenchError(f"series metadata: {len(body) if isinstance(body, list) else body!r} instances, "
                         f"expected {expected}")

    def value(item: dict[str, Any], tag: str, default: Any = None) -> Any:
        return (item.get(tag, {}).get("Value") or [default])[0]

    items = sorted(body, key=lambda item: int(value(item, INSTANCE_NUMBER, 0) or 0))
    first = items[0]
    frame_bytes = int(value(first, ROWS, 0)) * int(value(first, COLUMNS, 0)) * int(value(first, BITS, 16)) // 8
    return [str(value(item, SOP_UID)) for item in items], frame_bytes


def metadata_call(client: httpx.Client, url: str, expected: int) -> Callable[[], int]:
    def call() -> int:
        try:
            r = client.get(url, headers={"Accept": ACCEPT_JSON})
        except httpx.HTTPError as exc:
            raise BenchError(f"{url}: {type(exc).__name__}: {exc}") from exc
        if r.status_code != 200:
            raise BenchError(f"{client.base_url}{url} answered {r.status_code}: {r.text[:200]}")
        found = len(r.json())
        if found != expected:
            raise BenchError(f"{client.base_url}{url}: {found} instances, expected {expected}")
        return found

    return call


def metadata_phase(gw: CachedGateway, peer: OrthancPeer, workdir: Path, redis_url: str,
                   keys: RedisKeys, slices: int, opts: argparse.Namespace) -> dict[str, Any]:
    """Warm series metadata: the gateway that ingested the series, a second process on the same cache
    (empty spool), Orthanc's plugin. Returns the latency rows and the Redis checks."""
    path = f"/studies/{BURST_STUDY}/series/{BURST_SERIES}/metadata"
    out: dict[str, Any] = {}
    with httpx.Client(base_url=gw.root + "/dicom-web", timeout=120) as first:
        t0 = time.perf_counter()
        metadata_call(first, path, slices)()          # cold: retrieves the series, stores the JSON in Redis
        out["first_request_s"] = time.perf_counter() - t0
    meta_key = f"{gw.prefix}meta:series:{BURST_STUDY}:{BURST_SERIES}"
    out["redis_key"] = keys.exists(meta_key)
    replica = CachedGateway(peer, workdir, "replica", redis_url, gw.prefix)
    try:
        clients = {"gateway": httpx.Client(base_url=gw.root + "/dicom-web", timeout=60),
                   "replica": httpx.Client(base_url=replica.root + "/dicom-web", timeout=60),
                   "orthanc": httpx.Client(base_url=peer.dicomweb_url, timeout=60)}
        try:
            calls = {name: metadata_call(c, path, slices) for name, c in clients.items()}
            got = bq.measure(calls, slices, opts.meta_iterations, 2, opts.meta_budget, opts.meta_block)
        finally:
            for c in clients.values():
                c.close()
        m = replica.metrics()
        out["replica_spooled"] = replica.spooled()
        out["replica_retrievals"] = int(m.get("dwg_retrievals_total", -1))
        out["replica_cache_failures"] = int(m.get("dwg_cache_failures_total", -1))
    finally:
        replica.stop()
    out["latency"] = {name: {"n": len(s.samples), "median": statistics.median(s.samples),
                             "p95": bq.percentile(s.samples, 0.95), "errors": len(s.errors),
                             "error_samples": s.errors[:2]} for name, s in got.items()}
    return out


# ------------------------------------------------------------------------ OHIF-like burst


@dataclass
class Burst:
    target: str
    state: str
    connections: int
    meta_ms: float = float("nan")
    first_frame_ms: float = float("nan")
    total_ms: float = float("nan")
    frames: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    retrievals: int | None = None


def burst(base: str, slices: int, connections: int, target: str, state: str, *, study: str = BURST_STUDY,
          series_uid: str = BURST_SERIES, max_frames: int | None = None) -> Burst:
    """Series metadata, then every instance's frame 1 over ``connections`` keep-alive connections.

    ``study``/``series_uid``: the series (default: demo study 1's axial CT, ``slices`` instances);
    ``max_frames``: ask for that many instances' frames only, spread evenly over the series.

    The clients and their connections are open before the clock starts, as a viewer tab's would be
    (one request each that the server answers 404). Per-frame latency is the request's own time on
    its connection (not the time it queued for a free connection); the total runs from the metadata
    request to the last frame received.
    """
    result = Burst(target, state, connections)
    clients = [httpx.Client(base_url=base, timeout=120) for _ in range(connections)]
    series = f"/studies/{study}/series/{series_uid}"
    lock = threading.Lock()
    go = threading.Event()
    work: dict[str, Any] = {"urls": [], "next": 0, "bytes": 0, "last": 0.0, "first": math.inf}

    def worker(client: httpx.Client) -> None:
        go.wait()
        while True:
            with lock:
                i = work["next"]
                work["next"] += 1
            if i >= len(work["urls"]):
                return
            t = time.perf_counter()
            try:
                r = client.get(work["urls"][i], headers={"Accept": ACCEPT_FRAME})
                done = time.perf_counter()
                if r.status_code != 200 or len(r.content) < work["bytes"]:
                    raise BenchError(f"frame {i + 1} answered {r.status_code} with {len(r.content)} bytes")
            except (BenchError, httpx.HTTPError) as exc:
                with lock:
                    result.errors.append(f"{type(exc).__name__}: {exc}"[:200])
                continue
            with lock:
                result.frames.append((done - t) * 1000)
                work["last"] = max(work["last"], done)
                work["first"] = min(work["first"], done)

    for c in clients:   # open every connection first (a viewer tab has its connections open already)
        with contextlib.suppress(httpx.HTTPError):
            c.get("/")      # any answer (404) will do
    threads = [threading.Thread(target=worker, args=(c,), daemon=True) for c in clients]
    for thread in threads:
        thread.start()
    try:
        t0 = time.perf_counter()
        r = clients[0].get(f"{series}/metadata", headers={"Accept": ACCEPT_JSON})
        result.meta_ms = (time.perf_counter() - t0) * 1000
        if r.status_code != 200:
            raise BenchError(f"{target} series metadata answered {r.status_code}: {r.text[:200]}")
        uids, frame_bytes = metadata_uids(r.json(), slices)
        if max_frames is not None and 0 < max_frames < len(uids):
            last = len(uids) - 1
            uids = [uids[round(i * last / max(1, max_frames - 1))] for i in range(max_frames)]
        work["urls"] = [f"{series}/instances/{uid}/frames/1" for uid in uids]
        work["bytes"] = frame_bytes
    finally:
        go.set()   # workers start on the frames at once (or end at once if the metadata failed)
        for thread in threads:
            thread.join(300)
        for c in clients:
            c.close()
    if result.frames:
        result.total_ms = (work["last"] - t0) * 1000
        result.first_frame_ms = (work["first"] - t0) * 1000
    if len(result.frames) != len(work["urls"]):
        result.errors.append(f"{len(result.frames)} of {len(work['urls'])} frames received")
    return result


def burst_phase(peer: OrthancPeer, workdir: Path, redis_url: str, base_prefix: str, slices: int,
                opts: argparse.Namespace, deadline: bw.Deadline) -> tuple[list[Burst], list[str]]:
    """Per connection count and cold repetition: a fresh gateway (fresh prefix), its cold burst, then
    warm bursts on it interleaved with Orthanc's."""
    bursts: list[Burst] = []
    notes: list[str] = []
    per_round: float | None = None
    for rep in range(opts.cold_reps):
        for conns in opts.connections:
            if per_round is not None and deadline.left() < per_round + opts.reserve:
                notes.append(f"burst: stopped before cold repetition {rep + 1} with {conns} connections "
                             "(time budget)")
                continue
            started = time.monotonic()
            tag = f"burst{rep}-{conns}"
            gw = CachedGateway(peer, workdir, tag, redis_url, f"{base_prefix}{tag}:")
            try:
                gw.warm_up_elsewhere()
                cold = burst(gw.root + "/dicom-web", slices, conns, "gateway", "cold")
                cold.retrievals = int(gw.metrics().get("dwg_retrievals_total", -1))
                bursts.append(cold)
                for _ in range(opts.warm_reps if rep == 0 else 1):
                    bursts.append(burst(gw.root + "/dicom-web", slices, conns, "gateway", "warm"))
                    if rep == 0:
                        bursts.append(burst(peer.dicomweb_url, slices, conns, "orthanc", "-"))
            except (BenchError, bw.BenchError, httpx.HTTPError) as exc:
                if deadline.left() <= 0:
                    raise            # the watchdog: the run is over
                notes.append(f"burst {tag}: {type(exc).__name__}: {exc}"[:300] + gw.log_tail(10))
            finally:
                gw.stop()
            per_round = max(per_round or 0.0, time.monotonic() - started)
    return bursts, notes


def burst_rows(bursts: list[Burst]) -> list[dict[str, Any]]:
    """One row per (target, state, connections): medians over repetitions of the per-burst figures;
    per-frame p50/p95 over all frames of those bursts."""
    groups: dict[tuple[str, str, int], list[Burst]] = {}
    for b in bursts:
        groups.setdefault((b.target, b.state, b.connections), []).append(b)
    rows = []
    for (target, state, conns), group in groups.items():
        frames = [ms for b in group for ms in b.frames]
        rows.append({
            "target": target, "state": state, "connections": conns, "n": len(group),
            "frames": len(frames), "meta_ms": bw.med([b.meta_ms for b in group]),
            "first_frame_ms": bw.med([b.first_frame_ms for b in group]),
            "total_ms": bw.med([b.total_ms for b in group]),
            "total_min_ms": min((b.total_ms for b in group), default=float("nan")),
            "p50": bw.med(frames) if frames else float("nan"),
            "p95": bq.percentile(frames, 0.95) if frames else float("nan"),
            "errors": sum(len(b.errors) for b in group),
            "error_samples": list(dict.fromkeys(e for b in group for e in b.errors))[:2],
            "retrievals": [b.retrievals for b in group if b.retrievals is not None],
        })
    order = {("gateway", "cold"): 0, ("gateway", "warm"): 1, ("orthanc", "-"): 2}
    rows.sort(key=lambda r: (r["connections"], order.get((r["target"], r["state"]), 9)))
    return rows


# ------------------------------------------------------------------------ report


def ratios(result: dict[str, Any]) -> dict[str, float]:
    out: dict[str, float] = {}
    lat, load = result["qido"]["latency"], result["qido"]["load"]
    for row in QUERIES:
        short = "filtered" if row == FILTER_ROW else "all"
        la = lat.get(row, {})
        if {"cached", "uncached", "orthanc"} <= la.keys():
            out[f"qido {short} latency cached/uncached (median)"] = la["cached"]["median"] / la["uncached"]["median"]
            out[f"qido {short} latency cached/orthanc (median)"] = la["cached"]["median"] / la["orthanc"]["median"]
        lo = load.get(row, {})
        if lo.get("cached") and lo.get("uncached"):
            out[f"qido {short} throughput cached/uncached"] = lo["cached"]["rps"] / lo["uncached"]["rps"]
        if lo.get("cached") and lo.get("orthanc"):
            out[f"qido {short} throughput cached/orthanc"] = lo["cached"]["rps"] / lo["orthanc"]["rps"]
    meta = result.get("metadata", {}).get("latency", {})
    if "orthanc" in meta:
        for name in ("gateway", "replica"):
            if name in meta:
                out[f"metadata warm {name}/orthanc (median)"] = meta[name]["median"] / meta["orthanc"]["median"]
    by = {(r["target"], r["state"], r["connections"]): r for r in result.get("bursts", [])}
    for (target, state, conns), r in by.items():
        o = by.get(("orthanc", "-", conns))
        if target == "gateway" and o:
            out[f"burst {state} gateway/orthanc, {conns} connections (wall)"] = r["total_ms"] / o["total_ms"]
    return out


def _f(x: float | None, digits: int = 1) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def render(result: dict[str, Any]) -> str:
    m, o, st = result["machine"], result["options"], result["study"]
    h = result["qido"]["healthz"]
    lines = [
        "# Cache benchmark: Redis-cached QIDO, warm series metadata, OHIF-like burst",
        "",
        f"- Date: {result['date']}; `python3 tests/bench/bench_cache.py{' --quick' if o['quick'] else ''}` "
        f"(took {result['wall_seconds']:.0f} s); gateway code at {m['revision']}",
        f"- Machine: nproc {m['nproc']} ({m['cpu']}), {m['platform']}, Python {m['python']}, httpx "
        f"{m['httpx']}, Orthanc {m.get('orthanc', '?')}, Redis {m.get('redis', '?')}; load average "
        f"{m['load']:.2f} at start, {result['load_end']:.2f} at the end. Orthanc, Redis, the gateway and "
        "the clients share these cores.",
        f"- Data: the demo studies at `DemoScale(ct_slices={st['slices']}, ct_size={st['size']})`: "
        f"{st['studies']} studies, {st['instances']} instances, {st['bytes'] / 1e6:.0f} MB, loaded in "
        f"{st['load_seconds']:.0f} s; the burst series is study 1's axial CT ({st['slices']} slices of "
        f"{st['size']}x{st['size']} 16-bit, Explicit VR LE). Orthanc with TCP_NODELAY=1 and its DICOMweb "
        "plugin.",
        f"- Gateway: `python -m gateway.cli serve` subprocess(es), C-GET, `cache: {{url: {o['redis']}, "
        "prefix: <unique per run and process>}` (TTLs raised to 1 h so nothing expires mid-window); every "
        "key under the run's prefix is deleted at the end "
        f"({result.get('redis_keys_deleted', '?')} keys this run).",
        "",
        "## QIDO-RS: gateway cache hit vs gateway uncached vs Orthanc (ms; requests/s)",
        "",
        f"Latency: one keep-alive client per target, {o['iterations']} timed requests after {o['warmup']} "
        f"warm-up, interleaved blocks of {o['block']} (bench_qido's `measure`). Throughput: "
        f"{o['clients']} concurrent clients (threads of the benchmark process, own keep-alive httpx.Client "
        f"each) for {o['duration']:.0f} s per target. Uncached = `Cache-Control: no-cache`: one C-FIND "
        "per request (the result is still written to Redis).",
        "",
        f"For scale: `GET /healthz` on the same gateway and client (no cache, no DIMSE: the HTTP floor) "
        f"answers in {h['median']:.1f} ms median, {h['p95']:.1f} ms p95 (n = {h['n']}).",
        "",
        "| query | target | n | median | p95 | requests/s | p50 / p95 under load | errors |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    q = result["qido"]
    for row in QUERIES:
        for name, label in TARGETS.items():
            la = q["latency"].get(row, {}).get(name)
            lo = q["load"].get(row, {}).get(name)
            if la is None:
                continue
            tp = f"{lo['rps']:.0f}" if lo else "(skipped)"
            under = f"{lo['p50_ms']:.1f} / {lo['p95_ms']:.1f}" if lo else "-"
            errs = la["errors"] + (lo["errors"] if lo else 0)
            lines.append(f"| `{row}` | {label} | {la['n']} | {la['median']:.1f} | {la['p95']:.1f} | {tp} "
                         f"| {under} | {errs} |")
    for row in QUERIES:
        for name in TARGETS:
            la = q["latency"].get(row, {}).get(name) or {}
            lo = q["load"].get(row, {}).get(name) or {}
            samples = list(la.get("error_samples", [])) + list(lo.get("error_samples", []))
            if samples:
                lines.append(f"\nErrors, `{row}`, {TARGETS[name]}: {'; '.join(dict.fromkeys(samples))}")
    r = result["ratios"]
    lines += [""]
    for row in QUERIES:
        short = "filtered" if row == FILTER_ROW else "all"
        keys = [f"qido {short} latency cached/uncached (median)", f"qido {short} latency cached/orthanc (median)",
                f"qido {short} throughput cached/uncached", f"qido {short} throughput cached/orthanc"]
        if all(k in r for k in keys):
            lines.append(f"- `{row}`: latency cached/uncached {r[keys[0]]:.2f}, cached/Orthanc "
                         f"{r[keys[1]]:.2f}; throughput cached/uncached {r[keys[2]]:.2f}, cached/Orthanc "
                         f"{r[keys[3]]:.2f}.")
    meta = result.get("metadata")
    if meta:
        lat = meta["latency"]
        lines += [
            "",
            f"## Warm series metadata ({st['slices']} instances; ms)",
            "",
            f"The first request on the gateway retrieved the series and stored the metadata JSON in Redis "
            f"({meta['first_request_s']:.1f} s; key present in Redis: {'yes' if meta['redis_key'] else 'NO'}). "
            "The second gateway process shares the cache prefix and has an empty spool: after the "
            f"measurement its spool held {meta['replica_spooled']} instances and it had started "
            f"{meta['replica_retrievals']} retrievals ({meta['replica_cache_failures']} cache failures), "
            "i.e. it answered from Redis alone.",
            "",
            "| server | n | median | p95 | ratio median / Orthanc | errors |",
            "| --- | ---: | ---: | ---: | ---: | ---: |",
        ]
        labels = {"gateway": "gateway (the process that ingested the series)",
                  "replica": "gateway, second process (empty spool: Redis only)",
                  "orthanc": "Orthanc plugin `/studies/{s}/series/{se}/metadata`"}
        for name, label in labels.items():
            d = lat.get(name)
            if d is None:
                continue
            ratio = d["median"] / lat["orthanc"]["median"] if "orthanc" in lat and name != "orthanc" else None
            lines.append(f"| {label} | {d['n']} | {d['median']:.1f} | {d['p95']:.1f} | {_f(ratio, 3)} "
                         f"| {d['errors']} |")
    rows = result.get("bursts", [])
    if rows:
        lines += [
            "",
            f"## OHIF-like burst: series metadata, then {st['slices']} frame requests at once (ms)",
            "",
            "Frames: `/frames/1` of every instance the metadata names, Accept `multipart/related; "
            "type=\"application/octet-stream\"; transfer-syntax=*`, over N keep-alive connections (a "
            "browser's 6 per origin over HTTP/1.1; 16). Cold: fresh gateway process, empty spool, fresh "
            "cache prefix (its metadata request retrieves the series). Warm: the same process again. "
            "Orthanc: its plugin, same requests (it has served this series before). Total = metadata "
            "request to last frame; per-frame p50/p95 = each request's time on its connection, over all "
            "bursts of the row; medians over the n bursts otherwise.",
            "",
            "| target | connections | n | metadata | first frame | last frame (total) | min total "
            "| frame p50 | frame p95 | errors |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        ]
        names = {("gateway", "cold"): "gateway, cold", ("gateway", "warm"): "gateway, warm",
                 ("orthanc", "-"): "Orthanc plugin"}
        for b in rows:
            label = names.get((b["target"], b["state"]), f"{b['target']} {b['state']}")
            if b["retrievals"]:
                counts = sorted(set(b["retrievals"]))
                label += f" ({'/'.join(str(x) for x in counts)} retrieval{'s' if counts != [1] else ''} each)"
            lines.append(f"| {label} | {b['connections']} | {b['n']} | {_f(b['meta_ms'], 0)} "
                         f"| {_f(b['first_frame_ms'], 0)} | {_f(b['total_ms'], 0)} | {_f(b['total_min_ms'], 0)} "
                         f"| {_f(b['p50'])} | {_f(b['p95'])} | {b['errors']} |")
        for b in rows:
            if b["error_samples"]:
                lines.append(f"\nErrors, {b['target']} {b['state']} {b['connections']} connections: "
                             f"{'; '.join(b['error_samples'])}")
    if result["errors"]:
        lines += ["", "## Notes and errors", ""] + [f"- {e}" for e in result["errors"]]
    if r:
        lines += ["", "## Ratios (below 1: the gateway is faster, except throughput: above 1)", ""]
        lines += [f"- {k}: {v:.3f}" for k, v in r.items()]
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------ entry point


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="fewer samples, 60 slices, 2 s windows (< 60 s)")
    parser.add_argument("--slices", type=int, help="slices of the burst CT series (200; quick 60)")
    parser.add_argument("--size", type=int, default=256, help="rows = columns of the CT slices (256)")
    parser.add_argument("--iterations", type=int, help="timed QIDO requests per target and query (200; quick 30)")
    parser.add_argument("--duration", type=float, help="seconds per throughput window (5; quick 1.5)")
    parser.add_argument("--clients", type=int, default=8, help="concurrent QIDO clients (8)")
    parser.add_argument("--connections", default=None, help="burst connections, comma list (6,16; quick 6)")
    parser.add_argument("--cold-reps", type=int, help="cold bursts per connection count (2; quick 1)")
    parser.add_argument("--warm-reps", type=int, help="warm gateway and Orthanc bursts per count (3; quick 1)")
    parser.add_argument("--budget", type=float, help="seconds for the whole run (225; quick 57)")
    parser.add_argument("--redis", default=DEFAULT_REDIS, help=f"Redis URL ({DEFAULT_REDIS})")
    parser.add_argument("--workdir", type=Path, help="where data, spools and logs go (a temp dir)")
    parser.add_argument("--output", type=Path, default=RESULTS, help=f"markdown report ({RESULTS})")
    opts = parser.parse_args(argv)
    q = opts.quick
    opts.slices = opts.slices or (60 if q else 200)
    opts.iterations = opts.iterations or (30 if q else 200)
    opts.duration = opts.duration or (1.5 if q else 5.0)
    opts.connections = [int(c) for c in (opts.connections or ("6" if q else "6,16")).split(",")]
    opts.cold_reps = opts.cold_reps or (1 if q else 2)
    opts.warm_reps = opts.warm_reps or (1 if q else 3)
    opts.budget = opts.budget or (57.0 if q else 225.0)
    opts.warmup = 3 if q else 10
    opts.block = max(1, min(20, math.ceil(opts.iterations / 3)))
    opts.latency_budget = 6.0 if q else 40.0       # the QIDO latency rows together
    opts.meta_iterations = 10 if q else 50
    opts.meta_block = 5 if q else 10
    opts.meta_budget = 4.0 if q else 20.0
    opts.reserve = 4.0 if q else 10.0              # kept for stopping and writing the report
    opts.reserve_after_qido = 12.0 if q else 60.0  # metadata and bursts still to come after the QIDO loads
    if min(opts.slices, opts.size, opts.iterations, opts.clients, opts.cold_reps, opts.warm_reps,
           *opts.connections) < 1 or opts.duration <= 0:
        parser.error("counts and durations must be positive")
    return opts


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    opts = parse_args(argv)
    started = time.monotonic()
    deadline = bw.Deadline(opts.budget)
    machine = bw.machine_info()
    machine["revision"] = bq.revision()
    base_prefix = f"bench-cache-{os.getpid()}-{secrets.token_hex(4)}:"
    keys = RedisKeys(opts.redis, base_prefix)
    keys.ping()
    with contextlib.suppress(redis.RedisError):
        machine["redis"] = keys.client.info("server").get("redis_version", "?")
    workdir = Path(tempfile.mkdtemp(prefix="bench-cache-", dir=opts.workdir))
    peer = OrthancPeer(workdir / "orthanc", tcp_nodelay=True, dicomweb=True)
    gateways: list[CachedGateway] = []
    errors: list[str] = []
    result: dict[str, Any] = {"errors": errors}
    try:
        with deadline.watchdog():
            peer.start()
            status, body = peer.request("GET", "/system")
            if status == 200:
                machine["orthanc"] = json.loads(body).get("Version", "?")
            t0 = time.monotonic()
            scale = DemoScale(ct_slices=opts.slices, ct_size=opts.size)
            files = write_demo_files(workdir / "demo", scale)
            loaded = peer.load(files)
            if loaded != len(files):
                raise BenchError(f"Orthanc loaded {loaded} of {len(files)} files")
            result["study"] = {"slices": opts.slices, "size": opts.size, "studies": len(DEMO_STUDIES),
                               "instances": len(files), "bytes": sum(f.stat().st_size for f in files),
                               "load_seconds": time.monotonic() - t0}
            shutil.rmtree(workdir / "demo", ignore_errors=True)
            # The scale changes instance counts only: studies and patients are the default set's.
            expected = {FILTER_ROW: sum(1 for s in DEMO_STUDIES if s["patient_id"] == "DGW0001"),
                        ALL_ROW: len(DEMO_STUDIES)}

            gw = CachedGateway(peer, workdir, "main", opts.redis, f"{base_prefix}main:")
            gateways.append(gw)
            gw.warm_up_elsewhere()
            result["qido"] = qido_phase(gw, peer, expected, opts, deadline)
            result["qido_keys_in_redis"] = keys.count(f"{gw.prefix}qido:*")
            result["metadata"] = metadata_phase(gw, peer, workdir, opts.redis, keys, opts.slices, opts)
            result["main_cache_failures"] = int(gw.metrics().get("dwg_cache_failures_total", -1))
            gw.stop()
            gateways.remove(gw)
            if result["qido_keys_in_redis"] < 1:
                errors.append("no QIDO key under the gateway's prefix in Redis: cache hits did not come from Redis")
            if result["main_cache_failures"]:
                errors.append(f"the QIDO gateway counted {result['main_cache_failures']} cache failures")
            bursts, notes = burst_phase(peer, workdir, opts.redis, base_prefix, opts.slices, opts, deadline)
            errors.extend(notes)
            result["bursts"] = burst_rows(bursts)
    except (BenchError, bw.BenchError) as exc:
        errors.append(f"run stopped: {exc}")
        raise
    finally:
        for gw in gateways:
            gw.stop()
        peer.stop()
        with contextlib.suppress(redis.RedisError):
            result["redis_keys_deleted"] = keys.cleanup()
        shutil.rmtree(workdir, ignore_errors=True)
    result["date"] = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    result["machine"] = machine
    result["options"] = {k: getattr(opts, k) for k in ("quick", "iterations", "warmup", "block", "duration",
                                                       "clients", "connections", "cold_reps", "warm_reps",
                                                       "redis")}
    result["load_end"] = os.getloadavg()[0]
    result["wall_seconds"] = time.monotonic() - started
    result["ratios"] = ratios(result)
    result["markdown"] = render(result)
    print(result["markdown"])
    print(f"(run took {result['wall_seconds']:.0f} s; written to {opts.output})")
    opts.output.parent.mkdir(parents=True, exist_ok=True)
    opts.output.write_text(result["markdown"])
    return result


if __name__ == "__main__":
    main()
