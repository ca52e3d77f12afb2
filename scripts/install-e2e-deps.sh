#!/usr/bin/env bash
# Install what the browser end-to-end test (tests/e2e) needs, skipping whatever is already there
# (safe to re-run):
#   - Debian's chromium (/usr/bin/chromium); no browser download: Playwright drives this one
#   - the prebuilt OHIF viewer: `npm pack @ohif/app@<gateway.ohif.OHIF_VERSION>` (pinned, integrity
#     checked), extracted into the cache
#     (OHIF_CACHE_DIR, default ~/.cache/dicomweb-gateway/ohif)
# Runs as root (CI) or through sudo when available. Debian/Ubuntu only. PYTHON=/path/to/python
# is the project's venv interpreter (default: .venv/bin/python).
set -euo pipefail

log() { printf '[install-e2e-deps] %s\n' "$*"; }

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
python="${PYTHON:-$repo_root/.venv/bin/python}"
start=$SECONDS

sudo_cmd=()
if [[ "$(id -u)" -ne 0 ]] && command -v sudo >/dev/null 2>&1; then
    sudo_cmd=(sudo)
fi

# 1. Debian chromium
if [[ -x /usr/bin/chromium ]]; then
    log "chromium already installed: $(/usr/bin/chromium --version 2>/dev/null || echo '?')"
else
    if ! command -v apt-get >/dev/null 2>&1; then
        log "chromium is missing and apt-get is not available: install Debian's chromium by hand" >&2
        exit 1
    fi
    if [[ "$(id -u)" -ne 0 && ${#sudo_cmd[@]} -eq 0 ]]; then
        log "chromium is missing, not root and no sudo: cannot install it" >&2
        exit 1
    fi
    apt=("${sudo_cmd[@]}" env DEBIAN_FRONTEND=noninteractive apt-get)
    log "apt-get update"
    "${apt[@]}" update
    log "apt-get install -y --no-install-recommends chromium fonts-liberation"
    "${apt[@]}" install -y --no-install-recommends chromium fonts-liberation
    log "installed: $(/usr/bin/chromium --version 2>/dev/null || echo '?')"
fi

# 2. Python playwright: in the lock (requirements/test.txt), installed by scripts/venv.sh; it
#    drives /usr/bin/chromium through executable_path (never `playwright install`).

# 3. OHIF prebuilt dist (npm pack, cached)
if ! command -v npm >/dev/null 2>&1; then
    log "npm is missing: install Node.js/npm (Debian: apt-get install npm)" >&2
    exit 1
fi
cd "$repo_root"
log "fetching the pinned OHIF viewer dist (npm pack, cached)"
dist="$("$python" -m gateway.ohif fetch)"
log "OHIF dist: $dist"

log "done in $((SECONDS - start)) s"
