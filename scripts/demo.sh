#!/usr/bin/env bash
# The README's first command: the gateway on its embedded default (built-in demo PACS, in-process
# cache, no Redis, no config), installed from the lock into the project's own venv (.venv), never
# into the system interpreter. Arguments go to `dicomweb-gateway demo` (e.g. --port 9090, --ohif).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/venv.sh runtime
exec .venv/bin/dicomweb-gateway demo "$@"
