"""One STOW-RS request as a pipeline: each part prepared as soon as it is complete and its instance
handed to :meth:`gateway.pacs.Pacs.store` at once, so the C-STOREs run while later parts are still on
the wire (docs/architecture.md, "STOW-RS")::

    receive (event loop) --complete part--> prepare (request order) --item--> Pacs.store
                                                                       (one association)

* Prepare: the common case (a proper Part-10 file) on the event loop, tens of microseconds
  (:func:`gateway.stow.prepare.prepare_instance_inline`); anything that needs pydicom in a thread.

* ``application/dicom`` parts go through at once. Metadata parts (``application/dicom+json``) and
  parts of other types wait for the end of the body, because the bulk data a metadata part names may
  come after it; so does the part the body ended in (:func:`gateway.stow.prepare.prepare_rest`).
* Order: entries are kept by part index, so the response lists instances in request order whatever
  order they went to the PACS in; results come back in the order items were handed over.
* Only the PACS's confirmed results count as stored (PS3.4 B.2.3); an item without a result is a
  processing failure.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Sequence
from pathlib import Path

from gateway.pacs import Pacs, StoreItem, StoreResult
from gateway.settings import PacsNode
from gateway.stow.prepare import (
    DICOM,
    Entry,
    Header,
    media_of,
    prepare_instance,
    prepare_instance_inline,
    prepare_rest,
)
from gateway.stow.receive import Part, Received
from translators import stow as st

_UNREAD = Header("", "", "", "", "")


class _Items:
    """The async iterable :meth:`Pacs.store` reads: items put on the event loop, ended by :meth:`close`."""

    def __init__(self) -> None:
        self._queue: asyncio.Queue[StoreItem | None] = asyncio.Queue()

    def put(self, item: StoreItem) -> None:
        self._queue.put_nowait(item)

    def close(self) -> None:
        self._queue.put_nowait(None)

    def __aiter__(self) -> _Items:
        return self

    async def __anext__(self) -> StoreItem:
        item = await self._queue.get()
        if item is None:
            self._queue.put_nowait(None)   # stays ended for any later reader
            raise StopAsyncIteration
        return item


class Pipeline:
    """Parts -> entries -> C-STOREs for one request. Event loop only.

    Feed it with :meth:`part_complete` (``on_part`` of :func:`gateway.stow.receive.receive`, which
    fills :attr:`received`), then call :meth:`finish` once the body has ended (whole, cut short, or
    the client left), or :meth:`abort` to stop.
    """

    def __init__(self, pacs: Pacs, node: PacsNode, root: str, study: str | None, workdir: Path) -> None:
        self.pacs, self.node, self.root, self.study, self.workdir = pacs, node, root, study, workdir
        self.received = Received()
        self._complete: asyncio.Queue[Part | None] = asyncio.Queue()
        self._entries: dict[int, list[Entry]] = {}     # part index -> its entries
        self._trailing: list[Entry] = []                # entries of no part (a cut-off header block)
        self._deferred: list[Part] = []                 # complete parts that wait for the end
        self._handed: list[Entry] = []                  # entries whose items went to the PACS, in order
        self._items = _Items()
        self._store: asyncio.Task[list[StoreResult]] | None = None
        self._preparing = asyncio.create_task(self._prepare_as_completed())

    def part_complete(self, part: Part) -> None:
        self._complete.put_nowait(part)

    @property
    def handed(self) -> Sequence[Entry]:
        """The entries whose instances were handed to the PACS so far."""
        return self._handed

    async def finish(self) -> list[st.InstanceOutcome]:
        """Prepare what waited for the end of the body, let the PACS store it, and answer one outcome
        per instance, in request order. Raises what :meth:`Pacs.store` raised."""
        self._complete.put_nowait(None)
        await self._preparing
        if self._store is not None and self._store.done():
            self._store.result()   # it failed (e.g. the node is unreachable): no point going on
        by_part, self._trailing = await asyncio.to_thread(prepare_rest, self.received, self._deferred,
                                                          self.root, self.study, self.workdir)
        for index, entries in by_part.items():
            self._record(index, entries)
        self._items.close()
        results = await self._store if self._store is not None else []
        return self._outcomes(results)

    async def abort(self) -> None:
        """Stop preparing and storing (the request failed or was cancelled) and wait until both have
        stopped: the PACS interface then has given its association back and no longer reads the
        work directory. Which of :attr:`handed` were stored is not known."""
        self._items.close()
        tasks = [t for t in (self._preparing, self._store) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.wait(tasks)
        for task in tasks:
            if not task.cancelled():
                task.exception()   # retrieved: it is the caller's error that propagates

    # ------------------------------------------------------------------ internals

    async def _prepare_as_completed(self) -> None:
        while (part := await self._complete.get()) is not None:
            if media_of(part, self.root) != DICOM:
                self._deferred.append(part)
            elif self._store is None or not self._store.done():   # done: it failed, the request fails
                entries = prepare_instance_inline(part, self.study)
                if entries is None:   # not the common case: pydicom, maybe a repair, in a thread
                    entries = await asyncio.to_thread(prepare_instance, part, self.study, self.workdir)
                self._record(part.index, entries, part)

    def _record(self, index: int, entries: list[Entry], part: Part | None = None) -> None:
        self._entries[index] = entries
        for entry in entries:
            if entry.item is None:
                continue
            if self._store is None:   # the first instance: the PACS interface takes it from here
                self._store = asyncio.create_task(self.pacs.store(self.node, self._items, self.workdir))
            item = entry.item
            if part is not None and part.in_memory:
                # An application/dicom part is one instance: once the PACS interface is done with
                # it, its memory goes back to the window (gateway/stow/receive.py).
                item = dataclasses.replace(item, done=part.release)
            self._handed.append(entry)
            self._items.put(item)

    def _outcomes(self, results: Sequence[StoreResult]) -> list[st.InstanceOutcome]:
        result_of = {id(entry): result for entry, result in zip(self._handed, results, strict=False)}
        entries = [e for index in sorted(self._entries) for e in self._entries[index]] + self._trailing
        return [_outcome(entry, result_of.get(id(entry))) for entry in entries]


def _outcome(entry: Entry, result: StoreResult | None) -> st.InstanceOutcome:
    """An entry's failure code, or the PACS's status for its item. A result the PACS did not confirm is
    never a success, whatever its status says; an item without a result (the PACS interface returned
    too few) is a processing failure."""
    if entry.item is None:
        assert entry.status is not None
        status = entry.status
    elif result is None or (st.is_stored(result.status) and not result.confirmed):
        status = st.PROCESSING_FAILURE
    else:
        status = result.status
    h = entry.header or _UNREAD
    return st.InstanceOutcome(h.sop_class or None, h.sop_instance or None, status, h.study or None,
                              h.series or None)
