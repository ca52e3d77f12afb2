"""The pynetdicom implementation of :class:`gateway.pacs.Pacs`: the gateway's DIMSE edge as a requestor.

This class only composes; each concern has one home (docs/architecture.md, "DIMSE edge"):

* :mod:`~gateway.dimse.threads`: the bridge onto worker threads, the per-node budgets, cancellation;
* :mod:`~gateway.dimse.association`: opening (tuned, guarded, failures mapped) and closing associations;
* :mod:`~gateway.dimse.pool`: reuse of query associations;
* :mod:`~gateway.dimse.contexts`: which presentation contexts are proposed;
* :mod:`~gateway.dimse.outcomes`: what responses and failures mean;
* :mod:`~gateway.dimse.find`, :mod:`~gateway.dimse.retrieve`, :mod:`~gateway.dimse.store`: the
  blocking operations.

Two engines behind the one class, chosen per node (``engine``, default ``gateway.dimse_engine``):
``fast`` runs C-ECHO, C-FIND, C-GET and C-MOVE on :mod:`gateway.dimse.fast.operations` and C-STORE on
:mod:`gateway.dimse.fast.store` (plain sockets), ``pynetdicom`` on the modules above; both go through the
same workers, budgets, metrics, contexts and outcomes.

The SCP roles (:mod:`~gateway.dimse.storage_scp` for C-MOVE arrivals, :mod:`~gateway.dimse.demo_pacs`)
are separate. pynetdicom's process-wide settings are applied by
:func:`gateway.dimse.process.configure_pynetdicom` at start-up, not here.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from pydicom.dataset import Dataset

from gateway.dimse import arrivals_routing, tls
from gateway.dimse import find as find_op
from gateway.dimse import probe as probe_op
from gateway.dimse import retrieve as retrieve_op
from gateway.dimse import store as store_op
from gateway.dimse.contexts import query_contexts
from gateway.dimse.fast import operations as fast_op
from gateway.dimse.fast import store as fast_store
from gateway.dimse.pool import AssociationPool, Pool, idle_seconds_for
from gateway.dimse.threads import Budgets, Workers, threads_for
from gateway.observability import Registry
from gateway.pacs import (
    AssociationFacts,
    FindResult,
    OnInstance,
    ProbeContext,
    QueryModel,
    RetrieveOutcome,
    RetrieveRequest,
    StoreItem,
    StoreItems,
    StoreResult,
)
from gateway.settings import PacsNode, Settings

GRACE_MARGIN = 5.0
"""Seconds past the node's DIMSE timeout a cancelled operation is given to stop."""


