"""StowService: one STOW-RS request from body to per-instance outcomes (PS3.18 §10.5;
docs/architecture.md, "STOW-RS").

1. Receive: the multipart body, streamed part by part to temp files in a work directory of the
   request under the spool's ``.incoming`` (:mod:`gateway.stow.receive`).
2. Prepare and store as the parts arrive (:mod:`gateway.stow.pipeline`): each complete
   ``application/dicom`` part is prepared in a thread (:mod:`gateway.stow.prepare`: repaired where
   needed, or a failure code) and handed at once to :meth:`gateway.pacs.Pacs.store`, which keeps one
   association (one of the node's transfer slots) for the request; metadata requests are prepared
   when their bulk data is in, at the end. Success only for what the PACS confirmed.
3. Freshness (docs/architecture.md, "Freshness"; :mod:`cache.keys`): bump exactly the generations
   :func:`cache.keys.generations_changed_by_store` names for the studies that got an instance, and
   record those studies' location (study -> node) for federated WADO.
4. The work directory goes, whatever happened (transcoded copies the PACS interface made included).

A body that ends early is a body that ended there: the client left (``body`` raised), or a limit was
hit (413 past ``max_stow_bytes``/``max_stow_parts``, 507 when the spool has no room). Every part that
had arrived complete is still stored and the generations bumped for what the PACS confirmed, then the
exception propagates (a limit's message says how many instances were stored before it). A
:class:`gateway.errors.PacsError` from the store (e.g. the node is unreachable) propagates after the
body was read; by the ``Pacs`` contract nothing was stored then. If the request is cancelled, the
store is cancelled between instances and, since which instances the PACS took is then unknown, the
generations of every study handed to it are bumped.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import tempfile
from collections.abc import AsyncIterator, Iterable, Sequence
from pathlib import Path

from cache import keys
from cache.base import Cache
from cache.spool import Spool
from gateway.errors import BadRequest, GatewayError
from gateway.pacs import Pacs
from gateway.settings import PacsNode, Settings
from gateway.stow.pipeline import Pipeline
from gateway.stow.prepare import DICOM, ROOT_TYPES
from gateway.stow.receive import MemoryWindow, receive
from translators import stow as st
from translators.uids import is_uid

log = logging.getLogger(__name__)


class StowService:
    def __init__(self, settings: Settings, pacs: Pacs, cache: Cache, spool: Spool) -> None:
        self.settings = settings
        self.pacs = pacs
        self.cache = cache
        self.spool = spool
        self.window = MemoryWindow()   # parts held in memory, all requests together

    async def store(self, node: PacsNode, *, root_type: str, boundary: str, body: AsyncIterator[bytes],
                    study: str | None = None) -> list[st.InstanceOutcome]:
        """Store every instance of a ``multipart/related`` body into ``node``, each as soon as its part
        has arrived.

        ``root_type``: the request's ``type`` parameter, one of :data:`gateway.stow.prepare.ROOT_TYPES`
        (the caller answers 415 for others); ``boundary``: its boundary; ``study``: the (valid) UID of
        ``POST /studies/{study}``, or None. Returns one outcome per instance, in request order.
        Raises :class:`~gateway.errors.BadRequest` when the body holds no part at all, and what ended
        the body early (see the module docstring) after storing what had arrived.
        """
        if root_type not in ROOT_TYPES:
            raise ValueError(f"unsupported STOW-RS root type {root_type!r}")
        workdir = Path(tempfile.mkdtemp(prefix="stow-", dir=self.spool.tmp))
        reserved = 0

        def reserve(nbytes: int) -> bool:
            nonlocal reserved
            if not self.spool.reserve(nbytes):
                return False
            reserved += nbytes
            return True

        pipeline = Pipeline(self.pacs, node, root_type, study, workdir)
        ended: Exception | None = None
        try:
            limits = self.settings.limits
            try:
                await receive(body, boundary, workdir, max_bytes=limits.max_stow_bytes,
                              max_parts=limits.max_stow_parts, reserve=reserve,
                              on_part=pipeline.part_complete, received=pipeline.received,
                              window=self.window,
                              in_memory=lambda media: (media or root_type or DICOM) == DICOM)
            except Exception as exc:  # noqa: BLE001 - the client left, or a limit: the body ended here
                ended = exc
            received = pipeline.received
            if ended is None and not received.parts and not received.truncated_headers:
                raise BadRequest(f"the body holds no part delimited by the boundary {boundary!r}")
            outcomes = await pipeline.finish()
        except GatewayError:
            await pipeline.abort()   # Pacs.store raises only before it sent anything: nothing stored
            raise
        except BaseException:
            # Cancelled, or a bug: which of the instances handed to the PACS it took is unknown.
            await pipeline.abort()
            await self._invalidate_unknown(node, pipeline)
            raise
        finally:
            pipeline.received.release()   # nothing reads the parts any more (finish or abort returned)
            await asyncio.to_thread(shutil.rmtree, workdir, True)
            self.spool.release(reserved)
        stored = await self._after_store(node, outcomes)
        if ended is None:
            log.info("STOW-RS to %s: %d of %d instances stored", node.name, stored, len(outcomes))
            return outcomes
        log.info("STOW-RS to %s: the upload ended early (%s); %d of %d instances received stored",
                 node.name, type(ended).__name__, stored, len(outcomes))
        if isinstance(ended, GatewayError) and stored:
            ended.detail = f"{ended.detail}; {stored} instance(s) received before that were stored"
        raise ended

    async def _after_store(self, node: PacsNode, outcomes: Sequence[st.InstanceOutcome]) -> int:
        """Bump the generations the stored instances make stale and record the studies' location;
        the number of instances stored."""
        stored = [o for o in outcomes if st.is_stored(o.status)]
        if not stored:
            return 0
        studies = await self._bump(node, (o.study_uid for o in stored))
        ttl = self.settings.cache.ttl.location
        for study in studies:
            await self.cache.sadd(keys.study_locations(study), [node.name], ttl)
        return len(stored)

    async def _invalidate_unknown(self, node: PacsNode, pipeline: Pipeline) -> None:
        """After a store stopped half-way: bump the studies of every instance handed to the PACS (a
        bump too many only costs a cache miss; a missing one would serve stale results)."""
        if pipeline.handed:
            log.warning("STOW-RS to %s stopped with %d instance(s) handed to the PACS; their studies' "
                        "cached results are invalidated", node.name, len(pipeline.handed))
            await self._bump(node, (e.header.study for e in pipeline.handed if e.header is not None))

    async def _bump(self, node: PacsNode, study_uids: Iterable[str | None]) -> list[str]:
        """Bump the generations a store into these studies makes stale; the studies bumped.

        The cache never raises (cache/base.py); an unreachable one means cached searches may stay
        stale until their TTL, which is logged, and the request still succeeds.
        """
        # Keys hold UIDs only (cache/keys.py): a study UID that is not one cannot be searched for
        # through the gateway either, so it has no generation to bump.
        studies = sorted({s for s in study_uids if s and is_uid(s)})
        bumped = [await self.cache.incr(counter)
                  for counter in keys.generations_changed_by_store(node.name, studies)]
        if any(value < 0 for value in bumped):
            log.warning("STOW-RS to %s: the cache did not take the generation bump; cached searches "
                        "may be stale until their TTL", node.name)
        return studies
