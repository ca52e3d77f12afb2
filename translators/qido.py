"""QIDO-RS query parameters -> C-FIND identifiers (the answer: :mod:`translators.qido_results`).

Pure functions (no I/O). PS3.18 §8.3.4 (query syntax), §10.6 (Search transaction), PS3.4 C.2.2.2
(matching) and C.6.1/C.6.2 (Patient/Study Root keys).

The flow the gateway runs with these:

1. :func:`parse_query` validates the request into a :class:`QidoQuery` (400 on malformed input;
   unknown parameters ignored with a warning, §8.3).
2. :func:`build_identifiers` gives, per node, the C-FIND identifier(s): default return keys per
   level, includefield keys, match keys; multi-valued CS keys become one identifier per value
   (OR semantics, e.g. ``ModalitiesInStudy=CT,MR``) unless the node ORs them itself.
3. After the C-FINDs: each plan's ``local_keys`` / ``translators.matching`` filter what the PACS
   could not; :mod:`translators.qido_results` merges, orders and pages the answers.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Literal

from pydicom.datadict import dictionary_VR, keyword_for_tag, tag_for_keyword
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence as DicomSequence

from translators.uids import is_uid

Level = Literal["study", "series", "instance"]
DIMSE_LEVEL: dict[str, str] = {"study": "STUDY", "series": "SERIES", "instance": "IMAGE"}

STUDY_UID = 0x0020000D
SERIES_UID = 0x0020000E
SOP_UID = 0x00080018
SOP_CLASS_UID = 0x00080016
INSTANCE_NUMBER = 0x00200013
MODALITIES_IN_STUDY = 0x00080061
MODALITY = 0x00080060
RETRIEVE_AET = 0x00080054
RETRIEVE_URL = 0x00081190
QR_LEVEL = 0x00080052
CHARSET = 0x00080005
N_STUDY_SERIES = 0x00201206
N_STUDY_INSTANCES = 0x00201208
N_SERIES_INSTANCES = 0x00201209
PATIENT_ID = 0x00100020

# Default return attributes, PS3.18 Table 10.6.3-3/-4/-5 (docs/architecture.md, "Search").
STUDY_DEFAULTS = (0x00080005, 0x00080020, 0x00080030, 0x00080050, 0x00080056, 0x00080061, 0x00080090,
                  0x00080201, 0x00100010, 0x00100020, 0x00100030, 0x00100040, STUDY_UID, 0x00200010,
                  N_STUDY_SERIES, N_STUDY_INSTANCES)
SERIES_DEFAULTS = (0x00080005, MODALITY, 0x00080201, 0x0008103E, STUDY_UID, SERIES_UID, 0x00200011,
                   N_SERIES_INSTANCES, 0x00400244, 0x00400245)
INSTANCE_DEFAULTS = (0x00080005, 0x00080016, SOP_UID, 0x00080056, 0x00080201, STUDY_UID, SERIES_UID,
                     0x00200013, 0x00280010, 0x00280011, 0x00280100, 0x00280008)

# Which level an attribute belongs to (PS3.4 C.6.1.1 / C.6.2.1). Anything unlisted is instance level.
PATIENT_LEVEL = frozenset({0x00100010, 0x00100020, 0x00100021, 0x00100030, 0x00100032, 0x00100040,
                           0x00101000, 0x00101001, 0x00102160, 0x00104000, 0x00201200, 0x00201202,
                           0x00201204})
STUDY_LEVEL = PATIENT_LEVEL | frozenset({
    0x00080020, 0x00080030, 0x00080050, 0x00080051, 0x00080056, 0x00080061, 0x00080062, 0x00080063,
    0x00080090, 0x00080201, 0x00081030, 0x00081032, 0x00081060, 0x00081080, 0x00101010, 0x00101020,
    0x00101030, 0x00102180, 0x001021B0, STUDY_UID, 0x00200010, N_STUDY_SERIES, N_STUDY_INSTANCES,
    0x00321032, 0x00321060})
SERIES_LEVEL = frozenset({
    MODALITY, 0x00080021, 0x00080031, 0x00080070, 0x00080080, 0x00081010, 0x0008103E, 0x00081050,
    0x00081070, 0x00081090, 0x00180015, 0x00181030, 0x00200060, 0x00200011, SERIES_UID, 0x00200052,
    N_SERIES_INSTANCES, 0x00400244, 0x00400245, 0x00400275, 0x00081111})
INSTANCE_ALL = (0x00080008, 0x00080016, SOP_UID, 0x00080022, 0x00080023, 0x00080032, 0x00080033,
                0x00080056, 0x00200012, 0x00200013, 0x00200020, 0x00280002, 0x00280004, 0x00280008,
                0x00280010, 0x00280011, 0x00280100, 0x00400512, 0x0040A043, 0x0040A491, 0x0040A493)

RESERVED_PARAMS = frozenset({"limit", "offset", "includefield", "fuzzymatching", "emptyvaluematching",
                             "multiplevaluematching", "accept", "charset", "_"})
_DA_RE = re.compile(r"^\d{8}$")
_TM_RE = re.compile(r"^\d{2}(\d{2}(\d{2}(\.\d{1,6})?)?)?$")
_DT_RE = re.compile(r"^\d{4}(\d{2}(\d{2}(\d{2}(\d{2}(\d{2}(\.\d{1,6})?)?)?)?)?)?([+-]\d{4})?$")
_NUMERIC_VRS = frozenset({"IS", "DS", "US", "SS", "UL", "SL", "FL", "FD", "SV", "UV"})
_BINARY_VRS = frozenset({"OB", "OD", "OF", "OL", "OV", "OW", "UN", "AT"})


class QueryError(ValueError):
    """The QIDO request is malformed (-> 400)."""


TagPath = tuple[int, ...]


@dataclass(frozen=True)
class MatchKey:
    path: TagPath          # (tag,) or (sequence tag, item tag)
    values: tuple[str, ...]  # one value, or several for OR / UID lists


@dataclass(frozen=True)
class QidoQuery:
    level: Level
    relational: bool = False
    study_uid: str | None = None
    series_uid: str | None = None
    matches: tuple[MatchKey, ...] = ()
    includefields: frozenset[TagPath] = frozenset()
    include_all: bool = False
    fuzzy: bool = False
    limit: int | None = None
    offset: int = 0
    warnings: tuple[str, ...] = ()

    def match_value(self, tag: int) -> MatchKey | None:
        return next((m for m in self.matches if m.path == (tag,)), None)


# ------------------------------------------------------------------------ parsing


def parse_attribute(name: str) -> TagPath | None:
    """``PatientName``, ``00100010`` (any case) or dotted sequence paths -> tag path; None if unknown."""
    path: list[int] = []
    for part in name.split("."):
        if re.fullmatch(r"[0-9A-Fa-f]{8}", part):
            path.append(int(part, 16))
            continue
        tag = tag_for_keyword(part)
        if tag is None:
            return None
        path.append(tag)
    return tuple(path) if path else None


def vr_of(tag: int) -> str:
    try:
        vr = dictionary_VR(tag)
    except KeyError:
        return "UN" if tag >> 16 & 1 else "LO"
    return vr.split(" or ")[0]


_ATTRIBUTE_NAME = re.compile(r"[A-Za-z0-9_]+(?:\.[A-Za-z0-9_]+)*")
_NO_WILDCARD_VRS = frozenset({"UI", "DA", "TM", "DT"}) | _NUMERIC_VRS
# Longest match value per VR (PS3.5 Table 6.2-1; ranges for DA/TM/DT, three component groups of 64
# for PN): a longer one cannot match anything, and it is not sent to a PACS.
_MAX_VALUE_LENGTH = {"AE": 16, "AS": 4, "CS": 16, "DA": 17, "DS": 16, "DT": 53, "IS": 12, "LO": 64,
                     "PN": 194, "SH": 16, "ST": 1024, "TM": 33, "UI": 64, "LT": 10240, "UC": 1024,
                     "UR": 1024, "UT": 1024}
MAX_VALUES_PER_KEY = 100
_CHARSET_VRS = frozenset({"SH", "LO", "UC", "ST", "LT", "UT", "PN"})


def _check_name(name: str, what: str) -> None:
    """Parameter names and includefield entries: keywords, tags and dotted paths only. Anything else
    (control characters, backslashes, non-ASCII) is malformed, not merely unknown."""
    if not _ATTRIBUTE_NAME.fullmatch(name) or len(name) > 128:
        raise QueryError(f"{what} {name[:64]!r} is not an attribute keyword, tag or sequence path")


def _check_value(name: str, vr: str, value: str) -> None:
    if len(value) > _MAX_VALUE_LENGTH.get(vr, 1024):
        raise QueryError(f"{name}: a {vr} value has at most {_MAX_VALUE_LENGTH.get(vr, 1024)} characters")
    if any(c < " " and c != "\t" for c in value):
        raise QueryError(f"{name}: control characters are not allowed in a match value")
    if vr not in _CHARSET_VRS and not value.isascii():
        # PS3.5 §6.1.2.2: only these VRs take Specific Character Set; the others are the default
        # repertoire, and a value outside it cannot even be encoded into the identifier.
        raise QueryError(f"{name}: {vr} values take ASCII characters only")
    if "\\" in value and vr not in ("UI", "CS"):
        # PS3.4 C.2.2.2: a value list (backslash) is List of UID Matching only; a CS list is our OR.
        raise QueryError(f"{name}: multiple values (\\) are only allowed for UIDs and code strings")
    if value == "" or value == "*":
        return
    has_wild = "*" in value or "?" in value
    if vr == "UI":
        if has_wild:
            raise QueryError(f"{name}: wildcards are not allowed in UIDs")
        if not is_uid(value):
            raise QueryError(f"{name}: {value!r} is not a valid UID")
        return
    if vr in ("DA", "TM", "DT"):
        if has_wild:
            raise QueryError(f"{name}: wildcards are not allowed for {vr} values")
        pattern = {"DA": _DA_RE, "TM": _TM_RE, "DT": _DT_RE}[vr]
        ends = value.split("-") if vr != "DT" else _split_dt_range(value)
        if len(ends) > 2 or not all(e == "" or pattern.match(e) for e in ends) or ends == ["", ""]:
            hint = {"DA": "YYYYMMDD", "TM": "HHMMSS", "DT": "YYYYMMDDHHMMSS"}[vr]
            raise QueryError(f"{name}: {value!r} is not a {vr} value or range ({hint}, A-B, -B or A-)")
        return
    if vr in _NUMERIC_VRS:
        try:
            float(value)
        except ValueError:
            raise QueryError(f"{name}: {value!r} is not a number") from None
        return
    if vr in _BINARY_VRS:
        raise QueryError(f"{name}: attributes of VR {vr} cannot be matched")


def _split_dt_range(value: str) -> list[str]:
    # A DT may carry a '-hhmm' UTC offset, so only a '-' that follows 14+ digits or starts the value splits.
    m = re.fullmatch(r"([^-]*(?:-\d{4})?)?-([^-]*(?:[+-]\d{4})?)?", value)
    if m and (m.group(1) or m.group(2)) and not _DT_RE.match(value):
        return [m.group(1) or "", m.group(2) or ""]
    return [value]


def _split_values(vr: str, value: str) -> tuple[str, ...]:
    """UID lists accept ',' and '\\' (OHIF sends backslash); CS lists mean OR
    (docs/architecture.md, "Search")."""
    if vr in ("UI", "CS") and ("," in value or "\\" in value):
        parts = tuple(p.strip() for p in re.split(r"[,\\]", value) if p.strip())
        return parts or ("",)
    return (value,)


def _parse_bool(name: str, value: str) -> bool:
    if value.lower() in ("true", "1", "yes"):
        return True
    if value.lower() in ("false", "0", "no", ""):
        return False
    raise QueryError(f"{name}: expected true or false, got {value!r}")


def _parse_uint(name: str, value: str) -> int:
    if not re.fullmatch(r"\d{1,9}", value.strip()):
        raise QueryError(f"{name}: expected a non-negative integer, got {value!r}")
    return int(value)


def parse_query(level: Level, params: Iterable[tuple[str, str]], *, study_uid: str | None = None,
                series_uid: str | None = None, relational: bool = False) -> QidoQuery:
    """Validate QIDO query parameters (PS3.18 §8.3.4). Raises QueryError for malformed input."""
    matches: dict[TagPath, MatchKey] = {}
    includes: set[TagPath] = set()
    include_all = fuzzy = False
    limit: int | None = None
    offset = 0
    warnings: list[str] = []
    for uid, label in ((study_uid, "study"), (series_uid, "series")):
        if uid is not None and not is_uid(uid):
            raise QueryError(f"{label} UID in the path: {uid!r} is not a valid UID")

    for raw_name, value in params:
        name = raw_name.strip()
        lname = name.lower()
        if lname == "limit":
            limit = _parse_uint(name, value)
        elif lname == "offset":
            offset = _parse_uint(name, value)
        elif lname == "includefield":
            for item in value.split(","):
                item = item.strip()
                if not item:
                    continue
                if item.lower() == "all":
                    include_all = True
                    continue
                _check_name(item, "includefield")
                path = parse_attribute(item)
                if path is None:
                    warnings.append(f"includefield {item!r} is not a known attribute and was ignored")
                else:
                    includes.add(path)
        elif lname == "fuzzymatching":
            fuzzy = _parse_bool(name, value)
        elif lname in ("emptyvaluematching", "multiplevaluematching"):
            if _parse_bool(name, value):
                warnings.append(f"The {lname} parameter is not supported. Only literal matching has been "
                                f"performed.")
        elif lname in RESERVED_PARAMS:
            continue
        else:
            _check_name(name, "query parameter")
            path = parse_attribute(name)
            if path is None:
                warnings.append(f"unknown query parameter {name!r} was ignored")
                continue
            vr = vr_of(path[-1])
            if len(path) > 2 or (len(path) == 2 and vr_of(path[0]) != "SQ"):
                raise QueryError(f"{name}: only one sequence level (Sequence.Attribute) is supported")
            if vr == "SQ":
                if value:
                    raise QueryError(f"{name}: a sequence can only be matched through its items "
                                     f"({name}.Attribute=value)")
                includes.add(path)
                continue
            for v in _split_values(vr, value):
                _check_value(name, vr, v)
            # "*" alone asks for anything; for VRs without wildcard matching (PS3.4 C.2.2.2.4) that is
            # universal matching, sent as an empty value.
            values = tuple("" if v == "*" and vr in _NO_WILDCARD_VRS else v for v in _split_values(vr, value))
            if path in matches:
                values = matches[path].values + values
            if len(values) > MAX_VALUES_PER_KEY:
                raise QueryError(f"{name}: more than {MAX_VALUES_PER_KEY} values")
            matches[path] = MatchKey(path, values)

    if fuzzy:
        warnings.append("The fuzzymatching parameter is not supported. Only literal matching has been "
                        "performed.")
    for tag, uid in ((STUDY_UID, study_uid), (SERIES_UID, series_uid)):
        if uid is not None:
            path = (tag,)
            given = matches.get(path)
            if given is not None and given.values != (uid,) and uid not in given.values:
                raise QueryError("a UID in the query contradicts the UID in the path")
            matches[path] = MatchKey(path, (uid,))
    return QidoQuery(level=level, relational=relational, study_uid=study_uid, series_uid=series_uid,
                     matches=tuple(matches.values()), includefields=frozenset(includes),
                     include_all=include_all, fuzzy=fuzzy, limit=limit, offset=offset,
                     warnings=tuple(warnings))


# ------------------------------------------------------------------------ identifiers


def level_of(tag: int) -> Level:
    if tag in STUDY_LEVEL:
        return "study"
    if tag in SERIES_LEVEL:
        return "series"
    return "instance"


_RANK = {"study": 0, "series": 1, "instance": 2}


def return_keys(query: QidoQuery) -> list[TagPath]:
    """Default + includefield keys for the query's level (PS3.18 §10.6.3.3): lower-level ones dropped."""
    keys: list[int] = list(STUDY_DEFAULTS if query.level == "study" else
                           SERIES_DEFAULTS if query.level == "series" else INSTANCE_DEFAULTS)
    if query.relational and query.level in ("series", "instance"):
        keys += STUDY_DEFAULTS          # §10.6.3.3.2/3: relational results carry study attributes
        if query.level == "instance":
            keys += SERIES_DEFAULTS
    if query.include_all:
        keys += sorted(STUDY_LEVEL)
        if query.level != "study":
            keys += sorted(SERIES_LEVEL - {0x00400275, 0x00081111})
        if query.level == "instance":
            keys += INSTANCE_ALL
    paths: list[TagPath] = [(t,) for t in dict.fromkeys(keys) if t]
    for path in sorted(query.includefields):
        if _RANK[level_of(path[0])] <= _RANK[query.level] and path not in paths:
            paths.append(path)
    return paths


