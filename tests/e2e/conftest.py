"""Fixtures for the browser end-to-end tests: demo PACS + gateway + OHIF on one origin, and
Debian's Chromium driven by Python Playwright.

Needs (``scripts/install-e2e-deps.sh`` installs them): ``/usr/bin/chromium`` (Debian package, no
browser download), the ``playwright`` Python package (the client only: no ``playwright install``)
and the prebuilt OHIF viewer in the cache (``npm pack @ohif/app@3.13.x``; ``$OHIF_DIST`` points at
another built ``dist/``). A missing piece fails the fixture with that hint: these tests never skip.

Every page records its console, page errors and DICOMweb traffic (:class:`Recorder`); a test ends
with ``recorder.assert_clean()``, and a screenshot of each page is saved to ``artifacts/e2e/``.

The viewer-configuration variants (``test_ohif_variants.py``) use :func:`variant_servers`: a second
gateway whose every HTTP exchange is logged server side (:class:`ServerLog`: CORS preflights and the
exact ``Accept`` the gateway saw included), with ``http.cors_origins`` set to the origin of a second
server that serves only the OHIF ``dist`` (a different port, hence a different origin).
"""

from __future__ import annotations

import dataclasses
import os
import re
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from gateway.cli import demo_settings
from gateway.demo_data import generate_demo_datasets
from gateway.dimse.demo_pacs import DemoPacs
from tests.support.server import free_port, running_gateway

REPO = Path(__file__).resolve().parents[2]
ARTIFACTS = REPO / "artifacts" / "e2e"
CHROMIUM = os.environ.get("E2E_CHROMIUM", "/usr/bin/chromium")
INSTALL_HINT = "run scripts/install-e2e-deps.sh (Debian chromium, Python playwright, OHIF dist via npm pack)"

# The flags this machine's Chromium needs headless and offline (no GPU, no Google services).
CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]

# OHIF's own console noise that is not a failure (explicit; anything else of type "error" fails).
CONSOLE_ERROR_ALLOW = [
    # none seen with OHIF 3.13.2 on the demo PACS so far
]


@dataclass
class Recorder:
    """What one page did: console errors, page errors, DICOMweb requests and failures."""

    console: list[tuple[str, str]] = field(default_factory=list)      # (type, text)
    page_errors: list[str] = field(default_factory=list)
    requests: list[dict[str, Any]] = field(default_factory=list)      # every /dicom-web request
    failures: list[str] = field(default_factory=list)                 # >= 400 or network failure

    def attach(self, page: Any) -> None:
        page.on("console", lambda m: self.console.append((m.type, m.text)))
        page.on("pageerror", lambda e: self.page_errors.append(str(e)))
        page.on("request", self._on_request)
        page.on("response", self._on_response)
        page.on("requestfailed", self._on_failed)

    def _on_request(self, request: Any) -> None:
        if "/dicom-web/" in request.url:
            self.requests.append({"method": request.method, "url": request.url,
                                  "accept": request.headers.get("accept"),
                                  "authorization": request.headers.get("authorization")})

    def _on_response(self, response: Any) -> None:
        if "/dicom-web/" in response.url and response.status >= 400:
            try:
                body = response.text()[:500]
            except Exception as exc:  # body already gone
                body = f"<no body: {exc}>"
            self.failures.append(f"{response.status} {response.request.method} {response.url} "
                                 f"Accept: {response.request.headers.get('accept')!r} body: {body!r}")

    def _on_failed(self, request: Any) -> None:
        if "/dicom-web/" in request.url:
            self.failures.append(f"network failure {request.failure} {request.method} {request.url} "
                                 f"Accept: {request.headers.get('accept')!r}")

    def frame_requests(self) -> list[tuple[str, int]]:
        """(SOPInstanceUID, frame number) of every frames request, in order."""
        out = []
        for r in self.requests:
            m = re.search(r"/instances/([0-9.]+)/frames/(\d+)(?:$|\?)", r["url"])
            if m:
                out.append((m.group(1), int(m.group(2))))
        return out

    def console_errors(self) -> list[str]:
        errors = [text for kind, text in self.console if kind == "error"]
        return [e for e in errors if not any(re.search(p, e) for p in CONSOLE_ERROR_ALLOW)]

    def assert_clean(self) -> None:
        problems = [*(f"failed DICOMweb request: {f}" for f in self.failures),
                    *(f"page error: {e}" for e in self.page_errors),
                    *(f"console error: {e}" for e in self.console_errors())]
        assert not problems, "\n".join(problems)


