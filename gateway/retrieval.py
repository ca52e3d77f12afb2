"""Retrieval orchestration: where is the series, is it spooled, fetch it once, fan out to streams.

* **Locate**: the location index (learned from QIDO) names the nodes holding a study; otherwise a
  STUDY-level C-FIND on each node in config order. Federated WADO takes the first node holding it.
* **Manifest**: an IMAGE-level C-FIND per series lists the instances (404 when empty, never a silent
  empty 200); it is what "complete" is checked against.
* **Single-flight**: one :class:`SeriesFetch` per (node, series) at a time; every HTTP stream that
  wants the series joins it and reads arrivals from the spool at its own pace, so a slow client never
  throttles the PACS or the other clients, and memory stays bounded. With replicas sharing Redis,
  the fetch goes through :class:`gateway.cluster.Cluster`: one replica retrieves (series lease), the
  others copy its arrivals into their spool and ``arrive`` them here as if they had retrieved them.
* **Priority**: the instance a request asked for is fetched first (one IMAGE-level retrieval), then
  the rest of the series.
* **Cancel**: when the last waiter leaves before the fetch is done, the fetch is cancelled (C-CANCEL,
  association dropped). What already arrived stays in the spool.
* **Completeness**: after the retrieval, every manifest UID must be in the spool; missing ones are
  retried once at IMAGE level, then reported as an error (streams abort without their closing
  delimiter; nothing is silently lost).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from pydicom.dataset import Dataset

from cache.base import Cache, key
from cache.spool import Spool, SpoolEntry
from gateway.dimse.storage_scp import PendingMove, StorageScp
from gateway.errors import GatewayError, NotFound, PacsError
from gateway.pacs import OnInstance, Pacs, RetrieveRequest
from gateway.settings import PacsNode, Settings

if TYPE_CHECKING:
    from gateway.cluster import Cluster, Copies

log = logging.getLogger(__name__)
MANIFEST_TTL = 60.0
UID_LIST_CHUNK = 500


@dataclass(frozen=True)
class InstanceRef:
    sop_instance_uid: str
    sop_class_uid: str
    number: float


@dataclass
class Manifest:
    node: str
    study: str
    series: str
    instances: list[InstanceRef]
    complete: bool = True        # False: a subset (e.g. the one instance a request asked for)
    fetched: float = field(default_factory=time.monotonic)

    @property
    def uids(self) -> list[str]:
        return [i.sop_instance_uid for i in self.instances]


class RetrievalFailed(PacsError):
    """Some instances of a series could not be retrieved (reported, never silently dropped)."""


class SeriesFetch:
    """One retrieval of one series, observable from the event loop by many waiters."""

    def __init__(self, loop: asyncio.AbstractEventLoop, manifest: Manifest) -> None:
        self.loop = loop
        self.manifest = manifest
        self.arrived: list[str] = []
        self._arrived_set: set[str] = set()
        self.done = False
        self.error: GatewayError | None = None
        self.cancel = threading.Event()
        self.waiters = 0
        self._wake: asyncio.Future[None] = loop.create_future()
        self.task: asyncio.Future[None] | None = None
        # Cluster mode only: the retrieval id while this replica holds the series lease, and the
        # copier of instances other replicas announce.
        self.retrieval_id: str | None = None
        self.remote: Copies | None = None

    # loop thread only
    def arrive(self, sop_uid: str) -> None:
        if sop_uid not in self._arrived_set:
            self._arrived_set.add(sop_uid)
            self.arrived.append(sop_uid)
        self._notify()

    def finish(self, error: GatewayError | None = None) -> None:
        self.done = True
        self.error = error
        self._notify()

    def _notify(self) -> None:
        if not self._wake.done():
            self._wake.set_result(None)
        self._wake = self.loop.create_future()

    def has(self, sop_uid: str) -> bool:
        return sop_uid in self._arrived_set

    async def changed(self) -> None:
        await asyncio.shield(self._wake)

    async def arrivals(self) -> AsyncIterator[str]:
        """Every instance of the series as it becomes available; raises the fetch's error."""
        i = 0
        while True:
            while i < len(self.arrived):
                yield self.arrived[i]
                i += 1
            if self.done:
                if self.error is not None:
                    raise self.error
                return
            await self.changed()

    async def wait_for(self, sop_uid: str) -> None:
        while not self.has(sop_uid):
            if self.done:
                if self.error is not None:
                    raise self.error
                raise NotFound(f"instance {sop_uid} was not found in series {self.manifest.series}")
            await self.changed()

    def join(self) -> None:
        self.waiters += 1

    def leave(self) -> None:
        self.waiters -= 1
        if self.waiters <= 0 and not self.done:
            self.cancel.set()


