"""CI smoke of the QIDO benchmark: a minimal run of ``bench_qido.main`` against a real Orthanc.

Not a performance gate (figures on a shared CI machine are noise): it checks that every row the
benchmark reports was measured, with the right number of studies and no failed request, so the
report-only benchmark cannot rot unnoticed. Run it with
``python3 -m pytest -p no:cacheprovider tests/bench/test_bench_smoke.py`` (not in the default
testpaths). Takes about 10 s.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

import pytest

BENCH = Path(__file__).with_name("bench_qido.py")


def load_bench() -> ModuleType:
    # tests/bench is not a package: load the script by path.
    spec = importlib.util.spec_from_file_location("bench_qido", BENCH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
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
