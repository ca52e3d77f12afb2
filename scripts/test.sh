#!/usr/bin/env bash
# The README's test command: installs what the tests need (Debian packages, pip deps), then runs
# lint, type checks and the whole test suite against real PACS (Orthanc, dcmqrscp) and Redis.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install-test-deps.sh
bash scripts/install-e2e-deps.sh      # Debian chromium, Python playwright, the prebuilt OHIF viewer
echo "== ruff"
python3 -m ruff check gateway translators cache tests
echo "== mypy"
python3 -m mypy translators cache gateway
echo "== pytest"
if [ "$#" -gt 0 ]; then
    python3 -m pytest -p no:cacheprovider "$@"
else
    # unit + integration (testpaths), then OHIF in a real headless Chromium (tests/e2e)
    python3 -m pytest -p no:cacheprovider
    echo "== e2e (OHIF in headless Chromium)"
    python3 -m pytest -p no:cacheprovider tests/e2e
    echo "== benchmark smoke (report-only figures: python3 tests/bench/bench_*.py)"
    python3 -m pytest -p no:cacheprovider tests/bench/test_bench_smoke.py
fi