class RetrievalService:
    def __init__(self, settings: Settings, pacs: Pacs, cache: Cache, spool: Spool,
                 storage_scp: StorageScp | None, cluster: Cluster | None = None) -> None:
        self.settings = settings
        self.cluster = cluster
        self.pacs = pacs
        self.cache = cache
        self.spool = spool
        self.scp = storage_scp
        self._fetches: dict[tuple[str, str], SeriesFetch] = {}
        self._manifests: dict[tuple[str, str], Manifest] = {}
        self.retrievals_started = 0
        self.incomplete = 0

    # ------------------------------------------------------------------ locate

    async def locate(self, study: str, nodes: list[PacsNode]) -> PacsNode:
        """The first node (config order) holding the study."""
        if len(nodes) == 1:
            return nodes[0]
        try:
            known = await self.cache.smembers(key("loc", "study", study))
        except Exception:  # noqa: BLE001 - cache trouble: ask the PACS
            known = set()
        for node in nodes:
            if node.name in known:
                return node
        for node in nodes:
            ident = Dataset()
            ident.QueryRetrieveLevel = "STUDY"
            ident.StudyInstanceUID = study
            try:
                res = await self.pacs.find(node, ident)
            except GatewayError:
                continue
            if res.datasets:
                ttl = self.settings.cache.ttl.location
                await self.cache.sadd(key("loc", "study", study), [node.name], ttl)
                return node
        raise NotFound(f"study {study} was not found on any node")

    # ------------------------------------------------------------------ manifests

    async def series_list(self, node: PacsNode, study: str) -> list[Manifest]:
        ident = Dataset()
        ident.QueryRetrieveLevel = "SERIES"
        ident.StudyInstanceUID = study
        ident.SeriesInstanceUID = ""
        ident.SeriesNumber = None
        ident.Modality = ""
        await self._patient_key(node, study, ident)
        res = await self.pacs.find(node, ident, model=node.query_model)
        if not res.datasets:
            raise NotFound(f"study {study} was not found on node {node.name}")
        series = sorted(res.datasets, key=lambda d: (_num(d.get("SeriesNumber")), str(d.SeriesInstanceUID)))
        return [await self.manifest(node, study, str(s.SeriesInstanceUID)) for s in series]

    async def manifest(self, node: PacsNode, study: str, series: str) -> Manifest:
        cached = self._manifests.get((node.name, series))
        if cached is not None and time.monotonic() - cached.fetched < MANIFEST_TTL:
            return cached
        ident = Dataset()
        ident.QueryRetrieveLevel = "IMAGE"
        ident.StudyInstanceUID = study
        ident.SeriesInstanceUID = series
        ident.SOPInstanceUID = ""
        ident.SOPClassUID = ""
        ident.InstanceNumber = None
        await self._patient_key(node, study, ident)
        res = await self.pacs.find(node, ident, model=node.query_model, max_results=1_000_000)
        if not res.datasets:
            raise NotFound(f"series {series} of study {study} was not found on node {node.name}")
        refs = sorted((InstanceRef(str(d.SOPInstanceUID), str(d.get("SOPClassUID", "") or ""),
                                   _num(d.get("InstanceNumber"))) for d in res.datasets),
                      key=lambda r: (r.number, r.sop_instance_uid))
        manifest = Manifest(node.name, study, series, refs)
        self._manifests[(node.name, series)] = manifest
        return manifest

    async def _patient_key(self, node: PacsNode, study: str, ident: Dataset) -> None:
        if node.query_model != "patient":
            return
        pid = await self.cache.get(key("loc", "pid", node.name, study))
        if pid is None:
            probe = Dataset()
            probe.QueryRetrieveLevel = "STUDY"
            probe.StudyInstanceUID = study
            probe.PatientID = ""
            # Patient Root STUDY level needs the PatientID; a universal one is accepted by most PACS.
            res = await self.pacs.find(node, probe, model="patient")
            if res.datasets:
                pid = str(res.datasets[0].get("PatientID", "")).encode()
        if pid:
            ident.PatientID = pid.decode()

    # ------------------------------------------------------------------ fetching

    def fetch(self, node: PacsNode, manifest: Manifest, priority: str | None = None) -> SeriesFetch:
        """The in-flight fetch of this series, or a new one (single-flight per node and series)."""
        loop = asyncio.get_running_loop()
        fetch_key = (node.name, manifest.series if manifest.complete else ",".join(manifest.uids))
        current = self._fetches.get(fetch_key)
        if current is not None and not current.done:
            return current
        fetch = SeriesFetch(loop, manifest)
        missing = [u for u in manifest.uids if self.spool.get(u) is None]
        for uid in manifest.uids:
            if uid not in missing:
                fetch.arrive(uid)
        if not missing:
            fetch.finish()
            return fetch
        self._fetches[fetch_key] = fetch
        fetch.task = asyncio.ensure_future(self._run_fetch(node, fetch, missing, priority, fetch_key))
        return fetch

    async def _run_fetch(self, node: PacsNode, fetch: SeriesFetch, missing: list[str],
                         priority: str | None, fetch_key: tuple[str, str]) -> None:
        manifest = fetch.manifest
        try:
            if self.cluster is not None:
                await self.cluster.run(fetch, lambda wanted: self._from_pacs(node, fetch, wanted, priority))
            else:
                await self._from_pacs(node, fetch, missing, priority)
            still = [u for u in manifest.uids if not fetch.has(u)]
            if fetch.cancel.is_set() and still:
                fetch.finish(RetrievalFailed("retrieval cancelled: every client left", node=node.name))
            elif still:
                self.incomplete += 1   # reported to the clients and counted (/metrics), never silent
                fetch.finish(RetrievalFailed(f"node {node.name} did not deliver {len(still)} of "
                                             f"{len(manifest.uids)} instances of series {manifest.series}",
                                             node=node.name))
            else:
                fetch.finish()
        except GatewayError as exc:
            fetch.finish(exc)
        except Exception as exc:  # noqa: BLE001 - a fetch must always finish, or waiters hang
            log.exception("retrieval failed")
            fetch.finish(PacsError(f"retrieval from node {node.name} failed: {type(exc).__name__}",
                                   node=node.name))
        finally:
            self._fetches.pop(fetch_key, None)
            # The manifest may be stale next time (instances added/removed on the PACS).
            if fetch.error is not None:
                self._manifests.pop((node.name, manifest.series), None)

    async def _from_pacs(self, node: PacsNode, fetch: SeriesFetch, missing: list[str],
                         priority: str | None) -> None:
        """Retrieve ``missing`` from the PACS: the asked-for instance first, then the rest, then retries."""
        manifest = fetch.manifest
        self.retrievals_started += 1
        if priority in missing and len(missing) > 1:
            await self._retrieve(node, fetch, [priority])
            missing = [u for u in missing if not fetch.has(u)]
        if missing and not fetch.cancel.is_set():
            whole = manifest.complete and len(missing) == len(manifest.uids)
            await self._retrieve(node, fetch, None if whole else missing)
        still = [u for u in manifest.uids if not fetch.has(u)]
        # Retry what is missing once preferring compressed syntaxes (DCMTK PACS fail
        # sub-operations they cannot convert to the one syntax agreed per SOP class), then once
        # more preferring native ones.
        for compressed_first in (True, False):
            if not still or fetch.cancel.is_set():
                break
            log.warning("retrying %d missing instances of a series on %s", len(still), node.name)
            await self._retrieve(node, fetch, still, compressed_first=compressed_first)
            still = [u for u in manifest.uids if not fetch.has(u)]

    async def _retrieve(self, node: PacsNode, fetch: SeriesFetch, sops: list[str] | None,
                        compressed_first: bool = False) -> None:
        loop = asyncio.get_running_loop()
        manifest = fetch.manifest
        classes = sorted({i.sop_class_uid for i in manifest.instances if i.sop_class_uid})

        def on_instance(data: bytes, sop: str, cls: str, ts: str) -> None:
            self.spool.write(data, sop_instance_uid=sop, sop_class_uid=cls, transfer_syntax=ts,
                             study_uid=manifest.study, series_uid=manifest.series, node=node.name)
            loop.call_soon_threadsafe(fetch.arrive, sop)

        pid = await self._patient_id(node, manifest.study)
        chunks: list[list[str] | None] = [None] if sops is None else [
            sops[i:i + UID_LIST_CHUNK] for i in range(0, len(sops), UID_LIST_CHUNK)]
        for chunk in chunks:
            if fetch.cancel.is_set():
                return
            request = RetrieveRequest("SERIES" if chunk is None else "IMAGE", manifest.study, manifest.series,
                                      tuple(chunk) if chunk is not None else None, pid, tuple(classes),
                                      compressed_first)
            if node.retrieve == "get":
                await self.pacs.get(node, request, on_instance, fetch.cancel)
            else:
                await self._move(node, fetch, request, on_instance)

    async def _move(self, node: PacsNode, fetch: SeriesFetch, request: RetrieveRequest,
                    on_instance: OnInstance) -> None:
        if self.scp is None:
            raise PacsError(f"node {node.name} is configured for C-MOVE but the storage SCP is not running",
                            node=node.name)
        manifest = fetch.manifest
        msg_id = await self._move_msg_id(self.scp)
        expected = set(request.sops) if request.sops is not None else set(manifest.uids)
        self.scp.register(PendingMove(msg_id, manifest.study, manifest.series, expected, on_instance))
        record: bytes | None = None
        compressed_first = request.compressed_first
        if compressed_first:
            self.scp.prefer_compressed(True)
        try:
            # With replicas, the PACS may deliver to another replica's storage SCP (one AE title behind
            # one Service): publish the move so that replica can route it, and copy in what it announces.
            if self.cluster is not None:
                record = await self.cluster.register_move(msg_id, fetch, expected)
            move = self.pacs.move(node, request, destination=self.settings.gateway.ae_title, msg_id=msg_id,
                                  cancel=fetch.cancel)
            if self.cluster is not None:
                async with self.cluster.remote_arrivals(fetch):
                    await move
            else:
                await move
        finally:
            if record is not None and self.cluster is not None:
                await self.cluster.unregister_move(msg_id, record)
            self.scp.unregister(msg_id)
            if compressed_first:
                self.scp.prefer_compressed(False)

    async def _move_msg_id(self, scp: StorageScp) -> int:
        """A Message ID from the shared counter (unique across replicas), skipping ones pending here."""
        for _ in range(65535):
            msg_id = await self.cache.next_counter(key("move", "msgid"), 65535)
            if not scp.is_pending(msg_id):
                return msg_id
        raise PacsError("65535 C-MOVEs pending")

    async def _patient_id(self, node: PacsNode, study: str) -> str | None:
        if node.query_model != "patient":
            return None
        ident = Dataset()
        await self._patient_key(node, study, ident)
        return str(ident.get("PatientID", "")) or None

    def entry(self, sop_uid: str) -> SpoolEntry | None:
        return self.spool.get(sop_uid)

    async def close(self) -> None:
        for fetch in list(self._fetches.values()):
            fetch.cancel.set()
        if self.cluster is not None:
            # Let cancelled fetches write their end entry and free their lease (the cache closes
            # next), so other replicas take over at once instead of after the lease expires.
            tasks = [f.task for f in self._fetches.values() if f.task is not None]
            if tasks:
                await asyncio.wait(tasks, timeout=5)


def _num(value: object) -> float:
    try:
        return float(str(value))
    except (TypeError, ValueError):
        return float("inf")
