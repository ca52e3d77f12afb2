"""C-STORE: the instances of one STOW-RS request, sent to one node over one association.

* **Contexts from the parts**: for every SOP class in the request, one presentation context per
  transfer syntax the parts are encoded in, plus an Explicit/Implicit VR Little Endian fallback
  (PS3.4 B.2: every Storage SCP accepts Implicit VR LE). An instance goes on the context of its own
  transfer syntax when the PACS accepted it; only when the PACS refused that syntax is it
  transcoded (``translators.frames.transcode_part10``) to the fallback the PACS accepted. Past the
  128-context limit (PS3.8 §9.3.2.2) the SOP classes are split over consecutive associations.
* **Streamed from disk**: instances are sent by path with pynetdicom's chunked send
  (``_config.STORE_SEND_CHUNKED_DATASET``): the file is read PDU by PDU, never decoded or held whole.
* **Per-node budget**: an asyncio semaphore per node bounds concurrent store associations to
  ``max_associations``; the blocking pynetdicom work runs in a thread of its own per request, which
  hands its result to the event loop with ``call_soon_threadsafe``. In the gateway the semaphore is
  the DIMSE client's ``transfer_slot``, shared with retrievals: one budget per node for both.
* **Back-to-back C-STOREs** on one association need a guard against a pynetdicom 3.0.4 reactor race
  (:func:`gateway.dimse.socket_tuning.guard_reactor`), or a response is occasionally stolen and the
  instance times out.
* **Nothing unconfirmed is a success**: an instance counts as stored only when the PACS answered
  its C-STORE with success or a warning. After an abort, a timeout or a lost connection, the instance
  in flight and every one not yet sent get 0x0110 (processing failure). An association that cannot
  be established at all raises the PacsError of :func:`association_failure` (502/504 naming the node).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from pydicom.dataset import Dataset
from pynetdicom import AE, evt
from pynetdicom.association import Association

from gateway.dimse.outcomes import association_failure
from gateway.dimse.socket_tuning import busy, close_association, guard_reactor, new_ae, on_connection_open
from gateway.errors import GatewayError
from gateway.pacs import StoreItem, StoreResult
from gateway.settings import PacsNode
from translators.frames import transcode_part10
from translators.stow import PROCESSING_FAILURE, SOP_CLASS_NOT_SUPPORTED, TRANSFER_SYNTAX_NOT_SUPPORTED

log = logging.getLogger(__name__)
T = TypeVar("T")

EXPLICIT_VR_LE = "1.2.840.10008.1.2.1"
IMPLICIT_VR_LE = "1.2.840.10008.1.2"
_NATIVE = (EXPLICIT_VR_LE, IMPLICIT_VR_LE)
MAX_CONTEXTS = 128

# send_c_store(path) streams the file only with pynetdicom's STORE_SEND_CHUNKED_DATASET, which the
# app's start-up sets (gateway.dimse.process.configure_pynetdicom).


Context = tuple[str, list[str]]


def storage_contexts(items: Sequence[StoreItem]) -> list[list[Context]]:
    """Presentation contexts for the items, in batches of at most 128 (one association each).

    Per SOP class: one context per non-native transfer syntax of its items, then the native
    fallback ``[the items' native syntaxes first, then the other of Explicit/Implicit VR LE]``, and,
    when items come in both native syntaxes, an exact context for the second one too.
    """
    by_class: dict[str, list[str]] = {}
    for item in items:
        syntaxes = by_class.setdefault(item.sop_class_uid, [])
        if item.transfer_syntax not in syntaxes:
            syntaxes.append(item.transfer_syntax)
    batches: list[list[Context]] = [[]]
    for cls, syntaxes in by_class.items():
        contexts: list[Context] = [(cls, [ts]) for ts in syntaxes if ts not in _NATIVE]
        natives = [ts for ts in syntaxes if ts in _NATIVE]
        contexts.append((cls, natives + [ts for ts in _NATIVE if ts not in natives]))
        if len(natives) == 2:
            contexts.append((cls, [natives[1]]))
        contexts = contexts[:MAX_CONTEXTS]
        if len(batches[-1]) + len(contexts) > MAX_CONTEXTS:
            batches.append([])
        batches[-1].extend(contexts)
    return [b for b in batches if b]


class StoreClient:
    """C-STORE runner for one gateway: per node a semaphore bounds the store associations."""

    def __init__(self, calling_ae: str,
                 slot_for: Callable[[PacsNode], asyncio.Semaphore] | None = None) -> None:
        self.calling_ae = calling_ae
        self._slot_for = slot_for   # the DIMSE client's per-node transfer budget, shared with retrievals
        self._slots: dict[str, asyncio.Semaphore] = {}
        self.associations = 0   # opened over the client's life (tests: one per request and batch)

    def slot(self, node: PacsNode) -> asyncio.Semaphore:
        if self._slot_for is not None:
            return self._slot_for(node)
        if node.name not in self._slots:
            self._slots[node.name] = asyncio.Semaphore(node.max_associations)
        return self._slots[node.name]

    async def store(self, node: PacsNode, items: Sequence[StoreItem], workdir: Path) -> list[StoreResult]:
        """C-STORE every item; one result per item, in order. Transcoded copies go to ``workdir``."""
        if not items:
            return []
        cancel = threading.Event()
        return await self._in_thread(node, lambda: self._store_all(node, items, workdir, cancel), cancel)

    async def _in_thread(self, node: PacsNode, fn: Callable[[], T], cancel: threading.Event) -> T:
        loop = asyncio.get_running_loop()
        done: asyncio.Future[T] = loop.create_future()

        def deliver(ok: bool, value: Any) -> None:
            if done.done():
                return
            if ok:
                done.set_result(value)
            else:
                done.set_exception(value)

        def target() -> None:
            try:
                result: Any = fn()
                ok = True
            except BaseException as exc:  # noqa: BLE001 - handed to the awaiting coroutine
                result, ok = exc, False
            with contextlib.suppress(RuntimeError):   # loop already closed: nobody is waiting
                loop.call_soon_threadsafe(deliver, ok, result)

        async with self.slot(node):
            threading.Thread(target=target, name=f"c-store-{node.name}", daemon=True).start()
            try:
                return await asyncio.shield(done)
            except asyncio.CancelledError:
                # Keep the slot until the thread has stopped sending (between two instances).
                cancel.set()
                with contextlib.suppress(BaseException):
                    await asyncio.wait_for(asyncio.shield(done), timeout=node.timeouts.dimse + 5)
                raise

    # The methods below run in the store thread.

    def _ae(self, node: PacsNode, contexts: list[Context]) -> AE:
        ae = new_ae(self.calling_ae, node)
        for cls, syntaxes in contexts:
            ae.add_requested_context(cls, syntaxes)
        return ae

    def _associate(self, node: PacsNode, contexts: list[Context]) -> Association | None:
        """An established association; None when the PACS accepted it but none of its contexts."""
        connected = threading.Event()
        started = time.monotonic()

        def on_open(event: evt.Event) -> None:
            connected.set()
            on_connection_open(event)

        assoc = self._ae(node, contexts).associate(
            node.host, node.port, ae_title=node.ae_title, max_pdu=node.max_pdu,
            evt_handlers=[(evt.EVT_CONN_OPEN, on_open)])
        if not assoc.is_established and assoc.rejected_contexts and not assoc.accepted_contexts:
            return None   # pynetdicom aborts an association without any accepted context
        if not assoc.is_established:
            raise association_failure(assoc, node.name, connected=connected.is_set(), started=started,
                                      connect_timeout=node.timeouts.connect)
        self.associations += 1
        guard_reactor(assoc)
        return assoc

    def _store_all(self, node: PacsNode, items: Sequence[StoreItem], workdir: Path,
                   cancel: threading.Event) -> list[StoreResult]:
        results: dict[int, StoreResult] = {}
        for contexts in storage_contexts(items):
            classes = {cls for cls, _ in contexts}
            batch = [(i, item) for i, item in enumerate(items) if item.sop_class_uid in classes]
            try:
                assoc = self._associate(node, contexts)
            except GatewayError:
                if not results:
                    raise   # nothing sent yet: the request fails as a whole (502/504 naming the node)
                log.warning("node %s: a further store association failed", node.name)
                for i, _ in batch:
                    results[i] = StoreResult(PROCESSING_FAILURE, confirmed=False)
                continue
            if assoc is None:
                for i, _ in batch:
                    results[i] = StoreResult(SOP_CLASS_NOT_SUPPORTED, confirmed=False)
                continue
            msg_id = 0
            try:
                for i, item in batch:
                    if cancel.is_set() or not assoc.is_established:
                        results[i] = StoreResult(PROCESSING_FAILURE, confirmed=False)
                        continue
                    msg_id = msg_id % 65535 + 1
                    results[i] = self._store_one(assoc, node, item, msg_id, workdir)
            finally:
                _close(assoc)
        lost = sum(1 for r in results.values() if not r.confirmed)
        if lost:
            log.warning("node %s: %d of %d C-STOREs not confirmed", node.name, lost, len(items))
        return [results[i] for i in range(len(items))]

    def _store_one(self, assoc: Association, node: PacsNode, item: StoreItem, msg_id: int,
                   workdir: Path) -> StoreResult:
        accepted = [cx for cx in assoc.accepted_contexts if cx.abstract_syntax == item.sop_class_uid]
        if not accepted:
            return StoreResult(SOP_CLASS_NOT_SUPPORTED, confirmed=False)
        syntaxes = [str(cx.transfer_syntax[0]) for cx in accepted]
        path, syntax, temp = item.path, item.transfer_syntax, None
        if syntax not in syntaxes:
            target = next((ts for ts in _NATIVE if ts in syntaxes), None)
            if target is None:
                return StoreResult(TRANSFER_SYNTAX_NOT_SUPPORTED, confirmed=False)
            try:
                data = transcode_part10(item.path.read_bytes(), target)
            except Exception:  # noqa: BLE001 - TranscodeError, codec errors: the PACS cannot take it
                log.info("node %s: transcoding %s to %s failed", node.name, syntax, target, exc_info=True)
                return StoreResult(TRANSFER_SYNTAX_NOT_SUPPORTED, confirmed=False)
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
            return StoreResult(PROCESSING_FAILURE, confirmed=False)
        finally:
            if temp is not None:
                temp.unlink(missing_ok=True)
        if "Status" not in status:
            # Empty status: abort, timeout or lost connection (pynetdicom); the outcome is unknown.
            if assoc.is_established:
                assoc.abort()
            return StoreResult(PROCESSING_FAILURE, confirmed=False)
        return StoreResult(int(status.Status), confirmed=True, sent_syntax=syntax)


def _close(assoc: Association) -> None:
    close_association(assoc)
