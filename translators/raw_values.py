"""Text values of a C-FIND answer's ASCII elements, read without pydicom's value conversion.

A data set pydicom reads off the wire holds its elements raw until one is asked for; asking through
``Dataset.get`` / attribute access converts the element (a chain of hooks and value classes, ~15 us
each). The retrieval's IMAGE-level manifest reads five values of every match of a series (400
instances of a CT: ~40 ms of GIL-held time on the event loop, while the C-GET it overlaps needs the
same GIL; docs/architecture.md, "Retrieval"). The values it needs are UIs and an IS: their bytes are
the text (PS3.5 §6.2: default character repertoire, padded with a trailing NUL or space), so
:func:`text` reads them straight off the raw element (``Dataset.get_item``), ~1 us each.

Only for VRs whose value is ASCII whatever the Specific Character Set (AE, AS, CS, DA, DS, DT, IS,
TM, UI); a PN or LO needs pydicom's decoding.
"""

from __future__ import annotations

from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset

SOP_CLASS_UID = 0x00080016
SOP_INSTANCE_UID = 0x00080018
STUDY_INSTANCE_UID = 0x0020000D
SERIES_INSTANCE_UID = 0x0020000E
INSTANCE_NUMBER = 0x00200013


def text(ds: Dataset, tag: int) -> str:
    """The element's value as text ("" when absent or empty); a multi-valued one keeps its
    backslashes (the manifest's UIDs are single-valued: such a value matches nothing)."""
    elem = ds.get_item(tag)
    if elem is None:
        return ""
    value = elem.value
    if isinstance(elem, RawDataElement):
        if not value:
            return ""
        return bytes(value).decode("ascii", "replace").strip("\0 ")
    if value is None:
        return ""
    return str(value).strip("\0 ")
