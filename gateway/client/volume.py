"""Stack the instances of a series into a numpy volume in the patient (LPS) frame.

>>> from gateway.client import load_volume
>>> vol = load_volume(datasets)  # from pull_series(), or pydicom.dcmread()s   # doctest: +SKIP
>>> vol.array.shape, vol.array.dtype, vol.spacing                             # doctest: +SKIP
((24, 128, 128), dtype('int16'), (12.5, 2.734375, 2.734375))

Conventions (those of ITK and of PS3.3 C.7.6.2.1.1):

- ``array[k, j, i]``: slice ``k``, row ``j``, column ``i``; the values are the modality LUT output
  (Rescale Slope/Intercept, or the Modality LUT Sequence): Hounsfield units for CT.
- ``spacing`` is ``(z, y, x)`` in mm like the array axes: distance between slice centres, between
  rows (PixelSpacing[0]) and between columns (PixelSpacing[1]).
- ``origin`` is ``(x, y, z)`` in LPS mm: the centre of the first voxel (ImagePositionPatient of the
  first slice).
- ``direction`` rows are unit vectors in LPS: ``direction[0]`` the row direction (ImageOrientationPatient
  [0:3], column index ``i`` grows along it), ``direction[1]`` the column direction (IOP[3:6], row
  index ``j``), ``direction[2]`` their cross product, along which the slices are sorted (``k`` grows).
  ITK's direction matrix is its transpose.

The LPS position of voxel ``array[k, j, i]`` is
``origin + i*spacing[2]*direction[0] + j*spacing[1]*direction[1] + k*spacing[0]*direction[2]``
(:attr:`Volume.affine` as a 4x4 matrix on ``(i, j, k, 1)``).

To SimpleITK::

    img = sitk.GetImageFromArray(vol.array)
    img.SetSpacing(vol.spacing[::-1]); img.SetOrigin(vol.origin)
    img.SetDirection(vol.direction.T.flatten().tolist())
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from pydicom.dataset import Dataset
from pydicom.pixels.decoders.base import get_decoder
from pydicom.pixels.processing import apply_modality_lut

log = logging.getLogger(__name__)

__all__ = ["InconsistentSeriesError", "Volume", "load_volume"]

ORIENTATION_TOLERANCE = 1e-4
"""Largest difference between two slices' direction cosines that still counts as the same orientation."""


class InconsistentSeriesError(ValueError):
    """The instances do not form one regular volume (sizes, orientations, spacing or series differ)."""


@dataclass
class Volume:
    """A series as a volume; see the module docstring for the axis conventions."""

    array: np.ndarray
    """(z, y, x) voxel values after the modality LUT; int16 when exact, else float32."""
    spacing: tuple[float, float, float]
    """(z, y, x) in mm."""
    origin: tuple[float, float, float]
    """(x, y, z) LPS in mm of the centre of voxel [0, 0, 0]."""
    direction: np.ndarray
    """3x3: rows are the row, column and slice-normal direction cosines (LPS)."""
    datasets: list[Dataset] = field(repr=False)
    """The instances, sorted by position along the slice normal (InstanceNumber when no geometry)."""

    @property
    def shape(self) -> tuple[int, int, int]:
        z, y, x = self.array.shape
        return int(z), int(y), int(x)

    @property
    def affine(self) -> np.ndarray:
        """4x4 matrix from voxel index ``(i, j, k, 1)`` (column, row, slice) to LPS mm ``(x, y, z, 1)``."""
        m = np.eye(4)
        sz, sy, sx = self.spacing
        m[:3, 0] = self.direction[0] * sx
        m[:3, 1] = self.direction[1] * sy
        m[:3, 2] = self.direction[2] * sz
        m[:3, 3] = self.origin
        return m


@dataclass
class _Slice:
    ds: Dataset
    frame: int | None  # index into a multi-frame instance, None for single-frame
    position: np.ndarray | None
    orientation: np.ndarray | None
    pixel_spacing: tuple[float, float] | None
    thickness: float | None
    slope: float
    intercept: float
    instance_number: int


