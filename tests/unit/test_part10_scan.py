"""translators.part10_scan: the ingest fast path gives pydicom's answers, or steps aside.

Every case is checked against the pydicom path it replaces (translators.frames.index_part10, the
read_partial in gateway.retrieval.membership); files it does not cover must raise Unscannable, never
give a different answer.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydicom import Dataset, dcmread
from pydicom.encaps import encapsulate
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRBigEndian, ImplicitVRLittleEndian, RLELossless

from gateway.retrieval.membership import belongs
from tests.unit.test_frames import PYDICOM_FILES, make_dataset, part10
from translators.frames import index_part10
from translators.part10_scan import MAX_DEPTH, Unscannable, index_native, study_series


def _nested(depth: int) -> Sequence:
    item = Dataset()
    item.CodeValue = "X"
    if depth > 1:
        item.ContentSequence = _nested(depth - 1)
    return Sequence([item])


def _ct(*, implicit: bool = False, frames: int = 1, sequences: bool = True, undefined: bool = True) -> bytes:
    arr = np.arange(frames * 6 * 5, dtype=np.uint16).reshape((frames, 6, 5) if frames > 1 else (6, 5))
    ds = make_dataset(arr)
    if implicit:
        ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
    if sequences:
        ds.ReferencedImageSequence = _nested(3)          # nested items before the image group
        ds.RequestAttributesSequence = Sequence([])      # an empty one
    data = part10(ds, implicit_vr=implicit)
    if not undefined:
        return data
    # pydicom keeps a sequence's length form: re-encode with undefined lengths everywhere.
    ds = dcmread(io.BytesIO(data))
    for elem in ds.iterall():
        if elem.VR == "SQ":
            elem.is_undefined_length = True
            for item in elem.value:
                item.is_undefined_length_sequence_item = True
    return part10(ds, implicit_vr=implicit)


CASES = {
    "explicit": _ct(),
    "implicit": _ct(implicit=True),
    "explicit, defined-length sequences": _ct(undefined=False),
    "implicit, no sequences": _ct(implicit=True, sequences=False),
    "multi-frame": _ct(frames=4),
    "rgb": part10(make_dataset(np.zeros((4, 3, 3), dtype=np.uint8), photometric="RGB")),
}


@pytest.mark.parametrize("name", list(CASES))
def test_native_index_and_uids_match_pydicom(name: str) -> None:
    data = CASES[name]
    assert index_native(data, len(data)) == index_part10(io.BytesIO(data))
    assert index_native(data[:4096], len(data)) == index_part10(io.BytesIO(data))   # the head is enough
    ds = dcmread(io.BytesIO(data), stop_before_pixels=True)
    assert study_series(data) == (ds.StudyInstanceUID, ds.SeriesInstanceUID)
    assert belongs(data, ds.StudyInstanceUID, ds.SeriesInstanceUID)
    assert not belongs(data, ds.StudyInstanceUID, "1.2.3.4")


def test_what_it_does_not_cover_is_left_to_pydicom() -> None:
    ds = make_dataset(np.zeros((2, 4, 4), dtype=np.uint8))
    encaps = dcmread(io.BytesIO(part10(ds)))
    encaps.PixelData = encapsulate([b"\xff\xd8ab\xff\xd9", b"\xff\xd8cd\xff\xd9"])
    encaps["PixelData"].is_undefined_length = True
    encaps.file_meta.TransferSyntaxUID = RLELossless
    no_pixels = dcmread(io.BytesIO(part10(ds)))
    del no_pixels.PixelData
    for data in (part10(encaps), part10(no_pixels)):
        with pytest.raises(Unscannable):
            index_native(data, len(data))
    explicit = part10(ds)
    assert explicit.count(b"1.2.840.10008.1.2.1\x00") == 1     # the meta's transfer syntax, same length
    with pytest.raises(Unscannable):
        study_series(explicit.replace(b"1.2.840.10008.1.2.1\x00", ExplicitVRBigEndian.encode() + b"\x00"))
    with pytest.raises(Unscannable):
        study_series(b"\x00" * 200)                      # no preamble
    data = CASES["explicit"]
    with pytest.raises(Unscannable):
        index_native(data[:300], len(data))             # the head ends before the pixel data


def test_deep_nesting_is_left_to_pydicom() -> None:
    ds = make_dataset(np.zeros((4, 4), dtype=np.uint16))
    ds.ReferencedImageSequence = _nested(MAX_DEPTH + 2)
    data = dcmread(io.BytesIO(part10(ds)))
    for elem in data.iterall():
        if elem.VR == "SQ":
            elem.is_undefined_length = True
            for item in elem.value:
                item.is_undefined_length_sequence_item = True
    raw = part10(data)
    with pytest.raises(Unscannable):
        index_native(raw, len(raw))
    assert index_part10(io.BytesIO(raw)) is not None


# Files shipped inside the locked pydicom wheel (others are downloaded on demand: not here).
@pytest.mark.parametrize("name", ["CT_small.dcm", "MR_small.dcm", "rtdose_rle.dcm", "SC_rgb_rle_2frame.dcm",
                                  "MR_small_bigendian.dcm", "MR_small_padded.dcm", "JPEG2000.dcm"])
def test_pydicom_sample_files(name: str) -> None:
    path = PYDICOM_FILES / name
    assert path.exists(), f"{name} is not shipped with this pydicom"
    data = path.read_bytes()
    assert data[128:132] == b"DICM", "a Part-10 file"
    _index_agrees(data)
    try:
        uids = study_series(data)
    except Unscannable:
        return
    ds = dcmread(io.BytesIO(data), stop_before_pixels=True)
    assert uids == (str(ds.get("StudyInstanceUID", "")), str(ds.get("SeriesInstanceUID", "")))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cut=st.integers(0, 2000), flips=st.lists(st.tuples(st.integers(0, 1999), st.integers(0, 255)), max_size=4))
def test_corrupt_headers_never_give_another_answer(cut: int, flips: list[tuple[int, int]]) -> None:
    """Truncated or corrupted: Unscannable, or the answer pydicom gives for the same bytes."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")    # pydicom's notes on corrupt headers
        _corrupt(cut, flips)


