"""The association, retrieve and transport probes of a PACS profile (read-only).

* **Association** (PS3.8 §9.3.2-3, PS3.7 D.3.3): one A-ASSOCIATE-RQ proposing Verification, the
  Study and Patient Root FIND/MOVE/GET models (PS3.4 C.6.1, C.6.2) and common storage SOP classes
  with our SCP role (as a C-GET does, PS3.7 D.3.3.4), native and, for CT, every compressed syntax
  the gateway proposes: which models, which storage contexts for C-GET sub-operations, the PACS's
  maximum PDU and its Implementation Class UID / Version Name.
* **C-GET** of one sampled instance (PS3.4 C.4.3), into a temporary directory that is deleted
  again (never the spool).
* **C-MOVE** of the same instance to the gateway's storage SCP (PS3.4 C.4.2), only when the SCP
  runs: first registered so that only its Move Originator Message ID (PS3.7 9.3.1.1) can route the
  arrival; when nothing arrives, once more so that its SOP Instance UID can (the fallback the
  storage SCP uses for PACS that omit it). A C-MOVE that reports success while nothing arrived is
  silently incomplete.
* **Transport**: C-ECHO round trips, the targeted C-FINDs' times, and the same small C-FIND timed
  without our TCP quick ACKs (``Pacs.associate_probe``): ~40 ms more per response is Nagle's
  algorithm on the PACS meeting a delayed ACK (docs/architecture.md, "DIMSE edge").
"""

from __future__ import annotations

import statistics
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from pathlib import Path

from pydicom.dataset import Dataset

from gateway.errors import GatewayError
from gateway.pacs import (
    AssociationFacts,
    MoveDestination,
    Pacs,
    PendingMove,
    ProbeContext,
    RetrieveOutcome,
    RetrieveRequest,
)
from gateway.profile import facts as f
from gateway.profile.facts import Observation, not_tested
from gateway.profile.queries import Sample
from gateway.settings import PacsNode
from translators import syntaxes as ts

VERIFICATION = "1.2.840.10008.1.1"
MODELS: dict[str, dict[str, str]] = {      # PS3.4 C.6.1 (Patient Root), C.6.2 (Study Root)
    "study": {"FIND": "1.2.840.10008.5.1.4.1.2.2.1", "MOVE": "1.2.840.10008.5.1.4.1.2.2.2",
              "GET": "1.2.840.10008.5.1.4.1.2.2.3"},
    "patient": {"FIND": "1.2.840.10008.5.1.4.1.2.1.1", "MOVE": "1.2.840.10008.5.1.4.1.2.1.2",
                "GET": "1.2.840.10008.5.1.4.1.2.1.3"},
}
ROOT_NAMES = {"study": "Study Root", "patient": "Patient Root"}
CT = "1.2.840.10008.5.1.4.1.1.2"
STORAGE_CLASSES: tuple[str, ...] = (
    CT, "1.2.840.10008.5.1.4.1.1.4", "1.2.840.10008.5.1.4.1.1.1", "1.2.840.10008.5.1.4.1.1.1.1",
    "1.2.840.10008.5.1.4.1.1.7", "1.2.840.10008.5.1.4.1.1.6.1", "1.2.840.10008.5.1.4.1.1.12.1",
    "1.2.840.10008.5.1.4.1.1.128", "1.2.840.10008.5.1.4.1.1.1.2", "1.2.840.10008.5.1.4.1.1.88.22",
    "1.2.840.10008.5.1.4.1.1.20", "1.2.840.10008.5.1.4.1.1.7.4",
)
"""CT, MR, CR, DX, SC, US, XA, PET, MG, Enhanced SR, NM, SC multi-frame true colour."""
COMPRESSED: tuple[str, ...] = tuple(s for s in ts.COMPRESSED_PREFERENCE if s != ts.DEFLATED_LE)
SYNTAX_NAMES = {ts.RLE_LOSSLESS: "RLE", ts.JPEG_LOSSLESS_SV1: "JPEG Lossless SV1",
                ts.JPEG_BASELINE: "JPEG Baseline", ts.JPEG_2000_LOSSLESS: "JPEG 2000 Lossless",
                ts.JPEG_2000: "JPEG 2000", ts.JPEG_LS_LOSSLESS: "JPEG-LS Lossless",
                ts.JPEG_LS_NEAR_LOSSLESS: "JPEG-LS Near-Lossless", ts.JPEG_EXTENDED: "JPEG Extended",
                ts.JPEG_LOSSLESS: "JPEG Lossless", ts.EXPLICIT_VR_LE: "Explicit VR LE",
                ts.IMPLICIT_VR_LE: "Implicit VR LE"}
