"""One retrieval of one series on one node, observed from the event loop by many HTTP streams.

A :class:`SeriesFetch` is the single-flight unit (docs/architecture.md, "Retrieval"): every request
that wants (part of) a series on a node joins the one fetch of it, and reads arrivals from the spool
at its own pace.

**Manifest known later**: a fetch may start before its manifest (the IMAGE-level C-FIND) has
answered, knowing only its (node, study, series) and, for one instance, its SOP Instance UID
(:meth:`SeriesFetch.unlisted`). Until :meth:`SeriesFetch.take_manifest` gives it the manifest,
what arrives is streamed as it comes; completeness is judged only once the manifest is known.
Arrivals the manifest does not list were in the series when it was retrieved (their headers say
so, see :mod:`gateway.retrieval.membership`): they are kept and served too
(:attr:`SeriesFetch.extras`).

**Pins** (the eviction rule): every instance the fetch has made available is pinned in the spool on
the fetch's behalf, from the moment it is committed (or found already spooled) until the fetch is
finished and has no waiter left. So a stream can never see an instance announced and then find its
file evicted, however small the spool; the spool may exceed its budget by the series being streamed.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from cache.spool import Spool, SpoolEntry
from gateway.errors import GatewayError, NotFound, PacsError
from translators.uids import InstanceId, SeriesId


@dataclass(frozen=True)
class InstanceRef:
    sop_instance_uid: str
    sop_class_uid: str
    number: float


@dataclass
class Manifest:
    """The instances of a series on a node, as its IMAGE-level C-FIND listed them."""

    id: SeriesId
    instances: list[InstanceRef]
    complete: bool = True  # False: a subset (e.g. the one instance a request asked for)
    generation: int = 0  # the study generation it was listed under (cache.keys: freshness)
    fetched: float = field(default_factory=time.monotonic)

    @property
    def node(self) -> str:
        return self.id.node

    @property
    def study(self) -> str:
        return self.id.study

    @property
    def series(self) -> str:
        return self.id.series

    @property
    def uids(self) -> list[str]:
        return [i.sop_instance_uid for i in self.instances]

    def instance_id(self, sop: str) -> InstanceId:
        return InstanceId(self.id.node, self.id.study, self.id.series, sop)

    def subset(self, sops: set[str]) -> Manifest:
        return Manifest(
            self.id,
            [i for i in self.instances if i.sop_instance_uid in sops],
            complete=False,
            generation=self.generation,
            fetched=self.fetched,
        )


@dataclass
class SopClasses:
    """What a fetch knows of its instances' SOP classes, for the storage contexts a C-GET proposes
    (gateway.retrieval.fetching: ``Fetcher._proposal``). The manifest does not ask for them
    (gateway.retrieval.locating); they are looked up for instances a retrieve did not bring."""

    known: dict[str, str] = field(default_factory=dict)   # SOP Instance UID -> SOP Class UID
    looked_up: set[str] = field(default_factory=set)       # asked for, answered or not
    asked_all: bool = False                                # a SERIES-level retrieve has run
    asked: set[str] = field(default_factory=set)           # instances an IMAGE-level retrieve named

    def tried(self, sop: str) -> bool:
        """A retrieve has asked the PACS for the instance already."""
        return self.asked_all or sop in self.asked

    def note_retrieve(self, sops: tuple[str, ...] | None) -> None:
        if sops is None:
            self.asked_all = True
        else:
            self.asked.update(sops)


class RetrievalFailed(PacsError):
    """Some instances of a series could not be retrieved (reported, never silently dropped)."""


class SeriesFetch:
    """Loop-thread object; the PACS side reaches it through :meth:`arrive_from_thread` (and reads
    ``listed_uids`` and :meth:`has`).

    ``listed`` tells whether :attr:`manifest` is the series' real manifest; before that it is a
    placeholder naming no instance, or only the one instance a single-instance fetch (``only``) wants.
    """

    def __init__(
        self, loop: asyncio.AbstractEventLoop, manifest: Manifest, spool: Spool, *, listed: bool = True
    ) -> None:
        self.loop = loop
        self.manifest = manifest
        self.spool = spool
        self.listed = listed
        self.only: str | None = None  # a single-instance fetch: the instance it wants
        # Read by the PACS threads (on_instance): replaced, never mutated, once the manifest is known.
        self.listed_uids: frozenset[str] = frozenset(manifest.uids) if listed else frozenset()
        self.arrived: list[str] = []
        self.classes = SopClasses()
        self._held: dict[str, SpoolEntry] = {}  # pinned on the fetch's behalf
        self.done = False
        self.error: GatewayError | None = None
        self.cancel = threading.Event()
        self.waiters = 0
        self._wake: asyncio.Future[None] = loop.create_future()
        self.task: asyncio.Future[None] | None = None
        self.retrieval_id: str | None = None  # cluster: the id while this replica holds the lease
        # Arrivals from the PACS threads not yet taken by the loop (arrive_from_thread).
        self._handoff: list[tuple[str, SpoolEntry]] = []
        self._handoff_lock = threading.Lock()

    @classmethod
    def unlisted(
        cls, loop: asyncio.AbstractEventLoop, series: SeriesId, spool: Spool, only: str | None = None
    ) -> SeriesFetch:
        """A fetch of ``series`` (or of its instance ``only``) whose manifest is not known yet."""
        wanted = [InstanceRef(only, "", float("inf"))] if only is not None else []
        fetch = cls(loop, Manifest(series, wanted, complete=only is None), spool, listed=False)
        fetch.only = only
        return fetch

    @property
    def id(self) -> SeriesId:
        return self.manifest.id

    def take_manifest(self, manifest: Manifest) -> None:
        """The manifest is known: from now on completeness is judged against it. A single-instance
        fetch keeps only its instance (NotFound when the manifest does not list it and it has not
        arrived: an arrival proved its membership by its header)."""
        if self.only is not None:
            if self.only in manifest.uids:
                manifest = manifest.subset({self.only})
            elif self.has(self.only):
                manifest = self.manifest
            else:
                raise NotFound(
                    f"instance {self.only} was not found in series {manifest.series}", node=manifest.node
                )
        self.manifest = manifest
        self.classes.known.update(
            (i.sop_instance_uid, i.sop_class_uid) for i in manifest.instances if i.sop_class_uid
        )
        self.listed_uids = frozenset(manifest.uids)
        self.listed = True
        self.adopt_spooled()
        self._notify()

    def lists(self, sop_uid: str) -> bool:
        """The manifest is known and names the instance (any thread)."""
        return sop_uid in self.listed_uids

    @property
    def extras(self) -> list[str]:
        """Arrivals the manifest does not list (they were in the series when retrieved)."""
        if not self.listed:
            return []
        return [u for u in self.arrived if u not in self.listed_uids]

    # ------------------------------------------------------------------ arrivals (loop thread)

    def adopt_spooled(self) -> list[str]:
        """Pin what the spool already holds of the manifest; return the SOP UIDs still missing."""
        missing = []
        for uid in self.manifest.uids:
            if self.has(uid):
                continue
            entry = self.spool.pin(self.manifest.node, uid)
            if (
                entry is not None
                and entry.series_uid == self.manifest.series
                and entry.study_uid == self.manifest.study
            ):
                self.arrive(uid, entry)
            else:
                if entry is not None:
                    self.spool.unpin(entry)  # the same UID filed under another study/series
                missing.append(uid)
        return missing

    def arrive_from_thread(self, sop_uid: str, entry: SpoolEntry) -> None:
        """:meth:`arrive`, from a PACS thread: instances that come while the loop is busy are taken in
        one turn of it, for one wake-up (a self-pipe write and a loop turn per instance cost ~6 % of
        the gateway's CPU in a cold C-GET, py-spy). Order is kept."""
        with self._handoff_lock:
            self._handoff.append((sop_uid, entry))
            if len(self._handoff) > 1:
                return           # a turn of the loop is already asked for and will take this too
        self.loop.call_soon_threadsafe(self._take_handoff)

    def _take_handoff(self) -> None:
        with self._handoff_lock:
            arrivals, self._handoff = self._handoff, []
        for sop_uid, entry in arrivals:
            self.arrive(sop_uid, entry)

    def arrive(self, sop_uid: str, entry: SpoolEntry) -> None:
        """``entry`` comes pinned once for this fetch (``Spool.commit(pin=True)`` or ``Spool.pin``)."""
        old = self._held.get(sop_uid)
        if old is entry:
            self.spool.unpin(entry)  # adopted from the spool while its arrival was on its way here
            return
        if old is not None:
            self.spool.unpin(old)
        else:
            self.arrived.append(sop_uid)
        self._held[sop_uid] = entry
        if self.done and self.waiters <= 0:
            self._release()  # a late arrival after everyone left: keep nothing pinned
        self._notify()

    def entry(self, sop_uid: str) -> SpoolEntry:
        """The spooled instance, on disk for as long as the caller is a waiter of this fetch."""
        return self._held[sop_uid]

    def has(self, sop_uid: str) -> bool:
        return sop_uid in self._held

    @property
    def missing(self) -> list[str]:
        return [u for u in self.manifest.uids if u not in self._held]

    def finish(self, error: GatewayError | None = None) -> None:
        self.done = True
        self.error = error
        if self.waiters <= 0:
            self._release()
        self._notify()

    def _release(self) -> None:
        held, self._held = self._held, {}
        for entry in held.values():
            self.spool.unpin(entry)

    def _notify(self) -> None:
        if not self._wake.done():
            self._wake.set_result(None)
        self._wake = self.loop.create_future()

    async def changed(self) -> None:
        await asyncio.shield(self._wake)

    # ------------------------------------------------------------------ waiting

    async def arrivals(self) -> AsyncIterator[str]:
        """Every instance of the manifest as it becomes available; raises the fetch's error."""
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

    async def wait_for(self, sop_uid: str) -> SpoolEntry:
        """The instance once it is here; NotFound as soon as the manifest is known without it
        (and it has not arrived), or when the fetch ended without it."""
        while not self.has(sop_uid):
            if self.done and self.error is not None:
                raise self.error
            if self.done or (self.listed and not self.lists(sop_uid)):
                raise NotFound(
                    f"instance {sop_uid} was not found in series {self.manifest.series}",
                    node=self.manifest.node,
                )
            await self.changed()
        return self.entry(sop_uid)

    # ------------------------------------------------------------------ waiters

    def join(self) -> None:
        self.waiters += 1

    def leave(self) -> None:
        """The waiter is gone: when it was the last one, an unfinished fetch is cancelled."""
        self.waiters -= 1
        if self.waiters <= 0:
            if self.done:
                self._release()
            else:
                self.cancel.set()

    def detach(self) -> None:
        """The waiter is gone, but the fetch should finish anyway (a viewer that read metadata or a
        frame asks for the rest of the series next): nothing is cancelled."""
        self.waiters -= 1
        if self.waiters <= 0 and self.done:
            self._release()