def _floats(value: Any, count: int) -> np.ndarray | None:
    if value is None:
        return None
    try:
        items = value if isinstance(value, Sequence | np.ndarray) and not isinstance(value, str) else [value]
        values = [float(v) for v in items]
    except (TypeError, ValueError):
        return None
    if len(values) != count or not all(np.isfinite(values)):
        return None
    return np.array(values, dtype=np.float64)


def _functional(ds: Dataset, frame: int | None, sequence: str, keyword: str) -> Any:
    """``keyword`` from the per-frame, then the shared functional group ``sequence`` (PS3.3 C.7.6.16)."""
    groups = []
    per_frame = ds.get("PerFrameFunctionalGroupsSequence")
    if frame is not None and per_frame is not None and frame < len(per_frame):
        groups.append(per_frame[frame])
    shared = ds.get("SharedFunctionalGroupsSequence")
    if shared:
        groups.append(shared[0])
    for group in groups:
        items = group.get(sequence)
        if items and keyword in items[0]:
            return items[0][keyword].value
    return None


def _attr(ds: Dataset, frame: int | None, sequence: str, keyword: str) -> Any:
    value = _functional(ds, frame, sequence, keyword)
    return ds.get(keyword) if value is None else value


def _number(value: Any, default: float) -> float:
    try:
        return default if value is None or value == "" else float(value)
    except (TypeError, ValueError):
        return default


def _slices(ds: Dataset) -> list[_Slice]:
    if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
        raise InconsistentSeriesError(
            f"instance {ds.get('SOPInstanceUID', '?')} (modality {ds.get('Modality', '?')}, SOP class "
            f"{ds.get('SOPClassUID', '?')}) has no pixel data: it cannot be part of a volume")
    frames = int(_number(ds.get("NumberOfFrames"), 1)) or 1
    out = []
    for index in range(frames):
        frame = index if frames > 1 else None
        spacing = _floats(_attr(ds, frame, "PixelMeasuresSequence", "PixelSpacing"), 2)
        out.append(_Slice(
            ds=ds,
            frame=frame,
            position=_floats(_attr(ds, frame, "PlanePositionSequence", "ImagePositionPatient"), 3),
            orientation=_floats(_attr(ds, frame, "PlaneOrientationSequence", "ImageOrientationPatient"), 6),
            pixel_spacing=None if spacing is None else (float(spacing[0]), float(spacing[1])),
            thickness=_number(_attr(ds, frame, "PixelMeasuresSequence", "SliceThickness"), 0.0) or None,
            slope=_number(_attr(ds, frame, "PixelValueTransformationSequence", "RescaleSlope"), 1.0),
            intercept=_number(_attr(ds, frame, "PixelValueTransformationSequence", "RescaleIntercept"), 0.0),
            instance_number=int(_number(ds.get("InstanceNumber"), 0)),
        ))
    return out


def _check_same(slices: list[_Slice], what: str, key: Any) -> None:
    counts = Counter(key(s) for s in slices)
    if len(counts) > 1:
        shown = ", ".join(f"{value} ({n} slices)" for value, n in counts.most_common())
        raise InconsistentSeriesError(f"the instances differ in {what}: {shown}")