ECHOES = 5
NAGLE_STALL = 0.025
"""Seconds an untuned small C-FIND must take beyond the tuned one to count as a delayed-ACK stall."""


def proposal() -> list[ProbeContext]:
    """Verification, the six Q/R models, storage contexts one syntax each (Explicit and Implicit VR
    LE for every class, every compressed syntax for CT): 7 + 24 + 9 contexts, well under 128."""
    qr: list[ProbeContext] = [(VERIFICATION, ts.NATIVE)]
    qr += [(uid, ts.NATIVE) for model in MODELS.values() for uid in model.values()]
    storage: list[ProbeContext] = [(cls, (syntax,)) for cls in STORAGE_CLASSES for syntax in ts.NATIVE]
    storage += [(CT, (syntax,)) for syntax in COMPRESSED]
    return qr + storage


def _name(syntax: str) -> str:
    return SYNTAX_NAMES.get(syntax, syntax)


def association_observations(facts: AssociationFacts) -> dict[str, Observation]:
    test = ("A-ASSOCIATE proposing Verification, Study/Patient Root FIND/MOVE/GET and "
            f"{len(STORAGE_CLASSES)} storage SOP classes with our SCP role (native; CT also compressed)")
    accepted = {a for a, _, _ in facts.accepted}
    roots = [root for root, model in MODELS.items() if model["FIND"] in accepted]
    retrieve = [f"{op}:{root}" for op in ("GET", "MOVE") for root, model in MODELS.items()
                if model[op] in accepted]
    as_scp = [(a, s) for a, s, scp in facts.accepted if scp and a in STORAGE_CLASSES]
    classes = {a for a, _ in as_scp}
    compressed = sorted({_name(s) for a, s in as_scp if s in COMPRESSED})
    pdu = "unlimited" if facts.max_pdu == 0 else str(facts.max_pdu) if facts.max_pdu is not None else "?"
    who = f"{facts.implementation_class_uid or '?'} {facts.implementation_version_name or ''}".strip()
    obs = {
        f.ASSOCIATION: Observation(
            test, f"accepted in {facts.associate_seconds * 1000:.0f} ms; max PDU {pdu}; implementation {who}",
            bool(facts.accepted)),
        f.FIND_MODELS: Observation("C-FIND models accepted",
                                   ", ".join(ROOT_NAMES[r] for r in roots) or "none",
                                   " ".join(roots) or None),
        f.RETRIEVE_MODELS: Observation(
            "C-GET / C-MOVE models accepted",
            "; ".join(f"C-{op}: " + (", ".join(ROOT_NAMES[r] for r, m in MODELS.items() if m[op] in accepted)
                                     or "none") for op in ("GET", "MOVE")),
            " ".join(retrieve) or None),
    }
    if not any(MODELS[r]["GET"] in accepted for r in MODELS):
        obs[f.GET_STORAGE] = not_tested("storage contexts for C-GET sub-operations",
                                        "no C-GET model accepted")
        obs[f.GET_COMPRESSED] = not_tested("compressed storage contexts for C-GET", "no C-GET model accepted")
        return obs
    obs[f.GET_STORAGE] = Observation(
        "storage contexts accepted with our SCP role (PS3.7 D.3.3.4)",
        f"{len(classes)} of {len(STORAGE_CLASSES)} SOP classes" if classes else
        "none: C-GET sub-operations have no context to arrive on (every instance would fail or time out)",
        bool(classes))
    obs[f.GET_COMPRESSED] = Observation(
        "CT Image Storage proposed in every compressed syntax, one context each, our SCP role",
        f"accepted: {', '.join(compressed)}" if compressed else
        "none accepted: compressed instances cannot come by C-GET unless the PACS decompresses them",
        bool(compressed))
    return obs


