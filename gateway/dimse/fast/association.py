"""Associations the fast engine requests: TCP, DICOM TLS, A-ASSOCIATE, DIMSE messages, release/abort.

:func:`request` is the fast engine's one way to open an association (the counterpart of
:func:`gateway.dimse.association.open_association`), so every operation gets the same treatment:

* TCP connect bounded by the node's ``timeouts.connect``, TCP_NODELAY (a DIMSE message is two
  writes, docs/architecture.md, "DIMSE edge"), TCP_QUICKACK re-armed before every PDU read;
* DICOM TLS (PS3.15 Annex B.1) when the node has ``tls.enabled``: the node's one client context
  through :func:`gateway.dimse.tls.attempt`, whose sockets keep the handshake error;
* the A-ASSOCIATE exchange bounded by ``timeouts.acse`` (the ARTIM timer, PS3.8 §9.1.5);
* every failure mapped by :func:`gateway.dimse.outcomes.association_failure`, the rule both engines
  share: unreachable, connect timeout, TLS failure, rejected (with the A-ASSOCIATE-RJ's reason), aborted
  or closed, no answer.

An :class:`Association` is used by one thread at a time. :meth:`Association.receive` reassembles one
DIMSE message (command, then its data set if any, PS3.7 §6.3.1 and PS3.8 Annex E) from PDVs read
straight out of the socket; it waits ``timeouts.dimse`` for a message to start, calling ``idle`` every
:data:`POLL_SECONDS` meanwhile (where a C-CANCEL is sent), and ``timeouts.network`` for each read
within it. Whatever ends the association (A-ABORT, a closed socket, a malformed PDU, a timeout) raises
a :class:`gateway.dimse.fast.pdu.UpperLayerError` and leaves it not established.
"""

from __future__ import annotations

import logging
import socket
import ssl
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import BinaryIO

from gateway.dimse import tls
from gateway.dimse.contexts import Context
from gateway.dimse.fast import pdu
from gateway.dimse.fast.commands import DATA_SET_PRESENT, NO_DATA_SET, Command, decode_command, encode_command
from gateway.dimse.fast.pdu_reader import PduReader
from gateway.dimse.outcomes import association_failure, no_context_accepted
from gateway.settings import PacsNode

log = logging.getLogger(__name__)

POLL_SECONDS = 0.1
"""How often a wait for the next message looks at ``idle`` (the caller's cancel flag)."""
SMALL_MESSAGE = 64 << 10
"""A command and a data set up to this size go out in one write."""


@dataclass
class Message:
    """One received DIMSE message: its context, command set and data set fragments.

    The fragments are views into the bytes received (no copy): valid until the association's next
    :meth:`Association.receive` (join them before that, as :meth:`data_set` does)."""

    context_id: int
    command: Command
    fragments: list[memoryview] = field(default_factory=list)

    def data_set(self) -> bytes | None:
        return b"".join(self.fragments) if self.command.has_data_set else None


@dataclass(frozen=True)
class _Failed:
    """What :func:`gateway.dimse.outcomes.association_failure` reads of a failed association."""

    is_rejected: bool = False
    is_aborted: bool = False


SEND_WINDOW = 1 << 20
"""Bytes of a data set :meth:`Association.send_file` reads and sends at once (rounded to whole PDUs)."""

_IOV_MAX = 512
"""Buffers per ``sendmsg`` call (POSIX allows at least 16, Linux 1024)."""


def _read_into(file: BinaryIO, view: memoryview, left: int) -> None:
    """Fill ``view`` from ``file``; OSError when the file ends first (``left``: bytes still owed)."""
    got = 0
    while got < len(view):
        n = file.readinto(view[got:])   # type: ignore[attr-defined]
        if not n:
            raise OSError(f"the file ended {left - got} bytes early")
        got += n


def _send_gathered(sock: socket.socket, buffers: Sequence[bytes | memoryview]) -> None:
    """``sendall`` for a gathered write: ``sendmsg`` until every buffer is sent (a call may send
    part of them; a blocking socket with a timeout raises TimeoutError as ``sendall`` does)."""
    views = [memoryview(b) for b in buffers]
    first = 0
    while True:
        while first < len(views) and not views[first].nbytes:
            first += 1
        if first == len(views):
            return
        sent = sock.sendmsg(views[first:first + _IOV_MAX])
        while sent:
            size = views[first].nbytes
            if sent < size:
                views[first] = views[first][sent:]
                break
            sent -= size
            first += 1


