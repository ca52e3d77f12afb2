"""Rendered and thumbnail resources: a decoded frame -> an 8-bit JPEG, PNG or GIF image.

Pure (no I/O beyond in-memory buffers). Implements PS3.18 §8.3.5 (rendering query parameters),
§10.4.1.1.3 (Retrieve Rendered) and §10.4.3.3.4 (thumbnail), with the grayscale pipeline of
PS3.4 N.2 / PS3.3 C.11 and the colour models of PS3.3 C.7.6.3.1.2.

Errors (the gateway maps them to HTTP)::

    ValueError
    └── RenderError               400  a rendering parameter is malformed or out of range
        └── UnsupportedRendering  406  no acceptable media type can be rendered, or the image's
                                       photometric interpretation cannot be rendered

Grayscale pipeline: stored values -> Modality LUT (ModalityLUTSequence, else Rescale
Slope/Intercept) -> VOI (the ``window`` parameter, else the first Window Center/Width with its
VOI LUT Function, else the first VOI LUT Sequence item, else the frame's min..max) -> inversion
for MONOCHROME1 -> 8 bits. Enhanced multi-frame objects take the rescale and window from the
Pixel Value Transformation / Frame VOI LUT functional groups of the frame given as ``frame``.
Colour: RGB as is, YBR converted to RGB, PALETTE COLOR through its palette (``window`` does not
apply to colour). Then the source region
and viewport of §8.3.5.1.3, then the encoder (Pillow).

Never annotated: ``annotation`` is accepted and ignored, so no patient-identifying text is ever
burned in (a thumbnail must carry none, §10.4.3.3.4). ``iccprofile`` (validated) and ``charset``
are also accepted and ignored: no ICC profile is applied or embedded.
"""

from __future__ import annotations

import io
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, Final, TypeAlias

import numpy as np
from numpy.typing import NDArray
from PIL import Image
from pydicom.dataset import Dataset
from pydicom.pixels.processing import apply_color_lut, convert_color_space

RENDERABLE: Final = ("image/jpeg", "image/png", "image/gif")
DEFAULT_JPEG_QUALITY: Final = 90
THUMBNAIL_SIZE: Final = 128
MAX_VIEWPORT_SIDE: Final = 4096  # caps vw and vh: an upscale to fit is bounded by memory, not by the image
WINDOW_FUNCTIONS: Final = ("linear", "linear_exact", "sigmoid")
ICC_PROFILES: Final = frozenset({"no", "yes", "srgb", "adobergb", "rommrgb", "displayp3"})

_PIL_FORMAT: Final = {"image/jpeg": "JPEG", "image/png": "PNG", "image/gif": "GIF"}
_WILDCARDS: Final = frozenset({"*/*", "image/*", "image/"})
_SINGLE_VALUED: Final = ("quality", "viewport", "window", "iccprofile")
_GRAYSCALE: Final = frozenset({"MONOCHROME1", "MONOCHROME2"})
# What pydicom's default decoding (``as_rgb=True``) hands back for these is already RGB.
_DECODED_AS_RGB: Final = frozenset({"RGB", "YBR_FULL", "YBR_FULL_422", "YBR_ICT", "YBR_RCT"})
# Raw YBR (``raw=True`` / ``as_rgb=False``): YBR_ICT uses the YBR_FULL matrix; pydicom already
# removes the 4:2:2 subsampling of native YBR_FULL_422 data.
_RAW_YBR: Final = frozenset({"YBR_FULL", "YBR_FULL_422", "YBR_ICT"})

Viewport: TypeAlias = tuple[int, int, int | None, int | None, int | None, int | None]
Window: TypeAlias = tuple[float, float, str]


class RenderError(ValueError):
    """A rendering parameter is malformed or out of range (-> 400)."""


class UnsupportedRendering(RenderError):
    """Nothing acceptable can be rendered: media type or photometric interpretation (-> 406)."""