# ------------------------------------------------------------------------------------ C-GET


async def probe_get(pacs: Pacs, node: PacsNode, sample: Sample | None, accepted_models: str) -> Observation:
    test = "C-GET of one sampled instance (IMAGE level), into a temporary directory deleted afterwards"
    if f"GET:{node.query_model}" not in accepted_models.split():
        return Observation(test, f"the {ROOT_NAMES[node.query_model]} C-GET model is not accepted", False)
    if sample is None or not sample.sop_uid:
        return not_tested(test, "no instance was sampled")
    arrived: list[str] = []
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="dwg-probe-") as tmp:
        def on_instance(data: bytes, sop: str, cls: str, syntax: str) -> None:
            (Path(tmp) / "instance.dcm").write_bytes(data)    # on the association's thread: quick
            arrived.append(syntax)

        try:
            outcome = await pacs.get(node, _request(node, sample), on_instance, threading.Event())
        except GatewayError as exc:
            return Observation(test, f"failed: {type(exc).__name__}: {exc.detail}"[:200], False)
    took = (time.monotonic() - started) * 1000
    if arrived:
        return Observation(test, f"delivered in {_name(arrived[0])} ({took:.0f} ms)", True)
    return Observation(test, f"nothing delivered ({outcome.completed} completed, {outcome.failed} failed "
                             "sub-operations): no storage context it could send the instance on?", False)


def _request(node: PacsNode, sample: Sample) -> RetrieveRequest:
    return RetrieveRequest("IMAGE", sample.study_uid, sample.series_uid, (sample.sop_uid,),
                           sample.patient_id if node.query_model == "patient" else None,
                           (sample.sop_class,) if sample.sop_class else ())


# ------------------------------------------------------------------------------------ C-MOVE


@dataclass(frozen=True)
class MoveProbe:
    """The gateway's C-MOVE destination, when its storage SCP runs."""

    destination: MoveDestination
    ae_title: str                                   # the destination AE title (gateway.ae_title)
    next_msg_id: Callable[[], Awaitable[int]]       # the shared Message ID counter


async def probe_move(pacs: Pacs, node: PacsNode, sample: Sample | None, accepted_models: str,
                     move: MoveProbe | None) -> tuple[Observation, Observation]:
    test = f"C-MOVE of one sampled instance to {move.ae_title if move else 'the gateway'} (IMAGE level)"
    origin = "Move Originator Message ID on the C-STORE sub-operation (PS3.7 9.3.1.1)"
    if move is None:
        why = "the storage SCP is not running (no node with retrieve: move, profiling.probe_move off)"
        return not_tested(test, why), not_tested(origin, why)
    if f"MOVE:{node.query_model}" not in accepted_models.split():
        return (Observation(test, f"the {ROOT_NAMES[node.query_model]} C-MOVE model is not accepted", False),
                not_tested(origin, "no C-MOVE"))
    if sample is None or not sample.sop_uid:
        return not_tested(test, "no instance was sampled"), not_tested(origin, "no instance was sampled")
    try:
        by_origin, outcome = await _move_once(pacs, node, sample, move, routed_by_uid=False)
        if by_origin:
            return (Observation(test, "delivered", True),
                    Observation(origin, "present: arrivals are routed by it", True))
        by_uid, outcome = await _move_once(pacs, node, sample, move, routed_by_uid=True)
    except GatewayError as exc:
        return (Observation(test, f"failed: {type(exc).__name__}: {exc.detail}"[:200], False),
                not_tested(origin, "no C-MOVE"))
    if by_uid:
        return (Observation(test, "delivered", True),
                Observation(origin, "absent: arrivals are routed by SOP Instance UID", False))
    silent = " (silently incomplete: the PACS reported it completed)" if outcome.completed else ""
    counts = f"{outcome.completed} completed, {outcome.failed} failed"
    return (Observation(test, f"nothing arrived ({counts}){silent}", False),
            not_tested(origin, "nothing arrived"))


