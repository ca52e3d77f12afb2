"""C-ECHO, C-FIND, C-GET and C-MOVE on the fast engine (blocking; run by :mod:`gateway.dimse.threads`).

Same semantics as the pynetdicom engine's :mod:`gateway.dimse.find` and :mod:`gateway.dimse.retrieve`
(docs/architecture.md, "DIMSE edge"), the same contexts (:mod:`gateway.dimse.contexts`) and the same
reading of every status and failure (:mod:`gateway.dimse.outcomes`):

* **C-ECHO/C-FIND** on a pooled query association (:class:`gateway.dimse.pool.Pool`). C-FIND collects
  the pending matches up to the cap plus one, then sends C-CANCEL (PS3.7 §9.3.2.3) and marks the result
  truncated; the caller's ``cancel`` sends the same C-CANCEL, also while no response is arriving. An
  association that saw a cancel or a failure is not reused; a reused one the PACS had quietly closed
  is retried once on a fresh one when nothing was received yet.
* **C-GET** (PS3.4 C.4.3): the C-STORE sub-operations arrive on the same association (SCP role
  selection, PS3.7 §D.3.3.4). Each is acknowledged (Success) as soon as its last fragment is in,
  *then* its fragments are joined once behind the Part-10 header
  (:func:`gateway.dimse.part10.part10_prefix`) and handed to ``on_instance`` on this thread, never
  decoded: the join, write, rename, index and signal (~0.35 ms) overlap the PACS's sending of the
  next instance instead of sitting on its round trip. Safe because the instance stays on the PACS and
  the spool is a cache: one acknowledged but not spooled (``NotRequested``, a full disk) is missing,
  logged, and retried by the retrieval's completeness check (docs/architecture.md, "Cache"). All of
  it happens before the next message is read, so the final C-GET response is read only after the
  last instance was handed to the spool, and an abort leaves nothing half-done. (The pynetdicom
  engine still answers after ``on_instance``: 0124 for ``NotRequested``, A700 for other failures.)
* **C-MOVE** (PS3.4 C.4.2): the arrivals reach the storage SCP; here only the responses are followed.
* **Cancellation**: a set ``cancel`` sends one C-CANCEL (PS3.7 §9.3.3.3, §9.3.4.3), looked at between
  messages and every :data:`gateway.dimse.fast.association.POLL_SECONDS` while waiting; later C-GET
  sub-operations are refused (A700). An association that saw a cancel is aborted, not released.
* **Timeouts**: ``timeouts.dimse`` for each response to start, ``timeouts.network`` for each read
  within one; a timeout is a 504, an A-ABORT or a lost connection a 502 (:func:`gateway.dimse.outcomes.
  no_response`), as on the pynetdicom engine.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from pydicom.dataset import Dataset

from gateway.dimse import outcomes
from gateway.dimse.contexts import Root, find_model, get_proposal, move_contexts, move_model
from gateway.dimse.fast import commands as cmd
from gateway.dimse.fast import pdu
from gateway.dimse.fast.association import Association, Message
from gateway.dimse.fast.association import request as request_association
from gateway.dimse.part10 import part10_prefix
from gateway.dimse.pool import FindStopped, Pool, pooled_find
from gateway.dimse.retrieve import _identifier as retrieve_identifier  # the one identifier rule
from gateway.errors import GatewayError
from gateway.pacs import FindResult, NotRequested, OnInstance, RetrieveOutcome, RetrieveRequest
from gateway.settings import PacsNode

log = logging.getLogger(__name__)

VERIFICATION = "1.2.840.10008.1.1"
UNLIMITED_PDU = 0   # for transfers: the PACS sends PDUs as large as it likes (capped by pdu.MAX_PDU_CAP)

FastPool = Pool[Association]
MessageIdSource = Callable[[], int]


def query_pool(node: PacsNode, calling_ae: str, contexts: list[tuple[str, list[str]]]) -> FastPool:
    """The node's pool of fast query associations (C-ECHO, both C-FIND models)."""
    def opener() -> Association:
        assoc = request_association(calling_ae, node, contexts)
        assert assoc is not None   # none_accepted_ok is off: request raised instead
        return assoc

    return Pool(node, opener, lambda a: a.release())


def _failure(exc: pdu.UpperLayerError, node: PacsNode, operation: str, started: float) -> GatewayError:
    """What a client sees when the association ended during ``operation``."""
    if not isinstance(exc, pdu.ReadTimeout):
        log.info("node %s: %s ended: %s", node.name, operation, exc)
    return outcomes.no_response(node.name, operation, timed_out=isinstance(exc, pdu.ReadTimeout),
                                elapsed=time.monotonic() - started)


