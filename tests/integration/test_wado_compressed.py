"""Compressed instances (JPEG baseline, JPEG lossless, JPEG-LS, JPEG 2000, RLE) through the gateway.

Made with the codecs real PACS data comes from (DCMTK's dcmcjpeg/dcmcjpls/dcmcrle, OpenJPEG via
pydicom), stored in a private Orthanc, retrieved with ``transfer-syntax=*`` (stored bytes, exact) and
with transcoding (pixels equal to the source's decoded pixels).
"""

from __future__ import annotations

import copy
import subprocess
from collections.abc import Iterator
from io import BytesIO
from pathlib import Path

import httpx
import numpy as np
import pytest
from pydicom import dcmread
from pydicom.encaps import generate_frames
from pydicom.uid import JPEG2000Lossless

from gateway.demo_data import DemoScale, generate_demo_datasets
from gateway.settings import settings_from_dict
from tests.integration.peers import OrthancPeer, dcmtk_tool
from tests.support.multipart import parse_multipart
from tests.support.server import running_gateway

ROOT = "1.2.826.0.1.3680043.10.1082.99."
EXPLICIT = "1.2.840.10008.1.2.1"
CODECS = {
    "jpeg-baseline": ("dcmcjpeg", ["+eb", "+un"], "1.2.840.10008.1.2.4.50", "image/jpeg"),
    "jpeg-lossless": ("dcmcjpeg", ["+e1"], "1.2.840.10008.1.2.4.70", "image/jpeg"),
    "jpeg-ls": ("dcmcjpls", [], "1.2.840.10008.1.2.4.80", "image/jls"),
    "rle": ("dcmcrle", [], "1.2.840.10008.1.2.5", "image/dicom-rle"),
    "j2k": (None, [], "1.2.840.10008.1.2.4.90", "image/jp2"),
}


@pytest.fixture(scope="module")
def compressed(tmp_path_factory) -> dict[str, Path]:
    """One 3-frame-free MR slice per codec, each in its own series of one study."""
    out = tmp_path_factory.mktemp("compressed")
    base = next(ds for ds in generate_demo_datasets(DemoScale(mr_slices=2, mr_size=64))
                if ds.Modality == "MR" and ds.file_meta.TransferSyntaxUID == EXPLICIT)
    files: dict[str, Path] = {}
    for n, (name, (tool, args, ts, _)) in enumerate(CODECS.items(), start=1):
        ds = copy.deepcopy(base)
        ds.StudyInstanceUID = ROOT + "1"
        ds.SeriesInstanceUID = f"{ROOT}2.{n}"
        ds.SOPInstanceUID = f"{ROOT}3.{n}"
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.SeriesNumber = n
        ds.SeriesDescription = name
        if name == "jpeg-baseline":   # baseline is 8-bit
            eight_bit = (ds.pixel_array >> 4).astype(np.uint8).tobytes()
            ds.BitsAllocated, ds.BitsStored, ds.HighBit = 8, 8, 7
            ds.PixelData = eight_bit
        native = out / f"{name}-native.dcm"
        ds.save_as(native, enforce_file_format=True)
        target = out / f"{name}.dcm"
        if tool is None:
            ds.compress(JPEG2000Lossless, generate_instance_uid=False)
            ds.save_as(target, enforce_file_format=True)
        else:
            subprocess.run([dcmtk_tool(tool), *args, str(native), str(target)], check=True)
        assert str(dcmread(target).file_meta.TransferSyntaxUID) == ts
        files[name] = target
    return files


@pytest.fixture(scope="module")
def gw(compressed, tmp_path_factory) -> Iterator[httpx.Client]:
    peer = OrthancPeer(tmp_path_factory.mktemp("orthanc-codecs"), ae_title="CODECS")
    try:
        peer.start()
        peer.load(list(compressed.values()))
        settings = settings_from_dict({"nodes": [{"name": "o", "ae_title": "CODECS", "host": "127.0.0.1",
                                                  "port": peer.dicom_port, "retrieve": "get"}]})
        with running_gateway(settings) as url, httpx.Client(base_url=url + "/dicom-web", timeout=60) as c:
            yield c
    finally:
        peer.stop()


