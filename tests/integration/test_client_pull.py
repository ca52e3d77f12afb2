"""``gateway.client`` and ``dicomweb-gateway pull`` end to end: the demo PACS through the gateway, real
Orthanc through the gateway and Orthanc's own DICOMweb root, and the CLI as a subprocess.

Every volume is checked against the generated source instances: shape, spacing, origin, direction,
sort order and every voxel (source ``pixel_array * RescaleSlope + RescaleIntercept``).
"""

from __future__ import annotations

import copy
import io
import os
import random
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset

from gateway.client import (
    AmbiguousSeriesError,
    DicomwebError,
    InconsistentSeriesError,
    NoSeriesFoundError,
    find_series,
    load_volume,
    open_series,
    pull_series,
)
from gateway.demo_data import DEMO_STUDIES, generate_demo_datasets
from gateway.dimse.demo_pacs import DemoPacs
from gateway.settings import settings_from_dict
from tests.support.server import free_port, running_gateway

REPO = Path(__file__).resolve().parents[2]
CLI = [sys.executable, "-m", "gateway.cli"]

CT = next(s for s in DEMO_STUDIES if s["accession_number"] == "A2303140011")
AXIAL = next(s for s in CT["series"] if s["series_description"] == "Thorax 2.5mm B30f")
MR = next(s for s in DEMO_STUDIES if s["accession_number"] == "A2206210031")
MR_T2 = next(s for s in MR["series"] if s["series_description"] == "Ax T2 TSE")  # RLE Lossless
PATIENT, DATE = CT["patient_id"], CT["study_date"]


@pytest.fixture(scope="module")
def sources() -> dict[str, Dataset]:
    return {str(ds.SOPInstanceUID): ds for ds in generate_demo_datasets()}


