"""C-FIND attribute matching (PS3.4 C.2.2.2), as a pure function of two datasets.

Used in two places: the gateway filters what a PACS returned (PACS that match PN case-sensitively,
or ignore ModalitiesInStudy), and the in-process demo SCP answers C-FIND with it.

Matching types, by key value:

- zero length, or ``*`` alone: universal (C.2.2.2.3); matches even an absent candidate element;
- one value: single value matching (C.2.2.2.1); PN is case-insensitive by default and compared
  component by component (spaces around ``^`` and trailing empty components are ignored);
- several values: any of them (List of UID matching, C.2.2.2.2, for UI; for other VRs this is the
  gateway's "any of" reading of e.g. ``ModalitiesInStudy=CT\\MR``, since C.2.2.2.8 AND-matching needs
  extended negotiation);
- ``*`` / ``?`` in a value of a string VR other than DA, TM, DT, UI: wild card matching
  (C.2.2.2.4), case-sensitive except PN when asked;
- ``A-B``, ``-B``, ``A-`` for DA, TM, DT: range matching (C.2.2.2.5), inclusive; a partial time
  bound covers its whole precision (``-10`` includes 10:59:59.999999); DT offsets are honoured when
  both sides carry one; legacy ``YYYY.MM.DD`` dates and ``HH:MM:SS`` times are accepted;
- numeric VRs (IS, DS, US, FL...) compare as numbers;
- SQ with one item: the candidate matches if any of its items matches all item keys (C.2.2.2.6);
  no item or an empty item is universal.

A multi-valued candidate matches when any of its values does. A non-universal key against an absent
or empty candidate does not match. Combined date-time matching and empty value matching (C.2.2.2.7)
need extended negotiation and are not implemented.
"""

from __future__ import annotations

import copy
import math
import re
from collections.abc import Collection, Iterator
from datetime import datetime, timedelta
from decimal import Decimal, InvalidOperation
from typing import Any

from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.sequence import Sequence
from pydicom.tag import BaseTag, Tag

SPECIFIC_CHARACTER_SET = 0x00080005
QUERY_RETRIEVE_LEVEL = 0x00080052
QUERY_RETRIEVE_VIEW = 0x00080053
RETRIEVE_AE_TITLE = 0x00080054
INSTANCE_AVAILABILITY = 0x00080056
TIMEZONE_OFFSET_FROM_UTC = 0x00080201

DEFAULT_IGNORED_KEYS: frozenset[int] = frozenset(
    {
        SPECIFIC_CHARACTER_SET,  # describes the encoding, "never matched" (C.2.2.2)
        QUERY_RETRIEVE_LEVEL,
        QUERY_RETRIEVE_VIEW,
        RETRIEVE_AE_TITLE,
        INSTANCE_AVAILABILITY,
        TIMEZONE_OFFSET_FROM_UTC,  # qualifies DA/TM keys (C.4.1.1.3.2), is not itself matched
    }
)

_NUMERIC_VRS = frozenset({"IS", "DS", "US", "SS", "UL", "SL", "FL", "FD", "SV", "UV"})
_BINARY_VRS = frozenset({"OB", "OW", "OF", "OD", "OL", "OV", "UN"})
_FLOAT_VRS = frozenset({"FL", "FD"})

_MICROS_PER_DAY = 86_400_000_000
_TM = re.compile(r"(\d{2})(\d{2})?(\d{2})?(?:\.(\d{1,6}))?")
_DT_PART = r"\d{4}(?:\d{2}){0,5}(?:\.\d{1,6})?(?:[+-]\d{4})?"
_DT = re.compile(r"(\d{4})(\d{2})?(\d{2})?(\d{2})?(\d{2})?(\d{2})?(?:\.(\d{1,6}))?(?:([+-])(\d{2})(\d{2}))?")
_DT_RANGE = re.compile(rf"({_DT_PART})?-({_DT_PART})?")


def element_matches(
    key: DataElement, candidate: DataElement | None, *, pn_case_insensitive: bool = True
) -> bool:
    """Whether ``candidate`` matches the C-FIND key ``key`` (PS3.4 C.2.2.2)."""
    if _is_universal(key):
        return True
    if candidate is None:
        return False
    vr = _resolve_vr(key.VR, candidate.VR)
    if vr == "SQ":
        return _sequence_matches(key, candidate, pn_case_insensitive)
    key_values = [v for v in _values(key, vr) if not _is_empty_value(v)]
    candidate_values = [v for v in _values(candidate, vr) if not _is_empty_value(v)]
    return any(
        _value_matches(vr, kv, cv, pn_case_insensitive) for kv in key_values for cv in candidate_values
    )


