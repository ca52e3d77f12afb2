"""A real OHIF viewer (npm @ohif/app 3.13.x, prebuilt) in headless Debian Chromium, served on the
gateway's origin (``create_app(..., ohif_dir=...)``) in front of the demo PACS.

Run alone: ``python -m pytest tests/e2e -q -p no:cacheprovider`` (after
``scripts/install-e2e-deps.sh``). Screenshots land in ``artifacts/e2e/``.

Image checks judge the pixels of ``canvas.cornerstone-canvas`` (not a page screenshot with
overlays): ``window.cornerstone`` says which imageId the viewport shows and where the image's pixel
centres fall on the canvas; the canvas is sampled there and compared with a pydicom rendering of
the same frame with the dataset's default VOI (WindowCenter/WindowWidth, DICOM linear function,
after the modality LUT). Tolerance: mean absolute difference <= ``MAX_MEAN_ABS_DIFF`` grey levels
(of 255) and Pearson correlation >= ``MIN_CORRELATION``, and the shown frame must be the closest
match among all frames of its series (neighbouring phantom slices differ by only 2-4 grey levels);
a blank canvas (grey-level spread < 20) fails outright.
"""

from __future__ import annotations

import base64
import io
import re
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import unquote

import numpy as np
import pytest
from PIL import Image

from gateway.demo_data import UID_ROOT

pytestmark = pytest.mark.e2e

MAX_MEAN_ABS_DIFF = 2.0   # seen: 0.4-0.9 (SwiftShader WebGL, linear interpolation)
MIN_CORRELATION = 0.99    # seen: 0.997-0.99997

ACCESSIONS = {  # the 8 demo studies
    "A2303140011", "A2102100007", "A2206210031", "A1911080004",
    "A2401150102", "A2009020019", "A2405270008", "A2310050055",
}
CT_STUDY = UID_ROOT + "1.1"            # CT CHEST W/O CONTRAST: topogram (1) + axial CT (24)
CT_AXIAL_SERIES = UID_ROOT + "2.1.2"
MF_STUDY = UID_ROOT + "1.7"            # OT, one instance of 12 frames
MF_SOP = UID_ROOT + "3.7.1.1"

QIDO_INCLUDE = "includefield=00081030,00080060,00080090,00100030"  # percent-decoded


# ---------------------------------------------------------------------------------------------
# helpers


def wait_until(predicate: Callable[[], Any], timeout: float = 30.0, message: str = "") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s: {message}")
        time.sleep(0.1)


def listed_accessions(page: Any) -> set[str]:
    cells = page.locator("td").filter(has_text=re.compile(r"^A\d{10}$"))
    return {t.strip() for t in cells.all_inner_texts()}


def wait_for_listed(page: Any, expected: set[str]) -> None:
    try:
        wait_until(lambda: listed_accessions(page) == expected, 30,
                   f"study list shows {sorted(expected)}")
    except AssertionError:
        raise AssertionError(f"study list shows {sorted(listed_accessions(page))}, "
                             f"expected {sorted(expected)}") from None


def qido_study_urls(recorder: Any) -> list[str]:
    """Study-level QIDO URLs the page requested, percent-decoded."""
    return [unquote(r["url"]) for r in recorder.requests if re.search(r"/dicom-web/studies\?", r["url"])]


def answered_accessions(response: Any) -> set[str]:
    """AccessionNumbers of a QIDO study response."""
    assert response.status == 200, f"{response.status} {response.url}"
    return {study["00080050"]["Value"][0] for study in response.json()}


def dismiss_tour(page: Any) -> bool:
    """Close OHIF's onboarding tour (shepherd.js) if it is showing; True when one was showing."""
    if page.locator(".shepherd-element").count() == 0:
        return False
    cancel = page.locator(".shepherd-cancel-icon")
    if cancel.count():
        cancel.first.click()
    else:
        page.keyboard.press("Escape")
    wait_until(lambda: page.locator(".shepherd-element").count() == 0, 10, "the tour closes")
    return True


