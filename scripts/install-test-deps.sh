#!/usr/bin/env bash
# Install the Debian packages the test suite needs, skipping whatever is already there (safe to
# re-run): the real DIMSE peers and Redis (orthanc, orthanc-dicomweb, dcmtk, redis-server), Node.js
# and npm for the JS client test, and python3-venv where `venv` cannot bootstrap pip. Python
# packages are not installed here: scripts/venv.sh puts the locked ones in .venv.
# Runs as root (CI) or through sudo when available. Debian/Ubuntu only.
set -euo pipefail

log() { printf '[install-test-deps] %s\n' "$*"; }

sudo_cmd=()
if [[ "$(id -u)" -ne 0 ]]; then
    if command -v sudo >/dev/null 2>&1; then
        sudo_cmd=(sudo)
    else
        log "not root and no sudo: cannot install Debian packages" >&2
        exit 1
    fi
fi

has_package() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q 'install ok installed'; }

missing=()
# Debian puts Orthanc in /usr/sbin, which is not on a normal user's PATH.
command -v Orthanc >/dev/null 2>&1 || [[ -x /usr/sbin/Orthanc ]] || missing+=(orthanc)
has_package orthanc-dicomweb || missing+=(orthanc-dicomweb)
# Native DCMTK only: pynetdicom installs Python scripts that may also be called storescu/echoscu.
command -v dcmqrscp >/dev/null 2>&1 || missing+=(dcmtk)
command -v redis-server >/dev/null 2>&1 || missing+=(redis-server)
command -v node >/dev/null 2>&1 || missing+=(nodejs)
command -v npm >/dev/null 2>&1 || missing+=(npm)
command -v curl >/dev/null 2>&1 || missing+=(curl)   # the cold-path benchmark's C client
python="${PYTHON:-python3}"
venv_probe="$(mktemp -d)"
if ! "$python" -m venv "$venv_probe/v" >/dev/null 2>&1; then   # Debian: ensurepip split out
    ver="$("$python" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')"
    missing+=(python3-venv "python${ver}-venv")
fi
rm -rf "$venv_probe"

if ((${#missing[@]})); then
    if ! command -v apt-get >/dev/null 2>&1; then
        log "missing ${missing[*]} and apt-get is not available: install them by hand" >&2
        exit 1
    fi
    # Through env: sudo would drop an exported DEBIAN_FRONTEND.
    apt=("${sudo_cmd[@]}" env DEBIAN_FRONTEND=noninteractive apt-get)
    log "apt-get update"
    "${apt[@]}" update
    log "apt-get install -y --no-install-recommends ${missing[*]}"
    "${apt[@]}" install -y --no-install-recommends "${missing[@]}"
else
    log "orthanc, orthanc-dicomweb, dcmtk, redis-server, node, npm and python3-venv already installed"
fi

# The packaged services are not needed (the tests start their own processes); in containers
# they are not running anyway. Nothing is started or stopped here.
orthanc_bin="$(command -v Orthanc || echo /usr/sbin/Orthanc)"
log "done: $("$orthanc_bin" --version 2>/dev/null | head -n1 || true)," \
    "$(dcmqrscp --version 2>/dev/null | head -n1 || true)," \
    "$(redis-server --version 2>/dev/null | cut -d' ' -f1-3 || true)"
