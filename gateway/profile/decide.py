"""Pure: a node's configuration + its PACS profile -> the effective node every service uses.

Every setting that selects a behaviour for a PACS quirk (``query_model``, ``retrieve``, the
``quirks``) is chosen here, in one order (docs/architecture.md, "PACS profiles"):

1. **configured** (a value in the config file or the environment) always wins; the profile still
   says what it would have chosen, so the report can show the override;
2. **learned**: what the profile's facts imply;
3. **safe default**: the behaviour correct on every PACS, while nothing is known (the profile not
   taken yet, the probe failed, the fact could not be tested): PN matched locally and
   case-insensitively (the key widened), counts and ModalitiesInStudy computed when missing,
   ModalitiesInStudy filtered locally, no multi-valued OR sent, no relational C-FIND (fan-out);
   Study Root and C-GET, the standard's defaults, until the association says otherwise; no PACS
   result cap assumed (only the gateway's own ``max_results`` can be seen to cut an answer); idle
   query associations reused for the pool's 5 s, with the pool's one retry on a stale one.

The services never read a raw node's quirks (they are None when not configured): routes get
effective nodes from ``app.state.settings`` (published by :class:`gateway.profile.service.NodeProfiles`)
and :class:`gateway.search.SearchService` passes whatever it is given through :func:`safe_node`.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Literal, cast

from gateway.profile import facts as f
from gateway.profile.facts import PacsProfile, Value
from gateway.settings import DEFAULT_QUERY_IDLE_SECONDS, NodeQuirks, PacsNode, is_configured

SAFE_QUIRKS = NodeQuirks(case_sensitive_pn=True, compute_counts=True, compute_modalities=True,
                         modalities_in_study_matching=False, or_multiple_modalities=False,
                         relational_queries=False)
"""What every PACS can be served with, at the price of extra C-FINDs and local matching."""

SAFE_LIMITS: dict[str, float] = {
    # No cap known: an answer is flagged as possibly cut only at the gateway's own max_results.
    "result_cap": 0,
    # Reuse for the pool's time, with its one retry: correct on every PACS. A PACS that closed an
    # idle association is either seen closed when it is taken from the pool (skipped), or the
    # C-FIND/C-ECHO on it fails before any answer and runs once more on a fresh association
    # (gateway/dimse/pool.py pooled_find; both are read-only, so repeating them is harmless). No
    # reuse would be correct too, but costs an A-ASSOCIATE per C-FIND on every PACS, and the
    # profile can only shorten this (a PACS that keeps idle associations needs nothing else).
    "query_idle_seconds": DEFAULT_QUERY_IDLE_SECONDS,
}
"""The node-level settings the profile decides besides the quirks, at their safe values."""

QUIRKS: tuple[str, ...] = tuple(fl.name for fl in fields(NodeQuirks))
LIMITS: tuple[str, ...] = tuple(SAFE_LIMITS)
SETTINGS: tuple[str, ...] = ("query_model", "retrieve", *QUIRKS, *LIMITS)

BASED_ON: dict[str, tuple[str, ...]] = {
    "query_model": (f.FIND_MODELS,),
    "retrieve": (f.C_GET, f.C_MOVE, f.GET_COMPRESSED),
    "case_sensitive_pn": (f.PN_CASE_INSENSITIVE, f.PN_WILDCARD),
    "compute_counts": (f.RETURN_KEYS_STUDY, f.RETURN_KEYS_SERIES),
    "compute_modalities": (f.RETURN_KEYS_STUDY,),
    "modalities_in_study_matching": (f.MODALITIES_MATCHING,),
    "or_multiple_modalities": (f.OR_VALUES, f.MODALITIES_MATCHING),
    "relational_queries": (f.RELATIONAL,),
    "result_cap": (f.RESULT_CAP,),
    "query_idle_seconds": (f.IDLE,),
}
"""The facts each setting is learned from (the report shows the choice next to them)."""

Learned = bool | str | float | None
"""What the profile implies for a setting (None: nothing learned); a number for the LIMITS."""

Source = Literal["configured", "learned", "safe default"]
QueryModel = Literal["study", "patient"]
Retrieve = Literal["get", "move"]


@dataclass(frozen=True)
class Choice:
    setting: str             # "query_model", "retrieve" or a quirk's name
    value: bool | str | float  # what the node runs with
    source: Source
    learned: Learned         # what the profile alone would choose; None: nothing learned

    @property
    def overridden(self) -> bool:
        """A configured value stands in for what the profile would decide."""
        return self.source == "configured"


@dataclass(frozen=True)
class Resolution:
    node: PacsNode               # the effective node
    choices: tuple[Choice, ...]  # one per setting, in SETTINGS order

    def choice(self, setting: str) -> Choice:
        return next(c for c in self.choices if c.setting == setting)


def idle_keep(closed_after: float) -> float:
    """How long to keep idle query associations to a PACS that closed one after ``closed_after``
    seconds: half that (the PACS's clock starts at its last response, a little before our release),
    to 0.1 s; none below 0.2 s."""
    keep = int(closed_after * 5) / 10
    return keep if keep >= 0.2 else 0.0


def learned(profile: PacsProfile, *, move_available: bool = False) -> dict[str, Learned]:
    """What the profile's facts imply for each setting (None: not learned)."""
    models = str(profile.value(f.FIND_MODELS) or "").split()
    query_model: Value = "study" if "study" in models else "patient" if "patient" in models else None

    get, compressed = profile.value(f.C_GET), profile.value(f.GET_COMPRESSED)
    move = profile.value(f.C_MOVE) if move_available else None
    retrieve: Value = None
    if get is True and not (compressed is False and move is True):
        retrieve = "get"          # C-GET works (and compressed data can come that way, or nothing better)
    elif move is True:
        retrieve = "move"         # no C-GET, or a C-GET that cannot carry compressed data

    insensitive, wildcard = profile.value(f.PN_CASE_INSENSITIVE), profile.value(f.PN_WILDCARD)
    pn: Value = None if insensitive is None else not (insensitive is True and wildcard is not False)

    observed = any(profile.value(key) is not None for key in f.RETURN_KEYS.values())
    matching = profile.value(f.MODALITIES_MATCHING)
    or_values = profile.value(f.OR_VALUES)
    cap, idle = profile.value(f.RESULT_CAP), profile.value(f.IDLE)
    return {
        "query_model": query_model,
        "retrieve": retrieve,
        "case_sensitive_pn": pn,
        # Computing fills only what is missing: free where the PACS returns them, needed where not.
        "compute_counts": True if observed else None,
        "compute_modalities": True if observed else None,
        "modalities_in_study_matching": matching if isinstance(matching, bool) else None,
        # An OR the PACS does not honour is expanded into one C-FIND per value; ignored keys are local.
        "or_multiple_modalities": False if matching is False else
        (or_values if isinstance(or_values, bool) else None),
        "relational_queries": _bool_or_none(profile.value(f.RELATIONAL)),
        "result_cap": (profile.result_cap if cap is False and profile.result_cap else
                       0 if cap is True else None),
        "query_idle_seconds": (DEFAULT_QUERY_IDLE_SECONDS if idle is True else
                               idle_keep(profile.idle_kept_seconds) if idle is False
                               and profile.idle_kept_seconds is not None else None),
    }


def resolve(configured: PacsNode, profile: PacsProfile | None, *, move_available: bool = False) -> Resolution:
    """The effective node: configured values, else learned ones, else the safe defaults."""
    implied = learned(profile, move_available=move_available) if profile is not None else {}
    choices: list[Choice] = []
    for setting in SETTINGS:
        own = getattr(configured.quirks, setting) if setting in QUIRKS else getattr(configured, setting)
        guess = implied.get(setting)
        safe: bool | str | float
        if setting in QUIRKS:
            configured_here = own is not None
            safe = bool(getattr(SAFE_QUIRKS, setting))
        elif setting in LIMITS:
            configured_here = own is not None
            safe = SAFE_LIMITS[setting]
        else:
            configured_here = is_configured(own)
            safe = own          # an Unset, which reads as the standard's default
        if configured_here:
            choices.append(Choice(setting, own, "configured", guess))
        elif guess is not None:
            choices.append(Choice(setting, guess, "learned", guess))
        else:
            choices.append(Choice(setting, safe, "safe default", None))
    values = {c.setting: c.value for c in choices}
    node = replace(configured, query_model=cast(QueryModel, values["query_model"]),
                   retrieve=cast(Retrieve, values["retrieve"]),
                   quirks=NodeQuirks(**{q: bool(values[q]) for q in QUIRKS}),
                   result_cap=int(values["result_cap"]),
                   query_idle_seconds=float(values["query_idle_seconds"]))
    return Resolution(node, tuple(choices))


def safe_node(node: PacsNode) -> PacsNode:
    """``node`` with every quirk it leaves open at its safe value (an effective node is unchanged)."""
    if all(getattr(node.quirks, q) is not None for q in QUIRKS) and \
            all(getattr(node, setting) is not None for setting in LIMITS):
        return node
    return resolve(node, None).node


def _bool_or_none(value: Value) -> bool | None:
    return value if isinstance(value, bool) else None