def _require_playwright() -> Any:
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail(f"the playwright Python package is missing: {INSTALL_HINT}", pytrace=False)
    if not os.access(CHROMIUM, os.X_OK):
        pytest.fail(f"{CHROMIUM} is missing: {INSTALL_HINT}", pytrace=False)
    return sync_playwright


@pytest.fixture(scope="session")
def ohif_dist() -> Path:
    if os.environ.get("OHIF_DIST"):
        dist = Path(os.environ["OHIF_DIST"])
    else:
        from gateway.ohif import fetch_ohif
        try:
            dist = fetch_ohif()  # the cached copy; npm pack only when nothing is cached
        except Exception as exc:
            pytest.fail(f"cannot get the OHIF viewer ({exc}): {INSTALL_HINT}", pytrace=False)
    if not (dist / "index.html").is_file():
        pytest.fail(f"{dist} is not a built OHIF dist/: {INSTALL_HINT}", pytrace=False)
    return dist


@pytest.fixture(scope="session")
def demo_datasets() -> dict[str, Any]:
    """SOPInstanceUID -> pydicom Dataset of the demo PACS."""
    return {str(ds.SOPInstanceUID): ds for ds in generate_demo_datasets()}


@pytest.fixture(scope="session")
def demo_pacs(demo_datasets: dict[str, Any]) -> Iterator[DemoPacs]:
    with DemoPacs(demo_datasets.values(), ae_title="DEMOPACS") as pacs:
        yield pacs


@pytest.fixture(scope="session")
def base_url(demo_pacs: DemoPacs, ohif_dist: Path) -> Iterator[str]:
    """http://127.0.0.1:PORT serving OHIF at / and the gateway at /dicom-web (demo PACS behind)."""
    settings = demo_settings(demo_pacs.port, "127.0.0.1", 0)
    with running_gateway(settings, ohif_dir=ohif_dist) as url:
        yield url


# ---------------------------------------------------------------------------------------------
# Server-side log and a second origin, for the viewer-configuration variants


@dataclass
class ServerLog:
    """Every HTTP exchange one server handled, in arrival order (appended when the request
    arrives, completed when the response starts). Response bodies are kept for images and
    errors only."""

    entries: list[dict[str, Any]] = field(default_factory=list)

    def mark(self) -> int:
        return len(self.entries)

    def since(self, mark: int) -> list[dict[str, Any]]:
        return list(self.entries[mark:])


class LoggingApp:
    """ASGI wrapper that records each HTTP request/response pair into a :class:`ServerLog`."""

    def __init__(self, app: Any, log: ServerLog) -> None:
        self.app, self.log = app, log

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        entry: dict[str, Any] = {
            "method": scope["method"], "path": scope["path"],
            "query": scope["query_string"].decode("latin-1"),
            "headers": {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]},
            "status": None, "response_headers": {}, "body": b"",
        }
        self.log.entries.append(entry)

        async def logging_send(message: Any) -> None:
            if message["type"] == "http.response.start":
                entry["status"] = message["status"]
                entry["response_headers"] = {k.decode("latin-1").lower(): v.decode("latin-1")
                                             for k, v in message.get("headers", [])}
            elif message["type"] == "http.response.body" and (
                    entry["status"] >= 400
                    or entry["response_headers"].get("content-type", "").startswith("image/")):
                entry["body"] += message.get("body", b"")
            await send(message)

        await self.app(scope, receive, logging_send)


