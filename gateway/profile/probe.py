"""One probe of one node, every step in order, into a :class:`~gateway.profile.facts.PacsProfile`.

Order matters: the association says which query model to ask in; the queries find the study,
series and instance the retrieve and transport probes use. One step runs beside the others: a
second association held idle a little longer than the query pool keeps idle ones, to see whether
the PACS closes it first (~5 s, so it overlaps the rest instead of adding to it).

A step that fails becomes its observation ("failed: ...") and the rest goes on; only an
association that cannot be opened at all fails the probe (the node is down: nothing is learned, the
previous profile or the safe defaults stay). Read-only throughout (docs/architecture.md, "PACS profiles").
"""

from __future__ import annotations

import asyncio
import logging
import time

from gateway.pacs import Pacs
from gateway.profile import facts as f
from gateway.profile.facts import Observation, PacsProfile, not_tested
from gateway.profile.queries import QueryProbe, Sample
from gateway.profile.transfers import (
    MODELS,
    STORAGE_CLASSES,
    VERIFICATION,
    MoveProbe,
    association_observations,
    probe_get,
    probe_move,
    probe_transport,
    proposal,
    with_model,
)
from gateway.settings import DEFAULT_QUERY_IDLE_SECONDS, PacsNode
from translators.syntaxes import NATIVE

log = logging.getLogger(__name__)

IDLE_MARGIN = 0.5
"""Seconds the idle probe holds its association beyond the time the query pool keeps one idle."""


async def identity(pacs: Pacs, node: PacsNode) -> tuple[str, str]:
    """(Implementation Class UID, Version Name) of the PACS now: one association, Verification only."""
    facts = await pacs.associate_probe(node, [(VERIFICATION, NATIVE)])
    return facts.implementation_class_uid, facts.implementation_version_name


async def probe_node(pacs: Pacs, node: PacsNode, *, move: MoveProbe | None = None) -> PacsProfile:
    """Measure ``node``'s PACS; raises the error tree only when no association comes about."""
    started = time.monotonic()
    profile = PacsProfile(node.name, probed_at=time.time())
    facts = await pacs.associate_probe(node, proposal(), scp_roles=STORAGE_CLASSES)
    profile.implementation_class_uid = facts.implementation_class_uid
    profile.implementation_version_name = facts.implementation_version_name
    profile.facts.update(association_observations(facts))
    accepted = {a for a, _, _ in facts.accepted}
    models = str(profile.value(f.FIND_MODELS) or "").split()
    retrieve_models = str(profile.value(f.RETRIEVE_MODELS) or "")
    model = "study" if "study" in models else "patient" if "patient" in models else node.query_model
    asking = with_model(node, model)

    sample = None
    find_seconds: list[float] = []
    idle: asyncio.Task[tuple[Observation, float | None]] | None = None
    try:
        if MODELS[asking.query_model]["FIND"] in accepted:
            # Only the query pool keeps idle associations; a store-only node is not held at all.
            idle = asyncio.create_task(probe_idle(pacs, node))
            found = await QueryProbe(pacs, asking, asking.query_model).run()
            profile.facts.update(found.observations)
            profile.missing = found.missing
            profile.result_cap = found.result_cap
            sample, find_seconds = found.sample, found.find_seconds
        else:
            for fact in (f.RETURN_KEYS_STUDY, f.PN_CASE_INSENSITIVE, f.PN_WILDCARD, f.MODALITIES_MATCHING,
                         f.OR_VALUES, f.DATE_RANGES, f.RELATIONAL, f.RESULT_CAP):
                profile.facts[fact] = not_tested("C-FIND", "no C-FIND model accepted")
            profile.facts[f.IDLE] = not_tested("an association held idle",
                                               "no C-FIND model accepted (no query association is pooled)")
        await _rest(pacs, asking, profile, sample, find_seconds, retrieve_models, accepted, move)
        if idle is not None:
            profile.facts[f.IDLE], profile.idle_kept_seconds = await idle
    finally:
        if idle is not None and not idle.done():
            idle.cancel()
    profile.seconds = round(time.monotonic() - started, 3)
    log.info("node %s profiled in %.1f s (implementation %s %s)", node.name, profile.seconds,
             profile.implementation_class_uid, profile.implementation_version_name)
    return profile


async def _rest(pacs: Pacs, asking: PacsNode, profile: PacsProfile, sample: Sample | None,
                find_seconds: list[float], retrieve_models: str, accepted: set[str],
                move: MoveProbe | None) -> None:
    """The retrieve and transport steps."""
    profile.facts[f.C_GET] = await probe_get(pacs, asking, sample, retrieve_models)
    profile.facts[f.C_MOVE], profile.facts[f.MOVE_ORIGINATOR] = await probe_move(
        pacs, asking, sample, retrieve_models, move)
    try:
        latency, profile.facts[f.LATENCY], profile.facts[f.NAGLE], _ = await probe_transport(
            pacs, asking, sample, find_seconds, accepted)
        profile.latency_ms = latency
    except Exception as exc:  # noqa: BLE001 - a failed measurement is an observation, not a failed probe
        profile.facts[f.LATENCY] = not_tested("C-ECHO, timed C-FIND", f"failed: {type(exc).__name__}")


async def probe_idle(pacs: Pacs, node: PacsNode) -> tuple[Observation, float | None]:
    """Whether the PACS keeps an idle association open as long as the query pool would keep it:
    one Verification association held idle that long plus IDLE_MARGIN (the observation, and how
    long it stayed open)."""
    pooled = max(DEFAULT_QUERY_IDLE_SECONDS, node.query_idle_seconds or 0.0)
    hold = pooled + IDLE_MARGIN
    test = (f"one association held idle {hold:.1f} s (the query pool keeps idle ones up to {pooled:g} s), "
            "watched for the PACS releasing or aborting it")
    try:
        facts = await pacs.associate_probe(node, [(VERIFICATION, NATIVE)], hold_idle=hold)
    except Exception as exc:  # noqa: BLE001 - a failed measurement is an observation, not a failed probe
        return Observation(test, f"failed: {type(exc).__name__}"), None
    kept = facts.idle_kept_seconds
    if kept is None or not facts.accepted:
        return not_tested(test, "the association was not accepted"), None
    if facts.idle_closed:
        return Observation(test, f"closed by the PACS after {kept:.1f} s idle", False), kept
    return Observation(test, f"kept open {kept:.1f} s idle", True), kept