def _put(ds: Dataset, path: TagPath, value: str) -> None:
    if len(path) == 1:
        ds.add(DataElement(path[0], vr_of(path[0]), value or None))
        return
    seq_tag, item_tag = path
    if seq_tag in ds and ds[seq_tag].value:
        item = ds[seq_tag].value[0]
    else:
        item = Dataset()
        ds.add(DataElement(seq_tag, "SQ", DicomSequence([item])))
    item.add(DataElement(item_tag, vr_of(item_tag), value or None))


@dataclass(frozen=True)
class NodeCapabilities:
    """The quirks of one node that change the identifier (from settings.NodeQuirks)."""

    case_sensitive_pn: bool = False
    modalities_in_study_matching: bool = True
    or_multiple_values: bool = False


@dataclass
class FindPlan:
    """The C-FIND identifiers for one node and the keys to re-check locally on their results."""

    identifiers: list[Dataset]
    local_keys: list[MatchKey] = field(default_factory=list)


class TooManyQueries(QueryError):
    """The OR branches of a query would need more C-FINDs than the request may run."""


def build_identifiers(query: QidoQuery, caps: NodeCapabilities = NodeCapabilities(),
                      *, dimse_level: str | None = None, max_identifiers: int | None = None) -> FindPlan:
    """PS3.4 C.6.2.1: one identifier per OR branch, return keys zero-length, match keys valued.

    The number of identifiers (the product of the OR branches' value counts) is checked against
    ``max_identifiers`` before any is built: :class:`TooManyQueries` names the parameters."""
    base = Dataset()
    base.QueryRetrieveLevel = dimse_level or DIMSE_LEVEL[query.level]
    for path in return_keys(query):
        if path[0] in (CHARSET,):
            continue
        _put(base, path, "")
    local: list[MatchKey] = []
    branches: list[MatchKey] = []
    non_ascii = False
    for key in query.matches:
        vr = vr_of(key.path[-1])
        if _RANK[level_of(key.path[0])] > _RANK[query.level] and key.path[0] not in (STUDY_UID, SERIES_UID):
            # A lower-level key cannot be matched at this level (PS3.4 C.2.2.1.1): ignore it.
            continue
        widen = (vr == "PN" and caps.case_sensitive_pn and key.values != ("",)) or (
            key.path == (MODALITIES_IN_STUDY,) and not caps.modalities_in_study_matching)
        if widen:
            local.append(key)
            _put(base, key.path, "")
            continue
        if len(key.values) > 1 and vr != "UI" and not caps.or_multiple_values:
            branches.append(key)
            continue
        value = "\\".join(key.values)
        non_ascii |= not value.isascii()
        _put(base, key.path, value)
    if non_ascii:
        base.SpecificCharacterSet = "ISO_IR 192"

    count = math.prod(len(key.values) for key in branches)
    if max_identifiers is not None and count > max_identifiers:
        names = ", ".join(".".join(keyword(t) for t in key.path) for key in branches)
        raise TooManyQueries(f"the values of {names} combine into {count} C-FINDs; at most "
                             f"{max_identifiers} are allowed per request")
    identifiers = [base]
    for key in branches:   # OR semantics: the cartesian product of the branches' values
        expanded: list[Dataset] = []
        for ident in identifiers:
            for value in key.values:
                copy = _copy(ident)
                _put(copy, key.path, value)
                expanded.append(copy)
        identifiers = expanded
    return FindPlan(identifiers=identifiers, local_keys=local)


def _copy(ds: Dataset) -> Dataset:
    out = Dataset()
    for elem in ds:
        if elem.VR == "SQ":
            out.add(DataElement(elem.tag, "SQ", DicomSequence([_copy(i) for i in elem.value])))
        else:
            out.add(DataElement(elem.tag, elem.VR, elem.value))
    return out


def local_identifier(keys: Sequence[MatchKey]) -> Dataset:
    """The identifier to re-check results against with translators.matching."""
    ds = Dataset()
    for key in keys:
        _put(ds, key.path, "\\".join(key.values))
    return ds


def keyword(tag: int) -> str:
    return keyword_for_tag(tag) or f"{tag:08X}"


__all__ = ["QidoQuery", "QueryError", "MatchKey", "NodeCapabilities", "FindPlan", "parse_query",
           "build_identifiers", "local_identifier", "return_keys", "keyword"]
