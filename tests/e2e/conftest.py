"""Fixtures for the browser end-to-end tests: demo PACS + gateway + OHIF on one origin, and
Debian's Chromium driven by Python Playwright.

Needs (``scripts/install-e2e-deps.sh`` installs them): ``/usr/bin/chromium`` (Debian package, no
browser download), the ``playwright`` Python package (the client only: no ``playwright install``)
and the prebuilt OHIF viewer in the cache (``npm pack @ohif/app@3.13.x``; ``$OHIF_DIST`` points at
another built ``dist/``). A missing piece fails the fixture with that hint: these tests never skip.

Every page records its console, page errors and DICOMweb traffic (:class:`Recorder`); a test ends
with ``recorder.assert_clean()``, and a screenshot of each page is saved to ``artifacts/e2e/``.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from gateway.cli import demo_settings
from gateway.demo_data import generate_demo_datasets
from gateway.dimse.demo_pacs import DemoPacs
from tests.support.server import running_gateway

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
                                  "accept": request.headers.get("accept")})

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
def base_url(demo_datasets: dict[str, Any], ohif_dist: Path) -> Iterator[str]:
    """http://127.0.0.1:PORT serving OHIF at / and the gateway at /dicom-web (demo PACS behind)."""
    with DemoPacs(demo_datasets.values(), ae_title="DEMOPACS") as pacs:
        settings = demo_settings(pacs.port, "127.0.0.1", 0)
        with running_gateway(settings, ohif_dir=ohif_dist) as url:
            yield url


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


@pytest.fixture()
def ohif(browser: Any, base_url: str, request: pytest.FixtureRequest) -> Iterator[OhifPage]:
    """A fresh browser context (empty localStorage: the first-visit state) on the OHIF origin."""
    context = browser.new_context(viewport={"width": 1400, "height": 900}, device_scale_factor=1)
    context.set_default_timeout(60_000)
    page = context.new_page()
    recorder = Recorder()
    recorder.attach(page)
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", request.node.name)
    handle = OhifPage(page, recorder, base_url, name)
    try:
        yield handle
    finally:
        try:
            handle.screenshot("final")
        except Exception:  # the page may already be gone
            pass
        context.close()