def _index_agrees(data: bytes) -> None:
    """The fast frame index is Unscannable or pydicom's."""
    try:
        fast = index_native(data, len(data))
    except Unscannable:
        return
    assert fast == index_part10(io.BytesIO(data))


def _corrupt(cut: int, flips: list[tuple[int, int]]) -> None:
    raw = bytearray(CASES["explicit"])
    for pos, value in flips:
        raw[pos % len(raw)] = value
    data = bytes(raw[:cut]) if cut < len(raw) else bytes(raw)
    _index_agrees(data)
    try:
        uids = study_series(data)
    except Unscannable:
        return
    try:
        ds = dcmread(io.BytesIO(data), stop_before_pixels=True, force=True)
        expected = (str(ds.get("StudyInstanceUID", "") or ""), str(ds.get("SeriesInstanceUID", "") or ""))
    except Exception:  # noqa: BLE001 - pydicom cannot read it: the fast path must not vouch for it either
        expected = None
    if expected is not None and uids != expected:
        # belongs() only trusts a fast match; a differing answer must not make a member of a non-member
        assert not belongs(data, uids[0] + "9", uids[1])


@pytest.mark.parametrize("name", sorted(CASES))
def test_the_data_set_offset_is_where_pydicom_says_the_meta_ends(name: str) -> None:
    from translators.part10_scan import data_set_offset

    data = CASES[name]
    meta_length = int(dcmread(io.BytesIO(data)).file_meta.FileMetaInformationGroupLength)
    offset = 132 + 12 + meta_length       # preamble, DICM, (0002,0000) and the group it measures
    assert data_set_offset(data) == offset == data_set_offset(data[:offset + 8])
    assert data_set_offset(memoryview(data)) == offset
    for not_part10 in (data[128:], data[:offset], data[:offset + 7], b"\0" * 300):
        with pytest.raises(Unscannable):
            data_set_offset(not_part10)


@given(data=st.binary(max_size=3000), cuts=st.lists(st.integers(0, 3000), max_size=12), draw=st.data())
def test_the_head_of_pieces_is_the_head_of_their_join(data: bytes, cuts: list[int], draw: st.DataObject) -> None:
    from translators.part10_scan import head_of

    # Mostly shorter than the data (the head is cut inside a piece), sometimes longer.
    size = draw.draw(st.integers(0, len(data) + 8), label="size")
    bounds = sorted({0, len(data), *(c for c in cuts if c <= len(data))})
    pieces: list[bytes | bytearray | memoryview] = []
    for k, (a, b) in enumerate(zip(bounds, bounds[1:], strict=False)):
        kind = (bytes, bytearray, memoryview)[k % 3]
        pieces.append(kind(data[a:b]))
    head = head_of(pieces, size)
    assert type(head) is bytes and head == data[:size]
