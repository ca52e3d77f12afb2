"""Fetching series from their node: single-flight, early start, priority, retries, completeness.

* **Single-flight**: one :class:`SeriesFetch` per (node, study, series) (or per instance of it) at a
  time; every request joins it, and a request that joins asks the PACS nothing itself (the fetch
  lists the manifest once). Through the :class:`~gateway.retrieval.coordinator.Coordinator` the same
  holds across replicas.
* **Early start** (:meth:`Fetcher.open`): the retrieval does not wait for the manifest. The C-GET or
  C-MOVE is issued at once, by the study and series UIDs of the URL, while the IMAGE-level C-FIND
  lists the manifest; the first instance is streamed as soon as it is spooled. Only when this
  process retrieves alone (``LocalCoordinator``): a cluster fetch hands the manifest's UIDs to its
  followers, so it lists first. And only when nothing of the series is known to be spooled (else
  the manifest tells what is still missing, and nothing is retrieved twice).
* **Priority**: the instance a request asked for is retrieved first (one IMAGE-level retrieval,
  issued at once), then the rest of the series by UID once the manifest is known (so nothing is
  sent twice). Without a priority instance the whole series is one SERIES-level retrieval, issued
  at once.
* **Membership**: an arrival the manifest lists is the series'. One it does not list (yet) is
  accepted only when its header names the URL's study and series (:mod:`.membership`); it is then
  served like the others (it was in the series when retrieved). IMAGE-level retrievals accept only
  the instances they named.
* **Cancel**: when the last waiter leaves before the fetch is done, it is cancelled (C-CANCEL,
  association dropped). What already arrived stays in the spool.
* **Completeness**: once the retrieval is over and the manifest known, every manifest UID must have
  arrived; missing ones are retried (compressed syntaxes first, then native: DCMTK-based PACS fail
  sub-operations they cannot convert to the one syntax agreed per SOP class), then reported as an
  error (streams abort without their closing delimiter; nothing is silently lost). A manifest that
  cannot be listed (404, 502) fails the fetch, whatever arrived.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from cache import keys
from cache.base import Cache
from cache.spool import Spool
from gateway.errors import DimseTimeout, GatewayError, ModelRefused, NotFound, PacsError
from gateway.pacs import MoveDestination, NotRequested, OnInstance, Pacs, PendingMove, RetrieveRequest
from gateway.patients import PatientIds
from gateway.retrieval.coordinator import Coordinator, LocalCoordinator
from gateway.retrieval.fetch import InstanceRef, Manifest, RetrievalFailed, SeriesFetch
from gateway.retrieval.locating import UID_LIST_CHUNK, Locator
from gateway.retrieval.membership import belongs
from gateway.settings import PacsNode, Settings
from gateway.tracing import MOVE_ARRIVALS, move_arrivals
from translators.uids import InstanceId, SeriesId

log = logging.getLogger(__name__)
BLIND_CLASSES: tuple[str, ...] = (
    "1.2.840.10008.5.1.4.1.1.2",  # CT Image
    "1.2.840.10008.5.1.4.1.1.4",  # MR Image
    "1.2.840.10008.5.1.4.1.1.1",  # Computed Radiography Image
    "1.2.840.10008.5.1.4.1.1.1.1",  # Digital X-Ray Image, For Presentation
    "1.2.840.10008.5.1.4.1.1.1.2",  # Digital Mammography X-Ray Image, For Presentation
    "1.2.840.10008.5.1.4.1.1.6.1",  # Ultrasound Image
    "1.2.840.10008.5.1.4.1.1.3.1",  # Ultrasound Multi-frame Image
    "1.2.840.10008.5.1.4.1.1.128",  # Positron Emission Tomography Image
    "1.2.840.10008.5.1.4.1.1.12.1",  # X-Ray Angiographic Image
    "1.2.840.10008.5.1.4.1.1.7",  # Secondary Capture Image
)
"""The SOP classes a C-GET issued before the manifest is known proposes storage contexts for. Ten
classes, so each gets every syntax a C-GET proposes (2 native + 10 compressed contexts each, within
the 128-context limit): the stored bytes come as they are, exactly as with the manifest's classes.
Instances of another class (their sub-operations failed) are retrieved again once their classes
are known (``Fetcher._proposal``)."""
FetchKey = tuple[SeriesId, str]


class Fetcher:
    def __init__(
        self,
        settings: Settings,
        pacs: Pacs,
        cache: Cache,
        spool: Spool,
        storage_scp: MoveDestination | None,
        coordinator: Coordinator,
        patients: PatientIds,
        locator: Locator,
    ) -> None:
        self.settings = settings
        self.pacs = pacs
        self.cache = cache
        self.spool = spool
        self.scp = storage_scp
        self.coordinator = coordinator
        self.patients = patients
        self.locator = locator
        self._fetches: dict[FetchKey, SeriesFetch] = {}
        # Called with the series of a failed fetch: its manifest may be stale (instances removed
        # on the PACS), so the next request lists it again.
        self.on_failure: Callable[[SeriesId], None] = lambda series: None
        self.retrievals_started = 0
        self.incomplete = 0

    # ------------------------------------------------------------------ joining

    def open(
        self, node: PacsNode, series: SeriesId, *, only: str | None = None, priority: str | None = None
    ) -> SeriesFetch:
        """The in-flight fetch of ``series`` (or of its instance ``only``), or a new one started
        without waiting for the manifest, with the caller joined as a waiter."""
        fetch_key = (series, only or "")
        current = self._fetches.get(fetch_key)
        if current is not None and not current.done:
            current.join()
            return current
        fetch = SeriesFetch.unlisted(asyncio.get_running_loop(), series, self.spool, only)
        fetch.join()
        if only is not None and not fetch.adopt_spooled():
            fetch.finish()  # spooled under this study and series: no manifest needed to serve it
            return fetch
        self._fetches[fetch_key] = fetch
        fetch.task = asyncio.ensure_future(self._run(node, fetch, priority or only, fetch_key))
        return fetch

    def join(self, node: PacsNode, manifest: Manifest, priority: str | None = None) -> SeriesFetch:
        """The in-flight fetch of this manifest, or a new one, with the caller joined as a waiter
        (joined before anything can finish it, so the pins it holds stay until the caller leaves)."""
        loop = asyncio.get_running_loop()
        fetch_key = (manifest.id, "" if manifest.complete else ",".join(manifest.uids))
        current = self._fetches.get(fetch_key)
        if current is not None and not current.done:
            current.join()
            return current
        fetch = SeriesFetch(loop, manifest, self.spool)
        fetch.join()
        missing = fetch.adopt_spooled()
        if not missing:
            fetch.finish()
            return fetch
        self._fetches[fetch_key] = fetch
        fetch.task = asyncio.ensure_future(self._run(node, fetch, priority, fetch_key))
        return fetch

    # ------------------------------------------------------------------ one fetch

    async def _run(
        self, node: PacsNode, fetch: SeriesFetch, priority: str | None, fetch_key: FetchKey
    ) -> None:
        listing: asyncio.Future[None] | None = None
        try:
            if not fetch.listed:
                memo = await self.locator.memo(fetch.id)
                if memo is not None:
                    fetch.take_manifest(memo)
            early = False
            if not fetch.listed:
                listing = asyncio.ensure_future(self._list(node, fetch))
                early = self._may_start_early(fetch)
                if early:
                    await self._early(node, fetch, priority, listing)
                else:
                    await listing
            if not early and fetch.missing and not fetch.cancel.is_set():
                await self.coordinator.run(
                    fetch, lambda wanted: self._from_pacs(node, fetch, wanted, priority)
                )
            self._judge(node, fetch)
        except GatewayError as exc:
            fetch.finish(exc)
        except Exception as exc:  # noqa: BLE001 - a fetch must always finish, or waiters hang
            log.exception("retrieval failed")
            fetch.finish(
                PacsError(f"retrieval from node {node.name} failed: {type(exc).__name__}", node=node.name)
            )
        finally:
            if listing is not None:
                # A fetch its clients left lets its manifest C-FIND finish (the C-GET/C-MOVE is
                # what gets cancelled): the answer is memoised for the next request, and the query
                # costs the PACS little next to the retrieval.
                listing.add_done_callback(_consume)
            self._fetches.pop(fetch_key, None)
            if fetch.error is not None:
                self.on_failure(fetch.id)

    def _judge(self, node: PacsNode, fetch: SeriesFetch) -> None:
        """Completeness against the manifest, once the retrieval is over."""
        still = fetch.missing
        if fetch.cancel.is_set() and (still or not fetch.listed):
            fetch.finish(RetrievalFailed("retrieval cancelled: every client left", node=node.name))
        elif still:
            self.incomplete += 1  # reported to the clients and counted (/metrics), never silent
            fetch.finish(
                RetrievalFailed(
                    f"node {node.name} did not deliver {len(still)} of "
                    f"{len(fetch.manifest.uids)} instances of series {fetch.id.series}",
                    node=node.name,
                )
            )
        else:
            extras = fetch.extras
            if extras and fetch.manifest.complete:
                self.locator.add_arrivals(
                    fetch.manifest,
                    [InstanceRef(u, fetch.entry(u).sop_class_uid, float("inf")) for u in extras],
                )
            fetch.finish()

    async def _list(self, node: PacsNode, fetch: SeriesFetch) -> None:
        """The manifest, for the fetch; when it cannot be had (404, 502), the retrieval stops."""
        try:
            manifest = await self.locator.manifest(node, fetch.id.study, fetch.id.series)
            fetch.take_manifest(manifest)
        except BaseException:
            fetch.cancel.set()
            raise

    def _may_start_early(self, fetch: SeriesFetch) -> bool:
        if not isinstance(self.coordinator, LocalCoordinator):
            return False  # the cluster's lease and arrivals stream work on a known manifest
        if fetch.only is not None:
            return True  # one instance, not in the spool (Fetcher.open looked)
        hint = self.locator.hint(fetch.id)
        if hint is None:
            return True
        # Some of the series may be spooled: list first and retrieve only what is missing.
        sid = fetch.id
        for uid in hint.uids:
            entry = self.spool.get(sid.node, uid)
            if entry is not None and (entry.study_uid, entry.series_uid) == (sid.study, sid.series):
                return False
        return True

    async def _early(
        self, node: PacsNode, fetch: SeriesFetch, priority: str | None, listing: asyncio.Future[None]
    ) -> None:
        """Retrieve while the manifest is being listed; then what the manifest says is missing."""
        self.retrievals_started += 1
        failed = False
        try:
            if priority is not None:
                await self._retrieve(node, fetch, [priority])
            elif fetch.only is None and not fetch.cancel.is_set():
                await self._retrieve(node, fetch, None)  # SERIES level: needs no manifest
        except GatewayError as exc:
            # Some PACS fail a retrieve naming a series that is not in the study: the manifest's
            # verdict (404) is the answer then. Others fail the C-GET (see _tolerate).
            await listing
            self._tolerate(node, exc)
            failed = True
        if fetch.cancel.is_set() and not listing.done():
            return  # every client left (a failed listing sets cancel as it ends: awaited below)
        await listing
        if (fetch.only is None and priority is not None) or failed or await self._blind_missed(node, fetch):
            # The rest of the series after its asked-for instance, by UID (nothing is sent twice);
            # or what a retrieve proposing common classes could not bring, with its own classes.
            await self._rest(node, fetch)
        await self._retry_missing(node, fetch)

    async def _from_pacs(
        self, node: PacsNode, fetch: SeriesFetch, missing: list[str], priority: str | None
    ) -> None:
        """Retrieve ``missing`` from the PACS: the asked-for instance first, then the rest, then retries."""
        self.retrievals_started += 1
        failed = False
        try:
            if priority in missing and len(missing) > 1:
                await self._retrieve(node, fetch, [priority])
            await self._rest(node, fetch, missing)
        except GatewayError as exc:
            self._tolerate(node, exc)
            failed = True
        if failed or await self._blind_missed(node, fetch):
            await self._rest(node, fetch, missing)  # what common classes could not bring, with its own
        await self._retry_missing(node, fetch)

    async def _learn_classes(self, node: PacsNode, fetch: SeriesFetch, sops: list[str]) -> None:
        """Look up (one C-FIND naming them) the classes of those of ``sops`` a retrieve has asked
        for, whose class is unknown and was not looked up before."""
        info = fetch.classes
        if lookup := [u for u in sops if u not in info.known and info.tried(u) and u not in info.looked_up]:
            try:
                info.known.update(await self.locator.sop_classes(node, fetch.id, lookup))
            except PacsError as exc:
                # A PACS that cannot answer it (UID lists refused, say): the classes stay unknown,
                # and the common storage classes are proposed, as for a PACS that names none.
                log.warning("looking up SOP classes on %s failed (%s); proposing common ones", node.name, exc)
            info.looked_up.update(lookup)

    async def _blind_missed(self, node: PacsNode, fetch: SeriesFetch) -> bool:
        """Some missing instance may be of a class the retrieves so far did not propose: C-GET only;
        a class outside BLIND_CLASSES, or one the PACS does not name (looked up first)."""
        if node.retrieve != "get" or not (missing := fetch.missing):
            return False
        await self._learn_classes(node, fetch, missing)
        known = fetch.classes.known
        return any(known.get(u) not in BLIND_CLASSES for u in missing)

    @staticmethod
    def _tolerate(node: PacsNode, exc: GatewayError) -> None:
        """Re-raise ``exc`` unless retrieving again with the manifest known may succeed. A first
        retrieve proposes storage contexts without the instances' classes (``_proposal``), and some
        PACS abort a C-GET when no proposed context suits an instance; a PACS may also fail a C-MOVE
        when a sub-operation failed at our storage SCP. A timeout, or a refused model (no C-GET, or
        the wrong root), is the answer whatever is proposed (the retrieval service's second round may
        learn another model)."""
        if not isinstance(exc, PacsError) or isinstance(exc, (DimseTimeout, ModelRefused)):
            raise exc
        log.warning("a first retrieval from %s failed (%s); again with the manifest known", node.name, exc)

    async def _rest(self, node: PacsNode, fetch: SeriesFetch, among: list[str] | None = None) -> None:
        manifest = fetch.manifest
        missing = [u for u in (manifest.uids if among is None else among) if not fetch.has(u)]
        if missing and not fetch.cancel.is_set():
            whole = manifest.complete and len(missing) == len(manifest.uids)
            await self._retrieve(node, fetch, None if whole else missing)

    async def _retry_missing(self, node: PacsNode, fetch: SeriesFetch) -> None:
        for compressed_first in (True, False):
            still = fetch.missing
            if not still or fetch.cancel.is_set():
                break
            log.warning("retrying %d missing instances of a series on %s", len(still), node.name)
            await self._retrieve(node, fetch, still, compressed_first=compressed_first)

    # ------------------------------------------------------------------ one retrieve

    async def _retrieve(
        self, node: PacsNode, fetch: SeriesFetch, sops: list[str] | None, compressed_first: bool = False
    ) -> None:
        """One C-GET/C-MOVE: SERIES level (``sops`` None) or IMAGE level in UID lists."""
        sid = fetch.id
        requested = frozenset(sops) if sops is not None else None
        classes = await self._proposal(node, fetch, sops)

        def on_instance(data: bytes, sop: str, cls: str, ts: str) -> None:
            # On the association's thread: write and signal, nothing slow. Refused, never spooled
            # (nobody can push objects into a series through a retrieval): what an IMAGE-level
            # retrieve did not name, and what no manifest lists unless its header proves it is the
            # URL's study and series. One already here is acknowledged, not replaced.
            if requested is not None and sop not in requested:
                raise NotRequested(sop)
            if fetch.has(sop):
                return  # a PACS that sends one twice: the copy we hold stays
            if not fetch.lists(sop) and not belongs(data, sid.study, sid.series):
                raise NotRequested(sop)
            entry = self.spool.write(
                data,
                InstanceId(sid.node, sid.study, sid.series, sop),
                sop_class_uid=cls,
                transfer_syntax=ts,
                pin=True,
            )
            fetch.arrive_from_thread(sop, entry)

        pid = None
        if node.query_model == "patient":
            # Patient Root retrieves name the PatientID too (PS3.4 C.6.1; the one rule, cached).
            pid = await self.patients.for_study(node, sid.study)
            if not pid:
                raise NotFound(f"study {sid.study} was not found on node {node.name}", node=node.name)
        chunks: list[list[str] | None] = (
            [None]
            if sops is None
            else [sops[i : i + UID_LIST_CHUNK] for i in range(0, len(sops), UID_LIST_CHUNK)]
        )
        for chunk in chunks:
            if fetch.cancel.is_set():
                return
            request = RetrieveRequest(
                "SERIES" if chunk is None else "IMAGE",
                sid.study,
                sid.series,
                tuple(chunk) if chunk is not None else None,
                pid,
                classes,
                compressed_first,
            )
            fetch.classes.note_retrieve(request.sops)
            if node.retrieve == "get":
                await self.pacs.get(node, request, on_instance, fetch.cancel)
            else:
                await self._move(node, fetch, request, on_instance)

    async def _proposal(self, node: PacsNode, fetch: SeriesFetch, sops: list[str] | None) -> tuple[str, ...]:
        """The SOP classes a C-GET of ``sops`` (None: the series) proposes storage contexts for.

        The classes of the instances asked for where known. An instance whose class is unknown and
        that no retrieve has asked for yet is of a common class (BLIND_CLASSES, proposed with every
        syntax); one a retrieve asked for and did not bring has its class looked up first, with one
        C-FIND naming all such instances. A PACS that does not answer SOPClassUID (dcmqrscp) leaves
        them unknown: the common storage classes are proposed then (empty ``sop_classes``).
        """
        if node.retrieve != "get":
            return ()       # C-MOVE: the PACS proposes the contexts, to our storage SCP
        if not fetch.listed:
            return BLIND_CLASSES
        asked = fetch.manifest.uids if sops is None else sops
        await self._learn_classes(node, fetch, asked)
        info = fetch.classes
        unknown = [u for u in asked if u not in info.known]
        known = tuple(sorted({info.known[u] for u in asked if u in info.known}))
        if not unknown:
            return known
        if not known and all(u in info.looked_up for u in unknown):
            return ()       # the PACS does not name classes: the common ones
        return tuple(dict.fromkeys((*known, *BLIND_CLASSES)))

    async def _move(
        self, node: PacsNode, fetch: SeriesFetch, request: RetrieveRequest, on_instance: OnInstance
    ) -> None:
        if self.scp is None:
            raise PacsError(
                f"node {node.name} is configured for C-MOVE but the storage SCP is not running",
                node=node.name,
            )
        msg_id = await self._move_msg_id(self.scp)
        # A SERIES-level move issued before the manifest is known expects no particular UIDs: the
        # storage SCP routes its sub-operations by Move Originator Message ID (or study/series),
        # and on_instance checks each one. Once the manifest is known the move names its UIDs.
        expected: set[str] | None = (
            set(request.sops)
            if request.sops is not None
            else set(fetch.manifest.uids) if fetch.listed else None
        )
        # Traced request: a span per sub-operation arriving, under the C-MOVE's (gateway/tracing.py).
        trace = move_arrivals(node.name)
        self.scp.register(PendingMove(msg_id, fetch.id.study, fetch.id.series, expected, on_instance,
                                      trace=trace))
        if request.compressed_first:
            self.scp.prefer_compressed(True)
        traced = MOVE_ARRIVALS.set(trace)
        try:
            # With replicas, the PACS may deliver to another replica's storage SCP (one AE title behind
            # one Service): the coordinator publishes the move and copies in what that replica announces.
            async with self.coordinator.move_scope(msg_id, fetch, expected or set()):
                await self.pacs.move(
                    node,
                    request,
                    destination=self.settings.gateway.ae_title,
                    msg_id=msg_id,
                    cancel=fetch.cancel,
                )
        finally:
            MOVE_ARRIVALS.reset(traced)
            self.scp.unregister(msg_id)
            if request.compressed_first:
                self.scp.prefer_compressed(False)

    async def _move_msg_id(self, scp: MoveDestination) -> int:
        """A Message ID from the shared counter (unique across replicas), skipping ones pending here."""
        for _ in range(65535):
            msg_id = await self.cache.next_counter(keys.MOVE_MESSAGE_IDS, 65535)
            if not scp.is_pending(msg_id):
                return msg_id
        raise PacsError("65535 C-MOVEs pending")

    async def close(self) -> None:
        fetches = list(self._fetches.values())
        for fetch in fetches:
            fetch.cancel.set()
        # Let cancelled fetches end (a cluster holder writes its end entry and frees its lease)
        # before the cache closes, so other replicas take over at once.
        tasks = [f.task for f in fetches if f.task is not None]
        if tasks:
            await asyncio.wait(tasks, timeout=5)


def _consume(task: asyncio.Future[None]) -> None:
    """A listing nobody awaits any more: its failure was the fetch's (or nobody's) concern."""
    if not task.cancelled():
        task.exception()
