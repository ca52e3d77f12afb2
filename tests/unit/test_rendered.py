"""translators.rendered: rendering parameters, the grayscale/colour pipeline, viewport and encoders (pure).

Expected 8-bit values are computed here from the PS3.3 C.11.2.1.2.1 / C.11.2.1.3 formulas, written
out as the standard's pseudo-code, not by calling the module.
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.pixels.processing import convert_color_space
from pydicom.pixels.utils import pixel_array
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian

from translators.rendered import (
    RenderError,
    RenderParams,
    UnsupportedRendering,
    apply_window,
    parse_render_params,
    pick_thumbnail_frame,
    render_frame,
    thumbnail_params,
    to_display,
)

PNG = RenderParams(media_type="image/png")
RNG = np.random.default_rng(20240611)
RGB = RNG.integers(0, 256, size=(6, 8, 3), dtype=np.uint8)


# --- helpers ------------------------------------------------------------------------------------

def image_ds(stored: np.ndarray, photometric: str, *, frames: int = 1, **attrs: Any) -> Dataset:
    """A native Explicit VR LE image whose PixelData are `stored` (one frame, or frames stacked first)."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    shape = stored.shape[1:] if frames > 1 else stored.shape
    ds.Rows, ds.Columns = shape[0], shape[1]
    ds.SamplesPerPixel = 3 if len(shape) == 3 else 1
    ds.PhotometricInterpretation = photometric
    if ds.SamplesPerPixel == 3:
        ds.PlanarConfiguration = 0
    if frames > 1:
        ds.NumberOfFrames = frames
    bits = stored.dtype.itemsize * 8
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = bits, bits, bits - 1
    ds.PixelRepresentation = 1 if stored.dtype.kind == "i" else 0
    ds.PixelData = stored.tobytes()
    for keyword, value in attrs.items():
        setattr(ds, keyword, value)
    return ds


def item(**attrs: Any) -> Dataset:
    ds = Dataset()
    for keyword, value in attrs.items():
        setattr(ds, keyword, value)
    return ds


