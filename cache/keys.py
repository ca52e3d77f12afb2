"""Every key the gateway keeps in the cache, built from typed identities, and the freshness rule.

No other module builds a key. Key names hold node names, UIDs, counters, random ids and hex digests
only, never patient data. The implementation adds its prefix (``cache.prefix``, default ``dwg:``).

    ==========================================  =======  ===========================================
    key (after the prefix)                      type     value, bound
    ==========================================  =======  ===========================================
    gen:{node}                                  counter  the node's generation (bumped by STOW)
    gen:{node}:{study}                          counter  the study's generation on that node (same)
    qido:{node}:{g}[.{sg}]:{sha256}             string   a cached C-FIND result set of one normalised
                                                         identifier; ``g``/``sg`` the node's and (for
                                                         a single-study identifier) the study's
                                                         generation; TTL ``cache.ttl.<level>``
    response:qido:{nodes}:{gens}:{sha256}       string   a whole QIDO-RS answer (DICOM JSON with a
                                                         placeholder base, warnings) of one normalised
                                                         request over the nodes (comma-separated);
                                                         ``gens`` each node's generation (and study
                                                         generation); TTL the level's
    lease:find:{node}:{sha256}                  string   the flight id of the one replica running this
                                                         C-FIND (single-flight lease, short TTL)
    flight:find:{flight id}                     stream   the flight's outcome (result or error), for
                                                         the replicas waiting on it; short TTL
    meta:series:{node}:{study}:{series}:{sg}    string   series metadata (DICOM JSON, placeholder
                                                         base); TTL ``cache.ttl.metadata``
    loc:study:{study}                           set      names of the nodes holding the study
                                                         (federated WADO); TTL ``cache.ttl.location``
    loc:pid:{node}:{study}                      string   the study's PatientID on that node (Patient
                                                         Root retrieval); same TTL
    lease:series:{node}:{study}:{series}        string   the cluster retrieval id holding the series
                                                         (single-flight lease, short TTL)
    retrieval:series:{node}:{study}:{series}    string   the latest cluster retrieval id of the series
    arrivals:{retrieval id}                     stream   instances that landed for one retrieval
    move:msgid                                  counter  C-MOVE Message IDs (``next_counter``)
    move:pending:{message id}                   string   JSON of a C-MOVE in flight (node, UIDs,
                                                         originator replica, retrieval id)
    ==========================================  =======  ===========================================

**Freshness** (docs/architecture.md, "Freshness"): whatever is derived from a study as one node
holds it (cached searches within the study, series manifests, series metadata) carries that study's
generation in its key or memo; searches across studies carry the node's generation. A successful
STOW bumps exactly the generations :func:`generations_changed_by_store` names, so the next search,
metadata and retrieve on every replica miss the stale values (which then expire by TTL) and ask the
PACS again. Nothing is deleted, so there is no window in which a reader re-caches stale data after
the delete. Counters never expire: an expired counter would make an old generation current again.
Their number is bounded by nodes + studies written through STOW.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from cache.base import VersionedKey
from translators.uids import SeriesId, StudyId


def _join(*parts: str) -> str:
    # Node names are checked at start-up ([A-Za-z0-9_-]) and UIDs are digits and dots: ':' is free.
    return ":".join(parts)


def node_generation(node: str) -> str:
    return _join("gen", node)


def study_generation(study: StudyId) -> str:
    return _join("gen", study.node, study.study)


def _generations(node: str, study: str | None) -> tuple[str, ...]:
    """What a search on ``node`` depends on: the node's generation, and the study's when the search
    is within one study (``study``)."""
    return (node_generation(node),) + ((study_generation(StudyId(node, study)),) if study else ())


def qido_result(node: str, study: str | None, digest: str) -> VersionedKey:
    """One C-FIND's results; ``study``: the identifier's one StudyInstanceUID, if it names one."""
    return VersionedKey(_generations(node, study), _join("qido", node, ""), _join("", digest))


def qido_response(nodes: Sequence[str], study: str | None, digest: str) -> VersionedKey:
    """A whole QIDO-RS answer over ``nodes`` (in the order asked); ``study``: the one study the
    request is scoped to, if any. Versioned by every node's generation (and study generation)."""
    counters = tuple(c for node in nodes for c in _generations(node, study))
    return VersionedKey(counters, _join("response", "qido", ",".join(nodes), ""), _join("", digest))


def series_metadata(series: SeriesId, study_generation: int) -> str:
    return _join("meta", "series", series.node, series.study, series.series, str(study_generation))


def study_locations(study_uid: str) -> str:
    """Which nodes hold a study: a locator across nodes, so its value (not its key) names them."""
    return _join("loc", "study", study_uid)


def patient_id(study: StudyId) -> str:
    return _join("loc", "pid", study.node, study.study)


def series_lease(series: SeriesId) -> str:
    return _join("lease", "series", series.node, series.study, series.series)


def latest_retrieval(series: SeriesId) -> str:
    return _join("retrieval", "series", series.node, series.study, series.series)


def arrivals(retrieval_id: str) -> str:
    return _join("arrivals", retrieval_id)


def find_lease(node: str, digest: str) -> str:
    """Held by the replica running a C-FIND (``digest``: identifier, model and cap) on ``node``."""
    return _join("lease", "find", node, digest)


def find_flight(flight_id: str) -> str:
    """Where a C-FIND flight's outcome is published (its lease names it, and names the node)."""
    return _join("flight", "find", flight_id)


MOVE_MESSAGE_IDS = _join("move", "msgid")


def pending_move(message_id: int) -> str:
    return _join("move", "pending", str(message_id))


def pacs_profile(node: str, *, lease: bool = False) -> str:
    """``profile:{node}``: the node's PACS profile (JSON of gateway/profile/facts.py: facts and the
    PACS's implementation class UID / version name, never patient data), TTL twice
    ``profiling.interval``; with ``lease``, ``profile:{node}:lease``: the probe id of the one replica
    probing the node now (short TTL)."""
    return _join("profile", node, "lease") if lease else _join("profile", node)


def generations_changed_by_store(node: str, studies: Iterable[str]) -> list[str]:
    """The counters a successful C-STORE of instances of ``studies`` into ``node`` makes stale: the
    node's (searches across studies) and each study's (everything derived from that study)."""
    return [node_generation(node), *(study_generation(StudyId(node, s)) for s in sorted(set(studies)))]
