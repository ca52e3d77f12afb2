"""The retrieval service: what WADO-RS, WADO-URI and the rendered resources ask of the gateway.

Routes parse and render; this service decides. It owns locating the node, the manifests, the
single-flight fetches and their waiters, the spool pins and the transfer-syntax choice, and hands a
route either an async iterator of parts (:meth:`RetrievalService.parts`), metadata JSON
(:meth:`RetrievalService.metadata`) or one pinned instance (:meth:`RetrievalService.instance`).

**Identity** (docs/architecture.md, "Identity"): everything is resolved on one node: the one a
``/nodes/{name}`` URL names, or the first that holds the study for a federated one. Only that
node's spool entries, cached metadata and PACS answer; :attr:`Located.node` tells the route which
node answered. The study and series UIDs of the URL must be the instance's: the manifest is listed
with both, and a spooled entry filed under another study or series is not used.

**Safe while unknown** (docs/architecture.md, "PACS profiles"): a node whose ``retrieve`` or
``query_model`` is left to its profile runs with the safe defaults (C-GET, Study Root) until the
profile is known. A request that fails on such a node before its first part is in hand (a refused
C-GET or model; sub-operations a C-GET could not carry) waits for the probe its first contact
started and runs once more with the node as the profile settled it, when that changed either
setting (:mod:`gateway.profile.second_round`, the rule search follows too).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import TypeVar

from cache import keys
from cache.base import Cache
from cache.spool import Spool, SpoolEntry
from gateway.errors import GatewayError, NotAcceptable, NotFound
from gateway.instances import InstanceReader
from gateway.pacs import MoveDestination, Pacs
from gateway.patients import PatientIds
from gateway.profile import second_round
from gateway.retrieval.coordinator import Coordinator, LocalCoordinator
from gateway.retrieval.fetch import SeriesFetch
from gateway.retrieval.fetching import Fetcher
from gateway.retrieval.locating import Locator
from gateway.settings import PacsNode, Settings
from translators import media
from translators.uids import SeriesId

log = logging.getLogger(__name__)
METADATA_WINDOW = 4  # instances whose JSON one series metadata request builds at a time
T = TypeVar("T")


@dataclass(frozen=True)
class Part:
    """One instance of a multipart response: the pinned entry, the syntax it goes out in, and its
    bytes (stored ones streamed from disk, or a transcoded copy)."""

    entry: SpoolEntry
    transfer_syntax: str
    content: AsyncIterator[bytes] | bytes


class PartStream:
    """The parts of a study, series or instance in order, the first one already in hand (so a 404 or
    502 still happened before any header went out). Iterate, then always :meth:`aclose`."""

    def __init__(
        self, node: PacsNode, first: Part, rest: AsyncGenerator[Part, None], fetches: list[SeriesFetch]
    ) -> None:
        self.node = node
        self.first = first
        self._rest = rest
        self._fetches = fetches
        self._closed = False

    def __aiter__(self) -> AsyncIterator[Part]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[Part]:
        yield self.first
        async for part in self._rest:
            yield part

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        for fetch in self._fetches:
            fetch.leave()
        await self._rest.aclose()


@dataclass(frozen=True)
class Metadata:
    node: PacsNode
    json: bytes  # DICOM JSON array, BulkDataURIs against gateway.instances.PLACEHOLDER


class RetrievalService:
    def __init__(
        self,
        settings: Settings,
        pacs: Pacs,
        cache: Cache,
        spool: Spool,
        reader: InstanceReader,
        storage_scp: MoveDestination | None,
        coordinator: Coordinator | None = None,
    ) -> None:
        self.settings = settings
        self.cache = cache
        self.spool = spool
        self.reader = reader
        patients = PatientIds(
            lambda node, ident, model: pacs.find(node, ident, model=model), cache, settings.cache.ttl.location
        )
        self.locator = Locator(settings, pacs, cache, patients)
        self.fetcher = Fetcher(
            settings, pacs, cache, spool, storage_scp, coordinator or LocalCoordinator(), patients,
            self.locator,
        )
        self.fetcher.on_failure = self.locator.forget
        self.metadata_hits = 0     # series metadata answered from the cache (/metrics)
        self.metadata_misses = 0   # series metadata built from the instances (or asked without cache)

    @property
    def settled_node(self) -> second_round.Settled | None:
        """Set by the app: the node as its PACS profile has it once the running probe has ended
        (gateway.profile.service.NodeProfiles.settled); None: no second round."""
        return self.locator.settled_node

    @settled_node.setter
    def settled_node(self, settled: second_round.Settled | None) -> None:
        self.locator.settled_node = settled

    @property
    def retrievals_started(self) -> int:
        return self.fetcher.retrievals_started

    @property
    def incomplete(self) -> int:
        return self.fetcher.incomplete

    async def close(self) -> None:
        await self.fetcher.close()

    # ------------------------------------------------------------------ resolution

    async def _twice(
        self, nodes: Sequence[PacsNode], attempt: Callable[[Sequence[PacsNode]], Awaitable[T]]
    ) -> T:
        """``attempt(nodes)``; when it failed on a node whose profile, once settled, chose another
        ``retrieve`` or ``query_model``, once more with that node (module docstring)."""
        try:
            return await attempt(nodes)
        except GatewayError as exc:
            again = await second_round.relearned_nodes(
                nodes, second_round.failed_node(nodes, exc), self.settled_node, second_round.RETRIEVE,
                second_round.retrieval_explained)
            if again is None:
                raise
            log.info("retrieval from node %s failed (%s); again as its profile settled it", exc.node,
                     type(exc).__name__)
        return await attempt(again)

    async def _series(
        self, nodes: Sequence[PacsNode], study: str, series: str | None
    ) -> tuple[PacsNode, list[SeriesId]]:
        """The node, and the series a URL names: its own, or every series of its study (one
        SERIES-level C-FIND). No manifest: each fetch lists its own while it retrieves."""
        node = await self.locator.locate(study, nodes)
        uids = [series] if series is not None else await self.locator.series_uids(node, study)
        return node, [SeriesId(node.name, study, uid) for uid in uids]

    # ------------------------------------------------------------------ instances (multipart)

    async def parts(
        self,
        nodes: Sequence[PacsNode],
        study: str,
        series: str | None,
        instance: str | None,
        selection: media.Selection,
    ) -> PartStream:
        """The instances as they arrive, each in the syntax :func:`translators.media.instance_syntax`
        picks for it; the first part is in hand when this returns. The retrieval starts at once; the
        stream ends (closing delimiter) only once the manifest is known and complete."""
        return await self._twice(nodes, lambda ns: self._parts(ns, study, series, instance, selection))

    async def _parts(
        self,
        nodes: Sequence[PacsNode],
        study: str,
        series: str | None,
        instance: str | None,
        selection: media.Selection,
    ) -> PartStream:
        node, sids = await self._series(nodes, study, series)
        fetches: list[SeriesFetch] = []

        def start(i: int) -> SeriesFetch:
            fetch = self.fetcher.open(node, sids[i], only=instance, priority=instance)
            fetches.append(fetch)
            return fetch

        async def parts() -> AsyncGenerator[Part, None]:
            # One series after the other; the next series is fetched while this one streams.
            current = start(0)
            for i in range(len(sids)):
                nxt = start(i + 1) if i + 1 < len(sids) else None
                async for uid in current.arrivals():
                    yield await self._part(current.entry(uid), selection)
                if nxt is not None:
                    current = nxt

        rest = parts()
        try:
            first = await anext(rest)
        except BaseException:
            for fetch in fetches:
                fetch.leave()
            await rest.aclose()
            raise
        return PartStream(node, first, rest, fetches)

    async def _part(self, entry: SpoolEntry, selection: media.Selection) -> Part:
        stored = entry.transfer_syntax
        syntax = media.instance_syntax(stored, selection.transfer_syntax, explicit=selection.explicit_ts)
        if syntax is None:
            raise NotAcceptable(
                f"instance {entry.sop_instance_uid} is stored as {stored} and cannot be "
                f"transcoded to {selection.transfer_syntax}"
            )
        if syntax == stored:
            return Part(entry, stored, self.reader.chunks(entry))
        return Part(entry, syntax, await self.reader.transcoded(entry, syntax))

    # ------------------------------------------------------------------ metadata

    async def metadata(
        self,
        nodes: Sequence[PacsNode],
        study: str,
        series: str | None,
        instance: str | None,
        *,
        use_cache: bool = True,
    ) -> Metadata:
        """DICOM JSON of the study, series or instance, built from the real headers (PS3.18 §10.4).

        Series metadata is cached under the series' node and its study generation, so every replica
        answers it with one cache read until a STOW into the study changes the generation.
        """
        return await self._twice(nodes, lambda ns: self._metadata(ns, study, series, instance, use_cache))

    async def _metadata(
        self, nodes: Sequence[PacsNode], study: str, series: str | None, instance: str | None, use_cache: bool
    ) -> Metadata:
        node = await self.locator.locate(study, nodes)
        meta_key = None
        if series is not None and instance is None:
            sid = SeriesId(node.name, study, series)
            meta_key = keys.series_metadata(sid, await self.locator.generation(sid.study_id))
            if use_cache:
                cached = await self.cache.get(meta_key)
                if cached is not None:
                    self.metadata_hits += 1
                    return Metadata(node, cached)
            self.metadata_misses += 1
        _, sids = await self._series([node], study, series)
        keep = self.settings.retrieval.series_for_frames
        parts: list[bytes] = []
        only = None if keep else instance
        fetches = [self.fetcher.open(node, sid, only=only, priority=instance) for sid in sids]
        answered = False
        try:
            if instance is not None:
                parts.append(await self.reader.metadata(await fetches[0].wait_for(instance)))
            else:
                # Every series at once; each instance's JSON is built as it arrives.
                for built in await asyncio.gather(*(self._series_json(f) for f in fetches)):
                    parts.extend(built)
            answered = True
        finally:
            for fetch in fetches:
                # Answered: viewers ask for the frames next, so the fetches go on. The client left or
                # the request failed: nobody is waiting, so fetches nobody else joined are cancelled.
                fetch.detach() if keep and answered else fetch.leave()
        raw = b"[" + b",".join(parts) + b"]"
        if meta_key is not None:
            await self.cache.set(meta_key, raw, self.settings.cache.ttl.metadata)
        return Metadata(node, raw)

    async def _series_json(self, fetch: SeriesFetch) -> list[bytes]:
        """The JSON of every instance of a fetch, in manifest order (then what it did not list).

        Built while the series arrives (a few instances at a time, so frame requests running
        beside it still get the reader's threads), answered once the fetch is complete.
        """
        built: dict[str, bytes] = {}
        window = asyncio.Semaphore(METADATA_WINDOW)
        tasks: list[asyncio.Future[None]] = []

        async def build(uid: str, entry: SpoolEntry) -> None:
            try:
                built[uid] = await self.reader.metadata(entry)
            finally:
                window.release()

        try:
            async for uid in fetch.arrivals():
                await window.acquire()
                tasks.append(asyncio.ensure_future(build(uid, fetch.entry(uid))))
            await asyncio.gather(*tasks)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)  # the first failure was raised
        order = [*fetch.manifest.uids, *fetch.extras]
        return [built[uid] for uid in order if uid in built]

    # ------------------------------------------------------------------ one instance

    @asynccontextmanager
    async def instance(
        self, nodes: Sequence[PacsNode], study: str, series: str, sop: str
    ) -> AsyncIterator[SpoolEntry]:
        """The instance, pinned in the spool for the ``async with`` body (frames, bulk data,
        rendered, WADO-URI): from the spool when this node's copy of it is there under this study
        and series, else retrieved (with the rest of its series when the config says viewers want it)."""
        entry = await self._twice(nodes, lambda ns: self._pinned_instance(ns, study, series, sop))
        try:
            yield entry
        finally:
            self.spool.unpin(entry)

    async def _pinned_instance(
        self, nodes: Sequence[PacsNode], study: str, series: str, sop: str
    ) -> SpoolEntry:
        node = await self.locator.locate(study, nodes)
        entry = self.spool.pin(node.name, sop)
        if entry is not None and (entry.study_uid, entry.series_uid) != (study, series):
            self.spool.unpin(entry)
            entry = None
        if entry is None:
            entry = await self._retrieve_one(node, SeriesId(node.name, study, series), sop)
        return entry

    async def _retrieve_one(self, node: PacsNode, series: SeriesId, sop: str) -> SpoolEntry:
        """Retrieve (or join the retrieval of) ``sop``, first of its series and without waiting for
        the manifest; the entry comes back pinned for the caller."""
        keep = self.settings.retrieval.series_for_frames
        fetch = self.fetcher.open(node, series, only=None if keep else sop, priority=sop)
        try:
            entry = await fetch.wait_for(sop)
            pinned = self.spool.pin(node.name, sop)
        finally:
            fetch.detach() if keep else fetch.leave()
        if pinned is None:  # cannot happen while the fetch held it; never serve without a pin
            raise GatewayError(f"instance {sop} left the spool", node=node.name)
        if pinned is not entry:
            log.debug("instance replaced in the spool while retrieved; serving the newer copy")
        return pinned

    @asynccontextmanager
    async def representative(
        self, nodes: Sequence[PacsNode], study: str, series: str | None
    ) -> AsyncIterator[SpoolEntry]:
        """The instance a study or series thumbnail shows (the middle one of the first series),
        pinned for the ``async with`` body; the rest of its series keeps coming (viewers open it next).
        The manifest comes first here: it names the middle instance, which is then retrieved first."""
        entry = await self._twice(nodes, lambda ns: self._pinned_representative(ns, study, series))
        try:
            yield entry
        finally:
            self.spool.unpin(entry)

    async def _pinned_representative(
        self, nodes: Sequence[PacsNode], study: str, series: str | None
    ) -> SpoolEntry:
        node, sids = await self._series(nodes, study, series)
        manifest = await self.locator.manifest(node, sids[0].study, sids[0].series)
        if not manifest.instances:
            raise NotFound("no instances to render", node=node.name)
        uid = manifest.uids[(len(manifest.uids) - 1) // 2]
        fetch = self.fetcher.join(node, manifest, priority=uid)
        try:
            await fetch.wait_for(uid)
            entry = self.spool.pin(node.name, uid)
        finally:
            fetch.detach()
        if entry is None:
            raise GatewayError(f"instance {uid} left the spool", node=node.name)
        return entry

    async def whole_instance(
        self, entry: SpoolEntry, requested: str | None, *, explicit: bool
    ) -> tuple[bytes, str]:
        """A pinned instance as one Part-10 body in the syntax :func:`media.instance_syntax` picks."""
        part = await self._part(entry, media.Selection(False, "application/dicom", requested, explicit))
        if isinstance(part.content, bytes):
            return part.content, part.transfer_syntax
        return b"".join([chunk async for chunk in part.content]), part.transfer_syntax


__all__ = ["Metadata", "Part", "PartStream", "RetrievalService"]