VIEWPORT_STATE_JS = """() => {
  const cs = window.cornerstone;
  if (!cs || !cs.getRenderingEngines) return null;
  const engine = cs.getRenderingEngines().find(e => e.id === 'OHIFCornerstoneRenderingEngine');
  if (!engine) return null;
  const vp = engine.getViewports().find(v => v.getImageIds && v.getImageIds().length);
  if (!vp) return null;
  const image = vp.getCornerstoneImage ? vp.getCornerstoneImage() : vp.csImage;
  return {
    id: vp.id, imageIds: vp.getImageIds(), index: vp.getCurrentImageIdIndex(),
    current: vp.getCurrentImageId(), shown: image ? image.imageId : null,
    voi: vp.getProperties().voiRange, invert: !!vp.getProperties().invert,
  };
}"""

# Canvas PNG plus the canvas position of the image's pixel centres (0,0), (cols-1,0), (0,rows-1).
CANVAS_JS = """(viewportId) => {
  const cs = window.cornerstone;
  const engine = cs.getRenderingEngines().find(e => e.id === 'OHIFCornerstoneRenderingEngine');
  const vp = engine.getViewport(viewportId);
  const canvas = vp.element.querySelector('canvas.cornerstone-canvas');
  const {imageData, dimensions} = vp.getImageData();
  const at = (i, j) => vp.worldToCanvas(imageData.indexToWorld([i, j, 0]));
  const cols = dimensions[0], rows = dimensions[1];
  return {
    png: canvas.toDataURL('image/png'), width: canvas.width, height: canvas.height,
    cssWidth: canvas.clientWidth, cssHeight: canvas.clientHeight, cols, rows,
    p00: at(0, 0), p10: at(cols - 1, 0), p01: at(0, rows - 1),
  };
}"""


def viewport_state(page: Any) -> dict[str, Any] | None:
    state: dict[str, Any] | None = page.evaluate(VIEWPORT_STATE_JS)
    return state


def wait_for_image(page: Any, image_id_part: str | None = None, timeout: float = 60.0) -> dict[str, Any]:
    """Wait until a viewport has drawn an image (whose imageId contains ``image_id_part``)."""
    def ready() -> dict[str, Any] | None:
        s = viewport_state(page)
        if not s or not s["shown"] or s["shown"] != s["current"]:
            return None
        if image_id_part and image_id_part not in s["shown"]:
            return None
        return s
    state: dict[str, Any] = wait_until(ready, timeout, f"viewport shows an image {image_id_part or ''}")
    page.wait_for_timeout(300)  # let the render loop draw the frame into the canvas
    return state


def parse_image_id(image_id: str) -> tuple[str, int]:
    m = re.search(r"/instances/([0-9.]+)/frames/(\d+)$", image_id)
    assert m, f"unexpected imageId {image_id}"
    return m.group(1), int(m.group(2))


def pydicom_render(ds: Any, frame: int) -> np.ndarray:
    """8-bit rendering of ``frame`` (1-based) with the dataset's default VOI (DICOM linear)."""
    pixels = ds.pixel_array
    if int(ds.get("NumberOfFrames", 1) or 1) > 1:
        pixels = pixels[frame - 1]
    values = pixels.astype(np.float64) * float(ds.get("RescaleSlope", 1) or 1) \
        + float(ds.get("RescaleIntercept", 0) or 0)
    center, width = float(ds.WindowCenter), float(ds.WindowWidth)
    out = ((values - (center - 0.5)) / (width - 1) + 0.5).clip(0.0, 1.0) * 255.0
    if ds.PhotometricInterpretation == "MONOCHROME1":
        out = 255.0 - out
    return out


def canvas_samples(page: Any, viewport_id: str) -> tuple[np.ndarray, np.ndarray]:
    """(grey canvas, canvas sampled at each image pixel centre -> rows x cols)."""
    info = page.evaluate(CANVAS_JS, viewport_id)
    png = base64.b64decode(info["png"].split(",", 1)[1])
    rgb = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), dtype=np.float64)
    grey = rgb.mean(axis=2)
    sx = info["width"] / info["cssWidth"]   # worldToCanvas answers CSS pixels
    sy = info["height"] / info["cssHeight"]
    p00, p10, p01 = (np.array(info[k], dtype=np.float64) for k in ("p00", "p10", "p01"))
    cols, rows = info["cols"], info["rows"]
    j, i = np.mgrid[0:rows, 0:cols].astype(np.float64)
    pos = p00 + i[..., None] * (p10 - p00) / (cols - 1) + j[..., None] * (p01 - p00) / (rows - 1)
    x = np.clip(np.rint(pos[..., 0] * sx - 0.5).astype(int), 0, grey.shape[1] - 1)
    y = np.clip(np.rint(pos[..., 1] * sy - 0.5).astype(int), 0, grey.shape[0] - 1)
    return grey, grey[y, x]


