"""The gateway's storage SCP on plain sockets: where C-MOVE sub-operations arrive (``scp_engine: fast``).

Same contract as pynetdicom's :class:`gateway.dimse.storage_scp.StorageScp` (the ``MoveDestination``
protocol of :mod:`gateway.pacs`, plus ``start``/``stop``/``attach_cluster`` and the counters), and
the same rules: which associations are accepted and which contexts
(:mod:`gateway.dimse.fast.scp_negotiation`, from :func:`gateway.dimse.contexts.scp_contexts`),
where each C-STORE goes (:class:`gateway.dimse.arrivals_routing.ArrivalRouter`). Why it exists:
pynetdicom's per-PDU machinery (a reactor thread, queues, 1 ms polling, pydicom-encoded commands)
made C-MOVE arrivals several times slower than DCMTK's storescp on the same data; here each
association is one thread doing blocking ``recv_into`` reads (docs/architecture.md, "C-MOVE").

* **Threads**: one accept thread; one thread per connection, at most :data:`MAX_ASSOCIATIONS`
  associations at once. One more is refused with A-ASSOCIATE-RJ "local limit exceeded" (transient),
  and past twice that many open connections a new one is closed at once, so a flood cannot grow the
  thread count without bound.
* **TLS** (``gateway.dimse_tls``, PS3.15 Annex B.1): the accepted socket is wrapped with
  :func:`gateway.dimse.tls.server_context`'s context on the connection's own thread (the handshake,
  bounded by ``SERVER_HANDSHAKE_TIMEOUT`` and logged when it fails, never holds up other PACS).
* **Socket**: TCP_NODELAY on every connection (a response is one small write the PACS waits for);
  the reader re-arms TCP_QUICKACK (docs/architecture.md, "DIMSE edge").
* **Stop**: the listening socket closes, open associations are cut (their arrivals are not
  answered, so the PACS counts them failed) and their threads joined.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
import threading
from collections.abc import Mapping, Sequence

from gateway.dimse import tls as dimse_tls
from gateway.dimse.arrivals_routing import ArrivalRouter, CompressedPreference
from gateway.dimse.contexts import scp_contexts, scp_verification
from gateway.dimse.fast.scp_association import Timeouts, serve
from gateway.dimse.fast.scp_negotiation import AcceptorPolicy, supported
from gateway.pacs import LookupMove, PendingMove
from gateway.settings import DimseTls

log = logging.getLogger(__name__)

MAX_ASSOCIATIONS = 64
DEFAULT_MAX_PDU = 1 << 20
"""What we advertise when ``max_pdu`` is 0: large enough that the per-PDU cost vanishes, small
enough that each association's read buffer stays bounded (PS3.8 lets the acceptor choose)."""
_ACCEPT_POLL = 0.5   # seconds between looks at the stop flag while no connection comes