def _check_response(message: Message, expected: int, msg_id: int) -> None:
    """Message ID correlation (PS3.7 §9.3): on an association running one operation, anything else
    is a protocol violation."""
    command = message.command
    if command.command_field != expected or command.message_id_responded != msg_id:
        raise pdu.ProtocolError(f"expected a response to message {msg_id}, got {command.name} "
                                f"for message {command.message_id_responded}")


def _acquire(pool: FastPool) -> tuple[Association, bool]:
    """A pooled association; an idle one the peer has spoken on (an A-ABORT, A-RELEASE-RQ or a
    closed socket while nobody asked) is dropped first."""
    assoc, reused = pool.acquire()
    if reused and assoc.peer_spoke():
        pool.release(assoc, reusable=False)
        assoc, reused = pool.acquire()
    return assoc, reused


# --------------------------------------------------------------------------- C-ECHO, C-FIND


def echo(pool: FastPool, node: PacsNode, msg_ids: MessageIdSource) -> float:
    """C-ECHO (PS3.7 §9.1.5); the round trip in seconds, association set-up included when needed."""
    started = time.monotonic()
    assoc, _ = _acquire(pool)
    ok = False
    try:
        context = assoc.context_for(VERIFICATION)
        if context is None:
            raise outcomes.echo_refused(node.name)
        msg_id = msg_ids()
        try:
            assoc.send(context, cmd.c_echo_rq(msg_id))
            response = assoc.receive(node.timeouts.dimse)
            _check_response(response, cmd.C_ECHO_RSP, msg_id)
        except pdu.UpperLayerError as exc:
            raise _failure(exc, node, "C-ECHO", started) from exc
        err = outcomes.code_error(response.command.status, node.name, "C-ECHO", started=started,
                                  dimse_timeout=node.timeouts.dimse)
        if err is not None:
            raise err
        ok = True
        return time.monotonic() - started
    finally:
        pool.release(assoc, reusable=ok)


def find(pool: FastPool, node: PacsNode, identifier: Dataset, *, root: Root, cap: int,
         cancel: threading.Event, msg_ids: MessageIdSource) -> FindResult:
    """One C-FIND in the ``root`` information model, at most ``cap`` matches (module docstring)."""
    sop_class = find_model(root)
    result = FindResult(node=node.name)

    def collect(assoc: Association) -> None:
        context = assoc.context_for(sop_class)
        assert context is not None   # pooled_find checked it
        _collect(assoc, context, node, identifier, sop_class, cap, cancel, msg_ids(), result)

    return pooled_find(pool, result, cap, acquire=lambda: _acquire(pool),
                       accepts=lambda a: a.accepts(sop_class),
                       refused=lambda: outcomes.find_model_refused(node.name, root), collect=collect)


def _collect(assoc: Association, context: int, node: PacsNode, identifier: Dataset, sop_class: str, cap: int,
             cancel: threading.Event, msg_id: int, result: FindResult) -> None:
    started = time.monotonic()
    syntax = assoc.transfer_syntax(context)
    cancelled = False

    def send_cancel() -> None:
        nonlocal cancelled
        if not cancelled:
            assoc.send(context, cmd.c_cancel_rq(msg_id))
            cancelled = True

    def idle() -> None:
        if cancel.is_set():
            send_cancel()

    try:
        assoc.send(context, cmd.c_find_rq(msg_id, sop_class), cmd.encode_identifier(identifier, syntax))
        while True:
            response = assoc.receive(node.timeouts.dimse, idle)
            _check_response(response, cmd.C_FIND_RSP, msg_id)
            err = outcomes.code_error(response.command.status, node.name, "C-FIND", started=started,
                                      dimse_timeout=node.timeouts.dimse)
            if err is not None:
                raise err
            if response.command.status not in outcomes.PENDING:
                break
            data = response.data_set()
            if data is not None and not cancelled:
                result.datasets.append(cmd.decode_identifier(data, syntax))
                if len(result.datasets) >= cap + 1 or cancel.is_set():
                    send_cancel()
    except pdu.UpperLayerError as exc:
        if cancelled:
            raise FindStopped() from exc   # the PACS dropped the association on our cancel: results stand
        raise _failure(exc, node, "C-FIND", started) from exc
    if cancelled:
        raise FindStopped()


# --------------------------------------------------------------------------- C-GET, C-MOVE