async def _move_once(pacs: Pacs, node: PacsNode, sample: Sample, move: MoveProbe, *,
                     routed_by_uid: bool) -> tuple[bool, RetrieveOutcome]:
    """One C-MOVE; whether the instance arrived. ``routed_by_uid`` False: the pending move expects no
    UID and names no study, so only the Move Originator Message ID can route the arrival to it."""
    arrived: list[str] = []

    def on_instance(data: bytes, sop: str, cls: str, syntax: str) -> None:
        arrived.append(sop)      # the bytes are dropped here: nothing reaches the spool

    msg_id = await move.next_msg_id()
    pending = (PendingMove(msg_id, sample.study_uid, sample.series_uid, {sample.sop_uid}, on_instance)
               if routed_by_uid else PendingMove(msg_id, "", None, None, on_instance))
    move.destination.register(pending)
    try:
        outcome = await pacs.move(node, _request(node, sample), destination=move.ae_title, msg_id=msg_id,
                                  cancel=threading.Event())
    finally:
        move.destination.unregister(msg_id)
    return bool(arrived), outcome


# ------------------------------------------------------------------------------------ transport


async def probe_transport(pacs: Pacs, node: PacsNode, sample: Sample | None, find_seconds: list[float],
                          accepted: set[str]) -> tuple[dict[str, float], Observation, Observation,
                                                       AssociationFacts | None]:
    """(median milliseconds per operation, the latency and Nagle observations, the second
    association's facts when one was opened)."""
    latency: dict[str, float] = {}
    queried = any(model["FIND"] in accepted for model in MODELS.values())
    if VERIFICATION in accepted and queried:
        # Only on a PACS the gateway queries anyway: a C-ECHO leaves its association idle in the
        # node's query pool (gateway/dimse/pool.py), and a store-only SCP that serves one association
        # at a time (DCMTK's storescp) would refuse the users' C-STOREs until the pool closes it.
        echoes = [await pacs.echo(node) for _ in range(ECHOES)]
        latency["echo"] = round(statistics.median(echoes) * 1000, 1)
    if find_seconds:
        latency["find"] = round(statistics.median(find_seconds) * 1000, 1)
    nagle_test = ("a C-FIND with one match, timed with and without the gateway's TCP quick ACKs "
                  "(a PACS with Nagle on waits ~40 ms for a delayed ACK before each data set)")
    timed = _timed_find(node, sample, accepted)
    untuned: AssociationFacts | None = None
    if timed is None or not find_seconds:
        nagle = not_tested(nagle_test, "no sampled entity to query")
    else:
        untuned = await pacs.associate_probe(node, [(timed[0], ts.NATIVE)], timed_find=timed)
        if not untuned.untuned_find_seconds:
            nagle = not_tested(nagle_test, "the C-FIND model was not accepted")
        else:
            slow, fast = min(untuned.untuned_find_seconds), min(find_seconds)
            latency["find_untuned"] = round(slow * 1000, 1)
            stall = slow - fast >= NAGLE_STALL
            nagle = Observation(nagle_test, f"{slow * 1000:.0f} ms untuned vs {fast * 1000:.0f} ms tuned: "
                                + ("stalls (Nagle on at the PACS; avoided by the gateway's TCP_QUICKACK)"
                                   if stall else "no stall"), stall)
    parts = [f"{op} {ms:g} ms" for op, ms in latency.items()]
    unmeasured = ("C-ECHO not timed: no C-FIND model accepted (the echo would hold a pooled association)"
                  if VERIFICATION in accepted else "nothing measured")
    measured = Observation("C-ECHO x5, the targeted C-FINDs (medians)", ", ".join(parts) or unmeasured)
    return latency, measured, nagle, untuned


def _timed_find(node: PacsNode, sample: Sample | None, accepted: set[str]) -> tuple[str, Dataset] | None:
    if sample is None or not sample.study_uid:
        return None
    model = MODELS[node.query_model]["FIND"]
    if model not in accepted:
        return None
    ident = Dataset()
    if node.query_model == "patient":
        if not sample.patient_id:
            return None
        ident.QueryRetrieveLevel = "PATIENT"
        ident.PatientID = sample.patient_id
    else:
        ident.QueryRetrieveLevel = "STUDY"
        ident.StudyInstanceUID = sample.study_uid
    return model, ident


def with_model(node: PacsNode, model: str) -> PacsNode:
    """``node`` asking in ``model`` (the probes use the model the association showed)."""
    return replace(node, query_model="patient" if model == "patient" else "study")