def series_renderings(ds: Any, datasets: dict[str, Any]) -> dict[tuple[str, int], np.ndarray]:
    """pydicom renderings of every frame of every instance in ``ds``'s series."""
    out = {}
    for other in datasets.values():
        if other.SeriesInstanceUID == ds.SeriesInstanceUID and "PixelData" in other:
            for frame in range(1, int(other.get("NumberOfFrames", 1) or 1) + 1):
                out[(str(other.SOPInstanceUID), frame)] = pydicom_render(other, frame)
    return out


def compare_with_pydicom(page: Any, state: dict[str, Any], datasets: dict[str, Any],
                         label: str) -> dict[str, float]:
    """Judge the viewport canvas against pydicom; see the module docstring for the tolerance."""
    sop, frame = parse_image_id(state["shown"])
    ds = datasets[sop]
    # The viewport uses the dataset's default VOI (cornerstone: centre - 0.5 -/+ (width - 1) / 2).
    c, w = float(ds.WindowCenter), float(ds.WindowWidth)
    expected_voi = (c - 0.5 - (w - 1) / 2, c - 0.5 + (w - 1) / 2)
    voi = state["voi"]
    assert voi and abs(voi["lower"] - expected_voi[0]) <= 1 and abs(voi["upper"] - expected_voi[1]) <= 1, \
        f"{label}: viewport VOI {voi} is not the default VOI {expected_voi} (WC {c} WW {w})"
    grey, shown = canvas_samples(page, state["id"])
    Image.fromarray(grey.astype(np.uint8)).save(_artifact(f"canvas-{label}.png"))
    expected = pydicom_render(ds, frame)
    assert shown.shape == expected.shape
    Image.fromarray(np.hstack([shown, expected]).astype(np.uint8)).save(
        _artifact(f"compare-{label}.png"))
    assert grey.max() - grey.min() >= 20, f"{label}: the canvas is blank ({grey.min()}..{grey.max()})"
    assert shown.std() > 5, f"{label}: the image area of the canvas is flat (std {shown.std():.2f})"
    mad = float(np.abs(shown - expected).mean())
    corr = float(np.corrcoef(shown.ravel(), expected.ravel())[0, 1])
    print(f"{label}: {sop} frame {frame}: mean |diff| {mad:.2f}, correlation {corr:.5f}")
    assert mad <= MAX_MEAN_ABS_DIFF and corr >= MIN_CORRELATION, (
        f"{label} ({sop} frame {frame}): canvas differs from the pydicom rendering: mean |diff| "
        f"{mad:.2f} (max {MAX_MEAN_ABS_DIFF}), correlation {corr:.4f} (min {MIN_CORRELATION})")
    # Neighbouring slices of a phantom look alike: the shown frame must also be the closest match.
    others = {key: float(np.abs(shown - img).mean()) for key, img in series_renderings(ds, datasets).items()}
    best = min(others, key=lambda k: others[k])
    assert best == (sop, frame), (f"{label}: the canvas looks most like {best} (mean |diff| "
                                  f"{others[best]:.2f}), not the imageId's {(sop, frame)} ({mad:.2f})")
    return {"mad": mad, "corr": corr}


def _artifact(name: str) -> str:
    from tests.e2e.conftest import ARTIFACTS
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    return str(ARTIFACTS / name)


