"""The gateway's storage SCP: where C-MOVE sub-operations arrive.

Each arriving C-STORE is routed to its pending move by Move Originator Message ID (+ our AE title
as the originator); PACS that omit them are matched by the SOP Instance UIDs the move expects, then
by study/series. The C-STORE is answered only after ``on_instance`` returned, i.e. after the atomic
rename into the spool, so the final C-MOVE response proves the data is on disk (docs/architecture.md,
"DIMSE edge").
Instances matching no pending move are refused (``retrieval.reject_unexpected_stores``), so nobody
can inject data into the spool.

With replicas (:mod:`gateway.cluster`), all of them share one AE title, so the PACS may deliver a
sub-operation for a C-MOVE another replica issued. A C-STORE matching no local move is then looked up
by its Move Originator Message ID among the cluster's pending moves (UIDs cross-checked); when found,
it is spooled here and announced to the originator, and only then answered. The handler runs on a
pynetdicom thread: the lookup and the announcement run on the event loop
(``asyncio.run_coroutine_threadsafe``), the spool write stays on this thread.

With ``gateway.dimse_tls`` enabled it accepts DICOM TLS only (PS3.15 Annex B.1; the context, and
whether a PACS must present a client certificate, come from :func:`gateway.dimse.tls.server_context`).

Which presentation contexts it accepts (every storage SOP class, native or compressed syntaxes first)
is :func:`gateway.dimse.contexts.scp_contexts`'s decision.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar, cast

from pynetdicom import AE, build_context, evt
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.presentation import PresentationContext
from pynetdicom.transport import ThreadedAssociationServer

from gateway.dimse import tls as dimse_tls
from gateway.dimse.contexts import Context, scp_contexts
from gateway.dimse.socket_tuning import on_connection_open
from gateway.pacs import LookupMove, NotRequested, PendingMove, RemoteMove
from gateway.settings import DimseTls

log = logging.getLogger(__name__)

T = TypeVar("T")
REFUSED_NOT_AUTHORISED = 0x0124
REFUSED_OUT_OF_RESOURCES = 0xA700


class StorageScp:
    def __init__(self, ae_title: str, host: str, port: int, *, reject_unexpected: bool = True,
                 max_pdu: int = 0, calling_ae_titles: tuple[str, ...] = (),
                 tls: DimseTls | None = None) -> None:
        self.ae_title = ae_title
        self.host = host
        self.port = port
        self.reject_unexpected = reject_unexpected
        ae = AE(ae_title=ae_title)
        if calling_ae_titles:
            # Only the configured PACS may open an association (PS3.8 A-ASSOCIATE-RJ, "calling AE
            # title not recognized"): a stranger cannot even try Move Originator Message IDs.
            ae.require_calling_aet = list(calling_ae_titles)
        ae.maximum_pdu_size = max_pdu
        ae.maximum_associations = 64
        # A retry of what a native-first attempt could not deliver flips the order (prefer_compressed).
        native_first = scp_contexts(compressed_first=False)
        for cls, syntaxes in native_first:
            ae.add_supported_context(cls, syntaxes)
        self._native_first = _built(native_first)
        self._compressed_first = _built(scp_contexts(compressed_first=True))
        self._ae = ae
        self._compressed_users = 0
        self._server: ThreadedAssociationServer | None = None
        self._pending: dict[int, PendingMove] = {}
        self._lock = threading.Lock()
        self.unexpected = 0
        self.remote_stores = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._lookup: LookupMove | None = None
        self._bridge_timeout = 5.0
        # Built now, so a certificate that does not load fails start-up (gateway.settings.ConfigError).
        self._ssl_context = dimse_tls.server_context(tls) if tls is not None else None

    def start(self) -> None:
        server = self._ae.start_server(
            (self.host, self.port), block=False, ssl_context=self._ssl_context,
            evt_handlers=[(evt.EVT_C_STORE, self._on_store), (evt.EVT_CONN_OPEN, on_connection_open)])
        assert server is not None   # block=False: the server runs in its own thread
        self._server = server
        self.port = int(server.server_address[1])

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server = None

    def prefer_compressed(self, on: bool) -> None:
        """Counted switch: while any retry asks for it, new associations accept compressed syntaxes first."""
        with self._lock:
            self._compressed_users += 1 if on else -1
            if self._server is not None:
                self._server.contexts = (self._compressed_first if self._compressed_users > 0
                                         else self._native_first)

    def is_pending(self, msg_id: int) -> bool:
        with self._lock:
            return msg_id in self._pending

    def attach_cluster(self, loop: asyncio.AbstractEventLoop, lookup: LookupMove) -> None:
        """Route C-STOREs for other replicas' moves through ``lookup`` (run on ``loop``)."""
        self._loop = loop
        self._lookup = lookup

    def register(self, move: PendingMove) -> None:
        with self._lock:
            self._pending[move.msg_id] = move

    def unregister(self, msg_id: int) -> None:
        with self._lock:
            self._pending.pop(msg_id, None)

    def _route(self, event: evt.Event, sop_uid: str) -> PendingMove | None:
        req = cast(C_STORE, event.request)
        msg_id = getattr(req, "MoveOriginatorMessageID", None)
        with self._lock:
            if msg_id is not None and msg_id in self._pending:
                move = self._pending[msg_id]
                if move.expected is None or sop_uid in move.expected:
                    return move
            # Fallback for PACS that omit the originator fields (or IDs that wrapped): UIDs.
            candidates = [m for m in self._pending.values() if m.expected and sop_uid in m.expected
                          and sop_uid not in m.received]
            if len(candidates) >= 1:
                return candidates[0]
            open_moves = [m for m in self._pending.values() if m.expected is None]
        if not open_moves:
            return None
        ds = event.dataset   # decode only when the cheap routes failed
        study = str(ds.get("StudyInstanceUID", ""))
        series = str(ds.get("SeriesInstanceUID", ""))
        for move in open_moves:
            if move.study == study and (move.series is None or move.series == series):
                return move
        return None

    def _on_store(self, event: evt.Event) -> int:
        req = cast(C_STORE, event.request)
        sop_uid = str(req.AffectedSOPInstanceUID)
        move = self._route(event, sop_uid)
        if move is None:
            remote = self._remote(event, sop_uid)
            if remote is not None:
                return self._store_remote(remote, event, sop_uid)
            self.unexpected += 1
            log.warning("C-STORE from %s matched no pending C-MOVE", event.assoc.requestor.ae_title)
            if self.reject_unexpected:
                return REFUSED_NOT_AUTHORISED
            return REFUSED_OUT_OF_RESOURCES
        with self._lock:
            duplicate = sop_uid in move.received
        if duplicate:
            self.unexpected += 1      # a second C-STORE of a received instance never replaces it
            return REFUSED_NOT_AUTHORISED
        try:
            move.on_instance(event.encoded_dataset(include_meta=True), sop_uid,
                             str(req.AffectedSOPClassUID), str(event.context.transfer_syntax))
        except NotRequested:
            self.unexpected += 1
            return REFUSED_NOT_AUTHORISED
        except Exception:  # noqa: BLE001 - the PACS learns it failed; the move reports it missing
            log.exception("storing a C-MOVE sub-operation failed")
            return REFUSED_OUT_OF_RESOURCES
        with self._lock:
            move.received.add(sop_uid)
        return 0x0000

    def _on_loop(self, coro: Coroutine[Any, Any, T]) -> T:
        assert self._loop is not None
        future = asyncio.run_coroutine_threadsafe(coro, self._loop)
        try:
            return future.result(self._bridge_timeout)
        except BaseException:
            future.cancel()
            raise

    def _remote(self, event: evt.Event, sop_uid: str) -> RemoteMove | None:
        req = cast(C_STORE, event.request)
        msg_id = getattr(req, "MoveOriginatorMessageID", None)
        # The originator AE title is not checked: every replica has the same one, and pynetdicom's
        # C-MOVE SCP sends its own title there. The UID cross-check is what guards the spool.
        if self._lookup is None or msg_id is None:
            return None
        try:
            return self._on_loop(self._lookup(int(msg_id), sop_uid))
        except Exception:  # noqa: BLE001 - no answer in time: treated as matching nothing
            log.warning("looking up a C-MOVE of another replica failed", exc_info=True)
            return None

    def _store_remote(self, remote: RemoteMove, event: evt.Event, sop_uid: str) -> int:
        req = cast(C_STORE, event.request)
        cls, ts = str(req.AffectedSOPClassUID), str(event.context.transfer_syntax)
        try:
            remote.write(event.encoded_dataset(include_meta=True), sop_uid, cls, ts)
            # Answer only once the originator can learn about it (same ordering as a local move).
            self._on_loop(remote.announce(sop_uid, cls, ts))
        except Exception:  # noqa: BLE001 - the PACS learns it failed; the originator retries it
            log.exception("storing a C-MOVE sub-operation for another replica failed")
            return REFUSED_OUT_OF_RESOURCES
        with self._lock:
            self.remote_stores += 1
        return 0x0000


def _built(contexts: list[Context]) -> list[PresentationContext]:
    return [build_context(cls, syntaxes) for cls, syntaxes in contexts]
