"""Whether a received instance belongs to the study and series a retrieval asked for, by its header.

A retrieval may start before its manifest is known (docs/architecture.md, "Retrieval"), so an
arrival that no manifest lists yet must prove its identity itself. Routing does not: a C-GET's
sub-operations all belong to that C-GET, and a C-MOVE's are routed by Move Originator Message ID,
but PACS resolve a retrieve by the unique key of its level alone (Orthanc looks a SERIES-level
C-GET up by Series Instance UID and an IMAGE-level one by SOP Instance UID, ignoring the keys
above), so a URL naming the right series under a wrong study would otherwise get the series filed
and served under that study ("Identity"). The check reads the header only up to Series Instance
UID (group 0020) and runs only for arrivals no manifest vouches for: first without pydicom
(:func:`translators.part10_scan.study_series`, tens of microseconds on the association's thread),
and with pydicom's ``read_partial`` (~0.6 ms) only when that fast path does not cover the header or
does not find the URL's UIDs, so a refusal is always pydicom's verdict.
"""

from __future__ import annotations

from io import BytesIO

from pydicom.filereader import read_partial
from pydicom.tag import BaseTag

from translators.part10_scan import Unscannable, study_series

SERIES_INSTANCE_UID = 0x0020000E


def _past_series(tag: BaseTag, vr: str | None, length: int) -> bool:
    return bool(tag > SERIES_INSTANCE_UID)


def belongs(data: bytes, study: str, series: str) -> bool:
    """True when the Part-10 bytes' Study and Series Instance UIDs are ``study`` and ``series``;
    False too when the header cannot be read (the instance is then retrieved again once the
    manifest names it, or reported missing)."""
    try:
        if study_series(data) == (study, series):
            return True
    except Unscannable:
        pass
    try:
        ds = read_partial(BytesIO(data), stop_when=_past_series)
        found = (str(ds.get("StudyInstanceUID", "") or ""), str(ds.get("SeriesInstanceUID", "") or ""))
    except Exception:  # noqa: BLE001 - any unreadable header is simply not proof of membership
        return False
    return found == (study, series)
