"""DICOM TLS for the DIMSE edge: PS3.15 Annex B.1, the Basic TLS Secure Transport Connection Profile.

Two sides (docs/architecture.md, "DIMSE edge"):

* **Requestor** (every association the gateway opens to a node: C-ECHO, C-FIND, C-GET, C-MOVE,
  C-STORE). One client :class:`ssl.SSLContext` per node with ``tls.enabled``, built once
  (:func:`prepare` at start-up, or on first use) and looked up by
  :func:`gateway.dimse.association.open_association`, the one place associations are opened:
  the node's CA bundle (or the system's), our client certificate when configured, host name check
  against ``server_name`` (default the node's host) unless ``verify: false``, TLS 1.2 at least.
* **Acceptor** (the storage SCP where C-MOVE sub-operations arrive): :func:`server_context` from
  ``gateway.dimse_tls``, optionally requiring a client certificate signed by ``ca_file``.

Why an :class:`Attempt` per association: pynetdicom wraps the socket and runs the handshake inside
its transport connect and only *logs* an SSL failure; the association then looks like "nobody
listens". Each association is given a thin :class:`Attempt` in front of the node's shared context;
the sockets it wraps record the handshake failure (and, TLS 1.3, the peer's alert on the first read,
e.g. a refused client certificate), so :mod:`gateway.dimse.outcomes` can say "TLS failure".

The acceptor's handshake runs in pynetdicom's accept loop (``AssociationServer.get_request``), so
it is bounded by :data:`SERVER_HANDSHAKE_TIMEOUT`: a peer that connects and stays silent cannot
hold up other PACS's C-MOVE arrivals for longer than that.
"""

from __future__ import annotations

import logging
import socket
import ssl
import threading
from collections.abc import Sequence
from typing import Any

from gateway.settings import ConfigError, DimseTls, PacsNode

log = logging.getLogger(__name__)

MINIMUM_VERSION = ssl.TLSVersion.TLSv1_2
SERVER_HANDSHAKE_TIMEOUT = 10.0
"""Seconds the storage SCP's accept loop waits for a client's TLS handshake."""

_contexts: dict[tuple[str, object], ssl.SSLContext] = {}
_lock = threading.Lock()


# --------------------------------------------------------------------------- requestor


class _TrackedSocket(ssl.SSLSocket):
    """A client TLS socket that reports its handshake failure (and a TLS alert on a read) to its
    :class:`Attempt`; pynetdicom only logs them."""

    _dwg_attempt: Attempt | None = None

    def do_handshake(self, block: bool = False) -> None:
        try:
            super().do_handshake(block)
        except OSError as exc:   # ssl.SSLError, a reset or EOF, a timeout: all mid-handshake
            self._note(exc)
            raise

    def recv(self, buflen: int = 1024, flags: int = 0) -> bytes:
        try:
            return super().recv(buflen, flags)
        except ssl.SSLError as exc:   # e.g. TLS 1.3: the peer refused our certificate after the handshake
            self._note(exc)
            raise

    def _note(self, exc: OSError) -> None:
        attempt = self._dwg_attempt
        if attempt is not None and attempt.error is None:
            attempt.error = exc


class Attempt:
    """One association's use of its node's TLS context; :attr:`error` is what failed in TLS, if anything.

    Passed to pynetdicom as the context of ``tls_args``: pynetdicom only calls ``wrap_socket``, on a
    socket not yet connected, so the handshake runs in ``connect`` after the socket knows its attempt.
    """

    def __init__(self, context: ssl.SSLContext, server_hostname: str) -> None:
        self._context = context
        self.server_hostname = server_hostname
        self.error: OSError | None = None

    def wrap_socket(self, sock: socket.socket, server_side: bool = False,
                    server_hostname: str | None = None, **kwargs: Any) -> ssl.SSLSocket:
        wrapped = self._context.wrap_socket(sock, server_side=server_side,
                                            server_hostname=server_hostname or self.server_hostname, **kwargs)
        if isinstance(wrapped, _TrackedSocket):
            wrapped._dwg_attempt = self
        return wrapped

    @property
    def tls_args(self) -> tuple[ssl.SSLContext, str]:
        """For ``AE.associate(tls_args=...)``, which types the first item as a context (duck-typed)."""
        context: Any = self
        return context, self.server_hostname