class FastStorageScp:
    def __init__(self, ae_title: str, host: str, port: int, *, reject_unexpected: bool = True,
                 max_pdu: int = 0, calling_ae_titles: tuple[str, ...] = (),
                 tls: DimseTls | None = None, acse_timeout: float = 30.0,
                 network_timeout: float = 60.0, max_associations: int = MAX_ASSOCIATIONS) -> None:
        self.ae_title = ae_title
        self.host = host
        self.port = port
        self.router = ArrivalRouter(reject_unexpected=reject_unexpected)
        # Only the configured PACS may open an association (PS3.8 A-ASSOCIATE-RJ, "calling AE
        # title not recognized"): a stranger cannot even try Move Originator Message IDs.
        self.policy = AcceptorPolicy(ae_title=ae_title.strip(),
                                     calling_ae_titles=frozenset(t.strip() for t in calling_ae_titles),
                                     max_pdu=max_pdu or DEFAULT_MAX_PDU)
        self.timeouts = Timeouts(acse=acse_timeout, network=network_timeout)
        self.max_associations = max_associations
        # A retry of what a native-first attempt could not deliver flips the order (prefer_compressed).
        self._native_first = supported([*scp_contexts(compressed_first=False), scp_verification()])
        self._compressed_first = supported([*scp_contexts(compressed_first=True), scp_verification()])
        self._contexts: Mapping[str, Sequence[str]] = self._native_first
        self._preference = CompressedPreference(self._apply_preference)
        # Built now, so a certificate that does not load fails start-up (gateway.settings.ConfigError).
        self._ssl_context = dimse_tls.server_context(tls) if tls is not None else None
        self._listener: socket.socket | None = None
        self._accepting: threading.Thread | None = None
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self._connections: dict[threading.Thread, socket.socket] = {}
        self._associations = 0
        self._counter = 0

    # ----------------------------------------------------------------- counters (metrics)

    @property
    def reject_unexpected(self) -> bool:
        return self.router.reject_unexpected

    @property
    def unexpected(self) -> int:
        return self.router.unexpected

    @property
    def remote_stores(self) -> int:
        return self.router.remote_stores

    # ----------------------------------------------------------------- MoveDestination

    def register(self, move: PendingMove) -> None:
        self.router.register(move)

    def unregister(self, msg_id: int) -> None:
        self.router.unregister(msg_id)

    def is_pending(self, msg_id: int) -> bool:
        return self.router.is_pending(msg_id)

    def attach_cluster(self, loop: asyncio.AbstractEventLoop, lookup: LookupMove) -> None:
        """Route C-STOREs for other replicas' moves through ``lookup`` (run on ``loop``)."""
        self.router.attach_cluster(loop, lookup)

    def prefer_compressed(self, on: bool) -> None:
        """Counted switch: while any retry asks for it, new associations accept compressed syntaxes first."""
        self._preference.set(on)

    def _apply_preference(self, compressed_first: bool) -> None:
        self._contexts = self._compressed_first if compressed_first else self._native_first

    # ----------------------------------------------------------------- server

    def start(self) -> None:
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET   # gateway.dimse_host "::" too
        listener = socket.create_server((self.host, self.port), family=family, backlog=self.max_associations)
        listener.settimeout(_ACCEPT_POLL)
        self._listener = listener
        self.port = int(listener.getsockname()[1])
        self._stopping.clear()
        self._accepting = threading.Thread(target=self._accept_loop, name="dwg-scp-accept", daemon=True)
        self._accepting.start()

    def stop(self) -> None:
        self._stopping.set()
        if self._accepting is not None:
            self._accepting.join()
            self._accepting = None
        if self._listener is not None:
            self._listener.close()
            self._listener = None
        with self._lock:
            open_connections = list(self._connections.items())
        for _, sock in open_connections:
            try:
                sock.shutdown(socket.SHUT_RDWR)   # the association's blocked read returns; it ends
            except OSError:
                pass
        for thread, _ in open_connections:
            thread.join(5.0)

    def _accept_loop(self) -> None:
        listener = self._listener
        assert listener is not None
        while not self._stopping.is_set():
            try:
                sock, address = listener.accept()
            except TimeoutError:
                continue
            except OSError as exc:
                if self._stopping.is_set():
                    return
                log.warning("storage SCP: accept failed: %s", exc)
                continue
            peer = f"{address[0]}:{address[1]}"
            with self._lock:
                if len(self._connections) >= 2 * self.max_associations:
                    sock.close()   # flooded: no thread, no answer
                    log.warning("storage SCP: %d connections open; closing the one from %s",
                                len(self._connections), peer)
                    continue
                self._counter += 1
                thread = threading.Thread(target=self._connection, args=(sock, peer),
                                          name=f"dwg-scp-{self._counter}", daemon=True)
                self._connections[thread] = sock
            thread.start()

    def _connection(self, sock: socket.socket, peer: str) -> None:
        counted = False
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if self._ssl_context is not None:
                # The handshake runs on this connection's thread (tls._ServerContext bounds and logs it).
                sock = self._ssl_context.wrap_socket(sock, server_side=True)
                with self._lock:
                    self._connections[threading.current_thread()] = sock
            with self._lock:
                at_capacity = self._associations >= self.max_associations
                if not at_capacity:
                    self._associations += 1
                    counted = True
            serve(sock, peer, self.policy, lambda: self._contexts, self.router, self.timeouts, at_capacity)
        except (ssl.SSLError, OSError):
            pass   # a failed handshake is logged by the TLS context; a reset needs no words
        except Exception:  # noqa: BLE001 - one broken association must not take the server down
            log.exception("storage SCP: association from %s failed", peer)
        finally:
            with self._lock:
                if counted:
                    self._associations -= 1
                self._connections.pop(threading.current_thread(), None)
            try:
                sock.close()
            except OSError:
                pass