@pytest.fixture(scope="module")
def demo_root(sources: dict[str, Dataset], tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The gateway on a demo PACS loaded in a shuffled order (C-GET sends in that order)."""
    shuffled = list(sources.values())
    random.Random(1082).shuffle(shuffled)
    with DemoPacs(shuffled, ae_title="PULLPACS") as pacs:
        settings = settings_from_dict({
            "spool": {"path": str(tmp_path_factory.mktemp("spool"))},
            "nodes": [{"name": "demo", "ae_title": "PULLPACS", "host": "127.0.0.1", "port": pacs.port,
                       "retrieve": "get"}],
        })
        with running_gateway(settings) as url:
            yield url + "/dicom-web"


@pytest.fixture(scope="module", params=["gateway-orthanc", "orthanc-dicomweb"])
def orthanc_root(request, orthanc, gateway_scp_port, tmp_path_factory) -> Iterator[str]:
    """A DICOMweb root onto the same Orthanc: the gateway (C-FIND/C-GET) or Orthanc's own plugin."""
    if request.param == "orthanc-dicomweb":
        yield orthanc.dicomweb_url
        return
    settings = settings_from_dict({
        "gateway": {"ae_title": "DICOMWEBGW", "dimse_port": gateway_scp_port, "dimse_host": "127.0.0.1"},
        "spool": {"path": str(tmp_path_factory.mktemp("spool"))},
        "nodes": [{"name": "orthanc", "ae_title": orthanc.ae_title, "host": "127.0.0.1",
                   "port": orthanc.dicom_port, "retrieve": "get",
                   "timeouts": {"connect": 3, "acse": 5, "dimse": 30, "network": 60}}],
    })
    with running_gateway(settings) as url:
        yield url + "/dicom-web"


def z_of(ds: Dataset) -> float:
    return float(ds.ImagePositionPatient[2])


def check_volume(vol, series: dict, sources: dict[str, Dataset]) -> None:
    """The volume against the source instances of ``series`` (axial, identity orientation)."""
    src = sorted((sources[uid] for uid in series["sop_instance_uids"]), key=z_of)
    first = src[0]
    assert vol.array.shape == (len(src), first.Rows, first.Columns)
    assert vol.spacing == (float(first.SliceThickness), float(first.PixelSpacing[0]),
                           float(first.PixelSpacing[1]))
    assert vol.origin == tuple(float(v) for v in first.ImagePositionPatient)
    np.testing.assert_array_equal(vol.direction, np.eye(3))
    assert [str(ds.SOPInstanceUID) for ds in vol.datasets] == [str(ds.SOPInstanceUID) for ds in src]
    zs = [z_of(ds) for ds in vol.datasets]
    assert zs == sorted(zs)
    for k, ds in enumerate(src):
        expected = ds.pixel_array.astype(np.float64) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
        np.testing.assert_array_equal(vol.array[k], expected, err_msg=f"slice {k}")
    # The affine maps voxel (i, j, k) to the centre of that pixel in LPS.
    last = src[-1]
    np.testing.assert_allclose(vol.affine @ [0, 0, len(src) - 1, 1],
                               [*(float(v) for v in last.ImagePositionPatient), 1], atol=1e-6)


# ----------------------------------------------------------------------------------- demo PACS


def test_find_series_matches_description_case_insensitively_with_wildcards(demo_root):
    exact = find_series(demo_root, patient_id=PATIENT, study_date=DATE, series_description="THORAX 2.5MM b30F")
    assert [m.series_uid for m in exact] == [AXIAL["series_uid"]]
    match = exact[0]
    assert (match.study_uid, match.num_instances, match.series_number) == (CT["study_uid"], 24, 2)
    assert match.modality == "CT" and match.study_date == DATE and match.patient_id == PATIENT
    assert [m.series_uid for m in find_series(demo_root, patient_id=PATIENT, study_date="2023-03-14",
                                              series_description="thorax*")] == [AXIAL["series_uid"]]
    both = find_series(demo_root, patient_id=PATIENT, study_date=DATE, series_description="*")
    assert [m.series_number for m in both] == [1, 2]
    assert find_series(demo_root, patient_id=PATIENT, study_date=DATE, series_description="thorax") == []
    assert find_series(demo_root, patient_id=PATIENT, study_date="20230315", series_description="*") == []
    # Without a date: both of the patient's studies, the prior first.
    dates = [m.study_date for m in find_series(demo_root, patient_id=PATIENT, study_date=None,
                                               series_description="thorax*")]
    assert dates == ["20210210", "20230314"]


def test_open_series_builds_the_volume_sorted_by_position(demo_root, sources, tmp_path):
    calls: list[tuple[int, int | None]] = []
    vol = open_series(demo_root, PATIENT, DATE, "thorax 2.5mm*", out_dir=tmp_path / "out",
                      progress=lambda n, total: calls.append((n, total)))
    check_volume(vol, AXIAL, sources)
    assert vol.array.dtype == np.int16  # HU of 16-bit CT with an integer rescale fit int16
    assert calls == [(n, 24) for n in range(25)]
    files = sorted((tmp_path / "out").glob("*.dcm"))
    assert len(files) == 24
    for path in files:  # PS3.10 files, pixel data as in the source
        ds = dcmread(path)
        assert ds.PixelData == sources[str(ds.SOPInstanceUID)].PixelData


def test_instances_arriving_out_of_order_are_sorted_along_the_normal(demo_root, sources):
    received = pull_series(demo_root, CT["study_uid"], AXIAL["series_uid"])
    arrival = [z_of(ds) for ds in received]
    assert len(arrival) == 24 and arrival != sorted(arrival), "precondition: the server's order is not z order"
    assert sorted(arrival) != [z_of(sources[uid]) for uid in AXIAL["sop_instance_uids"]], \
        "precondition: InstanceNumber order is not z order either (it runs head to feet)"
    vol = load_volume(received)
    check_volume(vol, AXIAL, sources)
    vol_reversed = load_volume(list(reversed(received)))
    np.testing.assert_array_equal(vol_reversed.array, vol.array)


def test_compressed_series_is_decoded(demo_root, sources):
    """MR T2 is stored RLE Lossless: transfer-syntax=* brings the RLE bytes, pydicom decodes them."""
    received = pull_series(demo_root, MR["study_uid"], MR_T2["series_uid"])
    assert {str(ds.file_meta.TransferSyntaxUID) for ds in received} == {"1.2.840.10008.1.2.5"}
    vol = load_volume(received)
    src = sorted((sources[uid] for uid in MR_T2["sop_instance_uids"]), key=z_of)
    assert vol.array.shape == (16, src[0].Rows, src[0].Columns)
    assert vol.spacing[0] == pytest.approx(float(src[0].SpacingBetweenSlices))
    for k, ds in enumerate(src):
        np.testing.assert_array_equal(vol.array[k], ds.pixel_array)


def test_open_series_errors_name_what_matched(demo_root):
    with pytest.raises(NoSeriesFoundError, match="PatientID='DGW0001'"):
        open_series(demo_root, PATIENT, DATE, "coronal*")
    with pytest.raises(AmbiguousSeriesError) as err:
        open_series(demo_root, PATIENT, DATE, "*")
    assert [c.series_number for c in err.value.candidates] == [1, 2]
    assert "Topogram 0.6 T20f" in str(err.value) and "24 instances" in str(err.value)
    assert "Doe" not in str(err.value)
    with pytest.raises(DicomwebError) as failed:
        pull_series(demo_root, CT["study_uid"], "1.2.3.4.5.6")
    assert failed.value.status == 404


# ------------------------------------------------------------------------------------ Orthanc


def test_orthanc_through_the_gateway_and_directly(orthanc_root, sources, tmp_path):
    matches = find_series(orthanc_root, patient_id=PATIENT, study_date=DATE, series_description="thorax*")
    assert [m.series_uid for m in matches] == [AXIAL["series_uid"]]
    assert matches[0].num_instances == 24
    vol = open_series(orthanc_root, PATIENT, DATE, "Thorax*", out_dir=tmp_path)
    check_volume(vol, AXIAL, sources)
    assert len(list(tmp_path.glob("*.dcm"))) == 24
    rle = load_volume(pull_series(orthanc_root, MR["study_uid"], MR_T2["series_uid"]))
    assert rle.array.shape == (16, 128, 128)


# ------------------------------------------------------------- streaming, fallback, truncation


def _part10(ds: Dataset) -> bytes:
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def _multipart_chunks(parts: list[bytes], boundary: str = "b0undary", close: bool = True) -> Iterator[bytes]:
    for n, part in enumerate(parts):
        yield (b"" if n == 0 else b"\r\n") + f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode()
        yield part
    if close:
        yield f"\r\n--{boundary}--\r\n".encode()


def test_pull_series_parses_while_streaming_and_falls_back_on_406(sources):
    """Instance 1 is handed over before the server has sent instance 2; a 406 to ``*`` is retried."""
    parts = [_part10(sources[uid]) for uid in AXIAL["sop_instance_uids"][:3]]
    seen: list[int] = []
    accepts: list[str] = []

    def body() -> Iterator[bytes]:
        for n, chunk in enumerate(_multipart_chunks(parts)):
            if n == 3:  # the data of part 2 (its delimiter ended part 1): part 1 must be parsed
                assert seen == [0, 1], "part 1 was not delivered before part 2 arrived"
            yield chunk

    def handler(request: httpx.Request) -> httpx.Response:
        accepts.append(request.headers["accept"])
        if "transfer-syntax" in request.headers["accept"]:
            return httpx.Response(406, text="no wildcard here")
        return httpx.Response(200, headers={"Content-Type": 'multipart/related; type="application/dicom"; '
                                                            'boundary="b0undary"'}, content=body())

    with httpx.Client(transport=httpx.MockTransport(handler)) as client:
        got = pull_series("http://pacs.invalid/dicom-web", "1.2.3", "1.2.3.4", client=client, expected=3,
                          progress=lambda n, total: seen.append(n))
    assert accepts == ['multipart/related; type="application/dicom"; transfer-syntax=*',
                       'multipart/related; type="application/dicom"']
    assert seen == [0, 1, 2, 3]
    assert [str(ds.SOPInstanceUID) for ds in got] == AXIAL["sop_instance_uids"][:3]


def test_pull_series_reports_a_cut_stream(sources, tmp_path):
    parts = [_part10(sources[uid]) for uid in AXIAL["sop_instance_uids"][:2]]

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, headers={"Content-Type": 'multipart/related; type="application/dicom"; '
                                                            'boundary=b0undary'},
                              content=b"".join(_multipart_chunks(parts, close=False)))

    with httpx.Client(transport=httpx.MockTransport(handler)) as client, \
            pytest.raises(DicomwebError, match="incomplete"):
        pull_series("http://pacs.invalid/dicom-web", "1.2.3", "1.2.3.4", client=client, out_dir=tmp_path)


