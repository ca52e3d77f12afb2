#!/usr/bin/env bash
# Make (or bring up to date) the project's own virtual environment from a lock, and never touch the
# system interpreter (PEP 668). Sourced or run by scripts/demo.sh and scripts/test.sh:
#   bash scripts/venv.sh runtime|test [VENV_DIR]      (default VENV_DIR: .venv in the checkout)
#   bash scripts/venv.sh bare VENV_DIR                 a venv with pip only (scripts/test.sh --latest)
# - the interpreter is $PYTHON, else python3 (Debian's own, pyenv, anything >= 3.11);
# - Debian's python3-venv (ensurepip) is installed with apt-get when `venv` cannot bootstrap pip;
# - requirements/<lock>.txt is installed with --require-hashes (exact versions and sha256 hashes)
#   and --no-deps: the lock is the whole closure (uv, every platform), so pip resolves nothing and
#   never asks the index what exists. (Resolving, pip 23.0 - Debian 12's - met pip-audit's
#   `CacheControl[filecache]>=0.13.0`, took the newest release from the index instead of the pinned
#   one and refused it as unpinned: a release weeks after the lock broke the install.) `pip check`
#   then proves the closure complete. The project itself goes in editable, --no-deps
#   --no-build-isolation (its build backend is in the lock too): nothing unpinned is ever fetched;
# - a stamp (the lock's sha256) skips the install when the venv already matches the lock.
set -euo pipefail

log() { printf '[venv] %s\n' "$*" >&2; }

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
which_lock="${1:?usage: venv.sh runtime|test|bare [VENV_DIR]}"
venv="${2:-$repo_root/.venv}"
lock="$repo_root/requirements/${which_lock}.txt"
[[ "$which_lock" == bare || -f "$lock" ]] || { log "no lock $lock (bash scripts/lock.sh makes it)"; exit 1; }
python="${PYTHON:-python3}"

"$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null || {
    log "$python is missing or older than 3.11: set PYTHON=/path/to/python3.11+"; exit 1; }

apt_install() {
    local sudo_cmd=()
    if [[ "$(id -u)" -ne 0 ]]; then
        command -v sudo >/dev/null 2>&1 || { log "not root and no sudo: install $* by hand"; exit 1; }
        sudo_cmd=(sudo)
    fi
    command -v apt-get >/dev/null 2>&1 || { log "no apt-get: install $* by hand"; exit 1; }
    log "apt-get install -y --no-install-recommends $*"
    "${sudo_cmd[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -qq
    "${sudo_cmd[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@"
}

# A venv whose interpreter vanished (the system Python was upgraded, a pyenv version removed) is
# rebuilt rather than half-used.
if [[ -e "$venv" && ! -x "$venv/bin/python" ]] || { [[ -x "$venv/bin/python" ]] && ! "$venv/bin/python" -c '' 2>/dev/null; }; then
    log "rebuilding broken venv $venv"
    rm -rf "$venv"
fi

if [[ ! -x "$venv/bin/python" ]]; then
    log "creating $venv with $("$python" -c 'import sys; print(sys.executable, sys.version.split()[0])')"
    err="$(mktemp)"
    if ! "$python" -m venv "$venv" 2>"$err"; then
        # Debian/Ubuntu split ensurepip out of the interpreter (python3-venv and the versioned
        # package); `import ensurepip` may still succeed there, so the venv attempt is the test.
        cat "$err" >&2
        rm -rf "$venv"
        ver="$("$python" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')"
        apt_install python3-venv "python${ver}-venv"
        "$python" -m venv "$venv"
    fi
    rm -f "$err"
fi

[[ "$which_lock" == bare ]] && exit 0

stamp="$venv/.lock-${which_lock}.sha256"
want="$(sha256sum "$lock" "$repo_root/pyproject.toml" | sha256sum | cut -d' ' -f1)"
if [[ -f "$stamp" && "$(cat "$stamp")" == "$want" ]]; then
    log "$venv matches requirements/${which_lock}.txt"
    exit 0
fi
# Only the lock's own index: no local wheel folders or extra indexes from the machine's pip config
# (their files could differ from the hashed ones), and no machine-wide constraints.
export PIP_CONFIG_FILE=/dev/null PIP_FIND_LINKS= PIP_EXTRA_INDEX_URL= PIP_CONSTRAINT= \
       PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1
log "installing requirements/${which_lock}.txt into $venv"
"$venv/bin/python" -m pip install --quiet --require-hashes --no-deps --only-binary=:all: -r "$lock"
"$venv/bin/python" -m pip install --quiet --no-deps --no-build-isolation -e "$repo_root"
"$venv/bin/python" -m pip check >&2 || { log "requirements/${which_lock}.txt is not a whole closure: bash scripts/lock.sh"; exit 1; }
echo "$want" > "$stamp"
log "$venv ready ($("$venv/bin/python" -c 'import sys; print(sys.version.split()[0])'))"
