"""CI smoke of the benchmarks: minimal runs of ``bench_qido.main`` and ``bench_cold.main`` against real peers.

Not a performance gate (figures on a shared CI machine are noise): it checks that every row the
benchmarks report was measured, with the right answers and no failed request, so the report-only
benchmarks cannot rot unnoticed. Run it with
``python3 -m pytest -p no:cacheprovider tests/bench/test_bench_smoke.py`` (not in the default
testpaths). Takes about 10 s (QIDO) + 40 s (cold path).
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest
from hypothesis import given
from hypothesis import strategies as st

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# The integration suite's Redis: 127.0.0.1:6379/15 when it answers, else a private redis-server.
from tests.integration.conftest import redis_url  # noqa: E402,F401

BENCH = Path(__file__).with_name("bench_qido.py")


def load_bench(path: Path = BENCH) -> ModuleType:
    # tests/bench is not a package: load the script by path.
    spec = importlib.util.spec_from_file_location(path.stem, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module     # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


@pytest.mark.bench
@pytest.mark.integration
@pytest.mark.timeout(90)
def test_quick_run_measures_every_row(tmp_path: Path) -> None:
    bench = load_bench()
    report = tmp_path / "qido.md"
    result = bench.main(["--quick", "--iterations", "5", "--duration", "1", "--no-nagle-run",
                         "--output", str(report)])

    assert [row["query"] for row in result["latency"]] == list(bench.QUERIES)
    for row in result["latency"]:
        assert row["condition"] == "TCP_NODELAY=1"
        assert row["results"] == bench.EXPECTED[row["query"]] > 0, row
        assert row["raw_errors"] == 0, row["error_samples"]
        assert row["gw_errors"] == 0, row["error_samples"]
        assert row["n"] == 5, row
        for key in ("raw_median_ms", "raw_p95_ms", "gw_median_ms", "gw_p95_ms", "ratio_median", "ratio_p95",
                    "gw_cached_median_ms", "gw_cached_p95_ms"):
            assert row[key] > 0, (row["query"], key, row[key])
        assert row["raw_p95_ms"] >= row["raw_median_ms"] and row["gw_p95_ms"] >= row["gw_median_ms"]
    quick = result["latency"][0]
    assert quick["raw_quickack_median_ms"] > 0 and quick["raw_quickack_p95_ms"] > 0

    [throughput] = result["throughput"]
    for side, clients in (("raw", result["max_query_associations"]), ("gw", 8)):
        figures = throughput[side]
        assert figures["clients"] == clients
        assert figures["requests"] > 0 and figures["rps"] > 0 and figures["p50_ms"] > 0, figures
    assert throughput["raw"]["errors"] == 0, throughput["raw"]["error_samples"]
    # Wrong answers under load came from the pynetdicom reactor race (tests/bench/README.md), now
    # guarded in gateway/dimse/socket_tuning.py: any error here is a regression.
    assert throughput["gw"]["errors"] == 0, throughput["gw"]["error_samples"]
    assert throughput["ratio"] > 0
    assert result["max_query_associations"] == 4   # the gateway default the report mentions

    assert report.read_text() == result["markdown"]
    assert "| TCP_NODELAY=1 | `/studies?PatientID=DGW0001` | 2 | 5 |" in result["markdown"]


COLD_ROWS = ("cget", "ttfb", "storm", "stow")


@pytest.mark.bench
@pytest.mark.integration
@pytest.mark.timeout(180, method="thread")   # bench_cold's own watchdog uses SIGALRM
def test_cold_path_tiny_run_measures_every_row(tmp_path: Path, redis_url: str) -> None:  # noqa: F811
    bench = load_bench(Path(__file__).with_name("bench_cold.py"))
    report = tmp_path / "cold_path.md"
    result = bench.main(["--slices", "12", "--reps", "1", "--storm", "12", "--only", ",".join(COLD_ROWS),
                         "--redis", redis_url, "--budget", "150", "--workdir", str(tmp_path),
                         "--output", str(report)])

    assert list(result["rows"]) == list(COLD_ROWS)
    for key, row in result["rows"].items():
        # A failed answer check (wrong instance count, bytes, Orthanc's count after STOW) is an error.
        assert row["status"] == "measured" and row["errors"] == [], (key, row["errors"])
        assert row["checks"], key
        assert row["targets"], key
        for target in row["targets"]:
            assert target["gateway"] > 0 and target["anchor"] > 0 and target["ratio"] > 0, (key, target)
            assert target["met"] in (True, False), (key, target)
    # Every engine the gateway can select was measured, on every repetition, next to both anchors.
    cget = result["rows"]["cget"]["table"]
    gateways = [line for line in cget if line.startswith("| gateway, ")]
    assert len(gateways) >= 1 and all(line.split("|")[2].strip() == "1" for line in gateways), cget
    assert any(line.startswith("| DCMTK getscu | 1 |") for line in cget), cget
    assert any(line.startswith("| raw pynetdicom C-GET | 1 |") for line in cget), cget

    text = report.read_text()
    assert text == result["markdown"]
    assert "## Summary" in text and "not run" not in text
    assert all(f"| {row['number']} | " in text for row in result["rows"].values())


@given(stream=st.lists(st.sampled_from([b"\r\n--b0undary", b"\r\n--b0undary--", b"-", b"b0", b"x" * 40]),
                       max_size=60),
       cuts=st.lists(st.integers(0, 800), max_size=20))
def test_the_client_counts_delimiters_across_any_split(stream: list[bytes], cuts: list[int]) -> None:
    """The benchmark client counts parts without joining what it reads: any split of a body into
    pieces (empty ones, ones shorter than the delimiter) gives the counts of the whole (delimiters
    follow a CRLF, as in a multipart body, so no two occurrences overlap)."""
    from tests.bench.bench_wado import PatternCount

    body = b"".join(stream)
    bounds = sorted({0, len(body), *(c for c in cuts if c <= len(body))})
    counts = [PatternCount(b"--b0undary"), PatternCount(b"--b0undary--")]
    for a, b in zip(bounds, bounds[1:], strict=False):
        for count in counts:
            count.feed(body[a:b])
    assert [c.count for c in counts] == [body.count(b"--b0undary"), body.count(b"--b0undary--")]
