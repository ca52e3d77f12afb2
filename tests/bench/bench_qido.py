"""QIDO-RS benchmark: the gateway against raw pynetdicom C-FIND on the same Orthanc (report-only).

Run ``python3 tests/bench/bench_qido.py [--quick]`` from anywhere. In one run, for an Orthanc started
with ``TCP_NODELAY=1`` and then (unless ``--no-nagle-run``) for one started without it (Debian's DCMTK
default: Nagle on), it measures:

1. raw C-FIND latency: one reused pynetdicom association, TCP_NODELAY set on the client socket, the
   STUDY-level identifier the gateway itself builds for ``/studies?PatientID=DGW0001``;
2. gateway latency for ``GET /dicom-web/studies?PatientID=DGW0001`` over one keep-alive httpx.Client,
   with ``Cache-Control: no-cache`` so that each request makes its C-FIND (cache hits measured apart);
3. throughput: gateway requests/s with 8 concurrent HTTP clients (threads with their own httpx.Client,
   in a separate process so they do not share the gateway's GIL) against raw C-FINDs/s over as many
   associations as the gateway may open to the node (``max_query_associations``, default 4);
4. latency of ``/studies`` without a filter (all 8 demo studies, counts returned by Orthanc).

Raw and gateway latencies are taken in interleaved blocks of back-to-back calls (see ``measure``: a
call-by-call alternation would hide the Nagle stalls). A raw client that re-arms TCP_QUICKACK is
measured too, on the filtered query: it shows what the client side can do about the stalls.

The latency rows share a time budget and stop early when it is spent (the report gives the n actually
measured), so a run stays bounded: < 2 min normally, < 40 s with ``--quick``. The figures go to stdout
and to ``tests/bench/results/qido.md``; ``main()`` returns them as a dict (the CI smoke asserts on it).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pynetdicom
from pydicom.dataset import Dataset
from pynetdicom import AE

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from gateway.demo_data import DEMO_STUDIES, write_demo_files  # noqa: E402
from gateway.settings import Settings, settings_from_dict  # noqa: E402
from tests.integration.peers import HOST, OrthancPeer  # noqa: E402
from tests.support.server import running_gateway  # noqa: E402
from translators import qido  # noqa: E402

STUDY_ROOT_FIND = "1.2.840.10008.5.1.4.1.2.2.1"
MAX_PDU = 131072          # the gateway's default nodes[].max_pdu
RESULTS = Path(__file__).resolve().parent / "results" / "qido.md"
FILTER = [("PatientID", "DGW0001")]
FILTER_ROW = "/studies?PatientID=DGW0001"
QUERIES = {FILTER_ROW: FILTER, "/studies (no filter)": []}  # row name -> QIDO parameters of /studies
EXPECTED = {
    FILTER_ROW: sum(1 for s in DEMO_STUDIES if s["patient_id"] == "DGW0001"),
    "/studies (no filter)": len(DEMO_STUDIES),
}
CONDITIONS = {True: "TCP_NODELAY=1", False: "Nagle on (Debian default)"}


class BenchError(RuntimeError):
    """A measurement could not be taken or gave a wrong answer."""


class TimeBudget:
    """Seconds shared by the latency rows: each row gets an equal share of what is left, so rows that
    finish early leave more to the slow (Nagle) ones and the whole run stays bounded."""

    def __init__(self, seconds: float, rows: int) -> None:
        self.left = seconds
        self.rows = rows

    def share(self) -> float:
        return max(0.0, self.left) / max(1, self.rows)

    def spent(self, seconds: float) -> None:
        self.left -= seconds
        self.rows -= 1


# ------------------------------------------------------------------------ statistics


def percentile(samples: Sequence[float], fraction: float) -> float:
    """Nearest-rank percentile (no interpolation: with n = 200, p95 is the 190th smallest sample)."""
    ordered = sorted(samples)
    return ordered[max(0, math.ceil(fraction * len(ordered)) - 1)]


def summary(samples: Sequence[float]) -> tuple[float, float]:
    return statistics.median(samples), percentile(samples, 0.95)


# ------------------------------------------------------------------------ the two clients


QUICKACK: int | None = getattr(socket, "TCP_QUICKACK", None)  # Linux only


class RawFinder:
    """A raw pynetdicom C-FIND client on one association, as the gateway's pool opens it: Study Root,
    the gateway's PDU size, TCP_NODELAY on our socket. ``quickack`` re-arms TCP_QUICKACK before every
    PDU read (Linux clears it once used), so our side ACKs at once and a PACS with Nagle on never
    waits ~40 ms for our delayed ACK.

    It also works around a pynetdicom 3.0 race that back-to-back C-FINDs on one association hit under
    load (symptom also reported as pydicom/pynetdicom#875): when a C-FIND ends, the association's
    reactor thread is woken; if the next ``send_c_find()`` comes before that thread has run, it takes
    the reactor's stale "paused" flag at its word and sends, and the reactor then takes one of the new
    responses off the queue ("Received unexpected C-FIND service message"): a match is lost or, if it
    was the final response, the C-FIND waits for the DIMSE timeout. While ``find()`` runs, the
    reactor's non-blocking poll (only the reactor polls without blocking) finds the queue empty.
    """

    def __init__(self, peer: OrthancPeer, *, quickack: bool = False, dimse_timeout: float = 10) -> None:
        ae = AE(ae_title="BENCHRAW")
        ae.acse_timeout = ae.network_timeout = 30
        ae.dimse_timeout = dimse_timeout
        ae.add_requested_context(STUDY_ROOT_FIND)
        assoc = ae.associate(HOST, peer.dicom_port, ae_title=peer.ae_title, max_pdu=MAX_PDU)
        if not assoc.is_established:
            raise BenchError(f"raw association to {peer} not established")
        sock = assoc.dul.socket.socket
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.assoc = assoc
        self._busy = False
        dimse, transport = assoc.dimse, assoc.dul.socket
        get_msg, recv = dimse.get_msg, transport.recv

        def guarded_get_msg(block: bool = False) -> Any:
            if self._busy and not block:
                return None, None
            return get_msg(block)

        def quick_recv(nr_bytes: int) -> bytearray:
            sock.setsockopt(socket.IPPROTO_TCP, QUICKACK, 1)
            return recv(nr_bytes)

        dimse.get_msg = guarded_get_msg  # type: ignore[method-assign]
        if quickack:
            if QUICKACK is None:
                raise BenchError("TCP_QUICKACK is Linux-only")
            transport.recv = quick_recv  # type: ignore[method-assign]

    def find(self, identifier: Dataset) -> int:
        """One C-FIND, every response read and decoded; returns the number of matches."""
        matches = 0
        self._busy = True
        try:
            for status, _ in self.assoc.send_c_find(identifier, STUDY_ROOT_FIND):
                if not status:  # pynetdicom's empty status: timeout or abort
                    raise BenchError("raw C-FIND got no status (timeout or abort)")
                code = int(status.Status)
                if code in (0xFF00, 0xFF01):
                    matches += 1
                elif code != 0x0000:
                    raise BenchError(f"raw C-FIND failed with status 0x{code:04X}")
        finally:
            self._busy = False
        return matches

    def release(self) -> None:
        if self.assoc.is_established:
            self.assoc.release()
        else:
            self.assoc.abort()


def identifier_for(params: list[tuple[str, str]]) -> Dataset:
    """The identifier the gateway sends for ``/studies?<params>`` to a node with default quirks."""
    plan = qido.build_identifiers(qido.parse_query("study", params))
    if len(plan.identifiers) != 1:
        raise BenchError(f"{params} expands to {len(plan.identifiers)} C-FINDs")
    return plan.identifiers[0]


def gateway_get(client: httpx.Client, params: list[tuple[str, str]], *, cached: bool = False) -> int:
    """One QIDO request; returns the number of studies in the answer.

    Unless ``cached``, it sends ``Cache-Control: no-cache``: the gateway then skips its QIDO result
    cache and makes the C-FIND (writing the result to the cache, as on any miss).
    """
    headers = {"Accept": "application/dicom+json"}
    if not cached:
        headers["Cache-Control"] = "no-cache"
    response = client.get("/dicom-web/studies", params=params, headers=headers)
    if response.status_code == 204:
        return 0
    if response.status_code != 200:
        raise BenchError(f"gateway answered {response.status_code}: {response.text[:300]}")
    return len(response.json())


# ------------------------------------------------------------------------ measurements


class Series:
    """One client's latency samples (ms) in one row, and the answers that were wrong or failed."""

    def __init__(self) -> None:
        self.samples: list[float] = []
        self.errors: list[str] = []


def measure(clients: dict[str, Callable[[], int]], expected: int, iterations: int, warmup: int,
            budget: float, block: int) -> dict[str, Series]:
    """Latencies in ms per client: ``iterations`` timed calls each, in interleaved blocks.

    Blocks of ``block`` back-to-back calls per client, each block led by one untimed call, so
    drift on a busy machine hits every client alike. Not call-by-call alternation: a pause longer
    than the delayed-ACK timeout (~40 ms) between two calls on one connection takes Linux out of its
    interactive (delayed-ACK) mode and hides the Nagle stalls that back-to-back clients see. Stops
    early (>= 5 calls each) once ``budget`` seconds (warm-up included) are spent. A call that fails
    or does not find ``expected`` studies is an error, not a sample.
    """
    deadline = time.perf_counter() + budget
    series = {name: Series() for name in clients}

    def attempt(name: str, timed: bool) -> None:
        t0 = time.perf_counter()
        try:
            found = clients[name]()
        except BenchError as exc:
            series[name].errors.append(str(exc)[:200])
            return
        elapsed = (time.perf_counter() - t0) * 1000
        if found != expected:
            series[name].errors.append(f"{name} found {found} studies, expected {expected}")
        elif timed:
            series[name].samples.append(elapsed)

    for name in clients:
        for _ in range(warmup):
            attempt(name, timed=False)
    done = 0
    while done < iterations:
        size = min(block, iterations - done)
        for name in clients:
            attempt(name, timed=False)  # after the other blocks' pause: not yet in the delayed-ACK regime
            for _ in range(size):
                attempt(name, timed=True)
        done += size
        if time.perf_counter() > deadline and done >= min(iterations, 5):
            break
    for name, s in series.items():
        if not s.samples:
            raise BenchError(f"{name}: no call succeeded; errors: {s.errors[:3]}")
    return series


def latency_row(raw: Series, gw: Series) -> dict[str, Any]:
    raw_median, raw_p95 = summary(raw.samples)
    gw_median, gw_p95 = summary(gw.samples)
    return {
        "n": min(len(raw.samples), len(gw.samples)),
        "raw_median_ms": raw_median, "raw_p95_ms": raw_p95,
        "gw_median_ms": gw_median, "gw_p95_ms": gw_p95,
        "ratio_median": gw_median / raw_median, "ratio_p95": gw_p95 / raw_p95,
        "raw_errors": len(raw.errors), "gw_errors": len(gw.errors),
        "error_samples": list(dict.fromkeys(raw.errors + gw.errors))[:3],
    }


def run_load(make_worker: Callable[[], tuple[Callable[[], int], Callable[[], None]]], clients: int,
             duration: float) -> dict[str, Any]:
    """``clients`` threads calling their worker for ``duration`` s after one warm-up call each.

    ``make_worker()`` runs in the thread and returns (call, close). Only calls that complete within
    the window count. A wrong answer (BenchError) counts as an error; any other failure also ends
    that thread (its connection may be broken).
    """
    window: dict[str, float] = {}
    barrier = threading.Barrier(
        clients + 1, action=lambda: window.update(end=time.perf_counter() + duration), timeout=60)
    lock = threading.Lock()
    latencies: list[float] = []
    errors: list[str] = []

    def thread_main() -> None:
        try:
            call, close = make_worker()
        except Exception as exc:  # noqa: BLE001 - reported below
            with lock:
                errors.append(f"setup: {exc}")
            barrier.abort()
            return
        try:
            try:
                call()
            except Exception as exc:  # noqa: BLE001 - reported below
                with lock:
                    errors.append(f"warm-up: {exc}")
                barrier.abort()
                return
            barrier.wait()
            mine: list[float] = []
            try:
                while True:
                    t0 = time.perf_counter()
                    if t0 >= window["end"]:
                        break
                    try:
                        call()
                    except BenchError as exc:
                        with lock:
                            errors.append(str(exc)[:200])
                        continue
                    t1 = time.perf_counter()
                    if t1 <= window["end"]:
                        mine.append((t1 - t0) * 1000)
            finally:
                with lock:
                    latencies.extend(mine)
        except threading.BrokenBarrierError:
            pass
        except Exception as exc:  # noqa: BLE001 - counted, reported
            with lock:
                errors.append(f"{type(exc).__name__}: {str(exc)[:200]}")
        finally:
            close()

    threads = [threading.Thread(target=thread_main, name=f"bench-load-{i}", daemon=True)
               for i in range(clients)]
    for thread in threads:
        thread.start()
    try:
        barrier.wait()
    except threading.BrokenBarrierError:
        pass
    for thread in threads:
        thread.join(duration + 60)
    if barrier.broken or not latencies:
        raise BenchError(f"no request completed under load; errors: {errors[:3]}")
    p50, p95 = summary(latencies)
    return {"clients": clients, "seconds": duration, "requests": len(latencies),
            "rps": len(latencies) / duration, "p50_ms": p50, "p95_ms": p95, "errors": len(errors),
            "error_samples": errors[:3]}


def gateway_load(root: str, clients: int, duration: float) -> dict[str, Any]:
    """The HTTP load generator, in a child process (this script with ``--loadgen``)."""
    argv = [sys.executable, str(Path(__file__).resolve()), "--loadgen", root,
            "--clients", str(clients), "--duration", str(duration)]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=duration + 90, check=False)
    if done.returncode != 0:
        raise BenchError(f"load generator failed ({done.returncode}):\n{done.stderr[-2000:]}")
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def loadgen_main(root: str, clients: int, duration: float) -> dict[str, Any]:
    def make_worker() -> tuple[Callable[[], int], Callable[[], None]]:
        client = httpx.Client(base_url=root, timeout=15)

        def call() -> int:
            found = gateway_get(client, FILTER)
            if found != EXPECTED[FILTER_ROW]:
                raise BenchError(f"gateway returned {found} studies, expected {EXPECTED[FILTER_ROW]}")
            return 1

        return call, client.close

    return run_load(make_worker, clients, duration)


