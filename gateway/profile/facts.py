"""A node's PACS profile: one observation per fact, how it was tested and what came back.

The profile is what the probes (:mod:`gateway.profile.probe`) measured, nothing else: the choices
made from it are :mod:`gateway.profile.decide`'s. It is shared between replicas through the cache
(``cache.keys.pacs_profile``) as JSON, together with the PACS's Implementation Class UID and
Version Name (PS3.7 D.3.3.2), so an upgraded PACS is probed again.

No patient data, ever: observations say what was asked in general terms ("one PatientName the
PACS returned, case changed") and count what came back; names, IDs and UIDs found while probing
stay in the probe's local variables (docs/architecture.md, "PACS profiles").
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import orjson

FORMAT = 2
"""Bumped when the JSON changes incompatibly: an older stored profile is then a miss (re-probed)."""

Value = bool | str | None
"""A fact's machine-readable value; None: not tested, or inconclusive."""

# The facts, in report order.
ASSOCIATION = "association"
IDLE = "idle_associations"
FIND_MODELS = "find_models"
RETRIEVE_MODELS = "retrieve_models"
GET_STORAGE = "get_storage_contexts"
GET_COMPRESSED = "get_compressed_contexts"
PN_CASE_INSENSITIVE = "pn_case_insensitive"
PN_WILDCARD = "pn_wildcard"
RETURN_KEYS_STUDY = "return_keys_study"
RETURN_KEYS_SERIES = "return_keys_series"
RETURN_KEYS_INSTANCE = "return_keys_instance"
MODALITIES_MATCHING = "modalities_in_study_matching"
OR_VALUES = "or_multiple_values"
DATE_RANGES = "date_ranges"
RELATIONAL = "relational_queries"
RESULT_CAP = "result_cap"
C_GET = "c_get"
C_MOVE = "c_move"
MOVE_ORIGINATOR = "move_originator_id"
LATENCY = "latency"
NAGLE = "nagle"

FACTS: tuple[str, ...] = (ASSOCIATION, IDLE, FIND_MODELS, RETRIEVE_MODELS, GET_STORAGE, GET_COMPRESSED,
                          PN_CASE_INSENSITIVE, PN_WILDCARD, RETURN_KEYS_STUDY, RETURN_KEYS_SERIES,
                          RETURN_KEYS_INSTANCE, MODALITIES_MATCHING, OR_VALUES, DATE_RANGES, RELATIONAL,
                          RESULT_CAP, C_GET, C_MOVE, MOVE_ORIGINATOR, LATENCY, NAGLE)

RETURN_KEYS = {"study": RETURN_KEYS_STUDY, "series": RETURN_KEYS_SERIES, "instance": RETURN_KEYS_INSTANCE}


@dataclass(frozen=True)
class Observation:
    test: str            # how it was tested (no patient data)
    result: str          # what came back, in words (no patient data)
    value: Value = None  # machine-readable; None: not tested / inconclusive


def not_tested(test: str, why: str) -> Observation:
    return Observation(test, f"not tested: {why}")


@dataclass
class PacsProfile:
    node: str
    probed_at: float = 0.0                      # UNIX time the probe started
    seconds: float = 0.0                        # how long it took
    implementation_class_uid: str = ""          # of the PACS, from its A-ASSOCIATE-AC
    implementation_version_name: str = ""
    facts: dict[str, Observation] = field(default_factory=dict)
    missing: dict[str, list[str]] = field(default_factory=dict)   # level -> keywords never returned
    latency_ms: dict[str, float] = field(default_factory=dict)    # operation -> median milliseconds
    # The numbers behind two facts (None: not learned): the PACS's cap on C-FIND matches (RESULT_CAP
    # False), and how long an idle association stayed open (IDLE; the whole hold when kept).
    result_cap: int | None = None
    idle_kept_seconds: float | None = None
    format: int = FORMAT

    def value(self, fact: str) -> Value:
        seen = self.facts.get(fact)
        return seen.value if seen is not None else None

    @property
    def identity(self) -> tuple[str, str]:
        """Who answered: (Implementation Class UID, Implementation Version Name)."""
        return self.implementation_class_uid, self.implementation_version_name

    def to_json(self) -> bytes:
        return orjson.dumps(asdict(self))

    @classmethod
    def from_json(cls, data: bytes) -> PacsProfile | None:
        """The stored profile, or None for anything that is not one of this format (a miss)."""
        try:
            raw: Any = orjson.loads(data)
            if not isinstance(raw, dict) or raw.get("format") != FORMAT:
                return None
            facts = {str(k): Observation(str(v["test"]), str(v["result"]), _value(v.get("value")))
                     for k, v in dict(raw.get("facts") or {}).items()}
            return cls(node=str(raw["node"]), probed_at=float(raw["probed_at"]),
                       seconds=float(raw["seconds"]),
                       implementation_class_uid=str(raw["implementation_class_uid"]),
                       implementation_version_name=str(raw["implementation_version_name"]),
                       facts=facts,
                       missing={str(k): [str(x) for x in v]
                                for k, v in dict(raw.get("missing") or {}).items()},
                       latency_ms={str(k): float(v) for k, v in dict(raw.get("latency_ms") or {}).items()},
                       result_cap=_opt_number(raw.get("result_cap"), int),
                       idle_kept_seconds=_opt_number(raw.get("idle_kept_seconds"), float))
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError):
            return None


def _opt_number(value: object, kind: type[int] | type[float]) -> Any:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError("not a number")
    return kind(value)


def _value(value: object) -> Value:
    if value is None or isinstance(value, bool | str):
        return value
    raise ValueError("not a fact value")
