"""The gateway's storage SCP on pynetdicom: where C-MOVE sub-operations arrive (``scp_engine: pynetdicom``).

pynetdicom's AE server does the association (PS3.8) and C-STORE/C-ECHO (PS3.7 9.1.1, 9.1.5) work;
each C-STORE becomes an :class:`~gateway.dimse.arrivals_routing.Arrival` and
:class:`~gateway.dimse.arrivals_routing.ArrivalRouter` decides where it goes (by Move Originator
Message ID, expected UIDs, study/series, another replica's move) and the status to answer with: the
same rule as the plain-socket engine, :mod:`gateway.dimse.fast.acceptor` (docs/architecture.md,
"C-MOVE"). The handler runs on a pynetdicom thread and answers only after the instance is in the
spool. Instances matching no pending move are refused, so nobody can inject data into the spool.

Who may associate: the called AE title must be ours and, with ``calling_ae_titles``, the calling
AE title one of the configured PACS (PS3.8 9.3.4, A-ASSOCIATE-RJ reasons 7 and 3).

With ``gateway.dimse_tls`` enabled it accepts DICOM TLS only (PS3.15 Annex B.1; the context, and
whether a PACS must present a client certificate, come from :func:`gateway.dimse.tls.server_context`).

Which presentation contexts it accepts (every storage SOP class, native or compressed syntaxes first,
and Verification) is :func:`gateway.dimse.contexts.scp_contexts`'s decision.
"""

from __future__ import annotations

import asyncio
from typing import cast

from pynetdicom import AE, build_context, evt
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.presentation import PresentationContext
from pynetdicom.transport import ThreadedAssociationServer

from gateway.dimse import tls as dimse_tls
from gateway.dimse.arrivals_routing import Arrival, ArrivalRouter, CompressedPreference
from gateway.dimse.contexts import Context, scp_contexts, scp_verification
from gateway.dimse.fast.acceptor import FastStorageScp
from gateway.dimse.retrieve import encoded_part10
from gateway.dimse.socket_tuning import on_connection_open
from gateway.pacs import LookupMove, PendingMove
from gateway.settings import DimseTls, Settings

MAX_ASSOCIATIONS = 64


class StorageScp:
    def __init__(self, ae_title: str, host: str, port: int, *, reject_unexpected: bool = True,
                 max_pdu: int = 0, calling_ae_titles: tuple[str, ...] = (),
                 tls: DimseTls | None = None, acse_timeout: float = 30.0,
                 network_timeout: float = 60.0, max_associations: int = MAX_ASSOCIATIONS) -> None:
        self.ae_title = ae_title
        self.host = host
        self.port = port
        self.router = ArrivalRouter(reject_unexpected=reject_unexpected)
        ae = AE(ae_title=ae_title)
        ae.require_called_aet = True
        if calling_ae_titles:
            # Only the configured PACS may open an association (PS3.8 A-ASSOCIATE-RJ, "calling AE
            # title not recognized"): a stranger cannot even try Move Originator Message IDs.
            ae.require_calling_aet = list(calling_ae_titles)
        ae.maximum_pdu_size = max_pdu
        ae.maximum_associations = max_associations
        ae.acse_timeout = acse_timeout           # also the ARTIM timer (PS3.8 9.1.5)
        ae.network_timeout = network_timeout
        # A retry of what a native-first attempt could not deliver flips the order (prefer_compressed).
        native_first = scp_contexts(compressed_first=False)
        for cls, syntaxes in [*native_first, scp_verification()]:
            ae.add_supported_context(cls, syntaxes)
        self._native_first = _built([*native_first, scp_verification()])
        self._compressed_first = _built([*scp_contexts(compressed_first=True), scp_verification()])
        self._ae = ae
        self._contexts = self._native_first
        self._preference = CompressedPreference(self._apply_preference)
        self._server: ThreadedAssociationServer | None = None
        # Built now, so a certificate that does not load fails start-up (gateway.settings.ConfigError).
        self._ssl_context = dimse_tls.server_context(tls) if tls is not None else None

    @property
    def reject_unexpected(self) -> bool:
        return self.router.reject_unexpected

    @property
    def unexpected(self) -> int:
        return self.router.unexpected

    @property
    def remote_stores(self) -> int:
        return self.router.remote_stores

    def start(self) -> None:
        server = self._ae.start_server(
            (self.host, self.port), block=False, ssl_context=self._ssl_context,
            evt_handlers=[(evt.EVT_C_STORE, self._on_store), (evt.EVT_CONN_OPEN, on_connection_open)])
        assert server is not None   # block=False: the server runs in its own thread
        server.contexts = self._contexts
        self._server = server
        self.port = int(server.server_address[1])

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server = None

    def prefer_compressed(self, on: bool) -> None:
        """Counted switch: while any retry asks for it, new associations accept compressed syntaxes first."""
        self._preference.set(on)

    def _apply_preference(self, compressed_first: bool) -> None:
        self._contexts = self._compressed_first if compressed_first else self._native_first
        if self._server is not None:
            self._server.contexts = self._contexts

    def is_pending(self, msg_id: int) -> bool:
        return self.router.is_pending(msg_id)

    def attach_cluster(self, loop: asyncio.AbstractEventLoop, lookup: LookupMove) -> None:
        """Route C-STOREs for other replicas' moves through ``lookup`` (run on ``loop``)."""
        self.router.attach_cluster(loop, lookup)

    def register(self, move: PendingMove) -> None:
        self.router.register(move)

    def unregister(self, msg_id: int) -> None:
        self.router.unregister(msg_id)

    def _on_store(self, event: evt.Event) -> int:
        req = cast(C_STORE, event.request)
        sop, cls = str(req.AffectedSOPInstanceUID), str(req.AffectedSOPClassUID)
        ts = str(event.context.transfer_syntax)
        msg_id = getattr(req, "MoveOriginatorMessageID", None)

        def study_series() -> tuple[str, str]:
            ds = event.dataset
            return str(ds.get("StudyInstanceUID", "")), str(ds.get("SeriesInstanceUID", ""))

        return self.router.store(Arrival(
            sop_instance=sop, sop_class=cls, transfer_syntax=ts,
            move_msg_id=int(msg_id) if msg_id is not None else None,
            calling_ae=str(event.assoc.requestor.ae_title),
            part10=lambda: encoded_part10(event, cls, sop, ts), study_series=study_series))


def _built(contexts: list[Context]) -> list[PresentationContext]:
    return [build_context(cls, syntaxes) for cls, syntaxes in contexts]


AnyStorageScp = StorageScp | FastStorageScp


def storage_scp(settings: Settings) -> AnyStorageScp:
    """The storage SCP ``gateway.scp_engine`` names, configured from the settings (not started).

    With ``retrieval.reject_unexpected_stores`` only the configured nodes' AE titles may associate.
    """
    g = settings.gateway
    strict = settings.retrieval.reject_unexpected_stores
    calling = tuple(dict.fromkeys(n.ae_title for n in settings.nodes)) if strict else ()
    engine = FastStorageScp if g.scp_engine == "fast" else StorageScp
    return engine(g.ae_title, g.dimse_host, g.dimse_port, reject_unexpected=strict, calling_ae_titles=calling,
                  tls=g.dimse_tls)