def scroll_to(page: Any, target: int) -> list[int]:
    """Wheel over the viewport, one notch at a time, until image ``target`` shows; returns the
    viewport indices seen (starting with the current one)."""
    canvas = page.locator("canvas.cornerstone-canvas").first
    box = canvas.bounding_box()
    page.mouse.move(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
    seen = [viewport_state(page)["index"]]
    while seen[-1] != target:
        before = seen[-1]
        page.mouse.wheel(0, 120 if target > before else -120)

        def moved(b: int = before) -> dict[str, Any] | None:
            s = viewport_state(page)
            return s if s and s["index"] != b and s["shown"] == s["current"] else None
        seen.append(wait_until(moved, 30, f"the viewport leaves image {before} after a wheel notch")["index"])
    page.wait_for_timeout(300)  # let the render loop draw the frame into the canvas
    return seen


def scroll_through(page: Any, count: int) -> list[int]:
    """Wheel down to the last image of the stack, then back up to the first."""
    seen = scroll_to(page, count - 1)
    return seen + scroll_to(page, 0)[1:]


# ---------------------------------------------------------------------------------------------
# tests


def test_app_config_points_at_the_same_origin(ohif: Any) -> None:
    text = ohif.page.request.get(ohif.base_url + "/app-config.js").text()
    assert f'"qidoRoot": "{ohif.base_url}/dicom-web"' in text
    assert f'"wadoRoot": "{ohif.base_url}/dicom-web"' in text
    spa = ohif.page.request.get(ohif.base_url + "/viewer?StudyInstanceUIDs=" + CT_STUDY)
    assert spa.status == 200 and "<html" in spa.text()[:200].lower()


def test_static_serving_and_spa_fallback(tmp_path: Any, demo_datasets: dict[str, Any]) -> None:
    """No browser: /app-config.js is generated, dist files are served, unknown extension-less paths
    fall back to index.html, missing assets stay 404 and /dicom-web is not shadowed."""
    import httpx

    from gateway.cli import demo_settings
    from gateway.dimse.demo_pacs import DemoPacs
    from tests.support.server import running_gateway

    dist = tmp_path / "dist"
    (dist / "assets").mkdir(parents=True)
    (dist / "index.html").write_text("<!doctype html><html><body>ohif</body></html>")
    (dist / "app-config.js").write_text("window.config = {stale: true};")
    (dist / "assets" / "x.wasm").write_bytes(b"\0asm")
    with DemoPacs(list(demo_datasets.values())[:2], ae_title="DEMOPACS") as pacs, \
            running_gateway(demo_settings(pacs.port, "127.0.0.1", 0), ohif_dir=dist) as url, \
            httpx.Client(base_url=url, timeout=30) as client:
        config = client.get("/app-config.js")
        assert config.status_code == 200 and "stale" not in config.text
        assert f'"qidoRoot": "{url}/dicom-web"' in config.text
        assert '"ohif.tours"' in config.text and '"showStudyList": true' in config.text
        for path in ("/", "/viewer?StudyInstanceUIDs=1.2.3", "/local", "/viewer/dicomweb"):
            r = client.get(path)
            assert r.status_code == 200 and "ohif" in r.text, path
            assert r.headers["content-type"].startswith("text/html"), path
        wasm = client.get("/assets/x.wasm")
        assert wasm.status_code == 200 and wasm.headers["content-type"] == "application/wasm"
        assert client.get("/missing.js").status_code == 404
        studies = client.get("/dicom-web/studies", headers={"Accept": "application/dicom+json"})
        assert studies.status_code == 200 and studies.headers["content-type"].startswith("application/dicom+json")
        assert client.get("/dicom-web/no-such-resource").status_code == 404  # not index.html


def test_study_list_shows_the_demo_studies(ohif: Any) -> None:
    page = ohif.page
    page.goto(ohif.base_url + "/")
    wait_for_listed(page, ACCESSIONS)
    urls = qido_study_urls(ohif.recorder)
    assert urls and "limit=101" in urls[0] and QIDO_INCLUDE in urls[0], urls
    assert page.get_by_text("1-8 of 8").count() == 1
    ohif.screenshot("study-list")
    ohif.recorder.assert_clean()


def test_filter_by_patient_name(ohif: Any) -> None:
    page = ohif.page
    page.goto(ohif.base_url + "/")
    wait_for_listed(page, ACCESSIONS)
    expected = {"A2303140011", "A2102100007", "A2206210031"}
    # Doe^John (2 studies) and DOE^JANE: OHIF asks PatientName=*doe*, the gateway answers the three
    # (PN matching is case-insensitive), and the list shows them.
    with page.expect_response(lambda r: "PatientName=*doe*" in unquote(r.url)) as answer:
        page.locator("tr[data-filter-row] td").nth(0).locator("input").fill("doe")
    assert answered_accessions(answer.value) == expected
    wait_for_listed(page, expected)
    ohif.screenshot("filter-doe")
    page.get_by_role("button", name="Reset filters").click()
    wait_for_listed(page, ACCESSIONS)
    ohif.recorder.assert_clean()


def test_filter_by_modality(ohif: Any) -> None:
    page = ohif.page
    page.goto(ohif.base_url + "/")
    wait_for_listed(page, ACCESSIONS)
    combo = page.locator("input[aria-label='Filter Modalities']")
    # MR: the brain study; PT: the PET/CT study (ModalitiesInStudy CT\PT).
    for modality, expected in (("MR", {"A2206210031"}), ("PT", {"A2009020019"})):
        combo.click()
        page.keyboard.type(modality)
        with page.expect_response(lambda r, m=modality: f"ModalitiesInStudy={m}" in unquote(r.url)) as answer:
            page.locator(f"[cmdk-item][data-value='{modality}']").click()
        assert answered_accessions(answer.value) == expected
        wait_for_listed(page, expected)
        ohif.screenshot(f"filter-{modality.lower()}")
        page.get_by_role("button", name="Reset filters").click()
        wait_for_listed(page, ACCESSIONS)
    ohif.recorder.assert_clean()


def test_ct_study_renders_and_scrolls_through_every_frame(ohif: Any, demo_datasets: dict[str, Any]) -> None:
    page = ohif.page
    page.goto(ohif.base_url + "/")
    wait_for_listed(page, ACCESSIONS)
    # The user's path: select the study row, launch the basic viewer.
    page.get_by_text("A2303140011", exact=True).click()
    page.get_by_role("button", name="Basic Viewer").click()
    page.wait_for_url(re.compile(r"/viewer\?StudyInstanceUIDs=" + re.escape(CT_STUDY)))
    page.wait_for_selector("canvas.cornerstone-canvas")
    state = wait_for_image(page)
    ohif.screenshot("ct-opened")
    assert not dismiss_tour(page), "the onboarding tour showed although app-config disables it"

    # Whatever the hanging protocol put first (the topogram in OHIF 3.13) is drawn correctly.
    first = compare_with_pydicom(page, state, demo_datasets, "ct-first")

    # Load the 24-slice axial series into the viewport (double-click its thumbnail).
    page.locator("[data-cy='study-browser-thumbnail'][data-series='2']").dblclick()
    state = wait_for_image(page, CT_AXIAL_SERIES)
    assert len(state["imageIds"]) == 24, state["imageIds"]
    axial = compare_with_pydicom(page, state, demo_datasets, "ct-axial-first-shown")
    ohif.screenshot("ct-axial")

    seen = scroll_through(page, 24)
    assert set(seen) == set(range(24)), f"viewport indices seen while scrolling: {seen}"
    compare_with_pydicom(page, viewport_state(page), demo_datasets, "ct-axial-after-scroll")
    scroll_to(page, 23)  # and the last slice, after scrolling
    compare_with_pydicom(page, viewport_state(page), demo_datasets, "ct-axial-last")
    ohif.screenshot("ct-axial-last")

    axial_sops = {str(ds.SOPInstanceUID) for ds in demo_datasets.values()
                  if ds.SeriesInstanceUID == CT_AXIAL_SERIES}
    requested = {sop for sop, frame in ohif.recorder.frame_requests() if sop in axial_sops}
    assert requested == axial_sops, f"{len(axial_sops - requested)} axial slices never requested"
    assert all(frame == 1 for sop, frame in ohif.recorder.frame_requests())
    print(f"topogram {first}, axial {axial}; frames requests: {len(ohif.recorder.frame_requests())}")
    ohif.recorder.assert_clean()


def test_multiframe_instance_displays_every_frame(ohif: Any, demo_datasets: dict[str, Any]) -> None:
    page = ohif.page
    page.goto(ohif.base_url + "/viewer?StudyInstanceUIDs=" + MF_STUDY)
    page.wait_for_selector("canvas.cornerstone-canvas")
    state = wait_for_image(page, MF_SOP)
    dismiss_tour(page)
    frames = int(demo_datasets[MF_SOP].NumberOfFrames)
    assert len(state["imageIds"]) == frames, state["imageIds"]
    assert [parse_image_id(i) for i in state["imageIds"]] == [(MF_SOP, n) for n in range(1, frames + 1)]
    compare_with_pydicom(page, state, demo_datasets, "mf-first-shown")
    ohif.screenshot("multiframe")

    seen = scroll_through(page, frames)
    assert set(seen) == set(range(frames)), seen
    scroll_to(page, frames // 2)
    compare_with_pydicom(page, viewport_state(page), demo_datasets, "mf-middle")
    ohif.screenshot("multiframe-middle")

    requested = {frame for sop, frame in ohif.recorder.frame_requests() if sop == MF_SOP}
    assert requested == set(range(1, frames + 1)), f"frames requested: {sorted(requested)}"
    ohif.recorder.assert_clean()


DISPLAY_SETS_JS = """() => {
  const grid = window.services && window.services.viewportGridService.getState();
  if (!grid) return null;
  return [...grid.viewports.values()].map(v => (v.displaySetInstanceUIDs || [])[0] || null);
}"""


def sr_texts(ds: Any) -> list[str]:
    """The TEXT content items of an SR, depth first."""
    out = []
    for item in ds.get("ContentSequence", []):
        if item.get("ValueType") == "TEXT":
            out.append(str(item.TextValue))
        out += sr_texts(item)
    return out


def expected_display_sets(series: dict[int, list[Any]]) -> int:
    """OHIF splits CR/DX/MG series into one display set per instance; other series are one each."""
    return sum(len(items) if items[0].Modality in ("CR", "DX", "MG") else 1 for items in series.values())


@pytest.mark.parametrize("study_number", range(1, 9))
def test_every_series_of_every_demo_study_displays(ohif: Any, demo_datasets: dict[str, Any],
                                                    study_number: int) -> None:
    """Open each demo study and load each of its display sets (thumbnail double-click): the image
    drawn is the pydicom rendering (RLE MR, MONOCHROME1 CR, PET, DX, Japanese names included)."""
    page = ohif.page
    study_uid = f"{UID_ROOT}1.{study_number}"
    series: dict[int, list[Any]] = {}
    for ds in demo_datasets.values():
        if ds.StudyInstanceUID == study_uid:
            series.setdefault(int(ds.SeriesNumber), []).append(ds)
    page.goto(ohif.base_url + "/viewer?StudyInstanceUIDs=" + study_uid)
    page.wait_for_selector("canvas.cornerstone-canvas")
    wait_for_image(page)
    dismiss_tour(page)
    thumbnails = page.locator("[data-cy^='study-browser-thumbnail']")
    count = expected_display_sets(series)
    wait_until(lambda: thumbnails.count() == count, 30, f"{count} thumbnails (found {thumbnails.count()})")
    shown_sops = set()
    for n in range(count):
        thumb = thumbnails.nth(n)
        number = int(thumb.get_attribute("data-series"))
        display_set = thumb.get_attribute("id").removeprefix("thumbnail-")
        thumb.dblclick()
        label = f"study{study_number}-series{number}-{n}"
        if thumb.get_attribute("data-cy") == "study-browser-thumbnail-no-image":
            sr = series[number][0]
            assert "PixelData" not in sr  # the SR: OHIF's SR viewport shows its text
            for text in sr_texts(sr):
                page.get_by_text(text, exact=False).first.wait_for()
            ohif.screenshot(label)
            continue
        wait_until(lambda d=display_set: d in (page.evaluate(DISPLAY_SETS_JS) or []), 30,
                   f"display set {display_set} (series {number}) goes into a viewport")
        state = wait_for_image(page, str(series[number][0].SeriesInstanceUID))
        compare_with_pydicom(page, state, demo_datasets, label)
        shown_sops.add(parse_image_id(state["shown"])[0])
        ohif.screenshot(label)
    for number, items in series.items():
        if "PixelData" in items[0]:
            uids = {str(ds.SOPInstanceUID) for ds in items}
            assert uids & shown_sops, f"no image of series {number} was shown"
    if study_number == 4:  # CR: both views, each its own display set
        assert len(shown_sops) == 2, shown_sops
    ohif.recorder.assert_clean()