# ---------------------------------------------------------------------------------------- CLI


def run_pull(args: list[str], timeout: float = 120) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.run(CLI + ["pull", *args], capture_output=True, text=True, timeout=timeout, cwd=REPO,
                          env=env)


def test_pull_cli_with_url(demo_root, sources, tmp_path):
    out = tmp_path / "thorax"
    result = run_pull(["--patient-id", PATIENT, "--study-date", "2023-03-14", "--series-description",
                       "thorax*", "--out", str(out), "--url", demo_root])
    assert result.returncode == 0, result.stderr
    files = sorted(out.glob("*.dcm"))
    assert {str(dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in files} == set(
        AXIAL["sop_instance_uids"])
    assert str(out) in result.stdout
    assert "volume: 24 x 128 x 128 (z, y, x) int16" in result.stdout
    assert "spacing 12.5 x 2.73438 x 2.73438 mm" in result.stdout
    assert "24/24 instances" in result.stderr and "[" + "#" * 30 + "]" in result.stderr


def test_pull_cli_without_url_uses_the_embedded_demo(tmp_path):
    out = tmp_path / "mr"
    result = run_pull(["--patient-id", MR["patient_id"], "--study-date", MR["study_date"],
                       "--series-description", "ax t2*", "--out", str(out)])
    assert result.returncode == 0, result.stderr
    assert "built-in demo PACS" in result.stderr
    assert len(list(out.glob("*.dcm"))) == 16
    assert "volume: 16 x 128 x 128" in result.stdout


def test_pull_cli_nothing_matched(demo_root, tmp_path):
    result = run_pull(["--patient-id", PATIENT, "--study-date", DATE, "--series-description", "sagittal*",
                       "--out", str(tmp_path / "none"), "--url", demo_root])
    assert result.returncode == 3
    assert "no series matches" in result.stderr and "sagittal*" in result.stderr
    assert not (tmp_path / "none").exists()


def test_pull_cli_several_matched_lists_candidates(demo_root, tmp_path):
    result = run_pull(["--patient-id", PATIENT, "--study-date", DATE, "--series-description", "*",
                       "--out", str(tmp_path / "many"), "--url", demo_root])
    assert result.returncode == 4
    assert "2 series match" in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("  study date 20230314")]
    assert len(lines) == 2
    assert "series 1: Topogram 0.6 T20f" in lines[0] and "1 instances" in lines[0]
    assert "series 2: Thorax 2.5mm B30f" in lines[1] and "24 instances" in lines[1]
    assert "Doe" not in result.stderr + result.stdout  # no patient names
    assert not (tmp_path / "many").exists()