@dataclass(frozen=True)
class RenderParams:
    """Validated rendering parameters (PS3.18 §8.3.5.1). Construction raises RenderError.

    ``viewport`` is ``(vw, vh, sx, sy, sw, sh)``; the source-region members are ``None`` when not
    given. ``window`` is ``(center, width, function)`` with function one of WINDOW_FUNCTIONS.
    ``quality`` ``None`` means DEFAULT_JPEG_QUALITY; it is ignored for PNG and GIF.
    """

    media_type: str = "image/jpeg"
    quality: int | None = None
    viewport: Viewport | None = None
    window: Window | None = None

    def __post_init__(self) -> None:
        if self.media_type not in RENDERABLE:
            raise UnsupportedRendering(
                f"cannot render {self.media_type!r}; renderable media types: {', '.join(RENDERABLE)}")
        if self.quality is not None and not (type(self.quality) is int and 1 <= self.quality <= 100):
            raise RenderError(f"quality: expected an integer from 1 to 100, got {self.quality!r}")
        if self.viewport is not None:
            _check_viewport(self.viewport)
        if self.window is not None:
            center, width, function = self.window
            _check_window(center, width, function)


# --- parameters ---------------------------------------------------------------------------------

def parse_render_params(
    params: Mapping[str, str] | Iterable[tuple[str, str]],
    *,
    default_media_type: str = "image/jpeg",
    accept_header: str | None = None,
) -> RenderParams:
    """Query parameters (+ Accept header) -> RenderParams (PS3.18 §8.3.5.1, negotiation §8.7.8).

    Pass ``request.query_params.multi_items()`` to see repeated keys; a Mapping gives one value
    per key. ``accept`` may repeat (its values are joined); quality, viewport, window and
    iccprofile may not. The media type is the highest-q renderable type of the ``accept``
    parameter, else of the Accept header; ``*/*`` and ``image/*`` select ``default_media_type``,
    ``multipart/related; type=X`` selects X; no ``accept`` parameter and no Accept header also
    select the default. Unknown parameters (``annotation``, ``charset``, vendor ones) are ignored.
    """
    items = params.items() if isinstance(params, Mapping) else params
    accept: list[str] = []
    single: dict[str, str] = {}
    for raw_key, value in items:
        key = raw_key.strip().lower()
        if key == "accept":
            if value.strip():
                accept.append(value)
        elif key in _SINGLE_VALUED:
            if key in single:
                raise RenderError(f"{key}: given more than once")
            single[key] = value
    media_type = negotiate_media_type(",".join(accept) or None, accept_header, default=default_media_type)
    if "iccprofile" in single and single["iccprofile"].strip().lower() not in ICC_PROFILES:
        raise RenderError(f"iccprofile: expected one of {', '.join(sorted(ICC_PROFILES))}, "
                          f"got {single['iccprofile']!r}")
    return RenderParams(
        media_type=media_type,
        quality=_parse_quality(single["quality"]) if "quality" in single else None,
        viewport=_parse_viewport(single["viewport"]) if "viewport" in single else None,
        window=_parse_window(single["window"]) if "window" in single else None,
    )


def negotiate_media_type(accept_param: str | None, accept_header: str | None, *, default: str) -> str:
    """The rendered media type to produce (PS3.18 §8.7.8): accept parameter > Accept header > 406."""
    if default not in RENDERABLE:
        raise UnsupportedRendering(f"default media type {default!r} cannot be rendered")
    asked: list[str] = []
    for source, text in (("accept", accept_param), ("Accept header", accept_header)):
        if text is None or not text.strip():
            continue
        for media_type, type_param, _ in _media_ranges(text, source):
            choice = type_param if media_type == "multipart/related" else media_type
            if choice in RENDERABLE:
                return choice
            if choice in _WILDCARDS:
                return default
            is_multipart = type_param is not None and choice == type_param
            asked.append(f"{media_type}; type={type_param}" if is_multipart else media_type)
    if not asked and not (accept_param or "").strip() and not (accept_header or "").strip():
        return default
    raise UnsupportedRendering(f"cannot render {', '.join(asked) or 'the requested media types'}; "
                               f"renderable media types: {', '.join(RENDERABLE)}")


def thumbnail_params(params: RenderParams, *, size: int = THUMBNAIL_SIZE) -> RenderParams:
    """Thumbnail rendering (PS3.18 §10.4.3.3.4): ``params`` with a size x size viewport if none given.

    The media type default (JPEG) comes from ``parse_render_params(default_media_type=...)``.
    """
    if params.viewport is not None:
        return params
    return replace(params, viewport=(size, size, None, None, None, None))


