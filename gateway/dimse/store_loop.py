"""The C-STORE loop every DIMSE engine shares: which association an instance goes on, when a new one
is opened, transcoding for a PACS that refused a syntax, and what a lost C-STORE means for the rest.

The rules (written once here; the engines only open associations and send one C-STORE):

* **Contexts planned as instances come** (:func:`gateway.dimse.contexts.store_proposal`): the open
  association proposed the classes and syntaxes seen so far plus the native syntaxes of the common
  storage classes. An instance whose (class, syntax) it did not propose gets a new association
  (released first: one association at a time, one transfer slot), planned from it, from what came
  before and, for a sequence known whole, from what comes after.
* **Transcoding only when refused**: an instance goes on the context of its own transfer syntax when
  the PACS accepted it; only when the PACS refused that syntax is it transcoded
  (``translators.frame_transcode.transcode_part10``) to the native fallback the PACS accepted
  (:func:`gateway.dimse.contexts.store_fallback`), into ``workdir``, removed after the C-STORE.
* **Nothing unconfirmed is a success** (PS3.4 B.2.3): after an abort, a timeout or a lost connection
  *during* a C-STORE, the instance in flight and every one after it are processing failures (0110),
  unconfirmed and never sent. An association that ended while idle (every C-STORE on it answered)
  is replaced. One that cannot be established before any instance got a result fails the request
  as a whole (the :mod:`gateway.errors` tree, 502/504 naming the node).
* **Cancellation**: a set ``cancel`` stops between two instances.

docs/architecture.md, "DIMSE edge" and "STOW-RS".
"""

from __future__ import annotations

import logging
import os
import tempfile
import threading
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Generic, Protocol, TypeVar

from gateway.dimse import outcomes
from gateway.dimse.contexts import Context, StorePair, proposed_pairs, store_fallback, store_proposal
from gateway.errors import GatewayError
from gateway.pacs import StoreItem, StoreResult
from gateway.settings import PacsNode
from translators.frame_transcode import transcode_part10

log = logging.getLogger(__name__)

A = TypeVar("A")


class StoreEngine(Protocol[A]):
    """What an engine does for the loop, on associations of its own type ``A``."""

    node: PacsNode

    def open(self, contexts: list[Context]) -> A | None:
        """An association proposing ``contexts``; None when the PACS accepted none of them. Raises
        the :mod:`gateway.errors` tree when it cannot open one."""
        ...

    def reusable(self, assoc: A) -> bool:
        """Still established and fit for another C-STORE."""
        ...

    def accepted_syntaxes(self, assoc: A, sop_class: str) -> list[str]: ...

    def send(self, assoc: A, item: StoreItem, path: Path | None, syntax: str, msg_id: int) -> StoreResult:
        """One C-STORE of ``item``'s instance in ``syntax`` and its answer: from ``path`` (a
        transcoded copy), or with None from the item itself (its ``pieces`` when the engine sends
        from memory, else :meth:`StoreItem.file`). Unanswered: an unconfirmed result, and the
        association aborted (the PACS's state is unknown)."""
        ...

    def is_established(self, assoc: A) -> bool: ...

    def close(self, assoc: A) -> None: ...


class _Link(Generic[A]):
    """The request's store association: one at a time, replaced when an instance needs a pair it did
    not propose or when it ended while idle."""

    def __init__(self, engine: StoreEngine[A]) -> None:
        self.engine = engine
        self.assoc: A | None = None
        self.proposed: frozenset[StorePair] = frozenset()
        self.opened = False   # a proposal was answered (assoc None: the PACS accepted none of it)
        self.dead = False     # a C-STORE went unanswered or a later association failed: send no more
        self._msg_id = 0

    def ready(self, pair: StorePair, recent: Iterable[StorePair], upcoming: Iterable[StorePair]) -> A | None:
        if self.opened and pair in self.proposed:
            if self.assoc is None or self.engine.reusable(self.assoc):
                return self.assoc
            log.info("node %s: the store association ended while idle; opening another",
                     self.engine.node.name)
        self.close()
        contexts = store_proposal([pair, *recent, *upcoming])
        self.assoc = self.engine.open(contexts)
        self.proposed, self.opened, self._msg_id = proposed_pairs(contexts), True, 0
        return self.assoc

    def next_msg_id(self) -> int:
        self._msg_id = self._msg_id % 65535 + 1
        return self._msg_id

    def close(self) -> None:
        assoc, self.assoc, self.opened = self.assoc, None, False
        if assoc is not None:
            self.engine.close(assoc)


