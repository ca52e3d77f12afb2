#!/usr/bin/env bash
# The README's test command: installs what the tests need (Debian packages, pip deps), then runs
# lint, type checks and the whole test suite against real PACS (Orthanc, dcmqrscp) and Redis.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install-test-deps.sh
echo "== ruff"
python3 -m ruff check gateway translators cache tests
echo "== mypy"
python3 -m mypy translators cache gateway
echo "== pytest"
python3 -m pytest -p no:cacheprovider "$@"
