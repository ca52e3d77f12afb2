"""C-STORE: the instances of one STOW-RS request, sent to one node as they come (blocking; run by
:mod:`gateway.dimse.threads` under the node's transfer budget, shared with retrievals).

* **Fed while the upload runs**: :func:`store_all` takes any iterable. STOW-RS hands each instance
  over as soon as its part arrived (:func:`store_streamed` bridges the event loop's async iterable
  to the worker's blocking one, :class:`ItemFeed`), so the first C-STORE goes out while later parts
  are still on the wire. The association opens when the first item arrives and is kept for the rest.
* **Contexts planned as instances come** (:func:`gateway.dimse.contexts.store_proposal`): the open
  association proposed the classes and syntaxes seen so far plus the native syntaxes of the common
  storage classes. An instance whose (class, syntax) it did not propose gets a new association
  (released first: one association at a time, one transfer slot), planned from it and from what came
  before. An instance goes on the context of its own transfer syntax when the PACS accepted it; only
  when the PACS refused that syntax is it transcoded (``translators.frames.transcode_part10``) to the
  native fallback the PACS accepted (:func:`gateway.dimse.contexts.store_fallback`).
* **Streamed from disk**: instances are sent by path with pynetdicom's chunked send
  (``STORE_SEND_CHUNKED_DATASET``, set by :func:`gateway.dimse.process.configure_pynetdicom`): the
  file is read PDU by PDU, never decoded or held whole.
* **Back-to-back C-STOREs** on one association rely on the reactor guard every association gets
  (:mod:`gateway.dimse.socket_tuning`), or a response is occasionally stolen and the instance times out.
* **Nothing unconfirmed is a success**: an instance counts as stored only when the PACS answered its
  C-STORE (PS3.4 B.2.3) with success or a warning. After an abort, a timeout or a lost connection
  *during* a C-STORE, the instance in flight and every one after it are processing failures (0110),
  unconfirmed and never sent; the mapping is :mod:`gateway.dimse.outcomes`'. An association that
  ended while idle (every C-STORE on it answered; a slow upload outlived a network timeout) is
  replaced by a new one. An association that cannot be established at all, before any instance
  got a result, fails the request as a whole (502/504 naming the node).
* **Cancellation**: a set ``cancel`` stops between two instances; the rest are not sent. With a
  feed, setting it also wakes a worker waiting for the next item.

docs/architecture.md, "DIMSE edge" and "STOW-RS".
"""

from __future__ import annotations

import asyncio
import logging
import os
import queue
import tempfile
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator, Sequence
from pathlib import Path

from pydicom.dataset import Dataset
from pynetdicom.association import Association

from gateway.dimse import outcomes
from gateway.dimse.association import accepted_syntaxes, close_association, open_association
from gateway.dimse.contexts import StorePair, proposed_pairs, store_fallback, store_proposal
from gateway.dimse.socket_tuning import busy
from gateway.errors import GatewayError
from gateway.pacs import StoreItem, StoreItems, StoreResult
from gateway.settings import PacsNode
from translators.frames import transcode_part10

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


# --------------------------------------------------------------------------- the worker


class _Link:
    """The request's store association: one at a time, replaced when an instance needs a pair it did
    not propose or when it ended while idle."""

    def __init__(self, calling_ae: str, node: PacsNode) -> None:
        self.calling_ae, self.node = calling_ae, node
        self.assoc: Association | None = None
        self.proposed: frozenset[StorePair] = frozenset()
        self.opened = False   # a proposal was answered (assoc None: the PACS accepted none of it)
        self.dead = False     # a C-STORE went unanswered or a later association failed: send no more
        self._msg_id = 0

    def ready(self, pair: StorePair, recent: Iterable[StorePair], upcoming: Iterable[StorePair]
              ) -> Association | None:
        """The association to send an instance of ``pair`` on; None when the PACS accepted none of
        the contexts proposed with it. A new one is planned from ``pair``, the ``recent`` pairs
        (latest first) and the ``upcoming`` ones. Raises the :mod:`gateway.errors` tree when it
        cannot open one."""
        if self.opened and pair in self.proposed:
            if self.assoc is None or self.assoc.is_established:
                return self.assoc
            log.info("node %s: the store association ended while idle; opening another", self.node.name)
        self.close()
        contexts = store_proposal([pair, *recent, *upcoming])
        self.assoc = open_association(self.calling_ae, self.node, contexts, none_accepted_ok=True)
        self.proposed, self.opened, self._msg_id = proposed_pairs(contexts), True, 0
        return self.assoc

    def next_msg_id(self) -> int:
        self._msg_id = self._msg_id % 65535 + 1
        return self._msg_id

    def close(self) -> None:
        assoc, self.assoc, self.opened = self.assoc, None, False
        if assoc is not None:
            close_association(assoc)


