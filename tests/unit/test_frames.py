"""Tests for translators.frames and .frame_transcode (PS3.5 §8.2 and Annex A.4, PS3.18 Table 8.7.3-5)."""

from __future__ import annotations

import io
import json
import struct
import time
import warnings
from pathlib import Path

import numpy as np
import pydicom
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydicom import Dataset, dcmread
from pydicom.dataset import FileMetaDataset
from pydicom.encaps import encapsulate, encapsulate_extended, generate_frames
from pydicom.pixels.encoders.base import get_encoder
from pydicom.pixels.utils import pack_bits
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGLSLossless,
    RLELossless,
    SecondaryCaptureImageStorage,
    generate_uid,
)

from translators.frame_transcode import can_transcode, transcode_frame, transcode_part10
from translators.frames import (
    CORNERSTONE_UNDECODABLE,
    FrameError,
    FrameIndex,
    NotIndexable,
    TranscodeError,
    index_part10,
    media_type_for_transfer_syntax,
    read_frame,
    transfer_syntaxes_for_media_type,
)

PYDICOM_FILES = Path(pydicom.__file__).parent / "data" / "test_files"
PIXEL_TAGS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
needs_jpegls = pytest.mark.skipif(not get_encoder(JPEGLSLossless).is_available, reason="pyjpegls missing")
needs_j2k = pytest.mark.skipif(not get_encoder(JPEG2000Lossless).is_available, reason="openjpeg missing")


# --------------------------------------------------------------------------- helpers


