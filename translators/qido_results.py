"""C-FIND results -> the QIDO-RS answer: text values, merge across nodes, order, pages, URLs.

Pure functions (no I/O), the second half of the flow :mod:`translators.qido` starts: after the
C-FINDs and the local filters, :func:`merge` dedupes across nodes (PS3.18 §10.6.3: RetrieveAETitle
lists every node holding a result), :func:`sort_key` orders deterministically, :func:`page` slices
with limit/offset (§8.3.4.4), :func:`normalise_result` tidies each answer for DICOM JSON.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from pydicom.datadict import dictionary_VR
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset

from translators.qido import (
    INSTANCE_NUMBER,
    MODALITIES_IN_STUDY,
    N_SERIES_INSTANCES,
    N_STUDY_INSTANCES,
    N_STUDY_SERIES,
    QR_LEVEL,
    RETRIEVE_AET,
    SERIES_UID,
    SOP_UID,
    STUDY_UID,
    Level,
)


def uid_of(level: Level) -> int:
    return {"study": STUDY_UID, "series": SERIES_UID, "instance": SOP_UID}[level]


_ASCII_VRS = frozenset({"AE", "AS", "CS", "DA", "DS", "DT", "IS", "TM", "UI"})
"""VRs whose bytes are their text whatever the Specific Character Set (PS3.5 §6.2: default repertoire)."""


def text_value(ds: Dataset, tag: int) -> str:
    """The element's value as text (multi-values joined by backslash); "" when absent or empty.

    An element still raw (as read off the wire) in an ASCII VR is read off its bytes, each value
    stripped of its padding as pydicom strips it, instead of through pydicom's value conversion
    (~15 us an element, ~1 us so): the retrieval's IMAGE-level manifest reads five of every match
    of a series on the event loop while the C-GET it overlaps needs the GIL (docs/architecture.md,
    "Retrieval")."""
    raw = ds.get_item(tag)
    if raw is None:
        return ""
    if isinstance(raw, RawDataElement):
        vr = raw.VR or _dictionary_vr(tag)
        if vr in _ASCII_VRS:
            if not raw.value:
                return ""
            text = bytes(raw.value).decode("ascii", "replace")
            return "\\".join(v.strip("\0 ") for v in text.split("\\"))
    elem = ds.get(tag)
    if elem is None or elem.value is None:
        return ""
    value = elem.value
    if isinstance(value, list | tuple) or type(value).__name__ == "MultiValue":
        return "\\".join(str(v) for v in value)
    return str(value)


def _dictionary_vr(tag: int) -> str | None:
    try:
        return dictionary_VR(tag)
    except KeyError:   # private or unknown: pydicom decides
        return None


def _number(ds: Dataset, tag: int) -> float:
    try:
        return float(text_value(ds, tag).split("\\")[0])
    except ValueError:
        return float("inf")


def sort_key(level: Level) -> Callable[[Dataset], tuple[object, ...]]:
    """Deterministic order (§8.3.4.4.1: paging must be idempotent): newest study first, then
    series/instance number, UIDs as tie-breakers."""
    def study(ds: Dataset) -> tuple[object, ...]:
        # Descending date/time: invert the digits so a plain ascending sort gives newest first.
        date = text_value(ds, 0x00080020).ljust(8, "0")[:8]
        time = re.sub(r"[^0-9]", "", text_value(ds, 0x00080030)).ljust(6, "0")[:6]
        inv = "".join(chr(ord("9") - ord(c) + ord("0")) if c.isdigit() else c for c in date + time)
        return (inv, text_value(ds, STUDY_UID))

    def series(ds: Dataset) -> tuple[object, ...]:
        return (*study(ds), _number(ds, 0x00200011), text_value(ds, SERIES_UID))

    def instance(ds: Dataset) -> tuple[object, ...]:
        return (*series(ds), _number(ds, INSTANCE_NUMBER), text_value(ds, SOP_UID))

    return {"study": study, "series": series, "instance": instance}[level]


def normalise_result(ds: Dataset) -> Dataset:
    """Tidy one merged C-FIND response for DICOM JSON: drop QR level, normalise legacy DA/TM, and never
    emit an empty ModalitiesInStudy (OHIF's getModalities crashes on it; docs/architecture.md, "Search")."""
    if QR_LEVEL in ds:
        del ds[QR_LEVEL]
    for elem in list(ds):
        if elem.VR == "DA" and isinstance(elem.value, str) and elem.value:
            elem.value = re.sub(r"[.\-/]", "", elem.value)
        elif elem.VR == "TM" and isinstance(elem.value, str) and ":" in elem.value:
            elem.value = elem.value.replace(":", "")
    for tag in (MODALITIES_IN_STUDY, N_STUDY_SERIES, N_STUDY_INSTANCES, N_SERIES_INSTANCES,
                0x00080056, 0x00080201):
        if tag in ds and (ds[tag].value is None or ds[tag].value == "" or ds[tag].value == []):
            del ds[tag]
    return ds


def missing(ds: Dataset, tag: int) -> bool:
    return tag not in ds or ds[tag].value in (None, "", [])


@dataclass
class Merged:
    datasets: list[Dataset]
    nodes: dict[str, list[str]]   # result UID -> node names holding it, in config order


def merge(level: Level, per_node: Sequence[tuple[str, str, Sequence[Dataset]]]) -> Merged:
    """Federation: dedupe by UID keeping the first node's answer (config order); RetrieveAETitle
    (0008,0054) lists the AE titles of every node holding the result. ``per_node``: (name, aet, results)."""
    uid_tag = uid_of(level)
    out: dict[str, Dataset] = {}
    holders: dict[str, list[str]] = {}
    aets: dict[str, list[str]] = {}
    for name, aet, results in per_node:
        for ds in results:
            uid = text_value(ds, uid_tag)
            if not uid:
                continue
            if uid not in out:
                out[uid] = ds
            if name not in holders.setdefault(uid, []):
                holders[uid].append(name)
                aets.setdefault(uid, []).append(aet)
    for uid, ds in out.items():
        ds.add(DataElement(RETRIEVE_AET, "AE", aets[uid] if len(aets[uid]) > 1 else aets[uid][0]))
    return Merged(datasets=list(out.values()), nodes=holders)


@dataclass(frozen=True)
class Page:
    datasets: list[Dataset]
    more: bool      # results remain beyond this page (-> Warning 299)


def page(datasets: Sequence[Dataset], level: Level, limit: int | None, offset: int, cap: int) -> Page:
    """Sort, then slice per §8.3.4.4: results = min(max(0, matches - offset), cap, limit)."""
    ordered = sorted(datasets, key=sort_key(level))
    size = cap if limit is None else min(limit, cap)
    window = ordered[offset:offset + size]
    return Page(datasets=window, more=offset + len(window) < len(ordered))


def retrieve_url(base: str, level: Level, ds: Dataset) -> str | None:
    study = text_value(ds, STUDY_UID)
    if not study:
        return None
    url = f"{base}/studies/{study}"
    if level == "study":
        return url
    series = text_value(ds, SERIES_UID)
    if not series:
        return None
    url += f"/series/{series}"
    if level == "series":
        return url
    sop = text_value(ds, SOP_UID)
    return f"{url}/instances/{sop}" if sop else None



__all__ = ["Merged", "Page", "merge", "missing", "normalise_result", "page", "retrieve_url",
           "sort_key", "text_value", "uid_of"]