def url(n: int) -> str:
    return f"/studies/{ROOT}1/series/{ROOT}2.{n}/instances/{ROOT}3.{n}"


@pytest.mark.parametrize("n, name", list(enumerate(CODECS, start=1)))
def test_stored_bytes_with_any_transfer_syntax(gw, compressed, n, name):
    _, _, ts, frame_type = CODECS[name]
    src = dcmread(compressed[name])
    r = gw.get(url(n), headers={"Accept": 'multipart/related; type="application/dicom"; transfer-syntax=*'})
    (headers, body), = parse_multipart(r.content, r.headers["content-type"])
    got = dcmread(BytesIO(body))
    assert headers["Content-Type"] == f"application/dicom; transfer-syntax={ts}"
    assert str(got.file_meta.TransferSyntaxUID) == ts and got.PixelData == src.PixelData
    frame = gw.get(url(n) + "/frames/1",
                   headers={"Accept": 'multipart/related; type="application/octet-stream"; transfer-syntax="*"'})
    (fh, fbody), = parse_multipart(frame.content, frame.headers["content-type"])
    assert fh["Content-Type"] == f"{frame_type}; transfer-syntax={ts}"
    assert fbody == next(generate_frames(src.PixelData, number_of_frames=1))


@pytest.mark.parametrize("n, name", list(enumerate(CODECS, start=1)))
def test_transcoded_to_explicit_vr_little_endian(gw, compressed, n, name):
    src = dcmread(compressed[name])
    lossy = name == "jpeg-baseline"
    r = gw.get(url(n), headers={"Accept": f'multipart/related; type="application/dicom"; transfer-syntax={EXPLICIT}'})
    (headers, body), = parse_multipart(r.content, r.headers["content-type"])
    got = dcmread(BytesIO(body))
    assert str(got.file_meta.TransferSyntaxUID) == EXPLICIT
    assert np.array_equal(got.pixel_array, src.pixel_array)
    assert got.SOPInstanceUID == src.SOPInstanceUID
    # Without a transfer-syntax parameter: Explicit VR LE for lossless data, stored bytes for lossy (§8.7.3).
    r = gw.get(url(n), headers={"Accept": 'multipart/related; type="application/dicom"'})
    (headers, body), = parse_multipart(r.content, r.headers["content-type"])
    expected = CODECS[name][2] if lossy else EXPLICIT
    assert headers["Content-Type"] == f"application/dicom; transfer-syntax={expected}"
    frame = gw.get(url(n) + "/frames/1", headers={"Accept": 'multipart/related; type="application/octet-stream"'})
    (fh, fbody), = parse_multipart(frame.content, frame.headers["content-type"])
    assert fh["Content-Type"] == f"application/octet-stream; transfer-syntax={EXPLICIT}"
    assert fbody == src.pixel_array.tobytes()


def test_requesting_a_specific_compressed_syntax(gw, compressed):
    src = dcmread(compressed["rle"])
    r = gw.get(url(4) + "/frames/1",
               headers={"Accept": "multipart/related; type=image/jls; transfer-syntax=1.2.840.10008.1.2.4.80"})
    (fh, fbody), = parse_multipart(r.content, r.headers["content-type"])
    assert fh["Content-Type"] == "image/jls; transfer-syntax=1.2.840.10008.1.2.4.80"
    import jpeg_ls
    from pydicom.pixels import decompress  # noqa: F401 - decode the JPEG-LS frame with the plugin
    assert np.array_equal(jpeg_ls.decode(np.frombuffer(fbody, dtype=np.uint8)).reshape(src.pixel_array.shape),
                          src.pixel_array)