def decode(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as image:
        return np.asarray(image)


def render_png(ds: Dataset, pixels: np.ndarray | None = None, params: RenderParams = PNG, *,
               photometric: str | None = None, frame: int | None = None) -> np.ndarray:
    pixels = ds.pixel_array if pixels is None else pixels
    data = render_frame(ds, pixels, params, photometric=photometric, frame=frame)
    assert data.startswith(b"\x89PNG\r\n\x1a\n")
    return decode(data)


def linear(x: float, c: float, w: float) -> int:
    """PS3.3 C.11.2.1.2.1 with ymin=0, ymax=255."""
    if x <= c - 0.5 - (w - 1) / 2:
        return 0
    if x > c - 0.5 + (w - 1) / 2:
        return 255
    return round(((x - (c - 0.5)) / (w - 1) + 0.5) * 255)


def linear_exact(x: float, c: float, w: float) -> int:
    """PS3.3 C.11.2.1.3.2."""
    if x <= c - w / 2:
        return 0
    if x > c + w / 2:
        return 255
    return round(((x - c) / w + 0.5) * 255)


def sigmoid(x: float, c: float, w: float) -> int:
    """PS3.3 C.11.2.1.3.1 (Equation C.11-1)."""
    return round(255 / (1 + math.exp(-4 * (x - c) / w)))


def expected(values: np.ndarray, voi: Callable[[float], int]) -> np.ndarray:
    return np.array([[voi(float(v)) for v in row] for row in values], dtype=np.uint8)


# Hounsfield units chosen around the edges of a 40/400 window (linear: 0 up to -160, 255 from 239.5).
HU = np.array([[-1024, -160, -159, -100], [0, 40, 41, 100], [238, 239, 240, 3071]], dtype=np.int16)


def ct(**attrs: Any) -> Dataset:
    return image_ds(HU + 1024, "MONOCHROME2", RescaleIntercept=-1024, RescaleSlope=1, **attrs)


# --- grayscale ----------------------------------------------------------------------------------

def test_ct_signed_with_rescale_and_dataset_window() -> None:
    ds = image_ds((HU + 1024 - 2048).astype(np.int16), "MONOCHROME2", RescaleIntercept=1024,
                  RescaleSlope=1, WindowCenter=40, WindowWidth=400)
    assert ds.pixel_array.dtype == np.int16 and ds.pixel_array.min() < 0
    assert (render_png(ds) == expected(HU, lambda x: linear(x, 40, 400))).all()


@pytest.mark.parametrize("dtype", [np.int32, np.float32, np.float64])
def test_wide_and_float_frames_render_like_sixteen_bit_ones(dtype: Any) -> None:
    ds = ct(WindowCenter=40, WindowWidth=400)
    assert (render_png(ds, (HU + 1024).astype(dtype)) == render_png(ds)).all()
    without_window = ct()
    assert (render_png(without_window, (HU + 1024).astype(dtype)) == render_png(without_window)).all()


@pytest.mark.parametrize(("dtype", "low", "high"), [
    (np.uint16, 0, 65536), (np.int16, -32768, 32768), (np.uint8, 0, 256), (np.int8, -128, 128),
    (np.int16, -2000, -1000),
])
def test_lookup_table_path_equals_the_float_path(dtype: Any, low: int, high: int) -> None:
    stored = RNG.integers(low, high, size=(30, 20), dtype=dtype)
    ds = ct()
    for window in (None, (40.0, 400.0, "linear"), (-1000.0, 3000.0, "sigmoid")):
        assert (to_display(ds, stored, window) == to_display(ds, stored.astype(np.float64), window)).all()


def test_rescale_slope_is_applied() -> None:
    ds = image_ds(np.array([[0, 10, 20, 30]], dtype=np.uint16), "MONOCHROME2", RescaleSlope=2.5,
                  RescaleIntercept=-10, WindowCenter=20, WindowWidth=60)
    assert render_png(ds).tolist() == [[linear(v * 2.5 - 10, 20, 60) for v in (0, 10, 20, 30)]]


def test_mr_unsigned_uses_the_first_of_several_windows() -> None:
    stored = np.array([[0, 300, 450, 600], [750, 900, 1200, 4095]], dtype=np.uint16)
    ds = image_ds(stored, "MONOCHROME2", WindowCenter=[600, 1000], WindowWidth=[300, 2000])
    assert (render_png(ds) == expected(stored, lambda x: linear(x, 600, 300))).all()


def test_explicit_window_parameter_overrides_the_dataset_window() -> None:
    params = parse_render_params({"window": "0,100,linear", "accept": "image/png"})
    got = render_png(ct(WindowCenter=40, WindowWidth=400), params=params)
    assert (got == expected(HU, lambda x: linear(x, 0, 100))).all()


@pytest.mark.parametrize(("function", "reference"), [("LINEAR_EXACT", linear_exact), ("SIGMOID", sigmoid)])
def test_voi_lut_function_of_the_dataset_is_honoured(function: Any, reference: Any) -> None:
    got = render_png(ct(WindowCenter=40, WindowWidth=400, VOILUTFunction=function))
    assert (got == expected(HU, lambda x: reference(x, 40, 400))).all()


@pytest.mark.parametrize(("shape", "reference"), [("linear-exact", linear_exact), ("sigmoid", sigmoid)])
def test_window_parameter_shapes(shape: Any, reference: Any) -> None:
    params = parse_render_params([("window", f"40,400,{shape}"), ("accept", "image/png")])
    assert (render_png(ct(), params=params) == expected(HU, lambda x: reference(x, 40, 400))).all()


def test_linear_window_of_width_one_is_a_threshold() -> None:
    params = RenderParams(media_type="image/png", window=(40.0, 1.0, "linear"))
    assert (render_png(ct(), params=params) == expected(HU, lambda x: 255 if x > 39.5 else 0)).all()


def test_unusable_dataset_window_falls_back_to_the_frame_range() -> None:
    got = render_png(ct(WindowCenter=40, WindowWidth=0))
    assert got[0, 0] == 0 and got[2, 3] == 255


def test_no_window_maps_the_frame_range_to_0_255() -> None:
    stored = np.array([[100, 350, 600], [850, 1100, 1100]], dtype=np.uint16)
    got = render_png(image_ds(stored, "MONOCHROME2"))
    assert (got == expected(stored, lambda x: linear_exact(x, 600, 1000))).all()
    assert got.min() == 0 and got.max() == 255


def test_constant_frame_without_window_renders_black() -> None:
    ds = image_ds(np.full((2, 2), 7, dtype=np.uint16), "MONOCHROME2")
    assert (render_png(ds) == 0).all()


def test_voi_lut_sequence_is_used_when_there_is_no_window() -> None:
    stored = np.array([[0, 10, 100, 255, 300]], dtype=np.uint16)
    lut = item(LUTDescriptor=[256, 0, 8], LUTData=[255 - i for i in range(256)])
    ds = image_ds(stored, "MONOCHROME2", VOILUTSequence=Sequence([lut]))
    assert render_png(ds).tolist() == [[255, 245, 155, 0, 0]]


def test_twelve_bit_voi_lut_is_scaled_to_eight_bits() -> None:
    stored = np.array([[0, 1, 2, 3]], dtype=np.uint16)
    lut = item(LUTDescriptor=[4, 0, 12], LUTData=[0, 1365, 2730, 4095])
    ds = image_ds(stored, "MONOCHROME2", VOILUTSequence=Sequence([lut]))
    assert render_png(ds).tolist() == [[0, 85, 170, 255]]


def test_modality_lut_sequence_precedes_the_window() -> None:
    stored = np.array([[0, 1, 2, 3, 7]], dtype=np.uint16)
    lut = item(LUTDescriptor=[4, 0, 16], LUTData=[0, 1000, 2000, 3000], ModalityLUTType="US")
    ds = image_ds(stored, "MONOCHROME2", ModalityLUTSequence=Sequence([lut]))
    params = RenderParams(media_type="image/png", window=(1500.0, 3000.0, "linear_exact"))
    assert render_png(ds, params=params).tolist() == [[0, 85, 170, 255, 255]]


def test_monochrome1_is_inverted() -> None:
    stored = np.array([[0, 1000, 2048, 3000, 4095]], dtype=np.uint16)
    ds = image_ds(stored, "MONOCHROME1", WindowCenter=2048, WindowWidth=4096)
    assert render_png(ds).tolist() == [[255 - linear(v, 2048, 4096) for v in stored[0]]]
    params = RenderParams(media_type="image/png", window=(2048.0, 4096.0, "linear"))
    as_mono2 = image_ds(stored, "MONOCHROME2")
    assert (render_png(ds, params=params) == 255 - render_png(as_mono2, params=params)).all()


def test_enhanced_multiframe_takes_rescale_and_window_from_functional_groups() -> None:
    frames = np.stack([HU + 1024, HU]).astype(np.int16)
    per_frame = Sequence([
        item(PixelValueTransformationSequence=Sequence([item(RescaleIntercept=-1024, RescaleSlope=1)])),
        item(PixelValueTransformationSequence=Sequence([item(RescaleIntercept=0, RescaleSlope=1)])),
    ])
    shared = Sequence([item(FrameVOILUTSequence=Sequence([item(WindowCenter=40, WindowWidth=400)]))])
    ds = image_ds(frames, "MONOCHROME2", frames=2, PerFrameFunctionalGroupsSequence=per_frame,
                  SharedFunctionalGroupsSequence=shared)
    want = expected(HU, lambda x: linear(x, 40, 400))
    for number in (1, 2):
        assert (render_png(ds, ds.pixel_array[number - 1], frame=number) == want).all()


# --- colour -------------------------------------------------------------------------------------

def test_rgb_is_rendered_as_is() -> None:
    ds = image_ds(RGB, "RGB")
    assert (render_png(ds) == RGB).all()


def test_sixteen_bit_rgb_is_scaled_by_bits_stored() -> None:
    stored = np.array([[[0, 2048, 4095]]], dtype=np.uint16)
    ds = image_ds(stored, "RGB", BitsStored=12, HighBit=11)
    assert render_png(ds).tolist() == [[[0, round(2048 * 255 / 4095), 255]]]


def test_ybr_full_as_pydicom_decodes_it_and_raw() -> None:
    ds = image_ds(convert_color_space(RGB, "RGB", "YBR_FULL"), "YBR_FULL")
    decoded = render_png(ds)  # ds.pixel_array: pydicom has already converted to RGB
    assert (decoded == ds.pixel_array).all()
    assert np.abs(decoded.astype(int) - RGB).max() <= 2
    raw = pixel_array(ds, raw=True)
    assert (render_png(ds, raw, photometric="YBR_FULL") == decoded).all()


def test_ybr_full_422_native() -> None:
    rgb = np.repeat(RGB[:, ::2], 2, axis=1)  # equal horizontal pairs: 4:2:2 loses nothing
    ybr = convert_color_space(rgb, "RGB", "YBR_FULL").astype(np.uint8)
    packed = bytearray()
    for row in ybr:
        for left, right in zip(row[::2], row[1::2], strict=True):
            packed += bytes([left[0], right[0], left[1], left[2]])
    ds = image_ds(rgb, "YBR_FULL_422")
    ds.PixelData = bytes(packed)
    assert np.abs(render_png(ds).astype(int) - rgb).max() <= 2
    raw = pixel_array(ds, raw=True)
    assert np.abs(render_png(ds, raw, photometric="YBR_FULL_422").astype(int) - rgb).max() <= 2


def test_palette_color_sixteen_bit_lut() -> None:
    indices = np.array([[0, 1, 127], [128, 254, 255]], dtype=np.uint8)
    entries = np.arange(256)
    red, green, blue = entries * 257, (255 - entries) * 257, np.full(256, 0x4000)
    ds = image_ds(indices, "PALETTE COLOR",
                  RedPaletteColorLookupTableDescriptor=[256, 0, 16],
                  GreenPaletteColorLookupTableDescriptor=[256, 0, 16],
                  BluePaletteColorLookupTableDescriptor=[256, 0, 16],
                  RedPaletteColorLookupTableData=red.astype("<u2").tobytes(),
                  GreenPaletteColorLookupTableData=green.astype("<u2").tobytes(),
                  BluePaletteColorLookupTableData=blue.astype("<u2").tobytes())
    got = render_png(ds)
    for (r, c), index in np.ndenumerate(indices):
        want = [round(int(lut[index]) * 255 / 65535) for lut in (red, green, blue)]
        assert got[r, c].tolist() == want


def test_palette_color_eight_bit_lut() -> None:
    indices = np.array([[0, 3]], dtype=np.uint8)
    lut = bytes(range(0, 256))
    ds = image_ds(indices, "PALETTE COLOR",
                  RedPaletteColorLookupTableDescriptor=[256, 0, 8],
                  GreenPaletteColorLookupTableDescriptor=[256, 0, 8],
                  BluePaletteColorLookupTableDescriptor=[256, 0, 8],
                  RedPaletteColorLookupTableData=lut, GreenPaletteColorLookupTableData=lut[::-1],
                  BluePaletteColorLookupTableData=lut)
    assert render_png(ds).tolist() == [[[0, 255, 0], [3, 252, 3]]]


def test_unrenderable_photometric_and_bad_shapes() -> None:
    ds = image_ds(RGB, "RGB")
    with pytest.raises(UnsupportedRendering):
        render_frame(ds, RGB, PNG, photometric="YBR_PARTIAL_420")
    with pytest.raises(ValueError, match="shape"):
        render_frame(ds, RGB[..., 0], PNG)
    with pytest.raises(ValueError, match="shape"):
        render_frame(ct(), np.zeros((2, 3, 4), dtype=np.int16), PNG)


# --- viewport -----------------------------------------------------------------------------------

def test_viewport_scales_to_fit_keeping_aspect_ratio() -> None:
    ds = image_ds(np.zeros((256, 512), dtype=np.uint16), "MONOCHROME2")
    params = parse_render_params({"viewport": "128,128", "accept": "image/png"})
    assert render_png(ds, params=params).shape == (64, 128)


def test_viewport_upscales_to_fit_but_never_beyond() -> None:
    ds = image_ds(np.zeros((32, 32), dtype=np.uint16), "MONOCHROME2")
    params = RenderParams(media_type="image/png", viewport=(128, 64, None, None, None, None))
    assert render_png(ds, params=params).shape == (64, 64)


def test_source_region_crop_and_flips() -> None:
    src = np.arange(4 * 5 * 3, dtype=np.uint8).reshape(4, 5, 3)
    ds = image_ds(src, "RGB")

    def region(viewport: str) -> np.ndarray:
        return render_png(ds, params=parse_render_params({"viewport": viewport, "accept": "image/png"}))

    assert (region("2,2,1,1,2,2") == src[1:3, 1:3]).all()
    assert (region("2,2,1,1,-2,2") == src[1:3, 1:3][:, ::-1]).all()
    assert (region("2,2,1,1,2,-2") == src[1:3, 1:3][::-1]).all()
    assert (region("4,3,1,1,,") == src[1:, 1:]).all()  # sw/sh default to the rest of the image
    assert region("4,4,,,2,2").shape == (4, 4, 3)
    with pytest.raises(RenderError, match="outside"):
        region("2,2,5,0,2,2")


# --- encoders -----------------------------------------------------------------------------------

def test_jpeg_default_quality_and_quality_parameter() -> None:
    noisy = RNG.integers(0, 4096, size=(64, 64), dtype=np.uint16)
    ds = image_ds(noisy, "MONOCHROME2")
    default = render_frame(ds, ds.pixel_array, RenderParams())
    assert default.startswith(b"\xff\xd8\xff") and default.endswith(b"\xff\xd9")
    assert default == render_frame(ds, ds.pixel_array, RenderParams(quality=90))
    low = render_frame(ds, ds.pixel_array, parse_render_params({"quality": "10"}))
    high = render_frame(ds, ds.pixel_array, parse_render_params({"quality": "95"}))
    assert len(low) < len(default) < len(high)
    with Image.open(io.BytesIO(default)) as image:
        assert (image.format, image.mode, image.size) == ("JPEG", "L", (64, 64))


def test_jpeg_colour_and_gif() -> None:
    ds = image_ds(RGB, "RGB")
    with Image.open(io.BytesIO(render_frame(ds, RGB, RenderParams()))) as image:
        assert (image.format, image.mode) == ("JPEG", "RGB")
    gray = ct(WindowCenter=40, WindowWidth=400)
    gif = render_frame(gray, gray.pixel_array, RenderParams(media_type="image/gif"))
    assert gif.startswith(b"GIF8")
    with Image.open(io.BytesIO(gif)) as image:
        assert (np.asarray(image.convert("L")) == expected(HU, lambda x: linear(x, 40, 400))).all()


# --- parameters ---------------------------------------------------------------------------------

OHIF_ACCEPT = 'multipart/related; type="application/octet-stream"; transfer-syntax=*'


def test_defaults() -> None:
    assert parse_render_params({}) == RenderParams("image/jpeg", None, None, None)
    assert parse_render_params({}, default_media_type="image/png").media_type == "image/png"


@pytest.mark.parametrize(("params", "header", "want"), [
    ({"accept": "image/png"}, OHIF_ACCEPT, "image/png"),  # the parameter wins over the header
    ({"accept": "image/jpeg"}, "image/png", "image/jpeg"),
    ({}, "image/png", "image/png"),
    ({}, "*/*", "image/jpeg"),
    ({}, "image/*", "image/jpeg"),
    ({}, "", "image/jpeg"),
    ({"accept": "*/*"}, None, "image/jpeg"),
    ({"accept": "image/jp2, image/gif"}, None, "image/gif"),
    ({"accept": "image/png;q=0.5, image/gif"}, None, "image/gif"),
    ({"accept": "image/png; q=0.9, image/gif; q=0.2"}, None, "image/png"),
    ({"accept": "image/gif;q=0, image/*"}, None, "image/jpeg"),
    ({"accept": "application/dicom"}, "image/png", "image/png"),  # nothing usable in the parameter
    ({}, 'multipart/related; type="image/png"', "image/png"),
    ({}, "multipart/related; type=image/png", "image/png"),
    ({}, "multipart/related ; type = \"image/gif\" ; q=1", "image/gif"),
    ({}, "IMAGE/PNG", "image/png"),
    ({}, "image/avif,image/webp,image/apng,image/svg+xml,image/*,*/*;q=0.8", "image/jpeg"),
])
def test_media_type_negotiation(params: Any, header: Any, want: Any) -> None:
    assert parse_render_params(params, accept_header=header).media_type == want


@pytest.mark.parametrize(("params", "header"), [
    ({"accept": "application/dicom"}, None),
    ({}, "application/dicom"),
    ({}, OHIF_ACCEPT),
    ({"accept": "image/jp2"}, OHIF_ACCEPT),
    ({"accept": "image/png;q=0"}, None),
])
def test_unrenderable_media_types_are_406(params: Any, header: Any) -> None:
    with pytest.raises(UnsupportedRendering, match="image/jpeg, image/png, image/gif"):
        parse_render_params(params, accept_header=header)


def test_unsupported_rendering_is_a_render_error_is_a_value_error() -> None:
    assert issubclass(UnsupportedRendering, RenderError) and issubclass(RenderError, ValueError)
    with pytest.raises(UnsupportedRendering):
        RenderParams(media_type="application/dicom")
    with pytest.raises(UnsupportedRendering):
        parse_render_params({}, default_media_type="image/jp2")


def test_accept_may_repeat() -> None:
    assert parse_render_params([("accept", "image/jp2"), ("accept", "image/png")]).media_type == "image/png"


def test_viewport_window_quality_parsing() -> None:
    params = parse_render_params([("viewport", "256,128,10,20,-30,40"), ("window", "-600, 1500, LINEAR"),
                                  ("quality", " 75 ")])
    assert params.viewport == (256, 128, 10, 20, -30, 40)
    assert params.window == (-600.0, 1500.0, "linear")
    assert params.quality == 75
    assert parse_render_params({"viewport": "64,64"}).viewport == (64, 64, None, None, None, None)
    assert parse_render_params({"window": "40.5,80"}).window == (40.5, 80.0, "linear")
    assert parse_render_params({"window": "1,0.5,linear_exact"}).window == (1.0, 0.5, "linear_exact")


def test_annotation_charset_iccprofile_and_unknown_keys_are_accepted_and_ignored() -> None:
    params = parse_render_params({"annotation": "patient,technique", "charset": "utf-8", "iccprofile": "srgb",
                                  "frame": "x", "includefield": "all"})
    assert params == RenderParams()


@pytest.mark.parametrize(("key", "value", "message"), [
    ("quality", "0", "quality"),
    ("quality", "101", "quality"),
    ("quality", "high", "quality"),
    ("quality", "7.5", "quality"),
    ("viewport", "256", "viewport"),
    ("viewport", "256,256,0,0", "viewport"),
    ("viewport", "0,256", "viewport"),
    ("viewport", "-5,256", "viewport"),
    ("viewport", "100000,256", "viewport"),
    ("viewport", "256,256,-1,0,10,10", "viewport"),
    ("viewport", "256,256,0,0,0,10", "viewport"),
    ("viewport", "a,b", "viewport"),
    ("window", "40", "window"),
    ("window", "40,400,linear,extra", "window"),
    ("window", "c,w,linear", "window"),
    ("window", "40,400,cubic", "window"),
    ("window", "40,0.5,linear", "window"),
    ("window", "40,0,sigmoid", "window"),
    ("window", "nan,400", "window"),
    ("window", "40,inf", "window"),
    ("iccprofile", "cmyk", "iccprofile"),
    ("accept", "jpeg", "accept"),
    ("accept", "image/png;q=2", "accept"),
    ("accept", "image/png;q=high", "accept"),
])
def test_malformed_parameters_are_400(key: Any, value: Any, message: Any) -> None:
    with pytest.raises(RenderError, match=message) as info:
        parse_render_params({key: value})
    assert not isinstance(info.value, UnsupportedRendering)


def test_single_valued_parameters_may_not_repeat() -> None:
    with pytest.raises(RenderError, match="more than once"):
        parse_render_params([("quality", "50"), ("quality", "60")])


def test_render_params_validate_on_construction() -> None:
    with pytest.raises(RenderError):
        RenderParams(quality=0)
    with pytest.raises(RenderError):
        RenderParams(viewport=(0, 10, None, None, None, None))
    with pytest.raises(RenderError):
        RenderParams(window=(40.0, 0.0, "linear"))


# --- thumbnails ---------------------------------------------------------------------------------

def test_thumbnail_params() -> None:
    assert thumbnail_params(RenderParams()).viewport == (128, 128, None, None, None, None)
    assert thumbnail_params(RenderParams(), size=64).viewport == (64, 64, None, None, None, None)
    given_viewport = RenderParams(viewport=(32, 32, None, None, None, None))
    assert thumbnail_params(given_viewport) is given_viewport
    ds = image_ds(np.zeros((256, 512), dtype=np.uint16), "MONOCHROME2")
    data = render_frame(ds, ds.pixel_array, thumbnail_params(parse_render_params({})))
    with Image.open(io.BytesIO(data)) as image:
        assert (image.format, image.size) == ("JPEG", (128, 64))


@pytest.mark.parametrize(("frames", "middle"), [(0, 1), (1, 1), (2, 1), (3, 2), (4, 2), (5, 3), (100, 50)])
def test_pick_thumbnail_frame(frames: Any, middle: Any) -> None:
    assert pick_thumbnail_frame(frames) == middle


# --- properties ---------------------------------------------------------------------------------

finite = st.floats(min_value=-1e6, max_value=1e6, allow_nan=False)


@given(values=st.lists(finite, min_size=1, max_size=50), center=finite,
       width=st.floats(min_value=1, max_value=1e6), function=st.sampled_from(["linear", "linear_exact", "sigmoid"]))
def test_windowing_is_monotonic_and_within_0_255(values: Any, center: Any, width: Any, function: Any) -> None:
    out = apply_window(np.array(sorted(values)), center, width, function)
    assert out.dtype == np.uint8
    assert (np.diff(out.astype(int)) >= 0).all()


@given(x=finite, center=finite, width=st.floats(min_value=1, max_value=1e6))
def test_linear_window_agrees_with_the_standard_pseudo_code(x: Any, center: Any, width: Any) -> None:
    assert int(apply_window(np.array([x]), center, width)[0]) == linear(x, center, width)
