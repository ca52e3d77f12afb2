"""The pynetdicom implementation of :class:`gateway.pacs.Pacs`.

(Transitional facade over DimseClient, Retriever and StoreClient; those become its internals.)
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from pydicom.dataset import Dataset

from gateway.dimse.client import DimseClient
from gateway.dimse.retrieve import Retriever
from gateway.dimse.store import StoreClient
from gateway.pacs import (
    FindResult,
    OnInstance,
    QueryModel,
    RetrieveOutcome,
    RetrieveRequest,
    StoreItem,
    StoreResult,
)
from gateway.settings import PacsNode, Settings


class PynetdicomPacs:
    def __init__(self, settings: Settings) -> None:
        self._client = DimseClient(settings)
        self._retriever = Retriever(settings.gateway.ae_title)
        self._store = StoreClient(settings.gateway.ae_title, slot_for=self._client.transfer_slot)
        self._executor = ThreadPoolExecutor(max_workers=32, thread_name_prefix="retrieve")

    def query_associations_opened(self, node: PacsNode) -> int:
        """Associations the node's query pool opened so far (/metrics)."""
        return self._client.query_pool(node).opened

    @property
    def store_associations_opened(self) -> int:
        return self._store.associations

    async def echo(self, node: PacsNode) -> float:
        return await self._client.echo(node)

    async def find(self, node: PacsNode, identifier: Dataset, *, model: QueryModel | None = None,
                   max_results: int | None = None) -> FindResult:
        return await self._client.find(node, identifier, model=model, max_results=max_results)

    async def get(self, node: PacsNode, request: RetrieveRequest, on_instance: OnInstance,
                  cancel: threading.Event) -> RetrieveOutcome:
        def work() -> RetrieveOutcome:
            return self._retriever.get(node, level=request.level, study=request.study, series=request.series,
                                       sops=list(request.sops) if request.sops else None,
                                       sop_classes=request.sop_classes, on_instance=on_instance,
                                       cancel=cancel, patient_id=request.patient_id,
                                       compressed_first=request.compressed_first)
        return await self._transfer(node, work, cancel)

    async def move(self, node: PacsNode, request: RetrieveRequest, *, destination: str, msg_id: int,
                   cancel: threading.Event) -> RetrieveOutcome:
        def work() -> RetrieveOutcome:
            return self._retriever.move(node, level=request.level, study=request.study, series=request.series,
                                        sops=list(request.sops) if request.sops else None,
                                        destination=destination, msg_id=msg_id, cancel=cancel,
                                        patient_id=request.patient_id)
        return await self._transfer(node, work, cancel)

    async def _transfer(self, node: PacsNode, work: Callable[[], RetrieveOutcome],
                        cancel: threading.Event) -> RetrieveOutcome:
        loop = asyncio.get_running_loop()
        async with self._client.transfer_slot(node):
            fut = loop.run_in_executor(self._executor, work)
            try:
                return await asyncio.shield(fut)
            except asyncio.CancelledError:
                cancel.set()
                try:
                    await asyncio.wait_for(asyncio.shield(fut), timeout=node.timeouts.dimse + 5)
                except Exception:  # noqa: BLE001 - the caller is gone
                    pass
                raise

    async def store(self, node: PacsNode, items: Sequence[StoreItem], workdir: Path) -> list[StoreResult]:
        return await self._store.store(node, items, workdir)

    async def close(self) -> None:
        await self._client.close()
        self._executor.shutdown(wait=False, cancel_futures=True)