@contextmanager
def serving(app: Any, port: int | None = None) -> Iterator[str]:
    """Serve an ASGI app on a loopback port in a thread; yields http://127.0.0.1:PORT."""
    import uvicorn

    port = port or free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning",
                                           lifespan="on", loop="asyncio"))
    thread = threading.Thread(target=server.run, name=f"uvicorn-e2e-{port}", daemon=True)
    thread.start()
    deadline = time.monotonic() + 15
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError(f"server on port {port} did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=15)


class ConfigOverride:
    """ASGI wrapper answering ``GET /app-config.js`` with ``self.js`` while it is set (a test's
    viewer configuration), and passing everything else (and that path when unset) through."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.js: str | None = None
        self.served = 0

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        js = self.js
        if scope["type"] == "http" and scope["path"] == "/app-config.js" and js is not None:
            from starlette.responses import Response

            self.served += 1
            response = Response(js, media_type="text/javascript; charset=utf-8",
                                headers={"Cache-Control": "no-store"})
            await response(scope, receive, send)
            return
        await self.app(scope, receive, send)


@dataclass
class VariantServers:
    gateway: str       # gateway + OHIF (same origin); every exchange is in ``log``
    viewer: str        # OHIF dist only, another origin; the gateway's http.cors_origins = [viewer]
    log: ServerLog
    configs: dict[str, ConfigOverride]   # origin -> its /app-config.js override

    @contextmanager
    def app_config(self, origin: str, js: str) -> Iterator[ConfigOverride]:
        """Serve ``js`` as ``origin``'s /app-config.js for the duration of the block."""
        override = self.configs[origin]
        override.js = js
        try:
            yield override
        finally:
            override.js = None


@pytest.fixture(scope="session")
def variant_servers(demo_pacs: DemoPacs, ohif_dist: Path) -> Iterator[VariantServers]:
    """A second gateway on the demo PACS (server-side log, CORS for the viewer origin only) and
    a second origin serving the OHIF dist, both with overridable /app-config.js."""
    from starlette.applications import Starlette

    from gateway.app import create_app
    from gateway.ohif import ohif_routes

    viewer_port = free_port()
    viewer_origin = f"http://127.0.0.1:{viewer_port}"
    settings = demo_settings(demo_pacs.port, "127.0.0.1", 0)
    settings = dataclasses.replace(settings, http=dataclasses.replace(settings.http,
                                                                      cors_origins=(viewer_origin,)))
    log = ServerLog()
    gateway_config = ConfigOverride(create_app(settings, ohif_dir=ohif_dist))
    with serving(LoggingApp(gateway_config, log)) as gateway:
        root = gateway + "/dicom-web"
        viewer_config = ConfigOverride(Starlette(routes=ohif_routes(
            ohif_dist, overrides={"qidoRoot": root, "wadoRoot": root})))
        with serving(viewer_config, viewer_port) as viewer:
            assert viewer == viewer_origin
            yield VariantServers(gateway, viewer, log, {gateway: gateway_config, viewer: viewer_config})


@pytest.fixture(scope="session")
def browser() -> Iterator[Any]:
    sync_playwright = _require_playwright()
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS, headless=True)
        try:
            yield b
        finally:
            b.close()


@dataclass
class OhifPage:
    page: Any
    recorder: Recorder
    base_url: str
    name: str

    def screenshot(self, label: str) -> Path:
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        path = ARTIFACTS / f"{self.name}-{label}.png"
        self.page.screenshot(path=str(path))
        return path


@contextmanager
def ohif_page(browser: Any, base_url: str, name: str) -> Iterator[OhifPage]:
    """A fresh browser context (empty localStorage: the first-visit state) on the OHIF origin
    ``base_url``. No request routing here: once a route is installed, Playwright answers every CORS
    preflight itself (with permissive headers) instead of letting it reach the server."""
    context = browser.new_context(viewport={"width": 1400, "height": 900}, device_scale_factor=1)
    context.set_default_timeout(60_000)
    page = context.new_page()
    recorder = Recorder()
    recorder.attach(page)
    handle = OhifPage(page, recorder, base_url, re.sub(r"[^A-Za-z0-9_.-]+", "_", name))
    try:
        yield handle
    finally:
        try:
            handle.screenshot("final")
        except Exception:  # the page may already be gone
            pass
        context.close()


@pytest.fixture()
def ohif(browser: Any, base_url: str, request: pytest.FixtureRequest) -> Iterator[OhifPage]:
    """A fresh browser context on the OHIF origin of :func:`base_url`."""
    with ohif_page(browser, base_url, request.node.name) as handle:
        yield handle
