"""OHIF's viewer-facing configuration variants, against a gateway that logs every exchange.

``test_ohif.py`` drives the default ``dicomweb`` data source (``gateway.ohif.data_source``); here
each test serves a variant of it as ``/app-config.js`` (``app_config_js(root, **overrides)``) and
checks, for the CT study (and the multi-frame one where cheap), that images render (the same
pydicom comparison as ``test_ohif.py``), that the requests have the shape the variant implies *as
the gateway saw them* (:class:`tests.e2e.conftest.ServerLog`), and that no DICOMweb request failed
and no console error was logged:

- ``enableStudyLazyLoad: false``: one ``/studies/{study}/metadata`` instead of per-series metadata;
- ``omitQuotationForMultipartRequest: false``: frames asked with the quoted
  ``multipart/related; type="application/octet-stream"; transfer-syntax="*"``;
- ``thumbnailRendering: 'thumbnail'`` (OHIF's default ``bulkDataRetrieve`` strategy: the
  ``/thumbnail?accept=image/jpeg`` bulk-data request), and ``'thumbnail'``/``'rendered'`` with
  ``thumbnailRequestStrategy: 'fetch'`` (``?viewport=256,256`` with ``Accept: image/jpeg``):
  answered 200 ``image/jpeg`` that looks like the pydicom rendering, and shown in the study browser;
- the viewer on another origin than the gateway (``http.cors_origins`` = that origin), without and
  with an ``Authorization`` header. OHIF 3.13's data source has no static header option (no
  ``requestOptions``): every DICOMweb request takes ``userAuthenticationService
  .getAuthorizationHeader()``, so the config's data-source ``onConfiguration`` hook installs a
  static implementation of it (what an OIDC setup does with a real token). With it, every request
  is preflighted and the preflights must reach the gateway and be answered.

All variants share one browser and one gateway (``variant_servers``); run alone with
``python -m pytest tests/e2e/test_ohif_variants.py -q -p no:cacheprovider``.
"""

from __future__ import annotations

import io
import json
import re
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any
from urllib.parse import parse_qsl, unquote

import numpy as np
import pytest
from PIL import Image

from gateway.ohif import app_config_js
from tests.e2e.conftest import OhifPage, ServerLog, VariantServers, ohif_page
from tests.e2e.test_ohif import (
    ACCESSIONS,
    CT_AXIAL_SERIES,
    CT_STUDY,
    MF_SOP,
    MF_STUDY,
    compare_with_pydicom,
    dismiss_tour,
    parse_image_id,
    pydicom_render,
    scroll_through,
    wait_for_image,
    wait_for_listed,
    wait_until,
)

pytestmark = pytest.mark.e2e

TOKEN = "Bearer e2e-variant-token"
QUOTED_ACCEPT = 'multipart/related; type="application/octet-stream"; transfer-syntax="*"'
UNQUOTED_ACCEPT = "multipart/related; type=application/octet-stream; transfer-syntax=*"
MIN_THUMBNAIL_CORRELATION = 0.95   # JPEG, downscaled: seen 0.99+

# A static userAuthenticationService implementation, installed when the data source initialises
# (window.services is set by the cornerstone extension's preRegistration, before any data source).
AUTH_JS = """
window.config.dataSources[0].configuration.onConfiguration = (configuration) => {
  window.services.userAuthenticationService.setServiceImplementation({
    getAuthorizationHeader: () => ({Authorization: %s}),
  });
  return configuration;
};
"""


# ---------------------------------------------------------------------------------------------
# helpers


@contextmanager
def variant_page(browser: Any, servers: VariantServers, name: str, *, cross_origin: bool = False,
                 authorization: str | None = None, **overrides: Any) -> Iterator[tuple[OhifPage, Exchanges]]:
    """An OHIF page whose /app-config.js is the data source with ``overrides``; the viewer is served
    by the gateway (same origin) or by the second origin. Yields the page and the gateway's log
    of this page's exchanges."""
    origin = servers.viewer if cross_origin else servers.gateway
    js = app_config_js(servers.gateway + "/dicom-web", **overrides)
    if authorization is not None:
        js += AUTH_JS % json.dumps(authorization)
    mark = servers.log.mark()
    with servers.app_config(origin, js) as config, ohif_page(browser, origin, name) as ohif:
        served = config.served
        yield ohif, Exchanges(servers.log, mark)
        assert config.served > served, "the variant /app-config.js was never requested"


