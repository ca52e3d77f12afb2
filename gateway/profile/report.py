"""A node's profile as people read it: one row per fact (how tested, result, the behaviour chosen
from it, whether configuration overrode it), the attributes the PACS never returns and whether the
gateway fills them; as JSON (``GET /admin/nodes/{name}/profile``, ``probe --json``) and as a text
table (``dicomweb-gateway probe``). Built from the profile and the resolution only, so it can hold
no patient data either (docs/architecture.md, "PACS profiles")."""

from __future__ import annotations

import datetime as dt
import textwrap
from typing import Any

from gateway.profile import facts as f
from gateway.profile.decide import BASED_ON, LIMITS, Choice, Resolution
from gateway.profile.facts import PacsProfile
from gateway.settings import PacsNode

TITLES = {
    f.ASSOCIATION: "association", f.IDLE: "idle associations", f.FIND_MODELS: "query models",
    f.RETRIEVE_MODELS: "retrieve models",
    f.GET_STORAGE: "C-GET storage contexts", f.GET_COMPRESSED: "C-GET compressed contexts",
    f.PN_CASE_INSENSITIVE: "PN case", f.PN_WILDCARD: "PN trailing wildcard",
    f.RETURN_KEYS_STUDY: "study return keys", f.RETURN_KEYS_SERIES: "series return keys",
    f.RETURN_KEYS_INSTANCE: "instance return keys", f.MODALITIES_MATCHING: "ModalitiesInStudy key",
    f.OR_VALUES: "multi-valued OR", f.DATE_RANGES: "date ranges", f.RELATIONAL: "relational queries",
    f.RESULT_CAP: "result cap", f.C_GET: "C-GET", f.C_MOVE: "C-MOVE",
    f.MOVE_ORIGINATOR: "Move Originator ID", f.LATENCY: "latency", f.NAGLE: "Nagle stalls",
}

_EFFECTS: dict[str, dict[object, str]] = {
    "query_model": {"study": "queries and retrieves in Study Root",
                    "patient": "Patient Root: PatientID looked up first"},
    "retrieve": {"get": "WADO-RS retrieves by C-GET",
                 "move": "WADO-RS retrieves by C-MOVE to the storage SCP"},
    "case_sensitive_pn": {True: "PN keys sent universal, matched locally (case-insensitive)",
                          False: "PN keys sent to the PACS"},
    "compute_counts": {True: "missing counts computed by lower-level C-FINDs",
                       False: "missing counts left out"},
    "compute_modalities": {True: "missing ModalitiesInStudy computed",
                           False: "missing ModalitiesInStudy left out"},
    "modalities_in_study_matching": {True: "ModalitiesInStudy sent to the PACS",
                                     False: "ModalitiesInStudy filtered locally"},
    "or_multiple_modalities": {True: "multi-valued keys sent as one", False: "one C-FIND per value"},
    "relational_queries": {True: "relational C-FIND", False: "fan-out through the hierarchy"},
}

_COMPUTED = {"NumberOfStudyRelatedSeries": "compute_counts",
             "NumberOfStudyRelatedInstances": "compute_counts",
             "NumberOfSeriesRelatedInstances": "compute_counts", "ModalitiesInStudy": "compute_modalities"}


def _shown(value: object) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


def _limit_effect(setting: str, value: object) -> str:
    """What a number-valued setting (``result_cap``, ``query_idle_seconds``) does."""
    if setting == "result_cap":
        return (f"an answer of exactly {value} matches gets a Warning 299 (possibly cut)" if value else
                "no PACS cap assumed: only the gateway's max_results is seen to cut an answer")
    if setting == "query_idle_seconds":
        return ("idle query associations closed at once (not reused)" if not value else
                f"idle query associations reused for {value:g} s")
    return ""


def behaviour(choice: Choice, profile: PacsProfile | None = None) -> str:
    """``case_sensitive_pn = true (learned): PN keys sent universal, ...``"""
    effect = (_limit_effect(choice.setting, choice.value) if choice.setting in LIMITS
              else _EFFECTS.get(choice.setting, {}).get(choice.value, ""))
    computed = [k for k, setting in _COMPUTED.items() if setting == choice.setting]
    if profile is not None and choice.value is True and computed and f.RETURN_KEYS_STUDY in profile.facts \
            and not any(k in keys for keys in profile.missing.values() for k in computed):
        effect = "the PACS returns them (computed only where one is missing)"
    return f"{choice.setting} = {_shown(choice.value)} ({choice.source})" + (f": {effect}" if effect else "")


