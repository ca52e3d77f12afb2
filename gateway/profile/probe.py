"""One probe of one node, every step in order, into a :class:`~gateway.profile.facts.PacsProfile`.

Order matters: the association says which query model to ask in; the queries find the study,
series and instance the retrieve and transport probes use. A step that fails becomes its
observation ("failed: ...") and the rest goes on; only an association that cannot be opened at all
fails the probe (the node is down: nothing is learned, the previous profile or the safe defaults
stay). Read-only throughout (docs/architecture.md, "PACS profiles").
"""

from __future__ import annotations

import logging
import time

from gateway.pacs import Pacs
from gateway.profile import facts as f
from gateway.profile.facts import PacsProfile, not_tested
from gateway.profile.queries import QueryProbe
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
from gateway.settings import PacsNode
from translators.syntaxes import NATIVE

log = logging.getLogger(__name__)


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
    if MODELS[asking.query_model]["FIND"] in accepted:
        found = await QueryProbe(pacs, asking, asking.query_model).run()
        profile.facts.update(found.observations)
        profile.missing = found.missing
        sample, find_seconds = found.sample, found.find_seconds
    else:
        for fact in (f.RETURN_KEYS_STUDY, f.PN_CASE_INSENSITIVE, f.PN_WILDCARD, f.MODALITIES_MATCHING,
                     f.OR_VALUES, f.DATE_RANGES, f.RELATIONAL, f.RESULT_CAP):
            profile.facts[fact] = not_tested("C-FIND", "no C-FIND model accepted")

    profile.facts[f.C_GET] = await probe_get(pacs, asking, sample, retrieve_models)
    profile.facts[f.C_MOVE], profile.facts[f.MOVE_ORIGINATOR] = await probe_move(
        pacs, asking, sample, retrieve_models, move)
    try:
        latency, profile.facts[f.LATENCY], profile.facts[f.NAGLE], _ = await probe_transport(
            pacs, asking, sample, find_seconds, accepted)
        profile.latency_ms = latency
    except Exception as exc:  # noqa: BLE001 - a failed measurement is an observation, not a failed probe
        profile.facts[f.LATENCY] = not_tested("C-ECHO, timed C-FIND", f"failed: {type(exc).__name__}")
    profile.seconds = round(time.monotonic() - started, 3)
    log.info("node %s profiled in %.1f s (implementation %s %s)", node.name, profile.seconds,
             profile.implementation_class_uid, profile.implementation_version_name)
    return profile
