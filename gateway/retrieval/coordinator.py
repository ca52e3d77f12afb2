"""How a retrieval is coordinated beyond this process: the interface the cluster implements.

The retrieval service runs every fetch through a :class:`Coordinator`. Alone (no Redis, or no
cluster endpoint configured) that is :class:`LocalCoordinator`: retrieve from the PACS, nothing
else. With replicas, :class:`gateway.cluster.coordinator.ClusterCoordinator` implements it: one
replica retrieves a series under a cluster-wide lease, the others copy what it announces
(docs/architecture.md, "Replicas"). The dependency points from the cluster to this interface,
never back.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Protocol

from gateway.retrieval.fetch import SeriesFetch

FromPacs = Callable[[list[str]], Awaitable[None]]
"""Retrieve these SOP Instance UIDs of the fetch's series from its node."""


class Coordinator(Protocol):
    async def run(self, fetch: SeriesFetch, from_pacs: FromPacs) -> None:
        """Bring every instance of ``fetch``'s manifest into the local spool (``fetch.arrive``),
        from the PACS (``from_pacs(missing)``) or from wherever else it is available."""
        ...

    def move_scope(
        self, msg_id: int, fetch: SeriesFetch, expected: set[str]
    ) -> AbstractAsyncContextManager[None]:
        """Held while a C-MOVE with ``msg_id`` runs: sub-operations another process receives for it
        must reach ``fetch`` too."""
        ...


class LocalCoordinator:
    """One process alone: the PACS is the only source."""

    async def run(self, fetch: SeriesFetch, from_pacs: FromPacs) -> None:
        await from_pacs(fetch.missing)

    @asynccontextmanager
    async def move_scope(self, msg_id: int, fetch: SeriesFetch, expected: set[str]) -> AsyncIterator[None]:
        yield
