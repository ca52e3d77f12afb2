"""The fast engine's PDU reader: whole PDUs from one blocking socket (plain or TLS), PS3.8 §9.3.

Split from :mod:`gateway.dimse.fast.pdu` (the pure PDU codecs) along the seam between encoding and
decoding bytes and reading them off a socket: the one stateful, I/O-bound piece of the upper layer,
shared by the fast requestor (:mod:`gateway.dimse.fast.association`) and the fast acceptor
(:mod:`gateway.dimse.fast.scp_association`).
"""

from __future__ import annotations

import select
import socket
import ssl

from gateway.dimse.fast.pdu import (
    MAX_ASSOCIATION_PDU,
    MAX_PDU_CAP,
    P_DATA_TF,
    PDU_HEADER,
    PDU_TYPES,
    ConnectionClosed,
    ControlPdu,
    ProtocolError,
    ReadTimeout,
    decode,
)

QUICKACK: int | None = getattr(socket, "TCP_QUICKACK", None)   # Linux only


class PduReader:
    """Reads whole PDUs from one blocking socket (plain or TLS) into a reusable buffer.

    :meth:`read` returns ``(type, body)``; ``body`` is a view into the buffer, valid until the next
    read (copy what must outlive it). ``max_length`` caps the PDU length field: a larger one raises
    :class:`ProtocolError` before anything is read or allocated; set it to the maximum PDU length
    we advertised once the association is negotiated (0 = unlimited: :data:`MAX_PDU_CAP`).
    ``quickack``: re-arm TCP_QUICKACK before each socket read (Linux clears it once used), so a peer
    with Nagle on gets our ACK at once (docs/architecture.md, "DIMSE edge").

    **Read-ahead**: each ``recv_into`` asks for all the free space of the buffer, so one system call
    brings as many PDUs (and headers with their bodies) as the socket holds: a C-GET of 128 KiB PDUs
    costs a few reads per instance instead of two per PDU, and a message that has already arrived is
    seen by :meth:`wait` / :meth:`buffered` without a ``select``. Bytes of an unfinished PDU are moved
    to the front when the space behind them is too short for it (at most one PDU, rarely).

    **Hold**: while :attr:`hold` is set nothing already received is overwritten: instead of moving
    bytes to the front, reading continues in a new buffer (the old one lives as long as views into it
    do). A caller assembling a data set keeps its fragments as views and joins them once, straight
    from the received bytes into the Part-10 file's bytes (one copy instead of two).
    """

    def __init__(self, sock: socket.socket, *, max_length: int = MAX_ASSOCIATION_PDU,
                 buffer_size: int = 1 << 20, quickack: bool = True) -> None:
        self.sock = sock
        self.max_length = max_length
        self._buffer = bytearray(min(buffer_size, self._cap() + 6))
        self._start = 0      # first unread byte
        self._end = 0        # end of the bytes received
        self._timeout: float | None = -1.0     # unknown: set on first read
        self.hold = False    # see the class docstring
        self._quickack = quickack and QUICKACK is not None and not isinstance(sock, ssl.SSLSocket)

    def _cap(self) -> int:
        return self.max_length if self.max_length else MAX_PDU_CAP

    def set_timeout(self, timeout: float | None) -> None:
        """The socket's timeout for the next operations (sends included); applied only when changed."""
        if timeout != self._timeout:
            self.sock.settimeout(timeout)
            self._timeout = timeout

    def reserve(self, size: int) -> None:
        """Read ahead up to ``size`` bytes from now on (a larger buffer; nothing buffered is lost)."""
        if size > len(self._buffer):
            self._grow(size)

    def _grow(self, size: int) -> None:
        # A new buffer: views handed out by the last read stay valid on the old one until dropped.
        pending = self._end - self._start
        buffer = bytearray(size)
        buffer[:pending] = memoryview(self._buffer)[self._start:self._end]
        self._buffer, self._start, self._end = buffer, 0, pending

    def buffered(self) -> int:
        """Bytes received and not read yet (part of a PDU counts)."""
        return self._end - self._start

    def _ensure(self, need: int) -> None:
        """At least ``need`` bytes buffered from ``_start``, reading as much as the buffer takes."""
        if self._end - self._start >= need:
            return
        if self._start + need > len(self._buffer):
            if need > len(self._buffer):
                self._grow(max(need, 2 * len(self._buffer)))
            elif self.hold:   # views into this buffer are held: go on in a new one
                self._grow(len(self._buffer))
            else:   # not enough room behind: move the unread bytes to the front
                pending = self._end - self._start
                self._buffer[:pending] = self._buffer[self._start:self._end]
                self._start, self._end = 0, pending
        view = memoryview(self._buffer)
        while self._end - self._start < need:
            if self._quickack:
                try:
                    self.sock.setsockopt(socket.IPPROTO_TCP, QUICKACK, 1)   # type: ignore[arg-type]
                except OSError:
                    pass
            try:
                k = self.sock.recv_into(view[self._end:])
            except TimeoutError as exc:
                raise ReadTimeout(f"no data for {self._timeout} s") from exc
            except ssl.SSLError:
                raise   # the caller tells a TLS failure (a refused client certificate, TLS 1.3) apart
            except OSError as exc:   # reset, broken pipe, closed locally
                raise ConnectionClosed(f"connection lost: {exc}") from exc
            if not k:
                raise ConnectionClosed("the peer closed the connection")
            self._end += k

    def wait(self, timeout: float) -> bool:
        """Whether data is ready to read within ``timeout`` seconds (buffered or TLS-decrypted bytes
        count), without consuming it: lets the caller look at a cancel flag between waits."""
        if self._end > self._start:
            return True
        if isinstance(self.sock, ssl.SSLSocket) and self.sock.pending():
            return True
        try:
            ready, _, _ = select.select([self.sock], [], [], max(timeout, 0.0))
        except (OSError, ValueError) as exc:   # closed locally (fileno -1)
            raise ConnectionClosed(f"connection lost: {exc}") from exc
        return bool(ready)

    def read(self, timeout: float | None) -> tuple[int, memoryview]:
        """The next PDU: (type, body). ``timeout`` bounds every socket read (None: blocks)."""
        if self._start == self._end and not self.hold:
            self._start = self._end = 0      # empty: start over at the front, no move needed
        self.set_timeout(timeout)
        self._ensure(6)
        kind, _, length = PDU_HEADER.unpack_from(self._buffer, self._start)
        self._start += 6      # the header is consumed, also when refused below (nothing else is)
        if kind not in PDU_TYPES:
            raise ProtocolError(f"unknown PDU type 0x{kind:02X}")
        if length > self._cap():
            raise ProtocolError(f"PDU type 0x{kind:02X} of {length} bytes exceeds the limit ({self._cap()})")
        self._ensure(length)
        first = self._start
        self._start = first + length
        return kind, memoryview(self._buffer)[first:first + length]

    def read_control(self, timeout: float | None) -> ControlPdu:
        """The next PDU, which must not be a P-DATA-TF, decoded."""
        kind, body = self.read(timeout)
        if kind == P_DATA_TF:
            raise ProtocolError("unexpected P-DATA-TF")
        return decode(kind, body)