def make_dataset(arr: np.ndarray, photometric: str | None = None, bits_stored: int | None = None) -> Dataset:
    """A Secondary Capture instance whose pixel data is ``arr`` (frames first if multi-frame)."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.PatientName = "Frames^Test"
    ds.PatientID = "FR-1"
    ds.Modality = "OT"
    ds.InstanceNumber = 7
    ds.ImageComments = "odd length text"
    spp3 = arr.ndim == 4 or (arr.ndim == 3 and arr.shape[-1] == 3 and photometric == "RGB")
    photometric = photometric or ("RGB" if spp3 else "MONOCHROME2")
    bits_stored = bits_stored or arr.dtype.itemsize * 8
    ds.set_pixel_data(arr, photometric, bits_stored, generate_instance_uid=False)
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    return ds


def part10(ds: Dataset, *, implicit_vr: bool | None = None) -> bytes:
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True, implicit_vr=implicit_vr)
    return buf.getvalue()


def all_frames(data: bytes) -> tuple[FrameIndex, list[bytes]]:
    fp = io.BytesIO(data)
    index = index_part10(fp)
    assert index is not None
    return index, [read_frame(fp, index, n) for n in range(1, index.number_of_frames + 1)]


def pydicom_frames(data: bytes) -> list[bytes]:
    ds = dcmread(io.BytesIO(data))
    ext = (ds.ExtendedOffsetTable, ds.ExtendedOffsetTableLengths) if "ExtendedOffsetTable" in ds else None
    return list(generate_frames(ds.PixelData, number_of_frames=int(ds.get("NumberOfFrames", 1)),
                                extended_offsets=ext))


def ramp(shape: tuple[int, ...], dtype: str, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    info = np.iinfo(dtype)
    return rng.integers(0, min(info.max, 4095), size=shape, endpoint=True).astype(dtype)


def non_pixel(ds: Dataset) -> dict[str, object]:
    return {e.keyword: e.value for e in ds if e.keyword not in PIXEL_TAGS}


def jpeg(arr: np.ndarray, **kwargs: object) -> bytes:
    image = pytest.importorskip("PIL.Image")
    buf = io.BytesIO()
    image.fromarray(arr).save(buf, format="JPEG", quality=95, **kwargs)
    return buf.getvalue()


def jpeg_dataset(frames: list[bytes], shape: tuple[int, ...], photometric: str, **encaps: object) -> bytes:
    ds = make_dataset(np.zeros((len(frames), *shape), "u1"), photometric)
    ds.PixelData = encapsulate(frames, **encaps)  # type: ignore[arg-type]
    ds["PixelData"].VR = "OB"
    ds["PixelData"].is_undefined_length = True
    ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
    ds.LossyImageCompression = "01"
    return part10(ds)


# --------------------------------------------------------------------------- native


def test_native_16bit_multiframe() -> None:
    arr = ramp((5, 6, 7), "u2")
    data = part10(make_dataset(arr, bits_stored=12))
    index, frames = all_frames(data)
    assert (index.transfer_syntax, index.encapsulated, index.number_of_frames) == (ExplicitVRLittleEndian, False, 5)
    assert (index.rows, index.columns, index.samples_per_pixel, index.bits_allocated) == (6, 7, 1, 16)
    assert data[index.pixel_offset - 12 : index.pixel_offset - 4] == b"\xe0\x7f\x10\x00OW\x00\x00"
    assert index.pixel_length == arr.nbytes
    assert frames == [arr[i].tobytes() for i in range(5)]
    pixels = dcmread(io.BytesIO(data)).pixel_array
    assert frames == [pixels[i].tobytes() for i in range(5)]


def test_native_rgb_8bit() -> None:
    arr = ramp((2, 4, 5, 3), "u1")
    index, frames = all_frames(part10(make_dataset(arr, "RGB")))
    assert (index.samples_per_pixel, index.bits_allocated, index.number_of_frames) == (3, 8, 2)
    assert frames == [arr[0].tobytes(), arr[1].tobytes()]


def test_implicit_vr_header_is_8_bytes() -> None:
    arr = ramp((3, 4, 4), "u2")
    ds = make_dataset(arr)
    ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
    data = part10(ds, implicit_vr=True)
    index, frames = all_frames(data)
    assert index.transfer_syntax == ImplicitVRLittleEndian
    assert data[index.pixel_offset - 8 : index.pixel_offset] == b"\xe0\x7f\x10\x00" + struct.pack("<L", arr.nbytes)
    assert frames == [arr[i].tobytes() for i in range(3)]


def test_odd_length_single_frame_ignores_padding() -> None:
    arr = ramp((3, 3), "u1")
    index, frames = all_frames(part10(make_dataset(arr)))
    assert index.pixel_length == 10
    assert frames == [arr.tobytes()]


@pytest.mark.parametrize("shape", [(3, 4, 4), (3, 3, 3), (4, 5, 3)])
def test_single_bit_frames(shape: tuple[int, int, int]) -> None:
    arr = (ramp(shape, "u1") & 1).astype("u1")
    ds = make_dataset(np.zeros(shape, "u1"))
    ds.BitsAllocated = ds.BitsStored = 1
    ds.HighBit = 0
    ds.PixelData = pack_bits(arr)
    ds["PixelData"].VR = "OB"
    index, frames = all_frames(part10(ds))
    assert index.bits_allocated == 1
    assert frames == [pack_bits(arr[i]) for i in range(shape[0])]


def test_float_pixel_data() -> None:
    arr = np.linspace(-1, 1, 2 * 3 * 4, dtype="<f4").reshape(2, 3, 4)
    ds = make_dataset(np.zeros((2, 3, 4), "u1"))
    del ds.PixelData, ds.BitsStored, ds.HighBit, ds.PixelRepresentation
    ds.BitsAllocated = 32
    ds.FloatPixelData = arr.tobytes()
    index, frames = all_frames(part10(ds))
    assert (index.pixel_keyword, index.bits_allocated) == ("FloatPixelData", 32)
    assert frames == [arr[0].tobytes(), arr[1].tobytes()]


def test_no_pixel_data_gives_none() -> None:
    ds = make_dataset(ramp((2, 2), "u1"))
    del ds.PixelData
    assert index_part10(io.BytesIO(part10(ds))) is None


@given(
    rows=st.integers(1, 32),
    cols=st.integers(1, 32),
    nframes=st.integers(1, 6),
    dtype=st.sampled_from(["u1", "u2"]),
    spp=st.sampled_from([1, 3]),
    seed=st.integers(0, 2**16),
)
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_native_frames_are_slices(rows: int, cols: int, nframes: int, dtype: str, spp: int, seed: int) -> None:
    shape = (nframes, rows, cols) + ((3,) if spp == 3 else ())
    arr = ramp(shape, dtype, seed)
    photometric = "RGB" if spp == 3 else "MONOCHROME2"
    ds = make_dataset(arr if nframes > 1 else arr[0], photometric)
    data = part10(ds)
    index, frames = all_frames(data)
    value = data[index.pixel_offset : index.pixel_offset + index.pixel_length]
    size = rows * cols * spp * arr.itemsize
    assert index.number_of_frames == nframes
    assert frames == [value[i * size : (i + 1) * size] for i in range(nframes)]
    assert frames == [arr[i].tobytes() for i in range(nframes)]


# --------------------------------------------------------------------------- encapsulated


def rle_instance(nframes: int = 5, **compress: object) -> tuple[np.ndarray, bytes]:
    arr = ramp((nframes, 8, 9), "u2")
    ds = make_dataset(arr, bits_stored=12)
    ds.compress(RLELossless, generate_instance_uid=False, **compress)  # type: ignore[arg-type]
    return arr, part10(ds)


def test_rle_frames_match_pydicom() -> None:
    arr, data = rle_instance()
    index, frames = all_frames(data)
    assert (index.transfer_syntax, index.encapsulated, index.number_of_frames) == (RLELossless, True, 5)
    assert all(len(spans) == 1 for spans in index.frames)
    assert frames == pydicom_frames(data)
    # pixel_length runs to the sequence delimiter
    end = index.pixel_offset + index.pixel_length
    assert data[end : end + 8] == b"\xfe\xff\xdd\xe0\x00\x00\x00\x00"


def test_extended_offset_table_takes_precedence() -> None:
    arr, data = rle_instance(encapsulate_ext=True)
    ds = dcmread(io.BytesIO(data))
    assert "ExtendedOffsetTable" in ds
    index, frames = all_frames(data)
    assert frames == pydicom_frames(data)
    # lengths shorter than the items (padding excluded) are honoured, as pydicom does
    frames_in = [b"\xff\xd8abc\xff\xd9", b"\xff\xd8defg\xff\xd9"]
    pixel, offsets, _ = encapsulate_extended(frames_in)
    ds.PixelData, ds.ExtendedOffsetTable = pixel, offsets
    ds.ExtendedOffsetTableLengths = struct.pack("<2Q", 7, 8)
    ds.NumberOfFrames = 2
    data = part10(ds)
    _, frames = all_frames(data)
    assert frames == frames_in == pydicom_frames(data)


@needs_jpegls
def test_jpeg_ls_lossless() -> None:
    arr = ramp((3, 16, 20), "u2")
    ds = make_dataset(arr, bits_stored=12)
    ds.compress(JPEGLSLossless, generate_instance_uid=False)
    data = part10(ds)
    index, frames = all_frames(data)
    assert frames == pydicom_frames(data)
    header = dcmread(io.BytesIO(data), stop_before_pixels=True)
    decoded = [transcode_frame(f, index, header, ExplicitVRLittleEndian) for f in frames]
    assert decoded == [arr[i].tobytes() for i in range(3)]


@needs_j2k
def test_jpeg_2000_lossless() -> None:
    arr = ramp((2, 32, 40, 3), "u1")
    ds = make_dataset(arr, "RGB")
    ds.compress(JPEG2000Lossless, generate_instance_uid=False)
    data = part10(ds)
    index, frames = all_frames(data)
    assert frames == pydicom_frames(data)
    assert all(f.startswith(b"\xff\x4f\xff\x51") for f in frames)
    header = dcmread(io.BytesIO(data), stop_before_pixels=True)
    assert transcode_frame(frames[1], index, header, ExplicitVRLittleEndian) == arr[1].tobytes()


@pytest.mark.parametrize(
    ("encaps", "fragments_per_frame"),
    [({}, 1), ({"fragments_per_frame": 3, "has_bot": True}, 3), ({"fragments_per_frame": 3, "has_bot": False}, 3)],
    ids=["one-fragment", "bot", "markers"],
)
def test_jpeg_baseline_fragments(encaps: dict[str, object], fragments_per_frame: int) -> None:
    arrs = [ramp((24, 32), "u1", seed) for seed in range(4)]
    codestreams = [jpeg(a) for a in arrs]
    data = jpeg_dataset(codestreams, (24, 32), "MONOCHROME2", **encaps)
    index, frames = all_frames(data)
    assert index.number_of_frames == 4
    assert all(len(spans) == fragments_per_frame for spans in index.frames)
    assert [f[: len(c)] for f, c in zip(frames, codestreams, strict=True)] == codestreams
    if encaps.get("has_bot", True):
        assert frames == pydicom_frames(data)


def test_jpeg_ybr_is_converted_to_rgb() -> None:
    rgb = ramp((2, 16, 24, 3), "u1")
    codestreams = [jpeg(a, subsampling=1) for a in rgb]  # 4:2:2
    data = jpeg_dataset(codestreams, (16, 24, 3), "YBR_FULL_422")
    index, frames = all_frames(data)
    header = dcmread(io.BytesIO(data), stop_before_pixels=True)
    expected = dcmread(io.BytesIO(data)).pixel_array  # pydicom converts to RGB too
    assert transcode_frame(frames[1], index, header, ExplicitVRLittleEndian) == expected[1].tobytes()
    out = dcmread(io.BytesIO(transcode_part10(data, ExplicitVRLittleEndian)))
    assert out.PhotometricInterpretation == "RGB"
    assert np.array_equal(out.pixel_array, expected)


def test_fragments_without_table_or_markers_are_not_indexable() -> None:
    arr = ramp((3, 8, 8), "u1")
    ds = make_dataset(arr)
    encoder = get_encoder(RLELossless)
    frames = [encoder.encode(ds, index=i) for i in range(3)]
    ds.PixelData = encapsulate(frames, fragments_per_frame=2, has_bot=False)
    ds["PixelData"].is_undefined_length = True
    ds.file_meta.TransferSyntaxUID = RLELossless
    with pytest.raises(NotIndexable, match="cannot split"):
        index_part10(io.BytesIO(part10(ds)))


@pytest.mark.parametrize(
    ("name", "nframes"), [("rtdose_rle.dcm", 15), ("examples_ybr_color.dcm", 30), ("SC_rgb_rle_2frame.dcm", 2)]
)
def test_pydicom_sample_files(name: str, nframes: int) -> None:
    path = PYDICOM_FILES / name
    if not path.exists():
        pytest.skip(f"{name} not shipped with this pydicom")
    data = path.read_bytes()
    index, frames = all_frames(data)
    assert index.number_of_frames == nframes
    assert frames == pydicom_frames(data)


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize("number", [0, 6, -1, True, "1", 2.0])
def test_bad_frame_numbers(number: object) -> None:
    _, data = rle_instance()
    fp = io.BytesIO(data)
    index = index_part10(fp)
    assert index is not None
    with pytest.raises(FrameError):
        read_frame(fp, index, number)  # type: ignore[arg-type]


def test_native_bad_frame_numbers() -> None:
    data = part10(make_dataset(ramp((5, 2, 2), "u1")))
    fp = io.BytesIO(data)
    index = index_part10(fp)
    assert index is not None
    for number in (0, 6):
        with pytest.raises(FrameError):
            read_frame(fp, index, number)


def test_truncated_and_unsupported_files() -> None:
    data = part10(make_dataset(ramp((5, 8, 8), "u2")))
    with pytest.raises(NotIndexable, match="file ends"):
        index_part10(io.BytesIO(data[:-20]))
    _, rle = rle_instance()
    with pytest.raises(NotIndexable):
        index_part10(io.BytesIO(rle[:-30]))
    with pytest.raises(NotIndexable, match="DICOM"):
        index_part10(io.BytesIO(b"not dicom at all" * 20))
    ds = make_dataset(ramp((4, 4), "u1"))
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    deflated = part10(ds)
    with pytest.raises(NotIndexable, match="deflated"):
        index_part10(io.BytesIO(deflated))
    # ...and the way out is transcode_part10
    inflated = transcode_part10(deflated, ExplicitVRLittleEndian)
    assert all_frames(inflated)[1] == [ramp((4, 4), "u1").tobytes()]


@given(cut=st.integers(0, 10_000), flips=st.lists(st.tuples(st.integers(132, 10_000), st.integers(0, 255)),
                                                    max_size=3))
@settings(max_examples=150, deadline=None)
def test_corrupt_files_raise_not_indexable(cut: int, flips: list[tuple[int, int]]) -> None:
    data = bytearray(CORRUPTIBLE)
    for pos, value in flips:
        data[pos % len(data)] = value
    data = data[: len(data) - cut % len(data)]
    fp = io.BytesIO(bytes(data))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom warns about the damaged values it reads
        try:
            index = index_part10(fp)
            for n in range(1, index.number_of_frames + 1 if index else 1):
                assert index is not None
                read_frame(fp, index, n)
        except NotIndexable:
            pass


CORRUPTIBLE = rle_instance(nframes=3)[1]


def test_big_endian_is_not_indexable() -> None:
    path = PYDICOM_FILES / "MR_small_bigendian.dcm"
    if not path.exists():
        pytest.skip("sample missing")
    with pytest.raises(NotIndexable, match="big endian"):
        index_part10(io.BytesIO(path.read_bytes()))


# --------------------------------------------------------------------------- index JSON


def test_frame_index_json_round_trip() -> None:
    for data in (rle_instance()[1], part10(make_dataset(ramp((3, 4, 4), "u2")))):
        index = index_part10(io.BytesIO(data))
        assert index is not None
        assert FrameIndex.from_json(index.to_json()) == index
        json.loads(index.to_json())


@pytest.mark.parametrize(
    "raw",
    [b"", b"[]", b'{"v": 2}', b'{"v": 1}', b"not json"],
)
def test_frame_index_json_rejects_garbage(raw: bytes) -> None:
    with pytest.raises(ValueError):
        FrameIndex.from_json(raw)


def test_frame_index_json_rejects_wrong_types() -> None:
    index = index_part10(io.BytesIO(rle_instance()[1]))
    assert index is not None
    doc = json.loads(index.to_json())
    for key, bad in (("rows", "8"), ("encapsulated", 1), ("number_of_frames", 4), ("frames", [[["a", 1]]])):
        with pytest.raises(ValueError):
            FrameIndex.from_json(json.dumps({**doc, key: bad}).encode())


# --------------------------------------------------------------------------- media types


@pytest.mark.parametrize(
    ("ts", "media_type"),
    [
        (ExplicitVRLittleEndian, "application/octet-stream"),
        (ImplicitVRLittleEndian, "application/octet-stream"),
        ("1.2.840.10008.1.2.1.98", "application/octet-stream"),
        ("1.2.840.10008.1.2.4.50", "image/jpeg"),
        ("1.2.840.10008.1.2.4.51", "image/jpeg"),
        ("1.2.840.10008.1.2.4.57", "image/jpeg"),
        ("1.2.840.10008.1.2.4.70", "image/jpeg"),
        ("1.2.840.10008.1.2.4.80", "image/jls"),
        ("1.2.840.10008.1.2.4.81", "image/jls"),
        ("1.2.840.10008.1.2.4.90", "image/jp2"),
        ("1.2.840.10008.1.2.4.91", "image/jp2"),
        ("1.2.840.10008.1.2.4.92", "image/jpx"),
        ("1.2.840.10008.1.2.4.93", "image/jpx"),
        ("1.2.840.10008.1.2.5", "image/dicom-rle"),
        ("1.2.840.10008.1.2.4.201", "image/jphc"),
        ("1.2.840.10008.1.2.4.203", "image/jphc"),
        ("1.2.840.10008.1.2.4.100", "video/mpeg"),
        ("1.2.840.10008.1.2.4.102", "video/mp4"),
        ("1.2.840.10008.1.2.4.107", "video/H265"),
        ("1.2.3.4", "application/octet-stream"),
    ],
)
def test_media_type_for_transfer_syntax(ts: str, media_type: str) -> None:
    assert media_type_for_transfer_syntax(ts) == media_type


def test_transfer_syntaxes_for_media_type() -> None:
    assert transfer_syntaxes_for_media_type("application/octet-stream") == [ExplicitVRLittleEndian]
    assert transfer_syntaxes_for_media_type("image/jpeg")[0] == "1.2.840.10008.1.2.4.70"
    assert transfer_syntaxes_for_media_type('IMAGE/JLS; transfer-syntax="1.2.840.10008.1.2.4.81"') == [
        "1.2.840.10008.1.2.4.80",
        "1.2.840.10008.1.2.4.81",
    ]
    assert transfer_syntaxes_for_media_type("image/x-dicom-rle") == [RLELossless]
    assert transfer_syntaxes_for_media_type("video/h265") == ["1.2.840.10008.1.2.4.107", "1.2.840.10008.1.2.4.108"]
    assert transfer_syntaxes_for_media_type("image/png") == []
    for media_type in ("image/jpeg", "image/jls", "image/jp2", "image/jpx", "image/dicom-rle", "image/jphc"):
        for ts in transfer_syntaxes_for_media_type(media_type):
            assert media_type_for_transfer_syntax(ts) == media_type


def test_cornerstone_undecodable() -> None:
    assert {"1.2.840.10008.1.2.4.92", "1.2.840.10008.1.2.4.93", "1.2.840.10008.1.2.4.102"} <= CORNERSTONE_UNDECODABLE
    assert not {ExplicitVRLittleEndian, RLELossless, JPEGBaseline8Bit, JPEG2000Lossless} & CORNERSTONE_UNDECODABLE


# --------------------------------------------------------------------------- transcoding


def test_can_transcode() -> None:
    assert can_transcode(RLELossless, ExplicitVRLittleEndian)
    assert can_transcode(ExplicitVRLittleEndian, RLELossless)
    assert can_transcode(JPEGBaseline8Bit, JPEGBaseline8Bit)
    assert can_transcode("1.2.840.10008.1.2.4.92", "1.2.840.10008.1.2.4.92")
    assert can_transcode(DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian)
    assert not can_transcode(ExplicitVRLittleEndian, JPEGBaseline8Bit)  # lossy target
    assert not can_transcode("1.2.840.10008.1.2.4.92", ExplicitVRLittleEndian)  # no decoder
    assert not can_transcode("1.2.840.10008.1.2.4.102", ExplicitVRLittleEndian)  # video
    assert not can_transcode(ExplicitVRLittleEndian, "1.2.840.10008.1.2.2")  # big endian
    assert not can_transcode("1.2.3.4", ExplicitVRLittleEndian)
    assert not can_transcode("1.2.840.10008.1.2.2", ExplicitVRLittleEndian)
    assert not can_transcode("1.2.840.10008.1.2.1.98", ExplicitVRLittleEndian)


def test_float_pixel_data_is_not_compressed() -> None:
    ds = make_dataset(np.zeros((3, 4), "u1"))
    del ds.PixelData, ds.BitsStored, ds.HighBit, ds.PixelRepresentation
    ds.BitsAllocated = 32
    ds.FloatPixelData = np.ones((3, 4), "<f4").tobytes()
    with pytest.raises(TranscodeError, match="float"):
        transcode_part10(part10(ds), RLELossless)
    out = dcmread(io.BytesIO(transcode_part10(part10(ds), ImplicitVRLittleEndian)))
    assert out.FloatPixelData == ds.FloatPixelData


def test_rle_frames_to_native_and_back() -> None:
    arr, data = rle_instance()
    index, frames = all_frames(data)
    header = dcmread(io.BytesIO(data), stop_before_pixels=True)
    native = [transcode_frame(f, index, header, ExplicitVRLittleEndian) for f in frames]
    assert native == [arr[i].tobytes() for i in range(5)]
    assert transcode_frame(frames[0], index, header, RLELossless) is frames[0]

    native_data = part10(make_dataset(arr, bits_stored=12))
    native_index, native_frames = all_frames(native_data)
    native_header = dcmread(io.BytesIO(native_data), stop_before_pixels=True)
    rle = [transcode_frame(f, native_index, native_header, RLELossless) for f in native_frames]
    assert rle == frames  # pydicom's RLE encoder is deterministic
    assert transcode_frame(native_frames[2], native_index, native_header, ImplicitVRLittleEndian) == native[2]


def test_transcode_frame_refusals() -> None:
    data = part10(make_dataset(ramp((2, 8, 8), "u1")))
    index, frames = all_frames(data)
    header = dcmread(io.BytesIO(data), stop_before_pixels=True)
    with pytest.raises(TranscodeError, match="cannot transcode"):
        transcode_frame(frames[0], index, header, JPEGBaseline8Bit)
    if can_transcode(ExplicitVRLittleEndian, JPEG2000Lossless):
        with pytest.raises(TranscodeError, match="encoding"):  # openjpeg needs >= 32x32
            transcode_frame(frames[0], index, header, JPEG2000Lossless)
    with pytest.raises(TranscodeError, match="decoding"):
        _, rle = rle_instance()
        rle_index, rle_frames = all_frames(rle)
        transcode_frame(b"\x00" * 64, rle_index, header, ExplicitVRLittleEndian)


def test_transcode_part10_rle_round_trip_keeps_everything() -> None:
    arr, rle = rle_instance()
    original = dcmread(io.BytesIO(rle))
    native = transcode_part10(rle, ExplicitVRLittleEndian)
    ds = dcmread(io.BytesIO(native))
    assert ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert ds.SOPInstanceUID == original.SOPInstanceUID == ds.file_meta.MediaStorageSOPInstanceUID
    assert non_pixel(ds) == non_pixel(original)
    assert np.array_equal(ds.pixel_array, arr)
    assert all_frames(native)[1] == [arr[i].tobytes() for i in range(5)]

    back = dcmread(io.BytesIO(transcode_part10(native, RLELossless)))
    assert back.file_meta.TransferSyntaxUID == RLELossless
    assert back.SOPInstanceUID == original.SOPInstanceUID
    assert non_pixel(back) == non_pixel(original)
    assert np.array_equal(back.pixel_array, arr)


@pytest.mark.parametrize("target", [JPEGLSLossless, JPEG2000Lossless, ImplicitVRLittleEndian])
def test_transcode_part10_other_targets(target: str) -> None:
    if not can_transcode(RLELossless, target):
        pytest.skip(f"no encoder for {target}")
    arr, rle = rle_instance(nframes=2)
    arr = np.repeat(np.repeat(arr, 4, axis=1), 4, axis=2)  # 32x36: large enough for openjpeg
    ds = make_dataset(arr, bits_stored=12)
    ds.compress(RLELossless, generate_instance_uid=False)
    rle = part10(ds)
    out = dcmread(io.BytesIO(transcode_part10(rle, target)))
    assert out.file_meta.TransferSyntaxUID == target
    assert out.SOPInstanceUID == ds.SOPInstanceUID
    assert np.array_equal(out.pixel_array, arr)


def test_transcode_part10_identity_and_refusal() -> None:
    _, rle = rle_instance()
    assert transcode_part10(rle, RLELossless) is rle
    with pytest.raises(TranscodeError, match="cannot transcode"):
        transcode_part10(rle, JPEGBaseline8Bit)
    with pytest.raises(TranscodeError, match="reading"):
        transcode_part10(b"junk", ExplicitVRLittleEndian)


def test_transcode_part10_without_pixel_data() -> None:
    ds = make_dataset(ramp((2, 2), "u1"))
    del ds.PixelData
    ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
    data = part10(ds, implicit_vr=True)
    out = dcmread(io.BytesIO(transcode_part10(data, ExplicitVRLittleEndian)))
    assert out.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert non_pixel(out) == non_pixel(ds)


def test_index_100_frames_is_fast() -> None:
    arr = ramp((100, 64, 64), "u2")
    ds = make_dataset(arr, bits_stored=12)
    native = part10(ds)
    ds.compress(RLELossless, generate_instance_uid=False)
    rle = part10(ds)
    for data in (native, rle):
        start = time.perf_counter()
        index = index_part10(io.BytesIO(data))
        elapsed = time.perf_counter() - start
        assert index is not None and index.number_of_frames == 100
        assert elapsed < 0.5, elapsed
    assert index is not None and UID(index.transfer_syntax) == RLELossless