class Exchanges:
    """The gateway's DICOMweb exchanges since a mark (server side)."""

    def __init__(self, log: ServerLog, mark: int) -> None:
        self.log, self.mark = log, mark

    def all(self) -> list[dict[str, Any]]:
        """Every /dicom-web exchange, after waiting for those still in flight to be answered."""
        def entries() -> list[dict[str, Any]]:
            return [e for e in self.log.since(self.mark) if e["path"].startswith("/dicom-web")]
        wait_until(lambda: all(e["status"] is not None for e in entries()), 30,
                   "every DICOMweb request the gateway received is answered")
        return entries()

    def get(self, pattern: str) -> list[dict[str, Any]]:
        """GETs whose percent-decoded path matches ``pattern`` (re.search)."""
        return [e for e in self.all() if e["method"] == "GET" and re.search(pattern, unquote(e["path"]))]

    def assert_clean(self) -> None:
        bad = [e for e in self.all() if e["status"] >= 400]
        assert not bad, "the gateway answered with an error:\n" + "\n".join(describe(e) for e in bad)


def describe(e: dict[str, Any]) -> str:
    """One exchange as the gateway saw it, for assertion messages."""
    h, rh = e["headers"], e["response_headers"]
    request = {k: h[k] for k in ("accept", "authorization", "origin", "access-control-request-method",
                                 "access-control-request-headers") if k in h}
    response = {k: v for k, v in rh.items() if k == "content-type" or k.startswith("access-control")}
    body = e["body"][:300] if e["status"] and e["status"] >= 400 else b""
    return (f"{e['method']} {e['path']}{'?' + e['query'] if e['query'] else ''} {request} -> "
            f"{e['status']} {response}{' body ' + repr(body) if body else ''}")


def open_ct(ohif: OhifPage, datasets: dict[str, Any], label: str, *, axial: bool = True) -> None:
    """Open the CT study by URL: the first image drawn, then (``axial``) the 24-slice axial series
    loaded from its thumbnail, each compared with pydicom."""
    page = ohif.page
    page.goto(ohif.base_url + "/viewer?StudyInstanceUIDs=" + CT_STUDY)
    page.wait_for_selector("canvas.cornerstone-canvas")
    state = wait_for_image(page)
    dismiss_tour(page)
    compare_with_pydicom(page, state, datasets, f"{label}-ct-first")
    if axial:
        page.locator("[data-cy='study-browser-thumbnail'][data-series='2']").dblclick()
        state = wait_for_image(page, CT_AXIAL_SERIES)
        assert len(state["imageIds"]) == 24, state["imageIds"]
        compare_with_pydicom(page, state, datasets, f"{label}-ct-axial")
    ohif.screenshot("ct")


def open_multiframe(ohif: OhifPage, datasets: dict[str, Any], label: str, *, scroll: bool = True) -> None:
    """Open the 12-frame instance, compare its first frame, (``scroll``) scroll through every frame."""
    page = ohif.page
    page.goto(ohif.base_url + "/viewer?StudyInstanceUIDs=" + MF_STUDY)
    page.wait_for_selector("canvas.cornerstone-canvas")
    state = wait_for_image(page, MF_SOP)
    dismiss_tour(page)
    frames = int(datasets[MF_SOP].NumberOfFrames)
    assert len(state["imageIds"]) == frames, state["imageIds"]
    compare_with_pydicom(page, state, datasets, f"{label}-mf-first")
    if scroll:
        assert set(scroll_through(page, frames)) == set(range(frames))
    ohif.screenshot("multiframe")


def frames_requests(exchanges: Exchanges) -> list[dict[str, Any]]:
    return exchanges.get(r"/instances/[0-9.]+/frames/\d+$")


# ---------------------------------------------------------------------------------------------
# tests