def overridden(choice: Choice) -> str:
    if not choice.overridden:
        return "no"
    if choice.learned is None:
        return "yes (nothing learned)"
    agrees = "agrees" if choice.learned == choice.value else "differs"
    return f"yes (profile: {_shown(choice.learned)}, {agrees})"


def rows(profile: PacsProfile | None, resolution: Resolution) -> list[dict[str, str]]:
    """One row per fact in report order; each setting's choice on the row of the first fact it rests on."""
    by_fact: dict[str, list[Choice]] = {}
    for choice in resolution.choices:
        by_fact.setdefault(BASED_ON[choice.setting][0], []).append(choice)
    out = []
    for fact in f.FACTS:
        seen = profile.facts.get(fact) if profile is not None else None
        chosen = by_fact.get(fact, [])
        out.append({
            "fact": fact, "title": TITLES[fact],
            "test": seen.test if seen is not None else "",
            "result": seen.result if seen is not None else "not probed yet",
            "behaviour": "; ".join(behaviour(c, profile) for c in chosen) or "-",
            "overridden": "; ".join(overridden(c) for c in chosen) or "-",
        })
    return out


def never_returned(profile: PacsProfile | None, resolution: Resolution) -> dict[str, list[dict[str, str]]]:
    """Per level, each attribute the PACS never returned and whether (how) the gateway fills it."""
    if profile is None:
        return {}
    node = resolution.node
    out: dict[str, list[dict[str, str]]] = {}
    for level, keywords in profile.missing.items():
        items = []
        for keyword in keywords:
            setting = _COMPUTED.get(keyword)
            if setting is not None and getattr(node.quirks, setting):
                filled = "computed by lower-level C-FINDs"
            elif keyword == "SOPClassUID":
                filled = "from the spooled header once the instance was retrieved; otherwise left out"
            else:
                filled = "not filled: left out of the answer"
            items.append({"attribute": keyword, "filled": filled})
        out[level] = items
    return out


def as_json(node: PacsNode, state: str, error: str | None, profile: PacsProfile | None,
            resolution: Resolution) -> dict[str, Any]:
    return {
        "node": node.name,
        "state": state,
        "error": error,
        "probed_at": _time(profile.probed_at) if profile is not None else None,
        "probe_seconds": profile.seconds if profile is not None else None,
        "implementation": None if profile is None else {
            "class_uid": profile.implementation_class_uid,
            "version_name": profile.implementation_version_name},
        "facts": rows(profile, resolution),
        "settings": [{"setting": c.setting, "value": c.value, "source": c.source, "learned": c.learned,
                      "overridden": c.overridden} for c in resolution.choices],
        "never_returned": never_returned(profile, resolution),
        "latency_ms": profile.latency_ms if profile is not None else {},
    }


def _time(epoch: float) -> str:
    return dt.datetime.fromtimestamp(epoch, dt.UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


COLUMNS = (("FACT", "title", 24), ("HOW TESTED", "test", 40), ("RESULT", "result", 40),
           ("BEHAVIOUR CHOSEN", "behaviour", 44), ("OVERRIDDEN", "overridden", 14))


def as_text(report: dict[str, Any]) -> str:
    """The JSON report as a readable table (``dicomweb-gateway probe``)."""
    lines = [f"node {report['node']}: {report['state']}"
             + (f", probed {report['probed_at']} in {report['probe_seconds']:.1f} s"
                if report["probed_at"] else "")]
    if report["implementation"]:
        impl = report["implementation"]
        lines.append(f"implementation: {impl['class_uid'] or '?'} {impl['version_name']}".rstrip())
    if report["error"]:
        lines.append(f"last probe failed: {report['error']}")
    lines.append("")
    lines.append(_row([title for title, _, _ in COLUMNS]))
    lines.append(_row(["-" * width for _, _, width in COLUMNS]))
    for item in report["facts"]:
        lines.append(_row([str(item[key]) for _, key, _ in COLUMNS]))
    missing = report["never_returned"]
    if any(missing.values()):
        lines += ["", "attributes the PACS never returned:"]
        for level, items in missing.items():
            for item in items:
                lines.append(f"  {level:<9} {item['attribute']:<34} {item['filled']}")
    return "\n".join(lines) + "\n"


def _row(cells: list[str]) -> str:
    wrapped = [textwrap.wrap(cell, width, break_on_hyphens=False) or [""]
               for cell, (_, _, width) in zip(cells, COLUMNS, strict=True)]
    height = max(len(w) for w in wrapped)
    out = []
    for i in range(height):
        out.append("  ".join(f"{(w[i] if i < len(w) else ''):<{width}}"
                             for w, (_, _, width) in zip(wrapped, COLUMNS, strict=True)).rstrip())
    return "\n".join(out)