def get(calling_ae: str, node: PacsNode, request: RetrieveRequest, on_instance: OnInstance,
        cancel: threading.Event) -> RetrieveOutcome:
    """C-GET; storage sub-operations arrive on the same association, through ``on_instance``."""
    proposal = get_proposal(node.query_model, request.sop_classes, compressed_first=request.compressed_first)
    outcome = RetrieveOutcome()
    assoc = request_association(calling_ae, node, proposal.contexts, max_pdu=UNLIMITED_PDU,
                                scp_roles=proposal.scp_roles)
    assert assoc is not None
    try:
        context = assoc.context_for(proposal.model)
        if context is None:
            raise outcomes.get_refused(node.name)

        def store(message: Message) -> None:
            # Acknowledged first, spooled after (module docstring, "C-GET"): the PACS sends the next
            # instance while this one is written.
            refused = cancel.is_set()
            status = outcomes.OUT_OF_RESOURCES if refused else outcomes.SUCCESS
            assoc.send(message.context_id, cmd.c_store_rsp(message.command, status))
            if not refused:
                _deliver(assoc, message, on_instance, node, outcome)

        _follow(assoc, context, cmd.c_get_rq(1, proposal.model), retrieve_identifier(request), node,
                "C-GET", outcome, cancel, store)
    finally:
        assoc.close(clean=not outcome.cancelled)
    return outcome


def move(calling_ae: str, node: PacsNode, request: RetrieveRequest, *, destination: str, msg_id: int,
         cancel: threading.Event) -> RetrieveOutcome:
    """C-MOVE to ``destination`` (Move Destination, PS3.7 §9.3.4.1); the arrivals are routed by the
    storage SCP by ``msg_id`` (the Move Originator Message ID of the sub-operations)."""
    model = move_model(node.query_model)
    outcome = RetrieveOutcome()
    assoc = request_association(calling_ae, node, move_contexts(node.query_model), max_pdu=UNLIMITED_PDU)
    assert assoc is not None
    try:
        context = assoc.context_for(model)
        if context is None:
            raise outcomes.move_refused(node.name)
        _follow(assoc, context, cmd.c_move_rq(msg_id, model, destination), retrieve_identifier(request),
                node, "C-MOVE", outcome, cancel, None)
    finally:
        assoc.close(clean=not outcome.cancelled)
    return outcome


def _follow(assoc: Association, context: int, rq: cmd.Command, identifier: Dataset, node: PacsNode,
            operation: str, outcome: RetrieveOutcome, cancel: threading.Event,
            store: Callable[[Message], None] | None) -> None:
    """Send the request, then read every response into ``outcome`` (and, C-GET, serve the C-STOREs
    between them); one C-CANCEL once ``cancel`` is set."""
    started = time.monotonic()
    msg_id = rq.message_id
    assert msg_id is not None
    syntax = assoc.transfer_syntax(context)
    expected = rq.command_field | 0x8000

    def idle() -> None:
        if cancel.is_set() and not outcome.cancelled:
            assoc.send(context, cmd.c_cancel_rq(msg_id))
            outcome.cancelled = True

    try:
        assoc.send(context, rq, cmd.encode_identifier(identifier, syntax))
        while True:
            message = assoc.receive(node.timeouts.dimse, idle)
            if store is not None and message.command.command_field == cmd.C_STORE_RQ:
                store(message)
                continue
            _check_response(message, expected, msg_id)
            command, data = message.command, message.data_set()
            if data:   # an identifier: the Failed SOP Instance UID List, read by pydicom
                failed_list = cmd.decode_identifier(data, syntax)
                pending = outcomes.retrieve_response(cmd.status_dataset(command), failed_list, outcome,
                                                     node.name, operation, started=started,
                                                     dimse_timeout=node.timeouts.dimse)
            else:      # the common case, every pending response: no pydicom on the data path
                counters = {name: value for name in ("completed", "failed", "warning")
                            if (value := getattr(command, name)) is not None}
                pending = outcomes.retrieve_status(command.status, counters, None, outcome, node.name,
                                                   operation, started=started,
                                                   dimse_timeout=node.timeouts.dimse)
            if not pending:
                return
            idle()
    except pdu.UpperLayerError as exc:
        raise _failure(exc, node, operation, started) from exc


def _deliver(assoc: Association, message: Message, on_instance: OnInstance, node: PacsNode,
             outcome: RetrieveOutcome) -> None:
    """One acknowledged C-GET sub-operation to ``on_instance`` (the fragments are still valid: the
    next :meth:`Association.receive` has not run). What it refuses or fails to spool is missing from
    the spool, which the retrieval's completeness check retries (docs/architecture.md, "Cache")."""
    command = message.command
    try:
        sop, cls = str(command.affected_sop_instance), str(command.affected_sop_class)
        ts = assoc.transfer_syntax(message.context_id)
        on_instance(b"".join((part10_prefix(cls, sop, ts), *message.fragments)), sop, cls, ts)
    except NotRequested:
        log.debug("node %s: an acknowledged C-GET sub-operation was not wanted; not spooled", node.name)
        return
    except Exception:  # noqa: BLE001 - acknowledged already: the instance is missing, then retried
        log.warning("node %s: an acknowledged C-GET sub-operation could not be spooled; the retrieval "
                    "retries what is missing", node.name, exc_info=True)
        return
    outcome.received += 1