def dataset_matches(
    identifier: Dataset,
    candidate: Dataset,
    *,
    pn_case_insensitive: bool = True,
    ignore: Collection[int] = DEFAULT_IGNORED_KEYS,
) -> bool:
    """Whether every key of ``identifier`` (except ``ignore``) matches ``candidate`` (PS3.4 C.2.2.2)."""
    for key in _keys(identifier):
        if int(key.tag) in ignore:
            continue
        if not element_matches(key, _get(candidate, key.tag), pn_case_insensitive=pn_case_insensitive):
            return False
    return True


def build_response(identifier: Dataset, candidate: Dataset, *, pn_case_insensitive: bool = True) -> Dataset:
    """The C-FIND response identifier for a matched ``candidate`` (PS3.4 C.4.1.2.3, C.2.2.2.6).

    Every key of ``identifier`` is returned with the candidate's value, zero-length if the candidate
    lacks it. Query/Retrieve Level is echoed from the request. A key sequence with one non-empty item
    returns the candidate's matching items reduced to the item keys; an empty key sequence (or empty
    item) returns the candidate's whole sequence. The candidate's Specific Character Set is always
    included when it has one, since the response values are encoded with it (C.4.1.1.3.2).
    """
    response = Dataset()
    for key in _keys(identifier):
        tag = int(key.tag)
        if tag == SPECIFIC_CHARACTER_SET:
            continue
        if tag == QUERY_RETRIEVE_LEVEL:
            response.add(copy.deepcopy(key))
            continue
        found = _get(candidate, key.tag)
        if _resolve_vr(key.VR, found.VR if found is not None else None) == "SQ":
            response.add(_sequence_response(key, found, pn_case_insensitive))
        elif found is None:
            response.add(DataElement(key.tag, _resolve_vr(key.VR, None), None))
        else:
            response.add(copy.deepcopy(found))
    charset = _get(candidate, BaseTag(SPECIFIC_CHARACTER_SET))
    if charset is not None and not charset.is_empty:
        response.add(copy.deepcopy(charset))
    elif SPECIFIC_CHARACTER_SET in identifier and not identifier[SPECIFIC_CHARACTER_SET].is_empty:
        response.add(copy.deepcopy(identifier[SPECIFIC_CHARACTER_SET]))
    return response


# --- helpers ---------------------------------------------------------------------------------------


def _keys(ds: Dataset) -> Iterator[DataElement]:
    for elem in ds:
        tag = elem.tag
        if tag.element == 0 or tag.group in (0x0000, 0x0002):
            continue  # group lengths, command and file meta elements are not keys
        yield elem


def _get(ds: Dataset, tag: BaseTag) -> DataElement | None:
    return ds[tag] if tag in ds else None


def _resolve_vr(vr: str, other: str | None) -> str:
    """Pick a concrete VR for dictionary-ambiguous ones like ``US or SS`` / ``OB or OW``."""
    if " or " not in vr:
        return vr
    if other and " or " not in other:
        return other
    return vr.split(" or ")[0]


def _values(elem: DataElement, vr: str) -> list[Any]:
    value = elem.value
    if value is None:
        return []
    if isinstance(value, MultiValue | list | tuple):
        return list(value)
    if isinstance(value, bytes) and vr not in _BINARY_VRS:
        # e.g. a UN candidate (implicit VR, unknown tag) compared as the key's string VR
        return value.decode("latin-1").split("\\")
    return [value]


def _is_empty_value(value: Any) -> bool:
    return value is None or (isinstance(value, str | bytes) and len(value) == 0) or str(value) == ""


def _is_universal(key: DataElement) -> bool:
    if key.VR == "SQ":
        items = key.value or []
        return len(items) == 0 or all(len(item) == 0 for item in items)
    values = [v for v in _values(key, key.VR) if not _is_empty_value(v)]
    if not values:
        return True
    if key.VR in _NUMERIC_VRS or key.VR in _BINARY_VRS or key.VR == "AT":
        return False
    return all(_text(v).strip() == "*" for v in values)


def _text(value: Any) -> str:
    if isinstance(value, bytes):
        return value.decode("latin-1")
    return str(value)


def _value_matches(vr: str, key: Any, candidate: Any, pn_case_insensitive: bool) -> bool:
    if vr in _NUMERIC_VRS:
        return _numbers_equal(key, candidate, vr in _FLOAT_VRS)
    if vr in _BINARY_VRS:
        return bool(key == candidate)
    if vr == "AT":
        return _tags_equal(key, candidate)
    k, c = _text(key), _text(candidate)
    if vr == "UI":
        return k.strip("\0 ") == c.strip("\0 ")
    if vr == "DA":
        return _date_matches(k, c)
    if vr == "TM":
        return _time_matches(k, c)
    if vr == "DT":
        return _datetime_matches(k, c)
    if vr == "PN":
        return _person_name_matches(k, c, pn_case_insensitive)
    return _string_matches(k.strip(), c.strip(), fold_case=False)