def _unit_axes(orientation: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    row, col = orientation[:3], orientation[3:]
    row_norm, col_norm = np.linalg.norm(row), np.linalg.norm(col)
    if row_norm < 1e-6 or col_norm < 1e-6:
        raise InconsistentSeriesError(f"ImageOrientationPatient {orientation.tolist()} is degenerate")
    row, col = row / row_norm, col / col_norm
    normal = np.cross(row, col)
    normal_norm = np.linalg.norm(normal)
    if normal_norm < 1e-6:
        raise InconsistentSeriesError(f"ImageOrientationPatient {orientation.tolist()}: row and column "
                                      f"directions are parallel")
    return row, col, normal / normal_norm


def load_volume(datasets: Iterable[Dataset], *, strict: bool = True) -> Volume:
    """Sort the instances of one series by position and stack them into a :class:`Volume`.

    Slices are sorted by ImagePositionPatient projected on the slice normal (the cross product of the
    ImageOrientationPatient cosines); when any slice lacks that geometry, by InstanceNumber (then
    spacing and origin are only what the headers say). Multi-frame instances contribute one slice per
    frame (per-frame functional groups are honoured for enhanced CT/MR/PET).

    Raises :class:`InconsistentSeriesError` when the instances cannot form one regular volume:
    several series, no pixel data, colour images, different Rows/Columns, orientations or pixel
    spacings, two slices at one position (echoes, phases, time points). With ``strict`` (default) also
    when the slice spacing varies by more than 1 % (missing slices) or the slices are not stacked
    along their normal (gantry tilt); ``strict=False`` then uses the mean spacing and ignores the shear.

    >>> vol = load_volume(pull_series(root, study_uid, series_uid))   # doctest: +SKIP
    >>> hu = vol.array[12, 64, 64]                                      # doctest: +SKIP
    >>> lps = vol.affine @ [64, 64, 12, 1]  # that voxel's centre, mm   # doctest: +SKIP
    """
    items = list(datasets)
    if not items:
        raise InconsistentSeriesError("no instances to build a volume from")
    series = {str(ds.get("SeriesInstanceUID", "")) for ds in items}
    if len(series) > 1:
        raise InconsistentSeriesError(f"the instances belong to {len(series)} series; load one at a time")
    for ds in items:
        samples = int(_number(ds.get("SamplesPerPixel"), 1))
        if samples != 1:
            raise InconsistentSeriesError(
                f"instance {ds.get('SOPInstanceUID', '?')} has {samples} samples per pixel "
                f"({ds.get('PhotometricInterpretation', '?')}); load_volume builds grayscale volumes only")
    slices = [s for ds in items for s in _slices(ds)]
    _check_same(slices, "image size (Rows x Columns)",
                lambda s: f"{int(s.ds.get('Rows', 0))}x{int(s.ds.get('Columns', 0))}")

    geometric = all(s.position is not None and s.orientation is not None for s in slices)
    direction = np.eye(3)
    if geometric:
        first = slices[0].orientation
        assert first is not None
        for s in slices:
            assert s.orientation is not None
            if np.max(np.abs(s.orientation - first)) > ORIENTATION_TOLERANCE:
                raise InconsistentSeriesError(
                    f"the instances differ in orientation: ImageOrientationPatient {first.tolist()} vs "
                    f"{s.orientation.tolist()} (instance {s.ds.get('SOPInstanceUID', '?')})")
        row, col, normal = _unit_axes(first)
        direction = np.array([row, col, normal])
        along = {id(s): float(np.dot(s.position, normal)) for s in slices if s.position is not None}
        slices.sort(key=lambda s: (along[id(s)], s.instance_number, s.frame or 0))
    else:
        missing = sum(1 for s in slices if s.position is None or s.orientation is None)
        log.info("%d of %d slices lack ImagePositionPatient/ImageOrientationPatient: sorted by "
                 "InstanceNumber", missing, len(slices))
        slices.sort(key=lambda s: (s.instance_number, s.frame or 0))

    reference = slices[0].pixel_spacing
    for s in slices:
        same = (s.pixel_spacing is None) == (reference is None) and (
            reference is None or s.pixel_spacing is None
            or max(abs(a - b) for a, b in zip(s.pixel_spacing, reference, strict=True)) <= 1e-4)
        if not same:
            _check_same(slices, "PixelSpacing", lambda t: t.pixel_spacing)
    row_spacing, col_spacing = slices[0].pixel_spacing or (1.0, 1.0)

    z_spacing = _z_spacing(slices, direction[2], (row_spacing, col_spacing), geometric, strict)
    origin = slices[0].position if geometric and slices[0].position is not None else np.zeros(3)
    array = _stack(slices)
    ordered: list[Dataset] = []
    for s in slices:
        if not ordered or ordered[-1] is not s.ds:
            ordered.append(s.ds)
    return Volume(
        array=array,
        spacing=(float(z_spacing), float(row_spacing), float(col_spacing)),
        origin=(float(origin[0]), float(origin[1]), float(origin[2])),
        direction=direction,
        datasets=ordered,
    )


def _z_spacing(slices: list[_Slice], normal: np.ndarray, pixel: tuple[float, float], geometric: bool,
               strict: bool) -> float:
    header = _number(slices[0].ds.get("SpacingBetweenSlices"), 0.0) or slices[0].thickness or 1.0
    if not geometric or len(slices) < 2:
        return abs(header)
    positions = np.array([s.position for s in slices], dtype=np.float64)
    along = positions @ normal
    steps = np.diff(along)
    tolerance = 1e-3
    if np.min(steps) < tolerance:
        k = int(np.argmin(steps))
        raise InconsistentSeriesError(
            f"slices {k} and {k + 1} share a position ({along[k]:.3f} mm along the normal): the series "
            f"holds more than one volume (echoes, phases, time points?) or duplicate instances")
    mean = float((along[-1] - along[0]) / (len(slices) - 1))
    deviation = float(np.max(np.abs(steps - mean)))
    if strict and deviation > max(tolerance, 0.01 * mean):
        raise InconsistentSeriesError(
            f"the slice spacing varies from {float(np.min(steps)):.4g} to {float(np.max(steps)):.4g} mm "
            f"(missing slices or an irregular acquisition); load_volume(..., strict=False) uses the "
            f"mean {mean:.4g} mm")
    offsets = (positions - positions[0]) - np.outer(along - along[0], normal)
    shear = float(np.max(np.linalg.norm(offsets, axis=1)))
    if strict and shear > max(tolerance, 0.01 * min(pixel)):
        raise InconsistentSeriesError(
            f"the slices are not stacked along their normal (in-plane shift up to {shear:.3g} mm: gantry "
            f"tilt?); load_volume(..., strict=False) ignores the shear")
    return mean


def _decode(ds: Dataset, frame: int | None) -> np.ndarray:
    """Stored values of one frame (rows, columns), decoded without caching the array on ``ds``."""
    syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    try:
        if syntax and "PixelData" in ds:
            array, _ = get_decoder(syntax).as_array(ds, index=frame)
        else:  # float pixel data, or a dataset built in memory without file meta
            array = ds.pixel_array if frame is None else ds.pixel_array[frame]
    except Exception as exc:  # missing decoder plugin, corrupt data, ... (pydicom raises many types)
        raise InconsistentSeriesError(
            f"cannot decode the pixel data of instance {ds.get('SOPInstanceUID', '?')} (transfer syntax "
            f"{syntax or '?'}): {exc}") from exc
    return array.reshape(array.shape[-2:])


def _stack(slices: list[_Slice]) -> np.ndarray:
    """The modality LUT output of every slice: int16 when exact, else float32.

    Integer rescales of data up to 16 bits are computed in int32 and narrowed to int16 when every
    value fits; everything else (fractional slopes, PET, 32-bit data) is float32.
    """
    integral = all(float(s.slope).is_integer() and float(s.intercept).is_integer()
                   and abs(s.slope) <= 1 << 12 and abs(s.intercept) <= 1 << 24
                   and int(_number(s.ds.get("BitsAllocated"), 16)) <= 16 for s in slices)
    rows, cols = int(slices[0].ds.Rows), int(slices[0].ds.Columns)
    work = np.empty((len(slices), rows, cols), dtype=np.int32 if integral else np.float32)
    for k, s in enumerate(slices):
        stored = _decode(s.ds, s.frame)
        if stored.shape != (rows, cols):
            raise InconsistentSeriesError(f"instance {s.ds.get('SOPInstanceUID', '?')} decodes to "
                                          f"{stored.shape}, not {(rows, cols)}")
        if s.frame is None and "ModalityLUTSequence" in s.ds:
            values = apply_modality_lut(stored, s.ds)
            if integral and not np.all(np.mod(values, 1) == 0):
                work, integral = work.astype(np.float32), False
            work[k] = values
        elif integral:
            work[k] = stored.astype(np.int32) * int(s.slope) + int(s.intercept)
        else:
            work[k] = stored.astype(np.float64) * s.slope + s.intercept
    if integral:
        low, high = np.iinfo(np.int16).min, np.iinfo(np.int16).max
        if work.size == 0 or (int(work.min()) >= low and int(work.max()) <= high):
            return work.astype(np.int16)
    return work.astype(np.float32, copy=False)
