"""C-ECHO and C-FIND on a pooled query association (blocking; run by :mod:`gateway.dimse.threads`).

C-FIND has no paging (PS3.4 C.4.1): the PACS sends every match as a pending response. The gateway
collects them up to the node's result cap plus one (the extra one proves more exist), then sends a
C-CANCEL (PS3.7 9.3.2.3) and marks the result truncated; the same C-CANCEL is sent when the caller
sets ``cancel`` (the HTTP client left). An association that saw a C-CANCEL or a failure is not reused.

A reused association the PACS had quietly closed fails on first use: when nothing was received yet,
the C-FIND is retried once on a fresh association (docs/architecture.md, "DIMSE edge").
"""

from __future__ import annotations

import threading
import time

from pydicom.dataset import Dataset
from pynetdicom.association import Association

from gateway.dimse import outcomes
from gateway.dimse.association import accepts
from gateway.dimse.contexts import Root, find_model
from gateway.dimse.pool import AssociationPool, FindStopped, pooled_find
from gateway.dimse.socket_tuning import busy
from gateway.pacs import FindResult
from gateway.settings import PacsNode


class MessageIds:
    """Message IDs (0000,0110), 1..65535, for the requests of one gateway (PS3.7 Annex E)."""

    def __init__(self) -> None:
        self._last = 0
        self._lock = threading.Lock()

    def next(self) -> int:
        with self._lock:
            self._last = self._last % 65535 + 1
            return self._last


def echo(pool: AssociationPool, node: PacsNode) -> float:
    """C-ECHO (PS3.7 9.1.5); the round trip in seconds, association set-up included when needed."""
    started = time.monotonic()
    assoc, _ = pool.acquire()
    ok = False
    try:
        with busy(assoc):
            status = assoc.send_c_echo()
        err = outcomes.status_error(status, node.name, "C-ECHO", started=started,
                                    dimse_timeout=node.timeouts.dimse)
        if err is not None:
            raise err
        ok = True
        return time.monotonic() - started
    finally:
        pool.release(assoc, reusable=ok)


def find(pool: AssociationPool, node: PacsNode, identifier: Dataset, *, root: Root, cap: int,
         cancel: threading.Event, msg_ids: MessageIds) -> FindResult:
    """One C-FIND in the ``root`` information model, at most ``cap`` matches (see module docstring)."""
    sop_class = find_model(root)
    result = FindResult(node=node.name)

    def collect(assoc: Association) -> None:
        with busy(assoc):
            _collect(assoc, node, identifier, sop_class, cap, cancel, msg_ids.next(), result)

    return pooled_find(pool, result, cap, acquire=pool.acquire, accepts=lambda a: accepts(a, sop_class),
                       refused=lambda: outcomes.find_model_refused(node.name, root), collect=collect)


def _collect(assoc: Association, node: PacsNode, identifier: Dataset, sop_class: str, cap: int,
             cancel: threading.Event, msg_id: int, result: FindResult) -> None:
    started = time.monotonic()
    cancelled = False
    for status, data in assoc.send_c_find(identifier, sop_class, msg_id=msg_id):
        err = outcomes.status_error(status, node.name, "C-FIND", started=started,
                                    dimse_timeout=node.timeouts.dimse)
        if err is not None:
            raise err
        if outcomes.is_pending(status) and data is not None and not cancelled:
            result.datasets.append(data)
            if len(result.datasets) >= cap + 1 or cancel.is_set():
                assoc.send_c_cancel(msg_id, query_model=sop_class)
                cancelled = True
    if cancelled:
        raise FindStopped()
