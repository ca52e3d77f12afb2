"""The gateway's DIMSE client: C-ECHO and C-FIND against configured nodes, in worker threads.

pynetdicom is blocking; each operation runs in a thread of a dedicated executor (the default
one is sized for CPU work, not for dozens of waiting associations). The asyncio side holds the
pool's semaphore for the whole operation, so a node never sees more associations than its budget,
even when the HTTP client goes away: then the thread is told to C-CANCEL and the coroutine waits
for it to finish before giving the slot back.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

from pydicom.dataset import Dataset
from pynetdicom.association import Association

from gateway.dimse.outcomes import status_error
from gateway.dimse.pool import AssociationPool
from gateway.dimse.socket_tuning import busy
from gateway.errors import AssociationAborted, DimseFailure
from gateway.pacs import FindResult, QueryModel
from gateway.settings import PacsNode, Settings

log = logging.getLogger(__name__)
T = TypeVar("T")

Verification = "1.2.840.10008.1.1"
StudyRootQueryRetrieveInformationModelFind = "1.2.840.10008.5.1.4.1.2.2.1"
PatientRootQueryRetrieveInformationModelFind = "1.2.840.10008.5.1.4.1.2.1.1"
_FIND_MODELS = {"study": StudyRootQueryRetrieveInformationModelFind,
                "patient": PatientRootQueryRetrieveInformationModelFind}


class DimseClient:
    def __init__(self, settings: Settings, *, max_threads: int = 64) -> None:
        self.settings = settings
        self._executor = ThreadPoolExecutor(max_workers=max_threads, thread_name_prefix="dimse")
        self._query_pools: dict[str, AssociationPool] = {}
        for node in settings.nodes:
            self._query_pools[node.name] = AssociationPool(
                node, "query", settings.gateway.ae_title,
                [Verification, StudyRootQueryRetrieveInformationModelFind,
                 PatientRootQueryRetrieveInformationModelFind],
                max_size=node.max_query_associations,
            )
        self._msg_id = 0
        self._msg_lock = threading.Lock()
        self._transfer_slots: dict[str, asyncio.Semaphore] = {}

    def transfer_slot(self, node: PacsNode) -> asyncio.Semaphore:
        """The node's budget for retrievals and stores together (``max_associations``), apart from
        the query budget so long transfers never starve QIDO (architecture.md §4)."""
        if node.name not in self._transfer_slots:
            self._transfer_slots[node.name] = asyncio.Semaphore(node.max_associations)
        return self._transfer_slots[node.name]

    def query_pool(self, node: PacsNode) -> AssociationPool:
        return self._query_pools[node.name]

    def _next_msg_id(self) -> int:
        with self._msg_lock:
            self._msg_id = self._msg_id % 65535 + 1
            return self._msg_id

    async def _run(self, pool: AssociationPool, fn: Callable[[], T], cancel: threading.Event) -> T:
        loop = asyncio.get_running_loop()
        async with pool.slots:
            fut: asyncio.Future[T] = loop.run_in_executor(self._executor, fn)
            try:
                return await asyncio.shield(fut)
            except asyncio.CancelledError:
                # The HTTP client went away: ask the thread to C-CANCEL and keep the slot until it has.
                cancel.set()
                try:
                    await asyncio.wait_for(asyncio.shield(fut), timeout=pool.node.timeouts.dimse + 5)
                except Exception:  # noqa: BLE001 - the request is gone; nothing to report to
                    pass
                raise

    # ------------------------------------------------------------------ C-ECHO

    async def echo(self, node: PacsNode) -> float:
        """C-ECHO the node; returns the round trip in seconds or raises a PacsError."""
        pool = self.query_pool(node)
        cancel = threading.Event()

        def work() -> float:
            started = time.monotonic()
            assoc, reused = pool.acquire()
            ok = False
            try:
                with busy(assoc):
                    status = assoc.send_c_echo()
                err = status_error(status, node.name, "C-ECHO", started=started,
                                   dimse_timeout=node.timeouts.dimse)
                if err is not None:
                    raise err
                ok = True
                return time.monotonic() - started
            finally:
                pool.release(assoc, reusable=ok)

        return await self._run(pool, work, cancel)

    # ------------------------------------------------------------------ C-FIND

    async def find(self, node: PacsNode, identifier: Dataset, *, model: QueryModel | None = None,
                   max_results: int | None = None) -> FindResult:
        """One C-FIND; all pending responses collected (C-FIND has no paging).

        Past ``max_results`` (default: the node's cap) the C-FIND is cancelled and the result marked
        truncated. Failure statuses and broken associations raise PacsError subclasses.
        """
        pool = self.query_pool(node)
        cancel = threading.Event()
        cap = max_results or node.max_results
        sop_class = _FIND_MODELS[model or node.query_model]

        def attempt(assoc: Association, result: FindResult) -> None:
            started = time.monotonic()
            msg_id = self._next_msg_id()
            cancelled = False
            responses = assoc.send_c_find(identifier, sop_class, msg_id=msg_id)
            for status, data in responses:
                err = status_error(status, node.name, "C-FIND", started=started,
                                   dimse_timeout=node.timeouts.dimse)
                if err is not None:
                    raise err
                code = int(status.Status)
                if code in (0xFF00, 0xFF01) and data is not None and not cancelled:
                    result.datasets.append(data)
                    if len(result.datasets) >= cap + 1 or cancel.is_set():
                        # Cap + 1 tells us more exist; the extra one is dropped below.
                        assoc.send_c_cancel(msg_id, query_model=sop_class)
                        cancelled = True
            if cancelled:
                raise _Cancelled()

        def work() -> FindResult:
            result = FindResult(node=node.name)
            for try_no in (1, 2):
                assoc, reused = pool.acquire()
                if not pool.accepted(assoc, sop_class):
                    pool.release(assoc, reusable=True)
                    root = "Patient" if sop_class == PatientRootQueryRetrieveInformationModelFind else "Study"
                    raise DimseFailure(f"node {node.name} does not support {root} Root C-FIND "
                                       f"(set query_model for this node)", node=node.name, status=0x0122)
                try:
                    with busy(assoc):
                        attempt(assoc, result)
                except _Cancelled:
                    pool.release(assoc, reusable=False)
                    if len(result.datasets) > cap:
                        del result.datasets[cap:]
                        result.truncated = True
                    return result
                except AssociationAborted:
                    pool.release(assoc, reusable=False)
                    # A reused association the PACS had quietly closed: one retry on a fresh one.
                    if reused and try_no == 1 and not result.datasets:
                        continue
                    raise
                except BaseException:
                    pool.release(assoc, reusable=False)
                    raise
                pool.release(assoc, reusable=True)
                return result
            raise AssertionError("unreachable")  # pragma: no cover

        return await self._run(pool, work, cancel)

    async def close(self) -> None:
        for pool in self._query_pools.values():
            await asyncio.get_running_loop().run_in_executor(self._executor, pool.close)
        self._executor.shutdown(wait=False, cancel_futures=True)


class _Cancelled(Exception):
    """Internal: the C-FIND was cancelled by us (cap reached or client gone)."""