def test_pull_cli_unreachable_root(tmp_path):
    result = run_pull(["--patient-id", PATIENT, "--study-date", DATE, "--series-description", "*",
                       "--url", f"http://127.0.0.1:{free_port()}/dicom-web"], timeout=60)
    assert result.returncode == 1
    assert "failed" in result.stderr and "Traceback" not in result.stderr


# --------------------------------------------------------------------- load_volume on bad input


def _axial(ds: Dataset) -> Dataset:
    return copy.deepcopy(ds)


@pytest.fixture()
def axial_slices(sources) -> list[Dataset]:
    return [_axial(sources[uid]) for uid in AXIAL["sop_instance_uids"]]


def test_load_volume_rejects_inconsistent_series(axial_slices, sources):
    other_size = list(axial_slices)
    topogram = sources[CT["series"][0]["sop_instance_uids"][0]]
    other_size[3] = _axial(topogram)
    other_size[3].SeriesInstanceUID = axial_slices[0].SeriesInstanceUID
    with pytest.raises(InconsistentSeriesError, match="orientation|image size"):
        load_volume(other_size)

    tilted = list(axial_slices)
    tilted[5] = _axial(axial_slices[5])
    tilted[5].ImageOrientationPatient = [1, 0, 0, 0, 0.9961947, -0.0871557]
    with pytest.raises(InconsistentSeriesError, match="orientation"):
        load_volume(tilted)

    with pytest.raises(InconsistentSeriesError, match="share a position"):
        load_volume([*axial_slices, _axial(axial_slices[0])])

    gap = axial_slices[:10] + axial_slices[11:]
    with pytest.raises(InconsistentSeriesError, match="spacing varies"):
        load_volume(gap)
    assert load_volume(gap, strict=False).array.shape == (23, 128, 128)

    mixed = [*axial_slices[:3], _axial(sources[MR_T2["sop_instance_uids"][0]])]
    with pytest.raises(InconsistentSeriesError, match="2 series"):
        load_volume(mixed)
    with pytest.raises(InconsistentSeriesError, match="no instances"):
        load_volume([])


def test_load_volume_without_geometry_falls_back_to_instance_number(axial_slices):
    for ds in axial_slices:
        del ds.ImagePositionPatient
    random.Random(3).shuffle(axial_slices)
    vol = load_volume(axial_slices)
    assert [int(ds.InstanceNumber) for ds in vol.datasets] == list(range(1, 25))
    assert vol.spacing[0] == float(axial_slices[0].SliceThickness) and vol.origin == (0.0, 0.0, 0.0)
