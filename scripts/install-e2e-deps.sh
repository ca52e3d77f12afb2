#!/usr/bin/env bash
# Install what the browser end-to-end test (tests/e2e) needs, skipping whatever is already there
# (safe to re-run):
#   - Debian's chromium (/usr/bin/chromium); no browser download: Playwright drives this one
#   - the Python playwright client from PyPI (never `playwright install`)
#   - the prebuilt OHIF viewer: `npm pack @ohif/app@3.13.x`, extracted into the cache
#     (OHIF_CACHE_DIR, default ~/.cache/dicomweb-gateway/ohif)
# Runs as root (CI) or through sudo when available. Debian/Ubuntu only. PYTHON=/path/to/python
# selects the interpreter pip installs into (default: python3).
set -euo pipefail

log() { printf '[install-e2e-deps] %s\n' "$*"; }

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
python="${PYTHON:-python3}"
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

# 2. Python playwright (the client only; it drives /usr/bin/chromium through executable_path)
if "$python" -c 'import playwright' >/dev/null 2>&1; then
    log "python playwright already installed: $("$python" -m pip show playwright 2>/dev/null | sed -n 's/^Version: //p')"
else
    log "$python -m pip install playwright (no 'playwright install': the browser is Debian's)"
    "$python" -m pip install playwright
fi

# 3. OHIF prebuilt dist (npm pack, cached)
if ! command -v npm >/dev/null 2>&1; then
    log "npm is missing: install Node.js/npm (Debian: apt-get install npm)" >&2
    exit 1
fi
cd "$repo_root"
log "fetching the OHIF viewer dist (npm pack @ohif/app@3.13, cached)"
dist="$("$python" -m gateway.ohif fetch)"
log "OHIF dist: $dist"

log "done in $((SECONDS - start)) s"
