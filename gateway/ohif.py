"""Serve a prebuilt OHIF viewer next to the gateway, on the same origin.

The OHIF viewer is a static single-page app: npm's ``@ohif/app`` 3.13.x ships it built in
``package/dist`` (a plain ``npm install`` of that package fails on unmet peer versions, so
:func:`fetch_ohif` uses ``npm pack`` and extracts the tarball). :func:`ohif_routes` returns the
Starlette routes that serve such a ``dist/`` directory at the site root:

- ``/app-config.js`` is generated per request (it overrides the file in ``dist``): one ``dicomweb``
  data source whose QIDO/WADO roots are ``<scheme>://<host>/dicom-web`` of the request, the study
  list on, the onboarding tour (customization ``ohif.tours``) and the investigational-use banner off;
- everything else is served from ``dist`` (``StaticFiles(html=True)``), and a path that names no
  file and has no extension (an OHIF route such as ``/viewer?StudyInstanceUIDs=...``) falls back
  to ``index.html``.

Mount these routes *after* the DICOMweb mounts (``create_app(settings, ohif_dir=...)`` does), so
``/dicom-web`` is never shadowed. Command line: ``python -m gateway.ohif fetch`` prints the path of
the cached ``dist`` (downloading it first if needed).
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import mimetypes
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import Scope

__all__ = [
    "OHIF_PACKAGE",
    "OHIF_SERIES",
    "OhifStaticFiles",
    "app_config",
    "app_config_js",
    "default_cache_dir",
    "fetch_ohif",
    "ohif_routes",
]

OHIF_PACKAGE = "@ohif/app"
OHIF_SERIES = "3.13"
# The release the e2e test and `demo --ohif` use: pinned like the Python lock, with the registry's
# sha512 integrity checked on the tarball, so a new patch release changes nothing until tested.
OHIF_VERSION = "3.13.2"
OHIF_INTEGRITY = ("sha512-WZdxmpmG7rqFgW9ZJLcbgr3XCtLi1KDNPoMaeY5PPe6j4G4fjEjjkycZM6C6Zk2F87BKxFfpq"
                  "+jd5xXZB9E8EA==")
DATA_SOURCE_NAME = "dicomweb"

# Older mimetypes tables lack these; OHIF streams its codecs' WebAssembly (instantiateStreaming
# refuses anything but application/wasm) and loads some workers as modules.
mimetypes.add_type("application/wasm", ".wasm")
mimetypes.add_type("text/javascript", ".mjs")


# ---------------------------------------------------------------------------------------------
# app-config.js


def data_source(root: str, **overrides: Any) -> dict[str, Any]:
    """The OHIF ``dicomweb`` data source for a DICOMweb ``root`` (e.g. ``http://host/dicom-web``).

    Mirrors OHIF's shipped defaults for a real (non-static) DICOMweb server; ``overrides`` replace
    or add ``configuration`` keys (e.g. ``enableStudyLazyLoad=False``).
    """
    configuration: dict[str, Any] = {
        "friendlyName": "dicomweb-gateway",
        "name": "dicomweb-gateway",
        "qidoRoot": root,
        "wadoRoot": root,
        "wadoUriRoot": root.rsplit("/dicom-web", 1)[0] + "/wado",  # only for imageRendering 'wadouri'
        "qidoSupportsIncludeField": True,
        "supportsReject": False,
        "imageRendering": "wadors",
        "thumbnailRendering": "wadors",
        "enableStudyLazyLoad": True,
        "supportsFuzzyMatching": False,
        "supportsWildcard": True,
        "staticWado": False,
        "singlepart": "bulkdata,video",
        "bulkDataURI": {"enabled": True},
        "omitQuotationForMultipartRequest": True,
    }
    configuration.update(overrides)
    return {
        "namespace": "@ohif/extension-default.dataSourcesModule.dicomweb",
        "sourceName": DATA_SOURCE_NAME,
        "configuration": configuration,
    }


def app_config(root: str, **overrides: Any) -> dict[str, Any]:
    """The whole ``window.config`` object for a gateway whose DICOMweb root is ``root``."""
    return {
        "routerBasename": "/",
        "extensions": [],
        "modes": [],
        "showStudyList": True,
        "maxNumberOfWebWorkers": 3,
        "showWarningMessageForCrossOrigin": False,
        "showCPUFallbackMessage": True,
        "showLoadingIndicator": True,
        "strictZSpacingForVolumeViewport": True,
        "maxNumRequests": {"interaction": 100, "thumbnail": 5, "prefetch": 25},
        "showErrorDetails": "always",
        # The onboarding tour (shepherd.js, first /viewer visit) covers the viewport; customization
        # 'ohif.tours' lists the tours and Global scope wins over the default extension's list.
        "customizationService": {"ohif.tours": {"$set": []}},
        # The "investigational use only" banner at the bottom of the viewer.
        "investigationalUseDialog": {"option": "never"},
        "defaultDataSourceName": DATA_SOURCE_NAME,
        "dataSources": [data_source(root, **overrides)],
    }


def app_config_js(root: str, **overrides: Any) -> str:
    config = json.dumps(app_config(root, **overrides), indent=2, ensure_ascii=False)
    return f"/** Generated by dicomweb-gateway (gateway/ohif.py). */\nwindow.config = {config};\n"


def dicomweb_root(request: Request, prefix: str = "/dicom-web") -> str:
    """Absolute DICOMweb root on the origin the browser used (scheme and Host of the request)."""
    return str(request.base_url).rstrip("/") + prefix


# ---------------------------------------------------------------------------------------------
# Static files with the single-page-app fallback


class OhifStaticFiles(StaticFiles):
    """``StaticFiles(html=True)`` whose unknown extension-less paths serve ``index.html``.

    A missing ``*.js``/``*.wasm``/... still answers 404, so a broken build is not hidden behind
    an HTML page with status 200.
    """

    async def get_response(self, path: str, scope: Scope) -> Response:
        try:
            return await super().get_response(path, scope)
        except HTTPException as exc:
            if exc.status_code != 404 or scope["method"] not in ("GET", "HEAD"):
                raise
            last = path.rstrip("/").rsplit("/", 1)[-1]
            if "." in last:
                raise
            return await super().get_response("index.html", scope)


def ohif_routes(dist: Path | str, *, prefix: str = "/dicom-web",
                overrides: Mapping[str, Any] | None = None) -> list[BaseRoute]:
    """Routes serving the OHIF ``dist`` directory at ``/`` with a generated ``/app-config.js``.

    Put them last: the catch-all mount at ``/`` would otherwise shadow later routes.
    """
    dist = Path(dist)
    if not (dist / "index.html").is_file():
        raise FileNotFoundError(f"{dist} is not an OHIF dist directory (no index.html)")
    extra = dict(overrides or {})

    async def config_js(request: Request) -> Response:
        body = app_config_js(dicomweb_root(request, prefix), **extra)
        return Response(body, media_type="text/javascript; charset=utf-8",
                        headers={"Cache-Control": "no-store"})

    return [
        Route("/app-config.js", config_js, methods=["GET", "HEAD"]),
        Mount("/", app=OhifStaticFiles(directory=dist, html=True), name="ohif"),
    ]


# ---------------------------------------------------------------------------------------------
# Fetching the prebuilt viewer


def default_cache_dir() -> Path:
    """``$OHIF_CACHE_DIR``, else ``$XDG_CACHE_HOME/dicomweb-gateway/ohif`` (``~/.cache/...``)."""
    if os.environ.get("OHIF_CACHE_DIR"):
        return Path(os.environ["OHIF_CACHE_DIR"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base).expanduser() / "dicomweb-gateway" / "ohif"


def _version_key(version: str) -> tuple[int, ...]:
    return tuple(int(p) for p in re.findall(r"\d+", version.split("-")[0]))


def _npm() -> str:
    npm = shutil.which("npm")
    if npm is None:
        raise RuntimeError("npm is not installed: it is needed to fetch the OHIF viewer (npm pack)")
    return npm


def newest_release(series: str = OHIF_SERIES) -> str:
    """The newest published ``@ohif/app`` version in ``series`` (e.g. ``3.13`` -> ``3.13.2``)."""
    out = subprocess.run([_npm(), "view", f"{OHIF_PACKAGE}@~{series}.0", "version", "--json"],
                         check=True, capture_output=True, text=True, timeout=120).stdout
    value = json.loads(out)
    versions = [value] if isinstance(value, str) else list(value)
    stable = [v for v in versions if re.fullmatch(re.escape(series) + r"\.\d+", v)]
    if not stable:
        raise RuntimeError(f"no stable {OHIF_PACKAGE} release in the {series} series: {versions}")
    return max(stable, key=_version_key)


def fetch_ohif(cache_dir: Path | str | None = None, *, version: str | None = None,
               refresh: bool = False, log: Any = None) -> Path:
    """Return the path of a prebuilt OHIF ``dist`` directory, fetching it with ``npm pack`` if needed.

    ``version`` pins a release (default: :data:`OHIF_VERSION`, the tested one; with ``refresh``, the
    newest ``3.13.x`` published). The pinned release's tarball is checked against
    :data:`OHIF_INTEGRITY`. The tarball is extracted into
    ``<cache_dir>/<version>/dist`` (default cache: :func:`default_cache_dir`) and reused afterwards,
    so only the first call needs the npm registry.
    """
    say = log or (lambda msg: None)
    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    if version is None:
        version = newest_release(OHIF_SERIES) if refresh else OHIF_VERSION
    dist = cache / version / "dist"
    if (dist / "index.html").is_file():
        say(f"using cached OHIF {version}: {dist}")
        return dist

    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".fetch-", dir=cache) as tmp:
        say(f"npm pack {OHIF_PACKAGE}@{version}")
        subprocess.run([_npm(), "pack", f"{OHIF_PACKAGE}@{version}", "--pack-destination", tmp,
                        "--silent"], check=True, capture_output=True, text=True, timeout=600)
        tarballs = list(Path(tmp).glob("*.tgz"))
        if len(tarballs) != 1:
            raise RuntimeError(f"npm pack produced {len(tarballs)} tarballs in {tmp}")
        if version == OHIF_VERSION:
            digest = base64.b64encode(hashlib.sha512(tarballs[0].read_bytes()).digest()).decode()
            if f"sha512-{digest}" != OHIF_INTEGRITY:
                raise RuntimeError(f"{tarballs[0].name} does not match the pinned integrity of "
                                   f"{OHIF_PACKAGE}@{version}")
        say(f"extracting package/dist from {tarballs[0].name} ({tarballs[0].stat().st_size >> 20} MB)")
        staging = Path(tmp) / "out"
        with tarfile.open(tarballs[0], "r:gz") as tar:
            members = [m for m in tar.getmembers() if m.name.startswith("package/dist/")]
            if not members:
                raise RuntimeError(f"{tarballs[0].name} has no package/dist directory")
            if hasattr(tarfile, "data_filter"):   # Python >= 3.11.4 (Debian 12 has 3.11.2)
                tar.extractall(staging, members=members, filter="data")
            else:
                unsafe = [m.name for m in members if not (m.isfile() or m.isdir()) or m.name.startswith("/")
                          or ".." in Path(m.name).parts]
                if unsafe:
                    raise RuntimeError(f"{tarballs[0].name} holds unsafe members: {unsafe[:3]}")
                tar.extractall(staging, members=members)  # noqa: S202 - members checked above
        target = cache / version
        target.mkdir(exist_ok=True)
        if dist.exists():  # a half-extracted copy from an interrupted run (no index.html)
            shutil.rmtree(dist)
        (staging / "package" / "dist").rename(dist)
    if not (dist / "index.html").is_file():
        raise RuntimeError(f"{dist} has no index.html after extraction")
    say(f"OHIF {version} extracted to {dist}")
    return dist


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gateway.ohif",
                                     description="fetch the prebuilt OHIF viewer into a cache")
    sub = parser.add_subparsers(dest="command", required=True)
    fetch = sub.add_parser("fetch", help="npm pack @ohif/app@3.13.x into the cache; print the dist path")
    fetch.add_argument("--cache-dir", type=Path, default=None,
                       help=f"default: {default_cache_dir()} ($OHIF_CACHE_DIR)")
    fetch.add_argument("--version", help=f"exact @ohif/app version (default: the tested {OHIF_VERSION})")
    fetch.add_argument("--refresh", action="store_true",
                       help="ask npm for the newest release even when one is cached")
    args = parser.parse_args(argv)
    dist = fetch_ohif(args.cache_dir, version=args.version, refresh=args.refresh,
                      log=lambda msg: print(msg, file=sys.stderr))
    print(dist)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
