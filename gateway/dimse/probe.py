"""The association probe behind :meth:`gateway.pacs.Pacs.associate_probe` (blocking; run by
:mod:`gateway.dimse.threads` under the node's transfer budget).

One association proposing what the PACS profile asks about (docs/architecture.md, "PACS
profiles"): which presentation contexts the PACS accepts (PS3.8 §9.3.3.2), in which role
(SCP/SCU role selection, PS3.7 D.3.3.4: the storage contexts it would send C-GET sub-operations
on), the largest PDU it receives, and who answered: the Implementation Class UID and Version Name
of the A-ASSOCIATE-AC's user information (PS3.7 D.3.3.2, D.3.3.2.3), which change when the PACS is
upgraded.

Optionally it times a small C-FIND *without* the gateway's TCP quick ACKs
(:mod:`gateway.dimse.socket_tuning` re-arms TCP_QUICKACK before every read; undone here for this one
association). A PACS with Nagle's algorithm on sends the second write of each response (command
set, then data set) only after the peer's ACK, which a delayed ACK holds back ~40 ms: measured
untuned, the stall other clients suffer shows; measured tuned, it does not.

Or (``hold_idle``, an association of its own) it is held idle, nothing sent, for that many seconds,
watched for the PACS releasing or aborting it (many PACS close associations idle longer than their
own timeout, e.g. pynetdicom's ``network_timeout``, DCMTK's ``--dimse-timeout``): whether an idle
association the query pool keeps would still be usable, and for how long. That one is held on the
gateway's own engine (:mod:`gateway.dimse.fast.association`), which waits in ``select`` until the
PACS speaks: a pynetdicom association's reactor polls its socket every few milliseconds even when
idle (~7 % of a core, gateway/dimse/pool.py), which for seconds after every first contact would
take CPU from the requests the probe runs beside.

The association is opened by :func:`gateway.dimse.association.open_association` like every other
(timeouts, TLS, failures mapped to the error tree) and released at once; it is never pooled.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from pydicom.dataset import Dataset
from pynetdicom.association import Association

from gateway.dimse import outcomes
from gateway.dimse.association import accepts, close_association, open_association
from gateway.dimse.contexts import Context
from gateway.dimse.fast import association as fast_association
from gateway.dimse.fast import pdu
from gateway.dimse.socket_tuning import busy
from gateway.pacs import AssociationFacts, ProbeContext
from gateway.settings import PacsNode

TIMED_FINDS = 3


def associate_probe(calling_ae: str, node: PacsNode, contexts: Sequence[ProbeContext],
                    scp_roles: Sequence[str] = (),
                    timed_find: tuple[str, Dataset] | None = None,
                    hold_idle: float = 0.0) -> AssociationFacts:
    """Associate, read the facts, optionally time ``timed_find`` and hold it idle, release; see the
    module docstring.

    Raises the error tree (502/504 naming the node) when no association comes about; a PACS that
    accepts the association but none of the contexts is reported with nothing accepted."""
    proposed: list[Context] = [(cls, list(syntaxes)) for cls, syntaxes in contexts]
    if hold_idle > 0:
        if scp_roles or timed_find is not None:
            raise ValueError("an idle hold is an association of its own")
        return _held_idle(calling_ae, node, proposed, hold_idle)
    started = time.monotonic()
    assoc = open_association(calling_ae, node, proposed, scp_roles=scp_roles, none_accepted_ok=True)
    took = time.monotonic() - started
    if assoc is None:
        return _none_accepted(proposed, took)
    clean = True
    try:
        acceptor: Any = assoc.acceptor
        accepted = tuple((str(cx.abstract_syntax), str(cx.transfer_syntax[0]), bool(cx.as_scp))
                         for cx in assoc.accepted_contexts)
        taken = {a for a, _, _ in accepted}
        rejected = tuple(dict.fromkeys(str(cx.abstract_syntax) for cx in assoc.rejected_contexts
                                       if str(cx.abstract_syntax) not in taken))
        timings: tuple[float, ...] = ()
        if timed_find is not None and accepts(assoc, timed_find[0]):
            clean = False
            timings = _timed_finds(assoc, node, *timed_find)
            clean = True
        return AssociationFacts(
            accepted=accepted, rejected=rejected,
            max_pdu=_int_or_none(acceptor.maximum_length),
            implementation_class_uid=str(acceptor.implementation_class_uid or ""),
            implementation_version_name=str(acceptor.implementation_version_name or ""),
            associate_seconds=took, untuned_find_seconds=timings)
    finally:
        close_association(assoc, clean=clean)


def _timed_finds(assoc: Association, node: PacsNode, model: str, identifier: Dataset) -> tuple[float, ...]:
    """``identifier`` C-FIND, TIMED_FINDS times, each timed from request to final response."""
    _without_quick_acks(assoc)
    timings: list[float] = []
    for msg_id in range(1, TIMED_FINDS + 1):
        started = time.monotonic()
        with busy(assoc):
            for status, _ in assoc.send_c_find(identifier, model, msg_id=msg_id):
                err = outcomes.status_error(status, node.name, "C-FIND", started=started,
                                            dimse_timeout=node.timeouts.dimse)
                if err is not None:
                    raise err
        timings.append(time.monotonic() - started)
    return tuple(timings)


def _none_accepted(proposed: list[Context], took: float) -> AssociationFacts:
    """The association came about, but with none of the proposed contexts."""
    return AssociationFacts(accepted=(), rejected=tuple(dict.fromkeys(c for c, _ in proposed)),
                            max_pdu=None, implementation_class_uid="", implementation_version_name="",
                            associate_seconds=took)


def _held_idle(calling_ae: str, node: PacsNode, proposed: list[Context], seconds: float) -> AssociationFacts:
    """One association held idle ``seconds`` on the gateway's own engine (module docstring): how long
    it stayed open, whether the PACS ended it. Only what the idle hold needs is reported (the
    implementation identity comes from the first association)."""
    started = time.monotonic()
    assoc = fast_association.request(calling_ae, node, proposed, none_accepted_ok=True)
    took = time.monotonic() - started
    if assoc is None:
        return _none_accepted(proposed, took)
    closed = False
    try:
        accepted = tuple((ab, ts, False) for ab, ts in assoc.contexts.values())
        held_from = time.monotonic()
        while True:
            left = seconds - (time.monotonic() - held_from)
            if left <= 0:
                break
            try:
                # Anything the PACS sends to an idle association is its end: an A-RELEASE-RQ, an
                # A-ABORT, or the connection closed (read as ready, then lost).
                closed = assoc.reader.wait(left)
            except pdu.UpperLayerError:
                closed = True
            if closed:
                break
        kept = round(time.monotonic() - held_from, 2)
        return AssociationFacts(accepted=accepted, rejected=(), max_pdu=assoc.peer_max_pdu,
                                implementation_class_uid="", implementation_version_name="",
                                associate_seconds=took, idle_kept_seconds=kept, idle_closed=closed)
    finally:
        assoc.close(clean=not closed)


def _without_quick_acks(assoc: Association) -> None:
    """Undo the quick-ACK re-arming :func:`gateway.dimse.socket_tuning.on_connection_open` installs as
    an instance attribute over the transport's ``recv`` (TCP_NODELAY on our side stays: it is the
    PACS's writes that are measured)."""
    transport: Any = getattr(assoc.dul, "socket", None)
    if transport is not None and "recv" in vars(transport):
        del transport.recv


def _int_or_none(value: object) -> int | None:
    try:
        return int(str(value))
    except (TypeError, ValueError):
        return None