def test_study_lazy_load_off_asks_for_whole_study_metadata(browser: Any, variant_servers: VariantServers,
                                                          demo_datasets: dict[str, Any]) -> None:
    with variant_page(browser, variant_servers, "lazy-off", enableStudyLazyLoad=False) as (ohif, gw):
        open_ct(ohif, demo_datasets, "lazy-off")
        open_multiframe(ohif, demo_datasets, "lazy-off", scroll=False)
        study_metadata = gw.get(r"^/dicom-web/studies/[0-9.]+/metadata$")
        series_metadata = gw.get(r"/series/[0-9.]+/metadata$")
        assert [unquote(e["path"]) for e in study_metadata] == [
            f"/dicom-web/studies/{study}/metadata" for study in (CT_STUDY, MF_STUDY)], \
            "\n".join(describe(e) for e in study_metadata)
        assert not series_metadata, "per-series metadata with lazy load off:\n" + \
            "\n".join(describe(e) for e in series_metadata)
        assert all(e["response_headers"].get("content-type", "").startswith("application/dicom+json")
                   for e in study_metadata)
        gw.assert_clean()
        ohif.recorder.assert_clean()


def test_quoted_multipart_accept(browser: Any, variant_servers: VariantServers,
                                 demo_datasets: dict[str, Any]) -> None:
    with variant_page(browser, variant_servers, "quoted-accept",
                      omitQuotationForMultipartRequest=False) as (ohif, gw):
        open_ct(ohif, demo_datasets, "quoted")
        open_multiframe(ohif, demo_datasets, "quoted")
        frames = frames_requests(gw)
        sops = {parse_image_id(unquote(e["path"]))[0] for e in frames}
        assert MF_SOP in sops and len(sops) >= 3, sops
        assert len([e for e in frames if MF_SOP in e["path"]]) == 12
        wrong = [e for e in frames if e["headers"].get("accept") != QUOTED_ACCEPT]
        assert not wrong, f"frames not asked with {QUOTED_ACCEPT!r}:\n" + "\n".join(describe(e) for e in wrong)
        assert all(e["status"] == 200 and e["response_headers"]["content-type"].startswith("multipart/related")
                   for e in frames), "\n".join(describe(e) for e in frames)
        gw.assert_clean()
        ohif.recorder.assert_clean()


THUMBNAIL_VARIANTS: dict[str, tuple[dict[str, Any], str, dict[str, str], str | None]] = {
    # name: (data-source overrides, resource, query the gateway must see, Accept it must see)
    "thumbnail-bulkdata": ({"thumbnailRendering": "thumbnail"},
                           "thumbnail", {"accept": "image/jpeg"}, None),
    "thumbnail-fetch": ({"thumbnailRendering": "thumbnail", "thumbnailRequestStrategy": "fetch"},
                        "thumbnail", {"viewport": "256,256"}, "image/jpeg"),
    "rendered-fetch": ({"thumbnailRendering": "rendered", "thumbnailRequestStrategy": "fetch"},
                       "rendered", {"viewport": "256,256"}, "image/jpeg"),
}

THUMBNAIL_IMAGES_JS = """() => [...document.querySelectorAll("[data-cy='study-browser-thumbnail']")].map(t => {
  const img = t.querySelector('img');
  return {series: t.getAttribute('data-series'), src: img ? img.src.slice(0, 40) : null,
          width: img ? img.naturalWidth : 0, complete: img ? img.complete : false};
})"""


