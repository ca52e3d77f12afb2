"""Fetching series from their node: single-flight, priority, retries, completeness.

* **Single-flight**: one :class:`SeriesFetch` per (node, study, series) (or per subset of it) at a
  time; every request joins it. Through the :class:`~gateway.retrieval.coordinator.Coordinator` the
  same holds across replicas.
* **Priority**: the instance a request asked for is retrieved first (one IMAGE-level retrieval),
  then the rest of the series.
* **Cancel**: when the last waiter leaves before the fetch is done, it is cancelled (C-CANCEL,
  association dropped). What already arrived stays in the spool.
* **Completeness**: after the retrieval every manifest UID must have arrived; missing ones are
  retried (compressed syntaxes first, then native: DCMTK-based PACS fail sub-operations they cannot
  convert to the one syntax agreed per SOP class), then reported as an error (streams abort without
  their closing delimiter; nothing is silently lost).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from cache import keys
from cache.base import Cache
from cache.spool import Spool
from gateway.errors import GatewayError, PacsError
from gateway.pacs import MoveDestination, NotRequested, OnInstance, Pacs, PendingMove, RetrieveRequest
from gateway.patients import PatientIds
from gateway.retrieval.coordinator import Coordinator
from gateway.retrieval.fetch import Manifest, RetrievalFailed, SeriesFetch
from gateway.settings import PacsNode, Settings
from translators.uids import SeriesId

log = logging.getLogger(__name__)
UID_LIST_CHUNK = 500
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
    ) -> None:
        self.settings = settings
        self.pacs = pacs
        self.cache = cache
        self.spool = spool
        self.scp = storage_scp
        self.coordinator = coordinator
        self.patients = patients
        self._fetches: dict[FetchKey, SeriesFetch] = {}
        # Called with the series of a failed fetch: its manifest may be stale (instances removed
        # on the PACS), so the next request lists it again.
        self.on_failure: Callable[[SeriesId], None] = lambda series: None
        self.retrievals_started = 0
        self.incomplete = 0

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

    async def _run(
        self, node: PacsNode, fetch: SeriesFetch, priority: str | None, fetch_key: FetchKey
    ) -> None:
        manifest = fetch.manifest
        try:
            await self.coordinator.run(fetch, lambda wanted: self._from_pacs(node, fetch, wanted, priority))
            still = fetch.missing
            if fetch.cancel.is_set() and still:
                fetch.finish(RetrievalFailed("retrieval cancelled: every client left", node=node.name))
            elif still:
                self.incomplete += 1  # reported to the clients and counted (/metrics), never silent
                fetch.finish(
                    RetrievalFailed(
                        f"node {node.name} did not deliver {len(still)} of "
                        f"{len(manifest.uids)} instances of series {manifest.series}",
                        node=node.name,
                    )
                )
            else:
                fetch.finish()
        except GatewayError as exc:
            fetch.finish(exc)
        except Exception as exc:  # noqa: BLE001 - a fetch must always finish, or waiters hang
            log.exception("retrieval failed")
            fetch.finish(
                PacsError(f"retrieval from node {node.name} failed: {type(exc).__name__}", node=node.name)
            )
        finally:
            self._fetches.pop(fetch_key, None)
            if fetch.error is not None:
                self.on_failure(manifest.id)

    async def _from_pacs(
        self, node: PacsNode, fetch: SeriesFetch, missing: list[str], priority: str | None
    ) -> None:
        """Retrieve ``missing`` from the PACS: the asked-for instance first, then the rest, then retries."""
        manifest = fetch.manifest
        self.retrievals_started += 1
        if priority in missing and len(missing) > 1:
            await self._retrieve(node, fetch, [priority])
            missing = [u for u in missing if not fetch.has(u)]
        if missing and not fetch.cancel.is_set():
            whole = manifest.complete and len(missing) == len(manifest.uids)
            await self._retrieve(node, fetch, None if whole else missing)
        for compressed_first in (True, False):
            still = fetch.missing
            if not still or fetch.cancel.is_set():
                break
            log.warning("retrying %d missing instances of a series on %s", len(still), node.name)
            await self._retrieve(node, fetch, still, compressed_first=compressed_first)

    async def _retrieve(
        self, node: PacsNode, fetch: SeriesFetch, sops: list[str] | None, compressed_first: bool = False
    ) -> None:
        loop = asyncio.get_running_loop()
        manifest = fetch.manifest
        wanted = set(manifest.uids)
        classes = tuple(sorted({i.sop_class_uid for i in manifest.instances if i.sop_class_uid}))

        def on_instance(data: bytes, sop: str, cls: str, ts: str) -> None:
            # On the association's thread: write and signal, nothing slow. Only what the manifest
            # lists is accepted: anything else is refused, never spooled (nobody can push objects
            # into a series through a retrieval), and an instance already received is not replaced.
            if sop not in wanted or fetch.has(sop):
                raise NotRequested(sop)
            entry = self.spool.write(
                data, manifest.instance_id(sop), sop_class_uid=cls, transfer_syntax=ts, pin=True
            )
            loop.call_soon_threadsafe(fetch.arrive, sop, entry)

        pid = None
        if node.query_model == "patient":
            pid = await self.patients.for_study(node, manifest.study)
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
                manifest.study,
                manifest.series,
                tuple(chunk) if chunk is not None else None,
                pid,
                classes,
                compressed_first,
            )
            if node.retrieve == "get":
                await self.pacs.get(node, request, on_instance, fetch.cancel)
            else:
                await self._move(node, fetch, request, on_instance)

    async def _move(
        self, node: PacsNode, fetch: SeriesFetch, request: RetrieveRequest, on_instance: OnInstance
    ) -> None:
        if self.scp is None:
            raise PacsError(
                f"node {node.name} is configured for C-MOVE but the storage SCP is not running",
                node=node.name,
            )
        msg_id = await self._move_msg_id(self.scp)
        expected = set(request.sops) if request.sops is not None else set(fetch.manifest.uids)
        self.scp.register(
            PendingMove(msg_id, fetch.manifest.study, fetch.manifest.series, expected, on_instance)
        )
        if request.compressed_first:
            self.scp.prefer_compressed(True)
        try:
            # With replicas, the PACS may deliver to another replica's storage SCP (one AE title behind
            # one Service): the coordinator publishes the move and copies in what that replica announces.
            async with self.coordinator.move_scope(msg_id, fetch, expected):
                await self.pacs.move(
                    node,
                    request,
                    destination=self.settings.gateway.ae_title,
                    msg_id=msg_id,
                    cancel=fetch.cancel,
                )
        finally:
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
