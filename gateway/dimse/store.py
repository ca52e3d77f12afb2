"""C-STORE: the instances of one STOW-RS request, sent to one node as they come (blocking; run by
:mod:`gateway.dimse.threads` under the node's transfer budget, shared with retrievals).

* **Fed while the upload runs**: :func:`store_all` takes any iterable. STOW-RS hands each instance
  over as soon as its part arrived (:func:`store_streamed` bridges the event loop's async iterable
  to the worker's blocking one, :class:`ItemFeed`), so the first C-STORE goes out while later parts
  are still on the wire. The association opens when the first item arrives and is kept for the rest.
* **The loop** (association per instance, contexts planned as instances come, transcoding only
  for a refused syntax, nothing unconfirmed a success, cancellation) is the same for every engine:
  :mod:`gateway.dimse.store_loop`; :class:`PynetdicomStore` is pynetdicom's side of it.
* **Streamed from disk**: instances are sent by path with pynetdicom's chunked send
  (``STORE_SEND_CHUNKED_DATASET``, set by :func:`gateway.dimse.process.configure_pynetdicom`): the
  file is read PDU by PDU, never decoded or held whole.
* **Back-to-back C-STOREs** on one association rely on the reactor guard every association gets
  (:mod:`gateway.dimse.socket_tuning`), or a response is occasionally stolen and the instance times out.
* **Cancellation**: with a feed, setting ``cancel`` also wakes a worker waiting for the next item.

docs/architecture.md, "DIMSE edge" and "STOW-RS".
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator, Sequence
from pathlib import Path

from pydicom.dataset import Dataset
from pynetdicom.association import Association

from gateway.dimse import outcomes, store_loop
from gateway.dimse.association import accepted_syntaxes, close_association, open_association
from gateway.dimse.contexts import Context
from gateway.dimse.socket_tuning import busy
from gateway.pacs import StoreItem, StoreItems, StoreResult
from gateway.settings import PacsNode

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- event loop -> worker


class _End:
    """The feed's end marker (a class of its own, so the queue's type stays precise)."""


_END = _End()


class ItemFeed:
    """Store items handed from the event loop to a store worker thread, in order.

    The loop side never blocks: :meth:`put` and :meth:`close` append to a ``queue.SimpleQueue``. The
    worker iterates and blocks in ``SimpleQueue.get`` (no polling) until the next item or the end.
    ``cancel`` is the event to give the worker: setting it (as :meth:`gateway.dimse.threads.Workers.run`
    does when the awaiting coroutine is cancelled) also ends the feed, so a worker waiting for the
    next part of a slow upload wakes up and stops.
    """

    def __init__(self) -> None:
        self._queue: queue.SimpleQueue[StoreItem | _End] = queue.SimpleQueue()
        self.cancel: threading.Event = _CancelEndsFeed(self)

    def put(self, item: StoreItem) -> None:
        self._queue.put(item)

    def close(self) -> None:
        """No more items (idempotent: the end marker is put back whenever it is taken)."""
        self._queue.put(_END)

    async def fill(self, source: AsyncIterator[StoreItem]) -> None:
        """Event loop: every item of ``source`` into the feed, then the end (also on failure)."""
        try:
            async for item in source:
                self.put(item)
        finally:
            self.close()

    def __iter__(self) -> Iterator[StoreItem]:
        return self

    def __next__(self) -> StoreItem:
        item = self._queue.get()
        if isinstance(item, _End):
            self._queue.put(item)   # stays ended for any later call
            raise StopIteration
        return item


class _CancelEndsFeed(threading.Event):
    def __init__(self, feed: ItemFeed) -> None:
        super().__init__()
        self._feed = feed

    def set(self) -> None:
        super().set()
        self._feed.close()


Engine = Callable[[Iterable[StoreItem], threading.Event], Awaitable[list[StoreResult]]]
"""Runs a blocking ``store_all``-shaped function on a worker thread: (items, cancel) -> results."""


async def store_streamed(items: StoreItems, engine: Engine) -> list[StoreResult]:
    """:meth:`gateway.pacs.Pacs.store` for any blocking engine: a sequence goes as it is; an async
    iterable is bridged through an :class:`ItemFeed`, and the engine starts (taking its transfer
    budget) only when the first item has arrived. The iterable's own exception, if any, propagates
    after the engine has stored the items before it."""
    if isinstance(items, Sequence):
        return await engine(items, threading.Event()) if items else []
    source = aiter(items)
    first = await anext(source, None)
    if first is None:
        return []
    feed = ItemFeed()
    feed.put(first)
    pump = asyncio.create_task(feed.fill(source))
    try:
        results = await engine(feed, feed.cancel)
    except BaseException:
        pump.cancel()
        await asyncio.wait([pump])
        raise
    if not pump.done():   # the engine returned before the end: nothing more will be read
        pump.cancel()
        await asyncio.wait([pump])
    if not pump.cancelled():
        pump.result()     # the iterable's exception, if it raised
    return results


# --------------------------------------------------------------------------- the pynetdicom engine


class PynetdicomStore:
    """The pynetdicom side of :func:`gateway.dimse.store_loop.store_all` (the loop's rules are there)."""

    def __init__(self, calling_ae: str, node: PacsNode) -> None:
        self.calling_ae, self.node = calling_ae, node

    def open(self, contexts: list[Context]) -> Association | None:
        return open_association(self.calling_ae, self.node, contexts, none_accepted_ok=True)

    def reusable(self, assoc: Association) -> bool:
        return bool(assoc.is_established)

    def is_established(self, assoc: Association) -> bool:
        return bool(assoc.is_established)

    def accepted_syntaxes(self, assoc: Association, sop_class: str) -> list[str]:
        return accepted_syntaxes(assoc, sop_class)

    def send(self, assoc: Association, item: StoreItem, path: Path | None, syntax: str,
             msg_id: int) -> StoreResult:
        try:
            with busy(assoc):
                status: Dataset = assoc.send_c_store(path or item.file(), msg_id=msg_id)
        except (RuntimeError, ValueError, AttributeError, OSError):
            # RuntimeError: association gone; others: a file the checks let through (never stored).
            log.info("node %s: C-STORE could not be sent", self.node.name, exc_info=True)
            return outcomes.store_lost()
        result = outcomes.store_response(status, syntax)
        if not result.confirmed and assoc.is_established:
            assoc.abort()   # the PACS's state for this association is unknown: the rest is not sent on it
        return result

    def close(self, assoc: Association) -> None:
        close_association(assoc)


def store_all(calling_ae: str, node: PacsNode, items: Iterable[StoreItem], workdir: Path,
              cancel: threading.Event) -> list[StoreResult]:
    """C-STORE every item as it comes, on pynetdicom; one result per item, in order."""
    return store_loop.store_all(PynetdicomStore(calling_ae, node), items, workdir, cancel)
