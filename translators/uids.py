"""DICOM UIDs and the identities built from them: the one definition of both.

A UID (PS3.5 §9.1) is at most 64 characters of digit components separated by single dots, no
component starting with 0 unless it is "0" itself. It is
checked with ``fullmatch`` on the whole string: ``re.match`` with ``$`` would accept a trailing
newline, and a UID with a newline would end up in keys, file names and URLs.

The identities name an object *on a node*: the same SOP Instance UID held by two PACS (after a
migration, or with test data) is two different objects, so everything the gateway caches or spools
is keyed by one of these, never by a bare UID (docs/architecture.md, "Identity").
"""

from __future__ import annotations

import re
from dataclasses import dataclass

MAX_UID_LENGTH = 64
_UID = re.compile(r"(?:0|[1-9][0-9]*)(?:\.(?:0|[1-9][0-9]*))*")


def is_uid(value: object) -> bool:
    """True for a syntactically valid UID (digits and dots, no empty component, no leading zero,
    <= 64 chars)."""
    return isinstance(value, str) and len(value) <= MAX_UID_LENGTH and _UID.fullmatch(value) is not None


class InvalidUid(ValueError):
    """A value that should be a UID is not one; the message names what it was for (the value is
    shown escaped and cut to 64 characters: it may carry control characters)."""


def check_uid(what: str, value: str) -> str:
    """``value`` when it is a UID, else :class:`InvalidUid` naming ``what`` (e.g. "study UID")."""
    if not is_uid(value):
        shown = value if len(value) <= 80 else value[:64] + "..."   # !r escapes control characters
        raise InvalidUid(f"{what} {shown!r} is not a valid UID (PS3.5 §9.1: digit components without "
                         f"leading zeros, separated by dots, at most {MAX_UID_LENGTH} characters)")
    return value


@dataclass(frozen=True, order=True)
class StudyId:
    node: str
    study: str


@dataclass(frozen=True, order=True)
class SeriesId:
    node: str
    study: str
    series: str

    @property
    def study_id(self) -> StudyId:
        return StudyId(self.node, self.study)


@dataclass(frozen=True, order=True)
class InstanceId:
    node: str
    study: str
    series: str
    sop: str

    @property
    def series_id(self) -> SeriesId:
        return SeriesId(self.node, self.study, self.series)