def client_context(node: PacsNode) -> ssl.SSLContext | None:
    """The node's one client context (None without ``tls.enabled``); built on first use, then shared."""
    if not node.tls.enabled:
        return None
    key = (node.name, node.tls)
    with _lock:
        context = _contexts.get(key)
        if context is None:
            context = _contexts[key] = _build_client_context(node)
    return context


def prepare(nodes: Sequence[PacsNode]) -> None:
    """Build every TLS node's context now, so a bad certificate or key fails start-up, not a request."""
    for node in nodes:
        client_context(node)


def attempt(node: PacsNode) -> Attempt | None:
    """A fresh :class:`Attempt` on the node's context for one association; None without TLS."""
    context = client_context(node)
    if context is None:
        return None
    return Attempt(context, node.tls.server_name or node.host)


def _build_client_context(node: PacsNode) -> ssl.SSLContext:
    tls, key = node.tls, f"nodes[{node.name}].tls"
    try:
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=tls.ca_file)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"{key}.ca_file: cannot load CA certificates from {tls.ca_file!r}: {exc}") from exc
    context.minimum_version = MINIMUM_VERSION
    if tls.cert_file:
        _load_chain(context, tls.cert_file, tls.key_file, key)
    if not tls.verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    context.sslsocket_class = _TrackedSocket
    return context


def _load_chain(context: ssl.SSLContext, cert_file: str, key_file: str | None, key: str) -> None:
    try:
        context.load_cert_chain(cert_file, key_file)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"{key}.cert_file: cannot load the certificate {cert_file!r} with its key "
                          f"{key_file or cert_file!r}: {exc}") from exc


# --------------------------------------------------------------------------- acceptor


class _ServerContext(ssl.SSLContext):
    """The storage SCP's context: the handshake, run in the accept loop, is bounded in time and its
    failure logged (socketserver drops it silently)."""

    def wrap_socket(self, sock: socket.socket, server_side: bool = False,
                    do_handshake_on_connect: bool = True, suppress_ragged_eofs: bool = True,
                    server_hostname: str | bytes | None = None,
                    session: ssl.SSLSession | None = None) -> ssl.SSLSocket:
        previous, peer = sock.gettimeout(), _peer(sock)
        sock.settimeout(SERVER_HANDSHAKE_TIMEOUT)
        try:
            wrapped = super().wrap_socket(sock, server_side=server_side,
                                          do_handshake_on_connect=do_handshake_on_connect,
                                          suppress_ragged_eofs=suppress_ragged_eofs,
                                          server_hostname=server_hostname, session=session)
        except OSError as exc:
            log.warning("storage SCP: DICOM TLS handshake with %s failed: %s", peer, exc)
            raise   # the SSL socket closed itself; socketserver drops the connection
        wrapped.settimeout(previous)
        return wrapped


def server_context(tls: DimseTls) -> ssl.SSLContext | None:
    """The storage SCP's context from ``gateway.dimse_tls`` (None when not enabled)."""
    if not tls.enabled:
        return None
    key = "gateway.dimse_tls"
    assert tls.cert_file is not None   # settings: required when enabled
    context = _ServerContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = MINIMUM_VERSION
    _load_chain(context, tls.cert_file, tls.key_file, key)
    if tls.ca_file:
        try:
            context.load_verify_locations(cafile=tls.ca_file)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(f"{key}.ca_file: cannot load CA certificates from {tls.ca_file!r}: "
                              f"{exc}") from exc
    if tls.require_client_cert:
        context.verify_mode = ssl.CERT_REQUIRED
    elif tls.ca_file:
        context.verify_mode = ssl.CERT_OPTIONAL
    return context


def _peer(sock: socket.socket) -> str:
    try:
        name = sock.getpeername()
    except OSError:
        return "a peer"
    return f"{name[0]}:{name[1]}" if isinstance(name, tuple) and len(name) >= 2 else "a peer"