def _sequence_matches(key: DataElement, candidate: DataElement, pn_case_insensitive: bool) -> bool:
    if candidate.VR != "SQ" or not candidate.value:
        return False
    key_items = [item for item in key.value if len(item)]
    return any(
        dataset_matches(key_item, item, pn_case_insensitive=pn_case_insensitive)
        for key_item in key_items
        for item in candidate.value
    )


def _sequence_response(key: DataElement, found: DataElement | None, pn_case_insensitive: bool) -> DataElement:
    if found is None or found.VR != "SQ" or not found.value:
        return DataElement(key.tag, "SQ", Sequence())
    if _is_universal(key):
        return copy.deepcopy(found)
    key_items = [item for item in key.value if len(item)]
    items = []
    for item in found.value:
        matched = next(
            (k for k in key_items if dataset_matches(k, item, pn_case_insensitive=pn_case_insensitive)), None
        )
        if matched is not None:
            items.append(build_response(matched, item, pn_case_insensitive=pn_case_insensitive))
    return DataElement(key.tag, "SQ", Sequence(items))


# --- strings and person names ------------------------------------------------------------------------


def wildcard_match(pattern: str, text: str) -> bool:
    """PS3.4 C.2.2.2.4 wildcard matching (``*`` any run, ``?`` one character), in O(len(pattern) *
    len(text)) at worst: the greedy two-pointer walk that backs up only to the last ``*``. A regex
    translation would backtrack exponentially on keys like ``*?*?*?*?!`` (a request could stall the
    event loop for seconds)."""
    p = t = 0
    star, mark = -1, 0
    while t < len(text):
        if p < len(pattern) and (pattern[p] == "?" or pattern[p] == text[t]):
            p += 1
            t += 1
        elif p < len(pattern) and pattern[p] == "*":
            star, mark = p, t
            p += 1
        elif star >= 0:
            p, mark = star + 1, mark + 1
            t = mark
        else:
            return False
    while p < len(pattern) and pattern[p] == "*":
        p += 1
    return p == len(pattern)


def _string_matches(key: str, candidate: str, *, fold_case: bool) -> bool:
    if fold_case:
        key, candidate = key.casefold(), candidate.casefold()
    if "*" in key or "?" in key:
        return wildcard_match(key, candidate)
    return key == candidate


def _pn_groups(name: str) -> list[str]:
    """Alphabetic/ideographic/phonetic groups, each with components trimmed and trailing empties cut."""
    groups = ["^".join(part.strip() for part in group.split("^")).rstrip("^") for group in name.split("=")]
    while groups and not groups[-1]:
        groups.pop()
    return groups


def _person_name_matches(key: str, candidate: str, fold_case: bool) -> bool:
    key_groups, candidate_groups = _pn_groups(key), _pn_groups(candidate)
    if len(key_groups) == 1:
        # A single-group key (the usual case) may name any representation of the candidate.
        return any(_string_matches(key_groups[0], g, fold_case=fold_case) for g in candidate_groups if g)
    for index, group in enumerate(key_groups):
        if not group:
            continue
        other = candidate_groups[index] if index < len(candidate_groups) else ""
        if not _string_matches(group, other, fold_case=fold_case):
            return False
    return True


# --- numbers and tags --------------------------------------------------------------------------------


def _to_decimal(value: Any) -> Decimal | None:
    try:
        if isinstance(value, float) and not hasattr(value, "original_string"):
            return Decimal(repr(value))
        return Decimal(str(value).strip())
    except (InvalidOperation, ValueError):
        return None


def _numbers_equal(key: Any, candidate: Any, approximate: bool) -> bool:
    k, c = _to_decimal(key), _to_decimal(candidate)
    if k is None or c is None or not k.is_finite() or not c.is_finite():
        return False
    if approximate:
        # FL values went through float32: compare with a tolerance instead of exactly.
        return math.isclose(float(k), float(c), rel_tol=1e-6)
    return k == c


def _tags_equal(key: Any, candidate: Any) -> bool:
    try:
        return int(Tag(key)) == int(Tag(candidate))
    except (ValueError, TypeError, OverflowError):
        return False


# --- dates, times, date-times ------------------------------------------------------------------------