def store_all(calling_ae: str, node: PacsNode, items: Iterable[StoreItem], workdir: Path,
              cancel: threading.Event) -> list[StoreResult]:
    """C-STORE every item as it comes; one result per item, in order.

    ``items`` may block between items (an :class:`ItemFeed`); a sequence is known whole, so the
    first association also proposes what its later items need.
    """
    upcoming = list(dict.fromkeys(_pair(i) for i in items)) if isinstance(items, Sequence) else []
    link = _Link(calling_ae, node)
    results: list[StoreResult] = []
    recent: dict[StorePair, None] = {}   # pairs sent so far, the latest last
    try:
        for item in items:
            pair = _pair(item)
            results.append(_store_next(link, item, workdir, cancel, first=not results,
                                       recent=reversed(recent), upcoming=upcoming))
            recent.pop(pair, None)
            recent[pair] = None
    finally:
        link.close()
    lost = sum(1 for r in results if not r.confirmed)
    if lost:
        log.warning("node %s: %d of %d C-STOREs not confirmed", node.name, lost, len(results))
    return results


def _pair(item: StoreItem) -> StorePair:
    return item.sop_class_uid, item.transfer_syntax


def _store_next(link: _Link, item: StoreItem, workdir: Path, cancel: threading.Event, *, first: bool,
                recent: Iterable[StorePair], upcoming: Iterable[StorePair]) -> StoreResult:
    if cancel.is_set() or link.dead:
        return outcomes.store_lost()
    try:
        assoc = link.ready(_pair(item), recent, upcoming)
    except GatewayError:
        if first:
            raise   # nothing sent yet: the request fails as a whole
        log.warning("node %s: a further store association failed", link.node.name)
        link.dead = True
        return outcomes.store_lost()
    if assoc is None:
        return outcomes.store_sop_class_refused()
    result = _store_one(assoc, link.node, item, link.next_msg_id(), workdir)
    if not result.confirmed and not assoc.is_established:
        link.dead = True   # it ended under this C-STORE: the PACS's state is unknown, send no more
    return result


def _store_one(assoc: Association, node: PacsNode, item: StoreItem, msg_id: int,
               workdir: Path) -> StoreResult:
    syntaxes = accepted_syntaxes(assoc, item.sop_class_uid)
    if not syntaxes:
        return outcomes.store_sop_class_refused()
    path, syntax, temp = item.path, item.transfer_syntax, None
    if syntax not in syntaxes:
        target = store_fallback(syntaxes)
        if target is None:
            return outcomes.store_syntax_refused()
        try:
            data = transcode_part10(item.path.read_bytes(), target)
        except Exception:  # noqa: BLE001 - TranscodeError, codec errors: the PACS cannot take it
            log.info("node %s: transcoding %s to %s failed", node.name, syntax, target, exc_info=True)
            return outcomes.store_syntax_refused()
        fd, name = tempfile.mkstemp(dir=workdir, suffix=".dcm")
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        del data
        path, syntax, temp = Path(name), target, Path(name)
    try:
        with busy(assoc):
            status: Dataset = assoc.send_c_store(path, msg_id=msg_id)
    except (RuntimeError, ValueError, AttributeError, OSError):
        # RuntimeError: association gone; others: a file the checks let through (never stored).
        log.info("node %s: C-STORE could not be sent", node.name, exc_info=True)
        return outcomes.store_lost()
    finally:
        if temp is not None:
            temp.unlink(missing_ok=True)
    result = outcomes.store_response(status, syntax)
    if not result.confirmed and assoc.is_established:
        assoc.abort()   # the PACS's state for this association is unknown: the rest is not sent on it
    return result