@pytest.mark.parametrize("variant", list(THUMBNAIL_VARIANTS))
def test_server_side_thumbnails(browser: Any, variant_servers: VariantServers,
                                demo_datasets: dict[str, Any], variant: str) -> None:
    overrides, resource, query, accept = THUMBNAIL_VARIANTS[variant]
    with variant_page(browser, variant_servers, variant, **overrides) as (ohif, gw):
        open_ct(ohif, demo_datasets, variant, axial=False)
        page = ohif.page

        def shown() -> list[dict[str, Any]] | None:
            thumbs = page.evaluate(THUMBNAIL_IMAGES_JS)
            ok = len(thumbs) == 2 and all(t["complete"] and t["width"] > 0 for t in thumbs)
            return thumbs if ok else None
        thumbs = wait_until(shown, 30, f"both CT thumbnails show an image: {page.evaluate(THUMBNAIL_IMAGES_JS)}")
        assert all(t["src"].startswith("blob:") for t in thumbs), thumbs  # the fetched JPEGs
        ohif.screenshot("thumbnails")

        requests = gw.get(rf"/{resource}$")
        assert len({e["path"] for e in requests}) == 2, "\n".join(describe(e) for e in gw.all())
        for e in requests:
            assert dict(parse_qsl(e["query"])) == query, describe(e)
            if accept:
                assert e["headers"].get("accept") == accept, describe(e)
            assert e["status"] == 200 and e["response_headers"]["content-type"] == "image/jpeg", describe(e)
            m = re.search(r"/instances/([0-9.]+)/" + resource + "$", e["path"])
            assert m, f"series-level {resource} request: {describe(e)}"
            jpeg = Image.open(io.BytesIO(e["body"]))
            assert jpeg.format == "JPEG", describe(e)
            if query.get("viewport"):
                assert max(jpeg.size) <= 256, (jpeg.size, describe(e))
            got = np.asarray(jpeg.convert("L"), dtype=np.float64)
            expected = np.asarray(Image.fromarray(pydicom_render(demo_datasets[m.group(1)], 1).astype(np.uint8))
                                  .resize(jpeg.size, Image.Resampling.BILINEAR), dtype=np.float64)
            corr = float(np.corrcoef(got.ravel(), expected.ravel())[0, 1])
            print(f"{variant}: {resource} of {m.group(1)}: {jpeg.size}, correlation {corr:.4f}")
            assert corr >= MIN_THUMBNAIL_CORRELATION, f"{describe(e)}: looks unlike pydicom (r={corr:.3f})"
        gw.assert_clean()
        ohif.recorder.assert_clean()


def _cross_origin_checks(ohif: OhifPage, gw: Exchanges, servers: VariantServers,
                         authorization: str | None) -> None:
    exchanges = gw.all()
    gets = [e for e in exchanges if e["method"] == "GET"]
    assert gets
    for e in gets:
        assert e["headers"].get("origin") == servers.viewer, describe(e)
        assert e["response_headers"].get("access-control-allow-origin") == servers.viewer, describe(e)
        assert e["headers"].get("authorization") == authorization, describe(e)
    for r in ohif.recorder.requests:  # and as the browser sent them
        assert r["authorization"] == authorization, r
    preflights = [e for e in exchanges if e["method"] == "OPTIONS"]
    print(f"cross origin, Authorization {authorization!r}: {len(gets)} GETs, {len(preflights)} preflights; "
          f"first: {describe(preflights[0]) if preflights else None}")
    if authorization is None:
        # Accept application/dicom+json and the unquoted multipart type are CORS-safelisted.
        assert not preflights, "\n".join(describe(e) for e in preflights)
        return
    assert preflights, "no preflight reached the gateway although every request carries Authorization"
    for e in preflights:
        assert e["headers"].get("origin") == servers.viewer, describe(e)
        assert "authorization" in e["headers"].get("access-control-request-headers", "").lower(), describe(e)
        allowed = e["response_headers"].get("access-control-allow-headers", "").lower()
        assert e["status"] == 200 and "authorization" in allowed, describe(e)
        assert e["response_headers"].get("access-control-allow-origin") == servers.viewer, describe(e)
    # Chromium caches a preflight per URL: the first GET of each URL follows one for that URL.
    seen: set[tuple[str, str]] = set()
    for e in exchanges:
        key = (e["path"], e["query"])
        if e["method"] == "OPTIONS":
            seen.add(key)
        elif e["method"] == "GET":
            assert key in seen, f"no preflight before {describe(e)}"


@pytest.mark.parametrize("authorization", [None, TOKEN], ids=["no-authorization", "authorization"])
def test_viewer_on_another_origin(browser: Any, variant_servers: VariantServers,
                                  demo_datasets: dict[str, Any], authorization: str | None) -> None:
    name = "cross-origin-" + ("auth" if authorization else "plain")
    with variant_page(browser, variant_servers, name, cross_origin=True,
                      authorization=authorization) as (ohif, gw):
        ohif.page.goto(ohif.base_url + "/")
        wait_for_listed(ohif.page, ACCESSIONS)
        open_ct(ohif, demo_datasets, name)
        frames = frames_requests(gw)
        assert frames, "no frames request reached the gateway"
        # OHIF's default omitQuotationForMultipartRequest: true (the other way round of test_quoted_...)
        assert all(e["headers"].get("accept") == UNQUOTED_ACCEPT for e in frames), \
            "\n".join(describe(e) for e in frames)
        _cross_origin_checks(ohif, gw, variant_servers, authorization)
        gw.assert_clean()
        ohif.recorder.assert_clean()