def pick_thumbnail_frame(number_of_frames: int) -> int:
    """The 1-based frame a thumbnail shows: the middle one (the first when there are one or two)."""
    return max(1, (number_of_frames + 1) // 2)


def _media_ranges(text: str, source: str) -> list[tuple[str, str | None, float]]:
    """Accept-style text -> [(media type, multipart ``type`` parameter, q)], highest q first, q=0 dropped."""
    ranges: list[tuple[str, str | None, float]] = []
    for part in _split_outside_quotes(text, ","):
        if not part.strip():
            continue
        media_type, *param_texts = (p.strip() for p in _split_outside_quotes(part, ";"))
        media_type = media_type.lower()
        if media_type.count("/") != 1 or " " in media_type or media_type.startswith("/"):
            raise RenderError(f"{source}: {part.strip()!r} is not a media type")
        q = 1.0
        type_param: str | None = None
        for param in param_texts:
            name, sep, value = param.partition("=")
            name, value = name.strip().lower(), value.strip().strip('"').strip()
            if not sep:
                continue
            if name == "q":
                try:
                    q = float(value)
                except ValueError:
                    q = math.nan
                if not 0.0 <= q <= 1.0:
                    raise RenderError(f"{source}: q={value!r} is not a quality value from 0 to 1")
            elif name == "type":
                type_param = value.lower()
        if q > 0:
            ranges.append((media_type, type_param, q))
    return sorted(ranges, key=lambda r: -r[2])


def _split_outside_quotes(text: str, sep: str) -> list[str]:
    parts: list[str] = []
    current: list[str] = []
    quoted = False
    for char in text:
        if char == '"':
            quoted = not quoted
        if char == sep and not quoted:
            parts.append("".join(current))
            current = []
        else:
            current.append(char)
    parts.append("".join(current))
    return parts


def _parse_int(text: str, what: str) -> int:
    try:
        return int(text.strip())
    except ValueError:
        raise RenderError(f"{what}: {text.strip()!r} is not an integer") from None


def _parse_quality(text: str) -> int:
    quality = _parse_int(text, "quality")
    if not 1 <= quality <= 100:
        raise RenderError(f"quality: expected an integer from 1 to 100, got {quality}")
    return quality


def _parse_viewport(text: str) -> Viewport:
    fields = text.split(",")
    if len(fields) not in (2, 6):
        raise RenderError(f"viewport: expected vw,vh or vw,vh,sx,sy,sw,sh, got {text!r}")
    vw, vh = (_parse_int(f, "viewport") for f in fields[:2])
    region = [_parse_int(f, "viewport") if f.strip() else None for f in fields[2:]]
    region += [None] * (4 - len(region))
    viewport: Viewport = (vw, vh, region[0], region[1], region[2], region[3])
    _check_viewport(viewport)
    return viewport


def _check_viewport(viewport: Viewport) -> None:
    if len(viewport) != 6:
        raise RenderError(f"viewport: expected (vw, vh, sx, sy, sw, sh), got {viewport!r}")
    vw, vh, sx, sy, sw, sh = viewport
    if not (1 <= vw <= MAX_VIEWPORT_SIDE and 1 <= vh <= MAX_VIEWPORT_SIDE):
        raise RenderError(f"viewport: vw and vh must be from 1 to {MAX_VIEWPORT_SIDE}, got {vw},{vh}")
    if (sx is not None and sx < 0) or (sy is not None and sy < 0):
        raise RenderError(f"viewport: sx and sy must not be negative, got {sx},{sy}")
    if sw == 0 or sh == 0:
        raise RenderError("viewport: sw and sh must not be 0 (a negative value flips the region)")


def _parse_window(text: str) -> Window:
    fields = [f.strip() for f in text.split(",")]
    if len(fields) not in (2, 3):
        raise RenderError(f"window: expected center,width,function, got {text!r}")
    try:
        center, width = float(fields[0]), float(fields[1])
    except ValueError:
        raise RenderError(f"window: center and width must be numbers, got {text!r}") from None
    function = fields[2].lower().replace("-", "_") if len(fields) == 3 else "linear"
    _check_window(center, width, function)
    return center, width, function


def _check_window(center: float, width: float, function: str) -> None:
    if function not in WINDOW_FUNCTIONS:
        raise RenderError(f"window: function must be linear, linear-exact or sigmoid, got {function!r}")
    if not (math.isfinite(center) and math.isfinite(width)):
        raise RenderError("window: center and width must be finite numbers")
    if function == "linear" and width < 1:
        raise RenderError(f"window: a linear window needs width >= 1 (PS3.3 C.11.2.1.2.1), got {width}")
    if width <= 0:
        raise RenderError(f"window: width must be > 0, got {width}")


# --- rendering ----------------------------------------------------------------------------------

def render_frame(
    ds: Dataset,
    pixels: NDArray[Any],
    params: RenderParams,
    *,
    photometric: str | None = None,
    frame: int | None = None,
) -> bytes:
    """One decoded frame -> encoded image bytes of ``params.media_type`` (PS3.18 §10.4.1.1.3).

    ``pixels`` is one frame, shape (rows, cols) or (rows, cols, 3), as pydicom's default decoding
    returns it (``ds.pixel_array[i]``, ``pydicom.pixels.pixel_array(ds, index=i)``): YBR data
    then come back already converted to RGB although ``ds.PhotometricInterpretation`` still says
    YBR. ``photometric`` names the colour model of ``pixels`` when it differs from that default,
    e.g. ``photometric="YBR_FULL"`` for ``raw=True`` / ``as_rgb=False`` decoding; YBR_FULL,
    YBR_FULL_422 and YBR_ICT are then converted here. ``frame`` (1-based) selects the per-frame
    functional groups of an enhanced multi-frame object.

    Raises RenderError for a source region outside the image, UnsupportedRendering for a
    photometric interpretation that cannot be rendered, ValueError for a ``pixels`` array whose
    shape does not fit, and lets pydicom's errors for a broken palette or LUT through.
    """
    image = to_display(ds, pixels, params.window, photometric=photometric, frame=frame)
    return encode(_fit_viewport(image, params.viewport), params)


def to_display(
    ds: Dataset,
    pixels: NDArray[Any],
    window: Window | None = None,
    *,
    photometric: str | None = None,
    frame: int | None = None,
) -> NDArray[np.uint8]:
    """The frame as 8-bit display values: (rows, cols) grayscale or (rows, cols, 3) RGB."""
    stored = str(ds.get("PhotometricInterpretation", "") or "").strip().upper()
    if photometric is None:
        model = "RGB" if stored in _DECODED_AS_RGB else stored
    else:
        model = photometric.strip().upper()
    if not model:
        model = "RGB" if pixels.ndim == 3 else "MONOCHROME2"
    if model in _GRAYSCALE:
        _check_shape(pixels, 2, model)
        display = _grayscale(ds, pixels, window, frame)
        return 255 - display if model == "MONOCHROME1" else display
    if model == "PALETTE COLOR":
        _check_shape(pixels, 2, model)
        return _palette(ds, pixels)
    if model == "RGB" or model in _RAW_YBR:
        _check_shape(pixels, 3, model)
        rgb = _colour_to_uint8(ds, pixels)
        if model == "RGB":
            return rgb
        return np.asarray(convert_color_space(rgb, "YBR_FULL", "RGB"), dtype=np.uint8)
    raise UnsupportedRendering(f"cannot render photometric interpretation {model!r}")


def apply_window(
    values: NDArray[Any], center: float, width: float, function: str = "linear"
) -> NDArray[np.uint8]:
    """VOI windowing to 0..255 (PS3.3 C.11.2.1.2.1 LINEAR, C.11.2.1.3.1 SIGMOID, C.11.2.1.3.2 LINEAR_EXACT).

    Results are rounded to the nearest integer (half to even).
    """
    _check_window(center, width, function)
    x = np.asarray(values, dtype=np.float64)
    if function == "linear":
        if width == 1:  # a threshold; the general formula would divide by zero
            return np.where(x > center - 0.5, 255, 0).astype(np.uint8)
        y = ((x - (center - 0.5)) / (width - 1) + 0.5) * 255.0
    elif function == "linear_exact":
        y = ((x - center) / width + 0.5) * 255.0
    else:
        y = 255.0 / (1.0 + np.exp(np.clip(-4.0 * (x - center) / width, -700.0, 700.0)))
    return np.rint(np.clip(y, 0.0, 255.0)).astype(np.uint8)


def encode(image: Image.Image, params: RenderParams) -> bytes:
    """A Pillow image -> bytes of ``params.media_type``."""
    buffer = io.BytesIO()
    if params.media_type == "image/jpeg":
        quality = DEFAULT_JPEG_QUALITY if params.quality is None else params.quality
        image.save(buffer, format="JPEG", quality=quality)
    else:
        image.save(buffer, format=_PIL_FORMAT[params.media_type])
    return buffer.getvalue()


def _check_shape(pixels: NDArray[Any], ndim: int, model: str) -> None:
    if pixels.ndim != ndim or (ndim == 3 and pixels.shape[2] != 3) or 0 in pixels.shape:
        want = "(rows, cols)" if ndim == 2 else "(rows, cols, 3)"
        raise ValueError(f"{model} frame must have shape {want}, got {pixels.shape}")


def _grayscale(
    ds: Dataset, pixels: NDArray[Any], window: Window | None, frame: int | None
) -> NDArray[np.uint8]:
    """Modality LUT then VOI. Integer frames of up to 16 bits go through a lookup table built over
    their low..high range: far less memory and time than float arrays of the size of the frame."""
    if pixels.dtype.kind in "iub" and pixels.dtype.itemsize <= 2:
        low, high = int(pixels.min()), int(pixels.max())
        domain = np.arange(low, high + 1, dtype=np.int64)
        table = _voi(ds, _modality_lut(ds, domain, frame), window, frame)
        # pixels - low, computed modulo 2**bits in the unsigned type of the same size: it is exact
        # (0 <= pixels - low < 2**bits) and, unlike an intp index, costs 2 bytes a pixel at most.
        unsigned = pixels.view(np.dtype(f"u{pixels.dtype.itemsize}"))
        index = unsigned - unsigned.dtype.type(low % 2 ** (8 * pixels.dtype.itemsize))
        display: NDArray[np.uint8] = table[index]
        return display
    return _voi(ds, _modality_lut(ds, pixels, frame), window, frame)


# PS3.3 C.11.1: Modality LUT Sequence, else Rescale Slope/Intercept (top level, else functional groups).
def _modality_lut(ds: Dataset, pixels: NDArray[Any], frame: int | None) -> NDArray[np.float64]:
    sequence = ds.get("ModalityLUTSequence")
    if sequence:
        lut, _ = _apply_lut(ds, sequence[0], pixels)
        return lut.astype(np.float64)
    source = ds if "RescaleSlope" in ds else _functional_group(ds, frame, "PixelValueTransformationSequence")
    slope = _first_number(source.get("RescaleSlope")) if source is not None else None
    intercept = _first_number(source.get("RescaleIntercept")) if source is not None else None
    values = pixels.astype(np.float64)
    if slope is not None and slope != 1.0:
        values *= slope
    if intercept:
        values += intercept
    return values


# PS3.3 C.11.2: an explicit window > Window Center/Width > VOI LUT Sequence > the frame's range.
def _voi(
    ds: Dataset, values: NDArray[np.float64], window: Window | None, frame: int | None
) -> NDArray[np.uint8]:
    on_top = "WindowCenter" in ds or "VOILUTSequence" in ds
    voi_source = ds if on_top else _functional_group(ds, frame, "FrameVOILUTSequence")
    window = window or _dataset_window(voi_source)
    if window is not None:
        return apply_window(values, *window)
    lut_items = voi_source.get("VOILUTSequence") if voi_source is not None else None
    if lut_items:
        mapped, bits = _apply_lut(ds, lut_items[0], values)
        top = max(float(2**bits - 1), float(mapped.max()))
        return np.rint(mapped.astype(np.float64) * (255.0 / top)).astype(np.uint8)
    low, high = float(values.min()), float(values.max())
    if high <= low:
        return np.zeros(values.shape, dtype=np.uint8)
    return apply_window(values, (low + high) / 2, high - low, "linear_exact")


def _dataset_window(source: Dataset | None) -> Window | None:
    if source is None:
        return None
    center = _first_number(source.get("WindowCenter"))
    width = _first_number(source.get("WindowWidth"))
    function = str(source.get("VOILUTFunction", "") or "LINEAR").strip().lower()
    if function not in WINDOW_FUNCTIONS:
        function = "linear"
    if center is None or width is None:
        return None
    try:
        _check_window(center, width, function)
    except RenderError:
        return None  # an unusable window in the data: fall back to the next VOI source
    return center, width, function


def _functional_group(ds: Dataset, frame: int | None, keyword: str) -> Dataset | None:
    """The first item of ``keyword`` in the frame's per-frame functional group, else the shared one."""
    groups: list[Any] = []
    per_frame = ds.get("PerFrameFunctionalGroupsSequence")
    if frame is not None and per_frame and 1 <= frame <= len(per_frame):
        groups.append(per_frame[frame - 1])
    shared = ds.get("SharedFunctionalGroupsSequence")
    if shared:
        groups.append(shared[0])
    for group in groups:
        items = group.get(keyword)
        if items:
            item: Dataset = items[0]
            return item
    return None


def _first_number(value: Any) -> float | None:
    if isinstance(value, Sequence) and not isinstance(value, str | bytes):
        value = value[0] if len(value) else None
    if value is None or value == "":
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def _apply_lut(ds: Dataset, item: Dataset, values: NDArray[Any]) -> tuple[NDArray[np.int64], int]:
    """A Modality or VOI LUT item (PS3.3 C.11.1.1.1, C.11.2.1.1) applied to ``values``; also its bits."""
    descriptor = [int(v) for v in item.LUTDescriptor]
    entries, first, bits = descriptor[0] or 65536, descriptor[1], descriptor[2]
    if first > 32767 and ds.get("PixelRepresentation", 0) == 1:
        first -= 65536  # an SS first-mapped value read as US
    raw = item.LUTData
    if isinstance(raw, bytes):
        data = np.frombuffer(raw, dtype="<u2" if _little_endian(ds) else ">u2").astype(np.int64)
    elif isinstance(raw, int):
        data = np.array([raw], dtype=np.int64)
    else:
        data = np.asarray(list(raw), dtype=np.int64)
    data = data[:entries]
    index = np.clip(np.rint(np.asarray(values, dtype=np.float64)) - first, 0, len(data) - 1).astype(np.intp)
    return data[index], bits


def _little_endian(ds: Dataset) -> bool:
    meta = getattr(ds, "file_meta", None)
    syntax = meta.get("TransferSyntaxUID") if meta is not None else None
    if syntax is not None:
        return bool(syntax.is_little_endian)
    return ds.original_encoding[1] is not False


def _palette(ds: Dataset, pixels: NDArray[Any]) -> NDArray[np.uint8]:
    """PALETTE COLOR (PS3.3 C.7.6.3.1.5) through pydicom, scaled from the LUT's bit depth to 8 bits."""
    rgb = apply_color_lut(pixels, ds)[..., :3]
    bits = int(ds.RedPaletteColorLookupTableDescriptor[2])
    top = max(float(2**bits - 1), float(rgb.max()))
    if top == 255.0:
        return rgb.astype(np.uint8)
    return np.rint(rgb.astype(np.float64) * (255.0 / top)).astype(np.uint8)


def _colour_to_uint8(ds: Dataset, pixels: NDArray[Any]) -> NDArray[np.uint8]:
    if pixels.dtype == np.uint8:
        return pixels.astype(np.uint8, copy=False)
    bits = int(ds.get("BitsStored", 0) or 8 * pixels.dtype.itemsize)
    top = float(2**bits - 1)
    scaled: NDArray[np.float64] = np.clip(pixels.astype(np.float64), 0.0, top) * (255.0 / top)
    return np.rint(scaled).astype(np.uint8)


# PS3.18 §8.3.5.1.3: crop the source region (sx, sy, |sw|, |sh|), flip it where sw / sh are
# negative, and scale it, aspect ratio kept, to the largest size that fits in vw x vh.
def _fit_viewport(display: NDArray[np.uint8], viewport: Viewport | None) -> Image.Image:
    if viewport is None:
        return Image.fromarray(np.ascontiguousarray(display))
    vw, vh, sx, sy, sw, sh = viewport
    rows, cols = display.shape[:2]
    x0, y0 = sx or 0, sy or 0
    if x0 >= cols or y0 >= rows:
        raise RenderError(f"viewport: source region starts at ({x0},{y0}), outside the {cols}x{rows} image")
    x1 = cols if sw is None else min(cols, x0 + abs(sw))
    y1 = rows if sh is None else min(rows, y0 + abs(sh))
    region = display[y0:y1, x0:x1]
    if sw is not None and sw < 0:
        region = region[:, ::-1]
    if sh is not None and sh < 0:
        region = region[::-1]
    image = Image.fromarray(np.ascontiguousarray(region))
    width, height = image.size
    scale = min(vw / width, vh / height)
    size = (max(1, min(vw, round(width * scale))), max(1, min(vh, round(height * scale))))
    if size == image.size:
        return image
    return image.resize(size, Image.Resampling.LANCZOS)
