"""One association at the fast storage SCP, from the A-ASSOCIATE-RQ to the release or abort.

Runs on the association's own thread (:mod:`gateway.dimse.fast.acceptor` starts it), blocking reads
through :class:`~gateway.dimse.fast.pdu_reader.PduReader`. The acceptor side of the PS3.8 §9.2 state
machine, reduced to what a storage SCP meets:

* **Sta2** (connection open, awaiting A-ASSOCIATE-RQ): the ARTIM timer is the read's timeout
  (``acse_timeout``); nothing in time, or a peer that only opens and closes, is dropped silently
  (AA-2). Any other PDU is answered with A-ABORT (AA-1). The RQ is answered by
  :func:`~gateway.dimse.fast.scp_negotiation.negotiate`; after an A-ASSOCIATE-RJ the connection is
  closed.
* **Sta6** (established): P-DATA-TF carries DIMSE messages (PS3.7 §6.3.1: the command set always
  Implicit VR Little Endian, the data set in the context's syntax, PDVs on one accepted context per
  message, Annex E control headers). C-ECHO-RQ is answered with success; C-STORE-RQ data set
  fragments are kept as views into the received bytes (the reader holds them) and, at the last one,
  joined once behind the Part-10 header (:func:`gateway.dimse.part10.part10_prefix`). The
  :class:`~gateway.dimse.arrivals_routing.ArrivalRouter` decides (route, refusals), the C-STORE-RSP
  goes out, and then the instance is joined and spooled, before the next PDU is read: the spool is
  a cache of what stays on the PACS, so its write need not be on the PACS's round trip
  (:meth:`ArrivalRouter.accept`, docs/architecture.md "Cache"). C-CANCEL-RQ is ignored (nothing to
  cancel). Every read is bounded by ``network_timeout``; silence past it is an A-ABORT.
* **Release**: A-RELEASE-RQ is answered with A-RELEASE-RP and the peer's close awaited (ARTIM).
  **A-ABORT** from the peer ends the association at once: an instance whose data set had not fully
  arrived was only in memory, so nothing of it reaches the spool.
* **Protocol errors** (a malformed or oversized PDU or command set, a PDV on a context not accepted,
  a data set without its command, a request this SCP does not serve) are answered with A-ABORT
  (source: service provider) and the connection closed.

No data set is decoded, except the study/series of an arrival no cheaper route matched
(:meth:`ArrivalRouter._route`). Nothing logged names a patient: AE titles, addresses, counts.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from io import BytesIO

from pydicom import dcmread

from gateway.dimse.arrivals_routing import REFUSED_OUT_OF_RESOURCES, Arrival, ArrivalRouter
from gateway.dimse.contexts import VERIFICATION
from gateway.dimse.fast import commands as cmd
from gateway.dimse.fast.pdu import (
    A_ABORT,
    A_ASSOCIATE_RQ,
    A_RELEASE_RQ,
    ABORT_INVALID_PARAMETER,
    ABORT_NOT_SPECIFIED,
    ABORT_SERVICE_PROVIDER,
    ABORT_UNEXPECTED_PDU,
    MAX_ASSOCIATION_PDU,
    MIN_SEND_PDU,
    P_DATA_TF,
    Abort,
    AssociateRj,
    AssociateRq,
    ConnectionClosed,
    ProtocolError,
    ReadTimeout,
    ReleaseRp,
    UpperLayerError,
    decode,
    encode,
    iter_pdvs,
    p_data_tf,
)
from gateway.dimse.fast.pdu_reader import PduReader
from gateway.dimse.fast.scp_negotiation import Accepted, AcceptorPolicy, negotiate
from gateway.dimse.part10 import part10_prefix

log = logging.getLogger(__name__)

SUCCESS = 0x0000
CANNOT_UNDERSTAND = 0xC000         # PS3.4 B.2.3: Error, cannot understand
DATA_READ_AHEAD = 1 << 20          # the reader's buffer once an association is established


class _UnexpectedPdu(ProtocolError):
    """A PDU the state machine does not expect in its state (A-ABORT reason 2)."""


@dataclass(frozen=True)
class Timeouts:
    acse: float = 30.0       # ARTIM: the A-ASSOCIATE-RQ after connecting, the close after a release/reject
    network: float = 60.0    # any read once the association is established


@dataclass
class _Store:
    """A C-STORE whose data set is arriving: the Part-10 header, then the data set fragments as views
    into the received bytes (the reader holds them, :attr:`PduReader.hold`), joined once at the end."""

    request: cmd.Command
    context_id: int
    transfer_syntax: str
    prefix: bytes
    fragments: list[memoryview] = field(default_factory=list)
    status: int | None = None   # decided before the data set is complete (refused up front)


@dataclass
class Association:
    """The state of one accepted association (Sta6)."""

    sock: socket.socket
    calling_ae: str
    contexts: Mapping[int, tuple[str, str]]   # accepted: context ID -> (abstract, transfer syntax)
    peer_max_pdu: int
    router: ArrivalRouter
    reader: PduReader
    command: bytearray = field(default_factory=bytearray)   # command fragments so far
    command_context: int | None = None
    store: _Store | None = None                              # the C-STORE whose data set is arriving

    def send_command(self, context_id: int, command: cmd.Command) -> None:
        # A response is ~150 bytes: a peer advertising less than MIN_SEND_PDU still gets one PDU.
        limit = self.peer_max_pdu if self.peer_max_pdu >= MIN_SEND_PDU else 0
        self.sock.sendall(b"".join(p_data_tf(context_id, cmd.encode_command(command), command=True,
                                             max_pdu=limit)))


def serve(sock: socket.socket, peer: str, policy: AcceptorPolicy,
          ours: Callable[[], Mapping[str, Sequence[str]]], router: ArrivalRouter, timeouts: Timeouts,
          at_capacity: bool) -> None:
    """Run one association on ``sock`` to its end; closes nothing (the caller owns the socket).

    ``ours`` is read once the RQ has arrived, so :meth:`prefer_compressed` applies to associations
    negotiated after it was switched.
    """
    # A small buffer to start: it grows to the largest PDU the peer sends, and a connection that is
    # rejected (or never speaks) costs little.
    reader = PduReader(sock, max_length=MAX_ASSOCIATION_PDU, buffer_size=1 << 16)
    try:
        kind, body = reader.read(timeouts.acse)
    except (ReadTimeout, ConnectionClosed):
        return   # ARTIM expired, or the peer went away: close without a word (PS3.8 AA-2)
    except (ProtocolError, OSError) as exc:
        log.warning("storage SCP: bad first PDU from %s: %s", peer, exc)
        _abort(sock, ABORT_UNEXPECTED_PDU)
        return
    if kind == A_ABORT:
        return
    if kind != A_ASSOCIATE_RQ:
        _abort(sock, ABORT_UNEXPECTED_PDU)
        return
    try:
        rq = decode(kind, body)
    except ProtocolError as exc:
        log.warning("storage SCP: malformed A-ASSOCIATE-RQ from %s: %s", peer, exc)
        _abort(sock, ABORT_INVALID_PARAMETER)
        return
    assert isinstance(rq, AssociateRq)
    answer = negotiate(rq, policy, ours(), at_capacity=at_capacity)
    if isinstance(answer, AssociateRj):
        log.warning("storage SCP: association from %s (calling AE %r, called AE %r) rejected: %s",
                    peer, rq.calling_ae, rq.called_ae, answer.describe())
        _send_quietly(sock, encode(answer))
        _await_close(reader, timeouts.acse)
        return
    _run(sock, reader, rq, answer, router, timeouts, peer)


def _run(sock: socket.socket, reader: PduReader, rq: AssociateRq, accepted: Accepted,
         router: ArrivalRouter, timeouts: Timeouts, peer: str) -> None:
    sock.sendall(encode(accepted.ac))
    reader.max_length = accepted.ac.user.max_pdu
    reader.reserve(DATA_READ_AHEAD)   # established: read several PDUs per system call
    assoc = Association(sock, rq.calling_ae, accepted.contexts, accepted.peer_max_pdu, router, reader)
    try:
        while True:
            kind, body = reader.read(timeouts.network)
            if kind == P_DATA_TF:
                _p_data(assoc, body)
                continue
            if kind == A_RELEASE_RQ:
                if assoc.store is not None or assoc.command:
                    raise _UnexpectedPdu("A-RELEASE-RQ in the middle of a message")
                sock.sendall(encode(ReleaseRp()))
                _await_close(reader, timeouts.acse)
                return
            if kind == A_ABORT:
                if assoc.store is not None:
                    log.warning("storage SCP: %s aborted during a C-STORE; the instance was dropped",
                                rq.calling_ae)
                return
            raise _UnexpectedPdu(f"unexpected PDU type 0x{kind:02X} on an established association")
    except ReadTimeout:
        log.warning("storage SCP: %s silent for %s s; aborting the association", rq.calling_ae,
                    timeouts.network)
        _abort(sock, ABORT_NOT_SPECIFIED)
    except ProtocolError as exc:
        log.warning("storage SCP: protocol error from %s (%s): %s; aborting", rq.calling_ae, peer, exc)
        _abort(sock, ABORT_UNEXPECTED_PDU if isinstance(exc, _UnexpectedPdu) else ABORT_INVALID_PARAMETER)
    except (ConnectionClosed, OSError) as exc:
        if assoc.store is not None or assoc.command:
            log.warning("storage SCP: connection from %s lost mid-message: %s", rq.calling_ae, exc)


def _p_data(assoc: Association, body: memoryview) -> None:
    for pdv in iter_pdvs(body):
        if pdv.context_id not in assoc.contexts:
            raise ProtocolError(f"PDV on presentation context {pdv.context_id}, which was not accepted")
        if pdv.command:
            if assoc.store is not None:
                raise ProtocolError("a command fragment before the data set of a C-STORE ended")
            if assoc.command_context not in (None, pdv.context_id):
                raise ProtocolError("command fragments on two presentation contexts")
            assoc.command_context = pdv.context_id
            if len(assoc.command) + len(pdv.data) > cmd.MAX_COMMAND_SET:
                raise ProtocolError("command set too long")
            assoc.command += pdv.data
            if pdv.last:
                request = cmd.decode_command(memoryview(assoc.command))
                assoc.command.clear()
                assoc.command_context = None
                _on_command(assoc, pdv.context_id, request)
            continue
        store = assoc.store
        if store is None:
            raise ProtocolError("a data set fragment without a command")
        if pdv.context_id != store.context_id:
            raise ProtocolError("a data set on another presentation context than its command")
        if store.status is None:   # a store refused up front keeps nothing
            store.fragments.append(pdv.data)
        if pdv.last:
            assoc.store = None
            try:
                _finish_store(assoc, store)
            finally:
                assoc.reader.hold = False


def _on_command(assoc: Association, context_id: int, request: cmd.Command) -> None:
    abstract, transfer_syntax = assoc.contexts[context_id]
    field_ = request.command_field
    if field_ == cmd.C_STORE_RQ:
        if not request.has_data_set or request.message_id is None:
            raise ProtocolError("C-STORE-RQ without a data set or a Message ID")
        # The class is taken from the command, not checked against the context's (as pynetdicom).
        try:
            prefix = part10_prefix(request.affected_sop_class or "", request.affected_sop_instance or "",
                                   transfer_syntax)
            store = _Store(request, context_id, transfer_syntax, prefix)
        except Exception:  # noqa: BLE001 - values pydicom cannot put in a file meta: nothing to file
            store = _Store(request, context_id, transfer_syntax, b"", status=CANNOT_UNDERSTAND)
        assoc.store = store
        assoc.reader.hold = store.status is None   # until _finish_store: the fragments are views
        return
    if field_ == cmd.C_ECHO_RQ and abstract == VERIFICATION and not request.has_data_set:
        if request.message_id is None:
            raise ProtocolError("C-ECHO-RQ without a Message ID")
        assoc.send_command(context_id, cmd.c_echo_rsp(request.message_id, SUCCESS))
        return
    if field_ == cmd.C_CANCEL_RQ:
        return   # PS3.7 §9.3.2.3: nothing of ours runs long enough to cancel
    raise ProtocolError(f"{request.name} on {abstract}: not served by the storage SCP")


def _finish_store(assoc: Association, store: _Store) -> None:
    request = store.request
    status = store.status
    write = None
    if status is None:
        joined: list[bytes] = []

        def part10() -> bytes:
            # One copy, from the received bytes into the file's, made once (after the answer unless
            # routing needs the data set); the views die with this call.
            if not joined:
                joined.append(b"".join((store.prefix, *store.fragments)))
            return joined[0]

        cls, sop = request.affected_sop_class or "", request.affected_sop_instance or ""
        arrival = Arrival(
            sop_instance=sop, sop_class=cls, transfer_syntax=store.transfer_syntax,
            move_msg_id=request.move_originator_id, calling_ae=assoc.calling_ae,
            part10=part10, study_series=lambda: _study_series(part10()))
        try:
            status, write = assoc.router.accept(arrival)
        except Exception:  # noqa: BLE001 - the router catches the spool's errors; anything else is ours
            log.exception("storage SCP: routing a C-STORE failed")
            status = REFUSED_OUT_OF_RESOURCES
    try:
        assoc.send_command(store.context_id, cmd.c_store_rsp(request, status))
    finally:
        # Acknowledged, then spooled (ArrivalRouter.accept): before the next PDU is read, so an
        # association that ends now still hands its last instance to the spool.
        if write is not None:
            write()
        store.fragments.clear()


def _study_series(part10: bytes) -> tuple[str, str]:
    """Study and Series Instance UID of an assembled Part-10 file ("" when unreadable)."""
    try:
        ds = dcmread(BytesIO(part10), stop_before_pixels=True,
                     specific_tags=["StudyInstanceUID", "SeriesInstanceUID"])
    except Exception:  # noqa: BLE001 - a data set pydicom cannot read matches no move
        return "", ""
    return str(ds.get("StudyInstanceUID", "")), str(ds.get("SeriesInstanceUID", ""))


def _abort(sock: socket.socket, reason: int) -> None:
    _send_quietly(sock, encode(Abort(ABORT_SERVICE_PROVIDER, reason)))


def _send_quietly(sock: socket.socket, data: bytes) -> None:
    try:
        sock.sendall(data)
    except OSError:
        pass


def _await_close(reader: PduReader, timeout: float) -> None:
    """PS3.8 Sta13: after A-RELEASE-RP or A-ASSOCIATE-RJ the requestor closes; ARTIM bounds the wait."""
    try:
        while True:
            reader.read(timeout)
    except UpperLayerError:
        return
    except OSError:
        return
