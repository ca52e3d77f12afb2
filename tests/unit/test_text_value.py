"""translators.qido_results.text_value on raw elements (read off their bytes for the ASCII VRs): the text
pydicom's converted value gives, on identifiers written and read back as a PACS's C-FIND answer is."""

from __future__ import annotations

from io import BytesIO

from hypothesis import given
from hypothesis import strategies as st
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filereader import read_dataset
from pydicom.filewriter import write_dataset

from translators import qido as q
from translators import qido_results as qr

uid = st.lists(st.integers(0, 10**12), min_size=2, max_size=8).map(lambda xs: ".".join(map(str, xs))).filter(
    lambda u: len(u) <= 64)
number = st.one_of(st.none(), st.integers(-(2**31), 2**31 - 1))


def _wire(ds: Dataset, implicit: bool) -> Dataset:
    """``ds`` as a PACS sends it and pydicom reads it: every element still raw."""
    fp = DicomBytesIO()
    fp.is_little_endian, fp.is_implicit_VR = True, implicit
    write_dataset(fp, ds)
    return read_dataset(BytesIO(fp.getvalue()), implicit, True)


@given(study=uid, series=uid, sop=uid, cls=uid, n=number, implicit=st.booleans())
def test_raw_text_equals_the_converted_value(study: str, series: str, sop: str, cls: str, n: int | None,
                                             implicit: bool) -> None:
    ds = Dataset()
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID, ds.SOPClassUID = study, series, sop, cls
    ds.InstanceNumber = n
    read = _wire(ds, implicit)
    assert qr.text_value(read, q.STUDY_UID) == study
    assert qr.text_value(read, q.SERIES_UID) == series
    assert qr.text_value(read, q.SOP_UID) == sop
    assert qr.text_value(read, q.SOP_CLASS_UID) == cls
    assert qr.text_value(read, q.INSTANCE_NUMBER) == ("" if n is None else str(n))
    # once pydicom converted an element, the same text comes from the converted value
    converted = _wire(ds, implicit)
    assert str(converted.SOPInstanceUID) == sop
    assert qr.text_value(converted, q.SOP_UID) == sop
    assert qr.text_value(converted, q.INSTANCE_NUMBER) == ("" if n is None else str(converted.InstanceNumber))


def test_absent_empty_and_padded_values() -> None:
    ds = Dataset()
    ds.SOPInstanceUID = ""
    ds.InstanceNumber = "  7 "
    read = _wire(ds, implicit=False)
    assert qr.text_value(read, q.SOP_UID) == ""          # present, zero length
    assert qr.text_value(read, q.SERIES_UID) == ""       # absent
    assert qr.text_value(read, q.INSTANCE_NUMBER) == "7"
    odd = _wire(Dataset(), implicit=False)
    odd.SOPInstanceUID = "1.2.3"                             # an element set in code, not read
    assert qr.text_value(odd, q.SOP_UID) == "1.2.3"