def _seconds(value: float) -> float | None:
    """A configured timeout for a socket: 0 means none (a 0 socket timeout would mean non-blocking)."""
    return value if value > 0 else None


class Association:
    """An established association to ``node`` (see the module docstring)."""

    def __init__(self, sock: socket.socket, reader: PduReader, node: PacsNode,
                 contexts: dict[int, tuple[str, str]], peer_max_pdu: int) -> None:
        self.sock = sock
        self.reader = reader
        self.node = node
        self.contexts = contexts              # accepted: context ID -> (abstract syntax, transfer syntax)
        self.peer_max_pdu = peer_max_pdu      # the largest PDU the peer receives; 0 = unlimited
        self._established = True
        self._pending: deque[pdu.Pdv] = deque()   # PDVs left in the last PDU read (views into it)
        self._send_window: memoryview | None = None   # send_file's read buffer, made at first use

    @property
    def is_established(self) -> bool:
        return self._established

    # ------------------------------------------------------------------ contexts

    def context_for(self, abstract_syntax: str) -> int | None:
        """The first accepted context for ``abstract_syntax`` (PS3.8: one per proposal), or None."""
        return next((cid for cid, (ab, _) in self.contexts.items() if ab == abstract_syntax), None)

    def accepts(self, abstract_syntax: str) -> bool:
        return self.context_for(abstract_syntax) is not None

    def accepted_syntaxes(self, abstract_syntax: str) -> list[str]:
        return [ts for ab, ts in self.contexts.values() if ab == abstract_syntax]

    def transfer_syntax(self, context_id: int) -> str:
        return self.contexts[context_id][1]

    # ------------------------------------------------------------------ messages

    def send(self, context_id: int, command: Command, data: bytes | memoryview | None = None) -> None:
        """One DIMSE message: the command set, then the data set when given (fragmented to the
        peer's maximum PDU length)."""
        command.data_set_type = DATA_SET_PRESENT if data is not None else NO_DATA_SET
        max_pdu = self.peer_max_pdu
        head = b"".join(pdu.p_data_tf(context_id, encode_command(command), command=True, max_pdu=max_pdu))
        if data is None or len(data) <= SMALL_MESSAGE:
            tail = b"" if data is None else b"".join(pdu.p_data_tf(context_id, data, command=False,
                                                                   max_pdu=max_pdu))
            self._send_bytes(head + tail)
            return
        self._send_bytes(head)
        for fragment in pdu.p_data_tf(context_id, data, command=False, max_pdu=max_pdu):
            self._send_bytes(fragment)

    def send_file(self, context_id: int, command: Command, file: BinaryIO, length: int) -> None:
        """One DIMSE message whose data set is the next ``length`` bytes of ``file``, read a window
        (:data:`SEND_WINDOW`) at a time into one reused buffer, never held whole (a C-STORE from
        disk); each window's PDUs go out in one gathered write of their headers and views of the
        buffer. A file that cannot be read aborts the association and raises its OSError."""
        command.data_set_type = DATA_SET_PRESENT
        step = self._fragment_size()
        buffers = self._command_pdus(context_id, command)
        if length == 0:
            buffers += pdu.p_data_fragments(context_id, [], step, last=True)
        window = self._window(step)
        left = length
        while left:
            size = min(len(window), left)
            try:
                _read_into(file, window[:size], left)
            except OSError:
                self.abort()
                raise
            left -= size
            # a window holds whole PDUs' worth: its PDUs end where it ends
            buffers += pdu.p_data_fragments(context_id, [window[:size]], step, last=not left)
            self._send_buffers(buffers)   # sent whole before the buffer is read into again
            buffers = []
        if buffers:
            self._send_buffers(buffers)

    def send_pieces(self, context_id: int, command: Command, pieces: Sequence[memoryview]) -> None:
        """One DIMSE message whose data set is the bytes ``pieces`` (in order; a STOW-RS part held
        in memory as it was received): framed into PDUs across the pieces and sent in gathered
        writes, nothing copied in Python. Why not a file: writing a received part to one and reading
        it back for its C-STORE cost two copies of every uploaded byte and the page allocations of
        a new in-memory file per part, on the event loop and the store thread (docs/architecture.md,
        "STOW-RS")."""
        command.data_set_type = DATA_SET_PRESENT
        self._send_buffers(self._command_pdus(context_id, command)
                           + pdu.p_data_fragments(context_id, pieces, self._fragment_size(), last=True))

    def _command_pdus(self, context_id: int, command: Command) -> list[bytes | memoryview]:
        return list(pdu.p_data_tf(context_id, encode_command(command), command=True,
                                  max_pdu=self.peer_max_pdu))

    def _fragment_size(self) -> int:
        """Data set bytes per PDU: the peer's maximum PDU length less the PDV headers (an unlimited
        peer: 1 MiB)."""
        return min((self.peer_max_pdu or pdu.MAX_PDU_CAP) - 6, 1 << 20)

    def _window(self, step: int) -> memoryview:
        """The association's read buffer for :meth:`send_file`: whole PDUs' worth, about SEND_WINDOW."""
        size = max(1, SEND_WINDOW // step) * step
        if self._send_window is None or len(self._send_window) != size:
            self._send_window = memoryview(bytearray(size))
        return self._send_window

    def _send_bytes(self, data: bytes) -> None:
        self._send_buffers((data,))

    def _send_buffers(self, buffers: Sequence[bytes | memoryview]) -> None:
        try:
            self.reader.set_timeout(_seconds(self.node.timeouts.network))
            if len(buffers) == 1:
                self.sock.sendall(buffers[0])
            elif isinstance(self.sock, ssl.SSLSocket) or not hasattr(self.sock, "sendmsg"):
                self.sock.sendall(b"".join(buffers))    # TLS has no gathered write
            else:
                _send_gathered(self.sock, buffers)
        except TimeoutError as exc:
            self._lost()
            raise pdu.ReadTimeout(f"sending to the peer timed out: {exc}") from exc
        except OSError as exc:
            self._lost()
            raise pdu.ConnectionClosed(f"sending to the peer failed: {exc}") from exc

    def receive(self, timeout: float, idle: Callable[[], None] | None = None) -> Message:
        """The next DIMSE message; ``timeout`` bounds the wait for it to start (see module docstring)."""
        try:
            return self._receive(timeout, idle)
        except pdu.ProtocolError as exc:
            log.warning("node %s: %s; aborting the association", self.node.name, exc)
            self.abort(pdu.Abort(pdu.ABORT_SERVICE_PROVIDER, pdu.ABORT_INVALID_PARAMETER))
            raise
        except ssl.SSLError as exc:
            self._lost()
            raise pdu.ConnectionClosed(f"TLS failure: {exc}") from exc
        except pdu.UpperLayerError:
            self._lost()
            raise

    def _receive(self, timeout: float, idle: Callable[[], None] | None) -> Message:
        pdv = self._next_pdv(wait=timeout, idle=idle)
        context_id = pdv.context_id
        if context_id not in self.contexts:
            raise pdu.ProtocolError(f"a message on presentation context {context_id}, which was not accepted")
        parts: list[bytes] = []
        while True:
            if not pdv.command or pdv.context_id != context_id:
                raise pdu.ProtocolError("a data set fragment or another context inside a command set")
            parts.append(bytes(pdv.data))
            if pdv.last:
                break
            pdv = self._next_pdv()
        message = Message(context_id, decode_command(b"".join(parts)))
        if not message.command.has_data_set:
            return message
        self.reader.hold = True   # the fragments stay views into what was received (PduReader)
        try:
            while True:
                pdv = self._next_pdv()
                if pdv.command or pdv.context_id != context_id:
                    raise pdu.ProtocolError("a command fragment or another context inside a data set")
                message.fragments.append(pdv.data)
                if pdv.last:
                    return message
        finally:
            self.reader.hold = False

    def _next_pdv(self, *, wait: float | None = None, idle: Callable[[], None] | None = None) -> pdu.Pdv:
        """The next PDV: from the PDU read last, else from a new one. ``wait``: this starts a message,
        so the first read may wait that long (0: forever), polling ``idle``."""
        while True:
            if self._pending:
                return self._pending.popleft()
            if wait is not None:
                if not self.reader.buffered():   # read ahead already: no select, no poll
                    self._wait(wait, idle)
                wait = None
            kind, body = self.reader.read(_seconds(self.node.timeouts.network))
            if kind == pdu.P_DATA_TF:
                self._pending.extend(pdu.iter_pdvs(body))
            elif kind == pdu.A_ABORT:
                self._lost()
                abort = pdu.decode(kind, body)
                assert isinstance(abort, pdu.Abort)
                raise pdu.PeerAborted(abort)
            elif kind == pdu.A_RELEASE_RQ:
                self._send_quietly(pdu.encode(pdu.ReleaseRp()))
                self._lost()
                raise pdu.ConnectionClosed("the peer released the association during an operation")
            else:
                raise pdu.ProtocolError(f"unexpected PDU type 0x{kind:02X} on an established association")

    def _wait(self, timeout: float, idle: Callable[[], None] | None) -> None:
        deadline = time.monotonic() + timeout if timeout > 0 else None
        while True:
            left = POLL_SECONDS if deadline is None else deadline - time.monotonic()
            if left <= 0:
                raise pdu.ReadTimeout(f"no message within {timeout} s")
            if self.reader.wait(min(left, POLL_SECONDS)):
                return
            if idle is not None:
                idle()

    def peer_spoke(self) -> bool:
        """Between operations: whether the peer sent something nobody asked for (an A-ABORT, an
        A-RELEASE-RQ, a closed connection), i.e. this idle association must not be reused."""
        if not self._established:
            return True
        if self._pending:
            return True
        try:
            return self.reader.wait(0)
        except pdu.UpperLayerError:
            return True

    # ------------------------------------------------------------------ ending

    def release(self) -> None:
        """A-RELEASE-RQ, wait for the RP (``timeouts.acse``), close; never raises."""
        if not self._established:
            self._close_socket()
            return
        self._established = False
        try:
            self.sock.sendall(pdu.encode(pdu.ReleaseRq()))
            deadline = time.monotonic() + (self.node.timeouts.acse or 10.0)
            while time.monotonic() < deadline:
                kind, _ = self.reader.read(max(deadline - time.monotonic(), 0.01))
                if kind in (pdu.A_RELEASE_RP, pdu.A_ABORT, pdu.A_RELEASE_RQ):
                    break   # late P-DATA (responses after a cancel) is drained meanwhile
        except (pdu.UpperLayerError, OSError):
            log.debug("node %s: release not confirmed", self.node.name, exc_info=True)
        finally:
            self._close_socket()

    def abort(self, abort: pdu.Abort | None = None) -> None:
        """A-ABORT (as service user by default) and close; never raises."""
        if self._established:
            self._established = False
            self._send_quietly(pdu.encode(abort or pdu.Abort()))
        self._close_socket()

    def close(self, *, clean: bool = True) -> None:
        """Release, or (not ``clean``) abort."""
        if clean:
            self.release()
        else:
            self.abort()

    def _send_quietly(self, data: bytes) -> None:
        try:
            self.reader.set_timeout(1.0)
            self.sock.sendall(data)
        except OSError:
            pass

    def _lost(self) -> None:
        self._established = False
        self._close_socket()

    def _close_socket(self) -> None:
        self._pending.clear()
        try:
            self.sock.close()
        except OSError:
            pass


# --------------------------------------------------------------------------- requesting


def request(calling_ae: str, node: PacsNode, contexts: Sequence[Context], *, max_pdu: int | None = None,
            scp_roles: Sequence[str] = (), none_accepted_ok: bool = False) -> Association | None:
    """An established association to ``node`` proposing ``contexts`` in order (IDs 1, 3, 5, ...).

    ``max_pdu``: the largest PDU we receive (default the node's ``max_pdu``; 0 is unlimited, capped
    at :data:`gateway.dimse.fast.pdu.MAX_PDU_CAP`). ``scp_roles``: SOP classes we offer to be the
    storage SCP for (C-GET, PS3.7 §D.3.3.4). ``none_accepted_ok``: return None instead of raising when
    the node accepted the association but none of the contexts.

    Raises the :mod:`gateway.errors` tree (502/504 naming the node) for every failure.
    """
    if not contexts:
        raise ValueError("no presentation context to propose")
    ours = node.max_pdu if max_pdu is None else max_pdu
    proposed = tuple(pdu.PresentationContext(2 * i + 1, cls, tuple(syntaxes))
                     for i, (cls, syntaxes) in enumerate(contexts))
    rq = pdu.AssociateRq(called_ae=node.ae_title, calling_ae=calling_ae, contexts=proposed,
                         user=pdu.UserInformation(
                             max_pdu=ours,
                             roles=tuple(pdu.RoleSelection(cls, scu=False, scp=True) for cls in scp_roles)))
    secure = tls.attempt(node)
    started = time.monotonic()

    def failure(*, connected: bool, rejected: bool = False, aborted: bool = False,
                tls_error: OSError | None = None, rejection: str | None = None) -> Exception:
        return association_failure(_Failed(rejected, aborted), node.name, connected=connected,
                                   started=started, connect_timeout=node.timeouts.connect,
                                   tls_enabled=secure is not None,
                                   tls_error=tls_error or (secure.error if secure is not None else None),
                                   rejection=rejection, acse_timeout=node.timeouts.acse)

    try:
        sock = socket.create_connection((node.host, node.port), timeout=_seconds(node.timeouts.connect))
    except OSError as exc:
        raise failure(connected=False) from exc
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if secure is not None:
            try:
                sock = secure.wrap_socket(sock)   # the handshake, bounded by the connect timeout
            except OSError as exc:
                raise failure(connected=True, tls_error=exc) from exc
        reader = PduReader(sock, max_length=pdu.MAX_ASSOCIATION_PDU)
        answer = _negotiate(sock, reader, rq, node, failure)
    except BaseException:
        sock.close()
        raise
    accepted: dict[int, tuple[str, str]] = {}
    offered = {cx.id: cx for cx in proposed}
    for result in answer.results:
        cx = offered.get(result.id)
        if result.accepted and cx is not None and result.transfer_syntax in cx.transfer_syntaxes:
            accepted[result.id] = (cx.abstract_syntax, str(result.transfer_syntax))
    reader.max_length = ours
    assoc = Association(sock, reader, node, accepted, answer.user.max_pdu)
    if not accepted:
        # PS3.8 §9.3.3.2: established, but nothing can be done on it.
        assoc.abort(pdu.Abort(pdu.ABORT_SERVICE_USER))
        if none_accepted_ok:
            return None
        raise no_context_accepted(node.name, len(proposed))
    if answer.user.max_pdu and answer.user.max_pdu < pdu.MIN_SEND_PDU:
        assoc.abort(pdu.Abort(pdu.ABORT_SERVICE_PROVIDER, pdu.ABORT_INVALID_PARAMETER))
        raise failure(connected=True, aborted=True)
    return assoc


def _negotiate(sock: socket.socket, reader: PduReader, rq: pdu.AssociateRq, node: PacsNode,
               failure: Callable[..., Exception]) -> pdu.AssociateAc:
    """Send the A-ASSOCIATE-RQ and read the answer within the ACSE timeout (ARTIM, PS3.8 §9.1.5)."""
    timeout = _seconds(node.timeouts.acse)
    try:
        reader.set_timeout(timeout)
        sock.sendall(pdu.encode(rq))
        answer = reader.read_control(timeout)
    except ssl.SSLError as exc:   # TLS 1.3: a refused client certificate shows on the first read
        raise failure(connected=True, tls_error=exc) from exc
    except (pdu.ReadTimeout, TimeoutError) as exc:
        raise failure(connected=True) from exc
    except pdu.ProtocolError as exc:
        log.warning("node %s: malformed answer to the association request: %s", node.name, exc)
        _quiet_send(sock, pdu.encode(pdu.Abort(pdu.ABORT_SERVICE_PROVIDER, pdu.ABORT_INVALID_PARAMETER)))
        raise failure(connected=True, aborted=True) from exc
    except (pdu.UpperLayerError, OSError) as exc:   # closed or reset by the peer
        raise failure(connected=True, aborted=True) from exc
    if isinstance(answer, pdu.AssociateAc):
        return answer
    if isinstance(answer, pdu.AssociateRj):
        raise failure(connected=True, rejected=True, rejection=answer.describe())
    if isinstance(answer, pdu.Abort):
        raise failure(connected=True, aborted=True)
    _quiet_send(sock, pdu.encode(pdu.Abort(pdu.ABORT_SERVICE_PROVIDER, pdu.ABORT_UNEXPECTED_PDU)))
    raise failure(connected=True, aborted=True)


def _quiet_send(sock: socket.socket, data: bytes) -> None:
    try:
        sock.sendall(data)
    except OSError:
        pass