def store_all(engine: StoreEngine[A], items: Iterable[StoreItem], workdir: Path,
              cancel: threading.Event) -> list[StoreResult]:
    """C-STORE every item as it comes; one result per item, in order (module docstring).

    ``items`` may block between items (an :class:`gateway.dimse.store.ItemFeed`); a sequence is
    known whole, so the first association also proposes what its later items need.
    """
    upcoming = list(dict.fromkeys(_pair(i) for i in items)) if isinstance(items, Sequence) else []
    link = _Link(engine)
    results: list[StoreResult] = []
    recent: dict[StorePair, None] = {}   # pairs sent so far, the latest last
    try:
        for item in items:
            pair = _pair(item)
            try:
                results.append(_store_next(link, item, workdir, cancel, first=not results,
                                           recent=reversed(recent), upcoming=upcoming))
            finally:
                if item.done is not None:
                    item.done()   # its file is no longer read (gateway.pacs.StoreItem.done)
            recent.pop(pair, None)
            recent[pair] = None
    finally:
        link.close()
    lost = sum(1 for r in results if not r.confirmed)
    if lost:
        log.warning("node %s: %d of %d C-STOREs not confirmed", engine.node.name, lost, len(results))
    return results


def _pair(item: StoreItem) -> StorePair:
    return item.sop_class_uid, item.transfer_syntax


def _store_next(link: _Link[A], item: StoreItem, workdir: Path, cancel: threading.Event, *, first: bool,
                recent: Iterable[StorePair], upcoming: Iterable[StorePair]) -> StoreResult:
    engine = link.engine
    if cancel.is_set() or link.dead:
        return outcomes.store_lost()
    try:
        assoc = link.ready(_pair(item), recent, upcoming)
    except GatewayError:
        if first:
            raise   # nothing sent yet: the request fails as a whole
        log.warning("node %s: a further store association failed", engine.node.name)
        link.dead = True
        return outcomes.store_lost()
    if assoc is None:
        return outcomes.store_sop_class_refused()
    result = _store_one(engine, assoc, item, link.next_msg_id(), workdir)
    if not result.confirmed and not engine.is_established(assoc):
        link.dead = True   # it ended under this C-STORE: the PACS's state is unknown, send no more
    return result


def _store_one(engine: StoreEngine[A], assoc: A, item: StoreItem, msg_id: int, workdir: Path) -> StoreResult:
    syntaxes = engine.accepted_syntaxes(assoc, item.sop_class_uid)
    if not syntaxes:
        return outcomes.store_sop_class_refused()
    if item.transfer_syntax in syntaxes:
        return engine.send(assoc, item, None, item.transfer_syntax, msg_id)
    target = store_fallback(syntaxes)
    if target is None:
        return outcomes.store_syntax_refused()
    try:
        whole = b"".join(item.pieces) if item.pieces is not None else item.file().read_bytes()
        data = transcode_part10(whole, target)
    except Exception:  # noqa: BLE001 - TranscodeError, codec errors: the PACS cannot take it
        log.info("node %s: transcoding %s to %s failed", engine.node.name, item.transfer_syntax, target,
                 exc_info=True)
        return outcomes.store_syntax_refused()
    fd, name = tempfile.mkstemp(dir=workdir, suffix=".dcm")
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
    del data, whole
    try:
        return engine.send(assoc, item, Path(name), target, msg_id)
    finally:
        Path(name).unlink(missing_ok=True)