def _norm_date(value: str) -> str | None:
    value = value.strip()
    if len(value) == 10 and value[4] == "." and value[7] == ".":
        value = value.replace(".", "")  # ACR-NEMA "YYYY.MM.DD"
    if len(value) != 8 or not value.isdigit():
        return None
    try:
        datetime.strptime(value, "%Y%m%d")
    except ValueError:
        return None
    return value


def _date_matches(key: str, candidate: str) -> bool:
    c = _norm_date(candidate)
    if c is None:
        return False
    key = key.strip()
    if "-" not in key:
        return _norm_date(key) == c
    low_text, _, high_text = key.partition("-")
    low = _norm_date(low_text) if low_text.strip() else ""
    high = _norm_date(high_text) if high_text.strip() else "99999999"
    if low is None or high is None:
        return False
    return low <= c <= high


def _time_interval(value: str) -> tuple[int, int] | None:
    """(first, last) microsecond of the day covered by a possibly partial TM value."""
    value = value.strip().replace(":", "")
    m = _TM.fullmatch(value)
    if m is None:
        return None
    hh, mm, ss, frac = m.groups()
    if (frac is not None and ss is None) or (ss is not None and mm is None):
        return None
    hours, minutes, seconds = int(hh), int(mm or 0), int(ss or 0)
    if hours > 23 or minutes > 59 or seconds > 60:
        return None
    start = ((hours * 60 + minutes) * 60 + seconds) * 1_000_000
    if frac is not None:
        start += int(frac.ljust(6, "0"))
        unit = 10 ** (6 - len(frac))
    else:
        unit = 1_000_000 if ss is not None else 60_000_000 if mm is not None else 3_600_000_000
    return start, start + unit - 1


def _time_matches(key: str, candidate: str) -> bool:
    c = _time_interval(candidate)
    if c is None:
        return False
    point = c[0]
    key = key.strip()
    if "-" not in key:
        interval = _time_interval(key)
        return interval is not None and interval[0] <= point <= interval[1]
    low_text, _, high_text = key.partition("-")
    low = _time_interval(low_text) if low_text.strip() else (0, 0)
    high = _time_interval(high_text) if high_text.strip() else (0, _MICROS_PER_DAY)
    if low is None or high is None:
        return False
    return low[0] <= point <= high[1]


_Moment = tuple[datetime, datetime, int | None]  # first instant, last instant, UTC offset in minutes


def _datetime_interval(value: str) -> _Moment | None:
    m = _DT.fullmatch(value.strip())
    if m is None:
        return None
    year, month, day, hour, minute, second, frac, sign, off_h, off_m = m.groups()
    try:
        start = datetime(
            int(year),
            int(month or 1),
            int(day or 1),
            int(hour or 0),
            int(minute or 0),
            int(second or 0),
            int((frac or "0").ljust(6, "0")),
        )
        if frac is not None:
            end = start + timedelta(microseconds=10 ** (6 - len(frac)))
        elif second is not None:
            end = start + timedelta(seconds=1)
        elif minute is not None:
            end = start + timedelta(minutes=1)
        elif hour is not None:
            end = start + timedelta(hours=1)
        elif day is not None:
            end = start + timedelta(days=1)
        elif month is not None:
            end = start.replace(year=start.year + start.month // 12, month=start.month % 12 + 1)
        else:
            end = start.replace(year=start.year + 1)
        end -= timedelta(microseconds=1)
    except (ValueError, OverflowError):
        return None
    offset = None if sign is None else (1 if sign == "+" else -1) * (int(off_h) * 60 + int(off_m))
    return start, end, offset


def _comparable(moment: datetime, offset: int | None, other_offset: int | None) -> datetime:
    """Both sides in UTC when both carry an offset; otherwise compare the local values as written."""
    if offset is None or other_offset is None:
        return moment
    try:
        return moment - timedelta(minutes=offset)
    except OverflowError:
        return moment


def _datetime_matches(key: str, candidate: str) -> bool:
    c = _datetime_interval(candidate)
    if c is None:
        return False
    key = key.strip()
    low: _Moment | None
    high: _Moment | None
    single = _datetime_interval(key)
    if single is not None:
        low, high = single, single
    else:
        m = _DT_RANGE.fullmatch(key)
        if m is None:
            return False
        low = _datetime_interval(m.group(1)) if m.group(1) else None
        high = _datetime_interval(m.group(2)) if m.group(2) else None
        if (m.group(1) and low is None) or (m.group(2) and high is None):
            return False
    point = c[0]
    if low is not None and _comparable(point, c[2], low[2]) < _comparable(low[0], low[2], c[2]):
        return False
    if high is not None and _comparable(point, c[2], high[2]) > _comparable(high[1], high[2], c[2]):
        return False
    return True
