"""DICOM JSON (PS3.18 Annex F) -> pydicom Dataset, fast, for values the gateway encoded itself.

pydicom's ``Dataset.from_json`` validates and converts every element on the way in and dominates a
cached QIDO answer's cost. The gateway only decodes JSON its own encoder wrote (cached C-FIND
results), so this builds the elements directly, without validation: strings stay strings,
numbers stay numbers, PN objects become ``Alphabetic=Ideographic=Phonetic`` text, ``null`` in a
multi-value becomes an empty value, sequences recurse, InlineBinary is base64-decoded. BulkDataURI
elements are dropped (never present in C-FIND results).
"""

from __future__ import annotations

import base64
from typing import Any

from pydicom import config
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

_PN_GROUPS = ("Alphabetic", "Ideographic", "Phonetic")
_NUMERIC_TEXT = frozenset({"IS", "DS"})


def _pn(value: Any) -> str:
    if not isinstance(value, dict):
        return "" if value is None else str(value)
    groups = [str(value.get(g, "") or "") for g in _PN_GROUPS]
    while groups and not groups[-1]:
        groups.pop()
    return "=".join(groups)


def _scalar(vr: str, value: Any) -> Any:
    if value is None:
        return "" if vr not in ("US", "SS", "UL", "SL", "FL", "FD", "SV", "UV") else None
    if vr == "PN":
        return _pn(value)
    if vr in _NUMERIC_TEXT:
        return str(value)
    if vr == "AT":
        return int(str(value), 16)
    return value


def dataset_from_json(obj: dict[str, Any]) -> Dataset:
    """The inverse of ``translators.dicom_json.dataset_to_json`` for C-FIND-like datasets."""
    ds = Dataset()
    for key, attr in obj.items():
        tag = int(key, 16)
        vr = str(attr.get("vr", "UN"))
        value: Any = None
        if vr == "SQ":
            value = Sequence([dataset_from_json(item) for item in attr.get("Value", [])])
        elif "InlineBinary" in attr:
            value = base64.b64decode(attr["InlineBinary"])
        elif "Value" in attr:
            values = [_scalar(vr, v) for v in attr["Value"]]
            value = values[0] if len(values) == 1 else values
        elif "BulkDataURI" in attr:
            continue
        ds.add(DataElement(tag, vr, value, validation_mode=config.IGNORE))
    return ds
