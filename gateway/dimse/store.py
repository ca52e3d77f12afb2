"""C-STORE: the instances of one STOW-RS request, sent to one node (blocking; run by
:mod:`gateway.dimse.threads` under the node's transfer budget, shared with retrievals).

* **Contexts from the items** (:func:`gateway.dimse.contexts.store_batches`): an instance goes on the
  context of its own transfer syntax when the PACS accepted it; only when the PACS refused that
  syntax is it transcoded (``translators.frames.transcode_part10``) to the native fallback the PACS
  accepted (:func:`gateway.dimse.contexts.store_fallback`). Past the 128-context limit the SOP
  classes are split over consecutive associations, one batch each.
* **Streamed from disk**: instances are sent by path with pynetdicom's chunked send
  (``STORE_SEND_CHUNKED_DATASET``, set by :func:`gateway.dimse.process.configure_pynetdicom`): the
  file is read PDU by PDU, never decoded or held whole.
* **Back-to-back C-STOREs** on one association rely on the reactor guard every association gets
  (:mod:`gateway.dimse.socket_tuning`), or a response is occasionally stolen and the instance times out.
* **Nothing unconfirmed is a success**: an instance counts as stored only when the PACS answered its
  C-STORE (PS3.4 B.2.3) with success or a warning. After an abort, a timeout or a lost connection, the
  instance in flight and every one not yet sent are processing failures (0110), unconfirmed; the
  mapping is :mod:`gateway.dimse.outcomes`'. An association that cannot be established at all, before
  anything was sent, fails the request as a whole (502/504 naming the node).
* **Cancellation**: a set ``cancel`` stops between two instances; the rest are not sent.

docs/architecture.md, "DIMSE edge".
"""

from __future__ import annotations

import logging
import os
import tempfile
import threading
from collections.abc import Sequence
from pathlib import Path

from pydicom.dataset import Dataset
from pynetdicom.association import Association

from gateway.dimse import outcomes
from gateway.dimse.association import accepted_syntaxes, close_association, open_association
from gateway.dimse.contexts import store_batches, store_fallback
from gateway.dimse.socket_tuning import busy
from gateway.errors import GatewayError
from gateway.pacs import StoreItem, StoreResult
from gateway.settings import PacsNode
from translators.frames import transcode_part10

log = logging.getLogger(__name__)


def store_all(calling_ae: str, node: PacsNode, items: Sequence[StoreItem], workdir: Path,
              cancel: threading.Event) -> list[StoreResult]:
    """C-STORE every item; one result per item, in order."""
    results: dict[int, StoreResult] = {}
    for contexts in store_batches(items):
        classes = {cls for cls, _ in contexts}
        batch = [(i, item) for i, item in enumerate(items) if item.sop_class_uid in classes]
        try:
            assoc = open_association(calling_ae, node, contexts, none_accepted_ok=True)
        except GatewayError:
            if not results:
                raise   # nothing sent yet: the request fails as a whole
            log.warning("node %s: a further store association failed", node.name)
            for i, _ in batch:
                results[i] = outcomes.store_lost()
            continue
        if assoc is None:
            for i, _ in batch:
                results[i] = outcomes.store_sop_class_refused()
            continue
        msg_id = 0
        try:
            for i, item in batch:
                if cancel.is_set() or not assoc.is_established:
                    results[i] = outcomes.store_lost()
                    continue
                msg_id = msg_id % 65535 + 1
                results[i] = _store_one(assoc, node, item, msg_id, workdir)
        finally:
            close_association(assoc)
    lost = sum(1 for r in results.values() if not r.confirmed)
    if lost:
        log.warning("node %s: %d of %d C-STOREs not confirmed", node.name, lost, len(items))
    return [results[i] for i in range(len(items))]


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