def raw_load(peer: OrthancPeer, clients: int, duration: float) -> dict[str, Any]:
    identifier = identifier_for(FILTER)
    expected = EXPECTED[FILTER_ROW]

    def make_worker() -> tuple[Callable[[], int], Callable[[], None]]:
        finder = RawFinder(peer)

        def call() -> int:
            found = finder.find(identifier)
            if found != expected:
                raise BenchError(f"raw C-FIND found {found} studies, expected {expected}")
            return 1

        return call, finder.release

    return run_load(make_worker, clients, duration)


# ------------------------------------------------------------------------ one Orthanc


def gateway_settings(peer: OrthancPeer) -> Settings:
    # Defaults, max_query_associations (4) included, except shorter timeouts: they change no figure,
    # they only bound how long a failure can hold the run.
    return settings_from_dict({"nodes": [
        {"name": "orthanc", "ae_title": peer.ae_title, "host": HOST, "port": peer.dicom_port,
         "timeouts": {"connect": 3, "acse": 5, "dimse": 10, "network": 30}},
    ]})


def run_condition(nodelay: bool, files: list[Path], workdir: Path, opts: argparse.Namespace,
                  budget: TimeBudget, machine: dict[str, Any]) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    label = CONDITIONS[nodelay]
    peer = OrthancPeer(workdir / ("orthanc-nodelay" if nodelay else "orthanc-nagle"), tcp_nodelay=nodelay,
                       dicomweb=False, extra_config={"DefaultEncoding": "Utf8"})
    try:
        peer.start()
        peer.load(files)
        status, body = peer.request("GET", "/system")
        if status == 200:
            machine.setdefault("orthanc", json.loads(body).get("Version", "?"))
        settings = gateway_settings(peer)
        max_query = settings.nodes[0].max_query_associations
        rows: list[dict[str, Any]] = []
        with running_gateway(settings) as root, httpx.Client(base_url=root, timeout=30) as client:
            raw = RawFinder(peer)
            quick = RawFinder(peer, quickack=True) if QUICKACK is not None else None
            try:
                for name, params in QUERIES.items():
                    ident = identifier_for(params)
                    clients: dict[str, Callable[[], int]] = {
                        "raw": lambda i=ident: raw.find(i),
                        "gateway": lambda p=params: gateway_get(client, p),
                        "cached": lambda p=params: gateway_get(client, p, cached=True),
                    }
                    if quick is not None and params == FILTER:
                        clients["quickack"] = lambda i=ident, q=quick: q.find(i)
                    started = time.monotonic()
                    got = measure(clients, EXPECTED[name], opts.iterations, opts.warmup, budget.share(),
                                  opts.block)
                    budget.spent(time.monotonic() - started)
                    row = {"condition": label, "query": name, "results": EXPECTED[name],
                           **latency_row(got["raw"], got["gateway"])}
                    if "quickack" in got:
                        quick_ms = got["quickack"]
                        row["raw_quickack_median_ms"], row["raw_quickack_p95_ms"] = summary(quick_ms.samples)
                        row["raw_errors"] += len(quick_ms.errors)
                    hits = got["cached"]
                    row["gw_cached_median_ms"], row["gw_cached_p95_ms"] = summary(hits.samples)
                    row["gw_errors"] += len(hits.errors)
                    rows.append(row)
            finally:
                raw.release()
                if quick is not None:
                    quick.release()
            gw_load = gateway_load(root, opts.clients, opts.duration)
        raw_tp = raw_load(peer, max_query, opts.duration)
        throughput = {"condition": label, "raw": raw_tp, "gw": gw_load,
                      "ratio": gw_load["rps"] / raw_tp["rps"]}
        return rows, throughput
    finally:
        peer.stop()


