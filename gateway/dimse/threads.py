"""The one bridge from the event loop to pynetdicom's blocking calls, and the per-node budgets.

pynetdicom blocks: an association request, a C-FIND with all its responses, a whole C-GET. Each
operation therefore runs on a worker thread while the event loop keeps serving. Every operation goes
through :meth:`Workers.run`, which is where the :class:`gateway.pacs.Pacs` contract is kept:

* **Budgets**: the node's semaphore (:class:`Budgets`) is held for the whole operation, so a node
  never sees more associations than configured: ``max_query_associations`` for C-ECHO/C-FIND,
  ``max_associations`` for C-GET, C-MOVE and C-STORE together. Two budgets, so long transfers never
  starve searches (docs/architecture.md, "DIMSE edge").
* **Cancellation**: when the awaiting coroutine is cancelled (the HTTP client left), the worker is
  told through its ``cancel`` event (C-CANCEL for C-FIND/C-GET/C-MOVE, PS3.7 9.3.2.3, 9.3.3.3,
  9.3.4.3; a store stops between instances) and the coroutine waits for it, up to a grace period,
  before it gives the budget back and re-raises. Otherwise the next request would open an
  association the PACS still counts as busy.
* **Threads**: one executor sized to the sum of all budgets, so an operation that holds its budget
  never waits for a thread, and a transfer never takes a query's thread. The work runs in a copy of
  the caller's context, so its log records carry the request id (gateway/observability.py).
* **Metrics** (docs/architecture.md, "App"): every operation is counted and timed by node, operation
  and outcome (``ok``, ``cancelled`` or the error's class name), and the wait for the budget is timed.
* **Traces** (gateway/tracing.py, when ``tracing.enabled``): the same operation is a child span of the
  request's span, begun and ended on its worker thread; its parent is captured here, on the loop,
  and handed over explicitly. Tracing off, the hook is one context variable read.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

from gateway.observability import Registry
from gateway.settings import PacsNode
from gateway.tracing import DimseSpan, dimse_span

T = TypeVar("T")

MIN_THREADS = 64

QUERY_OPERATIONS = frozenset({"echo", "find"})
"""Operations on the query budget; the others (get, move, store) are on the transfer budget."""


class Budgets:
    """Per node: the semaphores bounding its query and its transfer associations.

    Created on first use, inside the running loop (an asyncio primitive belongs to one loop).
    """

    def __init__(self) -> None:
        self._query: dict[str, asyncio.Semaphore] = {}
        self._transfer: dict[str, asyncio.Semaphore] = {}

    def query(self, node: PacsNode) -> asyncio.Semaphore:
        """C-ECHO and C-FIND: ``max_query_associations``."""
        if node.name not in self._query:
            self._query[node.name] = asyncio.Semaphore(node.max_query_associations)
        return self._query[node.name]

    def transfer(self, node: PacsNode) -> asyncio.Semaphore:
        """C-GET, C-MOVE and C-STORE together: ``max_associations``."""
        if node.name not in self._transfer:
            self._transfer[node.name] = asyncio.Semaphore(node.max_associations)
        return self._transfer[node.name]


def threads_for(nodes: Iterable[PacsNode]) -> int:
    """Enough worker threads for every budget of every node at once."""
    return max(MIN_THREADS, sum(n.max_query_associations + n.max_associations for n in nodes))


class DimseMetrics:
    """The DIMSE edge's metrics in the app's registry (docs/architecture.md, "App")."""

    def __init__(self, registry: Registry) -> None:
        labels = ("node", "operation", "outcome")
        self.operations = registry.counter(
            "dwg_dimse_operations_total", "DIMSE operations by node, operation and outcome", labels)
        self.duration = registry.histogram(
            "dwg_dimse_operation_duration_seconds",
            "DIMSE operation duration on its worker thread (association set-up included)", labels)
        self.budget_wait = registry.histogram(
            "dwg_dimse_budget_wait_seconds", "wait for a free association of the node's budget",
            ("node", "budget"))

    def record(self, node: str, operation: str, outcome: str, seconds: float) -> None:
        self.operations.inc(node=node, operation=operation, outcome=outcome)
        self.duration.observe(seconds, node=node, operation=operation, outcome=outcome)


class Workers:
    def __init__(self, max_threads: int = MIN_THREADS, registry: Registry | None = None) -> None:
        self._executor = ThreadPoolExecutor(max_workers=max_threads, thread_name_prefix="dimse")
        self.metrics = DimseMetrics(registry or Registry())

    async def run(self, work: Callable[[], T], *, budget: asyncio.Semaphore, cancel: threading.Event,
                  grace: float, node: str | None = None, operation: str | None = None) -> T:
        """``work()`` on a worker thread while holding ``budget``; see the module docstring.

        ``cancel`` is what ``work`` watches; ``grace`` bounds the wait for it to stop after a cancel
        (the node's DIMSE timeout plus a margin: a response it waits for arrives or times out by then).
        ``node`` and ``operation`` (echo, find, get, move, store) label its metrics; without them the
        operation is not measured.
        """
        loop = asyncio.get_running_loop()
        span = dimse_span(node, operation) if node and operation else None   # None unless traced
        measured = self._measured(work, cancel, node, operation, span) if node and operation else work
        call = functools.partial(contextvars.copy_context().run, measured)
        waiting = time.perf_counter()
        async with budget:
            if node and operation:
                kind = "query" if operation in QUERY_OPERATIONS else "transfer"
                waited = time.perf_counter() - waiting
                self.metrics.budget_wait.observe(waited, node=node, budget=kind)
                if span is not None:
                    span.budget_wait = waited
            future = loop.run_in_executor(self._executor, call)
            try:
                return await asyncio.shield(future)
            except asyncio.CancelledError:
                cancel.set()
                try:
                    await asyncio.wait_for(asyncio.shield(future), timeout=grace)
                except Exception:  # noqa: BLE001 - the caller is gone: nobody to report to
                    pass
                raise

    def _measured(self, work: Callable[[], T], cancel: threading.Event, node: str, operation: str,
                  span: DimseSpan | None = None) -> Callable[[], T]:
        """``work`` timed (and traced, with ``span``) on its thread: ``ok``, ``cancelled`` (it returned
        after a cancel) or the class name of what it raised."""
        def measured() -> T:
            started = time.perf_counter()
            outcome = "ok"
            result: object = None
            if span is not None:
                span.begin()
            try:
                value = work()
                result = value
                if cancel.is_set():
                    outcome = "cancelled"
                return value
            except BaseException as exc:
                outcome = type(exc).__name__
                raise
            finally:
                self.metrics.record(node, operation, outcome, time.perf_counter() - started)
                if span is not None:
                    span.end(outcome, result)

        return measured

    async def housekeeping(self, work: Callable[[], None]) -> None:
        """Short blocking work outside any budget (releasing idle associations at shutdown)."""
        await asyncio.get_running_loop().run_in_executor(self._executor, work)

    def shutdown(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