class PynetdicomPacs:
    def __init__(self, settings: Settings, registry: Registry | None = None) -> None:
        """``registry``: where the DIMSE metrics go (the app's, docs/architecture.md, "App"); a
        private one when not given."""
        self._calling_ae = settings.gateway.ae_title
        self._budgets = Budgets()
        self.registry = registry or Registry()
        self._workers = Workers(threads_for(settings.nodes), self.registry)
        self._node_names = [n.name for n in settings.nodes]
        self.registry.gauge_callback("dwg_query_associations", "query associations per node, in use or idle",
                                     ("node", "state"), self._pool_usage)
        self._pools: dict[str, Pool[Any]] = {}   # AssociationPool, or the fast engine's pool
        self._msg_ids = find_op.MessageIds()
        # Each TLS node's one context, built now: a certificate that does not load fails start-up.
        tls.prepare(settings.nodes)

    # ------------------------------------------------------------------ /metrics

    def query_associations_opened(self, node: PacsNode) -> int:
        """Associations the node's query pool opened so far (reuse shows as fewer than queries)."""
        pool = self._pools.get(node.name)
        return pool.opened if pool is not None else 0

    def _pool_usage(self) -> list[tuple[tuple[str, str], float]]:
        """(node, in_use | idle) -> associations, for every configured node (0 before first use)."""
        samples: list[tuple[tuple[str, str], float]] = []
        for name in self._node_names:
            pool = self._pools.get(name)
            samples.append(((name, "in_use"), pool.in_use if pool is not None else 0))
            samples.append(((name, "idle"), pool.idle if pool is not None else 0))
        return samples

    # ------------------------------------------------------------------ queries

    async def echo(self, node: PacsNode) -> float:
        pool = self._pool(node)

        def work() -> float:
            if node.engine == "fast":
                return fast_op.echo(pool, node, self._msg_ids.next)
            return find_op.echo(pool, node)

        return await self._workers.run(work, budget=self._budgets.query(node), cancel=threading.Event(),
                                       grace=_grace(node), node=node.name, operation="echo")

    async def find(self, node: PacsNode, identifier: Dataset, *, model: QueryModel | None = None,
                   max_results: int | None = None) -> FindResult:
        pool = self._pool(node)
        cancel = threading.Event()
        root = model or node.query_model
        cap = max_results or node.max_results

        def work() -> FindResult:
            if node.engine == "fast":
                return fast_op.find(pool, node, identifier, root=root, cap=cap, cancel=cancel,
                                    msg_ids=self._msg_ids.next)
            return find_op.find(pool, node, identifier, root=root, cap=cap, cancel=cancel,
                                msg_ids=self._msg_ids)

        return await self._workers.run(work, budget=self._budgets.query(node), cancel=cancel,
                                       grace=_grace(node), node=node.name, operation="find")

    # ------------------------------------------------------------------ transfers

    async def get(self, node: PacsNode, request: RetrieveRequest, on_instance: OnInstance,
                  cancel: threading.Event) -> RetrieveOutcome:
        def work() -> RetrieveOutcome:
            if node.engine == "fast":
                return fast_op.get(self._calling_ae, node, request, on_instance, cancel)
            return retrieve_op.get(self._calling_ae, node, request, on_instance, cancel)

        return await self._workers.run(work, budget=self._budgets.transfer(node), cancel=cancel,
                                       grace=_grace(node), node=node.name, operation="get")

    async def move(self, node: PacsNode, request: RetrieveRequest, *, destination: str, msg_id: int,
                   cancel: threading.Event) -> RetrieveOutcome:
        def work() -> RetrieveOutcome:
            try:
                if node.engine == "fast":
                    return fast_op.move(self._calling_ae, node, request, destination=destination,
                                        msg_id=msg_id, cancel=cancel)
                return retrieve_op.move(self._calling_ae, node, request, destination=destination,
                                        msg_id=msg_id, cancel=cancel)
            finally:
                # The fast storage SCP acknowledges before it spools: the move is over for the
                # caller only once those writes are handed to the spool (arrivals_routing.settle).
                arrivals_routing.settle(msg_id)

        return await self._workers.run(work, budget=self._budgets.transfer(node), cancel=cancel,
                                       grace=_grace(node), node=node.name, operation="move")

    async def associate_probe(self, node: PacsNode, contexts: Sequence[ProbeContext], *,
                              scp_roles: Sequence[str] = (),
                              timed_find: tuple[str, Dataset] | None = None,
                              hold_idle: float = 0.0) -> AssociationFacts:
        """One association for the node's PACS profile (gateway/dimse/probe.py), pynetdicom on every
        engine; on the transfer budget, as it proposes storage contexts like a C-GET."""
        def work() -> AssociationFacts:
            return probe_op.associate_probe(self._calling_ae, node, contexts, scp_roles, timed_find,
                                            hold_idle)

        return await self._workers.run(work, budget=self._budgets.transfer(node), cancel=threading.Event(),
                                       grace=_grace(node), node=node.name, operation="associate")

    async def store(self, node: PacsNode, items: StoreItems, workdir: Path) -> list[StoreResult]:
        # Items that come one by one reach the worker through a feed; the budget is taken when the
        # first one has arrived (gateway/dimse/store.py, docs/architecture.md "STOW-RS").
        async def engine(feed: Iterable[StoreItem], cancel: threading.Event) -> list[StoreResult]:
            def work() -> list[StoreResult]:
                if node.engine == "fast":
                    return fast_store.store_all(self._calling_ae, node, feed, workdir, cancel)
                return store_op.store_all(self._calling_ae, node, feed, workdir, cancel)

            return await self._workers.run(work, budget=self._budgets.transfer(node), cancel=cancel,
                                           grace=_grace(node), node=node.name, operation="store")

        return await store_op.store_streamed(items, engine)

    async def close(self) -> None:
        for pool in list(self._pools.values()):
            await self._workers.housekeeping(pool.close)
        self._workers.shutdown()

    # ------------------------------------------------------------------ internals

    def _pool(self, node: PacsNode) -> Any:
        """The node's query pool for its engine (event loop only: created on first use)."""
        pool = self._pools.get(node.name)
        if pool is None:
            if node.engine == "fast":
                pool = fast_op.query_pool(node, self._calling_ae, query_contexts())
            else:
                pool = AssociationPool(node, self._calling_ae, query_contexts())
            self._pools[node.name] = pool
        pool.idle_seconds = idle_seconds_for(node)   # the node's, as its PACS profile decided
        return pool


def _grace(node: PacsNode) -> float:
    return node.timeouts.dimse + GRACE_MARGIN