# ------------------------------------------------------------------------ report


def machine_info() -> dict[str, Any]:
    cpu = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        load = os.getloadavg()[0]
    except OSError:  # pragma: no cover - not on Linux
        load = float("nan")
    return {"nproc": os.cpu_count(), "cpu": cpu, "python": platform.python_version(),
            "platform": platform.platform(terse=True), "pynetdicom": pynetdicom.__version__,
            "httpx": httpx.__version__, "load": load, "revision": revision()}


def revision() -> str:
    """The gateway code measured: the commit, and whether the work tree differs from it."""
    def git(*args: str) -> str:
        done = subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True,
                              timeout=10, check=False)
        return done.stdout.strip() if done.returncode == 0 else ""

    try:
        commit = git("rev-parse", "--short", "HEAD")
        dirty = git("status", "--porcelain", "--untracked-files=no", "--", "gateway", "translators", "cache")
    except (OSError, subprocess.TimeoutExpired):
        return "?"
    return f"{commit or '?'}{' + uncommitted changes' if dirty else ''}"


def render(result: dict[str, Any]) -> str:
    m, o = result["machine"], result["options"]
    lines = [
        "# QIDO-RS benchmark: gateway vs raw pynetdicom C-FIND",
        "",
        f"- Date: {result['date']}; `python3 tests/bench/bench_qido.py{' --quick' if o['quick'] else ''}`; "
        f"gateway code at {m['revision']}",
        f"- Machine: nproc {m['nproc']} ({m['cpu']}), {m['platform']}, Python {m['python']}, "
        f"pynetdicom {m['pynetdicom']}, httpx {m['httpx']}, Orthanc {m.get('orthanc', '?')}; "
        f"load average {m['load']:.2f} at start. Orthanc, the gateway and the clients share these cores.",
        f"- Latency: {o['iterations']} timed iterations per client and row after {o['warmup']} warm-up, "
        f"in interleaved blocks of {o['block']} back-to-back calls (n = samples taken within the "
        f"{o['latency_budget']:.0f} s the latency rows share); median and p95 (nearest rank) in ms.",
        "- Raw: one reused pynetdicom association, TCP_NODELAY on the client socket, the identifier the "
        "gateway builds for the same query. Gateway: uvicorn (asyncio loop) in the benchmark process, "
        "one keep-alive httpx.Client, `Cache-Control: no-cache` so that every request makes its C-FIND "
        "(cache hits are measured apart); the gateway sets TCP_NODELAY on its own sockets.",
        f"- Throughput over {o['duration']:.0f} s: gateway with {o['clients']} HTTP clients (threads, "
        "own httpx.Client each, separate process) vs raw C-FINDs over as many associations as the "
        "gateway may open to the node: `nodes[].max_query_associations` (default "
        f"{result['max_query_associations']}, kept) bounds its concurrent C-FINDs, so "
        f"{o['clients']} clients share {result['max_query_associations']} associations.",
        "- Ratios are gateway / raw: above 1 for latency and below 1 for throughput mean the gateway costs.",
        "",
        "## Latency (ms)",
        "",
        "| Orthanc | query | studies | n | raw median | raw p95 | gateway median | gateway p95 "
        "| ratio median | ratio p95 | errors raw / gateway |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in result["latency"]:
        lines.append(
            f"| {r['condition']} | `{r['query']}` | {r['results']} | {r['n']} | {r['raw_median_ms']:.1f} "
            f"| {r['raw_p95_ms']:.1f} | {r['gw_median_ms']:.1f} | {r['gw_p95_ms']:.1f} "
            f"| {r['ratio_median']:.2f} | {r['ratio_p95']:.2f} | {r['raw_errors']} / {r['gw_errors']} |")
    for r in result["latency"]:
        if r["error_samples"]:
            lines.append(f"\nErrors, {r['condition']}, `{r['query']}`: {'; '.join(r['error_samples'])}")
    lines += [
        "",
        "## Throughput (`/studies?PatientID=DGW0001`, requests/s)",
        "",
        "| Orthanc | raw (associations) | gateway (HTTP clients) | ratio | gateway p50 / p95 under load, ms "
        "| errors raw / gateway |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for t in result["throughput"]:
        raw, gw = t["raw"], t["gw"]
        lines.append(
            f"| {t['condition']} | {raw['rps']:.0f} ({raw['clients']}) | {gw['rps']:.0f} ({gw['clients']}) "
            f"| {t['ratio']:.2f} | {gw['p50_ms']:.1f} / {gw['p95_ms']:.1f} "
            f"| {raw['errors']} / {gw['errors']} |")
    for t in result["throughput"]:
        for side, name in (("raw", "raw"), ("gw", "gateway")):
            if t[side]["errors"]:
                samples = "; ".join(dict.fromkeys(t[side]["error_samples"]))
                lines.append(f"\nErrors under load, {t['condition']}, {name}: {samples}")
    lines += [
        "",
        "## Gateway QIDO cache hits (default in-process cache; median / p95 ms)",
        "",
        "| Orthanc | query | gateway, C-FIND (no-cache) | gateway, cache hit |",
        "| --- | --- | ---: | ---: |",
    ]
    for r in result["latency"]:
        lines.append(
            f"| {r['condition']} | `{r['query']}` | {r['gw_median_ms']:.1f} / {r['gw_p95_ms']:.1f} "
            f"| {r['gw_cached_median_ms']:.1f} / {r['gw_cached_p95_ms']:.1f} |")
    quick = [r for r in result["latency"] if "raw_quickack_median_ms" in r]
    if quick:
        lines += [
            "",
            "## Client-side TCP_QUICKACK (raw, re-armed before every PDU read; median / p95 ms)",
            "",
            "| Orthanc | query | raw | raw + TCP_QUICKACK | gateway "
            "| ratio gateway / (raw + QUICKACK), median |",
            "| --- | --- | ---: | ---: | ---: | ---: |",
        ]
        for r in quick:
            lines.append(
                f"| {r['condition']} | `{r['query']}` | {r['raw_median_ms']:.1f} / {r['raw_p95_ms']:.1f} "
                f"| {r['raw_quickack_median_ms']:.1f} / {r['raw_quickack_p95_ms']:.1f} "
                f"| {r['gw_median_ms']:.1f} / {r['gw_p95_ms']:.1f} "
                f"| {r['gw_median_ms'] / r['raw_quickack_median_ms']:.2f} |")
    by = {(r["condition"], r["query"]): r for r in result["latency"]}
    fast, slow = (by.get((CONDITIONS[flag], FILTER_ROW)) for flag in (True, False))
    if fast and slow:
        lines += [
            "",
            f"Nagle on the PACS side (filtered query, medians): raw x"
            f"{slow['raw_median_ms'] / fast['raw_median_ms']:.1f}, gateway x"
            f"{slow['gw_median_ms'] / fast['gw_median_ms']:.1f} compared with TCP_NODELAY=1"
            + (f"; a raw client re-arming TCP_QUICKACK: x"
               f"{slow['raw_quickack_median_ms'] / fast['raw_median_ms']:.1f}"
               if "raw_quickack_median_ms" in slow else "") + ".",
        ]
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------ entry point


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="N=30, 2 s throughput windows (< 40 s)")
    parser.add_argument("--iterations", type=int, help="timed iterations per latency row (200; quick 30)")
    parser.add_argument("--duration", type=float, help="seconds per throughput window (5; quick 2)")
    parser.add_argument("--clients", type=int, default=8, help="concurrent HTTP clients (8)")
    parser.add_argument("--no-nagle-run", action="store_true",
                        help="skip the second Orthanc (Nagle on); measure TCP_NODELAY=1 only")
    parser.add_argument("--output", type=Path, default=RESULTS, help=f"markdown report ({RESULTS})")
    parser.add_argument("--loadgen", metavar="ROOT", help=argparse.SUPPRESS)
    opts = parser.parse_args(argv)
    opts.iterations = opts.iterations or (30 if opts.quick else 200)
    opts.duration = opts.duration or (2.0 if opts.quick else 5.0)
    opts.warmup = 3 if opts.quick else 10
    opts.latency_budget = 12.0 if opts.quick else 60.0   # all latency rows together
    opts.block = max(1, min(20, math.ceil(opts.iterations / 3)))
    if opts.iterations < 1 or opts.duration <= 0 or opts.clients < 1:
        parser.error("--iterations, --duration and --clients must be positive")
    return opts


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    opts = parse_args(argv)
    if opts.loadgen:
        result = loadgen_main(opts.loadgen, opts.clients, opts.duration)
        print(json.dumps(result))
        return result
    started = time.monotonic()
    machine = machine_info()
    latency: list[dict[str, Any]] = []
    throughput: list[dict[str, Any]] = []
    conditions = (True,) if opts.no_nagle_run else (True, False)
    budget = TimeBudget(opts.latency_budget, len(conditions) * len(QUERIES))
    with tempfile.TemporaryDirectory(prefix="bench-qido-") as tmp:
        files = write_demo_files(Path(tmp) / "demo")
        for nodelay in conditions:
            rows, tp = run_condition(nodelay, files, Path(tmp), opts, budget, machine)
            latency += rows
            throughput.append(tp)
    result: dict[str, Any] = {
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine,
        "options": {k: getattr(opts, k) for k in
                    ("quick", "iterations", "warmup", "block", "duration", "clients", "latency_budget")},
        "max_query_associations": throughput[0]["raw"]["clients"],
        "latency": latency,
        "throughput": throughput,
        "wall_seconds": time.monotonic() - started,
    }
    result["markdown"] = render(result)
    print(result["markdown"])
    print(f"(run took {result['wall_seconds']:.0f} s; written to {opts.output})")
    opts.output.parent.mkdir(parents=True, exist_ok=True)
    opts.output.write_text(result["markdown"])
    return result


if __name__ == "__main__":
    main()
